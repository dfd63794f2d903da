"""`scorer run` end to end on CPU through a real local Ray cluster (2 fake GPUs), locally and on S3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from helpers import job, write_jobs, write_shards
from scorer.cli import app
from scorer.jobs import lake
from scorer.jobs.runner import run_cli

pytestmark = pytest.mark.slow
DATE = "2026-11-23"
REPO = Path(__file__).resolve().parents[2]


def _files(partition: Path) -> dict[str, pa.Table]:
    return {p.name: pq.read_table(p) for p in sorted(partition.glob("*.parquet"))}


def _by_input(partition: Path) -> dict[str, pa.Table]:
    """Output tables keyed by the input file they came from (the scorer.input metadata)."""
    out = {}
    for p in sorted(partition.glob("*.parquet")):
        t = pq.read_table(p)
        out[Path(t.schema.metadata[b"scorer.input"].decode()).name] = t
    return out


def _manifest(partition: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((partition / "_manifest").glob("*.json"))}


def test_end_to_end_local(ray_cluster, tiny_model, tmp_path, capsys):
    from scorer.api import Scorer

    tables = write_shards(tmp_path / "in", [37, 0, 25, 30])
    f = write_jobs(tmp_path / "jobs.yaml", {
        "clf": job(tiny_model, "in", "out/clf", batching={"chunk_rows": 16, "max_rows": 8}, runtime={"workers": 2}),
        "both": job(tiny_model, "in/*.parquet", "out/both", task="both", text="{title}\n\n{text}", filter='lang == "en"',
                    passthrough=["lang", "n"], labels={"embedding_dtype": "float16", "dimensions": 16}),
    })
    assert run_cli(f, date=DATE, progress_interval=0.5) == 0
    part = tmp_path / "out" / "clf" / f"dt={DATE}"
    outs = _by_input(part)
    assert sorted(outs) == [f"part-00{i}.parquet" for i in range(4)]  # the zero-row shard has a (zero-row) file
    ref = Scorer.from_pretrained(tiny_model, task="classify", device="cpu")
    for i, t_in in enumerate(tables):
        out = outs[f"part-00{i}.parquet"]
        assert out.column_names == ["id", "lang", "label", "label_id", "score", "probs", "n_tokens", "truncated", "error"]
        assert out["id"].to_pylist() == t_in["id"].to_pylist()  # every row once, in input order
        assert out.schema.field("label").type == pa.dictionary(pa.int32(), pa.string())
        meta = out.schema.metadata
        assert meta[b"scorer.job"] == b"clf" and meta[b"scorer.model_fingerprint"] == ref.fingerprint.encode()
        assert meta[b"scorer.version"] and meta[b"scorer.run_id"]
        want = ref.score(t_in["text"].to_pylist())
        for c in ("label", "label_id", "n_tokens", "truncated", "error"):
            got = out[c].to_pylist()
            assert got == want[c].to_pylist(), c
        for g, w in zip(out["probs"].to_pylist(), want["probs"].to_pylist()):
            assert (g is None) == (w is None) and (g is None or np.allclose(g, w, atol=1e-5))
    allout = pa.concat_tables([outs[f"part-00{i}.parquet"] for i in range(4)])
    texts = pa.concat_tables(tables)["text"].to_pylist()
    errs = dict(zip(texts, allout["error"].to_pylist()))
    assert errs[None] == "null text" and errs[""] == "empty text" and errs["   \n\t "] == "empty text"
    long = allout.filter(pa.compute.equal(pa.compute.utf8_length(pa.concat_tables(tables)["text"]), 100_000))
    assert long.num_rows > 0 and all(long["truncated"].to_pylist()) and long["error"].null_count == long.num_rows
    report = json.loads((part / "_report.json").read_text())
    assert (part / "_SUCCESS").exists() and report["partition"]["rows"] == sum(t.num_rows for t in tables)
    assert report["this_run"]["shards"]["committed_this_run"] == 4
    assert not (part / lake.TMP_DIR).exists()
    # one actor per (fake) GPU, each with its own CUDA_VISIBLE_DEVICES, scoring on the CPU (device auto)
    workers = report["this_run"]["workers"]
    assert sorted(w["gpus"] for w in workers) == ["0", "1"] and {w["device"] for w in workers} == {"cpu"}
    assert [w["shards"] for w in workers] == [2, 2]  # two shards in flight per actor from the start
    # ... and an actor's second shard started (its reader thread with it) before its first was committed
    by_worker: dict[str, list[dict]] = {}
    for e in _manifest(part).values():
        by_worker.setdefault(e["worker"], []).append(e)
    assert sorted(len(v) for v in by_worker.values()) == [2, 2]
    for first, second in (sorted(v, key=lambda e: e["committed_unix"]) for v in by_worker.values()):
        assert second["started_unix"] < first["committed_unix"], (first, second)
    # the second job: template text, filter, label + embedding (float16, 16 dims) from one pass
    both = _by_input(tmp_path / "out" / "both" / f"dt={DATE}")
    for i, t_in in enumerate(tables):
        out = both[f"part-00{i}.parquet"]
        en = t_in.filter(pa.compute.equal(t_in["lang"], "en"))
        assert out["id"].to_pylist() == en["id"].to_pylist()
        assert out.schema.field("embedding").type == pa.list_(pa.float16(), 16)
        assert out.column_names[:3] == ["id", "lang", "n"] and "label" in out.column_names
    both_workers = json.loads((tmp_path / "out" / "both" / f"dt={DATE}" / "_report.json").read_text())["this_run"]["workers"]
    assert sorted(w["gpus"] for w in both_workers) == ["0", "1"]  # runtime.workers unset: one actor per GPU
    summary = capsys.readouterr().out
    assert "clf" in summary and "both" in summary and "label_" in summary
    assert run_cli(f, date=DATE, dry_run=True) == 0
    assert "0 to do, 4 to skip" in capsys.readouterr().out
    # the fingerprint holds what changes scores, not what changes speed
    assert run_cli(f, date=DATE, jobs=["clf"], dry_run=True, sets=["batching.max_rows=3", "runtime.workers=1"]) == 0
    assert "0 to do, 4 to skip" in capsys.readouterr().out
    assert run_cli(f, date=DATE, jobs=["clf"], dry_run=True, sets=["batching.max_length=16"]) == 0
    assert "4 to do, 0 to skip" in capsys.readouterr().out
    # a rerun commits nothing: every shard is in the manifest with the same fingerprint; it cleans what a
    # killed run left: a staging file in the partition and a spool file of a dead process
    before = _manifest(part)
    stale = part / lake.TMP_DIR / "4242.0123456789ab.part-000-x.parquet"
    stale.parent.mkdir()
    stale.write_bytes(b"PAR1 half a file")
    dead = subprocess.Popen(["true"])
    dead.wait()
    spool = lake._spool_dir() / f"{dead.pid}.0123456789ab.parquet"
    spool.write_bytes(b"PAR1 half an upload")
    assert run_cli(f, date=DATE, jobs=["clf"]) == 0
    assert _manifest(part) == before
    assert not stale.exists() and not stale.parent.exists() and not spool.exists()
    # --force redoes every shard, with the same results
    assert run_cli(f, date=DATE, jobs=["clf"], force=True) == 0
    after = _manifest(part)
    assert all(after[k]["run_id"] != before[k]["run_id"] for k in before)
    again = _by_input(part)
    for k, t in outs.items():
        assert again[k].drop_columns([]).select(["id", "label", "n_tokens"]).equals(t.select(["id", "label", "n_tokens"]))


def test_job_options_reach_the_output(ray_cluster, tiny_model, tmp_path):
    """id lists, batching (max_length, truncation side), runtime (cpu, dtype), labels (logits, multi-label
    threshold, embedding dimensions / pooling / normalize), compression: each equals the Python API's result."""
    from scorer.api import Scorer
    from tiny import make_model

    multi = make_model(tmp_path / "multi", problem_type="multi_label_classification", num_labels=4,
                       max_position_embeddings=256, seed=3)
    tables = write_shards(tmp_path / "in", [13, 11])
    texts = pa.concat_tables(tables)["text"].to_pylist()
    probs = sorted(p for row in Scorer.from_pretrained(multi, device="cpu").score(texts)["probs"].to_pylist() if row for p in row)
    threshold = round((probs[len(probs) // 2 - 1] + probs[len(probs) // 2]) / 2, 7)  # splits the labels
    cpu = {"device": "cpu", "workers": 1}
    f = write_jobs(tmp_path / "jobs.yaml", {
        "clf": {**job(tiny_model, "in", "out/clf", id=["id", "n"], passthrough=[], runtime={**cpu, "dtype": "float32"},
                      batching={"max_length": 8, "truncation_side": "left", "max_batch_tokens": 64, "max_rows": 4},
                      labels={"return_logits": True}),
                "output": {"uri": "out/clf", "partition": "dt={date}", "compression": "snappy"}},
        "emb": job(tiny_model, "in", "out/emb", task="embed", runtime=cpu,
                   labels={"dimensions": 8, "pooling": "mean", "normalize": False}),
        "multi": job(multi, "in", "out/multi", runtime=cpu, labels={"threshold": threshold}),
    })
    assert run_cli(f, date=DATE) == 0
    refs = {
        "clf": Scorer.from_pretrained(tiny_model, task="classify", device="cpu", dtype="float32", max_length=8,
                                      truncation_side="left", return_logits=True),
        "emb": Scorer.from_pretrained(tiny_model, task="embed", device="cpu", pooling="mean", normalize=False, dimensions=8),
        "multi": Scorer.from_pretrained(multi, device="cpu", threshold=threshold),
    }
    for name, ref in refs.items():
        outs = _by_input(tmp_path / "out" / name / f"dt={DATE}")
        got = pa.concat_tables([outs["part-000.parquet"], outs["part-001.parquet"]])
        want = ref.score(texts)
        assert got.column_names == (["id", "n"] if name == "clf" else ["id", "lang"]) + want.column_names, name
        for c in want.column_names:
            g, w = got[c].to_pylist(), want[c].to_pylist()
            if c in ("probs", "logits", "embedding", "score"):
                for a, b in zip(g, w):
                    assert (a is None) == (b is None) and (a is None or np.allclose(a, b, atol=1e-5)), (name, c)
            else:
                assert g == w, (name, c)
    clf = _by_input(tmp_path / "out" / "clf" / f"dt={DATE}")["part-000.parquet"]
    assert any(clf["truncated"].to_pylist()) and max(clf["n_tokens"].to_pylist()) == 8
    multi_out = pa.concat_tables(_by_input(tmp_path / "out" / "multi" / f"dt={DATE}").values())
    assert len({tuple(x) for x in multi_out["labels"].to_pylist() if x is not None}) > 2  # the threshold splits them
    emb = _by_input(tmp_path / "out" / "emb" / f"dt={DATE}")["part-000.parquet"]
    assert emb.schema.field("embedding").type == pa.list_(pa.float32(), 8)
    assert not np.allclose(np.linalg.norm([e for e in emb["embedding"].to_pylist() if e], axis=1), 1.0)
    files = sorted((tmp_path / "out" / "clf" / f"dt={DATE}").glob("*.parquet"))
    assert {pq.ParquetFile(p).metadata.row_group(0).column(0).compression for p in files} == {"SNAPPY"}


def test_corrupt_and_wrong_type_shards_fail_alone(ray_cluster, tiny_model, tmp_path, capsys):
    write_shards(tmp_path / "in", [12, 9, 11, 8, 7])
    (tmp_path / "in" / "part-000.parquet").write_bytes(b"PAR1 this is not parquet at all")  # the first: validation reads the next
    bad = pq.read_table(tmp_path / "in" / "part-003.parquet").set_column(2, "text", pa.array(range(8), pa.int64()))
    pq.write_table(bad, tmp_path / "in" / "part-003.parquet")
    pq.write_table(pq.read_table(tmp_path / "in" / "part-004.parquet").drop_columns(["lang"]),  # a passthrough column
                   tmp_path / "in" / "part-004.parquet")
    f = write_jobs(tmp_path / "jobs.yaml", {"a": job(tiny_model, "in", "out", runtime={"workers": 1, "max_attempts": 2})})
    assert run_cli(f, date=DATE, progress_interval=0.5) == 3
    part = tmp_path / "out" / f"dt={DATE}"
    assert sorted(_by_input(part)) == ["part-001.parquet", "part-002.parquet"]
    assert not (part / "_SUCCESS").exists()
    report = json.loads((part / "_report.json").read_text())  # the failures are named there too
    assert report["complete"] is False and report["partition"]["shards"] == 2
    bad = [str(tmp_path / "in" / f"part-00{i}.parquet") for i in (0, 3, 4)]
    assert sorted(report["this_run"]["failed"]) == bad and report["not_committed"] == bad
    out, err = capsys.readouterr()
    assert "FAILED a: " + str(tmp_path / "in" / "part-000.parquet") in out
    assert "FAILED a: " + str(tmp_path / "in" / "part-003.parquet") in out and "not a string" in out
    assert "FAILED a: " + str(tmp_path / "in" / "part-004.parquet") + ": bad input (KeyError): " in out and "lang" in out
    assert "retrying" not in err  # bad input is not retried
    # fix the shards: the rerun scores only them, then the partition is complete
    write_shards(tmp_path / "in", [12, 9, 11, 8, 7])
    assert run_cli(f, date=DATE) == 0
    assert len(_by_input(part)) == 5 and (part / "_SUCCESS").exists()


def test_outputs_of_one_job_share_one_schema(ray_cluster, tiny_model, tmp_path, capsys):
    """Shards whose kept columns differ in type (a hive key that one file also holds as a column, int32 in
    one file and int64 in the other) are written in the first file's types, so the outputs read as one
    dataset; a value that does not convert fails its shard alone, naming the column and the fix."""
    import pyarrow.dataset as ds

    t = write_shards(tmp_path / "tmp", [10, 9, 8])
    (tmp_path / "in" / "k=1").mkdir(parents=True)
    (tmp_path / "in" / "k=2").mkdir()
    (tmp_path / "in" / "k=3").mkdir()
    pq.write_table(t[0], tmp_path / "in" / "k=1" / "a.parquet")  # k only in the path: a string
    pq.write_table(t[1].append_column("k", pa.array([2] * 9, pa.int64()))  # k in the file too, and n as int32
                   .set_column(4, "n", pa.array(range(9), pa.int32())), tmp_path / "in" / "k=2" / "b.parquet")
    pq.write_table(t[2].set_column(4, "n", pa.array(["abc"] * 8)), tmp_path / "in" / "k=3" / "c.parquet")
    f = write_jobs(tmp_path / "jobs.yaml", {"a": job(tiny_model, "in", "out", passthrough=["lang", "k", "n"],
                                                     runtime={"workers": 1, "max_attempts": 2})})
    assert run_cli(f, date=DATE) == 3
    part = tmp_path / "out" / f"dt={DATE}"
    outs = _by_input(part)
    assert sorted(outs) == ["a.parquet", "b.parquet"]
    assert outs["a.parquet"].schema.field("k").type == outs["b.parquet"].schema.field("k").type == pa.string()
    assert outs["b.parquet"].schema.field("n").type == pa.int64()
    whole = ds.dataset(part, format="parquet").to_table()  # one schema: the dataset reads every file
    assert whole.num_rows == 19 and sorted(set(whole["k"].to_pylist())) == ["1", "2"]
    out, err = capsys.readouterr()
    c = str(tmp_path / "in" / "k=3" / "c.parquet")
    assert f"FAILED a: {c}: bad input (ArrowInvalid): column 'n' is string in this file but int64 in " in out
    assert str(tmp_path / "in" / "k=1" / "a.parquet") in out and "leave it out of id/passthrough" in out
    assert "retrying" not in err


def test_a_cast_that_would_change_ids_fails_its_shard(ray_cluster, tiny_model, tmp_path, capsys):
    """Arrow's safe cast parses the string "007" as the integer 7: kept columns cast to the first file's
    types must give their input back, or "007" and "7" would be committed as one id. Ids that do convert
    exactly ("7" -> 7) are written in the job's type."""
    t = write_shards(tmp_path / "tmp", [4, 4, 4])
    (tmp_path / "in").mkdir()
    pq.write_table(t[0].set_column(0, "id", pa.array([1, 2, 3, 4], pa.int64())), tmp_path / "in" / "part-000.parquet")
    pq.write_table(t[1].set_column(0, "id", pa.array(["007", "7", "0010", "10"])), tmp_path / "in" / "part-001.parquet")
    pq.write_table(t[2].set_column(0, "id", pa.array(["5", "6", None, "8"])), tmp_path / "in" / "part-002.parquet")
    f = write_jobs(tmp_path / "jobs.yaml", {"a": job(tiny_model, "in", "out", runtime={"workers": 1, "max_attempts": 2})})
    assert run_cli(f, date=DATE) == 3
    outs = _by_input(tmp_path / "out" / f"dt={DATE}")
    assert sorted(outs) == ["part-000.parquet", "part-002.parquet"]
    assert outs["part-002.parquet"]["id"].to_pylist() == [5, 6, None, 8]
    out, _ = capsys.readouterr()
    bad = str(tmp_path / "in" / "part-001.parquet")
    assert f"FAILED a: {bad}: bad input (ArrowInvalid): column 'id' is string in this file but int64 in " in out
    assert "some values would change" in out


def test_an_all_null_text_column_scores_as_null_texts(ray_cluster, tiny_model, tmp_path):
    """pyarrow and pandas write an all-None column with Parquet type null: its rows are null texts, scored
    with error "null text" like those of a string column, not a shard refused as bad input."""
    t = write_shards(tmp_path / "tmp", [6, 5])
    (tmp_path / "in").mkdir()
    pq.write_table(t[0].set_column(t[0].schema.get_field_index("text"), "text", pa.nulls(6)),
                   tmp_path / "in" / "part-000.parquet")  # the first file: validation reads it
    pq.write_table(t[1], tmp_path / "in" / "part-001.parquet")
    assert pq.read_schema(tmp_path / "in" / "part-000.parquet").field("text").type == pa.null()
    f = write_jobs(tmp_path / "jobs.yaml", {"a": job(tiny_model, "in", "out")})
    assert run_cli(f, date=DATE) == 0
    outs = _by_input(tmp_path / "out" / f"dt={DATE}")
    assert outs["part-000.parquet"]["error"].to_pylist() == ["null text"] * 6
    assert outs["part-001.parquet"].num_rows == 5


def test_outputs_readers_would_skip_are_named_visibly(ray_cluster, tiny_model, tmp_path):
    """An input named `été.parquet` used to give the output `_t_-<hash>.parquet`, which dataset readers
    skip: its rows were committed and invisible."""
    import pyarrow.dataset as ds

    t = write_shards(tmp_path / "tmp", [10, 7])
    (tmp_path / "in").mkdir()
    pq.write_table(t[0], tmp_path / "in" / "part-000.parquet")
    pq.write_table(t[1], tmp_path / "in" / "été.parquet")
    f = write_jobs(tmp_path / "jobs.yaml", {"a": job(tiny_model, "in", "out")})
    assert run_cli(f, date=DATE) == 0
    part = tmp_path / "out" / f"dt={DATE}"
    assert ds.dataset(str(part), format="parquet").to_table().num_rows == 17


def test_two_jobs_files_never_replace_each_others_outputs(ray_cluster, tiny_model, tmp_path, capsys):
    """Output names hash the input's path below its root, so jobs of two jobs files writing one partition
    from inputs of the same file names would write the same names: the second is refused before it runs,
    naming the clash and the fix, and the first job's rows stay."""
    write_shards(tmp_path / "in_a", [10])
    write_shards(tmp_path / "in_b", [7])
    fa = write_jobs(tmp_path / "a.yaml", {"a": job(tiny_model, "in_a", "out")})
    fb = write_jobs(tmp_path / "b.yaml", {"b": job(tiny_model, "in_b", "out")})
    assert run_cli(fa, date=DATE) == 0
    capsys.readouterr()
    assert run_cli(fb, date=DATE) == 2
    _, err = capsys.readouterr()
    assert "jobs.b.output: part-000-" in err and "is job 'a''s output of " + str(tmp_path / "in_a" / "part-000.parquet") in err
    assert "fix: give each job its own output folder or partition" in err
    outs = _by_input(tmp_path / "out" / f"dt={DATE}")
    assert list(outs) == ["part-000.parquet"] and outs["part-000.parquet"].num_rows == 10
    assert run_cli(fa, date=DATE) == 0  # job a itself still runs (everything done)


def test_outputs_of_shards_gone_from_the_input_are_retired(ray_cluster, tiny_model, tmp_path, capsys):
    """Upstream compacts two shards into one: the rerun scores the new shard and removes the two outputs
    whose input is gone, so the partition holds each row once; a failed run leaves them and says so."""
    t = write_shards(tmp_path / "in", [12, 9])
    f = write_jobs(tmp_path / "jobs.yaml", {"a": job(tiny_model, "in", "out", runtime={"workers": 1})})
    assert run_cli(f, date=DATE) == 0
    part = tmp_path / "out" / f"dt={DATE}"
    old = sorted(_files(part))
    for p in (tmp_path / "in").glob("*.parquet"):
        p.unlink()
    pq.write_table(pa.concat_tables(t), tmp_path / "in" / "compacted.parquet")
    (tmp_path / "in" / "junk.parquet").write_bytes(b"PAR1 not parquet")  # fails: the old outputs must stay
    assert run_cli(f, date=DATE) == 3
    assert set(old) < set(_files(part)) and not (part / "_SUCCESS").exists()
    assert json.loads((part / "_report.json").read_text())["gone_left_in_place"] == old
    (tmp_path / "in" / "junk.parquet").unlink()
    capsys.readouterr()
    assert run_cli(f, date=DATE) == 0
    assert sorted(_by_input(part)) == ["compacted.parquet"] and sorted(_manifest(part)) == [
        n + ".json" for n in _files(part)]
    ids = pa.concat_tables(_files(part).values())["id"].to_pylist()
    assert sorted(ids) == sorted(pa.concat_tables(t)["id"].to_pylist())  # each row once
    report = json.loads((part / "_report.json").read_text())
    assert report["complete"] is True and report["retired"] == old and (part / "_SUCCESS").exists()
    assert f"a: removed 2 output(s) whose input shard is gone: {old[0]}" in capsys.readouterr().out


def test_shard_that_keeps_failing_is_retried_then_reported(ray_cluster, tiny_model, tmp_path):
    """An I/O error is not bad input: the shard is tried runtime.max_attempts times, then reported failed."""
    from scorer.jobs.plan import plan_job
    from scorer.jobs.runner import run_jobs
    from scorer.jobs.spec import load_and_check

    write_shards(tmp_path / "in", [10, 10])
    f = write_jobs(tmp_path / "jobs.yaml", {"a": job(tiny_model, "in", "out", runtime={"workers": 1, "max_attempts": 3})})
    [j] = load_and_check(f, date=DATE)
    plan = plan_job(j)
    gone = tmp_path / "in" / "part-001.parquet"
    gone.unlink()  # vanished between the plan and the read (FileNotFoundError names a .parquet path)
    [stats] = run_jobs([plan])
    assert stats.done == 1 and stats.retries == 2, stats
    assert list(stats.failed) == [str(gone)] and "FileNotFoundError" in stats.failed[str(gone)]
    part = tmp_path / "out" / f"dt={DATE}"
    assert len(_manifest(part)) == 1 and not (part / "_SUCCESS").exists()
    assert json.loads((part / "_report.json").read_text())["complete"] is False


def _worker_pids(prefix: bytes = b"ray::ShardWorker") -> set[int]:
    pids = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(prefix):
                pids.add(int(pid))
        except OSError:
            continue
    return pids


def _kill_first_busy_worker(stop: threading.Event, killed: list[int], exclude: set[int]) -> None:
    """SIGKILL the first actor process caught inside score_shard (its title is ray::ShardWorker.score_shard);
    `exclude`: actors of earlier tests that Ray is still tearing down (they keep that title)."""
    while not stop.is_set() and not killed:
        for pid in sorted(_worker_pids(b"ray::ShardWorker.score_shard") - exclude):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            killed.append(pid)
            return
        time.sleep(0.01)


def test_worker_killed_mid_shard(ray_cluster, tiny_model, tmp_path):
    tables = write_shards(tmp_path / "in", [120, 120, 120, 120])
    f = write_jobs(tmp_path / "jobs.yaml", {"a": job(tiny_model, "in", "out", batching={"chunk_rows": 8},
                                                     runtime={"workers": 2})})
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_first_busy_worker, args=(stop, killed, _worker_pids()), daemon=True)
    killer.start()
    try:
        assert run_cli(f, date=DATE, progress_interval=0.5) == 0
    finally:
        stop.set()
        killer.join()
    assert killed, "no worker was caught mid-shard"
    part = tmp_path / "out" / f"dt={DATE}"
    outs = _by_input(part)
    for i, t in enumerate(tables):
        assert outs[f"part-00{i}.parquet"]["id"].to_pylist() == t["id"].to_pylist()
    report = json.loads((part / "_report.json").read_text())
    assert report["this_run"]["shards"]["retries"] >= 1 and report["partition"]["rows"] == 480
    # the killed actor was replaced by a new one: 2 + 1 actors, the killed one among the first two
    workers = [w["worker"] for w in report["this_run"]["workers"]]
    assert len(workers) == 3 and [w.endswith(f":{killed[0]}") for w in workers].count(True) == 1, workers
    assert not workers[2].endswith(f":{killed[0]}")


def test_driver_killed_then_rerun(ray_cluster, tiny_model, tmp_path):
    import ray

    write_shards(tmp_path / "in", [60] * 6)
    spec = lambda out: job(tiny_model, "in", out, batching={"chunk_rows": 8}, runtime={"workers": 1, "shards_in_flight": 1})
    f = write_jobs(tmp_path / "jobs.yaml", {"a": spec("out"), "clean": spec("clean")})
    part = tmp_path / "out" / f"dt={DATE}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "scorer.cli", "run", str(f), "--job", "a", "--date", DATE,
                             "--address", ray_cluster], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while len(list((part / "_manifest").glob("*.json")) if (part / "_manifest").exists() else []) < 1:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 60  # Ray kills the dead driver's actors; wait until their GPUs are free
    while ray.available_resources().get("GPU", 0) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    done_before = _manifest(part)
    assert 1 <= len(done_before) < 6, "the driver finished before it could be killed"
    assert not (part / "_SUCCESS").exists()
    assert run_cli(f, date=DATE, jobs=["a"]) == 0
    after = _manifest(part)
    assert {k: v["run_id"] for k, v in after.items() if k in done_before} == {k: v["run_id"] for k, v in done_before.items()}
    new_runs = {v["run_id"] for k, v in after.items() if k not in done_before}
    assert len(after) == 6 and len(new_runs) == 1 and not new_runs & {v["run_id"] for v in done_before.values()}
    assert not (part / lake.TMP_DIR).exists() and (part / "_SUCCESS").exists()
    assert run_cli(f, date=DATE, jobs=["clean"]) == 0
    clean = _files(tmp_path / "clean" / f"dt={DATE}")
    got = _files(part)
    assert sorted(got) == sorted(clean)
    for name, t in clean.items():
        assert got[name].replace_schema_metadata(None).equals(t.replace_schema_metadata(None)), name


def test_s3_end_to_end(ray_cluster, s3, tiny_model, tmp_path, capfd):
    keys = [os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]]  # set by the s3_env fixture
    opts = lake.StorageOptions(endpoint=s3, region="us-east-1")
    fs = lake.resolve("s3://lake", opts).fs
    tables = write_shards("lake/e2e/dt=2026-11-22", [14, 0, 9], fs=fs)
    for p in tiny_model.iterdir():  # the model comes from the bucket too
        with fs.open_output_stream(f"lake/models/tiny/{p.name}") as out:
            out.write(p.read_bytes())
    spec = job("s3://lake/models/tiny", "s3://lake/e2e", "s3://scored/e2e", passthrough=["dt"],
               storage={"endpoint": "${TEST_S3_ENDPOINT}", "region": "us-east-1"})
    spec["output"]["partition"] = "scored_on={date}"  # dt is an input column here
    f = write_jobs(tmp_path / "jobs.yaml", {"a": spec})
    os.environ["TEST_S3_ENDPOINT"] = s3
    assert run_cli(f, date=DATE) == 0
    part = lake.resolve(f"s3://scored/e2e/scored_on={DATE}", opts)
    files = lake.list_files(part)
    assert "_SUCCESS" in files and "_report.json" in files
    outs = {}
    for name in files:
        if name.endswith(".parquet"):
            with fs.open_input_file(part.child(name).path) as fh:
                t = pq.read_table(fh)
            outs[Path(t.schema.metadata[b"scorer.input"].decode()).name] = t
    for i, t in enumerate(tables):
        out = outs[f"part-00{i}.parquet"]
        assert out["id"].to_pylist() == t["id"].to_pylist() and set(out["dt"].to_pylist()) <= {"2026-11-22"}
    assert len(lake.read_manifest(part)) == 3
    code = run_cli(f, date=DATE)  # everything committed: nothing to do, no Ray work
    assert code == 0
    # the keys came from the environment; nothing the run printed or wrote holds them
    written = b"".join(lake.get_bytes(part.child(n)) for n in files if not n.endswith(".parquet"))
    written += b"".join(json.dumps(e).encode() for e in lake.read_manifest(part).values())
    written += b"".join(json.dumps({k.decode(): v.decode() for k, v in t.schema.metadata.items()}).encode() for t in outs.values())
    printed = "".join(capfd.readouterr())
    assert "scorer run" in printed and "3 shard(s) to score" in printed  # summary and progress were captured
    for key in keys:
        assert key not in printed and key.encode() not in written


