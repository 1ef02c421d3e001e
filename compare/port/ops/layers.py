"""Layers with weights or randomness: Conv, Linear, BatchNorm, LayerNorm, GroupNorm,
Dropout and stochastic depth, in module form or as a function given a module's own
parameters (``F.conv2d(x, self.weight)``, ``F.layer_norm(x, ..., self.weight, self.bias)``).

Each declares its Flax layer at the torch module's path and moves its tensors with the
transfer's rules (``compare.transfer.LAYER_RULES``). A LayerNorm over several trailing
axes, which the transfer refuses, normalises them flattened into one, so its weight and
bias move flattened too.
"""

from __future__ import annotations

import functools

import numpy as np
from torch import nn as tnn

from compare import conventions
from compare.port.layout import Layout
from compare.port.ops.table import Call
from compare.port.ops.values import Site, Unsupported, constant, flax_path, ints
from compare.transfer import LAYER_RULES


def _reshape(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.reshape(a, shape)


def _flax_key(collection: str, path: str, name: str) -> str:
    return "/".join([collection, *flax_path(path).split("."), name])


def _rule(kind: type, e, torch_key: str, path: str, name: str) -> None:
    collection, flax_name, to_flax, to_torch = LAYER_RULES[kind][name]
    e.move(torch_key, _flax_key(collection, path, flax_name), to_flax, to_torch)


def _params(e, c: Call, names: tuple[str, ...]) -> tuple[str, dict[str, str | None], dict]:
    """(Flax layer path, {name: torch key or None}, {name: shape}) of a layer's parameters:
    the module's own, or the ``get_attr`` arguments of a function (all of one module; the
    layer sits at that module's path, or at ``path.attribute`` for other names than
    ``weight``)."""
    if c.form == "module":
        keys = {n: (f"{c.path}.{n}" if getattr(c.module, n, None) is not None else None) for n in names}
        return c.path, keys, {n: tuple(getattr(c.module, n).shape) for n, k in keys.items() if k}
    found = {n: e.param_of(c.args[n], n) for n in names if c.args.get(n) is not None}
    if not found:
        raise Unsupported("no parameters given")
    owners = {owner for owner, _, _ in found.values()}
    if len(owners) > 1:
        raise Unsupported(f"the parameters come from different modules: {sorted(owners)}")
    owner = owners.pop()
    first = next(iter(found.values()))[1]
    path = owner if first in names else ".".join(filter(None, [owner, first]))
    path = path or c.node.name  # the network's own parameters: a layer named after the node
    keys = {n: (".".join(filter(None, [found[n][0], found[n][1]])) if n in found else None) for n in names}
    return path, keys, {n: found[n][2] for n in found}


def _padding(padding, kernel: tuple[int, ...], dilation: tuple[int, ...], stride: tuple[int, ...]):
    if padding == "valid":
        return tuple((0, 0) for _ in kernel)
    if padding == "same":  # torch: total d*(k-1), the odd one on the right
        if any(s != 1 for s in stride):
            raise Unsupported("padding='same' needs stride 1 (as in torch)")
        return tuple((d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(kernel, dilation, strict=True))
    return tuple((p, p) for p in ints(padding, len(kernel)))


def conv(e, c: Call) -> None:
    n = c.args["spatial"]
    x = e.tensor(c.args["input"], lambda lay: lay == Layout.channels_last(n + 2), Layout.channels_last(n + 2))
    path, keys, shapes = _params(e, c, ("weight", "bias"))
    if c.form == "module":
        m = c.module
        if m.padding_mode != "zeros":
            raise Unsupported(f"padding_mode={m.padding_mode!r} (only 'zeros' ports)")
        groups, kernel, stride, dilation, padding = m.groups, m.kernel_size, m.stride, m.dilation, m.padding
    else:
        groups = constant(c.args["groups"], "groups")
        kernel = shapes["weight"][2:]
        stride, dilation = (
            ints(constant(c.args["stride"], "stride"), n),
            ints(constant(c.args["dilation"], "dilation"), n),
        )
        padding = constant(c.args["padding"], "padding")
    out_ch, in_ch = shapes["weight"][0], shapes["weight"][1] * groups
    pads = _padding(padding, tuple(kernel), tuple(dilation), tuple(stride))
    options = f"padding={pads}"
    options += f", strides={tuple(stride)}" if any(s != 1 for s in stride) else ""
    options += f", kernel_dilation={tuple(dilation)}" if any(d != 1 for d in dilation) else ""
    options += f", feature_group_count={groups}" if groups != 1 else ""
    options += ", use_bias=False" if keys["bias"] is None else ""
    layer = e.layer(
        path,
        f"nn.Conv({out_ch}, {tuple(kernel)}, {options})",
        f"nnx.Conv({in_ch}, {out_ch}, {tuple(kernel)}, {options}, rngs=rngs)",
    )
    kind = tnn.Conv1d if n == 1 else tnn.Conv2d
    for name, key in keys.items():
        if key:
            _rule(kind, e, key, path, name)
    e.out_tensor(f"{layer}({x.name})", Layout.channels_last(n + 2))


def _flat_rule(flat) -> tuple | None:
    """The transfer's rule for a Linear reading a flattened channels-last map, or None."""
    if flat.order == (1, 2, 0) and len(flat.shape) == 3:
        chw = flat.shape
    elif flat.order == (1, 0) and len(flat.shape) == 2:
        chw = (flat.shape[0], 1, flat.shape[1])  # (C, L) is (C, 1, L)
    else:
        return None
    return (
        functools.partial(conventions.flattened_linear_to_dense, chw=chw),
        functools.partial(conventions.dense_to_flattened_linear, chw=chw),
    )


def linear(e, c: Call) -> None:
    value = e.value(c.args["input"])
    rule = _flat_rule(value.layout.flat) if getattr(value, "layout", None) and value.layout.flat else None
    x = e.tensor(
        c.args["input"],
        lambda lay: lay.perm[-1] == lay.ndim - 1 and (lay.flat is None or rule is not None),
        Layout.identity(getattr(value, "ndim", 1)),
    )
    path, keys, shapes = _params(e, c, ("weight", "bias"))
    out_f, in_f = shapes["weight"]
    bias = "" if keys["bias"] else ", use_bias=False"
    layer = e.layer(path, f"nn.Dense({out_f}{bias})", f"nnx.Linear({in_f}, {out_f}{bias}, rngs=rngs)")
    if x.layout.flat is not None:
        e.move(keys["weight"], _flax_key("params", path, "kernel"), *rule)
        comment = f"kernel rows permuted at transfer: it reads torch's flatten of {x.layout.flat.shape} in Flax's order"
    else:
        _rule(tnn.Linear, e, keys["weight"], path, "weight")
        comment = ""
    if keys["bias"]:
        _rule(tnn.Linear, e, keys["bias"], path, "bias")
    e.out_tensor(f"{layer}({x.name})", Layout(x.layout.perm), comment)


def batch_norm(e, c: Call) -> None:
    m = c.module
    x = e.tensor(
        c.args["input"],
        lambda lay: lay.flat is None and lay.perm[-1] == 1,
        Layout.channels_last(e.value(c.args["input"]).ndim),
    )
    momentum = None if m.momentum is None else conventions.torch_to_flax_momentum(m.momentum)
    options = f"momentum={momentum}, epsilon={m.eps}"
    options += "" if m.affine else ", use_scale=False, use_bias=False"
    options += "" if m.track_running_stats else ", track_running_stats=False"
    layer = e.layer(
        c.path, f"flaxbn.LinenTorchBatchNorm({options})", f"flaxbn.NnxTorchBatchNorm({m.num_features}, {options})"
    )
    for name, tensor in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
        if tensor is not None:
            _rule(tnn.BatchNorm2d, e, f"{c.path}.{name}", c.path, name)
    call = f"{layer}({x.name}, use_running_average={e.not_train()})" if e.api == "linen" else f"{layer}({x.name})"
    e.out_tensor(call, x.layout)


def layer_norm(e, c: Call) -> None:
    normalized = constant(c.args["normalized_shape"], "normalized_shape")
    shape = (normalized,) if isinstance(normalized, int) else tuple(normalized)
    eps = c.module.eps if c.module is not None else constant(c.args["eps"], "eps")
    k, ndim = len(shape), e.value(c.args["input"]).ndim
    trailing = tuple(range(ndim - k, ndim))
    x = e.tensor(
        c.args["input"],
        lambda lay: lay.flat is None and lay.perm[-k:] == trailing,
        Layout(tuple(t for t in e.value(c.args["input"]).layout.perm if t < ndim - k) + trailing),
    )
    path, keys, _ = _params(e, c, ("weight", "bias"))
    size = int(np.prod(shape))
    options = f"epsilon={eps}, use_fast_variance=False"  # torch's eps and two-pass variance
    options += "" if keys["weight"] else ", use_scale=False"
    options += "" if keys["bias"] else ", use_bias=False"
    layer = e.layer(path, f"nn.LayerNorm({options})", f"nnx.LayerNorm({size}, {options}, rngs=rngs)")
    for name, key in keys.items():
        if key and k == 1:
            _rule(tnn.LayerNorm, e, key, path, name)
        elif key:  # (normalized_shape) -> (prod,)
            flax_name = LAYER_RULES[tnn.LayerNorm][name][1]
            to_flax, to_torch = (functools.partial(_reshape, shape=s) for s in ((size,), shape))
            e.move(key, _flax_key("params", path, flax_name), to_flax, to_torch)
    if k == 1:
        e.out_tensor(f"{layer}({x.name})", x.layout)
    else:  # LayerNorm over the trailing k axes = over them flattened into one
        lead = ", ".join(f"{x.name}.shape[{i}]" for i in range(ndim - k))
        e.out_tensor(
            f"jnp.reshape({layer}(jnp.reshape({x.name}, ({lead}, {size}))), {x.name}.shape)",
            x.layout,
            f"normalises the last {k} axes",
        )


def group_norm(e, c: Call) -> None:
    ndim = e.value(c.args["input"]).ndim
    x = e.tensor(
        c.args["input"],
        lambda lay: lay.flat is None and lay.perm[0] == 0 and lay.perm[-1] == 1,
        Layout.channels_last(ndim),
    )
    path, keys, _ = _params(e, c, ("weight", "bias"))
    groups = c.module.num_groups if c.module is not None else constant(c.args["num_groups"], "num_groups")
    eps = c.module.eps if c.module is not None else constant(c.args["eps"], "eps")
    channels = x.shape[1]
    options = f"num_groups={groups}, epsilon={eps}, use_fast_variance=False"
    options += "" if keys["weight"] else ", use_scale=False"
    options += "" if keys["bias"] else ", use_bias=False"
    layer = e.layer(path, f"nn.GroupNorm({options})", f"nnx.GroupNorm({channels}, {options}, rngs=rngs)")
    for name, key in keys.items():
        if key:
            _rule(tnn.GroupNorm, e, key, path, name)
    e.out_tensor(f"{layer}({x.name})", x.layout)


# --- randomness -----------------------------------------------------------------------------------


def _random_call(e, c: Call, layer: str, x, kind: str, rate: float, mask_shape: tuple[int, ...], path: str) -> None:
    if e.train in ("train", "True"):
        e.gen.sites.append(Site(c.node.name, path, kind, float(rate), mask_shape, x.layout))
    call = f"{layer}({x.name}, deterministic={e.not_train()})" if e.api == "linen" else f"{layer}({x.name})"
    e.out_tensor(call, x.layout)


def dropout(e, c: Call) -> None:
    x = e.tensor(c.args["input"])
    p = float(c.module.p if c.module is not None else constant(c.args["p"], "p"))
    if c.form == "function" and not constant(c.args["training"], "training"):
        e.alias(x, "dropout with training=False: identity")
        return
    spatial = c.args["spatial"]  # 0: element-wise; 1, 2, 3: Dropout1d/2d/3d, one draw per (sample, channel)
    options = f"{p}"
    if spatial:
        if x.ndim != spatial + 2:
            raise Unsupported(f"channel-wise dropout of a {x.ndim}-d input (ports with a batch axis: {spatial + 2}-d)")
        options += f", broadcast_dims={tuple(sorted(x.layout.axis(t) for t in range(2, x.ndim)))}"
        mask_shape = (x.shape[0], x.shape[1], *(1,) * (x.ndim - 2))
    else:
        mask_shape = x.shape
    preferred = c.path or c.node.name
    path = e.random_layer(preferred, f"nn.Dropout({options})", f"nnx.Dropout({options}, rngs=rngs)", not c.path)
    _random_call(e, c, e.gen.access(path), x, "dropout", p, mask_shape, path)


def stochastic_depth(e, c: Call) -> None:
    x = e.tensor(c.args["input"])
    p, mode = float(constant(c.args["p"], "p")), constant(c.args["mode"], "mode")
    if not constant(c.args["training"], "training"):
        e.alias(x, "stochastic depth with training=False: identity")
        return
    if mode not in ("row", "batch"):
        raise Unsupported(f"mode={mode!r} (torchvision has 'row' and 'batch')")
    owner = e.traced.where[c.node.name].module  # the module whose forward made the call
    owner_type = type(e.gen.model.get_submodule(owner)).__name__ if owner else ""
    preferred = owner if owner_type == "StochasticDepth" else c.node.name
    batch = x.layout.axis(0)
    options = f"{p}, {mode!r}" + (f", batch_axis={batch}" if batch else "")
    linen, nnx = f"ported.LinenStochasticDepth({options})", f"ported.NnxStochasticDepth({options}, rngs=rngs)"
    path = e.random_layer(preferred, linen, nnx, preferred == c.node.name)
    mask_shape = (x.shape[0] if mode == "row" else 1, *(1,) * (x.ndim - 1))
    _random_call(e, c, e.gen.access(path), x, "stochastic_depth", p, mask_shape, path)
