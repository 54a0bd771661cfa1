"""Resident memory of a bench's processes, read from the kernel."""

from __future__ import annotations


def proc_status_mb(field: str, pid: int | str = "self") -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of a process's memory, MiB, from ``/proc/<pid>/status``.
    Not ``ru_maxrss``: a process started by fork + exec inherits in it the RSS its parent had at
    the fork (Linux keeps the old memory's high-water mark across exec), so a bench's child would
    count the bench's own process."""
    with open(f"/proc/{pid}/status") as f:
        return next(float(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024
