"""Command line: ``python -m compare.run [--suite NAME ...] [--quick | --full] [--device auto|cpu|gpu] [--out DIR]``.

Runs the chosen suites, writes ``results.json`` and ``report.md`` into ``--out`` (default:
a new time-stamped folder under ``runs/``), prints the tables, and exits non-zero when
any check that should hold does not.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from compare import equivalence, registry, report, results

QUICK_MODELS = ["mlp", "cnn", "resnet18", "resnet18_cifar"]
DEFAULT_SUITES = ["equivalence"]
SUITES = ["equivalence"]


def _equivalence(args, progress_cb) -> list[dict]:
    models = list(registry.NAMES) if args.full else QUICK_MODELS
    seeds = [0, 1, 2] if args.full else [0]
    return equivalence.run(
        models, ["linen", "nnx"], seeds=seeds, batch=16 if args.full else 8, device=args.device, progress=progress_cb
    )


def _equivalence_size(args) -> int:
    return (len(registry.NAMES) * 3 if args.full else len(QUICK_MODELS)) * 2


RUNNERS = {"equivalence": (_equivalence, _equivalence_size)}


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
    parser.add_argument("--out", type=Path, help="output folder (default: runs/<timestamp>)")
    args = parser.parse_args(argv)
    suites = args.suite or DEFAULT_SUITES
    args.suites = SUITES if "all" in suites else list(dict.fromkeys(suites))
    args.device = _resolve_device(args.device, parser)
    if args.out is None:
        args.out = Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
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


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    console = Console() if sys.stdout.isatty() else Console(width=120)
    args.out.mkdir(parents=True, exist_ok=True)
    out = {"meta": results.meta(args.device)}
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as bar:
        for suite in args.suites:
            run, size = RUNNERS[suite]
            task = bar.add_task(suite, total=size(args))
            out[suite] = run(args, lambda what, task=task: bar.update(task, advance=1, description=f"{suite}: {what}"))
    results.write(args.out / "results.json", out)
    (args.out / "report.md").write_text(report.markdown(out))
    report.console(out, console)
    failed = results.failures(out)
    console.print(f"wrote {args.out / 'results.json'} and {args.out / 'report.md'}")
    if failed:
        console.print(f"[red]{len(failed)} check(s) failed[/red]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
