"""PyTorch implementations of the benchmarked training step, each at its best known
settings: fused SGD on GPU (foreach on CPU), ``zero_grad(set_to_none=True)``,
channels_last for convolutional models on GPU, ``cudnn.benchmark``, autocast for bf16,
and ``torch.compile`` (default mode; on GPU ``reduce-overhead``, i.e. CUDA graphs, whose
use is checked because BatchNorm's buffer mutation can make Inductor skip them).

Each runner's ``step()`` runs one training step on data already on the device and
returns the loss without synchronising; ``sync()`` waits for the device.
"""

from __future__ import annotations

import torch

import torchbn.train as ttrain
from compare.conventions import Precision
from compare.registry import ModelSpec


class TorchRunner:
    steps_per_call = 1

    def __init__(self, spec: ModelSpec, batch: int, dtype: str, device: str, compile_mode: str | None = None):
        self.device = torch.device("cuda" if device == "gpu" else "cpu")
        self.info: dict = {"compile_mode": compile_mode}
        torch.manual_seed(0)
        model = spec.build_torch().to(self.device).train()
        x = torch.randn(batch, *spec.input_shape, device=self.device)
        self.labels = torch.randint(0, spec.config.num_classes, (batch,), device=self.device)
        if self.device.type == "cuda" and x.ndim == 4:
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
            self.info["channels_last"] = True
        self.x = x
        fused = self.device.type == "cuda"
        self.optimizer = ttrain.sgd(model, fused=fused or None, foreach=None if fused else True)
        self.model = model
        # dynamic=False: one static graph per shape, as XLA compiles one per shape
        self.forward = torch.compile(model, mode=compile_mode, dynamic=False) if compile_mode else model
        self.autocast = Precision(dtype).autocast(self.device.type)

    def step(self) -> torch.Tensor:
        return ttrain.train_step(self.forward, self.optimizer, self.x, self.labels, autocast=self.autocast)

    def sync(self, out) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def after_warmup(self) -> None:
        """Record whether CUDA graphs were really used (reduce-overhead can skip them)."""
        if self.info.get("compile_mode") == "reduce-overhead":
            from torch._dynamo.utils import counters

            skips = sum(counters["inductor"].get(k, 0) for k in ("cudagraph_skips",))
            self.info["cuda_graphs"] = skips == 0


def configure(device: str) -> dict:
    """Global settings for a fair run; returns what was set, for the record."""
    if device != "gpu":
        return {"float32_matmul_precision": "ieee (cpu)", "torch_threads": torch.get_num_threads()}
    torch.backends.cudnn.benchmark = True
    # TF32 for float32 matmuls and convolutions, matching JAX's 'tensorfloat32' on the other side
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    return {"float32_matmul_precision": "tf32", "cudnn_benchmark": True}


def implementations(device: str) -> dict[str, dict]:
    """name -> keyword arguments of :class:`TorchRunner`."""
    impls = {"torch-eager": {}, "torch-compile": {"compile_mode": "default"}}
    if device == "gpu":
        impls["torch-compile-cudagraphs"] = {"compile_mode": "reduce-overhead"}
    return impls


def peak_matmul_tflops(dtype: str, device: str, n: int) -> float:
    """Achieved TFLOP/s of an n x n x n matmul in ``dtype`` (median of 10 after warm-up)."""
    import time

    dev = torch.device("cuda" if device == "gpu" else "cpu")
    tdtype = Precision(dtype).torch_dtype()
    a, b = (torch.randn(n, n, device=dev, dtype=tdtype) for _ in range(2))
    times = []
    for i in range(13):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e12
