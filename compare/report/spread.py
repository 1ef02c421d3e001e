"""The spread of the JAX/PyTorch speed-ups over separate processes.

One process's ratio can be lucky (a quiet core, a warm cache); the benchmark's honest
figure is the median over several processes with its range. Run the same sweep N >= 3
times into separate folders, then::

    python -m compare.report.spread runs/a runs/b runs/c [--out spread.md]

It prints, per (model, dtype, batch), the best JAX and best PyTorch implementation of each
run, and the median, min and max of the ratio of their samples/s over the runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from compare.bench.sweep import speedups
from compare.report.markdown import fmt
from compare.report.results import load

COLUMNS = (
    "model",
    "dtype",
    "batch_size",
    "runs",
    "busy_runs",
    "speedup_median",
    "speedup_min",
    "speedup_max",
    "best_jax",
    "best_torch",
)


def spread(runs: list[dict]) -> list[dict]:
    """Per group present in every run: the speed-up's median, min and max over the runs in
    which the machine was quiet (a group measured on a busy machine is left out and counted
    in ``busy_runs``), and which implementations were best (most frequent first)."""
    per_run = [{(r["model"], r["dtype"], r["batch_size"]): r for r in speedups(run.get("bench", []))} for run in runs]
    common = set.intersection(*(set(p) for p in per_run)) if per_run else set()
    rows = []
    for key in sorted(common, key=str):
        quiet = [p[key] for p in per_run if not p[key].get("busy")]
        if not quiet:
            rows.append({"model": key[0], "dtype": key[1], "batch_size": key[2], "runs": 0, "busy_runs": len(per_run)})
            continue
        ratios = [q["speedup"] for q in quiet]
        winners = [q["best_jax"] for q in quiet], [q["best_torch"] for q in quiet]
        rows.append(
            {
                "model": key[0],
                "dtype": key[1],
                "batch_size": key[2],
                "runs": len(ratios),
                "busy_runs": len(per_run) - len(quiet),
                "speedup_median": statistics.median(ratios),
                "speedup_min": min(ratios),
                "speedup_max": max(ratios),
                "best_jax": "/".join(sorted(set(winners[0]), key=winners[0].count, reverse=True)),
                "best_torch": "/".join(sorted(set(winners[1]), key=winners[1].count, reverse=True)),
            }
        )
    return rows


def markdown(rows: list[dict], sources: list[str]) -> str:
    lines = [
        f"# Speed-up over {len(sources)} separate runs",
        "",
        "Runs: " + ", ".join(f"`{s}`" for s in sources),
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    if any(r["busy_runs"] for r in rows):
        lines += ["", "`busy_runs`: runs of that group measured on a busy machine (compare.bench.load), left out."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compare.report.spread", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="folders with a results.json each (3 or more)")
    parser.add_argument("--out", type=Path, help="write the table as markdown there too")
    args = parser.parse_args(argv)
    if len(args.runs) < 3:
        parser.error(f"{len(args.runs)} run(s): a spread needs at least 3 separate processes")
    try:
        runs = [load(d / "results.json") for d in args.runs]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = markdown(spread(runs), [str(d) for d in args.runs])
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
