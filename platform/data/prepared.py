"""Reading a prepared dataset: the one place that knows its folder layout.

    outputs/data/<name>/
      manifest.json   counts, vocabularies, action encoding, split rule, checksums
      sequences/      one row per user
      train/ valid/ test/
      vocab/          items.parquet, users.parquet, context.json
      rejects/        rejected rows with their reason
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..config import resolve_path
from .schema import REJECT_SCHEMA

MANIFEST = "manifest.json"
SPLITS = ("train", "valid", "test")
SEQUENCES = "sequences"
VOCAB = "vocab"
REJECTS = "rejects"


def read_manifest(folder: str | Path) -> dict:
    path = resolve_path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no prepared data at {path.parent} (no {MANIFEST}); run jobs/prepare.py first")
    return json.loads(path.read_text())


def read_split(folder: str | Path, split: str) -> pa.Table:
    """A split (train, valid, test) or the sequences table, as one Arrow table."""
    path = resolve_path(folder) / split
    files = sorted(path.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet files in {path}; run jobs/prepare.py first")
    return pa.concat_tables(pq.read_table(f) for f in files)


def read_rejects(folder: str | Path) -> pa.Table:
    files = sorted((resolve_path(folder) / REJECTS).glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else REJECT_SCHEMA.empty_table()
