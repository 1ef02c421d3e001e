"""The pickled formats (``torch.save`` files and CIFAR batches) against structured hostile
input: pickles assembled opcode by opcode (hostile keys, globals, calls, states, persistent
ids, tensor views, sharing through the memo) and zip archives altered record by record.
Whatever is generated, the reader returns tensors its file backs or raises the project's
error naming the file, within the time budget, and no payload ever runs. One test per
class of the issue, then the property tests."""

from __future__ import annotations

import io
import pickle
import struct
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compare.experiments import data
from compare.experiments.data import DataError
from compare.io import checkpoint, limits
from compare.io.checkpoint import CheckpointError

FAST = settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))

# --- a pickle assembler ---------------------------------------------------------------------------


def s(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


def n(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if -(1 << 31) <= value < 1 << 31:
        return b"J" + struct.pack("<i", value)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw if len(raw) < 256 else b"\x8b" + struct.pack("<i", len(raw)) + raw


def g(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def tup(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def lst(*items: bytes) -> bytes:
    return b"]" + (b"(" + b"".join(items) + b"e" if items else b"")


def dct(*pairs: tuple[bytes, bytes]) -> bytes:
    return b"}" + (b"(" + b"".join(k + v for k, v in pairs) + b"u" if pairs else b"")


def call(fn: bytes, *args: bytes) -> bytes:
    return fn + tup(*args) + b"R"


def odict(*pairs: tuple[bytes, bytes]) -> bytes:
    body = g("collections", "OrderedDict") + b")R"
    return body + (b"(" + b"".join(k + v for k, v in pairs) + b"u" if pairs else b"")


def storage(key: str, numel: int, kind: str = "FloatStorage") -> bytes:
    return tup(s("storage"), g("torch", kind), s(key), s("cpu"), n(numel)) + b"Q"


def tensor(key: str, numel: int, size: tuple, stride: tuple, offset: int = 0, kind: str = "FloatStorage") -> bytes:
    return call(
        g("torch._utils", "_rebuild_tensor_v2"),
        storage(key, numel, kind),
        n(offset),
        tup(*map(n, size)),
        tup(*map(n, stride)),
        b"\x89",
        odict(),
    )


def program(body: bytes, proto: int = 2) -> bytes:
    return b"\x80" + bytes([proto]) + body + b"."


def pt_archive(pkl: bytes, storages: dict[str, bytes], prefix: str = "archive") -> bytes:
    """A torch.save-style zip archive (stored entries) of a pickle and raw storages."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", pkl)
        z.writestr(f"{prefix}/byteorder", b"little")
        for key, raw in storages.items():
            z.writestr(f"{prefix}/data/{key}", raw)
        z.writestr(f"{prefix}/version", b"3\n")
    return out.getvalue()


def read_or_refuse(path: Path, seconds: float = 10.0):
    """The reader's answer: a state_dict its file backs, or CheckpointError naming the file
    in one printable line; within the time budget (CPU time, 2 shared cores)."""
    t0 = time.process_time()
    try:
        sd = checkpoint.read_torch_state_dict(path)
    except CheckpointError as e:
        text = str(e)
        assert path.name in text and text.isprintable(), text
        result = e
    else:
        assert all(isinstance(v, torch.Tensor) for v in sd.values())
        total = sum(v.numel() * v.element_size() for v in sd.values())
        assert total <= limits.memory_budget(path.stat().st_size)
        result = sd
    budget = 10 + path.stat().st_size / 10e6
    assert time.process_time() - t0 < min(seconds, budget)
    return result


# --- one test per class ----------------------------------------------------------------------------


def test_a_real_torch_save_file_reads_back_exactly(tmp_path):
    """zip and legacy, protocols 2 and 4, views, parameters, bfloat16, a full checkpoint."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    sd = net.state_dict()
    sd_views = {
        "t": torch.arange(12.0).reshape(3, 4).t(),
        "p": torch.nn.Parameter(torch.ones(2)),
        "b": torch.ones(3, dtype=torch.bfloat16),
    }
    for name, obj, kwargs in [
        ("zip", sd, {}),
        ("legacy", sd, {"_use_new_zipfile_serialization": False}),
        ("proto4", sd_views, {"pickle_protocol": 4}),
        ("full", {"epoch": 3, "state_dict": sd, "optimizer": torch.optim.Adam(net.parameters()).state_dict()}, {}),
    ]:
        torch.save(obj, tmp_path / f"{name}.pt", **kwargs)
        got = checkpoint.read_torch_state_dict(tmp_path / f"{name}.pt")
        want = obj.get("state_dict", obj)
        assert got.keys() == want.keys(), name
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k].detach()), (name, k)


def test_two_central_directories_cannot_show_the_check_one_thing_and_the_load_another(tmp_path):
    """The archive a zip tool sees first and the one at the end differ: one parse reads
    one of them, and what it reads is what it checks (no size comes from elsewhere)."""
    small = pt_archive(program(dct((s("w"), tensor("0", 4, (4,), (1,))))), {"0": bytes(16)})
    big = pt_archive(program(dct((s("w"), tensor("0", 1 << 28, (1 << 28,), (1,))))), {"0": bytes(16)})
    path = tmp_path / "twice.pt"
    path.write_bytes(small + big)  # the end record of `big` is last; its directory's offsets point into `small`
    assert isinstance(read_or_refuse(path), CheckpointError)
    path.write_bytes(big[:-22] + small[-22:])  # an end record that names another directory
    assert isinstance(read_or_refuse(path), CheckpointError)


def test_what_is_checked_is_what_is_returned_even_when_the_pickle_edits_its_dict_afterwards(tmp_path):
    """A dict built, memoised and then given a stride-0 40000x40000 view through the memo:
    the final object is the one checked (the OrderedDict redirection class)."""
    body = odict((s("w"), tensor("0", 1, (1,), (1,)))) + b"q\x00" + b"0"  # BINPUT 0, POP
    body += b"h\x00" + b"(" + s("evil") + tensor("0", 1, (40_000, 40_000), (0, 0)) + b"u"  # BINGET 0, SETITEMS
    path = tmp_path / "edited.pt"
    path.write_bytes(pt_archive(program(body), {"0": bytes(4)}))
    error = read_or_refuse(path)
    assert isinstance(error, CheckpointError) and "a view of 1600000000 elements over a storage of 1" in str(error)


@pytest.mark.parametrize(
    "key, fragment",
    [
        (b")", "a tuple"),
        (b"G" + struct.pack(">d", 1.5), "a float"),
        (n(1 << 40), "an int outside"),
        (b"\x88", "a bool"),
        (b"C\x03abc", "a bytes"),
    ],
    ids=["tuple", "float", "huge_int", "bool", "bytes"],
)
def test_keys_that_are_not_plain_strings_or_small_ints_are_refused_before_they_are_hashed(tmp_path, key, fragment):
    path = tmp_path / "keys.pt"
    path.write_bytes(pt_archive(program(dct((key, n(1)))), {}))
    error = read_or_refuse(path, seconds=2)
    assert isinstance(error, CheckpointError) and fragment in str(error)


def test_a_tuple_key_nested_40_deep_does_not_hang(tmp_path):
    """207 bytes: a tuple (x, x) nested 40 deep through the memo; hashing it would take
    2**40 steps. It is refused by its type, before any hash."""
    nested = n(0) + (b"q\x00" + b"h\x00" + b"\x86") * 40  # BINPUT 0, BINGET 0, TUPLE2
    path = tmp_path / "hash.pt"
    path.write_bytes(pt_archive(program(dct((nested, n(1)))), {}))
    t0 = time.process_time()
    assert isinstance(read_or_refuse(path, seconds=2), CheckpointError)
    assert time.process_time() - t0 < 1.0


def test_sets_classes_and_foreign_globals_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    payloads = {
        "system": call(g("posix", "system"), s(f"touch {marker}")),
        "builtins_eval": call(g("builtins", "eval"), s(f"open({str(marker)!r}, 'w')")),
        "stack_global": s("posix") + s("system") + b"\x93" + tup(s(f"touch {marker}")) + b"R",
        "numpy": call(g("numpy.core.multiarray", "_reconstruct"), g("numpy", "ndarray"), tup(n(0)), b"C\x01b"),
        "set": b"\x8f(" + n(1) + b"\x90",
        "inst": b"(" + s(f"touch {marker}") + b"iposix\nsystem\n",
        "newobj": g("builtins", "object") + b")\x81",
        "ext": b"\x82\x01",
        "build_on_a_tensor": tensor("0", 1, (1,), (1,)) + dct((s("__class__"), n(1))) + b"b",
    }
    for name, body in payloads.items():
        path = tmp_path / f"{name}.pt"
        path.write_bytes(pt_archive(program(dct((s("w"), body)), proto=4), {"0": bytes(4)}))
        assert isinstance(read_or_refuse(path), CheckpointError), name
        path.write_bytes(program(body))  # also as a bare (legacy-looking) pickle
        assert isinstance(read_or_refuse(path), CheckpointError), name
    assert not marker.exists()


@pytest.mark.parametrize(
    "case",
    ["declared_numel_past_the_entry", "view_past_its_storage", "missing_storage_entry", "object_dtype_v3"],
)
def test_declared_sizes_the_archive_cannot_back_are_refused_before_anything_is_allocated(tmp_path, case):
    bodies = {
        "declared_numel_past_the_entry": tensor("0", 10**12, (10**6, 10**6), (10**6, 1)),
        "view_past_its_storage": tensor("0", 4, (4,), (1,), offset=2),
        "missing_storage_entry": tensor("9", 4, (4,), (1,)),
        "object_dtype_v3": call(
            g("torch._utils", "_rebuild_tensor_v3"),
            storage("0", 16, "UntypedStorage").replace(g("torch", "UntypedStorage"), g("torch.storage", "UntypedStorage")),
            n(0), tup(n(2)), tup(n(1)), b"\x89", odict(), g("numpy", "object_"),
        ),
    }  # fmt: skip
    path = tmp_path / f"{case}.pt"
    path.write_bytes(pt_archive(program(dct((s("w"), bodies[case]))), {"0": bytes(16)}))
    assert isinstance(read_or_refuse(path, seconds=2), CheckpointError)


def test_many_views_of_one_storage_cannot_multiply_its_bytes(tmp_path):
    """10,000 names for full views of one 1 MB storage would be 10 GB once copied."""
    pairs = [(s(f"w{i}"), b"h\x01" if i else tensor("0", 1 << 18, (1 << 18,), (1,)) + b"q\x01") for i in range(10_000)]
    path = tmp_path / "views.pt"
    path.write_bytes(pt_archive(program(dct(*pairs)), {"0": bytes(1 << 20)}))
    error = read_or_refuse(path)
    assert isinstance(error, CheckpointError) and "MEMORY_SLACK_BYTES" in str(error)


def test_the_pickle_step_budget_is_named_with_how_to_raise_it(tmp_path, monkeypatch):
    path = tmp_path / "long.pt"
    path.write_bytes(pt_archive(program(lst(*[n(1)] * 2000)), {}))
    monkeypatch.setenv("BN_PARITY_MAX_PICKLE_STEPS", "1000")
    error = read_or_refuse(path)
    assert "MAX_PICKLE_STEPS" in str(error) and "BN_PARITY_MAX_PICKLE_STEPS" in str(error)


@pytest.mark.parametrize("damage", ["comment", "zip64_disks", "compressed", "overlap", "crc", "local_name", "offset"])
def test_a_zip_archive_that_is_not_exactly_what_torch_save_writes_is_refused(tmp_path, damage):
    good = pt_archive(program(dct((s("w"), tensor("0", 4, (4,), (1,))))), {"0": bytes(16)})
    raw = bytearray(good)
    cd = struct.unpack_from("<I", raw, len(raw) - 6)[0]
    if damage == "comment":
        raw[-2:] = b"\x03\x00"
        raw += b"abc"
    elif damage == "zip64_disks":
        raw[-22:-22] = (
            b"PK\x06\x06"
            + struct.pack("<QHHIIQQQQ", 44, 45, 45, 0, 0, 4, 4, 0, 0)
            + b"PK\x06\x07"
            + struct.pack("<IQI", 0, len(good) - 22, 7)
        )
    elif damage == "compressed":
        raw[cd + 10 : cd + 12] = b"\x08\x00"
    elif damage == "overlap":
        second = raw.index(b"PK\x01\x02", cd + 4)
        raw[second + 42 : second + 46] = raw[cd + 42 : cd + 46]
    elif damage == "crc":
        raw[cd + 16] ^= 1
    elif damage == "local_name":
        raw[30] ^= 1
    else:
        struct.pack_into("<I", raw, len(raw) - 6, cd + 1)
    path = tmp_path / f"{damage}.pt"
    path.write_bytes(bytes(raw))
    assert isinstance(read_or_refuse(path), CheckpointError)


def test_cifar_arrays_are_built_only_over_the_bytes_the_file_holds(tmp_path):
    """numpy's own constructors are never called: _reconstruct with a declared shape, an
    object dtype, and six batches each declaring 500000x3072 over a few bytes."""
    reconstruct = g("numpy.core.multiarray", "_reconstruct")
    cases = {
        "declared_shape": call(reconstruct, g("numpy", "ndarray"), tup(n(100_000), n(3072)), b"C\x01b"),
        "object_dtype": call(g("numpy", "dtype"), s("O8"), b"\x89", b"\x88"),
        "ndarray_call": call(g("numpy", "ndarray"), tup(n(500_000), n(3072))),
        "state_larger_than_bytes": call(reconstruct, g("numpy", "ndarray"), tup(n(0)), b"C\x01b")
        + tup(
            n(1), tup(n(500_000), n(3072)), call(g("numpy", "dtype"), s("u1"), b"\x89", b"\x88"), b"\x89", b"C\x04abcd"
        )
        + b"b",
    }
    for name, array in cases.items():
        path = tmp_path / name
        path.write_bytes(program(dct((b"C\x04data", array), (b"C\x06labels", lst(n(0))))))
        t0 = time.process_time()
        with pytest.raises(DataError, match=name):
            data.read_cifar_batch(path)
        assert time.process_time() - t0 < 1


def test_cifar_labels_of_any_size_give_a_clear_error(tmp_path):
    """A label of 2**80 used to raise OverflowError when converted."""
    for label in (10, -1, 1 << 80, 1 << 40000):
        path = tmp_path / "batch"
        path.write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [label]}, protocol=2))
        with pytest.raises(DataError, match=r"batch: labels from .* expected 0 to 9"):
            data.read_cifar_batch(path)


