"""CUDA graphs of the backbone for small packed batches: one capture per bucket shape, then replays.

A batch of a few hundred tokens is bound by the host: an 8B model launches ~1,500 kernels a forward
(4-bit: three per small-m linear), and Python, torch's dispatcher and the launches take 20-40 ms against
5-16 ms of GPU work (benchmarks/RESULTS.md, small batches). A captured graph replays every launch in one
call. Graph shapes are fixed, so a batch is first padded to its bucket (`batching.graph_bucket`,
`batching.pad_packed`: pad rows after the real ones), copied into the bucket's static input tensors, and
the graph replayed; the caller reads the real rows' outputs and drops the pad rows'.

What a capture relies on, and how it is kept:
  * no host sync and no first-use work inside the capture: each bucket runs once eagerly, on the caller's
    stream, before it is captured on this instance's own capture stream (on the model's device), so
    torch.compile traces the shape, the 4-bit layers measure their crossovers and build their launch plans,
    and the 4-bit scratch exists; one capture runs at a time in the process;
  * the buffers a graph writes outlive it: its static inputs and output are held by the entry, its
    intermediates live in one memory pool shared by all buckets (they never run concurrently: one stream,
    one Scorer lock), and the 4-bit scratch buffers it was captured with are referenced too, so a later
    model that grows the scratch cannot free memory a replay writes to;
  * attention is flash varlen (`Packed` without a grid) with max_len = the bucket's tokens, an upper bound
    of every row it can hold; cuDNN's grid has per-batch shapes.
A graph pays only while the host is what a batch waits on: past a few hundred tokens (an 8B model; more
for a smaller one, fewer for a larger) the GPU is, and then the unpadded eager forward (with cuDNN's
attention on Hopper) is faster than the padded replay. So each capture is timed against what the caller would
run instead (the eager forward of the unpadded batch, `run`'s baseline), and a bucket whose replay does
not save KEEP_RATIO of it is dropped and runs eagerly from then on: measured per model and GPU, not a
token limit guessed for one of them.

A failed capture turns graphs off for this model (logged; the graphs and their memory are released), one
that runs out of memory sends its bucket to the eager path, and the batch runs eagerly: the forward has no
side effects, so nothing is lost or scored twice. A capture that CUDA invalidated (a host sync inside it,
which no path of this model's forward makes: the GPU tests capture them all) can leave state behind that
fails later GPU work in the process (tests/model/test_model_gpu.py runs that case in a process of its own),
so the warning says to restart with cuda_graphs=False.

`PackedGraphs(..., capture=False)` keeps the buckets, the static tensors and the copies but runs the forward
eagerly on them instead of replaying: that is how the CPU tests check everything but the capture itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from scorer.batching import PackedBatch
from scorer.model.llama import LlamaModel, Packed

log = logging.getLogger(__name__)

KEEP_RATIO = 0.9  # a bucket's graph is kept when its replay takes at most this much of the eager forward's time


@dataclass
class _Entry:
    graph: torch.cuda.CUDAGraph | None  # None: capture=False, the forward runs on the static tensors
    ids: torch.Tensor
    pos: torch.Tensor
    cu: torch.Tensor
    emb: torch.Tensor | None
    keep: torch.Tensor | None
    out: torch.Tensor
    held: list  # 4-bit scratch buffers the capture wrote into (kept alive with the graph)


_capture_lock = threading.Lock()  # one capture at a time in the process (torch.cuda.graph's own rule)


class PackedGraphs:
    """Captured forwards of `model.forward_packed`, keyed by (tokens, rows, kept tokens, inputs_embeds)."""

    def __init__(self, model: LlamaModel, device: torch.device, capture: bool = True) -> None:
        self.model, self.device, self.capture = model, device, capture
        self.entries: dict[tuple, _Entry] = {}
        self.pool = None  # torch.cuda.graph_pool_handle(), at the first capture
        self.stream: torch.cuda.Stream | None = None  # this instance's capture stream, on `device`
        self.on = True
        self.eager: set[tuple[int, int]] = set()  # (tokens, rows) buckets measured faster without a graph

    def __len__(self) -> int:
        return len(self.entries)

    def wants(self, bucket: tuple[int, int]) -> bool:
        """Whether a batch of this (tokens, rows) bucket should go to `run`."""
        return self.on and bucket not in self.eager

    def run(self, b: PackedBatch, emb: torch.Tensor | None, keep: torch.Tensor | None,
            baseline: Callable[[], object] | None = None) -> torch.Tensor | None:
        """The backbone's output for padded batch `b` (device tensors) by replay: (len(keep), H), or (tokens,
        H) without keep. The tensor is the graph's own output, valid until the next replay. None when
        graphs are off (a capture failed) or its bucket has just been measured faster eagerly.
        baseline: called once when the bucket is captured, it prepares and returns what the caller would
        run instead (the eager forward of the unpadded batch), which is timed against the replay; without
        it, the eager forward of `b` itself is."""
        if not self.on:
            return None
        tokens, rows = int(b.input_ids.shape[0]), len(b.lengths)
        key = (tokens, rows, None if keep is None else int(keep.shape[0]), emb is not None)
        e = self.entries.get(key)
        if e is None:
            e = self._capture(key, b, emb, keep, baseline)
            if e is None:
                return None
        e.ids.copy_(b.input_ids, non_blocking=True)
        e.pos.copy_(b.position_ids, non_blocking=True)
        e.cu.copy_(b.cu_seqlens, non_blocking=True)
        if emb is not None:
            e.emb.copy_(emb, non_blocking=True)
        if keep is not None:
            e.keep.copy_(keep, non_blocking=True)
        if e.graph is None:
            e.out = self._forward(e.ids, e.pos, e.cu, e.emb, e.keep, tokens)
        else:
            with torch.cuda.device(self.device):  # the graph's device, whatever device is current (cuda:N)
                e.graph.replay()
        return e.out

    def _forward(self, ids, pos, cu, emb, keep, tokens: int) -> torch.Tensor:
        return self.model.forward_packed(ids, pos, Packed(cu, tokens), emb, keep)

    def _capture(self, key: tuple, b: PackedBatch, emb: torch.Tensor | None, keep: torch.Tensor | None,
                 baseline: Callable[[], object] | None) -> _Entry | None:
        tokens = key[0]
        ids, pos, cu = b.input_ids.clone(), b.position_ids.clone(), b.cu_seqlens.clone()
        emb_s = None if emb is None else emb.clone()
        keep_s = None if keep is None else keep.clone()
        if not self.capture:
            e = self.entries[key] = _Entry(None, ids, pos, cu, emb_s, keep_s, ids, [])
            return e
        t0 = time.perf_counter()
        with _capture_lock, torch.cuda.device(self.device):
            cur = torch.cuda.current_stream()
            # first-use work (traces, crossovers, launch plans, the 4-bit scratch) runs here, eagerly and on
            # the caller's stream (a side stream would run 4-bit layers beside other work on the shared scratch)
            self._forward(ids, pos, cu, emb_s, keep_s, tokens)
            if self.stream is None:
                self.stream = torch.cuda.Stream(self.device)
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
                    out = self._forward(ids, pos, cu, emb_s, keep_s, tokens)
            except Exception as err:  # noqa: BLE001 - any capture failure: eager from now on (see below)
                torch.cuda.set_stream(cur)  # torch.cuda.graph leaves its capture stream current when capture_end fails
                del graph
                first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
                if isinstance(err, torch.OutOfMemoryError):  # this bucket only; its memory goes back
                    self.eager.add(key[:2])
                    torch.cuda.empty_cache()
                    log.warning("CUDA graph capture of %d tokens in %d rows ran out of memory; they run eagerly",
                                tokens, key[1])
                    return None
                log.warning("CUDA graph capture of %d tokens in %d rows failed (%s): this Scorer runs small "
                            "batches eagerly from now on. A failed capture can leave CUDA state behind that breaks "
                            "later GPU work in this process: restart it with cuda_graphs=False (jobs.yaml: "
                            "runtime.cuda_graphs: false) and report the message above", tokens, key[1], first)
                self.off()
                return None
            from scorer.kernels import int4

            held = [t for s in int4._scratch.values() for t in (s.buf, s.counters) if t is not None]
            t_eager = self._timed(baseline() if baseline else lambda: self._forward(ids, pos, cu, emb_s, keep_s, tokens))
            t_graph = self._timed(graph.replay)
        took = 1e3 * (time.perf_counter() - t0)
        if t_graph > KEEP_RATIO * t_eager:
            self.eager.add(key[:2])
            log.info("scorer: %d tokens in %d rows run eagerly: a CUDA graph replay took %.1f ms against %.1f ms "
                     "eager (the GPU, not the host, bounds them; measured in %.0f ms)", tokens, key[1],
                     1e3 * t_graph, 1e3 * t_eager, took)
            return None
        e = _Entry(graph, ids, pos, cu, emb_s, keep_s, out, held)
        self.entries[key] = e
        log.info("scorer: captured a CUDA graph for %d tokens in %d rows: %.1f ms a replay against %.1f ms eager "
                 "(captured and measured in %.0f ms; %d graphs)", tokens, key[1], 1e3 * t_graph, 1e3 * t_eager,
                 took, len(self.entries))
        return e

    def off(self) -> None:
        """No graphs from now on; the captured ones and their memory are released."""
        self.on = False
        self.entries.clear()
        self.pool = self.stream = None

    def _timed(self, fn, reps: int = 3) -> float:
        best = float("inf")
        for _ in range(reps):
            torch.cuda.synchronize(self.device)
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize(self.device)
            best = min(best, time.perf_counter() - t)
        return best
