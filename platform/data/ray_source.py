"""Sources read by Ray Data: any `ray.data.read_*` reader (Delta, Iceberg, BigQuery, a database, JSON ...)
named in the config, or a `ray.data.Dataset` a user built and gave to `prepare(cfg, dataset=ds)`.

    data: {source: {kind: ray_data, reader: read_json, args: {paths: s3://bucket/events/},
                    columns: {action: event}, actions: {names: [click, buy]}}}

The Dataset runs once, as Ray Data's own tasks, with `preserve_order` on, and leaves its blocks (Arrow
tables) in the object store, in the dataset's row order. Stage 1 of the pipeline then validates each block
as one Ray task with the same vectorised rules as a CSV or Parquet chunk (adapters.canonical_events,
genrec.data.validation): a block is a chunk, numbered in that order, and a row's source order is its
block number and its row in the block, so ties in time break the same way on every run, whatever the
block sizes. Not `map_batches`: a batch there knows neither its position nor its number (Ray's own row
ids come from task ids and change between runs), and source order must be stable.

A rejected row is addressed as `ray.data.<reader> block B` (or `ray.data.Dataset block B`), row R
(1-based, within the block), with the row as JSON. The Dataset is materialized (in the object store,
spilled to disk past its size) before stage 1 starts; `prepare` turns `preserve_order` on in the
context of a Dataset it is given.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..config import ConfigError, DataConfig, RayDataSource
from ..storage import is_uri, resolve_path
from .adapters import SourceError, SourcePlan, _action_rules, _rules, _wanted, canonical_events, json_rows, reading
from .validation import FIELDS, Rules

READER_KEY = "data.source.reader"
ARGS_KEY = "data.source.args"


def check_dataset(source, dataset) -> None:
    """A Dataset goes with a ray_data source that names no reader; a ray_data source without one needs it."""
    if dataset is None:
        if isinstance(source, RayDataSource) and source.reader is None:
            raise ConfigError(f"{READER_KEY}: required (a ray.data.read_* function such as read_json), unless "
                              "prepare is given a Dataset: prepare(cfg, dataset=ds)")
        return
    import ray.data

    if not isinstance(dataset, ray.data.Dataset):
        raise TypeError(f"prepare(dataset=...) takes a ray.data.Dataset, got {type(dataset).__name__}")
    if not isinstance(source, RayDataSource):
        raise ConfigError(f"data.source.kind: prepare was given a Dataset, which needs kind 'ray_data' "
                          f"(got {source.kind!r})")
    if source.reader is not None:
        raise ConfigError(f"{READER_KEY}: prepare was given a Dataset and the config names a reader too "
                          f"({source.reader!r}); drop one of them")


def plan_dataset(cfg: DataConfig) -> SourcePlan:
    """The plan of a Ray Data source: its rules and actions. It has no chunks: its blocks come from Ray Data."""
    source = cfg.source
    return SourcePlan(
        chunks=[],
        actions=source.actions.names,
        merge_actions=source.actions.merge_same_impression,
        checksums={},  # a reader's storage is its own (a table, a query): nothing to checksum here
        rules=_rules(cfg, id_kind=source.columns.id_type, timestamp_unit=source.timestamp_unit, **_action_rules(source)),
        item_features=list(source.item_features),
    )


def _label(source: RayDataSource) -> str:
    """What a rejected row's source_file names: the reader, or the Dataset given to prepare."""
    return f"ray.data.{source.reader}" if source.reader else "ray.data.Dataset"


def _reader_args(args: dict) -> dict:
    """The reader's arguments, with relative local `paths` taken from $GENREC_ROOT like every path of a config."""
    paths = args.get("paths")
    if paths is None:
        return args
    local = lambda p: p if not isinstance(p, str) or is_uri(p) else str(resolve_path(p))  # noqa: E731
    return {**args, "paths": [local(p) for p in paths] if isinstance(paths, list) else local(paths)}


def _read(source: RayDataSource):
    """The Dataset the configured reader makes (lazy: nothing is read yet)."""
    import ray.data

    args = _reader_args(source.args)
    where = args.get("paths", _label(source))
    with reading(ARGS_KEY, where):
        try:
            return getattr(ray.data, source.reader)(**args)
        except TypeError as err:
            raise ConfigError(f"{ARGS_KEY}: ray.data.{source.reader} refused them ({err})") from None
        except FileNotFoundError:
            raise SourceError(f"{ARGS_KEY}: ray.data.{source.reader} found nothing at {where}") from None


def dataset_blocks(source: RayDataSource, dataset=None) -> list[dict]:
    """Run the Dataset (the given one, else the reader's) in its row order -> one work item per block:
    {"index": block number, "block": ObjectRef of its Arrow table}."""
    ds = dataset if dataset is not None else _read(source)
    ds.context.execution_options.preserve_order = True  # the blocks in the dataset's order, run after run
    with reading(ARGS_KEY, source.args.get("paths", _label(source))):
        refs = ds.to_arrow_refs()
    schema = ds.schema()
    if not refs or schema is None:
        raise SourceError(f"{_label(source)}: the dataset has no rows")
    missing = {k: v for k, v in _wanted(source.columns, source.item_features).items() if v not in schema.names}
    if missing:
        names = ", ".join(f"{v!r} (for {k})" for k, v in missing.items())
        raise SourceError(f"{_label(source)}: column {names} not in {schema.names}; set data.source.columns")
    return [{"index": index, "block": ref} for index, ref in enumerate(refs)]


def _column(table: pa.Table, name: str, for_rules: bool) -> pa.Array:
    """A block's column, as the rules read it (`for_rules`) or as an item feature keeps it.

    A block may lack a column (JSON lines none of which has the field): nulls. Values of mixed Python
    types (ray.data.from_items of ints and strings) arrive as pickled objects: as text, the rules read
    them like a CSV field. For the rules a missing text value is the empty field of a CSV, so that its
    row gets the same reason ("missing field X")."""
    column = table[name].combine_chunks() if name in table.column_names else pa.nulls(table.num_rows)
    if isinstance(column.type, pa.ExtensionType):
        column = pa.array([None if v is None else str(v) for v in column.to_pylist()], pa.string())
    if for_rules and (pa.types.is_null(column.type) or pa.types.is_string(column.type)
                      or pa.types.is_large_string(column.type)):
        return pc.cast(column, pa.string()).fill_null("")
    return column


def read_block(index: int, block, source: RayDataSource, rules: Rules, catalog: pa.Array | None = None):
    """Validate block `index` of the dataset -> (accepted canonical events, rejects, item features, input rows)."""
    import ray

    table = ray.get(block)
    wanted = _wanted(source.columns, source.item_features)
    table = table.select([name for name in dict.fromkeys(wanted.values()) if name in table.column_names])
    columns = {field: _column(table, name, for_rules=field in FIELDS) for field, name in wanted.items()}
    rows = np.arange(1, table.num_rows + 1, dtype=np.int64)
    events, rejects, features = canonical_events(columns, rows, json_rows(table, 1), rules, catalog,
                                                 f"{_label(source)} block {index}", index)
    return events, rejects, features, table.num_rows
