"""Was the machine busy while we measured? A benchmark on a shared machine can be wrong
by a large factor without a sign: torch's threads lose far more to a competing job than
XLA's (a default run on 2 cores, with another job using about 1.5 of them, printed a
cnn ratio 7.5x off the quiet one).

The load average cannot tell (inside a container it is the host's), and a quiet reference
figure would have to come from somewhere. So the probe measures what this process can get
right now: one child process per core it may run on spins a pure-Python loop over the
same window, and each reports the CPU time it got. On a quiet machine the children get
their cores to themselves (share ~1); with another job competing, the scheduler splits
the cores (another process on one of two cores: ~0.67). A group is *busy* when the share
measured right before or right after it is under :data:`THRESHOLD`.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time

THRESHOLD = 0.85  # quiet machines measure 0.93 to 1.0 here; one competing process on 2 cores gives ~0.67
WINDOW_S = 0.3  # the spin of each probe; two probes per benchmark group

_SPIN = """
import sys, time
start, end = float(sys.argv[1]), float(sys.argv[2])
while time.monotonic() < start:
    time.sleep(0.001)
t0, c0 = max(time.monotonic(), start), time.process_time()
while time.monotonic() < end:
    pass
print(time.process_time() - c0, end - t0)
"""


@dataclasses.dataclass(frozen=True)
class Load:
    """One probe: the share of ``cores`` the process could use over the window."""

    share: float
    cores: int

    @property
    def busy(self) -> bool:
        return self.share < THRESHOLD


def cores() -> int:
    """The cores this process may run on (its affinity; the CPU count elsewhere)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def probe(window_s: float = WINDOW_S, n: int | None = None) -> Load:
    """Spin ``n`` (default: :func:`cores`) child processes over a common window of
    ``window_s`` seconds; the share is their CPU time over their wall time, summed."""
    n = n or cores()
    start = time.monotonic() + 0.25 + 0.05 * n  # the children's interpreters start first
    end = start + window_s
    children = [
        subprocess.Popen([sys.executable, "-c", _SPIN, str(start), str(end)], stdout=subprocess.PIPE, text=True)
        for _ in range(n)
    ]
    cpu = wall = 0.0
    for child in children:
        out, _ = child.communicate(timeout=60 + window_s)
        c, w = (float(v) for v in out.split())
        cpu, wall = cpu + c, wall + max(w, 0.0)
    return Load(share=min(cpu / wall, 1.0) if wall > 0 else 0.0, cores=n)


def describe(share: float | None) -> str:
    """A sentence for reports: what a measured share means."""
    if share is None:
        return "machine load not measured"
    if share < THRESHOLD:
        return (
            f"the machine was busy: this run could use only {share:.0%} of its cores (threshold {THRESHOLD:.0%}); "
            "the step times and the ratio are not to be trusted"
        )
    return f"the machine was quiet ({share:.0%} of the cores were this run's)"
