"""Several processes on this machine, through the launcher users would use: JAX under
``jax.distributed`` (a coordinator on 127.0.0.1, gloo collectives between the CPU
processes), torch under torchrun.

Small jobs (the small mlp, 4 steps): 2 processes x 1 device and 1 process x 2 devices give
the same run (the process split does not matter); a checkpoint written by the first
resumes in the second as the uninterrupted run; per-device statistics say whose they are
and are not silently respread on another device count; a killed process stops the job in
bounded time with its rank named and the last checkpoint whole. Tolerances: the
``parallel.split`` and ``parallel.resume`` entries of ``compare.checks.tolerances``.
"""

from __future__ import annotations

import numpy as np
import pytest

from compare.checks import tolerances
from compare.parallel import launch, suite

STEPS, SAVE_AT = 4, 2
RUNS = [
    {"api": "linen", "bn_mode": "sync", "dropout": 0.5},
    {"api": "linen", "bn_mode": "per_device", "dropout": 0.5},
    {"api": "nnx", "bn_mode": "sync", "dropout": 0.5},
]


def _name(run: dict) -> str:
    return f"{run['api']}-{run['bn_mode']}-drop{run['dropout']}"


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """2 processes x 1 device: a few checks, then the runs, checkpoints after SAVE_AT and STEPS steps."""
    out = tmp_path_factory.mktemp("jax-2x1")
    args = {
        "checks": {"models": ["mlp"], "checks": ["synchronised", "dropout_masks", "uneven"]},
        "train": {"runs": RUNS, "steps": STEPS, "save_at": [SAVE_AT, STEPS]},
    }
    job = launch.jax_job("checks,train", 2, 1, out, args, timeout_s=600)
    return out, job, launch.read_json(out, "train.json")["checkpoints"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, two_processes):
    """1 process x 2 devices: the same runs from the start, and resumed from the 2-process checkpoints."""
    out = tmp_path_factory.mktemp("jax-1x2")
    saved = two_processes[2]
    args = {
        "train": {"runs": RUNS, "steps": STEPS},
        "resume": {"runs": [{**r, "from": saved[_name(r)][0]} for r in RUNS], "steps": STEPS},
    }
    launch.jax_job("train,resume", 1, 2, out, args, timeout_s=600)
    return launch.read_json(out, "train.json")["checkpoints"], launch.read_json(out, "resume.json")["resumed"]


def _holds(diff, name: str) -> bool:
    return tolerances.get(name).holds(diff.max_abs, diff.scale)


def test_the_launcher_starts_every_process_and_process_0_writes_the_results(two_processes):
    _, job, saved = two_processes
    logs = [p.read_text() for p in job.logs.values()]
    assert "process 0 of 2: done" in logs[0] and "process 1 of 2: done" in logs[1]
    assert sorted(saved) == sorted(_name(r) for r in RUNS) and all(len(v) == 2 for v in saved.values())


def test_the_checks_hold_on_two_processes(two_processes):
    records = launch.read_json(two_processes[0], "checks.json")["records"]
    assert {r["launcher"] for r in records} == {"jax.distributed"} and {r["processes"] for r in records} == {2}
    assert [r for r in records if not r["ok"]] == []
    assert any("global device index" in r["check"] for r in records)


@pytest.mark.parametrize("run", RUNS, ids=_name)
def test_the_same_two_devices_split_into_2x1_or_1x2_give_the_same_run(two_processes, one_process, run):
    """Dropout on: each device's masks come from its global index, not from its process."""
    diff = suite.compare_checkpoints(one_process[0][_name(run)][-1], two_processes[2][_name(run)][-1])
    assert _holds(diff, "parallel.split"), diff


@pytest.mark.parametrize("run", RUNS, ids=_name)
def test_a_checkpoint_of_two_processes_resumes_on_one_as_the_uninterrupted_run(two_processes, one_process, run):
    resumed = one_process[1][_name(run)]
    assert resumed["from_step"] == SAVE_AT
    diff = suite.compare_checkpoints(resumed["final"], two_processes[2][_name(run)][-1])
    assert _holds(diff, "parallel.split"), diff


def test_a_checkpoint_says_whose_statistics_it_holds(two_processes):
    from compare.parallel import checkpoint

    saved = two_processes[2]
    per_device = checkpoint.info(saved["linen-per_device-drop0.5"][0])
    assert per_device["bn_mode"] == "per_device" and per_device["devices"] == 2 and per_device["processes"] == 2
    assert "global device index 0..1" in per_device["statistics"]
    assert "one copy" in checkpoint.info(saved["linen-sync-drop0.5"][0])["statistics"]


