"""A time split end to end: which users it evaluates, and that evaluation scores every event after
the cutoff (however many a user has beyond the model's N), each from its user's most recent N events,
for retrieval (full ranking) and for ranking (per-task NE / AUC), in the training loop too."""

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from genrec.config import ExperimentConfig, TimeSplit
from genrec.data.batches import build_batch, count_targets, target_windows
from genrec.data.loader import BatchSpec, to_torch
from genrec.data.sequences import _user_fraction, make_splits
from genrec.model import EncoderConfig, build_encoder
from genrec.data.layout import TOKEN_TYPES
from genrec.model.generative import GenerativeConfig, GenerativeRecommender, TokenTypes
from genrec.train.batching import batch_spec, evaluated_users, evaluation_batches, evaluation_split, sampled_users
from genrec.train.evaluation import evaluate
from genrec.train.ranking import TaskLabels, evaluate_ranking

torch.set_num_threads(1)
NUM_ITEMS, N, CUTOFF = 60, 5, 1_000


def sequences(lengths_before_after, seed=0):
    """One user per (events at or before CUTOFF, events after it); every user's items are distinct."""
    rng = np.random.default_rng(seed)
    rows = []
    for before, after in lengths_before_after:
        stamps = np.r_[np.sort(rng.choice(np.arange(1, CUTOFF + 1), before, replace=False)),
                       np.sort(rng.choice(np.arange(CUTOFF + 1, 2 * CUTOFF), after, replace=False))]
        rows.append((rng.choice(np.arange(1, NUM_ITEMS + 1), before + after, replace=False),
                     rng.integers(0, 4, before + after), stamps.astype(np.int64)))
    return pa.table({
        "user": pa.array(np.arange(1, len(rows) + 1), pa.int32()),
        "items": pa.array([r[0].tolist() for r in rows], pa.list_(pa.int32())),
        "actions": pa.array([r[1].tolist() for r in rows], pa.list_(pa.int32())),
        "timestamps": pa.array([r[2].tolist() for r in rows], pa.list_(pa.int64())),
        "values": pa.array([[float(v % 5 + 1) for v in r[0]] for r in rows], pa.list_(pa.float32())),
    })


# users 1-4 only before the cutoff, 5-8 only after it, 9-40 on both sides, many with more than N after it
USERS = [(6, 0)] * 4 + [(0, 7)] * 4 + [(1 + i % 7, 1 + (3 * i) % 17) for i in range(32)]


def test_a_time_split_evaluates_each_user_with_events_on_both_sides_once_in_valid_or_test_by_user_hash():
    table = sequences(USERS)
    both_sides = set(range(9, 41))
    for fraction in (0.0, 0.5, 1.0):
        splits, counts = make_splits(table, TimeSplit(kind="time", cutoff=CUTOFF, valid_fraction=fraction), CUTOFF)
        valid, test = set(splits["valid"]["user"].to_pylist()), set(splits["test"]["user"].to_pylist())
        assert valid | test == both_sides and not valid & test
        assert valid == {u for u in both_sides if _user_fraction(np.array([u]))[0] < fraction}
        # users whose events all come after the cutoff have no history: neither trained on nor evaluated
        assert set(splits["train"]["user"].to_pylist()) == set(range(1, 5)) | both_sides
        assert counts["users_not_evaluated"] == 8
        if fraction == 0.5:  # about valid_fraction of the 32 users, by the hash: test numbers come from the rest
            assert 10 < len(valid) < 22


def post_cutoff_events(split: pa.Table) -> int:
    stamps = split["timestamps"].to_pylist()
    return sum(sum(t > CUTOFF for t in row) for row in stamps)


def one_row_per_target(split: pa.Table) -> pa.Table:
    """The reference: target k of a user is its own row, the user's events [k - N, k] (leave-one-out style)."""
    rows = []
    for row in split.to_pylist():
        for k in range(max(row["eval_start"], 1), len(row["items"])):
            start = max(0, k - N)
            rows.append({**{c: row[c][start:k + 1] for c in ("items", "actions", "timestamps", "values")},
                         "user": row["user"], "eval_start": k - start})
    return pa.Table.from_pylist(rows, schema=split.schema)


