"""Growing vocabularies (issue 28's first piece): new raw ids join a prepared folder's vocabularies
(genrec.data.vocabulary), a model's item table grows to match (genrec.model.growth) and so does its
optimizer's state (genrec.train.optim.grow_optimizer_rows). Old ids, old rows and old moments never move.

No Ray: the prepared folders here are written in the layout genrec.data.prepared reads (a manifest naming
a version folder, vocab/ inside it), with the vocab tables a prepare writes (index, raw id, item features).
"""

import json
import random

import numpy as np
import pyarrow as pa
import pytest
import torch

from genrec.artifact import build_model, load_model_folder, save_model_folder
from genrec.config import ExperimentConfig
from genrec.data.prepared import DATA_PREFIX, MANIFEST, VOCAB, version_name, write_table
from genrec.data.vocabulary import (VocabularyError, dense_index, extend_vocabulary, read_vocabulary,
                                    vocabulary_fingerprint, vocabulary_manifest, write_vocabulary)
from genrec.model import EncoderConfig, build_encoder, sampled_softmax_loss
from genrec.model.growth import grow_item_tables, grow_state_dict, item_table, starting_rows
from genrec.storage import location
from genrec.train.optim import build_optimizer, grow_optimizer_rows

OLD_ITEMS = [10, 20, 30, 40, 50]  # dense 1..5, sorted by raw id as a prepare numbers them
OLD_USERS = [7, 8, 9]
CONTEXT = {"age": ["18-24", "25-34", "35+"]}


def _prepared(root) -> str:
    """A prepared folder of version 0: 5 items with features (title, year), 3 users, one context feature."""
    version = location(root) / version_name()
    items = pa.table({"index": pa.array(range(1, 6), pa.int32()), "item_id": pa.array(OLD_ITEMS, pa.int64()),
                      "title": [f"item {i}" for i in OLD_ITEMS], "year": pa.array([1990, 1991, None, 1993, 1994])})
    users = pa.table({"index": pa.array(range(1, 4), pa.int32()), "user_id": pa.array(OLD_USERS, pa.int64())})
    write_table(items, version / VOCAB / "items.parquet")
    write_table(users, version / VOCAB / "users.parquet")
    (version / VOCAB / "context.json").write_text(json.dumps(CONTEXT))
    manifest = {"complete": True, DATA_PREFIX: version.name, "num_items": 5, "actions": ["click", "like"],
                "action_encoding": "bitmask", "context_features": {"age": 3}}
    (location(root) / MANIFEST).write_text(json.dumps(manifest))
    return str(root)


def _publish(root, parent: str, vocab) -> str:
    """A new version of a prepared folder holding `vocab` (what a refresh writes beside its window's data)."""
    manifest = json.loads((location(parent) / MANIFEST).read_text())
    version = location(root) / version_name()
    fingerprint = write_vocabulary(vocab, version / VOCAB)
    (location(root) / MANIFEST).write_text(json.dumps({**manifest, DATA_PREFIX: version.name,
                                                       **vocabulary_manifest(vocab, fingerprint)}))
    return str(root)


def _events(rows) -> pa.Table:
    """(user_id, item_id, timestamp) rows as the pipeline's canonical events name them."""
    users, items, stamps = zip(*rows)
    return pa.table({"user_id": pa.array(users, pa.int64()), "item_id": pa.array(items, pa.int64()),
                     "timestamp": pa.array(stamps, pa.int64())})


# events of a new window: known ids (30, 7, 9) and new ones; item 5 and 60 first seen at the same time
WINDOW = [(7, 30, 100), (11, 99, 105), (9, 60, 103), (11, 5, 103), (12, 99, 101), (7, 99, 90), (11, 60, 120)]


# ----------------------------------------------------------------------------- data: vocabularies

