"""What the driver shows: a live rich display on a terminal, a log line every few seconds otherwise,
the dry-run plan, and the summary table at the end of a run."""

from __future__ import annotations

import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["JobStats", "Progress", "print_plan", "print_summary"]


@dataclass
class JobStats:
    """Totals of one job in this run (committed by this run; skipped shards are counted apart)."""

    name: str
    total: int = 0
    skipped: int = 0
    done: int = 0
    rows: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    errors: int = 0
    score_seconds: float = 0.0
    labels: Counter = field(default_factory=Counter)
    failed: dict[str, str] = field(default_factory=dict)  # shard URI -> reason
    retries: int = 0
    started: float = field(default_factory=time.monotonic)
    ready: float | None = None  # when every worker had loaded and warmed up its model
    finished: float | None = None
    per_worker: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(lambda: {"shards": 0, "tokens": 0, "seconds": 0.0}))
    workers: list[dict[str, Any]] = field(default_factory=list)  # each actor's info(): worker, device, gpus, ...
    retired: list[str] = field(default_factory=list)  # outputs removed: their input shard is gone

    def add(self, r: Any) -> None:
        self.done += 1
        self.rows += r.rows
        self.tokens += r.tokens
        self.padded_tokens += r.padded_tokens
        self.errors += r.errors
        self.score_seconds += r.score_seconds
        self.labels.update(r.labels)
        w = self.per_worker[r.worker]
        w["shards"] += 1
        w["tokens"] += r.tokens
        w["seconds"] += r.seconds

    @property
    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    @property
    def padding_efficiency(self) -> float | None:
        return self.tokens / self.padded_tokens if self.padded_tokens else None

    def to_dict(self) -> dict[str, Any]:
        e = self.elapsed
        return {
            "shards": {"total": self.total, "skipped": self.skipped, "committed_this_run": self.done,
                       "failed": len(self.failed), "retries": self.retries},
            "rows": self.rows, "tokens": self.tokens, "padded_tokens": self.padded_tokens,
            "padding_efficiency": self.padding_efficiency, "error_rows": self.errors, "seconds": round(e, 3),
            "rows_per_s": self.rows / e if e else None, "tokens_per_s": self.tokens / e if e else None,
            "labels": dict(self.labels.most_common()), "failed": self.failed,
            "workers": [{**w, **self.per_worker.get(w.get("worker"), {})} for w in self.workers],
            **self._steady(),
        }

    def _steady(self) -> dict[str, Any]:
        """Throughput once the workers were ready: what a long job converges to (model load excluded)."""
        if self.ready is None or self.finished is None or self.finished <= self.ready:
            return {}
        s = self.finished - self.ready
        return {"workers_ready_seconds": round(self.ready - self.started, 3), "scoring_seconds": round(s, 3),
                "scoring_tokens_per_s": self.tokens / s}


