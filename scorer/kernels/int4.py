"""CUDA 4-bit GPTQ path: CuPy RawKernels from int4.cu, launched on torch's current stream.

Kernels over one prepared weight layout (`repack`, described at the top of int4.cu):
  * `dequant` / `dequant_rows`: a whole layer -> fp16/bf16 W in a reused per-device scratch buffer; then
    cuBLAS does y = x @ W. This is the large-m path: prefill matmuls are compute-bound, so 4-bit costs
    one pass over 2.5 bytes per weight (read 0.5, write 2).
  * `gemv`: m <= 16, the memory-bound case: a stream-K fused GEMM that reads the packed weights once
    (a quarter of fp16's bytes) in equal chunks over one wave of warps, fp32 accumulation on the tensor
    cores (the codes' q - z, each group's sums scaled once), deterministic fix-up of split column
    blocks. Two rings feed it (cp.async per lane, or on sm_90 the bulk copy engine, a stage per copy);
    which is faster depends on the layer's size, so it is timed once per layer shape at first use
    (`gemv_ring`). Both give bit-identical results.
  * `gemm_tiles`: m <= 64, a split-K fused tensor-core GEMM with a cp.async pipeline (the m > 16 side).
  * `gemm_mid`: 16 < m <= MID_MAX_M, a block-tiled fused GEMM (128 x 128 output tiles, codes and x shared
    by the block's warps in a cp.async ring, the dequant in the mainloop, deterministic split-K). Correct,
    but slower than the paths it would replace on an H200: off unless MID_ENABLED (SCORER_INT4_MID=1).
`gemm_small` is the fused path (gemv up to 16 rows, gemm_tiles above); `matmul` picks between it and
dequant + cuBLAS by m, with a crossover measured once per (device, shape, dtype) at first use (and, with
gemm_mid on, above gemv's 16 rows gemm_mid or what would run without it, per bucket of MID_PROBES).

The wrappers only check dtype, shape, contiguity, alignment and device (ValueError) and launch: no host
syncs, no allocation in the steady state (the scratch buffer and split-K workspace are shared by all
layers of a device, sized by the largest one at prepare time). One stream per device is assumed: all
layers share the scratch, which stream order makes safe.
"""

from __future__ import annotations

import bisect
import ctypes
import logging
import os
import statistics
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int4.cu")
MAX_FUSED_M = 64  # the fused kernels' largest m (8 tiles of 8 rows)
GEMV_MAX_M = 16  # gemv's largest m (2 tiles of 8 rows)
GEMV_WARPS = 4  # warps per block of int4_gemv (GEMV_WARPS in int4.cu)
GEMV_BLOCKS = {1: 4, 2: 3}  # blocks per SM by row tiles (GEMV_B1, GEMV_B2 in int4.cu: its launch bounds)
GEMV_WAVE = GEMV_WARPS * GEMV_BLOCKS[2]  # warps per SM in gemv's one wave (the smaller of the two)
GEMV_MIN_CHUNK = 16  # tiles per warp at least: fewer pieces to fix up on small layers
# int4_gemv_fix<DT, MT, F>: F = 8 (32 registers, ~3 loads in flight, the most blocks a SM) for layers whose
# column blocks have at most GEMV_FIX_FEW pieces, F = 16 (all 16 in flight) above (RESULTS.md, twelfth session)
GEMV_FIX_DEPTHS = (8, 16)
GEMV_FIX_FEW = 8
GEMV_RINGS = (1, 2)  # int4_gemv<DT, MT, R>: 1 cp.async per lane, 2 bulk copies (sm_90+; ring 1 below)
CROSSOVER_PROBES = (1, 8, 16, 32, 48, 64)
MID_MAX_M = 1024  # gemm_mid's largest m
# MID_* in int4.cu: warps down and across, row tiles of 8 a warp, tiles a stage, stages, blocks a SM
MID_WM, MID_WN, MID_MT, MID_KB, MID_S, MID_MINB = 2, 2, 8, 4, 4, 2
MID_BM, MID_BN, MID_NT = 8 * MID_MT * MID_WM, 64 * MID_WN, 32 * MID_WM * MID_WN  # block tile rows, columns; threads
MID_SMEM = MID_S * (MID_WN * MID_KB * 512 + MID_KB * MID_BM * 32)  # MidCfg::SMEM
MID_PROBES = (32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)  # upper ends of its buckets (the first from 16)
MID_BLOCKS_PER_SM = MID_MINB  # split-K aims at this many blocks a SM
# Correct on an H200 but slower than the path it would replace at every measured shape and m (RESULTS.md,
# ninth session): the dispatch leaves it out unless asked for.
MID_ENABLED = os.environ.get("SCORER_INT4_MID", "") == "1"
_DT = {torch.float16: 0, torch.bfloat16: 1}


def mt_of(m: int) -> int:
    """Row tiles of 8 for m rows (the kernel template argument)."""
    return 1 if m <= 8 else 2 if m <= 16 else 4 if m <= 32 else 8


SMALL_WARPS, SMALL_STAGES = 8, 8  # Cfg<MT <= 2> in int4.cu (INT4_SMALL_WARPS / INT4_SMALL_STAGES)
SPLIT_TARGET_WARPS = 16  # split-K aims at this many warps per SM


def warps_of(mt: int) -> int:
    """Warps per block of gemm_small<.., MT> (Cfg<MT>::KW in int4.cu)."""
    return SMALL_WARPS if mt <= 2 else 4


def smem_of(mt: int) -> int:
    """Dynamic shared memory bytes of gemm_small<.., MT> (Cfg<MT>::SMEM in int4.cu)."""
    kw, stages = warps_of(mt), (SMALL_STAGES if mt <= 2 else 6)
    return max(kw * stages * 32 * (16 + 16 + 4 + 8 * mt), kw * mt * 8 * 65 * 4)


