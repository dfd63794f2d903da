"""cuBLASLt through ctypes, for benchmarks/gemm_algos.py: the algorithms its heuristic offers for one GEMM,
and a call with a chosen one. It loads the libcublasLt torch loaded, so both share one cuBLAS.

Layouts (row-major torch tensors, cuBLAS is column-major):
  * "tn": y (m, N) = x (m, K) @ w.T with w (N, K), nn.Linear's layout: cuBLAS D(N, m) = op_T(w) x.
  * "nn": y (m, N) = x (m, K) @ w with w (K, N): cuBLAS D(N, m) = w x.

scorer itself does not use it: tuning the algorithm per shape was measured and did not pay under the
power cap of the cards it runs on (benchmarks/RESULTS.md, "cuBLASLt algorithms").
"""

import ctypes
import glob
import os
import threading

import torch

from scorer.kernels.int4 import _raw_stream_of  # torch's current stream handle, as the int4 launches take it

_COMPUTE_32F = 68  # cublasComputeType_t CUBLAS_COMPUTE_32F
_R_32F, _R_16F, _R_16BF = 0, 2, 14  # cudaDataType_t
_DTYPES = {torch.float16: _R_16F, torch.bfloat16: _R_16BF}
_DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE, _DESC_BIAS = 3, 4, 7, 8  # cublasLtMatmulDescAttributes_t
_EPILOGUE_BIAS = 4  # cublasLtEpilogue_t CUBLASLT_EPILOGUE_BIAS: D += bias, one value per row of D (= per N)
_PREF_MAX_WORKSPACE = 1  # cublasLtMatmulPreferenceAttributes_t
_OP_N, _OP_T = 0, 1
_CFG = {"id": 0, "tile": 1, "splitk": 2, "reduction": 3, "swizzle": 4, "custom": 5, "stages": 6,
        "inner": 7, "cluster": 8}  # cublasLtMatmulAlgoConfigAttributes_t
_CFG16 = {"inner", "cluster"}  # uint16_t attributes; the others are int32/uint32
WORKSPACE = 32 * 2**20  # what cuBLAS asks for on Hopper
CANDIDATES = 8  # algorithms the heuristic is asked for by default


class Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _Heuristic(ctypes.Structure):
    _fields_ = [("algo", Algo), ("workspaceSize", ctypes.c_size_t), ("state", ctypes.c_int),
                ("wavesCount", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


_lib = None
_lock = threading.Lock()


def _find() -> str:
    """Path of the libcublasLt torch uses (after one cuBLAS call it is mapped into this process)."""
    a = torch.ones(8, 8, device="cuda", dtype=torch.float16)
    (a @ a).sum().item()
    with open("/proc/self/maps") as f:
        for line in f:
            if "libcublasLt.so" in line:
                return line.split()[-1]
    for root in {os.path.dirname(torch.__file__), *__import__("site").getsitepackages()}:
        hits = sorted(glob.glob(os.path.join(root, "**", "libcublasLt.so*"), recursive=True))
        if hits:
            return hits[0]
    return "libcublasLt.so"


def lib():
    global _lib
    if _lib is None:
        with _lock:
            if _lib is None:
                L = ctypes.CDLL(_find())
                vp, P = ctypes.c_void_p, ctypes.POINTER
                sig = {
                    "cublasLtCreate": [P(vp)],
                    "cublasLtMatmulDescCreate": [P(vp), ctypes.c_int, ctypes.c_int],
                    "cublasLtMatmulDescSetAttribute": [vp, ctypes.c_int, vp, ctypes.c_size_t],
                    "cublasLtMatrixLayoutCreate": [P(vp), ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64,
                                                   ctypes.c_int64],
                    "cublasLtMatrixLayoutDestroy": [vp],
                    "cublasLtMatmulPreferenceCreate": [P(vp)],
                    "cublasLtMatmulPreferenceSetAttribute": [vp, ctypes.c_int, vp, ctypes.c_size_t],
                    "cublasLtMatmulPreferenceDestroy": [vp],
                    "cublasLtMatmulAlgoGetHeuristic": [vp, vp, vp, vp, vp, vp, vp, ctypes.c_int, P(_Heuristic),
                                                       P(ctypes.c_int)],
                    "cublasLtMatmulAlgoConfigGetAttribute": [P(Algo), ctypes.c_int, vp, ctypes.c_size_t,
                                                             P(ctypes.c_size_t)],
                    "cublasLtMatmul": [vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, P(Algo), vp, ctypes.c_size_t,
                                       vp],
                }
                for name, args in sig.items():
                    fn = getattr(L, name)
                    fn.argtypes, fn.restype = args, ctypes.c_int
                _lib = L
    return _lib


def _ok(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"cuBLASLt {what} failed with status {status}")


_handles: dict[int, ctypes.c_void_p] = {}


def _handle(index: int) -> ctypes.c_void_p:
    h = _handles.get(index)
    if h is None:
        h = ctypes.c_void_p()
        with torch.cuda.device(index):
            _ok(lib().cublasLtCreate(ctypes.byref(h)), "create")
        _handles[index] = h
    return h


class Gemm:
    """cuBLASLt descriptors of y (m, N) = x (m, K) @ W (+ bias) for one (device, K, N, dtype, layout, bias);
    the m-dependent layouts are made per call (a few microseconds)."""

    def __init__(self, k: int, n: int, dtype: torch.dtype, layout: str, bias: bool, device: int) -> None:
        if layout not in ("tn", "nn"):
            raise ValueError(f"layout must be 'tn' or 'nn', not {layout!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"cuBLASLt GEMMs here run fp16 or bf16, not {dtype}")
        L, vp = lib(), ctypes.c_void_p
        self.k, self.n, self.dtype, self.layout, self.bias, self.device = k, n, dtype, layout, bias, device
        self.dt = _DTYPES[dtype]
        self.desc = vp()
        _ok(L.cublasLtMatmulDescCreate(ctypes.byref(self.desc), _COMPUTE_32F, _R_32F), "desc")
        ta, tb = ctypes.c_int32(_OP_T if layout == "tn" else _OP_N), ctypes.c_int32(_OP_N)
        _ok(L.cublasLtMatmulDescSetAttribute(self.desc, _DESC_TRANSA, ctypes.byref(ta), 4), "transa")
        _ok(L.cublasLtMatmulDescSetAttribute(self.desc, _DESC_TRANSB, ctypes.byref(tb), 4), "transb")
        if bias:
            ep = ctypes.c_int32(_EPILOGUE_BIAS)
            _ok(L.cublasLtMatmulDescSetAttribute(self.desc, _DESC_EPILOGUE, ctypes.byref(ep), 4), "epilogue")
        self.a = vp()
        if layout == "tn":  # w (N, K) row-major = (K x N) column-major, ld K
            _ok(L.cublasLtMatrixLayoutCreate(ctypes.byref(self.a), self.dt, k, n, k), "A")
        else:  # w (K, N) row-major = (N x K) column-major, ld N
            _ok(L.cublasLtMatrixLayoutCreate(ctypes.byref(self.a), self.dt, n, k, n), "A")
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)
        self.bias_ptr = ctypes.c_uint64(0)
        self.lock = threading.Lock()  # the bias pointer is a descriptor attribute, set per call

    def _layouts(self, m: int) -> tuple[ctypes.c_void_p, ctypes.c_void_p]:
        L, b, c = lib(), ctypes.c_void_p(), ctypes.c_void_p()
        _ok(L.cublasLtMatrixLayoutCreate(ctypes.byref(b), self.dt, self.k, m, self.k), "B")  # x^T (K x m)
        _ok(L.cublasLtMatrixLayoutCreate(ctypes.byref(c), self.dt, self.n, m, self.n), "C")  # y^T (N x m)
        return b, c

    def algos(self, m: int, count: int = CANDIDATES, workspace: int = WORKSPACE) -> list[tuple[Algo, int, float]]:
        """(algo, workspace bytes, waves) the heuristic offers at m rows, its best-predicted first."""
        L = lib()
        pref = ctypes.c_void_p()
        _ok(L.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "preference")
        b, c = self._layouts(m)
        try:
            ws = ctypes.c_uint64(workspace)
            _ok(L.cublasLtMatmulPreferenceSetAttribute(pref, _PREF_MAX_WORKSPACE, ctypes.byref(ws), 8), "workspace")
            res = (_Heuristic * count)()
            got = ctypes.c_int(0)
            _ok(L.cublasLtMatmulAlgoGetHeuristic(_handle(self.device), self.desc, self.a, b, c, c, pref, count, res,
                                                 ctypes.byref(got)), "heuristic")
        finally:
            L.cublasLtMatrixLayoutDestroy(b)
            L.cublasLtMatrixLayoutDestroy(c)
            L.cublasLtMatmulPreferenceDestroy(pref)
        return [(res[i].algo, res[i].workspaceSize, res[i].wavesCount) for i in range(got.value)
                if res[i].state == 0 and res[i].workspaceSize <= workspace]

    def run(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, algo: Algo) -> int:
        """out <- x @ W (+ bias) with `algo`, on torch's current stream; returns cuBLASLt's status (0: done)."""
        L, m = lib(), x.shape[0]
        ws = _workspace(x.device)
        b, c = self._layouts(m)
        try:
            with self.lock:
                if self.bias:
                    self.bias_ptr.value = bias.data_ptr()
                    _ok(L.cublasLtMatmulDescSetAttribute(self.desc, _DESC_BIAS, ctypes.byref(self.bias_ptr), 8),
                        "bias")
                return L.cublasLtMatmul(_handle(self.device), self.desc, ctypes.byref(self.alpha), w.data_ptr(), self.a,
                                        x.data_ptr(), b, ctypes.byref(self.beta), out.data_ptr(), c, out.data_ptr(), c,
                                        ctypes.byref(algo), ws.data_ptr(), ws.numel(), _raw_stream_of(x.device))
        finally:
            L.cublasLtMatrixLayoutDestroy(b)
            L.cublasLtMatrixLayoutDestroy(c)


def describe(algo: Algo) -> dict[str, int]:
    """The algorithm's configuration (id, tile, split-K, stages, cluster, ...), for logs and tables."""
    L, out = lib(), {}
    for name, attr in _CFG.items():
        v = ctypes.c_uint16() if name in _CFG16 else ctypes.c_int32()
        written = ctypes.c_size_t()
        if L.cublasLtMatmulAlgoConfigGetAttribute(ctypes.byref(algo), attr, ctypes.byref(v), ctypes.sizeof(v),
                                                  ctypes.byref(written)) == 0:
            out[name] = int(v.value)
    return out


_workspaces: dict[int, torch.Tensor] = {}


def _workspace(device: torch.device) -> torch.Tensor:
    ws = _workspaces.get(device.index)
    if ws is None:
        ws = _workspaces[device.index] = torch.empty(WORKSPACE, dtype=torch.uint8, device=device)
    return ws
