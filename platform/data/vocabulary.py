"""Growing vocabularies: raw user and item ids first seen in new events join a prepared folder's
vocabularies, and no id seen before moves.

    vocab = read_vocabulary("outputs/data/demo")          # the prepared data's items, users, version
    grown = extend_vocabulary(vocab, events)               # events: user_id, item_id, timestamp (raw ids)
    fingerprint = write_vocabulary(grown, version / VOCAB) # into the version folder of the data it describes
    manifest.update(vocabulary_manifest(grown, fingerprint))

A model's item table row i is dense id i, so a trained row keeps its meaning only if its id does: an
extension copies the old tables as they are and appends each new id after the current largest (the model
grows its tables to match, genrec.model.growth). The tables are then in dense-id order but no longer sorted
by raw id, so raw ids map to dense ones with `dense_index`, not with the pipeline's sorted-vocabulary fast
path (genrec.data.pipeline.dense_ids).

Each extension is a vocabulary version. The manifest records it under "vocabulary": the version (0, or no
record, for what a prepare built; +1 for each extension that added an id), the fingerprint of the vocab
files (what serving's vocabulary check hashes) and the parent's fingerprint, so a model folder, which
copies the manifest, records which vocabulary it was trained on and which one that extended.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..storage import Location, location
from .prepared import KEY, VOCAB, data_location, read_manifest, read_table, write_table

VOCABULARY = "vocabulary"  # the manifest field holding the version record
FILES = {"items": "items.parquet", "users": "users.parquet"}  # what the fingerprint hashes, in this order
CONTEXT = "context.json"
ID_COLUMNS = {"items": "item_id", "users": "user_id"}
INDEX = "index"
TIMESTAMP = "timestamp"
SCAN_ROWS = 1 << 20  # vocabulary rows compared with the new ids at a time


class VocabularyError(ValueError):
    """New events that cannot extend a vocabulary (a missing column, a null id, an id of another type)."""


@dataclass(frozen=True)
class Vocabulary:
    """A prepared folder's vocabularies in dense-id order: `items` (index 1..V, item_id, the catalog's
    feature columns) and `users` (index, user_id); `context` is context.json (user feature values).
    fingerprint: the hash of the files it was read from or written to (None until an extension is written);
    parent: the fingerprint of the vocabulary it extends (None for a prepare's own)."""

    items: pa.Table
    users: pa.Table
    context: dict
    version: int
    fingerprint: str | None
    parent: str | None

    @property
    def num_items(self) -> int:
        return self.items.num_rows

    @property
    def num_users(self) -> int:
        return self.users.num_rows


def vocabulary_fingerprint(prepared: str | os.PathLike | Location) -> str:
    """What the dense ids of a prepared data folder mean: a hash of its item and user vocabulary files
    (the same hash as genrec.serve.store's check of an event log)."""
    return files_fingerprint(data_location(prepared) / VOCAB)


def files_fingerprint(folder: Location) -> str:
    """The hash of items.parquet then users.parquet in a vocab folder."""
    digest = hashlib.sha256()
    for name in FILES.values():
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()


def read_vocabulary(prepared: str | os.PathLike | Location) -> Vocabulary:
    """The vocabularies of a prepared folder's current version, with their version record."""
    loc = location(prepared, KEY)
    record = read_manifest(loc).get(VOCABULARY) or {}
    folder = data_location(loc) / VOCAB
    context = folder / CONTEXT
    return Vocabulary(items=read_table(folder / FILES["items"]), users=read_table(folder / FILES["users"]),
                      context=json.loads(context.read_text()) if context.is_file() else {},
                      version=int(record.get("version", 0)), fingerprint=files_fingerprint(folder),
                      parent=record.get("parent"))


def extend_vocabulary(vocab: Vocabulary, events: pa.Table, where: str = "events") -> Vocabulary:
    """`vocab` with the users and items of `events` it lacks appended (dense ids after the current largest,
    features null), as the next version; `vocab` itself when the events hold no new id. `where` names the
    events in errors.

    New ids are numbered in order of first appearance (earliest timestamp, then raw id for ids first seen
    at the same time) rather than by raw id: then the ids do not depend on how a stream was cut into
    refreshes (extending with window 1 and then window 2 numbers every id as extending with both at once
    does), and a new id's number says when it entered. Memory beyond the tables: the events' distinct ids."""
    if vocab.fingerprint is None:
        raise VocabularyError("this vocabulary is an extension not yet written: write it (write_vocabulary) and "
                              "read it back before extending it again, so that its version has a fingerprint")
    missing = [c for c in (*ID_COLUMNS.values(), TIMESTAMP) if c not in events.column_names]
    if missing:
        raise VocabularyError(f"{where}: no column {', '.join(missing)} (columns: {', '.join(events.column_names)})")
    new = {name: _new_ids(getattr(vocab, name), events, ID_COLUMNS[name], where) for name in ID_COLUMNS}
    if not any(len(ids) for ids in new.values()):
        return vocab
    return replace(vocab, **{name: _appended(getattr(vocab, name), ID_COLUMNS[name], ids) for name, ids in new.items()},
                   version=vocab.version + 1, fingerprint=None, parent=vocab.fingerprint)


def _new_ids(table: pa.Table, events: pa.Table, column: str, where: str) -> pa.Array:
    """The ids of events[column] that `table` lacks, in order of first appearance."""
    ids = events[column]
    if ids.null_count:
        row = pc.index(pc.is_null(ids), True).as_py()
        raise VocabularyError(f"{where}: row {row} has no {column} (null)")
    try:
        ids = ids.cast(table.schema.field(column).type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise VocabularyError(f"{where}: {column} is {ids.type}, the vocabulary's {column} is "
                              f"{table.schema.field(column).type}, and not every value converts") from None
    first = pa.table({column: ids, TIMESTAMP: events[TIMESTAMP]}).group_by(column).aggregate([(TIMESTAMP, "min")])
    first = first.sort_by([(f"{TIMESTAMP}_min", "ascending"), (column, "ascending")])
    seen = first[column].combine_chunks()
    # known ids by scanning the vocabulary against the new ids' set (not a hash set of the whole vocabulary)
    known = pa.chunked_array([part.filter(pc.is_in(part, value_set=seen))
                              for part in _slices(table[column])], type=seen.type)
    return seen.filter(pc.invert(pc.is_in(seen, value_set=known.combine_chunks())))


def _slices(column: pa.ChunkedArray):
    for start in range(0, len(column), SCAN_ROWS):
        yield column.slice(start, SCAN_ROWS)


def _appended(table: pa.Table, column: str, ids: pa.Array) -> pa.Table:
    """`table` with rows for `ids` (its `column`) after its largest dense id: the same columns, null features."""
    largest = pc.max(table[INDEX]).as_py() or 0
    if largest != table.num_rows:
        raise VocabularyError(f"the vocabulary's {INDEX} column is not dense (largest {largest}, "
                              f"{table.num_rows} rows): it is not a prepared vocabulary")
    index = np.arange(largest + 1, largest + 1 + len(ids), dtype=np.int64)
    columns = {name: pa.nulls(len(ids), field.type) for name, field in zip(table.column_names, table.schema)}
    columns[INDEX] = pa.array(index).cast(table.schema.field(INDEX).type)
    columns[column] = ids
    return pa.concat_tables([table, pa.table(columns, schema=table.schema)])


def write_vocabulary(vocab: Vocabulary, folder: str | os.PathLike | Location) -> str:
    """The vocabulary's files (items.parquet, users.parquet, context.json) into `folder`, the vocab/ folder
    of a prepared version; returns their fingerprint (the vocabulary's from now on)."""
    loc = location(folder, KEY)
    for name, file in FILES.items():
        write_table(getattr(vocab, name), loc / file)
    (loc / CONTEXT).write_text(json.dumps(vocab.context, indent=1))
    return files_fingerprint(loc)


def vocabulary_manifest(vocab: Vocabulary, fingerprint: str) -> dict:
    """The manifest fields of a prepared version whose vocab/ holds `vocab` (written, with `fingerprint`):
    the item count a model is built with, and the version record."""
    return {"num_items": vocab.num_items,
            VOCABULARY: {"version": vocab.version, "fingerprint": fingerprint, "parent": vocab.parent,
                         "num_items": vocab.num_items, "num_users": vocab.num_users}}


def dense_index(vocab: Vocabulary, name: str, values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Raw ids -> their dense ids in vocab.items or vocab.users (`name`), extended or not; null where unknown."""
    table, column = getattr(vocab, name), ID_COLUMNS[name]
    position = pc.index_in(values.cast(table.schema.field(column).type), value_set=table[column].combine_chunks())
    return table[INDEX].combine_chunks().take(position)
