"""What the driver shows: rich bars (shards, rows, tokens/s overall and per worker), log lines off a terminal,
and the summary table (rows, tokens, padding efficiency, throughput, label distribution, failed shards)."""

from __future__ import annotations

import re
import time

from rich.console import Console

from scorer.jobs.display import JobStats, Progress, print_summary
from scorer.jobs.worker import ShardResult


def stats() -> JobStats:
    s = JobStats("clf", total=5, skipped=1)
    s.add(ShardResult(name="a", input="in/a", rows=10, tokens=400, padded_tokens=500, labels={"x": 7, "y": 3},
                      worker="host:11", seconds=2.0))
    s.add(ShardResult(name="b", input="in/b", rows=30, tokens=1200, padded_tokens=1500, labels={"x": 21, "y": 9},
                      worker="host:12", seconds=4.0))
    s.failed["in/c.parquet"] = "bad input (ArrowInvalid): Parquet magic bytes not found in footer."
    s.finished = s.started + 4.0
    return s


def test_summary_table():
    c = Console(record=True, width=200)
    print_summary([stats()], c)
    text = c.export_text()
    header = text.splitlines()[1]
    for col in ("job", "done", "skipped", "failed", "rows", "tokens", "pad eff.", "rows/s", "tok/s", "labels"):
        assert col in header, text
    row = next(ln for ln in text.splitlines() if ln.lstrip().startswith("clf"))
    cells = [c.strip() for c in row.split("│")]
    assert cells == ["clf", "2", "1", "1", "40", "1,600", "80.0%", "10.0", "400", "x 70%, y 30%"], row
    assert "FAILED clf: in/c.parquet: bad input (ArrowInvalid): Parquet magic bytes not found" in text


def test_log_lines_off_a_terminal(capsys):
    p = Progress(interval=3600.0, tty=False)
    s = stats()
    p.start(s)
    p.update(s)  # updates log once per `interval` seconds ...
    p.update(s)
    p.update(s, force=True)  # ... and at the end of a job
    p.stop()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].endswith("clf: 4 shard(s) to score, 1 already committed")
    assert re.search(r"clf: 3/4 shards, 40 rows  1,600 tok  [\d,]+ tok/s  1 failed$", lines[1]), lines


def test_log_lines_every_interval(capsys):
    p = Progress(interval=0.05, tty=False)
    s = stats()
    p.start(s)
    for _ in range(3):
        time.sleep(0.06)
        p.update(s)
    assert len(capsys.readouterr().err.splitlines()) == 4


def test_rich_bars_on_a_terminal(capsys):
    p = Progress(interval=0.0, tty=True)
    s = stats()
    p.start(s)
    p.update(s)
    p.stop()
    err = capsys.readouterr().err
    assert re.search(r"clf shards .* 3/4 .*40 rows  1,600 tok  [\d,]+ tok/s  1 failed", err), err
    assert re.search(r"host:11 .* 1/\? .* 200 tok/s", err) and re.search(r"host:12 .* 300 tok/s", err), err
