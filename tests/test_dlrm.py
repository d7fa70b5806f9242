"""The DLRM-style baseline (genrec.model.dlrm): DIN's attention unit by hand and against its literal
formula, event ages reaching the scores, and a tiny run through training, evaluation, the MLflow
registry and serving's refusal."""

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import tiny_ranking_config

from genrec.data.batches import build_batch
from genrec.data.layout import ITEM, TOKEN_TYPES
from genrec.data.loader import to_torch
from genrec.model.dlrm import DINAttention, DLRMRanker
from genrec.model.encoder_config import EncoderConfig
from genrec.model.generative import GenerativeConfig, TokenTypes

torch.set_num_threads(1)
NUM_ITEMS, NUM_ACTIONS, MAX_ITEMS = 40, 3, 12


def din(hidden_weight, hidden_bias, out_weight, out_bias):
    unit = DINAttention(dim=len(hidden_weight[0]) // 4, hidden=len(hidden_weight))
    with torch.no_grad():
        unit.hidden.weight.copy_(torch.tensor(hidden_weight))
        unit.hidden.bias.copy_(torch.tensor(hidden_bias))
        unit.out.weight.copy_(torch.tensor([out_weight]))
        unit.out.bias.fill_(out_bias)
        unit.activation.weight.fill_(0.25)
    return unit


def test_din_unit_by_hand():
    # D = 2, one hidden unit: z = [1, 0] . (t - h) + [0, 1] . (t * h) + 0.5, w = 2 PReLU(z) - 1 (slope 0.25)
    unit = din([[0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]], [0.5], [2.0], -1.0)
    targets = torch.tensor([[[1.0, 0.0], [2.0, 1.0], [0.0, 1.0]]])
    items = torch.tensor([[[1.0, 2.0], [0.0, 1.0], [5.0, 5.0]]])
    age_table = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    ages = torch.tensor([[[0, 0, 0], [1, 0, 0], [1, 0, 0]]])  # item 0 is of age bucket 1 for targets 1 and 2
    causal = torch.ones(3, 3, dtype=torch.bool).tril(-1)
    interest = unit(targets, items.unsqueeze(1) + age_table[ages], causal)
    # target 0 sees nothing. Target 1 = [2, 1] sees h = item 0 + age 1 = [2, 1]: z = 0 + 1 + .5 = 1.5, w = 2.
    # Target 2 = [0, 1] sees h = [2, 1]: z = -2 + 1 + .5 = -.5, w = 2 (.25 x -.5) - 1 = -1.25 (kept negative:
    # no softmax), and h = item 1 + age 0 = [0, 1]: z = 0 + 1 + .5 = 1.5, w = 2.
    expected = torch.tensor([[[0.0, 0.0], [4.0, 2.0], [-1.25 * 2 + 2 * 0, -1.25 * 1 + 2 * 1]]])
    torch.testing.assert_close(interest, expected)


def test_din_unit_matches_its_literal_formula():
    torch.manual_seed(0)
    B, L, D = 3, 5, 4
    unit = DINAttention(D, hidden=6)
    targets, h = torch.randn(B, L, D), torch.randn(B, L, L, D)  # h[b, i, j]: item j as target i sees it
    visible = torch.rand(B, L, L) < 0.6
    t = targets.unsqueeze(2).expand_as(h)
    weights = unit.out(unit.activation(unit.hidden(torch.cat([t, h, t - h, t * h], -1)))).squeeze(-1) * visible
    expected = (weights.unsqueeze(-1) * h).sum(2)
    torch.testing.assert_close(unit(targets, h, visible), expected, rtol=1e-5, atol=1e-5)


def model():
    torch.manual_seed(0)
    encoder = EncoderConfig(num_items=NUM_ITEMS, dim=16, dropout=0.0)
    config = GenerativeConfig(encoder, NUM_ACTIONS, True, num_context=10, tasks=(("click", "binary"),
                              ("rating", "regression")), token_types=TokenTypes(*TOKEN_TYPES))
    return DLRMRanker(config).eval()


def scores(ranker, items, actions, stamps):
    table = pa.table({"user": pa.array([1], pa.int32()), "items": pa.array([items], pa.list_(pa.int32())),
                      "actions": pa.array([actions], pa.list_(pa.int32())),
                      "timestamps": pa.array([stamps], pa.list_(pa.int64())), "gender": pa.array([2], pa.int32())})
    b = to_torch(build_batch(table, "interleaved", MAX_ITEMS, ("gender",), (0,)))
    with torch.no_grad():
        _, logits = ranker(b["item_ids"], b["token_types"], b["timestamps"], b["target_timestamps"], b["offsets"])
    return logits[b["token_types"] == ITEM]  # one row per event, in time order


def test_scores_depend_on_the_ages_of_history_events_not_on_clock_time():
    ranker = model()
    items, actions = [3, 17, 8, 25, 11, 30], [1, 2, 5, 1, 3, 4]
    minutes = (1_600_000_000 + 60 * np.arange(6)).tolist()
    weeks = (1_600_000_000 + 7 * 86_400 * np.arange(6)).tolist()
    a, b = scores(ranker, items, actions, minutes), scores(ranker, items, actions, weeks)
    torch.testing.assert_close(a[0], b[0])  # the first item has no history: nothing to age
    assert (a[1:] - b[1:]).abs().min() > 1e-6, "same items and actions at other times must score differently"
    # one event older, all else equal: the scores of the items after it move
    older = [minutes[0] - 30 * 86_400] + minutes[1:]
    c = scores(ranker, items, actions, older)
    torch.testing.assert_close(c[0], a[0])
    assert (c[1:] - a[1:]).abs().min() > 1e-6  # an untrained model: small, far above rounding
    # like GR's relative time bias, only gaps count: the whole history a year later scores the same
    torch.testing.assert_close(scores(ranker, items, actions, [t + 365 * 86_400 for t in minutes]), a)


def test_scoring_some_item_tokens_gives_their_full_batch_logits_and_no_others():
    """An evaluation scores one token per row (genrec.data.batches.target_windows): asking only for those
    (`scored`) gives the logits the whole-batch pass gives there, zeros elsewhere, and a user's logits do
    not depend on who shares the batch (padding never leaks)."""
    ranker = model()
    table = pa.table({"user": pa.array([1, 2], pa.int32()),
                      "items": pa.array([[3, 17, 8, 25, 11], [4, 9]], pa.list_(pa.int32())),
                      "actions": pa.array([[1, 2, 5, 1, 3], [2, 6]], pa.list_(pa.int32())),
                      "timestamps": pa.array([[100, 160, 400, 9_000, 9_060], [50, 70_000]], pa.list_(pa.int64())),
                      "gender": pa.array([2, 1], pa.int32())})
    b = to_torch(build_batch(table, "interleaved", MAX_ITEMS, ("gender",), (0,)))
    inputs = [b[k] for k in ("item_ids", "token_types", "timestamps", "target_timestamps", "offsets")]
    is_item = b["token_types"] == ITEM
    with torch.no_grad():
        _, full = ranker(*inputs)
        scored = is_item & (torch.rand(len(is_item), generator=torch.Generator().manual_seed(1)) < 0.5)
        scored[torch.nonzero(is_item)[-1]] = True  # the last item of the batch, as an evaluation row has
        _, some = ranker(*inputs, scored=scored)
        _, alone = ranker(*(t[: b["offsets"][1]] for t in inputs[:4]), b["offsets"][:2])
    torch.testing.assert_close(some[scored], full[scored], rtol=1e-5, atol=1e-6)
    assert not some[~scored].any()
    first_user = slice(0, int(b["offsets"][1]))
    torch.testing.assert_close(alone, full[first_user], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the normal path

@pytest.fixture(scope="module")
def tiny_dlrm(ray_cluster, tmp_path_factory):
    """A prepared multi-action synthetic world and a tiny DLRM config that trains in seconds."""
    from genrec.data.pipeline import prepare

    root = tmp_path_factory.mktemp("dlrm")
    cfg = tiny_ranking_config(root, "tiny-dlrm", {"kind": "dlrm"}, ["click", "like"], epochs=4, seed=3,
                              run_name="tiny-dlrm")
    prepare(cfg.data, log=lambda *_: None)
    return cfg, root


def test_a_tiny_dlrm_trains_registers_evaluates_and_is_refused_by_serving(tiny_dlrm, tmp_path):
    import mlflow

    from genrec.serve.model import Scorer
    from genrec.artifact import load_model
    from genrec.train.trainer import evaluate_model, fit

    cfg, _ = tiny_dlrm
    run = fit(cfg, log=lambda *_: None)
    losses = [epoch["train/ranking_loss"] for epoch in run["history"]]
    assert losses[-1] < losses[0] and run["history"][-1]["train/retrieval_loss"] == 0.0
    # 240 users: too few test targets for the AUC to say more than that it is computed
    assert 0.3 < run["best"]["test/click/auc"] < 1.0 and math.isfinite(run["best"]["test/like/ne"])
    uri = f"models:/{run['registered_model']}/{run['version']}"
    model, model_cfg = load_model(uri, cfg.tracking.tracking_uri)
    assert isinstance(model, DLRMRanker) and model_cfg.model.kind == "dlrm"
    again = evaluate_model(cfg, uri, "test")
    assert again["click/auc"] == pytest.approx(run["best"]["test/click/auc"], rel=1e-6)
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    folder = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path))
    with pytest.raises(ValueError, match="'dlrm' cannot be served: it has no retrieval output"):
        Scorer(Path(folder), cache_bytes=0, microbatch=4)
