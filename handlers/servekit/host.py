"""What this machine is, from the standard library alone: CPU model, CPU flags, cores a process may use.

Standard library only: the container entrypoint (``deploy/serve.py``) reads it before anything else is
known to work, to choose a tuned profile (``scripts/bench/profiles.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")


def _cpuinfo_field(name: str, cpuinfo: Path = CPUINFO) -> str:
    """The first ``name : value`` line of /proc/cpuinfo (Linux), empty where it cannot be read."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    line = next((line for line in text.splitlines() if line.partition(":")[0].strip() == name), "")
    return line.partition(":")[2].strip()


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str]:
    """The flags of this machine's CPU (Linux), empty where they cannot be read."""
    return set(_cpuinfo_field("flags", cpuinfo).split())


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's model name (Linux), empty where it cannot be read."""
    return _cpuinfo_field("model name", cpuinfo)


def available_cores(cpu_max: Path = CGROUP_V2_CPU_MAX, cgroup_v1: Path = CGROUP_V1_CPU) -> int:
    """Cores this process may use: the CPU count, capped by a cgroup CPU quota (a container's CPU limit;
    cgroup v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``).

    In a Kubernetes pod ``os.cpu_count()`` is the node's; without the cap every worker would start as
    many threads as the node has cores and the quota would throttle them all.
    """
    cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text(encoding="utf-8").split()[:2]
    except (OSError, ValueError):
        try:
            quota = (cgroup_v1 / "cpu.cfs_quota_us").read_text(encoding="utf-8").strip()
            period = (cgroup_v1 / "cpu.cfs_period_us").read_text(encoding="utf-8").strip()
        except OSError:
            return cores
    if not quota.isdigit() or not period.isdigit() or int(period) == 0:  # "max", or -1 on cgroup v1
        return cores
    return max(1, min(cores, -(-int(quota) // int(period))))
