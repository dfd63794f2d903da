"""jobs.yaml validation: every problem is one line naming the file's line, the field and the fix; exit 2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from helpers import job, shard_table, write_jobs, write_shards
from scorer.cli import app
from scorer.jobs.expr import FilterError, compile_filter, parse_text
from scorer.jobs.spec import SpecError, load, load_and_check

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def lake(tmp_path, tiny_model):
    write_shards(tmp_path / "in", [6, 4])
    return tmp_path


def validate(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(app, ["validate", *args])
    return r.exit_code, r.output


def one_error(out: str) -> str:
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1, out
    assert lines[0].startswith("error: ") and " — fix: " in lines[0], out
    return lines[0]


def test_valid_file_and_summary(lake, tiny_model):
    f = write_jobs(lake / "jobs.yaml", {"a": job(tiny_model, "in", "out"), "b": job(tiny_model, "in/*.parquet", "out2", task="embed")})
    code, out = validate(str(f), "--date", "2026-11-23")
    assert code == 0, out
    assert "ok: a: classify" in out and "2 shard(s)" in out and "out/dt=2026-11-23" in out
    assert "ok: b: embed" in out
    code, out = validate(str(f), "--job", "b")
    assert code == 0 and "ok: a" not in out


def test_date_in_input_and_output_and_id_columns(tmp_path, tiny_model):
    write_shards(tmp_path / "in" / "dt=2026-01-02", [3])
    write_shards(tmp_path / "in" / "dt=2026-01-03", [4, 5])
    spec = job(tiny_model, "in/dt={date}", "out/{date}", id=["id", "n"], passthrough=[])
    spec["output"]["partition"] = "scored={date}/v=1"
    f = write_jobs(tmp_path / "jobs.yaml", {"a": spec})
    [j] = load_and_check(f, date="2026-01-03")
    assert j.input.path == str(tmp_path / "in" / "dt=2026-01-03") and len(j.shards) == 2
    assert j.partition.path == str(tmp_path / "out" / "2026-01-03" / "scored=2026-01-03" / "v=1")
    assert j.job.id == ["id", "n"] and j.read_columns == ["id", "n", "text"]
    [j] = load_and_check(f, date="2026-01-02")
    assert len(j.shards) == 1
    code, out = validate(str(f), "--date", "2026-01-04")
    assert code == 2 and "no Parquet files at " + str(tmp_path / "in" / "dt=2026-01-04") in one_error(out)


def test_relative_paths_follow_the_jobs_file(lake, tiny_model, monkeypatch):
    f = write_jobs(lake / "jobs.yaml", {"a": job(tiny_model, "in", "out")})
    monkeypatch.chdir("/")
    [j] = load_and_check(f, date="2026-01-02")
    assert j.input.path == str(lake / "in") and j.partition.path == str(lake / "out" / "dt=2026-01-02")
    assert len(j.shards) == 2 and "text" in j.input_schema.names


BAD_YAML = """\
jobs:
  a:
    model: {model}
    input: in
    text: text
    id: id
    output: out
    runtime:
      device: gpu
