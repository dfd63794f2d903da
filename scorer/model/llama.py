"""The Llama backbone: token ids -> final-norm hidden states, over a left-padded batch.

    h = embed(ids)                                     # (B, T, H)
    per layer:  h = h + o(attn(rope(q(n1(h))), rope(k(n1(h))), v(n1(h))))
                h = h + down(silu(gate(n2(h))) * up(n2(h)))
    return norm(h)

Submodule names mirror transformers' LlamaModel (`embed_tokens`, `layers.N.self_attn.q_proj`, ...), so
the checkpoint's tensor names load nearly unchanged. Every projection comes from `make_linear`, which
decides between nn.Linear and the 4-bit Int4Linear: nothing here knows about quantization.

Numerics follow transformers op for op (RMSNorm in fp32, RoPE tables in fp32 then cast, `rotate_half`
layout, SDPA with scale head_dim**-0.5), so fp32 outputs agree to ~1e-6.

Attention runs `scaled_dot_product_attention` over the padded batch with a boolean causal+padding mask.
Padding columns sit on the left of each row; their queries see only themselves (the diagonal is always
allowed) so no softmax row is empty and nothing turns NaN; real queries never see padding keys.
When a batch has no padding the mask is dropped for `is_causal=True`, which lets CUDA pick flash attention.

Packed batches (CUDA, fp16/bf16): the rows are laid end to end in one (1, N) sequence with no padding at
all, and attention runs flash attention's varlen kernel over `cu_seqlens` (the `Packed` context instead
of a mask), so no FLOP is spent on padding and the projections see m = N real tokens. Everything but
the attention core is the same code: linears, norms and RoPE are per token. On Hopper, Scorer instead
passes a `Grid`: the batch's rows right-padded into a (B, W) grid of slots, over which cuDNN's fused
attention runs about twice as fast as flash attention 2's varlen kernel; the q/k/v gathers into the grid
fuse with RoPE, the output projection runs on the grid's slots and the real tokens are gathered after it.

Host-resident embedding table (`LlamaModel.embeddings_to_host`): the (vocab, hidden) table leaves the GPU,
as llama.cpp keeps its token embeddings on the CPU. The caller gathers a batch's rows on the host
(`host_embeddings`, into pinned memory) and passes them as `inputs_embeds`; a lookup copies rows, so the
scores are bit-identical, and a 128k-vocab table frees 1-2 GiB of GPU memory for 8 KB-16 KB per token of
host-to-device copy.

Kept tokens (`keep`): a classifier or a last/cls pooler reads one token a row, so the last layer runs its
attention over every token (each kept token still attends to its whole row) but its output projection,
residual, MLP and the final norm on the kept tokens only: 88% of the last layer's FLOPs, ~2.8% of a
32-layer model's. Scorer passes the tokens its heads read (ScoringModel.keep_index); mean pooling keeps
every token.

Fused projections: `fuse_projections(model)` concatenates q/k/v and gate/up into one linear each (one
large GEMM instead of three or two); the per-token math is unchanged. 4-bit layers fuse when they share
one act-order permutation, as GPTQ writes them (one Hessian per input); otherwise they stay apart. Under
act-order, gate's and up's output columns are first put in down's sequential order, so down reads
SwiGLU's output with no gather.

RoPE scaling (see transformers' modeling_rope_utils): `linear` divides the frequencies by `factor`;
`llama3` rescales the low frequencies and smooths the band between; `dynamic` (NTK) raises the base when
a sequence is longer than max_position_embeddings. transformers picks the dynamic base from the longest
sequence of the whole batch and caches it across calls; scorer picks it per row from that row's own
length, which is what transformers computes for the row scored alone, and keeps scores batch invariant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scorer.model.config import LlamaConfig
from scorer.model.linear import Int4Linear, log_once, make_linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: LlamaConfig, device: torch.device | None = None) -> torch.Tensor:
    """The (head_dim/2,) fp32 inverse frequencies at lengths <= max_position_embeddings."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    s = cfg.rope_scaling
    if s is None or s.kind == "dynamic":
        return inv
    if s.kind == "linear":
        return inv / s.factor
    # llama3: keep high frequencies, divide low ones by factor, interpolate the band between
    old = s.original_max_position_embeddings
    low_wavelen, high_wavelen = old / s.low_freq_factor, old / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    llama = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * llama / s.factor + smooth * llama
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, llama)


