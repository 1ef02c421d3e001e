"""Data parallelism in PyTorch: ``DistributedDataParallel`` over ``torch.distributed``
(gloo on CPU, NCCL on GPU), two processes on loopback.

* Per-device BatchNorm (plain ``BatchNorm*d`` under DDP): each rank normalises with its
  own shard's statistics (ghost BatchNorm) and updates its own buffers; gradients are
  all-reduced (averaged). With ``broadcast_buffers=True`` (DDP's default) every forward
  first overwrites all ranks' buffers with rank 0's, so after step k the running
  statistics on rank r are rank 0's after step k-1 updated with rank r's shard k.
* ``SyncBatchNorm`` computes the global-batch statistics, but only on CUDA: on CPU its
  forward raises; the error is caught and reported, and the check is skipped with it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from compare import registry
from compare.checks import diffs, tolerances
from compare.records import DistributedRecord

WORLD = 2
SHARD = 8
SPEC = registry.get("cnn").replace(in_channels=2, image_size=8, channels=(4, 8), hidden=16, dropout=0.0, dropout2d=0.0)


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step`` (WORLD * SHARD samples), the same in every process."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(WORLD * SHARD, *SPEC.input_shape, generator=g) * 2 + 0.5
    return x, torch.randint(0, SPEC.config.num_classes, (WORLD * SHARD,), generator=g)


def shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[rank * SHARD : (rank + 1) * SHARD]


def buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def _worker(rank: int, port: int, out_dir: str, bn_mode: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
        model = SPEC.build_torch()
        result: dict = {}
        if bn_mode == "sync":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        x, y = data(0)
        try:
            ddp = DDP(model)  # SyncBatchNorm on CPU: refused here ("only work with GPU modules")
            logits = ddp(shard(x, rank))
        except (ValueError, RuntimeError) as e:
            result["error"] = f"{type(e).__name__}: {e}"
            torch.save(result, Path(out_dir) / f"rank{rank}.pt")
            return
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        nn.functional.cross_entropy(logits, shard(y, rank)).backward()
        result["logits"] = logits.detach()
        result["grads"] = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
        result["buffers_step1"] = buffers(model)
        opt.step()
        result["params_step1"] = {k: p.detach().clone() for k, p in model.named_parameters()}
        x2, _ = data(1)
        with torch.no_grad():
            ddp(shard(x2, rank))  # DDP first broadcasts rank 0's buffers, then this rank's shard updates them
        result["buffers_step2"] = buffers(model)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(out_dir: str | Path, bn_mode: str = "per_device") -> list[dict]:
    """Both ranks' results (``{"error": ...}`` when the forward was refused)."""
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(_free_port(), str(out_dir), bn_mode), nprocs=WORLD, join=True)
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def checks(out_dir: str | Path) -> list[dict]:
    """The torch records of the ``distributed`` suite, against single-process references."""
    ranks = run(out_dir, "per_device")
    x, y = data(0)
    torch.manual_seed(0)
    alone = [SPEC.build_torch() for _ in range(WORLD)]
    for m in alone[1:]:
        m.load_state_dict(alone[0].state_dict())
    logits, grads = [], []
    for r, m in enumerate(alone):
        out = m(shard(x, r))
        nn.functional.cross_entropy(out, shard(y, r)).backward()
        logits.append(out.detach())
        grads.append({k: p.grad for k, p in m.named_parameters()})
    mean_grads = {k: sum(g[k] for g in grads) / WORLD for k in grads[0]}
    records = []

    def rec(check: str, got: list, want: list, tol: str) -> None:
        # float32, gloo all-reduce sums in another order: measured 3e-8 to 2e-7
        d = diffs.tree_diff(got, want)
        t = tolerances.get(f"parallel.{tol}")
        records.append(
            DistributedRecord(
                framework="torch",
                devices=WORLD,
                bn_mode="per_device",
                check=check,
                max_abs_diff=d.max_abs,
                tol=t.bound(d.scale),
                ok=t.holds(d.max_abs, d.scale),
            ).to_dict()
        )

    rec("DDP per-device BN == each shard alone (logits)", [r["logits"] for r in ranks], logits, "logits")
    rec("DDP gradients == mean of the shards' gradients", [r["grads"] for r in ranks], [mean_grads] * WORLD, "grads")
    rec(
        "running stats after step 1 are each rank's own",
        [r["buffers_step1"] for r in ranks],
        [buffers(m) for m in alone],
        "stats",
    )
    # step 2 on rank 1 starts from rank 0's buffers (the broadcast), then its own shard
    ref = SPEC.build_torch()
    ref.load_state_dict({**ranks[0]["params_step1"], **ranks[0]["buffers_step1"]}, strict=False)
    with torch.no_grad():
        ref.train()(shard(data(1)[0], 1))
    rec(
        "step 2 on rank 1 = rank 0's buffers (broadcast) + rank 1's shard",
        ranks[1]["buffers_step2"],
        buffers(ref),
        "stats",
    )
    sync = run(out_dir, "sync")
    if "error" in sync[0]:
        records.append(
            DistributedRecord(
                framework="torch",
                devices=WORLD,
                bn_mode="sync",
                check="SyncBatchNorm",
                max_abs_diff=None,
                tol=None,
                ok=None,
                detail=f"skipped: SyncBatchNorm refuses CPU tensors ({sync[0]['error']})",
            ).to_dict()
        )
    return records
