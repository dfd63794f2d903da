"""The plan of a job: which shards to score and which are already done, and what the rest will cost.

A shard is done when the manifest of the output partition holds an entry for its output name with the
same fingerprint, and the output file is there with the size the entry recorded. The fingerprint is
sha256 over the input (URI, size, mtime: what the store tells about its content without reading it), the
model's identity (config, tokenizer and side files by content; weight files by name, size and content:
their sha256 on a local disk, read once per version of a file and cached under $SCORER_CACHE; on an
object store their LastModified, so an upload counts as a new model) and every
job setting that changes scores or the output file (`Job.score_settings`), the dtype as the workers
resolve it (an unset `runtime.dtype` is bfloat16 on GPU workers, float32 on CPU ones). Batching limits and
worker counts are left out: they change speed, not scores.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scorer.jobs import lake
from scorer.jobs.spec import LoadedJob, SpecError, read_output

__all__ = ["ShardPlan", "JobPlan", "plan_job", "cluster_gpus", "model_key", "estimate"]

SMALL_MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "quantize_config.json",
                     "model.safetensors.index.json", "special_tokens_map.json")


@dataclass
class ShardPlan:
    shard: lake.Shard
    name: str
    fingerprint: str
    done: bool
    entry: dict[str, Any] | None = None  # the manifest entry when done
    rows: int | None = None  # from the footer (dry run) or the manifest
    unreadable: str | None = None  # dry run: why the footer did not read (a run fails this shard alone)


@dataclass
class JobPlan:
    job: LoadedJob
    model_key: str
    shards: list[ShardPlan]
    stale_entries: list[str] = field(default_factory=list)  # manifest entries of shards no longer in the input
    gpu: bool = False  # planned for GPU workers: decides the fingerprints where runtime.dtype is unset
    force: bool = False  # planned with --force (a plan made again keeps it)

    @property
    def todo(self) -> list[ShardPlan]:
        return [s for s in self.shards if not s.done]

    @property
    def skipped(self) -> list[ShardPlan]:
        return [s for s in self.shards if s.done]


def model_key(loc: lake.Location) -> str:
    """The model's identity: small files by content, weights by name, size and `weights_digest` (a model
    retrained in place keeps its shapes, so its files keep their sizes; a copy or a fresh download of the
    same bytes keeps its key)."""
    files = lake.model_files(loc)
    weights = sorted(n for n in files if n.endswith(lake.WEIGHT_SUFFIXES) and n not in SMALL_MODEL_FILES)
    cache = _digest_cache()
    known = _read_digests(cache)
    before = dict(known)
    with ThreadPoolExecutor(max(1, min(8, len(weights)))) as pool:  # hashlib releases the GIL: files in parallel
        digests = dict(zip(weights, pool.map(lambda n: weights_digest(loc, n, *files[n], known), weights)))
    if cache is not None and known != before:
        _write_digests(cache, known)
    h = hashlib.sha256()
    for name in sorted(files):
        size, _ = files[name]
        if name in SMALL_MODEL_FILES:
            h.update(f"{name}\0".encode() + lake.get_bytes(loc.child(name)) + b"\0")
        elif name in digests:
            h.update(f"{name}:{size}:{digests[name]}\0".encode())
    return h.hexdigest()


_SHA256 = re.compile(r"[0-9a-f]{64}")
_DIGESTS_KEPT = 512  # entries of the digest cache (a model version has a few weight files)


def weights_digest(loc: lake.Location, name: str, size: int, mtime_ns: int | None, known: dict[str, str]) -> str:
    """What stands for a weight file's bytes. Local: their sha256, looked up in `known` by (real path,
    size, mtime) and added there when read, so a file is read once per version (~10 s for 16 GB); a
    Hugging Face cache snapshot's file links to blobs/<its sha256>, read from the name. Object store:
    "mtime:<LastModified>", without reading the weights through the driver."""
    if not loc.is_local:
        return f"mtime:{mtime_ns}"
    path = os.path.realpath(loc.child(name).path)
    blob = os.path.basename(path)
    if os.path.basename(os.path.dirname(path)) == "blobs" and _SHA256.fullmatch(blob):
        return blob
    key = f"{path}\0{size}\0{mtime_ns}"
    if key not in known:
        with open(path, "rb") as f:
            known[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return known[key]


def _digest_cache() -> Path | None:
    try:
        return Path(os.environ.get("SCORER_CACHE") or Path.home() / ".cache" / "scorer") / "weight_digests.json"
    except RuntimeError:  # no home directory: digests are computed every time
        return None


def _read_digests(cache: Path | None) -> dict[str, str]:
    try:
        known = json.loads(cache.read_text()) if cache is not None else {}
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _write_digests(cache: Path, known: dict[str, str]) -> None:
    """Best effort: a cache that cannot be written costs a re-read next time, nothing else."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(dict(list(known.items())[-_DIGESTS_KEPT:])))
        os.replace(tmp, cache)
    except OSError:
        pass


def shard_fingerprint(shard: lake.Shard, mkey: str, settings: dict[str, Any]) -> str:
    ident = {"input": shard.uri, "size": shard.size, "mtime_ns": shard.mtime_ns, "model": mkey, "settings": settings}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cluster_gpus() -> int:
    """GPUs the workers will score on: those of the Ray cluster this process is connected to, else this
    machine's (the local cluster `scorer run` starts sees the same ones). On a cluster of this machine
    alone, only as many as torch here can use: Ray can be told of GPUs that are not there (the CPU tests
    do), and workers given one of those score on the CPU."""
    try:
        import ray

        if ray.is_initialized():
            gpus = int(ray.cluster_resources().get("GPU", 0))
            here = ray.get_runtime_context().get_node_id()
            if gpus and all(n.get("NodeID") == here for n in ray.nodes() if n.get("Alive")):
                gpus = min(gpus, _local_gpus())
            return gpus
    except ImportError:
        pass
    return _local_gpus()


