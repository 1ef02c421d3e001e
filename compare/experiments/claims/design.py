"""The design of the ``train`` suite: which runs each experiment makes for one seed
(:class:`Plan`), the built-in exploratory plans (``PLANS``); a protocol file
(``compare.experiments.claims.protocol``) makes the confirmatory one. What each claim's
effect is and the minimum it needs is the claims table (``effects.ROWS``).

The lesson's network is the MLP ``x = dropout(relu(bn(fc(x))))`` per hidden layer
(``torchbn.models.MLP``, 256-256 by default), trained with SGD (momentum 0.9, no weight
decay). Each seed draws its own data split (train, validation, test), its own initial
weights, batch order and subsets. Three experiments per dataset:

* ``learning_rate``: with BatchNorm, without it, and without it but with Dropout
  (``stability_dropout``), at every learning rate of ``lrs``, ``lr_epochs`` epochs on the
  seed's training split; the target accuracy is checked on the validation and test splits
  after every step. Each arm's learning rate is chosen on validation. Then, per arm, the
  largest learning rate that still trains is found by bisection on log(lr)
  (:func:`search_bracket`, ``lr_search`` runs): the largest reaching the target validation
  accuracy, and the largest that stays stable (no divergence, validation accuracy at least
  ``STABLE_ACCURACY``). At ``probe_lr`` the runs also measure the internal covariate shift
  after every epoch (Santurkar et al. 2018), whether BatchNorm and Dropout change anything
  in eval mode, the accuracy with hidden units ablated, and Monte-Carlo dropout; one more
  run trains Santurkar's "noisy BatchNorm".
* ``overfitting``: a class-balanced subset of ``overfit_size`` training images, once with
  clean labels and once with ``label_noise`` of them wrong (``label_noises``), trained for
  ``overfit_epochs`` epochs; without BatchNorm and Dropout (the reference), with Dropout,
  with BatchNorm. The generalisation gap is measured on the training images whose labels
  are right.
* ``order``: BatchNorm and Dropout together (``order_dropout``) in the lesson's order,
  with Dropout moved in front of BatchNorm, and with Dropout only after the last BatchNorm
  (Li et al. 2019's remedy); the train/eval variance shift of every BatchNorm.

Every per-seed effect pairs two runs of one framework that start from the same weights
and see the same batches. Torch runs ``seeds``, linen ``second_seeds`` (disjoint, so that
the second framework adds evidence: framework is a block of the analysis), and both run
``shared_seeds``, the implementation check, reported apart.
"""

from __future__ import annotations

import dataclasses
import math

from compare.experiments.training import RunConfig

