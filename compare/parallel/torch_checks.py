"""The torch data-parallel checks, run in every rank of a torchrun job
(``compare.parallel.torch_worker``; gloo on CPU): ``DistributedDataParallel`` with
per-device BatchNorm, and with ``torchbn.batchnorm.SyncBatchNorm``, which works on CPU.

* Per-device BatchNorm (plain ``BatchNorm*d`` under DDP): each rank normalises with its
  own shard's statistics (ghost BatchNorm) and updates its own buffers; gradients are
  all-reduced (averaged). With ``broadcast_buffers=True`` (DDP's default) every forward
  first overwrites all ranks' buffers with rank 0's, so after step k the running
  statistics on rank r are rank 0's after step k-1 updated with rank r's shard k.
* Synchronised: ``torchbn``'s ``SyncBatchNorm`` gives what one process gives with the
  global batch (logits, gradients, running statistics, 5 SGD steps), and weights uneven
  shards by their counts. ``torch.nn.SyncBatchNorm`` itself still refuses CPU tensors
  (reported, ``ok: null``).
* Dropout: each rank reseeds torch's generator with its rank after building the model (the
  same weights everywhere), so every rank draws its own masks; the same seed everywhere
  gives every rank the same masks (the bug).

Rank 0 computes the single-process references and returns the records; the other ranks
return none. :func:`checks` launches the job from outside.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import torchbn.train as ttrain
from compare import registry
from compare.checks import diffs, tolerances
from compare.records import DistributedRecord
from torchbn.batchnorm import convert_sync_batchnorm

SHARD = 8
SPEC = registry.get("cnn").replace(in_channels=2, image_size=8, channels=(4, 8), hidden=16, dropout=0.0, dropout2d=0.0)
WORLD = 2  # the default of :func:`checks`


def world() -> tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


def data(step: int, world_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step`` (world * SHARD samples), the same in every process."""
    n = (world_size or dist.get_world_size()) * SHARD
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(n, *SPEC.input_shape, generator=g) * 2 + 0.5
    return x, torch.randint(0, SPEC.config.num_classes, (n,), generator=g)


def shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[rank * SHARD : (rank + 1) * SHARD]


def buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def seed_ranks(seed: int, rank: int) -> None:
    """After building the model from ``seed`` on every rank: each rank its own dropout stream."""
    torch.manual_seed(seed * 1000 + rank + 1)


def gather(obj):
    """Every rank's ``obj`` on rank 0 (a list in rank order), None elsewhere."""
    rank, size = world()
    out = [None] * size if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def record(check: str, got, want, tol: str, bn_mode: str, **extra) -> dict:
    d = diffs.tree_diff(got, want)
    t = tolerances.get(tol)
    return DistributedRecord(
        framework="torch",
        devices=dist.get_world_size(),
        bn_mode=bn_mode,
        check=check,
        max_abs_diff=d.max_abs,
        tol=t.bound(d.scale),
        ok=t.holds(d.max_abs, d.scale),
        processes=dist.get_world_size(),
        launcher="torchrun",
        **extra,
    ).to_dict()


def control(check: str, a, b, *, differ: bool, bn_mode: str) -> dict:
    d = diffs.max_abs(a, b)
    return DistributedRecord(
        framework="torch",
        devices=dist.get_world_size(),
        bn_mode=bn_mode,
        check=check,
        max_abs_diff=d,
        tol=1e-3 if differ else 0.0,
        ok=d > 1e-3 if differ else d == 0.0,
        processes=dist.get_world_size(),
        launcher="torchrun",
    ).to_dict()


def _model(sync: bool) -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
    model = SPEC.build_torch()
    return convert_sync_batchnorm(model) if sync else model