def padded(k: int, n: int) -> tuple[int, int]:
    """(Kp, Np): K rounded up to 16 (row blocks), N to 64 (column blocks)."""
    return -(-k // 16) * 16, -(-n // 64) * 64


# -- layout (pure torch: runs on CPU too, so tests check it without a GPU) ----------------------------

def repack(q: torch.Tensor) -> torch.Tensor:
    """Codes (K, N) in 0..15, rows in sequential (act-order applied) order -> int32 (Np/64, Kp/16, 32, 4).

    Word j of lane 4g+t in tile (nb, kt), nibble 4*(kk&1) + 2*(kk>>1) + p, holds
    q[16*kt + 4*t + kk, 64*nb + 8*g + 2*j + p]. Padding rows/columns hold code 0.
    """
    k, n = q.shape
    kp, np_ = padded(k, n)
    qp = torch.zeros(kp, np_, dtype=torch.int32, device=q.device)
    qp[:k, :n] = q
    kt, nbk = kp // 16, np_ // 64
    # (kt, t, kh, kl, nb, g, j, p) with k = 16kt + 4t + 2kh + kl, n = 64nb + 8g + 2j + p
    v = qp.view(kt, 4, 2, 2, nbk, 8, 4, 2)
    # -> (nb, kt, g, t, j, kl, kh, p): nibble index i = 4*kl + 2*kh + p, lane = 4g + t
    v = v.permute(4, 0, 5, 1, 6, 3, 2, 7).reshape(nbk, kt, 32, 4, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=q.device)
    w = (v.to(torch.int64) << shifts).sum(-1)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32).contiguous()


def unrepack(words: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """Inverse of `repack`: int32 (Np/64, Kp/16, 32, 4) -> codes (K, N)."""
    nbk, kt = words.shape[:2]
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)
    nib = (words.unsqueeze(-1) >> shifts) & 0xF  # (nb, kt, 32, 4, 8)
    v = nib.view(nbk, kt, 8, 4, 4, 2, 2, 2)  # (nb, kt, g, t, j, kl, kh, p)
    v = v.permute(1, 3, 6, 5, 0, 2, 4, 7).reshape(kt * 16, nbk * 64)
    return v[:k, :n]


# -- the prepared weight ----------------------------------------------------------------------------

