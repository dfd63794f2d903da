"""jobs.yaml: the schema of the nightly jobs, loaded with line numbers and checked before anything starts.

```yaml
version: 1                       # optional
defaults:                        # optional: merged under every job (a job's own keys win)
  storage: {endpoint: "${S3_ENDPOINT}", region: us-east-1}
jobs:
  reviews:                       # job name: letters, digits, _ . -
    model: models/sentiment      # model directory: local (relative to this file) or s3://...
    task: classify               # classify | embed | both
    input: s3://lake/reviews/dt={date}/    # Parquet file, folder, glob (** spans folders) or hive dataset
    text: "{title}\\n\\n{body}"   # a string column, or a template over columns
    id: review_id                # one column or a list; copied to the output first
    passthrough: [lang]          # more columns copied to the output
    filter: lang == "en" and len(body) > 0   # optional, see scorer.jobs.expr
    output: {uri: s3://lake/scored/reviews, partition: "dt={date}"}   # or just the URI
    batching: {max_batch_tokens: 16384, max_rows: 256, max_length: 512, truncation_side: right, chunk_rows: 8192}
    runtime: {workers: 8, device: auto, dtype: bfloat16, shards_in_flight: 2, max_attempts: 3, cuda_graphs: true}
    labels: {threshold: 0.5, return_logits: false, embedding_dtype: float16, dimensions: 256}
    storage: {endpoint: "http://127.0.0.1:8333", region: us-east-1, anonymous: false}
```
`${VAR}` (or `${VAR:-default}`, `$$` for a literal `$`) takes a value from the environment; `{date}` in
`input`, `output` and `output.partition` is the run date (`--date`, default today in UTC); `--set
batching.max_rows=64` overrides a field of every selected job, `--set jobs.NAME.field=value` one job's.
Credentials are never part of jobs.yaml: S3 keys come from the environment or the provider chain.

Every error is one line, `jobs.yaml:LINE: FIELD: what is wrong — fix: what to do`, and `scorer validate`
/ `scorer run` exit 2 on it. Checks, in order: YAML syntax, unknown keys and wrong types (pydantic,
extra="forbid"), then per job: the model directory (config.json + tokenizer only, never the weights),
the input (at least one shard; the first shard's schema has the text / id / passthrough / filter columns
with usable types), and the output (not inside the input, not shared with another job).
"""

from __future__ import annotations

import datetime as _dt
import difflib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from scorer.jobs import lake
from scorer.jobs.expr import FilterError, TextSpec, compile_filter, parse_text

__all__ = ["SpecError", "Job", "JobsFile", "LoadedJob", "load", "check", "validate_cli", "SCORE_COLUMNS"]

# Columns the Scorer adds; id / passthrough columns must not reuse these names.
SCORE_COLUMNS = ("label", "label_id", "score", "scores", "probs", "labels", "logits", "embedding", "n_tokens", "truncated",
                 "error")


class SpecError(Exception):
    """One problem of a jobs.yaml, rendered as one line with its place and its fix."""

    def __init__(self, msg: str, *, where: str = "", field: str = "", fix: str = "") -> None:
        self.msg, self.where, self.field, self.fix = msg, where, field, fix
        super().__init__(str(self))

    def __str__(self) -> str:
        head = ": ".join(p for p in (self.where, self.field) if p)
        text = f"{head}: {self.msg}" if head else self.msg
        return f"{text} — fix: {self.fix}" if self.fix else text


# ----------------------------------------------------------------------------------------------- schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _listify(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


Columns = Annotated[list[str], BeforeValidator(_listify)]


class Batching(_Strict):
    max_batch_tokens: int = Field(16384, gt=0, description="padded tokens per forward pass (rows x longest row)")
    max_rows: int = Field(256, gt=0, description="rows per forward pass")
    max_length: int | None = Field(None, gt=0, description="tokens per text; longer texts are truncated")
    truncation_side: Literal["right", "left"] = "right"
    chunk_rows: int = Field(8192, gt=0, description="rows read and tokenized at once (bounds worker memory)")


