"""One-pass streaming training (train.mode one_pass) and the paper's HSTU ablations
(model.attention, model.relative_bias), on a real local Ray cluster and MLflow store."""

import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from mlflow.tracking import MlflowClient

from genrec.artifact import build_model
from genrec.config import ConfigError, ExperimentConfig, load_config
from genrec.data.batches import build_batch
from genrec.data.pipeline import prepare
from genrec.data.prepared import read_split
from genrec.metrics import metrics_from_ranks
from genrec.model import EncoderConfig, HSTULayer, build_encoder
from genrec.train.batching import batch_spec
from genrec.train.streaming import (Popularity, StreamWindows, add_to_stream, evaluate_window, popularity_stream,
                                   sampled_users)
from genrec.train.trainer import fit

DAY = 86_400


def sequences(*users):
    """A sequence table from lists of (item, day) per user."""
    return pa.table({
        "user": pa.array(np.arange(1, len(users) + 1), pa.int32()),
        "items": pa.array([[i for i, _ in u] for u in users], pa.list_(pa.int32())),
        "actions": pa.array([[0] * len(u) for u in users], pa.list_(pa.int32())),
        "timestamps": pa.array([[d * DAY for _, d in u] for u in users], pa.list_(pa.int64())),
    })


def test_window_rows_hold_the_past_and_mark_the_window_as_targets():
    table = sequences([(1, 0), (2, 1), (3, 8), (4, 9)], [(5, 2), (6, 3)], [(7, 10)])
    windows = StreamWindows(table, window_days=7)
    assert len(windows) == 2 and windows.edges[0] == 0
    first, first_targets = windows.window(0)
    assert first["items"].to_pylist() == [[1, 2], [5, 6]] and first["eval_start"].to_pylist() == [0, 0]
    assert first_targets == 2  # items 2 and 6; a user's first event has no history
    second, second_targets = windows.window(1)
    assert second["user"].to_pylist() == [1, 3] and second["items"].to_pylist() == [[1, 2, 3, 4], [7]]
    assert second["eval_start"].to_pylist() == [2, 0] and second_targets == 2
    batch = build_batch(second, "items", keep_items=10)
    assert batch["target_ids"].tolist() == [0, 3, 4]  # user 1 predicts 3 and 4 from its past; user 3 has no input


def test_stream_metrics_are_target_weighted_means():
    best = add_to_stream({}, {"window/hr@10": 0.5, "window/targets": 10})
    best = add_to_stream(best, {"window/hr@10": 0.2, "window/targets": 30})
    assert best["stream/hr@10"] == pytest.approx((0.5 * 10 + 0.2 * 30) / 40)
    assert best["stream/targets"] == 40 and best["stream/windows"] == 2


@pytest.fixture(scope="module")
def stream(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    cfg = ExperimentConfig.model_validate({
        "name": "stream",
        "data": {"source": {"kind": "synthetic", "num_users": 200, "num_items": 100, "mean_events_per_user": 15,
                            "max_events_per_user": 40, "duration_days": 120, "num_shards": 2, "path": str(root / "raw")},
                 "output_dir": str(root / "data"), "num_partitions": 2},
        # 2 workers with the item table split row-wise (model.embedding_sharding), each ranking every window
        # against its own block, and updating only the rows a step touched (train.embedding_optimizer)
        "model": {"kind": "hstu", "dim": 16, "num_blocks": 1, "num_heads": 1, "dropout": 0.0, "max_seq_len": 64,
                  "embedding_sharding": "row_wise"},
        "train": {"mode": "one_pass", "window_days": 30, "batch_size": 32, "num_negatives": 16, "num_workers": 2,
                  "embedding_optimizer": "row_sparse_adamw",
                  "storage_path": str(root / "runs"), "cpus_per_worker": 0.5, "threads_per_worker": 1, "seed": 5,
                  "run_name": "one-pass"},
        "tracking": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "tests"},
    })
    prepare(cfg.data, log=lambda *_: None)
    lines = []
    return cfg, fit(cfg, log=lines.append), lines


def test_one_pass_ranks_every_event_once_before_training_on_it(stream):
    cfg, result, lines = stream
    table = read_split(cfg.data.output_dir, "sequences")
    windows = StreamWindows(table, cfg.train.window_days)
    history = result["history"]
    assert len(history) == len(windows) == result["epochs_run"]
    # every event but each user's first is ranked exactly once, in the window it happens in
    lengths = np.diff(table["items"].combine_chunks().offsets.to_numpy())
    assert sum(h.get("window/targets", 0) for h in history) == int((lengths - 1).clip(min=0).sum())
    # window 1 is ranked by the untrained model: the seeded initial weights score exactly what the run logged
    torch.manual_seed(cfg.train.seed)
    untrained = build_model(cfg)
    first, _ = windows.window(0)
    assert evaluate_window(untrained, first, batch_spec(cfg), 256, "pessimistic") == \
        {k: v for k, v in history[0].items() if k.startswith("window/")}
    # the run's result is the target-weighted mean of windows 2..W, and the stream was learnable
    scored = [h for h in history[1:] if "window/targets" in h]
    expected = sum(h["window/hr@10"] * h["window/targets"] for h in scored) / sum(h["window/targets"] for h in scored)
    assert result["best"]["stream/hr@10"] == pytest.approx(expected)
    assert result["best"]["stream/hr@50"] > history[0]["window/hr@50"]
    assert any(line.startswith("[train] window 2/") and "window ndcg@10" in line for line in lines)


