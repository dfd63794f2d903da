"""The Python API: `Scorer.from_pretrained(path, ...)` then `scorer.score(texts) -> pyarrow.Table`.

    s = Scorer.from_pretrained("models/topic-clf", task="classify", device="auto")
    table = s.score(["first text", None, "third"])     # one row per input, in input order

Tokenizing (`encode`, CPU only, thread-safe) is separate from scoring (`score_encoded`), so a worker can
tokenize the next shard on a thread while the GPU scores this one. A null, non-string, empty or
whitespace-only text gets an `error` and null scores; it never raises and never drops a row. Texts
longer than `max_length` tokens are truncated (`truncated` true) from `truncation_side`.

Columns (see `output_schema`):
  classify, single-label: label (string), label_id (int32), score (float32, top prob), probs (list<float32>)
  classify, multi-label:  labels (list<string>, probs >= threshold), probs (list<float32>)
  classify, regression:   score (float32) for one output; scores (list<float32>) for several
  embed:                  embedding (fixed_size_list<float32>[dimensions or hidden_size])
  both:                   the classify columns, then embedding, from the same forward pass
  optional:               logits (list<float32>) with return_logits=True
  always:                 n_tokens (int32), truncated (bool), error (string, null when fine)
"""

from __future__ import annotations

import hashlib
import logging
import json
import struct
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch

from scorer.batching import GRAPH_TOKENS, collate, graph_bucket, grid_layout, pack, pad_packed, plan_batches, plan_packed
from scorer.model.config import LlamaConfig
from scorer.model.heads import POOLINGS, ScoringModel, activate, finish_embedding
from scorer.model.llama import (
    Grid, Packed, compile_layers, cudnn_attention_available, fuse_projections, grid_supported, varlen_supported,
)
from scorer.model.graphs import PackedGraphs
from scorer.model.load import TextEncoder, _parse_dtype, load_model, pad_token_id, weight_files

log = logging.getLogger(__name__)

TASKS = ("classify", "embed", "both")
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class Encoded:
    """Tokenized texts, one entry per input row; rows with an error have ids None and are not scored."""

    ids: list[list[int] | None]
    n_tokens: np.ndarray  # (n,) int32; 0 where error
    truncated: np.ndarray  # (n,) bool
    error: list[str | None]

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_ids(cls, ids: Sequence[Sequence[int]]) -> "Encoded":
        """Rows already tokenized (warm-up, benchmarks, tests): none truncated, none in error."""
        ids = [list(x) for x in ids]
        n = len(ids)
        return cls(ids, np.array([len(x) for x in ids], dtype=np.int32), np.zeros(n, dtype=bool), [None] * n)


@dataclass(frozen=True)
class Settings:
    """Everything that changes a score (part of the fingerprint) plus the batching limits (not part)."""

    task: str
    dtype: str
    max_length: int
    truncation_side: str
    pooling: str
    normalize: bool
    dimensions: int | None
    threshold: float
    return_logits: bool
    max_batch_tokens: int = field(compare=False)
    max_rows: int = field(compare=False)

    def scored(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("max_batch_tokens", "max_rows", "return_logits"):
            d.pop(k)
        return d


@dataclass
class ScoreStats:
    rows: int = 0  # input rows
    scored_rows: int = 0  # rows sent to the model (no error)
    batches: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / self.padded_tokens if self.padded_tokens else 1.0


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU; use device='cpu' or 'auto'.")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {device!r}")
    return dev


MAX_LENGTH_DEFAULT_CAP = 8192  # max_length's default: the model's max_position_embeddings, at most this
GRID_MULTIPLE = 16  # grid width: the longest row rounded up to this (fewer shapes for cuDNN to plan)
GRID_MAX_SLOTS = 1.2  # cuDNN attention only while the grid holds at most 1.2x the batch's real tokens


