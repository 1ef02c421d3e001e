"""The PyTorch training step: cross-entropy, backward, optimizer step, BatchNorm buffers
updated in place by the train-mode forward. The twin of ``flaxbn/train.py``."""

from __future__ import annotations

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
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """One training step; returns the loss (a 0-d tensor, not synchronised)."""
    loss, _ = loss_and_grads(model, x, labels)
    optimizer.step()
    return loss


def sgd(model: nn.Module, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0, nesterov: bool = False):
    """SGD with momentum: ``buf = momentum * buf + g``, ``p -= lr * buf`` (weight decay is
    L2: added to ``g`` first). ``foreach`` is torch's default fast path on CPU and GPU."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
