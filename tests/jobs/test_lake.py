"""Data-lake I/O: deterministic shard listing, bounded reads, atomic commits, manifest; local and S3."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from helpers import shard_table, write_shards
from scorer.jobs import lake


def _touch_parquet(path, rows=3):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(shard_table(0, rows), path)


def test_listing_file_folder_glob_hive(tmp_path):
    root = tmp_path / "ds"
    for rel in ["dt=2026-11-02/region=eu/b.parquet", "dt=2026-11-02/region=eu/a.parquet", "dt=2026-11-01/x.parquet",
                "dt=2026-11-01/_tmp/hidden.parquet", "dt=2026-11-01/.x.parquet", "top.parquet"]:
        _touch_parquet(root / rel)
    (root / "dt=2026-11-01" / "notes.txt").write_text("not data")
    (root / "_SUCCESS").write_text("")
    loc = lake.resolve(str(root))
    rels = [s.rel for s in lake.list_shards(loc)]
    assert rels == ["dt=2026-11-01/x.parquet", "dt=2026-11-02/region=eu/a.parquet", "dt=2026-11-02/region=eu/b.parquet", "top.parquet"]
    shards = lake.list_shards(loc)
    assert shards[1].partition == (("dt", "2026-11-02"), ("region", "eu"))
    assert "region" in lake.read_schema(shards[1], loc).names
    assert [s.rel for s in lake.list_shards(lake.resolve(f"{root}/dt=*/*.parquet"))] == ["dt=2026-11-01/x.parquet"]
    assert [s.rel for s in lake.list_shards(lake.resolve(f"{root}/**/a.parquet"))] == ["dt=2026-11-02/region=eu/a.parquet"]
    assert [s.rel for s in lake.list_shards(lake.resolve(f"file://{root}/top.parquet"))] == ["top.parquet"]
    assert lake.list_shards(lake.resolve(str(tmp_path / "missing"))) == []
    # output names: deterministic, distinct for equal file names in different folders
    names = {s.output_name for s in lake.list_shards(loc)}
    assert len(names) == 4 and all(n.endswith(".parquet") for n in names)
    assert lake.list_shards(loc)[0].output_name == shards[0].output_name


@pytest.mark.parametrize("rel,stem", [("part-000.parquet", "part-000"), ("dt=1/a b.parquet", "a_b"),
                                      ("été.parquet", "t_"), ("#1.parquet", "1"), ("_x.parquet", "x"),
                                      (".x.pq", "x"), ("数据.parquet", "shard"), ("__.parquet", "shard")])
def test_output_names_are_never_hidden_from_readers(rel, stem):
    """Dataset readers skip files whose names start with `_` or `.`: an output named so would hold committed
    rows that nobody sees. The stem drops such leading characters (the hash keeps names distinct)."""
    name = lake.Shard(uri=f"/in/{rel}", path=f"/in/{rel}", rel=rel, size=1, mtime_ns=0).output_name
    assert name.startswith(stem + "-") and name.endswith(".parquet") and len(name) == len(stem) + 19, name


def test_iter_batches_bounded_in_order_with_partition_columns(tmp_path):
    root = tmp_path / "dt=2026-11-23"
    [t] = write_shards(root, [50], row_group_size=8)
    loc = lake.resolve(str(tmp_path))
    [s] = lake.list_shards(loc)
    chunks = list(lake.iter_batches(s, loc, ["id", "dt", "n"], 8))
    assert all(c.num_rows <= 8 for c in chunks)
    got = pa.concat_tables(chunks)
    assert got["id"].to_pylist() == t["id"].to_pylist()
    assert set(got["dt"].to_pylist()) == {"2026-11-23"}
    with pytest.raises(KeyError, match="no column"):
        list(lake.iter_batches(s, loc, ["nope"], 8))


def test_a_file_column_named_like_a_hive_key_keeps_the_files_values(tmp_path):
    """lang=en/ holding a file with its own `lang` column: the file's values are read (as read_schema's
    type is the file's), never replaced by the folder's."""
    t = shard_table(0, 6)  # lang alternates
    (tmp_path / "lang=en").mkdir()
    pq.write_table(t, tmp_path / "lang=en" / "a.parquet")
    loc = lake.resolve(str(tmp_path))
    [s] = lake.list_shards(loc)
    got = pa.concat_tables(lake.iter_batches(s, loc, ["id", "lang"], 4))
    assert got["lang"].to_pylist() == t["lang"].to_pylist() and len(set(t["lang"].to_pylist())) > 1


def test_staged_commit_is_atomic_and_stale_files_are_cleaned(tmp_path):
    part = lake.resolve(str(tmp_path / "out" / "dt=1"))
    dest = part.child("a.parquet")
    t = shard_table(0, 10)
    st = lake.StagedParquet(dest, t.schema)
    st.write(t.slice(0, 5))
    assert not os.path.exists(dest.path)  # nothing visible before commit
    assert lake.list_shards(part) == []  # the staging file is hidden from dataset readers
    assert not list(Path(tmp_path).glob("**/*.parquet"))  # and from readers that glob "**/*.parquet" (polars)
    st.write(t.slice(5))
    size = st.commit()
    assert pq.read_table(dest.path).equals(t) and size == os.path.getsize(dest.path)
    st = lake.StagedParquet(part.child("b.parquet"), t.schema)
    st.write(t)  # a first row group is on disk ...
    with pytest.raises(ValueError):
        st.write(pa.table({"other": [1]}))  # ... then the writer fails
    st.abort()
    assert not os.path.exists(part.child("b.parquet").path) and lake.list_files(part.child(lake.TMP_DIR)) == {}
    # a killed run leaves a staging file: the next run's clean_stale removes it
    lake.StagedParquet(part.child("c.parquet"), t.schema).writer.close()
    assert len(lake.list_files(part.child(lake.TMP_DIR))) == 1
    assert lake.clean_stale(part) >= 1 and lake.list_files(part.child(lake.TMP_DIR)) == {}
    lake.write_manifest_entry(part, "a.parquet", {"fingerprint": "f", "bytes": size})
    assert lake.read_manifest(part) == {"a.parquet": {"fingerprint": "f", "bytes": size}}
    assert lake.overlaps(lake.resolve(str(tmp_path / "out")), part)
    assert not lake.overlaps(lake.resolve(str(tmp_path / "out2")), part)
    assert not lake.overlaps(lake.resolve("s3://b/out"), lake.resolve("/b/out"))


def test_s3_round_trip(s3):
    opts = lake.StorageOptions(endpoint=s3, region="us-east-1")
    fs = lake.resolve("s3://lake/x", opts).fs
    write_shards("lake/lake-test/in/dt=2026-11-23", [5, 0, 7], fs=fs)
    loc = lake.resolve("s3://lake/lake-test/in", opts)
    shards = lake.list_shards(loc)
    assert [s.rel for s in shards] == [f"dt=2026-11-23/part-00{i}.parquet" for i in range(3)]
    assert shards[0].uri == "s3://lake/lake-test/in/dt=2026-11-23/part-000.parquet" and shards[0].size > 0
    assert [s.rel for s in lake.list_shards(lake.resolve("s3://lake/lake-test/in/*/part-00[12].parquet", opts))] == [
        "dt=2026-11-23/part-001.parquet", "dt=2026-11-23/part-002.parquet"]
    got = pa.concat_tables(lake.iter_batches(shards[2], loc, ["id", "dt"], 3))
    assert got.num_rows == 7 and got["dt"].to_pylist() == ["2026-11-23"] * 7
    part = lake.resolve("s3://scored/lake-test/dt=2026-11-23", opts)
    t = shard_table(1, 20)
    st = lake.StagedParquet(part.child("a.parquet"), t.schema)
    st.write(t)
    assert lake.list_files(part) == {}  # staged on local disk, nothing in the bucket yet
    size = st.commit()
    with fs.open_input_file(part.child("a.parquet").path) as f:
        assert pq.read_table(f).equals(t)
    assert lake.list_files(part) == {"a.parquet": size}
    lake.write_manifest_entry(part, "a.parquet", {"fingerprint": "x", "bytes": size})
    assert lake.read_manifest(part)["a.parquet"]["bytes"] == size
    lake.write_marker(part, "_SUCCESS")
    assert "_SUCCESS" in lake.list_files(part)
    # a writer that fails after some row groups leaves no object behind: pyarrow would complete an upload
    # from a failing `with fs.open_output_stream()`, so the upload starts only with a complete local file
    st = lake.StagedParquet(part.child("b.parquet"), t.schema)
    st.write(t)
    with pytest.raises(ValueError):
        st.write(pa.table({"other": [1]}))
    st.abort()
    assert "b.parquet" not in lake.list_files(part) and not os.path.exists(st.stage)
    # an upload that fails (refused: unsigned) raises, and leaves neither an object nor its spool file
    anon = lake.StorageOptions(endpoint=s3, region="us-east-1", anonymous=True)
    st = lake.StagedParquet(lake.resolve(part.child("c.parquet").uri, anon), t.schema)
    st.write(t)
    with pytest.raises(OSError):
        st.commit()
    assert "c.parquet" not in lake.list_files(part) and not os.path.exists(st.stage)
    # an object above pyarrow's single-PUT size (a multipart upload) is complete when commit returns
    big = pa.table({"blob": pa.array([os.urandom(1 << 20) for _ in range(12)], pa.binary())})
    st = lake.StagedParquet(part.child("big.parquet"), big.schema, compression="none")
    st.write(big)
    size = st.commit()
    assert size > 12 << 20 and lake.list_files(part)["big.parquet"] == size
    with fs.open_input_file(part.child("big.parquet").path) as f:
        assert pq.read_table(f).equals(big)



def test_s3_client_follows_credentials_rotated_in_the_environment(s3, monkeypatch):
    """A long-lived driver caches its S3 client per storage settings (lake._s3); keys rotated in its
    environment must still reach the next call, since the AWS SDK's provider chain under pyarrow reads the
    environment per request: wrong keys are refused, the right ones then work, in the same process."""
    opts = lake.StorageOptions(endpoint=s3, region="us-east-1")
    write_shards("lake/rotate/in", [4], fs=lake.resolve("s3://lake/x", opts).fs)
    loc = lake.resolve("s3://lake/rotate/in", opts)
    assert len(lake.list_shards(loc)) == 1
    good = os.environ["AWS_SECRET_ACCESS_KEY"]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "a-revoked-secret")
    with pytest.raises(OSError):
        lake.list_shards(lake.resolve("s3://lake/rotate/in", opts))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", good)
    assert len(lake.list_shards(lake.resolve("s3://lake/rotate/in", opts))) == 1
    assert lake.resolve("s3://lake/x", opts).fs is lake.resolve("s3://lake/y", opts).fs  # still cached

def test_iter_batches_memory_stays_near_a_row_group(tmp_path):
    """A large shard is read row group by row group: Arrow memory in flight stays well under the file's."""
    n = 200_000
    t = pa.table({"id": pa.array([f"r{i:08d}" for i in range(n)]), "text": pa.array([f"word {i} " * 8 for i in range(n)])})
    pq.write_table(t, tmp_path / "big.parquet", row_group_size=n // 16)
    full = t.nbytes
    del t
    loc = lake.resolve(str(tmp_path / "big.parquet"))
    [s] = lake.list_shards(loc)
    base, peak, rows = pa.total_allocated_bytes(), 0, 0
    for chunk in lake.iter_batches(s, loc, ["id", "text"], 4096):
        peak = max(peak, pa.total_allocated_bytes() - base)
        rows += chunk.num_rows
    assert rows == n and peak < 0.5 * full, (peak, full)  # ~1/3 measured (a few row groups); a whole read is > 1


def test_an_interrupted_model_download_leaves_no_partial_file(s3, tmp_path, monkeypatch):
    """A download cut mid-file left `.<name>.<pid>` in the cache for good (the next process writes under its
    own pid); the retry then completes."""
    import builtins

    opts = lake.StorageOptions(endpoint=s3, region="us-east-1")
    loc = lake.resolve("s3://lake/models/partial", opts)
    for name, data in (("config.json", b'{"a": 1}'), ("model.safetensors", b"W" * (20 << 20))):
        with loc.fs.open_output_stream(loc.child(name).path) as out:
            out.write(data)
    real_open = builtins.open

    class Cut:  # the copy of the weights breaks after its first 16 MiB chunk
        def __init__(self, f):
            self.f, self.writes = f, 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.writes += 1
            if self.writes > 1:
                raise OSError("connection reset by peer")
            return self.f.write(data)

    def cut(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return Cut(f) if "w" in mode and ".model.safetensors." in str(path) else f

    with monkeypatch.context() as m:
        m.setattr(builtins, "open", cut)
        with pytest.raises(OSError, match="connection reset"):
            lake.fetch_model_dir(loc, cache=tmp_path)
    [root] = (tmp_path / "models").iterdir()
    assert sorted(p.name for p in root.iterdir()) == ["config.json"]  # no partial weights, no .complete
    d = lake.fetch_model_dir(loc, cache=tmp_path)
    assert (d / "model.safetensors").stat().st_size == 20 << 20