def test_a_real_cifar_batch_of_protocols_2_to_5_reads(tmp_path):
    batch = {b"batch_label": b"x", b"data": np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072), b"labels": [3, 9]}
    for proto in (2, 3, 4, 5):
        (tmp_path / "b").write_bytes(pickle.dumps(batch, protocol=proto))
        x, y = data.read_cifar_batch(tmp_path / "b")
        assert x.shape == (2, 3, 32, 32) and y.tolist() == [3, 9] and int(x[1, 2, 31, 31]) == (2 * 3072 - 1) % 256


# --- structured generators ----------------------------------------------------------------------

DANGEROUS = [("posix", "system"), ("builtins", "eval"), ("builtins", "getattr"), ("os", "remove"),
             ("subprocess", "Popen"), ("numpy", "load"), ("torch", "load"), ("torch._utils", "_rebuild_qtensor"),
             ("torch._utils", "_rebuild_sparse_tensor"), ("torch", "Tensor"), ("collections", "OrderedDict"),
             ("torch", "FloatStorage"), ("torch", "Size"), ("_codecs", "encode"), ("torch", "device")]  # fmt: skip
sizes = st.integers(0, 6) | st.sampled_from([1 << 20, 1 << 31, 1 << 47, 1 << 62, -1])
keys = st.one_of(
    st.text(max_size=8).map(s),
    st.integers(-(1 << 70), 1 << 70).map(n),
    st.just(b"G" + struct.pack(">d", float("nan"))),
    st.binary(max_size=4).map(lambda b: b"C" + bytes([len(b)]) + b),
    st.recursive(st.just(n(0)), lambda inner: st.tuples(inner, inner).map(lambda t: tup(*t)), max_leaves=12),
)
leaves = st.one_of(
    st.integers(-(1 << 70), 1 << 70).map(n),
    st.text(max_size=6).map(s),
    st.just(b"N"),
    st.builds(
        tensor,
        st.sampled_from(["0", "1", "x", "0" * 50]),
        sizes,
        st.lists(sizes, max_size=3).map(tuple),
        st.lists(sizes, max_size=3).map(tuple),
        sizes,
        st.sampled_from(["FloatStorage", "LongStorage", "ComplexFloatStorage", "QInt8Storage", "Storage"]),
    ),
    st.sampled_from(DANGEROUS).map(lambda m: g(*m)),
)


