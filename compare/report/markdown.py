"""``report.md``: the results as readable tables, with the plots. Columns come from the
record dataclasses of ``compare.records``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compare.bench import load
from compare.bench.sweep import speedups
from compare.records import (
    BenchRecord,
    CollectiveRecord,
    CommModelRecord,
    DistributedRecord,
    EquivalenceRecord,
    SpecRecord,
    Speedup,
    StepTimeRecord,
    TrainEquivalenceRecord,
    TrainRecord,
)
from compare.report import lesson

CHECK_COLUMNS = ("ok", "regime_ok")  # booleans that are a check: ok / **FAIL**; others yes / no


def fmt(value: Any, column: str = "ok") -> str:
    if isinstance(value, bool):
        if column in CHECK_COLUMNS:
            return "ok" if value else "**FAIL**"
        return "yes" if value else "no"
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0.0:
            return "0"
        return f"{value:.4g}" if 0.01 <= abs(value) < 1e6 else f"{value:.2e}"
    return str(value)


def _md_table(columns: tuple[str, ...], rows: list[dict]) -> list[str]:
    """A markdown table of ``rows`` (dicts) with ``columns``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c), c).replace("|", "\\|") for c in columns) + " |" for r in rows]
    return lines


def _distributed_md(results: dict) -> list[str]:
    """The distributed suite: the checks, the collectives counted, the paper model, the step times."""
    lines = []
    if results.get("distributed"):
        lines += ["## Data parallelism: BatchNorm across devices and processes (correctness)", "",
                  *_md_table(DistributedRecord.columns(), results["distributed"]), ""]  # fmt: skip
    if results.get("distributed_collectives"):
        lines += ["## Collectives per training step, counted", "",
                  "Critical: BatchNorm's collectives (and DDP's buffer broadcast), which no compute hides.", "",
                  *_md_table(CollectiveRecord.columns(), results["distributed_collectives"]), ""]  # fmt: skip
    if results.get("distributed_comm_model"):
        lines += ["## On paper: communication per step on a GPU cluster against the H100 step time", "",
                  "![paper model](distributed_comm_model.png)", "",
                  *_md_table(CommModelRecord.columns(), results["distributed_comm_model"]), ""]  # fmt: skip
    if results.get("distributed_steps"):
        lines += ["## Step times on this machine: 1 and 2 processes of one device each", "",
                  "What they show and do not show: docs/distributed.md.", "",
                  "![step times](distributed_step_times.png)", "",
                  *_md_table(StepTimeRecord.columns(), results["distributed_steps"]), ""]  # fmt: skip
    return lines


def _equivalence_md(evals: list[dict], trains: list[dict], out: Path | None) -> list[str]:
    lines = []
    if evals:
        lines += [
            "## Equivalence in eval mode: same weights, same input, torch vs Flax",
            "",
            "`max_abs_diff` is max |torch - flax| over the logits; `max_rel_diff` is that over max |torch|.",
            "",
            *_md_table(EquivalenceRecord.columns(), evals),
            "",
        ]
        for r in evals:
            if not r["ok"] and r.get("layers"):
                lines += [
                    f"### {r['model']} / {r['flax_api']}: first divergence at `{r['first_divergence']}`",
                    "",
                    "Each layer's error against torch in float64, beside torch's own float32 error there;",
                    "a layer is not ok when its error is above the bound (10x torch's own).",
                    "",
                    *_md_table(
                        ("layer", "call", "max_abs_diff", "port_error", "torch_error", "bound", "ok"), r["layers"]
                    ),
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
            *_md_table(TrainEquivalenceRecord.columns(), trains),
            "",
        ]
        if out is not None and (out / "train_divergence.png").exists():
            lines += ["![divergence per training step](train_divergence.png)", ""]
    return lines


DISPATCH_BOUND_MFU = 0.05  # a group whose best MFU is below this measures dispatch, not arithmetic


