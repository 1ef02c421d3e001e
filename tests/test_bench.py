"""The benchmark's machinery: FLOP counts, every implementation at tiny sizes, the same
result from scan and per-step jit, and no silent recompiles."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from compare import bench, registry
from compare.bench import flops, runners_jax, runners_torch

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "mlp": registry.get("mlp").replace(in_features=20, hidden=(32, 16)),
    "cnn": registry.get("cnn").replace(in_channels=2, image_size=8, channels=(4, 8), hidden=16),
}


def test_linear_flops_are_two_per_multiply_add():
    assert flops.linear_forward_flops(batch=4, n_in=10, n_out=3) == 2 * 4 * 10 * 3  # 240


def test_conv_flops_count_every_output_pixel_channel_and_kernel_tap():
    # N=2, 3 -> 4 channels, 3x3 kernel, 5x5 output: 2 * 2*5*5 * 4 * 3*3*3
    assert flops.conv_forward_flops(2, 3, 4, (3, 3), (5, 5)) == 10_800


def test_train_step_flops_are_three_forwards_less_the_first_layers_input_gradient():
    f = [
        flops.linear_forward_flops(8, 20, 32),
        flops.linear_forward_flops(8, 32, 16),
        flops.linear_forward_flops(8, 16, 10),
    ]
    assert [x for _, x in flops.forward_flops_per_layer(TINY["mlp"], 8)] == f
    assert flops.train_step_flops(TINY["mlp"], 8) == 3 * sum(f) - f[0]


def test_cnn_flops_follow_the_pooled_spatial_sizes():
    layers = dict(flops.forward_flops_per_layer(TINY["cnn"], 2))
    assert layers["conv1"] == flops.conv_forward_flops(2, 2, 4, (3, 3), (8, 8))
    assert layers["conv2"] == flops.conv_forward_flops(2, 4, 8, (3, 3), (4, 4))  # after one 2x2 pool
    assert layers["fc"] == flops.linear_forward_flops(2, 8 * 2 * 2, 16)


def test_analytic_count_agrees_with_xla_cost_analysis_for_the_mlp():
    """XLA also counts elementwise work (BN, ReLU, dropout, SGD): measured 0.850 vs 0.822
    GFLOP at batch 256, 3.4% more than the matmul count."""
    runner = runners_jax.LinenRunner(registry.get("mlp"), 256, "float32", "cpu")
    cost = runner.lowered().compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    ratio = cost["flops"] / flops.train_step_flops("mlp", 256)
    assert 1.0 <= ratio <= 1.05


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_every_implementation_runs_and_gives_complete_positive_finite_records(name):
    sweep = bench.Sweep({}, rounds=2, round_seconds=0.01)
    records = bench.bench_group(TINY[name], 8, "float32", "cpu", sweep, peak=1.0)
    assert {r["impl"] for r in records} == set(bench.all_implementations("cpu"))
    fields = ["step_ms_median", "step_ms_p10", "step_ms_p90", "samples_per_s", "compile_s", "tflops_per_s", "mfu"]
    for r in records:
        assert r["model"] == name and r["device"] == "cpu" and r["dtype"] == "float32" and r["batch_size"] == 8
        for f in fields:
            assert math.isfinite(r[f]) and r[f] > 0, (r["impl"], f, r[f])
        assert r["step_ms_p10"] <= r["step_ms_median"] <= r["step_ms_p90"]
        assert r["peak_mem_bytes"] is None or r["peak_mem_bytes"] >= 0


def test_bfloat16_mixed_precision_runs_in_every_implementation():
    """On GPU the sweep runs bf16 too; here the code path is checked (torch autocast on CPU)."""
    records = bench.bench_group(
        TINY["mlp"], 8, "bfloat16", "cpu", bench.Sweep({}, rounds=1, round_seconds=0.01), peak=1.0
    )
    assert {r["dtype"] for r in records} == {"bfloat16"}
    assert all(math.isfinite(r["step_ms_median"]) and r["step_ms_median"] > 0 for r in records)


def test_scan_over_k_steps_gives_the_parameters_of_k_jitted_steps():
    """Same keys (the step is folded into the key), same data: measured max diff 0 to 2e-8."""
    k = 4
    per_step = runners_jax.LinenRunner(TINY["cnn"], 8, "float32", "cpu")
    scanned = runners_jax.LinenRunner(TINY["cnn"], 8, "float32", "cpu", scan_steps=k)
    for _ in range(k):
        per_step.step()
    scanned.step()
    a = jax.tree_util.tree_leaves(per_step.state.params)
    b = jax.tree_util.tree_leaves(scanned.state.params)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-6, atol=1e-6)
    assert int(scanned.state.step) == int(per_step.state.step) == k


@pytest.mark.parametrize(
    "runner_cls, kwargs",
    [
        (runners_jax.LinenRunner, {}),
        (runners_jax.NnxRunner, {"pattern": "jit"}),
        (runners_jax.NnxRunner, {"pattern": "cached"}),
        (runners_jax.NnxRunner, {"pattern": "split"}),
    ],
)
def test_the_jitted_jax_step_compiles_once(runner_cls, kwargs):
    runner = runner_cls(TINY["mlp"], 8, "float32", "cpu", **kwargs)
    for _ in range(3):
        runner.sync(runner.step())
    jitted = getattr(runner.jitted, "jitted_fn", runner.jitted)  # nnx.jit and cached_partial wrap a jax.jit
    assert jitted._cache_size() == 1


def test_the_compiled_torch_step_does_not_recompile_on_later_calls():
    torch._dynamo.reset()
    runner = runners_torch.TorchRunner(TINY["mlp"], 8, "float32", "cpu", compile_mode="default")
    runner.step()
    runner.step()  # BatchNorm's num_batches_tracked changes: must not trigger a recompile
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            runner.step()
    torch._dynamo.reset()


def test_speedups_compare_the_best_of_each_framework():
    recs = [
        {"model": "m", "dtype": "float32", "batch_size": 8, "impl": "torch-eager", "samples_per_s": 100.0},
        {"model": "m", "dtype": "float32", "batch_size": 8, "impl": "torch-compile", "samples_per_s": 150.0},
        {"model": "m", "dtype": "float32", "batch_size": 8, "impl": "jax-scan", "samples_per_s": 300.0},
        {"model": "m", "dtype": "float32", "batch_size": 8, "impl": "jax-linen-jit", "samples_per_s": 200.0},
    ]
    [row] = bench.speedups(recs)
    assert (row["best_jax"], row["best_torch"], row["speedup"]) == ("jax-scan", "torch-compile", 2.0)


def test_the_datasheet_peak_is_known_for_the_lent_cards_and_absent_on_cpu():
    from compare.bench import peaks

    assert peaks.datasheet("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
    assert peaks.datasheet("NVIDIA H200", "float32") == 494.7  # TF32, as the float32 benchmark runs
    assert peaks.datasheet("cpu", "float32") is None


def test_the_report_puts_dispatch_bound_groups_in_their_own_table():
    """A group whose best MFU is under 5% measures dispatch, not arithmetic."""
    from compare.report import markdown

    def rec(model, impl, mfu, sps):
        return {"model": model, "impl": impl, "dtype": "float32", "batch_size": 32, "mfu": mfu, "samples_per_s": sps}

    records = [rec("small", "jax-scan", 0.01, 2.0), rec("small", "torch-eager", 0.004, 1.0)]
    records += [rec("big", "jax-scan", 0.40, 3.0), rec("big", "torch-compile", 0.30, 2.0)]
    lines = markdown._speedup_tables(records)
    compute, bound = "\n".join(lines).split("Dispatch-bound groups")
    assert "| big |" in compute and "| small |" not in compute and "| small |" in bound


def test_the_speedup_spread_over_separate_runs_gives_median_min_and_max(tmp_path, capsys):
    from compare.report import spread

    committed = json.loads((ROOT / "results" / "cpu-2core-x86_64" / "results.json").read_text())
    base = {k: v for k, v in committed["bench"][0].items() if k != "busy"}  # a complete record: files are validated

    def run(jax_sps, torch_sps):
        recs = [
            {**base, "model": "mlp", "dtype": "float32", "batch_size": 256, "impl": "jax-scan", "samples_per_s": jax_sps},
            {**base, "model": "mlp", "dtype": "float32", "batch_size": 256, "impl": "torch-eager", "samples_per_s": torch_sps},
        ]  # fmt: skip
        return {"meta": {}, "bench": recs}

    runs = [run(300, 100), run(200, 100), run(250, 100)]
    [row] = spread.spread(runs)
    assert (row["runs"], row["speedup_median"], row["speedup_min"], row["speedup_max"]) == (3, 2.5, 2.0, 3.0)
    for i, r in enumerate(runs):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "results.json").write_text(__import__("json").dumps(r))
    assert spread.main([str(tmp_path / str(i)) for i in range(3)]) == 0
    assert "| mlp | float32 | 256 | 3 | 0 | 2.5 | 2 | 3 | jax-scan | torch-eager |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        spread.main([str(tmp_path / "0"), str(tmp_path / "1")])  # two runs are not a spread


def test_a_busy_machine_is_seen_from_inside_the_process_and_flagged():
    """Two spinning processes per core compete with the probe's children: they get at most
    a third of the cores, far under the threshold (a quiet machine measures 0.93 to 1.0).
    The load average could not tell this inside a container (it is the host's)."""
    import subprocess
    import sys

    from compare.bench import load

    spinners = [
        subprocess.Popen(
            [sys.executable, "-c", "import time\nt = time.monotonic() + 20\nwhile time.monotonic() < t: pass"]
        )
        for _ in range(2 * load.cores())
    ]
    try:
        measured = load.probe()
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    assert measured.share < 0.5 and measured.busy, measured
    assert "the machine was busy" in load.describe(measured.share)
    assert "quiet" in load.describe(0.97) and not load.Load(0.97, 2).busy


def test_a_group_measured_on_a_busy_machine_is_marked_in_the_report_and_left_out_of_the_spread():
    from compare.report import markdown, spread

    def run(ratio, busy):
        recs = [
            {
                "model": "cnn",
                "dtype": "float32",
                "batch_size": 256,
                "impl": i,
                "samples_per_s": sps,
                "cpu_share": 0.4 if busy else 0.97,
                "busy": busy,
            }
            for i, sps in (("jax-linen-jit", 100 * ratio), ("torch-compile", 100))
        ]
        return {"meta": {}, "bench": recs}

    runs = [run(0.5, False), run(3.9, True), run(0.6, False)]
    [row] = spread.spread(runs)
    assert (row["runs"], row["busy_runs"], row["speedup_max"]) == (2, 1, 0.6)
    text = "\n".join(markdown._speedup_tables(runs[1]["bench"]))
    assert "**cnn float32 batch 256**: the machine was busy: this run could use only 40% of its cores" in text
    assert bench.speedups(runs[1]["bench"])[0]["busy"] is True
