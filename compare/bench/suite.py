"""The ``bench`` suite of ``compare.run`` (see :mod:`compare.suite`): the sweep of
:mod:`compare.bench.sweep`, every group saved as soon as it is measured, the groups
already in a resumed run left out."""

from __future__ import annotations

import argparse

from compare.bench import sweep as sweeps
from compare.suite import Progress, Saved, Suite


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("bench")
    group.add_argument(
        "--budget-s",
        type=float,
        help="seconds the sweep may take; groups run by priority and a group whose expected time "
        "does not fit is skipped (and listed with the reason)",
    )
    group.add_argument(
        "--sweep",
        choices=list(sweeps.SWEEPS),
        help="the sweep by name (default: quick-<device> or full-<device>)",
    )


def measured_groups(saved: Saved) -> frozenset[tuple[str, int, str]]:
    """The (model, batch, dtype) groups a resumed run already holds."""
    return frozenset((r["model"], r["batch_size"], r["dtype"]) for r in saved.data.get("bench", []))


def skipped_pairs(sweep: sweeps.Sweep) -> dict[str, str]:
    """{"model/impl": why} for the pairs the sweep leaves out."""
    return {f"{m}/{i}": sweeps.SKIP_REASONS.get((m, i), "left out of this sweep") for m, i in sweep.skip}


def _bench(args: argparse.Namespace, progress: Progress, saved: Saved) -> dict:
    sweep = sweeps.SWEEPS[args.sweep or f"{'full' if args.full else 'quick'}-{args.device}"]
    done = measured_groups(saved)
    groups = [g for g in sweep.groups() if g not in done]
    impls = sweeps.all_implementations(args.device)
    progress(None, sum(len([i for i in impls if sweep.runs(m, i)]) for m, _, _ in groups))
    skipped = skipped_pairs(sweep)

    def on_group(records, settings):
        saved.merge({"bench": records, "meta": {"bench_settings": {**settings, "skipped": skipped}}})
        saved.save()

    _, settings = sweeps.run(
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


BENCH = Suite(
    "bench",
    "one training step timed in every torch and JAX implementation: samples/s, compile time, memory, MFU",
    _bench,
    _add_arguments,
)
