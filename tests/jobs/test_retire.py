"""Retiring outputs whose input shard is gone (runner._finish), without Ray: commits are made the way a
worker makes them (the file, then its manifest entry naming the job and the input). Only this job's
outputs of input files that are gone from its own input are removed; everything else stays."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from helpers import job, write_jobs
from scorer.jobs import lake
from scorer.jobs.display import JobStats
from scorer.jobs.plan import plan_job
from scorer.jobs.runner import _finish
from scorer.jobs.spec import load_and_check


def _shard(p: Path, n: int = 3) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": [f"{p.stem}-{i}" for i in range(n)], "text": ["x"] * n, "lang": ["en"] * n}), p)


def _run(f: Path, date: str = "2026-11-23", jobs: tuple[str, ...] = (), drop: str = "") -> dict[str, list[str]]:
    """Plan, commit what is to do, finish; `drop`: leave shards whose path ends so out of the listing."""
    retired = {}
    for j in load_and_check(f, jobs=list(jobs), date=date):
        if drop:
            j.shards = [s for s in j.shards if not s.uri.endswith(drop)]
        plan = plan_job(j)
        _commit(plan)
        stats = JobStats(j.name, total=len(plan.shards))
        _finish(plan, stats, "run")
        retired[j.name] = stats.retired
    return retired


def _commit(plan) -> None:
    """Commit the plan's shards to do as a worker does: the file, then its manifest entry."""
    j = plan.job
    for s in plan.todo:
        lake.put_bytes(j.partition.child(s.name), b"PAR1 fake")
        lake.write_manifest_entry(j.partition, s.name, {"name": s.name, "input": s.shard.uri, "job": j.name,
                                                        "fingerprint": s.fingerprint, "bytes": 9, "rows": 3})


def _compacted(tmp_path: Path, model) -> tuple[Path, Path, list[str]]:
    """Job j scored a.parquet and b.parquet; upstream then compacted them into compacted.parquet.
    (jobs file, output partition, the old outputs' names)."""
    _shard(tmp_path / "in" / "a.parquet")
    _shard(tmp_path / "in" / "b.parquet")
    f = write_jobs(tmp_path / "jobs.yaml", {"j": job(model, "in", "out")})
    _run(f)
    part = tmp_path / "out" / "dt=2026-11-23"
    old = _names(part)
    for p in (tmp_path / "in").iterdir():
        p.unlink()
    _shard(tmp_path / "in" / "compacted.parquet", 6)
    return f, part, old


def _names(part: Path) -> list[str]:
    return sorted(p.name for p in part.iterdir() if p.suffix == ".parquet")


def test_compacted_input_retires_the_old_outputs(tmp_path, tiny_model):
    f, part, old = _compacted(tmp_path, tiny_model)
    assert _run(f) == {"j": old}
    assert len(_names(part)) == 1 and sorted(lake.read_manifest(lake.resolve(str(part)))) == _names(part)
    assert json.loads((part / "_report.json").read_text())["retired"] == old and (part / "_SUCCESS").exists()


def test_another_jobs_outputs_in_the_same_partition_stay(tmp_path, tiny_model):
    """Two jobs files whose jobs write one partition (validation sees one file at a time): b's outputs are
    not a's to retire, even once b's input is gone."""
    _shard(tmp_path / "in_a" / "a.parquet")
    _shard(tmp_path / "in_b" / "b.parquet")
    fa = write_jobs(tmp_path / "a.yaml", {"a": job(tiny_model, "in_a", "out")})
    fb = write_jobs(tmp_path / "b.yaml", {"b": job(tiny_model, "in_b", "out")})
    _run(fb)
    (tmp_path / "in_b" / "b.parquet").unlink()
    assert _run(fa) == {"a": []}
    assert len(_names(tmp_path / "out" / "dt=2026-11-23")) == 2


