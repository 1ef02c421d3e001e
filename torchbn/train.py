"""The PyTorch training and evaluation steps: cross-entropy, backward, optimizer step,
BatchNorm buffers updated in place by the train-mode forward; and the one optimizer
definition (:func:`sgd`). The twin of ``flaxbn/train.py``; the benchmark, the data-parallel
checks and the experiments all train through these."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy of (N, K) logits against (N,) integer labels."""
    return nn.functional.cross_entropy(logits, labels)


def loss_and_grads(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One train-mode forward and backward: returns (loss, logits); gradients land in
    ``p.grad`` and the BatchNorm buffers are updated in place."""
    model.train()
    for p in model.parameters():
        p.grad = None
    logits = model(x)
    loss = cross_entropy(logits, labels)
    loss.backward()
    return loss.detach(), logits.detach()


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    autocast: contextlib.AbstractContextManager | None = None,
) -> torch.Tensor:
    """One training step in train mode; returns the loss (a 0-d tensor, not synchronised).

    ``model`` may be a ``torch.compile``d module. ``autocast`` (``torch.autocast(...)``) is
    mixed precision, around the forward and the loss only, as torch recommends."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with autocast if autocast is not None else contextlib.nullcontext():
        loss = cross_entropy(model(x), labels)
    loss.backward()
    optimizer.step()
    return loss.detach()


def eval_step(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode loss and accuracy (BatchNorm uses its running statistics, Dropout is the
    identity; nothing is updated): two 0-d tensors, not synchronised."""
    model.eval()
    with torch.no_grad():
        logits = model(x)
        return cross_entropy(logits, labels), (logits.argmax(-1) == labels).float().mean()


def sgd(
    params: nn.Module | Iterable,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    *,
    fused: bool | None = None,
    foreach: bool | None = None,
) -> torch.optim.SGD:
    """SGD with momentum: ``buf = momentum * buf + g``, ``p -= lr * buf`` (weight decay is
    L2: added to ``g`` first). The defaults (lr 0.1, momentum 0.9) are the benchmark's.
    ``params``: a model or its parameters; ``fused`` (GPU) and ``foreach`` pick torch's
    fast paths (default: torch's choice)."""
    params = params.parameters() if isinstance(params, nn.Module) else params
    return torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, fused=fused, foreach=foreach
    )