class Runtime(_Strict):
    workers: int | None = Field(None, gt=0, description="actors; default one per GPU, or on CPU one per cpus_per_worker CPUs that memory allows")
    device: Literal["auto", "cuda", "cpu"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs a CPU worker reserves (device cpu)")
    shards_in_flight: int = Field(2, ge=1, le=4, description="shards queued per actor (2 overlaps read and score)")
    max_attempts: int = Field(3, ge=1, description="tries per shard before it is reported failed")
    cuda_graphs: bool = Field(True, description="replay small batches from CUDA graphs (Scorer's cuda_graphs); "
                                                "false runs every batch eagerly")

    def on_gpu(self, cluster_gpus: int) -> bool:
        """Whether the workers take GPUs: device cuda, or auto on a cluster that has any."""
        return self.device == "cuda" or (self.device == "auto" and cluster_gpus > 0)

    def compute_dtype(self, gpu: bool) -> str:
        """What the workers score in: `dtype`, or when unset Scorer's rule, bfloat16 on a GPU and float32 on
        a CPU. Fingerprints carry this, not the unset value, so a shard scored on CPU workers is redone
        when the job moves to GPUs."""
        return self.dtype or ("bfloat16" if gpu else "float32")


class Labels(_Strict):
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="multi-label decision threshold")
    return_logits: bool = False
    embedding_dtype: Literal["float16", "float32"] = "float32"
    dimensions: int | None = Field(None, gt=0, description="keep the first N embedding dimensions (Matryoshka)")
    pooling: Literal["last", "mean", "cls"] = "last"
    normalize: bool = True


class Storage(_Strict):
    endpoint: str | None = None
    region: str | None = None
    anonymous: bool = False

    def options(self) -> lake.StorageOptions:
        return lake.StorageOptions(self.endpoint or None, self.region or None, self.anonymous)


class Output(_Strict):
    uri: str
    partition: str = "dt={date}"
    compression: Literal["zstd", "snappy", "gzip", "lz4", "none"] = "zstd"


def _output(v: Any) -> Any:
    return {"uri": v} if isinstance(v, str) else v


class Job(_Strict):
    model: str
    task: Literal["classify", "embed", "both"] = "classify"
    input: str
    text: str = "text"
    id: Columns
    passthrough: Columns = []
    filter: str | None = None
    output: Annotated[Output, BeforeValidator(_output)]
    batching: Batching = Batching()
    runtime: Runtime = Runtime()
    labels: Labels = Labels()
    storage: Storage = Storage()

    def score_settings(self, gpu: bool) -> dict[str, Any]:
        """Every setting that can change a score or the output file (part of each shard's fingerprint), for
        a run on GPU workers (gpu) or CPU ones."""
        return {
            "task": self.task, "text": self.text, "id": self.id, "passthrough": self.passthrough,
            "filter": self.filter, "max_length": self.batching.max_length,
            "truncation_side": self.batching.truncation_side, "dtype": self.runtime.compute_dtype(gpu),
            "labels": self.labels.model_dump(), "compression": self.output.compression,
        }


class JobsFile(_Strict):
    version: Literal[1] = 1
    defaults: dict[str, Any] = {}
    jobs: dict[str, Any] = Field(..., min_length=1)


# ----------------------------------------------------------------------------------------------- loading


