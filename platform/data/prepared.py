"""Reading a prepared dataset: the one place that knows its layout, on a local disk or an object store.

    outputs/data/<name>/                (or s3://bucket/genrec/data/<name>/)
      manifest.json                     written last: counts, vocabularies, action encoding, split rule,
                                        checksums, and data_prefix, the version that holds the data
      v-20261207T004512Z-1a2b3c4d/      one version of the data (each prepare writes a fresh one)
        sequences/                      one row per user
        train/ valid/ test/
        vocab/                          items.parquet, users.parquet, context.json
        rejects/                        rejected rows with their reason

A version is published by its manifest alone (one PUT: object stores cannot rename), so a reader
trusts only a complete manifest and reads the version it names: a prepare that failed or is still
running is never seen half written. A manifest without data_prefix is the layout before versions
(the folders beside the manifest), which still reads.
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import datetime, timezone
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from ..storage import Location, location, storage_error
from .schema import REJECT_SCHEMA

MANIFEST = "manifest.json"
DATA_PREFIX = "data_prefix"  # the manifest field naming the version folder
SERVING_LOG = "serving_log"  # the manifest field of a refresh's data: {log_id, through_seq} of the log it read
VERSION_PREFIX = "v-"
SPLITS = ("train", "valid", "test")
SEQUENCES = "sequences"
VOCAB = "vocab"
REJECTS = "rejects"
KEY = "data.output_dir"


def version_name() -> str:
    """A fresh version folder's name: sortable by time, unique by chance."""
    return f"{VERSION_PREFIX}{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def read_manifest(folder: str | os.PathLike | Location) -> dict:
    """The manifest of the prepared data at `folder`, refused unless complete."""
    loc = location(folder, KEY)
    path = loc / MANIFEST
    try:
        text = path.read_text() if path.is_file() else None
    except OSError as err:
        raise storage_error(err, KEY, loc) from None
    if text is None:
        raise FileNotFoundError(f"no prepared data at {loc} (no {MANIFEST}); run jobs/prepare.py first")
    try:
        manifest = json.loads(text)
    except ValueError:
        manifest = {}
    if not isinstance(manifest, dict) or manifest.get("complete") is not True:
        raise FileNotFoundError(f"no complete prepared data at {loc} ({MANIFEST} is not a complete prepare's "
                                "manifest); run jobs/prepare.py again")
    return manifest


def data_location(folder: str | os.PathLike | Location) -> Location:
    """The folder holding sequences/, the splits, vocab/ and rejects/ of the version the manifest names."""
    loc = location(folder, KEY)
    prefix = read_manifest(loc).get(DATA_PREFIX)
    return loc / prefix if prefix else loc


def split_files(folder: str | os.PathLike | Location, split: str) -> list[Location]:
    """The Parquet files of a split (train, valid, test) or of the sequences table, in order."""
    where = data_location(folder) / split
    files = where.list_files(suffixes=(".parquet",))
    if not files:
        raise FileNotFoundError(f"no Parquet files in {where}; run jobs/prepare.py first")
    return files


def split_uris(folder: str | os.PathLike | Location, split: str) -> list[str]:
    """The Parquet files of a split as paths or URIs (s3://...), as ray.data.read_parquet takes them."""
    return [f.uri for f in split_files(folder, split)]


def read_table(loc: Location, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file from any storage."""
    return pq.read_table(loc.path, filesystem=loc.fs, columns=columns)


def read_row_batches(loc: Location, columns: list[str] | None = None, rows: int = 16_384) -> Iterator[pa.Table]:
    """One Parquet file from any storage, `rows` rows at a time: memory follows the batch, not the file (a
    prepared file holds a partition of users, which grows with the log)."""
    with loc.fs.open_input_file(loc.path) as stream:
        file = pq.ParquetFile(stream)
        if not file.metadata.num_rows:  # no batch: the file's empty table, so its schema still reaches concat
            yield file.read(columns=columns)
        for batch in file.iter_batches(batch_size=rows, columns=columns):
            yield pa.Table.from_batches([batch])


def write_table(table: pa.Table, loc: Location, **options) -> None:
    """One Parquet file to any storage (pq.write_table's options); a local folder is made first."""
    loc.parent.mkdir()
    pq.write_table(table, loc.path, filesystem=loc.fs, **options)


def read_vocab(folder: str | os.PathLike | Location, name: str) -> pa.Table:
    """A vocabulary table of the current version: "items" or "users" (dense index, raw id, features)."""
    return read_table(data_location(folder) / VOCAB / f"{name}.parquet")


def read_split(folder: str | os.PathLike | Location, split: str) -> pa.Table:
    """A split (train, valid, test) or the sequences table, as one Arrow table."""
    return pa.concat_tables(read_table(f) for f in split_files(folder, split))


def read_rejects(folder: str | os.PathLike | Location) -> pa.Table:
    files = (data_location(folder) / REJECTS).list_files(suffixes=(".parquet",))
    return pa.concat_tables([read_table(f) for f in files]) if files else REJECT_SCHEMA.empty_table()
