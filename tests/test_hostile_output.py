"""What the converter prints can be trusted: names escaped (a crafted name cannot draw a
fake line or move the cursor), errors summarised (the first problems and a count), the
file named, and exit status 2 for every refused input, 1 only for a bug."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from conftest import random_state_dict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hostile_pickles import dct, objects, program, pt_archive, s, tensor

from compare import convert, registry, transfer
from compare.io import checkpoint, limits

MLP = registry.get("mlp")


def _convert(capsys, *argv: str) -> tuple[int, str, str]:
    status = convert.main(list(argv))
    out = capsys.readouterr()
    return status, out.out, out.err


def _clean(text: str) -> bool:
    return all(line.isprintable() for line in text.splitlines())


@pytest.mark.parametrize("fmt", [".pt", ".safetensors"])
def test_a_crafted_tensor_name_cannot_print_a_fake_line_or_drive_the_terminal(tmp_path, capsys, fmt):
    name = "fc1.weight\r\x1b[2K\x1b[32mconverted torch mlp -> Flax: ok\x1b[0m\n\u202e"
    sd = {**random_state_dict(MLP), name: torch.ones(1)}
    src = tmp_path / f"w{fmt}"
    if fmt == ".pt":
        torch.save(sd, src)
    else:
        checkpoint.write_torch_state_dict(sd, src)
    status, out, err = _convert(capsys, str(src), str(tmp_path / "f.safetensors"), "--model", "mlp")
    assert status == 2 and out == "" and _clean(err) and "\x1b" not in err and "\r" not in err
    assert err.count("\n") == 1 and f"w{fmt}" in err and "\\x1b[32mconverted" in err


def test_ten_thousand_problems_are_summarised_in_a_few_lines(tmp_path, capsys):
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(10_000)}
    raw = json.dumps(header).encode()
    (tmp_path / "empty.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    status, _, err = _convert(
        capsys, str(tmp_path / "empty.safetensors"), str(tmp_path / "f.safetensors"), "--model", "mlp"
    )
    lines = err.splitlines()
    assert status == 2 and len(lines) <= limits.MAX_ERRORS_SHOWN + 3, len(lines)
    assert "empty.safetensors" in lines[0] and "problem(s)" in lines[0] and lines[-1].startswith("  ... and ")


def test_a_flax_header_past_a_budget_is_answered_with_that_budget(tmp_path, capsys):
    raw = b'{"__metadata__": {"format": "%s"}, "x": ' % checkpoint.FORMAT.encode() + b"[" * 100 + b"]" * 100 + b"}"
    (tmp_path / "f.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    status, _, err = _convert(capsys, str(tmp_path / "f.safetensors"), str(tmp_path / "w.pt"))
    assert status == 2 and "MAX_JSON_DEPTH" in err and "--model is required" not in err


def test_a_transfer_error_names_the_file(tmp_path, capsys):
    src = tmp_path / "other.pt"
    checkpoint.write_torch_state_dict(random_state_dict(registry.get("cnn")), src)
    status, _, err = _convert(capsys, str(src), str(tmp_path / "f.safetensors"), "--model", "mlp")
    assert status == 2 and err.splitlines()[0].startswith(f"error: {src}: torch state_dict -> Flax 'mlp'")


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(body=objects, as_state_dict=st.booleans(), suffix=st.sampled_from([".pt", ".pth", ".safetensors"]))
def test_every_generated_input_converts_or_exits_2_with_a_clean_summary(
    tmp_path_factory, capsys, body, as_state_dict, suffix
):
    """Never status 1 (an unexpected exception) for a hostile file; never an unescaped line."""
    folder = tmp_path_factory.mktemp("cli")
    src = folder / f"src{suffix}"
    pkl = program(dct((s("fc1.weight"), tensor("0", 4, (2, 2), (2, 1))), (s("x"), body)) if as_state_dict else body)
    src.write_bytes(pt_archive(pkl, {"0": bytes(16)}) if suffix != ".safetensors" else pkl)
    status, out, err = _convert(capsys, str(src), str(folder / "dst.safetensors"), "--model", "mlp")
    assert status in (0, 2) and _clean(err) and _clean(out), err
    assert status == 0 or (src.name in err and len(err.splitlines()) <= limits.MAX_ERRORS_SHOWN + 3), err


def test_a_converted_file_still_prints_its_one_line(tmp_path, capsys):
    src = tmp_path / "m.pt"
    checkpoint.write_torch_state_dict(random_state_dict(MLP), src)
    status, out, _ = _convert(capsys, str(src), str(tmp_path / "f.safetensors"), "--model", "mlp")
    assert status == 0 and out.startswith("converted torch mlp") and out.count("\n") == 1
    assert (
        transfer.torch_to_flat(random_state_dict(MLP), MLP).keys()
        == checkpoint.read_flax(tmp_path / "f.safetensors")[0].keys()
    )