def test_window_passes_train_each_window_again_after_ranking_it(stream, tmp_path):
    cfg, single, _ = stream
    tree = cfg.model_dump(mode="json")
    tree["model"]["embedding_sharding"] = "replicated"
    tree["train"].update(window_passes=2, num_workers=1, embedding_optimizer="adamw", cpus_per_worker=1,
                         storage_path=str(tmp_path / "runs"), run_name="two-passes")
    history = fit(ExperimentConfig.model_validate(tree), log=lambda *_: None)["history"]
    assert len(history) == len(single["history"])
    # each window is ranked before any pass over it: window 1 by the same untrained weights
    assert {k: v for k, v in history[0].items() if k.startswith("window/")} == \
        {k: v for k, v in single["history"][0].items() if k.startswith("window/")}
    # two full passes over each window's events: twice a single pass's FLOPs, window by window
    for two, one in zip(history, single["history"]):
        assert two["train/window_passes"] == 2
        assert two["train/flops"] == pytest.approx(2 * one["train/flops"], rel=1e-9)
    # and the second pass trained: the later windows are ranked by other weights than a single pass gives
    assert any(two["window/ndcg@10"] != one["window/ndcg@10"]
               for two, one in zip(history[1:], single["history"][1:]) if "window/ndcg@10" in two)


def test_window_ranking_can_sample_a_fixed_share_of_users(stream):
    cfg, _, _ = stream
    windows = StreamWindows(read_split(cfg.data.output_dir, "sequences"), cfg.train.window_days)
    first, second = windows.window(0)[0], windows.window(1)[0]
    assert sampled_users(first, 1.0) is first
    half = sampled_users(second, 0.5)
    assert 0.3 < half.num_rows / second.num_rows < 0.7
    # the same users in every window, and a smaller share is a subset of a larger one
    both = set(first["user"].to_pylist()) & set(second["user"].to_pylist())
    assert {u for u in sampled_users(first, 0.5)["user"].to_pylist() if u in both} == \
        {u for u in half["user"].to_pylist() if u in both}
    assert set(sampled_users(second, 0.2)["user"].to_pylist()) < set(half["user"].to_pylist())
    # the ranked targets are exactly the sampled users' events in the window that have an earlier event
    start = windows.edges[1]
    expected = sum(sum(1 for k, t in enumerate(stamps) if k > 0 and t >= start)
                   for stamps in half["timestamps"].to_pylist())
    torch.manual_seed(0)
    scored = evaluate_window(build_model(cfg), second, batch_spec(cfg), 256, "pessimistic", users=0.5)
    assert scored["window/targets"] == expected > 0


def test_popularity_baseline_ranks_the_runs_own_targets_by_earlier_counts(stream):
    """jobs/stream_baseline.py: the same targets as the run (windows 2..W), each ranked by the events before
    its window; checked for window 2 against a plain-Python ranking (pessimistic ties, the user's recent
    items excluded, the target itself never)."""
    cfg, result, _ = stream
    table = read_split(cfg.data.output_dir, "sequences")
    spec = batch_spec(cfg)
    baseline = popularity_stream(table, cfg.train.window_days, spec, 256, "pessimistic")
    assert baseline["stream/targets"] == result["best"]["stream/targets"]
    windows = StreamWindows(table, cfg.train.window_days)
    start, end = windows.edges[1], windows.edges[2]
    items = table["items"].to_pylist()
    stamps = table["timestamps"].to_pylist()
    counts = np.zeros(spec.num_items + 1)
    for row_items, row_stamps in zip(items, stamps):
        for item, t in zip(row_items, row_stamps):
            counts[item] += t < start
    ranks = []
    for row_items, row_stamps in zip(items, stamps):
        for k in range(1, len(row_items)):
            if start <= row_stamps[k] < end:
                target, recent = row_items[k], set(row_items[max(0, k - spec.keep_items):k]) - {row_items[k]}
                ranks.append(sum(1 for item in range(1, spec.num_items + 1)
                                 if item not in recent and counts[item] >= counts[target]))
    second, _ = windows.window(1)
    scored = evaluate_window(Popularity(counts), second, spec, 256, "pessimistic")
    expected = metrics_from_ranks(torch.tensor(ranks))
    assert scored["window/targets"] == len(ranks)
    assert scored["window/hr@10"] == pytest.approx(expected["hr@10"]) and \
        scored["window/ndcg@10"] == pytest.approx(expected["ndcg@10"])


