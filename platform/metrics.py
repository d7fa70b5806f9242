"""The metrics, written once: the model's evaluation (genrec.train), the synthetic world's
oracle and popularity baseline (genrec.data.synthetic) and the results tables all read
their numbers from here, so a model's numbers and the oracle's compare.

Retrieval, from the rank of each target in a full ranking (1 = best):

    HR@k   = 1[rank <= k]                 for k in HIT_KS
    NDCG@k = 1[rank <= k] / log2(rank + 1) for k in NDCG_KS
    MRR    = 1 / rank

Ranking, per task, as the paper reports them:

    AUC          exact ROC AUC (ties count one half)
    NE           normalized entropy: the log loss / the log loss of always predicting
                 the base rate (1.0 = no better than the rate; lower is better; the paper's metric)
    log loss     mean binary cross-entropy (probabilities clipped to [1e-12, 1 - 1e-12])
    calibration  mean predicted probability / observed rate (1.0 = calibrated)

and, for a regression task (e.g. the rating), MSE and MAE.

numpy only (a torch tensor on the CPU is read as an array), so the data layer uses it too.
"""

from __future__ import annotations

import math

import numpy as np

HIT_KS = (10, 50, 200)
NDCG_KS = (10, 200)
RETRIEVAL_METRICS = tuple(f"hr@{k}" for k in HIT_KS) + tuple(f"ndcg@{k}" for k in NDCG_KS) + ("mrr",)
PROBABILITY_CLIP = 1e-12


def metrics_from_ranks(ranks) -> dict[str, float]:
    """HR@k, NDCG@k and MRR (RETRIEVAL_METRICS) of 1-based ranks; {} when there are none."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if not len(ranks):
        return {}
    out = {f"hr@{k}": float((ranks <= k).mean()) for k in HIT_KS}
    out.update({f"ndcg@{k}": float(np.where(ranks <= k, 1.0 / np.log2(ranks + 1), 0.0).mean()) for k in NDCG_KS})
    out["mrr"] = float((1.0 / ranks).mean())
    return out


def auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Exact ROC AUC (ties count one half); None with a single class."""
    labels = np.asarray(labels, bool)
    pos, neg = int(labels.sum()), int((~labels).sum())
    if not pos or not neg:
        return None
    order = np.argsort(scores, kind="stable")
    s = np.asarray(scores)[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    avg_rank = np.repeat((starts + ends + 1) / 2.0, ends - starts)  # 1-based average ranks
    return float((avg_rank[labels[order]].sum() - pos * (pos + 1) / 2) / (pos * neg))


def log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    y = np.asarray(labels, np.float64)
    p = np.clip(np.asarray(probs, np.float64), PROBABILITY_CLIP, 1 - PROBABILITY_CLIP)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def normalized_entropy(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """Log loss divided by the entropy of the labels' base rate (1.0 = predicting the base rate);
    None with a single class."""
    y = np.asarray(labels, np.float64)
    rate = y.mean() if len(y) else 0.0
    if rate <= 0 or rate >= 1:
        return None
    return float(log_loss(y, probs) / -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate)))


def binary_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """AUC, NE, log loss, calibration, rate and count of one binary task (nan where undefined:
    a single class has no AUC and no NE)."""
    y = np.asarray(labels, np.float64)
    rate = float(y.mean()) if len(y) else math.nan
    nan_if_none = lambda v: math.nan if v is None else v  # noqa: E731
    return {"auc": nan_if_none(auc(y > 0.5, probs)), "ne": nan_if_none(normalized_entropy(y, probs)),
            "log_loss": log_loss(y, probs) if len(y) else math.nan,
            "calibration": float(np.mean(probs)) / rate if rate > 0 else math.nan,
            "rate": rate, "count": float(len(y))}


def regression_metrics(labels: np.ndarray, preds: np.ndarray) -> dict[str, float]:
    error = np.asarray(preds, np.float64) - np.asarray(labels, np.float64)
    if not len(error):
        return {"mse": math.nan, "mae": math.nan, "count": 0.0}
    return {"mse": float((error**2).mean()), "mae": float(np.abs(error).mean()), "count": float(len(error))}
