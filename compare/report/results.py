"""``results.json``: one object, ``meta`` plus one list of flat records per suite."""

from __future__ import annotations

import datetime
import json
import math
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("numpy", "torch", "jax", "jaxlib", "flax", "optax")


def device_name(device: str) -> str:
    """A readable name of the device a suite ran on ('cpu' or 'gpu')."""
    if device == "gpu":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
        import jax

        return jax.devices()[0].device_kind
    return platform.processor() or platform.machine() or "cpu"


def meta(device: str) -> dict[str, Any]:
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "python": platform.python_version(),
        **versions,
        "device": device,
        "device_name": device_name(device),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "-m", "compare.run", *sys.argv[1:]]),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf/nan; keep them readable
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write(path: Path, results: dict[str, Any]) -> None:
    path.write_text(json.dumps(_jsonable(results), indent=2) + "\n")


def failures(results: dict[str, Any]) -> list[dict]:
    """Every record, in any suite, whose ``ok`` is False."""
    return [r for key, recs in results.items() if key != "meta" for r in recs if r.get("ok") is False]
