"""Data-lake I/O through pyarrow.fs: resolve URIs, list shards, read by row groups, commit atomically.

Local paths, file:// and s3:// (any S3 API: AWS, SeaweedFS, MinIO through `endpoint`) share one code path.
What a reader of the output may see is decided here:

- a shard's output is written completely before it becomes visible: on a local filesystem into
  `<partition>/_tmp/` and then renamed (atomic on POSIX); on S3 into a local spool file and then sent as
  one upload of the complete object (pyarrow sends a single PutObject for small objects). pyarrow completes
  an S3 upload whenever its stream is closed, even from a failing `with` block, so the stream is only
  opened once the complete file exists, and the object's size is checked after the upload;
- `<partition>/_manifest/<name>.json` is written after the file it describes: the manifest is the only
  truth of what is done; `_SUCCESS` appears when every shard of the partition is (`_report.json` at the
  end of every run, saying whether it is complete);
- names beginning with `_` or `.` are ignored by Parquet dataset readers (pyarrow, polars, Spark), so
  manifests, markers and temporary files never show up as data.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import os
import re
import tempfile
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

__all__ = [
    "StorageOptions", "Location", "Shard", "resolve", "list_shards", "read_schema", "iter_batches",
    "StagedParquet", "read_manifest", "write_manifest_entry", "write_marker", "remove", "clean_stale", "shard_gone",
    "list_files", "overlaps", "error_line", "fetch_model_dir", "MANIFEST_DIR", "TMP_DIR",
]

MANIFEST_DIR = "_manifest"
TMP_DIR = "_tmp"
PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")
_GLOB = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class StorageOptions:
    """How to reach an object store; credentials come only from the environment / provider chain."""

    endpoint: str | None = None  # e.g. http://127.0.0.1:8333 (scheme http or https)
    region: str | None = None
    anonymous: bool = False


@functools.lru_cache(maxsize=16)
def _s3(storage: StorageOptions) -> pafs.S3FileSystem:
    kw: dict[str, Any] = {"anonymous": storage.anonymous}
    if storage.endpoint:
        ep = urllib.parse.urlsplit(storage.endpoint if "://" in storage.endpoint else "https://" + storage.endpoint)
        kw["endpoint_override"] = ep.netloc
        kw["scheme"] = ep.scheme or "https"
        kw["region"] = storage.region or "us-east-1"  # custom endpoints: skip AWS's region lookup
    elif storage.region:
        kw["region"] = storage.region
    return pafs.S3FileSystem(**kw)


@dataclass(frozen=True)
class Location:
    """A file or folder in the lake: its URI as the user wrote it (normalized) and its filesystem path."""

    uri: str
    path: str
    storage: StorageOptions

    @property
    def fs(self) -> pafs.FileSystem:
        return _filesystem(self.uri, self.storage)

    @property
    def is_local(self) -> bool:
        return not self.uri.startswith(("s3://", "gs://", "hdfs://", "abfs://"))

    def child(self, *parts: str) -> "Location":
        tail = "/".join(p.strip("/") for p in parts if p)
        if not tail:
            return self
        return Location(self.uri.rstrip("/") + "/" + tail, self.path.rstrip("/") + "/" + tail, self.storage)

    def __str__(self) -> str:
        return self.uri


def _filesystem(uri: str, storage: StorageOptions) -> pafs.FileSystem:
    if uri.startswith("s3://"):
        return _s3(storage)
    if "://" in uri and not uri.startswith("file://"):
        return pafs.FileSystem.from_uri(uri)[0]
    return pafs.LocalFileSystem()


def resolve(uri: str, storage: StorageOptions | None = None, *, base: Path | None = None) -> Location:
    """A Location for a local path (relative to `base`), file://, s3:// or another pyarrow.fs URI."""
    storage = storage or StorageOptions()
    if uri.startswith("s3://"):
        path = uri[len("s3://"):].rstrip("/") or ""
        return Location("s3://" + path, path, storage)
    if uri.startswith("file://"):
        uri = urllib.parse.unquote(urllib.parse.urlsplit(uri).path)
    elif "://" in uri:
        _, path = pafs.FileSystem.from_uri(uri)
        return Location(uri.rstrip("/"), path, storage)
    p = Path(uri).expanduser()
    if not p.is_absolute():
        p = (base or Path.cwd()) / p
    path = os.path.normpath(str(p))
    return Location(path, path, storage)


