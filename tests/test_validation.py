"""One rule set for every source: the same bad row gets the same reason from CSV and Parquet;
text as users have it (headerless, any delimiter, gzip/zstd, CR line ends, ISO times, extra
columns); rows a CSV reader cannot parse are kept with their row numbers; counts add up."""

import filecmp
import gzip

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from genrec.config import DataConfig
from genrec.data.adapters import SourceError, plan_source, read_chunk
from genrec.data.pipeline import prepare
from genrec.data.prepared import data_location, read_rejects, read_split
from genrec.data.validation import MAX_FIELD_BYTES

ACTIONS = {"names": ["pv", "cart", "fav", "buy"], "merge_same_impression": True}
COLUMNS = {"user_id": "user", "item_id": "item", "timestamp": "ts", "action": "behavior"}
RANGE = "[631152000, 4102444800]"

# (user, item, ts, behavior) as text, and the reason each row must get (None: accepted)
PLANTED = [
    (("1", "10", "1600000000", "pv"), None),
    (("", "10", "1600000001", "pv"), "missing field user_id"),
    (("abc", "10", "1600000001", "pv"), "user_id is not an integer: 'abc'"),
    (("99999999999999999999", "10", "1600000001", "pv"), "user_id out of range: '99999999999999999999'"),
    (("0x10", "10", "1600000001", "pv"), "user_id is not an integer: '0x10'"),
    (("1", "x2", "1600000001", "pv"), "item_id is not an integer: 'x2'"),
    (("1", "10", "99", "pv"), f"timestamp out of range {RANGE}: 99"),
    (("1", "10", "16e8", "pv"), "timestamp is not an integer: '16e8'"),
    (("1", "10", "1600000002", "like"), "unknown action 'like'; known: ['buy', 'cart', 'fav', 'pv']"),
    (("1", "10", "1600000003", ""), "missing field action"),
    ((" 2 ", "11", "1600000004", "buy"), None),  # spaces around a value are not an error
    (("-3", "11", "1600000005", "cart"), None),
]


def plan(path, kind, **source):
    cfg = DataConfig.model_validate({"source": {"kind": kind, "path": str(path), "columns": COLUMNS,
                                                "actions": ACTIONS, **source}, "output_dir": str(path) + "-out"})
    return plan_source(cfg)


def read_all(source_plan):
    """Every chunk through the rules, checking input = accepted + rejected per chunk."""
    events, rejects = [], []
    for chunk in source_plan.chunks:
        ev, rej, _, n = read_chunk(chunk, source_plan.rules)
        assert ev.num_rows + rej.num_rows == n
        events.append(ev)
        rejects.append(rej)
    return pa.concat_tables(events), pa.concat_tables(rejects)


def test_same_bad_rows_same_reasons_from_csv_and_parquet(tmp_path):
    rows = [r for r, _ in PLANTED]
    table = pa.table({name: [r[i] for r in rows] for i, name in enumerate(["user", "item", "ts", "behavior"])})
    pacsv.write_csv(table, tmp_path / "log.csv")
    pq.write_table(table, tmp_path / "log.parquet")
    _, csv_rejects = read_all(plan(tmp_path / "log.csv", "csv"))
    events, parquet_rejects = read_all(plan(tmp_path / "log.parquet", "parquet"))
    expected = [(i + 1, reason) for i, (_, reason) in enumerate(PLANTED) if reason]
    assert list(zip(parquet_rejects["row_number"].to_pylist(), parquet_rejects["reason"].to_pylist())) == expected
    # the same rows, one line later in the CSV (line 1 is its header), with the same reasons
    assert list(zip(csv_rejects["row_number"].to_pylist(), csv_rejects["reason"].to_pylist())) == [
        (row + 1, reason) for row, reason in expected]
    assert events["user_id"].to_pylist() == [1, 2, -3] and events["action"].to_pylist() == [0, 3, 1]
    # Parquet with typed columns: a null is the same "missing field" as an empty text field
    typed = pa.table({"user": pa.array([5, None], pa.int64()), "item": [1, 2],
                      "ts": pa.array([1_600_000_000, 1_600_000_000], pa.uint64()), "behavior": ["pv", None]})
    pq.write_table(typed, tmp_path / "typed.parquet")
    _, rejects = read_all(plan(tmp_path / "typed.parquet", "parquet"))
    assert rejects["reason"].to_pylist() == ["missing field user_id"]
    # and in a text id column (a null there was once taken for id 0)
    texts = pa.table({"user": pa.array(["5", None, "6"]), "item": ["1", "2", None],
                      "ts": pa.array([1_600_000_000] * 3, pa.uint64()), "behavior": ["pv"] * 3})
    pq.write_table(texts, tmp_path / "texts.parquet")
    events, rejects = read_all(plan(tmp_path / "texts.parquet", "parquet"))
    assert rejects["reason"].to_pylist() == ["missing field user_id", "missing field item_id"]
    assert events["user_id"].to_pylist() == [5]


