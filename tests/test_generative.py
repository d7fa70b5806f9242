"""Generative ranking (genrec.model.generative, dlrm, ranking_losses) on real interleaved
batches from genrec.data.batches: causality of actions, the target-aware rank contract,
multi-hot actions, heads and the multi-task loss. Small and CPU-only."""

import json
import math
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import tiny_ranking_config

from genrec.data.batches import build_batch
from genrec.data.loader import to_torch
from genrec.model.dlrm import DLRMRanker
from genrec.model.encoder_config import EncoderConfig
from genrec.data.layout import ACTION, ITEM, TOKEN_TYPES
from genrec.model.generative import GenerativeConfig, GenerativeRecommender, TokenTypes
from genrec.model.ranking_losses import multitask_loss

torch.set_num_threads(1)
NUM_ITEMS, NUM_ACTIONS, MAX_ITEMS = 40, 3, 12
CONTEXT_COLUMNS, CONTEXT_SHIFTS = ("gender", "age"), (0, 3)


def config(multi_hot=True, dropout=0.0):
    tokens = len(CONTEXT_COLUMNS) + 2 * MAX_ITEMS + 1
    encoder = EncoderConfig(num_items=NUM_ITEMS, num_positions=tokens, dim=16, num_blocks=2, num_heads=2,
                            dropout=dropout, attention_impl="pytorch")
    return GenerativeConfig(encoder, NUM_ACTIONS, multi_hot, num_context=10,
                            tasks=(("click", "binary"), ("like", "binary"), ("rating", "regression")),
                            token_types=TokenTypes(*TOKEN_TYPES))


def model_of(cls=GenerativeRecommender, seed=0, **kw):
    torch.manual_seed(seed)
    return cls(config(**kw)).eval()


def table(rows):
    """rows: (items, actions, timestamps) per user -> a sequence table as the data layer writes it."""
    return pa.table({
        "user": pa.array(range(1, len(rows) + 1), pa.int32()),
        "items": pa.array([list(r[0]) for r in rows], pa.list_(pa.int32())),
        "actions": pa.array([list(r[1]) for r in rows], pa.list_(pa.int32())),
        "timestamps": pa.array([list(r[2]) for r in rows], pa.list_(pa.int64())),
        "gender": pa.array([1 + i % 2 for i in range(len(rows))], pa.int32()),
        "age": pa.array([1 + i % 5 for i in range(len(rows))], pa.int32()),
    })


def random_rows(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.choice(np.arange(1, NUM_ITEMS + 1), n, replace=False), rng.integers(1, 2**NUM_ACTIONS, n),
             np.cumsum(rng.integers(1, 5000, n)) + 1_600_000_000) for n in lengths]


def interleaved(rows):
    return to_torch(build_batch(table(rows), "interleaved", MAX_ITEMS, CONTEXT_COLUMNS, CONTEXT_SHIFTS))


def run(model, b):
    return model(b["item_ids"], b["token_types"], b["timestamps"], b["target_timestamps"], b["offsets"])


@pytest.mark.parametrize("cls", [GenerativeRecommender, DLRMRanker])
def test_an_items_own_action_never_changes_its_score(cls):
    model = model_of(cls)
    rows = random_rows([9, 6])
    b = interleaved(rows)
    _, logits = run(model, b)
    items = torch.nonzero(b["token_types"] == ITEM).squeeze(1)
    changed_later = False
    for p in items[:-1].tolist():  # every item of the first user but its last (which has no action token)
        if b["token_types"][p + 1] != ACTION:
            continue
        other = dict(b)
        other["item_ids"] = b["item_ids"].clone()
        other["item_ids"][p + 1] = (b["item_ids"][p + 1] % (2**NUM_ACTIONS - 1)) + 1  # a different action
        _, after = run(model, other)
        torch.testing.assert_close(after[: p + 1], logits[: p + 1], rtol=0, atol=0)  # Phi_i and all before it
        changed_later |= not torch.allclose(after[p + 2 :], logits[p + 2 :])
    assert changed_later, "actions must influence later items' scores (else the test proves nothing)"


