"""Optimizers that match step for step between ``torch.optim`` and ``optax``.

=================  =============================================  ===============================================
name               torch                                          optax
=================  =============================================  ===============================================
sgd_momentum       SGD(lr, momentum=0.9)                          sgd(lr, momentum=0.9)
sgd_nesterov       SGD(lr, momentum=0.9, nesterov=True)           sgd(lr, momentum=0.9, nesterov=True)
sgd_weight_decay   SGD(lr, momentum=0.9, weight_decay=wd)         chain(add_decayed_weights(wd), sgd(...))
adam               Adam(lr)                                       adam(lr)
adam_l2            Adam(lr, weight_decay=wd)  (L2 on the grad)    chain(add_decayed_weights(wd), adam(lr))
adamw              AdamW(lr, weight_decay=wd) (decoupled)         adamw(lr, weight_decay=wd)
=================  =============================================  ===============================================

The traps: torch ``Adam(weight_decay=...)`` is *not* ``optax.adamw`` (it adds ``wd * p`` to
the gradient before the moments; AdamW decays the weights outside them), and the
defaults differ: ``torch.optim.AdamW`` decays by 1e-2, ``optax.adamw`` by 1e-4.
Both sides use eps = 1e-8 outside the square root.
"""

from __future__ import annotations

from collections.abc import Callable

import optax
import torch

import flaxbn.train as ftrain
import torchbn.train as ttrain

LR = 0.05
WD = 0.01

PAIRS: dict[str, tuple[Callable, Callable[[], optax.GradientTransformation]]] = {
    # SGD: the library's one definition on each side (torchbn.train.sgd, flaxbn.train.sgd)
    "sgd_momentum": (lambda p: ttrain.sgd(p, lr=LR), lambda: ftrain.sgd(LR)),
    "sgd_nesterov": (lambda p: ttrain.sgd(p, lr=LR, nesterov=True), lambda: ftrain.sgd(LR, nesterov=True)),
    "sgd_weight_decay": (lambda p: ttrain.sgd(p, lr=LR, weight_decay=WD), lambda: ftrain.sgd(LR, weight_decay=WD)),
    "adam": (lambda p: torch.optim.Adam(p, lr=LR / 50), lambda: optax.adam(LR / 50)),
    "adam_l2": (
        lambda p: torch.optim.Adam(p, lr=LR / 50, weight_decay=WD),
        lambda: optax.chain(optax.add_decayed_weights(WD), optax.adam(LR / 50)),
    ),
    "adamw": (
        lambda p: torch.optim.AdamW(p, lr=LR / 50, weight_decay=WD),
        lambda: optax.adamw(LR / 50, weight_decay=WD),
    ),
}
