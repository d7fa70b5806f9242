"""Scaling laws from a sweep's trials: L(C) = a * C^(-b) + c per family, the log-log plot, the CSV.

The fit is scipy's curve_fit (Levenberg-Marquardt / trust region) on C rescaled by its
geometric mean, so a, b and c are of order one whatever the FLOP scale; the
uncertainties are the square roots of the covariance's diagonal. A metric that grows
with compute (NDCG, HR) gets a < 0 and c its ceiling; a loss gets a > 0 and c its floor.
Three parameters need at least four points for an uncertainty; with two or three points
the fit keeps c = 0 (a pure power law) and says so.
"""

from __future__ import annotations

import csv
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

MIN_POINTS_WITH_OFFSET = 4


@dataclass
class PowerLaw:
    """L(C) = a * C^(-b) + c, C in FLOPs; *_err are one standard error (inf where the fit is exact)."""

    family: str
    a: float
    b: float
    c: float
    a_err: float
    b_err: float
    c_err: float
    points: int
    with_offset: bool  # False: c was held at 0 (too few points)

    def __call__(self, compute) -> np.ndarray:
        return self.a * np.power(np.asarray(compute, dtype=np.float64), -self.b) + self.c

    def text(self) -> str:
        offset = f" + {self.c:.4g} (±{self.c_err:.2g})" if self.with_offset else " (c held at 0: fewer than 4 points)"
        return (f"{self.family}: L(C) = {self.a:.4g} (±{self.a_err:.2g}) * C^-{self.b:.4g} (±{self.b_err:.2g})"
                f"{offset}, {self.points} trials")


def fit_power_law(compute, metric, family: str = "") -> PowerLaw:
    """Fit L(C) = a * C^(-b) + c to (compute, metric) points (at least 2, compute > 0)."""
    from scipy.optimize import OptimizeWarning, curve_fit

    C = np.asarray(compute, dtype=np.float64)
    y = np.asarray(metric, dtype=np.float64)
    keep = np.isfinite(C) & np.isfinite(y) & (C > 0)
    C, y = C[keep], y[keep]
    if len(C) < 2 or len(np.unique(C)) < 2:
        raise ValueError(f"family {family!r}: a power law needs at least 2 trials of different compute, got {len(C)}")
    scale = math.exp(np.log(C).mean())
    x = C / scale
    with_offset = len(C) >= MIN_POINTS_WITH_OFFSET
    # Starting point from the log-log slope of the two ends (sign of a from the trend).
    order = np.argsort(x)
    trend = y[order[-1]] - y[order[0]]
    if with_offset:
        c0 = y[order[-1]] + 0.1 * trend  # a little beyond the best point
        model = lambda x, a, b, c: a * np.power(x, -b) + c  # noqa: E731
        p0, bounds = [y.mean() - c0, 0.3, c0], ([-np.inf, 0.0, -np.inf], [np.inf, 10.0, np.inf])
    else:
        model = lambda x, a, b: a * np.power(x, -b)  # noqa: E731
        p0, bounds = [y.mean(), 0.1 if trend <= 0 else 0.0], ([-np.inf, -10.0], [np.inf, 10.0])
    with warnings.catch_warnings():  # as many points as parameters: an exact fit, its errors are inf
        warnings.simplefilter("ignore", OptimizeWarning)
        params, cov = curve_fit(model, x, y, p0=p0, bounds=bounds, maxfev=20_000)
    errors = np.sqrt(np.abs(np.diag(cov))) if np.all(np.isfinite(cov)) else np.full(len(params), np.inf)
    a, b = params[0], params[1]
    a_err, b_err = errors[0], errors[1]
    c, c_err = (params[2], errors[2]) if with_offset else (0.0, 0.0)
    # Back to C in FLOPs: a * (C / s)^-b = (a * s^b) * C^-b.
    factor = scale ** b
    a_err_flops = math.hypot(a_err * factor, a * factor * math.log(scale) * b_err) if math.isfinite(a_err) else a_err
    return PowerLaw(family, float(a * factor), float(b), float(c), float(a_err_flops), float(b_err), float(c_err),
                    len(C), with_offset)


def frontier(points: list[tuple[float, float]], mode: str) -> list[tuple[float, float]]:
    """The compute-efficient frontier: the (compute, metric) points that no cheaper point beats
    (mode "max": higher is better, "min": lower), in order of compute."""
    sign = 1 if mode == "max" else -1
    kept, best = [], -math.inf
    for C, y in sorted(points):
        if sign * y > best:
            kept.append((C, y))
            best = sign * y
    return kept


def fit_families(rows: list[dict], compute_key: str, metric_key: str, points: str = "all",
                 mode: str = "max") -> dict[str, PowerLaw]:
    """One power law per family with at least 2 finished trials of different compute; points
    "frontier" fits only each family's compute-efficient frontier (see `frontier`)."""
    by_family: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        C, y = _number(row.get(compute_key)), _number(row.get(metric_key))
        if C is not None and y is not None and C > 0:
            by_family.setdefault(row["family"], []).append((C, y))
    if points == "frontier":
        by_family = {family: frontier(found, mode) for family, found in by_family.items()}
    fits = {}
    for family, points in sorted(by_family.items()):
        if len({C for C, _ in points}) >= 2:
            compute, metric = zip(*points)
            fits[family] = fit_power_law(compute, metric, family)
    return fits


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def plot_scaling(rows: list[dict], fits: dict[str, PowerLaw], compute_key: str, metric_key: str, path: Path,
                 title: str) -> Path:
    """Log-log plot: each family's trials as points and its fitted curve, one colour per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    families = sorted({row["family"] for row in rows})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, family in enumerate(families):
        points = [(_number(r.get(compute_key)), _number(r.get(metric_key))) for r in rows if r["family"] == family]
        points = [(C, y) for C, y in points if C and y is not None and y > 0]
        if not points:
            continue
        colour = colours[i % len(colours)]
        compute, metric = zip(*points)
        ax.scatter(compute, metric, color=colour, label=f"{family} trials", zorder=3)
        law = fits.get(family)
        if law is not None:
            grid = np.geomspace(min(compute) / 1.5, max(compute) * 1.5, 200)
            curve = law(grid)
            shown = curve > 0
            ax.plot(grid[shown], curve[shown], color=colour,
                    label=f"{family}: {law.a:.3g} C^-{law.b:.3g} + {law.c:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    shown = [y for r in rows for y in [_number(r.get(metric_key))] if y is not None and y > 0]
    if shown:  # the trials' range: a fitted curve may dive towards 0 outside it
        ax.set_ylim(min(shown) / 2, max(shown) * 2)
    ax.set(xlabel=f"training compute ({compute_key}, FLOPs)", ylabel=metric_key, title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_csv(rows: list[dict], path: Path) -> Path:
    """All trials, one row each; columns in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def fits_table(fits: dict[str, PowerLaw]) -> list[dict]:
    return [asdict(law) for law in fits.values()]