def _branch(inner):
    return st.one_of(
        st.lists(inner, max_size=4).map(lambda xs: tup(*xs)),
        st.lists(inner, max_size=4).map(lambda xs: lst(*xs)),
        st.lists(st.tuples(keys, inner), max_size=4).map(lambda ps: dct(*ps)),
        st.lists(st.tuples(st.text(max_size=4).map(s), inner), max_size=4).map(lambda ps: odict(*ps)),
        st.tuples(st.sampled_from(DANGEROUS).map(lambda m: g(*m)), st.lists(inner, max_size=3)).map(
            lambda t: call(t[0], *t[1])
        ),
        st.tuples(inner, inner).map(lambda t: t[0] + t[1] + b"b"),  # BUILD
        st.tuples(inner, st.integers(0, 3)).map(lambda t: t[0] + b"q" + bytes([t[1]])),  # BINPUT
        st.integers(0, 3).map(lambda i: b"h" + bytes([i])),  # BINGET (maybe of nothing)
        st.lists(inner, max_size=3).map(lambda xs: b"\x8f(" + b"".join(xs) + b"\x90"),  # a set
    )


objects = st.recursive(leaves, _branch, max_leaves=20)


@pytest.fixture
def fresh(tmp_path_factory):
    return lambda name: tmp_path_factory.mktemp("hostile") / name


