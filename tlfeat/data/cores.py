"""How many CPUs this process may use, the default number of decoding workers, and the memory available."""

from __future__ import annotations

import math
import os
from pathlib import Path


def available_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def _cgroup_cpu_quota() -> float | None:
    """The tightest CPU quota (in CPUs) of this process's cgroup and its parents; None when unlimited."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    top = Path("/sys/fs/cgroup")
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2: "max 100000" or "<quota> <period>" in each level's cpu.max
            folder = top / path.lstrip("/")
            limits += [_quota(level / "cpu.max") for level in (folder, *folder.parents) if level.is_relative_to(top)]
        elif "cpu" in controllers.split(","):  # cgroup v1: quota and period in two files
            folder = top / controllers
            limits.append(_quota(folder / "cpu.cfs_quota_us", folder / "cpu.cfs_period_us"))
    limits = [limit for limit in limits if limit is not None]
    return min(limits) if limits else None


def _quota(quota_file: Path, period_file: Path | None = None) -> float | None:
    try:
        fields = quota_file.read_text().split()
        if period_file is not None:
            fields.append(period_file.read_text().strip())
        if fields[0] in ("max", "-1"):
            return None
        return int(fields[0]) / int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def default_workers() -> int:
    """Decoding processes when none are asked for: one per available core."""
    return available_cores()


def available_memory() -> int | None:
    """Bytes of memory the system can give without swapping (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None
