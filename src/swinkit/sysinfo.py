"""Memory sizes as people write them, and this process's resident memory (training budgets, benchmarks)."""
from __future__ import annotations

import math
import re
import resource

_UNITS = {"": 1, "b": 1,
          "k": 10 ** 3, "kb": 10 ** 3, "m": 10 ** 6, "mb": 10 ** 6, "g": 10 ** 9, "gb": 10 ** 9,
          "t": 10 ** 12, "tb": 10 ** 12,
          "ki": 2 ** 10, "kib": 2 ** 10, "mi": 2 ** 20, "mib": 2 ** 20, "gi": 2 ** 30, "gib": 2 ** 30,
          "ti": 2 ** 40, "tib": 2 ** 40}


def parse_size(value: str | int | float) -> int:
    """Bytes from `6GB`, `2.5G` (decimal: k/M/G/T, with or without B), `512MiB` / `4Gi` (binary), or a number.

    >>> parse_size("6GB"), parse_size("512MiB"), parse_size(1024)
    (6000000000, 536870912, 1024)
    """
    if isinstance(value, bool):
        raise ValueError(f"memory size {value!r} is not a size")
    if isinstance(value, (int, float)):
        if value <= 0 or not math.isfinite(value):
            raise ValueError(f"memory size {value!r} must be a positive number of bytes")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    unit = match and _UNITS.get(match.group(2).lower())
    if not match or unit is None:
        raise ValueError(f"memory size {value!r} is not understood; write e.g. '6GB', '2.5G', '512MiB' or bytes")
    size = int(float(match.group(1)) * unit)
    if size <= 0:
        raise ValueError(f"memory size {value!r} must be positive")
    return size


def format_size(num_bytes: float) -> str:
    """Decimal units, as `parse_size` reads them back: 5.7 GB, 640 MB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(num_bytes) >= scale:
            return f"{num_bytes / scale:.{1 if unit == 'GB' else 0}f} {unit}"
    return f"{int(num_bytes)} B"


def _proc_status_bytes(field: str) -> int | None:
    """A size field of /proc/self/status ("VmRSS", "VmHWM") in bytes; None where /proc is missing."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def process_rss() -> int:
    """Resident bytes of this process now (Linux /proc), else its peak so far (getrusage)."""
    current = _proc_status_bytes("VmRSS")
    return current if current is not None else peak_rss()


def peak_rss() -> int:
    """High-water resident bytes of this process (VmHWM; ru_maxrss where /proc is missing)."""
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
