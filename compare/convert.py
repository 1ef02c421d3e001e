"""``python -m compare.convert SRC DST [--model NAME]``: torch weights <-> Flax weights.

* torch -> Flax: SRC is ``.pt``/``.pth`` (read with ``torch.load(weights_only=True)``) or
  ``.safetensors``; DST is a Flax ``.safetensors`` whose header names the model and its
  configuration. ``--model`` (a registry name) is required: a state_dict does not say
  which architecture it is for. Every key and shape is validated against it.
* Flax -> torch: SRC is such a Flax file (it knows its model; ``--model``, if given,
  must agree); DST is ``.safetensors`` or ``.pt``.

Examples::

    python -m compare.convert resnet18.pth resnet18_flax.safetensors --model resnet18
    python -m compare.convert resnet18_flax.safetensors back.safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from compare import registry, transfer
from compare.io import checkpoint, convert


def _problems(error: Exception) -> list[str]:
    """The error as lines: a TransferError's first line, then one line per problem."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines or [type(error).__name__]


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 converted, 2 bad input (the file, its content or the arguments),
    1 anything else (a bug: ``--debug`` shows the traceback)."""
    parser = argparse.ArgumentParser(prog="python -m compare.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--model", help=f"registry name: {', '.join(registry.NAMES)}")
    parser.add_argument("--allow-nonfinite", action="store_true", help="keep NaN/Inf values instead of refusing them")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    if args.dst.exists() and args.src.exists() and args.src.resolve() == args.dst.resolve():
        print(f"error: {args.src} and {args.dst} are the same file: the source would be replaced", file=sys.stderr)
        return 2
    try:
        if args.src.suffix == ".safetensors" and checkpoint.is_flax_file(args.src):
            print(convert.flax_file_to_torch(args.src, args.dst, args.model, allow_nonfinite=args.allow_nonfinite))
        else:
            if not args.model:
                parser.error("--model is required for a torch source: a state_dict does not name its architecture")
            print(convert.torch_file_to_flax(args.src, args.dst, args.model, allow_nonfinite=args.allow_nonfinite))
    except (checkpoint.CheckpointError, transfer.TransferError, KeyError) as e:
        if args.debug:
            raise
        for line in _problems(e):
            print(f"error: {line}" if not line.startswith("  ") else line, file=sys.stderr)
        return 2
    except Exception as e:
        if args.debug:
            raise
        print(
            f"error: {args.src} -> {args.dst} failed: {type(e).__name__}: {_problems(e)[0]} (--debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
