"""The suites of ``compare.run`` made of checks: ``equivalence`` and ``spec`` (see
:mod:`compare.suite`; ``distributed`` is ``compare.parallel.suite``'s)."""

from __future__ import annotations

import argparse

from compare.suite import Progress, Saved, Suite

QUICK_MODELS = ["mlp", "cnn", "resnet18", "resnet18_cifar"]
TRAIN_MODELS = ["mlp", "cnn"]  # the spec suite's train-mode equivalence records


def _equivalence(args: argparse.Namespace, progress: Progress, saved: Saved) -> dict:
    from compare import registry
    from compare.checks import equivalence

    models = list(registry.NAMES) if args.full else QUICK_MODELS
    seeds = [0, 1, 2] if args.full else [0]
    dtypes = ("float32", "bfloat16")  # bfloat16: both sides compute in it (torch autocast, Flax compute_dtype)
    progress(None, len(models) * len(seeds) * 2 * len(dtypes))
    records = equivalence.run(
        models,
        ["linen", "nnx"],
        seeds=seeds,
        batch=16 if args.full else 8,
        device=args.device,
        dtypes=dtypes,
        progress=progress,
    )
    return {"equivalence": records}


def _spec(args: argparse.Namespace, progress: Progress, saved: Saved) -> dict:
    """The spec facts (pytest), then the train-mode equivalence records of mlp and cnn, in
    their own list (``train_equivalence``; before schema 3 they were in ``equivalence``)."""
    from compare.checks import spec, train_equivalence

    facts = spec.run(progress=lambda fact, total: progress(fact, total + len(TRAIN_MODELS) * 2))
    train = []
    for name in TRAIN_MODELS:
        for api in ("linen", "nnx"):
            train.append(train_equivalence.record(name, api, steps=200))
            progress(f"train-mode {name}/{api}", None)
    return {"spec": facts, "train_equivalence": train}


EQUIVALENCE = Suite(
    "equivalence",
    "every model on linen and nnx: the same weights give the same eval-mode logits (float32 and bfloat16)",
    _equivalence,
)
SPEC = Suite("spec", "every fact of SEMANTICS.md against the installed versions, and train-mode equivalence", _spec)