@dataclass
class LoadedJob:
    """A validated job plus what the checks learned (resolved locations, the input's first schema)."""

    name: str
    job: Job
    model: lake.Location
    input: lake.Location
    partition: lake.Location  # output URI + partition
    text: TextSpec
    base: Path
    where: dict[str, str] = field(default_factory=dict)  # field -> "jobs.yaml:LINE" for later messages
    shards: list[lake.Shard] | None = None
    input_schema: pa.Schema | None = None
    input_schema_from: str | None = None  # the shard whose footer gave input_schema

    @property
    def storage(self) -> lake.StorageOptions:
        return self.job.storage.options()

    @property
    def read_columns(self) -> list[str]:
        """Input columns a worker reads: id, passthrough, text and filter columns, each once."""
        cols: list[str] = []
        for c in [*self.job.id, *self.job.passthrough, *self.text.columns, *self.filter_columns]:
            if c not in cols:
                cols.append(c)
        return cols

    @property
    def filter_columns(self) -> list[str]:
        return compile_filter(self.job.filter)[1] if self.job.filter else []


class _Lines:
    """Where each key of the YAML document was written: path tuple -> line (1-based)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: dict[tuple, int] = {}
        self.sets: dict[tuple, str] = {}  # path -> the --set that wrote it

    def where(self, path: tuple, alt: tuple | None = None) -> str:
        for p in (path, alt):
            if p is None:
                continue
            for n in range(len(p), -1, -1):
                if p[:n] in self.sets:
                    return f"--set {self.sets[p[:n]]}"
                if p[:n] in self.lines:
                    return f"{self.source}:{self.lines[p[:n]]}"
        return self.source

    def job_where(self, name: str, rel: tuple) -> str:
        """Line of a job's field, falling back to `defaults` where the job inherited it."""
        path = ("jobs", name, *rel)
        for n in range(len(path), 2, -1):
            if path[:n] in self.lines or path[:n] in self.sets:
                return self.where(path[:n])
            if ("defaults", *path[2:n]) in self.lines:
                return self.where(("defaults", *path[2:n]))
        return self.where(path)


def _compose(text: str, source: str) -> tuple[Any, _Lines]:
    lines = _Lines(source)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        ctx = getattr(e, "context_mark", None)
        if ctx is not None and mark is not None and ctx.line != mark.line:
            problem += f" ({getattr(e, 'context', '') or 'started'} at line {ctx.line + 1})"
        raise SpecError(f"not valid YAML: {problem}", where=f"{source}{line}",
                        fix="check indentation and quoting (quote strings holding ': ', '{' or '#')") from None
    if node is None:
        raise SpecError("the file is empty", where=source, fix="add a `jobs:` mapping (see scorer/jobs/spec.py)")

    def walk(n: yaml.Node, path: tuple) -> None:
        lines.lines.setdefault(path, n.start_mark.line + 1)
        if isinstance(n, yaml.MappingNode):
            seen: set = set()
            for k, v in n.value:
                key = k.value
                if key in seen:
                    raise SpecError(f"key {key!r} appears twice", where=f"{source}:{k.start_mark.line + 1}",
                                    field=".".join(map(str, path + (key,))), fix="keep one of them")
                seen.add(key)
                lines.lines[path + (key,)] = k.start_mark.line + 1
                walk(v, path + (key,))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                walk(v, path + (i,))

    walk(node, ())
    data = yaml.SafeLoader(text).get_single_data()
    return data, lines


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(value: Any, path: tuple, lines: _Lines) -> Any:
    """`${VAR}` / `${VAR:-default}` from the environment in every string; `$$` is a literal `$`."""
    if isinstance(value, dict):
        return {k: _interpolate(v, path + (k,), lines) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, path + (i,), lines) for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise SpecError(f"environment variable {name} is not set", where=lines.where(path),
                        field=".".join(map(str, path)), fix=f"export {name}=... or write ${{{name}:-default}}")

    return _VAR.sub(sub, value)


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base.get(k), v) if k in base else v
        return out
    return over


def _parse_set_value(raw: str) -> Any:
    """YAML scalars and lists (64, true, null, [a, b]); anything else, e.g. "{title} {body}", stays a string."""
    try:
        v = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    return raw if isinstance(v, dict) or (v is None and raw.strip() not in ("null", "~", "")) else v


