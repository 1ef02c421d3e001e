"""Command line: ``python -m compare.run [--suite NAME ...] [--quick | --full] [--device auto|cpu|gpu] [--out DIR]``.

Runs the chosen suites, writes ``results.json`` and ``report.md`` (and PNG plots) into
``--out`` (default: a new time-stamped folder under ``runs/``), prints the tables, and
exits non-zero when any check that should hold does not. Results are rewritten after every
suite and every benchmark group, so a run stopped by SIGTERM or Ctrl-C keeps what it
finished (exit status 143 or 130); ``--budget-s`` and ``--resume`` plan around that.
"""

from __future__ import annotations

import os

# torch and JAX share one GPU in this process: stop JAX from reserving 75% of its memory
# up front (must be set before JAX starts its backend).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import datetime
import signal
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from compare import registry
from compare.checks import equivalence
from compare.report import claim_plots, plots, results
from compare.report import console as console_report

QUICK_MODELS = ["mlp", "cnn", "resnet18", "resnet18_cifar"]
DEFAULT_SUITES = ["equivalence", "bench"]
SUITES = ["equivalence", "spec", "bench", "train", "distributed"]
TRAIN_MODELS = ["mlp", "cnn"]


def _equivalence(args, progress, saved) -> dict[str, list[dict]]:
    models = list(registry.NAMES) if args.full else QUICK_MODELS
    seeds = [0, 1, 2] if args.full else [0]
    dtypes = ("float32", "bfloat16")  # bfloat16: both sides compute in it (torch autocast, Flax compute_dtype)
    progress(None, len(models) * len(seeds) * 2 * len(dtypes))
    records = equivalence.run(
        models,
        ["linen", "nnx"],
        seeds=seeds,
        batch=16 if args.full else 8,
        device=args.device,
        dtypes=dtypes,
        progress=progress,
    )
    return {"equivalence": records}


def _spec(args, progress, saved) -> dict[str, list[dict]]:
    """The spec facts (pytest), then the train-mode equivalence records of mlp and cnn."""
    from compare.checks import spec, train_equivalence

    facts = spec.run(progress=lambda fact, total: progress(fact, total + len(TRAIN_MODELS) * 2))
    train = []
    for name in TRAIN_MODELS:
        for api in ("linen", "nnx"):
            train.append(train_equivalence.record(name, api, steps=200))
            progress(f"train-mode {name}/{api}", None)
    return {"spec": facts, "equivalence": train}


def _bench(args, progress, saved) -> dict:
    """The benchmark sweep; every finished group is saved at once (``saved``)."""
    from compare import bench

    sweep = bench.SWEEPS[args.sweep or f"{'full' if args.full else 'quick'}-{args.device}"]
    done = frozenset((r["model"], r["batch_size"], r["dtype"]) for r in saved.data.get("bench", []))
    groups = [g for g in sweep.groups() if g not in done]
    impls = bench.all_implementations(args.device)
    progress(None, sum(len([i for i in impls if sweep.runs(m, i)]) for m, _, _ in groups))
    skipped = {f"{m}/{i}": bench.SKIP_REASONS.get((m, i), "left out of this sweep") for m, i in sweep.skip}

    def on_group(records, settings):
        saved.merge({"bench": records, "meta": {"bench_settings": {**settings, "skipped": skipped}}})
        saved.save()

    _, settings = bench.run(
        sweep,
        args.device,
        progress=lambda what: progress(what, None),
        on_group=on_group,
        budget_s=args.budget_s,
        done=done,
    )
    # a sweep cut short by its budget is not done: --resume runs the groups it skipped
    complete = all(state.startswith("done") for state in settings["groups"].values())
    return {"meta": {"bench_settings": {**settings, "skipped": skipped}}, "complete": complete}