def _speedup_tables(records: list[dict]) -> list[str]:
    """The speed-ups, compute-bound groups apart from dispatch-bound ones (best MFU < 5%)."""
    best_mfu: dict[tuple, float] = {}
    for r in records:
        key = (r["model"], r["dtype"], r["batch_size"])
        best_mfu[key] = max(best_mfu.get(key, 0.0), r.get("mfu") or 0.0)
    rows = speedups(records)
    bound = [r for r in rows if best_mfu[(r["model"], r["dtype"], r["batch_size"])] < DISPATCH_BOUND_MFU]
    compute = [r for r in rows if r not in bound]
    lines = []
    for title, chosen in [
        (
            "Speed-up of the best JAX implementation over the best PyTorch one (samples/s), compute-bound groups:",
            compute,
        ),
        (
            f"Dispatch-bound groups (best MFU under {DISPATCH_BOUND_MFU:.0%}: the step time is Python and launch overhead):",
            bound,
        ),
    ]:
        if chosen:
            lines += [title, "", *_md_table(Speedup.columns(), chosen), ""]
    shares = {
        (r["model"], r["dtype"], r["batch_size"]): r["cpu_share"] for r in records if r.get("cpu_share") is not None
    }
    for (model, dtype, batch), share in shares.items():
        if share < load.THRESHOLD:
            lines.append(f"* **{model} {dtype} batch {batch}**: {load.describe(share)}.")
    if shares and all(s >= load.THRESHOLD for s in shares.values()):
        lines.append(f"* {load.describe(min(shares.values()))} in every group (threshold {load.THRESHOLD:.0%}).")
    return [*lines, ""] if shares else lines


def _bench_md(results: dict[str, Any], out: Path | None) -> list[str]:
    records = results["bench"]
    settings = results["meta"].get("bench_settings", {})
    lines = [
        "## Benchmark: one training step (BatchNorm + Dropout active, SGD momentum)",
        "",
        *_speedup_tables(records),
        "Settings: " + ", ".join(f"{k} = {v}" for k, v in settings.items() if k not in ("skipped", "groups")),
        "",
    ]
    for what, why in settings.get("skipped", {}).items():
        lines.append(f"* not run: `{what}`: {why}")
    for group, state in settings.get("groups", {}).items():
        if not state.startswith("done"):
            lines.append(f"* group `{group}`: {state}")
    lines += ["", *_md_table(BenchRecord.columns(), records), ""]
    for png, caption in [
        ("bench_throughput.png", "throughput against batch size"),
        ("bench_compile_vs_steady.png", "compile and steady state"),
    ]:
        if out is not None and (out / png).exists():
            lines += [f"![{caption}]({png})", ""]
    return lines


AGREEMENT_COLUMNS = (
    "claim",
    "use_bn",
    "dropout",
    "variant",
    "lr",
    "runs",
    "both_diverged",
    "mean_acc_diff",
    "max_acc_diff",
)


