"""The console summary of a run: short tables (the ``brief`` fields of each record kind)
and the verdicts, printed with rich."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from compare.bench.sweep import speedups
from compare.records import BenchRecord, EquivalenceRecord, SpecRecord
from compare.report.lesson import effect_text
from compare.report.markdown import fmt


def show(results: dict[str, Any], console: Console | None = None) -> None:
    """The short tables and the verdicts, printed."""
    console = console or Console()
    for key, columns, title in [
        ("equivalence", EquivalenceRecord.columns(brief=True), "equivalence (torch vs Flax, same weights)"),
        ("spec", SpecRecord.columns(brief=True), "spec facts on the installed versions"),
        ("bench", BenchRecord.columns(brief=True), "benchmark"),
    ]:
        if key not in results:
            continue
        table = Table(title=title)
        for c in columns:
            table.add_column(c, justify="right" if c.startswith(("max", "tol")) else "left")
        for r in results[key]:
            style = "red" if r.get("ok") is False else ("yellow" if r.get("ok") is None else None)
            table.add_row(*[fmt(r.get(c), c).replace("**", "") for c in columns], style=style)
        console.print(table)
    claims = results["meta"].get("train_summary", {}).get("claims", [])
    if claims and "verdict" in claims[0]:
        colour = {"holds": "green", "does not hold": "red", "negligible": "yellow", "inconclusive": "magenta"}
        table = Table(title="the lesson's claims (interval over seeds; see report.md for its level)")
        for c in ("claim", "framework", "verdict", "effect [95% CI]", "min effect", "seeds", "regime ok"):
            table.add_column(c)
        for c in claims:
            v = f"[{colour[c['verdict']]}]{c['verdict']}[/{colour[c['verdict']]}]"
            table.add_row(
                c["statement"],
                c["framework"],
                v,
                effect_text(c),
                f"{c['min_effect']:.3g}",
                str(c["seeds"]),
                "yes" if c["regime_ok"] else "no",
            )
        console.print(table)
    else:  # 0.2's claims
        for c in claims:
            verdict = "[green]holds[/green]" if c["holds"] else "[yellow]does not hold[/yellow]"
            console.print(f"{c['claim']} claim, {c['model']} ({c['framework']}): {verdict}: {c['detail']}")
    if "bench" in results:
        for row in speedups(results["bench"]):
            console.print(
                f"{row['model']} {row['dtype']} batch {row['batch_size']}: best JAX ({row['best_jax']}) is "
                f"{row['speedup']:.2f}x the best PyTorch ({row['best_torch']})"
            )
    for r in results.get("equivalence", []):
        if r.get("ok") is False and r.get("first_divergence"):
            console.print(f"[red]{r['model']}/{r['flax_api']}: first divergence at {r['first_divergence']}[/red]")