def _local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable CUDA: CPU workers
        return 0


def _refuse_name_clash(j: LoadedJob, s: lake.Shard, name: str, entry: dict[str, Any] | None) -> None:
    """SpecError when the partition's output `name` is another job's output of another file: jobs of two
    jobs files writing one partition, with inputs of the same relative path (output names hash that path
    only). Writing it would replace the other job's rows. The same job under a new input root, or a job
    renamed over the same inputs, is not a clash."""
    if entry is None or entry.get("job") in (None, j.name) or entry.get("input") in (None, s.uri):
        return
    raise SpecError(f"{name} in {j.partition.uri} is job {entry['job']!r}'s output of {entry['input']}; this job's "
                    f"output of {s.uri} has the same name and would replace it", where=j.where["output"],
                    field=f"jobs.{j.name}.output", fix="give each job its own output folder or partition")


def plan_job(j: LoadedJob, *, force: bool = False, gpu: bool | None = None) -> JobPlan:
    """The job's shards, done or to do, for a run on GPU workers (gpu) or CPU ones; None: the workers
    `runtime.device` picks on `cluster_gpus()` (asked only where it decides the fingerprint: device auto
    and no dtype)."""
    shards = j.shards if j.shards is not None else lake.list_shards(j.input)
    mkey = model_key(j.model)
    rt = j.job.runtime
    if gpu is None:
        gpu = rt.on_gpu(cluster_gpus() if rt.device == "auto" and rt.dtype is None else 0)
    settings = j.job.score_settings(gpu)
    manifest, present = read_output(j)
    plans = []
    for s in shards:
        name = s.output_name
        fp = shard_fingerprint(s, mkey, settings)
        entry = manifest.get(name)
        _refuse_name_clash(j, s, name, entry)
        done = (not force and entry is not None and entry.get("fingerprint") == fp
                and present.get(name) == entry.get("bytes"))
        plans.append(ShardPlan(s, name, fp, done, entry if done else None, entry.get("rows") if done and entry else None))
    names = {p.name for p in plans}
    return JobPlan(j, mkey, plans, sorted(n for n in manifest if n not in names), gpu, force)


# ----------------------------------------------------------------------------------------------- estimates

ASSUMED_FLOPS = 200e12  # dense bf16 prefill on one H100-class GPU at ~50% of its 400 TFLOP/s peak


def estimate(plan: JobPlan, sample_rows: int = 256) -> dict[str, Any]:
    """Rows (from footers), tokens (mean of a tokenized sample x rows) and GPU time of the shards to do."""
    from tokenizers import Tokenizer

    from scorer.model.config import LlamaConfig

    j = plan.job
    todo = plan.todo
    def footer_rows(p: ShardPlan) -> int:
        try:
            return lake.read_metadata(p.shard, j.input).num_rows
        except Exception as e:  # noqa: BLE001 - any unreadable footer: shown in the plan, as a run would fail it
            p.unreadable = lake.error_line(e)[:200]
            return 0

    with ThreadPoolExecutor(8) as pool:
        rows = list(pool.map(footer_rows, todo))
    for p, r in zip(todo, rows):
        p.rows = None if p.unreadable else r
    total_rows = sum(rows)
    local = lake.fetch_model_dir(j.model, weights=False)
    cfg = LlamaConfig.from_hf_dir(local)
    tok = Tokenizer.from_file(str(local / "tokenizer.json"))
    max_len = j.job.batching.max_length or min(cfg.max_position_embeddings, 8192)
    tok.enable_truncation(max_length=max_len, direction=j.job.batching.truncation_side)
    mean_tokens = None
    if todo and total_rows:
        sample = next((t for p in todo if not p.unreadable for t in _first_texts(p, j, sample_rows)), None)
        if sample:
            enc = tok.encode_batch([t for t in sample if t and t.strip()] or [""])
            mean_tokens = sum(len(e.ids) for e in enc) / max(1, len(enc))
    tokens = int(mean_tokens * total_rows) if mean_tokens else None
    h, L, i = cfg.hidden_size, cfg.num_layers, cfg.intermediate_size
    params = L * (h * cfg.num_heads * cfg.head_dim * 2 + 2 * h * cfg.num_kv_heads * cfg.head_dim + 3 * h * i)
    measured = [e for e in (p.entry for p in plan.skipped) if e and e.get("score_seconds")]
    rate = None
    if measured:
        rate = sum(e["tokens"] for e in measured) / max(1e-9, sum(e["score_seconds"] for e in measured))
    gpu_s = None
    if tokens is not None:
        gpu_s = tokens / rate if rate else 2 * params * tokens / ASSUMED_FLOPS
    return {"rows": total_rows, "mean_tokens": mean_tokens, "tokens": tokens, "params": params,
            "gpu_seconds": gpu_s, "basis": "measured on committed shards" if rate else "2 x params x tokens at 200 TFLOP/s"}


def _first_texts(p: ShardPlan, j: LoadedJob, n: int):
    for table in lake.iter_batches(p.shard, j.input, list(j.text.columns), n):
        yield j.text.build(table).to_pylist()
        return