def _agreement_by_arm(rows: list[dict]) -> list[dict]:
    """The per-run torch/linen accuracy differences, summarised per arm and learning rate."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["claim"], r["use_bn"], r["dropout"], r.get("variant", "standard"), r["lr"])
        groups.setdefault(key, []).append(r)
    out = []
    for (claim, use_bn, dropout, variant, lr), rs in groups.items():
        diffs = [r["acc_diff"] for r in rs if r["acc_diff"] is not None]
        out.append(
            {
                "claim": claim, "use_bn": use_bn, "dropout": dropout, "variant": variant, "lr": lr, "runs": len(rs),
                "both_diverged": sum(r["both_diverged"] for r in rs),
                "mean_acc_diff": sum(diffs) / len(diffs) if diffs else None,
                "max_acc_diff": max(diffs) if diffs else None,
            }
        )  # fmt: skip
    return out


def _train_md(results: dict[str, Any], out: Path | None) -> list[str]:
    summary = results["meta"].get("train_summary", {})
    records = results["train"]
    dataset = records[0]["dataset"] if records else "?"
    claims = summary.get("claims", [])
    lines = [f"## Training comparison on {dataset}: do the classic claims hold, in both frameworks?", ""]
    if claims and "verdict" in claims[0]:
        lines += lesson.report_lines(results, "" if out is not None else None)
    else:  # a results.json from 0.2: one holds/detail row per claim and model
        lines += [*_md_table(("claim", "model", "framework", "holds", "detail"), claims), ""]
    lines += ["Both frameworks start from the same weights and see the same batches; only the random draws differ.", ""]
    agreement = summary.get("framework_agreement", [])
    if agreement:
        lines += [
            "Final test accuracy, torch against linen, per arm (every run pairs the two frameworks from the same"
            " weights and batches; `results.json` has each run's pair in `meta.train_summary.framework_agreement`):",
            "",
            *_md_table(AGREEMENT_COLUMNS, _agreement_by_arm(agreement)),
            "",
        ]
    for png, caption in [
        ("train_learning_curves.png", "learning curves"),
        ("train_accuracy_vs_lr.png", "final accuracy against learning rate"),
        ("train_gap_vs_dropout.png", "generalisation gap against dropout"),
    ]:
        if out is not None and (out / png).exists():
            lines += [f"![{caption}]({png})", ""]
    lines += ["All runs:", "", *_md_table(TrainRecord.columns(), records), ""]
    return lines


def _setting_lines(meta: dict[str, Any]) -> list[str]:
    """The short header of what it takes to rerun: commit, machine, threads, flags
    (meta of runs older than schema 2 lacks them: shown as '-')."""
    commit = meta.get("git_commit")
    commit = "-" if commit is None else f"{commit[:12]}{' (dirty tree)' if meta.get('git_dirty') else ''}"
    env = {k: v for k, v in (meta.get("env") or {}).items() if v is not None}
    lines = [
        f"* commit {commit}, compare {meta.get('compare_version', '-')}, results schema {meta.get('schema_version', 1)}",
        f"* machine: {meta.get('cpu_model', '-')}, {meta.get('cpu_count', '-')} cores, {meta.get('platform', '-')};"
        f" torch threads {meta.get('torch_num_threads', '-')}",
        "* environment: " + (", ".join(f"`{k}={v}`" for k, v in env.items()) or "no thread or XLA variables set"),
        "* jax config: " + ", ".join(f"{k} = {v}" for k, v in (meta.get("jax_config") or {}).items()),
    ]
    if meta.get("gpu"):
        lines.append(
            f"* GPU: {meta['gpu']}, CUDA {meta.get('cuda_version')}, cuDNN {meta.get('cudnn_version')},"
            f" driver {meta.get('nvidia_driver')}"
        )
    return lines


def render(results: dict[str, Any], out: Path | None = None) -> str:
    """The whole report.md for a results.json object; ``out`` is where the plots are."""
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
        *_setting_lines(meta),
        "",
    ]
    if meta.get("stopped"):
        lines += [f"**Stopped early** ({meta['stopped']}): what finished before the stop is below.", ""]
    if "equivalence" in results or "train_equivalence" in results:
        lines += _equivalence_md(results.get("equivalence", []), results.get("train_equivalence", []), out)
    if "bench" in results:
        lines += _bench_md(results, out)
    if "train" in results:
        lines += _train_md(results, out)
    if any(k.startswith("distributed") for k in results):
        lines += _distributed_md(results)
    if "spec" in results:
        facts = results["spec"]
        passed = sum(r["ok"] is True for r in facts)
        skipped = sum(r["ok"] is None for r in facts)
        by_fact: dict[str, set] = {}
        for r in facts:
            by_fact.setdefault(r["id"], set()).add(r["ok"])
        facts_ok = sum(states == {True} for states in by_fact.values())
        facts_failed = sum(False in states for states in by_fact.values())
        lines += [
            "## Spec: the facts of SEMANTICS.md, checked on these versions",
            "",
            f"{len(by_fact)} facts: {facts_ok} hold everywhere they were checked, {facts_failed} fail somewhere, "
            f"{len(by_fact) - facts_ok - facts_failed} could not be checked here in part or whole. "
            f"{len(facts)} records (one per fact, framework and parameter set): {passed} hold, "
            f"{len(facts) - passed - skipped} do not, {skipped} could not be checked here.",
            "",
            *_md_table(SpecRecord.columns(), facts),
            "",
        ]
    return "\n".join(lines) + "\n"