@pytest.fixture(scope="module")
def time_splits():
    splits, _ = make_splits(sequences(USERS, seed=1), TimeSplit(kind="time", cutoff=CUTOFF), CUTOFF)
    assert max(np.diff(splits["test"]["items"].combine_chunks().offsets.to_numpy())
               - splits["test"]["eval_start"].to_numpy()) > 2 * N  # some users have far more targets than N
    return splits


def test_target_windows_give_every_target_its_most_recent_n_events(time_splits):
    for split in ("valid", "test"):
        table = time_splits[split]
        windows = target_windows(table, N)
        assert count_targets(table) == count_targets(windows) == post_cutoff_events(table)
        batch = build_batch(windows, "items", N)
        assert int((batch["target_ids"] > 0).sum()) == post_cutoff_events(table)
        # the plain batch keeps only each user's last N inputs: the earlier targets were lost there
        assert int((build_batch(table, "items", N)["target_ids"] > 0).sum()) < post_cutoff_events(table)
        reference = build_batch(one_row_per_target(table), "items", N)
        assert sorted(batch["target_ids"][batch["target_ids"] > 0]) == \
            sorted(reference["target_ids"][reference["target_ids"] > 0])


def test_retrieval_evaluation_scores_every_target_after_the_cutoff(time_splits):
    torch.manual_seed(0)
    model = build_encoder(EncoderConfig(num_items=NUM_ITEMS, num_positions=N, dim=16, num_blocks=2, dropout=0.0,
                                        attention_impl="pytorch")).eval()
    spec = BatchSpec("items", N, num_items=NUM_ITEMS)
    for split in ("valid", "test"):
        table = time_splits[split]
        scored = evaluate(model, evaluation_batches(table, spec, batch_size=7))
        assert scored["count"] == post_cutoff_events(table)
        # each target exactly as if it were a leave-one-out target with its most recent N events
        alone = evaluate(model, [to_torch(build_batch(one_row_per_target(table), "items", N))])
        assert scored == pytest.approx(alone, rel=1e-5)


def test_ranking_evaluation_scores_every_impression_after_the_cutoff(time_splits):
    encoder = EncoderConfig(num_items=NUM_ITEMS, num_positions=2 * N + 1, dim=16, num_blocks=2, num_heads=2,
                            dropout=0.0, attention_impl="pytorch")
    torch.manual_seed(0)
    model = GenerativeRecommender(GenerativeConfig(encoder, num_actions=4, multi_hot_actions=False, num_context=0,
                                                   tasks=(("a1", "binary"), ("rating", "regression")),
                                                   token_types=TokenTypes(*TOKEN_TYPES))).eval()
    cfg = ExperimentConfig.model_validate({
        "data": {"source": {"kind": "synthetic"}}, "model": {"kind": "gr"}, "batching": {"layout": "interleaved"},
        "ranking": {"tasks": [{"name": "a1", "action": "a1"}, {"name": "rating", "kind": "regression"}]}})
    labels = TaskLabels(cfg, {"actions": ["a0", "a1", "a2", "a3"], "action_encoding": "index"})
    spec = BatchSpec("interleaved", N, num_items=NUM_ITEMS)
    score = lambda batches: evaluate_ranking(model, batches, labels, ["binary", "regression"], ["a1", "rating"])  # noqa: E731
    for split in ("valid", "test"):
        table = time_splits[split]
        scored = score(evaluation_batches(table, spec, batch_size=7))
        assert scored["count"] == scored["a1/count"] == scored["rating/count"] == post_cutoff_events(table)
        alone = score([to_torch(build_batch(one_row_per_target(table), "interleaved", N))])
        assert scored == pytest.approx(alone, rel=1e-5)  # per-task NE / AUC and the retrieval of the same targets
        assert math.isfinite(scored["a1/ne"]) and 0 < scored["a1/auc"] < 1 and scored["hr@200"] > 0


