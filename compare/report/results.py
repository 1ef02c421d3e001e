"""``results.json``: one object, ``meta`` plus one list of flat records per suite.

``meta`` holds what it takes to rerun a result on the same commit and settings: the
schema version, the library versions, the git commit (and whether the tree was dirty),
the machine (CPU model and cores, the GPU with its CUDA/cuDNN/driver versions), the
thread settings and XLA flags, the JAX flags that change results, the date and the
exact command. Records are written by each suite with ``compare.records``.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from compare.io import results_file
from compare.io.files import atomic_path
from compare.records import SCHEMA_VERSION

PACKAGES = ("numpy", "torch", "jax", "jaxlib", "flax", "optax")
ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "XLA_FLAGS", "JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES")
JAX_FLAGS = ("jax_default_matmul_precision", "jax_threefry_partitionable", "jax_enable_x64", "jax_default_prng_impl")
REPO = Path(__file__).resolve().parents[2]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: str) -> str:
    """A readable name of the device a suite ran on ('cpu' or 'gpu')."""
    if device == "gpu":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
        import jax

        return jax.devices()[0].device_kind
    return cpu_model()


def git_state(repo: Path = REPO) -> dict[str, Any]:
    """``git_commit`` and ``git_dirty`` of the checkout this code runs from (None when it
    is not a git checkout, e.g. an installed wheel)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD") if (repo / ".git").exists() else None
    dirty = None if commit is None else bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"git_commit": commit, "git_dirty": dirty}


def _gpu_meta() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {}
    props = torch.cuda.get_device_properties(0)
    driver = None
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        driver = done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "gpu": torch.cuda.get_device_name(0),
        "gpu_memory_bytes": int(props.total_memory),
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version(),
        "nvidia_driver": driver,
    }


def meta(device: str) -> dict[str, Any]:
    """The ``meta`` object of a run on ``device`` ('cpu' or 'gpu')."""
    import jax
    import torch

    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    from compare import __version__

    return {
        "schema_version": SCHEMA_VERSION,
        "compare_version": __version__,
        "python": platform.python_version(),
        **versions,
        "device": device,
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        **git_state(),
        "torch_num_threads": torch.get_num_threads(),
        "env": {name: os.environ.get(name) for name in ENV_VARS},
        "jax_config": {flag: _jsonable_flag(getattr(jax.config, flag, None)) for flag in JAX_FLAGS},
        **(_gpu_meta() if device == "gpu" else {}),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "-m", "compare.run", *sys.argv[1:]]),
    }


def _jsonable_flag(value: Any) -> Any:
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf/nan; keep them readable
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write(path: Path, results: dict[str, Any]) -> None:
    """Write ``results`` atomically: a reader (or a run stopped mid-write) never sees half a file."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(_jsonable(results), indent=2) + "\n")


def failures(results: dict[str, Any]) -> list[dict]:
    """Every record, in any suite, whose ``ok`` is False."""
    return [r for key, recs in results.items() if key != "meta" for r in recs if r.get("ok") is False]


def upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """A results object of an older schema in today's form: before schema 3 the spec
    suite's train-mode records sat in ``equivalence`` (``mode == "train"``); they have
    their own list, ``train_equivalence``, now."""
    trains = [r for r in data.get("equivalence", []) if isinstance(r, dict) and r.get("mode") == "train"]
    if trains:
        data["equivalence"] = [r for r in data["equivalence"] if not (isinstance(r, dict) and r.get("mode") == "train")]
        data["train_equivalence"] = [*data.get("train_equivalence", []), *trains]
        if not data["equivalence"]:
            del data["equivalence"]
    return data


def load(path: Path) -> dict[str, Any]:
    """A results.json written by :func:`write` (for ``--resume`` and the reports), validated
    against the record schema (``compare.io.results_file``: a ``ResultsFileError``, a
    ValueError, names the file and each problem), in today's form (:func:`upgrade`)."""
    return upgrade(results_file.read(path))


def resumed(folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The results in ``folder`` to continue, under this run's ``meta``: the old meta's
    entries stay (suites done, settings) unless this run sets them, and whether it
    stopped is for this run to say."""
    results_file.check_folder(folder)  # it is written again: no links or devices in it
    old = load(Path(folder) / "results.json")
    old_meta = {k: v for k, v in old["meta"].items() if k != "stopped"}
    return {**old, "meta": {**old_meta, **meta, "resumed_from": str(folder)}}


class Results:
    """The results of one run, kept on disk as they grow: :meth:`save` rewrites
    results.json and report.md atomically, so a run stopped at any moment leaves every
    suite and benchmark group it finished."""

    def __init__(self, out_dir: Path, data: dict[str, Any]):
        self.out_dir, self.data = Path(out_dir), data

    def merge(self, part: dict[str, Any]) -> None:
        """Add a runner's output: ``{"meta": {...}, "<suite>": [records], ...}``."""
        for key, value in part.items():
            if key == "meta":
                self.data["meta"].update(value)
            else:
                self.data.setdefault(key, []).extend(value)

    def add_suite(self, name: str, part: dict[str, Any], wall_s: float) -> None:
        """A suite's output merged, its wall time in ``meta.suite_wall_s``, the suite in
        ``meta.suites_done`` unless its output says ``complete: False``; then saved."""
        complete = part.pop("complete", True)
        self.merge(part)
        meta = self.data["meta"]
        meta.setdefault("suite_wall_s", {})[name] = round(wall_s, 1)
        if complete:
            meta["suites_done"] = [*meta.get("suites_done", []), name]
        self.save()

    def save(self) -> None:
        from compare.report import markdown

        self.out_dir.mkdir(parents=True, exist_ok=True)
        write(self.out_dir / "results.json", self.data)
        with atomic_path(self.out_dir / "report.md") as tmp:
            tmp.write_text(markdown.render(self.data, self.out_dir))
