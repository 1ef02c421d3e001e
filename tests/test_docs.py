"""The pages under docs/ are true to the code: their examples run, their tables are the
code's own, the outputs they show are what the code prints."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PORTING = (ROOT / "docs" / "porting_by_hand.md").read_text()


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _between(text: str, name: str) -> str:
    return re.search(rf"<!-- BEGIN {name}.*?-->\n(.*?)<!-- END {name} -->", text, flags=re.S).group(1)


def _run(block: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "docs/porting_by_hand.md", "exec"), {"__name__": "docs_example"})
    return out.getvalue()


def test_the_registry_example_of_the_porting_page_runs_and_its_checks_pass():
    _run(next(b for b in _python_blocks(PORTING) if "torch_to_linen(state_dict, spec)" in b))


def test_the_linen_and_nnx_twin_example_runs_and_its_checks_pass():
    _run(next(b for b in _python_blocks(PORTING) if "class NnxNet" in b))


def test_the_divergence_report_shown_is_what_the_wrong_twin_example_prints():
    """Layers, order, the arrow and the verdicts exactly; the numbers to two digits of the
    exponent's order (the last digits depend on the machine's float32 kernels)."""
    printed = _run(next(b for b in _python_blocks(PORTING) if "class WrongTwin" in b)).strip().splitlines()
    shown = _between(PORTING, "report output").strip().strip("`").strip().splitlines()
    assert len(printed) == len(shown)
    for got, want in zip(printed, shown, strict=True):
        got_cells, want_cells = got.split(), want.split()
        assert [c for c in got_cells if not re.fullmatch(r"[\d.e+-]+", c)] == [
            c for c in want_cells if not re.fullmatch(r"[\d.e+-]+", c)
        ]
        got_numbers = [float(c) for c in got_cells if re.fullmatch(r"\d\.\d\de[+-]\d\d", c)]
        want_numbers = [float(c) for c in want_cells if re.fullmatch(r"\d\.\d\de[+-]\d\d", c)]
        for g, w in zip(got_numbers, want_numbers, strict=True):
            assert g == pytest.approx(w, rel=0.9) if w < 1e-4 else g == pytest.approx(w, rel=0.2)


def test_every_generated_block_of_the_docs_is_up_to_date():
    """README.md and docs/*.md state no number by hand: each block is written by
    ``python -m compare.report.docs`` from a committed results.json or the code (the input
    rules of the registry, the benchmark, the suite durations, ...)."""
    from compare.report import docs

    assert docs.rewrite(ROOT, check=True) == []


def test_a_float64_port_matches_torch_in_float64_to_1e_12():
    """``float_dtype=np.float64`` with jax's x64: the same arithmetic up to rounding in the
    order of sums (measured 2e-15 on the resnet18_cifar's logits)."""
    import jax

    from compare import registry, transfer
    from compare.checks import equivalence
    from compare.conventions import nchw_to_nhwc

    spec = registry.get("resnet18_cifar").replace(width=8)
    model = spec.build_torch()
    equivalence.randomize_batchnorm(model, torch.randn(8, 3, 32, 32), seed=0)
    model = model.double().eval()
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32))
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    with jax.enable_x64(True):
        variables = transfer.torch_to_linen(model.state_dict(), spec, float_dtype=np.float64)
        got = np.asarray(spec.build_linen().apply(variables, nchw_to_nhwc(x), train=False))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_the_cli_page_names_every_option_of_every_command():
    """docs/cli.md documents each command with all of its options (taken from the parsers)."""
    import argparse

    from compare import convert, run
    from compare.port import __main__ as port_cli

    cli = (ROOT / "docs" / "cli.md").read_text()
    parsers = {"compare.run": None, "compare.convert": None, "compare.port": None}
    for name, main in (("compare.run", run.parse), ("compare.convert", convert.main), ("compare.port", port_cli.main)):
        captured = {}
        original = argparse.ArgumentParser.parse_args

        def grab(self, args=None, namespace=None, captured=captured):
            captured["parser"] = self
            raise SystemExit(0)

        argparse.ArgumentParser.parse_args = grab
        try:
            main([])
        except SystemExit:
            pass
        finally:
            argparse.ArgumentParser.parse_args = original
        parsers[name] = captured["parser"]
    for name, parser in parsers.items():
        assert f"python -m {name}" in cli
        options = {o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
        missing = sorted(o for o in options if f"`{o}" not in cli and f"{o} " not in cli and f"[{o}" not in cli)
        assert not missing, f"{name}: {missing} not in docs/cli.md"


def test_every_relative_link_of_the_readme_and_the_docs_resolves():
    pages = [ROOT / "README.md", ROOT / "SEMANTICS.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        prose = re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", page.read_text(), flags=re.S))  # code is not links
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", prose):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_the_one_call_example_of_the_automatic_porting_page_prints_the_module_shown():
    page = (ROOT / "docs" / "porting.md").read_text()
    example = _python_blocks(page)[0]
    shown = re.findall(r"```text\n(.*?)```", page, flags=re.S)[0]
    printed = _run(example)
    assert printed.splitlines()[0] == "1"  # the running statistics moved
    assert shown.strip() in printed  # the forward on the page is the one generated
