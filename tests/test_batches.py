"""The batch builder's two token layouts, truncation, Stochastic Length, and the Ray Data loader."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from genrec.data.batches import ACTION, CONTEXT, ITEM, NO_ACTION, build_batch, stochastic_length
from genrec.data.loader import BatchSpec, iter_torch_batches
from genrec.data.prepared import read_row_batches, read_split
from genrec.storage import location


def table(rows, eval_start=None, context=None):
    data = {
        "user": pa.array([r[0] for r in rows], pa.int32()),
        "items": pa.array([r[1] for r in rows], pa.list_(pa.int32())),
        "actions": pa.array([r[2] for r in rows], pa.list_(pa.int32())),
        "timestamps": pa.array([[100 * (k + 1) for k in range(len(r[1]))] for r in rows], pa.list_(pa.int64())),
        "values": pa.array([[1.0] * len(r[1]) for r in rows], pa.list_(pa.float32())),
    }
    for name, values in (context or {}).items():
        data[name] = pa.array(values, pa.int32())
    if eval_start is not None:
        data["eval_start"] = pa.array(eval_start, pa.int32())
    return pa.table(data)


def test_items_layout_training_rows():
    t = table([(1, [5, 6, 7, 8], [0, 1, 0, 1]), (2, [9, 3], [1, 1]), (3, [4], [0])])
    b = build_batch(t, "items", keep_items=10)
    assert b["offsets"].tolist() == [0, 3, 4]  # user 3 has nothing to predict
    assert b["users"].tolist() == [1, 2]
    assert b["item_ids"].tolist() == [5, 6, 7, 9]
    assert b["target_ids"].tolist() == [6, 7, 8, 3]
    assert b["timestamps"].tolist() == [100, 200, 300, 100]
    assert b["target_timestamps"].tolist() == [200, 300, 400, 200]


def test_items_layout_keeps_most_recent_and_marks_eval_targets():
    t = table([(1, [1, 2, 3, 4, 5, 6], [0] * 6)], eval_start=[5])
    b = build_batch(t, "items", keep_items=3)
    assert b["item_ids"].tolist() == [3, 4, 5]
    assert b["target_ids"].tolist() == [0, 0, 6]  # only the held-out item is a target
    assert b["target_timestamps"].tolist()[-1] == 600  # request time = the target's time


def test_interleaved_layout():
    t = table([(1, [5, 6, 7], [1, 0, 1])], context={"gender": [2], "age": [1]})
    b = build_batch(t, "interleaved", keep_items=10, context_columns=("gender", "age"), context_offsets=(0, 3))
    assert b["token_types"].tolist() == [CONTEXT, CONTEXT, ITEM, ACTION, ITEM, ACTION, ITEM]
    assert b["item_ids"].tolist() == [2, 1 + 3, 5, 1, 6, 0, 7]
    # at an item: the action it got (ranking); at an action: the next item (retrieval)
    assert b["target_actions"].tolist() == [NO_ACTION, NO_ACTION, 1, NO_ACTION, 0, NO_ACTION, 1]
    assert b["target_ids"].tolist() == [0, 0, 0, 6, 0, 7, 0]
    assert b["offsets"].tolist() == [0, 7]


def test_interleaved_eval_row_targets_only_held_out_item():
    t = table([(1, [5, 6, 7, 8], [1, 0, 1, 0])], eval_start=[3])
    b = build_batch(t, "interleaved", keep_items=2)
    assert b["item_ids"].tolist() == [6, 0, 7, 1, 8]  # the 2 most recent pairs, then the held-out item
    assert b["target_ids"].tolist() == [0, 0, 0, 8, 0]
    assert b["target_actions"].tolist() == [NO_ACTION, NO_ACTION, NO_ACTION, NO_ACTION, 0]


def test_stochastic_length_rate():
    rng = np.random.default_rng(0)
    n = np.full(20_000, 200)
    kept = stochastic_length(n, keep_items=200, alpha=1.6, rng=rng)
    target = int(200 ** 0.8)
    p_cut = 1 - 200 ** 1.6 / 200 ** 2
    assert set(np.unique(kept)) == {target, 200}
    assert abs((kept == target).mean() - p_cut) < 0.01
    short = stochastic_length(np.full(100, target), 200, 1.6, rng)
    assert (short == target).all()  # users at or under N^(alpha/2) are never cut


def test_loader_through_ray_data_matches_local(ray_cluster, tmp_path):
    import pyarrow.parquet as pq

    from genrec.config import DataConfig
    from genrec.data.pipeline import prepare
    from genrec.data.prepared import split_uris

    source = {"kind": "synthetic", "num_users": 200, "num_items": 100, "num_shards": 2, "path": str(tmp_path / "raw")}
    out = tmp_path / "out"
    prepare(DataConfig.model_validate({"source": source, "output_dir": str(out), "num_partitions": 2}), log=lambda *_: None)
    spec = BatchSpec.from_prepared(out, layout="items", keep_items=20)
    local = list(iter_torch_batches(read_split(out, "train"), spec, batch_size=32, seed=1))
    dataset = ray_cluster.data.read_parquet(split_uris(out, "train"))
    streamed = list(iter_torch_batches(dataset, spec, batch_size=32, seed=1))
    for batches in (local, streamed):
        assert all(b["offsets"][-1] == len(b["item_ids"]) for b in batches)
        assert max(int(np.diff(b["offsets"].numpy()).max()) for b in batches) == 20
    key = lambda batches: sorted(  # noqa: E731
        (int(u), tuple(b["item_ids"][b["offsets"][i]:b["offsets"][i + 1]].tolist()))
        for b in batches for i, u in enumerate(b["users"]))
    assert key(local) == key(streamed)
    assert sum(len(b["users"]) for b in local) == sum(pq.read_metadata(f).num_rows for f in split_uris(out, "train"))


def test_numpy_jagged_helpers():
    from genrec.data.jagged import concat_ranges, offsets_from_lengths, select_sequences

    assert concat_ranges(np.array([5, 0, 2]), np.array([2, 0, 3])).tolist() == [5, 6, 2, 3, 4]
    assert concat_ranges(np.array([]), np.array([])).tolist() == []
    assert offsets_from_lengths(np.array([2, 0, 3])).tolist() == [0, 2, 2, 5]
    batch = {"item_ids": np.arange(5), "offsets": np.array([0, 2, 2, 5]), "users": np.array([7, 8, 9])}
    kept = select_sequences(batch, np.array([True, False, True]))
    assert kept["item_ids"].tolist() == [0, 1, 2, 3, 4] and kept["offsets"].tolist() == [0, 2, 5]
    kept = select_sequences(batch, np.array([False, True, True]))
    assert kept["item_ids"].tolist() == [2, 3, 4] and kept["users"].tolist() == [8, 9]


def test_a_file_is_read_a_batch_of_rows_at_a_time_and_an_empty_one_keeps_its_schema(tmp_path):
    """Evaluation and the target count read prepared files in row batches: a partition file holds a share
    of every user, which grows with the log, and at 100M events one whole file took 0.6 GiB to read."""
    table = pa.table({"user": pa.array(range(5)), "items": pa.array([[1], [2, 3], [], [4], [5, 6, 7]])})
    pq.write_table(table, tmp_path / "five.parquet")
    pq.write_table(table.slice(0, 0), tmp_path / "empty.parquet")
    batches = list(read_row_batches(location(str(tmp_path / "five.parquet")), rows=2))
    assert [b.num_rows for b in batches] == [2, 2, 1] and pa.concat_tables(batches).equals(table)
    assert [b.column_names for b in read_row_batches(location(str(tmp_path / "five.parquet")), ["items"])] == [["items"]]
    (empty,) = read_row_batches(location(str(tmp_path / "empty.parquet")))
    assert empty.num_rows == 0 and empty.schema == table.schema
