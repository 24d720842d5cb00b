"""The CPU thread count of the engine's steps follows the cores that other processes leave free.

Every parallel region (PyTorch's ops, the fused C++ step) ends at a barrier. With more threads than
free cores, a thread that shares its core with another busy process holds each barrier until the
OS gives it a time slice, and decoding collapses. So, at most every `interval_s`, the engine reads
how much CPU time the machine's cores spent busy (/proc/stat), takes away this process's own
(time.process_time), and runs its next steps on the cores the others left: fewer threads at once
when a busy process appears, all of them again once it has gone (each change once two readings in
a row agree on it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch

from leapllm.config import available_cpus

TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
STALE_WINDOWS = 4  # a reading over more than this many intervals only starts the next one


def busy_seconds(cpus: set[int], stat_path: str = "/proc/stat") -> float | None:
    """CPU seconds the given cores have spent busy since boot (every process), or None if the
    system does not say (no /proc/stat, or none of these cores listed)."""
    total, seen = 0, 0
    try:
        with open(stat_path) as f:
            for line in f:
                if not line.startswith("cpu") or line.startswith("cpu "):
                    continue
                name, *fields = line.split()
                if not name[3:].isdigit() or int(name[3:]) not in cpus or len(fields) < 5:
                    continue
                ticks = [int(x) for x in fields[:8]]
                total += sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
                seen += 1
    except (OSError, ValueError):
        return None
    return total / TICKS_PER_S if seen else None


class FreeCoreThreads:
    """Sets torch's thread count, from the thread that runs the steps, to the cores that other
    processes leave free, between 1 and max_threads; update() before each step."""

    def __init__(self, max_threads: int, *, interval_s: float = 0.25,
                 cpus: set[int] | None = None, read_busy: Callable[[], float | None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 own_cpu: Callable[[], float] = time.process_time,
                 set_threads: Callable[[int], None] = torch.set_num_threads):
        self.max_threads = max(1, max_threads)
        self.cpus = cpus if cpus is not None else available_cpus()
        self.read_busy = read_busy or (lambda: busy_seconds(self.cpus))
        self.interval_s, self.clock, self.own_cpu, self.set_threads = interval_s, clock, own_cpu, set_threads
        self.threads = self.max_threads
        self.others_cores = 0.0  # cores the other processes kept busy over the last reading
        self._voted, self._votes = self.max_threads, 0  # the last reading's count; readings in a row for it
        self._last = self._sample()
        self.enabled = self._last[2] is not None and self.max_threads > 1

    def _sample(self) -> tuple[float, float, float | None]:
        return self.clock(), self.own_cpu(), self.read_busy()

    def update(self) -> int:
        """The thread count for the next step (changed only every interval_s, cheaply)."""
        if not self.enabled or self.clock() - self._last[0] < self.interval_s:
            return self.threads
        now = self._sample()
        (t0, own0, busy0), (t1, own1, busy1) = self._last, now
        self._last = now
        if busy1 is None:
            self.enabled = False
            return self.threads
        if t1 - t0 > STALE_WINDOWS * self.interval_s:
            # The engine was idle: the reading would mostly tell what others did meanwhile.
            self._votes = 0
            return self.threads
        # Tick accounting is coarse and sampled: a slightly negative difference means "none".
        self.others_cores = max(0.0, (busy1 - busy0) - (own1 - own0)) / max(t1 - t0, 1e-6)
        free = len(self.cpus) - self.others_cores
        target = min(self.max_threads, max(1, int(free + 0.5)))
        # A change needs two readings in a row that agree, so that a burst elsewhere changes nothing.
        if target == self.threads:
            self._votes = 0
        else:
            self._votes = self._votes + 1 if target == self._voted else 1
        self._voted = target
        if self._votes >= 2:
            self._votes = 0
            self._apply(target)
        return self.threads

    def _apply(self, threads: int) -> None:
        self.threads = threads
        self.set_threads(threads)
