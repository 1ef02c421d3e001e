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


# --- drafting the confirmatory protocol from a pilot -------------------------------------------------


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"""' + value + '"""' if "\n" in value else '"' + value.replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _unit_costs(pilot: dict) -> dict[tuple[str, str, str], float]:
    """(dataset, framework, experiment) -> CPU seconds per seed, from the pilot's units: each
    unit's CPU time split by its runs' wall times (the searches count as learning_rate)."""
    units = pilot["meta"]["train_timing"]["units"]
    share: dict[str, dict[str, float]] = {}
    for r in pilot["train"]:
        e = "learning_rate" if r["claim"] == "lr_search" else r["claim"]
        share.setdefault(f"{r['dataset']}/{r['framework']}/{r['seed']}", {}).setdefault(e, 0.0)
        share[f"{r['dataset']}/{r['framework']}/{r['seed']}"][e] += r["wall_s"]
    cost: dict[tuple[str, str, str], list[float]] = {}
    for key, parts in share.items():
        if key not in units:
            continue
        ds, fw, _ = key.split("/")
        total = sum(parts.values())
        for e, w in parts.items():
            cost.setdefault((ds, fw, e), []).append(units[key]["cpu_s"] * w / total)
    return {k: sum(v) / len(v) for k, v in cost.items()}


def draft(
    pilot: dict, template: str, *, name: str, seed_offset: int, pilot_path: str, pilot_sha256: str,
    budget_cpu_s: float, power_target: float = 0.8, sd_confidence: float = 0.8, at_least: int = 5, shared: int = 4,
) -> tuple[str, dict]:  # fmt: skip
    """The confirmatory protocol's text from a pilot's results and its protocol (the design,
    datasets and minimum effects are the pilot's): per family row, dataset and regime, the
    seeds per framework that give ``power_target`` at ``1 - alpha / k`` from the upper
    ``sd_confidence`` limit of the pilot's pooled sd (at least ``at_least``); an experiment
    runs the most any of its rows needs, up to a cap: the largest count per framework for
    which the CPU time estimated from the pilot fits ``budget_cpu_s`` (the rows that need
    more than the cap get the cap, and the power each row keeps is written down). Returns
    the text and what it was derived from."""
    from compare.experiments.claims import stats

    base = tomllib.loads(template)
    k = parse(template).analysis.k
    level = stats.bonferroni_level(k, base["protocol"].get("alpha", 0.05))
    rows = {row_key(r): r for r in ROWS}
    pilot_claims = {(c["row"], c["dataset"], c.get("regime")): c for c in pilot["meta"]["train_summary"]["claims"]}
    need: dict[tuple[str, str, str | None], dict] = {}
    for c in base["claims"]:
        row = rows[c["row"]]
        for ds in base["datasets"]:
            for regime in [g for g in row.regimes]:
                p = pilot_claims.get((c["row"], ds, regime))
                if p is None or p.get("sd") is None:
                    raise ProtocolError(f"the pilot has no spread for {c['row']} on {ds} {regime or ''}")
                sd_up = stats.sd_upper(p["sd"], p["df"], sd_confidence)
                n = stats.seeds_for_power(sd_up, c["min_effect"], level, target=power_target, absence=row.absence,
                                          at_least=2 * at_least) // 2  # fmt: skip
                need[(c["row"], ds, regime)] = {"mean": p["effect"], "sd": p["sd"], "sd_upper": sd_up, "seeds": n,
                                                "family": row.family, "experiment": row.experiment,
                                                "min_effect": c["min_effect"], "absence": row.absence}  # fmt: skip
    costs = _unit_costs(pilot)

    def counts(cap: int) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {ds: dict.fromkeys(EXPERIMENTS, at_least) for ds in base["datasets"]}
        for (_, ds, _), v in need.items():
            if v["family"]:
                e = v["experiment"]
                out[ds][e] = max(out[ds][e], min(cap, v["seeds"]))
        return out

    def cpu(c: dict[str, dict[str, int]]) -> float:
        total = 0.0
        for ds, per in c.items():
            for fw in ("torch", "linen"):
                total += sum(n * costs.get((ds, fw, e), 0.0) for e, n in per.items())
                total += (shared / 2) * sum(costs.get((ds, fw, e), 0.0) for e in EXPERIMENTS)  # the check's extra runs
        return total

    cap = max(v["seeds"] for v in need.values())
    while cap > at_least and cpu(counts(cap)) > budget_cpu_s:
        cap -= 1
    final = counts(cap)
    for (_, ds, _), v in need.items():
        n = final[ds][v["experiment"]]
        v["seeds_run"] = n
        v["power"] = stats.power(2 * n, v["sd_upper"], v["min_effect"], level, absence=v["absence"])
    derived = {"k": k, "level": level, "cap": cap, "cpu_s": cpu(final), "counts": final, "need": need,
               "costs": {"/".join(k): v for k, v in costs.items()}}  # fmt: skip
    return _render(base, name, seed_offset, pilot_path, pilot_sha256, budget_cpu_s, power_target, sd_confidence,
                   shared, derived), derived  # fmt: skip


