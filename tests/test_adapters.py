"""Each adapter on small real files, through the real pipeline on the session's Ray cluster."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO
from genrec.config import DataConfig, SyntheticSource
from genrec.data.adapters import SourceError
from genrec.data.prepared import data_location, read_split
from genrec.data.pipeline import prepare
from genrec.data.prepared import read_rejects

MOVIES = "1::Toy Story (1995)::Animation|Children's|Comedy\n2::Jumanji (1995)::Adventure\n3::Heat (1995)::Action\n"
USERS = "1::F::1::10::48067\n2::M::56::16::70072\n"


def movielens_dir(tmp_path, ratings: bytes):
    folder = tmp_path / "ml"
    folder.mkdir()
    (folder / "ratings.dat").write_bytes(ratings)
    (folder / "movies.dat").write_bytes(MOVIES.encode("latin-1"))
    (folder / "users.dat").write_text(USERS)
    return folder


def run(tmp_path, source: dict, **data) -> dict:
    cfg = DataConfig.model_validate({"source": source, "output_dir": str(tmp_path / "out"), **data})
    return prepare(cfg, log=lambda *_: None)


# one planted bad line of every kind, between good ones
PLANTED = [
    (b"1::1::5::978300760", None),
    (b"1::2::3", "wrong number of fields"),
    (b"1::2::3::978300761::9", "wrong number of fields"),
    (b"::2::3::978300762", "missing field user_id"),
    (b"abc::2::3::978300763", "user_id is not an integer"),
    (b"1::x2::3::978300764", "item_id is not an integer"),
    (b"1::2::3::99", "timestamp out of range"),
    (b"1::2::\xe9::978300765", "bad encoding"),
    (b"", "wrong number of fields"),
    (b"1::2::7::978300766", "rating out of range"),
    (b"1::99::4::978300767", "item_id 99 is not in the item catalog"),
    (b"1::2::4::978300768", None),
    (b"2::3::1::978300769", None),
    (b"2::1::2::978300770", None),
]


def test_movielens_rejects_keep_every_bad_row(ray_cluster, tmp_path):
    folder = movielens_dir(tmp_path, b"\n".join(line for line, _ in PLANTED) + b"\n")
    # tiny chunks: rows are numbered across several parallel chunks
    summary = run(tmp_path, {"kind": "movielens", "path": str(folder)}, chunk_bytes=40)
    bad = [(i + 1, reason) for i, (_, reason) in enumerate(PLANTED) if reason]
    assert summary["input_rows"] == len(PLANTED)
    assert summary["rejected"] == len(bad)
    assert summary["accepted"] == len(PLANTED) - len(bad)
    assert summary["input_rows"] == summary["accepted"] + summary["rejected"]
    rejects = read_rejects(tmp_path / "out").sort_by("row_number").to_pylist()
    assert [r["row_number"] for r in rejects] == [row for row, _ in bad]
    for row, (number, reason) in zip(rejects, bad):
        assert reason in row["reason"], (number, row)
        assert row["source_file"].endswith("ratings.dat")
        assert row["raw"] == PLANTED[number - 1][0].decode("utf-8", "backslashreplace")
    assert summary["users"] == 2 and summary["sequence_events"] == 4


def test_movielens_context_and_item_features(ray_cluster, tmp_path):
    folder = movielens_dir(tmp_path, b"1::3::5::978300760\n2::1::4::978300761\n2::2::4::978300762\n")
    summary = run(tmp_path, {"kind": "movielens", "path": str(folder)})
    assert summary["num_items"] == 3 and summary["items_observed"] == 3
    items = pq.read_table(data_location(tmp_path / "out").local_path() / "vocab" / "items.parquet").to_pylist()
    assert items[0] == {"index": 1, "item_id": 1, "title": "Toy Story (1995)", "genres": ["Animation", "Children's", "Comedy"]}
    seqs = {r["user"]: r for r in read_split(tmp_path / "out", "sequences").to_pylist()}
    context = json.loads((data_location(tmp_path / "out").local_path() / "vocab" / "context.json").read_text())
    assert context["gender"] == ["F", "M"]
    assert seqs[1]["gender"] == 1 and seqs[2]["gender"] == 2  # 1-based, 0 = unknown
    assert seqs[2]["items"] == [1, 2] and seqs[2]["actions"] == [3, 3] and seqs[2]["values"] == [4.0, 4.0]


def test_movielens_csv_with_header(ray_cluster, tmp_path):
    folder = tmp_path / "ml20"
    folder.mkdir()
    (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,10,4.5,1200000000\n1,20,0.5,1200000001\n2,10,3.0,1200000002\n2,10,6.0,1200000003\n"
    )
    (folder / "movies.csv").write_text('movieId,title,genres\n10,"Heat, The (1995)",Action|Crime\n20,Up (2009),Animation\n')
    summary = run(tmp_path, {"kind": "movielens_csv", "path": str(folder)})
    assert (summary["accepted"], summary["rejected"]) == (3, 1)
    reject = read_rejects(tmp_path / "out").to_pylist()[0]
    assert reject["row_number"] == 5 and "rating out of range" in reject["reason"]
    seqs = {r["user"]: r for r in read_split(tmp_path / "out", "sequences").to_pylist()}
    assert seqs[1]["items"] == [1, 2] and seqs[1]["actions"] == [8, 0]  # 4.5 stars, 0.5 stars
    titles = pq.read_table(data_location(tmp_path / "out").local_path() / "vocab" / "items.parquet")["title"].to_pylist()
    assert titles == ["Heat, The (1995)", "Up (2009)"]


def test_generic_csv_action_mapping_and_bitmask_merge(ray_cluster, tmp_path):
    log = tmp_path / "log.csv"
    log.write_text(
        "user,item,behavior,ts\n"
        "u1,i1,pv,1600000000\n"
        "u1,i1,cart,1600000000\n"  # same impression as the line above -> one event, bitmask
        "u1,i2,buy,1600000005\n"
        "u1,i2,buy,1600000005\n"  # exact duplicate -> dropped and counted
        "u2,i1,like,1600000001\n"  # unknown action -> rejected
        "u2,i3,fav,1600000002\n"
        "u2,i1,pv,1600000003\n"
    )
    source = {
        "kind": "csv", "path": str(log),
        "columns": {"user_id": "user", "item_id": "item", "timestamp": "ts", "action": "behavior", "id_type": "string"},
        "actions": {"names": ["pv", "cart", "fav", "buy"], "merge_same_impression": True},
    }
    summary = run(tmp_path, source)  # the README's example as written: the universe follows the source (observed)
    assert summary["item_universe"] == "observed"
    assert summary["input_rows"] == 7 and summary["rejected"] == 1 and summary["accepted"] == 6
    assert summary["duplicates_dropped"] == 1 and summary["merged_into_bitmask"] == 1
    assert summary["sequence_events"] == 4 and summary["action_encoding"] == "bitmask"
    assert "unknown action 'like'" in read_rejects(tmp_path / "out")["reason"][0].as_py()
    seqs = {r["user"]: r for r in read_split(tmp_path / "out", "sequences").to_pylist()}
    users = pq.read_table(data_location(tmp_path / "out").local_path() / "vocab" / "users.parquet").to_pylist()
    assert users == [{"index": 1, "user_id": "u1"}, {"index": 2, "user_id": "u2"}]
    assert seqs[1]["items"] == [1, 2] and seqs[1]["actions"] == [0b0011, 0b1000]  # pv|cart, buy
    assert seqs[2]["items"] == [3, 1] and seqs[2]["actions"] == [0b0100, 0b0001]


def test_parquet_log_with_column_mapping_and_nulls(ray_cluster, tmp_path):
    pq.write_table(
        pa.table({
            "uid": pa.array([5, 5, None, 6, 6], pa.int64()),
            "iid": pa.array([50, 51, 52, 50, 53], pa.int64()),
            "t": pa.array([1_600_000_000, 1_600_000_001, 1_600_000_002, 1_600_000_003_000, 1_600_000_004], pa.int64()),
            "evt": ["click", "buy", "click", "click", "teleport"],
        }),
        tmp_path / "log.parquet",
    )
    source = {"kind": "parquet", "path": str(tmp_path / "log.parquet"),
              "columns": {"user_id": "uid", "item_id": "iid", "timestamp": "t", "action": "evt"},
              "actions": {"names": ["click", "buy"]}}
    summary = run(tmp_path, source, item_universe="observed")
    assert (summary["input_rows"], summary["accepted"], summary["rejected"]) == (5, 2, 3)
    reasons = {r["row_number"]: r["reason"] for r in read_rejects(tmp_path / "out").to_pylist()}
    assert reasons == {3: "missing field user_id", 4: reasons[4], 5: "unknown action 'teleport'; known: ['buy', 'click']"}
    assert reasons[4] == "timestamp out of range [631152000, 4102444800]: 1600000003000"


def test_source_errors_name_the_path(ray_cluster, tmp_path):
    with pytest.raises(SourceError, match="MovieLens folder not found: .*missing"):
        run(tmp_path, {"kind": "movielens", "path": str(tmp_path / "missing")})
    folder = movielens_dir(tmp_path, b"")
    with pytest.raises(SourceError, match="ratings file is empty: .*ratings.dat"):
        run(tmp_path, {"kind": "movielens", "path": str(folder)})
    (folder / "ratings.dat").write_text("user,item,rating,ts\n1,2,3,4\n")
    with pytest.raises(SourceError, match="not a MovieLens '::' file"):
        run(tmp_path, {"kind": "movielens", "path": str(folder)})
    (tmp_path / "log.csv").write_text("a,b,c\n1,2,3\n")
    with pytest.raises(SourceError, match=r"log.csv: column 'user_id' \(for user_id\).* not in header"):
        run(tmp_path, {"kind": "csv", "path": str(tmp_path / "log.csv")})
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(SourceError, match="bad.parquet: not a readable Parquet file"):
        run(tmp_path, {"kind": "parquet", "path": str(tmp_path / "bad.parquet")})


def test_job_prints_one_clear_message(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  source: {{kind: movielens, path: {tmp_path / 'nowhere'}}}\n")
    result = subprocess.run([sys.executable, "jobs/prepare.py", "--config", str(config)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "error: MovieLens folder not found" in result.stderr and str(tmp_path / "nowhere") in result.stderr
    assert "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "jobs/prepare.py", "--config", str(config), "--set", "data.bogus=1"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "data.bogus: unknown key" in result.stderr


def test_synthetic_generator_is_deterministic_and_realistic(ray_cluster, tmp_path):
    spec = dict(kind="synthetic", num_users=400, num_items=300, mean_events_per_user=30, num_shards=3, seed=7)
    from genrec.data.synthetic import generate

    a = generate(SyntheticSource(**spec, path=str(tmp_path / "a")))
    b = generate(SyntheticSource(**spec, path=str(tmp_path / "b")))
    c = generate(SyntheticSource(**{**spec, "seed": 8}, path=str(tmp_path / "c")))
    files = sorted(p.name for p in (a / "events").iterdir())
    assert files == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    for name in files:
        assert (a / "events" / name).read_bytes() == (b / "events" / name).read_bytes()
    events = pq.read_table(a / "events")
    assert not events.equals(pq.read_table(c / "events"))
    counts = np.bincount(events["item_id"].to_numpy())
    top, median = np.sort(counts)[::-1][0], np.median(counts[counts > 0])
    assert top > 10 * median  # Zipf-like popularity
    lengths = np.bincount(events["user_id"].to_numpy())[1:]
    assert lengths.max() > 4 * np.median(lengths)  # heavy tail
    assert set(events["action"].to_pylist()) == {"click", "like", "add_to_cart", "share", "purchase"}
    ts = events.to_pandas().groupby("user_id")["timestamp"]
    assert ts.apply(lambda s: s.is_monotonic_increasing).all()


def test_a_header_that_looks_like_data_suggests_a_headerless_file(tmp_path):
    from genrec.data.adapters import plan_source

    (tmp_path / "u.data").write_text("196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
    cfg = DataConfig.model_validate({"source": {"kind": "csv", "path": str(tmp_path / "u.data"), "delimiter": "\t"},
                                     "output_dir": str(tmp_path / "out")})
    with pytest.raises(SourceError, match=r"u.data: column 'user_id' .* not in header \['196', '242', '3', "
                                          r"'881250949'\]; the first line looks like data, not a header \(all "
                                          r"numbers\): for a headerless file set data.source.header: false"):
        plan_source(cfg)
    (tmp_path / "named.csv").write_text("a,b,c\n1,2,3\n")  # a real header: the plain advice
    cfg = DataConfig.model_validate({"source": {"kind": "csv", "path": str(tmp_path / "named.csv")},
                                     "output_dir": str(tmp_path / "out")})
    with pytest.raises(SourceError, match=r"not in header \['a', 'b', 'c'\]; set data.source.columns$"):
        plan_source(cfg)


RATINGS_TSV = "7\t10\t4\t881250949\n7\t11\t1\t881250950\n8\t10\t5\t881250951\n8\t12\t6\t881250952\n"
RATING_ACTIONS = {"names": ["rating_1", "rating_2", "rating_3", "rating_4", "rating_5"], "prefix": "rating_"}


def test_numeric_ratings_name_their_actions_through_a_prefix(ray_cluster, tmp_path):
    """A headerless TSV of (user, item, rating, timestamp): the rating is both the value and, through
    actions.prefix, the action (4 -> rating_4) with no mapping written out; a rating without a name is rejected."""
    (tmp_path / "ratings.tsv").write_text(RATINGS_TSV)
    source = {"kind": "csv", "path": str(tmp_path / "ratings.tsv"), "delimiter": "\t", "header": False,
              "column_names": ["user", "item", "rating", "ts"],
              "columns": {"user_id": "user", "item_id": "item", "timestamp": "ts", "value": "rating", "action": "rating"},
              "actions": RATING_ACTIONS}
    summary = run(tmp_path, source)
    assert summary["actions"] == RATING_ACTIONS["names"]
    assert (summary["accepted"], summary["rejected"]) == (3, 1)
    assert read_rejects(tmp_path / "out")["reason"][0].as_py().startswith("unknown action '6'")
    seqs = {r["user"]: r for r in read_split(tmp_path / "out", "sequences").to_pylist()}
    assert seqs[1]["actions"] == [3, 0] and seqs[1]["values"] == [4.0, 1.0]  # rating_4, rating_1
    assert seqs[2]["actions"] == [4]
    # an integer Parquet column holds values too when a prefix is set (without one it holds action ids)
    pq.write_table(pa.table({"user_id": [1, 1], "item_id": [5, 6], "timestamp": [1_600_000_000, 1_600_000_001],
                             "stars": pa.array([5, 2], pa.int64())}), tmp_path / "log.parquet")
    run(tmp_path, {"kind": "parquet", "path": str(tmp_path / "log.parquet"), "columns": {"action": "stars"},
                   "actions": RATING_ACTIONS}, overwrite=True)
    assert read_split(tmp_path / "out", "sequences")["actions"].to_pylist() == [[4, 1]]


def test_a_named_file_is_read_whatever_its_name_and_a_folder_by_its_pattern(ray_cluster, tmp_path):
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    (folder / "u.data").write_text(RATINGS_TSV)
    (folder / "u.item").write_text("10|Toy Story\n")
    source = {"kind": "csv", "delimiter": "\t", "header": False, "columns": {"user_id": "0", "item_id": "1",
                                                                            "timestamp": "3", "value": "2"}}
    assert run(tmp_path, {**source, "path": str(folder / "u.data")})["input_rows"] == 4
    # a folder reads the usual text files by default, and says how to read others
    with pytest.raises(SourceError, match=r"no \*.csv/.*\*.dat.* files in folder .*ml-100k; set "
                                          r"data.source.file_pattern \(e.g. '\*.data'\)"):
        run(tmp_path, {**source, "path": str(folder)}, overwrite=True)
    summary = run(tmp_path, {**source, "path": str(folder), "file_pattern": "*.data"}, overwrite=True)
    assert summary["input_rows"] == 4 and list(summary["source_checksums_sha256"]) == [str(folder / "u.data")]


def test_csv_source_attaches_user_features_from_a_users_file(ray_cluster, tmp_path):
    (tmp_path / "log.csv").write_text("user_id,item_id,timestamp\n1,10,1600000000\n2,10,1600000001\n3,11,1600000002\n")
    (tmp_path / "users.csv").write_text("user_id,zip,age\n1,01234,30\n2,98765,40\n9,11111,50\n")
    summary = run(tmp_path, {"kind": "csv", "path": str(tmp_path / "log.csv"), "users_file": str(tmp_path / "users.csv")})
    assert summary["context_features"] == {"zip": 3, "age": 3}
    context = json.loads((data_location(tmp_path / "out").local_path() / "vocab" / "context.json").read_text())
    assert context["zip"] == ["01234", "11111", "98765"]  # read as text: a zip code keeps its leading 0
    seqs = {r["user"]: r for r in read_split(tmp_path / "out", "sequences").to_pylist()}
    assert [seqs[u]["zip"] for u in (1, 2, 3)] == [1, 3, 0]  # user 3 has no row: 0 = unknown
    # a headerless users file with its own delimiter (MovieLens-100k's u.user), and only some features
    (tmp_path / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    users = {"path": str(tmp_path / "u.user"), "delimiter": "|", "header": False,
             "column_names": ["user_id", "age", "gender", "occupation", "zip"], "features": ["gender", "occupation"]}
    summary = run(tmp_path, {"kind": "csv", "path": str(tmp_path / "log.csv"), "users_file": users}, overwrite=True)
    assert summary["context_features"] == {"gender": 2, "occupation": 2}
    (tmp_path / "users.csv").write_text("user_id,zip\n1,01234\nx,98765\n")
    with pytest.raises(SourceError, match=r"users.csv: line 3: user_id 'x' is not an integer"):
        run(tmp_path, {"kind": "csv", "path": str(tmp_path / "log.csv"), "users_file": str(tmp_path / "users.csv")},
            overwrite=True)
    (tmp_path / "users.csv").write_text("user_id,zip\n1,01234\n1,98765\n")
    with pytest.raises(SourceError, match=r"users.csv: user_id 1 has more than one row"):
        run(tmp_path, {"kind": "csv", "path": str(tmp_path / "log.csv"), "users_file": str(tmp_path / "users.csv")},
            overwrite=True)


def test_negative_ids_are_ids(ray_cluster, tmp_path):
    """An id is a label: -1 is a user like any other (a log that uses it for "unknown" must drop those
    rows first, or they become one user), and negative item ids map to dense ids in raw-id order."""
    (tmp_path / "log.csv").write_text("user_id,item_id,timestamp\n-1,-5,1600000000\n-1,3,1600000001\n4,-5,1600000002\n")
    summary = run(tmp_path, {"kind": "csv", "path": str(tmp_path / "log.csv")})
    assert (summary["accepted"], summary["users"], summary["num_items"]) == (3, 2, 2)
    assert pq.read_table(data_location(tmp_path / "out").local_path() / "vocab" / "users.parquet")["user_id"].to_pylist() == [-1, 4]
    assert pq.read_table(data_location(tmp_path / "out").local_path() / "vocab" / "items.parquet")["item_id"].to_pylist() == [-5, 3]
    seqs = {r["user"]: r["items"] for r in read_split(tmp_path / "out", "sequences").to_pylist()}
    assert seqs == {1: [1, 2], 2: [1]}