def ddp_per_device() -> list[dict]:
    """Per-device statistics under DDP, and rank 0's buffers broadcast at the next forward."""
    rank, size = world()
    model = _model(sync=False)
    ddp = DDP(model)  # broadcast_buffers=True: DDP's default
    opt = ttrain.sgd(ddp, lr=0.1, momentum=0.9)
    x, y = data(0)
    _, logits = ttrain.loss_and_grads(ddp, shard(x, rank), shard(y, rank))
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
    step1 = buffers(model)
    opt.step()
    params1 = {k: p.detach().clone() for k, p in model.named_parameters()}
    with torch.no_grad():
        ddp(shard(data(1)[0], rank))  # DDP first broadcasts rank 0's buffers, then this rank's shard updates them
    mine = gather({"logits": logits, "grads": grads, "step1": step1, "params1": params1, "step2": buffers(model)})
    if rank != 0:
        return []
    alone = [_model(sync=False) for _ in range(size)]
    ref_logits, ref_grads = [], []
    for r, m in enumerate(alone):
        _, out = ttrain.loss_and_grads(m, shard(x, r), shard(y, r))
        ref_logits.append(out)
        ref_grads.append({k: p.grad for k, p in m.named_parameters()})
    mean_grads = {k: sum(g[k] for g in ref_grads) / size for k in ref_grads[0]}
    second = []
    for r in range(1, size):  # step 2 on rank r starts from rank 0's buffers (the broadcast), then its own shard
        ref = SPEC.build_torch().train()
        ref.load_state_dict({**mine[0]["params1"], **mine[0]["step1"]}, strict=False)
        with torch.no_grad():
            ref(shard(data(1)[0], r))
        second.append((mine[r]["step2"], buffers(ref)))
    return [
        record("DDP per-device BN == each shard alone (logits)", [m["logits"] for m in mine], ref_logits,
               "parallel.logits", "per_device"),
        record("DDP gradients == mean of the shards' gradients", [m["grads"] for m in mine], [mean_grads] * size,
               "parallel.grads", "per_device"),
        record("running stats after step 1 are each rank's own", [m["step1"] for m in mine],
               [buffers(m) for m in alone], "parallel.stats", "per_device"),
        record("step 2 on rank r = rank 0's buffers (broadcast) + rank r's shard", [s[0] for s in second],
               [s[1] for s in second], "parallel.stats", "per_device"),
    ]  # fmt: skip


def synchronised(steps: int = 5) -> list[dict]:
    """``torchbn.batchnorm.SyncBatchNorm`` under DDP == one process with the global batch:
    the first step's logits, gradients and running statistics, then ``steps`` SGD steps."""
    rank, size = world()
    model = _model(sync=True)
    ddp = DDP(model, forward_sync_buffers=False)  # synchronised statistics are equal on every rank already
    opt = ttrain.sgd(ddp, lr=0.1, momentum=0.9)
    x, y = data(0)
    _, logits = ttrain.loss_and_grads(ddp, shard(x, rank), shard(y, rank))
    first = {
        "logits": logits,
        "grads": {k: p.grad.clone() for k, p in model.named_parameters()},
        "stats": buffers(model),
    }
    opt.step()
    for s in range(1, steps):
        bx, by = data(s)
        ttrain.train_step(ddp, opt, shard(bx, rank), shard(by, rank))
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ghost = _model(sync=False)
    _, ghost_logits = ttrain.loss_and_grads(ghost, shard(x, rank), shard(y, rank))  # per-device, no DDP: a control
    mine = gather({**first, "final": final, "ghost": ghost_logits})
    if rank != 0:
        return []
    ref = _model(sync=False)
    ref_opt = ttrain.sgd(ref, lr=0.1, momentum=0.9)
    _, ref_logits = ttrain.loss_and_grads(ref, x, y)
    ref_grads = {k: p.grad.clone() for k, p in ref.named_parameters()}
    ref_stats = buffers(ref)
    ref_opt.step()
    for s in range(1, steps):
        ttrain.train_step(ref, ref_opt, *data(s))
    ref_final = dict(ref.state_dict())
    tag = "SyncBatchNorm (torchbn) under DDP == one process, global batch"
    return [
        record(f"{tag} (logits)", torch.cat([m["logits"] for m in mine]), ref_logits, "parallel.logits", "sync"),
        record(f"{tag} (gradients, every rank)", [m["grads"] for m in mine], [ref_grads] * size, "parallel.grads",
               "sync"),
        record(f"{tag} (running stats, every rank)", [m["stats"] for m in mine], [ref_stats] * size,
               "parallel.stats", "sync"),
        record(f"{steps} DDP steps with SyncBatchNorm (torchbn) == one process", [m["final"] for m in mine],
               [ref_final] * size, "parallel.train", "sync"),
        control("per-device BN differs from synchronised BN", torch.cat([m["ghost"] for m in mine]), ref_logits,
                differ=True, bn_mode="per_device"),
    ]  # fmt: skip