def test_another_job_inside_this_jobs_input_keeps_its_outputs(tmp_path, tiny_model):
    """The job-name check alone: job b (another jobs file) reads one file inside job a's input folder into
    the same partition; once that file is gone, a retires its own output of it, not b's."""
    _shard(tmp_path / "in" / "k.parquet")
    _shard(tmp_path / "in" / "sub" / "x.parquet")
    _run(write_jobs(tmp_path / "a.yaml", {"a": job(tiny_model, "in", "out")}))
    _run(write_jobs(tmp_path / "b.yaml", {"b": job(tiny_model, "in/sub/x.parquet", "out")}))
    part = tmp_path / "out" / "dt=2026-11-23"
    assert len(_names(part)) == 3  # a: k and sub/x; b: x
    (tmp_path / "in" / "sub" / "x.parquet").unlink()
    assert len(_run(write_jobs(tmp_path / "a.yaml", {"a": job(tiny_model, "in", "out")}))["a"]) == 1
    entries = lake.read_manifest(lake.resolve(str(part)))
    assert sorted(e["job"] for e in entries.values()) == ["a", "b"] and len(_names(part)) == 2


def test_a_moved_input_root_leaves_no_second_copy(tmp_path, tiny_model):
    """input: in becomes input: in/sub: the same file gets a new output name (names hash the path below
    the input's root); the output under the old name is retired, so its rows are there once."""
    _shard(tmp_path / "in" / "sub" / "c.parquet")
    _run(write_jobs(tmp_path / "jobs.yaml", {"j": job(tiny_model, "in", "out")}))
    part = tmp_path / "out" / "dt=2026-11-23"
    old = _names(part)
    assert _run(write_jobs(tmp_path / "jobs.yaml", {"j": job(tiny_model, "in/sub", "out")})) == {"j": old}
    assert len(_names(part)) == 1 and _names(part) != old


def test_a_dated_input_into_a_fixed_output_is_refused(tmp_path, tiny_model):
    """Day after day into one partition, part-0.parquet of day 2 would replace day 1's output."""
    import pytest

    from scorer.jobs.spec import SpecError

    f = write_jobs(tmp_path / "jobs.yaml", {"ev": {**job(tiny_model, "ev/dt={date}/", "scored"),
                                                   "output": {"uri": "scored", "partition": "all"}}})
    with pytest.raises(SpecError, match=r"jobs.ev.output: the input changes with \{date\} and the output does not"):
        load_and_check(f, date="1")


def test_a_short_listing_or_a_users_file_deletes_nothing(tmp_path, tiny_model):
    """A listing that misses a file that is still there (a flaky store, a narrowed glob) retires nothing,
    and files the job did not write are never touched, whatever their names."""
    _shard(tmp_path / "in" / "a.parquet")
    _shard(tmp_path / "in" / "b.parquet")
    f = write_jobs(tmp_path / "jobs.yaml", {"j": job(tiny_model, "in/*.parquet", "out")})
    _run(f)
    part = tmp_path / "out" / "dt=2026-11-23"
    (part / "daily-summary-1718000000.parquet").write_bytes(b"a user's file")
    before = _names(part)
    assert _run(f, drop="/b.parquet") == {"j": []}  # b is missing from the listing, not from the store
    f2 = write_jobs(tmp_path / "jobs.yaml", {"j": job(tiny_model, "in/a.parquet", "out")})  # a narrower input
    assert _run(f2) == {"j": []}
    assert _names(part) == before


def test_an_output_without_its_manifest_entry_is_known_by_its_metadata(tmp_path, tiny_model):
    """A kill between an output's commit and its manifest entry leaves a file no entry names: its footer
    (scorer.job, scorer.input) says whose it is, so it is retired once its input is gone; a Parquet file
    of someone else's in the partition stays."""
    _shard(tmp_path / "in" / "a.parquet")
    _shard(tmp_path / "in" / "b.parquet")
    f = write_jobs(tmp_path / "jobs.yaml", {"j": job(tiny_model, "in", "out")})
    _run(f)
    part = tmp_path / "out" / "dt=2026-11-23"
    [j] = load_and_check(f, date="2026-11-23")
    b = next(s for s in plan_job(j).shards if s.shard.uri.endswith("/b.parquet"))
    (part / "_manifest" / f"{b.name}.json").unlink()  # as if killed before the entry was written
    meta = {b"scorer.job": b"j", b"scorer.input": b.shard.uri.encode()}
    pq.write_table(pa.table({"id": ["x"]}).replace_schema_metadata(meta), part / b.name)
    pq.write_table(pa.table({"id": ["y"]}).replace_schema_metadata({b"scorer.job": b"other", b"scorer.input":
                   b.shard.uri.encode()}), part / "theirs-0123456789.parquet")
    (tmp_path / "in" / "b.parquet").unlink()
    assert _run(f) == {"j": [b.name]}
    assert b.name not in _names(part) and "theirs-0123456789.parquet" in _names(part)


