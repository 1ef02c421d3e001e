"""What data parallelism costs (``compare.parallel.cost``): the collectives are counted
from the programs, not written down by hand, and the paper model is the arithmetic it
says it is."""

from __future__ import annotations

import pytest

from compare.parallel import cost, launch

# two lines of a compiled CPU module of the small mlp's synchronised step (XLA's combiner at work)
HLO = """
  %psum.133 = f32[16]{0} all-reduce(%broadcast_multiply_fusion.2), channel_id=1, replica_groups={{0,1}}
  %all-reduce.1 = (f32[16]{0}, f32[12,16]{1,0}, f32[]) all-reduce(%a, %dot, %b), channel_id=2
  %get-tuple-element.867 = f32[16]{0} get-tuple-element(%all-reduce.1), index=0
  %all-reduce-start = bf16[8]{0} all-reduce-start(%c), channel_id=3
"""


def test_compiled_all_reduces_are_counted_once_each_with_every_operand_in_bytes():
    assert cost.compiled_all_reduces(HLO) == [16 * 4, (16 + 12 * 16 + 1) * 4, 8 * 2]


def test_tensor_types_give_their_bytes():
    assert cost._tensor_bytes("tensor<12x16xf32>") == 768
    assert cost._tensor_bytes("tensor<f32>") == 4
    assert cost._tensor_bytes("tensor<3xbf16>") == 6


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    """The small-model counts of one process with 2 CPU devices (lowered and compiled)."""
    out = tmp_path_factory.mktemp("count")
    launch.jax_job("cost", 1, 2, out, {"cost": {"models": ["mlp", "cnn"]}}, timeout_s=600)
    return {(r["model"], r["bn_mode"], r["source"]): r for r in launch.read_json(out, "cost.json")["records"]}


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_synchronised_batchnorm_adds_two_all_reduces_per_layer_in_the_forward_and_two_in_the_backward(counted, name):
    """Flax's two-pass variance (use_fast_variance=False, as torch computes it) asks for
    the mean, then the variance around it: two sequential all-reduces of C floats per
    layer; their transposes in the backward pass are two more. The per-device step's
    all-reduces are one per gradient leaf plus the loss."""
    import jax

    from compare import registry

    spec = registry.get(name)
    variables = jax.eval_shape(
        lambda: spec.build_linen().init(jax.random.key(0), jax.numpy.zeros((2, *spec.flax_input_shape)), train=False)
    )
    layers = len(variables["batch_stats"])
    channels = sum(s["mean"].shape[0] for s in variables["batch_stats"].values())
    per_device = counted[(name, "per_device", "stablehlo (lowered)")]
    sync = counted[(name, "sync", "stablehlo (lowered)")]
    assert per_device["collectives"] == len(jax.tree_util.tree_leaves(variables["params"])) + 1
    assert per_device["critical_collectives"] == 0
    assert sync["critical_collectives"] == 4 * layers
    assert sync["critical_bytes"] == 4 * channels * 4  # float32, 4 all-reduces of C per layer
    assert f"{2 * layers} in the forward, {2 * layers} in the backward" in sync["detail"]
    assert sync["bytes_per_step"] - per_device["bytes_per_step"] == sync["critical_bytes"]


def test_the_compiled_cpu_program_combines_the_gradients_all_reduces(counted):
    assert counted[("mlp", "per_device", "hlo (compiled, cpu)")]["collectives"] == 1
    compiled = counted[("mlp", "sync", "hlo (compiled, cpu)")]
    assert 1 < compiled["collectives"] < counted[("mlp", "sync", "stablehlo (lowered)")]["collectives"]


def test_the_baseline_step_times_are_the_fastest_float32_of_each_framework():
    steps = cost.baseline_steps()
    assert steps[("mlp", "jax")] == (pytest.approx(0.0973, abs=1e-4), "jax-scan, batch 256")
    assert steps[("resnet18_cifar", "torch")][1].startswith("torch-compile-cudagraphs")


def test_the_paper_model_is_latency_per_collective_plus_ring_bytes_over_bandwidth():
    count = {"model": "cnn", "framework": "jax", "bn_mode": "sync", "source": "stablehlo (lowered)",
             "collectives": 25, "bytes_per_step": 1_000_000, "critical_collectives": 12, "critical_bytes": 4096}  # fmt: skip
    rows = {r["link"]: r for r in cost.paper([count], gpus=8)}
    assert set(rows) == {link.name for link in cost.LINKS}
    nvlink = next(link for link in cost.LINKS if link.name == "nvlink")
    want = 25 * nvlink.latency + 2 * 7 / 8 * 1_000_000 / nvlink.busbw
    assert rows["nvlink"]["comm_ms"] == pytest.approx(1e3 * want)
    assert rows["nvlink"]["critical_ms"] == pytest.approx(1e3 * (12 * nvlink.latency + 2 * 7 / 8 * 4096 / nvlink.busbw))
    assert rows["nvlink"]["comm_fraction"] == pytest.approx(rows["nvlink"]["comm_ms"] / rows["nvlink"]["h100_step_ms"])


def test_the_report_and_figures_draw_the_distributed_lists(tmp_path):
    from compare.report import figures, markdown

    step = {"framework": "jax", "model": "mlp", "processes": 2, "bn_mode": "sync", "batch_per_device": 64,
            "step_ms_median": 2.0, "step_ms_p10": 1.9, "step_ms_p90": 2.2, "samples_per_s": 6.4e4, "compile_s": 1.0,
            "windows": 7, "steps_per_window": 100, "load_avg": 0.4, "cpu_count": 2, "pinned": False}  # fmt: skip
    count = {"model": "mlp", "framework": "jax", "bn_mode": "sync", "source": "stablehlo (lowered)",
             "collectives": 19, "bytes_per_step": 2_703_404, "critical_collectives": 8, "critical_bytes": 16384}  # fmt: skip
    results = {"meta": {}, "distributed_steps": [step], "distributed_comm_model": cost.paper([count])}
    figures.draw_all(results, tmp_path)
    assert (tmp_path / "distributed_step_times.png").is_file() and (tmp_path / "distributed_comm_model.png").is_file()
    text = "\n".join(markdown._distributed_md(results))
    assert "Step times on this machine" in text and "| nvlink |" in text


def test_the_quiet_machine_command_of_the_docs_parses_and_every_option_is_documented():
    import re
    import shlex
    from pathlib import Path

    from compare import run

    text = (Path(__file__).resolve().parents[1] / "docs" / "distributed.md").read_text()
    command = re.search(r"```bash\n(python -m compare\.run --suite distributed.*?)```", text, flags=re.S).group(1)
    args = run.parse(shlex.split(command.replace("\\\n", " "))[3:])
    assert args.suites == ["distributed"] and args.dist_part == "cost" and args.dist_pin
    assert args.out == Path("results/cpu-2core-x86_64/distributed")
    for option in ("--dist-part", "--dist-windows", "--dist-window-s", "--dist-pin", "--full"):
        assert option in text