def test_rank_scores_each_candidate_as_one_run_of_history_plus_it():
    model = model_of()
    (items, actions, stamps), = random_rows([7], seed=3)
    candidates = torch.tensor([5, 17, int(items[0]), 33, 2])  # one is already in the history
    request_time = int(stamps[-1]) + 600
    history_batch = interleaved([(np.r_[items, 1], np.r_[actions, 0], np.r_[stamps, request_time])])
    history = {k: history_batch[k][:-1] for k in ("item_ids", "token_types", "timestamps")}
    ranked = model.rank(history, candidates, request_time)
    assert ranked.shape == (len(candidates), 3)
    for c, row in zip(candidates.tolist(), ranked):
        # the training-time forward of history + this candidate, alone
        b = interleaved([(np.r_[items, c], np.r_[actions, 0], np.r_[stamps, request_time])])
        _, logits = run(model, b)
        torch.testing.assert_close(row, model.predictions(logits[-1]), rtol=1e-5, atol=1e-6)
    permutation = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(model.rank(history, candidates[permutation], request_time), ranked[permutation])
    assert (ranked[:, :2] > 0).all() and (ranked[:, :2] < 1).all()  # binary tasks come back as probabilities
    too_long = {k: v.repeat(3) for k, v in history.items()}
    with pytest.raises(ValueError, match="leaves no position for the candidate"):
        model.rank(too_long, candidates, request_time)


def test_rank_meets_the_serving_pieces():
    """history_inputs + candidate_embeddings + blocks + task_logits reproduce rank (the pieces M-FALCON uses)."""
    model = model_of()
    (items, actions, stamps), = random_rows([5], seed=4)
    b = interleaved([(items, actions, stamps)])
    history = {k: b[k][:-1] for k in ("item_ids", "token_types", "timestamps")}
    x, ts = model.history_inputs(history)
    n, request_time, c = x.size(0), int(stamps[-1]), torch.tensor([9])
    xs = torch.cat([x, model.candidate_embeddings(c, n)])
    now = ts.new_tensor([request_time])
    hidden = model.blocks(xs, torch.tensor([0, n + 1]), torch.cat([ts, now]), torch.cat([ts[1:], now, now]))
    torch.testing.assert_close(model.predictions(model.task_logits(hidden[-1:])), model.rank(history, c, request_time))


def test_multi_hot_action_embeds_as_the_sum_of_its_actions():
    model = model_of(multi_hot=True)
    rows = model.actions.weight
    got = model.action_embeddings(torch.tensor([0b101, 0b010, 0b111]))
    torch.testing.assert_close(got[0], rows[0] + rows[2])
    torch.testing.assert_close(got[1], rows[1])
    torch.testing.assert_close(got[2], rows.sum(0))
    # as a whole token too: bitmask token = sum of the one-action tokens, less the shared position/type part
    offsets = torch.tensor([0, 1])
    token = lambda a: model.token_embeddings(torch.tensor([a]), torch.tensor([ACTION]), offsets)
    shared = model.positions.weight[0] + model.token_types.weight[ACTION]
    torch.testing.assert_close(token(0b101) - shared, (token(0b001) - shared) + (token(0b100) - shared))
    single = model_of(multi_hot=False)  # an action vocabulary: the id picks one row
    torch.testing.assert_close(single.action_embeddings(torch.tensor([2])), single.actions.weight[2:3])


def test_heads_on_a_hand_made_example():
    model = model_of()
    with torch.no_grad():
        first, _, last = model.heads
        first.weight.copy_(torch.eye(16))
        first.bias.zero_()
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, math.log(3.0), 2.5]))
        last.weight[0, 0] = 1.0
    hidden = torch.zeros(2, 16)
    hidden[1, 0], hidden[1, 1] = 2.0, -2.0  # layer-normed (no affine): [1, -1, 0, ...] * sqrt(8)
    logits = model.task_logits(hidden)
    silu = lambda v: v / (1 + math.exp(-v))
    torch.testing.assert_close(logits[0], torch.tensor([0.0, math.log(3.0), 2.5]))
    torch.testing.assert_close(logits[1, 0], torch.tensor(silu(math.sqrt(8.0))), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.predictions(logits[0]), torch.tensor([0.5, 0.75, 2.5]))


