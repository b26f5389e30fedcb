"""Shared helper of the timing harnesses: describe the machine a measurement ran on."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict:
    """What a timing depends on: CPU model and count, threads, niceness, load, library versions."""
    import lightning
    import torch

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        import avalanche

        avalanche_version = avalanche.__version__
    except ImportError:
        avalanche_version = None
    return {"cpu": cpu, "logical_cpus": os.cpu_count(),
            "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "gpu_used": False, "niceness": os.nice(0), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
            "avalanche": avalanche_version, "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None}