def _train(args, progress, saved) -> dict:
    from compare.experiments import claims, data, training

    plan = claims.PLANS["full" if args.full else "quick"]
    dataset = data.load(args.dataset, args.data_dir)
    runs = plan.runs()
    progress(None, len(runs))
    records = training.run(
        runs,
        dataset,
        frameworks_of=plan.frameworks,
        progress=lambda what: progress(what, None),
        target=plan.target_accuracy,
        device=args.device,
    )
    summary = {"claims": claims.claims(records), "framework_agreement": claims.framework_agreement(records)}
    return {"train": records, "meta": {"train_summary": summary}}


def _distributed(args, progress, saved) -> dict:
    """JAX on 2, 4 and 8 simulated CPU devices (a subprocess), torch DDP on 2 processes.
    Correctness only: throughput scaling needs a real multi-GPU machine."""
    import tempfile

    from compare.checks import parallel_jax, parallel_torch

    progress(None, 2)
    records = parallel_jax.run_in_subprocess((2, 4, 8))
    progress("jax on 2, 4 and 8 devices", None)
    with tempfile.TemporaryDirectory() as tmp:
        records += parallel_torch.checks(tmp)
    progress("torch DDP on 2 processes", None)
    return {"distributed": records}


RUNNERS = {"equivalence": _equivalence, "spec": _spec, "bench": _bench, "train": _train, "distributed": _distributed}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m compare.run", description=__doc__.split("\n\n")[1])
    parser.add_argument(
        "--suite",
        action="append",
        choices=[*SUITES, "all"],
        help=f"suite to run (repeatable); default: {' + '.join(DEFAULT_SUITES)} in quick form",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sweep, a few minutes on a 2-core CPU (default)")
    size.add_argument("--full", action="store_true", help="every model, more seeds and sizes")
    parser.add_argument(
        "--device", choices=["auto", "cpu", "gpu"], default="auto", help="auto: gpu when one is visible"
    )
    parser.add_argument("--out", type=Path, help="output folder (default: runs/<timestamp>, or the --resume folder)")
    parser.add_argument(
        "--budget-s",
        type=float,
        help="bench: seconds the sweep may take; groups run by priority and a group whose expected time "
        "does not fit is skipped (and listed with the reason)",
    )
    parser.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="continue the run in DIR: suites it finished and benchmark groups in DIR/results.json are not run again",
    )
    parser.add_argument("--sweep", help="bench: the sweep by name (default: quick-<device> or full-<device>)")
    parser.add_argument(
        "--dataset",
        default="digits",
        choices=["digits", "mnist", "fashion_mnist", "cifar10"],
        help="train suite: digits ships with scikit-learn; the others are read from --data-dir",
    )
    parser.add_argument(
        "--data-dir", type=Path, help="folder with the dataset's files (MNIST/Fashion IDX, CIFAR-10 batches)"
    )
    args = parser.parse_args(argv)
    suites = args.suite or DEFAULT_SUITES
    args.suites = SUITES if "all" in suites else list(dict.fromkeys(suites))
    args.device = _resolve_device(args.device, parser)
    if args.sweep is not None:
        from compare.bench import SWEEPS

        if args.sweep not in SWEEPS:
            parser.error(f"--sweep {args.sweep}: known sweeps are {', '.join(SWEEPS)}")
    if args.resume is not None and not (args.resume / "results.json").is_file():
        parser.error(f"--resume {args.resume}: no results.json there")
    if args.out is None:
        args.out = args.resume or Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return args


def _resolve_device(device: str, parser: argparse.ArgumentParser) -> str:
    import jax
    import torch

    has_gpu = torch.cuda.is_available() and any(d.platform == "gpu" for d in jax.devices())
    if device == "gpu" and not has_gpu:
        parser.error("--device gpu: no GPU visible to both torch (torch.cuda) and jax (jax.devices())")
    if device == "auto":
        return "gpu" if has_gpu else "cpu"
    return device


class Stopped(BaseException):
    """Raised by the SIGTERM handler, so that the run saves what it has and exits. A
    BaseException, like KeyboardInterrupt: library code that catches ``Exception`` (to fall
    back or retry) must not swallow it and carry on."""


_STOP_REQUESTS: list[str] = []  # the signals received; a raise from the handler can be lost (see _stop)