class _FlakyDeletes:
    """A filesystem whose delete of each output Parquet file fails the first time (an S3 503, say)."""

    def __init__(self, fs):
        self._fs, self.failed = fs, []

    def delete_file(self, path):
        if path.endswith(".parquet") and "/_manifest/" not in path and path not in self.failed:
            self.failed.append(path)
            raise OSError(f"When deleting key '{path}': AWS Error SLOW_DOWN (HTTP status 503)")
        return self._fs.delete_file(path)

    def __getattr__(self, name):
        return getattr(self._fs, name)


def test_a_retire_whose_delete_fails_keeps_its_entry_and_no_success(tmp_path, tiny_model, monkeypatch):
    """lake.remove swallowed the error, and _finish dropped the entry, reported the file retired and wrote
    _SUCCESS over a partition holding the compacted rows twice. Now the file and its entry stay, the run is
    incomplete, and the next one retires it."""
    f, part, old = _compacted(tmp_path, tiny_model)
    real = lake._filesystem
    flaky = _FlakyDeletes(real(str(part), lake.StorageOptions()))
    with monkeypatch.context() as m:
        m.setattr(lake, "_filesystem", lambda uri, storage: flaky)
        assert _run(f) == {"j": []}
    assert len(flaky.failed) == 2 and not (part / "_SUCCESS").exists()
    report = json.loads((part / "_report.json").read_text())
    assert report["complete"] is False and report["gone_left_in_place"] == old
    assert set(old) < set(lake.read_manifest(lake.resolve(str(part))))  # still known, to be retired
    assert _run(f) == {"j": old} and (part / "_SUCCESS").exists() and len(_names(part)) == 1


def test_inputs_changed_during_the_run_leave_no_success(tmp_path, tiny_model):
    """Run A planned {p0, p1}; upstream compacted them into one file while A's workers read them; run B (the
    next cron tick) scored the compacted file and completed. A's commits then land beside B's output: A finds
    its planned inputs gone, and takes down the _SUCCESS that no longer holds; the next run retires them."""
    _shard(tmp_path / "in" / "p0.parquet")
    _shard(tmp_path / "in" / "p1.parquet")
    f = write_jobs(tmp_path / "jobs.yaml", {"j": job(tiny_model, "in", "out")})
    [ja] = load_and_check(f, date="2026-11-23")
    plan_a = plan_job(ja)
    for p in ("p0", "p1"):
        (tmp_path / "in" / f"{p}.parquet").unlink()
    _shard(tmp_path / "in" / "compacted.parquet", 6)
    _run(f)  # run B
    part = tmp_path / "out" / "dt=2026-11-23"
    assert (part / "_SUCCESS").exists() and len(_names(part)) == 1
    _commit(plan_a)  # A's workers commit what they read
    _finish(plan_a, JobStats("j", total=len(plan_a.shards)), "run-a")
    report = json.loads((part / "_report.json").read_text())
    assert not (part / "_SUCCESS").exists() and report["complete"] is False
    assert report["input_changed"] == [str(tmp_path / "in" / "p0.parquet"), str(tmp_path / "in" / "p1.parquet")]
    assert len(_run(f)["j"]) == 2 and (part / "_SUCCESS").exists() and len(_names(part)) == 1


def test_an_input_that_cannot_be_listed_again_leaves_no_success(tmp_path, tiny_model, monkeypatch):
    """_finish's re-check of the planned inputs: a listing that fails (S3 throttling, say) is no reason to
    trust the plan; the run is incomplete and says why, and nothing is retired."""
    _shard(tmp_path / "in" / "a.parquet")
    f = write_jobs(tmp_path / "jobs.yaml", {"j": job(tiny_model, "in", "out")})
    [j] = load_and_check(f, date="2026-11-23")

    def throttled(loc):
        raise OSError("AWS Error SLOW_DOWN during ListObjectsV2 operation")

    monkeypatch.setattr(lake, "list_shards", throttled)
    plan = plan_job(j)
    _commit(plan)
    _finish(plan, JobStats("j", total=len(plan.shards)), "run")
    part = tmp_path / "out" / "dt=2026-11-23"
    report = json.loads((part / "_report.json").read_text())
    assert report["complete"] is False and "SLOW_DOWN" in report["input_unlisted"] and not (part / "_SUCCESS").exists()
