"""One network under training, in torch and in linen, with the handles the claims' probes
need: the same methods on both (:class:`TorchNet`, :class:`LinenNet`), so that
``compare.experiments.probes`` measures the two frameworks with one piece of code.

The models are the library's own (``torchbn``, ``flaxbn``), untouched: the experiments'
changes are made from outside, with torch's module hooks and linen's
``nn.intercept_methods``, at the layers named ``bn{i}`` and ``drop{i}`` (the same names in
both frameworks). Variants (training-time changes):

* ``standard``: the lesson's order in every hidden layer, ``fc -> bn -> relu -> drop``.
* ``noisy_bn``: Santurkar et al. 2018 ("How Does Batch Normalization Help
  Optimization?", section 2.1): after every BatchNorm in training, each channel is scaled
  by ``s ~ U(NOISE_SCALE)`` and shifted by ``m ~ U(NOISE_SHIFT)``, drawn anew at every
  step and shared by the batch: a distribution shift of the next layer's input that
  changes from step to step, which BatchNorm cannot undo.
* ``dropout_before_bn``: the Dropout moved in front of each BatchNorm
  (``fc -> drop -> bn -> relu``; the ``drop{i}`` after the activation becomes the identity).
* ``dropout_last_only``: Dropout only after the last BatchNorm (Li et al. 2019,
  "Understanding the Disharmony between Dropout and Batch Normalization by Variance
  Shift", their remedy): every ``drop{i}`` but the last is the identity.

Each framework draws its own randomness (torch's global generator, seeded per run; the
run's JAX key): the frameworks are compared by their statistics, not mask by mask.
"""

from __future__ import annotations

import copy
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

import flaxbn.train as ftrain
import torchbn.train as ttrain
from compare import registry, transfer
from compare.conventions import to_flax_input

VARIANTS = ("standard", "noisy_bn", "dropout_before_bn", "dropout_last_only")
NOISE_SCALE = (0.5, 1.5)  # noisy_bn: per-channel factor, uniform
NOISE_SHIFT = (-1.0, 1.0)  # noisy_bn: per-channel offset, uniform (BatchNorm's output has unit scale)


def _inputs(spec: registry.ModelSpec, x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1) if len(spec.input_shape) == 1 else x  # mlp: (N, C, H, W) -> (N, C*H*W)


def splits(ds) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The dataset's arrays by split name: ``train``, ``test``, ``val`` (when drawn) and
    ``train_clean`` (the training images whose labels are right, when some are made wrong)."""
    out = {"train": (ds.x_train, ds.y_train), "test": (ds.x_test, ds.y_test)}
    if getattr(ds, "x_val", None) is not None:
        out["val"] = (ds.x_val, ds.y_val)
    if getattr(ds, "y_train_true", None) is not None:
        right = ds.y_train == ds.y_train_true
        out["train_clean"] = (ds.x_train[right], ds.y_train[right])
    return out


def _hidden_layers(spec: registry.ModelSpec) -> int:
    """The mlp's hidden layers (``drop1`` .. ``drop{n}``); 0 for other models."""
    return len(spec.config.hidden) if spec.name == "mlp" else 0


def _identity_drop(variant: str, index: int, layers: int) -> bool:
    """Whether the variant turns ``drop{index}`` (after the activation) into the identity."""
    return variant == "dropout_before_bn" or (variant == "dropout_last_only" and index < layers)


def _index(name: str, prefix: str) -> int | None:
    """``drop2`` -> 2 for prefix ``drop``; None for any other name (``head``, ``fc_bn``)."""
    rest = name[len(prefix) :] if name.startswith(prefix) else ""
    return int(rest) if rest.isdigit() else None


# --- torch ---------------------------------------------------------------------------------


