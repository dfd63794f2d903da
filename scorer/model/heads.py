"""Heads on an unchanged backbone: a pooler picks one vector per row, a head maps it.

Rows arrive left-padded (scorer.batching): row b's real tokens fill the last `lengths[b]` columns.

Which token the classifier reads. transformers' LlamaForSequenceClassification (5.x, GenericForSequence-
Classification) pools the *rightmost token whose id is not pad_token_id*, and column 0 when every token
is the pad id. It cannot tell a padding column from a real token that happens to equal the pad id (e.g. a
tokenizer that appends EOS where pad == eos). scorer knows the real tokens from the mask, so it applies
the same rule to each row's real tokens only: the rightmost real token whose id != pad_token_id, else the
first real token. On a single unpadded row this is exactly transformers' choice (tested), and padding
can never change it. With pad_token_id None it is the last real token (transformers' batch-of-one rule).

Packed batches (rows end to end, `cu_seqlens` marking where each starts) use the same rules through
`packed_index` and `pool_packed`: the same token is picked, the same mean is taken.

Embedding pooling: `last` = last real token (the last column), `mean` = mean over real tokens, `cls` =
first real token. Pooling runs in fp32. Then, as sentence-transformers does with `truncate_dim`, the
vector is cut to its first `dimensions` *before* the optional L2 normalization, so a truncated embedding
still has unit norm (Matryoshka usage).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scorer.model.config import LlamaConfig
from scorer.model.llama import LlamaModel

POOLINGS = ("last", "mean", "cls")


def classifier_token_index(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int | None
) -> torch.Tensor:
    """(B,) column of the token the classifier reads (see the module docstring)."""
    if pad_token_id is None:
        return last_real_index(attention_mask)
    cand = attention_mask & (input_ids != pad_token_id)
    return torch.where(cand.any(-1), last_real_index(cand), first_real_index(attention_mask))


def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) column of each row's last True (the last column under left padding)."""
    cols = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return torch.where(attention_mask, cols, -1).max(-1).values


