"""What a benchmark ran on: CPU model and instruction flags, threads, torch version, load."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

BF16_UNITS = {"avx512_bf16", "amx_bf16", "amx_tile"}


def _cpuinfo() -> tuple[str | None, set[str]]:
    """(model name, flags) from Linux /proc/cpuinfo; (None, {}) elsewhere."""
    name, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if name is None and line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif not flags and line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return name, flags


def cpu_name() -> str:
    """The CPU model string (Linux /proc/cpuinfo, else platform.processor())."""
    return _cpuinfo()[0] or platform.processor() or platform.machine() or "unknown CPU"


def load_average() -> float | None:
    """The 1-minute load average, where the OS has one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def machine_info(device: str = "cpu") -> dict:
    """{cpu, cpu_capability, bf16_units, threads, torch, load_average} (+ gpu on CUDA)."""
    name, flags = _cpuinfo()
    info = {"cpu": name or platform.processor() or platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "bf16_units": sorted(flags & BF16_UNITS),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "load_average": load_average()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
