"""The console summary of a run: short tables (the ``brief`` fields of each record kind)
and the verdicts, printed with rich. Every value from a record is escaped (``e``): a
results.json is untrusted input, and ``[/red]`` in a name must print as itself."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from compare.bench.sweep import speedups
from compare.records import BenchRecord, EquivalenceRecord, SpecRecord
from compare.report.lesson import effect_text
from compare.report.markdown import fmt


def e(value: Any) -> str:
    """A record's value as text that rich prints as itself (no markup)."""
    return escape(str(value))


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
            table.add_row(*[e(fmt(r.get(c), c).replace("**", "")) for c in columns], style=style)
        console.print(table)
    claims = results["meta"].get("train_summary", {}).get("claims", [])
    if claims and "verdict" in claims[0]:
        colour = {"holds": "green", "does not hold": "red", "negligible": "yellow", "inconclusive": "magenta"}
        table = Table(title="the lesson's claims (interval over seeds; see report.md for its level)")
        for c in ("claim", "framework", "verdict", "effect [95% CI]", "min effect", "seeds", "regime ok"):
            table.add_column(c)
        for c in claims:
            tint = colour.get(c["verdict"], "white")
            v = f"[{tint}]{e(c['verdict'])}[/{tint}]"
            table.add_row(
                e(c["statement"]),
                e(c["framework"]),
                v,
                e(effect_text(c)),
                f"{c['min_effect']:.3g}",
                str(c["seeds"]),
                "yes" if c["regime_ok"] else "no",
            )
        console.print(table)
    else:  # 0.2's claims
        for c in claims:
            verdict = "[green]holds[/green]" if c["holds"] else "[yellow]does not hold[/yellow]"
            console.print(f"{e(c['claim'])} claim, {e(c['model'])} ({e(c['framework'])}): {verdict}: {e(c['detail'])}")
    if "bench" in results:
        for row in speedups(results["bench"]):
            warning = (
                " [yellow](machine busy during this group: do not trust the ratio)[/yellow]" if row.get("busy") else ""
            )
            console.print(
                f"{e(row['model'])} {e(row['dtype'])} batch {e(row['batch_size'])}: best JAX ({e(row['best_jax'])}) is "
                f"{row['speedup']:.2f}x the best PyTorch ({e(row['best_torch'])}){warning}"
            )
    for r in results.get("equivalence", []):
        if r.get("ok") is False and r.get("first_divergence"):
            console.print(
                f"[red]{e(r['model'])}/{e(r['flax_api'])}: first divergence at {e(r['first_divergence'])}[/red]"
            )


def finish(results: dict[str, Any], console: Console, out) -> int:
    """The end of a run: the tables, where the files are, and the exit status (1 when a
    check that should hold does not)."""
    from compare.report.results import failures

    show(results, console)
    failed = failures(results)
    console.print(f"wrote {e(out / 'results.json')} and {e(out / 'report.md')}")
    if failed:
        console.print(f"[red]{len(failed)} check(s) failed[/red]")
        return 1
    return 0
