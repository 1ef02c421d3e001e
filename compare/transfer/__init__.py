"""Exact weight transfer between torch state_dicts, linen variables and nnx models.

``rules`` holds the declarative weight map (``LAYER_RULES``, matched by state layout) and
the per-tensor plan of a registry model or of any network built from supported layers
(``custom``); ``flatten`` finds the Linear layers that read a flattened map; ``twin`` checks
a hand-written Flax twin; ``validation`` lists every problem of an input at once; ``moves``
converts in every direction through one flat Flax form. All public names are here.
"""

from compare.transfer.moves import (
    flat_into_nnx,
    flat_to_linen,
    flat_to_torch,
    linen_to_flat,
    linen_to_nnx,
    linen_to_torch,
    nnx_to_flat,
    nnx_to_linen,
    nnx_to_torch,
    torch_to_flat,
    torch_to_linen,
    torch_to_nnx,
)
from compare.transfer.rules import (
    LAYER_RULES,
    NNX_SEED,
    FlatFlax,
    Move,
    Port,
    custom,
    flax_expected,
    flax_template,
    plan,
    rule_for,
    supported_layers,
)
from compare.transfer.twin import check_twin
from compare.transfer.validation import PREFIXES, CustomPortError, TransferError, strip_prefixes, validate

__all__ = [
    "LAYER_RULES",
    "NNX_SEED",
    "PREFIXES",
    "CustomPortError",
    "FlatFlax",
    "Move",
    "Port",
    "TransferError",
    "check_twin",
    "custom",
    "flat_into_nnx",
    "flat_to_linen",
    "flat_to_torch",
    "flax_expected",
    "flax_template",
    "linen_to_flat",
    "linen_to_nnx",
    "linen_to_torch",
    "nnx_to_flat",
    "nnx_to_linen",
    "nnx_to_torch",
    "plan",
    "rule_for",
    "strip_prefixes",
    "supported_layers",
    "torch_to_flat",
    "torch_to_linen",
    "torch_to_nnx",
    "validate",
]
