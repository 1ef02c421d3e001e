"""The spec of functional transforms around BatchNorm's state: ``torch.func`` (``vmap``,
``functional_call``, ``grad``) and NNX's functional API (``nnx.split``/``merge``,
``nnx.state``/``update``). Which buffers or Variables a call changes, and which it cannot.
Every test docstring ends with what it catches (``scripts/mutate.py`` applies it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

spec = pytest.mark.spec


def _x(*shape: int, seed: int = 0, loc: float = 0.0) -> torch.Tensor:
    return loc + torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _normalised(x: torch.Tensor) -> torch.Tensor:
    """Training-mode BatchNorm of (N, C) with default weight 1 and bias 0."""
    return (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)


@spec("bn.torch.func_vmap_over_train_batchnorm_raises_and_the_fix_drops_running_statistics", framework="torch")
def test_torch_func_vmap_over_a_train_batchnorm_raises_and_the_patch_deletes_the_running_statistics():
    """``torch.func.vmap`` over a train-mode BatchNorm would write per-member statistics into
    one unbatched buffer, so it raises (pytorch/functorch#273) - after counting the batch, as
    with a batch of one. ``replace_all_batch_norm_modules_`` (functorch PR #505) makes it
    work by deleting ``running_mean``, ``running_var`` and ``num_batches_tracked`` and
    setting ``track_running_stats=False``: each member is normalised with its own batch
    statistics, and so is every later eval-mode call (no running statistics are left).

    Catches: the patch leaving the module as it was; the patch keeping running statistics
    that eval would use."""
    bn = torch.nn.BatchNorm1d(3)
    x = _x(4, 8, 3)  # 4 members, each a batch of 8
    with pytest.raises(
        RuntimeError, match="running_mean or running_var, which will be updated in place, were not batched"
    ):
        torch.func.vmap(bn)(x)
    assert int(bn.num_batches_tracked) == 1  # the failed call was counted
    torch.func.replace_all_batch_norm_modules_(bn)
    assert (bn.running_mean, bn.running_var, bn.num_batches_tracked) == (None, None, None)
    assert not bn.track_running_stats and list(bn.state_dict()) == ["weight", "bias"]
    y = torch.func.vmap(bn)(x)
    torch.testing.assert_close(y, torch.stack([_normalised(m) for m in x]), rtol=1e-5, atol=1e-5)  # measured 2.4e-7
    with torch.no_grad():
        y_eval = bn.eval()(x[0] + 3.0)
    # batch statistics (the shift of 3 is gone): measured 3e-7
    torch.testing.assert_close(y_eval, _normalised(x[0]), rtol=1e-5, atol=1e-5)


@spec("bn.torch.functional_call_updates_the_given_buffers_else_the_modules_own", framework="torch")
def test_torch_functional_call_updates_the_modules_own_buffers_unless_buffers_are_passed_and_then_those():
    """``torch.func.functional_call(module, params, x)`` swaps in only what it is given: with
    parameters alone a train-mode BatchNorm updates the module's own buffers in place (a
    "pure" call is not pure); with the buffers passed too, the passed tensors are updated in
    place and the module's stay as they were.

    Catches: functional_call working on copies (neither the module's nor the given buffers
    change)."""
    x = _x(8, 3, loc=3.0)
    bn = torch.nn.BatchNorm1d(3)
    params = {k: v.detach().clone() for k, v in bn.named_parameters()}
    torch.func.functional_call(bn, params, (x,))
    # here and below: measured 3e-8 (one float32 rounding of values near 0.3)
    torch.testing.assert_close(bn.running_mean, 0.1 * x.mean(0), rtol=1e-6, atol=1e-7)
    assert int(bn.num_batches_tracked) == 1

    bn = torch.nn.BatchNorm1d(3)
    buffers = {k: v.clone() for k, v in bn.named_buffers()}
    torch.func.functional_call(bn, {**params, **buffers}, (x,))
    torch.testing.assert_close(buffers["running_mean"], 0.1 * x.mean(0), rtol=1e-6, atol=1e-7)
    assert int(buffers["num_batches_tracked"]) == 1
    assert not bn.running_mean.any() and int(bn.num_batches_tracked) == 0  # the module's own are untouched


@spec("bn.torch.func_grad_raises_on_buffers_captured_in_a_closure", framework="torch")
def test_torch_func_grad_raises_when_a_train_batchnorm_updates_buffers_captured_in_a_closure():
    """Under ``torch.func.grad`` a train-mode BatchNorm's in-place update of buffers the
    function closes over (the module's own, or a dict captured from outside) raises
    (pytorch#85533): "would mutate a captured Tensor". Passing the buffers as an argument of
    the transformed function works, and updates them in place.

    Catches: grad allowing the mutation of captured tensors."""
    x = _x(8, 3, loc=3.0)
    bn = torch.nn.BatchNorm1d(3)
    params = {k: v.detach().clone() for k, v in bn.named_parameters()}
    buffers = {k: v.clone() for k, v in bn.named_buffers()}

    def captured(params):
        return torch.func.functional_call(bn, {**params, **buffers}, (x,)).pow(3).sum()

    def passed(params, buffers):
        return torch.func.functional_call(bn, {**params, **buffers}, (x,)).pow(3).sum()

    for loss in (captured, lambda p: torch.func.functional_call(bn, p, (x,)).pow(3).sum()):
        with pytest.raises(RuntimeError, match="would mutate a captured Tensor"):
            torch.func.grad(loss)(params)
    grads = torch.func.grad(passed)(params, buffers)
    assert set(grads) == {"weight", "bias"} and grads["weight"].abs().sum() > 0
    torch.testing.assert_close(buffers["running_mean"], 0.1 * x.mean(0), rtol=1e-6, atol=1e-7)  # measured 3e-8


@spec("bn.nnx.split_merge_without_returned_state_loses_statistics", framework="nnx")
def test_nnx_merge_inside_jax_jit_loses_the_statistics_unless_returned_but_an_eager_merge_updates_the_callers():
    """Under ``jax.jit``, a function that merges, runs in train mode and returns only the
    output leaves the caller's state (and the module it was split from) as they were: the
    update exists only inside the trace. Return ``nnx.state(module)`` and ``nnx.update`` the
    module with it. Run eagerly, the same merge builds the module from the caller's own
    Variables, so the caller's state - and the original module - do change.

    Catches: a merge that copies the state (eager calls then update nothing)."""
    bn = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(bn)
    x = jnp.arange(12.0).reshape(4, 3) + 5.0

    @jax.jit
    def forgets(state, x):
        return nnx.merge(graphdef, state)(x)

    @jax.jit
    def returns(state, x):
        module = nnx.merge(graphdef, state)
        return module(x), nnx.state(module)

    forgets(state, x)
    assert not np.any(state["mean"][...]) and not np.any(bn.mean[...])  # nothing came back
    _, new = returns(state, x)
    want = 0.01 * np.asarray(x).mean(0)  # momentum 0.99; measured exact (0.0) here and below
    np.testing.assert_allclose(new["mean"][...], want, rtol=1e-6, atol=1e-7)
    assert not np.any(bn.mean[...])  # ...until the caller applies it
    nnx.update(bn, new)
    np.testing.assert_allclose(bn.mean[...], want, rtol=1e-6, atol=1e-7)

    bn = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(bn)
    nnx.merge(graphdef, state)(x)  # eagerly: the merged module holds the caller's Variables
    np.testing.assert_allclose(state["mean"][...], want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(bn.mean[...], want, rtol=1e-6, atol=1e-7)


@spec("bn.nnx.state_holds_the_modules_variables_not_a_copy", framework="nnx")
def test_nnx_state_holds_the_modules_variables_so_a_later_training_call_changes_it():
    """``nnx.state(module)`` is not a snapshot: it holds the module's Variables, so a later
    train-mode call changes the statistics it shows (a "saved" state saved nothing). A
    snapshot is a copy of the arrays, e.g. ``jax.tree.map(jnp.copy, nnx.state(module))``.

    Catches: nnx.state returning copies."""
    bn = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    saved = nnx.state(bn, nnx.BatchStat)
    snapshot = jax.tree.map(jnp.copy, saved)
    bn(jnp.arange(12.0).reshape(4, 3) + 5.0)
    assert np.all(np.asarray(saved["mean"][...]) > 0)  # moved with the module
    assert not np.any(snapshot["mean"][...])