def _render(base, name, seed_offset, pilot_path, pilot_sha256, budget, power_target, sd_confidence, shared, derived):
    head = {
        **base["protocol"], "name": name, "kind": "confirmatory", "seed_offset": seed_offset, "shared_seeds": shared,
        "k": derived["k"], "power": power_target, "sd_confidence": sd_confidence, "pilot": pilot_path,
        "pilot_sha256": pilot_sha256, "budget_cpu_s": budget, "estimated_cpu_s": round(derived["cpu_s"]),
        "seed_cap": derived["cap"],
    }  # fmt: skip
    lines = [
        f"# The confirmatory protocol of the lesson's claims, written from the pilot ({pilot_path})",
        "# by scripts/draft_claims_protocol.py and committed before the confirmation ran:",
        "#   python -m compare.run --suite train --protocol protocols/claims-confirmation.toml \\",
        "#       --out results/cpu-2core-x86_64/claims-confirmation",
        "# Each row's seeds per framework give 80% power to see its minimum effect at the corrected level",
        "# (Bonferroni over k rows), from the pilot's per-seed sd (its upper 80% limit); an experiment runs",
        "# the most any of its rows needs, up to 'seed_cap': the largest count per framework for which the",
        "# CPU time estimated from the pilot fits the budget; 'power' says what each row has with what runs.",
        "",
        "[protocol]",
        *(f"{k} = {_toml(v)}" for k, v in head.items()),
        "",
        "[design]",
        *(f"{k} = {_toml(v)}" for k, v in base["design"].items()),
    ]
    for ds, fields in base["datasets"].items():
        lines += ["", f"[datasets.{ds}]", *(f"{k} = {_toml(v)}" for k, v in fields.items() if k != "seeds"),
                  f"seeds = {_toml(derived['counts'][ds])}"]  # fmt: skip
    rows = {row_key(r): r for r in ROWS}
    for c in base["claims"]:
        row = rows[c["row"]]
        pilot_stats = {
            f"{ds}" + (f"/{g}" if g else ""): {key: round(v[key], 5) if isinstance(v[key], float) else v[key]
                                                for key in ("mean", "sd", "sd_upper", "seeds", "seeds_run", "power")}
            for (r, ds, g), v in derived["need"].items() if r == c["row"]
        }  # fmt: skip
        lines += [
            "",
            "[[claims]]",
            f"row = {_toml(c['row'])}",
            f"metric = {_toml(row.metric)}",
            f"arms = {_toml(list(row.arms))}",
            f"experiment = {_toml(row.experiment)}",
            f"absence = {_toml(row.absence)}",
            f"family = {_toml(row.family)}",
            f"regimes = {_toml([g for g in row.regimes if g])}",
            f"datasets = {_toml(list(base['datasets']))}",
            f"min_effect = {_toml(c['min_effect'])}",
            *(f"pilot.{_quote(key)} = {_toml(v)}" for key, v in pilot_stats.items()),
        ]
    return "\n".join(lines) + "\n"


def _quote(key: str) -> str:
    return f'"{key}"' if "/" in key else key
