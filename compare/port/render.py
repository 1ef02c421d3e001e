"""The generated Python file: header, imports, the class with its layers and forward(s).

The text is close to ``ruff format``'s output already (the command line formats it with
ruff when ruff is installed), and imports only what it uses of ``jax``, ``flax`` and
``flaxbn``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from compare.port.layout import Layout


def module(
    tree: dict, api: str, model: nn.Module, name: str, x: str, bodies: dict, split: bool, layout, outputs
) -> str:
    """The whole file. ``tree`` holds the layers and parameters under torch's names;
    ``bodies`` maps each method name to its lines; ``x`` is the input's name."""
    origin = f"{type(model).__module__}.{type(model).__qualname__}"
    lines = [f"class {name}({'nn.Module' if api == 'linen' else 'nnx.Module'}):"]
    lines += [f'    """{origin}, ported to Flax {api} by ``compare.port``.', ""]
    lines += [f"    Input: {layout.describe()}, torch's {Layout.identity(layout.ndim).describe()} in this order."]
    lines += [f"    Output: {_describe(outputs['eval'])}."]
    if outputs["train"] != outputs["eval"]:
        lines += [f"    Output in training: {_describe(outputs['train'])}."]
    if split:
        lines += ["", "    torch traces this network differently in train and eval mode: one forward per mode."]
    lines += ['    """', ""]
    declarations = [_assign(n, e) for n, e in _entries(tree, api, root=True)]
    if api == "linen":
        if declarations:
            lines += ["    def setup(self):", *_block(declarations, 8), ""]
        if split:
            lines += [f"    def __call__(self, {x}, *, train: bool = False):"]
            lines += [f"        return self.forward_train({x}) if train else self.forward_eval({x})", ""]
    else:
        if split:
            declarations.append("self.deterministic = False  # model.train() / model.eval() set it")
        lines += ["    def __init__(self, *, rngs: nnx.Rngs):"]
        lines += _block(declarations, 8) if declarations else ["        del rngs  # nothing here has parameters"]
        lines.append("")
        if split:
            lines += [f"    def __call__(self, {x}):"]
            lines += [f"        return self.forward_eval({x}) if self.deterministic else self.forward_train({x})", ""]
    for method, (body, _) in bodies.items():
        train = ", *, train: bool = False" if api == "linen" and method == "__call__" else ""
        lines += [f"    def {method}(self, {x}{train}):", *_block(body, 8), ""]
    code = "\n".join(lines).rstrip() + "\n"
    return _header(model, name, api, code) + code


def _assign(name: str, expr: str) -> str:
    return f"self.{name} = {expr}" if name.isidentifier() else f'setattr(self, "{name}", {expr})'


def _block(lines: list[str], indent: int) -> list[str]:
    pad = " " * indent
    return [pad + line for text in lines for line in text.split("\n")]


def _entries(level: dict, api: str, root: bool = False) -> list[tuple[str, str]]:
    """(torch name, Flax expression) of each entry of one level of the tree."""
    out = []
    for name, entry in level.items():
        if isinstance(entry, dict):
            out.append((name, _tree(entry, api)))
        elif entry[0] == "layer":
            out.append((name, entry[1] if api == "linen" else entry[2]))
        elif api == "nnx":
            out.append((name, f"nnx.Param(jnp.zeros({entry[1]}))"))
        elif root:  # deeper linen parameters are the Tree's ``param_shapes``
            out.append((name, f'self.param("{name}", nn.initializers.zeros, {entry[1]})'))
    return out


def _tree(level: dict, api: str) -> str:
    items = "".join(f'\n    "{n}": {e.replace(chr(10), chr(10) + "    ")},' for n, e in _entries(level, api))
    if api == "nnx":
        return f"nnx.Dict({{{items}\n}})"
    params = {n: e[1] for n, e in level.items() if isinstance(e, tuple) and e[0] == "param"}
    layers = f"{{{items}\n}}" if items else "{}"
    return f"ported.Tree({layers}, param_shapes={params})" if params else f"ported.Tree({layers})"


def _describe(outputs: Any) -> str:
    if isinstance(outputs, Layout):
        return outputs.describe()
    if outputs is None:
        return "a Python value"
    if isinstance(outputs, dict):
        return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in outputs.items()) + "}"
    return "(" + ", ".join(_describe(o) for o in outputs) + ")"


def _header(model: nn.Module, name: str, api: str, code: str) -> str:
    file = f"{name.lower()}.safetensors"
    if api == "linen":
        use = [
            f'variables = flaxbn.ported.load_linen("{file}")',
            f"y = {name}().apply(variables, x)  # eval mode",
            f"y, updates = {name}().apply(",
            '    variables, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"]',
            ")  # train mode: batch statistics, updated running statistics, the dropout stream",
        ]
    else:
        use = [
            f'model = flaxbn.ported.load_nnx({name}, "{file}")  # or an instance: {name}(rngs=nnx.Rngs(0))',
            "model.eval()  # then y = model(x)",
            "model.train()  # batch statistics, running statistics updated in place, the dropout stream",
        ]
    imports = [i for i, used in (("import jax", "jax."), ("import jax.numpy as jnp", "jnp.")) if used in code]
    imports.append("from flax import linen as nn" if api == "linen" else "from flax import nnx")
    ours = ["import flaxbn"] if "flaxbn." in code else []
    helpers = [m for m in ("pooling", "ported") if f"{m}." in code]
    ours += [f"from flaxbn import {', '.join(helpers)}"] if helpers else []
    doc = [
        f'"""{type(model).__name__} in Flax {api}, generated by ``compare.port`` from torch.fx traces.',
        "",
        "With the weights that ``python -m compare.port`` writes beside this file::",
        "",
        *(f"    {u}" for u in use),
        '"""',
    ]
    return "\n".join([*doc, "", *imports, "", *ours, "", ""]) + "\n"
