"""Figures a reader can trust: one colour per implementation in every panel and figure,
a legend that names them, no label cut off the canvas, bars where a sweep has one batch
size. Each figure is rendered here and its texts' extents compared with the canvas."""

from __future__ import annotations

import matplotlib.colors
import pytest

from compare.report.figures import bench, equivalence, style

IMPLS = ["jax-linen-jit", "jax-scan", "jax-nnx-split", "torch-eager", "torch-compile"]


def _records(batches: dict[str, tuple[int, ...]]) -> list[dict]:
    out = []
    for model, sizes in batches.items():
        for b in sizes:
            for k, impl in enumerate(IMPLS):
                sps = 1000.0 * b**0.5 * (1 + k) * (3 if model == "mlp" else 1)
                out.append({
                    "model": model, "dtype": "float32", "batch_size": b, "impl": impl, "device": "cpu",
                    "samples_per_s": sps, "step_ms_median": b / sps * 1e3, "compile_s": 0.1 * (k + 1),
                })  # fmt: skip
    return out


@pytest.fixture
def drawn(monkeypatch):
    """The figures as they are saved: every text checked against the canvas first."""
    figures = []

    def keep(fig, path):
        assert style.clipped_texts(fig) == [], f"{path.name}: cut off"
        figures.append(fig)
        return path

    for module in (bench, equivalence):
        monkeypatch.setattr(module, "save", keep)
    return figures


def _colours(fig) -> dict[str, set[str]]:
    """implementation -> the colours it is drawn in (bars by their tick label, lines by legend order)."""
    seen: dict[str, set[str]] = {}
    for ax in fig.axes:
        labels = [t.get_text() for t in ax.get_yticklabels()]
        for patch, label in zip(ax.patches, labels, strict=False):
            if label in IMPLS:
                seen.setdefault(label, set()).add(matplotlib.colors.to_hex(patch.get_facecolor()))
    for legend in fig.legends:
        for handle, text in zip(legend.legend_handles, legend.get_texts(), strict=True):
            seen.setdefault(text.get_text(), set()).add(matplotlib.colors.to_hex(handle.get_color()))
    return seen


@pytest.mark.parametrize("batches", [{"mlp": (256,), "cnn": (256,)}, {"mlp": (32, 256, 4096), "cnn": (32, 256)}])
def test_every_implementation_has_one_colour_in_every_panel_and_in_the_legend(drawn, tmp_path, batches):
    """0.2 coloured each panel on its own with one shared legend: the cnn's winner,
    torch-compile, was drawn in the colour the legend called jax-scan."""
    records = _records(batches)
    bench.throughput(records, tmp_path / "t.png")
    bench.compile_vs_steady(records, tmp_path / "c.png")
    for fig in drawn:
        for impl, colours in _colours(fig).items():
            assert colours == {style.impl_colour(impl)}, (impl, colours)
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        assert legend == sorted(IMPLS, key=lambda i: (not i.startswith("jax"), i))


def test_with_one_batch_size_throughput_is_bars_not_a_column_of_dots(drawn, tmp_path):
    bench.throughput(_records({"mlp": (256,)}), tmp_path / "t.png")
    [fig] = drawn
    assert len(fig.axes[0].patches) == len(IMPLS) and not fig.axes[0].lines


def test_the_speedup_figure_has_plain_ticks_and_marks_a_busy_group(drawn, tmp_path):
    records = _records({"mlp": (256,), "cnn": (256,)})
    for r in records:
        r["busy"] = r["model"] == "cnn"
    bench.speedup(records, tmp_path / "s.png")
    [fig] = drawn
    ax = fig.axes[0]
    assert not any("^" in t.get_text() for t in ax.get_xticklabels())  # "1", not "10^0"
    assert any("busy machine" in t.get_text() for t in ax.texts)
    assert {p.get_hatch() for p in ax.patches} == {"//", None}


def test_a_long_label_that_would_leave_the_canvas_is_found():
    """The check itself can fail: a text placed past the right edge is reported."""
    fig, ax = style.figure(figsize=(3, 2))
    ax.text(1.5, 0.5, "far away", transform=ax.transAxes)
    assert style.clipped_texts(fig) == ["far away"]


def test_the_divergence_figure_keeps_its_labels_on_the_canvas(drawn, tmp_path):
    rows = [
        {"model": m, "flax_api": a, "divergence_float32": [1e-7, 1e-5, 1e-2], "divergence_float64": [1e-15, 1e-14, 1e-14]}
        for m in ("mlp", "cnn") for a in ("linen", "nnx")
    ]  # fmt: skip
    equivalence.divergence(rows, tmp_path / "d.png")
    assert len(drawn) == 1