def test_text_rows_a_reader_cannot_parse_are_kept_with_row_numbers(tmp_path):
    long_item = "9" * (10 << 20)  # a 10 MB line
    lines = [
        b"user,item,ts,behavior,note",
        b'1,10,1600000000,pv,"a, quoted note"',  # a quoted delimiter: one field
        b"1,10,1600000001",  # too few fields
        b"1,10,1600000002,pv,x,y",  # too many
        b"1,10,1600000003,pv,caf\xe9",  # latin-1 byte: not UTF-8
        b'1,10,1600000004,pv,"unbalanced',  # an open quote would swallow the next lines
        b"",  # an empty line
        f"1,{long_item},1600000005,pv,x".encode(),
        b"2,11,1600000006,buy,ok",
    ]
    (tmp_path / "log.csv").write_bytes(b"\r\n".join(lines) + b"\r\n")  # Windows line ends
    events, rejects = read_all(plan(tmp_path / "log.csv", "csv"))
    reasons = dict(zip(rejects["row_number"].to_pylist(), rejects["reason"].to_pylist()))
    assert reasons == {
        3: "wrong number of fields: 3, expected 5",
        4: "wrong number of fields: 6, expected 5",
        5: "bad encoding: not UTF-8 at byte 22",
        6: "bad quoting: unbalanced quote",
        7: "wrong number of fields: 0, expected 5",
        8: f"field too long: item has {len(long_item)} bytes (limit {MAX_FIELD_BYTES})",
    }
    raw = dict(zip(rejects["row_number"].to_pylist(), rejects["raw"].to_pylist()))
    assert raw[5] == "1,10,1600000003,pv,caf\\xe9" and raw[6] == '1,10,1600000004,pv,"unbalanced'
    assert raw[8].endswith(f"... ({len(lines[7])} characters)") and len(raw[8]) < 3000
    assert events["timestamp"].to_pylist() == [1_600_000_000, 1_600_000_006]
    # old Mac line ends (CR alone) read the same, in chunks that cut the file anywhere
    (tmp_path / "mac.csv").write_bytes(b"\r".join(lines[:2] + lines[8:]) + b"\r")
    events, rejects = read_all(plan(tmp_path / "mac.csv", "csv"))
    assert events.num_rows == 2 and rejects.num_rows == 0
    # a stray CR inside a line of an LF file: the reader would end a row there, so the line is rejected
    # whole (not split into two misnumbered rows, nor lost)
    (tmp_path / "stray.csv").write_bytes(b"\n".join([lines[0], b"1,10,1600000000,pv,a\r5,6", lines[8]]) + b"\n")
    events, rejects = read_all(plan(tmp_path / "stray.csv", "csv"))
    assert rejects["row_number"].to_pylist() == [2]
    assert rejects["reason"].to_pylist() == ["bad line end: a carriage return inside the line"]
    assert events["timestamp"].to_pylist() == [1_600_000_006]


