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
    limits = [_quota(folder / "cpu.max") if version == 2 else _quota(folder / "cpu.cfs_quota_us",
                                                                      folder / "cpu.cfs_period_us")
              for version, folder in _cgroup_folders("cpu")]
    limits = [limit for limit in limits if limit is not None]
    return min(limits) if limits else None


def _cgroup_folders(controller: str) -> list[tuple[int, Path]]:
    """The cgroup folders whose limits of `controller` apply to this process, with their cgroup version:
    v2, its own folder and every parent's ("max 100000" style files in each); v1, the controller's folder."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    top = Path("/sys/fs/cgroup")
    folders: list[tuple[int, Path]] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            folder = top / path.lstrip("/")
            folders += [(2, level) for level in (folder, *folder.parents) if level.is_relative_to(top)]
        elif controller in controllers.split(","):
            folder = top / controllers / path.lstrip("/")
            folders.append((1, folder if folder.is_dir() else top / controllers))  # a namespaced one sees "/"
    return folders


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
    """Bytes of memory this process can take without swapping or being killed: the system's MemAvailable,
    capped by its cgroup's memory limit (a container's, where /proc/meminfo shows the host's); None where
    unknown."""
    system = _system_available_memory()
    room = _cgroup_memory_room()
    return room if system is None else system if room is None else min(system, room)


def _system_available_memory() -> int | None:
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


# cgroup v1 writes "no limit" as a huge number (9223372036854771712, the largest page multiple)
NO_MEMORY_LIMIT = 2**62


def _cgroup_memory_room() -> int | None:
    """The least memory this process's cgroup or one of its parents can still take before its limit, page
    cache it may drop (inactive files) counted as free, as the kernel does before it kills; None when unlimited."""
    rooms = [_room(folder / "memory.max", folder / "memory.current", folder / "memory.stat", "inactive_file")
             if version == 2 else
             _room(folder / "memory.limit_in_bytes", folder / "memory.usage_in_bytes", folder / "memory.stat",
                   "total_inactive_file")
             for version, folder in _cgroup_folders("memory")]
    rooms = [room for room in rooms if room is not None]
    return min(rooms) if rooms else None


def _room(limit_file: Path, usage_file: Path, stat_file: Path, inactive_key: str) -> int | None:
    """A cgroup level's limit minus its usage, plus its inactive page cache; None when it has no limit."""
    try:
        limit = limit_file.read_text().strip()
        if limit == "max" or int(limit) >= NO_MEMORY_LIMIT:
            return None
        usage = int(usage_file.read_text())
    except (OSError, ValueError):
        return None
    inactive = 0
    try:
        for line in stat_file.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == inactive_key:
                inactive = int(value)
    except (OSError, ValueError):
        pass
    return max(0, int(limit) - usage + inactive)
