"""Command line: ``python -m compare.run [--suite NAME ...] [--quick | --full] [--device auto|cpu|gpu] [--out DIR]``.

Runs the chosen suites, writes ``results.json``, ``report.md`` and PNG plots into ``--out``
(default: ``runs/<time>/``) after every suite and benchmark group (a run stopped by SIGTERM or
Ctrl-C keeps what it finished), prints the tables, and exits non-zero when a check fails.
Each suite lives, with its options, in its job folder; this file parses, loops and handles signals.
"""

from __future__ import annotations

import os

# torch and JAX share one GPU in this process: JAX must not reserve 75% of its memory up front
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import datetime
import signal
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from compare.bench.suite import BENCH
from compare.checks.suites import EQUIVALENCE, SPEC
from compare.experiments.suite import TRAIN
from compare.io import limits
from compare.parallel.suite import DISTRIBUTED
from compare.report import console, figures, results
from compare.suite import resolve_device

SUITES = {s.name: s for s in (EQUIVALENCE, SPEC, BENCH, TRAIN, DISTRIBUTED)}
DEFAULT_SUITES = ["equivalence", "bench"]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m compare.run", description=__doc__.split("\n\n")[1])
    listing = "; ".join(f"{s.name}: {s.help}" for s in SUITES.values())
    parser.add_argument("--suite", action="append", choices=[*SUITES, "all"], help=f"repeatable; {listing}")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sweep, a few minutes on a 2-core CPU (default)")
    size.add_argument("--full", action="store_true", help="every model, more seeds and sizes")
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto", help="auto: gpu when visible")
    parser.add_argument("--out", type=Path, help="output folder (default: runs/<timestamp>, or the --resume folder)")
    parser.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR (what it finished is kept)")
    for suite in SUITES.values():
        if suite.add_arguments:
            suite.add_arguments(parser)
    args = parser.parse_args(argv)
    chosen = args.suite or DEFAULT_SUITES
    args.suites = list(SUITES) if "all" in chosen else list(dict.fromkeys(chosen))
    args.device = resolve_device(args.device) or parser.error("--device gpu: no GPU visible to both torch and jax")
    if args.resume is not None and not (args.resume / "results.json").is_file():
        parser.error(f"--resume {args.resume}: no results.json there")
    if args.out is None:
        args.out = args.resume or Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return args


class Stopped(BaseException):
    """SIGTERM's: the run saves what it has and exits (a BaseException: ``except Exception`` cannot swallow it)."""


_STOP_REQUESTS: list[str] = []  # the signals received; a raise from the handler can be lost (see _stop)


def _stop(signum, frame):
    """Raises, and remembers: a raise inside a finaliser or C callback is lost; ``_check_stop`` raises it again."""
    _STOP_REQUESTS.append(signal.Signals(signum).name)
    raise Stopped(_STOP_REQUESTS[-1])


def _check_stop() -> None:
    if _STOP_REQUESTS:
        raise Stopped(_STOP_REQUESTS[0])


def _run_suites(args, terminal: Console, saved: results.Results) -> None:
    done = set(saved.data["meta"].get("suites_done", []))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=terminal) as bar:
        for name in args.suites:
            _check_stop()
            if name in done:
                terminal.print(f"{name}: already in {args.resume}, not run again")
                continue
            task = bar.add_task(name, total=None)

            def progress(what, total, task=task, name=name):
                _check_stop()
                if total is not None:
                    bar.update(task, total=total)
                if what is not None:
                    bar.update(task, advance=1, description=f"{name}: {what}")

            saved.data["meta"]["running"] = name
            t0 = time.perf_counter()
            saved.add_suite(name, SUITES[name].run(args, progress, saved), time.perf_counter() - t0)
    saved.data["meta"].pop("running", None)


def _stopped(e: BaseException, saved: results.Results, terminal: Console, args) -> int:
    """Marks the run as stopped (by what, during which suite); returns the exit status."""
    name = str(e) if isinstance(e, Stopped) else "SIGINT"
    _STOP_REQUESTS.clear()  # handled: the figures are still drawn, and a new request stops those
    saved.data["meta"]["stopped"] = f"{name} during {saved.data['meta'].pop('running', 'the report')}"
    terminal.print(f"[yellow]stopped by {name}: results so far in {args.out}[/yellow]")
    return 128 + signal.Signals[name].value


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 every check held, 1 one did not, 2 a file refused (one line), 128 + the signal when stopped."""
    args = parse(argv)
    try:
        return _main(args)
    except limits.InputError as e:  # a results.json, a dataset or a destination refused
        print(f"error: {limits.printable(e, 4000)}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    terminal = Console() if sys.stdout.isatty() else Console(width=120)
    meta = results.meta(args.device)
    data = {"meta": meta} if args.resume is None else results.resumed(args.resume, meta)
    saved = results.Results(args.out, data)
    _STOP_REQUESTS.clear()  # main() can run more than once in a process (tests)
    previous = signal.signal(signal.SIGTERM, _stop)  # kept until the results are written
    status = 0
    try:
        try:
            _run_suites(args, terminal, saved)
        except (Stopped, KeyboardInterrupt) as e:
            status = _stopped(e, saved, terminal, args)
        try:
            _check_stop()
            figures.draw_all(saved.data, args.out)
        except (Stopped, KeyboardInterrupt) as e:  # while drawing: the measurements are already saved
            status = _stopped(e, saved, terminal, args)
        saved.save()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return status or console.finish(saved.data, terminal, args.out)


if __name__ == "__main__":
    sys.exit(main())