STABLE_ACCURACY = 0.5  # a run that did not diverge and ends above this (validation) trained "stably"
GAP_EPOCHS = 5  # the generalisation gap is averaged over the last epochs
ABLATED_FRACTION = 0.5  # the reliance claim's fraction of hidden units zeroed
OVERFIT_TEST_LOSS_RISE = 1.1  # reported: the reference's final test loss over its minimum
EXPERIMENTS = ("learning_rate", "overfitting", "order")
ARMS = {"BatchNorm": (True, 0.0), "plain": (False, 0.0), "Dropout": (False, None)}  # use_bn, dropout (None: > 0)
SEARCHES = (("BatchNorm", "target"), ("plain", "target"), ("BatchNorm", "stable"), ("plain", "stable"),
            ("Dropout", "stable"))  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Plan:
    seeds: tuple[int, ...] = tuple(range(4))  # torch's block (4 + 4 + 2 shared: --suite train in ~4 min on 2 cores)
    second_seeds: tuple[int, ...] = tuple(range(4, 8))  # linen's block, disjoint from torch's
    shared_seeds: tuple[int, ...] = (0, 4)  # run in both frameworks: the implementation check
    dataset: str = "digits"
    synthetic: dict | None = None  # the synthetic dataset's parameters (compare.experiments.synthetic)
    val_fraction: float = 0.2
    test_fraction: float = 0.3
    hidden: tuple[int, ...] = (256, 256)
    batch_size: int = 64
    target_accuracy: float = 0.9
    lrs: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
    lrs_above: tuple[float, ...] = (10.0, 30.0)  # tried in turn when the grid's largest lr passes a search
    search_steps: int = 4  # bisections of log(lr) after the bracket
    lr_epochs: int = 10
    probe_lr: float = 0.1
    stability_dropout: float = 0.5
    overfit_size: int = 300
    label_noises: tuple[float, ...] = (0.0, 0.3)
    overfit_epochs: int = 100
    overfit_batch: int = 32
    overfit_lr: float = 0.05
    overfit_dropout: float = 0.5
    order_dropout: float = 0.5
    order_epochs: int = 15
    order_lr: float = 0.1
    experiment_seeds: dict[str, int] | None = None  # seeds per framework an experiment runs (None: every seed)

    @property
    def label_noise(self) -> float:
        """0.2's single overfitting regime: the noisy one."""
        return max(self.label_noises)

    def experiments(self, seed: int) -> tuple[str, ...]:
        """The experiments a seed runs: all on shared seeds; on a block's i-th seed those
        whose seed count is above i."""
        if self.experiment_seeds is None:
            return EXPERIMENTS
        if seed in self.shared_seeds:
            return tuple(e for e in EXPERIMENTS if self.experiment_seeds.get(e, 1) > 0)
        block = self.seeds if seed in self.seeds else self.second_seeds
        i = block.index(seed)
        return tuple(e for e in EXPERIMENTS if i < self.experiment_seeds.get(e, len(block)))

    def seed_runs(self, seed: int) -> list[RunConfig]:
        """The runs of one seed whose settings are known in advance (the searches follow
        from their outcomes: :func:`search_bracket`)."""
        mlp = dict(model="mlp", hidden=self.hidden, seed=seed)
        out = []
        todo = self.experiments(seed)
        if "learning_rate" in todo:
            for lr in self.lrs:
                at_probe = math.isclose(lr, self.probe_lr)
                for use_bn, p in ((True, 0.0), (False, 0.0), (False, self.stability_dropout)):
                    probes = ()
                    if at_probe:
                        probes = ("active_at_inference",) + (("ics",) if p == 0 else ("ensemble",))
                        probes += ("ablation",) if not use_bn else ()
                    out.append(RunConfig("learning_rate", use_bn=use_bn, dropout=p, lr=lr, epochs=self.lr_epochs,
                                         batch_size=self.batch_size, probes=probes, track_steps=True, **mlp))  # fmt: skip
            out.append(RunConfig("learning_rate", use_bn=True, dropout=0.0, lr=self.probe_lr, epochs=self.lr_epochs,
                                 batch_size=self.batch_size, variant="noisy_bn", probes=("ics",), **mlp))  # fmt: skip
        if "overfitting" in todo:
            for noise in self.label_noises:
                for use_bn, p in ((False, 0.0), (False, self.overfit_dropout), (True, 0.0)):
                    out.append(RunConfig("overfitting", use_bn=use_bn, dropout=p, lr=self.overfit_lr,
                                         epochs=self.overfit_epochs, batch_size=self.overfit_batch,
                                         train_size=self.overfit_size, label_noise=noise, **mlp))  # fmt: skip
        if "order" in todo:
            for variant in ("standard", "dropout_before_bn", "dropout_last_only"):
                out.append(RunConfig("order", use_bn=True, dropout=self.order_dropout, lr=self.order_lr,
                                     epochs=self.order_epochs, batch_size=self.batch_size, variant=variant,
                                     probes=("variance_shift",), **mlp))  # fmt: skip
        return out

    def search_run(self, seed: int, arm: str, criterion: str, lr: float) -> RunConfig:
        """One run of a learning-rate search: the arm's learning-rate run at ``lr``, no probes."""
        use_bn, p = ARMS[arm]
        return RunConfig("lr_search", "mlp", use_bn=use_bn, dropout=self.stability_dropout if p is None else p, lr=lr,
                         epochs=self.lr_epochs, batch_size=self.batch_size, seed=seed, hidden=self.hidden,
                         search={"arm": arm, "criterion": criterion})  # fmt: skip

    def runs(self) -> list[RunConfig]:
        """Every seed's runs known in advance (0.2's interface; the searches are left out)."""
        return [cfg for seed in dict.fromkeys(self.all_seeds()) for cfg in self.seed_runs(seed)]

    def all_seeds(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys((*self.seeds, *self.second_seeds)))

    def frameworks(self, cfg_or_seed) -> tuple[str, ...]:
        """The frameworks a seed (or a run's seed) runs in: both for a shared seed (one of a
        block's seeds that the other framework runs too; a shared seed in no block is ignored)."""
        seed = getattr(cfg_or_seed, "seed", cfg_or_seed)
        shared = seed in self.shared_seeds
        return tuple(
            fw for fw, block in (("torch", self.seeds), ("linen", self.second_seeds)) if shared or seed in block
        )


