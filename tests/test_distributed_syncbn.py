"""``torchbn.batchnorm.SyncBatchNorm``: torch's ``SyncBatchNorm`` formula in plain tensor
operations, so it runs on CPU (gloo) where ``torch.nn.SyncBatchNorm`` refuses to.

In one process (a gloo group of one rank), the synchronised path itself is checked: its
forward equals ``batch_norm`` and its hand-written backward passes ``gradcheck`` in
float64. The count-weighted merge across real processes is checked on 2 and 4 torchrun
ranks (``compare.parallel.torch_checks``, in ``test_distributed.py`` and the suite); on a
GPU, against ``torch.nn.SyncBatchNorm`` itself (skipped on CPU).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from torchbn.batchnorm import SyncBatchNorm, _SyncBatchNormFunction, convert_sync_batchnorm


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    """A gloo process group of this one process (torch.distributed is global: torn down after)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    store = tmp_path_factory.mktemp("store") / "file"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def _sync(x, w, b, rm, rv, momentum, group):
    """The synchronised path, forced (the module takes it only with more than one rank)."""
    return _SyncBatchNormFunction.apply(x, w, b, rm, rv, 1e-5, momentum, group, 1)


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 2, 5)], ids=["BatchNorm1d", "BatchNorm2d"])
def test_the_synchronised_path_equals_batch_norm_and_its_backward_passes_gradcheck(group, shape):
    torch.manual_seed(0)
    x = (torch.randn(*shape, dtype=torch.float64) * 3 + 2).requires_grad_(True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    rm2, rv2 = rm.clone(), rv.clone()
    y = _sync(x, w, b, rm, rv, 0.1, group)
    torch.testing.assert_close(y, F.batch_norm(x, rm2, rv2, w, b, True, 0.1, 1e-5), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((rm, rv), (rm2, rv2), rtol=1e-12, atol=1e-12)  # unbiased running variance
    assert torch.autograd.gradcheck(lambda x, w, b: _sync(x, w, b, None, None, 0.1, group), (x, w, b))


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_the_module_on_one_rank_is_batchnorm_in_training_and_in_eval(group, momentum):
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(4, momentum=momentum)
    sync = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(4, momentum=momentum)))[0]
    assert isinstance(sync, SyncBatchNorm)
    for step in range(3):
        x = torch.randn(5, 4, 3, 3) + step
        torch.testing.assert_close(sync(x), ref(x), rtol=0, atol=0)
    torch.testing.assert_close(sync.state_dict(), ref.state_dict(), rtol=0, atol=0)
    sync.eval(), ref.eval()
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(sync(x), ref(x), rtol=0, atol=0)


def test_convert_keeps_every_parameter_and_buffer_and_ddp_accepts_it_on_cpu(group):
    """torch.nn.SyncBatchNorm's own conversion gives a model DDP refuses on CPU; this one runs."""
    from compare import registry

    torch.manual_seed(0)
    model = registry.get("cnn").replace(in_channels=1, image_size=8, channels=(4, 8), hidden=16).build_torch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_sync_batchnorm(model)
    assert sum(isinstance(m, SyncBatchNorm) for m in converted.modules()) == 3  # bn1, bn2, fc_bn
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in converted.modules())
    torch.testing.assert_close(converted.state_dict(), before, rtol=0, atol=0)
    ddp = nn.parallel.DistributedDataParallel(converted)
    ddp(torch.randn(4, 1, 8, 8)).sum().backward()
    with pytest.raises(ValueError, match="SyncBatchNorm layers only work with GPU modules"):
        nn.parallel.DistributedDataParallel(nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(3))))


def test_torch_syncbatchnorm_still_refuses_cpu_tensors_on_this_torch():
    """The reason ``torchbn`` has its own: torch 2.13's statistics kernels are CUDA only."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is here: nothing to show on CPU")
    with pytest.raises(NotImplementedError, match="batch_norm_stats"):
        torch.batch_norm_stats(torch.randn(4, 3), 1e-5)


def test_a_single_value_per_channel_is_refused_on_one_rank(group):
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        _sync(torch.randn(1, 3), None, None, None, None, 0.1, group)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs CUDA: torch.nn.SyncBatchNorm computes its statistics with CUDA-only kernels "
    "(batch_norm_stats, batch_norm_gather_stats_with_counts); on CPU torchbn's SyncBatchNorm is checked "
    "against one process with the global batch instead",
)
def test_on_a_gpu_torchbn_syncbatchnorm_equals_torch_syncbatchnorm_on_uneven_shards(tmp_path):
    """Two torchrun ranks on the GPU(s) (NCCL with two GPUs, else gloo with CUDA tensors),
    3 and 5 rows: outputs, input and parameter gradients, running statistics
    (the ``parallel.stats`` tolerance)."""
    from compare.parallel import launch

    launch.torchrun_job("gpu_syncbn", 2, tmp_path, timeout_s=600)
    found = launch.read_json(tmp_path, "gpu_syncbn.json")
    assert found["ok"], found
