"""``python -m compare.port PACKAGE.MODULE:FACTORY --input-shape 1,3,224,224 --out DIR``:
a torch network as a Flax module you can keep.

Writes into DIR:

* ``<name>.py``: the generated linen or NNX module (formatted with ruff when it is
  installed); it imports ``jax``, ``flax`` and ``flaxbn`` only;
* ``<name>.safetensors``: its weights (flat keys ``params/...``, ``batch_stats/...``),
  loaded with ``flaxbn.ported.load_linen(path)`` / ``flaxbn.ported.load_nnx(Class, path)``;
* ``report.md`` and ``report.json``: the eval check (torch against the written file,
  imported on its own, with its weights loaded as documented), and with ``--train`` one
  train step with injected masks.

Exit status: 0 ported and checked, 1 a check failed, 2 the network or the arguments
cannot be ported (every unsupported node is listed).

Examples::

    python -m compare.port torchvision.models:resnet18 --input-shape 2,3,224,224 --out ported/
    python -m compare.port torchvision.models:mobilenet_v3_small --args '{"num_classes": 10}' \
        --input-shape 2,3,64,64 --api nnx --out ported/ --train
    python -m compare.port mypkg.nets:build --args '{"width": 32}' --weights trained.pt --input-shape 8,3,32,32 --out ported/
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from compare.checks import ported as checks
from compare.io import checkpoint
from compare.io.files import WriteError, atomic_path
from compare.port import PortError, port
from flaxbn import ported as flax_ported

FORMAT = "compare.port/flax-weights/1"


def _progress(message: str, start: float) -> None:
    print(f"[{time.monotonic() - start:6.1f} s] {message}", file=sys.stderr, flush=True)


def build(factory: str, args: str | None) -> torch.nn.Module:
    """``PACKAGE.MODULE:NAME`` called with ``args`` (JSON: an object of keyword arguments or a list)."""
    module_name, _, attr = factory.partition(":")
    if not module_name or not attr:
        raise ValueError(f"expected PACKAGE.MODULE:FACTORY, got {factory!r}")
    fn = getattr(importlib.import_module(module_name), attr)
    given = json.loads(args) if args else {}
    model = fn(*given) if isinstance(given, list) else fn(**given)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{factory} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _format(source: str) -> tuple[str, bool]:
    """The source through ``ruff format`` when ruff is installed (same semantics, its layout)."""
    ruff = [sys.executable, "-m", "ruff"] if importlib.util.find_spec("ruff") else None
    ruff = ruff or ([shutil.which("ruff")] if shutil.which("ruff") else None)
    if ruff is None:
        return source, False
    done = subprocess.run([*ruff, "format", "--line-length", "120", "-"], input=source, capture_output=True, text=True)
    return (done.stdout, True) if done.returncode == 0 else (source, False)


def check_written(path: Path, weights: Path, class_name: str, api: str, x: np.ndarray, ported) -> np.ndarray:
    """The written file imported on its own, its weights loaded by the documented
    functions, run in eval mode on ``x``; returns its output in torch's layout."""
    spec = importlib.util.spec_from_file_location(f"compare_port_written_{class_name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cls = getattr(module, class_name)
    xf = ported.flax_input(x)
    with ported.x64():
        if api == "linen":
            out = cls().apply(flax_ported.load_linen(weights), xf)
        else:
            model = flax_ported.load_nnx(cls, weights)
            model.eval()
            out = model(xf)
    return ported.torch_output(out, ported.generated.outputs["eval"])


def _report(records: dict, path: Path) -> str:
    """report.md: one row per check."""
    lines = [
        "# compare.port report",
        "",
        "| check | api | dtype | max abs diff | max rel diff | bound | vs float64 (rel) | torch's own float32 (rel) | ok |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in records.items():
        if "tol" in r:
            own = f"{r['vs_float64_rel']:.3g} | {r['torch_own_rel']:.3g}" if "torch_own_rel" in r else "| "
            lines.append(
                f"| {name} | {r['flax_api']} | {r['dtype']} | {r['max_abs_diff']:.3g} | {r['max_rel_diff']:.3g}"
                f" | {r['tol']:.3g} | {own} | {r['ok']} |"
            )
        else:
            failed = [k for k, v in r["checks"].items() if not v]
            lines.append(
                f"| {name} | | | output {r['out_max_rel_diff']:.3g}; gradients {r['grad_max_rel_diff']:.3g};"
                f" statistics {r['stats_max_rel_diff']:.3g}; SGD step {r['step_max_rel_diff']:.3g} (all relative) | | | | |"
                f" {r['ok']}{' ' + str(failed) if failed else ''} |"
            )
    text = "\n".join(lines) + "\n"
    _write_text(path, text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compare.port", description=__doc__.split("\n\n")[0])
    parser.add_argument("factory", help="PACKAGE.MODULE:FACTORY, a function or class that returns the torch network")
    parser.add_argument("--args", help="the factory's arguments as JSON: an object (keywords) or a list")
    parser.add_argument("--input-shape", required=True, help="the example input, comma-separated: 1,3,224,224")
    parser.add_argument("--api", choices=["linen", "nnx"], default="linen")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write into (created)")
    parser.add_argument("--name", help="file and class name (default: the network's class name)")
    parser.add_argument("--weights", type=Path, help="a torch state_dict to load first (.pt/.pth/.safetensors)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--train", action="store_true", help="also check one train step with injected masks")
    parser.add_argument("--seed", type=int, default=0, help="torch's seed before the factory runs, and the input's")
    args = parser.parse_args(argv)
    try:
        return _main(args)
    except WriteError as e:  # a destination refused (a link, a device): nothing written through it
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    start = time.monotonic()
    try:
        shape = tuple(int(s) for s in args.input_shape.split(","))
        _progress(f"building {args.factory}({args.args or ''})", start)
        torch.manual_seed(args.seed)  # a factory's random initialisation is the same for the same seed
        model = build(args.factory, args.args)
        if args.weights:
            model.load_state_dict(checkpoint.read_torch_state_dict(args.weights))
        model = model.double() if args.dtype == "float64" else model.float()
        x = np.random.default_rng(args.seed).standard_normal(shape).astype(args.dtype)
        _progress(f"tracing {type(model).__name__} in eval and train mode, generating {args.api} code", start)
        ported = port(model.eval(), x, args.api, seed=args.seed, name=args.name)
    except (PortError, ValueError, ImportError, AttributeError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = ported.generated.class_name
    args.out.mkdir(parents=True, exist_ok=True)
    source, formatted = _format(ported.source)
    source_path, weights_path = args.out / f"{name.lower()}.py", args.out / f"{name.lower()}.safetensors"
    _write_text(source_path, source)
    metadata = {"format": FORMAT, "class": ported.generated.class_name, "api": args.api, "factory": args.factory}
    checkpoint.write_arrays(weights_path, ported.flat(), {**metadata, "input_shape": json.dumps(list(shape))})
    _progress(
        f"wrote {source_path} ({'ruff-formatted' if formatted else 'ruff not found: unformatted'}), {weights_path}",
        start,
    )
    if ported.unused:
        _progress(f"not read by forward (left out): {', '.join(ported.unused)}", start)
    _progress("checking the written file against torch in eval mode", start)
    records = {"eval": checks.check_eval(ported, x, name=name)}
    written = check_written(source_path, weights_path, ported.generated.class_name, args.api, x, ported)
    records["eval_written_file"] = checks.check_eval(ported, x, name=name, got=written)
    if args.train:
        _progress("checking one train step with injected masks", start)
        records["train"] = {
            k: v for k, v in checks.check_train(ported, x, seed=args.seed).items() if k != "grad_rel_diff"
        }
    _write_text(args.out / "report.json", json.dumps(records, indent=2, default=str) + "\n")
    print(_report(records, args.out / "report.md"), end="")
    ok = all(r["ok"] for r in records.values())
    _progress("done" if ok else "a check failed", start)
    return 0 if ok else 1


def _write_text(path: Path, text: str) -> None:
    """``text`` at ``path``, atomically; a link or a device there is refused, not written through."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
