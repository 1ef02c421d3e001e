"""``python -m compare.port``: the generated file, its weights and the eval check's
report; the file imported on its own (a fresh interpreter that never imports torch or
``compare``), with its weights loaded by the documented functions, gives torch's output."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from compare.port import __main__ as cli

ROOT = Path(__file__).resolve().parents[1]
FACTORY = "port_nets:MobileNetV3"
RUN_ALONE = """
import json, sys
import numpy as np
sys.path[:0] = [sys.argv[1]]
import jax, flaxbn.ported as P
results = {}
for api, folder in (("linen", sys.argv[2]), ("nnx", sys.argv[3])):
    sys.path.insert(0, folder)
    module = __import__("mobilenetv3")
    sys.modules.pop("mobilenetv3")
    sys.path.pop(0)
    x = np.load(folder + "/x.npy")
    if api == "linen":
        y = module.MobileNetV3().apply(P.load_linen(folder + "/mobilenetv3.safetensors"), x)
    else:
        model = P.load_nnx(module.MobileNetV3, folder + "/mobilenetv3.safetensors")
        model.eval()
        y = model(x)
    results[api] = np.asarray(y).tolist()
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "compare", "torchbn"))
print(json.dumps({"results": results, "imported": bad}))
"""


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = {}
    for api in ("linen", "nnx"):
        folder = tmp_path_factory.mktemp(api)
        assert cli.main([FACTORY, "--input-shape", "2,3,16,16", "--api", api, "--out", str(folder)]) == 0
        out[api] = folder
    return out


def test_it_writes_the_module_its_weights_and_the_report(written):
    for api, folder in written.items():
        assert sorted(p.name for p in folder.iterdir()) == [
            "mobilenetv3.py",
            "mobilenetv3.safetensors",
            "report.json",
            "report.md",
        ]
        report = json.loads((folder / "report.json").read_text())
        assert report["eval"]["ok"] and report["eval_written_file"]["ok"] and report["eval"]["flax_api"] == api
        assert "| eval_written_file |" in (folder / "report.md").read_text()


def test_the_generated_file_is_ruff_formatted_and_imports_only_jax_flax_and_flaxbn(written):
    for folder in written.values():
        path = folder / "mobilenetv3.py"
        done = subprocess.run([sys.executable, "-m", "ruff", "format", "--check", "--line-length", "120", str(path)])
        assert done.returncode == 0
        tree = ast.parse(path.read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert imported <= {"jax", "flax", "flaxbn"}, imported


def test_the_file_imported_on_its_own_with_its_weights_gives_torchs_output(written):
    sys.path.insert(0, str(ROOT / "tests"))
    import port_nets

    torch.manual_seed(0)  # --seed 0: the command line built the factory's network with these weights
    model = port_nets.MobileNetV3().eval()
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    for folder in written.values():
        np.save(folder / "x.npy", x.transpose(0, 2, 3, 1))  # (N, C, H, W) -> (N, H, W, C), the module's input
    done = subprocess.run(
        [sys.executable, "-c", RUN_ALONE, str(ROOT), str(written["linen"]), str(written["nnx"])],
        capture_output=True,
        text=True,
        cwd=written["linen"],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["imported"] == []  # no torch, no compare: the file and flaxbn alone
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    for api in ("linen", "nnx"):
        np.testing.assert_allclose(np.array(result["results"][api]), want, rtol=1e-5, atol=1e-4)  # eval.port's bound


def test_a_network_it_cannot_port_exits_2_with_every_unsupported_node(tmp_path, capsys):
    assert cli.main(["port_nets:WithUpsample", "--input-shape", "1,3,8,8", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "module Upsample at 'up'" in err and "indexing or slicing a tensor" in err and "port_nets.py:" in err
    assert cli.main(["port_nets", "--input-shape", "1,3,8,8", "--out", str(tmp_path)]) == 2
    assert "expected PACKAGE.MODULE:FACTORY" in capsys.readouterr().err


def test_a_failed_check_exits_1(tmp_path, monkeypatch):
    real = cli.checks.check_eval
    monkeypatch.setattr(cli.checks, "check_eval", lambda *a, **k: {**real(*a, **k), "ok": False})
    assert cli.main([FACTORY, "--input-shape", "2,3,16,16", "--out", str(tmp_path)]) == 1


def test_it_loads_given_torch_weights_and_checks_a_train_step(tmp_path):
    import port_nets

    torch.manual_seed(1)
    weights = port_nets.MobileNetV3().state_dict()
    torch.save(weights, tmp_path / "trained.pt")
    argv = [
        FACTORY,
        "--input-shape",
        "4,3,16,16",
        "--weights",
        str(tmp_path / "trained.pt"),
        "--train",
        "--out",
        str(tmp_path / "o"),
    ]
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["train"]["ok"] and report["train"]["checks"]["trace"]
