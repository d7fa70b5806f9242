"""Full-ranking evaluation against independent references: sorting the GEMM scores,
a float64 ranking, the tie policy, and a real trained tiny model."""

import math

import pytest
import torch
from conftest import tiny_ranking_config

from genrec.metrics import metrics_from_ranks
from genrec.model import EncoderConfig, build_encoder, sampled_softmax_loss
from genrec.train.evaluation import evaluate, full_ranks

NO_HISTORY = (torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))


def reference_ranks(queries, targets, items, history, history_rows, dtype):
    """Rank by the plain definition, in `dtype`: 1 + items scoring strictly higher,
    padding and history (never the target) removed. Also says which rows have
    another candidate within `near` of the target (a tie at float32 precision)."""
    scores = queries.to(dtype) @ items.to(dtype).T
    scores[:, 0] = -math.inf
    keep = history != targets[history_rows]
    scores[history_rows[keep], history[keep]] = -math.inf
    target = scores.gather(1, targets.unsqueeze(1))
    others = scores.clone()
    others.scatter_(1, targets.unsqueeze(1), -math.inf)
    near_tie = ((others - target).abs() < 1e-6).any(1)
    return 1 + (others > target).sum(1), near_tie


def unit(rows, dim, generator):
    return torch.nn.functional.normalize(torch.randn(rows, dim, generator=generator), dim=-1)


def test_target_never_outranks_itself_random_vectors():
    g = torch.Generator().manual_seed(0)
    queries, items = unit(512, 50, g), unit(5001, 50, g)
    targets = torch.randint(1, 5001, (512,), generator=g)
    # the bug's precondition: the target scored apart rounds differently from its GEMM column
    apart = (queries * items[targets]).sum(-1)
    gemm = (queries @ items.T).gather(1, targets.unsqueeze(1)).squeeze(1)
    assert (gemm > apart).sum() > 10
    ranks = full_ranks(queries, targets, items, *NO_HISTORY)
    # = the rank from sorting the GEMM scores (descending; padding dropped)
    scores = queries @ items.T
    scores[:, 0] = -math.inf
    order = scores.argsort(dim=1, descending=True, stable=True)
    sorted_rank = 1 + (order == targets.unsqueeze(1)).float().argmax(1)
    assert torch.equal(ranks, sorted_rank)
    # = the float64 reference wherever float32 cannot tell two scores apart
    exact, near_tie = reference_ranks(queries, targets, items, *NO_HISTORY, torch.float64)
    assert near_tie.float().mean() < 0.05  # float32 rounding is ~1e-7 per score
    assert torch.equal(ranks[~near_tie], exact[~near_tie])
    # and item blocks smaller than the catalog change nothing
    assert torch.equal(full_ranks(queries, targets, items, *NO_HISTORY, item_block=777), ranks)


def test_tie_policy():
    # items 1..4 score 0.5, 0.5, 0.9, 0.5 for the one user; target 2 ties with items 1 and 4
    items = torch.tensor([[0.0, 0], [0.5, 0], [0.5, 0], [0.9, 0], [0.5, 0]])
    query = torch.tensor([[1.0, 0]])
    target = torch.tensor([2])
    assert full_ranks(query, target, items, *NO_HISTORY).tolist() == [4]  # pessimistic: below every tie
    assert full_ranks(query, target, items, *NO_HISTORY, ties="optimistic").tolist() == [2]
    # a history item that ties is removed first
    assert full_ranks(query, target, items, torch.tensor([4]), torch.tensor([0])).tolist() == [3]
    # a collapsed model (every score equal) is ranked last, not first
    flat = torch.ones(6, 2)
    assert full_ranks(query, torch.tensor([3]), flat, *NO_HISTORY).tolist() == [5]
    # a non-finite score ranks last under either policy
    nan_query = torch.tensor([[math.nan, 0.0]])
    for ties in ("pessimistic", "optimistic"):
        assert full_ranks(nan_query, target, items, *NO_HISTORY, ties=ties).tolist() == [4]
    with pytest.raises(ValueError, match="ties"):
        full_ranks(query, target, items, *NO_HISTORY, ties="half")


