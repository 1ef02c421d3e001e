"""The limits on untrusted input: every file this project reads is checked against them
*before* anything is allocated or any model is built, and a file past a limit is refused
with an error that names the file, the limit and what the file declared.

What is trusted and what is not (README, "Threat model"): the installed packages and the
command line are trusted; every file read (weights, training checkpoints, datasets) is
not. A file cannot run code (safetensors; ``torch.load(weights_only=True)``; a CIFAR
unpickler that builds numpy arrays only), and with these limits it cannot make a reader
allocate more than it declares and the file can back, or build a model of absurd size.
"""

from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import bnconfig

GiB = 1 << 30

# safetensors and .pt weights
MAX_HEADER_BYTES = 16 << 20  # a safetensors JSON header (resnet152 needs ~80 KB)
MAX_TENSORS = 10_000  # entries in one weights file
MAX_TENSOR_ELEMENTS = 1 << 31  # elements of one tensor
MAX_TOTAL_BYTES = 16 * GiB  # the data of one weights file, declared or decompressed
MAX_COMPRESSION_RATIO = 20  # of a .pt archive's entries (torch.save stores them uncompressed)

# model configurations read from a file's header
MAX_STAGES = 8  # ResNet stages
MAX_BLOCKS = 64  # blocks in one ResNet stage
MAX_HIDDEN_LAYERS = 64  # MLP hidden layers, CNN conv blocks
MAX_WIDTH = 1 << 16  # features or channels of one layer
MAX_CLASSES = 1 << 20
MAX_IMAGE_SIDE = 4096
MAX_SAMPLE_ELEMENTS = 1 << 26  # elements of one input sample (input_shape)

# datasets
MAX_DATASET_BYTES = 4 * GiB  # one decompressed IDX file or CIFAR batch

SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip  # the dtypes of weights; float8 and complex are refused


class LimitError(ValueError):
    """An input past one of the limits of this module, or malformed in a way checked here."""


def safetensors_header(path: Path) -> dict[str, Any]:
    """The parsed, validated JSON header of a safetensors file, read without its data:
    length field within the file and :data:`MAX_HEADER_BYTES`, a JSON object, string
    metadata, known dtypes, shapes of non-negative ints within :data:`MAX_TENSOR_ELEMENTS`,
    byte ranges that match the shapes and lie inside the file, :data:`MAX_TENSORS` and
    :data:`MAX_TOTAL_BYTES`."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LimitError(f"{size} bytes: too short for a safetensors header")
        n = int.from_bytes(head, "little")
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise LimitError(f"the header declares {n} bytes; the file has {size - 8} after the length field")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise LimitError(f"the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise LimitError(f"the header is a JSON {type(header).__name__}, expected an object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise LimitError("__metadata__ must map strings to strings")
    if len(header) > MAX_TENSORS:
        raise LimitError(f"{len(header)} tensors, more than the limit of {MAX_TENSORS}")
    problems, total, data_bytes = [], 0, size - 8 - n
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            problems.append(f"{name!r}: expected {{dtype, shape, data_offsets}}")
            continue
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            problems.append(f"{name!r}: dtype {dtype!r} is not one of {sorted(SAFETENSORS_DTYPES)}")
            continue
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            problems.append(f"{name!r}: shape {shape!r} is not a list of non-negative ints")
            continue
        elements = math.prod(shape)
        if elements > MAX_TENSOR_ELEMENTS:
            problems.append(f"{name!r}: {elements} elements, more than the limit of {MAX_TENSOR_ELEMENTS}")
            continue
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            problems.append(f"{name!r}: data_offsets {offsets!r} is not two ints")
            continue
        begin, end = offsets
        if not 0 <= begin <= end <= data_bytes or end - begin != elements * SAFETENSORS_DTYPES[dtype]:
            problems.append(f"{name!r}: bytes [{begin}, {end}) do not hold {shape} {dtype} inside the file's data")
            continue
        total += end - begin
    if problems:
        raise LimitError("; ".join(problems))
    if total > MAX_TOTAL_BYTES:
        raise LimitError(f"{total} bytes of tensors, more than the limit of {MAX_TOTAL_BYTES}")
    return {"__metadata__": meta, **header}


def torch_archive(path: Path) -> bool:
    """A ``.pt`` zip archive's declared sizes, before ``torch.load`` reads it: the data
    within :data:`MAX_TOTAL_BYTES` and no entry compressed more than
    :data:`MAX_COMPRESSION_RATIO` times (a zip bomb). Returns whether the file is a zip
    archive; legacy (non-zip) files pass here and are bounded by torch's own reader."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except Exception as e:  # a damaged archive fails in many ways (BadZipFile, a name that is not UTF-8, ...)
        raise LimitError(f"not a readable zip archive ({type(e).__name__}: {e})") from None
    total = sum(i.file_size for i in infos)
    if total > MAX_TOTAL_BYTES:
        raise LimitError(f"the archive unpacks to {total} bytes, more than the limit of {MAX_TOTAL_BYTES}")
    for i in infos:
        if i.file_size > MAX_COMPRESSION_RATIO * max(i.compress_size, 1) and i.file_size > 1 << 20:
            raise LimitError(
                f"entry {i.filename!r} unpacks {i.compress_size} bytes to {i.file_size}: "
                f"more than {MAX_COMPRESSION_RATIO}x (torch.save does not compress)"
            )
    return True