class TorchNet:
    """A torch model under training: SGD with momentum 0.9, the variant made with hooks.
    ``device``: "cpu" or "gpu" (the data moves to the device once)."""

    def __init__(self, spec, ds, cfg, init: dict, device: str = "cpu"):
        if cfg.variant not in VARIANTS:
            raise ValueError(f"unknown variant {cfg.variant!r}; known: {', '.join(VARIANTS)}")
        self.spec, self.cfg = spec, cfg
        self.dev = torch.device("cuda" if device == "gpu" else "cpu")
        torch.manual_seed(cfg.seed)  # dropout masks and noise (torch.manual_seed seeds CUDA too)
        self.model = spec.build_torch().to(self.dev)
        self.model.load_state_dict(init)
        self.opt = ttrain.sgd(self.model, lr=cfg.lr, momentum=0.9)
        self.data = {
            split: (torch.from_numpy(_inputs(spec, x)).to(self.dev), torch.from_numpy(y).to(self.dev))
            for split, (x, y) in splits(ds).items()
        }
        self._ablate: dict[str, torch.Tensor] | None = None
        self._captured: dict[str, tuple] | None = None
        layers = _hidden_layers(spec)
        for name, module in self.model.named_modules():
            if _index(name, "bn") is not None:
                module.register_forward_pre_hook(self._bn_input)
                module.register_forward_hook(functools.partial(self._bn_output, name))
            if (i := _index(name, "drop")) is not None:
                if _identity_drop(cfg.variant, i, layers):
                    module.p = 0.0
                module.register_forward_hook(functools.partial(self._drop_output, name))

    # hooks: training-time variants, eval-time ablation and capture
    def _bn_input(self, module, args):
        if self.cfg.variant == "dropout_before_bn" and module.training:
            return (torch.nn.functional.dropout(args[0], self.cfg.dropout, training=True), *args[1:])
        return None

    def _bn_output(self, name, module, args, out):
        if self.cfg.variant == "noisy_bn" and module.training:
            c = out.shape[1]
            scale = torch.empty(c, device=out.device).uniform_(*NOISE_SCALE)
            shift = torch.empty(c, device=out.device).uniform_(*NOISE_SHIFT)
            out = out * scale + shift
        if self._captured is not None:
            self._captured[name] = (args[0].detach().cpu().numpy(), out.detach().cpu().numpy())
        return out

    def _drop_output(self, name, module, args, out):
        if self._ablate is not None and name in self._ablate:
            out = out * self._ablate[name]
        if self._captured is not None:
            self._captured[name] = (args[0].detach().cpu().numpy(), out.detach().cpu().numpy())
        return out

    # training
    def train_epoch(self, idxs) -> list[float]:
        x, y = self.data["train"]
        losses = []
        for idx in idxs:
            idx = torch.from_numpy(idx).to(self.dev)
            losses.append(ttrain.train_step(self.model, self.opt, x[idx], y[idx]))
        return [float(v) for v in losses]  # one synchronisation per epoch

    def evaluate(self, split: str) -> tuple[float, float]:
        x, y = self.data[split]
        self.model.eval()
        with torch.no_grad():
            logits = self.model(x)
            return float(ttrain.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())

    # probes (eval mode unless stated)
    def labels(self, split: str) -> np.ndarray:
        return self.data[split][1].cpu().numpy()

    def logits(self, split: str, ablate: dict[str, np.ndarray] | None = None, rows: int | None = None) -> np.ndarray:
        """Eval-mode logits of the split (its first ``rows`` samples only, when given);
        ``ablate``: per ``drop{i}`` site, a 0/1 mask over its units."""
        self._ablate = None if ablate is None else {k: torch.from_numpy(v).to(self.dev) for k, v in ablate.items()}
        try:
            self.model.eval()
            with torch.no_grad():
                return self.model(self.data[split][0][:rows]).cpu().numpy()
        finally:
            self._ablate = None

    def stochastic_logits(self, split: str, passes: int) -> np.ndarray:
        """(passes, N, K): Dropout active (train mode), BatchNorm in eval mode."""
        self.model.eval()
        for name, module in self.model.named_modules():
            if _index(name, "drop") is not None:
                module.train()
        try:
            with torch.no_grad():
                return np.stack([self.model(self.data[split][0]).cpu().numpy() for _ in range(passes)])
        finally:
            self.model.eval()

    def captured(self, split: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Eval mode: the input and output of every ``bn{i}`` and ``drop{i}`` layer."""
        self._captured = {}
        try:
            self.logits(split)
            return self._captured
        finally:
            self._captured = None

    def running_var(self) -> dict[str, np.ndarray]:
        """BatchNorm's running variance per layer (torch keeps the unbiased batch variance)."""
        return {
            name: m.running_var.cpu().numpy()
            for name, m in self.model.named_modules()
            if _index(name, "bn") is not None
        }

    def gradient_shift(self, idx: np.ndarray, layers: dict[str, tuple[str, ...]]) -> dict[str, tuple[float, ...]]:
        """Santurkar et al.'s internal covariate shift (definition 2.1), train mode, on the
        batch ``idx``: per weight layer ``L`` (``layers``: L -> the modules before it), G
        is the gradient of ``L.weight``, G' the same after the modules before ``L`` took
        the optimizer's own step (SGD with momentum, from its current state, on G's
        batch); nothing of the run changes. Returns per layer ``(||G - G'||, ||G||,
        cos(G, G'))``."""
        from torch.func import functional_call

        x, y = (t[torch.from_numpy(idx).to(self.dev)] for t in self.data["train"])
        params = {k: v.detach() for k, v in self.model.named_parameters()}
        buffers = dict(self.model.named_buffers())

        def grads(p):
            p = {k: v.clone().requires_grad_(True) for k, v in p.items()}
            stats = {k: v.clone() for k, v in buffers.items()}  # train mode updates them: on copies
            with torch.random.fork_rng(devices=[]):  # the same noise (noisy_bn) in both passes
                torch.manual_seed(0)
                loss = ttrain.cross_entropy(functional_call(self.model, {**p, **stats}, (x,)), y)
            return dict(zip(p, torch.autograd.grad(loss, list(p.values())), strict=True))

        self.model.train()
        g = grads(params)
        stepped = self._optimizer_step(params, g)
        out = {}
        for layer, before in layers.items():
            moved = {k: stepped[k] if k.split(".")[0] in before else v for k, v in params.items()}
            a, b = g[f"{layer}.weight"], grads(moved)[f"{layer}.weight"]
            cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
            out[layer] = (float(torch.linalg.norm(a - b)), float(torch.linalg.norm(a)), float(cos))
        return out

    def _optimizer_step(self, params: dict[str, torch.Tensor], g: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The parameters after one step of a copy of the run's optimizer (its state copied
        too) with gradients ``g``; the run's parameters and optimizer are untouched."""
        clones = {k: v.clone() for k, v in params.items()}  # in the optimizer's parameter order
        group = {k: v for k, v in self.opt.param_groups[0].items() if k != "params"}
        opt = type(self.opt)(list(clones.values()), **group)
        opt.load_state_dict(copy.deepcopy(self.opt.state_dict()))
        for k, c in clones.items():
            c.grad = g[k].clone()
        opt.step()
        return clones


# --- linen ---------------------------------------------------------------------------------


def _interceptor(variant: str, rate: float, layers: int, ablate: dict | None = None, capture: bool = False):
    """The linen twin of TorchNet's hooks, for ``nn.intercept_methods``. A subclass's
    ``super().__call__`` is intercepted too (``flaxbn``'s BatchNorms extend Flax's): only
    the outermost call of a module is changed."""
    inside: set[int] = set()

    def intercept(next_fun, args, kwargs, ctx):
        module, name = ctx.module, ctx.module.name
        if ctx.method_name != "__call__" or name is None or id(module) in inside:
            return next_fun(*args, **kwargs)
        inside.add(id(module))
        try:
            return _changed(next_fun, args, kwargs, module, name)
        finally:
            inside.discard(id(module))

    def _changed(next_fun, args, kwargs, module, name):
        if _index(name, "bn") is not None:
            train, x = not module.use_running_average, args[0]
            if variant == "dropout_before_bn" and train and rate > 0:
                keep = 1.0 - rate
                mask = jax.random.bernoulli(module.make_rng("dropout"), keep, x.shape)
                x = jnp.where(mask, x / keep, 0.0)
            out = next_fun(x, *args[1:], **kwargs)
            if variant == "noisy_bn" and train:
                k_scale, k_shift = jax.random.split(module.make_rng("dropout"))
                c = out.shape[-1]
                out = out * jax.random.uniform(k_scale, (c,), minval=NOISE_SCALE[0], maxval=NOISE_SCALE[1])
                out = out + jax.random.uniform(k_shift, (c,), minval=NOISE_SHIFT[0], maxval=NOISE_SHIFT[1])
            if capture:
                module.sow("intermediates", "io", (x, out))
            return out
        if (i := _index(name, "drop")) is not None:
            out = args[0] if _identity_drop(variant, i, layers) else next_fun(*args, **kwargs)
            if ablate is not None and name in ablate:
                out = out * ablate[name]
            if capture:
                module.sow("intermediates", "io", (args[0], out))
            return out
        return next_fun(*args, **kwargs)

    return intercept


@functools.lru_cache(maxsize=64)
def _linen_fns(spec: registry.ModelSpec, variant: str, rate: float):
    """Jitted functions per (architecture, variant); the learning rate lives in the
    optimizer state (``inject_hyperparams``), so a sweep over it compiles once."""
    model = spec.build_linen()
    layers = _hidden_layers(spec)

    def apply(*args, ablate=None, capture=False, **kwargs):
        with nn.intercept_methods(_interceptor(variant, rate, layers, ablate, capture)):
            return model.apply(*args, **kwargs)

    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)  # ftrain.sgd, lr injectable
    step = jax.jit(functools.partial(ftrain.linen_train_step, apply, tx), donate_argnums=0)

    @jax.jit
    def logits(params, batch_stats, x, ablate):
        return apply({"params": params, "batch_stats": batch_stats}, x, train=False, ablate=ablate)

    @jax.jit
    def captured(params, batch_stats, x):
        _, sown = apply(
            {"params": params, "batch_stats": batch_stats}, x, train=False, capture=True, mutable=["intermediates"]
        )
        return {k: v["io"][0] for k, v in sown["intermediates"].items()}

    @jax.jit
    def stochastic(params, x, key):  # models without BatchNorm only (train=True would switch it too)
        return apply({"params": params}, x, train=True, rngs={"dropout": key})

    def grad_shift(params, batch_stats, opt_state, x, y, layers: tuple[tuple[str, tuple[str, ...]], ...]):
        def loss(p):
            out, _ = apply(
                {"params": p, "batch_stats": batch_stats},
                x,
                train=True,
                rngs={"dropout": jax.random.key(0)},
                mutable=["batch_stats"],
            )
            return ftrain.cross_entropy(out, y)

        g = jax.grad(loss)(params)
        updates, _ = tx.update(g, opt_state, params)  # the optimizer's own step, from its state
        stepped = optax.apply_updates(params, updates)
        out = {}
        for layer, before in layers:
            moved = {k: stepped[k] if k in before else v for k, v in params.items()}
            a, b = g[layer]["kernel"], jax.grad(loss)(moved)[layer]["kernel"]
            cos = jnp.sum(a * b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))
            out[layer] = (jnp.linalg.norm(a - b), jnp.linalg.norm(a), cos)
        return out

    return tx, step, logits, captured, stochastic, jax.jit(grad_shift, static_argnames=("layers",))


