"""Pickles read by this project's own unpickler: ``torch.save`` files (zip or legacy)
here, CIFAR's python batches in :mod:`compare.io.datasets`.

``torch.load(weights_only=True)`` runs no foreign code, but a check made beside it looks at
another thing than it loads, and it hashes any key and allocates any size a pickle
declares. This reader parses each file once, itself: the zip archive by
:func:`compare.io.files.zip_entries`; the pickle by :class:`Bounded` (a budget of steps,
keys checked before they are hashed, no sets, classes or extensions, a few stand-in
globals); a tensor is only a record of storage, dtype, offset, size and stride
(:class:`TensorRef`) until the state_dict is extracted and its sizes checked.
"""

from __future__ import annotations

import io
import math
import pickle
import re
import struct
from typing import Any, ClassVar, NamedTuple

import torch

from compare.io import limits
from compare.io.limits import LimitError

_REFUSED_OPS = {pickle.EMPTY_SET: "a set", pickle.ADDITEMS: "a set", pickle.FROZENSET: "a frozenset",
                pickle.PERSID: "a text persistent id", pickle.NEXT_BUFFER: "an out-of-band buffer",
                pickle.READONLY_BUFFER: "an out-of-band buffer",
                **dict.fromkeys([pickle.INST, pickle.OBJ, pickle.NEWOBJ, pickle.NEWOBJ_EX], "an instance"),
                **dict.fromkeys([pickle.EXT1, pickle.EXT2, pickle.EXT4], "an extension")}  # fmt: skip


class Refused(LimitError):
    """A pickle that wants to build something other than plain data and tensors."""


class _Call:
    """A global the pickle may call (with REDUCE): one of the reader's own functions."""

    def __init__(self, fn):
        self.fn = fn


def _counted(op):
    def step(self):
        self.steps_left -= 1
        if self.steps_left < 0:
            raise limits.BudgetError(limits.over(self.STEPS, limits.limit(self.STEPS) + 1, "pickle opcodes: at least"))
        op(self)

    return step


def _refuse(what: str):
    def op(self):
        raise Refused(f"the pickle wants to build {what}")

    return op


class Bounded(pickle._Unpickler):
    """The pure-Python unpickler with every step counted (:attr:`STEPS` is the budget's
    name), keys checked before they are hashed (:attr:`KEY_TYPES`), sets, classes and
    extensions refused, lengths checked against the bytes present, REDUCE limited to the
    callables :meth:`find_class` gives out and BUILD to :meth:`build`. Reads from memory
    (``bytes``), so that no declared length is allocated before it is read."""

    STEPS: ClassVar[str] = "MAX_PICKLE_STEPS"
    WHAT: ClassVar[str] = "plain data"
    KEY_TYPES: ClassVar[tuple[type, ...]] = (str, int)

    def __init__(self, stream: io.BytesIO, size: int, *, encoding: str = "ASCII"):
        super().__init__(stream, encoding=encoding)
        self.size, self.steps_left = size, limits.limit(self.STEPS)

    def find_class(self, module: str, name: str, why: str | None = None) -> Any:
        where = f"{limits.printable(module, 80)}.{limits.printable(name, 80)}{': ' + why if why else ''}"
        raise Refused(f"the pickle wants to build objects other than {self.WHAT} ({where})")

    def persistent_load(self, pid: Any) -> Any:
        raise Refused("the pickle refers to data outside itself")

    def build(self, inst: Any, state: Any) -> Any:
        raise Refused(f"the pickle sets the state of a {type(inst).__name__}")

    def _key(self, key: Any) -> Any:
        if type(key) in self.KEY_TYPES and (type(key) is not int or -(1 << 31) <= key < 1 << 31):
            return key
        kind = "an int outside [-2**31, 2**31)" if type(key) is int else f"a {type(key).__name__}"
        raise Refused(f"a dict key is {kind}; keys must be {' or '.join(t.__name__ for t in self.KEY_TYPES)}")

    def _top(self, kind: type) -> Any:
        if type(self.stack[-1]) is not kind:
            raise Refused(f"the pickle adds items to a {type(self.stack[-1]).__name__}")
        return self.stack[-1]

    def _items(self, items: list, target: dict) -> dict:
        if len(items) % 2:
            raise Refused("a dict of an odd number of items")
        for i in range(0, len(items), 2):
            target[self._key(items[i])] = items[i + 1]
        return target

    def load_dict(self):
        self.append(self._items(self.pop_mark(), {}))

    def load_setitem(self):
        value, key = self.stack.pop(), self.stack.pop()
        self._items([key, value], self._top(dict))

    def load_setitems(self):
        items = self.pop_mark()
        self._items(items, self._top(dict))

    def load_append(self):
        value = self.stack.pop()
        self._top(list).append(value)

    def load_appends(self):
        items = self.pop_mark()
        self._top(list).extend(items)

    def load_reduce(self):
        args, func = self.stack.pop(), self.stack[-1]
        if not isinstance(func, _Call) or type(args) is not tuple:
            raise Refused(f"the pickle calls a {type(func).__name__}")
        self.stack[-1] = func.fn(*args)

    def load_build(self):
        state = self.stack.pop()
        self.stack[-1] = self.build(self.stack[-1], state)

    def load_binpersid(self):
        self.append(self.persistent_load(self.stack.pop()))

    def load_bytearray8(self):
        (n,) = struct.unpack("<Q", self.read(8))
        if n > self.size:
            raise LimitError(f"the pickle declares {n:,} bytes; it has {self.size:,}")
        self.append(bytearray(self.read(n)))

    dispatch: ClassVar[dict] = {}


