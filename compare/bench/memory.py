"""``peak_mem_bytes`` of the benchmark: on CPU the process RSS growth while an
implementation was built, compiled and warmed up (so the first JAX implementation of a
process pays JAX's own start-up: do not compare it across implementations); on GPU
torch's ``max_memory_allocated`` and XLA's ``memory_analysis`` of the compiled step
(arguments + outputs + temporaries - aliased)."""

from __future__ import annotations

from pathlib import Path

from compare.bench import runners_torch


def _status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


class MemoryProbe:
    """Peak memory of building, compiling and warming up one implementation."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        if self.device == "gpu":
            import torch

            torch.cuda.reset_peak_memory_stats()
        else:
            self.can_reset = _reset_rss_peak()
            self.rss_before = _status("VmRSS")
        return self

    def result(self, runner) -> int | None:
        if self.device == "gpu":
            if isinstance(runner, runners_torch.TorchRunner):
                import torch

                return int(torch.cuda.max_memory_allocated())
            lowered = runner.lowered() if hasattr(runner, "lowered") else None
            if lowered is None:
                return None
            m = lowered.compile().memory_analysis()
            if m is None:
                return None
            return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
        peak = _status("VmHWM") if self.can_reset else _status("VmRSS")
        return None if peak is None or self.rss_before is None else max(0, peak - self.rss_before)

    def __exit__(self, *exc):
        return False
