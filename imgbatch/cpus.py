"""Cores: how many this process may use, and whether one is spare for more processes.

The scan's hashing processes and the offline analyzer's processes start only once a
run has shown it is big enough and a core is spare: measured over the run so far from
/proc/stat, minus this process's own CPU time (its threads' work would move to the
processes), not from the load average, which lags a minute and counts our own work.
"""

from __future__ import annotations

import os
import time

#: cores that must be spare (after this process's main thread's) to start processes
SPARE_CORE = 0.75


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


#: a sample of cpu_times(): the machine's idle and total CPU seconds, and this process's
CpuSample = tuple[float, float, float]


def cpu_times() -> CpuSample | None:
    """The machine's idle and total CPU seconds so far (/proc/stat: every core, every
    process), and this process's own (all its threads), if they can be read."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
        tick = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    if len(fields) < 5 or tick <= 0:
        return None
    # idle + iowait; user .. steal (guest time is counted in user already)
    return (fields[3] + fields[4]) / tick, sum(fields) / tick, time.process_time()


def spare_between(since: CpuSample, now: CpuSample, ncores: int) -> float:
    """Cores free for more of our processes between two cpu_times() samples: those that
    neither other processes used meanwhile, nor this process's main thread needs (one).
    Our own threads do not count: the processes would take their work."""
    total = now[1] - since[1]
    wall = total / ncores
    busy = total - (now[0] - since[0])
    others = max(0.0, busy - (now[2] - since[2]))
    return ncores - 1 - others / wall


def spare_cores(since: CpuSample | None = None) -> float:
    """Cores free for more of our processes since `since` (a cpu_times() sample; see
    spare_between). Without a sample, from the load (the 1-minute average, which lags:
    it still counts for a minute a run that just ended, and includes our own work)."""
    now = cpu_times()
    if since is not None and now is not None and now[1] > since[1]:
        return spare_between(since, now, cores())
    try:
        return cores() - os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average here: assume the cores are ours
        return float(cores())


class SpareCores:
    """Whether to start processes now: once `items` went by and `seconds` passed since
    it was made (the kernel counts idle time in 10 ms ticks: a shorter interval cannot
    be judged), and a core is spare; asked again a second later when none was."""

    def __init__(self, items: int, seconds: float) -> None:
        self._items = items
        self._since = cpu_times()
        self._next = time.perf_counter() + seconds

    def now(self, items: int) -> bool:
        if items < self._items or time.perf_counter() < self._next:
            return False
        self._next = time.perf_counter() + 1.0
        return spare_cores(since=self._since) >= SPARE_CORE
