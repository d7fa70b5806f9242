"""What the recipes' and benchmarks' result tables share: mean ± std cells and the machine they ran on."""

from __future__ import annotations

import os
import platform
import statistics


def mean_std(runs: list[dict], key: str, digits: int = 4) -> str:
    """'mean ± std' of `key` over the runs that have it ('-' if none; no spread for one run)."""
    values = [r[key] for r in runs if key in r]
    if not values:
        return "-"
    spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.{digits}f}{spread}"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo where there is one, else what `platform` knows."""
    fallback = platform.processor() or platform.machine() or "unknown CPU"
    if not os.path.exists("/proc/cpuinfo"):
        return fallback
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), fallback)


def machine() -> str:
    """e.g. 'AMD EPYC, 2 CPUs': the CPU model and count."""
    return f"{cpu_model()}, {os.cpu_count()} CPUs"