def test_headerless_compressed_iso_sources_with_item_features(ray_cluster, tmp_path):
    """Headerless tab-separated files (plain, gzip, zstd) with ISO-8601 times; a category column kept."""
    folder = tmp_path / "logs"
    folder.mkdir()
    rows = [  # user, item, category, behavior, time
        ("1", "10", "c1", "pv", "2020-09-13T12:26:40Z"),
        ("1", "11", "c2", "cart", "2020-09-13 12:26:41"),
        ("2", "10", "c9", "buy", "2020-09-13T13:26:40+01:00"),  # the same instant as row 1
        ("2", "12", "c3", "fav", "2020-13-45T00:00:00"),  # not a date
    ]
    text = ["\t".join(r).encode() + b"\n" for r in rows]
    (folder / "a.tsv").write_bytes(text[0])
    (folder / "b.tsv.gz").write_bytes(gzip.compress(text[1]))
    with pa.CompressedOutputStream(str(folder / "c.tsv.zst"), "zstd") as f:
        f.write(b"".join(text[2:]))
    source = {"kind": "csv", "path": str(folder), "delimiter": "\t", "header": False,
              "column_names": ["user", "item", "category", "behavior", "ts"], "columns": COLUMNS,
              "actions": ACTIONS, "timestamp_unit": "iso", "item_features": ["category"]}
    summary = prepare(DataConfig.model_validate({"source": source, "output_dir": str(tmp_path / "out")}),
                      log=lambda *_: None)
    assert (summary["input_rows"], summary["accepted"], summary["rejected"]) == (4, 3, 1)
    assert summary["item_universe"] == "observed"  # the default follows the source: no catalog here
    reject = read_rejects(tmp_path / "out").to_pylist()[0]
    assert reject["source_file"].endswith("c.tsv.zst") and reject["row_number"] == 2
    assert reject["reason"] == "timestamp is not an ISO-8601 time: '2020-13-45T00:00:00'"
    seqs = {r["user"]: r for r in read_split(tmp_path / "out", "sequences").to_pylist()}
    assert seqs[1]["timestamps"] == [1_600_000_000, 1_600_000_001] and seqs[2]["timestamps"] == [1_600_000_000]
    items = pq.read_table(data_location(tmp_path / "out").local_path() / "vocab" / "items.parquet").to_pylist()
    assert items == [{"index": 1, "item_id": 10, "category": "c1"},  # first event in source order wins
                     {"index": 2, "item_id": 11, "category": "c2"}]
    # by position: no names given, columns are "0", "1", ...
    positional = {**source, "column_names": None, "item_features": [],
                  "columns": {"user_id": "0", "item_id": "1", "timestamp": "4", "action": "3"}}
    again = prepare(DataConfig.model_validate({"source": positional, "output_dir": str(tmp_path / "pos")}),
                    log=lambda *_: None)
    assert (again["accepted"], again["sequence_events"]) == (3, 3)


def test_every_row_rejected_says_why_and_keeps_the_rejects(ray_cluster, tmp_path):
    (tmp_path / "log.csv").write_text("user,item,ts,behavior\n" + "".join(
        f"{u},{u + 10},{1_600_000_000_000 + u},pv\n" for u in range(5)))  # milliseconds, read as seconds
    source = {"kind": "csv", "path": str(tmp_path / "log.csv"), "columns": COLUMNS, "actions": ACTIONS}
    cfg = DataConfig.model_validate({"source": source, "output_dir": str(tmp_path / "out")})
    with pytest.raises(SourceError, match=r"all 5 rows rejected: timestamp out of range \(5\); rejects kept at "
                                          r".*out\.rejects; .* set data\.source\.timestamp_unit: ms"):
        prepare(cfg, log=lambda *_: None)
    assert pq.read_table(tmp_path / "out.rejects")["row_number"].to_pylist() == [2, 3, 4, 5, 6]
    assert not (tmp_path / "out").exists()