@dataclass(frozen=True)
class Shard:
    """One input Parquet file: identity (path, size, mtime) and its hive partition values."""

    uri: str
    path: str
    rel: str  # path below the input's root: the stable source of the output name
    size: int
    mtime_ns: int | None
    partition: tuple[tuple[str, str], ...] = ()

    @property
    def output_name(self) -> str:
        """Deterministic output file name: readable stem + hash of the relative path. The stem never starts
        with `_` or `.` (an input named `été.parquet`, `#1.parquet` or `_x.parquet` would otherwise give one),
        since dataset readers skip such files: the rows would be committed and invisible."""
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.rel.rsplit("/", 1)[-1])
        for suf in PARQUET_SUFFIXES:
            stem = stem[: -len(suf)] if stem.endswith(suf) else stem
        stem = stem.lstrip("_.") or "shard"
        digest = hashlib.sha256(self.rel.encode()).hexdigest()[:10]
        return f"{stem[:60]}-{digest}.parquet"


def _hive(rel: str) -> tuple[tuple[str, str], ...]:
    out = []
    for part in rel.split("/")[:-1]:
        k, eq, v = part.partition("=")
        if eq and k:
            out.append((k, urllib.parse.unquote(v)))
    return tuple(out)


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """fnmatch for paths: `*` and `?` stay inside one folder, `**/` spans any number of folders."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            j = pattern.find("]", i + 1)
            if j < 0:
                out, i = out + re.escape("["), i + 1
            else:
                out, i = out + fnmatch.translate(pattern[i: j + 1])[4:-3], j + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def _hidden(rel: str) -> bool:
    return any(p.startswith(("_", ".")) for p in rel.split("/"))


def root_of(loc: Location) -> Location:
    """The folder a glob starts in (the location itself when it has no glob characters)."""
    m = _GLOB.search(loc.path)
    if not m:
        return loc
    cut = loc.path.rfind("/", 0, m.start())
    ucut = loc.uri.rfind("/", 0, _GLOB.search(loc.uri).start())
    return Location(loc.uri[:ucut], loc.path[:cut], loc.storage)


def list_shards(loc: Location) -> list[Shard]:
    """Every Parquet file of a file, folder (recursive), glob or hive dataset, sorted by path.

    Names starting with `_` or `.` (and files inside such folders) are skipped, as dataset readers do.
    """
    fs = loc.fs
    root = root_of(loc)
    if root is loc:
        info = fs.get_file_info(loc.path)
        if info.type == pafs.FileType.File:
            return [Shard(loc.uri, loc.path, loc.path.rsplit("/", 1)[-1], info.size, info.mtime_ns)]
        if info.type == pafs.FileType.NotFound:
            return []
    pattern = _pattern(loc, root)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root.path, recursive=True, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return []
    shards = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(root.path):].lstrip("/")
        if not _listed(rel, pattern):
            continue
        shards.append(Shard(f"{root.uri}/{rel}", info.path, rel, info.size, info.mtime_ns, _hive(rel)))
    return sorted(shards, key=lambda s: s.rel)


def _pattern(loc: Location, root: Location) -> re.Pattern[str] | None:
    """The glob of `loc` below `root` (root_of(loc)), or None for a plain folder or file."""
    return None if root is loc else _glob_regex(loc.path[len(root.path):].lstrip("/"))


def _listed(rel: str, pattern: re.Pattern[str] | None) -> bool:
    """Whether list_shards lists the file at `rel` below the root: not hidden, and through the glob, or a
    Parquet suffix in a plain folder."""
    return not _hidden(rel) and (bool(pattern.match(rel)) if pattern is not None else rel.endswith(PARQUET_SUFFIXES))


def shard_gone(loc: Location, uri: str) -> bool:
    """Whether `uri` names a shard of `loc` (a file list_shards(loc) would list: under its folder, through
    its glob, not hidden) that no longer exists. False for anything outside `loc`: another day's folder,
    another input, a name the listing would skip."""
    root = root_of(loc)
    if root is loc and uri == loc.uri:
        path = loc.path  # the input is this one file
    else:
        prefix = f"{root.uri}/"
        if not uri.startswith(prefix):
            return False
        rel = uri[len(prefix):]
        if not _listed(rel, _pattern(loc, root)):
            return False
        path = f"{root.path}/{rel}"
    return loc.fs.get_file_info(path).type == pafs.FileType.NotFound


def _with_partition(schema: pa.Schema, shard: Shard) -> pa.Schema:
    for k, _ in shard.partition:
        if k not in schema.names:
            schema = schema.append(pa.field(k, pa.string()))
    return schema


def read_schema(shard: Shard, loc: Location) -> pa.Schema:
    """The Arrow schema of a shard from its footer alone, plus its hive partition columns (strings)."""
    with loc.fs.open_input_file(shard.path) as f:
        return _with_partition(pq.read_schema(f), shard)


def read_metadata(shard: Shard, loc: Location) -> pq.FileMetaData:
    with loc.fs.open_input_file(shard.path) as f:
        return pq.read_metadata(f)


def iter_batches(shard: Shard, loc: Location, columns: list[str], batch_rows: int) -> Iterator[pa.Table]:
    """The shard's `columns`, `batch_rows` rows at a time, in file order; memory stays about one row group.
    A hive partition key fills its column only where the file has no column of that name (as in
    `read_schema`): a file's own values are never replaced by its folder's."""
    part = dict(shard.partition)
    with loc.fs.open_input_file(shard.path) as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        file_cols = [c for c in columns if c in names or c not in part]
        missing = [c for c in file_cols if c not in names]
        if missing:
            raise KeyError(f"{shard.uri} has no column(s) {', '.join(missing)} (it has {', '.join(names)})")
        for batch in pf.iter_batches(batch_size=batch_rows, columns=file_cols, use_threads=False):
            t = pa.Table.from_batches([batch])
            for c in columns:
                if c in part and c not in t.column_names:
                    t = t.append_column(c, pa.array([part[c]] * t.num_rows, pa.string()))
            yield t.select(columns)


def empty_table(shard: Shard, loc: Location, columns: list[str]) -> pa.Table:
    schema = read_schema(shard, loc)
    return schema.empty_table().select(columns)


# ----------------------------------------------------------------------------------------------- writing


def _spool_dir() -> Path:
    d = Path(tempfile.gettempdir()) / f"scorer-spool-{os.getuid()}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def clean_spool() -> int:
    """Remove local spool files of dead processes (their pid is in the name); return how many."""
    n = 0
    for p in _spool_dir().glob("*.parquet"):
        pid = p.name.split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            p.unlink(missing_ok=True)
            n += 1
    return n


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StagedParquet:
    """Write one Parquet file completely, then make it visible at `dest` at once (a datasink's lifecycle).

    start: __init__ opens a ParquetWriter on a staging file; write(table) appends row groups;
    commit() closes and publishes it (rename, or one upload); abort() throws the staging file away.
    """

    def __init__(self, dest: Location, schema: pa.Schema, *, compression: str = "zstd") -> None:
        self.dest = dest
        token = f"{os.getpid()}.{uuid.uuid4().hex[:12]}"
        if dest.is_local:
            tmp_dir = dest.path.rsplit("/", 1)[0] + "/" + TMP_DIR
            os.makedirs(tmp_dir, exist_ok=True)
            # not *.parquet: readers that glob the output tree (polars, duckdb: "**/*.parquet") must not
            # pick up a file being written
            self.stage = f"{tmp_dir}/{token}.{dest.path.rsplit('/', 1)[-1]}.tmp"
        else:
            self.stage = str(_spool_dir() / f"{token}.parquet")
        self.writer = pq.ParquetWriter(
            self.stage, schema, compression=None if compression == "none" else compression, store_schema=True
        )
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table)
        self.rows += table.num_rows

    def commit(self) -> int:
        """Publish the complete file; return its size in bytes."""
        self.writer.close()
        size = os.path.getsize(self.stage)
        try:
            if self.dest.is_local:
                os.replace(self.stage, self.dest.path)  # atomic on one filesystem
            else:
                _upload_whole(self.dest, self.stage, size)
        finally:
            if os.path.exists(self.stage):
                os.unlink(self.stage)
        return size

    def abort(self) -> None:
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001 - the file is thrown away; the original error is what matters
            pass
        if os.path.exists(self.stage):
            os.unlink(self.stage)


def _upload_whole(dest: Location, local_path: str, size: int) -> None:
    """One upload of a complete local file; a short or failed upload leaves no object behind."""
    fs = dest.fs
    data = pa.memory_map(local_path).read_buffer()  # complete before the stream opens
    try:
        out = fs.open_output_stream(dest.path)
        out.write(data)
        out.close()
        got = fs.get_file_info(dest.path).size
        if got != size:
            raise OSError(f"upload of {dest.uri}: {got} bytes arrived, {size} were sent")
    except BaseException:
        try:
            fs.delete_file(dest.path)
        except Exception:  # noqa: BLE001 - nothing may have been created; the upload error is raised
            pass
        raise


def put_bytes(dest: Location, data: bytes) -> None:
    """Write a small file atomically: rename on local disks, one PutObject on S3."""
    if dest.is_local:
        d = os.path.dirname(dest.path)
        os.makedirs(d, exist_ok=True)
        tmp = f"{d}/.{os.path.basename(dest.path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, dest.path)
    else:
        out = dest.fs.open_output_stream(dest.path)
        out.write(data)
        out.close()


def get_bytes(loc: Location) -> bytes:
    with loc.fs.open_input_stream(loc.path) as f:
        return f.read()


def error_line(e: BaseException) -> str:
    """The first line of an error's message (pyarrow's run to several), or its type's name if it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def remove(loc: Location, strict: bool = False) -> bool:
    """Delete a file: True if it was there. A file already gone is False; any other failure too, or with
    `strict` raised (a retire must know its delete happened)."""
    try:
        loc.fs.delete_file(loc.path)
        return True
    except FileNotFoundError:
        return False
    except OSError:
        if strict and loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound:
            raise
        return False