_OWN = {op[0]: getattr(Bounded, f"load_{name}") for op, name in [
    (pickle.DICT, "dict"), (pickle.SETITEM, "setitem"), (pickle.SETITEMS, "setitems"), (pickle.APPEND, "append"),
    (pickle.APPENDS, "appends"), (pickle.REDUCE, "reduce"), (pickle.BUILD, "build"), (pickle.BINPERSID, "binpersid"),
    (pickle.BYTEARRAY8, "bytearray8")]}  # fmt: skip
Bounded.dispatch = {
    op: _counted(_refuse(_REFUSED_OPS[bytes([op])]) if bytes([op]) in _REFUSED_OPS else _OWN.get(op, fn))
    for op, fn in pickle._Unpickler.dispatch.items()
}


def encode(text: Any, codec: Any = "latin1") -> bytes:
    """``_codecs.encode``, as protocol 2 writes bytes: only a string to latin1."""
    if not (type(text) is str and codec in ("latin1", "latin-1")):
        raise Refused("_codecs.encode of something other than a latin1 string")
    return text.encode("latin1")


def unpickle(unpickler: Bounded) -> Any:
    """``unpickler.load()``; any failure (a hostile pickle can fail in any way) a :class:`LimitError`."""
    try:
        return unpickler.load()
    except LimitError:
        raise
    except Exception as e:
        raise LimitError(f"not a readable pickle ({type(e).__name__}: {limits.printable(e, 200)})") from None


# --- torch.save files ------------------------------------------------------------------------

STORAGES = {f"{n}Storage": getattr(torch, d) for n, d in [
    ("Float", "float32"), ("Double", "float64"), ("Half", "float16"), ("BFloat16", "bfloat16"), ("Long", "int64"),
    ("Int", "int32"), ("Short", "int16"), ("Char", "int8"), ("Byte", "uint8"), ("Bool", "bool"),
    ("ComplexFloat", "complex64"), ("ComplexDouble", "complex128")]}  # fmt: skip
_TORCH_DTYPES = {name: v for name, v in vars(torch).items() if isinstance(v, torch.dtype)}  # (no lazy import)
WEIGHT_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32, torch.uint8}
_WHY = {"_rebuild_sparse_tensor": "a sparse tensor", "_rebuild_qtensor": "a quantized tensor",
        "_rebuild_nested_tensor": "a nested tensor", "_rebuild_meta_tensor_no_storage": "a meta tensor",
        "_rebuild_wrapper_subclass": "a tensor subclass", "_rebuild_from_type_v2": "a tensor subclass",
        "_rebuild_device_tensor_from_numpy": "a numpy array", "_reconstruct": "a numpy array"}  # fmt: skip


class StorageRef(NamedTuple):
    key: str
    dtype: torch.dtype  # torch.uint8 for an untyped storage
    nbytes: int  # -1: a typed storage's class, -2: UntypedStorage (before a persistent id names one)


class TensorRef(NamedTuple):
    """A tensor a pickle describes; nothing of its size is allocated."""

    storage: StorageRef
    dtype: torch.dtype
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    numel = property(lambda self: math.prod(self.size))
    nbytes = property(lambda self: math.prod(self.size) * self.dtype.itemsize)


def _ints(value: Any, what: str, *, length: int | None = None) -> tuple[int, ...]:
    if not (type(value) is tuple and len(value) <= 16 and all(type(v) is int and 0 <= v < 1 << 48 for v in value)):
        raise Refused(f"{what} is not a tuple of at most 16 ints in [0, 2**48)")
    if length is not None and len(value) != length:
        raise Refused(f"{what} has {len(value)} entries, the size {length}")
    return value


