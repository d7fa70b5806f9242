"""Where genrec reads and writes: a local path, a shared mount, or an object-store URI, all through
pyarrow.fs (the file-system layer Ray Data and Ray Train use for their own storage).

    loc = location("s3://bucket/genrec/data/ml-1m")     # or "outputs/data/ml-1m", "/mnt/genrec/..."
    (loc / "manifest.json").write_text(...)
    files = loc.list_files(suffixes=(".parquet",))

On a cluster whose nodes share no disk, every storage key (data.source.path, data.output_dir,
train.storage_path, sweep.storage_path, a served model's uri) is such a URI.

Credentials are the store's own standard chain: for S3, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
(/ AWS_SESSION_TOKEN), AWS_PROFILE, or the instance's role; an S3-compatible store (MinIO, Ceph,
R2 ...) is named by AWS_ENDPOINT_URL, the AWS SDKs' own variable. genrec never reads, logs or records
a credential: configs, manifests, MLflow params and run folders hold only the URI.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from .errors import GenrecError


class StorageError(GenrecError, OSError):
    """Storage that cannot be used as configured: a missing bucket, refused credentials, no permission,
    no data files. The message is one line that names the key and the URI."""


def is_uri(path: str | os.PathLike) -> bool:
    """s3://bucket/x, gs://..., file:///...: a storage URI rather than a (local or mounted) path."""
    return "://" in str(path)


def resolve_path(path: str | os.PathLike) -> Path:
    """An absolute path: relative ones are taken from $GENREC_ROOT, else the current directory."""
    p = Path(os.path.expandvars(os.path.expanduser(str(path))))
    if p.is_absolute():
        return p
    return (Path(os.environ.get("GENREC_ROOT") or os.getcwd()) / p).resolve()


@dataclass(frozen=True)
class Location:
    """A file or folder on some storage: the file system, the path within it, and the URI a person
    reads (an absolute path for local storage). Folders on object stores are key prefixes."""

    fs: pafs.FileSystem
    path: str
    uri: str

    def __truediv__(self, name: str) -> Location:
        sep = "" if self.uri.endswith("/") else "/"
        return Location(self.fs, f"{self.path.rstrip('/')}/{name}", f"{self.uri}{sep}{name}")

    def __str__(self) -> str:
        return self.uri

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        path, uri = self.path.rstrip("/"), self.uri.rstrip("/")
        return Location(self.fs, path.rsplit("/", 1)[0], uri.rsplit("/", 1)[0])

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def local_path(self) -> Path:
        if not self.is_local:
            raise ValueError(f"{self.uri} is not on the local file system")
        return Path(self.path)

    def info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        """A folder, or on an object store a prefix with at least one object under it."""
        if self.info().type == pafs.FileType.Directory:
            return self.is_local or bool(self.list_files(limit=1))
        return False

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_bytes(self, data: bytes) -> None:
        """One object (on object stores a single PUT: readers see the old bytes or the new, never part)."""
        self.parent.mkdir()
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def mkdir(self) -> None:
        """Local folders only: object stores have no folders to make."""
        if self.is_local:
            self.fs.create_dir(self.path, recursive=True)

    def list_files(self, suffixes: tuple = (), recursive: bool = True, limit: int | None = None) -> list[Location]:
        """The files under this folder, sorted by path, hidden ones (a leading . or _ in any part
        below the folder) left out: staging areas and markers are not data."""
        if self.info().type == pafs.FileType.NotFound:
            return []
        found = []
        base = self.path.rstrip("/") + "/"
        for entry in self.fs.get_file_info(pafs.FileSelector(self.path, recursive=recursive, allow_not_found=True)):
            relative = entry.path[len(base):] if entry.path.startswith(base) else entry.base_name
            if entry.type != pafs.FileType.File or any(part[:1] in "._" for part in relative.split("/")):
                continue
            if suffixes and not entry.path.endswith(tuple(suffixes)):
                continue
            found.append(self / relative)
            if limit and len(found) >= limit:
                break
        return sorted(found, key=lambda loc: loc.path)

    def delete(self) -> None:
        """Remove a file, or a folder with everything under it; nothing there is fine."""
        kind = self.info().type
        if kind == pafs.FileType.File:
            self.fs.delete_file(self.path)
        elif kind == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)