def list_files(loc: Location) -> dict[str, int]:
    """Names and sizes of the files directly in a folder (empty if the folder does not exist)."""
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=False, allow_not_found=True))
    return {i.base_name: i.size for i in infos if i.type == pafs.FileType.File}


# ----------------------------------------------------------------------------------------------- manifest


def write_manifest_entry(partition: Location, name: str, entry: dict[str, Any]) -> None:
    """Record a committed output file; called only after the file itself is committed."""
    put_bytes(partition.child(MANIFEST_DIR, name + ".json"), json.dumps(entry, sort_keys=True).encode())


def read_manifest(partition: Location) -> dict[str, dict[str, Any]]:
    """Output name -> manifest entry, for every shard committed in this partition."""
    from concurrent.futures import ThreadPoolExecutor

    mdir = partition.child(MANIFEST_DIR)
    names = sorted(n for n in list_files(mdir) if n.endswith(".json") and not n.startswith("."))
    with ThreadPoolExecutor(8) as pool:
        blobs = list(pool.map(lambda n: get_bytes(mdir.child(n)), names))
    out = {}
    for n, b in zip(names, blobs):
        try:
            entry = json.loads(b)
        except ValueError:
            continue  # unreadable entry: the shard counts as not done and is redone
        out[n[: -len(".json")]] = entry
    return out