def test_one_pass_logs_each_window_to_mlflow(stream):
    cfg, result, _ = stream
    client = MlflowClient(cfg.tracking.tracking_uri)
    steps = client.get_metric_history(result["mlflow_run_id"], "window/hr_at_10")
    assert [m.step for m in steps] == [h["epoch"] for h in result["history"] if "window/hr@10" in h]
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.metrics["best/stream/hr_at_10"] == pytest.approx(result["best"]["stream/hr@10"])


def test_config_refuses_what_one_pass_and_the_ablations_cannot_mean(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {mode: one_pass, data_mode: streaming}\n")
    with pytest.raises(ConfigError, match="train.data_mode='streaming' does not apply to train.mode='one_pass'"):
        load_config(bad)
    bad.write_text("model: {kind: sasrec, relative_bias: none}\n")
    with pytest.raises(ConfigError, match="model.relative_bias='none' is an HSTU option"):
        load_config(bad)
    bad.write_text("data: {source: {kind: synthetic}, output_dir: out}\nmodel: {kind: dlrm}\n"
                   "batching: {layout: interleaved}\ntrain: {mode: one_pass}\n"
                   "ranking: {tasks: [{name: like, kind: binary, action: like}]}\n")
    with pytest.raises(ConfigError, match="train.mode='one_pass' trains the retrieval encoders"):
        load_config(bad)
    bad.write_text("model: {attention: linear}\n")
    with pytest.raises(ConfigError, match="model.attention"):
        load_config(bad)


ABLATIONS = [(a, r) for a in ("pointwise", "softmax") for r in ("both", "position", "time", "none")]


def tiny_encoder(attention, relative_bias, seed=0):
    torch.manual_seed(seed)
    config = EncoderConfig("hstu", num_items=30, num_positions=8, dim=8, num_heads=2, dropout=0.0,
                           attention=attention, relative_bias=relative_bias)
    return build_encoder(config).double().eval()


def run(model, items, stamps):
    offsets = torch.tensor([0, len(items)])
    stamps = torch.tensor(stamps, dtype=torch.long)
    return model(torch.tensor(items), stamps, torch.cat([stamps[1:], stamps[-1:] + 60]), offsets)


@pytest.mark.parametrize("attention,relative_bias", ABLATIONS)
def test_every_ablation_is_causal_and_uses_only_its_bias_terms(attention, relative_bias):
    model = tiny_encoder(attention, relative_bias)
    rab = model.blocks.layers[0].rab
    assert (rab is None) == (relative_bias == "none")
    if rab is not None:
        assert (rab.time_weights is None) == (relative_bias == "position")
        assert (rab.position_weights is None) == (relative_bias == "time")
    items, stamps = [3, 7, 1, 9, 4], [0, 100, 5_000, 90_000, 2_000_000]
    out = run(model, items, stamps)
    # causal: changing the last item and time leaves every earlier output unchanged
    changed = run(model, items[:-1] + [11], stamps[:-1] + [9_000_000])
    torch.testing.assert_close(out[:-2], changed[:-2], rtol=0, atol=1e-12)
    # time gaps matter exactly when the time term is there
    scaled = run(model, items, [s * 7 for s in stamps])
    assert torch.allclose(out, scaled, rtol=0, atol=1e-12) == (relative_bias in ("position", "none"))


def test_softmax_ablation_is_a_causal_softmax_with_the_bias():
    torch.manual_seed(1)
    layer = HSTULayer(EncoderConfig(dim=4, num_heads=1, num_positions=6, dropout=0.0, attention="softmax")).double()
    L, d = 5, 4
    q, k, v = (torch.randn(L, 1, d, dtype=torch.double) for _ in range(3))
    bias_index = torch.randint(0, 10, (1, L, L))
    out = layer.plain_attention(q, k, v, torch.tensor([0, L]), bias_index)
    rab = layer.rab(bias_index)[0]
    for i in range(L):
        logits = (q[i, 0] @ k[: i + 1, 0].T) / math.sqrt(d) + rab[i, : i + 1]
        torch.testing.assert_close(out[i, 0], torch.softmax(logits, 0) @ v[: i + 1, 0])
    # a constant value row comes back unchanged (weights sum to 1); pointwise HSTU keeps the intensity instead
    constant = torch.ones(L, 1, d, dtype=torch.double)
    torch.testing.assert_close(layer.plain_attention(q, k, constant, torch.tensor([0, L]), bias_index), constant)