def dropout_masks() -> list[dict]:
    """Ranks reseeded with their rank draw different masks, reproducibly; one seed everywhere is the bug."""
    rank, size = world()
    spec = registry.get("mlp").replace(in_features=12, hidden=(16, 8), dropout=0.5)
    torch.manual_seed(0)
    model = spec.build_torch().train()
    x = torch.randn(SHARD, 12, generator=torch.Generator().manual_seed(0))  # the same samples on every rank
    outs = []
    for per_rank in (True, True, False):
        if per_rank:
            seed_ranks(0, rank)
        else:
            torch.manual_seed(1)
        with torch.no_grad():
            outs.append(model(x))
    mine = gather(outs)
    if rank != 0:
        return []
    pairs = [(diffs.max_abs(mine[i][0], mine[j][0]), i, j) for i in range(size) for j in range(i + 1, size)]
    _, i, j = min(pairs)
    return [
        control(f"dropout masks differ between every pair of ranks (closest: {i}, {j})", mine[i][0], mine[j][0],
                differ=True, bn_mode="per_device"),
        control("dropout masks are reproducible: the same seeds give the same masks", [m[0] for m in mine],
                [m[1] for m in mine], differ=False, bn_mode="per_device"),
        control("the bug: one seed on every rank draws the same masks", mine[0][2], mine[1][2], differ=False,
                bn_mode="per_device"),
    ]  # fmt: skip


def uneven(x, valid) -> tuple[list[dict], dict]:
    """SyncBatchNorm on uneven shards (rank r holds only its valid rows of ``x``, the
    arrays of ``compare.parallel.jax_checks.uneven_shards``): the count-weighted statistics
    of every valid row. Returns the records and the statistics (for the comparison with Flax)."""
    from torchbn.batchnorm import SyncBatchNorm

    rank, size = world()
    rows = torch.from_numpy(x).reshape(size, -1, 3)[rank][torch.from_numpy(valid).reshape(size, -1)[rank]]
    bn = SyncBatchNorm(3, momentum=1.0).train()  # momentum 1: the running statistics are the batch's
    bn(rows)
    if rank != 0:
        return [], {}
    every = torch.from_numpy(x[valid[:, 0]])
    n = every.shape[0]
    tag = f"uneven shards {[int(c) for c in valid.reshape(size, -1).sum(1)]}"
    records = [
        record(f"{tag}: SyncBatchNorm mean == count-weighted mean of every row", bn.running_mean, every.mean(0),
               "parallel.stats", "sync"),
        record(f"{tag}: SyncBatchNorm running_var == unbiased variance of every row", bn.running_var,
               every.var(0, unbiased=True), "parallel.stats", "sync"),
    ]  # fmt: skip
    biased = bn.running_var * (n - 1) / n
    return records, {"mean": bn.running_mean.tolist(), "var": biased.tolist()}


def torch_syncbatchnorm_on_cpu() -> list[dict]:
    """``torch.nn.SyncBatchNorm`` on CPU: refused by DDP (reported, not a failure)."""
    try:
        DDP(nn.SyncBatchNorm.convert_sync_batchnorm(_model(sync=False)))
        detail = "torch.nn.SyncBatchNorm accepted a CPU model: the CPU restriction is gone, see docs/distributed.md"
    except (ValueError, RuntimeError) as e:
        detail = f"skipped: torch.nn.SyncBatchNorm refuses CPU tensors ({type(e).__name__}: {e})"
    if dist.get_rank() != 0:
        return []
    return [
        DistributedRecord(
            framework="torch", devices=dist.get_world_size(), bn_mode="sync", check="SyncBatchNorm",
            max_abs_diff=None, tol=None, ok=None, detail=detail, processes=dist.get_world_size(), launcher="torchrun",
        ).to_dict()
    ]  # fmt: skip


def checks(out_dir: str | Path, processes: int = WORLD, timeout_s: float = 600) -> list[dict]:
    """The torch records of the ``distributed`` suite: a torchrun job of ``processes`` ranks."""
    from compare.parallel import launch

    launch.torchrun_job("checks", processes, Path(out_dir), timeout_s=timeout_s)
    return launch.read_json(out_dir, "checks.json")["records"]
