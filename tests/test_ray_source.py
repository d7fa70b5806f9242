"""Sources read by Ray Data (genrec.data.ray_source) on a real local Ray cluster: a JSON-lines log read by
ray.data.read_json and a Dataset given to prepare come out exactly as the same events given as a CSV log."""

import csv
import json

import numpy as np
import pyarrow as pa
import pytest

from genrec.config import ConfigError, DataConfig, load_config
from genrec.data.adapters import SourceError
from genrec.data.pipeline import prepare
from genrec.data.prepared import data_location, read_split, read_table, read_vocab

FIELDS = ["user_id", "item_id", "timestamp", "event", "rating"]
MAPPING = {"columns": {"action": "event", "value": "rating"},
           "actions": {"names": ["view", "cart", "buy"], "merge_same_impression": True}}
COMPARED = ("input_rows", "accepted", "rejected", "rejected_by_reason", "duplicates_dropped", "merged_into_bitmask",
            "sequence_events", "users", "items_observed", "num_items", "actions", "timestamps", "train_events",
            "valid_events", "test_events")


def quiet(cfg, **kw):
    return prepare(cfg, log=lambda *_: None, **kw)


def config(source: dict, out) -> DataConfig:
    return DataConfig.model_validate({"source": {**source, **MAPPING}, "output_dir": str(out), "num_partitions": 2})


def event_log(n: int = 400) -> list[dict]:
    """Events with ties in time (source order decides), exact duplicates, same-impression actions to merge,
    and a few bad rows: a missing user, a time out of range, an unknown action."""
    rng = np.random.default_rng(3)
    rows = [{"user_id": int(rng.integers(1, 31)), "item_id": int(rng.integers(100, 160)),
             "timestamp": 1_600_000_000 + int(rng.integers(0, 40)), "event": str(rng.choice(["view", "cart", "buy"])),
             "rating": float(rng.integers(1, 10)) / 2} for _ in range(n)]
    rows[7] = dict(rows[6])  # a duplicate
    rows[9] = {**rows[8], "event": "buy" if rows[8]["event"] != "buy" else "view"}  # a second action, same impression
    rows[5]["user_id"] = None
    rows[200]["timestamp"] = 12
    rows[n - 3]["event"] = "zap"
    return rows