def _apply_sets(data: dict, sets: list[str], lines: _Lines) -> None:
    for item in sets:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise SpecError(f"--set {item!r} is not key=value", fix="write e.g. --set batching.max_rows=64")
        parts = tuple(key.split("."))
        value = _parse_set_value(raw)
        jobs = data.get("jobs") if isinstance(data.get("jobs"), dict) else {}
        if parts[0] == "jobs" and len(parts) > 2 and parts[1] not in jobs:  # a typo would invent a job
            near = difflib.get_close_matches(parts[1], list(jobs), n=1)
            raise SpecError(f"--set {key}: no job named {parts[1]!r} (jobs: {', '.join(jobs) or 'none'})",
                            fix=f"write jobs.{near[0] if near else '<job>'}.{'.'.join(parts[2:])}")
        if parts[0] in ("jobs", "defaults", "version"):
            targets = [parts]
        else:  # a job field: every job
            targets = [("jobs", name, *parts) for name in (data.get("jobs") or {})]
        for path in targets:
            node = data
            for p in path[:-1]:
                if not isinstance(node.get(p), dict):
                    node[p] = {}
                node = node[p]
            node[path[-1]] = value
            lines.sets[path] = item


_TYPE_FIX = {
    "int_type": "give a whole number", "int_parsing": "give a whole number", "int_from_float": "give a whole number",
    "float_type": "give a number", "float_parsing": "give a number", "bool_type": "write true or false",
    "bool_parsing": "write true or false", "string_type": "give a string (quote it)", "list_type": "give a list",
    "dict_type": "give a mapping (key: value lines)", "model_type": "give a mapping (key: value lines)",
    "model_attributes_type": "give a mapping (key: value lines)",
}