"""


@pytest.mark.parametrize(
    "edit, line, field, fix",
    [
        (lambda s: s, 9, "jobs.a.runtime.device", "use 'auto', 'cuda' or 'cpu'"),
        (lambda s: s.replace("device: gpu", "devcie: cpu"), 9, "jobs.a.runtime.devcie", "did you mean 'device'"),
        (lambda s: s.replace("device: gpu", "workers: two"), 9, "jobs.a.runtime.workers", "give a whole number"),
        (lambda s: s.replace("    id: id\n", "").replace("device: gpu", "device: cpu"), 2, "jobs.a.id", "add `id:`"),
        (lambda s: s.replace("text: text", "text: [a"), 6, "flow sequence at line 5", "check indentation and quoting"),
        (lambda s: s.replace("    id: id\n", "    id: id\n    id: other\n"), 7, "jobs.a.id", "keep one of them"),
        (lambda s: s.replace("jobs:", "jbos:"), 1, "jbos", "did you mean 'jobs'"),
    ],
    ids=["literal", "unknown-key", "wrong-type", "missing", "yaml-syntax", "duplicate-key", "top-level"],
)
def test_schema_errors_name_line_field_and_fix(lake, tiny_model, edit, line, field, fix):
    f = lake / "jobs.yaml"
    f.write_text(edit(BAD_YAML.format(model=tiny_model)))
    code, out = validate(str(f))
    assert code == 2
    msg = one_error(out)
    assert msg.startswith(f"error: {f}:{line}:"), msg
    assert field in msg and fix in msg, msg


@pytest.mark.parametrize(
    "override, field, words",
    [
        ({"text": "body"}, "jobs.a.text", "text column 'body' is not in the input"),
        ({"text": "n"}, "jobs.a.text", "is int64, not a string"),
        ({"passthrough": ["lang", "nope"]}, "jobs.a.passthrough", "column 'nope' is not in the input"),
        ({"id": "label"}, "jobs.a.id", "clash with a score column"),
        ({"passthrough": ["scores"]}, "jobs.a.passthrough", "clash with a score column"),
        ({"filter": "lang = 'en'"}, "jobs.a.filter", "is not an expression"),
        ({"filter": "missing > 3"}, "jobs.a.filter", "filter column 'missing'"),
        ({"filter": "n == 'x'"}, "jobs.a.filter", "does not apply to the input's types"),
        ({"filter": "__import__('os').system('x')"}, "jobs.a.filter", "only plain function calls"),
        ({"output": "in/sub"}, "jobs.a.output", "overlaps input"),
        ({"input": "nowhere/*.parquet"}, "jobs.a.input", "no Parquet files"),
        ({"model": "/"}, "jobs.a.model", "has no config.json"),
        ({"output": {"uri": "out", "partition": "../x"}}, "jobs.a.output.partition", "must stay below"),
        ({"labels": {"dimensions": 1000}}, "jobs.a.labels.dimensions", "more than the model's hidden size 64"),
        ({"passthrough": ["lang", "dt"]}, "jobs.a.passthrough", "also a key of the output partition"),
        # pyarrow refusing what the filter asks of it: each was a traceback (exit 1)
        ({"filter": 'lang in ["en", 1]'}, "jobs.a.filter", "does not compile: Expected bytes"),
        ({"filter": 'len("abc") > 2'}, "jobs.a.filter", "does not compile"),
        ({"filter": "n > 99999999999999999999999"}, "jobs.a.filter", "does not compile"),
        ({"filter": "not " * 2000 + 'lang == "en"'}, "jobs.a.filter", "does not compile"),
        ({"output": {"uri": "out", "partition": "dt={dat}"}}, "jobs.a.output.partition", "placeholder other than {date}"),
        ({"output": {"uri": "out", "partition": "_staging/dt={date}"}}, "jobs.a.output.partition",
         "folder '_staging' that Parquet dataset readers skip"),
        # every worker's Scorer would refuse it, after Ray started: exit 3 instead of 2
        ({"batching": {"max_length": 1}}, "jobs.a.batching.max_length", "leaves no room beside the 1 special token"),
    ],
)
def test_lake_checks(lake, tiny_model, override, field, words):
    f = write_jobs(lake / "jobs.yaml", {"a": {**job(tiny_model, "in", "out"), **override}})
    code, out = validate(str(f))
    assert code == 2, out
    msg = one_error(out)
    assert msg.startswith(f"error: {f}:{_line_of(f, field)}: {field}: "), msg  # the line of the field at fault
    assert words in msg, msg


def _line_of(f: Path, field: str) -> int:
    """1-based line of the last key of a dotted field in a jobs.yaml written by write_jobs."""
    key = field.rsplit(".", 1)[-1] + ":"
    return 1 + next(i for i, ln in enumerate(f.read_text().splitlines()) if ln.strip().startswith(key))


def test_template_over_a_column_that_is_not_text(tmp_path, tiny_model):
    """A template casts each column to text: a list column fails validation, naming the column."""
    t = shard_table(0, 4)
    pq.write_table(t.append_column("tags", pa.array([["a", "b"]] * 4)), tmp_path / "t.parquet")
    f = write_jobs(tmp_path / "jobs.yaml", {"a": {**job(tiny_model, "t.parquet", "out"), "text": "{title} {tags}"}})
    code, out = validate(str(f))
    msg = one_error(out)
    assert code == 2 and "jobs.a.text: text template column 'tags' is list<" in msg, msg
    assert "fix: use columns of scalar types" in msg, msg


def test_model_that_does_not_load(lake, tiny_model):
    broken = lake / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "config.json").write_text('{"architectures": ["GPT2Model"], "model_type": "gpt2"}')
    f = write_jobs(lake / "jobs.yaml", {"a": job(broken, "in", "out")})
    code, out = validate(str(f))
    assert code == 2 and "does not load" in one_error(out)
    assert one_error(out).startswith(f"error: {f}:{_line_of(f, 'model')}: jobs.a.model: "), out
    (broken / "config.json").write_text((tiny_model / "config.json").read_text())
    (broken / "tokenizer.json").write_text("{not json")
    code, out = validate(str(f))
    assert code == 2 and "tokenizer.json does not load" in one_error(out)
    shutil.copy(tiny_model / "tokenizer.json", broken / "tokenizer.json")
    (broken / "model.safetensors").unlink()
    code, out = validate(str(f))
    assert code == 2 and "has no model.safetensors" in one_error(out)


def test_two_jobs_one_output(lake, tiny_model):
    f = write_jobs(lake / "jobs.yaml", {"a": job(tiny_model, "in", "out"), "b": job(tiny_model, "in", "out")})
    code, out = validate(str(f))
    assert code == 2 and "both write" in one_error(out)
    code, out = validate(str(f), "--job", "a")  # the job left out still writes there on its own nights
    assert code == 2 and "jobs 'a' and 'b' both write" in one_error(out)
    f = write_jobs(lake / "jobs.yaml", {"a": job(tiny_model, "in", "out"), "b": job(tiny_model, "in", "out"),
                                        "c": {**job(tiny_model, "in", "out2"), "filter": "lang =="}})
    code, out = validate(str(f), "--job", "a")  # a broken job left out does not switch the check off
    assert code == 2 and "jobs 'a' and 'b' both write" in one_error(out)


def test_env_interpolation_defaults_and_set(lake, tiny_model, monkeypatch):
    f = write_jobs(lake / "jobs.yaml", {"a": job("${TINY}", "in", "${OUT:-out}/x$${y}", filter="n >= 0")},
                   defaults={"runtime": {"device": "cpu"}, "batching": {"max_rows": 8}})
    code, out = validate(str(f))
    line = 1 + next(i for i, ln in enumerate(f.read_text().splitlines()) if "${TINY}" in ln)
    assert code == 2 and "environment variable TINY is not set" in one_error(out) and f"{f}:{line}: jobs.a.model" in out
    monkeypatch.setenv("TINY", str(tiny_model))
    [j] = load_and_check(f, sets=["batching.max_rows=64", "jobs.a.labels.return_logits=true", "text={title}: {text}"])
    assert j.model.path == str(tiny_model) and j.partition.uri.endswith("out/x${y}/dt=" + j.partition.uri[-10:])
    assert j.job.runtime.device == "cpu" and j.job.batching.max_rows == 64 and j.job.labels.return_logits is True
    assert j.text.columns == ("title", "text")
    with pytest.raises(SpecError, match=r"--set batching.max_rows=x: jobs.a.batching.max_rows"):
        load(f, sets=["batching.max_rows=x"])
    with pytest.raises(SpecError, match=r"--set defaults.runtime.device=gpu: jobs.a.runtime.device: 'gpu'"):
        load(f, sets=["defaults.runtime.device=gpu"])
    f.write_text(f.read_text().replace("device: cpu", "device: gpu"))  # a default's error names the defaults line
    line = 1 + next(i for i, ln in enumerate(f.read_text().splitlines()) if "device: gpu" in ln)
    with pytest.raises(SpecError, match=rf"jobs.yaml:{line}: jobs.a.runtime.device: 'gpu' is not allowed — fix: use"):
        load(f)


def test_secrets_are_not_part_of_the_schema(lake, tiny_model):
    f = write_jobs(lake / "jobs.yaml", {"a": job(tiny_model, "in", "out", storage={"endpoint": "http://x", "secret_key": "s"})})
    code, out = validate(str(f))
    assert code == 2 and "unknown key 'secret_key'" in out and "remove it" in out


def test_a_jobs_file_that_is_not_utf8(lake, tiny_model):
    f = lake / "jobs.yaml"
    f.write_bytes(f"jobs:\n  a:\n    model: {tiny_model}\n    input: in\n    id: id\n    output: out  # caf\xe9\n"
                  .encode("latin-1"))
    code, out = validate(str(f))
    assert code == 2 and one_error(out).startswith(f"error: {f}:6: not UTF-8 text (byte 0xe9)"), out
    assert "fix: save the file as UTF-8" in out


def test_set_of_a_job_that_is_not_there(lake, tiny_model):
    """--set jobs.<typo>.field=... used to invent a job, then report that job's missing model."""
    f = write_jobs(lake / "jobs.yaml", {"reviews": job(tiny_model, "in", "out")})
    code, out = validate(str(f), "--set", "jobs.revews.batching.max_rows=64")
    assert code == 2, out
    msg = one_error(out)
    assert "no job named 'revews' (jobs: reviews)" in msg and "fix: write jobs.reviews.batching.max_rows" in msg, msg