def rope_cos_sin(
    cfg: LlamaConfig, inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (B, T, head_dim) in `dtype` for the given positions."""
    inv = inv_freq.to(position_ids.device)[None, :]  # (1, d/2)
    s = cfg.rope_scaling
    if s is not None and s.kind == "dynamic":  # NTK base per row, from the row's own length
        dim, max_pos = cfg.head_dim, cfg.max_position_embeddings
        seq_len = torch.clamp(position_ids.max(dim=-1).values + 1, min=max_pos)  # (B,)
        base = cfg.rope_theta * ((s.factor * seq_len / max_pos) - (s.factor - 1)) ** (dim / (dim - 2))
        expo = torch.arange(0, dim, 2, dtype=torch.int64, device=position_ids.device).float() / dim
        dyn = 1.0 / (base[:, None].float() ** expo[None, :])  # (B, d/2)
        inv = torch.where((seq_len > max_pos)[:, None], dyn, inv)
    with torch.autocast(device_type=position_ids.device.type, enabled=False):
        freqs = position_ids[..., None].float() * inv[:, None, :]  # (B, T, d/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, d)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, heads, d) rotated by cos, sin (B, T, d)."""
    cos, sin = cos[:, :, None], sin[:, :, None]  # (B, T, 1, d)
    return x * cos + rotate_half(x) * sin


@dataclass(frozen=True)
class Grid:
    """A packed batch's rows right-padded into a (B, W) grid, for a dense attention kernel.

    src (B, W) int64: the packed token each slot holds; a pad slot (past its row's end) repeats a real
    token of its row, so every key and value is finite, and the causal mask hides it from every real
    query (they all sit to its left). dst (N,) int64: the flat slot b*W + t of each packed token.
    """

    src: torch.Tensor
    dst: torch.Tensor


@dataclass(frozen=True)
class Packed:
    """Attention context of a packed batch: B rows end to end in one (1, N) sequence.

    cu_seqlens (B+1,) int32 on the device: row b is tokens cu_seqlens[b]:cu_seqlens[b+1];
    max_len: the longest row (a host int, known from the batch plan, so no device sync is needed);
    grid: set to run attention as cuDNN's dense kernel over the right-padded rows instead of flash
    attention's varlen one (`grid_attention`); everything else stays packed.
    """

    cu_seqlens: torch.Tensor
    max_len: int
    grid: Grid | None = None


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Packed, scale: float) -> torch.Tensor:
    """Causal flash attention per row of a packed batch: q (N, nh, d), k, v (N, nkv, d) -> (N, nh, d).

    On CUDA: the aten op that `torch.nn.attention.varlen.varlen_attn` wraps (its Python signature moved
    between torch releases; the op's did not); flash attention shares each kv head with nh/nkv query heads
    itself. Elsewhere: SDPA row by row, the reference the tests compare the packed path with on a CPU.
    """
    if q.device.type != "cuda":
        return _varlen_reference(q, k, v, ctx.cu_seqlens, scale)
    out = torch.ops.aten._flash_attention_forward(
        q, k, v, ctx.cu_seqlens, ctx.cu_seqlens, ctx.max_len, ctx.max_len, 0.0, True, False, scale=scale
    )
    return out[0]


# An op of its own, so torch.compile traces it as one opaque call, as it does the CUDA op: traced, its
# loop over rows would retrace for every row count, and a graph break would split the layer in two.
@torch.library.custom_op("scorer::varlen_reference", mutates_args=())
def _varlen_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """varlen_attention off CUDA: causal SDPA row by row."""
    cu = cu_seqlens.tolist()
    rep = q.shape[1] // k.shape[1]
    rows = []
    for a, b in zip(cu[:-1], cu[1:]):
        qi, ki, vi = (t[a:b].transpose(0, 1) for t in (q, k, v))  # (heads, n, d)
        ki, vi = ki.repeat_interleave(rep, 0), vi.repeat_interleave(rep, 0)
        rows.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(rows)


