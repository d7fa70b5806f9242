"""Adapters: a source (MovieLens `::` files, MovieLens CSV, generic CSV/Parquet logs) ->
canonical events (schema.EVENT_SCHEMA) + rejects (schema.REJECT_SCHEMA).

Work is planned on the driver as `Chunk`s (a byte range of a text file, or a row
group of a Parquet file) so that Ray tasks can parse them in parallel, and so that
every row keeps its file and row number: the tie-break for equal timestamps
(source order) and the address printed for a rejected row.

Every file is read through genrec.storage (pyarrow.fs): a source path may be a local
file or folder, or an object-store URI (s3://bucket/logs/, or a key prefix such as
s3://bucket/logs/2026-12- for every object whose key starts with it), and a task on
any node reads its chunk straight from there.

Every input row ends up in exactly one of the two outputs: input = accepted + rejected.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import io
import json
import posixpath
import re
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..config import (
    TEXT_SUFFIXES,
    ActionsConfig,
    ColumnMapping,
    CsvSource,
    DataConfig,
    MovieLensCsvSource,
    MovieLensSource,
    ParquetSource,
    SyntheticSource,
    UsersFile,
)
from ..errors import GenrecError
from ..storage import Location, StorageError, location, storage_error
from .prepared import read_table
from .schema import EVENT_SCHEMA, REJECT_SCHEMA, source_order
from .validation import FIELDS, Rules, read_text, validate


class SourceError(GenrecError, ValueError):
    """A source that cannot be read at all (missing file, empty file, wrong format)."""


MOVIELENS_ACTIONS = ["rating_1", "rating_2", "rating_3", "rating_4", "rating_5"]
INTEGER = re.compile(r"-?\d+\Z")
NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\Z")


@dataclass(frozen=True)
class TextFormat:
    """How to cut one text file into lines and fields."""

    names: tuple  # column names in file order (the header, given names, or "0", "1", ...)
    positions: dict  # canonical field (and kept feature) -> column index
    delimiter: str = ","  # "::" for MovieLens .dat
    quoting: bool = True
    newline: bytes = b"\n"  # b"\r" for old Mac files
    compression: str | None = None  # "gzip" or "zstd": the whole file is one chunk
    header: bool = False  # the chunk starts with the header line (compressed files only)


@dataclass(frozen=True)
class Chunk:
    file_index: int
    path: str  # the file's path or URI
    kind: str  # "text" or "parquet"
    start: int = 0  # byte offset (text) / row group (parquet)
    stop: int = 0
    first_row: int = 1  # 1-based number of the chunk's first row
    text_format: TextFormat | None = None
    parquet_columns: dict = field(default_factory=dict)


@dataclass
class SourcePlan:
    """Everything the pipeline needs to know about a source before reading it."""

    chunks: list[Chunk]
    actions: list[str]
    merge_actions: bool
    checksums: dict  # file (path or URI) -> sha256 of the file
    rules: Rules = field(default_factory=Rules)
    catalog: pa.Table | None = None  # item_id + item features (movies.dat / movies.csv / items.parquet)
    users: pa.Table | None = None  # user_id + context features
    context_columns: list[str] = field(default_factory=list)
    item_features: list[str] = field(default_factory=list)  # event columns kept as item features


# ----------------------------------------------------------------------------- helpers

COMPRESSION = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}


SOURCE_KEY = "data.source.path"
BLOCK = 1 << 22  # bytes per read of a streamed file


@contextmanager
def reading(key: str, where):
    """A storage failure inside as one line naming the key and the URI (missing bucket, refused
    credentials, access denied); a StorageError already made passes as it is."""
    try:
        yield
    except StorageError:
        raise
    except OSError as err:
        raise storage_error(err, key, where) from None


def _not_found(loc: Location, what: str, key: str) -> GenrecError:
    """Nothing at `loc`: on an object store first the bucket (the store's own words when it is missing)."""
    if not loc.is_local:
        bucket = loc.path.split("/", 1)[0]
        if loc.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            return storage_error(FileNotFoundError(f"NoSuchBucket: {bucket}"), key, loc)
    return SourceError(f"{what} not found: {loc}")


def _require_file(loc: Location, what: str, key: str = SOURCE_KEY) -> Location:
    info = loc.info()
    if info.type == pafs.FileType.NotFound:
        raise _not_found(loc, what, key)
    if info.type != pafs.FileType.File:
        raise SourceError(f"{what} is not a file: {loc}")
    if info.size == 0:
        raise SourceError(f"{what} is empty: {loc}")
    return loc


def _under_prefix(loc: Location) -> list[Location]:
    """The files whose path starts with `loc`'s, a key prefix (s3://bucket/logs/2026-12-): the parent
    folder's entries whose name starts with the last part, and every file inside those that are folders."""
    parent, start = loc.parent, loc.name
    found = []
    for entry in loc.fs.get_file_info(pafs.FileSelector(parent.path, allow_not_found=True)):
        if entry.base_name.startswith(start) and entry.base_name[:1] not in "._":
            child = parent / entry.base_name
            found += [child] if entry.type == pafs.FileType.File else child.list_files()
    return sorted(found, key=lambda f: f.path)


def _files_in(loc: Location, pattern: str | None, suffixes: tuple, what: str, key: str = SOURCE_KEY) -> list[Location]:
    """A file named explicitly, whatever its name; in a folder (and its subfolders) or under a key
    prefix, the files whose name matches `pattern` (a glob), by default those ending in one of
    `suffixes`. Names starting with . or _ are not data (markers, staging areas)."""
    kind = loc.info().type
    if kind == pafs.FileType.File:
        return [_require_file(loc, what, key)]
    found = loc.list_files() if kind == pafs.FileType.Directory else _under_prefix(loc)
    if not found and kind != pafs.FileType.Directory:
        raise _not_found(loc, what, key)
    files = [f for f in found if (fnmatch.fnmatch(f.name, pattern) if pattern else f.name.endswith(suffixes))]
    if not files:
        wanted = repr(pattern) if pattern else "/".join("*" + s for s in suffixes)
        where = f"folder {loc}" if loc.is_local else f"the key prefix {key}={loc}"
        raise SourceError(f"{what}: no {wanted} files in {where}; set data.source.file_pattern "
                          f"(e.g. '*.data') or name the file in {key}")
    return [_require_file(f, what, key) for f in files]


def _blocks(loc: Location):
    """The file's bytes as they are stored (never decompressed), block by block."""
    with loc.fs.open_input_stream(loc.path, compression=None) as stream:
        while block := stream.read(BLOCK):
            yield block


def file_checksum(loc: Location) -> str:
    """sha256 of the whole file, streamed (the manifest's source checksum)."""
    digest = hashlib.sha256()
    for block in _blocks(loc):
        digest.update(block)
    return digest.hexdigest()


def _compression(loc: Location) -> str | None:
    with loc.fs.open_input_stream(loc.path, compression=None) as f:
        magic = f.read(4)
    if magic[:2] == b"\x1f\x8b":
        return "gzip"
    if magic == b"\x28\xb5\x2f\xfd":
        return "zstd"
    return COMPRESSION.get(posixpath.splitext(loc.name)[1])


def _open_text(loc: Location, compression: str | None):
    """A binary stream of the file's text, decompressed on the fly."""
    return loc.fs.open_input_stream(loc.path, compression=compression)


def _first_line(loc: Location, compression: str | None) -> tuple[bytes, bytes]:
    """(first line without its end, the line end: LF or CR)."""
    stream = _open_text(loc, compression)
    try:
        head = stream.read(1 << 20)
    except (OSError, pa.ArrowInvalid) as err:
        raise SourceError(f"{loc}: cannot read as {compression or 'text'} ({err})") from None
    finally:
        stream.close()
    lf, cr = head.find(b"\n"), head.find(b"\r")
    newline = b"\r" if cr >= 0 and (lf < 0 or (cr < lf - 1)) else b"\n"  # CR alone, not CRLF: an old Mac file
    end = head.find(newline)
    line = head if end < 0 else head[:end]
    return line.rstrip(b"\r"), newline


def _text_chunks(file_index: int, loc: Location, fmt: TextFormat, chunk_bytes: int,
                 skip_header: bool) -> tuple[list[Chunk], str]:
    """Split a text file at line ends into ~chunk_bytes pieces (each ends at the first line end at or
    after chunk_bytes), counting lines to number rows; and the file's sha256. One streamed pass: a
    store's file is read once.

    A compressed file cannot be cut without reading it, so it is one chunk.
    """
    if fmt.compression:
        return [Chunk(file_index, loc.uri, "text", 0, -1, 2 if skip_header else 1,
                      text_format=replace(fmt, header=skip_header))], file_checksum(loc)
    chunks, digest, nl = [], hashlib.sha256(), fmt.newline
    start, line, lines, offset = (None, 2, 0, 0) if skip_header else (0, 1, 0, 0)  # start None: in the header
    for block in _blocks(loc):
        digest.update(block)
        counted = 0  # the block's bytes before this are counted in `lines`
        if start is None:
            end = block.find(nl)
            if end < 0:
                offset += len(block)
                continue
            start, counted = offset + end + 1, end + 1
        while (cut := block.find(nl, max(start + chunk_bytes - offset, counted))) >= 0:
            lines += block.count(nl, counted, cut + 1)
            chunks.append(Chunk(file_index, loc.uri, "text", start, offset + cut + 1, line, text_format=fmt))
            start, line, lines, counted = offset + cut + 1, line + lines, 0, cut + 1
        lines += block.count(nl, counted)
        offset += len(block)
    if start is not None and start < offset:
        chunks.append(Chunk(file_index, loc.uri, "text", start, offset, line, text_format=fmt))
    return chunks, digest.hexdigest()


def _csv_header(loc: Location, delimiter: str, compression: str | None) -> tuple[list[str], bytes]:
    first, newline = _first_line(loc, compression)
    try:
        text = first.decode("utf-8-sig")
        header = pacsv.read_csv(pa.BufferReader(text.encode() + b"\n"),
                                parse_options=pacsv.ParseOptions(delimiter=delimiter)).column_names
    except (UnicodeDecodeError, pa.ArrowInvalid):
        header = []
    if not header:
        raise SourceError(f"{loc}: the first line is not a readable CSV header; for a headerless file set "
                          f"data.source.header: false")
    return header, newline


def _positions(header: list[str], wanted: dict, path: Location, read_header: bool = False) -> dict:
    """Column index of each wanted column; read_header: `header` is the file's first line."""
    missing = {k: v for k, v in wanted.items() if v not in header}
    if missing:
        names = ", ".join(f"{v!r} (for {k})" for k, v in missing.items())
        hint = "set data.source.columns"
        if read_header and all(NUMBER.match(h.strip()) for h in header):
            hint = ("the first line looks like data, not a header (all numbers): for a headerless file set "
                    "data.source.header: false (and name the columns with column_names, or by position \"0\", \"1\", ...)")
        raise SourceError(f"{path}: column {names} not in header {header}; {hint}")
    return {k: header.index(v) for k, v in wanted.items()}


def _wanted(columns: ColumnMapping, features: list[str]) -> dict:
    """canonical field (or feature column) -> source column name"""
    wanted = {"user_id": columns.user_id, "item_id": columns.item_id, "timestamp": columns.timestamp}
    if columns.action:
        wanted["action"] = columns.action
    if columns.value:
        wanted["value"] = columns.value
    for name in features:
        if name in wanted.values():
            raise SourceError(f"data.source.item_features: {name!r} is already mapped in data.source.columns")
        wanted[f"feature:{name}"] = name
    return wanted


def action_ids(actions: ActionsConfig) -> dict:
    """Raw action value -> id: the names, the values a prefix stands for, then the mapping."""
    ids = {name: i for i, name in enumerate(actions.names)}
    if actions.prefix:
        ids.update({name.removeprefix(actions.prefix): i for i, name in enumerate(actions.names)
                    if name.startswith(actions.prefix) and name != actions.prefix})
    ids.update({raw: ids[name] for raw, name in actions.mapping.items()})
    return ids


def _rules(cfg: DataConfig, **kw) -> Rules:
    return Rules(timestamp_min=cfg.timestamp_min, timestamp_max=cfg.timestamp_max, **kw)


def _action_rules(source) -> dict:
    if not source.columns.action:
        return {}
    ids = action_ids(source.actions)
    # with a prefix an integer column holds values (4 -> rating_4), not ids
    return {"actions": tuple(ids.items()), "num_action_ids": len(source.actions.names),
            "integer_actions_are_ids": source.actions.prefix is None}


# ----------------------------------------------------------------------------- planning

def _plan_movielens(source: MovieLensSource, cfg: DataConfig) -> SourcePlan:
    root = location(source.path, SOURCE_KEY)
    if not root.is_dir():
        raise _not_found(root, "MovieLens folder", SOURCE_KEY)
    ratings = _require_file(root / source.ratings_file, "MovieLens ratings file")
    if b"::" not in _first_line(ratings, None)[0]:
        raise SourceError(f"{ratings}: not a MovieLens '::' file (first line has no '::')")
    fmt = TextFormat(("user_id", "item_id", "value", "timestamp"), {"user_id": 0, "item_id": 1, "value": 2, "timestamp": 3},
                     delimiter="::", quoting=False)
    catalog = read_movies_dat(_require_file(root / source.movies_file, "MovieLens movies file"))
    users = read_users_dat(_require_file(root / source.users_file, "MovieLens users file")) if source.users_file else None
    chunks, checksum = _text_chunks(0, ratings, fmt, cfg.chunk_bytes, skip_header=False)
    return SourcePlan(
        chunks=chunks,
        actions=MOVIELENS_ACTIONS,
        merge_actions=False,
        checksums={ratings.uri: checksum},
        rules=_rules(cfg, rating="stars"),
        catalog=catalog,
        users=users,
        context_columns=[c for c in (users.column_names[1:] if users is not None else [])],
    )


def _plan_movielens_csv(source: MovieLensCsvSource, cfg: DataConfig) -> SourcePlan:
    root = location(source.path, SOURCE_KEY)
    ratings = _require_file(root / source.ratings_file, "MovieLens ratings.csv")
    compression = _compression(ratings)
    header, newline = _csv_header(ratings, ",", compression)
    positions = _positions(header, {"user_id": "userId", "item_id": "movieId", "timestamp": "timestamp", "value": "rating"}, ratings)
    fmt = TextFormat(tuple(header), positions, newline=newline, compression=compression)
    catalog = read_movies_csv(_require_file(root / source.movies_file, "MovieLens movies.csv")) if source.movies_file else None
    chunks, checksum = _text_chunks(0, ratings, fmt, cfg.chunk_bytes, skip_header=True)
    return SourcePlan(
        chunks=chunks,
        actions=[f"rating_{h}" for h in ("0.5", "1", "1.5", "2", "2.5", "3", "3.5", "4", "4.5", "5")],
        merge_actions=False,
        checksums={ratings.uri: checksum},
        rules=_rules(cfg, rating="half_stars"),
        catalog=catalog,
    )


def _plan_csv(source: CsvSource, cfg: DataConfig) -> SourcePlan:
    files = _files_in(location(source.path, SOURCE_KEY), source.file_pattern,
                      tuple(t + c for t in TEXT_SUFFIXES for c in ("", *COMPRESSION)), "CSV event log")
    wanted = _wanted(source.columns, source.item_features)
    chunks, checksums = [], {}
    for index, path in enumerate(files):
        compression = _compression(path)
        if source.header:
            names, newline = _csv_header(path, source.delimiter, compression)
        else:
            first, newline = _first_line(path, compression)
            count = len(first.split(source.delimiter.encode()))
            names = source.column_names or [str(i) for i in range(count)]
        fmt = TextFormat(tuple(names), _positions(names, wanted, path, read_header=source.header), source.delimiter,
                         newline=newline, compression=compression)
        file_chunks, checksums[path.uri] = _text_chunks(index, path, fmt, cfg.chunk_bytes, skip_header=source.header)
        chunks += file_chunks
    users = read_users_text(source.users_file, source.delimiter, source.columns.id_type) if source.users_file else None
    return SourcePlan(
        chunks=chunks,
        actions=source.actions.names,
        merge_actions=source.actions.merge_same_impression,
        checksums=checksums,
        rules=_rules(cfg, id_kind=source.columns.id_type, timestamp_unit=source.timestamp_unit, **_action_rules(source)),
        users=users,
        context_columns=users.column_names[1:] if users is not None else [],
        item_features=list(source.item_features),
    )


def _plan_parquet(source: ParquetSource, cfg: DataConfig) -> SourcePlan:
    files = _files_in(location(source.path, SOURCE_KEY), source.file_pattern, (".parquet",), "Parquet event log")
    wanted = _wanted(source.columns, source.item_features)
    chunks = []
    for index, path in enumerate(files):
        with path.fs.open_input_file(path.path) as f:  # storage errors (outside the try) are not format errors
            try:
                meta = pq.ParquetFile(f).metadata
            except (pa.ArrowInvalid, OSError) as err:
                raise SourceError(f"{path}: not a readable Parquet file ({err})") from None
        names = meta.schema.names
        missing = {k: v for k, v in wanted.items() if v not in names}
        if missing:
            names_missing = ", ".join(f"{v!r} (for {k})" for k, v in missing.items())
            raise SourceError(f"{path}: column {names_missing} not in {names}; set data.source.columns")
        row = 1
        for group in range(meta.num_row_groups):
            n = meta.row_group(group).num_rows
            chunks.append(Chunk(index, path.uri, "parquet", group, group + 1, row, parquet_columns=wanted))
            row += n
    users = read_users_parquet(source.users_file) if source.users_file else None
    return SourcePlan(
        chunks=chunks,
        actions=source.actions.names,
        merge_actions=source.actions.merge_same_impression,
        checksums={p.uri: file_checksum(p) for p in files},
        rules=_rules(cfg, id_kind=source.columns.id_type, timestamp_unit=source.timestamp_unit, **_action_rules(source)),
        users=users,
        context_columns=users.column_names[1:] if users is not None else [],
        item_features=list(source.item_features),
    )


def synthetic_as_parquet(source: SyntheticSource, folder: Location) -> ParquetSource:
    """The generated folder, described as the Parquet log it is."""
    from .synthetic import EVENTS_DIR, USERS_FILE

    names = list(source.action_rates)
    return ParquetSource(
        kind="parquet",
        path=str(folder / EVENTS_DIR),
        columns=ColumnMapping(action="action"),
        actions=ActionsConfig(names=names, merge_same_impression=True),
        users_file=str(folder / USERS_FILE),
    )


def plan_source(cfg: DataConfig) -> SourcePlan:
    """Check the source exists and has the expected shape, and cut it into chunks."""
    source = cfg.source
    if isinstance(source, SyntheticSource):
        from .synthetic import ITEMS_FILE, generate

        folder = location(generate(source), SOURCE_KEY)
        with reading(SOURCE_KEY, folder):
            plan = _plan_parquet(synthetic_as_parquet(source, folder), cfg)
            plan.catalog = read_table(folder / ITEMS_FILE)
        return plan
    planners = {
        MovieLensSource: _plan_movielens,
        MovieLensCsvSource: _plan_movielens_csv,
        CsvSource: _plan_csv,
        ParquetSource: _plan_parquet,
    }
    with reading(SOURCE_KEY, source.path):
        plan = planners[type(source)](source, cfg)
    if not plan.chunks:
        raise SourceError(f"source has no rows: {source.path}")
    return plan


# ----------------------------------------------------------------------------- side tables

def _dat_lines(loc: Location, encoding: str) -> list[list[str]]:
    text = loc.read_bytes().decode(encoding)
    return [line.split("::") for line in text.splitlines() if line]


def read_movies_dat(path: Location) -> pa.Table:
    """movies.dat (latin-1): MovieID::Title::Genres -> item_id, title, genres list."""
    rows = _dat_lines(path, "latin-1")
    bad = [i + 1 for i, r in enumerate(rows) if len(r) != 3 or not INTEGER.match(r[0])]
    if bad:
        raise SourceError(f"{path}: lines {bad[:5]} are not MovieID::Title::Genres")
    return pa.table(
        {
            "item_id": pa.array([int(r[0]) for r in rows], pa.int64()),
            "title": [r[1] for r in rows],
            "genres": [r[2].split("|") for r in rows],
        }
    )


def read_users_dat(path: Location) -> pa.Table:
    """users.dat: UserID::Gender::Age::Occupation::Zip-code -> user_id + context features."""
    rows = _dat_lines(path, "utf-8")
    bad = [i + 1 for i, r in enumerate(rows) if len(r) != 5 or not INTEGER.match(r[0])]
    if bad:
        raise SourceError(f"{path}: lines {bad[:5]} are not UserID::Gender::Age::Occupation::Zip-code")
    return pa.table(
        {
            "user_id": pa.array([int(r[0]) for r in rows], pa.int64()),
            "gender": [r[1] for r in rows],
            "age": [r[2] for r in rows],
            "occupation": [r[3] for r in rows],
            "zip": [r[4] for r in rows],
        }
    )


def read_users_parquet(users_file: str) -> pa.Table:
    """A Parquet users file: user_id + context features."""
    key = "data.source.users_file"
    with reading(key, users_file):
        path = _require_file(location(users_file, key), "users file", key)
        users = read_table(path)
    if "user_id" not in users.column_names:
        raise SourceError(f"{path}: needs a user_id column, has {users.column_names}")
    return users


def read_users_text(spec: UsersFile, delimiter: str, id_type: str) -> pa.Table:
    """A delimited users file -> user_id (typed as the event log's ids) + context features (text)."""
    key = "data.source.users_file.path"
    with reading(key, spec.path):
        path = _require_file(location(spec.path, key), "users file", key)
        table = _read_users_csv(path, spec, spec.delimiter or delimiter)
    names = table.column_names
    features = spec.features if spec.features is not None else [n for n in names if n != spec.user_id]
    missing = [n for n in [spec.user_id, *features] if n not in names]
    if missing:
        raise SourceError(f"{path}: column {missing} not in {names}; set data.source.users_file.user_id / features")
    ids = pc.ascii_trim_whitespace(table[spec.user_id])
    if id_type == "int":
        bad = [i for i, v in enumerate(ids.to_pylist()) if not INTEGER.match(v)]
        if bad:
            raise SourceError(f"{path}: line {bad[0] + 1 + spec.header}: user_id {ids[bad[0]].as_py()!r} is not an "
                              "integer (data.source.columns.id_type is int)")
        ids = pc.cast(ids, pa.int64())
    repeated = [c["values"] for c in pc.value_counts(ids).to_pylist() if c["counts"] > 1]
    if repeated:
        raise SourceError(f"{path}: user_id {repeated[0]!r} has more than one row (one row per user)")
    return pa.table({"user_id": ids, **{n: table[n] for n in features}})


def _read_users_csv(path: Location, spec: UsersFile, delimiter: str) -> pa.Table:
    """Every column as text: ids are typed by the caller, features are categories ("01234" stays a zip code)."""
    compression = _compression(path)
    if spec.header:
        names, _ = _csv_header(path, delimiter, compression)
    else:
        first, _ = _first_line(path, compression)
        names = spec.column_names or [str(i) for i in range(len(first.split(delimiter.encode())))]
    try:
        with _open_text(path, compression) as stream:
            return pacsv.read_csv(stream, read_options=pacsv.ReadOptions(column_names=names, skip_rows=int(spec.header)),
                                  parse_options=pacsv.ParseOptions(delimiter=delimiter),
                                  convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                                       strings_can_be_null=False))
    except pa.ArrowInvalid as err:
        raise SourceError(f"{path}: not a readable users file ({err})") from None


