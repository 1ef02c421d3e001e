"""``python -m compare.convert SRC DST [--model NAME]``: torch weights <-> Flax weights.

* torch -> Flax: SRC is ``.pt``/``.pth`` (a ``torch.save`` file, read by this project's own
  parser, which builds tensors and plain containers only) or ``.safetensors``; DST is a Flax
  ``.safetensors`` whose header names the model and its configuration. ``--model`` (a
  registry name) is required: a state_dict does not say which architecture it is for.
  Every key and shape is validated against it.
* Flax -> torch: SRC is such a Flax file (it knows its model; ``--model``, if given,
  must agree); DST is ``.safetensors`` or ``.pt``.

Examples::

    python -m compare.convert resnet18.pth resnet18_flax.safetensors --model resnet18
    python -m compare.convert resnet18_flax.safetensors back.safetensors
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from compare import registry, transfer
from compare.io import checkpoint, convert, limits


def _lines(error: Exception) -> list[str]:
    """The error for the terminal: one line, or a TransferError's first line and its first
    problems with how many more; every character that could drive the terminal escaped."""
    if isinstance(error, transfer.TransferError):
        shown = limits.limit("MAX_ERRORS_SHOWN")
        lines = [f"error: {limits.printable(str(error).splitlines()[0], 2000)}"]
        lines += [f"  - {limits.printable(p, 500)}" for p in error.problems[:shown]]
        if len(error.problems) > shown:
            lines.append(f"  ... and {len(error.problems) - shown:,} more")
        return lines + ([f"  {limits.printable(error.hint, 500)}"] if error.hint else [])
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return [f"error: {limits.printable(text, 4000)}"]


def _same_file(src: Path, dst: Path) -> bool:
    try:
        a, b = os.stat(src), os.stat(dst)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 converted, 2 bad input (the file, its content, the destination or the
    arguments: one error naming the file), 1 anything else (a bug: ``--debug`` shows the
    traceback)."""
    parser = argparse.ArgumentParser(prog="python -m compare.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--model", help=f"registry name: {', '.join(registry.NAMES)}")
    parser.add_argument("--allow-nonfinite", action="store_true", help="keep NaN/Inf values instead of refusing them")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    if _same_file(args.src, args.dst):
        print(f"error: {limits.printable(args.src)} and {limits.printable(args.dst)} are the same file: "
              "the source would be replaced", file=sys.stderr)  # fmt: skip
        return 2
    try:
        if args.src.suffix == ".safetensors" and checkpoint.read_metadata(args.src).get("format") == checkpoint.FORMAT:
            done = convert.flax_file_to_torch(args.src, args.dst, args.model, allow_nonfinite=args.allow_nonfinite)
        else:
            if not args.model:
                parser.error("--model is required for a torch source: a state_dict does not name its architecture")
            done = convert.torch_file_to_flax(args.src, args.dst, args.model, allow_nonfinite=args.allow_nonfinite)
    except (limits.InputError, transfer.TransferError, KeyError, OSError) as e:
        if args.debug:
            raise
        print("\n".join(_lines(e)), file=sys.stderr)
        return 2
    except Exception as e:
        if args.debug:
            raise
        where = f"{limits.printable(args.src)} -> {limits.printable(args.dst)}"
        print(f"error: {where} failed: {type(e).__name__}: {_lines(e)[0][7:]} (--debug for the traceback)",
              file=sys.stderr)  # fmt: skip
        return 1
    print(limits.printable(done, 4000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
