"""Ranking metrics (genrec.metrics) by hand."""

import math

import numpy as np
import pytest

from genrec.metrics import binary_metrics, log_loss, regression_metrics


def test_binary_metrics_by_hand():
    y = np.array([1, 0, 1, 0])
    p = np.array([0.9, 0.2, 0.6, 0.4])
    m = binary_metrics(y, p)
    loss = -(math.log(0.9) + math.log(0.8) + math.log(0.6) + math.log(0.6)) / 4
    assert m["log_loss"] == pytest.approx(loss)
    assert m["ne"] == pytest.approx(loss / math.log(2))  # base rate 1/2: entropy ln 2
    assert m["auc"] == 1.0  # every positive above every negative
    assert m["calibration"] == pytest.approx(0.525 / 0.5)
    assert m["rate"] == 0.5 and m["count"] == 4
    # one positive below one of two negatives, ties count one half
    assert binary_metrics(np.array([1, 0, 0]), np.array([0.5, 0.7, 0.5]))["auc"] == pytest.approx(0.25)
    # predicting the base rate everywhere is NE 1 and calibrated
    rate = binary_metrics(np.array([1, 0, 0, 0]), np.full(4, 0.25))
    assert rate["ne"] == pytest.approx(1.0) and rate["calibration"] == pytest.approx(1.0) and rate["auc"] == 0.5
    # a single class: no AUC, no NE (nan, not a made-up number)
    single = binary_metrics(np.array([1, 1]), np.array([0.3, 0.8]))
    assert math.isnan(single["auc"]) and math.isnan(single["ne"])
    assert log_loss(np.array([1.0]), np.array([0.0])) == pytest.approx(-math.log(1e-12))  # clipped, finite


def test_regression_metrics_by_hand():
    m = regression_metrics(np.array([4.0, 2.0, 5.0]), np.array([3.5, 3.0, 5.0]))
    assert m["mse"] == pytest.approx((0.25 + 1.0) / 3) and m["mae"] == pytest.approx(0.5) and m["count"] == 3