def _pydantic_error(err: dict, model: type[BaseModel], where: str, prefix: tuple) -> SpecError:
    loc = tuple(err["loc"])
    dotted = ".".join(map(str, prefix + loc))
    kind = err["type"]
    if kind == "extra_forbidden":
        known = _known_keys(model, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return SpecError(f"unknown key {loc[-1]!r}", where=where, field=dotted,
                         fix=f"{hint}remove it, or use one of: {', '.join(known)}")
    if kind == "missing":
        return SpecError("is required", where=where, field=dotted, fix=f"add `{loc[-1]}:`")
    if kind == "literal_error":
        return SpecError(f"{err.get('input')!r} is not allowed", where=where, field=dotted,
                         fix=f"use {err['ctx']['expected']}")
    fix = _TYPE_FIX.get(kind, "see the field list in scorer/jobs/spec.py")
    return SpecError(f"{err['msg']} (got {err.get('input')!r})", where=where, field=dotted, fix=fix)


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names of the (nested) model that `loc` points into."""
    for part in loc:
        ann = getattr(model.model_fields.get(str(part)), "annotation", None)
        inner = [a for a in (ann, *getattr(ann, "__args__", ())) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            break
        model = inner[0]
    return list(model.model_fields)


def _first(e: ValidationError) -> dict:
    """The error to report: an unknown key first (it is usually the typo behind a missing one)."""
    errs = e.errors()
    return next((x for x in errs if x["type"] == "extra_forbidden"), errs[0])


_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_DATE = re.compile(r"^[A-Za-z0-9_.:-]+$")


def load(jobs_file: str | Path, *, jobs: list[str] = (), sets: list[str] = (), date: str | None = None) -> list[LoadedJob]:
    """Read, interpolate and schema-check jobs.yaml; return the selected jobs (no I/O beyond the file)."""
    path = Path(jobs_file)
    source = str(jobs_file)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError(f"cannot read the file: {e.strerror}", where=source, fix="give the path of a jobs.yaml") from None
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise SpecError(f"not UTF-8 text (byte {e.object[e.start]:#04x})", where=f"{source}:{line}",
                        fix="save the file as UTF-8") from None
    data, lines = _compose(text, source)
    if not isinstance(data, dict):
        raise SpecError("the top level must be a mapping with a `jobs:` key", where=f"{source}:1",
                        fix="start the file with `jobs:`")
    _apply_sets(data, list(sets), lines)
    date = date or _dt.datetime.now(_dt.timezone.utc).date().isoformat()
    if not _DATE.match(date):
        raise SpecError(f"--date {date!r} has characters a path cannot hold", fix="use e.g. --date 2026-11-23")
    try:
        top = JobsFile.model_validate({k: v for k, v in data.items()})
    except ValidationError as e:
        err = _first(e)
        raise _pydantic_error(err, JobsFile, lines.where(tuple(err["loc"])), ()) from None
    defaults = _interpolate(top.defaults, ("defaults",), lines)
    names = list(top.jobs)
    unknown = [j for j in jobs if j not in names]
    if unknown:
        raise SpecError(f"no job named {unknown[0]!r}", where=source, field="--job", fix=f"use one of: {', '.join(names)}")
    out = []
    for name in names:
        where_name = lines.where(("jobs", name))
        if not _NAME.match(str(name)):
            raise SpecError(f"job name {name!r}", where=where_name, field=f"jobs.{name}",
                            fix="use letters, digits, '_', '.' and '-' only")
        raw = top.jobs[name]
        if not isinstance(raw, dict):
            raise SpecError("a job must be a mapping", where=where_name, field=f"jobs.{name}",
                            fix="give model:, input:, id:, output: under the job name")
        raw = _merge(defaults, _interpolate(raw, ("jobs", name), lines))
        try:
            job = Job.model_validate(raw)
        except ValidationError as e:
            err = _first(e)
            raise _pydantic_error(err, Job, lines.job_where(name, tuple(err["loc"])), ("jobs", name)) from None
        if jobs and name not in jobs:
            continue
        out.append(_resolve(name, job, path.parent.resolve(), date, lines))
    return out


def _resolve(name: str, job: Job, base: Path, date: str, lines: _Lines) -> LoadedJob:
    def w(*rel: str) -> str:
        return lines.job_where(name, rel)

    def fmt(value: str) -> str:
        return value.replace("{date}", date)

    storage = job.storage.options()
    try:
        text = parse_text(job.text)
    except FilterError as e:
        raise SpecError(str(e), where=w("text"), field=f"jobs.{name}.text", fix="write a column name or e.g. \"{title}\\n\\n{body}\"") from None
    if job.filter is not None:
        try:
            compile_filter(job.filter)
        except FilterError as e:
            raise SpecError(str(e), where=w("filter"), field=f"jobs.{name}.filter",
                            fix='write e.g. lang == "en" and len(body) > 0') from None
    for col in job.id + job.passthrough:
        if col in SCORE_COLUMNS:
            fld = "id" if col in job.id else "passthrough"
            raise SpecError(f"column {col!r} would clash with a score column of the output", where=w(fld),
                            field=f"jobs.{name}.{fld}", fix=f"leave {col!r} out (score columns: {', '.join(SCORE_COLUMNS)})")
    if not job.id:
        raise SpecError("needs at least one id column", where=w("id"), field=f"jobs.{name}.id", fix="name the column that identifies a row")
    partition = fmt(job.output.partition)
    if ".." in partition.split("/") or partition.startswith("/"):
        raise SpecError(f"partition {partition!r} must stay below the output URI", where=w("output", "partition"),
                        field=f"jobs.{name}.output.partition", fix='use e.g. "dt={date}"')
    if "{" in partition or "}" in partition:
        raise SpecError(f"partition {job.output.partition!r} has a placeholder other than {{date}}",
                        where=w("output", "partition"), field=f"jobs.{name}.output.partition", fix='use e.g. "dt={date}"')
    hidden = [seg for seg in partition.split("/") if seg[:1] in ("_", ".")]
    if hidden:  # dataset readers skip such folders, and every output file in them
        raise SpecError(f"partition {partition!r} has a folder {hidden[0]!r} that Parquet dataset readers skip",
                        where=w("output", "partition"), field=f"jobs.{name}.output.partition",
                        fix="start each folder of the partition with a letter or digit")
    keys = {seg.split("=", 1)[0] for seg in partition.split("/") if "=" in seg}
    for col in job.id + job.passthrough:
        if col in keys:
            fld = "id" if col in job.id else "passthrough"
            raise SpecError(f"column {col!r} is also a key of the output partition {partition!r}; hive readers would "
                            "replace its values", where=w(fld), field=f"jobs.{name}.{fld}",
                            fix=f"leave {col!r} out, or name the partition differently (e.g. run_{col}=...)")
    if "{date}" in job.input and "{date}" not in job.output.uri + job.output.partition:
        raise SpecError("the input changes with {date} and the output does not: each day's outputs would land "
                        "beside the last day's, and a file named like one of them (part-0.parquet every day) "
                        "would replace it", where=w("output"), field=f"jobs.{name}.output",
                        fix='put {date} in the partition, e.g. "dt={date}" (the default)')
    out_root = lake.resolve(fmt(job.output.uri), storage, base=base)
    return LoadedJob(
        name=name, job=job, base=base, text=text,
        model=lake.resolve(job.model, storage, base=base),
        input=lake.resolve(fmt(job.input), storage, base=base),
        partition=out_root.child(partition),
        where={f: w(*f.split(".")) for f in ("model", "input", "text", "id", "passthrough", "filter", "output", "task",
                                              "runtime.device", "labels.dimensions", "batching.max_length")},
    )


# ----------------------------------------------------------------------------------------------- checks


def check(loaded: list[LoadedJob]) -> None:
    """The checks that touch the model directory and the lake; each job's shards and schema are kept."""
    for j in loaded:
        check_model(j)
        check_input(j)
    check_outputs(loaded)


def check_model(j: LoadedJob) -> None:
    """config.json + tokenizer load (weights are never read here); the task fits the model."""
    from scorer.model.config import ConfigError, LlamaConfig

    where, fld = j.where["model"], f"jobs.{j.name}.model"
    try:
        local = lake.fetch_model_dir(j.model, weights=False)
    except FileNotFoundError as e:
        raise SpecError(f"cannot read {j.model.uri}: {e}", where=where, field=fld, fix="point at a model directory") from None
    except OSError as e:  # credentials, endpoint, network: not the path's fault
        raise SpecError(f"cannot read {j.model.uri}: {e}", where=where, field=fld,
                        fix="check the path, the storage endpoint and the credentials in the environment") from None
    if not (local / "config.json").is_file():
        raise SpecError(f"{j.model.uri} has no config.json", where=where, field=fld,
                        fix="point at a Hugging Face model directory (config.json, tokenizer.json, *.safetensors)")
    try:
        cfg = LlamaConfig.from_hf_dir(local)
    except (ConfigError, ValueError, OSError) as e:
        raise SpecError(f"{j.model.uri} does not load: {e}", where=where, field=fld,
                        fix="use a Llama-family model directory (scorer inspect DIR shows what is wrong)") from None
    tok = local / "tokenizer.json"
    if not tok.is_file():
        raise SpecError(f"{j.model.uri} has no tokenizer.json", where=where, field=fld,
                        fix="save the fast tokenizer into the directory (tokenizer.save_pretrained(dir))")
    try:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tok))
    except Exception as e:  # noqa: BLE001 - any parse failure is the same user error
        raise SpecError(f"{tok} does not load: {e}", where=where, field=fld, fix="re-save the tokenizer") from None
    max_length = j.job.batching.max_length
    special = tokenizer.num_special_tokens_to_add(is_pair=False)
    if max_length is not None and max_length <= special:  # every worker's Scorer would refuse it
        raise SpecError(f"max_length {max_length} leaves no room beside the {special} special token(s) of {tok}",
                        where=j.where["batching.max_length"], field=f"jobs.{j.name}.batching.max_length",
                        fix=f"use max_length > {special}")
    if not {"model.safetensors", "model.safetensors.index.json"} & set(lake.model_files(j.model)):
        raise SpecError(f"{j.model.uri} has no model.safetensors (or model.safetensors.index.json)", where=where, field=fld,
                        fix="save the weights as safetensors (save_pretrained(dir, safe_serialization=True))")
    dims = j.job.labels.dimensions
    if dims is not None and dims > cfg.hidden_size:
        raise SpecError(f"dimensions {dims} is more than the model's hidden size {cfg.hidden_size}",
                        where=j.where["labels.dimensions"], field=f"jobs.{j.name}.labels.dimensions", fix=f"use 1..{cfg.hidden_size}")
    if j.job.task in ("classify", "both") and not cfg.is_classifier:
        raise SpecError(f"task {j.job.task!r} needs a classification head, {j.model.uri} has none",
                        where=j.where["task"], field=f"jobs.{j.name}.task", fix="use task: embed, or a *ForSequenceClassification model")