def read_movies_csv(path: Location) -> pa.Table:
    rows = list(csv.DictReader(io.StringIO(path.read_text(), newline="")))
    return pa.table(
        {
            "item_id": pa.array([int(r["movieId"]) for r in rows], pa.int64()),
            "title": [r["title"] for r in rows],
            "genres": [r["genres"].split("|") for r in rows],
        }
    )


# ----------------------------------------------------------------------------- reading chunks

def _read_text_chunk(chunk: Chunk) -> tuple[dict, np.ndarray, object, np.ndarray, list, int]:
    fmt = chunk.text_format
    loc = location(chunk.path, SOURCE_KEY)
    if fmt.compression:
        stream = _open_text(loc, fmt.compression)
        try:
            data = stream.read()
        except (OSError, pa.ArrowInvalid) as err:
            raise SourceError(f"{chunk.path}: cannot decompress ({fmt.compression}): {err}") from None
        finally:
            stream.close()
        if fmt.header:
            end = data.find(fmt.newline)
            data = data[end + 1:] if end >= 0 else b""
    else:
        with loc.fs.open_input_file(loc.path) as f:
            f.seek(chunk.start)
            data = f.read(chunk.stop - chunk.start)
    text = read_text(data, chunk.first_row, list(fmt.names), fmt.positions, fmt.delimiter, fmt.quoting, fmt.newline)
    return text.columns, text.rows, text.raw, text.rejected_rows, text.rejected_reasons, text.input_rows


