"""A protocol: the claims' design and analysis, fixed in a file before the run it judges
(``--protocol FILE``), read by the code and recorded in ``results.json`` with its hash.

The file is TOML. ``[protocol]`` names it and states the analysis (``kind``, ``seed_offset``,
``alpha``, ``correction``, ``max_excluded``, ``shared_seeds``, the rules for diverged runs
in words); ``[design]`` holds :class:`~compare.experiments.claims.design.Plan`'s fields for
every dataset and ``[datasets.NAME]`` those of one dataset (its target accuracy, the
synthetic task's parameters, and ``seeds``: per experiment, the seeds each framework
runs); each ``[[claims]]`` entry states one row of the family: its ``row`` of the claims
table, ``metric``, ``min_effect``, ``arms``, ``datasets``, ``regimes``, ``absence``, and the
pilot's spread and the seed count it gave. The code refuses a protocol whose rows do
not match the claims table (another metric, other arms), so that the table cannot drift
from what was registered.

Seeds: for a dataset whose largest experiment needs ``N`` seeds per framework, torch runs
``seed_offset .. seed_offset + N - 1`` and linen the next ``N``; the first
``shared_seeds / 2`` of each block also run in the other framework (the implementation
check, reported apart, not pooled).
"""

from __future__ import annotations

import dataclasses
import hashlib
import tomllib
from pathlib import Path
from typing import Any

from compare.experiments.claims.design import EXPERIMENTS, PLANS, Plan
from compare.experiments.claims.effects import ROWS
from compare.experiments.claims.verdicts import Analysis, row_key

KINDS = ("exploratory", "pilot", "confirmatory")
_PLAN_FIELDS = {f.name for f in dataclasses.fields(Plan)}
_TUPLES = {"hidden", "lrs", "lrs_above", "label_noises", "seeds", "second_seeds", "shared_seeds"}


class ProtocolError(ValueError):
    """A protocol file that cannot be used; lists every problem."""


@dataclasses.dataclass(frozen=True)
class Design:
    """What a train suite run does and how it is judged."""

    plans: tuple[Plan, ...]
    analysis: Analysis
    meta: dict[str, Any]  # recorded as meta.train_protocol


