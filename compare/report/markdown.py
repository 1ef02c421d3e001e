"""``report.md`` and the console table: the same results, readable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

EQUIVALENCE_COLUMNS = ("model", "flax_api", "mode", "dtype", "max_abs_diff", "max_rel_diff", "tol", "ok")
TRAIN_COLUMNS = (
    "model",
    "flax_api",
    "max_abs_diff",
    "grad_max_rel_diff",
    "stats_max_abs_diff",
    "trajectory_float64_max_rel_diff",
    "trajectory_float32_final_rel_diff",
    "trajectory_float32_first_step_above_1e-4",
    "ok",
)
SPEC_COLUMNS = ("id", "framework", "ok", "detail")
BENCH_COLUMNS = (
    "model",
    "dtype",
    "batch_size",
    "impl",
    "step_ms_median",
    "step_ms_p10",
    "step_ms_p90",
    "samples_per_s",
    "compile_s",
    "peak_mem_bytes",
    "tflops_per_s",
    "mfu",
)
SPEEDUP_COLUMNS = (
    "model",
    "dtype",
    "batch_size",
    "best_jax",
    "best_torch",
    "jax_samples_per_s",
    "torch_samples_per_s",
    "speedup",
)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "ok" if value else "**FAIL**"
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if 0.01 <= abs(value) < 1e6 else f"{value:.2e}"
    return str(value)


def _md_table(columns: tuple[str, ...], rows: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)).replace("|", "\\|") for c in columns) + " |" for r in rows]
    return lines


def _equivalence_md(records: list[dict], out: Path | None) -> list[str]:
    evals = [r for r in records if r["mode"] == "eval"]
    trains = [r for r in records if r["mode"] == "train"]
    lines = []
    if evals:
        lines += [
            "## Equivalence in eval mode: same weights, same input, torch vs Flax",
            "",
            "`max_abs_diff` is max |torch - flax| over the logits; `max_rel_diff` is that over max |torch|.",
            "",
            *_md_table(EQUIVALENCE_COLUMNS, evals),
            "",
        ]
        for r in evals:
            if not r["ok"] and r.get("layers"):
                lines += [
                    f"### {r['model']} / {r['flax_api']}: first divergence at `{r['first_divergence']}`",
                    "",
                    *_md_table(("layer", "max_abs_diff", "scale", "ok"), r["layers"]),
                    "",
                ]
    if trains:
        lines += [
            "## Equivalence in train mode: same weights, data and dropout masks",
            "",
            "One float32 step: logits (`max_abs_diff`), gradients (worst tensor, relative) and running",
            "statistics, with the torch-compatible BatchNorm. Then 200 SGD steps on both sides: in",
            "float64 the trajectories agree to rounding (checked); in float32 they agree until a",
            "discrete decision (a ReLU input or a max-pool tie within rounding) flips, after which",
            "the runs separate (recorded, not checked).",
            "",
            *_md_table(TRAIN_COLUMNS, trains),
            "",
        ]
        if out is not None and (out / "train_divergence.png").exists():
            lines += ["![divergence per training step](train_divergence.png)", ""]
    return lines


def _bench_md(results: dict[str, Any], out: Path | None) -> list[str]:
    from compare.bench.sweep import speedups

    records = results["bench"]
    settings = results["meta"].get("bench_settings", {})
    lines = [
        "## Benchmark: one training step (BatchNorm + Dropout active, SGD momentum)",
        "",
        "Speed-up of the best JAX implementation over the best PyTorch one (samples/s):",
        "",
        *_md_table(SPEEDUP_COLUMNS, speedups(records)),
        "",
        "Settings: " + ", ".join(f"{k} = {v}" for k, v in settings.items() if k != "skipped"),
        "",
    ]
    for what, why in settings.get("skipped", {}).items():
        lines.append(f"* not run: `{what}`: {why}")
    if records and records[0]["device"] == "cpu":
        from compare.bench.sweep import CPU_FINDINGS

        lines += ["", "Where JAX loses on CPU, and why (profiled on a 2-core x86_64 machine):", ""]
        lines += [f"* {finding}" for finding in CPU_FINDINGS]
    lines += ["", *_md_table(BENCH_COLUMNS, records), ""]
    for png, caption in [
        ("bench_throughput.png", "throughput against batch size"),
        ("bench_compile_vs_steady.png", "compile and steady state"),
    ]:
        if out is not None and (out / png).exists():
            lines += [f"![{caption}]({png})", ""]
    return lines


TRAIN_COLUMNS_MD = (
    "claim",
    "model",
    "framework",
    "use_bn",
    "dropout",
    "lr",
    "seed",
    "epochs",
    "final_train_loss",
    "final_train_acc",
    "final_test_loss",
    "final_test_acc",
    "steps_to_target",
    "diverged",
    "wall_s",
)


def _train_md(results: dict[str, Any], out: Path | None) -> list[str]:
    summary = results["meta"].get("train_summary", {})
    records = results["train"]
    dataset = records[0]["dataset"] if records else "?"
    lines = [
        f"## Training comparison on {dataset}: do the classic claims hold, in both frameworks?",
        "",
        "| claim | model | framework | holds | numbers |",
        "|---|---|---|---|---|",
    ]
    for c in summary.get("claims", []):
        lines.append(
            f"| {c['claim']} | {c['model']} | {c['framework']} | {'yes' if c['holds'] else 'no'} | {c['detail']} |"
        )
    lines += [
        "",
        "Both frameworks start from the same weights and see the same batches; only the dropout masks differ.",
        "",
    ]
    agreement = summary.get("framework_agreement", [])
    if agreement:
        lines += [
            "Final test accuracy, torch against linen, per run:",
            "",
            *_md_table(
                ("claim", "model", "use_bn", "dropout", "lr", "seed", "torch_test_acc", "linen_test_acc", "acc_diff"),
                agreement,
            ),
            "",
        ]
    for png, caption in [
        ("train_learning_curves.png", "learning curves"),
        ("train_accuracy_vs_lr.png", "final accuracy against learning rate"),
        ("train_gap_vs_dropout.png", "generalisation gap against dropout"),
    ]:
        if out is not None and (out / png).exists():
            lines += [f"![{caption}]({png})", ""]
    lines += ["All runs:", "", *_md_table(TRAIN_COLUMNS_MD, records), ""]
    return lines


def markdown(results: dict[str, Any], out: Path | None = None) -> str:
    meta = results["meta"]
    lines = [
        "# compare.run report",
        "",
        f"`{meta['command']}` on {meta['device_name']} ({meta['device']}), {meta['date']}.",
        "",
        "python {python}, numpy {numpy}, torch {torch}, jax {jax}, jaxlib {jaxlib}, flax {flax}, optax {optax}".format(
            **meta
        ),
        "",
    ]
    if "equivalence" in results:
        lines += _equivalence_md(results["equivalence"], out)
    if "bench" in results:
        lines += _bench_md(results, out)
    if "train" in results:
        lines += _train_md(results, out)
    if "distributed" in results:
        lines += [
            "## Data parallelism: BatchNorm statistics across devices (correctness, CPU-simulated devices)",
            "",
            *_md_table(
                ("framework", "devices", "bn_mode", "check", "max_abs_diff", "tol", "ok", "detail"),
                results["distributed"],
            ),
            "",
        ]
    if "spec" in results:
        facts = results["spec"]
        passed = sum(r["ok"] is True for r in facts)
        skipped = sum(r["ok"] is None for r in facts)
        lines += [
            "## Spec: the facts of SEMANTICS.md, checked on these versions",
            "",
            f"{passed} of {len(facts)} hold, {len(facts) - passed - skipped} do not, {skipped} could not be checked here.",
            "",
            *_md_table(SPEC_COLUMNS, facts),
            "",
        ]
    return "\n".join(lines) + "\n"


def console(results: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    for key, columns, title in [
        ("equivalence", EQUIVALENCE_COLUMNS, "equivalence (torch vs Flax, same weights)"),
        ("spec", ("id", "framework", "ok"), "spec facts on the installed versions"),
        (
            "bench",
            ("model", "dtype", "batch_size", "impl", "step_ms_median", "samples_per_s", "compile_s", "mfu"),
            "benchmark",
        ),
    ]:
        if key not in results:
            continue
        table = Table(title=title)
        for c in columns:
            table.add_column(c, justify="right" if c.startswith(("max", "tol")) else "left")
        for r in results[key]:
            style = "red" if r.get("ok") is False else ("yellow" if r.get("ok") is None else None)
            table.add_row(*[_fmt(r.get(c)).replace("**", "") for c in columns], style=style)
        console.print(table)
    for c in results["meta"].get("train_summary", {}).get("claims", []):
        verdict = "[green]holds[/green]" if c["holds"] else "[yellow]does not hold[/yellow]"
        console.print(f"{c['claim']} claim, {c['model']} ({c['framework']}): {verdict}: {c['detail']}")
    if "bench" in results:
        from compare.bench.sweep import speedups

        for row in speedups(results["bench"]):
            console.print(
                f"{row['model']} {row['dtype']} batch {row['batch_size']}: best JAX ({row['best_jax']}) is "
                f"{row['speedup']:.2f}x the best PyTorch ({row['best_torch']})"
            )
    for r in results.get("equivalence", []):
        if r.get("ok") is False and r.get("first_divergence"):
            console.print(f"[red]{r['model']}/{r['flax_api']}: first divergence at {r['first_divergence']}[/red]")