def first_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) column of each row's first True."""
    T = attention_mask.shape[-1]
    cols = torch.arange(T, device=attention_mask.device)
    return torch.where(attention_mask, cols, T).min(-1).values


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, kind: str) -> torch.Tensor:
    """(B, T, H) hidden, (B, T) bool mask -> (B, H) fp32 by `last`, `mean` or `cls` over real tokens."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if kind == "last":
        return hidden[rows, last_real_index(attention_mask)].float()
    if kind == "cls":
        return hidden[rows, first_real_index(attention_mask)].float()
    if kind == "mean":
        m = attention_mask[..., None].float()  # (B, T, 1)
        return (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1.0)
    raise ValueError(f"pooling must be one of {POOLINGS}, not {kind!r}")


def segment_ids(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """(N,) int64 row of each token of a packed batch."""
    return torch.searchsorted(cu_seqlens[1:].long(), torch.arange(n, device=cu_seqlens.device), right=True)


def packed_index(
    cu_seqlens: torch.Tensor, kind: str, input_ids: torch.Tensor | None = None, pad_token_id: int | None = None
) -> torch.Tensor:
    """(B,) token index in a packed batch: `last`, `cls` (first) or `classifier` (see the module docstring)."""
    starts, last = cu_seqlens[:-1].long(), cu_seqlens[1:].long() - 1
    if kind == "cls":
        return starts
    if kind == "last" or pad_token_id is None or input_ids is None:
        return last
    n = input_ids.shape[0]
    cand = torch.where(input_ids != pad_token_id, torch.arange(n, device=input_ids.device), -1)
    best = torch.full_like(last, -1).scatter_reduce(0, segment_ids(cu_seqlens, n), cand, "amax")
    return torch.where(best >= 0, best, starts)


def pool_packed(hidden: torch.Tensor, cu_seqlens: torch.Tensor, kind: str) -> torch.Tensor:
    """(N, H) hidden of a packed batch -> (B, H) fp32 by `last`, `mean` or `cls`."""
    if kind in ("last", "cls"):
        return hidden[packed_index(cu_seqlens, kind)].float()
    if kind == "mean":
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).float()[:, None]
        sums = hidden.new_zeros(lengths.shape[0], hidden.shape[1], dtype=torch.float32)
        sums.index_add_(0, segment_ids(cu_seqlens, hidden.shape[0]), hidden.float())
        return sums / lengths
    raise ValueError(f"pooling must be one of {POOLINGS}, not {kind!r}")


def finish_embedding(pooled: torch.Tensor, normalize: bool, dimensions: int | None) -> torch.Tensor:
    """Truncate to the first `dimensions`, then L2-normalize (sentence-transformers' truncate_dim order)."""
    if dimensions is not None:
        pooled = pooled[:, :dimensions]
    return F.normalize(pooled, p=2, dim=-1) if normalize else pooled


def activate(logits: torch.Tensor, problem_type: str) -> torch.Tensor:
    """fp32 logits -> softmax (single-label), sigmoid (multi-label) or the raw value (regression)."""
    logits = logits.float()
    if problem_type == "single_label_classification":
        return logits.softmax(-1)
    if problem_type == "multi_label_classification":
        return logits.sigmoid()
    return logits


class ScoringModel(nn.Module):
    """The backbone plus, for classifier checkpoints, transformers' bias-free `score` head.

    Names equal a LlamaForSequenceClassification checkpoint's: `model.*` and `score.weight`.
    """

    def __init__(self, cfg: LlamaConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = LlamaModel(cfg, dtype)
        # the head stays in the activation dtype (it is never quantized)
        self.score = nn.Linear(cfg.hidden_size, cfg.num_labels, bias=False, dtype=dtype) if cfg.is_classifier else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, H) hidden states after the final norm."""
        return self.model(input_ids, attention_mask, position_ids, inputs_embeds)

    def logits(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, num_labels) fp32 logits at each row's classifier token."""
        idx = classifier_token_index(input_ids, attention_mask, self.cfg.pad_token_id)
        return self.logits_of(hidden[torch.arange(hidden.shape[0], device=hidden.device), idx])

    def logits_of(self, picked: torch.Tensor) -> torch.Tensor:
        """(B, H) hidden states of the classifier tokens -> (B, num_labels) fp32 logits."""
        if self.score is None:
            raise ValueError(f"{self.cfg.path}: architecture {self.cfg.architecture} has no classification head")
        return self.score(picked).float()

    def keep_index(
        self, input_ids: torch.Tensor, classify: bool, embed: bool, pooling: str,
        attention_mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Flat token indices the outputs read, for the backbone's `keep`: each row's classifier token
        (classify), then each row's pooled token (embed); None when an output reads every token (mean
        pooling). A packed batch (cu_seqlens) indexes its N tokens, a padded one (attention_mask) its B*T."""
        if embed and pooling == "mean":
            return None
        parts = []
        if cu_seqlens is not None:
            if classify:
                parts.append(packed_index(cu_seqlens, "classifier", input_ids, self.cfg.pad_token_id))
            if embed:
                parts.append(packed_index(cu_seqlens, pooling))
        else:
            B, T = attention_mask.shape
            base = torch.arange(B, device=attention_mask.device) * T
            if classify:
                parts.append(base + classifier_token_index(input_ids, attention_mask, self.cfg.pad_token_id))
            if embed:
                parts.append(base + (last_real_index if pooling == "last" else first_real_index)(attention_mask))
        return torch.cat(parts) if parts else None

    def embed(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "last",
        normalize: bool = True, dimensions: int | None = None,
    ) -> torch.Tensor:
        """(B, dimensions or H) fp32 embeddings."""
        return finish_embedding(pool(hidden, attention_mask, pooling), normalize, dimensions)

    # -- packed batches (see llama.Packed): hidden is (N, H), rows end to end --------------------------
    def logits_packed(self, hidden: torch.Tensor, input_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """(B, num_labels) fp32 logits at each packed row's classifier token."""
        return self.logits_of(hidden[packed_index(cu_seqlens, "classifier", input_ids, self.cfg.pad_token_id)])

    def embed_packed(
        self, hidden: torch.Tensor, cu_seqlens: torch.Tensor, pooling: str = "last",
        normalize: bool = True, dimensions: int | None = None,
    ) -> torch.Tensor:
        """(B, dimensions or H) fp32 embeddings of a packed batch."""
        return finish_embedding(pool_packed(hidden, cu_seqlens, pooling), normalize, dimensions)
