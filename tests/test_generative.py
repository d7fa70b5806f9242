"""Generative ranking (genrec.model.generative, dlrm, ranking_losses) on real interleaved
batches from genrec.data.batches: causality of actions, the target-aware rank contract,
multi-hot actions, heads and the multi-task loss. Small and CPU-only."""

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from genrec.data import batches as data_batches
from genrec.data.batches import build_batch
from genrec.data.loader import to_torch
from genrec.model.dlrm import DLRMRanker
from genrec.model.encoder_config import EncoderConfig
from genrec.model.generative import ACTION, CONTEXT, ITEM, GenerativeConfig, GenerativeRecommender
from genrec.model.ranking_losses import multitask_loss

torch.set_num_threads(1)
NUM_ITEMS, NUM_ACTIONS, MAX_ITEMS = 40, 3, 12
CONTEXT_COLUMNS, CONTEXT_SHIFTS = ("gender", "age"), (0, 3)


def config(multi_hot=True, dropout=0.0):
    tokens = len(CONTEXT_COLUMNS) + 2 * MAX_ITEMS + 1
    encoder = EncoderConfig(num_items=NUM_ITEMS, max_seq_len=tokens, dim=16, num_blocks=2, num_heads=2,
                            dropout=dropout, attention_impl="pytorch")
    return GenerativeConfig(encoder, NUM_ACTIONS, multi_hot, num_context=10,
                            tasks=(("click", "binary"), ("like", "binary"), ("rating", "regression")))


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


def test_token_types_match_the_data_layer():
    assert (CONTEXT, ITEM, ACTION) == (data_batches.CONTEXT, data_batches.ITEM, data_batches.ACTION)


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
