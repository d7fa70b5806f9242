"""The pipeline end to end on a real local Ray cluster: counts, order, determinism, atomic output, splits."""

import filecmp
import functools
import json
import operator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from genrec.config import ConfigError, DataConfig
from genrec.data.adapters import SourceError
from genrec.data.prepared import data_location, read_split
from genrec.data.pipeline import OutputExistsError, dense_ids, prepare, user_partition
from genrec.data.prepared import read_manifest
from genrec.data.sequences import build_sequences


def config(source, out, **data) -> DataConfig:
    return DataConfig.model_validate({"source": source, "output_dir": str(out), **data})


def quiet(cfg):
    return prepare(cfg, log=lambda *_: None)


@pytest.fixture(scope="module")
def ml1m(ray_cluster, ml1m_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ml1m") / "prepared"
    source = {"kind": "movielens", "path": str(ml1m_dir), "ratings_file": "ratings.partial_users_1-2999.dat"}
    return quiet(config(source, out)), out


def test_ml1m_counts(ml1m):
    summary, out = ml1m
    assert summary["users"] == 2_999
    assert summary["accepted"] == 487_650 and summary["rejected"] == 0
    assert summary["input_rows"] == 487_650
    assert summary["items_observed"] == 3_615
    assert summary["num_items"] == 3_883  # default universe: every movie of movies.dat
    manifest = read_manifest(out)
    assert manifest["complete"] and manifest["schema_version"] == 1
    assert list(manifest["source_checksums_sha256"].values()) == [
        "1273c4edfe3c0ff9e3a0a0d55819faeb947da0ad7df3927333b51ebefbeedc3d"  # as in ../shared/data/ml-1m/README.md
    ]
    assert pq.read_table(data_location(out).local_path() / "vocab" / "items.parquet").num_rows == 3_883


def test_ml1m_sequences_sorted_and_complete(ml1m, ml1m_dir):
    _, out = ml1m
    seqs = read_split(out, "sequences")
    assert seqs.num_rows == 2_999 and sorted(seqs["user"].to_pylist()) == list(range(1, 3_000))
    for ts in seqs["timestamps"].to_pylist():
        assert all(a <= b for a, b in zip(ts, ts[1:]))
    # user 1 as in the raw file: 53 ratings, and ties in time keep file order
    raw = [line.split("::") for line in (ml1m_dir / "ratings.partial_users_1-2999.dat").read_text().splitlines()]
    user1 = sorted(((int(t), n, int(m)) for n, (u, m, _, t) in enumerate(raw) if u == "1"))
    items = pq.read_table(data_location(out).local_path() / "vocab" / "items.parquet")["item_id"].to_pylist()
    row = next(r for r in seqs.to_pylist() if r["user"] == 1)
    assert len(row["items"]) == 53
    assert [items[i - 1] for i in row["items"]] == [m for _, _, m in user1]
    assert row["gender"] == 1 and row["age"] > 0  # users.dat context attached (F -> 1)


def test_ml1m_leave_one_out(ml1m):
    _, out = ml1m
    seqs = {r["user"]: r["items"] for r in read_split(out, "sequences").to_pylist()}
    train = {r["user"]: r for r in read_split(out, "train").to_pylist()}
    valid = {r["user"]: r for r in read_split(out, "valid").to_pylist()}
    test = {r["user"]: r for r in read_split(out, "test").to_pylist()}
    assert len(train) == len(valid) == len(test) == 2_999
    for user, items in list(seqs.items())[:300]:
        assert train[user]["items"] == items[:-2]
        assert valid[user]["items"] == items[:-1] and valid[user]["eval_start"] == len(items) - 2
        assert test[user]["items"] == items and test[user]["eval_start"] == len(items) - 1


def write_events(path, rows):
    pq.write_table(pa.table({k: [r[i] for r in rows] for i, k in enumerate(["user_id", "item_id", "timestamp", "action"])}), path)


PARQUET = {"columns": {"action": "action"}, "actions": {"names": ["view", "buy"]}}


def test_tie_break_and_duplicates(ray_cluster, tmp_path):
    rows = [  # user 1 has three events at the same second: file order decides
        (1, 30, 1_600_000_100, "view"), (1, 10, 1_600_000_100, "view"), (1, 20, 1_600_000_100, "buy"),
        (1, 40, 1_600_000_050, "view"), (1, 10, 1_600_000_100, "view"),  # exact duplicate of row 2
        (2, 10, 1_600_000_000, "view"),
    ]
    write_events(tmp_path / "log.parquet", rows)
    summary = quiet(config({"kind": "parquet", "path": str(tmp_path / "log.parquet"), **PARQUET}, tmp_path / "out",
                           item_universe="observed"))
    assert summary["duplicates_dropped"] == 1 and summary["sequence_events"] == 5
    seqs = {r["user"]: r for r in read_split(tmp_path / "out", "sequences").to_pylist()}
    items = pq.read_table(data_location(tmp_path / "out").local_path() / "vocab" / "items.parquet")["item_id"].to_pylist()
    assert [items[i - 1] for i in seqs[1]["items"]] == [40, 30, 10, 20]
    assert seqs[1]["actions"] == [0, 0, 0, 1]


def test_same_output_twice_byte_for_byte(ray_cluster, tmp_path):
    source = {"kind": "synthetic", "num_users": 300, "num_items": 200, "num_shards": 2, "path": str(tmp_path / "raw")}
    quiet(config(source, tmp_path / "a", num_partitions=3))
    quiet(config(source, tmp_path / "b", num_partitions=3))
    a, b = (data_location(tmp_path / side).local_path() for side in "ab")  # each run's own version folder
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) >= 15  # 4 tables x 3 partitions + the vocabulary (the manifest beside the version)
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    match, mismatch, errors = filecmp.cmpfiles(a, b, [str(f) for f in files], shallow=False)
    assert mismatch == [] and errors == []
    manifests = [read_manifest(tmp_path / side) for side in "ab"]
    assert manifests[0].pop("data_prefix") != manifests[1].pop("data_prefix") and manifests[0] == manifests[1]