def _read_parquet_chunk(chunk: Chunk):
    cols = chunk.parquet_columns
    loc = location(chunk.path, SOURCE_KEY)
    with loc.fs.open_input_file(loc.path) as f:
        table = pq.ParquetFile(f).read_row_group(chunk.start, columns=sorted(set(cols.values())))
    n = table.num_rows
    rows = np.arange(chunk.first_row, chunk.first_row + n, dtype=np.int64)
    columns = {k: table[v] for k, v in cols.items()}
    return columns, rows, json_rows(table, chunk.first_row), np.zeros(0, np.int64), [], n


def json_rows(table: pa.Table, first_row: int):
    """row numbers -> those rows of `table` (whose first row is number `first_row`) as JSON: how a
    rejected row of typed columns is shown."""
    def raw(row_numbers) -> list[str]:
        picked = table.take(pa.array(np.asarray(row_numbers, dtype=np.int64) - first_row))
        return [json.dumps(r, default=str) for r in picked.to_pylist()]

    return raw


def read_chunk(chunk: Chunk, rules: Rules, catalog: pa.Array | None = None):
    """Parse and validate one chunk -> (accepted canonical events, rejects, item features, input rows).

    Item features: the kept feature columns of accepted rows, first row per item (None if none kept).
    """
    reader = _read_text_chunk if chunk.kind == "text" else _read_parquet_chunk
    with reading(SOURCE_KEY, chunk.path):
        columns, rows, raw, pre_rows, pre_reasons, input_rows = reader(chunk)
    events, rejects, features = canonical_events(columns, rows, raw, rules, catalog, chunk.path, chunk.file_index,
                                                 pre_rows, pre_reasons)
    return events, rejects, features, input_rows