def test_filter_and_template_compile():
    t = pa.table({"lang": ["en", "de", None, "en"], "body": ["a" * 30, "bb", "x", None], "n": [1, 2, 3, 4]})
    cases = {
        'lang == "en" and len(body) > 20': [1],
        'lang in ["de"] or n >= 4': [2, 4],
        "lang is None": [3],
        "not (n < 2) and body is not None": [2, 3],
        "1 < n <= 3": [2, 3],
        'starts_with(body, "b") or contains(lang, "e") and n > 3': [2, 4],
        'col("n") == -1': [],
    }
    for src, want in cases.items():
        expr, _ = compile_filter(src)
        assert t.filter(expr)["n"].to_pylist() == want, src
    for bad in ["open('x')", "a.b", "a == None", "a in b", "lambda: 1", "1"]:
        with pytest.raises(FilterError):
            compile_filter(bad)
    spec = parse_text("{lang}: {body}")
    assert spec.build(t).to_pylist() == ["en: " + "a" * 30, "de: bb", ": x", "en: "]
    spec = parse_text("{body}")
    assert spec.build(t.slice(3)).to_pylist() == [None]  # all template columns null -> null text
    assert parse_text("text").is_column


def test_repository_jobs_yaml_validates(tmp_path, tiny_model):
    """The root jobs.yaml (README's first command) is valid; its model arrives with the demo issue."""
    data = REPO / "examples" / "data" / "debian"
    if not data.exists():
        pytest.skip("demo data not built yet")
    code, out = validate(str(REPO / "jobs.yaml"), "--set", f"model={tiny_model}")
    assert code == 0, out


