"""BatchNorm for linen and nnx: Flax's own statistics plus torch's batch counter.

Both classes subclass the stock Flax BatchNorm and keep its semantics exactly:

* training normalises with the batch mean and the *biased* batch variance, and updates
  ``mean``/``var`` as ``running = momentum * running + (1 - momentum) * batch`` with the
  *biased* variance (torch stores the *unbiased* one: a factor n/(n-1) on the batch term);
* eval (``use_running_average=True``) uses the running statistics and changes nothing.

The one addition is ``num_batches_tracked`` (int32, in ``batch_stats``), counted like
torch's buffer of the same name: +1 per training forward. It lets a torch state_dict
make the round trip torch -> Flax -> torch with nothing lost. The ported models pass
``use_fast_variance=False`` (two-pass variance, as torch computes it).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn
from flax import nnx


class LinenBatchNorm(nn.BatchNorm):
    """``flax.linen.BatchNorm`` that also counts training batches in
    ``batch_stats/num_batches_tracked``. Statistics are updated only when the caller
    passes ``mutable=["batch_stats"]``; nothing is counted during ``init``."""

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        y = super().__call__(x, use_running_average, mask=mask)
        use_ra = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        count = self.variable("batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32))
        if not use_ra and not self.is_initializing():
            count.value = count.value + 1
        return y


class NnxBatchNorm(nnx.BatchNorm):
    """``flax.nnx.BatchNorm`` that also counts training batches in a ``BatchStat``
    named ``num_batches_tracked``. Statistics change in place in train mode
    (``model.train()``), also under ``nnx.jit``."""

    def __init__(self, num_features: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        y = super().__call__(x, use_running_average, mask=mask)
        use_ra = self.use_running_average if use_running_average is None else use_running_average
        if not use_ra:
            self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
        return y