def check_input(j: LoadedJob) -> None:
    """At least one shard; the first shard's schema holds every column the job reads, with usable types."""
    where, fld = j.where["input"], f"jobs.{j.name}.input"
    try:
        shards = lake.list_shards(j.input)
    except OSError as e:
        raise SpecError(f"cannot list {j.input.uri}: {e}", where=where, field=fld,
                        fix="check the path, the storage endpoint and the credentials in the environment") from None
    if not shards:
        raise SpecError(f"no Parquet files at {j.input.uri}", where=where, field=fld,
                        fix="give a Parquet file, a folder of *.parquet files or a glob such as data/**/*.parquet")
    schema, first_error, source = None, None, None
    for shard in shards:  # the first readable footer; an unreadable shard fails alone at run time
        try:
            schema, source = lake.read_schema(shard, j.input), shard.uri
            break
        except Exception as e:  # noqa: BLE001 - a footer that does not parse is this one error
            first_error = first_error or f"{shard.uri}: {e}"
    if schema is None:
        raise SpecError(f"no input file has a readable Parquet footer ({first_error})", where=where, field=fld,
                        fix="check that the input files are Parquet")
    j.shards, j.input_schema, j.input_schema_from = shards, schema, source
    have = ", ".join(schema.names)
    for role in ("id", "passthrough"):
        for col in getattr(j.job, role):
            if col not in schema.names:
                raise SpecError(f"column {col!r} is not in the input ({have})", where=j.where[role],
                                field=f"jobs.{j.name}.{role}", fix=f"use a column of {j.input.uri}")
    for col in j.text.columns:
        if col not in schema.names:
            raise SpecError(f"text column {col!r} is not in the input ({have})", where=j.where["text"],
                            field=f"jobs.{j.name}.text", fix="name a string column, or a template such as \"{title}\\n\\n{body}\"")
    if j.text.is_column:
        t = schema.field(j.text.source).type
        # null: an all-null column written untyped (pyarrow, pandas), whose rows score as null texts
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t) or pa.types.is_null(t)):
            raise SpecError(f"text column {j.text.source!r} is {t}, not a string", where=j.where["text"],
                            field=f"jobs.{j.name}.text",
                            fix=f"name a string column, or write text: \"{{{j.text.source}}}\" to format it as text")
    else:  # a template casts each of its columns to text (TextSpec.build): one that cannot be cast fails here
        for col in j.text.columns:
            t = schema.field(col).type
            try:
                pc.cast(pa.array([], type=t), pa.string())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
                raise SpecError(f"text template column {col!r} is {t}, which does not convert to text "
                                f"({str(e).splitlines()[0]})", where=j.where["text"], field=f"jobs.{j.name}.text",
                                fix="use columns of scalar types (strings, numbers, dates) in the template") from None
    if j.job.filter:
        expr, cols = compile_filter(j.job.filter)
        for col in cols:
            if col not in schema.names:
                raise SpecError(f"filter column {col!r} is not in the input ({have})", where=j.where["filter"],
                                field=f"jobs.{j.name}.filter", fix="filter on columns of the input")
        try:
            schema.empty_table().filter(expr)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, TypeError) as e:
            raise SpecError(f"filter {j.job.filter!r} does not apply to the input's types: {str(e).splitlines()[0]}",
                            where=j.where["filter"], field=f"jobs.{j.name}.filter",
                            fix="compare columns with constants of their type (quote strings)") from None