def write_marker(partition: Location, name: str, data: bytes = b"") -> None:
    put_bytes(partition.child(name), data)


def clean_stale(partition: Location) -> int:
    """Remove staging files left by killed runs (local outputs; S3 uploads stage on the worker's disk)."""
    n = clean_spool()
    if partition.is_local:
        tmp = partition.child(TMP_DIR)
        for name in list_files(tmp):
            n += remove(tmp.child(name))
        if os.path.isdir(tmp.path) and not os.listdir(tmp.path):
            os.rmdir(tmp.path)
        for name in list_files(partition.child(MANIFEST_DIR)):
            if name.startswith("."):
                n += remove(partition.child(MANIFEST_DIR, name))
    return n


# ----------------------------------------------------------------------------------------------- helpers


def overlaps(a: Location, b: Location) -> bool:
    """Whether one location is inside the other (same store, path-prefix on folder boundaries)."""
    sa, sb = a.uri.split("://", 1)[0] if "://" in a.uri else "", b.uri.split("://", 1)[0] if "://" in b.uri else ""
    if sa != sb:
        return False
    pa_, pb = root_of(a).path.rstrip("/") + "/", root_of(b).path.rstrip("/") + "/"
    return pa_.startswith(pb) or pb.startswith(pa_)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def model_files(loc: Location) -> dict[str, tuple[int, int | None]]:
    """name -> (size, mtime_ns) of the files of a model directory (not recursive)."""
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=False, allow_not_found=True))
    return {i.base_name: (i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File}


def fetch_model_dir(loc: Location, *, weights: bool = True, cache: Path | None = None) -> Path:
    """A local directory holding the model at `loc`: the directory itself when local, else a cached copy.

    The cache key is the URI plus every file's size and mtime, so a changed model is fetched again.
    With weights=False only the small files (config, tokenizer) are fetched, for validation.
    """
    if loc.is_local:
        return Path(loc.path)
    files = model_files(loc)
    if not files:
        raise FileNotFoundError(f"{loc.uri}: no files (is it a model directory?)")
    key = hashlib.sha256(json.dumps([loc.uri, sorted(files.items()), weights]).encode()).hexdigest()[:16]
    root = (cache or Path(os.environ.get("SCORER_CACHE", Path.home() / ".cache" / "scorer"))) / "models" / key
    done = root / ".complete"
    if done.exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    for name in files:
        if not weights and name.endswith(WEIGHT_SUFFIXES):
            continue
        tmp = root / f".{name}.{os.getpid()}"
        try:
            with loc.fs.open_input_stream(loc.child(name).path) as src, open(tmp, "wb") as dst:
                while chunk := src.read(16 << 20):
                    dst.write(chunk)
        except BaseException:  # an interrupted download leaves no partial weights in the cache
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, root / name)
    done.touch()
    return root
