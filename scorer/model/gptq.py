"""GPTQ and round-to-nearest (RTN) quantization of one linear layer: the pure algorithm, no files, no model.

Orientation: W is nn.Linear.weight, shape (N = out_features, K = in_features); a "column" is one input
feature. The outputs (`QuantResult`) are in the checkpoint orientation DESIGN.md fixes: codes q (K, N),
zeros (G, N), fp16 scales (G, N), g_idx (K,), so `scorer.kernels.reference.pack_gptq` takes them as they are.

The quantizer of a group (per output row n, asymmetric or symmetric, min/max over the group's columns):
    scale = (xmax - xmin) / maxq,  zero = round(-xmin / scale)   (sym: xmin = -xmax, zero = (maxq + 1) / 2)
    q = clamp(round(w / scale) + zero, 0, maxq),  w_hat = fp16(scale * (q - zero))
An asymmetric zero is never 0: a row whose zero rounds to 0 (xmin > -scale / 2) takes zero 1 and
scale = xmax / (maxq - 1), a step up to 7% coarser whose grid still covers [xmin, xmax]. A v1 checkpoint
stores z - 1, and readers disagree on a stored -1: GPTQModel (and scorer) add 0x11111111 to the whole
word, so the borrow it made is undone; exllama-style kernels (AutoGPTQ, vLLM's GPTQ path) add 1 to each
nibble and read 16 (or 0) there and one less in the nibble above. With zeros of 1..15 every reader agrees.
Scales are rounded to fp16 *before* they are used, and w_hat is rounded to fp16 once, so the weights GPTQ
compensates for are exactly the ones the checkpoint dequantizes to (the references keep fp32 scales and
round at pack time; this is the only intended difference).

GPTQ (Frantar et al. 2022; IST-DASLab/gptq, GPTQModel `quantization/gptq.py`): with the layer-input
Hessian H = 2/n sum_x x x^T (`Hessian`), quantize the columns one at a time and spread each column's
rounding error over the columns not yet quantized, weighted by the Cholesky factor of H^-1:
    dead columns (H[i,i] = 0): H[i,i] = 1, W[:, i] = 0
    act-order: columns by descending diag(H) (perm); g_idx[perm[i]] = i // group_size
    H += damp * mean(diag(H)) * I;  U = chol(H^-1), upper
    for each block of 128 columns, for each column i in it:
        err = (w_i - w_hat_i) / U[i,i];  W[:, i:block_end] -= err U[i, i:block_end]
    and after the block: W[:, block_end:] -= Err_block U[block, block_end:]   (the lazy batch update)
Group parameters are found on the (already error-updated) columns at each group start, or, with
static_groups, once on the original columns before act-order (g_idx then stays i // group_size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FP16_TINY = 2.0**-24  # smallest positive fp16: a scale must survive the cast to fp16


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 128  # -1: one group over all of K
    sym: bool = True
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01  # fraction of mean(diag(H)) added to the diagonal
    block_size: int = 128

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def groups(self, k: int) -> tuple[int, int]:
        """(group size in columns, number of groups) for K = k input features."""
        gs = k if self.group_size == -1 else self.group_size
        return gs, -(-k // gs)


@dataclass
class QuantResult:
    """One quantized linear, checkpoint orientation; `weight` is the dequantized (N, K) fp32 weight."""

    q: torch.Tensor  # (K, N) int32 in 0..maxq
    zeros: torch.Tensor  # (G, N) int32 in 0..maxq
    scales: torch.Tensor  # (G, N) fp16
    g_idx: torch.Tensor  # (K,) int32
    weight: torch.Tensor  # (N, K) fp32 == fp16(scales[g_idx] * (q - zeros[g_idx])).T
    damp: float = 0.0  # the dampening actually used (raised when the Cholesky factorization failed)

    def split(self, sizes: list[int]) -> list["QuantResult"]:
        """Per-linear results of linears quantized together as one (sum N, K) weight: every GPTQ step acts
        on each output row alone given H, so stacking the rows of linears that share an input (q/k/v,
        gate/up) gives their separate results with one pass over the columns instead of several."""
        parts = zip(self.q.split(sizes, 1), self.zeros.split(sizes, 1), self.scales.split(sizes, 1),
                    self.weight.split(sizes, 0))
        return [QuantResult(q.contiguous(), z.contiguous(), s.contiguous(), self.g_idx.clone(), w, self.damp)
                for q, z, s, w in parts]


class Hessian:
    """Running H = 2/n sum x x^T over the rows x of a linear layer's input, in fp32 (GPTQModel's update)."""

    def __init__(self, k: int, device: torch.device | str):
        self.H = torch.zeros(k, k, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """x: (m, K) input rows (real tokens only)."""
        m = x.shape[0]
        if m == 0:
            return
        x = x.to(device=self.H.device, dtype=torch.float32)
        total = self.n + m
        self.H.addmm_(x.T, x, beta=self.n / total, alpha=2.0 / total)  # H = n/(n+m) H + 2/(n+m) x^T x
        self.n = total


def find_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) of a weight slice w (N, c); scale is fp32 holding an fp16 value."""
    zero_t = torch.zeros(w.shape[0], device=w.device, dtype=torch.float32)
    xmin = torch.minimum(w.min(dim=1).values, zero_t)
    xmax = torch.maximum(w.max(dim=1).values, zero_t)
    if spec.sym:
        # The references keep xmin = 0 for an all-positive row, which clips it at 7/15 of its max;
        # xmin = -xmax for every row keeps the whole row representable.
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, -1.0, xmin)
    xmax = torch.where(flat, 1.0, xmax)
    scale = ((xmax - xmin) / spec.maxq).clamp_min(FP16_TINY).half().float()
    if spec.sym:
        return scale, torch.full_like(scale, (spec.maxq + 1) // 2)
    zero = torch.round(-xmin / scale).clamp(0, spec.maxq)
    low = zero == 0  # see the module docstring: zero 1 on a grid that still reaches xmax
    scale = torch.where(low, (xmax / (spec.maxq - 1)).clamp_min(FP16_TINY).half().float(), scale)
    return scale, torch.where(low, 1.0, zero)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and fp16-rounded dequantized values of w (broadcast with scale/zero)."""
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return q, (scale * (q - zero)).half().float()


def _result(q_nk: torch.Tensor, w_nk: torch.Tensor, scales: list, zeros: list, g_idx: torch.Tensor, damp: float) -> QuantResult:
    return QuantResult(
        q=q_nk.T.to(torch.int32).contiguous(),
        zeros=torch.stack(zeros).to(torch.int32),  # (G, N)
        scales=torch.stack(scales).half(),  # (G, N)
        g_idx=g_idx.to(torch.int32),
        weight=w_nk,
        damp=damp,
    )


@torch.no_grad()
def rtn(weight: torch.Tensor, spec: QuantSpec) -> QuantResult:
    """Round-to-nearest with the same groups and quantizer: the baseline GPTQ must beat."""
    W = weight.detach().float()
    n, k = W.shape
    gs, g = spec.groups(k)
    scales, zeros = [], []
    Q = torch.empty_like(W)
    Wq = torch.empty_like(W)
    for j in range(g):
        sl = slice(j * gs, min((j + 1) * gs, k))
        s, z = find_params(W[:, sl], spec)
        Q[:, sl], Wq[:, sl] = quantize_codes(W[:, sl], s[:, None], z[:, None], spec.maxq)
        scales.append(s)
        zeros.append(z)
    g_idx = torch.arange(k, device=W.device) // gs
    return _result(Q, Wq, scales, zeros, g_idx, 0.0)


def hessian_inverse_factor(H: torch.Tensor, damp: float, step: float = 0.0015) -> tuple[torch.Tensor, float]:
    """U = chol((H + damp * mean(diag H) I)^-1, upper); raise damp by `step` until the factorization holds."""
    mean = torch.mean(torch.diag(H))
    idx = torch.arange(H.shape[0], device=H.device)
    while True:
        H2 = H.clone()
        H2[idx, idx] += damp * mean
        L, info = torch.linalg.cholesky_ex(H2)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0 and torch.isfinite(U).all():
                return U, damp
        if damp + step >= 1.0:
            raise ValueError(
                f"the Hessian is not positive definite even with damp {damp:.4f}; "
                "use more or longer calibration texts (--samples, --max-length) or a larger --damp"
            )
        damp += step


@torch.no_grad()
def gptq(weight: torch.Tensor, H: torch.Tensor, spec: QuantSpec) -> QuantResult:
    """Quantize weight (N, K) with GPTQ given the input Hessian H (K, K); neither input is modified."""
    W = weight.detach().float().clone()
    n, k = W.shape
    H = H.float().clone()
    gs, _ = spec.groups(k)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    static = None
    if spec.static_groups or spec.group_size == -1:  # fixed per-group params, on the original columns
        static = [find_params(W[:, i : i + gs], spec) for i in range(0, k, gs)]

    perm = None
    if spec.act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]

    Hinv, damp = hessian_inverse_factor(H, spec.damp)
    del H

    Q = torch.zeros_like(W)  # codes, permuted column order
    Wq = torch.zeros_like(W)  # dequantized, permuted column order
    scales: list[torch.Tensor] = []
    zeros: list[torch.Tensor] = []
    col_group = perm if (perm is not None and static is not None) else torch.arange(k, device=W.device)
    col_group = (col_group // gs).tolist()  # the static group of each (permuted) column
    if static is not None:
        scales = [s for s, _ in static]
        zeros = [z for _, z in static]
    scale = zero = None
    for i1 in range(0, k, spec.block_size):
        i2 = min(i1 + spec.block_size, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                scale, zero = static[col_group[col]]
            elif col % gs == 0:  # a new group starts: params from the error-updated remaining columns
                W[:, i1 + i : i2] = W1[:, i:]  # make the block's updates visible to find_params
                scale, zero = find_params(W[:, col : col + gs], spec)
                scales.append(scale)
                zeros.append(zero)
            w = W1[:, i]
            q, wq = quantize_codes(w, scale, zero, spec.maxq)
            Q[:, col] = q
            Wq[:, col] = wq
            err = (w - wq) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if perm is not None:
        invperm = torch.argsort(perm)
        Q, Wq = Q[:, invperm], Wq[:, invperm]
        if static is not None:
            g_idx = torch.arange(k, device=W.device) // gs
        else:
            g_idx = torch.empty(k, dtype=torch.long, device=W.device)
            g_idx[perm] = torch.arange(k, device=W.device) // gs  # g_idx[perm[i]] = i // gs
    else:
        g_idx = torch.arange(k, device=W.device) // gs
    return _result(Q, Wq, scales, zeros, g_idx, damp)


def relative_output_error(delta: torch.Tensor, weight: torch.Tensor, H: torch.Tensor) -> float:
    """||X dW^T|| / ||X W^T|| from the held-out Gram matrix H ~ X^T X (any positive scale), weights (N, K).

    ||X A^T||_F^2 = trace(A H A^T), so the inputs X need not be kept."""
    num = torch.einsum("nk,nk->", delta @ H, delta).clamp_min(0)
    den = torch.einsum("nk,nk->", weight @ H, weight)
    if den <= 0:
        return 0.0 if num == 0 else math.inf
    return math.sqrt(float(num) / float(den))
