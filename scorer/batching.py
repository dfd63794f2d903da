"""Token-budget batching: pure functions from token lengths to batches, and from token lists to tensors.

`plan_batches` sorts rows by length (longest first, so a batch that does not fit in memory fails at
once, not at the end of a shard) and cuts runs of rows whose padded cost `rows x longest` stays within
`max_batch_tokens` and whose row count stays within `max_rows`. A row longer than the budget alone gets
its own batch. Every row index appears in exactly one batch.

`plan_packed` and `pack` are the same for the packed (varlen) path: rows are laid end to end with no
padding, so a batch costs its real tokens and is cut when their sum would pass `max_batch_tokens`.

`grid_layout` maps a packed batch onto a right-padded (rows, width) grid for a dense attention kernel
(scorer.model.llama.Grid); the rest of the model stays packed.

`graph_bucket` and `pad_packed` fit a small packed batch into one of a few fixed shapes (tokens, rows), so
that one captured CUDA graph per shape can replay it (scorer.model.graphs): pad rows are appended after
the real ones, the first holding the spare tokens and the others one each. Attention is causal within a
row, so no real token ever sees a pad token, and the real rows' tokens keep their indices.

`collate` left-pads: row b's real tokens fill the last `lengths[b]` columns, with positions 0..len-1, so
every row's last real token sits in the last column (exllama-style offsets) and RoPE sees the same
positions as the row alone. Padding columns get the pad id, position 0 and mask False.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (B, T) int64, left-padded with pad_id
    attention_mask: torch.Tensor  # (B, T) bool, True on real tokens
    position_ids: torch.Tensor  # (B, T) int64, 0..len-1 on real tokens, 0 on padding
    lengths: np.ndarray  # (B,) int64 real tokens per row
    rows: np.ndarray  # (B,) int64 original row indices

    @property
    def real_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.numel())

    def to(self, device: torch.device | str) -> "Batch":
        nb = torch.device(device).type == "cuda"
        return Batch(
            self.input_ids.to(device, non_blocking=nb),
            self.attention_mask.to(device, non_blocking=nb),
            self.position_ids.to(device, non_blocking=nb),
            self.lengths,
            self.rows,
        )


def plan_batches(lengths: Sequence[int] | np.ndarray, max_batch_tokens: int, max_rows: int) -> list[np.ndarray]:
    """Index arrays (into `lengths`), longest rows first, each with rows x longest <= max_batch_tokens."""
    if max_batch_tokens < 1 or max_rows < 1:
        raise ValueError(f"max_batch_tokens and max_rows must be >= 1, got {max_batch_tokens}, {max_rows}")
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {lengths.shape}")
    order = np.argsort(-lengths, kind="stable")  # longest first; equal lengths keep input order
    batches = []
    i, n = 0, len(order)
    while i < n:
        longest = max(int(lengths[order[i]]), 1)  # rows after i are no longer than row i
        k = max(1, min(max_rows, max_batch_tokens // longest))
        batches.append(order[i : i + k])
        i += k
    return batches


def plan_packed(lengths: Sequence[int] | np.ndarray, max_batch_tokens: int, max_rows: int) -> list[np.ndarray]:
    """Index arrays, longest rows first, each with sum(lengths) <= max_batch_tokens (a longer row alone)."""
    if max_batch_tokens < 1 or max_rows < 1:
        raise ValueError(f"max_batch_tokens and max_rows must be >= 1, got {max_batch_tokens}, {max_rows}")
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {lengths.shape}")
    order = np.argsort(-lengths, kind="stable")
    batches, start, total = [], 0, 0
    for i, r in enumerate(order):
        n = int(lengths[r])
        if i > start and (total + n > max_batch_tokens or i - start >= max_rows):
            batches.append(order[start:i])
            start, total = i, 0
        total += n
    if start < len(order):
        batches.append(order[start:])
    return batches


@dataclass(frozen=True)
class PackedBatch:
    input_ids: torch.Tensor  # (N,) int64, rows end to end
    position_ids: torch.Tensor  # (N,) int64, 0..len-1 within each row
    cu_seqlens: torch.Tensor  # (B+1,) int32, row b = tokens cu_seqlens[b]:cu_seqlens[b+1]
    lengths: np.ndarray  # (B,) int64
    rows: np.ndarray  # (B,) int64 original row indices

    @property
    def max_len(self) -> int:
        return int(self.lengths.max()) if len(self.lengths) else 0

    @property
    def real_tokens(self) -> int:
        return int(self.lengths.sum())

    padded_tokens = real_tokens

    def to(self, device: torch.device | str) -> "PackedBatch":
        nb = torch.device(device).type == "cuda"
        return PackedBatch(
            self.input_ids.to(device, non_blocking=nb),
            self.position_ids.to(device, non_blocking=nb),
            self.cu_seqlens.to(device, non_blocking=nb),
            self.lengths,
            self.rows,
        )


def pack(token_lists: Sequence[Sequence[int]], rows: Sequence[int] | np.ndarray) -> PackedBatch:
    """`token_lists[r] for r in rows` end to end, with per-row positions and cumulative lengths."""
    rows = np.asarray(rows, dtype=np.int64)
    lengths = np.array([len(token_lists[r]) for r in rows], dtype=np.int64)
    cu = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    ids = np.fromiter((t for r in rows for t in token_lists[r]), dtype=np.int64, count=int(cu[-1]))
    pos = np.arange(int(cu[-1]), dtype=np.int64) - np.repeat(cu[:-1].astype(np.int64), lengths)
    pin = torch.cuda.is_available()
    t = lambda a: torch.from_numpy(a).pin_memory() if pin else torch.from_numpy(a)  # noqa: E731
    return PackedBatch(t(ids), t(pos), t(cu), lengths, rows)


# CUDA-graph buckets of packed batches: ~1.5x steps, so padding adds at most half the real tokens (a
# quarter on average), and few enough shapes that capturing each once stays cheap.
GRAPH_TOKENS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
GRAPH_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def graph_bucket(lengths: Sequence[int] | np.ndarray, tokens: Sequence[int] = GRAPH_TOKENS,
                 rows: Sequence[int] = GRAPH_ROWS) -> tuple[int, int] | None:
    """The (tokens, rows) bucket a packed batch of these row lengths replays in, or None when it is larger
    than every bucket: the batch's own shape when that is a bucket, else the fewest rows above the
    batch's, then the fewest tokens that give each of those pad rows at least one (`pad_packed`)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if not len(lengths) or int(lengths.min()) < 1:
        return None
    b, n = len(lengths), int(lengths.sum())
    if n in tokens and b in rows:
        return n, b
    rb = next((r for r in rows if r > b), None)
    if rb is None:
        return None
    tb = next((t for t in tokens if t >= n + rb - b), None)
    return None if tb is None else (tb, rb)