def passes(r: dict, criterion: str) -> bool:
    """A learning-rate run meets a search criterion: it did not diverge, and its final
    validation accuracy (test accuracy for runs without a validation split) is at least the
    target (``target``) or ``STABLE_ACCURACY`` (``stable``)."""
    if r["diverged"]:
        return False
    acc = r.get("final_val_acc", r["final_test_acc"])
    bound = r["target_accuracy"] if criterion == "target" else STABLE_ACCURACY
    return bool(acc >= bound)


def search_bracket(runs: list[dict], criterion: str) -> tuple[float | None, float | None]:
    """``(low, high)``: the largest learning rate that meets the criterion and the smallest
    above it that does not, over an arm's runs (its grid and its search). None where there
    is none: no run meets it (``low``), or every run above ``low`` meets it (``high``).

    The search that makes these runs: ``low`` and ``high`` from the grid; while ``high`` is
    None, the next of ``lrs_above``; then ``search_steps`` times the geometric midpoint,
    which replaces ``low`` when it meets the criterion and ``high`` when not. Every run the
    search adds lies between its bracket's ends, so the bracket follows from the runs."""
    ok = [r["lr"] for r in runs if passes(r, criterion)]
    if not ok:
        return None, None
    low = max(ok)
    above = [r["lr"] for r in runs if r["lr"] > low and not passes(r, criterion)]
    return low, (min(above) if above else None)


def largest_lr(runs: list[dict], criterion: str, lrs: tuple[float, ...]) -> tuple[float, str]:
    """The largest learning rate meeting the criterion, estimated as the geometric midpoint
    of the final bracket, and whether it is censored: ``"below"`` (no run met it: half a
    decade under the grid), ``"above"`` (every run above the grid met it: the largest
    tried) or ``""``."""
    low, high = search_bracket(runs, criterion)
    if low is None:
        return min(lrs) / math.sqrt(10), "below"
    if high is None:
        return low, "above"
    return math.sqrt(low * high), ""


PLANS = {
    "quick": Plan(),
    "full": Plan(
        seeds=tuple(range(16)),
        second_seeds=tuple(range(16, 32)),
        shared_seeds=(0, 16),
        lrs=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0),
        lrs_above=(30.0, 100.0),
        lr_epochs=20,
        overfit_epochs=200,
        order_epochs=30,
    ),
}


def __getattr__(name: str):
    """``Spec``, ``SPECS`` and ``SPEC`` (0.2) are the claims table's ``ClaimRow``, ``ROWS`` and
    ``ROW`` in ``compare.experiments.claims.effects`` now ("spec" names the spec suite)."""
    new = {"Spec": "ClaimRow", "SPECS": "ROWS", "SPEC": "ROW"}.get(name)
    if new is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import warnings

    from compare.experiments.claims import effects

    warnings.warn(
        f"compare.experiments.design.{name} is compare.experiments.claims.effects.{new} since 0.3",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(effects, new)