class Scorer:
    """A loaded model + tokenizer + settings. Build with `Scorer.from_pretrained`."""

    def __init__(
        self, model: ScoringModel, cfg: LlamaConfig, tokenizer: TextEncoder | None, settings: Settings,
        device: torch.device, attention: str = "auto", attention_kernel: str = "auto",
        cuda_graphs: bool | str = "auto",
    ):
        """Prefer `from_pretrained`; a tokenizer of None serves `score_encoded` only (benchmarks).
        attention_kernel (packed path): "flash" (flash attention varlen), "cudnn" (cuDNN's fused attention
        over the batch's rows right-padded into a grid, `GRID_MAX_SLOTS` permitting; on a CPU, SDPA over
        that grid) or "auto": cuDNN on Hopper GPUs, where it is about twice as fast, flash elsewhere.
        cuda_graphs (packed path on CUDA): small batches (up to GRAPH_TOKENS[-1] tokens, and never more than
        max_batch_tokens, in fewer than GRAPH_ROWS[-1] rows) are padded to a bucket shape and replayed from a
        CUDA graph captured at the bucket's first batch (scorer.model.graphs), which removes the host's launch
        time that bounds them; a bucket is kept only where its replay is measured faster than the eager
        forward, and replayed batches run flash attention varlen whatever attention_kernel says. "auto" is
        on wherever the packed path runs on CUDA, True insists, False never."""
        self.model, self.cfg, self.tokenizer, self.settings, self.device = model, cfg, tokenizer, settings, device
        self.dtype = _parse_dtype(settings.dtype)
        self.pad_id = pad_token_id(cfg, tokenizer)
        self.last_stats = ScoreStats()
        self._lock = threading.Lock()
        self._fingerprint: str | None = None
        self._copy_stream: torch.cuda.Stream | None = None  # host-resident embeddings' copies
        self._schema = self._build_schema()
        if attention not in ("auto", "packed", "padded"):
            raise ValueError(f"attention must be auto, packed or padded, not {attention!r}")
        self.packed, why = varlen_supported(cfg, device, self.dtype)
        if attention == "packed" and cfg.rope_scaling is not None and cfg.rope_scaling.kind == "dynamic":
            raise ValueError("attention='packed' cannot run dynamic RoPE (its base is chosen per padded row)")
        if attention != "auto":
            self.packed, why = attention == "packed", f"attention={attention!r} asked for"
        log.info("scorer attention: %s (%s)", "packed varlen" if self.packed else "padded SDPA", why)
        if attention_kernel not in ("auto", "flash", "cudnn"):
            raise ValueError(f"attention_kernel must be auto, flash or cudnn, not {attention_kernel!r}")
        self.grid, why = grid_supported(device, self.dtype, cfg.head_dim)
        if attention_kernel == "cudnn" and self.packed:  # on a CPU: SDPA over the grid (the reference)
            if device.type == "cuda" and not cudnn_attention_available():
                raise ValueError(f"attention_kernel='cudnn': torch {torch.__version__} has no cuDNN attention "
                                 "here; use attention_kernel='flash' or 'auto'")
            self.grid, why = True, "attention_kernel='cudnn' asked for"
        elif attention_kernel == "flash" or not self.packed:
            self.grid, why = False, "flash attention varlen" if self.packed else "the padded path"
        if self.packed:
            log.info("scorer packed attention kernel: %s (%s)", "cuDNN" if self.grid else "flash varlen", why)
        if cuda_graphs not in (True, False, "auto"):
            raise ValueError(f"cuda_graphs must be True, False or 'auto', not {cuda_graphs!r}")
        graphable = self.packed and device.type == "cuda"
        if cuda_graphs is True and not graphable:
            raise ValueError("cuda_graphs=True needs the packed path on a CUDA device "
                             f"(here: {'packed' if self.packed else 'padded'} on {device})")
        self._graphs = PackedGraphs(model.model, device) if graphable and cuda_graphs else None
        self._graph_tokens = tuple(t for t in GRAPH_TOKENS if t <= settings.max_batch_tokens)  # never past the budget
        log.info("scorer CUDA graphs for small batches: %s", "on" if self._graphs is not None else "off")

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        task: str = "classify",
        device: str | torch.device = "auto",
        dtype: torch.dtype | str | None = None,
        max_length: int | None = None,
        max_batch_tokens: int = 16384,
        max_rows: int = 256,
        truncation_side: str = "right",
        pooling: str = "last",
        normalize: bool = True,
        dimensions: int | None = None,
        threshold: float = 0.5,
        return_logits: bool = False,
        attention: str = "auto",
        compile: bool | str = "auto",
        embeddings: str = "auto",
        attention_kernel: str = "auto",
        cuda_graphs: bool | str = "auto",
    ) -> "Scorer":
        """embeddings: where the token-embedding table lives while a GPU scores: "device", "host" (its
        rows are gathered on the CPU and copied with the batch, freeing vocab x hidden x 2 bytes of GPU
        memory; scores are bit-identical), or "auto": host for 4-bit checkpoints, whose point is GPU
        memory, device otherwise. Ignored on the CPU.
        attention_kernel: the packed path's attention, "auto", "flash" or "cudnn" (see `Scorer`).
        cuda_graphs: small packed batches replayed from CUDA graphs, "auto", True or False (see `Scorer`)."""
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, not {task!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, not {pooling!r}")
        dev = resolve_device(device)
        dt = _parse_dtype(dtype) if dtype is not None else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
        if dt not in DTYPE_NAMES:
            raise ValueError(f"dtype must be float32, bfloat16 or float16, not {dtype!r}")
        cfg = LlamaConfig.from_hf_dir(path)
        if task in ("classify", "both") and not cfg.is_classifier:
            raise ValueError(
                f"{Path(path) / 'config.json'}: architecture {cfg.architecture} has no classification head; "
                "use task='embed' or a *ForSequenceClassification checkpoint."
            )
        if dimensions is not None and not 1 <= dimensions <= cfg.hidden_size:
            raise ValueError(f"dimensions must be in 1..{cfg.hidden_size} (hidden_size), not {dimensions}")
        if int(max_batch_tokens) < 1 or int(max_rows) < 1:
            raise ValueError(f"max_batch_tokens and max_rows must be >= 1, got {max_batch_tokens} and {max_rows}")
        if max_length is None:
            max_length = min(cfg.max_position_embeddings, MAX_LENGTH_DEFAULT_CAP)
        settings = Settings(
            task=task, dtype=DTYPE_NAMES[dt], max_length=int(max_length), truncation_side=truncation_side,
            pooling=pooling, normalize=bool(normalize), dimensions=dimensions, threshold=float(threshold),
            return_logits=bool(return_logits), max_batch_tokens=int(max_batch_tokens), max_rows=int(max_rows),
        )
        tokenizer = TextEncoder(path, settings.max_length, truncation_side)
        model, cfg = load_model(path, dt, dev)
        fuse_projections(model)
        scorer = cls(model, cfg, tokenizer, settings, dev, attention, attention_kernel, cuda_graphs)
        if compile not in (True, False, "auto"):
            raise ValueError(f"compile must be True, False or 'auto', not {compile!r}")
        if embeddings not in ("auto", "device", "host"):
            raise ValueError(f"embeddings must be auto, device or host, not {embeddings!r}")
        if dev.type == "cuda" and (embeddings == "host" or (embeddings == "auto" and cfg.quant is not None)):
            model.model.embeddings_to_host()
        log.info("scorer embedding table: %s", "host memory" if model.model.embeddings_on_host else "with the model")
        if compile == "auto":  # on CUDA's packed path, where fusing the elementwise work pays (see bench)
            compile = scorer.packed and dev.type == "cuda" and _has_triton()
        if compile:
            compile_layers(model)
        log.info("scorer torch.compile of the decoder layers: %s", "on" if compile else "off")
        return scorer

    def warmup(self) -> None:
        """Score nine synthetic batches of different shapes, so CUDA kernels compile, the 4-bit crossover
        is measured and compiled layers trace (static, then dynamic shapes, and single rows, with and
        without the cuDNN grid) before real work is timed: a job then never compiles mid-shard."""
        rng = np.random.default_rng(0)
        # the first two fill their grid (cuDNN attention where it is on), the next two do not (flash); then
        # single rows (size-1 dimensions, which dynamic shapes specialize): grid twice, flash twice, one token.
        # The grid rows' lengths are not multiples of 16, so a row's length and its grid's width differ: a
        # trace that saw them equal may take them for one size (duck sizing) and retrace on every other row
        # These run without CUDA graphs: they trace the eager paths the batches too large for a graph take.
        # A graph's bucket is captured at its first batch (a few forwards of that size, once).
        with self._lock:
            graphs, self._graphs = self._graphs, None
            try:
                for row_lengths in ((32, 32), (48, 48, 48), (40, 17), (60, 20, 20), (45,), (61,), (17,), (33,), (1,)):
                    self._score(Encoded.from_ids(
                        [rng.integers(4, self.cfg.vocab_size, min(n, self.settings.max_length)).tolist()
                         for n in row_lengths]))
            finally:
                self._graphs = graphs
        self.last_stats = ScoreStats()

    # -- tokenizing (CPU, thread-safe) ------------------------------------------------------------
    def encode(self, texts: Sequence[str | None]) -> Encoded:
        texts = _as_list(texts)
        n = len(texts)
        ids: list[list[int] | None] = [None] * n
        n_tokens = np.zeros(n, dtype=np.int32)
        truncated = np.zeros(n, dtype=bool)
        error: list[str | None] = [None] * n
        todo: list[int] = []
        for i, t in enumerate(texts):
            if t is None:
                error[i] = "null text"
            elif not isinstance(t, str):
                error[i] = f"not a string ({type(t).__name__})"
            elif not t.strip():
                error[i] = "empty text"
            elif not t.isascii() and not _encodable(t):
                error[i] = "not valid Unicode (a lone surrogate)"
            else:
                todo.append(i)
        if todo:
            for i, (row, cut) in zip(todo, self.tokenizer.encode_batch([texts[i] for i in todo])):
                if not row:
                    error[i] = "no tokens"
                    continue
                ids[i] = row
                n_tokens[i] = len(row)
                truncated[i] = cut
        return Encoded(ids, n_tokens, truncated, error)

    # -- scoring ------------------------------------------------------------------------------------
    def score(self, texts: Sequence[str | None]) -> pa.Table:
        return self.score_encoded(self.encode(texts))

    def score_encoded(self, enc: Encoded) -> pa.Table:
        with self._lock:
            return self._score(enc)

    def _score(self, enc: Encoded) -> pa.Table:
        t0 = time.perf_counter()
        s, cfg = self.settings, self.cfg
        n = len(enc)
        valid = np.array([i for i in range(n) if enc.ids[i] is not None], dtype=np.int64)
        classify, embed = s.task in ("classify", "both"), s.task in ("embed", "both")
        logits = np.zeros((n, cfg.num_labels), dtype=np.float32) if classify else None
        emb_dim = s.dimensions or cfg.hidden_size
        emb = np.zeros((n, emb_dim), dtype=np.float32) if embed else None
        stats = ScoreStats(rows=n, scored_rows=len(valid))

        lengths = enc.n_tokens[valid].astype(np.int64)
        plan = plan_packed if self.packed else plan_batches
        outs: list[tuple[np.ndarray, torch.Tensor | None, torch.Tensor | None]] = []
        with torch.inference_mode():
            for part in plan(lengths, s.max_batch_tokens, s.max_rows):
                lg = e = None
                b = pack(enc.ids, valid[part]) if self.packed else None
                bucket = (graph_bucket(b.lengths, self._graph_tokens)
                          if b is not None and self._graphs is not None else None)
                graphed = self._graphed(b, bucket, classify, embed) if bucket and self._graphs.wants(bucket) else None
                if graphed is not None:  # a small batch, replayed from its bucket's CUDA graph
                    lg, e = graphed
                    stats.padded_tokens += bucket[0] - b.real_tokens
                elif self.packed:  # rows end to end, flash attention varlen: no padding at all
                    rows_emb = self._host_embeddings(b.input_ids)
                    b = b.to(self.device)
                    keep = self.model.keep_index(b.input_ids, classify, embed, s.pooling, cu_seqlens=b.cu_seqlens)
                    hidden = self._forward_packed(b, rows_emb, keep)
                    lg, e = self._packed_outputs(hidden, keep is not None, b.input_ids, b.cu_seqlens, classify, embed)
                else:
                    b = collate(enc.ids, valid[part], self.pad_id)
                    rows_emb = self._host_embeddings(b.input_ids)
                    b = b.to(self.device)
                    keep = self.model.keep_index(b.input_ids, classify, embed, s.pooling, b.attention_mask)
                    hidden = self.model.model(b.input_ids, b.attention_mask, b.position_ids, rows_emb, keep)
                    if keep is not None:  # (K, H): the tokens the heads read
                        lg, e = self._outputs_of_kept(hidden, classify, embed)
                    else:  # (B, T, H)
                        if classify:
                            lg = self.model.logits(hidden, b.input_ids, b.attention_mask)
                        if embed:
                            e = self.model.embed(hidden, b.attention_mask, s.pooling, s.normalize, s.dimensions)
                # device -> host without a sync per batch (pinned, non-blocking); read after the loop
                nb = self.device.type == "cuda"
                outs.append((b.rows, None if lg is None else lg.to("cpu", non_blocking=nb),
                             None if e is None else e.to("cpu", non_blocking=nb)))
                stats.batches += 1
                stats.real_tokens += b.real_tokens
                stats.padded_tokens += b.padded_tokens
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        for rows, lg, e in outs:
            if lg is not None:
                logits[rows] = lg.numpy()
            if e is not None:
                emb[rows] = e.numpy()

        table = self._table(enc, logits, emb)
        stats.seconds = time.perf_counter() - t0
        self.last_stats = stats
        return table

    def _graphed(self, b: Any, bucket: tuple[int, int], classify: bool, embed: bool
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
        """(logits, embeddings) of packed batch `b` (host) through the CUDA graph of its bucket, or None when
        graphs are off (a capture failed) or the bucket was just measured faster eagerly: the caller then runs
        the batch eagerly."""
        s = self.settings
        bp = pad_packed(b, *bucket, self.pad_id)
        rows_emb = self._host_embeddings(bp.input_ids)
        bp = bp.to(self.device)
        keep = self.model.keep_index(bp.input_ids, classify, embed, s.pooling, cu_seqlens=bp.cu_seqlens)

        def baseline():  # the eager forward this batch would otherwise take, timed once at the bucket's capture
            br = b.to(self.device)
            kr = self.model.keep_index(br.input_ids, classify, embed, s.pooling, cu_seqlens=br.cu_seqlens)
            er = self._host_embeddings(b.input_ids)
            return lambda: self._forward_packed(br, er, kr)

        hidden = self._graphs.run(bp, rows_emb, keep, baseline)
        if hidden is None:
            return None
        rows, n = len(b.lengths), b.real_tokens
        if keep is not None:  # (parts x bucket rows, H): each part's real rows come first
            parts = int(classify) + int(embed)
            idx = torch.arange(rows, device=self.device)
            idx = torch.cat([idx + p * bucket[1] for p in range(parts)]) if parts > 1 else idx
            hidden = hidden[idx]
        else:  # (bucket tokens, H): the real rows' tokens come first
            hidden = hidden[:n]
        return self._packed_outputs(hidden, keep is not None, bp.input_ids[:n], bp.cu_seqlens[: rows + 1],
                                    classify, embed)

    def _packed_outputs(self, hidden: torch.Tensor, kept: bool, input_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                        classify: bool, embed: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits, embeddings) of a packed batch from its backbone output: the kept tokens' hidden states
        (kept), or every token's (N, H) with the batch's ids and cu_seqlens."""
        if kept:
            return self._outputs_of_kept(hidden, classify, embed)
        s = self.settings
        lg = self.model.logits_packed(hidden, input_ids, cu_seqlens) if classify else None
        e = self.model.embed_packed(hidden, cu_seqlens, s.pooling, s.normalize, s.dimensions) if embed else None
        return lg, e

    def _forward_packed(self, b: Any, rows_emb: torch.Tensor | None, keep: torch.Tensor | None) -> torch.Tensor:
        """The backbone on a packed batch, through cuDNN's grid where it is on. Should cuDNN refuse a shape
        (no engine for it, a failed plan), the batch reruns on flash attention varlen, as does every later
        one: the forward has no side effects, so no row is lost or scored twice. Out of memory and torch.compile's
        errors are raised."""
        def forward(grid: Grid | None) -> torch.Tensor:
            ctx = Packed(b.cu_seqlens, b.max_len, grid)
            return self.model.model.forward_packed(b.input_ids, b.position_ids, ctx, rows_emb, keep)

        grid = self._grid(b.lengths)
        if grid is None:
            return forward(None)
        try:
            return forward(grid)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:
            from torch._dynamo.exc import TorchDynamoException

            if isinstance(e, TorchDynamoException):  # torch.compile's own (a retrace refused, a backend failed)
                raise
            rows, width = grid.src.shape
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            log.warning("cuDNN attention failed on a %d x %d grid (%s); this Scorer runs flash attention varlen "
                        "from now on (attention_kernel='flash' skips cuDNN from the start)", rows, width, first)
            self.grid = False
            return forward(None)

    def _grid(self, lengths: np.ndarray) -> Grid | None:
        """The batch's right-padded grid for cuDNN attention, or None (flash varlen) when the kernel is off
        or padding would add more than GRID_MAX_SLOTS - 1 of the real tokens."""
        if not self.grid or not len(lengths) or int(lengths.min()) < 1:
            return None
        src, dst = grid_layout(lengths, GRID_MULTIPLE)
        if src.size > GRID_MAX_SLOTS * len(dst):
            return None
        src, dst = torch.from_numpy(src), torch.from_numpy(dst)
        if self.device.type == "cuda":  # pinned, so the copies do not wait for the batch before
            src, dst = (x.pin_memory().to(self.device, non_blocking=True) for x in (src, dst))
        return Grid(src, dst)

    def _outputs_of_kept(self, hidden: torch.Tensor, classify: bool, embed: bool
                         ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits, embeddings) from the kept tokens' hidden states (ScoringModel.keep_index's order:
        the classifier tokens, then the pooled ones)."""
        s = self.settings
        n = hidden.shape[0] // (int(classify) + int(embed))
        lg = self.model.logits_of(hidden[:n]) if classify else None
        e = finish_embedding(hidden[n if classify else 0:][:n].float(), s.normalize, s.dimensions) if embed else None
        return lg, e

    def _host_embeddings(self, ids: torch.Tensor) -> torch.Tensor | None:
        """A batch's embedding rows when the table is in host memory (else None: the model looks them up):
        gathered on the CPU into pinned memory and copied on a side stream, so the copy overlaps the batch
        before; the compute stream waits for it."""
        lm = self.model.model
        if not lm.embeddings_on_host:
            return None
        rows = lm.host_embeddings(ids)
        if self.device.type != "cuda":
            return rows
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._copy_stream):
            out = rows.to(self.device, non_blocking=True)
        compute.wait_stream(self._copy_stream)
        out.record_stream(compute)  # allocated on the copy stream, used on the compute stream
        return out

    # -- output -------------------------------------------------------------------------------------
    @property
    def output_schema(self) -> pa.Schema:
        return self._schema

    def _build_schema(self) -> pa.Schema:
        s, cfg = self.settings, self.cfg
        f: list[pa.Field] = []
        if s.task in ("classify", "both"):
            if cfg.problem_type == "single_label_classification":
                f += [pa.field("label", pa.string()), pa.field("label_id", pa.int32()), pa.field("score", pa.float32()),
                      pa.field("probs", pa.list_(pa.float32()))]
            elif cfg.problem_type == "multi_label_classification":
                f += [pa.field("labels", pa.list_(pa.string())), pa.field("probs", pa.list_(pa.float32()))]
            elif cfg.num_labels == 1:
                f += [pa.field("score", pa.float32())]
            else:
                f += [pa.field("scores", pa.list_(pa.float32()))]
            if s.return_logits:
                f += [pa.field("logits", pa.list_(pa.float32()))]
        if s.task in ("embed", "both"):
            f += [pa.field("embedding", pa.list_(pa.float32(), s.dimensions or cfg.hidden_size))]
        f += [pa.field("n_tokens", pa.int32()), pa.field("truncated", pa.bool_()), pa.field("error", pa.string())]
        return pa.schema(f)

    def _table(self, enc: Encoded, logits: np.ndarray | None, emb: np.ndarray | None) -> pa.Table:
        s, cfg = self.settings, self.cfg
        n = len(enc)
        bad = np.array([e is not None for e in enc.error], dtype=bool)
        bad_pa = pa.array(bad, type=pa.bool_())
        cols: dict[str, pa.Array] = {}

        def float_list(x: np.ndarray, fixed: bool = False) -> pa.Array:
            k = x.shape[1]
            values = pa.array(x.reshape(-1), type=pa.float32())
            if fixed:
                return pa.FixedSizeListArray.from_arrays(values, k, mask=bad_pa)
            offsets = pa.array(np.arange(n + 1, dtype=np.int32) * k, type=pa.int32())
            return pa.ListArray.from_arrays(offsets, values, mask=bad_pa)

        if logits is not None:
            probs = activate(torch.from_numpy(logits), cfg.problem_type).numpy()
            if cfg.problem_type == "single_label_classification":
                top = probs.argmax(-1).astype(np.int32)
                names = cfg.id2label
                cols["label"] = pa.array([None if b else names[i] for i, b in zip(top, bad)], type=pa.string())
                cols["label_id"] = pa.array(top, type=pa.int32(), mask=bad)
                cols["score"] = pa.array(probs[np.arange(n), top], type=pa.float32(), mask=bad)
                cols["probs"] = float_list(probs)
            elif cfg.problem_type == "multi_label_classification":
                on = probs >= s.threshold
                cols["labels"] = pa.array(
                    [None if bad[r] else [cfg.id2label[j] for j in np.flatnonzero(on[r])] for r in range(n)],
                    type=pa.list_(pa.string()),
                )
                cols["probs"] = float_list(probs)
            elif cfg.num_labels == 1:
                cols["score"] = pa.array(probs[:, 0], type=pa.float32(), mask=bad)
            else:
                cols["scores"] = float_list(probs)
            if s.return_logits:
                cols["logits"] = float_list(logits)
        if emb is not None:
            cols["embedding"] = float_list(emb, fixed=True)
        cols["n_tokens"] = pa.array(enc.n_tokens, type=pa.int32())
        cols["truncated"] = pa.array(enc.truncated, type=pa.bool_())
        cols["error"] = pa.array(enc.error, type=pa.string())
        return pa.Table.from_arrays([cols[f.name] for f in self._schema], schema=self._schema)

    # -- identity -----------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """sha256 of what decides the scores: model files (config, tokenizer, weight headers) + settings."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.cfg.path, self.settings.scored())
        return self._fingerprint


def _encodable(t: str) -> bool:
    """Whether t is valid Unicode: a lone surrogate (half of an emoji a JSON string was cut through) cannot be
    tokenized, and would fail the whole batch."""
    try:
        t.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _as_list(texts: Any) -> list:
    """The texts as a list, by position: a pandas Series is read by its values, never its index labels;
    a pyarrow array as Python strings. A bare string is refused (it would be scored a character a row)."""
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"texts must be a sequence of strings, not one {type(texts).__name__}: pass [text]")
    if isinstance(texts, (pa.Array, pa.ChunkedArray)):
        return texts.to_pylist()
    return list(texts)


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def model_fingerprint(path: str | Path, settings: dict[str, Any]) -> str:
    """sha256 over config.json, tokenizer.json, side configs, each weight file's name, size and header."""
    path = Path(path)
    h = hashlib.sha256()

    def add(tag: str, data: bytes) -> None:
        h.update(tag.encode() + b"\0" + len(data).to_bytes(8, "little") + data)

    for name in ("config.json", "tokenizer.json", "quantize_config.json", "model.safetensors.index.json"):
        p = path / name
        if p.is_file():
            add(name, p.read_bytes())
    for f in weight_files(path):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = fh.read(n)
        add(f"weights:{f.name}:{f.stat().st_size}", hashlib.sha256(header).digest())
    add("settings", json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()
