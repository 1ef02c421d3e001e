"""The mutations the spec tests must catch: one declarative entry per change.

An entry names the fact it attacks, the test that states the fact (a test function: its
parameter sets run, or those whose id contains ``select``), the change in words, the
change itself (a function of a ``pytest.MonkeyPatch``: a library behaviour, or the test's
expected value) and what the failure must look like (``expect``). ``scripts/mutate.py``
applies each through a pytest plugin, runs the test and expects it to fail that way.
Nothing is edited on disk, and every change is undone after its test.

The library modules are imported inside the mutation functions, so listing the table
(``python scripts/mutate.py --list``) imports neither torch nor jax.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest

# what a failure "for the fact's reason" looks like: a failed assertion (a bare ``assert``,
# numpy's or torch's), a pytest.raises that did not raise or matched another message
# (an AssertionError too), or pytest.fail
ASSERTION = r"^(AssertionError|assert |Failed: )"


@dataclass(frozen=True)
class Mutation:
    name: str
    fact: str
    test: str
    what: str
    apply: Callable[[pytest.MonkeyPatch], None]
    expect: str = ASSERTION
    select: str | None = None  # run only the parameter sets whose id contains this


# --- Flax dropout ------------------------------------------------------------------------


def _flax_dropout_subclasses(call: Callable) -> Callable[[pytest.MonkeyPatch], None]:
    """Replace linen's and nnx's Dropout with a subclass whose output is ``call(self,
    inputs, y)``, ``y`` being the stock output (its zeros are the stock mask)."""

    def apply(mp: pytest.MonkeyPatch) -> None:
        from flax import linen as nn
        from flax import nnx

        for module, base in ((nn, nn.Dropout), (nnx, nnx.Dropout)):

            class Mutant(base):
                def __call__(self, inputs, *args, **kwargs):
                    return call(self, inputs, super().__call__(inputs, *args, **kwargs))

            mp.setattr(module, "Dropout", Mutant)

    return apply


def _true_division(self, inputs, y):
    import jax
    import jax.numpy as jnp

    # a full-size divisor that XLA cannot see as a constant or as a broadcast scalar (either
    # is rewritten into a product with the reciprocal): a real division, eagerly and under jit
    keep = jax.lax.optimization_barrier(jnp.full_like(inputs, 1.0 - self.rate))
    return jnp.where(y != 0, jax.lax.div(inputs, keep), y)


def _multiplied_mask(self, inputs, y):
    # torch's way: x * mask / keep (a dropped inf becomes NaN, a dropped -2 becomes -0)
    return inputs * (y != 0).astype(inputs.dtype) / (1.0 - self.rate)


def _flip_the_eager_division_rule(mp: pytest.MonkeyPatch) -> None:
    module = importlib.import_module("test_spec_dropout")
    rule = module.jax_divides_eagerly
    mp.setattr(module, "jax_divides_eagerly", lambda: not rule())


# --- torch dropout and BatchNorm --------------------------------------------------------


def _torch_dropout_selects(mp: pytest.MonkeyPatch) -> None:
    import torch
    import torch.nn.functional as F

    stock = F.dropout

    def dropout(input, p=0.5, training=True, inplace=False):
        kept = stock(torch.ones_like(input), p, training) != 0
        return torch.where(kept, input * (1 / (1 - p)), torch.zeros_like(input))

    mp.setattr(F, "dropout", dropout)


def _torch_autocast_recasts_batchnorm(mp: pytest.MonkeyPatch) -> None:
    import torch
    import torch.nn.functional as F

    stock = F.batch_norm

    def batch_norm(input, *args, **kwargs):
        out = stock(input, *args, **kwargs)
        device = input.device.type
        return out.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else out

    mp.setattr(F, "batch_norm", batch_norm)


def _torch_checks_the_batch_size_first(mp: pytest.MonkeyPatch) -> None:
    import torch.nn.functional as F
    from torch.nn.modules.batchnorm import _BatchNorm

    stock = _BatchNorm.forward

    def forward(self, input):
        if self.training:
            F._verify_batch_size(input.size())  # before the counter moves
        return stock(self, input)

    mp.setattr(_BatchNorm, "forward", forward)


def _torch_replace_batchnorm_is_a_no_op(mp: pytest.MonkeyPatch) -> None:
    import torch

    mp.setattr(torch.func, "replace_all_batch_norm_modules_", lambda root: root)


def _torch_functional_call_copies(mp: pytest.MonkeyPatch) -> None:
    import torch

    stock = torch.func.functional_call

    def functional_call(module, tensors, args, kwargs=None, **options):
        own = {name: b.clone() for name, b in module.named_buffers()}
        given = {name: t.clone() if name in own else t for name, t in tensors.items()}
        return stock(module, {**own, **given}, args, kwargs, **options)

    mp.setattr(torch.func, "functional_call", functional_call)


def _torch_grad_allows_captured_mutation(mp: pytest.MonkeyPatch) -> None:
    import torch

    def grad(f, argnums=0):  # plain autograd: no check on captured tensors
        def g(params, *rest):
            leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            out = f(leaves, *rest)
            return dict(zip(leaves, torch.autograd.grad(out, list(leaves.values())), strict=True))

        return g

    mp.setattr(torch.func, "grad", grad)


def _torch_adamw_skips_1d(mp: pytest.MonkeyPatch) -> None:
    import torch

    class AdamW(torch.optim.AdamW):
        def __init__(self, params, *args, **kwargs):
            params = list(params)
            groups = [{"params": [p for p in params if p.ndim > 1]}]
            groups.append({"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0})
            super().__init__([g for g in groups if g["params"]], *args, **kwargs)

    mp.setattr(torch.optim, "AdamW", AdamW)


def _torch_compile_wrapper(after: Callable) -> Callable[[pytest.MonkeyPatch], None]:
    """torch.compile returning a (not compiled) wrapper that runs ``after(model, inputs)``."""

    def apply(mp: pytest.MonkeyPatch) -> None:
        import torch

        mp.setattr(torch, "compile", lambda model, *args, **kwargs: lambda *inputs: after(model, inputs))

    return apply


def _on_copied_buffers(model, inputs):
    """The forward on copies of the buffers: the parameters get their gradients, the
    BatchNorm update never reaches the module (a functionalised graph that drops it)."""
    import torch

    tensors = {**dict(model.named_parameters()), **{k: b.clone() for k, b in model.named_buffers()}}
    return torch.func.functional_call(model, tensors, inputs)


# --- Flax BatchNorm, optax, nnx -----------------------------------------------------------


def _flax_refuses_one_value_per_channel(mp: pytest.MonkeyPatch) -> None:
    import math

    from flax.linen import normalization as linen_norm
    from flax.nnx.nn import normalization as nnx_norm

    for module in (linen_norm, nnx_norm):
        stock = module._compute_stats

        def compute_stats(x, axes, *args, _stock=stock, **kwargs):
            if math.prod(x.shape[a] for a in axes) == 1:
                raise ValueError("mutant: more than 1 value per channel expected")
            return _stock(x, axes, *args, **kwargs)

        mp.setattr(module, "_compute_stats", compute_stats)


def _pmean_ignores_unbound_axes(mp: pytest.MonkeyPatch) -> None:
    import jax

    stock = jax.lax.pmean

    def pmean(x, axis_name, **kwargs):
        try:
            return stock(x, axis_name, **kwargs)
        except NameError:
            return x

    mp.setattr(jax.lax, "pmean", pmean)


def _optax_adamw_mask(mask_of: Callable) -> Callable[[pytest.MonkeyPatch], None]:
    def apply(mp: pytest.MonkeyPatch) -> None:
        import optax

        stock = optax.adamw

        def adamw(*args, mask=None, **kwargs):
            return stock(*args, mask=mask if mask is not None else mask_of, **kwargs)

        mp.setattr(optax, "adamw", adamw)

    return apply


def _only_nd(tree):
    import jax

    return jax.tree.map(lambda x: x.ndim > 1, tree)


def _not_batch_stats(tree):
    import jax

    return {k: jax.tree.map(lambda _, keep=k != "batch_stats": keep, v) for k, v in tree.items()}


def _linen_vmap_split_rngs(override: Callable[[dict], dict]) -> Callable[[pytest.MonkeyPatch], None]:
    def apply(mp: pytest.MonkeyPatch) -> None:
        from flax import linen as nn

        stock = nn.vmap

        def vmap(target, *args, **kwargs):
            kwargs["split_rngs"] = override(dict(kwargs.get("split_rngs", {})))
            return stock(target, *args, **kwargs)

        mp.setattr(nn, "vmap", vmap)

    return apply


def _nnx_reseed_dropout_also_default(mp: pytest.MonkeyPatch) -> None:
    from flax import nnx

    stock = nnx.reseed

    def reseed(node, **seeds):
        if "dropout" in seeds:
            seeds.setdefault("default", seeds["dropout"])
        return stock(node, **seeds)

    mp.setattr(nnx, "reseed", reseed)


def _nnx_merge_copies(mp: pytest.MonkeyPatch) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    stock = nnx.merge
    mp.setattr(
        nnx, "merge", lambda graphdef, state, *rest, **kw: stock(graphdef, jax.tree.map(jnp.copy, state), *rest, **kw)
    )


def _nnx_state_copies(mp: pytest.MonkeyPatch) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    stock = nnx.state
    mp.setattr(nnx, "state", lambda node, *filters: jax.tree.map(jnp.copy, stock(node, *filters)))


def _nnx_eval_returns_the_module(mp: pytest.MonkeyPatch) -> None:
    from flax import nnx

    stock = nnx.Module.eval

    def eval(self, **attributes):
        stock(self, **attributes)
        return self

    mp.setattr(nnx.Module, "eval", eval)


def _nnx_view_switches_the_original(mp: pytest.MonkeyPatch) -> None:
    from flax import nnx

    stock = nnx.view

    def view(node, /, **kwargs):
        out = stock(node, **kwargs)
        node.eval()
        return out

    mp.setattr(nnx, "view", view)


def _nnx_view_copies(mp: pytest.MonkeyPatch) -> None:
    from flax import nnx

    stock = nnx.view
    mp.setattr(nnx, "view", lambda node, /, **kwargs: stock(nnx.clone(node), **kwargs))


def _nnx_attribute_wins(mp: pytest.MonkeyPatch) -> None:
    from flax import nnx

    for cls, argument in ((nnx.BatchNorm, "use_running_average"), (nnx.Dropout, "deterministic")):
        stock = cls.__call__

        def call(self, x, *args, _stock=stock, _argument=argument, **kwargs):
            kwargs.pop(_argument, None)  # the call argument is dropped: the attribute decides
            return _stock(self, x, *args, **kwargs)

        mp.setattr(cls, "__call__", call)


def _jax_jit_off_by_1e4(mp: pytest.MonkeyPatch) -> None:
    import jax
    import jax.numpy as jnp

    stock = jax.jit

    def jit(fun, **kwargs):
        compiled = stock(fun, **kwargs)

        def off(*args, **kw):
            scale = lambda v: v * (1 + 1e-4) if jnp.issubdtype(v.dtype, jnp.floating) else v  # noqa: E731
            return jax.tree.map(scale, compiled(*args, **kw))

        return off

    mp.setattr(jax, "jit", jit)


D, T, R, F = (f"tests/test_spec_{name}.py::" for name in ("dropout", "traps", "training", "functional"))
SCALING = D + "test_kept_units_are_multiplied_by_one_over_keep_except_eager_flax_before_jaxlib_0_10_1_which_divides"
INF = D + "test_torch_turns_a_dropped_inf_into_nan_at_any_rate_and_flax_into_zero"
NEG = D + "test_a_dropped_negative_value_is_minus_zero_in_torch_and_plus_zero_in_flax"
VMAP = T + "test_linen_vmap_raises_without_dropout_in_split_rngs_and_repeats_the_mask_with_split_false"
VIEW = T + "test_nnx_view_returns_an_eval_mode_module_and_leaves_the_original_in_training_mode"
DECAY = R + "test_adamw_decays_the_batchnorm_scale_and_bias_by_default_in_torch_and_in_optax"
COMPILE = R + "test_torch_compile_training_steps_match_eager_ones_in_loss_gradients_and_running_statistics"

MUTATIONS = [
    Mutation(
        "flax-dropout-divides",
        "dropout.inverted_scaling",
        SCALING,
        "Flax's dropout divides by a runtime 1 - rate (no rewrite into a product), eagerly and under jit",
        _flax_dropout_subclasses(_true_division),
        select="0.25",
    ),
    Mutation(
        "expected-eager-rule-flipped",
        "dropout.inverted_scaling",
        SCALING,
        "the expected eager rule flipped (division from jaxlib 0.10.1, product before)",
        _flip_the_eager_division_rule,
        select="0.25",
    ),
    Mutation(
        "torch-dropout-selects-inf",
        "dropout.torch.dropped_inf_becomes_nan_at_any_rate",
        INF,
        "torch's dropout selects zeros for dropped units instead of multiplying",
        _torch_dropout_selects,
        select="0.5",
    ),
    Mutation(
        "flax-dropout-multiplies-inf",
        "dropout.torch.dropped_inf_becomes_nan_at_any_rate",
        INF,
        "Flax's dropout multiplies by the mask instead of selecting",
        _flax_dropout_subclasses(_multiplied_mask),
        select="0.5",
    ),
    Mutation(
        "torch-dropout-selects-negative",
        "dropout.dropped_negative_is_minus_zero_in_torch_plus_zero_in_flax",
        NEG,
        "torch's dropout selects zeros for dropped units instead of multiplying",
        _torch_dropout_selects,
    ),
    Mutation(
        "flax-dropout-multiplies-negative",
        "dropout.dropped_negative_is_minus_zero_in_torch_plus_zero_in_flax",
        NEG,
        "Flax's dropout multiplies by the mask instead of selecting",
        _flax_dropout_subclasses(_multiplied_mask),
    ),
    Mutation(
        "nnx-reseed-dropout-also-default",
        "dropout.nnx.falls_back_to_the_default_stream",
        T + "test_nnx_dropout_without_a_dropout_stream_draws_from_default_and_reseeding_dropout_misses_it",
        "nnx.reseed(dropout=s) reseeds the default stream too",
        _nnx_reseed_dropout_also_default,
    ),
    Mutation(
        "linen-vmap-passes-unnamed-streams",
        "dropout.linen.vmap_without_split_rngs_repeats_the_mask",
        VMAP,
        "nn.vmap passes a stream left out of split_rngs through, unsplit",
        _linen_vmap_split_rngs(lambda split: {"dropout": False, **split}),
    ),
    Mutation(
        "linen-vmap-always-splits",
        "dropout.linen.vmap_without_split_rngs_repeats_the_mask",
        VMAP,
        "nn.vmap splits the dropout stream even when told False",
        _linen_vmap_split_rngs(lambda split: {**split, "dropout": True}),
    ),
    Mutation(
        "torch-autocast-recasts-batchnorm",
        "bn.mixed_precision_output_and_statistics_dtypes",
        T + "test_in_mixed_precision_flax_returns_float32_and_torch_keeps_the_input_dtype_even_under_autocast",
        "autocast casts BatchNorm's output to the autocast dtype",
        _torch_autocast_recasts_batchnorm,
    ),
    Mutation(
        "pmean-ignores-unbound-axes",
        "bn.flax.axis_name_fails_outside_a_mapped_axis_in_training_only",
        T + "test_flax_batchnorm_with_an_axis_name_fails_outside_shard_map_or_pmap_in_training_only",
        "lax.pmean over an unbound axis returns its input",
        _pmean_ignores_unbound_axes,
    ),
    Mutation(
        "nnx-eval-returns-the-module",
        "bn.nnx.eval_returns_none_not_the_module",
        T + "test_nnx_eval_and_train_switch_the_module_in_place_and_return_none",
        "nnx's .eval() returns the module, like torch's",
        _nnx_eval_returns_the_module,
    ),
    Mutation(
        "nnx-view-switches-the-original",
        "bn.nnx.view_gives_an_eval_copy_and_leaves_the_original_training",
        VIEW,
        "nnx.view also switches the original to eval",
        _nnx_view_switches_the_original,
    ),
    Mutation(
        "nnx-view-copies",
        "bn.nnx.view_gives_an_eval_copy_and_leaves_the_original_training",
        VIEW,
        "nnx.view returns a view of a copy (its own Variables)",
        _nnx_view_copies,
    ),
    Mutation(
        "nnx-attribute-wins",
        "bn.nnx.call_arguments_override_eval",
        T + "test_nnx_call_time_use_running_average_and_deterministic_override_eval",
        "the use_running_average / deterministic attribute wins over the call argument",
        _nnx_attribute_wins,
    ),
    Mutation(
        "torch-checks-batch-size-first",
        "bn.torch.batch_of_one_is_counted_before_it_raises",
        R + "test_a_torch_batch_of_one_raises_after_num_batches_tracked_was_incremented",
        "BatchNorm checks for one value per channel before counting the batch",
        _torch_checks_the_batch_size_first,
    ),
    Mutation(
        "flax-refuses-one-value-per-channel",
        "bn.flax.batches_of_one_drive_the_running_variance_to_zero",
        R + "test_stock_flax_trained_on_batches_of_one_drives_the_running_variance_to_zero_and_eval_blows_up",
        "Flax BatchNorm raises on one value per channel, like torch",
        _flax_refuses_one_value_per_channel,
        expect=r"^ValueError: mutant: more than 1 value per channel expected",
    ),
    Mutation(
        "torch-adamw-skips-1d",
        "optim.weight_decay_reaches_batchnorm_scale_and_bias_by_default",
        DECAY,
        "torch's AdamW does not decay 1-D parameters",
        _torch_adamw_skips_1d,
    ),
    Mutation(
        "optax-adamw-skips-1d",
        "optim.weight_decay_reaches_batchnorm_scale_and_bias_by_default",
        DECAY,
        "optax.adamw does not decay 1-D parameters by default",
        _optax_adamw_mask(_only_nd),
    ),
    Mutation(
        "optax-adamw-skips-batch-stats",
        "optim.optax_over_all_linen_variables_decays_batch_stats_unless_masked",
        R + "test_an_optax_optimizer_over_the_whole_linen_variables_decays_the_batch_statistics_unless_masked",
        "optax.adamw leaves a batch_stats collection alone by default",
        _optax_adamw_mask(_not_batch_stats),
    ),
    Mutation(
        "torch-compile-loses-the-buffer-update",
        "train.torch.compile_steps_match_eager_steps",
        COMPILE,
        "the compiled step does not write BatchNorm's buffers back",
        _torch_compile_wrapper(_on_copied_buffers),
    ),
    Mutation(
        "torch-compile-off-by-1e-4",
        "train.torch.compile_steps_match_eager_steps",
        COMPILE,
        "the compiled forward is 1e-4 off (relative)",
        _torch_compile_wrapper(lambda model, inputs: model(*inputs) * (1 + 1e-4)),
    ),
    Mutation(
        "jax-jit-off-by-1e-4",
        "train.jax.jit_steps_match_eager_steps",
        R + "test_jax_jit_training_steps_match_eager_ones_in_loss_gradients_and_batch_statistics",
        "every floating output of a jitted function is 1e-4 off (relative)",
        _jax_jit_off_by_1e4,
    ),
    Mutation(
        "torch-replace-batchnorm-no-op",
        "bn.torch.func_vmap_over_train_batchnorm_raises_and_the_fix_drops_running_statistics",
        F + "test_torch_func_vmap_over_a_train_batchnorm_raises_and_the_patch_deletes_the_running_statistics",
        "replace_all_batch_norm_modules_ leaves the module as it was",
        _torch_replace_batchnorm_is_a_no_op,
    ),
    Mutation(
        "torch-functional-call-copies",
        "bn.torch.functional_call_updates_the_given_buffers_else_the_modules_own",
        F + "test_torch_functional_call_updates_the_modules_own_buffers_unless_buffers_are_passed_and_then_those",
        "functional_call works on copies of the buffers",
        _torch_functional_call_copies,
    ),
    Mutation(
        "torch-grad-allows-captured-mutation",
        "bn.torch.func_grad_raises_on_buffers_captured_in_a_closure",
        F + "test_torch_func_grad_raises_when_a_train_batchnorm_updates_buffers_captured_in_a_closure",
        "torch.func.grad lets a function mutate captured tensors",
        _torch_grad_allows_captured_mutation,
    ),
    Mutation(
        "nnx-merge-copies",
        "bn.nnx.split_merge_without_returned_state_loses_statistics",
        F + "test_nnx_merge_inside_jax_jit_loses_the_statistics_unless_returned_but_an_eager_merge_updates_the_callers",
        "nnx.merge copies the state it is given",
        _nnx_merge_copies,
    ),
    Mutation(
        "nnx-state-copies",
        "bn.nnx.state_holds_the_modules_variables_not_a_copy",
        F + "test_nnx_state_holds_the_modules_variables_so_a_later_training_call_changes_it",
        "nnx.state returns copies of the Variables",
        _nnx_state_copies,
    ),
]
BY_NAME = {m.name: m for m in MUTATIONS}
assert len(BY_NAME) == len(MUTATIONS), "two mutations share a name"