def test_extension_keeps_every_old_id_and_numbers_new_ids_by_first_appearance(tmp_path):
    prepared = _prepared(tmp_path / "v0")
    vocab = read_vocabulary(prepared)
    assert (vocab.version, vocab.parent) == (0, None)
    assert vocab.fingerprint == vocabulary_fingerprint(prepared)

    grown = extend_vocabulary(vocab, _events(WINDOW))
    assert grown.items.slice(0, 5).equals(vocab.items) and grown.users.slice(0, 3).equals(vocab.users)
    # first appearance: 99 at t=90, then 5 and 60 (both t=103, by raw id); users 12 (t=101), 9 known, 11 (t=103)
    assert grown.items["item_id"].to_pylist()[5:] == [99, 5, 60]
    assert grown.items["index"].to_pylist() == list(range(1, 9))
    assert grown.users["user_id"].to_pylist()[3:] == [12, 11]
    assert grown.users["index"].to_pylist() == list(range(1, 6))
    assert grown.items.slice(5)["title"].null_count == 3 and grown.items.slice(5)["year"].null_count == 3
    assert grown.items.schema == vocab.items.schema and grown.context == CONTEXT
    assert (grown.version, grown.parent, grown.fingerprint) == (1, vocab.fingerprint, None)

    shuffled = WINDOW[:]
    random.Random(0).shuffle(shuffled)
    again = extend_vocabulary(vocab, _events(shuffled))  # the order of the rows does not matter
    assert again.items.equals(grown.items) and again.users.equals(grown.users)
    assert dense_index(grown, "items", pa.array([60, 10, 99, 77])).to_pylist() == [8, 1, 6, None]
    assert dense_index(grown, "users", pa.array([11, 8])).to_pylist() == [5, 2]


def test_written_versions_chain_and_nothing_new_is_a_no_op(tmp_path):
    """The version and the parent's fingerprint are in the manifest; extending with known ids only returns
    the vocabulary as it is; two windows extended one after the other number every id as one extension
    of both does when the windows follow each other in time (the reason for first-appearance order)."""
    v0 = _prepared(tmp_path / "v0")
    earlier, later = [r for r in WINDOW if r[2] < 102], [r for r in WINDOW if r[2] >= 102]
    v1 = _publish(tmp_path / "v1", v0, extend_vocabulary(read_vocabulary(v0), _events(earlier)))
    vocab = read_vocabulary(v1)
    manifest = json.loads((tmp_path / "v1" / MANIFEST).read_text())
    assert manifest["num_items"] == vocab.num_items == 6
    assert manifest["vocabulary"] == {"version": 1, "fingerprint": vocab.fingerprint, "num_items": 6, "num_users": 4,
                                      "parent": vocabulary_fingerprint(v0)}
    assert (vocab.version, vocab.parent) == (1, vocabulary_fingerprint(v0))
    assert vocab.fingerprint == vocabulary_fingerprint(v1) != vocabulary_fingerprint(v0)

    assert extend_vocabulary(vocab, _events(earlier)) is vocab
    assert extend_vocabulary(vocab, _events([(7, 10, 500)])) is vocab

    v2 = read_vocabulary(_publish(tmp_path / "v2", v1, extend_vocabulary(vocab, _events(later))))
    at_once = extend_vocabulary(read_vocabulary(v0), _events(WINDOW))
    assert (v2.version, v2.parent) == (2, vocab.fingerprint)
    assert v2.items.equals(at_once.items) and v2.users.equals(at_once.users)
    assert write_vocabulary(at_once, tmp_path / "at_once") == v2.fingerprint  # the same files, byte for byte

    with pytest.raises(VocabularyError, match="not yet written"):
        extend_vocabulary(at_once, _events(WINDOW))


def test_events_that_cannot_extend_a_vocabulary_are_refused_with_the_reason(tmp_path):
    vocab = read_vocabulary(_prepared(tmp_path / "v0"))
    with pytest.raises(VocabularyError, match="window 3: no column timestamp"):
        extend_vocabulary(vocab, _events(WINDOW).drop_columns(["timestamp"]), where="window 3")
    nulls = _events(WINDOW).set_column(1, "item_id", pa.array([1, 2, None, 4, 5, 6, 7], pa.int64()))
    with pytest.raises(VocabularyError, match="row 2 has no item_id"):
        extend_vocabulary(vocab, nulls)
    text = _events(WINDOW).set_column(0, "user_id", pa.array(["7", "u11", "9", "11", "12", "7", "11"]))
    with pytest.raises(VocabularyError, match="user_id is string, the vocabulary's user_id is int64"):
        extend_vocabulary(vocab, text)


# ----------------------------------------------------------------------------- model: tables

def _config(output_dir, kind: str, **model) -> ExperimentConfig:
    ranker = kind in ("gr", "dlrm")
    return ExperimentConfig.model_validate({
        "data": {"source": {"kind": "synthetic"}, "output_dir": str(output_dir)},
        "model": {"kind": kind, "dim": 8, "num_blocks": 1, "num_heads": 1, "max_seq_len": 6, **model},
        "batching": {"layout": "interleaved" if ranker else "items"},
        "ranking": {"tasks": [{"name": "like", "action": "like"}] if ranker else []},
    })