def test_trained_tiny_model_ranks_equal_float64_reference():
    torch.manual_seed(0)
    num_items, users, length = 800, 64, 30
    model = build_encoder(EncoderConfig("hstu", num_items, num_positions=length, dim=24, num_blocks=1, num_heads=2, dropout=0.0))
    g = torch.Generator().manual_seed(1)
    # learnable sequences: each user walks the catalog in steps of its own stride
    stride = torch.randint(1, 5, (users, 1), generator=g)
    item_ids = ((torch.randint(0, num_items, (users, 1), generator=g) + stride * torch.arange(length)) % num_items + 1)
    timestamps = torch.arange(length).repeat(users, 1) * 60 + 1_000_000
    offsets = torch.arange(0, users * length + 1, length)
    flat_items, flat_ts = item_ids.flatten(), timestamps.flatten()
    targets = torch.cat([item_ids[:, 1:], torch.zeros(users, 1, dtype=torch.long)], 1).flatten()
    target_ts = torch.cat([timestamps[:, 1:], timestamps[:, -1:] + 60], 1).flatten()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for step in range(40):
        users_out = model(flat_items, flat_ts, target_ts, offsets)
        loss = sampled_softmax_loss(users_out, targets, model.all_item_embeddings(), num_negatives=32,
                                    generator=torch.Generator().manual_seed(step))
        first = first if first is not None else float(loss.detach())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < first  # it learned something
    model.eval()
    with torch.no_grad():
        out = model(flat_items, flat_ts, target_ts, offsets)
        rows = torch.nonzero(targets > 0).squeeze(1)
        queries, wanted, items = out[rows], targets[rows], model.all_item_embeddings()
    # history of flat position p: the user's items up to p
    user_of = rows // length
    seen = rows % length + 1
    history_rows = torch.repeat_interleave(torch.arange(len(rows)), seen)
    history = torch.cat([item_ids[u, :s] for u, s in zip(user_of.tolist(), seen.tolist())])
    ranks = full_ranks(queries, wanted, items, history, history_rows)
    exact, near_tie = reference_ranks(queries, wanted, items, history, history_rows, torch.float64)
    assert near_tie.float().mean() < 0.01
    assert torch.equal(ranks[~near_tie], exact[~near_tie])
    assert metrics_from_ranks(ranks)["hr@10"] > 10 / num_items  # better than chance: a real trained model
    # evaluate() finds the same histories on its own from the jagged batch
    batch = {"item_ids": flat_items, "timestamps": flat_ts, "target_timestamps": target_ts, "offsets": offsets,
             "target_ids": targets}
    metrics = evaluate(model, [batch])
    assert metrics.pop("count") == len(rows)
    assert metrics == pytest.approx(metrics_from_ranks(ranks))


def test_evaluate_model_ranks_a_trained_ranker_as_the_training_loop_does(ray_cluster, tmp_path):
    """A registered gr model is evaluated with the ranking evaluator on its own tasks (per-task AUC / NE,
    and retrieval at its action positions): the numbers the training loop reported for its test split.
    An items-layout config cannot evaluate it: the error names the key."""
    from genrec.config import ConfigError, ExperimentConfig
    from genrec.data.pipeline import prepare
    from genrec.train.trainer import evaluate_model, fit

    cfg = tiny_ranking_config(tmp_path, "tiny-ranker", {"kind": "gr"}, ["click", "like"], num_users=160,
                              num_items=80, mean_events_per_user=16, epochs=1, seed=3)
    prepare(cfg.data, log=lambda *_: None)
    result = fit(cfg, log=lambda *_: None)
    uri = f"models:/tiny-ranker/{result['version']}"
    metrics = evaluate_model(cfg, uri, "test")
    for task in ("click", "like"):
        for key in ("auc", "ne", "log_loss", "calibration"):
            assert math.isfinite(metrics[f"{task}/{key}"]), (task, key)
        assert 0 <= metrics[f"{task}/auc"] <= 1 and metrics[f"{task}/ne"] > 0
    assert math.isfinite(metrics["ne_gain"]) and 0 < metrics["hr@200"] <= 1
    # the loop counts the targets it scored under its own name
    loop = {k.removeprefix("test/"): v for k, v in result["best"].items() if k.startswith("test/") and k != "test/targets"}
    assert "click/ne" in loop and "like/auc" in loop and "ndcg@10" in loop
    assert {k: metrics[k] for k in loop} == pytest.approx(loop, rel=1e-5)
    retrieval_config = ExperimentConfig.model_validate(
        {**cfg.model_dump(), "model": {**cfg.model.model_dump(), "kind": "hstu"}, "batching": {"layout": "items"}})
    with pytest.raises(ConfigError, match=r"batching.layout='items' does not fit model .*model.kind='gr'"):
        evaluate_model(retrieval_config, uri, "test")
