"""The driver of `scorer run`: validate, plan, dispatch shards to Ray actors, retry, report.

Ray Core, not Ray Data: one input shard = one actor call = one committed output file. Per job:

1. validate jobs.yaml and the lake (scorer.jobs.spec) -> exit 2 on any problem, before Ray starts;
2. plan (scorer.jobs.plan): shards whose manifest entry has the same fingerprint are skipped;
3. clean staging files of killed runs, remove a stale `_SUCCESS` and `_report.json`;
4. start one actor per GPU (`num_gpus=1, num_cpus=0`: ray#44687) or CPU workers, keep
   `runtime.shards_in_flight` calls queued per actor and collect them with `ray.wait`;
5. an actor that dies (RayActorError: its process was killed, or its node lost) is replaced by a new one
   and its shards go back to the queue; a shard that raises is retried up to `runtime.max_attempts`
   times, except bad input (not Parquet, a missing column), which fails at once. A RayActorError can
   come for a call that did finish: the redo writes the same file under the same name, so it is harmless;
6. when every shard of the job is in the manifest: outputs this job wrote for input files that are gone
   from its input (deleted, renamed, compacted upstream) are removed with their manifest entries, so the
   partition holds each input row once; then `_report.json`, then `_SUCCESS`. Otherwise `_report.json`
   alone, `"complete": false`, with the failed shards.

Exit codes: 0 all shards done, 3 some shards failed (named in the summary and the report), 2 invalid job,
1 no cluster.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from scorer import __version__
from scorer.jobs import lake
from scorer.jobs.display import JobStats, Progress, print_plan, print_summary
from scorer.jobs.plan import JobPlan, cluster_gpus, estimate, plan_job
from scorer.jobs.spec import LoadedJob, SpecError, load_and_check
from scorer.jobs.worker import ShardInputError, ShardResult, ShardTask, ShardWorker, WorkerConfig

__all__ = ["run_cli", "run_jobs"]

SUCCESS, REPORT = "_SUCCESS", "_report.json"


def run_cli(jobs_file: Path, *, jobs: list[str] = (), sets: list[str] = (), date: str | None = None,
            dry_run: bool = False, force: bool = False, address: str | None = None,
            progress_interval: float = 5.0) -> int:
    try:
        loaded = load_and_check(jobs_file, jobs=jobs, sets=sets, date=date)
        plans = [plan_job(j, force=force) for j in loaded]
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if dry_run:
        print_plan(plans, {p.job.name: estimate(p) for p in plans})
        return 0
    # An unset dtype on device auto is resolved by the cluster's GPUs: a cluster other than the local one
    # (`address`, or RAY_ADDRESS) is asked even when every shard looks done, and the plans follow it.
    resolves = any(p.job.job.runtime.device == "auto" and p.job.job.runtime.dtype is None for p in plans)
    remote = bool(address or os.environ.get("RAY_ADDRESS"))
    try:
        owns = _connect(address, plans) if any(p.todo for p in plans) or (remote and resolves) else False
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:  # noqa: BLE001 - any failure to reach Ray is the same user-facing problem
        print(f"error: cannot start or join a Ray cluster ({address or 'local'}): {e}", file=sys.stderr, flush=True)
        return 1
    try:
        try:
            plans = _replan_for_cluster(plans) if resolves else plans
        except SpecError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
        stats = run_jobs(plans, progress=Progress(progress_interval))
    finally:
        if owns:
            import ray

            ray.shutdown()
    print_summary(stats)
    return 3 if any(s.failed for s in stats) else 0


def _connect(address: str | None, plans: list[JobPlan]) -> bool:
    """ray.init() a local cluster (or join `address`); False when this process already had one."""
    import ray

    if ray.is_initialized():
        return False
    if address is None:  # a private local cluster: Ray 2.60's token-auth notice has nothing to protect
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address=address, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    gpus = ray.cluster_resources().get("GPU", 0)
    for p in plans:
        if p.job.job.runtime.device == "cuda" and gpus < 1:
            ray.shutdown()
            raise SpecError("runtime.device is cuda, but the Ray cluster has no GPU", where=p.job.where["runtime.device"],
                            field=f"jobs.{p.job.name}.runtime.device", fix="use device: auto or cpu, or join a GPU cluster with --address")
    return True


def _replan_for_cluster(plans: list[JobPlan]) -> list[JobPlan]:
    """Plans made for the workers the connected cluster will start, where the guess before it differed."""
    import ray

    if not ray.is_initialized():
        return plans
    gpus = cluster_gpus()
    out = []
    for p in plans:
        rt = p.job.job.runtime
        if rt.dtype is None and rt.on_gpu(gpus) != p.gpu:
            p = plan_job(p.job, force=p.force, gpu=rt.on_gpu(gpus))
        out.append(p)
    return out


def follow_workers_dtype(plan: JobPlan, infos: list[dict[str, Any]]) -> tuple[JobPlan, str | None]:
    """With runtime.dtype unset each worker resolves it where it runs (bfloat16 on a GPU, float32 on a CPU),
    and a worker Ray gave a GPU its torch cannot see scores on the CPU: the plan (its fingerprints) follows
    what the workers report. (plan, None), or (plan, why) when they disagree among themselves."""
    rt = plan.job.job.runtime
    got = {w["dtype"] for w in infos if w.get("dtype")}
    if rt.dtype is not None or not got or got == {rt.compute_dtype(plan.gpu)}:
        return plan, None
    if len(got) > 1:
        return plan, (f"its workers score in different dtypes ({', '.join(sorted(got))}): some see no GPU; set "
                      "runtime.dtype, or fix the nodes whose torch sees no GPU")
    (dtype,) = got
    return plan_job(plan.job, force=plan.force, gpu=dtype == rt.compute_dtype(True)), None


def run_jobs(plans: list[JobPlan], progress: Progress | None = None) -> list[JobStats]:
    """Run the planned jobs one after the other on the connected Ray cluster."""
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    progress = progress or Progress()
    return [_run_job(p, run_id, progress) for p in plans]


@dataclass
class _Slot:
    actor: Any
    gen: int = 0
    inflight: set = field(default_factory=set)


def _worker_options(j: LoadedJob) -> tuple[dict[str, Any], str, int]:
    """Ray options of one actor, the device its Scorer uses, and how many actors."""
    import ray

    rt = j.job.runtime
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if rt.on_gpu(gpus):
        n = min(rt.workers or gpus, gpus)
        if rt.workers and rt.workers > gpus:
            Progress.log(f"{j.name}: runtime.workers is {rt.workers} but the cluster has {gpus} GPU(s); starting {n}")
        return {"num_gpus": 1, "num_cpus": 0}, rt.device, n
    return {"num_gpus": 0, "num_cpus": rt.cpus_per_worker}, "cpu", rt.workers or _cpu_workers(j)


def _cpu_workers(j: LoadedJob) -> int:
    """Default CPU workers: one per `cpus_per_worker` CPUs of the cluster (Ray gives each actor that many
    BLAS threads, so one worker would leave the other cores idle), as many as half the cluster's memory
    holds at ~2.5x the weight files each (fp16 files run as fp32 on a CPU), at least one."""
    import ray

    res = ray.cluster_resources()
    n = max(1, int(res.get("CPU", 1) // j.job.runtime.cpus_per_worker))
    if j.model.is_local:
        from scorer.model.load import weight_files

        try:
            need = 2.5 * sum(f.stat().st_size for f in weight_files(j.model.path))
        except (OSError, ValueError):
            need = 0.0
        if need and res.get("memory"):
            n = min(n, max(1, int(0.5 * res["memory"] // need)))
    return n


def _run_job(plan: JobPlan, run_id: str, progress: Progress) -> JobStats:
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    j = plan.job
    stats = JobStats(j.name, total=len(plan.shards), skipped=len(plan.skipped))
    todo = plan.todo
    lake.clean_stale(j.partition)
    if todo:  # the partition is about to change: neither marker may speak for it until _finish
        lake.remove(j.partition.child(SUCCESS))
        lake.remove(j.partition.child(REPORT))
    progress.start(stats)
    if todo:
        opts, device, n_workers = _worker_options(j)
        cfg = _worker_config(j, run_id, device)
        remote = ray.remote(ShardWorker).options(max_concurrency=2, max_restarts=0, **opts)
        slots = [_Slot(remote.remote(cfg)) for _ in range(min(n_workers, len(todo)))]
        try:  # an actor runs no shard before its model is loaded and warm: waiting here costs nothing
            stats.workers.extend(ray.get([s.actor.info.remote() for s in slots]))
        except (RayActorError, RayTaskError):
            pass  # the dispatch loop below meets the dead actor, replaces it and retries its shards
        _warn_gpu_workers_on_cpu(j, opts, stats.workers)
        planned = j.job.runtime.compute_dtype(plan.gpu)
        plan, why = follow_workers_dtype(plan, stats.workers)
        scored = j.job.runtime.compute_dtype(plan.gpu)
        if why is not None:
            for s in todo:
                stats.failed[s.shard.uri] = why
            todo = []
        elif scored != planned:
            todo, stats.skipped = plan.todo, len(plan.skipped)
            Progress.log(f"{j.name}: planned for {planned}, but the workers score in {scored} (runtime.dtype "
                         f"unset): {len(todo)} shard(s) to score, {stats.skipped} already committed in it")
        late_infos = []  # info() of replacement actors, collected at the end for the report
        stats.ready = time.monotonic()
        pending = deque(ShardTask(s.shard, s.name, s.fingerprint) for s in todo)
        inflight: dict[Any, tuple[int, int, ShardTask]] = {}
        restarts, max_restarts = 0, j.job.runtime.max_attempts * len(slots)
        per_actor = j.job.runtime.shards_in_flight

        def retry(task: ShardTask, reason: str) -> None:
            if task.attempt < j.job.runtime.max_attempts:
                stats.retries += 1
                Progress.log(f"{j.name}: retrying {task.shard.uri} (attempt {task.attempt + 1}): {reason}")
                pending.append(replace(task, attempt=task.attempt + 1))
            else:
                stats.failed[task.shard.uri] = reason

        while pending or inflight:
            for i, slot in enumerate(slots):
                while pending and len(slot.inflight) < per_actor:
                    task = pending.popleft()
                    ref = slot.actor.score_shard.remote(task)
                    inflight[ref] = (i, slot.gen, task)
                    slot.inflight.add(ref)
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
            for ref in ready:
                i, gen, task = inflight.pop(ref)
                slots[i].inflight.discard(ref)
                try:
                    stats.add(ray.get(ref))
                except RayActorError as e:
                    reason = _reason(e)
                    if slots[i].gen == gen:  # the first news of this actor's death: replace it
                        restarts += 1
                        if restarts > max_restarts:
                            for t in [task, *pending]:
                                stats.failed[t.shard.uri] = f"workers keep dying; last: {reason}"
                            pending.clear()
                            continue
                        ray.kill(slots[i].actor, no_restart=True)
                        slots[i] = _Slot(remote.remote(cfg), gen + 1)
                        late_infos.append(slots[i].actor.info.remote())
                        Progress.log(f"{j.name}: worker {i} died ({reason}); started a new one")
                    done = _committed(j, task)
                    if done is not None:  # the call had finished before its actor died
                        stats.add(done)
                    else:
                        retry(task, reason)
                except RayTaskError as e:
                    if isinstance(getattr(e, "cause", None), ShardInputError) or isinstance(e, ShardInputError):
                        stats.failed[task.shard.uri] = _reason(e)
                    else:
                        retry(task, _reason(e))
            progress.update(stats)
        for ref in late_infos:
            try:
                stats.workers.append(ray.get(ref, timeout=10))
            except Exception:  # noqa: BLE001 - a replacement that died too has no info to report
                pass
        for slot in slots:
            ray.kill(slot.actor, no_restart=True)
    stats.finished = time.monotonic()
    progress.update(stats, force=True)
    progress.stop()
    lake.clean_stale(j.partition)
    _finish(plan, stats, run_id)
    return stats


def _warn_gpu_workers_on_cpu(j: LoadedJob, opts: dict[str, Any], infos: list[dict[str, Any]]) -> None:
    """Ray gave these actors a GPU, but their torch sees none (device auto then scores on the CPU): say so,
    since the run is slow and, with runtime.dtype unset, fingerprinted as the bfloat16 it is not."""
    cpu = [w for w in infos if w.get("device") == "cpu"] if opts.get("num_gpus") else []
    if cpu:
        gpus = ", ".join(sorted({w.get("gpus") or "?" for w in cpu}))
        Progress.log(f"{j.name}: {len(cpu)} worker(s) were given a GPU by Ray (CUDA_VISIBLE_DEVICES {gpus}) but "
                     "torch there sees no CUDA device, so they score on the CPU; check that node's NVIDIA driver "
                     "and torch build, or set runtime.device: cpu")


def _worker_config(j: LoadedJob, run_id: str, device: str) -> WorkerConfig:
    job = j.job
    keep = tuple(dict.fromkeys([*job.id, *job.passthrough]))
    schema = j.input_schema
    types = {c: schema.field(c).type for c in keep if c in schema.names} if schema is not None else {}
    return WorkerConfig(
        job_name=j.name, run_id=run_id, model=j.model, task=job.task, device=device, dtype=job.runtime.dtype,
        batching=job.batching.model_dump(), labels=job.labels.model_dump(), text=j.text,
        keep=keep, filter=job.filter, input=j.input, partition=j.partition, compression=job.output.compression,
        keep_types=types, keep_types_from=j.input_schema_from, cuda_graphs=job.runtime.cuda_graphs,
    )


def _committed(j: LoadedJob, task: ShardTask) -> ShardResult | None:
    """The shard's result from its manifest entry, if the shard was committed with this fingerprint."""
    try:
        entry = json.loads(lake.get_bytes(j.partition.child(lake.MANIFEST_DIR, task.name + ".json")))
    except (OSError, ValueError):
        return None
    if entry.get("fingerprint") != task.fingerprint or lake.list_files(j.partition).get(task.name) != entry.get("bytes"):
        return None
    fields = {k: entry[k] for k in ("rows", "input_rows", "tokens", "padded_tokens", "errors", "bytes", "seconds",
                                    "score_seconds", "labels", "worker") if k in entry}
    return ShardResult(name=task.name, input=task.shard.uri, **fields)