@pytest.mark.parametrize("kind", ["hstu", "sasrec", "gr", "dlrm"])
def test_a_grown_model_keeps_every_row_starts_new_rows_as_a_new_table_and_round_trips(kind, tmp_path):
    v0 = _prepared(tmp_path / "v0")
    v1 = _publish(tmp_path / "v1", v0, extend_vocabulary(read_vocabulary(v0), _events(WINDOW)))
    torch.manual_seed(0)
    model = build_model(_config(v0, kind))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    name, _ = item_table(model)
    replaced = grow_item_tables(model, 8)
    assert len(replaced) == 1 and replaced[0][1] is item_table(model)[1].weight
    state = model.state_dict()
    table = state[f"{name}.weight"]
    assert table.shape == (9, 8) and torch.equal(table[:6], before[f"{name}.weight"])
    # new rows as a new table's (small, random, apart from each other), the same for the same growth
    assert torch.equal(table[6:], starting_rows(before[f"{name}.weight"], 9))
    assert (table[6:].abs() <= 0.04).all() and torch.linalg.matrix_rank(table[6:]) == 3
    assert all(torch.equal(state[k], v) for k, v in before.items() if k != f"{name}.weight")  # nothing else grew
    config = model.config.encoder if kind in ("gr", "dlrm") else model.config
    assert config.num_items == 8
    assert grow_item_tables(model, 8) == []  # already that size
    with pytest.raises(ValueError, match="cannot grow to 4"):
        grow_item_tables(model, 3)

    folder = save_model_folder(tmp_path / "model", _config(v1, kind), state)
    loaded, _ = load_model_folder(folder)
    assert loaded.state_dict().keys() == state.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    recorded = json.loads((folder / MANIFEST).read_text())["vocabulary"]  # which vocabulary it was trained on
    assert recorded["version"] == 1 and recorded["fingerprint"] == vocabulary_fingerprint(v1)

    torch.manual_seed(0)
    saved = build_model(_config(v0, kind)).state_dict()  # a saved V-item state, grown offline
    assert all(torch.equal(grow_state_dict(saved, 8)[k], v) for k, v in state.items())


def test_a_sharded_live_table_is_refused_and_its_whole_state_grows(tmp_path):
    """Growth in place needs the whole table: a row-wise sharded one (here over a one-worker gloo group)
    is refused with the way out, and the gathered state dict grows instead."""
    import torch.distributed as dist

    from genrec.train.sharding import full_state_dict, shard_item_tables

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = build_encoder(EncoderConfig(kind="hstu", num_items=5, num_positions=6, dim=8, num_blocks=1))
        shard_item_tables(model, 1, torch.device("cpu"))
        with pytest.raises(TypeError, match="row-wise sharded table does not grow in place.*grow_state_dict"):
            grow_item_tables(model, 8)
        whole = full_state_dict(model, 0)
    finally:
        dist.destroy_process_group()
    grown = build_encoder(EncoderConfig(kind="hstu", num_items=8, num_positions=6, dim=8, num_blocks=1))
    grown.load_state_dict(grow_state_dict(whole, 8))
    assert torch.equal(grown.embedding.items.weight[:6], whole["embedding.items.weight"])


# ----------------------------------------------------------------------------- optimizer and training

HYPER = dict(lr=0.01, betas=(0.9, 0.98), weight_decay=0.1)
V, GROWN, NEGATIVES = 20, 26, 8


def _encoder(kind: str, num_items: int, seed: int = 0):
    torch.manual_seed(seed)
    return build_encoder(EncoderConfig(kind=kind, num_items=num_items, num_positions=8, dim=16, num_blocks=1,
                                       num_heads=1, dropout=0.2))


def _optimizer(model, kind: str):
    table = item_table(model)[1].weight
    return build_optimizer([{"params": [p for p in model.parameters() if p is not table]}, {"params": [table]}],
                           [table], kind, **HYPER)


