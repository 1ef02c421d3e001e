"""``python -m compare.run``: results.json, report.md and the exit status."""

from __future__ import annotations

import json

from compare import run
from compare.checks import suites, tolerances

META_FIELDS = {"python", "numpy", "torch", "jax", "jaxlib", "flax", "optax", "device", "device_name", "date", "command"}
EQUIVALENCE_FIELDS = {"model", "flax_api", "mode", "dtype", "max_abs_diff", "max_rel_diff", "tol", "ok"}


def test_equivalence_suite_writes_an_ok_record_per_model_and_api_and_exits_zero(tmp_path):
    assert run.main(["--suite", "equivalence", "--device", "cpu", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert META_FIELDS <= set(results["meta"])
    records = results["equivalence"]
    assert {(r["model"], r["flax_api"], r["dtype"]) for r in records} == {
        (m, a, d)
        for m in ["mlp", "cnn", "resnet18", "resnet18_cifar"]
        for a in ["linen", "nnx"]
        for d in ["float32", "bfloat16"]
    }
    for r in records:
        assert EQUIVALENCE_FIELDS <= set(r) and r["ok"] and r["mode"] == "eval"
    report = (tmp_path / "report.md").read_text()
    assert "| resnet18_cifar | nnx | eval | float32 |" in report


def test_a_failing_check_makes_the_exit_status_non_zero_and_the_report_shows_the_layer(tmp_path, monkeypatch):
    monkeypatch.setattr(suites, "QUICK_MODELS", ["mlp"])
    monkeypatch.setitem(tolerances.TOLERANCES, "eval.mlp", tolerances.Tolerance(0.0, 0.0, "none: every check fails"))
    assert run.main(["--suite", "equivalence", "--device", "cpu", "--out", str(tmp_path)]) == 1
    report = (tmp_path / "report.md").read_text()
    assert "**FAIL**" in report and "first divergence at" in report
