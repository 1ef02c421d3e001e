"""``port()``: a torch network as a generated Flax module with its weights, ready to run.

The generated source is the single truth: :func:`port` writes it, executes it as a
module (its tracebacks show its lines), and loads the torch weights into it through the
weight map. The command line writes the same source to a file.
"""

from __future__ import annotations

import linecache
import logging
import types
from typing import Any

import jax
import numpy as np
import torch
from flax import nnx

from compare import transfer
from compare.port import codegen, layout, ops, weights
from compare.port.ops.emitter import RESERVED
from compare.port.trace import PortError, preserved, trace
from flaxbn import ported as flax_ported


def port(
    torch_model: torch.nn.Module, example_input: Any, api: str = "linen", *, seed: int = 0, name: str | None = None
) -> Ported:
    """Trace ``torch_model`` (in eval and in train mode) on ``example_input`` (NCHW, as
    torch takes it), generate its Flax ``api`` ("linen" or "nnx") module and load its
    weights. The model is left as it was (mode, statistics, torch's random state).

    A float64 model (``model.double()``) gives a float64 port (JAX's x64 mode is switched
    on around every call of the port). ``name`` is the generated class's (default: the
    torch class's); ``seed`` seeds the Flax side's dropout stream. Raises :class:`PortError` listing every node that
    cannot be ported, with the supported set.
    """
    x = torch.as_tensor(np.asarray(example_input) if not isinstance(example_input, torch.Tensor) else example_input)
    dtype = _float_dtype(torch_model, x.dtype)
    x = x.to(dtype)
    is_leaf = lambda m: ops.module_form(m) is not None  # noqa: E731
    traced_eval, traced_train = (trace(torch_model, x, mode, is_leaf) for mode in ("eval", "train"))
    name = name or _class_name(torch_model)
    if not name.isidentifier() or name in RESERVED:
        raise ValueError(f"name {name!r} is not a usable class name")
    generated = codegen.generate(torch_model, traced_eval, traced_train, api, name)
    return Ported(torch_model, generated, tuple(x.shape), dtype, seed, traced_train)


def _float_dtype(model: torch.nn.Module, example: torch.dtype) -> torch.dtype:
    """float64 when the model holds float64 tensors (or holds none and the input is float64)."""
    dtypes = {t.dtype for t in model.state_dict().values() if t.is_floating_point()} or {example}
    if dtypes - {torch.float32, torch.float64}:
        raise PortError(f"the model holds {sorted(map(str, dtypes))}: port a float32 or float64 model")
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _class_name(model: torch.nn.Module) -> str:
    name = type(model).__name__
    return name if name.isidentifier() and name not in RESERVED else f"Ported{name.capitalize()}"


def load_source(source: str, class_name: str, filename: str) -> type:
    """Execute generated source as a module of its own and return its class."""
    module = types.ModuleType(filename)
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, "exec"), module.__dict__)
    return getattr(module, class_name)


