"""The records of ``results.json``: one frozen dataclass per kind, the single source of
every field name.

``results.json`` is one object: ``meta`` (with ``schema_version``) and one list of flat
records per suite. Each suite's records are built as these dataclasses and written with
:meth:`Record.to_dict`; ``report`` takes its table columns from them, and a test checks
that README.md and DESIGN.md list the same fields. Field names are snake_case and stable
so that runs from different machines and versions can be diffed; a JSON name that is not
a Python identifier (``trajectory_float32_first_step_above_1e-4``) is given in the field's
metadata. Optional fields (``optional=True``) are left out of the JSON when ``None``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

# 1: the flat layout before this field existed; 2: the same fields, meta.schema_version added;
# 3: the spec suite's train-mode records in their own list, train_equivalence (they were in equivalence).
SCHEMA_VERSION = 3


def field(*, json: str | None = None, optional: bool = False, table: bool = True, brief: bool = False) -> Any:
    """A record field. ``json``: its name in results.json when not the attribute's;
    ``optional``: omitted when None; ``table``: shown in report tables (False for
    per-step curves); ``brief``: also in the console's short table."""
    meta = {"json": json, "optional": optional, "table": table, "brief": brief}
    if optional:
        return dataclasses.field(default=None, metadata=meta)
    return dataclasses.field(metadata=meta)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Record:
    """Base of every record kind; ``SUITE`` is the results.json list it goes into."""

    SUITE: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("optional") and value is None:
                continue
            out[f.metadata.get("json") or f.name] = value
        return out

    @classmethod
    def field_names(cls, *, required_only: bool = False) -> tuple[str, ...]:
        """Every JSON field name, in order (only those always present with ``required_only``)."""
        return tuple(
            f.metadata.get("json") or f.name
            for f in dataclasses.fields(cls)
            if not (required_only and f.metadata.get("optional"))
        )

    @classmethod
    def columns(cls, *, brief: bool = False) -> tuple[str, ...]:
        """The fields that make a table's columns (``brief``: the console's short table)."""
        return tuple(
            f.metadata.get("json") or f.name
            for f in dataclasses.fields(cls)
            if f.metadata.get("table", True) and (not brief or f.metadata.get("brief"))
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class EquivalenceRecord(Record):
    """Eval mode: the same weights and input give the same logits in torch and Flax."""

    SUITE: ClassVar[str] = "equivalence"
    model: str = field(brief=True)
    flax_api: str = field(brief=True)  # "linen" | "nnx"
    mode: str = field(brief=True)  # "eval"
    dtype: str = field(brief=True)
    max_abs_diff: float = field(brief=True)  # max |torch - flax| over the logits
    max_rel_diff: float = field(brief=True)  # that over max |torch|
    tol: float = field(brief=True)  # (rtol, atol) folded: atol + rtol * max |torch|
    ok: bool = field(brief=True)
    first_divergence: str | None = field(table=False)  # the first layer that differs (when not ok)
    layers: list[dict] | None = field(optional=True, table=False)  # the per-layer table (when not ok)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainEquivalenceRecord(Record):
    """Train mode with injected dropout masks: one step, then trajectories."""

    SUITE: ClassVar[str] = "equivalence"
    model: str = field(brief=True)
    flax_api: str = field(brief=True)
    mode: str = field(table=False, brief=True)  # "train"
    dtype: str = field(table=False, brief=True)
    max_abs_diff: float = field(brief=True)  # logits of one train-mode step
    max_rel_diff: float = field(table=False, brief=True)
    tol: float = field(table=False, brief=True)
    ok: bool = field(brief=True)
    grad_max_rel_diff: float = field()
    grad_rtol: float = field(table=False)
    stats_max_abs_diff: float = field()
    stats_tol: float = field(table=False)
    trajectory_steps: int = field(table=False)
    trajectory_float64_max_rel_diff: float = field()
    trajectory_float64_tol: float = field(table=False)
    trajectory_float32_final_rel_diff: float = field()
    trajectory_float32_first_step_above_1e_4: int | None = field(json="trajectory_float32_first_step_above_1e-4")
    divergence_float64: list[float] = field(table=False)
    divergence_float32: list[float] = field(table=False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpecRecord(Record):
    """One fact of SEMANTICS.md checked on the installed versions."""

    SUITE: ClassVar[str] = "spec"
    id: str = field(brief=True)  # the fact's stable dotted name
    framework: str = field(brief=True)  # "torch" | "linen" | "nnx" | "cross"
    ok: bool | None = field(brief=True)  # None: could not be checked here (detail says why)
    detail: str = field()
    params: str | None = field(optional=True)  # the parameter set of a parametrized fact ("rate=0.25")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchRecord(Record):
    """One implementation's timed training step for one (model, batch, dtype) group."""

    SUITE: ClassVar[str] = "bench"
    model: str = field(brief=True)
    impl: str = field(brief=True)
    device: str = field(table=False)
    dtype: str = field(brief=True)
    batch_size: int = field(brief=True)
    step_ms_median: float = field(brief=True)
    step_ms_p10: float = field()
    step_ms_p90: float = field()
    samples_per_s: float = field(brief=True)
    compile_s: float = field(brief=True)
    peak_mem_bytes: int | None = field()
    tflops_per_s: float = field()
    mfu: float | None = field(brief=True)
    peak_tflops_per_s: float | None = field(table=False)
    mfu_datasheet: float | None = field(optional=True)  # against the card's datasheet peak (GPU)
    datasheet_tflops_per_s: float | None = field(optional=True, table=False)
    flops_per_step: float = field(table=False)
    steps_timed: int = field(table=False)
    # the implementation's settings, where it has them
    compile_mode: str | None = field(optional=True, table=False)
    channels_last: bool | None = field(optional=True, table=False)
    cuda_graphs: bool | None = field(optional=True, table=False)
    donated: bool | None = field(optional=True, table=False)
    pattern: str | None = field(optional=True, table=False)
    scan_steps: int | None = field(optional=True, table=False)
    bn_variance: str | None = field(optional=True, table=False)  # JAX: "two_pass" | "shifted"
    # the machine's load around this group (compare.bench.load): the share of the cores this
    # run could use, the lower of the probes before and after it; busy when under the threshold
    cpu_share: float | None = field(optional=True)
    busy: bool | None = field(optional=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Speedup(Record):
    """Derived, per (model, dtype, batch): best JAX over best PyTorch in samples/s."""

    SUITE: ClassVar[str] = ""
    model: str = field()
    dtype: str = field()
    batch_size: int = field()
    best_jax: str = field()
    best_torch: str = field()
    jax_samples_per_s: float = field()
    torch_samples_per_s: float = field()
    speedup: float = field()
    busy: bool | None = field(optional=True)  # the machine was busy during this group: do not trust the ratio


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainRecord(Record):
    """One training run of the claims experiments in one framework."""

    SUITE: ClassVar[str] = "train"
    claim: str = field()
    model: str = field()
    framework: str = field()  # "torch" | "linen"
    dataset: str = field(table=False)
    use_bn: bool = field()
    dropout: float = field()
    lr: float = field()
    epochs: int = field()
    batch_size: int = field(table=False)
    seed: int = field()
    target_accuracy: float = field(table=False)
    final_train_loss: float = field()
    final_train_acc: float = field()
    final_test_loss: float = field()
    final_test_acc: float = field()
    diverged: bool = field()
    steps_to_target: int | None = field()
    wall_s: float = field()
    curves: dict[str, list[float]] = field(table=False)  # per epoch: train/test loss and accuracy
    # 0.3: the claims' experiments (absent from older runs)
    variant: str | None = field(optional=True)  # compare.experiments.nets.VARIANTS
    train_size: int | None = field(optional=True, table=False)
    label_noise: float | None = field(optional=True)
    hidden: list[int] | None = field(optional=True, table=False)
    probes: dict | None = field(optional=True, table=False)  # compare.experiments.probes' measurements
    # 0.3: claims a reviewer can trust (absent from older runs)
    final_val_acc: float | None = field(optional=True)  # eval mode, on the seed's validation split
    val_steps_to_target: int | None = field(optional=True, table=False)  # first step (or epoch end) at the target
    target_check: str | None = field(optional=True, table=False)  # "step" | "epoch": how often the target is checked
    search: dict | None = field(optional=True, table=False)  # lr_search runs: criterion, arm, bracket after this run


@dataclasses.dataclass(frozen=True, kw_only=True)
class Claim(Record):
    """Derived: the verdict on one claim of the lesson in one framework
    (meta.train_summary.claims); ``compare.experiments.claims`` and ``.stats`` say how."""

    SUITE: ClassVar[str] = ""
    claim: str = field(brief=True)
    model: str = field(table=False)
    framework: str = field(brief=True)
    verdict: str = field(brief=True)  # "holds" | "does not hold" | "negligible" | "inconclusive"
    holds: bool = field(table=False)  # verdict == "holds" (0.2's field)
    component: str = field(table=False)  # "BatchNorm" | "Dropout" | "both"
    lesson: str = field(table=False)  # what the lesson's table says
    statement: str = field(table=False)
    metric: str = field(table=False)  # what one seed's effect is
    min_effect: float = field()
    effect: float | None = field()  # mean of the per-seed effects
    ci_low: float | None = field()  # t-interval of that mean, at `level` (95% in 0.2)
    ci_high: float | None = field()
    seeds: int = field()
    per_seed: list[float] = field(table=False)
    regime_ok: bool = field()  # the experiment could have shown the effect
    agrees: bool | None = field(optional=True)  # the other framework reached the same verdict
    setting: str = field(table=False)  # data, model and sizes the verdict holds for
    detail: str = field(table=False)
    # 0.3: the pooled analysis of a protocol (absent from older runs)
    dataset: str | None = field(optional=True)
    regime: str | None = field(optional=True)  # the overfitting experiment's "clean" | "noisy"
    level: float | None = field(optional=True)  # the interval's confidence: 1 - alpha / family_size
    family_size: int | None = field(optional=True, table=False)  # k, the rows judged together (Bonferroni)
    in_family: bool | None = field(optional=True, table=False)  # False: a second measure, reported beside
    row: str | None = field(optional=True, table=False)  # the claims table's row ("claim" or "claim:name")
    df: int | None = field(optional=True, table=False)
    sd: float | None = field(optional=True, table=False)  # per-seed standard deviation, pooled within blocks
    blocks: dict[str, int] | None = field(optional=True, table=False)  # seeds measured per framework
    per_seed_seeds: list[int] | None = field(optional=True, table=False)  # the seed of each per_seed value
    per_seed_frameworks: list[str] | None = field(optional=True, table=False)  # and its framework
    excluded: list[dict] | None = field(optional=True, table=False)  # seeds left out: framework, seed, why
    kind: str | None = field(optional=True, table=False)  # "exploratory" | "pilot" | "confirmatory"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImplementationCheck(Record):
    """Derived: one claim's per-seed effects in torch and in linen on the seeds both ran
    (meta.train_summary.implementation_check), reported apart from the verdicts."""

    SUITE: ClassVar[str] = ""
    claim: str = field()
    dataset: str = field()
    regime: str | None = field()
    seeds: list[int] = field(table=False)
    torch_effects: list[float] = field(table=False)
    linen_effects: list[float] = field(table=False)
    mean_diff: float = field()  # torch - linen, mean over the shared seeds
    max_abs_diff: float = field()
    min_effect: float = field()
    ok: bool = field()  # |mean_diff| < min_effect


@dataclasses.dataclass(frozen=True, kw_only=True)
class Fact(Record):
    """Derived: a deterministic row of the lesson (eval mode), checked on every probed network
    of one framework and dataset (meta.train_summary.facts)."""

    SUITE: ClassVar[str] = ""
    claim: str = field()
    dataset: str = field()
    framework: str = field()
    holds: bool = field()  # the statement (what is true) held on every network
    networks: int = field()
    lesson: str = field(table=False)  # what the lesson's table says
    statement: str = field(table=False)
    spec_id: str = field(table=False)  # the SEMANTICS.md fact that pins it
    test: str = field(table=False)
    measured: dict = field(table=False)  # the largest residuals and changes over the networks


@dataclasses.dataclass(frozen=True, kw_only=True)
class Agreement(Record):
    """Derived: one run's final test accuracy in torch and linen (meta.train_summary.framework_agreement)."""

    SUITE: ClassVar[str] = ""
    claim: str = field()
    model: str = field()
    use_bn: bool = field()
    dropout: float = field()
    lr: float = field()
    seed: int = field()
    variant: str | None = field(optional=True)
    torch_test_acc: float = field()
    linen_test_acc: float = field()
    acc_diff: float | None = field()
    both_diverged: bool = field(table=False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedRecord(Record):
    """One data-parallel check."""

    SUITE: ClassVar[str] = "distributed"
    framework: str = field()  # "linen" | "nnx" | "torch"
    devices: int = field()
    bn_mode: str = field()  # "sync" | "per_device"
    check: str = field()
    max_abs_diff: float | None = field()
    tol: float | None = field()
    ok: bool | None = field()  # None: cannot run here (detail says why)
    detail: str | None = field(optional=True)
    # 0.3: the checks run in several processes (absent: one process, simulated devices)
    processes: int | None = field(optional=True)
    launcher: str | None = field(optional=True)  # "simulated" | "jax.distributed" | "torchrun"
    seconds: float | None = field(optional=True)  # the fault test: from the kill to every process stopped


@dataclasses.dataclass(frozen=True, kw_only=True)
class CollectiveRecord(Record):
    """The collectives of one data-parallel training step, counted (results list
    ``distributed_collectives``)."""

    SUITE: ClassVar[str] = "distributed"
    framework: str = field()  # "jax" | "torch"
    model: str = field()
    bn_mode: str = field()  # "sync" | "per_device"
    devices: int = field()
    source: str = field()  # "stablehlo (lowered)" | "hlo (compiled, cpu)" | "torch.profiler"
    collectives: int = field()  # per step
    bytes_per_step: int = field()  # what one device contributes, summed over the collectives
    critical_collectives: int | None = field()  # BatchNorm's (and DDP's buffer broadcast): no compute hides them
    critical_bytes: int | None = field()
    detail: str = field(table=False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CommModelRecord(Record):
    """The paper model: one step's communication on a GPU cluster against the H100
    baseline's step time (results list ``distributed_comm_model``)."""

    SUITE: ClassVar[str] = "distributed"
    model: str = field()
    framework: str = field()
    bn_mode: str = field()
    link: str = field()  # compare.parallel.cost.LINKS
    gpus: int = field()
    collectives: int = field(table=False)
    bytes_per_step: int = field(table=False)
    comm_ms: float = field()  # every collective: latency + bytes over the bus bandwidth, no overlap
    critical_ms: float = field()  # the collectives no compute hides
    h100_step_ms: float = field()
    h100_impl: str = field(table=False)
    comm_fraction: float = field()
    critical_fraction: float = field()


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepTimeRecord(Record):
    """A data-parallel training step timed on this machine (results list ``distributed_steps``)."""

    SUITE: ClassVar[str] = "distributed"
    framework: str = field()
    model: str = field()
    processes: int = field()  # one device (one core) each
    bn_mode: str = field()
    batch_per_device: int = field()
    step_ms_median: float = field()
    step_ms_p10: float = field()
    step_ms_p90: float = field()
    samples_per_s: float = field()
    compile_s: float = field()  # the first step (compilation for JAX, warm-up for torch)
    windows: int = field(table=False)
    steps_per_window: int = field(table=False)
    load_avg: float = field()  # the machine's 1-minute load average, the highest seen while timing
    cpu_count: int = field(table=False)
    pinned: bool = field(table=False)  # process i on core i


# the kinds whose records go into results.json, by suite
KINDS: dict[str, tuple[type[Record], ...]] = {
    "equivalence": (EquivalenceRecord,),
    "train_equivalence": (TrainEquivalenceRecord,),
    "spec": (SpecRecord,),
    "bench": (BenchRecord,),
    "train": (TrainRecord,),
    "distributed": (DistributedRecord,),
    "distributed_collectives": (CollectiveRecord,),
    "distributed_comm_model": (CommModelRecord,),
    "distributed_steps": (StepTimeRecord,),
}