@dataclass
class Int4Weight:
    """Everything the kernels read for one layer (tensors on one CUDA device)."""

    qweight: torch.Tensor  # int32 (Np/64, Kp/16, 32, 4), see repack
    scales: torch.Tensor  # (G, Np) in the activation dtype
    qzeros: torch.Tensor  # int32 (G, Np/8), true zeros
    perm: torch.Tensor | None  # int32 (K,): sequential row i is input row perm[i]; None: identity
    bias: torch.Tensor | None  # (N,) in the activation dtype
    k: int
    n: int
    group16: int  # rows per group / 16 (row block kt is in group min(kt // group16, G - 1))
    # measured or planned once per layer, at first use (see gemv_ring, crossover, gemv)
    rings: dict[int, int] = field(default_factory=dict, repr=False, compare=False)  # mt -> gemv ring
    cross: int | None = field(default=None, repr=False, compare=False)  # the fused path's largest m
    mid_wins: tuple[bool, ...] | None = field(default=None, repr=False, compare=False)  # per MID_PROBES bucket
    plans: dict[tuple[int, int], "_GemvPlan"] = field(default_factory=dict, repr=False, compare=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype

    def sequential(self) -> "Int4Weight":
        """This layer for an x whose columns are already in sequential order (gathered by the caller,
        where a compiled graph fuses the gather into the kernel that produces x): the same tensors
        without perm, with their own measured choices and plans. Itself when there is no perm."""
        if self.perm is None:
            return self
        seq = self.__dict__.get("_seq")
        if seq is None:
            seq = self.__dict__["_seq"] = Int4Weight(self.qweight, self.scales, self.qzeros, None, self.bias,
                                                     self.k, self.n, self.group16)
        return seq

    @property
    def n_groups(self) -> int:
        return self.scales.shape[0]

    def check(self) -> None:
        kp, np_ = padded(self.k, self.n)
        dev = self.qweight.device
        if dev.type != "cuda":
            raise ValueError(f"int4 kernels need CUDA tensors, the weight is on {dev}")
        if self.dtype not in _DT:
            raise ValueError(f"int4 kernels run fp16 or bf16, not {self.dtype}")
        if self.k % 8 or self.n % 8:
            raise ValueError(f"K={self.k} and N={self.n} must be multiples of 8")
        want = {
            "qweight": (self.qweight, torch.int32, (np_ // 64, kp // 16, 32, 4)),
            "scales": (self.scales, self.dtype, (self.n_groups, np_)),
            "qzeros": (self.qzeros, torch.int32, (self.n_groups, np_ // 8)),
        }
        if self.perm is not None:
            want["perm"] = (self.perm, torch.int32, (self.k,))
        if self.bias is not None:
            want["bias"] = (self.bias, self.dtype, (self.n,))
        for name, (t, dt, shape) in want.items():
            if t.dtype != dt or tuple(t.shape) != shape or not t.is_contiguous() or t.device != dev:
                raise ValueError(
                    f"{name}: expected contiguous {dt} {shape} on {dev}, got {t.dtype} {tuple(t.shape)} on "
                    f"{t.device} (contiguous={t.is_contiguous()})"
                )
            if t.data_ptr() % 16:
                raise ValueError(f"{name} must be 16-byte aligned")


# -- CuPy module, streams, scratch ------------------------------------------------------------------

_lock = threading.Lock()
_modules: dict[int, object] = {}
_streams: dict[int, object] = {}


def available(device: torch.device) -> tuple[bool, str]:
    """(usable, why): the CUDA kernels need a CUDA device of compute capability >= 8.0 and CuPy."""
    if device.type != "cuda":
        return False, f"device {device} is not CUDA"
    cc = torch.cuda.get_device_capability(device)
    if cc < (8, 0):
        return False, f"compute capability {cc[0]}.{cc[1]} < 8.0 (mma.sync bf16 and cvt.bf16x2 need sm_80+)"
    try:
        import cupy  # noqa: F401
    except ImportError as e:
        return False, f"CuPy is not importable ({e}); pip install 'scorer[gpu-cu13]' (or [gpu] for CUDA 12)"
    return True, f"CuPy RawKernels on {torch.cuda.get_device_name(device)} (sm_{cc[0]}{cc[1]})"


def _names() -> list[str]:
    names = ["int4_stage_x"]
    for dt in (0, 1):
        names.append(f"int4_dequant<{dt}>")
        names.append(f"int4_dequant_rows<{dt}, true>")
        names.append(f"int4_dequant_rows<{dt}, false>")
        for mt in (1, 2, 4, 8):
            names.append(f"int4_gemm_small<{dt}, {mt}>")
        names.append(f"int4_gemm_mid<{dt}>")
        for mt in (1, 2):
            for r in GEMV_RINGS:
                names.append(f"int4_gemv<{dt}, {mt}, {r}>")
            for f in GEMV_FIX_DEPTHS:
                names.append(f"int4_gemv_fix<{dt}, {mt}, {f}>")
    return names


def _module(index: int):
    mod = _modules.get(index)
    if mod is None:
        import cupy

        with _lock, cupy.cuda.Device(index):
            mod = _modules.get(index)
            if mod is None:
                opts = ("-std=c++17", f"-DINT4_SMALL_WARPS={SMALL_WARPS}", f"-DINT4_SMALL_STAGES={SMALL_STAGES}",
                        f"-DGEMV_WARPS={GEMV_WARPS}", f"-DMID_WM={MID_WM}", f"-DMID_WN={MID_WN}",
                        f"-DMID_MT={MID_MT}", f"-DMID_KB={MID_KB}", f"-DMID_S={MID_S}", f"-DMID_MINB={MID_MINB}")
                mod = cupy.RawModule(code=SOURCE.read_text(), options=opts, name_expressions=_names())
                _modules[index] = mod
    return mod


_functions: dict[tuple[int, str], object] = {}


def _kernel(index: int, name: str, smem: int = 0):
    fn = _functions.get((index, name))
    if fn is None:
        fn = _module(index).get_function(name)
        if smem > 48 * 1024:  # opt in to more than 48 KB of dynamic shared memory
            try:
                fn.max_dynamic_shared_size_bytes = smem
            except AttributeError:
                import cupy

                cupy.cuda.driver.funcSetAttribute(fn.ptr, 8, smem)  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        _functions[(index, name)] = fn
    return fn


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # CUDA builds: the handle in ~0.3 us


def _raw_stream_of(device: torch.device) -> int:
    """The cudaStream_t of torch's current stream on `device`."""
    if _raw_stream is not None:
        return _raw_stream(device.index)
    return torch.cuda.current_stream(device).cuda_stream


def _stream(device: torch.device):
    """CuPy view of torch's current stream on `device` (cached per stream handle)."""
    import cupy

    ptr = _raw_stream_of(device)
    s = _streams.get(ptr)
    if s is None:
        with warnings.catch_warnings():  # CuPy 14 deprecates ExternalStream; it is the one CuPy 13 has too
            warnings.simplefilter("ignore", DeprecationWarning)
            s = _streams[ptr] = cupy.cuda.ExternalStream(ptr, device.index)
    return s


class _Scratch:
    """Per-device bytes shared by every layer: the dequantized W (large m) or split-K partials (small m)."""

    def __init__(self) -> None:
        self.need = 0
        self.buf: torch.Tensor | None = None
        self.counters: torch.Tensor | None = None


_scratch: dict[int, _Scratch] = {}
_COUNTERS = 4096  # >= Np / 64 of any layer (N <= 262144)


def _align(n: int) -> int:
    return -(-n // 256) * 256


def _tiles_layout(w: Int4Weight, m: int) -> tuple[int, int, int]:
    """(bytes of the gathered x, bytes of the split-K partials, KS) of gemm_tiles at m rows (x is
    staged only under act-order)."""
    _, np_ = padded(w.k, w.n)
    nbk, kt = w.qweight.shape[:2]
    ks, _ = split_k(nbk, kt, mt_of(m), _sm_count(w.qweight.device))
    return (_align(m * w.k * 2) if w.perm is not None else 0), ks * m * np_ * 4, ks


def _gemv_layout(w: Int4Weight, m: int) -> tuple[int, int, tuple[int, int, int]]:
    """(bytes of staged x, bytes of the pieces, gemv_layout) of gemv at m rows. gemv reads x with rows
    Kp apart, zero past K: x is staged when act-order gathers its columns or K is not a multiple of 16
    (then a gathered copy and the padded one)."""
    kp, _ = padded(w.k, w.n)
    nbk, kt = w.qweight.shape[:2]
    lay = gemv_layout(nbk, kt, _sm_count(w.qweight.device), wave=GEMV_WARPS * GEMV_BLOCKS[mt_of(m)])
    stage = _align(m * kp * 2) if w.perm is not None or kp != w.k else 0
    return stage, nbk * lay[2] * mt_of(m) * 8 * 64 * 4, lay


def _mid_layout(w: Int4Weight, m: int) -> tuple[int, int, int, int]:
    """(bytes of the gathered x, bytes of the split-K partials, KS, row blocks a slice) of gemm_mid at m
    rows (x is staged only under act-order)."""
    _, np_ = padded(w.k, w.n)
    nbk, kt = w.qweight.shape[:2]
    ks, per = mid_split(nbk, kt, m, _sm_count(w.qweight.device))
    return (_align(m * w.k * 2) if w.perm is not None else 0), (ks * m * np_ * 4 if ks > 1 else 0), ks, per


def _stage_x(x: torch.Tensor, w: Int4Weight, xs: torch.Tensor) -> torch.Tensor:
    """xs (M, Kp) <- x's columns in sequential order (gathered by perm under act-order), zero past K."""
    import numpy as np

    m, kp = xs.shape
    fn = _kernel(x.device.index, "int4_stage_x")
    fn(_stage_grid(m, kp), (_STAGE_BLOCK,), (_ptr(x), _ptr(w.perm), _ptr(xs), np.int32(w.k), np.int32(kp)),
       stream=_stream(x.device))
    return xs


_STAGE_BLOCK = 128  # threads a block of int4_stage_x, 8 columns each


def _stage_grid(m: int, kp: int) -> tuple[int, int]:
    return -(-kp // (8 * _STAGE_BLOCK)), m


def scratch_bytes(w: Int4Weight) -> int:
    """Bytes of scratch `w` needs: its dequantized W^T, or the fused path's gathered x + partials."""
    need = w.k * w.n * 2
    for m in (8, 16):  # the largest m of each kernel variant the dispatch runs
        stage, part, _ = _gemv_layout(w, m)
        need = max(need, stage + part)
    for m in (32, 64):
        xg, part, _ = _tiles_layout(w, m)
        need = max(need, xg + part)
    if MID_ENABLED:  # partials grow with m's row tiles, x with m: the last m of each row-tile count
        for m in range(MID_BM, MID_MAX_M + 1, MID_BM):
            xg, part, _, _ = _mid_layout(w, m)
            need = max(need, xg + part)
    return need


def reserve(w: Int4Weight) -> None:
    """Record that the device's scratch must hold `w`'s needs (allocated, once, at first use)."""
    s = _scratch.setdefault(w.qweight.device.index, _Scratch())
    s.need = max(s.need, scratch_bytes(w))


def _get_scratch(device: torch.device, nbytes: int) -> _Scratch:
    s = _scratch.setdefault(device.index, _Scratch())
    s.need = max(s.need, nbytes)
    if s.buf is None or s.buf.numel() < s.need:
        if s.buf is not None:
            log.info("int4 scratch on %s grows to %.1f MiB", device, s.need / 2**20)
        s.buf = torch.empty(s.need, dtype=torch.uint8, device=device)
    if s.counters is None:
        s.counters = torch.zeros(_COUNTERS, dtype=torch.int32, device=device)
    return s


_sms: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.index not in _sms:
        _sms[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _sms[device.index]


def split_k(nblocks: int, kt: int, mt: int, sms: int) -> tuple[int, int]:
    """(KS, row blocks per block) for gemm_small: about 16 warps per SM, at least 4 row blocks per warp."""
    kw = warps_of(mt)
    ks = max(1, round(sms * SPLIT_TARGET_WARPS / (nblocks * kw)))
    ks = max(1, min(ks, kt // (4 * kw)))
    per = -(-kt // ks)
    return -(-kt // per), per


def mid_split(nblocks: int, kt: int, m: int, sms: int) -> tuple[int, int]:
    """(KS, row blocks per slice) for gemm_mid: its output tiles times KS fill MID_BLOCKS_PER_SM blocks a
    SM, slices are whole stages and at least 4 of them; no split where the tiles outnumber the counters."""
    tiles = -(-nblocks // MID_WN) * -(-m // MID_BM)
    ks = max(1, round(sms * MID_BLOCKS_PER_SM / tiles))
    ks = max(1, min(ks, kt // (4 * MID_KB)))
    if tiles > _COUNTERS:
        ks = 1
    per = -(-(-(-kt // ks)) // MID_KB) * MID_KB
    return -(-kt // per), per


def gemv_layout(nblocks: int, kt: int, sms: int, min_chunk: int = GEMV_MIN_CHUNK,
                wave: int = GEMV_WAVE) -> tuple[int, int, int]:
    """(chunk, warps, pmax) of int4_gemv: the nblocks * kt tiles cut into `warps` equal runs of `chunk`
    tiles (at most GEMV_WAVE warps per SM, at least `min_chunk` tiles each); pmax bounds the pieces
    (warps) that share one column block, which sizes the fix-up workspace."""
    total = nblocks * kt
    warps = max(1, min(sms * wave, -(-total // max(1, min_chunk))))
    chunk = -(-total // warps)
    warps = -(-total // chunk)
    return chunk, warps, -(-kt // chunk) + 1


def gemv_fix_depth(pmax: int) -> int:
    """F of int4_gemv_fix<DT, MT, F> for a layout whose column blocks have at most pmax pieces."""
    return GEMV_FIX_DEPTHS[0] if pmax <= GEMV_FIX_FEW else GEMV_FIX_DEPTHS[1]


def gemv_fix_threads(nblocks: int, m: int) -> int:
    """Threads of int4_gemv_fix over nblocks column blocks at m rows: per column block, the 32 column pairs
    of each row pair (the kernel's per_nb)."""
    return nblocks * ((m + 1) // 2) * 32


def gemv_pieces(nb: int, kt: int, chunk: int) -> tuple[int, int]:
    """(first warp, pieces) of column block nb in gemv's partition (the kernel's own arithmetic)."""
    lo, hi = (nb * kt) // chunk, ((nb + 1) * kt - 1) // chunk
    return lo, hi - lo + 1


# -- thin wrappers ----------------------------------------------------------------------------------

def _ptr(t: torch.Tensor | None):
    import numpy as np

    return np.uint64(0 if t is None else t.data_ptr())


def _check_out(out: torch.Tensor, shape: tuple[int, int], w: Int4Weight, what: str) -> None:
    if out.dtype != w.dtype or tuple(out.shape) != shape or not out.is_contiguous() or out.device != w.qweight.device:
        raise ValueError(
            f"{what}: expected contiguous {w.dtype} {shape} on {w.qweight.device}, got {out.dtype} "
            f"{tuple(out.shape)} on {out.device} (contiguous={out.is_contiguous()})"
        )
    if out.data_ptr() % 16:
        raise ValueError(f"{what} must be 16-byte aligned")


def _check_x(x: torch.Tensor, w: Int4Weight, what: str) -> None:
    dev = w.qweight.device
    if x.dim() != 2 or x.shape[1] != w.k:
        raise ValueError(f"{what}: x must be (M, K={w.k}), got {tuple(x.shape)}")
    if x.dtype != w.dtype or not x.is_contiguous() or x.device != dev or x.data_ptr() % 16:
        raise ValueError(
            f"{what}: x must be contiguous, 16-byte aligned {w.dtype} on {dev}, got {x.dtype} on {x.device} "
            f"(contiguous={x.is_contiguous()}, offset {x.data_ptr() % 16})"
        )


def _check_fused(x: torch.Tensor, w: Int4Weight, out: torch.Tensor, what: str, max_m: int) -> int:
    """The fused kernels' checks: x (M, K) with 1 <= M <= max_m, out (M, N); returns M."""
    _check_x(x, w, what)
    m = x.shape[0]
    if not 1 <= m <= max_m:
        raise ValueError(f"{what}: x must have 1 to {max_m} rows, got {m}")
    _check_out(out, (m, w.n), w, f"{what} out")
    return m


def dequant(w: Int4Weight, out: torch.Tensor) -> torch.Tensor:
    """out (N, K) <- W^T in w.dtype (bit-exact), its K columns in sequential order (x[:, perm] pairs with it)."""
    import numpy as np

    _check_out(out, (w.n, w.k), w, "dequant out")
    dev = w.qweight.device
    nbk, kt = w.qweight.shape[:2]
    if nbk > 65535:  # the grid's y dimension
        raise ValueError(f"dequant: N={w.n} is more than 65535 column blocks of 64, the most int4_dequant's grid holds")
    fn = _kernel(dev.index, f"int4_dequant<{_DT[w.dtype]}>")
    _, np_ = padded(w.k, w.n)
    args = (_ptr(w.qweight), _ptr(w.scales), _ptr(w.qzeros), _ptr(out), np.int32(w.k), np.int32(w.n),
            np.int32(np_), np.int32(kt), np.int32(w.n_groups), np.int32(w.group16))
    fn((-(-kt // 8), nbk), (256,), args, stream=_stream(dev))  # k-major: blockIdx.x is the row block of 128
    return out


def dequant_rows(w: Int4Weight, out: torch.Tensor) -> torch.Tensor:
    """out (K, N) <- W in w.dtype (bit-exact), rows in input order (act-order rows scattered back)."""
    import numpy as np

    _check_out(out, (w.k, w.n), w, "dequant_rows out")
    dev = w.qweight.device
    nbk, kt = w.qweight.shape[:2]
    units = nbk * kt
    fn = _kernel(dev.index, f"int4_dequant_rows<{_DT[w.dtype]}, {'true' if w.perm is not None else 'false'}>")
    _, np_ = padded(w.k, w.n)
    args = (_ptr(w.qweight), _ptr(w.scales), _ptr(w.qzeros), _ptr(w.perm), _ptr(out), np.int32(w.k),
            np.int32(w.n), np.int32(np_), np.int32(kt), np.int32(w.n_groups), np.int32(w.group16), np.int32(units))
    fn((-(-units // 8),), (256,), args, stream=_stream(dev))
    return out


def gemm_tiles(x: torch.Tensor, w: Int4Weight, out: torch.Tensor) -> torch.Tensor:
    """out (M, N) <- x (M, K) @ W + bias for 1 <= M <= 64: split-K fused 4-bit tensor-core GEMM."""
    import numpy as np

    m = _check_fused(x, w, out, "gemm_tiles", MAX_FUSED_M)
    dev = w.qweight.device
    _, np_ = padded(w.k, w.n)
    nbk, kt = w.qweight.shape[:2]
    mt = mt_of(m)
    ks, per = split_k(nbk, kt, mt, _sm_count(dev))
    xg_bytes, part_bytes, _ = _tiles_layout(w, m)
    s = _get_scratch(dev, xg_bytes + part_bytes)
    if w.perm is not None:  # act-order: x's columns in sequential order (m x K, small)
        x = _stage_x(x, w, s.buf[: m * w.k * 2].view(w.dtype).view(m, w.k))
    smem = smem_of(mt)
    fn = _kernel(dev.index, f"int4_gemm_small<{_DT[w.dtype]}, {mt}>", smem)
    args = (_ptr(x), _ptr(w.qweight), _ptr(w.scales), _ptr(w.qzeros), _ptr(w.bias), _ptr(out),
            np.uint64(s.buf.data_ptr() + xg_bytes), _ptr(s.counters), np.int32(m), np.int32(w.k), np.int32(w.n),
            np.int32(np_), np.int32(kt), np.int32(w.n_groups), np.int32(w.group16), np.int32(per))
    fn((nbk, ks), (32 * warps_of(mt),), args, shared_mem=smem, stream=_stream(dev))
    return out


def gemm_mid(x: torch.Tensor, w: Int4Weight, out: torch.Tensor) -> torch.Tensor:
    """out (M, N) <- x (M, K) @ W + bias for 1 <= M <= MID_MAX_M: the block-tiled fused 4-bit GEMM
    (meant for 16 < M: smaller M runs, on mostly idle warps). The dispatch takes it only with MID_ENABLED."""
    import numpy as np

    m = _check_fused(x, w, out, "gemm_mid", MID_MAX_M)
    dev = w.qweight.device
    _, np_ = padded(w.k, w.n)
    nbk, kt = w.qweight.shape[:2]
    xg_bytes, part_bytes, ks, per = _mid_layout(w, m)
    s = _get_scratch(dev, xg_bytes + part_bytes)
    if w.perm is not None:  # act-order: x's columns in sequential order
        x = _stage_x(x, w, s.buf[: m * w.k * 2].view(w.dtype).view(m, w.k))
    fn = _kernel(dev.index, f"int4_gemm_mid<{_DT[w.dtype]}>", MID_SMEM)
    i32 = np.int32
    args = (_ptr(x), _ptr(w.qweight), _ptr(w.scales), _ptr(w.qzeros), _ptr(w.bias), _ptr(out),
            np.uint64(s.buf.data_ptr() + xg_bytes), _ptr(s.counters), i32(m), i32(w.k), i32(w.k), i32(w.n),
            i32(np_), i32(kt), i32(w.n_groups), i32(w.group16), i32(per))
    fn((-(-nbk // MID_WN), -(-m // MID_BM), ks), (MID_NT,), args, shared_mem=MID_SMEM, stream=_stream(dev))
    return out


class _Launch:
    """One kernel launch with its arguments packed once, as cuLaunchKernel's kernelParams: a call rewrites
    the slots that change (x, out) and launches through the driver, skipping CuPy's per-call argument
    conversion (~10 us of host time a launch, which is what a short batch of a 4-bit model waits on).
    pdl: launch with programmatic stream serialization (cuLaunchKernelEx), so the kernel may start while
    the one ahead of it in the stream finishes; only kernels that call int4.cu's pdl_wait() before touching
    other kernels' memory may be launched so (stage_x and gemv's fix-up; gemv itself behind stage_x)."""

    def __init__(self, fn, grid: tuple[int, ...], block: int, args: list, pdl: bool = False) -> None:
        import numpy as np

        self.f = (fn.kernel if hasattr(fn, "kernel") else fn).ptr  # RawKernel -> its Function's CUfunction
        self.grid = (*grid, 1, 1)[:3]
        self.block = block
        self.vals = [ctypes.c_uint64(int(a)) if isinstance(a, (np.uint64, _Slot)) else ctypes.c_int32(int(a))
                     for a in args]
        self.params = (ctypes.c_void_p * len(self.vals))(*[ctypes.addressof(v) for v in self.vals])
        self.params_ptr = ctypes.addressof(self.params)
        self.slots = {a.name: i for i, a in enumerate(args) if isinstance(a, _Slot)}
        self.ex = _launch_ex() if pdl else None
        if self.ex is not None:
            self.attr = _LaunchAttr(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
            self.attr.value[0] = 1  # programmaticStreamSerializationAllowed
            self.cfg = _LaunchConfig(*self.grid, block, 1, 1, 0, None, ctypes.pointer(self.attr), 1)

    def __call__(self, stream: int, **ptrs: int) -> None:
        for name, ptr in ptrs.items():
            self.vals[self.slots[name]].value = ptr
        if self.ex is not None:
            self.cfg.hStream = stream
            err = self.ex(self.cfg, self.f, self.params_ptr, None)
            if not err:
                return
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():  # the capture is broken
                raise RuntimeError(f"cuLaunchKernelEx (programmatic dependent launch) failed with CUresult {err} "
                                   "during a CUDA graph capture; SCORER_PDL=0 launches gemv's kernels plainly")
            if _cu_launch_ex[:1] != [None]:  # the first refusal: warn once, and plan no more PDL launches
                log.warning("cuLaunchKernelEx (programmatic dependent launch) failed with CUresult %d; gemv's "
                            "launches fall back to plain ones (SCORER_PDL=0 skips the attempt)", err)
                _cu_launch_ex[:] = [None]
            self.ex = None  # this launch goes out plainly, now and from now on
        _driver().launchKernel(self.f, *self.grid, self.block, 1, 1, 0, stream, self.params_ptr, 0)


class _LaunchAttr(ctypes.Structure):  # CUlaunchAttribute: id, padding to 8 bytes, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_uint32 * 16)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttr)), ("numAttrs", ctypes.c_uint)]
_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
_PDL_DRIVER = 12030  # CUDA 12.3: the first driver whose stream capture takes programmatic launches into a graph
PDL = os.environ.get("SCORER_PDL", "1") != "0"  # gemv's launches overlap (sm_90+); SCORER_PDL=0 turns it off
_cu_launch_ex: list = []  # [cuLaunchKernelEx or None], looked up once


def _launch_ex():
    """cuLaunchKernelEx from the driver library, or None where PDL is off or the driver is older than 12.3."""
    if not PDL:
        return None
    if not _cu_launch_ex:
        fn = None
        try:
            lib = ctypes.CDLL("libcuda.so.1")
            version = ctypes.c_int(0)
            if lib.cuDriverGetVersion(ctypes.byref(version)) == 0 and version.value >= _PDL_DRIVER:
                fn = lib.cuLaunchKernelEx
                fn.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
                fn.restype = ctypes.c_int
        except (OSError, AttributeError):
            fn = None
        _cu_launch_ex.append(fn)
    return _cu_launch_ex[0]


_cupy_driver = None


def _driver():
    """cupy.cuda.driver, imported once (a launch is on a short batch's hot path)."""
    global _cupy_driver
    if _cupy_driver is None:
        from cupy.cuda import driver

        _cupy_driver = driver
    return _cupy_driver


class _Slot(int):
    """A pointer argument filled at each call (named, so a launch knows which slot is which)."""

    def __new__(cls, name: str) -> "_Slot":
        obj = super().__new__(cls, 0)
        obj.name = name
        return obj


@dataclass
class _GemvPlan:
    """gemv's launches for one (layer, m, ring), built once."""

    buf_ptr: int  # the scratch buffer they point into (a grown buffer invalidates the plan)
    stage: _Launch | None  # int4_stage_x, when x is staged
    main: _Launch
    fix: _Launch
    lock: threading.Lock


def _gemv_plan(w: Int4Weight, m: int, ring: int) -> _GemvPlan:
    import numpy as np

    dev = w.qweight.device
    kp, np_ = padded(w.k, w.n)
    nbk, kt = w.qweight.shape[:2]
    stage, part, (chunk, warps, pmax) = _gemv_layout(w, m)
    s = _get_scratch(dev, stage + part)
    base = s.buf.data_ptr()
    i32 = np.int32
    st = None
    # griddepcontrol needs sm_90. gemv reads its codes, scales and zeros before its pdl_wait, so it starts
    # early only behind stage_x, which waited for every kernel ahead before letting gemv go; the fix-up and
    # stage_x wait before touching any memory, so they may follow anything.
    pdl = torch.cuda.get_device_capability(dev) >= (9, 0)
    if stage:  # x with rows Kp apart and zeros past K, columns gathered under act-order
        st = _Launch(_kernel(dev.index, "int4_stage_x"), _stage_grid(m, kp), _STAGE_BLOCK,
                     [_Slot("x"), _ptr(w.perm), np.uint64(base), i32(w.k), i32(kp)], pdl)
    ws = np.uint64(base + stage)
    x = np.uint64(base) if stage else _Slot("x")
    main = _Launch(_kernel(dev.index, f"int4_gemv<{_DT[w.dtype]}, {mt_of(m)}, {ring}>"), (-(-warps // GEMV_WARPS),),
                   32 * GEMV_WARPS, [x, _ptr(w.qweight), _ptr(w.scales), _ptr(w.qzeros), _ptr(w.bias), _Slot("y"),
                                     ws, i32(m), i32(kp), i32(w.n), i32(np_), i32(kt), i32(w.n_groups),
                                     i32(w.group16), i32(chunk), i32(pmax)], pdl and st is not None)
    fix_threads = gemv_fix_threads(nbk, m)
    fix = _Launch(_kernel(dev.index, f"int4_gemv_fix<{_DT[w.dtype]}, {mt_of(m)}, {gemv_fix_depth(pmax)}>"),
                  (-(-fix_threads // 256),), 256,
                  [ws, _ptr(w.bias), _Slot("y"), i32(m), i32(w.n), i32(np_), i32(kt), i32(chunk), i32(pmax)], pdl)
    return _GemvPlan(base, st, main, fix, threading.Lock())


def gemv(x: torch.Tensor, w: Int4Weight, out: torch.Tensor, ring: int | None = None) -> torch.Tensor:
    """out (M, N) <- x (M, K) @ W + bias for 1 <= M <= 16: the stream-K fused 4-bit GEMM.
    ring: 1 or 2 (GEMV_RINGS), or None for the one `gemv_ring` measured faster on this layer.
    The launches of each (m, ring) are planned once per layer (host time is what a short batch pays)."""
    m = _check_fused(x, w, out, "gemv", GEMV_MAX_M)
    if ring is None:
        ring = gemv_ring(w, mt_of(m))
    elif ring not in GEMV_RINGS:
        raise ValueError(f"gemv: ring must be one of {GEMV_RINGS}, not {ring!r}")
    dev = w.qweight.device
    plans = w.plans
    plan = plans.get((m, ring))
    buf = _scratch[dev.index].buf if dev.index in _scratch else None
    if plan is None or buf is None or buf.data_ptr() != plan.buf_ptr:
        plan = plans[(m, ring)] = _gemv_plan(w, m, ring)
    stream = _raw_stream_of(dev)
    with plan.lock:  # the packed arguments are rewritten per call
        if plan.stage is not None:
            plan.stage(stream, x=x.data_ptr())
            plan.main(stream, y=out.data_ptr())
        else:
            plan.main(stream, x=x.data_ptr(), y=out.data_ptr())
        plan.fix(stream, y=out.data_ptr())
    return out


def gemm_small(x: torch.Tensor, w: Int4Weight, out: torch.Tensor) -> torch.Tensor:
    """out (M, N) <- x (M, K) @ W + bias for 1 <= M <= 64: the fused path (gemv up to 16 rows)."""
    if 1 <= x.shape[0] <= GEMV_MAX_M:
        return gemv(x, w, out)
    return gemm_tiles(x, w, out)  # checks 1 <= M <= 64 itself


def dequant_matmul(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """y = x @ W (+ bias) through the device scratch and cuBLAS: the large-m path.

    Static groups: W^T (N, K) and cuBLAS TN, nn.Linear's own layout. Act-order: W (K, N) with its rows
    scattered back to input order and cuBLAS NN, because gathering x's columns instead (m x K bytes read
    and written per call) costs more than NN's slower kernels (measured on an H100: see RESULTS.md).
    """
    _check_x(x, w, "dequant_matmul")
    s = _get_scratch(x.device, w.k * w.n * 2)
    buf = s.buf[: w.k * w.n * 2].view(w.dtype)
    if w.perm is None:
        return torch.nn.functional.linear(x, dequant(w, buf.view(w.n, w.k)), w.bias)
    wd = dequant_rows(w, buf.view(w.k, w.n))
    return torch.mm(x, wd) if w.bias is None else torch.addmm(w.bias, x, wd)


# -- dispatch ---------------------------------------------------------------------------------------

_rings: dict[tuple, int] = {}


def gemv_ring(w: Int4Weight, mt: int) -> int:
    """The faster of gemv's rings for this layer at mt row tiles, timed once per (device, K, N, dtype,
    act-order, mt) at first use. Ring 2 needs sm_90 (elsewhere it builds as ring 1: nothing to time)."""
    r = w.rings.get(mt)  # this layer's own answer: no key to build
    if r is not None:
        return r
    dev = w.qweight.device
    key = (dev.index, w.k, w.n, w.dtype, w.perm is not None, mt)
    r = _rings.get(key)
    if r is None:
        if torch.cuda.get_device_capability(dev) < (9, 0):
            r = _rings[key] = 1
        elif torch.cuda.is_current_stream_capturing():
            return 1  # cannot time inside a graph capture; ring 1 runs everywhere
        else:
            m = 8 * mt
            x = torch.randn(m, w.k, device=dev, dtype=w.dtype)
            y = torch.empty(m, w.n, device=dev, dtype=w.dtype)
            times = {}
            for ring in GEMV_RINGS:
                gemv(x, w, y, ring)  # warm: module load, scratch
                times[ring] = _gpu_time(lambda: gemv(x, w, y, ring))
            r = _rings[key] = min(times, key=times.get)
            log.debug("int4 gemv K=%d N=%d m<=%d: ring 1 %.1f us, ring 2 %.1f us", w.k, w.n, m,
                      times[1] * 1e6, times[2] * 1e6)
    w.rings[mt] = r
    return r


_crossover: dict[tuple, int] = {}


def _measured_once(w: Int4Weight, attr: str, cache: dict, measure, in_capture):
    """The layer's own answer `w.<attr>`, else the one measured for its (device, K, N, dtype, act), else
    `measure(w)` now, kept in both; inside a graph capture, which cannot time, `in_capture` until then."""
    v = getattr(w, attr)
    if v is not None:
        return v
    key = (w.qweight.device.index, w.k, w.n, w.dtype, w.perm is not None)
    v = cache.get(key)
    if v is None:
        if torch.cuda.is_current_stream_capturing():
            return in_capture
        v = cache[key] = measure(w)
    setattr(w, attr, v)
    return v


def crossover(w: Int4Weight) -> int:
    """Largest m for which gemm_small is used (0: never); measured once per (device, K, N, dtype, act)."""
    # inside a graph capture until measured: 16, a safe middle
    return _measured_once(w, "cross", _crossover, measure_crossover, 16)


def _gpu_time(fn, reps: int = 7) -> float:
    """Median seconds of fn() on the current stream, launches queued behind a sleep (GPU time only)."""
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1_000_000)  # ~0.5 ms: the host queues the launches (~50 us) before the GPU gets there
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    return statistics.median(times)


def measure_crossover(w: Int4Weight, probes: tuple[int, ...] = CROSSOVER_PROBES) -> int:
    """Time both paths on this layer at m in `probes`; return the largest m where the fused one wins."""
    dev = w.qweight.device
    x = torch.randn(MAX_FUSED_M, w.k, device=dev, dtype=w.dtype)
    y = torch.empty(MAX_FUSED_M, w.n, device=dev, dtype=w.dtype)
    wins = []
    for m in probes:
        xm, ym = x[:m], y[:m]
        gemm_small(xm, w, ym)  # warm: module load, scratch
        dequant_matmul(xm, w)
        t_fused = _gpu_time(lambda: gemm_small(xm, w, ym))
        t_deq = _gpu_time(lambda: dequant_matmul(xm, w))
        if t_fused < t_deq:
            wins.append(m)
        log.debug("int4 crossover K=%d N=%d m=%d: fused %.1f us, dequant+cuBLAS %.1f us", w.k, w.n, m,
                  t_fused * 1e6, t_deq * 1e6)
    c = max(wins, default=0)
    log.info("int4 K=%d N=%d %s on %s: fused 4-bit GEMM for m <= %d, dequant + cuBLAS above (measured)",
             w.k, w.n, str(w.dtype).removeprefix("torch."), torch.cuda.get_device_name(dev), c)
    return c


_mid_wins: dict[tuple, tuple[bool, ...]] = {}


def mid_wins(w: Int4Weight) -> tuple[bool, ...]:
    """Per bucket of MID_PROBES (m up to the probe, above the one before; the first above GEMV_MAX_M),
    whether gemm_mid beat what `matmul` runs there without it (gemm_small below its crossover, else dequant
    + cuBLAS): measured once per (device, K, N, dtype, act) at first use, never inside a graph capture
    (there, until measured: no bucket). All False unless MID_ENABLED."""
    none = (False,) * len(MID_PROBES)  # also inside a capture until measured: the paths that always run
    return _measured_once(w, "mid_wins", _mid_wins, measure_mid_wins, none) if MID_ENABLED else none


def uses_mid(w: Int4Weight, m: int) -> bool:
    """Whether `matmul` runs gemm_mid at m rows: the measured answer of m's bucket."""
    if not MID_ENABLED or not GEMV_MAX_M < m <= MID_MAX_M:
        return False
    return mid_wins(w)[bisect.bisect_left(MID_PROBES, m)]


def measure_mid_wins(w: Int4Weight, probes: tuple[int, ...] = MID_PROBES) -> tuple[bool, ...]:
    """Time gemm_mid on this layer at each m of `probes` against the path `matmul` takes there without it
    (gemm_small up to the measured crossover, dequant + cuBLAS above): where gemm_mid wins."""
    dev = w.qweight.device
    x = torch.randn(max(probes), w.k, device=dev, dtype=w.dtype)
    y = torch.empty(max(probes), w.n, device=dev, dtype=w.dtype)
    cross = min(crossover(w), MAX_FUSED_M)
    wins = []
    for m in probes:
        xm, ym = x[:m], y[:m]
        other = (lambda: gemm_small(xm, w, ym)) if m <= cross else (lambda: dequant_matmul(xm, w))
        gemm_mid(xm, w, ym)  # warm: module load, scratch
        other()
        t_mid, t_other = _gpu_time(lambda: gemm_mid(xm, w, ym)), _gpu_time(other)
        wins.append(t_mid < t_other)
        log.debug("int4 gemm_mid K=%d N=%d m=%d: %.1f us, %s %.1f us", w.k, w.n, m, t_mid * 1e6,
                  "gemm_small" if m <= cross else "dequant+cuBLAS", t_other * 1e6)
    log.info("int4 K=%d N=%d %s on %s: gemm_mid at m <= %s of %s (measured)", w.k, w.n,
             str(w.dtype).removeprefix("torch."), torch.cuda.get_device_name(dev),
             [p for p, won in zip(probes, wins) if won], list(probes))
    return tuple(wins)


def matmul(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """y (M, N) = x (M, K) @ W + bias, by the path the measured crossovers pick for M."""
    m = x.shape[0]
    if uses_mid(w, m):
        return gemm_mid(x, w, torch.empty(m, w.n, device=x.device, dtype=x.dtype))
    if m <= MAX_FUSED_M and m <= crossover(w):
        return gemm_small(x, w, torch.empty(m, w.n, device=x.device, dtype=x.dtype))
    return dequant_matmul(x, w)


# -- the torch op ----------------------------------------------------------------------------------
# Int4Linear's forward under torch.compile: one opaque op, so a compiled decoder layer of a 4-bit model
# is one graph around its int4 calls (with torch.compiler.disable each call split the layer, and a short
# batch paid every piece's guards and frame switches: 47-68 ms for 4-18 ms of GPU work on the 8B model).
# The op takes the layer's tensors; the Int4Weight that holds their launch plans and measured choices is
# found by the tensors' addresses among the live ones Int4Linear registered (weakly: a dropped model
# frees its weights), or built for the call.

_live: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _key(qweight, scales, qzeros, perm, bias, k: int, n: int, group16: int) -> tuple:
    return (*(0 if t is None else t.data_ptr() for t in (qweight, scales, qzeros, perm, bias)),
            tuple(qweight.shape), scales.dtype, k, n, group16)


def register(w: Int4Weight) -> None:
    """Make `w` (with its plans and timings) the one the op uses for these tensors."""
    _live[_key(w.qweight, w.scales, w.qzeros, w.perm, w.bias, w.k, w.n, w.group16)] = w


@torch.library.custom_op("scorer::int4_matmul", mutates_args=(), device_types="cuda")
def int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                perm: torch.Tensor | None, bias: torch.Tensor | None, k: int, n: int, group16: int) -> torch.Tensor:
    """y (M, N) = x (M, K) @ W + bias over the prepared layout (Int4Weight's fields): `linear`."""
    w = _live.get(_key(qweight, scales, qzeros, perm, bias, k, n, group16))
    if w is None:  # not a registered layer (torch.library.opcheck, a hand-built call): planned for this call
        w = Int4Weight(qweight, scales, qzeros, perm, bias, k, n, group16)
        w.check()
    return linear(x, w)


@int4_matmul.register_fake
def _(x, qweight, scales, qzeros, perm, bias, k, n, group16):
    return x.new_empty(x.shape[0], n)


@int4_matmul.register_kernel("cpu")
def _(x, qweight, scales, qzeros, perm, bias, k, n, group16):
    return reference_matmul(x, qweight, scales, qzeros, perm, bias, k, n, group16)


def reference_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                     perm: torch.Tensor | None, bias: torch.Tensor | None, k: int, n: int,
                     group16: int) -> torch.Tensor:
    """The op in plain torch, on any device: `reference_weight`, x's columns gathered into sequential
    order, one matmul."""
    w = reference_weight(qweight, scales, qzeros, k, n, group16)
    xs = x if perm is None else x.index_select(1, perm.long())
    return xs @ w if bias is None else torch.addmm(bias, xs, w)


def reference_weight(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, k: int, n: int,
                     group16: int) -> torch.Tensor:
    """(K, N) W in the scales' dtype, rows in sequential order, from the tile layout: `unrepack` and the
    reference dequant (one rounding), row block kt in group min(kt // group16, G - 1) as the kernels do."""
    from scorer.kernels import reference as ref

    q = unrepack(qweight, k, n)
    g = (torch.arange(k, device=q.device) // (16 * group16)).clamp_max(scales.shape[0] - 1)
    return ref.dequantize(ref.pack_qweight(q), qzeros[:, : n // 8].contiguous(), scales[:, :n], g, v1=False)


def linear(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """`matmul` for any (M, K) x Int4Linear hands over: no rows, or a non-contiguous or misaligned x."""
    if x.shape[0] == 0:
        return x.new_empty(0, w.n)
    if not x.is_contiguous():
        x = x.contiguous()
    elif x.data_ptr() % 16:
        x = x.clone()
    return matmul(x, w)


def bandwidth_bytes(w: Int4Weight) -> int:
    """Bytes one dequant moves: packed codes + scales + zeros read, fp16/bf16 W written."""
    return w.qweight.numel() * 4 + w.scales.numel() * 2 + w.qzeros.numel() * 4 + w.k * w.n * 2


__all__ = [
    "Int4Weight", "available", "bandwidth_bytes", "crossover", "dequant", "dequant_matmul", "dequant_rows",
    "gemm_mid", "gemm_small", "gemm_tiles", "gemv", "gemv_fix_depth", "gemv_fix_threads", "gemv_layout",
    "gemv_pieces", "gemv_ring", "int4_matmul", "linear", "matmul", "measure_crossover", "measure_mid_wins", "mid_split", "mid_wins", "mt_of",
    "padded", "reference_matmul", "reference_weight", "register", "repack", "reserve", "split_k", "unrepack",
    "uses_mid", "warps_of",
]