class TorchUnpickler(Bounded):
    """``torch.save``'s pickle, with tensors as :class:`TensorRef`; ``storage(key, dtype,
    nbytes)`` answers a persistent id (it checks the archive holds those bytes)."""

    WHAT: ClassVar[str] = "tensors"

    def __init__(self, stream: io.BytesIO, size: int, storage, *, legacy: bool = False):
        super().__init__(stream, size)
        self.storage, self.legacy, self.tensors, self.storages = storage, legacy, 0, {}

    def find_class(self, module: str, name: str) -> Any:
        calls = {
            ("collections", "OrderedDict"): self._ordered_dict, ("torch._utils", "_rebuild_tensor_v2"): self._tensor,
            ("torch._utils", "_rebuild_tensor"): self._tensor, ("torch._utils", "_rebuild_tensor_v3"): self._tensor_v3,
            ("torch._utils", "_rebuild_parameter"): self._parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): self._parameter,
            ("torch", "Size"): lambda size=(): _ints(size, "a torch.Size"), ("torch", "device"): self._device,
            ("_codecs", "encode"): encode,
        }  # fmt: skip
        if (module, name) in calls:
            return _Call(calls[module, name])
        if module == "torch" and name in STORAGES:
            return StorageRef("", STORAGES[name], -1)
        if (module, name) == ("torch.storage", "UntypedStorage"):
            return StorageRef("", torch.uint8, -2)
        if module == "torch" and name in _TORCH_DTYPES:
            return _TORCH_DTYPES[name]
        quantized = name.startswith("Q") and name.endswith("Storage")
        return super().find_class(module, name, _WHY.get(name) or ("a quantized tensor" if quantized else None))

    def persistent_load(self, pid: Any) -> StorageRef:
        if self.storage is None:
            return super().persistent_load(pid)
        n = 6 if self.legacy else 5
        if not (type(pid) is tuple and len(pid) == n and pid[0] == "storage" and isinstance(pid[1], StorageRef)):
            raise Refused("a persistent id that is not a storage")
        kind, key, location, numel = pid[1], pid[2], pid[3], pid[4]
        if not (type(key) is str and re.fullmatch(r"[0-9A-Za-z_]{1,40}", key)):
            raise Refused(f"storage key {limits.printable(repr(key), 60)}")
        if not (type(location) is str and len(location) <= 40 and type(numel) is int and 0 <= numel < 1 << 48):
            raise Refused(f"storage {key}: location and size are not a short string and an int")
        if self.legacy and pid[5] is not None:
            raise Refused(f"storage {key}: a storage view (torch < 1.0)")
        ref = StorageRef(key, kind.dtype, numel * (1 if kind.nbytes == -2 else kind.dtype.itemsize))
        if self.storages.setdefault(key, ref) != ref:
            raise Refused(f"storage {key} is declared twice, as {self.storages[key]} and {ref}")
        self.storage(ref)
        return ref

    def build(self, inst: Any, state: Any) -> Any:
        if type(inst) is dict and type(state) is dict:  # an OrderedDict's attributes (a state_dict's _metadata)
            return inst
        return super().build(inst, state)

    def _ordered_dict(self, *args) -> dict:
        if args:
            raise Refused("OrderedDict with arguments")
        return {}

    def _device(self, name: Any = "cpu", *_) -> str:
        if not (type(name) is str and len(name) <= 40):
            raise Refused("a device that is not a short string")
        return name

    def _parameter(self, data: Any, requires_grad: Any, hooks: Any, state: Any = None) -> TensorRef:
        if not isinstance(data, TensorRef) or hooks != {} or state not in (None, {}):
            raise Refused("a parameter that is not a plain tensor")
        return data

    def _tensor_v3(self, storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None) -> TensorRef:
        if not (isinstance(storage, StorageRef) and storage.dtype == torch.uint8 and isinstance(dtype, torch.dtype)):
            raise Refused("_rebuild_tensor_v3 without an untyped storage and a dtype")
        return self._tensor(storage, offset, size, stride, requires_grad, hooks, metadata, dtype=dtype)

    def _tensor(self, storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None, *, dtype=None):
        self.tensors += 1
        limits.check("MAX_PICKLE_TENSORS", self.tensors, "tensors in the pickle")
        if not isinstance(storage, StorageRef) or type(offset) is not int or not 0 <= offset < 1 << 48:
            raise Refused("a tensor without a storage and an offset")
        size, stride = _ints(size, "a tensor's size"), _ints(stride, "a tensor's stride", length=len(size))
        if type(requires_grad) is not bool or hooks not in (None, {}) or metadata not in (None, {}):
            raise Refused("a tensor with hooks or metadata")
        ref = TensorRef(storage, dtype or storage.dtype, offset, size, stride)
        if storage.nbytes % ref.dtype.itemsize:
            raise Refused(f"a {ref.dtype} tensor over a storage of {storage.nbytes} bytes")
        elements = storage.nbytes // ref.dtype.itemsize
        if ref.numel > elements:
            raise Refused(f"a view of {ref.numel} elements over a storage of {elements}")
        if ref.numel and offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) >= elements:
            raise Refused(f"a view reaching past its storage of {elements} elements")
        return ref
