"""``report.md`` and the console table: the same results, readable."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

EQUIVALENCE_COLUMNS = ("model", "flax_api", "mode", "dtype", "max_abs_diff", "max_rel_diff", "tol", "ok")


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "ok" if value else "**FAIL**"
    if isinstance(value, float):
        return f"{value:.2e}"
    return str(value)


def _md_table(columns: tuple[str, ...], rows: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return lines


def markdown(results: dict[str, Any]) -> str:
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
        records = results["equivalence"]
        lines += [
            "## Equivalence: same weights, same input, torch vs Flax",
            "",
            "`max_abs_diff` is max |torch - flax| over the logits; `max_rel_diff` is that over max |torch|.",
            "",
            *_md_table(EQUIVALENCE_COLUMNS, records),
            "",
        ]
        for r in records:
            if not r["ok"] and r.get("layers"):
                lines += [
                    f"### {r['model']} / {r['flax_api']}: first divergence at `{r['first_divergence']}`",
                    "",
                    *_md_table(("layer", "max_abs_diff", "scale", "ok"), r["layers"]),
                    "",
                ]
    return "\n".join(lines) + "\n"


def console(results: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    if "equivalence" in results:
        table = Table(title="equivalence (torch vs Flax, same weights)")
        for c in EQUIVALENCE_COLUMNS:
            table.add_column(c, justify="right" if c.startswith(("max", "tol")) else "left")
        for r in results["equivalence"]:
            table.add_row(
                *[_fmt(r[c]).replace("**", "") for c in EQUIVALENCE_COLUMNS], style=None if r["ok"] else "red"
            )
        console.print(table)
        for r in results["equivalence"]:
            if not r["ok"]:
                console.print(f"[red]{r['model']}/{r['flax_api']}: first divergence at {r['first_divergence']}[/red]")