def test_existing_output_is_refused_or_replaced_atomically(ray_cluster, tmp_path):
    write_events(tmp_path / "log.parquet", [(1, 1, 1_600_000_000, "view"), (1, 2, 1_600_000_001, "buy")])
    source = {"kind": "parquet", "path": str(tmp_path / "log.parquet"), **PARQUET}
    out = tmp_path / "out"
    quiet(config(source, out, item_universe="observed"))
    before = (out / "manifest.json").read_text()
    with pytest.raises(OutputExistsError, match="output folder exists: .*out; set data.overwrite=true"):
        quiet(config(source, out, item_universe="observed"))
    assert (out / "manifest.json").read_text() == before
    write_events(tmp_path / "log.parquet", [(1, 1, 1_600_000_000, "view"), (1, 3, 1_600_000_002, "buy")])
    quiet(config(source, out, item_universe="observed", overwrite=True))
    assert read_manifest(out)["source_checksums_sha256"] != json.loads(before)["source_checksums_sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.parquet", "out"]  # no staging or old copies left


def test_failed_run_leaves_no_output(ray_cluster, tmp_path):
    write_events(tmp_path / "log.parquet", [(1, 1, 1_600_000_000, "view")])
    source = {"kind": "parquet", "path": str(tmp_path / "log.parquet"), **PARQUET}
    with pytest.raises(ConfigError, match="item_universe: 'catalog' needs a source with an item catalog"):
        quiet(config(source, tmp_path / "out", item_universe="catalog"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.parquet"]
    # every row rejected: fails after the first stage has written files; only the rejects stay, beside the output
    with pytest.raises(SourceError, match=r"all 1 rows rejected: timestamp out of range \(1\); rejects kept at .*out.rejects"):
        quiet(config(source, tmp_path / "out", timestamp_max=1_500_000_000))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.parquet", "out.rejects"]
    assert pq.read_table(tmp_path / "out.rejects")["row_number"].to_pylist() == [1]


def test_time_split(ray_cluster, tmp_path):
    t0 = 1_600_000_000
    rows = [(u, i, t0 + 10 * i + u, "view") for u in (1, 2, 3) for i in range(1, 7)]
    rows += [(4, 9, t0 + 100, "view")]  # only after the cutoff: nothing to train on, not evaluated
    write_events(tmp_path / "log.parquet", rows)
    cutoff = t0 + 35
    summary = quiet(config({"kind": "parquet", "path": str(tmp_path / "log.parquet"), **PARQUET}, tmp_path / "out",
                           item_universe="observed", split={"kind": "time", "cutoff": cutoff, "valid_fraction": 0.5}))
    assert summary["split"]["cutoff_used"] == cutoff
    train = read_split(tmp_path / "out", "train").to_pylist()
    assert all(max(r["timestamps"]) <= cutoff for r in train) and len(train) == 3
    assert sum(len(r["items"]) for r in train) == 9
    evaluated = read_split(tmp_path / "out", "valid").to_pylist() + read_split(tmp_path / "out", "test").to_pylist()
    assert sorted(r["user"] for r in evaluated) == [1, 2, 3]
    for r in evaluated:
        assert len(r["items"]) == 6 and r["eval_start"] == 3
        assert all(t > cutoff for t in r["timestamps"][r["eval_start"]:])
    assert summary["users_not_evaluated"] == 1


def test_time_split_by_quantile(ray_cluster, tmp_path):
    t0 = 1_600_000_000
    write_events(tmp_path / "log.parquet", [(u, i, t0 + i, "view") for u in range(1, 11) for i in range(1, 101)])
    summary = quiet(config({"kind": "parquet", "path": str(tmp_path / "log.parquet"), **PARQUET}, tmp_path / "out",
                           item_universe="observed", split={"kind": "time", "quantile": 0.8}))
    assert abs(summary["split"]["cutoff_used"] - (t0 + 80)) <= 1
    assert abs(summary["train_events"] - 800) <= 10


def rules_by_hand(rows, merge_actions):
    """The duplicate and merge rules, row by row in plain Python: the oracle for build_sequences."""
    kept = {}
    for user, item, ts, action, value, src in sorted(rows, key=lambda r: r[5]):
        key = (user, item, ts, action, "nan" if np.isnan(value) else value)
        kept.setdefault(key, (user, item, ts, action, value, src))  # the first in source order
    events = list(kept.values())
    if merge_actions:
        groups = {}
        for user, item, ts, action, value, src in events:
            groups.setdefault((user, item, ts), []).append((action, value, src))
        events = [(user, item, ts, functools.reduce(operator.or_, (1 << a for a, _, _ in g)),
                   max((v for _, v, _ in g if not np.isnan(v)), default=float("nan")), min(s for _, _, s in g))
                  for (user, item, ts), g in groups.items()]
    sequences = {}
    for user, item, ts, action, value, src in sorted(events, key=lambda e: (e[0], e[2], e[5])):
        sequences.setdefault(user, []).append((item, action, ts, value))
    return sequences, len(rows) - len(kept), len(kept) - len(events)


@pytest.mark.parametrize("merge_actions", [True, False])
@pytest.mark.parametrize("in_source_order", [True, False])
def test_build_sequences_follows_the_rules(merge_actions, in_source_order):
    """Many events share a (user, timestamp): duplicates, merges, NaN values and ties all meet."""
    rng = np.random.default_rng(3)
    for _ in range(20):
        n = int(rng.integers(1, 300))
        src = np.arange(n, dtype=np.int64) * 7 + (5 << 40)
        if not in_source_order:
            src = rng.permutation(src)
        rows = list(zip(rng.integers(1, 6, n).tolist(), rng.integers(1, 4, n).tolist(),
                        (1_600_000_000 + rng.integers(0, 5, n)).tolist(), rng.integers(0, 3, n).tolist(),
                        rng.choice([np.nan, 1.0, 4.5], n).tolist(), src.tolist()))
        table = pa.table({name: pa.array(column, type) for name, column, type in zip(
            ["user", "item", "timestamp", "action", "value", "source_order"], zip(*rows),
            [pa.int32(), pa.int32(), pa.int64(), pa.int32(), pa.float32(), pa.int64()])})
        sequences, stats = build_sequences(table, merge_actions)
        expected, duplicates, merged = rules_by_hand(rows, merge_actions)
        assert stats == {"duplicates": duplicates, "merged": merged}
        got = {r["user"]: list(zip(r["items"], r["actions"], r["timestamps"], r["values"])) for r in sequences.to_pylist()}
        assert list(got) == sorted(expected)
        for user, events in expected.items():
            assert [e[:3] for e in got[user]] == [e[:3] for e in events]
            assert np.allclose([e[3] for e in got[user]], [e[3] for e in events], equal_nan=True)


def test_dense_ids_by_lookup_table_or_hash_agree():
    rng = np.random.default_rng(0)
    for vocab in (np.unique(rng.integers(1, 50_000, 30_000)),  # compact ids: the lookup table
                  np.unique(rng.integers(-2**62, 2**62, 500)),  # sparse ids: index_in
                  np.array(["a", "b", "x"])):
        values = vocab[rng.integers(0, len(vocab), 5_000)]
        ids = dense_ids(pa.chunked_array([pa.array(values[:100]), pa.array(values[100:])]), pa.array(vocab))
        assert ids.type == pa.int32()
        assert np.array_equal(np.asarray(ids), np.searchsorted(vocab, values) + 1)


def test_user_partition_is_pandas_hash_for_integer_ids():
    """Written out to spare every worker a pandas import: the same partitions as pandas.util.hash_array."""
    pd = pytest.importorskip("pandas")
    users = np.random.default_rng(1).integers(-2**63, 2**63 - 1, 10_000)
    expected = (pd.util.hash_array(users) % np.uint64(7)).astype(np.int32)
    assert np.array_equal(user_partition(pa.array(users), 7), expected)
    strings = pa.array([str(u) for u in users[:100]])
    assert np.array_equal(user_partition(strings, 7), (pd.util.hash_array(np.array(strings.to_pylist(), dtype=object)) % np.uint64(7)).astype(np.int32))


def test_an_empty_valid_or_test_split_is_explained(ray_cluster, tmp_path):
    """Prepare warns (and the manifest keeps the warning) when a split has no valid or no test users, saying why."""
    t0 = 1_600_000_000
    write_events(tmp_path / "log.parquet", [(u, i, t0 + 10 * i + u, "view") for u in (1, 2, 3) for i in (1, 2)])
    source = {"kind": "parquet", "path": str(tmp_path / "log.parquet"), **PARQUET}
    said = []

    def prepared(**data):
        said.clear()
        return prepare(config(source, tmp_path / "out", item_universe="observed", overwrite=True, **data), log=said.append)

    summary = prepared()  # leave-one-out: every user has 2 events
    expected = ("no valid and no test users: leave_one_out evaluates users with at least 3 events (the last two are "
                "held out) and every one of the 3 users has fewer")
    assert summary["warnings"] == [expected] and f"[prepare] warning: {expected}" in said
    assert read_manifest(tmp_path / "out")["warnings"] == [expected]
    summary = prepared(split={"kind": "time", "cutoff": t0 + 100})
    assert summary["warnings"] == [f"no valid and no test users: the time split evaluates users with events both at or "
                                   f"before the cutoff {t0 + 100} and after it; every event is at or before it (the "
                                   f"last at {t0 + 23}): choose an earlier cutoff or a quantile"]
    summary = prepared(split={"kind": "time", "cutoff": t0 + 15, "valid_fraction": 0.0})
    assert summary["test_users"] == 3 and summary["warnings"] == [
        "no valid users: valid_fraction 0.0 sends every evaluated user to test"]
    write_events(tmp_path / "log.parquet", [(u, i, t0 + 10 * i + u, "view") for u in (1, 2, 3) for i in (1, 2, 3)])
    assert prepared()["warnings"] == [] and not any("warning" in line for line in said)