def _batches(num_items: int, count: int, seed: int):
    """Jagged batches of 4 users (up to 6 items each) over items 1..num_items, negatives drawn here."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        lengths = rng.integers(3, 7, size=4)
        items = torch.as_tensor(rng.integers(1, num_items + 1, size=lengths.sum()))
        offsets = torch.as_tensor(np.concatenate([[0], np.cumsum(lengths)]))
        stamps = torch.as_tensor(np.arange(len(items)) * 60 + 1_600_000_000)
        last = torch.zeros(len(items), dtype=torch.bool)
        last[offsets[1:] - 1] = True
        targets = torch.where(last, 0, items.roll(-1))
        negatives = torch.as_tensor(rng.integers(1, num_items + 1, size=(int((targets > 0).sum()), NEGATIVES)))
        yield {"item_ids": items, "timestamps": stamps, "target_timestamps": stamps.roll(-1), "offsets": offsets,
               "target_ids": targets, "negatives": negatives}


def _train(model, optimizer, batches, first_step: int) -> None:
    """The retrieval step of genrec.train.loop (sampled softmax over the whole table), seeded per step."""
    model.train()
    for step, b in enumerate(batches, first_step):
        torch.manual_seed(1000 + step)  # dropout
        users = model(b["item_ids"], b["timestamps"], b["target_timestamps"], b["offsets"])
        loss = sampled_softmax_loss(users, b["target_ids"], model.all_item_embeddings(), b["negatives"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("optimizer_kind", ["adamw", "row_sparse_adamw"])
def test_the_optimizer_keeps_every_trained_rows_moments_and_resumes(optimizer_kind):
    model = _encoder("hstu", V)
    optimizer = _optimizer(model, optimizer_kind)
    _train(model, optimizer, _batches(V, 2, seed=1), 0)
    old_table = model.embedding.items.weight
    before = {k: v.clone() for k, v in optimizer.state[old_table].items()}
    grow_optimizer_rows(optimizer, grow_item_tables(model, GROWN))
    table = model.embedding.items.weight
    assert old_table not in optimizer.state and any(table is p for p in optimizer.param_groups[1]["params"])
    state = optimizer.state[table]
    assert torch.equal(state["step"], before["step"]) and int(state["step"]) == 2
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(state[key][:V + 1], before[key]) and not state[key][V + 1:].any()

    resumed_model = _encoder("hstu", GROWN, seed=5)  # a model built with the grown table, as a resumed run builds it
    resumed_model.load_state_dict(model.state_dict())
    resumed = _optimizer(resumed_model, optimizer_kind)
    resumed.load_state_dict(optimizer.state_dict())
    assert all(torch.equal(resumed.state[resumed_model.embedding.items.weight][k], v) for k, v in state.items())
    _train(model, optimizer, _batches(GROWN, 1, seed=2), 2)  # and it steps the grown table
    assert int(optimizer.state[table]["step"]) == 3


@pytest.mark.parametrize("kind,optimizer_kind", [("hstu", "adamw"), ("hstu", "row_sparse_adamw"),
                                                 ("sasrec", "adamw")])
def test_grown_then_trained_equals_trained_with_the_larger_table_from_the_start(kind, optimizer_kind):
    """A model trains 2 steps on items 1..V, grows to V' (model and optimizer) and trains 3 more steps on
    batches with new items. Another, built with V' rows from the start (its first V + 1 rows and every other
    weight the same), trains on the same batches with the same seeds, and its extra rows are set to the
    grown model's new rows at the point of growth (never looked up before, they have zero moments there,
    as grown rows do; only AdamW's weight decay had moved them). Both end equal: fp32, within 1e-6
    absolute (measured: bit-identical on this CPU)."""
    grown = _encoder(kind, V)
    start = _encoder(kind, GROWN, seed=1)
    start.load_state_dict(grow_state_dict(grown.state_dict(), GROWN))
    grown_optimizer, start_optimizer = _optimizer(grown, optimizer_kind), _optimizer(start, optimizer_kind)
    _train(grown, grown_optimizer, _batches(V, 2, seed=1), 0)
    _train(start, start_optimizer, _batches(V, 2, seed=1), 0)

    grow_optimizer_rows(grown_optimizer, grow_item_tables(grown, GROWN))
    with torch.no_grad():
        start.embedding.items.weight[V + 1:] = grown.embedding.items.weight[V + 1:]
    assert torch.equal(grown.embedding.items.weight[V + 1:], starting_rows(grown.embedding.items.weight[:V + 1], GROWN + 1))
    window = list(_batches(GROWN, 3, seed=2))
    assert any(int(b["item_ids"].max()) > V for b in window)  # the window holds new items
    _train(grown, grown_optimizer, window, 2)
    _train(start, start_optimizer, window, 2)

    expected = start.state_dict()
    for key, value in grown.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=key)
    table = grown.embedding.items.weight
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(grown_optimizer.state[table][key],
                                   start_optimizer.state[start.embedding.items.weight][key], rtol=0, atol=1e-6)
