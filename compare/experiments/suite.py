"""The ``train`` suite of ``compare.run`` (see :mod:`compare.suite`): the lesson's claims,
each with an experiment that could show it, torch and linen on disjoint seeds.

With no options it runs the built-in exploratory plan (``claims.design.PLANS``) on one
dataset. ``--protocol FILE`` runs and judges what a protocol file states
(``claims.protocol``), recorded with its hash. ``--seeds N`` / ``--seed-offset S`` choose
the seeds (with a protocol: a deviation, recorded, and the run is exploratory). Units
(one seed of one dataset in one framework) run in ``--workers`` processes with fixed
thread counts (``claims.runner``); each is saved as it finishes, so ``--resume`` runs only
those left.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from compare.suite import Progress, Saved, Suite

DATASETS = ["digits", "synthetic", "mnist", "fashion_mnist", "cifar10"]
SAVE_EVERY_S = 30.0  # results.json is rewritten at most this often while units finish (and at the end)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("train")
    group.add_argument(
        "--dataset",
        default="digits",
        choices=DATASETS,
        help="digits ships with scikit-learn, synthetic is generated from the seed; the others are read from"
        " --data-dir (a --protocol names its own datasets)",
    )
    group.add_argument("--data-dir", type=Path, help="folder with the dataset's files (MNIST IDX, CIFAR batches)")
    group.add_argument("--protocol", type=Path, metavar="FILE", help="run and judge what this protocol file states")
    group.add_argument("--seeds", type=int, metavar="N", help="seeds per framework (torch and linen each their own)")
    group.add_argument("--seed-offset", type=int, metavar="S", help="the first seed (torch S.., linen S+N..)")
    group.add_argument(
        "--workers",
        type=int,
        metavar="W",
        help="processes that train at once, each on one thread (default: the CPU count, at most 2; 0: in this process)",
    )


def design_of(args: argparse.Namespace):
    """The design a command line asks for."""
    from compare.experiments.claims import protocol

    if args.seeds is not None and args.seeds < 2:
        raise SystemExit(f"--seeds {args.seeds}: a framework needs at least two seeds for an interval")
    if getattr(args, "protocol", None) is not None:
        return protocol.load(args.protocol, args.seeds, args.seed_offset)
    return protocol.builtin("full" if args.full else "quick", args.dataset, args.seeds, args.seed_offset)


def _workers(args: argparse.Namespace) -> int:
    if args.workers is not None:
        return max(0, args.workers)
    return max(1, min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _train(args: argparse.Namespace, progress: Progress, saved: Saved) -> dict:
    from compare.experiments.claims import runner, verdicts

    design = design_of(args)
    meta = saved.data["meta"]
    previous = meta.get("train_protocol")
    if (
        meta.get("train_units_done")
        and previous
        and previous.get("sha256", previous.get("name")) != design.meta.get("sha256", design.meta.get("name"))
    ):
        raise SystemExit("--resume: the saved train units were made with another protocol or plan; use a new --out")
    if saved.data.get("train"):  # a resumed run's records, read back from results.json
        saved.data["train"] = [runner.revive(r) for r in saved.data["train"]]
    done = set(meta.get("train_units_done", []))
    every = runner.units(design.plans, args.data_dir, args.device)
    todo = [u for u in every if u.key not in done]
    workers = min(_workers(args), len(todo)) if todo else 0
    progress(None, len(every))
    for u in every:
        if u.key in done:
            progress(f"{u.key} (done before)", None)
    timing = meta.setdefault("train_timing", {"units": {}})
    meta["train_protocol"] = design.meta
    last = [time.monotonic()]
    t0, c0 = time.perf_counter(), time.process_time()

    def finished(unit, records, unit_timing):
        settings = unit_timing.pop("settings")
        before = {k: v for k, v in meta.get("train_threads", settings).items() if k not in ("workers", "differ")}
        differ = before != settings or meta.get("train_threads", {}).get("differ", False)
        meta["train_threads"] = {**settings, "workers": workers, **({"differ": True} if differ else {})}
        saved.merge({"train": records})
        meta["train_units_done"] = [*meta.get("train_units_done", []), unit.key]
        timing["units"][unit.key] = {k: round(v, 3) if isinstance(v, float) else v for k, v in unit_timing.items()}
        if time.monotonic() - last[0] > SAVE_EVERY_S:
            saved.save()
            last[0] = time.monotonic()
        progress(f"{unit.key}: {len(records)} runs in {unit_timing['wall_s']:.0f} s", None)

    runner.run_units(todo, workers, finished)
    timing["wall_s"] = timing.get("wall_s", 0.0) + time.perf_counter() - t0
    timing["parent_cpu_s"] = timing.get("parent_cpu_s", 0.0) + time.process_time() - c0
    timing["units_cpu_s"] = sum(u.get("cpu_s", 0.0) for u in timing["units"].values())
    summary = verdicts.summary(saved.data.get("train", []), design.analysis)
    return {"meta": {"train_summary": summary, "train_timing": timing}}


TRAIN = Suite(
    "train",
    "the lesson's claims about BatchNorm and Dropout, judged over seeds with torch and linen as blocks",
    _train,
    _add_arguments,
)
