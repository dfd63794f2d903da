"""Plans: a shard is skipped only when the manifest holds its fingerprint and its file has the recorded size;
the fingerprint changes with the input file, the model and every setting that changes scores, not with speed."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from helpers import job, shard_table, write_jobs, write_shards
from scorer.jobs import lake
from scorer.jobs.plan import plan_job
from scorer.jobs.spec import load_and_check

DATE = "2026-11-23"


@pytest.fixture
def setup(tmp_path, tiny_model, monkeypatch):
    from scorer.jobs import plan as plan_mod

    monkeypatch.setattr(plan_mod, "cluster_gpus", lambda: 0)  # CPU workers, whether a Ray cluster runs or not
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    write_shards(tmp_path / "in", [5, 6])
    f = write_jobs(tmp_path / "jobs.yaml", {"a": job(model, "in", "out")})

    def plan(*sets: str, force: bool = False):
        [j] = load_and_check(f, date=DATE, sets=list(sets))
        return plan_job(j, force=force)

    p = plan()
    assert [s.done for s in p.shards] == [False, False]
    for s in p.shards:  # commit both as a worker does: the file, then its manifest entry
        lake.put_bytes(p.job.partition.child(s.name), b"x" * 10)
        lake.write_manifest_entry(p.job.partition, s.name, {"fingerprint": s.fingerprint, "bytes": 10, "rows": 5})
    return tmp_path, model, p, plan


def test_same_fingerprint_skips_and_force_redoes(setup):
    _, _, p, plan = setup
    again = plan()
    assert [s.done for s in again.shards] == [True, True] and [s.rows for s in again.shards] == [5, 5]
    assert [s.fingerprint for s in again.shards] == [s.fingerprint for s in p.shards]
    assert not any(s.done for s in plan(force=True).shards)


def test_speed_settings_do_not_change_the_fingerprint(setup):
    _, _, _, plan = setup
    sets = ["batching.max_rows=2", "batching.max_batch_tokens=64", "batching.chunk_rows=3", "runtime.workers=3",
            "runtime.shards_in_flight=1", "runtime.max_attempts=1", "runtime.device=cpu", "runtime.cpus_per_worker=2"]
    assert all(s.done for s in plan(*sets).shards)


@pytest.mark.parametrize("change", [
    "text={title}", "filter=n > 1", "id=[id, n]", "passthrough=[]", "task=both", "batching.max_length=16",
    "batching.truncation_side=left", "runtime.dtype=float16", "labels.threshold=0.3", "labels.return_logits=true",
    "labels.embedding_dtype=float16", "labels.dimensions=8", "labels.pooling=mean", "labels.normalize=false",
    "output.compression=snappy",
])
def test_score_settings_change_the_fingerprint(setup, change):
    _, _, _, plan = setup
    assert not any(s.done for s in plan(change).shards), change


def test_an_unset_dtype_is_fingerprinted_as_the_workers_resolve_it(setup, monkeypatch):
    """An unset runtime.dtype scores in float32 on CPU workers and bfloat16 on GPU ones: shards committed by
    CPU workers are redone when the job moves to a cluster with GPUs. A set dtype fingerprints alike on both."""
    from scorer.jobs import plan as plan_mod

    _, _, p, plan = setup
    assert not p.gpu
    monkeypatch.setattr(plan_mod, "cluster_gpus", lambda: 2)
    on_gpu = plan()
    assert on_gpu.gpu and not any(s.done for s in on_gpu.shards)
    assert all(s.done for s in plan("runtime.device=cpu").shards)  # CPU workers whatever the cluster has
    assert not any(s.done for s in plan_job(p.job, gpu=True).shards)
    assert all(s.done for s in plan_job(p.job, gpu=False).shards)
    assert all(s.done for s in plan("runtime.dtype=float32").shards)  # what the CPU workers resolved
    assert not any(s.done for s in plan("runtime.dtype=bfloat16", "runtime.device=cpu").shards)
    assert ([s.fingerprint for s in plan("runtime.dtype=bfloat16").shards]
            == [s.fingerprint for s in on_gpu.shards])


def test_the_plan_follows_the_dtype_the_workers_report(setup):
    """A run's workers report the dtype they resolved: an unset dtype is planned again for it (GPU workers
    that found no GPU score float32); workers that disagree among themselves fail the job with the fix;
    a set dtype is never second-guessed."""
    from scorer.jobs.plan import plan_job
    from scorer.jobs.runner import follow_workers_dtype

    _, _, p, plan = setup
    on_gpu = plan_job(p.job, gpu=True)
    assert follow_workers_dtype(on_gpu, [{"dtype": "bfloat16"}] * 2) == (on_gpu, None)
    assert follow_workers_dtype(on_gpu, []) == (on_gpu, None)  # no report (the workers died): as planned
    again, why = follow_workers_dtype(on_gpu, [{"dtype": "float32"}, {"dtype": "float32"}])
    assert why is None and not again.gpu and all(s.done for s in again.shards)  # p committed them in float32
    assert [s.fingerprint for s in again.shards] == [s.fingerprint for s in p.shards]
    same, why = follow_workers_dtype(on_gpu, [{"dtype": "float32"}, {"dtype": "bfloat16"}])
    assert same is on_gpu and "different dtypes (bfloat16, float32)" in why and "set runtime.dtype" in why
    fixed = plan("runtime.dtype=bfloat16")
    assert follow_workers_dtype(fixed, [{"dtype": "bfloat16"}, {"dtype": "float32"}]) == (fixed, None)
    forced = plan_job(p.job, gpu=True, force=True)
    assert not any(s.done for s in follow_workers_dtype(forced, [{"dtype": "float32"}])[0].shards)  # --force kept


def test_input_model_and_output_file_changes(setup):
    tmp_path, model, p, plan = setup
    pq.write_table(shard_table(1, 7), tmp_path / "in" / "part-001.parquet")  # a rewritten input shard
    assert [s.done for s in plan().shards] == [True, False]
    pq.write_table(shard_table(1, 6), tmp_path / "in" / "part-001.parquet")
    names = [s.name for s in p.shards]
    lake.put_bytes(p.job.partition.child(names[0]), b"x" * 11)  # an output file that is not what was recorded
    assert not plan().shards[0].done
    lake.remove(p.job.partition.child(names[0]))  # or is gone
    assert not plan().shards[0].done
    lake.put_bytes(p.job.partition.child(names[0]), b"x" * 10)
    assert plan().shards[0].done
    cfg = json.loads((model / "config.json").read_text())
    cfg["id2label"] = {k: f"renamed_{v}" for k, v in cfg["id2label"].items()}  # the model's labels changed
    (model / "config.json").write_text(json.dumps(cfg))
    assert not any(s.done for s in plan().shards)


def test_weights_by_content_not_by_mtime(setup, tmp_path, monkeypatch):
    """A model retrained in place keeps its files' sizes: their bytes count. A fresh copy or download of
    the same bytes (a new mtime) keeps the shards done, and the digest is read once per file version."""
    import os

    from scorer.jobs import plan as plan_mod

    monkeypatch.setenv("SCORER_CACHE", str(tmp_path / "cache"))
    _, model, _, plan = setup
    w = model / "model.safetensors"
    st = w.stat()
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the same bytes, written later
    assert all(s.done for s in plan().shards)
    reads = []
    real = open

    def counting_open(path, *a, **kw):
        reads.append(path)
        return real(path, *a, **kw)

    monkeypatch.setattr(plan_mod, "open", counting_open, raising=False)
    plan()
    assert reads == []  # cached: a stat, not a read
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF  # retrained in place: same size, other bytes
    w.write_bytes(bytes(data))
    assert not any(s.done for s in plan().shards) and reads


def test_weight_digests_from_hf_blob_names_and_without_a_home(tmp_path, monkeypatch):
    """A Hugging Face snapshot links each file to blobs/<sha256>: the name is the digest, nothing is read.
    With no home directory and no SCORER_CACHE, digests are computed and nothing is cached."""
    import hashlib
    from pathlib import Path

    from scorer.jobs import plan as plan_mod

    data = b"weights" * 1000
    blob = tmp_path / "hub" / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    snap = tmp_path / "hub" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(blob)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "model.safetensors").write_bytes(data)

    def no_read(*a, **kw):
        raise AssertionError("read a blob whose name is its digest")

    loc = lake.resolve(str(snap))
    monkeypatch.setattr(plan_mod, "open", no_read, raising=False)
    assert plan_mod.weights_digest(loc, "model.safetensors", len(data), 0, {}) == blob.name
    monkeypatch.undo()
    monkeypatch.delenv("SCORER_CACHE", raising=False)
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError("no home"))))
    plain = lake.resolve(str(tmp_path / "plain"))
    known: dict = {}
    assert plan_mod.weights_digest(plain, "model.safetensors", len(data), 0, known) == blob.name and known
    assert plan_mod._digest_cache() is None and plan_mod.model_key(plain)