class LinenNet:
    """A linen model under training, from the same torch initialisation (transferred); its
    state between steps lives here (the jitted step itself stays pure)."""

    def __init__(self, spec, ds, cfg, init: dict):
        if cfg.variant not in VARIANTS:
            raise ValueError(f"unknown variant {cfg.variant!r}; known: {', '.join(VARIANTS)}")
        self.spec, self.cfg = spec, cfg
        self.tx, self._step, self._logits, self._captured, self._stochastic, self._grad_shift = _linen_fns(
            spec, cfg.variant, float(cfg.dropout)
        )
        self.state = ftrain.linen_init_state(transfer.torch_to_linen(init, spec), self.tx)
        self.state.opt_state.hyperparams["learning_rate"] = jnp.asarray(cfg.lr, jnp.float32)
        self.key = jax.random.key(cfg.seed)
        self.data = {
            split: (jnp.asarray(to_flax_input(_inputs(spec, x))), jnp.asarray(y))
            for split, (x, y) in splits(ds).items()
        }

    def train_epoch(self, idxs) -> list[float]:
        x, y = self.data["train"]
        losses = []
        for idx in idxs:
            self.state, loss = self._step(self.state, x[idx], y[idx], self.key)
            losses.append(loss)
        return [float(v) for v in losses]

    def evaluate(self, split: str) -> tuple[float, float]:
        logits = self._logits(self.state.params, self.state.batch_stats, self.data[split][0], None)
        y = self.data[split][1]
        return float(ftrain.cross_entropy(logits, y)), float(jnp.mean(jnp.argmax(logits, -1) == y))

    def labels(self, split: str) -> np.ndarray:
        return np.asarray(self.data[split][1])

    def logits(self, split: str, ablate: dict[str, np.ndarray] | None = None, rows: int | None = None) -> np.ndarray:
        x = self.data[split][0][:rows]
        return np.asarray(self._logits(self.state.params, self.state.batch_stats, x, ablate))

    def stochastic_logits(self, split: str, passes: int) -> np.ndarray:
        if self.state.batch_stats:
            raise ValueError("Monte-Carlo dropout here needs a model without BatchNorm (train=True switches both)")
        keys = jax.random.split(jax.random.fold_in(self.key, 10**6), passes)
        x = self.data[split][0]
        return np.stack([np.asarray(self._stochastic(self.state.params, x, k)) for k in keys])

    def captured(self, split: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out = self._captured(self.state.params, self.state.batch_stats, self.data[split][0])
        return {k: (np.asarray(a), np.asarray(b)) for k, (a, b) in out.items()}

    def running_var(self) -> dict[str, np.ndarray]:
        """BatchNorm's running variance per layer (Flax keeps the biased batch variance)."""
        return {k: np.asarray(v["var"]) for k, v in self.state.batch_stats.items()}

    def gradient_shift(self, idx: np.ndarray, layers: dict[str, tuple[str, ...]]) -> dict[str, tuple[float, ...]]:
        x, y = (t[idx] for t in self.data["train"])
        frozen = tuple((k, tuple(v)) for k, v in layers.items())
        out = self._grad_shift(self.state.params, self.state.batch_stats, self.state.opt_state, x, y, frozen)
        return {k: tuple(float(v) for v in vals) for k, vals in out.items()}
