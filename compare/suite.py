"""What a suite of ``python -m compare.run`` is, so that each job folder owns its own.

A :class:`Suite` names itself, says in one line what it checks, adds its own command-line
options, and runs: ``run(args, progress, saved)`` returns the part of ``results.json`` it
made (``{"<list name>": [records], "meta": {...}}``, and ``"complete": False`` when a
budget cut it short, so that ``--resume`` runs it again). ``progress(what, total)``
reports: ``total`` sets the number of steps, ``what`` names one finished step. ``saved``
is the run's results on disk; a suite that keeps its work as it goes (the benchmark, one
group at a time) merges into it and saves. ``compare.run`` only parses, loops and
handles signals.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

Progress = Callable[[str | None, int | None], None]


class Saved(Protocol):
    """The run's results as they grow (``compare.report.results.Results``)."""

    data: dict[str, Any]

    def merge(self, part: dict[str, Any]) -> None: ...

    def save(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    help: str  # one line: what the suite checks
    run: Callable[[argparse.Namespace, Progress, Saved], dict[str, Any]]
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None


def resolve_device(device: str) -> str | None:
    """``"auto"``, ``"cpu"`` or ``"gpu"`` as the device to run on: auto is the GPU when both
    torch (``torch.cuda``) and jax (``jax.devices()``) see one; None for "gpu" without one."""
    import jax
    import torch

    has_gpu = torch.cuda.is_available() and any(d.platform == "gpu" for d in jax.devices())
    if device == "gpu" and not has_gpu:
        return None
    return ("gpu" if has_gpu else "cpu") if device == "auto" else device