def same_rows(a: pa.Table, b: pa.Table) -> bool:
    """Equal tables, a missing value (NaN) equal to itself."""
    values = [np.asarray(t["values"].combine_chunks().flatten()) for t in (a, b)]
    return a.drop_columns(["values"]).equals(b.drop_columns(["values"])) and \
        np.array_equal(*values, equal_nan=True) and a["values"].combine_chunks().offsets == b["values"].combine_chunks().offsets


def test_the_training_loop_scores_every_target_and_says_so(ray_cluster, tmp_path):
    from genrec.data.pipeline import prepare
    from genrec.data.prepared import read_split
    from genrec.train.trainer import fit

    cfg = ExperimentConfig.model_validate({
        "name": "time-split-gr",
        "data": {"source": {"kind": "synthetic", "num_users": 80, "num_items": 80, "mean_events_per_user": 24,
                            "multi_action_rate": 0.3, "duration_days": 1, "num_shards": 2, "path": str(tmp_path / "raw")},
                 "output_dir": str(tmp_path / "data"), "num_partitions": 2,
                 "split": {"kind": "time", "quantile": 0.5}},
        "model": {"kind": "gr", "dim": 16, "num_blocks": 1, "num_heads": 1, "dropout": 0.0, "max_seq_len": 4},
        "batching": {"layout": "interleaved"},
        "ranking": {"tasks": [{"name": "click", "action": "click"}, {"name": "like", "action": "like"}]},
        "train": {"epochs": 1, "batch_size": 48, "num_negatives": 16, "storage_path": str(tmp_path / "runs"),
                  "cpus_per_worker": 0.5, "threads_per_worker": 1, "seed": 3},
        "eval": {"test_epochs": [1]},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "tests"},
    })
    prepare(cfg.data, log=lambda *_: None)
    valid, test = (read_split(cfg.data.output_dir, s) for s in ("valid", "test"))
    targets = {s: int(sum(len(r) for r in t["items"].to_pylist()) - sum(t["eval_start"].to_pylist()))
               for s, t in (("valid", valid), ("test", test))}
    most = max(len(r) - e for r, e in zip(test["items"].to_pylist(), test["eval_start"].to_pylist()))
    assert most > 2 * cfg.model.max_seq_len  # users with many more targets than N
    # what evaluation reads, a batch of rows at a time: every target's window, or those of a fixed share of users
    keep = batch_spec(cfg).keep_items
    read = evaluation_split(cfg.data.output_dir, "test", keep)
    assert same_rows(read, target_windows(test, keep)) and same_rows(target_windows(read, keep), read)
    assert same_rows(evaluation_split(cfg.data.output_dir, "test", keep, rows=3), read)  # many batches a file
    half = evaluation_split(cfg.data.output_dir, "test", keep, users=0.5)
    assert same_rows(half, target_windows(evaluated_users(test, 0.5), keep)) and 0 < half.num_rows < read.num_rows
    assert not sampled_users(test, 0.5).num_rows  # why not the split's own hash: it would keep no test user
    lines = []
    result = fit(cfg, log=lines.append)
    (first,) = result["history"]
    assert first["valid/targets"] == targets["valid"]
    assert first["test/targets"] == result["best"]["test/targets"] == targets["test"]
    assert any(f"valid {targets['valid']:,} targets of {valid.num_rows:,} users" in line for line in lines)
    assert any(f"({targets['test']:,} of {targets['test']:,} test targets scored)" in line for line in lines)
    # a ranker's lines show its tasks' NE and AUC; eval.test_epochs results are printed and returned
    epoch_line = next(line for line in lines if line.startswith("[train] epoch 1/1"))
    assert " valid click NE " in epoch_line and " test click NE " in epoch_line and "like NE" in epoch_line
    assert "AUC" in epoch_line and "nan" not in epoch_line
    assert any(line.startswith("[train] epoch 1 (eval.test_epochs): test click NE") for line in lines)
    assert result["test_epochs"][1]["test/click/ne"] == first["test/click/ne"]