@FAST
@given(
    body=objects,
    top=st.booleans(),
    proto=st.sampled_from([2, 4]),
    stored=st.dictionaries(st.sampled_from(["0", "1", "x"]), st.integers(0, 64).map(bytes), max_size=3),
    cut=st.integers(0, 3),
)
def test_generated_pickles_in_an_archive_give_tensors_the_file_backs_or_a_clear_error(
    fresh, body, top, proto, stored, cut
):
    pkl = program(dct((s("w"), body)) if top else body, proto)
    raw = pt_archive(pkl[: len(pkl) - cut] if cut < len(pkl) else pkl, stored)
    path = fresh("gen.pt")
    path.write_bytes(raw)
    read_or_refuse(path)


ZIP_EDITS = st.tuples(st.sampled_from(["set_u32", "set_u16", "insert", "truncate", "duplicate_tail"]),
                      st.floats(0, 1), st.integers(0, (1 << 32) - 1), st.binary(min_size=1, max_size=64))  # fmt: skip


@FAST
@given(edits=st.lists(ZIP_EDITS, min_size=1, max_size=3))
def test_structurally_altered_archives_give_tensors_the_file_backs_or_a_clear_error(fresh, edits):
    raw = bytearray(pt_archive(program(dct((s("w"), tensor("0", 4, (2, 2), (2, 1))))), {"0": bytes(16)}))
    records = [i for i in range(len(raw) - 4) if raw[i : i + 2] == b"PK"]
    for how, where, value, extra in edits:
        at = records[int(where * (len(records) - 1))] + int(where * 40) % 30 if records else 0
        at = min(at, max(len(raw) - 4, 0))
        if how.startswith("set") and len(raw) < at + 4:
            continue
        if how == "set_u32":
            struct.pack_into("<I", raw, at, value)
        elif how == "set_u16":
            struct.pack_into("<H", raw, at, value & 0xFFFF)
        elif how == "insert":
            raw[at:at] = extra
        elif how == "truncate":
            del raw[at:]
        else:
            raw += raw[-(value % 200 + 22) :]
    path = fresh("edited.pt")
    path.write_bytes(bytes(raw))
    read_or_refuse(path)


@FAST
@given(data_obj=objects, labels=objects)
def test_generated_cifar_pickles_give_arrays_the_file_backs_or_a_clear_error(fresh, data_obj, labels):
    path = fresh("batch")
    path.write_bytes(program(dct((b"C\x04data", data_obj), (b"C\x06labels", labels))))
    t0 = time.process_time()
    try:
        x, y = data.read_cifar_batch(path)
    except DataError as e:
        assert "batch" in str(e) and str(e).isprintable(), str(e)
    else:
        assert x.nbytes <= path.stat().st_size and x.dtype == np.uint8 and len(y) == len(x)
    assert time.process_time() - t0 < 10


def test_the_zip_checksum_is_the_one_zlib_computes(tmp_path):
    """The archive helper above writes what zipfile writes: the reader's CRC check agrees."""
    raw = pt_archive(program(dct((s("w"), tensor("0", 4, (4,), (1,))))), {"0": bytes(range(16))})
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        assert z.getinfo("archive/data/0").CRC == zlib.crc32(bytes(range(16)))
    (tmp_path / "ok.pt").write_bytes(raw)
    assert checkpoint.read_torch_state_dict(tmp_path / "ok.pt")["w"].shape == (4,)