def test_a_file_broken_past_its_start_fails_with_one_message_naming_it(ray_cluster, tmp_path):
    rng = np.random.default_rng(1)
    text = "user,item,ts,behavior\n" + "".join(
        f"{u},{i},{1_600_000_000 + t},pv\n" for u, i, t in rng.integers(1, 10**6, (120_000, 3)))
    packed = gzip.compress(text.encode())
    (tmp_path / "log.csv.gz").write_bytes(packed[: len(packed) - 5000])  # cut: the end is lost
    source = {"kind": "csv", "path": str(tmp_path / "log.csv.gz"), "columns": COLUMNS, "actions": ACTIONS}
    cfg = DataConfig.model_validate({"source": source, "output_dir": str(tmp_path / "out")})
    # raised inside a Ray task, surfaced as the genrec error itself (a job prints it as one line)
    with pytest.raises(SourceError, match=r"log\.csv\.gz: cannot decompress \(gzip\)"):
        prepare(cfg, log=lambda *_: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv.gz"]


def test_million_row_csv_round_trip_counts_add_up_and_repeat_byte_for_byte(ray_cluster, tmp_path):
    rng = np.random.default_rng(0)
    n, dups, merges, bad = 1_000_000, 20_000, 30_000, 1_000
    base = n - dups - merges - bad
    user = rng.integers(1, 10_001, base)
    item = rng.integers(1, 50_001, base)
    ts = 1_600_000_000 + np.arange(base)  # distinct times: only planted rows collide
    action = rng.integers(0, 4, base)
    d, m = rng.choice(base, dups, replace=False), rng.choice(base, merges, replace=False)
    b = rng.choice(base, bad, replace=False)
    user = np.concatenate([user, user[d], user[m], user[b]])
    item = np.concatenate([item, item[d], item[m], item[b]])
    ts_all = np.concatenate([ts, ts[d], ts[m], ts[b] * 1000])  # the bad rows: milliseconds
    action = np.concatenate([action, action[d], (action[m] + 1 + rng.integers(0, 3, merges)) % 4, action[b]])
    names = np.array(ACTIONS["names"])
    log = pa.table({"user": user, "item": item, "ts": ts_all, "behavior": names[action]})
    log = log.take(pa.array(rng.permutation(n)))
    pacsv.write_csv(log, tmp_path / "log.csv")
    source = {"kind": "csv", "path": str(tmp_path / "log.csv"), "columns": COLUMNS, "actions": ACTIONS}
    summary = prepare(DataConfig.model_validate({"source": source, "output_dir": str(tmp_path / "a"),
                                                 "chunk_bytes": 2 << 20}), log=lambda *_: None)
    assert summary["input_rows"] == n == summary["accepted"] + summary["rejected"]
    # planted duplicates may repeat another planted row: count what the data holds
    accepted = log.filter(pc.less(log["ts"], 4_102_444_800))
    distinct = accepted.group_by(["user", "item", "ts", "behavior"]).aggregate([]).num_rows
    impressions = accepted.group_by(["user", "item", "ts"]).aggregate([]).num_rows
    assert summary["rejected"] == bad
    assert summary["duplicates_dropped"] == n - bad - distinct
    assert summary["merged_into_bitmask"] == distinct - impressions
    assert summary["sequence_events"] == impressions
    assert summary["users"] == len(np.unique(accepted["user"].to_numpy()))
    lengths = pc.list_value_length(read_split(tmp_path / "a", "sequences")["items"]).to_numpy()
    assert lengths.sum() == impressions
    prepare(DataConfig.model_validate({"source": source, "output_dir": str(tmp_path / "b"),
                                       "chunk_bytes": 2 << 20}), log=lambda *_: None)
    a, b = (data_location(tmp_path / side).local_path() for side in "ab")  # each run's own version folder
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*.parquet"))
    assert len(files) > 20
    match, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert mismatch == [] and errors == []