def canonical_events(columns: dict, rows: np.ndarray, raw, rules: Rules, catalog: pa.Array | None, source_file: str,
                     file_index: int, pre_rows: np.ndarray | None = None, pre_reasons: list = ()):
    """Mapped columns of read rows -> (accepted canonical events, rejects, item features), by the rules.

    rows: each row's number (its address, and with `file_index` its source order); raw: row numbers ->
    their text; pre_rows/pre_reasons: rows the reader already rejected (they are not in `columns`).
    """
    canonical, reason = validate({k: v for k, v in columns.items() if k in FIELDS}, rules, catalog)
    pre_rows = np.zeros(0, np.int64) if pre_rows is None else pre_rows
    ok = pc.is_null(reason)
    ok_np = ok.to_numpy(zero_copy_only=False)
    id_type = pa.string() if rules.id_kind == "string" else pa.int64()
    schema = EVENT_SCHEMA.set(0, pa.field("user_id", id_type)).set(1, pa.field("item_id", id_type))
    order = pa.array(source_order(file_index, rows[ok_np]))
    events = pa.table({**{k: pc.filter(v, ok) for k, v in canonical.items()}, "source_order": order}).select(schema.names)
    events = events.cast(schema)
    bad_rows = rows[~ok_np]
    rejects = pa.table(
        {
            "source_file": [source_file] * (len(pre_rows) + len(bad_rows)),
            "row_number": np.concatenate([pre_rows, bad_rows]),
            "raw": raw(pre_rows) + raw(bad_rows),
            "reason": list(pre_reasons) + pc.filter(reason, pc.invert(ok)).to_pylist(),
        },
        schema=REJECT_SCHEMA,
    ).sort_by("row_number")
    features = None
    kept = [k for k in columns if k.startswith("feature:")]
    if kept:
        features = pa.table({"item_id": events["item_id"], "source_order": order,
                             **{k.split(":", 1)[1]: pc.filter(columns[k], ok) for k in kept}})
        first = np.unique(features["item_id"].to_numpy(zero_copy_only=False), return_index=True)[1]
        features = features.take(pa.array(np.sort(first)))
    return events, rejects, features
