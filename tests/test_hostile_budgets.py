"""The issue's budgets, measured: for one file of each class of hostile input, every reader
and command runs in a child process whose address space may grow by only twice the file's
bytes plus 256 MiB past the process at rest (after a warm-up read of each format), and
must answer with the project's error naming the file (or a result its file backs) within
10 s + 1 s per 10 MB of CPU time. A MemoryError, a kill or a raw exception fails."""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import torch
from conftest import random_state_dict
from test_hostile_pickles import call, dct, g, lst, n, odict, program, pt_archive, s, tensor, tup

from compare import registry, transfer
from compare.io import checkpoint, train_state
from compare.records import SCHEMA_VERSION

ROOT = Path(__file__).resolve().parents[1]
MLP = registry.get("mlp").replace(in_features=6, hidden=(8,), num_classes=3)


def _idx(dims: tuple[int, ...], payload: bytes = b"") -> bytes:
    return bytes([0, 0, 0x08, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + payload


def _bombs(folder: Path) -> dict[str, tuple[str, Path]]:
    """{class: (reader, file)}: one file per class of the issue (the cases are new ones)."""
    out: dict[str, tuple[str, Path]] = {}

    def put(name: str, reader: str, raw: bytes) -> None:
        (folder / name).write_bytes(raw)
        out[name] = (reader, folder / name)

    # checks that look at another thing than is loaded
    small = pt_archive(program(dct((s("w"), tensor("0", 4, (4,), (1,))))), {"0": bytes(16)})
    big = pt_archive(program(dct((s("w"), tensor("0", 1 << 29, (1 << 29,), (1,))))), {"0": bytes(16)})
    put("two_directories.pt", "pt", small + big + b"\0" * (1 << 20))
    edit = (
        odict((s("w"), tensor("0", 1, (1,), (1,))))
        + b"q\x000h\x00("
        + s("x")
        + tensor("0", 1, (50_000, 50_000), (0, 0))
        + b"u"
    )
    put("edited_after_the_check.pt", "pt", pt_archive(program(edit), {"0": bytes(4)}))
    # work that grows faster than the input
    put("tuple_key_40_deep.pt", "pt", pt_archive(program(dct((n(0) + b"q\x00h\x00\x86" * 40, n(1)))), {}))
    put("frozenset_keys.pt", "pt", program(b"}(" + b"\x8f(" + n(1) + b"\x90\x91" + n(1) + b"u"))
    put("two_million_opcodes.pt", "pt", pt_archive(program(lst(*[b"N"] * 2_000_000)), {}))
    put("legacy_huge_storage.pt", "pt", _legacy_huge())
    labels = (b"C\x06labels", lst())
    ndarray = call(g("numpy", "ndarray"), tup(n(40_000), n(40_000)), call(g("numpy", "dtype"), s("O8")))
    put("cifar_object_array", "cifar", program(dct((b"C\x04data", ndarray), labels)))
    shaped = call(
        g("numpy.core.multiarray", "_reconstruct"), g("numpy", "ndarray"), tup(n(500_000), n(3072)), b"C\x01b"
    )
    put("cifar_declared_shape", "cifar", program(dct((b"C\x04data", shaped), labels)) + bytes(200_000))
    member = gzip.compress(bytes(1 << 20), 9)  # 1 MiB of zeros in ~1 KB; 1000 members inflate to 1 GiB
    put("idx_gzip_1000x.gz", "idx", gzip.compress(_idx((1 << 30, 1, 1))) + member * 1000)
    put("idx_declares_4_billion.gz", "idx", gzip.compress(_idx((0xFFFF, 0xFFFF, 0xFFFF))))
    put("header_two_million_values.safetensors", "safetensors", _header(b"[" + b"0," * 2_100_000 + b"0]"))
    put("header_nested.safetensors", "safetensors", _header(b'{"a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"))
    put(
        "shape_past_its_bytes.safetensors",
        "safetensors",
        _header(
            json.dumps({"w": {"dtype": "F64", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 8]}}).encode(), bytes(8)
        ),
    )
    # --resume and training checkpoints
    put("results_nested.json", "results", b'{"meta": {"x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}}")
    put(
        "results_huge_list.json",
        "results",
        b'{"meta": {"schema_version": %d}, "spec": [' % SCHEMA_VERSION + b"{}," * 1_900_000 + b"{}]}",
    )
    put("results_many_bad_records.json", "results", b'{"meta": {}, "spec": [' + b"{}," * 990_000 + b"{}]}")
    train_state.save_torch(
        folder / "t.safetensors", MLP, MLP.build_torch(), torch.optim.SGD(MLP.build_torch().parameters(), lr=0.1), 0
    )
    arrays, header = checkpoint.read_arrays(folder / "t.safetensors")
    checkpoint.write_arrays(
        folder / "huge_model.safetensors",
        arrays,
        {**header, **checkpoint.spec_metadata(MLP.replace(hidden=(1 << 16,) * 64))},
    )
    out["huge_model.safetensors"] = ("train", folder / "huge_model.safetensors")
    flat = transfer.torch_to_flat(random_state_dict(MLP), MLP)
    deep = registry.get("resnet18").replace(layers=(48,) * 8, width=1, num_classes=2, stem="cifar")
    checkpoint.write_arrays(
        folder / "deep_header.safetensors", flat, {"format": checkpoint.FORMAT, **checkpoint.spec_metadata(deep)}
    )
    out["deep_header.safetensors"] = ("flax", folder / "deep_header.safetensors")
    for name, changes in {
        "input_shape_of_a_billion.safetensors": {"input_shape": "[1000000000]"},
        "resnet_of_30000_blocks.safetensors": {**checkpoint.spec_metadata(deep), "config": json.dumps({**json.loads(checkpoint.spec_metadata(deep)["config"]), "layers": [30000, 2]})},
    }.items():  # fmt: skip
        checkpoint.write_arrays(
            folder / name, flat, {"format": checkpoint.FORMAT, **checkpoint.spec_metadata(MLP), **changes}
        )
        out[name] = ("flax", folder / name)
    plain = pt_archive(program(dct((s("w"), tensor("0", 64 << 20, (64 << 20,), (1,))))), {"0": bytes(256 << 20)})
    with (
        zipfile.ZipFile(io.BytesIO(plain)) as src,
        zipfile.ZipFile(folder / "deflated.pt", "w", zipfile.ZIP_DEFLATED) as dst,
    ):
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    out["deflated.pt"] = ("pt", folder / "deflated.pt")
    return out


def _header(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def _legacy_huge() -> bytes:
    """The legacy format's pickles, declaring a storage of 2**40 floats over 16 bytes."""
    body = dct((s("w"), call(g("torch._utils", "_rebuild_tensor_v2"),
                             tup(s("storage"), g("torch", "FloatStorage"), s("1"), s("cpu"), n(1 << 40), b"N") + b"Q",
                             n(0), tup(n(1 << 40)), tup(n(1)), b"\x89", odict())))  # fmt: skip
    parts = [program(n(0x1950A86A20F9469CFC6C)), program(n(1001)), program(dct((s("little_endian"), b"\x88"))),
             program(body), program(lst(s("1")))]  # fmt: skip
    return b"".join(parts) + struct.pack("<q", 1 << 40) + bytes(16)


CHILD = textwrap.dedent(
    """
    import json, resource, sys, time, warnings
    from pathlib import Path
    warnings.simplefilter("ignore")
    from compare import transfer, convert
    from compare.io import checkpoint, datasets, limits, train_state
    from compare.report import results

    def flax(p):  # what the converter does with a Flax file
        flat, spec = checkpoint.read_flax(p)
        return transfer.flat_to_torch(flat, spec)

    readers = {"pt": checkpoint.read_torch_state_dict, "safetensors": checkpoint.read_torch_state_dict,
               "cifar": datasets.read_cifar_batch, "idx": datasets.read_idx, "results": results.load,
               "train": train_state.load_torch, "flax": flax}
    bombs, warm = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    for reader, path in warm:  # every reader once on a valid file: lazy imports and caches are loaded
        readers[reader](Path(path))
    rest = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))
    biggest = max(Path(p).stat().st_size for _, p in bombs.values())
    budget = rest + 2 * biggest + (256 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (budget, budget))
    out = {}
    for name, (reader, path) in bombs.items():
        t0 = time.process_time()
        try:
            readers[reader](Path(path))
            out[name] = ["read", "", time.process_time() - t0]
        except Exception as e:
            out[name] = [type(e).__name__, str(e)[:400], time.process_time() - t0]
    print(json.dumps(out))
    """
)


def test_every_class_of_hostile_file_is_answered_within_the_memory_and_time_budgets(tmp_path):
    bombs = _bombs(tmp_path)
    warm_dir = tmp_path / "valid"
    warm_dir.mkdir()
    sd = random_state_dict(MLP)
    torch.save(sd, warm_dir / "w.pt")
    checkpoint.write_torch_state_dict(sd, warm_dir / "w.safetensors")
    checkpoint.write_flax(transfer.torch_to_flat(sd, MLP), MLP, warm_dir / "f.safetensors")
    (warm_dir / "batch").write_bytes(
        __import__("pickle").dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [1]})
    )
    (warm_dir / "i.gz").write_bytes(gzip.compress(_idx((2,), b"\1\2")))
    (warm_dir / "results.json").write_text(json.dumps({"meta": {"schema_version": SCHEMA_VERSION}}))
    warm = [("pt", warm_dir / "w.pt"), ("safetensors", warm_dir / "w.safetensors"), ("cifar", warm_dir / "batch"),
            ("idx", warm_dir / "i.gz"), ("results", warm_dir / "results.json"), ("train", tmp_path / "t.safetensors"),
            ("flax", warm_dir / "f.safetensors")]  # fmt: skip
    args = [json.dumps({k: [r, str(p)] for k, (r, p) in bombs.items()}), json.dumps([[r, str(p)] for r, p in warm])]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answers = json.loads(done.stdout.strip().splitlines()[-1])
    for name, (_, path) in bombs.items():
        kind, message, seconds = answers[name]
        assert kind in ("CheckpointError", "DataError", "ResultsFileError"), (name, kind, message)
        assert path.name in message and message.isprintable(), (name, message)
        assert seconds < 10 + path.stat().st_size / 10e6, (name, seconds)