def _output_metadata(loc: lake.Location) -> dict[str, str]:
    """The scorer.* key-value metadata of an output file's footer ({} for a file that is not one)."""
    try:
        with loc.fs.open_input_file(loc.path) as f:
            kv = pq.read_metadata(f).metadata or {}
    except Exception:  # noqa: BLE001 - not Parquet, unreadable: not an output of this job
        return {}
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in kv.items()
            if k.startswith(b"scorer.")}


def _reason(e: BaseException) -> str:
    """The last line of a Ray error that says what went wrong (not the traceback)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, ShardInputError):
        return str(cause)
    if isinstance(cause, BaseException) and str(cause):
        return f"{type(cause).__name__}: {str(cause).splitlines()[0]}"
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if not ln.startswith(("File ", "^", "~", "Traceback")):
            return ln[:300]
    return type(e).__name__


def _finish(plan: JobPlan, stats: JobStats, run_id: str) -> None:
    """Complete (every shard of the job in the manifest with its fingerprint, none failed, every planned
    input still there as planned): retire this job's outputs of input files that are gone (or now under
    another output name), then `_report.json`, then `_SUCCESS`. Incomplete (a retire's delete failing too):
    `_report.json` alone, saying so and with what, and no `_SUCCESS`, not even an overlapping run's."""
    j = plan.job
    manifest = lake.read_manifest(j.partition)
    committed = [s for s in plan.shards if manifest.get(s.name, {}).get("fingerprint") == s.fingerprint]
    complete = not stats.failed and len(committed) == len(plan.shards)
    # The plan's inputs as they are now: one deleted or rewritten while the run read it (an upstream
    # compaction, say) may have been committed from what it held before, beside its new form's output.
    # Then the partition is not complete: the next run re-plans, retires and re-scores.
    changed: list[str] = []
    unlisted = ""
    if complete:
        try:
            now = {s.uri: (s.size, s.mtime_ns) for s in lake.list_shards(j.input)}
            changed = sorted(p.shard.uri for p in plan.shards if now.get(p.shard.uri) != (p.shard.size, p.shard.mtime_ns))
        except OSError as e:  # a transient listing error: no _SUCCESS on trust
            unlisted = lake.error_line(e)
            Progress.log(f"{j.name}: could not list {j.input.uri} again ({unlisted}); the partition is left incomplete")
        complete = not changed and not unlisted
    current = {s.name for s in plan.shards}
    inputs = {s.shard.uri for s in plan.shards}
    # An output not in this run's plan is retired only when this job wrote it (two jobs files may share
    # a partition) and either its input is a shard of this run under another name (the input's root
    # moved: the file is scored again under its new name) or its input lies inside this job's input and
    # is gone now (deleted, renamed, compacted). A short listing, another input's outputs, a user's file:
    # nothing else is touched.
    def retire(job: Any, uri: str) -> bool:
        return job == j.name and (uri in inputs or lake.shard_gone(j.input, uri))

    gone = sorted(n for n, e in manifest.items() if n not in current and retire(e.get("job"), str(e.get("input", ""))))
    if complete:
        # a file with no entry (a kill between its commit and its entry): its own metadata says whose
        for n in lake.list_files(j.partition):
            if n.endswith(".parquet") and n not in current and n not in manifest:
                meta = _output_metadata(j.partition.child(n))
                if retire(meta.get("scorer.job"), meta.get("scorer.input", "")):
                    gone.append(n)
        gone.sort()
        if gone:  # readers must not see _SUCCESS over a partition that is changing
            lake.remove(j.partition.child(SUCCESS))
        left = []  # files a delete failed for (a transient S3 error): kept with their entries, for the next run
        for name in gone:  # the file first: a kill between the two leaves an entry the next run retires
            try:
                lake.remove(j.partition.child(name), strict=True)
            except OSError as e:
                Progress.log(f"{j.name}: could not retire {name} ({e}); the next run tries again")
                left.append(name)
                continue
            lake.remove(j.partition.child(lake.MANIFEST_DIR, name + ".json"))
        stats.retired = [n for n in gone if n not in left]
        complete = complete and not left
    entries = [manifest[s.name] for s in committed]
    labels: dict[str, int] = {}
    for e in entries:
        for k, v in (e.get("labels") or {}).items():
            labels[k] = labels.get(k, 0) + v
    report = {
        "job": j.name, "run_id": run_id, "scorer_version": __version__, "output": j.partition.uri,
        "input": j.input.uri, "model": j.model.uri, "model_key": plan.model_key, "complete": complete,
        "model_fingerprints": sorted({e.get("model_fingerprint", "") for e in entries}),
        "partition": {"shards": len(entries), "rows": sum(e.get("rows", 0) for e in entries),
                      "tokens": sum(e.get("tokens", 0) for e in entries), "labels": labels},
        "this_run": stats.to_dict(),
        "files": [{"name": e["name"], "input": e["input"], "rows": e.get("rows"), "fingerprint": e["fingerprint"]} for e in entries],
    }
    if complete:
        report["retired"] = gone  # outputs whose input shard is gone, removed by this run
    else:
        report["not_committed"] = sorted({s.shard.uri for s in plan.shards} - {s.shard.uri for s in committed})
        report["gone_left_in_place"] = [n for n in gone if n not in stats.retired]  # retired once a run completes
        if stats.retired:  # some retired before a delete failed
            report["retired"] = stats.retired
        if changed:
            report["input_changed"] = changed  # deleted or rewritten during the run: the next run redoes them
        if unlisted:
            report["input_unlisted"] = unlisted  # the re-check could not list the input
        # an overlapping run may have written _SUCCESS meanwhile; this one's commits can make it untrue
        lake.remove(j.partition.child(SUCCESS))
    lake.write_marker(j.partition, REPORT, json.dumps(report, indent=2, sort_keys=True).encode())
    if complete:
        lake.write_marker(j.partition, SUCCESS)