def test_dry_run_prints_the_plan(ray_cluster, tiny_model, tmp_path):
    write_shards(tmp_path / "in", [10, 20])
    f = write_jobs(tmp_path / "jobs.yaml", {"a": job(tiny_model, "in", "out")})
    r = CliRunner().invoke(app, ["run", str(f), "--dry-run", "--date", DATE])
    assert r.exit_code == 0, r.output
    assert "2 to do, 0 to skip; 30 rows to score" in r.output and "tokens/row" in r.output and "GPU-seconds" in r.output
    assert "runtime.dtype unset: planned as float32 for CPU workers" in r.output  # fake GPUs: none usable
    assert not (tmp_path / "out").exists()
    r = CliRunner().invoke(app, ["run", str(f), "--dry-run", "--date", DATE, "--set", "text=nope"])
    assert r.exit_code == 2 and "text column 'nope'" in r.output
    (tmp_path / "in" / "part-001.parquet").write_bytes(b"PAR1 not parquet")  # validation reads the first footer
    r = CliRunner().invoke(app, ["run", str(f), "--dry-run", "--date", DATE])
    assert r.exit_code == 0, r.output  # the plan names the shard a run would fail, and goes on
    row = next(ln for ln in r.output.splitlines() if "unreadable:" in ln)
    assert "in/part-001.p" in row and "Parquet magic bytes" in row and "10 rows to score" in r.output