def check_outputs(loaded: list[LoadedJob]) -> None:
    for j in loaded:
        if lake.overlaps(j.partition, j.input) or lake.overlaps(lake.resolve(j.job.output.uri, j.storage, base=j.base), j.input):
            raise SpecError(f"output {j.partition.uri} overlaps input {j.input.uri}", where=j.where["output"],
                            field=f"jobs.{j.name}.output", fix="write the output to a folder outside the input")
        try:  # the plan lists it: credentials and endpoints are checked before anything runs
            lake.list_files(j.partition)
        except OSError as e:
            raise _unlistable_output(j, e) from None
    for a_i, a in enumerate(loaded):
        for b in loaded[a_i + 1:]:
            _refuse_shared_output(a, b, b)


def read_output(j: LoadedJob) -> tuple[dict[str, dict], dict[str, int]]:
    """(manifest, files) of the job's output partition; SpecError at jobs.<job>.output when it cannot be
    listed (wrong credentials, an endpoint that refuses, a bucket the account cannot read)."""
    try:
        return lake.read_manifest(j.partition), lake.list_files(j.partition)
    except OSError as e:
        raise _unlistable_output(j, e) from None


def _unlistable_output(j: LoadedJob, e: OSError) -> SpecError:
    return SpecError(f"cannot list {j.partition.uri}: {lake.error_line(e)}", where=j.where["output"], field=f"jobs.{j.name}.output",
                     fix="check the output path, the storage endpoint and the credentials in the environment")