def blocks(offset: int, n: int, shared: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Torch's seeds, linen's (the next ``n``) and the shared ones (the first
    ``shared // 2`` of each block, torch's first when it is odd)."""
    torch_seeds = tuple(range(offset, offset + n))
    linen_seeds = tuple(range(offset + n, offset + 2 * n))
    first = (shared + 1) // 2
    return torch_seeds, linen_seeds, torch_seeds[:first] + linen_seeds[: shared - first]


def _plan(fields: dict[str, Any]) -> Plan:
    unknown = sorted(set(fields) - _PLAN_FIELDS)
    if unknown:
        raise ProtocolError(f"unknown design fields {unknown}; known: {', '.join(sorted(_PLAN_FIELDS))}")
    return Plan(**{k: tuple(v) if k in _TUPLES else v for k, v in fields.items()})


def _check_claims(claims: list[dict], datasets: list[str]) -> list[str]:
    """Every problem of the ``[[claims]]`` entries against the claims table."""
    table = {row_key(r): r for r in ROWS}
    problems = []
    missing = sorted(set(table) - {c.get("row") for c in claims})
    if missing:
        problems.append(f"claims: the table's rows {missing} are not stated (every row is, in the family or beside it)")
    for c in claims:
        row = table.get(c.get("row", ""))
        if row is None:
            problems.append(f"claims: unknown row {c.get('row')!r}; known: {', '.join(table)}")
            continue
        for field, want in (("metric", row.metric), ("arms", list(row.arms)), ("absence", row.absence),
                            ("experiment", row.experiment), ("regimes", [g for g in row.regimes if g]),
                            ("family", row.family)):  # fmt: skip
            if c.get(field, want) != want:
                problems.append(f"claims {c['row']}: {field} {c.get(field)!r} is not the table's {want!r}")
        if not c.get("min_effect", 0) > 0:
            problems.append(f"claims {c['row']}: min_effect must be positive, got {c.get('min_effect')!r}")
        bad = sorted(set(c.get("datasets", [])) - set(datasets))
        if bad:
            problems.append(f"claims {c['row']}: datasets {bad} have no [datasets.NAME] section")
    return problems


def parse(text: str, path: str = "<protocol>", seeds: int | None = None, seed_offset: int | None = None) -> Design:
    """The design a protocol's text states; ``seeds`` / ``seed_offset`` (the command line's)
    override its seed counts / offset and are recorded as deviations."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ProtocolError(f"{path}: not valid TOML ({e})") from None
    head, common, per_ds = doc.get("protocol", {}), doc.get("design", {}), doc.get("datasets", {})
    claims = doc.get("claims", [])
    problems = []
    if head.get("kind") not in KINDS:
        problems.append(f"[protocol] kind must be one of {KINDS}, got {head.get('kind')!r}")
    if not per_ds:
        problems.append("no [datasets.NAME] section: a protocol names at least one dataset")
    if not claims:
        problems.append("no [[claims]]: a protocol states at least one claim")
    problems += _check_claims(claims, list(per_ds))
    if problems:
        raise ProtocolError(f"{path}: " + "; ".join(problems))
    offset = head.get("seed_offset", 0) if seed_offset is None else seed_offset
    shared = int(head.get("shared_seeds", 2))
    plans = []
    for name, fields in per_ds.items():
        fields = dict(fields)
        counts = fields.pop("seeds", {})
        if seeds is not None:
            counts = {e: seeds for e in EXPERIMENTS}
        bad = sorted(set(counts) - set(EXPERIMENTS))
        if bad or not counts:
            raise ProtocolError(f"{path}: [datasets.{name}] seeds must give a count per experiment of {EXPERIMENTS}")
        n = max(counts.values())
        t, li, sh = blocks(offset, n, shared)
        plans.append(_plan({**common, **fields, "dataset": name, "seeds": t, "second_seeds": li, "shared_seeds": sh,
                            "experiment_seeds": {e: int(counts.get(e, 0)) for e in EXPERIMENTS}}))  # fmt: skip
    min_effects = {c["row"]: float(c["min_effect"]) for c in claims}
    table = {row_key(r): r for r in ROWS}
    k = sum(
        len(c.get("datasets", per_ds)) * max(1, len(c.get("regimes", []))) for c in claims if table[c["row"]].family
    )
    analysis = Analysis(
        blocks={"torch": plans[0].seeds, "linen": plans[0].second_seeds},
        shared=plans[0].shared_seeds,
        by_dataset={p.dataset: ({"torch": p.seeds, "linen": p.second_seeds}, p.shared_seeds) for p in plans},
        alpha=float(head.get("alpha", 0.05)),
        min_effects=min_effects,
        max_excluded=float(head.get("max_excluded", 0.1)),
        kind=head["kind"] if seeds is None and seed_offset is None else "exploratory",
        k=k,
    )  # fmt: skip
    deviations = [
        f"--{k.replace('_', '-')} {v}" for k, v in (("seeds", seeds), ("seed_offset", seed_offset)) if v is not None
    ]
    meta = {
        "path": path,
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
        "name": head.get("name"),
        "kind": analysis.kind,
        "deviations": deviations,
        "protocol": doc,
    }
    return Design(tuple(plans), analysis, meta)


def load(path: str | Path, seeds: int | None = None, seed_offset: int | None = None) -> Design:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ProtocolError(f"{path}: cannot read it ({e.strerror or e})") from None
    design = parse(raw.decode(), str(path), seeds, seed_offset)
    design.meta["sha256"] = hashlib.sha256(raw).hexdigest()  # of the bytes on disk
    return design


def builtin(
    name: str = "quick", dataset: str = "digits", seeds: int | None = None, seed_offset: int | None = None
) -> Design:
    """A built-in exploratory plan (``PLANS``) on one dataset; ``seeds`` per framework from
    ``seed_offset``, two of them shared, when given."""
    plan = dataclasses.replace(PLANS[name], dataset=dataset)
    if seeds is not None or seed_offset is not None:
        n = len(plan.seeds) if seeds is None else seeds
        t, li, sh = blocks(seed_offset or 0, n, min(2, 2 * n))
        plan = dataclasses.replace(plan, seeds=t, second_seeds=li, shared_seeds=sh)
    analysis = Analysis({"torch": plan.seeds, "linen": plan.second_seeds}, shared=plan.shared_seeds)
    meta = {"name": f"built-in {name} plan", "kind": "exploratory", "plan": dataclasses.asdict(plan)}
    return Design((plan,), analysis, meta)