def write_csv(path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows({k: "" if r.get(k) is None else r[k] for k in FIELDS} for r in rows)


def rejects(out) -> pa.Table:
    """The rejects in source order: part files by chunk (block) number, rows in each by number."""
    files = (data_location(out) / "rejects").list_files(suffixes=(".parquet",))
    return pa.concat_tables(read_table(f) for f in files)


def assert_same_prepared(a, b) -> None:
    for table in ("sequences", "train", "valid", "test"):
        assert read_split(a, table).equals(read_split(b, table)), table
    for name in ("items", "users"):
        assert read_vocab(a, name).equals(read_vocab(b, name)), name
    assert rejects(a)["reason"].to_pylist() == rejects(b)["reason"].to_pylist()


def test_json_lines_read_by_ray_data_match_the_csv_log(ray_cluster, tmp_path):
    rows = event_log()
    write_csv(tmp_path / "log.csv", rows)
    with open(tmp_path / "log.jsonl", "w") as f:
        f.writelines(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in rows)
    from_csv = quiet(config({"kind": "csv", "path": str(tmp_path / "log.csv")}, tmp_path / "csv"))
    from_json = quiet(config({"kind": "ray_data", "reader": "read_json",  # several blocks: order kept across them
                              "args": {"paths": str(tmp_path / "log.jsonl"), "override_num_blocks": 3}},
                             tmp_path / "json"))
    assert {k: from_json[k] for k in COMPARED} == {k: from_csv[k] for k in COMPARED}
    assert from_csv["rejected"] == 3 and from_csv["duplicates_dropped"] >= 1 and from_csv["merged_into_bitmask"] >= 1
    assert from_json["input_rows"] == from_json["accepted"] + from_json["rejected"] == 400
    assert_same_prepared(tmp_path / "json", tmp_path / "csv")
    bad = rejects(tmp_path / "json").to_pylist()
    assert [r["source_file"].startswith("ray.data.read_json block ") for r in bad] == [True] * 3
    assert len({r["source_file"] for r in bad}) > 1  # rows 6 and 398 of 400: in different blocks
    assert json.loads(bad[1]["raw"])["timestamp"] == 12 and bad[1]["reason"].startswith("timestamp out of range")


def test_a_dataset_given_to_prepare_rejects_rows_as_the_csv_path_does(ray_cluster, tmp_path):
    good = [{"user_id": str(u), "item_id": str(100 + i), "timestamp": str(1_600_000_000 + i), "event": "view",
             "rating": "3"} for u in (1, 2, 3) for i in range(4)]
    bad = [{"user_id": "abc", "item_id": "101", "timestamp": "1600000000", "event": "view", "rating": "3"},
           {"user_id": "1", "item_id": None, "timestamp": "1600000000", "event": "view", "rating": "3"},
           {"user_id": "2", "item_id": "101", "timestamp": "99", "event": "view", "rating": "3"},
           {"user_id": "3", "item_id": "101", "timestamp": "1600000001", "event": "zap", "rating": "3"},
           {"user_id": "3", "item_id": "102", "timestamp": "1600000002", "event": "view", "rating": "x"}]
    rows = good[:5] + bad[:3] + good[5:] + bad[3:] + [{**good[0], "user_id": 7}]  # 7: an int among strings
    write_csv(tmp_path / "log.csv", rows)
    from_csv = quiet(config({"kind": "csv", "path": str(tmp_path / "log.csv")}, tmp_path / "csv"))
    dataset = ray_cluster.data.from_items(rows, override_num_blocks=2)
    cfg = config({"kind": "ray_data"}, tmp_path / "ds")
    from_dataset = quiet(cfg, dataset=dataset)
    assert {k: from_dataset[k] for k in COMPARED} == {k: from_csv[k] for k in COMPARED}
    assert from_dataset["input_rows"] == 18 and from_dataset["accepted"] == 13 and from_dataset["rejected"] == 5
    assert_same_prepared(tmp_path / "ds", tmp_path / "csv")
    reasons = rejects(tmp_path / "ds")["reason"].to_pylist()
    assert reasons[0] == "user_id is not an integer: 'abc'" and reasons[1] == "missing field item_id"
    assert reasons[4] == "value is not a number: 'x'"
    assert {r["source_file"] for r in rejects(tmp_path / "ds").to_pylist()} == {"ray.data.Dataset block 0",
                                                                                 "ray.data.Dataset block 1"}
    with pytest.raises(ConfigError, match="data.source.reader: required .* unless prepare is given a Dataset"):
        quiet(cfg)
    with pytest.raises(ConfigError, match="a Dataset and the config names a reader too"):
        quiet(config({"kind": "ray_data", "reader": "read_json"}, tmp_path / "x"), dataset=dataset)
    with pytest.raises(ConfigError, match="data.source.kind: prepare was given a Dataset, which needs kind 'ray_data'"):
        quiet(config({"kind": "csv", "path": str(tmp_path / "log.csv")}, tmp_path / "x"), dataset=dataset)
    with pytest.raises(SourceError, match="data.source.args: ray.data.read_json found nothing at .*nope.jsonl"):
        quiet(config({"kind": "ray_data", "reader": "read_json", "args": {"paths": str(tmp_path / "nope.jsonl")}},
                     tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_a_reader_that_is_not_a_ray_data_reader_names_the_key(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("data:\n  source: {kind: ray_data, reader: read_jsonl, args: {paths: s3://bucket/events/}}\n")
    with pytest.raises(ConfigError, match=r"data\.source\.reader: not a ray\.data\.read_\* function .*'read_jsonl'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"data\.source\.reader: not a ray\.data\.read_\* function .*'from_items'"):
        load_config(path, ["data.source.reader=from_items"])
    assert load_config(path, ["data.source.reader=read_parquet"]).data.source.reader == "read_parquet"


def test_the_example_config_loads():
    from conftest import REPO

    cfg = load_config(REPO / "configs" / "examples" / "ray-data-json.yaml")
    assert cfg.data.source.kind == "ray_data" and cfg.data.source.reader == "read_json"
