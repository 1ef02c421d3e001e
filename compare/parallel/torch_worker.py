"""One rank of a torch data-parallel job, started by torchrun
(``compare.parallel.launch.torchrun_job``)::

    python -m torch.distributed.run --nnodes 1 --nproc-per-node N --master-addr 127.0.0.1 \
        --master-port PORT -m compare.parallel.torch_worker TASK[,TASK...] --out DIR [--args JSON]

torchrun sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; the rank joins
the gloo process group, writes its pid to ``DIR/pid.<rank>`` (so that a fault can be
injected) and runs the tasks; rank 0 writes ``<task>.json``. The tasks:

* ``checks``: ``compare.parallel.torch_checks`` (DDP per-device, torchbn's SyncBatchNorm,
  dropout, uneven shards, ``torch.nn.SyncBatchNorm`` on CPU).
* ``train``, ``resume``, ``loop``: the small mlp under DDP with SGD, checkpoints by rank 0
  (``compare.parallel.checkpoint``), as in the JAX worker.
* ``timing``, ``cost``: ``compare.parallel.cost``.
* ``gpu_syncbn``: ``torchbn``'s SyncBatchNorm against ``torch.nn.SyncBatchNorm`` on CUDA.

Dropout: before each step every rank seeds torch's generator with (seed, step, rank), so
the masks are a function of the step and the rank, as JAX's ``fold_in`` keys are: a resume
draws the masks an uninterrupted run would.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import torchbn.train as ttrain
from compare import registry
from compare.parallel import torch_checks, train_batch, train_spec
from torchbn.batchnorm import convert_sync_batchnorm


def step_seed(seed: int, step: int, rank: int) -> int:
    """The dropout seed of ``rank`` at ``step``: distinct for every (step, rank)."""
    return (seed * 1_000_003 + step) * 1_009 + rank + 1


def wrap(model: torch.nn.Module, bn_mode: str) -> DDP:
    """DDP over ``model``: synchronised BatchNorm (torchbn's, any backend) without the buffer
    broadcast, which equal statistics do not need; per-device with DDP's default broadcast
    of rank 0's buffers at every forward."""
    if bn_mode == "sync":
        return DDP(convert_sync_batchnorm(model), forward_sync_buffers=False)
    return DDP(model)


def ddp_setup(name: str, bn_mode: str, batch: int):
    """(DDP model, optimizer, this rank's fixed batch) of registry model ``name``, for timing and counting."""
    spec = registry.get(name)
    torch.manual_seed(0)
    ddp = wrap(spec.build_torch(), bn_mode)
    g = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randn(batch, *spec.input_shape, generator=g)
    return ddp, ttrain.sgd(ddp, lr=0.1, momentum=0.9), (x, torch.randint(0, 10, (batch,), generator=g))


def step(ddp, opt, x, y) -> torch.Tensor:
    return ttrain.train_step(ddp, opt, x, y)


def agree(n: int) -> int:
    """Rank 0's ``n`` on every rank (the same number of steps, or the collectives hang)."""
    t = torch.tensor([n])
    dist.broadcast(t, 0)
    return int(t)


def _rows(a, rank: int, size: int):
    n = a.shape[0] // size
    return torch.from_numpy(a[rank * n : (rank + 1) * n])


def train_run(run: dict, steps: int, out: Path, save_at=(), start: str | None = None) -> dict:
    """The small mlp under DDP from the seed (or from checkpoint ``start``) to ``steps``."""
    from compare.io import train_state
    from compare.parallel import checkpoint

    rank, size = dist.get_rank(), dist.get_world_size()
    spec = train_spec(run["dropout"])
    if start:  # the optimizer holds the model's parameters, which the wrappers keep
        _, model, opt, done = train_state.load_torch(start)
        ddp = wrap(model, run["bn_mode"])
    else:
        torch.manual_seed(0)
        ddp, done = wrap(spec.build_torch(), run["bn_mode"]), 0
        opt = ttrain.sgd(ddp, lr=0.1, momentum=0.9)
    saved = []
    name = f"torch-{run['bn_mode']}-drop{run['dropout']}"
    for s in range(done, steps):
        x, y = train_batch(s)
        torch.manual_seed(step_seed(0, s, rank))
        step(ddp, opt, _rows(x, rank, size), _rows(y, rank, size).long())
        if s + 1 in save_at or s + 1 == steps:
            path = out / "ckpt" / f"{name}{'-resumed' if start else ''}-step{s + 1}.safetensors"
            checkpoint.save_torch(path, spec, ddp.module, opt, s + 1, run["bn_mode"])
            saved.append(str(path))
    return {"from_step": done, "checkpoints": saved}


CHECKS = ("ddp_per_device", "synchronised", "dropout_masks", "uneven", "torch_syncbatchnorm_on_cpu")


def task_checks(out: Path, args: dict) -> dict:
    """The ``checks`` (names of ``compare.parallel.torch_checks`` functions, all by default)."""
    from compare.parallel import uneven_shards

    chosen = args.get("checks", CHECKS)
    records, used = [], {}
    for check in CHECKS:
        if check not in chosen:
            continue
        if check == "uneven":
            found, used = torch_checks.uneven(*uneven_shards(dist.get_world_size(), torch_checks.SHARD))
            records += found
        else:
            records += getattr(torch_checks, check)()
    return {"records": records, "uneven": used}


def task_train(out: Path, args: dict) -> dict:
    return {r["bn_mode"]: train_run(r, args["steps"], out, set(args.get("save_at", []))) for r in args["runs"]}


def task_resume(out: Path, args: dict) -> dict:
    return {r["bn_mode"]: train_run(r, args["steps"], out, start=r["from"]) for r in args["runs"]}


def task_loop(out: Path, args: dict) -> dict:
    """A checkpoint after every step, to one path, for the fault test."""
    from compare.parallel import checkpoint

    rank, size = dist.get_rank(), dist.get_world_size()
    run = args["run"]
    spec = train_spec(run["dropout"])
    torch.manual_seed(0)
    ddp = wrap(spec.build_torch(), run["bn_mode"])
    opt = ttrain.sgd(ddp, lr=0.1, momentum=0.9)
    for s in range(args["steps"]):
        x, y = train_batch(s)
        torch.manual_seed(step_seed(0, s, rank))
        step(ddp, opt, _rows(x, rank, size), _rows(y, rank, size).long())
        checkpoint.save_torch(out / "ckpt" / "latest.safetensors", spec, ddp.module, opt, s + 1, run["bn_mode"])
        if rank == 0:
            (out / "progress").write_text(str(s + 1))
    return {"steps": args["steps"]}


def task_timing(out: Path, args: dict) -> dict:
    from compare.parallel import cost

    return {"records": cost.time_torch(**args)}


def task_cost(out: Path, args: dict) -> dict:
    from compare.parallel import cost

    return {"records": cost.count_torch(**args)}


def task_gpu_syncbn(out: Path, args: dict) -> dict:
    """torchbn's SyncBatchNorm against torch.nn.SyncBatchNorm on CUDA, uneven shards:
    outputs, input and parameter gradients, running statistics."""
    from torch import nn

    from compare.checks import tolerances

    rank, size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count())
    g = torch.Generator().manual_seed(rank)
    x = (torch.randn(3 + 2 * rank, 4, 5, 5, generator=g) * 2 + rank).to(device)  # uneven: 3, 5, 7, ... rows
    outs = []
    for layer in (nn.SyncBatchNorm(4), convert_sync_batchnorm(nn.BatchNorm2d(4))):
        layer = layer.to(device).train()
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        (y * torch.arange(4, device=device).view(1, 4, 1, 1)).square().mean().backward()
        outs.append([y.detach(), xi.grad, layer.weight.grad, layer.bias.grad, layer.running_mean, layer.running_var])
    t = tolerances.get("parallel.stats")
    diffs = [float((a - b).abs().max()) for a, b in zip(*outs, strict=True)]
    scales = [float(b.abs().max()) for b in outs[0]]
    ok = all(t.holds(d, s) for d, s in zip(diffs, scales, strict=True))
    return {"diffs": diffs, "scales": scales, "ok": ok, "world": size, "device": torch.cuda.get_device_name(device)}


TASKS = {"checks": task_checks, "train": task_train, "resume": task_resume, "loop": task_loop}
TASKS |= {"timing": task_timing, "cost": task_cost, "gpu_syncbn": task_gpu_syncbn}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m compare.parallel.torch_worker")
    p.add_argument("tasks")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--args", default="{}")
    a = p.parse_args(argv)
    gpu = "gpu_syncbn" in a.tasks
    backend = "nccl" if gpu and torch.cuda.device_count() >= int(os.environ.get("WORLD_SIZE", "1")) else "gloo"
    dist.init_process_group(backend)
    rank = dist.get_rank()
    (a.out / f"pid.{rank}").write_text(str(os.getpid()))
    args = json.loads(a.args)
    try:
        for task in a.tasks.split(","):
            result = TASKS[task](a.out, args.get(task, {}))
            if rank == 0:
                from compare.io.checkpoint import atomic_path

                with atomic_path(a.out / f"{task}.json") as tmp:
                    tmp.write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
