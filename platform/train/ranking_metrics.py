"""Ranking metrics per task, as the paper reports them:

    AUC          exact ROC AUC (ties count one half)
    NE           normalized entropy: the model's log loss / the log loss of always predicting
                 the base rate (1.0 = no better than the rate; lower is better; the paper's metric)
    log loss     mean binary cross-entropy
    calibration  mean predicted probability / observed rate (1.0 = calibrated)

and, for a regression task (e.g. the rating), MSE and MAE. AUC and NE are the generator's
own definitions (genrec.data.synthetic), so a model's NE and the synthetic oracle NE compare.
"""

from __future__ import annotations

import math

import numpy as np

from ..data.synthetic import auc, normalized_entropy

PROBABILITY_CLIP = 1e-12


def log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    y = np.asarray(labels, np.float64)
    p = np.clip(np.asarray(probs, np.float64), PROBABILITY_CLIP, 1 - PROBABILITY_CLIP)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def binary_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """AUC, NE, log loss, calibration, rate and count of one binary task (nan where undefined:
    a single class has no AUC and no NE)."""
    y = np.asarray(labels, np.float64)
    rate = float(y.mean()) if len(y) else math.nan
    nan_if_none = lambda v: math.nan if v is None else v
    return {"auc": nan_if_none(auc(y > 0.5, probs)), "ne": nan_if_none(normalized_entropy(y, probs)),
            "log_loss": log_loss(y, probs) if len(y) else math.nan,
            "calibration": float(np.mean(probs)) / rate if rate > 0 else math.nan,
            "rate": rate, "count": float(len(y))}


def regression_metrics(labels: np.ndarray, preds: np.ndarray) -> dict[str, float]:
    error = np.asarray(preds, np.float64) - np.asarray(labels, np.float64)
    if not len(error):
        return {"mse": math.nan, "mae": math.nan, "count": 0.0}
    return {"mse": float((error**2).mean()), "mae": float(np.abs(error).mean()), "count": float(len(error))}