def test_a_synchronised_checkpoint_is_a_plain_training_checkpoint(two_processes):
    """``compare.io.train_state`` reads it: a multi-process run resumes on one device too."""
    import jax

    import flaxbn.train as ftrain
    from compare.io import train_state
    from compare.parallel import train_batch, train_spec

    spec = train_spec(0.5)
    variables = spec.build_linen().init(jax.random.key(1), train_batch(0)[0][:2], train=False)
    template = ftrain.linen_init_state(variables, ftrain.sgd(0.1, momentum=0.9))
    loaded, state, _ = train_state.load_linen(two_processes[2]["linen-sync-drop0.5"][-1], template)
    assert loaded.name == "mlp" and int(state.step) == STEPS


def test_per_device_statistics_on_another_device_count_are_refused_unless_resplit_says_how(two_processes):
    import jax

    import flaxbn.train as ftrain
    from compare.io.checkpoint import CheckpointError
    from compare.parallel import checkpoint, train_batch, train_spec

    path = two_processes[2]["linen-per_device-drop0.5"][0]
    spec = train_spec(0.5)
    variables = spec.build_linen().init(jax.random.key(1), train_batch(0)[0][:2], train=False)
    template = ftrain.linen_init_state(variables, ftrain.sgd(0.1, momentum=0.9))
    with pytest.raises(CheckpointError, match="resplit='device0'.*resplit='mean'"):
        checkpoint.load_linen(path, template, devices=4)
    _, same, _, _ = checkpoint.load_linen(path, template, devices=2)
    _, first, _, _ = checkpoint.load_linen(path, template, devices=4, resplit="device0")
    _, mean, _, _ = checkpoint.load_linen(path, template, devices=4, resplit="mean")
    for a, b, c in zip(*(jax.tree_util.tree_leaves(s.batch_stats) for s in (same, first, mean)), strict=True):
        assert b.shape == (4, *a.shape[1:])
        np.testing.assert_array_equal(b, np.broadcast_to(a[0], b.shape))
        if a.dtype.kind == "f":
            np.testing.assert_allclose(c, np.broadcast_to(a.mean(0), c.shape), rtol=1e-6)


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_a_process_killed_mid_run_stops_the_job_in_bounded_time_names_it_and_leaves_the_last_checkpoint_whole(
    tmp_path, framework
):
    """SIGKILL to rank 1 once the first checkpoint exists: the launcher (JAX) or torchrun
    stops the survivor, the error names rank 1, and the checkpoint loads."""
    fault = launch.Fault(rank=1, after=tmp_path / "ckpt" / "latest.safetensors")
    loop = {"steps": 100_000, "run": {"api": "linen", "bn_mode": "sync", "dropout": 0.5}}
    with pytest.raises(launch.WorkerFailed) as e:
        if framework == "jax":
            launch.jax_job("loop", 2, 1, tmp_path, {"loop": loop}, timeout_s=300, fault=fault)
        else:
            loop["run"] = {"bn_mode": "sync", "dropout": 0.5}
            launch.torchrun_job("loop", 2, tmp_path, {"loop": loop}, timeout_s=300, fault=fault)
    assert e.value.rank == 1 and e.value.returncode == -9, str(e.value)
    assert e.value.stopped_s < suite.KILL_LIMIT_S, str(e.value)
    intact, step = suite._intact(framework, tmp_path / "ckpt" / "latest.safetensors")
    assert intact and int(step) >= 1


def test_torch_resumes_a_synchronised_checkpoint_of_two_ranks_on_one_as_the_uninterrupted_run(tmp_path):
    runs = [{"bn_mode": "sync", "dropout": 0.0}]
    launch.torchrun_job("train", 2, tmp_path / "two", {"train": {"runs": runs, "steps": STEPS, "save_at": [SAVE_AT]}})
    saved = launch.read_json(tmp_path / "two", "train.json")["sync"]["checkpoints"]
    resume = {"resume": {"runs": [{**runs[0], "from": saved[0]}], "steps": STEPS}}
    launch.torchrun_job("resume", 1, tmp_path / "one", resume)
    again = launch.read_json(tmp_path / "one", "resume.json")["sync"]
    assert again["from_step"] == SAVE_AT
    assert _holds(suite.compare_checkpoints(again["checkpoints"][-1], saved[-1]), "parallel.resume")