def test_s3_storage_options_and_credentials_never_printed(s3, tiny_model, tmp_path, monkeypatch, capfd):
    """endpoint / region / anonymous reach the S3 client; keys come from the environment and are never shown."""
    from scorer.jobs import lake as lk

    keys = [os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]]  # set by the s3_env fixture

    fs = lk.resolve("s3://lake", lk.StorageOptions(endpoint=s3, region="us-east-1")).fs
    write_shards("lake/spec-test/in/dt=2026-11-23", [3, 4], fs=fs)

    def jobs_file(name: str, **storage) -> Path:
        spec = job(tiny_model, "s3://lake/spec-test/in/dt={date}", "s3://scored/spec-test", storage=storage)
        return write_jobs(tmp_path / name, {"a": spec})

    monkeypatch.setenv("TEST_S3", s3)
    code, out = validate(str(jobs_file("ok.yaml", endpoint="${TEST_S3}", region="us-east-1")), "--date", "2026-11-23")
    assert code == 0 and "2 shard(s) at s3://lake/spec-test/in/dt=2026-11-23" in out, out
    # anonymous requests: the server wants signed ones, so the input cannot be listed
    f = jobs_file("anon.yaml", endpoint=s3, anonymous=True)
    code, out = validate(str(f), "--date", "2026-11-23")
    msg = one_error(out)
    assert code == 2 and msg.startswith(f"error: {f}:{_line_of(f, 'input')}: jobs.a.input: cannot list"), msg
    # a wrong secret in the environment (a new endpoint spelling: a new client reads it): exit 2, never echoed
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-0xdeadbeef")
    code, out = validate(str(jobs_file("bad.yaml", endpoint=s3 + "/", region="us-east-1")), "--date", "2026-11-23")
    assert code == 2 and "jobs.a.input: cannot list" in one_error(out), out
    printed = out + "".join(capfd.readouterr())
    for secret in (*keys, "wrong-secret-0xdeadbeef"):
        assert secret not in printed


