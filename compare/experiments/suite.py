"""The ``train`` suite of ``compare.run`` (see :mod:`compare.suite`): the lesson's claims,
each with an experiment that could show it, in torch and in linen."""

from __future__ import annotations

import argparse
from pathlib import Path

from compare.suite import Progress, Saved, Suite

DATASETS = ["digits", "mnist", "fashion_mnist", "cifar10"]


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("train")
    group.add_argument(
        "--dataset",
        default="digits",
        choices=DATASETS,
        help="digits ships with scikit-learn; the others are read from --data-dir",
    )
    group.add_argument("--data-dir", type=Path, help="folder with the dataset's files (MNIST IDX, CIFAR batches)")


def _train(args: argparse.Namespace, progress: Progress, saved: Saved) -> dict:
    from compare.experiments import claims, data, training

    plan = claims.PLANS["full" if args.full else "quick"]
    dataset = data.load(args.dataset, args.data_dir)
    runs = plan.runs()
    progress(None, len(runs))
    records = training.run(
        runs,
        dataset,
        frameworks_of=plan.frameworks,
        progress=lambda what: progress(what, None),
        target=plan.target_accuracy,
        device=args.device,
    )
    summary = {"claims": claims.claims(records), "framework_agreement": claims.framework_agreement(records)}
    return {"train": records, "meta": {"train_summary": summary}}


TRAIN = Suite(
    "train",
    "the lesson's claims about BatchNorm and Dropout, each judged over seeds in torch and linen",
    _train,
    _add_arguments,
)
