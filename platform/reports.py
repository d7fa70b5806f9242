"""What the recipes' result tables share: mean ± std cells and the machine they ran on."""

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


def machine() -> str:
    """e.g. 'AMD EPYC, 2 CPUs': the CPU model (from /proc/cpuinfo where there is one) and count."""
    cpu = platform.processor() or "?"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return f"{cpu}, {os.cpu_count()} CPUs"