def tensor_problems(name: Any, tensor: Any) -> list[str]:
    """What makes a loaded torch value unfit as a weight: a non-string key, not a tensor,
    sparse/quantized/meta/float8/complex tensors, and views larger than their storage
    (a stride-0 view would allocate its full size when copied)."""
    import torch

    if not isinstance(name, str):
        return [f"key {name!r} is a {type(name).__name__}, expected a string"]
    if not isinstance(tensor, torch.Tensor):
        return [f"{name!r} is a {type(tensor).__name__}, expected a tensor"]
    if tensor.layout != torch.strided or tensor.is_quantized or tensor.is_meta:
        return [f"{name!r}: a {tensor.layout} {'quantized ' if tensor.is_quantized else ''}tensor on {tensor.device}"]
    allowed = {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32, torch.uint8}
    if tensor.dtype not in allowed:
        return [f"{name!r}: dtype {tensor.dtype} is not a weight dtype"]
    if tensor.numel() > MAX_TENSOR_ELEMENTS:
        return [f"{name!r}: {tensor.numel()} elements, more than the limit of {MAX_TENSOR_ELEMENTS}"]
    storage_elements = tensor.untyped_storage().nbytes() // max(tensor.element_size(), 1)
    if tensor.numel() > storage_elements:
        return [f"{name!r}: a view of {tensor.numel()} elements over a storage of {storage_elements}"]
    return []


CAPS = bnconfig.Caps(
    width=MAX_WIDTH,
    blocks=MAX_BLOCKS,
    stages=MAX_STAGES,
    hidden_layers=MAX_HIDDEN_LAYERS,
    image_side=MAX_IMAGE_SIDE,
    sample_elements=MAX_SAMPLE_ELEMENTS,
    classes=MAX_CLASSES,
)


def config_problems(kind: str, fields: Mapping[str, Any], input_shape: Any) -> list[str]:
    """The sizes of a model configuration read from a file, checked before the config or
    any model is built (a 276-byte header must not describe a 30,000-block ResNet). Each
    kind says which of its fields are sizes (``bnconfig``'s ``size_problems``)."""
    problems = []
    if not (isinstance(input_shape, list) and 1 <= len(input_shape) <= 3):
        problems.append(f"input_shape = {input_shape!r}: expected a list of 1 to 3 ints")
    elif not all(type(v) is int and 1 <= v <= MAX_SAMPLE_ELEMENTS for v in input_shape):
        problems.append(f"input_shape = {input_shape!r}: expected ints in [1, {MAX_SAMPLE_ELEMENTS}]")
    elif math.prod(input_shape) > MAX_SAMPLE_ELEMENTS:
        problems.append(f"input_shape = {input_shape}: more than {MAX_SAMPLE_ELEMENTS} elements per sample")
    if kind not in bnconfig.KINDS:
        return [*problems, f"config_type {kind!r}: known kinds are {', '.join(bnconfig.KINDS)}"]
    return problems + bnconfig.KINDS[kind].size_problems(fields, CAPS)
