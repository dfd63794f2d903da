"""Linear layers with one forward(x) -> y, so llama.py never asks whether weights are quantized.

`make_linear` returns a plain nn.Linear for fp16/bf16/fp32 checkpoints and an `Int4Linear` for GPTQ
ones. Parameter and buffer names equal the checkpoint's tensor names.

Int4Linear life cycle (what the loader does):
  1. built on the meta device with the checkpoint's buffers: qweight int32 (K/8, N), qzeros int32
     (G, N/8), scales fp16 (G, N), g_idx int32 (K,), bias (N,) when the layer has one;
  2. `load_state_dict(assign=True)` puts the checkpoint tensors there, the module moves to its device;
  3. `prepare(dtype)` once: v1 zeros -> true zeros; act-order (non-monotonic g_idx) -> rows permuted so
     each group is contiguous (exllama's make_sequential), the permutation kept to gather activation
     columns (fused kernel) or to scatter dequantized rows back (dequant path); scales and bias to the
     activation dtype (fp32 keeps fp16 scales: its W is the checkpoint's fp16 W, widened); the CUDA
     kernels' tile layout; the backend chosen once and logged.
  4. forward: the cuda backend calls `int4.matmul` directly when eager, and the `scorer::int4_matmul`
     torch op (the same call) when torch.compile traces it, so a compiled decoder layer stays one graph;
     there, for the projections right behind a norm (`gather_in_graph`), the act-order gather of x runs
     in torch just before the op, where inductor fuses it into the norm's kernel.
  5. `fuse_projections` (scorer.model.llama) may then replace q/k/v and gate/up by one `concat` each.
After prepare the buffers hold the prepared form (`qweight` in the backend's layout, `qzeros` as true
zeros, `scales` in the activation dtype, `g_idx` in sequential order, `perm`), so the module's memory is
the 4-bit weight plus small per-group tensors.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from scorer.kernels import int4
from scorer.kernels import reference as ref
from scorer.model.quant_config import QuantConfig

log = logging.getLogger(__name__)
_logged: set[str] = set()
_COLUMN_CHUNK = 4096  # columns unpacked at a time while preparing (bounds the temporary memory)
# Tests set this: prepare() builds the CUDA kernels' tile layout off CUDA too, run there by the
# scorer::int4_matmul op's plain-torch kernel, so the CPU suite traces the op as a GPU run does.
TILES_OFF_CUDA = False


def make_linear(
    in_features: int, out_features: int, bias: bool, quant: QuantConfig | None, dtype: torch.dtype
) -> nn.Module:
    if quant is None:
        return nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    return Int4Linear(in_features, out_features, bias, quant)


def log_once(msg: str, *args) -> None:
    text = msg % args
    if text not in _logged:
        _logged.add(text)
        log.info(text)


def _codes_u8(tiles: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """The (K, N) codes of a tile layout as uint8, unpacked _COLUMN_CHUNK columns at a time (unrepack's
    int32 nibbles of a whole 70B gate/up layer would be ~16x its packed size)."""
    out = torch.empty(k, n, dtype=torch.uint8, device=tiles.device)
    step = _COLUMN_CHUNK // 64
    for b0 in range(0, tiles.shape[0], step):
        c0 = b0 * 64
        c1 = min(n, c0 + _COLUMN_CHUNK)
        out[:, c0:c1] = int4.unrepack(tiles[b0 : b0 + step], k, c1 - c0)
    return out


def _tiles_of(codes_of, k: int, n: int, device: torch.device) -> torch.Tensor:
    """The tile layout of N columns whose codes `codes_of(c0, c1)` gives (K, c1 - c0) _COLUMN_CHUNK at a
    time, as prepare repacks (bounds repack's temporaries)."""
    kp, np_ = int4.padded(k, n)
    tiles = torch.empty(np_ // 64, kp // 16, 32, 4, dtype=torch.int32, device=device)
    for c0 in range(0, n, _COLUMN_CHUNK):
        blk = int4.repack(codes_of(c0, min(n, c0 + _COLUMN_CHUNK)))
        tiles[c0 // 64 : c0 // 64 + blk.shape[0]] = blk
    return tiles


def _tile_groups(zeros: torch.Tensor, scales: torch.Tensor, n: int, np_: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(qzeros, scales) of the tile layout from true zeros and scales (G, >= n): their first n columns,
    zero past them up to Np (the padded column block), the zeros packed 8 a word."""
    zp = zeros.new_zeros(zeros.shape[0], np_)
    zp[:, :n] = zeros[:, :n]
    sp = scales.new_zeros(scales.shape[0], np_)
    sp[:, :n] = scales[:, :n]
    return ref.pack_qzeros(zp, v1=False), sp


class Int4Linear(nn.Module):
    """A GPTQ 4-bit linear layer: y = x @ W + bias with W dequantized from 4-bit codes."""

    def __init__(self, in_features: int, out_features: int, bias: bool, quant: QuantConfig) -> None:
        super().__init__()
        if quant.bits != 4:
            raise ValueError(f"Int4Linear runs 4-bit GPTQ, not {quant.bits}-bit ({quant.source})")
        if in_features % 8 or out_features % 8:
            raise ValueError(
                f"GPTQ packs 8 codes per int32 along in_features and 8 zeros along out_features: "
                f"{in_features} x {out_features} is not a multiple of 8 in both"
            )
        self.in_features, self.out_features, self.quant = in_features, out_features, quant
        g = quant.n_groups(in_features)
        self.register_buffer("qweight", torch.empty(in_features // 8, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.empty(g, out_features // 8, dtype=torch.int32))
        self.register_buffer("scales", torch.empty(g, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32))
        self.register_buffer("bias", torch.empty(out_features, dtype=torch.float16) if bias else None)
        self.register_buffer("perm", None, persistent=False)
        # set by the model where x comes straight from an RMSNorm (q/k/v, gate/up): under torch.compile
        # the act-order gather then runs in torch before the op, and inductor fuses it into the norm's
        # kernel. Elsewhere (o after attention, down after SwiGLU) it would be a gather of its own, which
        # at large m costs more than the dequant path's scatter of W rows, so the op keeps it.
        self.gather_in_graph = False
        self.dtype: torch.dtype | None = None  # the activation dtype, once prepared
        self.backend: str | None = None  # "cuda" or "reference", once prepared
        self._w = None  # scorer.kernels.int4.Int4Weight for the cuda backend

    def extra_repr(self) -> str:
        q = self.quant
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"group_size={q.group_size}, desc_act={q.desc_act}, sym={q.sym}, format={q.checkpoint_format}, "
            f"backend={self.backend}"
        )

    # -- prepare -----------------------------------------------------------------------------------

    def _check_loaded(self) -> None:
        k, n = self.in_features, self.out_features
        g = self.quant.n_groups(k)
        want = {
            "qweight": (torch.int32, (k // 8, n)),
            "qzeros": (torch.int32, (g, n // 8)),
            "scales": (torch.float16, (g, n)),
            "g_idx": (torch.int32, (k,)),
        }
        for name, (dt, shape) in want.items():
            t = getattr(self, name)
            if t.is_meta:
                raise ValueError(f"Int4Linear.{name} was never loaded (still on the meta device)")
            if t.dtype != dt or tuple(t.shape) != shape:
                raise ValueError(
                    f"Int4Linear({k}, {n}, group_size={self.quant.group_size}).{name}: expected {dt} {shape}, "
                    f"got {t.dtype} {tuple(t.shape)} ({self.quant.source})"
                )
        gi = self.g_idx
        if int(gi.min()) < 0 or int(gi.max()) >= g:
            raise ValueError(f"Int4Linear g_idx has groups outside 0..{g - 1} ({self.quant.source})")

    @torch.no_grad()
    def prepare(self, dtype: torch.dtype) -> None:
        """One-time work after loading, on the final device (see the module docstring)."""
        if self.backend is not None:
            if dtype != self.dtype:
                raise ValueError(f"Int4Linear already prepared for {self.dtype}, not {dtype}")
            return
        self._check_loaded()
        k, n = self.in_features, self.out_features
        dev = self.qweight.device
        g_idx = self.g_idx.long()
        zeros = ref.unpack_qzeros(self.qzeros, self.quant.v1)  # (G, N) true zeros
        perm = None
        if k > 1 and not bool((g_idx[1:] >= g_idx[:-1]).all()):
            perm = torch.argsort(g_idx, stable=True)  # make_sequential: sequential row i = input row perm[i]
        g_seq = g_idx if perm is None else g_idx[perm]
        group = int((g_seq == g_seq[0]).sum())  # rows in the first group
        uniform = int(g_seq[0]) == 0 and torch.equal(g_seq, torch.arange(k, device=dev) // group)
        group16 = -(-k // 16) if group >= k else group // 16

        backend, why = "reference", ""
        if TILES_OFF_CUDA and dev.type != "cuda" and dtype in (torch.float16, torch.bfloat16) and uniform:
            backend, why = "cuda", "tests: the kernels' layout through the op's plain-torch kernel"
        elif dev.type == "cuda":
            ok, why = int4.available(dev)
            if ok and dtype not in (torch.float16, torch.bfloat16):
                ok, why = False, f"activation dtype {dtype} (the kernels run fp16/bf16)"
            if ok and not (uniform and (group % 16 == 0 or group >= k)):
                ok, why = False, "g_idx groups are not contiguous runs of a multiple of 16 rows after sorting"
            backend = "cuda" if ok else "reference"
        else:
            why = f"device {dev}"
        log_once("Int4Linear backend %s on %s for %s: %s", backend, dev, dtype, why)

        # W rounds once to the activation dtype from scales in that dtype; fp32 runs carry the checkpoint's
        # own fp16 W exactly (fp16 scales, fp16 product, then widened), so fp32 = the fp16-defined weights
        scales = self.scales if dtype == torch.float32 else self.scales.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        if backend == "cuda":
            _, np_ = int4.padded(k, n)

            def codes(c0: int, c1: int) -> torch.Tensor:  # sequential rows of columns c0..c1
                q = ref.unpack_qweight(self.qweight[:, c0:c1].contiguous())
                return q if perm is None else q[perm]

            qweight = _tiles_of(codes, k, n, dev)
            qzeros, scales = _tile_groups(zeros, scales, n, np_)
        else:
            q = ref.unpack_qweight(self.qweight)
            qweight = ref.pack_qweight(q if perm is None else q[perm])
            qzeros = ref.pack_qzeros(zeros, v1=False)
        self.qweight, self.qzeros, self.scales = qweight, qzeros, scales
        self.g_idx = g_seq.to(torch.int32)
        self.perm = None if perm is None else perm.to(torch.int32)
        self.bias = bias
        self.dtype, self.backend, self._group16 = dtype, backend, group16
        self._rebuilt()

    @torch.no_grad()
    def permute_outputs(self, order: torch.Tensor) -> None:
        """Reorder this prepared layer's output columns in place: new column j is old column order[j]
        (codes, scales, zeros and bias move together, so each column's values are unchanged). With the
        next layer's act-order permutation as `order`, this layer writes x in that layer's sequential
        order and the next one needs no gather (`MLP.fuse`)."""
        if self.backend is None:
            raise RuntimeError("Int4Linear.prepare(dtype) must run first")
        n = self.out_features
        order = order.to(device=self.qweight.device, dtype=torch.long)
        if order.shape != (n,):
            raise ValueError(f"permute_outputs: order must have {n} entries, got {tuple(order.shape)}")
        zeros = ref.unpack_qzeros(self.qzeros, False)[:, :n][:, order]
        scales = self.scales[:, :n][:, order]
        if self.backend == "cuda":
            k = self.in_features
            codes = _codes_u8(self.qweight, k, n)  # one byte a code: a layer's K x N bytes, not 16x that
            self.qweight = _tiles_of(lambda c0, c1: codes[:, order[c0:c1]], k, n, self.qweight.device)
            del codes
            self.qzeros, self.scales = _tile_groups(zeros, scales, n, int4.padded(k, n)[1])
        else:
            self.qweight = self.qweight[:, order].contiguous()
            self.qzeros, self.scales = ref.pack_qzeros(zeros, v1=False), scales.contiguous()
        if self.bias is not None:
            self.bias = self.bias[order].contiguous()
        self._rebuilt()

    @torch.no_grad()
    def take_sequential_input(self) -> None:
        """From now on x arrives in this layer's sequential order (the layer before it was permuted by
        this layer's perm, `permute_outputs`): the act-order gather is dropped."""
        if self.perm is not None:
            self.perm = None
            self._rebuilt()

    def _rebuilt(self) -> None:
        """The buffers are new (prepared, permuted, fused): a new kernel view, registered, and the scratch
        sized for it."""
        self._w = None
        if self.backend == "cuda" and self.qweight.is_cuda:
            int4.reserve(self._weight())

    @staticmethod
    def fusable(parts: tuple[nn.Module, ...]) -> tuple[bool, str]:
        """(whether `concat` can fuse these prepared layers, why not): one input (in_features), one
        prepared form (backend, dtype, group size, bias or none) and one act-order permutation. GPTQ
        quantizes q/k/v (and gate/up) from one Hessian, so real checkpoints share g_idx; layers quantized
        apart may not, and then each keeps its own permutation and runs alone."""
        first = parts[0]
        if not all(type(p) is Int4Linear and p.backend is not None for p in parts):
            return False, "not all prepared Int4Linear"
        same = ("in_features", "backend", "dtype", "_group16")
        if any(getattr(p, a) != getattr(first, a) for p in parts for a in same):
            return False, "different shapes, backends, dtypes or group sizes"
        if any((p.bias is None) != (first.bias is None) for p in parts):
            return False, "some have a bias and some do not"
        if any((p.perm is None) != (first.perm is None) or (p.perm is not None and not torch.equal(p.perm, first.perm))
               or not torch.equal(p.g_idx, first.g_idx) for p in parts):
            return False, "their act-order permutations (g_idx) differ"
        return True, ""

    @classmethod
    @torch.no_grad()
    def concat(cls, parts: tuple["Int4Linear", ...]) -> "Int4Linear":
        """One prepared Int4Linear whose output is the parts' outputs side by side (their codes, scales,
        zeros and biases concatenated along out_features; `fusable` must hold). Scores equal the parts':
        every output column is the same dot product over the same codes."""
        ok, why = cls.fusable(parts)
        if not ok:
            raise ValueError(f"Int4Linear.concat: cannot fuse these layers: {why}")
        first = parts[0]
        n = sum(p.out_features for p in parts)
        with torch.device("meta"):  # its buffers are all replaced below
            out = cls(first.in_features, n, first.bias is not None, first.quant)
        if first.backend == "cuda":  # tiles (Np/64, Kp/16, 32, 4): column blocks; scales/zeros padded to Np
            k = first.in_features
            _, np_ = int4.padded(k, n)
            if all(p.out_features % 64 == 0 for p in parts[:-1]):  # whole column blocks (every Llama width)
                qweight = torch.cat([p.qweight for p in parts])
            else:  # a part ends inside a column block: the codes back out and tiled again
                codes = torch.cat([_codes_u8(p.qweight, k, p.out_features) for p in parts], dim=1)
                qweight = _tiles_of(lambda c0, c1: codes[:, c0:c1], k, n, first.qweight.device)
                del codes
            scales = torch.cat([p.scales[:, : p.out_features] for p in parts], dim=1)
            zeros = torch.cat([ref.unpack_qzeros(p.qzeros, False)[:, : p.out_features] for p in parts], dim=1)
            qzeros, scales = _tile_groups(zeros, scales, n, np_)
        else:  # packed (K/8, N) codes, (G, N/8) zeros, (G, N) scales
            qweight = torch.cat([p.qweight for p in parts], dim=1)
            qzeros = torch.cat([p.qzeros for p in parts], dim=1)
            scales = torch.cat([p.scales for p in parts], dim=1)
        out.qweight, out.qzeros, out.scales = qweight, qzeros, scales
        out.g_idx, out.perm, out.gather_in_graph = first.g_idx, first.perm, first.gather_in_graph
        out.bias = None if first.bias is None else torch.cat([p.bias for p in parts])
        out.dtype, out.backend, out._group16 = first.dtype, first.backend, first._group16
        out._rebuilt()
        return out

    def _weight(self):
        """The kernels' view of this layer (built once, registered for the op; see _apply)."""
        if self._w is None:
            self._w = int4.Int4Weight(self.qweight, self.scales, self.qzeros, self.perm, self.bias,
                                      self.in_features, self.out_features, self._group16)
            self._w.check()
            int4.register(self._w)
            int4.register(self._w.sequential())  # the op's calls with x gathered beforehand (forward)
        return self._w

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._w = None  # the buffers may have moved: the kernel view is rebuilt and registered for the op
        if self.backend == "cuda" and self.qweight.is_cuda:
            try:
                self._weight()
            except ValueError:
                pass  # a layout the kernels refuse: the next forward builds it again and says why
        return out

    # -- run ---------------------------------------------------------------------------------------

    def _reference_weight(self) -> torch.Tensor:
        """(K, N) dense weight in the activation dtype, rows in input order."""
        w = ref.dequantize(self.qweight, self.qzeros, self.scales, self.g_idx, v1=False).to(self.dtype)
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[self.perm.long()] = w
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend is None:
            raise RuntimeError("Int4Linear.prepare(dtype) must run once after loading (load_model does)")
        if x.dtype != self.dtype or x.shape[-1] != self.in_features:
            raise ValueError(
                f"Int4Linear({self.in_features}, {self.out_features}) prepared for {self.dtype} got x of "
                f"{x.dtype} {tuple(x.shape)}"
            )
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.backend == "cuda":
            if self.qweight.is_cuda and not torch.compiler.is_compiling():
                # eager on CUDA: the op's function without the dispatcher's few us (a short batch of an 8B
                # model makes 128-224 of these calls); the act-order gather is the kernels' own launch
                y = int4.linear(x2, self._weight())
            else:
                # traced: one opaque op in the layer's graph. Behind a norm (gather_in_graph) the
                # act-order gather of x's columns runs before it, in torch, so inductor fuses it into the
                # norm's kernel: the op sees x in sequential order and gemv is one launch fewer.
                perm = self.perm
                if perm is not None and self.gather_in_graph and self.in_features % 16 == 0:  # else the op pads K
                    x2, perm = x2.index_select(1, perm), None
                y = torch.ops.scorer.int4_matmul(x2, self.qweight, self.scales, self.qzeros, perm, self.bias,
                                                 self.in_features, self.out_features, self._group16)
        else:
            y = self._reference_forward(x2)
        return y.view(*lead, self.out_features)

    @torch.compiler.disable  # the plain-torch dequant stays eager under torch.compile (its own frame)
    def _reference_forward(self, x2: torch.Tensor) -> torch.Tensor:
        w = self._reference_weight()
        return x2 @ w if self.bias is None else torch.addmm(self.bias, x2, w)

    @torch.no_grad()
    def dequantized_weight(self) -> torch.Tensor:
        """The dense (N, K) weight in the activation dtype (what an nn.Linear with these values holds)."""
        if self.backend is None:
            raise RuntimeError("Int4Linear.prepare(dtype) must run first")
        if self.backend != "cuda":
            return self._reference_weight().t().contiguous()
        if self.qweight.is_cuda:
            wt = torch.empty(self.out_features, self.in_features, dtype=self.dtype, device=self.qweight.device)
            int4.dequant(self._weight(), wt)  # (N, K), columns in sequential order
        else:  # TILES_OFF_CUDA: the same W from the plain-torch kernel
            wt = int4.reference_weight(self.qweight, self.scales, self.qzeros, self.in_features, self.out_features,
                                       self._group16).t().contiguous()
        if self.perm is None:
            return wt
        out = torch.empty_like(wt)
        out[:, self.perm.long()] = wt
        return out

    def weight_bytes(self) -> int:
        """Bytes of this layer's weight tensors as held now (codes, scales, zeros, indices, bias)."""
        return sum(t.numel() * t.element_size() for t in self.buffers(recurse=False) if t is not None)