@_varlen_reference.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.empty_like(q)


def grid_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: Grid, scale: float) -> torch.Tensor:
    """Causal attention of a packed batch through its right-padded grid: q (N, nh, d), k, v (N, nkv, d)
    -> (B*W, nh, d), one row per grid slot; rows `grid.dst` equal `varlen_attention` on the real tokens,
    pad slots' rows are finite and meaningless.

    On CUDA: cuDNN's fused attention over (B, heads, W, d) views of (B, W, heads, d) buffers (no layout
    copy); on Hopper it runs about twice flash attention 2's FLOP rate at these lengths, which pays for
    the padded slots and the gathers (benchmarks/attention_backends.py --plan). Elsewhere: SDPA over the
    grid, the reference the tests check.
    """
    B, W = grid.src.shape
    qg, kg, vg = (t[grid.src].transpose(1, 2) for t in (q, k, v))  # (B, heads, W, d)
    if q.device.type == "cuda":
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(qg, kg, vg, None, False, 0.0, True, False,
                                                                  scale=scale)[0]
    else:
        rep = q.shape[1] // k.shape[1]
        kg, vg = kg.repeat_interleave(rep, 1), vg.repeat_interleave(rep, 1)
        out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=scale)
    return out.transpose(1, 2).reshape(B * W, *q.shape[1:])


def cudnn_attention_available() -> bool:
    """Whether this torch has cuDNN's fused attention op (and cuDNN itself) for `grid_attention`."""
    return hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention") and torch.backends.cudnn.is_available()


def grid_supported(device: torch.device, dtype: torch.dtype, head_dim: int) -> tuple[bool, str]:
    """(worth it, why) for `grid_attention` on the packed path: cuDNN's fused attention beats flash
    attention 2 on Hopper only (transformers measured it slower on Ampere, Ada and Blackwell)."""
    if device.type != "cuda":
        return False, "not CUDA"
    if not cudnn_attention_available():
        return False, "this torch has no cuDNN attention"
    if torch.cuda.get_device_capability(device)[0] != 9:
        return False, "not a Hopper GPU (cuDNN attention is faster than flash attention 2 on Hopper only)"
    if dtype not in (torch.float16, torch.bfloat16) or head_dim % 8 or head_dim > 128:
        return False, f"dtype {dtype}, head_dim {head_dim} (cuDNN runs fp16/bf16, head_dim a multiple of 8, <= 128)"
    return True, "cuDNN fused attention over right-padded rows (Hopper)"