def pad_packed(batch: "PackedBatch", tokens: int, rows: int, pad_id: int) -> "PackedBatch":
    """`batch` (host tensors) grown to exactly `tokens` tokens in `rows` rows by pad rows after the real
    ones: the first pad row holds the spare tokens, each other one token; pad tokens are `pad_id` at
    positions 0..len-1 of their row, and their `rows` entries are -1. A batch of that shape already is
    returned as it is."""
    b, n = len(batch.lengths), batch.real_tokens
    if (tokens, rows) == (n, b):
        return batch
    extra = rows - b
    first = tokens - n - (extra - 1)
    if extra < 1 or first < 1:
        raise ValueError(f"a packed batch of {n} tokens in {b} rows does not fit {tokens} tokens in {rows} rows "
                         "with a pad row")
    pad_len = np.array([first] + [1] * (extra - 1), dtype=np.int64)
    lengths = np.concatenate([batch.lengths, pad_len])
    cu = np.zeros(rows + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    pad_pos = np.concatenate([np.arange(first, dtype=np.int64), np.zeros(extra - 1, dtype=np.int64)])
    pin = torch.cuda.is_available()
    ids = torch.cat([batch.input_ids, torch.full((tokens - n,), pad_id, dtype=torch.int64)])
    pos = torch.cat([batch.position_ids, torch.from_numpy(pad_pos)])
    cu_t = torch.from_numpy(cu)
    if pin:
        ids, pos, cu_t = ids.pin_memory(), pos.pin_memory(), cu_t.pin_memory()
    return PackedBatch(ids, pos, cu_t, lengths, np.concatenate([batch.rows, np.full(extra, -1, dtype=np.int64)]))


def grid_layout(lengths: Sequence[int] | np.ndarray, multiple: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(src, dst) of packed rows of these lengths right-padded into a (B, W) grid, W the longest row rounded
    up to `multiple`: src (B, W) the packed token at each slot (a pad slot repeats its row's last token),
    dst (N,) the flat slot b*W + t of each packed token. Rows must not be empty."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1 or not len(lengths) or int(lengths.min()) < 1 or multiple < 1:
        raise ValueError(f"grid_layout needs rows of at least one token and multiple >= 1, got lengths "
                         f"{lengths.tolist()[:8]}, multiple {multiple}")
    width = -(-int(lengths.max()) // multiple) * multiple
    starts = np.cumsum(lengths) - lengths
    src = starts[:, None] + np.minimum(np.arange(width)[None, :], lengths[:, None] - 1)
    n = int(lengths.sum())
    dst = np.arange(n, dtype=np.int64) + np.repeat(np.arange(len(lengths), dtype=np.int64) * width - starts, lengths)
    return src, dst


def collate(token_lists: Sequence[Sequence[int]], rows: Sequence[int] | np.ndarray, pad_id: int) -> Batch:
    """Left-padded tensors for `token_lists[r] for r in rows` (see the module docstring)."""
    rows = np.asarray(rows, dtype=np.int64)
    lengths = np.array([len(token_lists[r]) for r in rows], dtype=np.int64)
    B, T = len(rows), int(lengths.max()) if len(rows) else 0
    ids = np.full((B, T), pad_id, dtype=np.int64)
    mask = np.zeros((B, T), dtype=bool)
    pos = np.zeros((B, T), dtype=np.int64)
    for b, r in enumerate(rows):
        n = lengths[b]
        if n:
            ids[b, T - n :] = token_lists[r]
            mask[b, T - n :] = True
            pos[b, T - n :] = np.arange(n)
    return Batch(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pos), lengths, rows)


def padding_efficiency(lengths: Sequence[int] | np.ndarray, batches: Sequence[np.ndarray]) -> float:
    """Real tokens / padded tokens over `batches` (1.0 for an empty plan)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(len(b) * int(lengths[b].max()) for b in batches if len(b))
    return real / padded if padded else 1.0