def test_multitask_loss_on_a_hand_made_example():
    logits = torch.tensor([[0.0, 3.0], [1.0, 2.0]], requires_grad=True)
    labels = torch.tensor([[1.0, 2.5], [0.0, float("nan")]])  # no rating on the second impression
    binary = torch.tensor([True, False])
    loss, per_task = multitask_loss(logits, labels, binary, torch.tensor([1.0, 0.5]))
    bce = (math.log(2.0) + math.log(1 + math.e)) / 2  # -log sigmoid(0), -log(1 - sigmoid(1)); mean over 2
    mse = (3.0 - 2.5) ** 2 / 2
    torch.testing.assert_close(per_task, torch.tensor([bce, mse]))
    torch.testing.assert_close(loss, torch.tensor(bce + 0.5 * mse))
    loss.backward()
    assert logits.grad[1, 1] == 0  # an unlabelled entry gets no gradient
    # the data-parallel normaliser: sums over this worker's positions / (global count / world)
    half, _ = multitask_loss(logits[:1], labels[:1], binary, torch.tensor([1.0, 0.5]), normalizer=2.0)
    torch.testing.assert_close(half, torch.tensor(math.log(2.0) / 2 + 0.5 * 0.25 / 2))
    empty, _ = multitask_loss(logits[:0], labels[:0], binary, torch.tensor([1.0, 1.0]), normalizer=1.0)
    assert empty.item() == 0.0 and empty.requires_grad


# ----------------------------------------------------------------------------- labels and pointwise examples

def test_task_labels_from_bitmask_actions_and_ratings():
    from genrec.config import ExperimentConfig
    from genrec.train.ranking import TaskLabels

    cfg = ExperimentConfig.model_validate({
        "data": {"source": {"kind": "synthetic"}}, "model": {"kind": "gr"}, "batching": {"layout": "interleaved"},
        "ranking": {"tasks": [{"name": "a", "action": "like"}, {"name": "b", "rating_at_least": 4},
                              {"name": "c", "kind": "regression"}]}})
    manifest = {"actions": ["click", "like", "buy"], "action_encoding": "bitmask"}
    labels = TaskLabels(cfg, manifest)(torch.tensor([0b010, 0b101, 0b011]), torch.tensor([4.0, 3.5, float("nan")]))
    expected = torch.tensor([[1.0, 1.0, 4.0], [0.0, 0.0, 3.5], [1.0, float("nan"), float("nan")]])
    torch.testing.assert_close(labels, expected, equal_nan=True)
    by_index = TaskLabels(cfg, {**manifest, "action_encoding": "index"})(torch.tensor([1, 2]), torch.tensor([1.0, 5.0]))
    assert by_index[:, 0].tolist() == [1.0, 0.0]


def test_pointwise_examples_cut_each_user_at_sampled_impressions():
    from genrec.train.ranking import pointwise_examples

    rows = random_rows([8, 5, 10], seed=5)
    b = interleaved(rows)
    out = pointwise_examples(b, per_user=3, seed=1, epoch=0)
    assert out["users"].tolist() == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    last = out["offsets"][1:] - 1
    assert (out["token_types"][last] == ITEM).all() and (out["target_ids"] == 0).all()
    assert (out["target_actions"] != -1).sum() == 9 and (out["target_actions"][last] != -1).all()
    # each example is a prefix of its user's sequence, ending at that impression with its action as target
    for e in range(9):
        user = int(out["users"][e]) - 1
        example = out["item_ids"][out["offsets"][e] : out["offsets"][e + 1]]
        start = b["offsets"][user]
        torch.testing.assert_close(example, b["item_ids"][start : start + len(example)])
        assert out["target_actions"][last[e]] == b["target_actions"][start + len(example) - 1]
    # the cuts depend on (seed, epoch, user), not on which other users share the batch (or worker)
    alone = interleaved(rows[1:2])
    alone["users"] = torch.tensor([2])  # the same user, alone in its batch
    alone = pointwise_examples(alone, per_user=3, seed=1, epoch=0)
    assert alone["offsets"].diff().tolist() == out["offsets"].diff()[3:6].tolist()


# ----------------------------------------------------------------------------- training under Ray Train