def _validate_in_a_new_process(f: Path, secret: str, cache: Path) -> tuple[int, str]:
    """`scorer validate` with another secret key in the environment (a process of its own: pyarrow's S3
    filesystems of this one hold the right credentials)."""
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": secret, "SCORER_CACHE": str(cache), "RAY_USAGE_STATS_ENABLED": "0"}
    r = subprocess.run([sys.executable, "-m", "scorer.cli", "validate", str(f), "--date", "2026-11-23"],
                       capture_output=True, text=True, timeout=120, env=env, cwd=str(REPO))
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    return r.returncode, r.stdout + r.stderr


def test_s3_output_and_model_that_the_credentials_cannot_read(s3, tiny_model, tmp_path):
    """An S3 output the credentials cannot list passed validate, and `scorer run` died in the plan with a
    traceback; an S3 model they cannot read was told to 'point at a model directory'."""
    write_shards(tmp_path / "in", [3])
    storage = {"endpoint": s3, "region": "us-east-1"}
    f = write_jobs(tmp_path / "out.yaml", {"a": job(tiny_model, str(tmp_path / "in"), "s3://scored/creds", storage=storage)})
    code, out = _validate_in_a_new_process(f, "wrong-secret-0xdeadbeef", tmp_path / "cache")
    msg = one_error(out)
    assert code == 2 and "jobs.a.output: cannot list s3://scored/creds/dt=2026-11-23" in msg, msg
    assert "fix: check the output path, the storage endpoint and the credentials" in msg and "deadbeef" not in msg
    from scorer.jobs import lake

    model = lake.resolve("s3://lake/models/creds", lake.StorageOptions(endpoint=s3, region="us-east-1"))
    for p in tiny_model.iterdir():
        with model.fs.open_output_stream(model.child(p.name).path) as dst:
            dst.write(p.read_bytes())
    f = write_jobs(tmp_path / "model.yaml", {"a": job(model.uri, str(tmp_path / "in"), str(tmp_path / "out"), storage=storage)})
    code, out = _validate_in_a_new_process(f, "wrong-secret-0xdeadbeef", tmp_path / "cache")
    msg = one_error(out)
    assert code == 2 and "jobs.a.model: cannot read s3://lake/models/creds" in msg, msg
    assert "fix: check the path, the storage endpoint and the credentials" in msg and "deadbeef" not in msg


def test_worker_config_carries_the_output_types_and_cuda_graphs(lake, tiny_model):
    """What the actors get from the validated job: the id/passthrough types of the first input file (every
    output is written in them) and runtime.cuda_graphs."""
    from scorer.jobs.runner import _worker_config

    f = write_jobs(lake / "jobs.yaml", {"a": job(tiny_model, "in", "out", passthrough=["lang", "n"]),
                                        "b": job(tiny_model, "in", "out2", runtime={"cuda_graphs": False})})
    a, b = load_and_check(f, date="2026-11-23")
    ca, cb = _worker_config(a, "r", "cpu"), _worker_config(b, "r", "cpu")
    assert ca.keep == ("id", "lang", "n") and ca.keep_types == {"id": pa.string(), "lang": pa.string(), "n": pa.int64()}
    assert ca.keep_types_from == a.shards[0].uri and ca.cuda_graphs is True and cb.cuda_graphs is False
