"""The Ray actor that owns one GPU (or a few CPUs): load the model once, then score shard after shard.

One call of `score_shard` turns one input shard into one committed output file plus its manifest entry:

    reader thread:  read a chunk of rows (row groups, bounded) -> filter -> build texts -> tokenize --+
                                                                              queue of 2 chunks <-----+
    calling thread: (holding the device) score chunk -> id/passthrough + score columns -> write --> commit

The actor runs two calls at once (`max_concurrency=2`) and the driver keeps two shards in flight, so the
next shard is read and tokenized while the device scores this one; the device lock makes scoring
strictly one shard at a time. Rows keep their input order. A redo of a shard (a retry, or a task whose
result was lost with its actor) writes the same bytes to the same name, so it is harmless.

This module is imported on GPU machines: it must not import polars or anything only the driver needs.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from scorer import __version__
from scorer.jobs import lake
from scorer.jobs.expr import compile_filter

__all__ = ["ShardTask", "ShardResult", "ShardInputError", "ShardWorker"]

# Errors that mean "this input cannot be scored as the job says" (not worth a retry).
_INPUT_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, KeyError)
# What pyarrow's OSErrors say when a footer is corrupt (most corruption is ArrowInvalid already).
_FOOTER_ERRORS = ("magic bytes", "deserialize thrift", "file footer", "parquet file size")


def _round_trips(col: pa.ChunkedArray, out: pa.ChunkedArray) -> bool:
    """Whether `out` (col cast to another type) holds col's values: cast back, the same values and nulls
    (NaN equal to NaN). A null column converts to anything; a cast that has no way back (dictionary
    encodings, say) compares the two decoded to text."""
    if pa.types.is_null(col.type):
        return True
    try:
        back = out.cast(col.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        try:
            back, col = out.cast(pa.large_string()), col.cast(pa.large_string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            return False
    if back.equals(col):
        return True
    if not pa.types.is_floating(col.type):
        return False
    values = pc.or_kleene(pc.equal(back, col), pc.and_(pc.is_nan(back), pc.is_nan(col)))  # null where a null is
    same = pc.and_(pc.equal(pc.is_null(back), pc.is_null(col)), pc.fill_null(values, True))
    return bool(pc.all(same).as_py())


class ShardInputError(Exception):
    """The shard itself is bad (not Parquet, a missing column, a wrong type): retrying will not help."""


@dataclass(frozen=True)
class ShardTask:
    shard: lake.Shard
    name: str  # output file name (deterministic)
    fingerprint: str
    attempt: int = 1


@dataclass
class ShardResult:
    name: str
    input: str
    rows: int = 0
    input_rows: int = 0  # before the filter
    tokens: int = 0
    padded_tokens: int = 0
    errors: int = 0
    truncated: int = 0
    bytes: int = 0
    seconds: float = 0.0
    score_seconds: float = 0.0
    labels: dict[str, int] = field(default_factory=dict)
    worker: str = ""
    started_unix: float = 0.0  # wall clock: the call began (its reader starts at once, before the device lock)
    committed_unix: float = 0.0  # wall clock: the output file became visible


@dataclass(frozen=True)
class WorkerConfig:
    """What every actor of a job needs; built by the driver from the validated job."""

    job_name: str
    run_id: str
    model: lake.Location
    task: str
    device: str  # "auto" | "cuda" | "cpu"
    dtype: str | None
    batching: dict[str, Any]
    labels: dict[str, Any]
    text: Any  # scorer.jobs.expr.TextSpec
    keep: tuple[str, ...]  # id + passthrough columns, in output order
    filter: str | None
    input: lake.Location
    partition: lake.Location
    compression: str
    # the keep columns' Arrow types in the job's first input file (keep_types_from): every output of the job
    # is written with them, so the outputs of shards whose own types differ (a hive key that some files also
    # hold as a column, int32 here and int64 there) still read as one dataset
    keep_types: dict[str, Any] = field(default_factory=dict)
    keep_types_from: str | None = None
    cuda_graphs: bool = True  # runtime.cuda_graphs: small batches from CUDA graphs where they pay


class ShardWorker:
    """Create with `ray.remote(ShardWorker).options(num_gpus=1, num_cpus=0, max_concurrency=2)`."""

    def __init__(self, cfg: WorkerConfig) -> None:
        from scorer.api import Scorer

        self.cfg = cfg
        lake.clean_spool()
        model_dir = lake.fetch_model_dir(cfg.model)
        b, lab = cfg.batching, cfg.labels
        self.scorer = Scorer.from_pretrained(
            model_dir, task=cfg.task, device=cfg.device, dtype=cfg.dtype, max_length=b["max_length"],
            max_batch_tokens=b["max_batch_tokens"], max_rows=b["max_rows"], truncation_side=b["truncation_side"],
            pooling=lab["pooling"], normalize=lab["normalize"], dimensions=lab["dimensions"],
            threshold=lab["threshold"], return_logits=lab["return_logits"],
            cuda_graphs="auto" if cfg.cuda_graphs else False,
        )
        t0 = time.perf_counter()
        self.scorer.warmup()  # kernels compiled, crossovers measured, torch.compile traces made before the first shard
        self.warmup_seconds = time.perf_counter() - t0
        self.fingerprint = self.scorer.fingerprint
        self.filter, filter_cols = compile_filter(cfg.filter) if cfg.filter else (None, [])
        self.read_columns = list(dict.fromkeys([*cfg.keep, *cfg.text.columns, *filter_cols]))
        self.device_lock = threading.Lock()
        self.ident = f"{socket.gethostname()}:{os.getpid()}"

    def info(self) -> dict[str, Any]:
        return {"worker": self.ident, "device": str(self.scorer.device), "dtype": self.scorer.settings.dtype,
                "warmup_seconds": round(self.warmup_seconds, 3),
                "fingerprint": self.fingerprint, "gpus": os.environ.get("CUDA_VISIBLE_DEVICES", "")}

    # -- one shard ----------------------------------------------------------------------------------
    def score_shard(self, task: ShardTask) -> ShardResult:
        t0 = time.perf_counter()
        res = ShardResult(name=task.name, input=task.shard.uri, worker=self.ident, started_unix=time.time())
        chunks: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()
        reader = threading.Thread(target=self._read, args=(task.shard, chunks, stop, res), daemon=True)
        reader.start()
        dest = self.cfg.partition.child(task.name)
        staged = None
        labels: Counter[str] = Counter()
        try:
            with self.device_lock:
                schema = self._output_schema(task.shard)
                staged = lake.StagedParquet(dest, schema, compression=self.cfg.compression)
                while True:
                    item = chunks.get()
                    if item is None:
                        break
                    if isinstance(item, BaseException):
                        raise item
                    kept, enc = item
                    ts = time.perf_counter()
                    scores = self.scorer.score_encoded(enc)
                    st = self.scorer.last_stats
                    res.score_seconds += time.perf_counter() - ts
                    res.tokens += st.real_tokens
                    res.padded_tokens += st.padded_tokens
                    out = self._assemble(kept, scores, schema)
                    staged.write(out)
                    res.rows += out.num_rows
                    res.errors += len(out["error"]) - out["error"].null_count
                    res.truncated += pc.sum(out["truncated"]).as_py() or 0
                    if "label" in out.column_names:
                        for v in pc.value_counts(out["label"].combine_chunks().dictionary_decode()).to_pylist():
                            if v["values"] is not None:
                                labels[v["values"]] += v["counts"]
            res.bytes = staged.commit()
            res.committed_unix = time.time()
            staged = None
        except _INPUT_ERRORS as e:
            raise ShardInputError(f"bad input ({type(e).__name__}): {str(e).splitlines()[0] if str(e) else repr(e)}") from None
        finally:
            stop.set()
            if staged is not None:
                staged.abort()
            while reader.is_alive():  # unblock a reader waiting on a full queue
                try:
                    chunks.get_nowait()
                except queue.Empty:
                    reader.join(0.05)
        res.labels = dict(labels)
        res.seconds = time.perf_counter() - t0
        lake.write_manifest_entry(self.cfg.partition, task.name, self._entry(task, res))
        return res

    def _read(self, shard: lake.Shard, out: queue.Queue, stop: threading.Event, res: ShardResult) -> None:
        """Reader thread: chunks of (kept columns, Encoded), then None; an exception is passed on as an item."""

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            for table in lake.iter_batches(shard, self.cfg.input, self.read_columns, self.cfg.batching["chunk_rows"]):
                res.input_rows += table.num_rows
                if self.filter is not None:
                    table = table.filter(self.filter)
                if table.num_rows == 0:
                    continue
                texts = self.cfg.text.build(table)
                if pa.types.is_null(texts.type):  # all-null, written untyped (pyarrow, pandas): null texts
                    texts = texts.cast(pa.string())
                if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type) or pa.types.is_string_view(texts.type)):
                    raise pa.ArrowTypeError(f"text column {self.cfg.text.source!r} is {texts.type}, not a string")
                enc = self.scorer.encode(texts.to_pylist())
                if not put((table.select(list(self.cfg.keep)), enc)):
                    return
            put(None)
        except BaseException as e:  # noqa: BLE001 - handed to the scoring thread, which raises it
            put(e)

    def _output_schema(self, shard: lake.Shard) -> pa.Schema:
        """id + passthrough fields (types from the shard), then the score fields; with the run's metadata."""
        try:
            in_schema = lake.read_schema(shard, self.cfg.input)
        except OSError as e:
            # a footer that does not parse is bad input; any other I/O error (a vanished file, a dropped S3
            # connection: their messages name the .parquet path too) is worth a retry
            if any(k in str(e).lower() for k in _FOOTER_ERRORS):
                raise pa.ArrowInvalid(str(e)) from None
            raise
        missing = [c for c in self.cfg.keep if c not in in_schema.names]
        if missing:
            raise KeyError(f"no column(s) {', '.join(missing)} (it has {', '.join(in_schema.names)})")
        types = self.cfg.keep_types
        fields = [in_schema.field(c).with_type(types[c]) if c in types else in_schema.field(c) for c in self.cfg.keep]
        for f in self.scorer.output_schema:
            if f.name == "label":
                f = f.with_type(pa.dictionary(pa.int32(), pa.string()))
            elif f.name == "embedding" and self.cfg.labels["embedding_dtype"] == "float16":
                f = f.with_type(pa.list_(pa.float16(), f.type.list_size))
            fields.append(f)
        meta = {
            "scorer.version": __version__, "scorer.job": self.cfg.job_name, "scorer.run_id": self.cfg.run_id,
            "scorer.model_fingerprint": self.fingerprint, "scorer.input": shard.uri,
        }
        return pa.schema(fields, metadata=meta)

    def _assemble(self, kept: pa.Table, scores: pa.Table, schema: pa.Schema) -> pa.Table:
        cols = [self._conform(kept[c], schema.field(c).type, c) for c in kept.column_names]
        cols += [scores[c] for c in scores.column_names]
        table = pa.Table.from_arrays(cols, names=kept.column_names + scores.column_names)
        return table.cast(schema)

    def _conform(self, col: pa.ChunkedArray, want: pa.DataType, name: str) -> pa.ChunkedArray:
        """A kept column in the job's output type (a safe cast: no value may change). Arrow's safe cast
        refuses overflow and truncation but still parses "007" as 7, so the result is cast back and must
        give the input again."""
        if col.type == want:
            return col
        try:
            out = col.cast(want)
            if not _round_trips(col, out):
                raise pa.ArrowInvalid("some values would change (cast back, they differ from the input's)")
            return out
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
            first = lake.error_line(e)
            where = self.cfg.keep_types_from or "the job's first input file"
            raise pa.ArrowInvalid(
                f"column {name!r} is {col.type} in this file but {want} in {where}, which sets the job's output "
                f"schema, and its values do not convert ({first}); write {name!r} with one type in every input "
                "file, or leave it out of id/passthrough") from None

    def _entry(self, task: ShardTask, res: ShardResult) -> dict[str, Any]:
        s = task.shard
        return {
            "name": task.name, "fingerprint": task.fingerprint, "model_fingerprint": self.fingerprint,
            "device": str(self.scorer.device), "dtype": self.scorer.settings.dtype,
            "input": s.uri, "input_size": s.size, "input_mtime_ns": s.mtime_ns, "rows": res.rows,
            "input_rows": res.input_rows, "tokens": res.tokens, "padded_tokens": res.padded_tokens,
            "errors": res.errors, "bytes": res.bytes, "seconds": round(res.seconds, 4),
            "score_seconds": round(res.score_seconds, 4), "labels": res.labels, "run_id": self.cfg.run_id,
            "job": self.cfg.job_name, "worker": self.ident, "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "started_unix": round(res.started_unix, 6), "committed_unix": round(res.committed_unix, 6),
            "scorer_version": __version__,
        }
