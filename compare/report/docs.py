"""The numbers of the documentation, generated from committed results.

Every block between ``<!-- BEGIN <name>: generated ... -->`` and ``<!-- END <name> -->`` in
README.md and docs/*.md is written by a function here from a committed ``results.json``
(or from the code itself), never by hand::

    python -m compare.report.docs            # rewrite every block
    python -m compare.report.docs --check    # exit 1 when a block is stale (a test runs it)

The claims block of the README is ``compare.report.lesson``'s.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compare.bench import load
from compare.bench.sweep import speedups
from compare.report.results import REPO
from compare.report.results import load as load_results

COMMITTED = Path("results") / "cpu-2core-x86_64"  # the committed CPU run, relative to the repository
GPU_BASELINE = Path("results") / "nvidia-h100-80gb-hbm3" / "baseline-2026-11-27.json"


def _fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}" if 1e-3 <= abs(x) < 1e5 else f"{x:.1e}"


def _committed(root: Path) -> dict[str, Any]:
    return load_results(root / COMMITTED / "results.json")


def provenance(results: dict[str, Any], folder: Path = COMMITTED) -> str:
    """Which run the numbers come from: command, commit, date, versions, machine."""
    m = results["meta"]
    shares = [r["cpu_share"] for r in results.get("bench", []) if r.get("cpu_share") is not None]
    machine = f"{m.get('cpu_model', m['device_name'])}, {m.get('cpu_count')} cores"
    quiet = f"; {load.describe(min(shares))}" if shares else "; machine load not recorded (before 0.3)"
    return (
        f"From the committed run `{folder}` (`{m['command']}`, commit `{(m.get('git_commit') or '?')[:7]}`, "
        f"{m['date'][:10]}; torch {m['torch']}, jax {m['jax']}, flax {m['flax']}; {machine}{quiet})."
    )


def _speedup_rows(records: list[dict]) -> list[str]:
    best = {(r["model"], r["dtype"], r["batch_size"], r["impl"]): r for r in records}
    rows = []
    for s in speedups(records):
        key = (s["model"], s["dtype"], s["batch_size"])
        j, t = best[(*key, s["best_jax"])], best[(*key, s["best_torch"])]
        flag = " (machine busy: not to be trusted)" if s.get("busy") else ""
        rows.append(
            f"| {s['model']} | {s['dtype']} | {s['batch_size']} | `{s['best_jax']}` {_fmt(j['step_ms_median'])} ms "
            f"({j['samples_per_s']:,.0f}/s) | `{s['best_torch']}` {_fmt(t['step_ms_median'])} ms "
            f"({t['samples_per_s']:,.0f}/s) | **{s['speedup']:.2f}x**{flag} |"
        )
    return rows


def bench_cpu(root: Path) -> str:
    results = _committed(root)
    head = "| model | dtype | batch | best JAX | best PyTorch | JAX / PyTorch |\n|---|---|---|---|---|---|"
    return f"{provenance(results)}\n\n{head}\n" + "\n".join(_speedup_rows(results["bench"])) + "\n"


def nnx_patterns(root: Path) -> str:
    folder = COMMITTED / "nnx-overhead"
    results = load_results(root / folder / "results.json")
    recs = sorted(results["bench"], key=lambda r: r["step_ms_median"])
    linen = next(r["step_ms_median"] for r in recs if r["impl"] == "jax-linen-jit")
    lines = [
        provenance(results, folder),
        "",
        "| implementation | pattern | ms per step (p10-p90) | cost over linen (ms) |",
        "|---|---|---|---|",
    ]
    for r in recs:
        pattern = r.get("pattern") or (f"{r['scan_steps']} linen steps per `lax.scan`" if r.get("scan_steps") else "")
        if r["impl"] == "jax-linen-jit":
            pattern = "`jax.jit(train_step, donate_argnums=0)`"
        cost = "-" if r["impl"] == "jax-linen-jit" else f"{r['step_ms_median'] - linen:+.3f}"
        lines.append(
            f"| `{r['impl']}` | {pattern or 'eager'} | {r['step_ms_median']:.3f} "
            f"({r['step_ms_p10']:.3f}-{r['step_ms_p90']:.3f}) | {cost} |"
        )
    return "\n".join(lines) + "\n"


def gpu_baseline(root: Path) -> str:
    data = json.loads((root / GPU_BASELINE).read_text())
    records = [{**r, "samples_per_s": r["batch_size"] / (r["step_ms_median"] / 1e3)} for r in data["bench"]]
    peaks = ", ".join(f"{k} {v:.0f}" for k, v in data["peaks_tflops"].items())
    head = "| model | dtype | batch | best JAX | best PyTorch | JAX / PyTorch |\n|---|---|---|---|---|---|"
    return (
        f"From `{GPU_BASELINE}`: {data['what'].split(';')[0]}. Matmul peaks measured in the same run "
        f"(TFLOP/s): {peaks}.\n\n{head}\n" + "\n".join(_speedup_rows(records)) + "\n"
    )


def bottleneck_224(root: Path) -> str:
    path = COMMITTED / "bottleneck-eval-224.json"
    every = json.loads((root / path).read_text())
    rows = [r for r in every if r["flax_api"] == "linen"]
    nnx = {r["model"]: (r["max_abs_diff"], r["max_rel_diff"]) for r in every if r["flax_api"] == "nnx"}
    same = all(nnx.get(r["model"]) == (r["max_abs_diff"], r["max_rel_diff"]) for r in rows)
    lines = [
        f"From `{path}` (linen; {'nnx gives the same numbers' if same else 'nnx: see the file'}):",
        "",
        "| model | max \\|logits\\| | max \\|torch - flax\\| | relative | bound |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        scale = r["max_abs_diff"] / r["max_rel_diff"]
        lines.append(
            f"| {r['model']} | {scale:.0f} | {r['max_abs_diff']:.1e} | {r['max_rel_diff']:.1e} | {r['tol']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def input_rules(root: Path) -> str:
    from compare import registry

    rows = [f"| `{name}` | {registry.get(name).input_rule} |" for name in registry.NAMES]
    return "\n".join(["| model | input |", "|---|---|", *rows]) + "\n"


def durations(root: Path) -> str:
    results = _committed(root)
    walls = results["meta"].get("suite_wall_s", {})
    if not walls:
        return f"{provenance(results)} It predates the per-suite wall times (0.3): none is stated here.\n"
    lines = [provenance(results), "", "| suite | wall time on that machine |", "|---|---|"]
    lines += [f"| `{suite}` | {seconds / 60:.1f} min |" for suite, seconds in walls.items()]
    default = sum(walls.get(s, 0.0) for s in ("equivalence", "bench"))
    lines += ["", f"The default run (`equivalence` and `bench`, quick) took {default / 60:.1f} min of that."]
    return "\n".join(lines) + "\n"


def at_a_glance(root: Path) -> str:
    results = _committed(root)
    evals = [r for r in results.get("equivalence", []) if r.get("dtype") == "float32"]
    worst = max(evals, key=lambda r: r["max_rel_diff"])
    states: dict[str, set] = {}
    for r in results.get("spec", []):
        states.setdefault(r["id"], set()).add(r["ok"])
    held = sum(True in s and False not in s for s in states.values())
    unchecked = sum(s == {None} for s in states.values())
    failed = sum(False in s for s in states.values())
    ratios = ", ".join(
        f"{s['model']} {s['speedup']:.2f}x" + (" (busy machine)" if s.get("busy") else "")
        for s in speedups(results.get("bench", []))
    )
    walls = results["meta"].get("suite_wall_s", {})
    default = sum(walls.get(s, 0.0) for s in ("equivalence", "bench"))
    lines = [
        provenance(results),
        "",
        "| part | result |",
        "|---|---|",
        f"| equivalence | {len(evals)} float32 checks (models x linen/nnx): {sum(r['ok'] for r in evals)} within "
        f"tolerance; the worst relative logits difference {worst['max_rel_diff']:.1e} ({worst['model']}) |",
        f"| spec | {len(states)} facts: {held} hold on these versions, {failed} do not, {unchecked} could not be "
        "checked on this machine (GPU-only) |",
        f"| benchmark (CPU) | best JAX over best PyTorch, samples/s: {ratios} |",
        f"| default run | {default / 60:.1f} min on that machine |" if walls else "| default run | not recorded |",
    ]
    return "\n".join(lines) + "\n"


def distributed_measured(root: Path) -> str:
    """The distributed suite's checks and step times from the committed run."""
    results = _committed(root)
    checks = [r for r in results.get("distributed", []) if r.get("ok") is not None]
    steps = results.get("distributed_steps", [])
    wall = results["meta"].get("suite_wall_s", {}).get("distributed")
    lines = [
        provenance(results),
        "",
        f"Checks: {sum(r['ok'] for r in checks)} of {len(checks)} held"
        + (f"; the suite took {wall / 60:.1f} min." if wall else "."),
    ]
    if steps:
        lines += [
            "",
            "| framework | model | BatchNorm | processes | ms per step, median (p10-p90) | samples/s | load average |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in sorted(steps, key=lambda r: (r["framework"], r["model"], r["bn_mode"], r["processes"])):
            lines.append(
                f"| {r['framework']} | {r['model']} | {r['bn_mode']} | {r['processes']} | "
                f"{_fmt(r['step_ms_median'])} ({_fmt(r['step_ms_p10'])}-{_fmt(r['step_ms_p90'])}) | "
                f"{r['samples_per_s']:,.0f} | {r['load_avg']:.1f} |"
            )
    return "\n".join(lines) + "\n"


BLOCKS: dict[str, tuple[tuple[str, ...], Callable[[Path], str]]] = {
    "distributed-measured": (("docs/distributed.md",), distributed_measured),
    "at-a-glance": (("README.md",), at_a_glance),
    "bench-cpu": (("docs/benchmark.md",), bench_cpu),
    "nnx-patterns": (("docs/benchmark.md",), nnx_patterns),
    "gpu-baseline": (("docs/benchmark.md",), gpu_baseline),
    "bottleneck-224": (("docs/porting_by_hand.md",), bottleneck_224),
    "input-rules": (("docs/porting_by_hand.md",), input_rules),
    "durations": (("docs/cli.md",), durations),
}


def _pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- BEGIN {re.escape(name)}:[^\n]*-->\n)(.*?)(<!-- END {re.escape(name)} -->)", flags=re.S)


def rewrite(root: Path = REPO, check: bool = False) -> list[str]:
    """Rewrite every block (or, with ``check``, only compare); returns the stale or
    missing ones as ``file: block``."""
    stale = []
    for name, (files, make) in BLOCKS.items():
        text = make(root)
        for file in files:
            path = root / file
            old = path.read_text()
            match = _pattern(name).search(old)
            if match is None:
                stale.append(f"{file}: {name} (no block)")
                continue
            if match.group(2) != text:
                stale.append(f"{file}: {name}")
                if not check:
                    path.write_text(old[: match.start(2)] + text + old[match.end(2) :])
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compare.report.docs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when a block is stale")
    parser.add_argument("--root", type=Path, default=REPO, help="the repository (default: this checkout)")
    args = parser.parse_args(argv)
    stale = rewrite(args.root, check=args.check)
    for item in stale:
        print(f"{'stale' if args.check else 'rewrote'}: {item}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