def location(path_or_uri: str | os.PathLike | Location, key: str = "storage") -> Location:
    """A Location for a local path (relative ones against $GENREC_ROOT, else the current directory), a
    file:// URI, or an object-store URI (s3://bucket/prefix; the endpoint from AWS_ENDPOINT_URL).
    `key` names the setting in errors."""
    if isinstance(path_or_uri, Location):
        return path_or_uri
    text = str(path_or_uri)
    if not is_uri(text) or text.startswith("file://"):
        local = resolve_path(text.removeprefix("file://"))
        return Location(pafs.LocalFileSystem(), str(local), str(local))
    scheme, rest = text.split("://", 1)
    if "@" in rest.split("/", 1)[0]:
        raise StorageError(f"{key}={scheme}://...@...: credentials do not belong in a storage URI (it is logged "
                           "and recorded); use the store's standard chain (environment, profile, instance role)")
    try:
        if scheme == "s3" and (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")):
            # the region is known: no HeadBucket call (from_uri makes one to find the bucket's region)
            # (the constructor, unlike from_uri, does not read AWS_ENDPOINT_URL itself)
            fs, path = pafs.S3FileSystem(region=os.environ.get("AWS_REGION") or os.environ["AWS_DEFAULT_REGION"],
                                         endpoint_override=os.environ.get("AWS_ENDPOINT_URL") or None), rest
        else:
            fs, path = pafs.FileSystem.from_uri(text)
    except (OSError, ValueError) as err:
        raise storage_error(err, key, text) from None
    return Location(fs, path.rstrip("/"), text.rstrip("/"))


def upload(folder: Path, target: Location) -> None:
    """Copy a local folder's files to a storage folder (pyarrow's copy, in parallel)."""
    pafs.copy_files(str(folder), target.path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=target.fs)


def download(source: Location, folder: Path) -> Path:
    """Copy a storage folder's files into a local folder; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(source.path, str(folder), source_filesystem=source.fs,
                    destination_filesystem=pafs.LocalFileSystem())
    return folder


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


# What object stores answer, by the error names the AWS SDK (and so pyarrow) puts in its messages.
_STORE_ERRORS = (
    (re.compile(r"NO_SUCH_BUCKET|NoSuchBucket|bucket does not exist", re.I),
     "the bucket {bucket!r} does not exist (create it, or fix the URI)"),
    (re.compile(r"INVALID_ACCESS_KEY_ID|InvalidAccessKeyId|SIGNATURE_DOES_NOT_MATCH|SignatureDoesNotMatch|"
                r"InvalidToken|ExpiredToken|UNRECOGNIZED_CLIENT", re.I),
     "the store refused the credentials (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the "
     "instance role, and AWS_ENDPOINT_URL for an S3-compatible store)"),
    (re.compile(r"ACCESS_DENIED|AccessDenied|Forbidden|HTTP response code: 403", re.I),
     "access denied: the credentials in use may not {action} here"),
    (re.compile(r"Could not connect|Connection refused|curlCode: 7|Couldn't connect|Timeout", re.I),
     "the store cannot be reached (check AWS_ENDPOINT_URL and the network)"),
)


def storage_error(err: OSError, key: str, loc: Location | str, action: str = "read") -> StorageError:
    """One line for a failed storage call: the key, the URI and what the store said, in words."""
    uri = str(loc)
    bucket = uri.split("://", 1)[-1].split("/", 1)[0]
    text = str(err)
    for pattern, words in _STORE_ERRORS:
        if pattern.search(text):
            return StorageError(f"{key}={uri}: {words.format(bucket=bucket, action=action)}")
    return StorageError(f"{key}={uri}: cannot {action} ({first_line(err)})")


def check_writable(loc: Location, key: str) -> None:
    """Write and delete a small object under `loc`, so that a missing bucket, refused credentials or a
    read-only grant stop a job before its work starts, with one line naming the key."""
    probe = loc / f"_genrec_write_check-{os.getpid()}"
    try:
        probe.write_bytes(b"genrec")
        probe.delete()
    except OSError as err:
        raise storage_error(err, key, loc, action="write") from None