class Progress:
    """Rich live bars on a terminal; otherwise one log line per job every `interval` seconds (stderr)."""

    def __init__(self, interval: float = 5.0, tty: bool | None = None) -> None:
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.interval = interval
        self._last = 0.0
        self._rich = None
        self._tasks: dict[str, Any] = {}

    def start(self, s: JobStats) -> None:
        todo = s.total - s.skipped
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

            self._rich = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                                      console=Console(stderr=True), transient=False)
            self._rich.start()
            self._tasks = {"job": self._rich.add_task(f"{s.name} shards", total=todo, info="")}
        else:
            self.log(f"{s.name}: {todo} shard(s) to score, {s.skipped} already committed")
            self._last = time.monotonic()  # the next line comes `interval` seconds after this one

    def update(self, s: JobStats, force: bool = False) -> None:
        now = time.monotonic()
        tps = s.tokens / s.elapsed if s.elapsed else 0.0
        info = f"{s.rows:,} rows  {s.tokens:,} tok  {tps:,.0f} tok/s" + (f"  {len(s.failed)} failed" if s.failed else "")
        if self._rich is not None:
            self._rich.update(self._tasks["job"], completed=s.done + len(s.failed), info=info)
            for w, st in s.per_worker.items():
                if w not in self._tasks:
                    self._tasks[w] = self._rich.add_task(f"  {w}", total=None, info="")
                wtps = st["tokens"] / st["seconds"] if st["seconds"] else 0.0
                self._rich.update(self._tasks[w], completed=st["shards"], info=f"{wtps:,.0f} tok/s")
        elif force or now - self._last >= self.interval:
            self._last = now
            self.log(f"{s.name}: {s.done + len(s.failed)}/{s.total - s.skipped} shards, {info}")

    def stop(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None

    @staticmethod
    def log(msg: str) -> None:
        print(f"[scorer {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _console() -> Console:
    """stdout; wide enough for the tables when it is a file or a pipe (rich would assume 80 columns)."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def _num(x: float | None, fmt: str = ",.0f") -> str:
    return "-" if x is None else format(x, fmt)


def print_plan(plans: list[Any], estimates: dict[str, dict[str, Any]], console: Console | None = None) -> None:
    console = console or _console()
    for p in plans:
        j, est = p.job, estimates[p.job.name]
        console.print(f"job {j.name}: {j.job.task} with {j.model.uri} -> {j.partition.uri}")
        t = Table(show_edge=False)
        for c in ("shard", "status", "rows"):  # a shard's path folds rather than lose its file name
            t.add_column(c, justify="right" if c == "rows" else "left", overflow="fold" if c == "shard" else "ellipsis")
        for s in p.shards:
            status = "skip (committed)" if s.done else f"unreadable: {s.unreadable}" if s.unreadable else "to do"
            t.add_row(s.shard.uri, status, _num(s.rows))
        console.print(t)
        gpu = est.get("gpu_seconds")
        console.print(
            f"  {len(p.todo)} to do, {len(p.skipped)} to skip; {est['rows']:,} rows to score, "
            f"~{_num(est.get('mean_tokens'), ',.1f')} tokens/row, ~{_num(est.get('tokens'))} tokens, "
            f"~{_num(gpu, ',.1f' if gpu is None or gpu >= 1 else '.2g')} GPU-seconds ({est['basis']})"
        )
        rt = j.job.runtime
        if rt.dtype is None:  # the fingerprints carry the dtype the workers will resolve
            console.print(f"  runtime.dtype unset: planned as {rt.compute_dtype(p.gpu)} for "
                          f"{'GPU' if p.gpu else 'CPU'} workers (a run plans again for the workers it gets)")
        if p.stale_entries:
            console.print(f"  note: {len(p.stale_entries)} committed output(s) have no shard in this listing (a run "
                          f"that completes removes those whose input file is gone): {', '.join(p.stale_entries[:5])}")


def print_summary(stats: list[JobStats], console: Console | None = None) -> None:
    console = console or _console()
    t = Table(title="scorer run", show_edge=False)
    for c in ("job", "done", "skipped", "failed", "rows", "tokens", "pad eff.", "rows/s", "tok/s", "labels"):
        t.add_column(c, justify="left" if c in ("job", "labels") else "right")
    for s in stats:
        e = s.elapsed
        top = s.labels.most_common(4)
        n = sum(s.labels.values())
        labels = ", ".join(f"{k} {v / n:.0%}" for k, v in top) + (" ..." if len(s.labels) > 4 else "") if n else "-"
        t.add_row(s.name, str(s.done), str(s.skipped), str(len(s.failed)), f"{s.rows:,}", f"{s.tokens:,}",
                  _num(s.padding_efficiency, ".1%"), _num(s.rows / e if e else None, ",.1f"),
                  _num(s.tokens / e if e else None), labels)
    console.print(t)
    for s in stats:
        for uri, reason in s.failed.items():
            console.print(f"FAILED {s.name}: {uri}: {reason}", soft_wrap=True)
        if s.retired:
            console.print(f"{s.name}: removed {len(s.retired)} output(s) whose input shard is gone: "
                          f"{', '.join(s.retired[:5])}{' ...' if len(s.retired) > 5 else ''}", soft_wrap=True)