class Ported:
    """A torch network and its generated Flax twin (``module`` and ``variables`` for
    linen, ``model`` for nnx), with the weight map between them."""

    def __init__(self, torch_model, generated: codegen.Generated, example_shape, dtype, seed: int, traced_train):
        self.torch_model, self.generated, self.api = torch_model, generated, generated.api
        self.source, self.sites, self.moves = generated.source, generated.sites, generated.moves
        self.example_shape, self.dtype, self.traced_train = example_shape, dtype, traced_train
        self.unused = weights.unused(self.moves, torch_model)
        self.cls = load_source(self.source, generated.class_name, f"<compare.port {generated.class_name} {self.api}>")
        self._jitted: dict[str, Any] = {}
        self._checked_shapes = {example_shape}
        self.seed, self._key, self._calls = seed, jax.random.key(seed), 0
        with self.x64():
            if self.api == "linen":
                self.module = self.cls()
                self.load_torch()
            else:
                self.model = self.new_model()

    @property
    def float_dtype(self) -> type:
        return np.float64 if self.dtype == torch.float64 else np.float32

    def x64(self):
        """JAX's float64 mode for a float64 port (around every call that builds or runs it)."""
        return jax.enable_x64(self.dtype == torch.float64)

    # --- weights ---------------------------------------------------------------------------------

    def load_torch(self, state_dict=None) -> None:
        """Load a torch state_dict (default: the torch model's current weights) into the Flax side."""
        flat = self.torch_flat(state_dict)
        with self.x64():
            if self.api == "linen":
                self.variables = transfer.flat_to_linen(flat)
            else:
                transfer.flat_into_nnx(self.model, flat, what="torch -> ported nnx", float_dtype=self.float_dtype)

    def torch_flat(self, state_dict=None) -> dict[str, np.ndarray]:
        """A torch state_dict (default: the torch model's) as flat Flax arrays, validated."""
        sd = self.torch_model.state_dict() if state_dict is None else state_dict
        return weights.torch_to_flat(sd, self.moves, self.unused, float_dtype=self.float_dtype)

    def new_model(self, flat=None) -> nnx.Module:
        """A new nnx model holding ``flat`` (default: the torch model's weights), built
        without random initialisation (``flaxbn.ported.new_nnx``)."""
        with self.x64():
            model = flax_ported.new_nnx(self.cls, self.seed)
            flat = self.torch_flat() if flat is None else flat
            transfer.flat_into_nnx(model, flat, what="torch -> ported nnx", float_dtype=self.float_dtype)
        return model

    def flat(self) -> dict[str, np.ndarray]:
        """The Flax weights, flat: ``{"params/conv1/kernel": array, ...}``."""
        return transfer.linen_to_flat(self.variables) if self.api == "linen" else transfer.nnx_to_flat(self.model)

    def state_dict(self):
        """The Flax weights as the torch state_dict entries they came from."""
        return weights.flat_to_torch(self.flat(), self.moves, dtype=self.dtype)

    def to_torch(self) -> torch.nn.Module:
        """Move the Flax weights (trained, say) into the torch model and return it."""
        weights.into_torch(self.torch_model, self.state_dict(), self.unused)
        return self.torch_model

    # --- running ---------------------------------------------------------------------------------

    def flax_input(self, x: Any) -> np.ndarray:
        """A torch-layout input (NCHW) in the generated module's layout."""
        x = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, self.float_dtype)
        self.check_shape(x.shape)
        return layout.to_flax(x, self.generated.input_layout)

    def torch_output(self, out: Any, structure: Any) -> Any:
        """The generated module's output (of ``structure``, ``generated.outputs[mode]``) in torch's layouts."""
        if isinstance(structure, layout.Layout):
            return layout.to_torch(np.asarray(out), structure)
        if isinstance(structure, dict):
            return {k: self.torch_output(out[k], s) for k, s in structure.items()}
        if isinstance(structure, (list, tuple)):
            return type(structure)(self.torch_output(o, s) for o, s in zip(out, structure, strict=True))
        return out

    def run(self, x: Any, *, train: bool = False, rngs: Any = None):
        """Run the Flax side on a torch-layout input; returns torch-layout outputs.

        ``train=True``: batch statistics (the running statistics are updated, as torch
        updates its buffers) and Dropout / stochastic depth from the ``dropout`` stream
        (``rngs``: a key or seed; by default a new key per call); returns
        ``(output, batch_stats)``.
        """
        xf = self.flax_input(x)
        with self.x64():
            if self.api == "linen":
                return self._run_linen(xf, train, rngs)
            return self._run_nnx(xf, train, rngs)

    def _key_for(self, rngs: Any) -> jax.Array:
        if rngs is None:
            self._calls += 1
            return jax.random.fold_in(self._key, self._calls)
        if isinstance(rngs, dict):
            rngs = rngs["dropout"]
        return jax.random.key(rngs) if isinstance(rngs, int) else rngs

    def _run_linen(self, xf, train: bool, rngs):
        if not train:
            if "eval" not in self._jitted:
                self._jitted["eval"] = jax.jit(lambda v, x: self.module.apply(v, x, train=False))
            return self.torch_output(self._jitted["eval"](self.variables, xf), self.generated.outputs["eval"])
        if "train" not in self._jitted:
            apply = self.module.apply
            self._jitted["train"] = jax.jit(
                lambda v, x, key: apply(v, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"])
            )
        out, updates = self._jitted["train"](self.variables, xf, self._key_for(rngs))
        self.variables = {**self.variables, "batch_stats": updates["batch_stats"]}
        return self.torch_output(out, self.generated.outputs["train"]), jax.tree.map(np.asarray, updates["batch_stats"])

    def _run_nnx(self, xf, train: bool, rngs):
        if "call" not in self._jitted:
            self._jitted["call"] = nnx.jit(lambda model, x: model(x))
        if not train:
            self.model.eval()
            return self.torch_output(self._jitted["call"](self.model, xf), self.generated.outputs["eval"])
        if rngs is not None:
            nnx.reseed(self.model, dropout=self._key_for(rngs))
        self.model.train()
        out = self._jitted["call"](self.model, xf)
        self.model.eval()
        stats = transfer.flat_to_linen({k: v for k, v in self.flat().items() if k.startswith("batch_stats/")})
        return self.torch_output(out, self.generated.outputs["train"]), jax.tree.map(np.asarray, stats["batch_stats"])

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Another input shape than the traced one: torch must accept it (checked on fake
        tensors, nothing is computed), else a PortError with torch's own message."""
        if tuple(shape) in self._checked_shapes:
            return
        from torch._subclasses.fake_tensor import FakeTensorMode

        quiet = logging.getLogger("torch._subclasses.fake_tensor")  # it logs each refusal as an error; we raise it
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                self._fake_run(shape, mode)
        finally:
            quiet.setLevel(level)
        self._checked_shapes.add(tuple(shape))

    def _fake_run(self, shape: tuple[int, ...], mode) -> None:
        with preserved(self.torch_model):
            self.torch_model.eval()
            try:
                self.torch_model(mode.from_tensor(torch.empty(shape, dtype=self.dtype)))
            except Exception as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise PortError(
                    f"torch refuses the input shape {tuple(shape)} (traced at {self.example_shape}): {first}"
                ) from None
