"""The data pipeline on an object store: a real S3 API server (tests/s3server.py, IAM checks on) as
source and output. The same prepare from s3 as from local files, the version layout published by its
manifest, overwrite, a key-prefix source, a synthetic source on s3, and one clear line for each
storage mistake."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from genrec.config import DataConfig
from genrec.data.adapters import SourceError, plan_source
from genrec.data.pipeline import OutputExistsError, plan_before_ray, prepare
from genrec.data.prepared import data_location, read_manifest, read_rejects, read_split, split_uris
from genrec.storage import StorageError, location
from s3server import BUCKET

ACTIONS = {"columns": {"action": "action"}, "actions": {"names": ["view", "buy"]}}
T0 = 1_600_000_000


def event_log(seed: int) -> dict[str, str]:
    """Two CSV files of a small log (with three bad rows) and a users file, by name."""
    rows = [f"{u},{(u * 7 + i * seed) % 30 + 1},{T0 + 60 * i + u},{'buy' if (u + i) % 5 == 0 else 'view'}"
            for u in range(1, 13) for i in range(8)]
    rows[5], rows[40], rows[77] = "x,3,1600000000,view", "4,5,,view", f"6,7,{T0},like"
    header = "user_id,item_id,timestamp,action\n"
    return {"logs/part-1.csv": header + "\n".join(rows[:50]) + "\n", "logs/part-2.csv": header + "\n".join(rows[50:]),
            "users.csv": "user_id,country\n" + "".join(f"{u},c{u % 3}\n" for u in range(1, 13))}


def put(s3, prefix: str, files: dict[str, str]) -> None:
    for name, text in files.items():
        s3.client().put_object(Bucket=BUCKET, Key=f"{prefix}/{name}", Body=text.encode())


def keys(s3, prefix: str) -> dict:
    """key -> LastModified of every object under the prefix (not the empty folder markers pyarrow leaves)"""
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{prefix}/")
    return {o["Key"]: o["LastModified"] for page in pages for o in page.get("Contents", []) if o["Key"][-1] != "/"}


def csv_config(root: str, out: str, **data) -> DataConfig:
    return DataConfig.model_validate({
        "source": {"kind": "csv", "path": f"{root}/logs", "users_file": f"{root}/users.csv", **ACTIONS},
        "output_dir": out, "num_partitions": 2, "chunk_bytes": 400, **data})


def same(a: pa.Table, b: pa.Table) -> bool:
    """Equal tables, NaN equal to NaN (event values are NaN where the log has none)."""
    return a.schema == b.schema and repr(a.to_pylist()) == repr(b.to_pylist())


def quiet(cfg: DataConfig, **kw) -> dict:
    return prepare(cfg, log=lambda *_: None, **kw)


def test_prepare_from_s3_to_s3_equals_local(ray_cluster, s3, tmp_path):
    files = event_log(seed=3)
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    prefix = "same-as-local"
    put(s3, prefix, files)
    root, out = f"s3://{BUCKET}/{prefix}", f"s3://{BUCKET}/{prefix}/out"
    quiet(csv_config(str(tmp_path), str(tmp_path / "out")))
    cfg = csv_config(root, out)
    remote = quiet(cfg, plan=plan_before_ray(cfg))
    assert len(plan_source(cfg).chunks) > 2  # byte ranges read from the store
    assert remote["output_dir"] == out and remote["rejected"] == 3 and remote["users"] == 12
    manifests = [read_manifest(tmp_path / "out"), read_manifest(out)]
    checksums = [sorted(m.pop("source_checksums_sha256").items()) for m in manifests]
    assert [v for _, v in checksums[0]] == [v for _, v in checksums[1]]
    assert [k for k, _ in checksums[1]] == [f"{root}/logs/part-1.csv", f"{root}/logs/part-2.csv"]  # URIs, no keys
    assert manifests[0].pop("data_prefix") != manifests[1]["data_prefix"]
    version = manifests[1].pop("data_prefix")
    assert manifests[0] == manifests[1]
    for split in ("sequences", "train", "valid", "test"):
        assert same(read_split(out, split), read_split(tmp_path / "out", split)), split
    assert split_uris(out, "train") == [f"{out}/{version}/train/part-0000{p}.parquet" for p in (0, 1)]
    for name in ("items.parquet", "users.parquet"):
        tables = [pq.read_table(str(data_location(tmp_path / "out").local_path() / "vocab" / name)),
                  pq.read_table((data_location(out) / "vocab" / name).path, filesystem=location(out).fs)]
        assert same(*tables)
    rejects = [read_rejects(where) for where in (tmp_path / "out", out)]
    assert rejects[1]["source_file"][0].as_py().startswith(f"{root}/logs/")
    assert same(rejects[0].drop_columns(["source_file"]), rejects[1].drop_columns(["source_file"]))
    # the layout: the data under the manifest's version, nothing staged left, the manifest written last
    stored = keys(s3, f"{prefix}/out")
    manifest_key = f"{prefix}/out/manifest.json"
    data = {k: t for k, t in stored.items() if k != manifest_key}
    assert manifest_key in stored and all(k.startswith(f"{prefix}/out/{version}/") for k in data)
    assert not [k for k in data if "/_" in k]
    assert stored[manifest_key] >= max(data.values())
    # a folder of the layout before versions (no data_prefix, the folders beside the manifest) still reads,
    # and an overwrite replaces it whole
    old, version_dir = tmp_path / "out", data_location(tmp_path / "out").local_path()
    for folder in version_dir.iterdir():
        folder.rename(old / folder.name)
    version_dir.rmdir()
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["data_prefix"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert data_location(old).local_path() == old and same(read_split(old, "test"), read_split(out, "test"))
    quiet(csv_config(str(tmp_path), str(old), overwrite=True))
    assert sorted(p.name for p in old.iterdir()) == ["manifest.json", read_manifest(old)["data_prefix"]]


def test_overwrite_publishes_only_a_complete_version(ray_cluster, s3):
    prefix = "overwrite"
    put(s3, prefix, event_log(seed=3))
    put(s3, f"{prefix}/other", event_log(seed=5))
    root, out = f"s3://{BUCKET}/{prefix}", f"s3://{BUCKET}/{prefix}/out"
    quiet(csv_config(root, out))
    first = read_manifest(out)["data_prefix"]
    sequences = read_split(out, "sequences")
    with pytest.raises(OutputExistsError, match=f"output folder exists: {out}; set data.overwrite=true"):
        plan_before_ray(csv_config(root, out))
    # a new version that fails part way (every row rejected after stage 1) leaves the old one published
    with pytest.raises(SourceError, match=f"all 96 rows rejected: .*rejects kept at {out}.rejects"):
        quiet(csv_config(root, out, overwrite=True, timestamp_max=T0 - 1))
    assert read_manifest(out)["data_prefix"] == first and same(read_split(out, "sequences"), sequences)
    assert {k.split("/")[2] for k in keys(s3, f"{prefix}/out")} == {"manifest.json", first}
    assert any(k.startswith(f"{prefix}/out.rejects/") for k in keys(s3, prefix))
    # a complete new version replaces it, and the old version is deleted after
    quiet(csv_config(f"{root}/other", out, overwrite=True))
    second = read_manifest(out)["data_prefix"]
    assert second != first and not same(read_split(out, "sequences"), sequences)
    assert {k.split("/")[2] for k in keys(s3, f"{prefix}/out")} == {"manifest.json", second}


def test_readers_refuse_an_output_without_its_manifest(ray_cluster, s3):
    prefix = "no-manifest"
    put(s3, prefix, event_log(seed=3))
    root, out = f"s3://{BUCKET}/{prefix}", f"s3://{BUCKET}/{prefix}/out"
    with pytest.raises(SourceError, match="all 96 rows rejected"):
        quiet(csv_config(root, out, timestamp_max=T0 - 1))
    assert keys(s3, f"{prefix}/out") == {}  # the failed run's version is gone
    # a run that crashed (no clean-up) leaves a version no manifest names: readers do not see it
    put(s3, f"{prefix}/out/v-20261207T000000Z-00000000/sequences", {"part-00000.parquet": "not read"})
    for read in (read_manifest, lambda where: read_split(where, "train"), read_rejects):
        with pytest.raises(FileNotFoundError, match=f"no prepared data at {out} \\(no manifest.json\\); run "
                                                    "jobs/prepare.py first"):
            read(out)
    quiet(csv_config(root, out))  # and a prepare without overwrite goes ahead
    assert read_manifest(out)["users"] == 12


def test_a_key_prefix_reads_every_object_that_starts_with_it(s3):
    prefix = "key-prefix"
    log = event_log(seed=3)["logs/part-1.csv"]
    put(s3, prefix, {"logs/2026-12-01.csv": log, "logs/2026-12-02/a.csv": log, "logs/2026-11-30.csv": log,
                     "logs/2026-12-03.md": "notes", "users.csv": "user_id\n1\n"})
    root = f"s3://{BUCKET}/{prefix}"
    cfg = DataConfig.model_validate({"source": {"kind": "csv", "path": f"{root}/logs/2026-12-", **ACTIONS},
                                     "output_dir": f"{root}/out"})
    plan = plan_before_ray(cfg)
    assert sorted(plan.checksums) == [f"{root}/logs/2026-12-01.csv", f"{root}/logs/2026-12-02/a.csv"]


def test_a_synthetic_source_on_s3(ray_cluster, s3):
    root = f"s3://{BUCKET}/synthetic"
    cfg = DataConfig.model_validate({
        "source": {"kind": "synthetic", "num_users": 80, "num_items": 50, "mean_events_per_user": 8, "num_shards": 2,
                   "path": f"{root}/raw"}, "output_dir": f"{root}/out", "num_partitions": 2})
    summary = quiet(cfg, plan=plan_before_ray(cfg))
    assert summary["users"] == 80 and summary["synthetic_oracle"]["rows"] == summary["input_rows"]
    stored = keys(s3, "synthetic/raw")
    assert {"synthetic/raw/_COMPLETE", "synthetic/raw/events/part-00000.parquet",
            "synthetic/raw/events/part-00001.parquet"} <= set(stored)
    assert read_split(f"{root}/out", "test").num_rows == 80


def one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_storage_mistakes_are_one_clear_line(ray_cluster, s3, monkeypatch, tmp_path):
    prefix = "mistakes"
    put(s3, prefix, event_log(seed=3))
    put(s3, f"{prefix}/empty", {"logs/README.md": "no data here", "logs/_SUCCESS": ""})
    root = f"s3://{BUCKET}/{prefix}"
    with pytest.raises(StorageError, match="data.output_dir=s3://genrec-no-such-bucket/out: the bucket "
                                           "'genrec-no-such-bucket' does not exist") as e:
        plan_before_ray(csv_config(root, "s3://genrec-no-such-bucket/out"))
    one_line(e)
    with pytest.raises(StorageError, match="data.source.path=s3://genrec-no-such-bucket/logs: the bucket "
                                           "'genrec-no-such-bucket' does not exist") as e:
        plan_before_ray(csv_config("s3://genrec-no-such-bucket", str(tmp_path / "out")))
    one_line(e)
    with pytest.raises(SourceError, match=f"CSV event log: no .*csv.* files in the key prefix data.source.path="
                                          f"{root}/empty/logs; set data.source.file_pattern") as e:
        plan_before_ray(csv_config(f"{root}/empty", str(tmp_path / "out")))
    one_line(e)
    assert not (tmp_path / "out").exists()  # the write check leaves nothing behind
    for name, value in s3.env(s3.reader).items():  # read-only keys: the output refused before any work
        monkeypatch.setenv(name, value)
    for run in (plan_before_ray, quiet):
        with pytest.raises(StorageError, match=f"data.output_dir={root}/out: access denied: the credentials in use "
                                               "may not write here") as e:
            run(csv_config(root, f"{root}/out"))
        one_line(e)
    assert keys(s3, f"{prefix}/out") == {}
    for name, value in s3.env((s3.admin[0], "wrong")).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(StorageError, match=f"data.output_dir={root}/out: the store refused the credentials") as e:
        plan_before_ray(csv_config(root, f"{root}/out"))
    assert "wrong" not in one_line(e)
