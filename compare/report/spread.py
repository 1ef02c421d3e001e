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
    "speedup_median",
    "speedup_min",
    "speedup_max",
    "best_jax",
    "best_torch",
)


def spread(runs: list[dict]) -> list[dict]:
    """Per group present in every run: the speed-up's median, min and max over the runs,
    and which implementations were best (all distinct winners, most frequent first)."""
    per_run = [{(r["model"], r["dtype"], r["batch_size"]): r for r in speedups(run.get("bench", []))} for run in runs]
    common = set.intersection(*(set(p) for p in per_run)) if per_run else set()
    rows = []
    for key in sorted(common, key=str):
        ratios = [p[key]["speedup"] for p in per_run]
        winners = [p[key]["best_jax"] for p in per_run], [p[key]["best_torch"] for p in per_run]
        rows.append(
            {
                "model": key[0],
                "dtype": key[1],
                "batch_size": key[2],
                "runs": len(ratios),
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
    lines += ["| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
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