def varlen_supported(cfg: LlamaConfig, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """(usable, why) for the packed path: CUDA flash attention, fp16/bf16, head_dim <= 256."""
    if device.type != "cuda":
        return False, f"device {device} (flash attention is CUDA only)"
    if dtype not in (torch.float16, torch.bfloat16):
        return False, f"dtype {dtype} (flash attention runs fp16/bf16)"
    if cfg.head_dim % 8 or cfg.head_dim > 256:
        return False, f"head_dim {cfg.head_dim} (flash attention needs a multiple of 8, at most 256)"
    if cfg.rope_scaling is not None and cfg.rope_scaling.kind == "dynamic":
        return False, "dynamic RoPE picks its base per row from the padded layout"
    if not hasattr(torch.ops.aten, "_flash_attention_forward"):
        return False, "this torch has no aten._flash_attention_forward"
    return True, "flash attention varlen over packed rows"


def _behind_norm(*projections: nn.Module) -> None:
    """These 4-bit projections read an RMSNorm's output (see Int4Linear.gather_in_graph)."""
    for p in projections:
        if isinstance(p, Int4Linear):
            p.gather_in_graph = True


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, dtype: torch.dtype) -> None:
        super().__init__()
        h, d, nh, nkv, bias = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.attention_bias
        self.q_proj = make_linear(h, nh * d, bias, cfg.quant, dtype)
        self.k_proj = make_linear(h, nkv * d, bias, cfg.quant, dtype)
        self.v_proj = make_linear(h, nkv * d, bias, cfg.quant, dtype)
        self.o_proj = make_linear(nh * d, h, bias, cfg.quant, dtype)
        _behind_norm(self.q_proj, self.k_proj, self.v_proj)
        self.qkv_proj: nn.Linear | None = None  # set by fuse()
        self.num_heads, self.num_kv_heads, self.head_dim = nh, nkv, d
        self.scale = d**-0.5

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | Packed | None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T, H) -> (B, T, H); with `keep` (flat indices into the B*T tokens), (1, len(keep), H): every
        token still attends and is attended to, only the output projection runs on the kept ones."""
        B, T, _ = x.shape
        nh, nkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split([nh * d, nkv * d, nkv * d], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = apply_rope(q.view(B, T, nh, d), cos, sin)  # (B, T, nh, d)
        k = apply_rope(k.view(B, T, nkv, d), cos, sin)  # (B, T, nkv, d)
        v = v.view(B, T, nkv, d)
        if isinstance(mask, Packed):  # B == 1: rows end to end
            if mask.grid is None:
                y = varlen_attention(q[0], k[0], v[0], mask, self.scale)  # (N, nh, d)
                return self.o_proj(_rows(y.reshape(B, T, nh * d), keep))
            # cuDNN over the grid; the output projection runs on its slots (a few percent of padding costs
            # less than gathering the attention output first) and the real tokens are gathered after it
            y = grid_attention(q[0], k[0], v[0], mask.grid, self.scale).reshape(1, -1, nh * d)  # (1, B*W, .)
            if keep is not None:
                return self.o_proj(_rows(y, mask.grid.dst[keep]))
            return self.o_proj(y)[:, mask.grid.dst]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, d)
        if nh > nkv:  # GQA: share each kv head with nh/nkv query heads (expand is a view until reshape)
            k = k[:, :, None].expand(B, nkv, nh // nkv, T, d).reshape(B, nh, T, d)
            v = v[:, :, None].expand(B, nkv, nh // nkv, T, d).reshape(B, nh, T, d)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale)
        return self.o_proj(_rows(y.transpose(1, 2).reshape(B, T, nh * d), keep))

    def fuse(self) -> None:
        """One (q|k|v) linear instead of three (see `concat_linears`)."""
        if self.qkv_proj is None:
            fused = concat_linears((self.q_proj, self.k_proj, self.v_proj), "q/k/v")
            if fused is not None:
                self.qkv_proj = fused
                del self.q_proj, self.k_proj, self.v_proj


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig, dtype: torch.dtype) -> None:
        super().__init__()
        h, m, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = make_linear(h, m, bias, cfg.quant, dtype)
        self.up_proj = make_linear(h, m, bias, cfg.quant, dtype)
        self.down_proj = make_linear(m, h, bias, cfg.quant, dtype)
        _behind_norm(self.gate_proj, self.up_proj)
        self.gate_up_proj: nn.Linear | None = None  # set by fuse()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)

    def fuse(self) -> None:
        """One (gate|up) linear instead of two (see `concat_linears`). Before that, under act-order, gate's
        and up's output columns are put in down's sequential order (`Int4Linear.permute_outputs`), so
        SwiGLU's output reaches down already gathered: one launch fewer at small m, and at large m the
        static dequant path instead of the row scatter."""
        parts = [getattr(self, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if all(type(p) is Int4Linear and p.backend is not None for p in parts) and parts[2].perm is not None:
            order = parts[2].perm  # dropped from down only once both of its inputs are in its order
            parts[0].permute_outputs(order)
            parts[1].permute_outputs(order)
            parts[2].take_sequential_input()
        if self.gate_up_proj is None:
            fused = concat_linears((self.gate_proj, self.up_proj), "gate/up")
            if fused is not None:
                self.gate_up_proj = fused
                del self.gate_proj, self.up_proj


def concat_linears(parts: tuple[nn.Module, ...], what: str = "") -> nn.Module | None:
    """One linear whose output is the parts' outputs side by side, or None where they cannot fuse.

    Dense parts: an nn.Linear with the weights concatenated along out. Keeping the fused weight transposed
    for cuBLAS's NN layout was measured and made no difference in the compiled model (43,605 vs 43,623
    tokens/s; benchmarks/RESULTS.md), so it stays nn.Linear. 4-bit parts: `Int4Linear.concat`, when they
    share an act-order permutation (GPTQ's q/k/v and gate/up do: one Hessian each); otherwise they stay
    apart, which is logged once.
    """
    if all(type(p) is Int4Linear for p in parts):
        ok, why = Int4Linear.fusable(parts)
        if not ok:
            log_once("4-bit %s projections stay separate linears: %s", what or "parallel", why)
            return None
        return Int4Linear.concat(parts)
    if not all(type(p) is nn.Linear for p in parts):
        return None
    w = torch.cat([p.weight for p in parts], dim=0)
    bias = parts[0].bias is not None
    out = nn.Linear(w.shape[1], w.shape[0], bias=bias, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        if bias:
            out.bias.copy_(torch.cat([p.bias for p in parts]))
    return out


# Traces a compiled decoder layer needs: keep (None in all but the last layer, or a tensor) x packed
# attention (cuDNN grid or flash varlen) x {first, static trace; dynamic shapes; a single-row batch, whose
# size-1 dimensions dynamic shapes specialize} + one-token batches = 14, against torch's default of 8. Past
# the limit a new shape class runs eager for good (a 4-bit 8B Scorer took 120 ms for one 512-token row, 58
# with it compiled: benchmarks/latency.py).
RECOMPILE_LIMIT = 32


def compile_layers(model: nn.Module, backend: str = "inductor") -> None:
    """torch.compile each decoder layer in place (dynamic shapes): fuses RMSNorm, RoPE, SwiGLU and the
    residual adds into a few kernels around the cuBLAS and flash-attention calls. Called at the call site
    (Scorer, compile=True); the model code itself stays eager. Raises torch's per-function recompile limit
    to RECOMPILE_LIMIT (a process-wide setting) so that every trace Scorer.warmup makes stays compiled."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    for mod in list(model.modules()):
        if isinstance(mod, DecoderLayer):
            mod.compile(dynamic=True, backend=backend)


def fuse_projections(model: nn.Module) -> None:
    """Fuse q/k/v and gate/up of every decoder layer in place (4-bit ones when `Int4Linear.fusable`)."""
    for mod in list(model.modules()):
        if isinstance(mod, (Attention, MLP)):
            mod.fuse()


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, dtype)
        self.mlp = MLP(cfg, dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | Packed | None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T, H) -> (B, T, H), or (1, len(keep), H) for the kept tokens only (see Attention.forward)."""
        a = self.self_attn(self.input_layernorm(x), cos, sin, mask, keep)
        x = _rows(x, keep) + a
        return x + self.mlp(self.post_attention_layernorm(x))


def _rows(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """(B, T, F) -> the kept tokens (1, len(keep), F) by flat index into B*T; all of x when keep is None."""
    return x if keep is None else x.reshape(-1, x.shape[-1])[keep][None]


def attention_mask_4d(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """(B, T) bool real-token mask -> (B, 1, T, T) bool "may attend" mask, or None when nothing is padded.

    Allowed: key j <= query i and key j is real; plus the diagonal, so padding queries attend to themselves
    instead of to nothing (an empty softmax row would be NaN). Real queries never see padding keys.
    """
    if bool(attention_mask.all()):
        return None
    T = attention_mask.shape[-1]
    idx = torch.arange(T, device=attention_mask.device)
    causal = idx[None, :] <= idx[:, None]  # (T, T): key <= query
    mask = causal[None] & attention_mask[:, None, :]  # (B, T, T)
    mask |= torch.eye(T, dtype=torch.bool, device=attention_mask.device)[None]
    return mask[:, None]


class LlamaModel(nn.Module):
    """Backbone: forward(input_ids, attention_mask, position_ids) -> (B, T, H) after the final norm."""

    def __init__(self, cfg: LlamaConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, dtype) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self._inv_freq: torch.Tensor | None = None  # fp32, lazily on the forward's device (not a weight)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None, keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, position_ids (B, T) int64; attention_mask (B, T) bool, True on real tokens;
        inputs_embeds (B, T, H): the rows of input_ids, gathered by the caller (host-resident table).
        -> (B, T, H) after the final norm; or, given keep (K,) int64 flat indices into the B*T tokens,
        (K, H) of those tokens alone: the last layer then runs its output projection, MLP and the final
        norm on them only (a head reads one token a row: ~0.9/L of the FLOPs saved, nothing else changes)."""
        if self._inv_freq is None or self._inv_freq.device != input_ids.device:
            self._inv_freq = rope_inv_freq(self.cfg).to(input_ids.device)
        x = self._embed(input_ids, inputs_embeds)  # (B, T, H)
        cos, sin = rope_cos_sin(self.cfg, self._inv_freq, position_ids, x.dtype)  # (B, T, d)
        mask = attention_mask_4d(attention_mask.bool())
        out = self._layers(x, cos, sin, mask, keep)
        return out if keep is None else out[0]

    def forward_packed(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, ctx: Packed,
        inputs_embeds: torch.Tensor | None = None, keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, position_ids (N,) int64 of rows laid end to end -> (N, H) after the final norm;
        inputs_embeds (N, H) and keep (K,) token indices -> (K, H) as in `forward`."""
        if self._inv_freq is None or self._inv_freq.device != input_ids.device:
            self._inv_freq = rope_inv_freq(self.cfg).to(input_ids.device)
        x = self._embed(input_ids[None], None if inputs_embeds is None else inputs_embeds[None])  # (1, N, H)
        cos, sin = rope_cos_sin(self.cfg, self._inv_freq, position_ids[None], x.dtype)  # (1, N, d)
        return self._layers(x, cos, sin, ctx, keep)[0]

    # -- the embedding table ------------------------------------------------------------------------
    @property
    def embeddings_on_host(self) -> bool:
        """True when the table sits in host memory while the layers run on a GPU."""
        return self.embed_tokens.weight.device.type == "cpu" and self.norm.weight.device.type != "cpu"

    def embeddings_to_host(self) -> None:
        """Move the embedding table to host memory (the forward then needs `inputs_embeds`)."""
        self.embed_tokens.to("cpu")

    def host_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The table's rows for host `input_ids` (any shape), in pinned memory when CUDA is present."""
        w = self.embed_tokens.weight
        ids = input_ids.reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= w.shape[0]):
            raise ValueError(f"token ids must be in 0..{w.shape[0] - 1} (vocab_size), got "
                             f"{int(ids.min())}..{int(ids.max())}")
        out = torch.empty(ids.numel(), w.shape[1], dtype=w.dtype, pin_memory=torch.cuda.is_available())
        torch.index_select(w, 0, ids, out=out)
        return out.view(*input_ids.shape, w.shape[1])

    def _embed(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        if inputs_embeds is not None:
            if inputs_embeds.shape != (*input_ids.shape, self.cfg.hidden_size):
                raise ValueError(f"inputs_embeds must be {(*input_ids.shape, self.cfg.hidden_size)}, "
                                 f"got {tuple(inputs_embeds.shape)}")
            return inputs_embeds
        if self.embeddings_on_host:
            raise ValueError("the embedding table is in host memory: pass inputs_embeds "
                             "(LlamaModel.host_embeddings of the ids)")
        return self.embed_tokens(input_ids)

    def _layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | Packed | None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, keep if i == last else None)
        if last < 0 and keep is not None:  # no layers: the kept tokens of the embeddings
            x = _rows(x, keep)
        return self.norm(x)
