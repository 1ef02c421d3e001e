"""Port any PyTorch network to Flax in one call: the Flax twin generated from torch.fx
traces, built on ``compare.transfer``'s rules.

>>> ported = compare.port.port(torch_model, example_input, api="linen")   # or "nnx"
>>> ported.run(x)                                  # eval mode, NCHW in, torch's layout out
>>> y, batch_stats = ported.run(x, train=True)     # train mode: statistics updated
>>> ported.module, ported.variables                # linen (nnx: ported.model)
>>> print(ported.source)                           # the generated Python module
>>> ported.to_torch()                              # Flax weights back into the torch model

``python -m compare.port PACKAGE.MODULE:FACTORY --input-shape 1,3,224,224 --out DIR`` writes
the module as a file with its weights and the eval check's report (``docs/porting.md``).

How it works: ``trace`` (fx, once per mode; in-place ops resolved; where each node comes
from), ``ops`` (each supported torch operation, in module, functional and method form,
as one handler that writes one line), ``layout`` (channels last, axis arguments
translated, a transpose only where an op needs it), ``codegen`` and ``render`` (the
source), ``weights`` (the weight map, strict and bit-exact), ``ported`` (running it),
``inject`` (the same dropout masks on both sides, for exact train-mode checks).
"""

from compare.port.ops import supported
from compare.port.ported import Ported, load_source, port
from compare.port.trace import PortError

__all__ = ["PortError", "Ported", "load_source", "port", "supported"]