def test_an_unset_dtype_follows_the_workers_the_cluster_gives(ray_cluster, tiny_model, tmp_path, monkeypatch, capfd):
    """runtime.dtype unset: shards are fingerprinted with the dtype the workers score in. The cluster's GPUs
    decide the plan (also where the guess before joining it said CPU), and the workers' own report decides
    in the end: this cluster's (fake) GPU workers see no GPU and score in float32 on the CPU, like the CPU
    workers before them, so nothing is scored twice, and the log says why. Each manifest entry records
    the device and dtype its worker scored in."""
    from scorer.jobs import plan as plan_mod

    write_shards(tmp_path / "in", [6, 5])
    f = write_jobs(tmp_path / "jobs.yaml", {"a": job(tiny_model, "in", "out", runtime={"workers": 1})})
    part = tmp_path / "out" / f"dt={DATE}"
    assert run_cli(f, date=DATE, sets=["runtime.device=cpu"]) == 0
    first = _manifest(part)
    assert {(e["device"], e["dtype"]) for e in first.values()} == {("cpu", "float32")}
    assert run_cli(f, date=DATE, sets=["runtime.device=cpu"]) == 0 and _manifest(part) == first
    calls = []
    real = plan_mod.plan_job
    answers = iter([0])  # the guess before Ray: no GPU here; then a cluster with GPUs it calls usable
    monkeypatch.setattr(plan_mod, "cluster_gpus", lambda: next(answers, 2))
    monkeypatch.setattr("scorer.jobs.runner.cluster_gpus", plan_mod.cluster_gpus)
    monkeypatch.setattr("scorer.jobs.runner.plan_job", lambda j, **kw: calls.append(kw.get("gpu")) or real(j, **kw))
    capfd.readouterr()
    assert run_cli(f, date=DATE) == 0  # device auto on a cluster with (fake) GPUs: GPU workers...
    err = capfd.readouterr().err
    assert calls == [None, True, False]  # the guess (CPU), the cluster (GPU), the workers (CPU after all)
    assert "1 worker(s) were given a GPU by Ray (CUDA_VISIBLE_DEVICES " in err and "score on the CPU" in err
    assert "planned for bfloat16, but the workers score in float32" in err and "0 shard(s) to score" in err
    assert _manifest(part) == first  # ... which scored in float32 on the CPU: the shards are done
    assert run_cli(f, date=DATE, sets=["runtime.dtype=bfloat16"]) == 0  # a set dtype the workers follow
    redone = _manifest(part)
    assert all(redone[k]["run_id"] != first[k]["run_id"] for k in first)
    assert {e["dtype"] for e in redone.values()} == {"bfloat16"}