def _refuse_shared_output(a: LoadedJob, b: LoadedJob, at: LoadedJob) -> None:
    """SpecError at `at`'s output when jobs a and b write the same partition."""
    if lake.overlaps(a.partition, b.partition):
        raise SpecError(f"jobs {a.name!r} and {b.name!r} both write {a.partition.uri}", where=at.where["output"],
                        field=f"jobs.{at.name}.output", fix="give each job its own output folder or partition")


def load_and_check(jobs_file: str | Path, *, jobs: list[str] = (), sets: list[str] = (), date: str | None = None) -> list[LoadedJob]:
    loaded = load(jobs_file, jobs=jobs, sets=sets, date=date)
    check(loaded)
    if jobs:  # a job picked by name still may not share its output with one left out
        try:
            names = list((yaml.safe_load(Path(jobs_file).read_text()) or {}).get("jobs") or {})
        except (OSError, yaml.YAMLError, AttributeError):
            names = []
        others = []
        for name in names:
            if name in jobs:
                continue
            try:
                others += load(jobs_file, jobs=[name], sets=sets, date=date)
            except SpecError:
                pass  # a job left out that does not load writes nothing; the others are still checked
        for a in loaded:
            for b in others:
                _refuse_shared_output(a, b, a)
    return loaded


def validate_cli(jobs_file: Path, jobs: list[str] = (), sets: list[str] = (), date: str | None = None) -> int:
    """`scorer validate`: 0 and a one-line summary per job, or 2 and the problem on stderr."""
    try:
        loaded = load_and_check(jobs_file, jobs=jobs, sets=sets, date=date)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for j in loaded:
        print(f"ok: {j.name}: {j.job.task} with {j.model.uri}; {len(j.shards or [])} shard(s) at {j.input.uri}"
              f" -> {j.partition.uri}")
    return 0
