"""One process of a JAX data-parallel job (started by ``compare.parallel.launch.jax_job``)::

    python -m compare.parallel.jax_worker TASK[,TASK...] --out DIR --coordinator HOST:PORT \
        --processes P --process-id I --local-devices L [--args JSON]

It joins the job with ``jax.distributed.initialize`` (coordinator, process count, its id;
gloo collectives between the CPU processes), builds the global mesh of P x L devices and
runs the tasks in order; process 0 writes ``<task>.json`` into ``--out``. The tasks:

* ``checks``: ``compare.parallel.jax_checks`` on the global mesh (``models``).
* ``train``: the ``runs`` (api, bn_mode, dropout), ``steps`` steps of the small mlp from
  the same seed, a checkpoint after each step in ``save_at`` (``ckpt/<run>-step<k>``).
* ``resume``: each ``runs`` entry continues from ``from`` (a checkpoint) to ``steps``.
* ``loop``: one run that checkpoints after every step, for ``steps`` steps (the fault test).
* ``timing``, ``cost``: ``compare.parallel.cost``'s step-time measurement and collective count.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import types
from pathlib import Path

from compare.parallel import train_batch, train_spec


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m compare.parallel.jax_worker")
    p.add_argument("tasks")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--coordinator", default=None)
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--local-devices", type=int, default=1)
    p.add_argument("--args", default="{}")
    return p.parse_args(argv)


def run_name(run: dict) -> str:
    return f"{run['api']}-{run['bn_mode']}-drop{run['dropout']}"


@functools.cache
def _program(w, api: str, mode: str, dropout: float) -> types.SimpleNamespace:
    """What every run of (api, mode, dropout) on ``w`` shares, built once per process: the
    spec, the optimizer, the initial variables and the compiled step."""
    import jax
    from flax import nnx

    import flaxbn.train as ftrain
    from compare import transfer
    from flaxbn import parallel

    spec, tx = train_spec(dropout), ftrain.sgd(0.1, momentum=0.9)  # the shared optimizer definition
    x0, _ = train_batch(0)
    variables = jax.jit(lambda k, x: spec.build_linen().init(k, x, train=False))(jax.random.key(1), x0[:2])
    axis = parallel.AXIS if mode == "sync" else None
    if api == "linen":
        step = parallel.linen_step(w.mesh, spec.build_linen(bn_axis_name=axis), tx, mode)
        return types.SimpleNamespace(spec=spec, tx=tx, variables=variables, step=step)
    model = nnx.jit(lambda: spec.build_nnx(nnx.Rngs(params=0, dropout=1), bn_axis_name=axis))()
    transfer.linen_to_nnx(variables, spec, model)  # the same weights as linen
    graphdef, stats, rest = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)), nnx.BatchStat, ...)
    step = parallel.nnx_step(w.mesh, graphdef, mode)
    return types.SimpleNamespace(spec=spec, tx=tx, variables=variables, step=step, template=(stats, rest))


class Run:
    """One training run of the small mlp on the mesh, linen or nnx, either mode."""

    def __init__(self, w, run: dict):
        import jax

        from flaxbn import parallel

        self.w, self.run, self.api, self.mode = w, run, run["api"], run["bn_mode"]
        p = _program(w, self.api, self.mode, run["dropout"])
        self.spec, self.tx, self.variables, self.step_fn = p.spec, p.tx, p.variables, p.step
        self.step = 0  # steps done
        self.key = jax.random.key(0)
        if self.api == "linen":
            self.state = parallel.linen_state(w.mesh, self.variables, self.tx, self.mode)
        else:
            self.template = p.template
            stats, rest = p.template
            stats = parallel.per_device(stats, w.devices) if self.mode == "per_device" else stats
            self.state = parallel.nnx_place(w.mesh, (stats, rest), self.mode)

    def advance(self, to: int, save_at=(), folder: Path | None = None) -> list[str]:
        from compare.parallel.jax_checks import _global

        saved = []
        while self.step < to:
            x, y = _global(self.w, *train_batch(self.step))
            if self.api == "linen":
                self.state, _ = self.step_fn(self.state, x, y, self.key)
            else:
                self.state, _ = self.step_fn(self.state, x, y)
            self.step = s = self.step + 1
            if s in save_at:
                saved.append(str(self.save(Path(folder) / f"{run_name(self.run)}-step{s}.safetensors")))
        return saved

    def save(self, path: Path) -> Path:
        from compare.parallel import checkpoint

        if self.api == "linen":
            checkpoint.save_linen(path, self.spec, self.w.mesh, self.state, self.key, self.mode)
        else:
            checkpoint.save_nnx(path, self.spec, self.w.mesh, self.state, self.mode)
        return path

    def load(self, path: str, resplit: str | None) -> dict:
        import flaxbn.train as ftrain
        from compare.parallel import checkpoint
        from flaxbn import parallel

        if self.api == "linen":
            template = ftrain.linen_init_state(self.variables, self.tx)
            _, state, self.key, found = checkpoint.load_linen(path, template, self.w.devices, resplit)
            self.state = parallel.linen_place(self.w.mesh, state, self.mode)
            self.step = int(state.step)
        else:
            state, found = checkpoint.load_nnx(path, self.template, self.w.devices, resplit)
            self.state = parallel.nnx_place(self.w.mesh, state, self.mode)
            self.step = int(state[1][1]["step"].get_value())  # the optimizer's step count
        return found


CHECKS = ("synchronised", "per_device", "training", "dropout_masks", "modes_differ", "uneven")


def task_checks(w, out: Path, args: dict) -> dict:
    """The ``checks`` (names of ``compare.parallel.jax_checks`` functions, all by default;
    the first three per model of ``models``, ``training`` only for ``training_models``)."""
    from compare.parallel import jax_checks

    chosen = args.get("checks", CHECKS)
    records, used = [], {}
    models = args.get("models", ["mlp"])
    for name in models:
        for check in ("synchronised", "per_device", "training"):
            if check in chosen and (check != "training" or name in args.get("training_models", models)):
                records += getattr(jax_checks, check)(w, name)
    for check in ("dropout_masks", "modes_differ"):
        records += getattr(jax_checks, check)(w) if check in chosen else []
    if "uneven" in chosen:
        uneven, used = jax_checks.uneven(w)
        records += uneven
    return {"records": records, "uneven": used}


def task_uneven(w, out: Path, args: dict) -> dict:
    from compare.parallel import jax_checks

    records, used = jax_checks.uneven(w)
    return {"records": records, "uneven": used}


def task_train(w, out: Path, args: dict) -> dict:
    saved = {}
    for run in args["runs"]:
        r = Run(w, run)
        saved[run_name(run)] = r.advance(args["steps"], set(args.get("save_at", [args["steps"]])), out / "ckpt")
    return {"checkpoints": saved}


def task_resume(w, out: Path, args: dict) -> dict:
    done = {}
    for run in args["runs"]:
        r = Run(w, run)
        found = r.load(run["from"], run.get("resplit"))
        start = r.step
        path = out / "ckpt" / f"{run_name(run)}-resumed{run.get('resplit') or ''}-step{args['steps']}.safetensors"
        r.advance(args["steps"])
        done[run_name(run) + (f"/{run['resplit']}" if run.get("resplit") else "")] = {
            "from": run["from"], "from_step": start, "saved": found, "final": str(r.save(path)),
        }  # fmt: skip
    return {"resumed": done}


def task_loop(w, out: Path, args: dict) -> dict:
    """Checkpoint after every step to one path (atomically replaced), for the fault test."""
    r = Run(w, args["run"])
    path = out / "ckpt" / "latest.safetensors"
    for s in range(args["steps"]):
        r.advance(s + 1)
        r.save(path)
        if w.first:
            (out / "progress").write_text(str(s + 1))
    return {"steps": args["steps"]}


def task_timing(w, out: Path, args: dict) -> dict:
    from compare.parallel import cost

    return {"records": cost.time_jax(w, **args)}


def task_cost(w, out: Path, args: dict) -> dict:
    from compare.parallel import cost

    return {"records": cost.count_jax(w, **args)}


TASKS = {"checks": task_checks, "uneven": task_uneven, "train": task_train, "resume": task_resume, "loop": task_loop}
TASKS |= {"timing": task_timing, "cost": task_cost}


def main(argv: list[str] | None = None) -> int:
    a = _parse(argv)
    started = time.process_time()
    from flaxbn import parallel

    parallel.initialize(a.coordinator, a.processes, a.process_id, cpu_devices=a.local_devices)
    import jax

    if not {"timing", "cost"} & set(a.tasks.split(",")):
        # checks compile many small programs once each: a third of the compile time (Flax's own tests do
        # this); the numbers they compare are computed under the same setting on both sides
        jax.config.update("jax_disable_most_optimizations", True)

    from compare.io.checkpoint import atomic_path
    from compare.parallel import jax_checks

    w = jax_checks.where(launcher="jax.distributed" if a.processes > 1 else "simulated")
    print(f"started: cpu {time.process_time() - started:.1f} s", flush=True)
    args = json.loads(a.args)
    for task in a.tasks.split(","):
        wall, cpu = time.perf_counter(), time.process_time()
        result = TASKS[task](w, a.out, args.get(task, {}))
        print(f"{task}: {time.perf_counter() - wall:.1f} s, cpu {time.process_time() - cpu:.1f} s", flush=True)
        if jax.process_index() == 0:
            with atomic_path(a.out / f"{task}.json") as tmp:
                tmp.write_text(json.dumps(result))
    print(f"process {jax.process_index()} of {jax.process_count()}: done", flush=True)
    if a.processes > 1:
        jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
