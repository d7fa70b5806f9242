"""What the recipes' and benchmarks' result tables share: the driver of a grid of runs (models x
seeds) that keeps its rows and resumes, mean ± std cells, the markdown layout and the machine they ran on."""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path
from typing import Callable, Iterable


def run_grid(out: Path, cells: Iterable[tuple[dict, Callable[[], dict]]],
             table: Callable[[list[dict]], str]) -> list[dict]:
    """Run a grid's cells in order, keeping every finished one where a re-run finds it; returns all rows.

    A cell is (key, run): key names it and starts its row (e.g. {"model": "hstu", "seed": 1}), run()
    trains it and returns the rest of the row. The rows are kept in `out` with suffix .json and
    `table(rows)` is rewritten to `out` after every run, so a stopped grid shows what it has and a
    re-run skips each cell that has a row (an interrupted run resumes from its own training checkpoint).
    """
    saved = out.with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(saved.read_text()) if saved.exists() else []
    for key, run in cells:
        if any(all(row.get(k) == v for k, v in key.items()) for row in rows):
            continue
        rows.append({**key, **run()})
        saved.write_text(json.dumps(rows, indent=1))
        out.write_text(table(rows))
    return rows


def groups(rows: list[dict], key: str) -> dict[str, list[dict]]:
    """The rows of each value of row[key] (a model, a variant): one table line each, in first-seen order."""
    return {value: [row for row in rows if row[key] == value] for value in dict.fromkeys(row[key] for row in rows)}


def mean_of(runs: list[dict], key: str) -> float:
    return statistics.mean(run[key] for run in runs)


def change(value: float, baseline: float) -> str:
    """value relative to baseline, e.g. '-5.1%'."""
    return f"{100 * (value / baseline - 1):+.1f}%"


def markdown_table(caption: str, columns: list[str], lines: list[list[str]]) -> str:
    """A caption, a blank line, then the table: the first column (names) left-aligned, the others (numbers) right."""
    head = [caption, "", "| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    return "\n".join(head + ["| " + " | ".join(cells) + " |" for cells in lines]) + "\n"


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
