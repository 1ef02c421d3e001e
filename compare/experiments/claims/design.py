"""The design of the ``train`` suite, fixed before any run: which runs each experiment
makes (:class:`Plan`, ``PLANS``), and for each claim of the lesson what one seed's effect
is and the minimum effect it needs is the claims table of ``effects`` (``ROWS``);
``judge`` judges the runs against it.

The lesson's network is the MLP ``x = dropout(relu(bn(fc(x))))`` per hidden layer
(``torchbn.models.MLP``, 256-256 by default), trained with SGD (momentum 0.9, no weight
decay). Three experiments on the dataset (digits by default), every seed in each:

* ``learning_rate``: with BatchNorm, without it, and without it but with Dropout
  (``stability_dropout``), at every learning rate of ``lrs``, ``lr_epochs`` epochs on the
  whole training split. At ``probe_lr`` the runs also measure the internal covariate shift
  after every epoch (Santurkar et al. 2018), then whether BatchNorm and Dropout change
  anything in eval mode, the accuracy with hidden units ablated, and Monte-Carlo dropout.
  One more run per seed trains Santurkar's "noisy BatchNorm" at ``probe_lr``.
* ``overfitting``: the regime where these networks overfit: a class-balanced subset of
  ``overfit_size`` training images with ``label_noise`` of its labels wrong, trained for
  ``overfit_epochs`` epochs; without BatchNorm and Dropout (the reference, whose training
  accuracy must reach 100% while its test loss rises: ``regime_ok``), with Dropout, with
  BatchNorm.
* ``order``: BatchNorm and Dropout together (``order_dropout``) in the lesson's order,
  with Dropout moved in front of BatchNorm, and with Dropout only after the last BatchNorm
  (Li et al. 2019's remedy); the train/eval variance shift of every BatchNorm.

Every per-seed effect pairs two runs that start from the same weights and see the same
batches. Torch runs ``seeds``; linen runs ``second_seeds`` (by default the same sixteen), and
each framework gets its own verdict; ``agrees`` says whether they match.
"""

from __future__ import annotations

import dataclasses
import math

from compare.experiments.training import RunConfig

STABLE_ACCURACY = 0.5  # a run that did not diverge and ends above this trained "stably"
GAP_EPOCHS = 5  # the generalisation gap is averaged over the last epochs
ABLATED_FRACTION = 0.5  # the reliance claim's fraction of hidden units zeroed
OVERFIT_TEST_LOSS_RISE = 1.1  # regime: the reference's final test loss >= 1.1 x its minimum


@dataclasses.dataclass(frozen=True)
class Plan:
    seeds: tuple[int, ...] = tuple(range(16))
    second_seeds: tuple[int, ...] = tuple(range(16))  # the linen runs
    hidden: tuple[int, ...] = (256, 256)
    batch_size: int = 64
    target_accuracy: float = 0.9
    lrs: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
    lr_epochs: int = 10
    probe_lr: float = 0.1
    stability_dropout: float = 0.5
    overfit_size: int = 300
    label_noise: float = 0.3
    overfit_epochs: int = 100
    overfit_batch: int = 32
    overfit_lr: float = 0.05
    overfit_dropout: float = 0.5
    order_dropout: float = 0.5
    order_epochs: int = 15
    order_lr: float = 0.1

    def runs(self) -> list[RunConfig]:
        mlp = dict(model="mlp", hidden=self.hidden)
        out = []
        for seed in self.seeds:
            for lr in self.lrs:
                at_probe = math.isclose(lr, self.probe_lr)
                for use_bn, p in ((True, 0.0), (False, 0.0), (False, self.stability_dropout)):
                    probes = ()
                    if at_probe:
                        probes = ("active_at_inference",) + (("ics",) if p == 0 else ("ensemble",))
                        probes += ("ablation",) if not use_bn else ()
                    out.append(
                        RunConfig(
                            "learning_rate",
                            use_bn=use_bn,
                            dropout=p,
                            lr=lr,
                            epochs=self.lr_epochs,
                            batch_size=self.batch_size,
                            seed=seed,
                            probes=probes,
                            **mlp,
                        )
                    )
            out.append(
                RunConfig(
                    "learning_rate",
                    use_bn=True,
                    dropout=0.0,
                    lr=self.probe_lr,
                    epochs=self.lr_epochs,
                    batch_size=self.batch_size,
                    seed=seed,
                    variant="noisy_bn",
                    probes=("ics",),
                    **mlp,
                )
            )
            for use_bn, p in ((False, 0.0), (False, self.overfit_dropout), (True, 0.0)):
                out.append(
                    RunConfig(
                        "overfitting",
                        use_bn=use_bn,
                        dropout=p,
                        lr=self.overfit_lr,
                        epochs=self.overfit_epochs,
                        batch_size=self.overfit_batch,
                        seed=seed,
                        train_size=self.overfit_size,
                        label_noise=self.label_noise,
                        **mlp,
                    )
                )
            for variant in ("standard", "dropout_before_bn", "dropout_last_only"):
                out.append(
                    RunConfig(
                        "order",
                        use_bn=True,
                        dropout=self.order_dropout,
                        lr=self.order_lr,
                        epochs=self.order_epochs,
                        batch_size=self.batch_size,
                        seed=seed,
                        variant=variant,
                        probes=("variance_shift",),
                        **mlp,
                    )
                )
        return out

    def frameworks(self, cfg: RunConfig) -> tuple[str, ...]:
        return ("torch", "linen") if cfg.seed in self.second_seeds else ("torch",)


PLANS = {
    "quick": Plan(),
    "full": Plan(
        seeds=tuple(range(32)),
        second_seeds=tuple(range(16)),
        lrs=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0),
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