@pytest.fixture(scope="module")
def ranked_tiny(ray_cluster, tmp_path_factory):
    """A prepared multi-action synthetic world and a tiny GR config that trains in seconds."""
    from genrec.data.pipeline import prepare

    root = tmp_path_factory.mktemp("ranking")
    cfg = tiny_ranking_config(root, "tiny-gr", {"kind": "gr"},
                              ["click", "like", {"name": "purchase", "action": "purchase", "weight": 2.0}],
                              epochs=2, seed=3)
    prepare(cfg.data, log=lambda *_: None)
    return cfg, root


def ranking_variant(cfg, run_name, model=None, ranking=None, **train):
    out = cfg.model_copy(deep=True)
    out.train = out.train.model_copy(update={"run_name": run_name, **train})
    if model:
        out.model = out.model.model_copy(update=model)
        # a registered name holds one model.kind (genrec.train.tracking.check_registered_kind)
        out.tracking = out.tracking.model_copy(update={"registered_model": f"{cfg.name}-{out.model.kind}"})
    if ranking:
        out.ranking = out.ranking.model_copy(update=ranking)
    return out


def test_generative_training_under_ray_train_two_workers_match_one(ranked_tiny):
    from mlflow.tracking import MlflowClient

    from genrec.artifact import load_model
    from genrec.train.trainer import fit

    cfg, _ = ranked_tiny
    one = fit(ranking_variant(cfg, "gr-one"), log=lambda *_: None)
    # the two workers split the item table row-wise (model.embedding_sharding): still the same model
    two = fit(ranking_variant(cfg, "gr-two", {"embedding_sharding": "row_wise"}, num_workers=2), log=lambda *_: None)
    first, second = one["history"]
    for key in ("train/ranking_loss", "train/retrieval_loss", "valid/click/ne", "valid/purchase/auc",
                "valid/like/calibration", "valid/ndcg@10", "valid/hr@10"):
        assert math.isfinite(first[key]), key
    assert second["train/loss"] < first["train/loss"]
    # the combined loss is the ranking half plus retrieval_weight x the retrieval half
    assert first["train/loss"] == pytest.approx(first["train/ranking_loss"] + first["train/retrieval_loss"], rel=1e-6)
    assert first["train/ranking_loss"] == pytest.approx(
        first["train/click_loss"] + first["train/like_loss"] + 2.0 * first["train/purchase_loss"], rel=1e-6)
    assert "test/click/ne" in one["best"] and "test/ndcg@10" in one["best"]
    for a, b in zip(one["history"], two["history"]):
        for key in ("train/loss", "train/ranking_loss", "train/retrieval_loss", "valid/click/ne", "valid/ndcg@10"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
    # the registered model is a GenerativeRecommender that ranks
    model, _ = load_model(f"models:/tiny-gr/{one['version']}", cfg.tracking.tracking_uri)
    assert isinstance(model, GenerativeRecommender) and model.task_names == ["click", "like", "purchase"]
    history = {"item_ids": torch.tensor([5, 1]), "token_types": torch.tensor([ITEM, ACTION]),
               "timestamps": torch.tensor([1_600_000_000, 1_600_000_000])}
    assert model.rank(history, torch.tensor([3, 4]), 1_600_000_100).shape == (2, 3)
    assert MlflowClient(cfg.tracking.tracking_uri).get_run(one["mlflow_run_id"]).data.params["model.kind"] == "gr"


@pytest.mark.parametrize("variant", ["dlrm", "pointwise"])
def test_baselines_train_on_the_same_batches(ranked_tiny, variant):
    from genrec.train.trainer import fit

    cfg, _ = ranked_tiny
    # dlrm on 2 workers with its item table split row-wise (it looks the table up twice per step)
    run = ranking_variant(cfg, f"baseline-{variant}", epochs=1, **({"num_workers": 2} if variant == "dlrm" else {}),
                          model={"kind": "dlrm", "embedding_sharding": "row_wise"} if variant == "dlrm" else None,
                          ranking={"training": "pointwise", "pointwise_examples_per_user": 2}
                          if variant == "pointwise" else None)
    (epoch,) = fit(run, log=lambda *_: None)["history"]
    assert epoch["train/retrieval_loss"] == 0.0 and math.isfinite(epoch["train/loss"])
    assert 0.3 < epoch["valid/click/auc"] < 1.0 and "valid/ndcg@10" not in (epoch if variant == "dlrm" else {})
    impressions = epoch["train/impressions_per_s"] * epoch["train/epoch_seconds"]
    if variant == "pointwise":
        assert impressions == pytest.approx(2 * 240)  # two examples per training user, one candidate each


def test_bad_ranking_config_is_named_before_any_worker_starts(ranked_tiny, tmp_path):
    from genrec.config import ConfigError, ExperimentConfig
    from genrec.train.trainer import fit

    cfg, root = ranked_tiny
    unknown = ranking_variant(cfg, "bad-action")
    unknown.ranking.tasks[1].action = "likes"
    with pytest.raises(ConfigError, match=r"ranking.tasks\[1\].action='likes'.*actions are \['click', 'like'"):
        fit(unknown, log=lambda *_: None)
    rating = ranking_variant(cfg, "bad-rating")
    rating.ranking = rating.ranking.model_validate(
        {"tasks": [{"name": "click", "action": "click"}, {"name": "stars", "kind": "regression"}]})
    with pytest.raises(ConfigError, match=r"ranking.tasks\[1\] \(task 'stars'\) needs ratings"):
        fit(rating, log=lambda *_: None)
    with pytest.raises(ValueError, match=r"batching.layout='items' does not fit model.kind='gr'"):
        ExperimentConfig.model_validate({**cfg.model_dump(), "batching": {"layout": "items"}})
    # data prepared without actions (a plain interaction log: its manifest's vocabulary is one action)
    shutil.copytree(cfg.data.output_dir, tmp_path / "plain")
    manifest = json.loads((tmp_path / "plain" / "manifest.json").read_text())
    (tmp_path / "plain" / "manifest.json").write_text(json.dumps({**manifest, "actions": ["interact"]}))
    plain = ranking_variant(cfg, "bad-layout")
    plain.data.output_dir = str(tmp_path / "plain")
    with pytest.raises(ConfigError, match=r"batching.layout='interleaved'.*prepared without an action vocabulary"):
        fit(plain, log=lambda *_: None)
    assert not any((root / "runs" / name).exists() for name in ("bad-action", "bad-rating", "bad-layout"))


def test_evaluation_scores_every_event_after_a_time_cutoff_with_both_halves():
    """A time-split row (eval_start = first event after the cutoff): every later impression is ranked
    with all history before it, and the action position before it retrieves it."""
    from genrec.config import ExperimentConfig
    from genrec.train.ranking import TaskLabels, evaluate_ranking

    cfg = ExperimentConfig.model_validate({
        "data": {"source": {"kind": "synthetic"}}, "model": {"kind": "gr"}, "batching": {"layout": "interleaved"},
        "ranking": {"tasks": [{"name": "click", "action": "a0"}, {"name": "like", "action": "a1"},
                              {"name": "rating", "kind": "regression"}]}})
    labels = TaskLabels(cfg, {"actions": ["a0", "a1", "a2"], "action_encoding": "bitmask"})
    rows = random_rows([9, 7, 10], seed=7)
    t = table(rows).append_column("eval_start", pa.array([6, 3, 9], pa.int64()))
    t = t.append_column("values", pa.array([[float(i % 5 + 1) for i in range(len(r[0]))] for r in rows],
                                           pa.list_(pa.float32())))
    b = to_torch(build_batch(t, "interleaved", MAX_ITEMS, CONTEXT_COLUMNS, CONTEXT_SHIFTS))
    assert int((b["target_actions"] != -1).sum()) == (9 - 6) + (7 - 3) + (10 - 9)
    out = evaluate_ranking(model_of(), [b], labels, ["binary", "binary", "regression"], ["click", "like", "rating"])
    assert out["click/count"] == 8 and out["rating/count"] == 8
    assert 0 <= out["click/auc"] <= 1 and out["click/ne"] > 0 and out["rating/mse"] > 0
    assert out["ne_gain"] == pytest.approx(1 - (out["click/ne"] + out["like/ne"]) / 2)
    assert 0 <= out["hr@200"] <= 1 and out["mrr"] > 0  # retrieval of the same 8 events by the same model