def _stop(signum, frame):
    """Raises at once; the request is also remembered, because Python runs the handler
    wherever the main thread is, and an exception raised inside a finaliser or a callback
    that C code calls is printed as "Exception ignored" and lost. ``_check_stop`` raises it
    again at the next progress report."""
    _STOP_REQUESTS.append(signal.Signals(signum).name)
    raise Stopped(_STOP_REQUESTS[-1])


def _check_stop() -> None:
    if _STOP_REQUESTS:
        raise Stopped(_STOP_REQUESTS[0])


def _run_suites(args, console: Console, saved, done_suites: set) -> None:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        for suite in args.suites:
            _check_stop()
            if suite in done_suites:
                console.print(f"{suite}: already in {args.resume}, not run again")
                continue
            task = bar.add_task(suite, total=None)

            def progress(what, total, task=task, suite=suite):
                _check_stop()
                if total is not None:
                    bar.update(task, total=total)
                if what is not None:
                    bar.update(task, advance=1, description=f"{suite}: {what}")

            saved.data["meta"]["running"] = suite
            part = RUNNERS[suite](args, progress, saved)
            complete = part.pop("complete", True)
            saved.merge(part)
            if complete:
                saved.data["meta"]["suites_done"] = [*saved.data["meta"].get("suites_done", []), suite]
            saved.save()
    saved.data["meta"].pop("running", None)


def _stopped(e: BaseException, saved, console: Console, args) -> int:
    """Marks the run as stopped (by what, during which suite); returns the exit status."""
    name = str(e) if isinstance(e, Stopped) else "SIGINT"
    _STOP_REQUESTS.clear()  # handled: the figures are still drawn, and a new request stops those
    saved.data["meta"]["stopped"] = f"{name} during {saved.data['meta'].pop('running', 'the report')}"
    console.print(f"[yellow]stopped by {name}: results so far in {args.out}[/yellow]")
    return 128 + signal.Signals[name].value


def _write_figures(out: dict, folder: Path) -> None:
    plots.divergence(out.get("equivalence", []), folder / "train_divergence.png")
    plots.throughput(out.get("bench", []), folder / "bench_throughput.png")
    plots.compile_vs_steady(out.get("bench", []), folder / "bench_compile_vs_steady.png")
    plots.learning_curves(out.get("train", []), folder / "train_learning_curves.png")
    plots.accuracy_vs_lr(out.get("train", []), folder / "train_accuracy_vs_lr.png")
    plots.gap_vs_dropout(out.get("train", []), folder / "train_gap_vs_dropout.png")
    claim_plots.draw_all(out.get("train", []), out["meta"].get("train_summary", {}).get("claims", []), folder)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    console = Console() if sys.stdout.isatty() else Console(width=120)
    data: dict = {"meta": results.meta(args.device)}
    if args.resume is not None:
        old = results.load(args.resume / "results.json")
        old_meta = {k: v for k, v in old["meta"].items() if k != "stopped"}  # this run says whether it stops
        data = {**old, "meta": {**old_meta, **data["meta"], "resumed_from": str(args.resume)}}
    saved = results.Results(args.out, data)
    done_suites = set(data["meta"].get("suites_done", []))
    _STOP_REQUESTS.clear()  # main() can run more than once in a process (tests)
    previous = signal.signal(signal.SIGTERM, _stop)  # kept until the results are written
    status = 0
    try:
        try:
            _run_suites(args, console, saved, done_suites)
        except (Stopped, KeyboardInterrupt) as e:
            status = _stopped(e, saved, console, args)
        try:
            _check_stop()
            _write_figures(saved.data, args.out)
        except (Stopped, KeyboardInterrupt) as e:  # while drawing: the measurements are already saved
            status = _stopped(e, saved, console, args)
        saved.save()
    finally:
        signal.signal(signal.SIGTERM, previous)
    out = saved.data
    if status:
        return status
    console_report.show(out, console)
    failed = results.failures(out)
    console.print(f"wrote {args.out / 'results.json'} and {args.out / 'report.md'}")
    if failed:
        console.print(f"[red]{len(failed)} check(s) failed[/red]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
