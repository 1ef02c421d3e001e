"""The generated blocks of docs/claims.md (``python -m compare.report.lesson --docs
docs/claims.md``), each from committed files:

* ``run PATH``: a run's verdicts (its header, the family, the rows beside it, the facts,
  the implementation check), from its results.json;
* ``history PATH``: 0.2's run re-judged with the first 5, 8, 12 and 16 seeds, the counts it
  went through before its verdicts were published, from its per-seed effects;
* ``pilot PATH``: a protocol's claims: the pilot's spread, the seed count it gave, the
  power at the corrected level, from the protocol file;
* ``compare PATH,PATH,...``: the verdicts of several runs side by side.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from compare.experiments.claims import stats
from compare.report import lesson

HISTORY_SEEDS = (5, 8, 12, 16)  # 0.2's seed counts, in the order they were tried (commit 70b812b)


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def run(path: Path, root: Path) -> list[str]:
    results = _load(path)
    image_dir = "../" + path.parent.relative_to(root).as_posix() + "/"
    meta = results["meta"]
    timing = meta.get("train_timing", {})
    cpu = timing.get("units_cpu_s")
    when = (
        f"`{meta.get('command', '?')}` at commit `{(meta.get('git_commit') or '?')[:7]}`"
        + (f", {timing['wall_s'] / 60:.0f} min wall" if timing.get("wall_s") else "")
        + (f", {cpu / 60:.0f} min of worker CPU time" if cpu else "")
    )
    return [
        f"Run `{path.relative_to(root).as_posix()}` ({when}).",
        "",
        *lesson.report_lines(results, image_dir, short=True),
    ]


def history(path: Path, root: Path) -> list[str]:
    """0.2's verdicts with the first n seeds (its per-seed effects are in seed order)."""
    claims = _load(path)["meta"]["train_summary"]["claims"]
    head = ["claim", *(f"{n} seeds: torch / linen" for n in HISTORY_SEEDS), "published (16)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by: dict[str, dict[str, dict]] = {}
    for c in claims:
        by.setdefault(c["claim"], {})[c["framework"]] = c
    for by_fw in by.values():
        cells = [by_fw["torch"]["statement"]]
        for n in HISTORY_SEEDS:
            verdicts = []
            for fw in ("torch", "linen"):
                c = by_fw[fw]
                ci = stats.interval(c["per_seed"][:n])
                v = (
                    stats.verdict(ci, c["min_effect"], absence=c["lesson"].startswith("no"))
                    if c["regime_ok"]
                    else "inconclusive"
                )
                verdicts.append(v)
            cells.append(" / ".join(verdicts))
        cells.append(" / ".join(by_fw[fw]["verdict"] for fw in ("torch", "linen")))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def pilot(path: Path, root: Path) -> list[str]:
    """The protocol's claims with the pilot's spread and the seeds it gave."""
    doc = tomllib.loads(path.read_text())
    head = doc["protocol"]
    lines = [
        f"From the protocol `{path.relative_to(root).as_posix()}` ({head.get('name')}; pilot:"
        f" `{head.get('pilot', '?')}`). Per row: the pilot's per-seed standard deviation (pooled within framework),"
        f" its {head.get('sd_confidence', 0.8):.0%} upper confidence limit that the seed count is sized from, the seeds"
        f" per framework needed for {head.get('power', 0.8):.0%} power at {stats.bonferroni_level(head.get('k', 1)):.3%}"
        f" (k = {head.get('k')}), the seeds its experiment runs (the most any of its rows needs, at most"
        f" {head.get('seed_cap')} to fit the CPU budget), and the power that count has.",
        "",
        "| row | dataset | min effect | pilot mean | pilot sd | sd used | seeds needed | seeds run | power |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in doc["claims"]:
        for ds, p in sorted(c.get("pilot", {}).items()):
            lines.append(
                f"| {c['row']} | {ds} | {c['min_effect']:g} | {p['mean']:.3g} | {p['sd']:.3g} | {p['sd_upper']:.3g} |"
                f" {p['seeds']} | {p['seeds_run']} | {p['power']:.2f} |"
            )
    return lines


def compare(paths: list[Path], root: Path) -> list[str]:
    """The verdicts of several runs side by side, one row per (claim, dataset, regime)."""
    runs = [(p, _load(p)["meta"]["train_summary"]["claims"]) for p in paths]
    keys: dict[tuple, str] = {}
    for _, claims in runs:
        for c in claims:
            if c.get("in_family", True):
                keys.setdefault((c["claim"], c.get("dataset", "digits"), c.get("regime")), c["statement"])
    names = [p.parent.name if p.name == "results.json" else p.stem for p, _ in runs]
    lines = ["| claim | dataset | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for (claim, ds, regime), statement in keys.items():
        cells = []
        for _, claims in runs:
            found = [c for c in claims if c["claim"] == claim and c.get("dataset", "digits") == ds
                     and c.get("regime") in (regime, None) and c.get("in_family", True)]  # fmt: skip
            if regime == "clean" and found and all("regime" not in c for c in found):
                found = []  # 0.2 had the noisy regime only
            cells.append(" / ".join(f"{c['verdict']}" + ("" if c["framework"] == "pooled" else f" ({c['framework']})")
                                    for c in found) or "-")  # fmt: skip
        where = ds + (f", {lesson.REGIME[regime]}" if regime else "")
        lines.append(f"| {statement} | {where} | " + " | ".join(cells) + " |")
    return lines


def block(what: str, path: Path, root: Path) -> str:
    if what == "compare":
        body = compare([root / p for p in str(path.relative_to(root)).split(",")], root)
    else:
        body = {"run": run, "history": history, "pilot": pilot}[what](path, root)
    return "\n".join(body) + "\n"
