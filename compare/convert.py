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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compare.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--model", help=f"registry name: {', '.join(registry.NAMES)}")
    parser.add_argument("--allow-nonfinite", action="store_true", help="keep NaN/Inf values instead of refusing them")
    args = parser.parse_args(argv)
    try:
        if args.src.suffix == ".safetensors" and checkpoint.is_flax_file(args.src):
            print(convert.flax_file_to_torch(args.src, args.dst, args.model, allow_nonfinite=args.allow_nonfinite))
        else:
            if not args.model:
                parser.error("--model is required for a torch source: a state_dict does not name its architecture")
            print(convert.torch_file_to_flax(args.src, args.dst, args.model, allow_nonfinite=args.allow_nonfinite))
    except (checkpoint.CheckpointError, transfer.TransferError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
