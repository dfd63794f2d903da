"""The CUDA kernels against the reference (pytest -m gpu; skipped without CUDA by tests/conftest.py).

Fresh random inputs in every case (no fixed seeds), outputs poisoned with NaN before each launch, odd
shapes (K, N multiples of 8 but not of the kernels' 16 x 64 tiles), every m from 1 to 64, v1/v2,
sym/asym, act-order/static, every group size, fp16 and bf16.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from int4_cases import make_layer
from scorer.model.linear import Int4Linear
from scorer.model.quant_config import QuantConfig

pytestmark = pytest.mark.gpu
DTYPES = [torch.float16, torch.bfloat16]
SHAPES = [(4160, 1096), (200, 136), (96, 40), (1024, 4104)]  # (K, N)


def layer_on_gpu(k, n, gs, *, v1, sym, act, dtype, bias=False, case=None):
    """(Int4Linear prepared on cuda, the hand-packed Layer: `case`, or a new one)."""
    case = case or make_layer(k, n, gs, v1=v1, sym=sym, act_order=act, bias=bias)
    qc = QuantConfig(bits=4, group_size=gs, desc_act=act, sym=sym, checkpoint_format="gptq" if v1 else "gptq_v2")
    with torch.device("meta"):
        lin = Int4Linear(k, n, bias, qc)
    state = {name: t.cuda() for name, t in case.ckpt.items()}
    if bias:
        state["bias"] = state["bias"].to(dtype)  # what the loader does: floating tensors but scales to dtype
    lin.load_state_dict(state, assign=True)
    lin.prepare(dtype)
    assert lin.backend == "cuda", "CuPy kernels not chosen: is cupy installed?"
    return lin, case


def reference_y(x, case, dtype, bias=None):
    """fp32 reference of x @ W (+ bias) from the formula's dequantized weight (cached per case)."""
    cache = case.__dict__.setdefault("_w_cuda", {})
    if dtype not in cache:
        cache[dtype] = case.weight(dtype).float().cuda()
    y = x.float() @ cache[dtype]
    return y if bias is None else y + bias.float()


def assert_close_rel(y, ref, dtype):
    assert not torch.isnan(y).any(), "NaN left in the output: not every element was written"
    rel = ((y.float() - ref).norm() / ref.norm()).item()
    assert rel < (2e-3 if dtype == torch.float16 else 1e-2), rel
    tol = 2e-2 if dtype == torch.float16 else 6e-2
    torch.testing.assert_close(y.float(), ref, atol=tol * ref.abs().max().item(), rtol=0)


VARIANTS = [  # (gs, v1, sym, act): every variant, every group size
    (128, True, True, True), (128, False, False, True), (64, True, False, False), (32, False, True, True),
    (-1, True, False, False), (-1, False, True, True), (32, True, False, True), (64, False, True, False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gs,v1,sym,act", VARIANTS)
def test_dequant_bit_exact(gs, v1, sym, act, dtype):
    from scorer.kernels import int4

    for k, n in SHAPES[:3]:
        lin, case = layer_on_gpu(k, n, gs, v1=v1, sym=sym, act=act, dtype=dtype)
        out = torch.full((n, k), float("nan"), dtype=dtype, device="cuda")
        int4.dequant(lin._weight(), out)  # W^T, columns in sequential (act-order sorted) order
        want = case.weight(dtype).cuda()  # (K, N), input order
        want_seq = want if lin.perm is None else want[lin.perm.long()]
        assert torch.equal(out.view(torch.int16), want_seq.t().contiguous().view(torch.int16)), (k, n)
        assert torch.equal(lin.dequantized_weight().view(torch.int16), want.t().contiguous().view(torch.int16))
        rows = torch.full((k, n), float("nan"), dtype=dtype, device="cuda")
        int4.dequant_rows(lin._weight(), rows)  # W, rows in input order
        assert torch.equal(rows.view(torch.int16), want.view(torch.int16)), (k, n)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gs,v1,sym,act", VARIANTS[:4])
@pytest.mark.parametrize("shape", SHAPES[:2] + SHAPES[3:])
def test_fused_gemm_every_m(shape, gs, v1, sym, act, dtype):
    from scorer.kernels import int4

    k, n = shape
    lin, case = layer_on_gpu(k, n, gs, v1=v1, sym=sym, act=act, dtype=dtype, bias=True)
    w = lin._weight()
    for m in range(1, 65):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
        int4.gemm_small(x, w, out)
        assert_close_rel(out, reference_y(x, case, dtype, lin.bias), dtype)


GEMV_CASES = [(shape, *v) for shape in SHAPES for v in VARIANTS] + [  # + Llama-sized, several pieces per block
    ((4096, 4096), 128, True, True, True), ((14336, 1024), 128, False, False, True), ((4096, 1024), -1, True, True, False)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,gs,v1,sym,act", GEMV_CASES)
def test_gemv_every_m_to_16_agrees_with_gemm_tiles(shape, gs, v1, sym, act, dtype):
    """The stream-K kernel (m <= 16) against the reference and the split-K kernel, every variant."""
    from scorer.kernels import int4

    k, n = shape
    lin, case = layer_on_gpu(k, n, gs, v1=v1, sym=sym, act=act, dtype=dtype, bias=True)
    w = lin._weight()
    for m in range(1, 17):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
        int4.gemv(x, w, out, ring=1)
        ref = reference_y(x, case, dtype, lin.bias)
        assert_close_rel(out, ref, dtype)
        tiles = int4.gemm_tiles(x, w, torch.empty(m, n, dtype=dtype, device="cuda"))
        assert_close_rel(out, tiles.float(), dtype)
        # the bulk-copy ring (sm_90; ring 1 elsewhere) runs the same arithmetic in the same order
        bulk = int4.gemv(x, w, torch.full((m, n), float("nan"), dtype=dtype, device="cuda"), ring=2)
        assert torch.equal(bulk, out), f"ring 2 differs from ring 1 at m={m}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 7, 16])
def test_gemv_is_deterministic_and_reusable(m, dtype):
    """Split column blocks: the fix-up adds the pieces in a fixed order, so repeats are bit-identical."""
    from scorer.kernels import int4

    lin, _ = layer_on_gpu(4160, 1096, 128, v1=False, sym=False, act=True, dtype=dtype)
    w = lin._weight()
    chunk, _, _ = int4.gemv_layout(*w.qweight.shape[:2], torch.cuda.get_device_properties(0).multi_processor_count)
    assert chunk < w.qweight.shape[1], "this shape should split column blocks over several warps"
    x = torch.randn(m, 4160, device="cuda", dtype=dtype)
    first = int4.gemv(x, w, torch.empty(m, 1096, dtype=dtype, device="cuda")).clone()
    assert int4.gemv_ring(w, int4.mt_of(m)) in int4.GEMV_RINGS
    for ring in (None, *int4.GEMV_RINGS, None):
        again = int4.gemv(x, w, torch.full((m, 1096), float("nan"), dtype=dtype, device="cuda"), ring)
        assert torch.equal(again, first), ring
    # the scratch buffer grows (a larger layer, say): the launch plans pointing into the old one are rebuilt
    old = int4._get_scratch(x.device, 0).buf.data_ptr()
    int4._get_scratch(x.device, int4._get_scratch(x.device, 0).buf.numel() + 2**20)
    assert int4._get_scratch(x.device, 0).buf.data_ptr() != old
    again = int4.gemv(x, w, torch.full((m, 1096), float("nan"), dtype=dtype, device="cuda"))
    assert torch.equal(again, first)


@pytest.mark.parametrize("act", [True, False])
@pytest.mark.parametrize("m", [1, 9, 16])
def test_pdl_launches_give_the_same_bits_eagerly_and_replayed(monkeypatch, act, m):
    """gemv's launches with programmatic dependent launch (int4.PDL) start before the kernel ahead ends; each
    waits only before it touches that kernel's memory. Two layers chained (the second reads the first's y,
    written by its fix-up) give the same bits as plain launches, eagerly and from a CUDA graph replayed on
    fresh inputs."""
    from scorer.kernels import int4

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs sm_90")
    dtype = torch.float16
    la, _ = layer_on_gpu(4160, 1096, 128, v1=False, sym=False, act=act, dtype=dtype)
    lb, _ = layer_on_gpu(1096, 136, 64, v1=True, sym=True, act=act, dtype=dtype)
    wa, wb = la._weight(), lb._weight()

    def chain(x):
        return int4.matmul(int4.matmul(x, wa), wb)

    def set_pdl(on):
        monkeypatch.setattr(int4, "PDL", on)
        wa.plans.clear()  # a plan's launches are built under the flag as it was
        wb.plans.clear()

    xs = [torch.randn(m, 4160, device="cuda", dtype=dtype) for _ in range(4)]
    set_pdl(False)
    plain = [chain(x).clone() for x in xs]
    set_pdl(True)
    assert wa.plans == {} and int4._launch_ex() is not None, "the driver has cuLaunchKernelEx"
    for x, want in zip(xs, plain):
        assert torch.equal(chain(x), want)
    for p in (*wa.plans.values(), *wb.plans.values()):  # the fix-up always; gemv behind the gather only
        assert p.fix.ex is not None and (p.main.ex is not None) == (p.stage is not None) == act
    static_x = xs[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        chain(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(static_x)
    for _ in range(3):
        for x, want in zip(xs, plain):
            static_x.copy_(x)
            out.fill_(float("nan"))
            graph.replay()
            assert torch.equal(out, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_gemm_is_deterministic_and_reusable(dtype):
    """Split-K counters reset themselves: repeated launches give bit-identical results."""
    from scorer.kernels import int4

    lin, _ = layer_on_gpu(4160, 1096, 128, v1=False, sym=False, act=True, dtype=dtype)
    w = lin._weight()
    ks, _ = int4.split_k(*w.qweight.shape[:2], 1, torch.cuda.get_device_properties(0).multi_processor_count)
    assert ks > 1, "this shape should exercise the cross-block reduction"
    x = torch.randn(5, 4160, device="cuda", dtype=dtype)
    first = int4.gemm_tiles(x, w, torch.empty(5, 1096, dtype=dtype, device="cuda")).clone()
    for _ in range(3):
        again = int4.gemm_tiles(x, w, torch.full((5, 1096), float("nan"), dtype=dtype, device="cuda"))
        assert torch.equal(again, first)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dispatch_agrees_across_crossover(dtype):
    from scorer.kernels import int4

    k, n = 4096, 4096
    lin, case = layer_on_gpu(k, n, 128, v1=True, sym=False, act=True, dtype=dtype, bias=True)
    w = lin._weight()
    c = int4.crossover(w)
    assert 0 <= c <= int4.MAX_FUSED_M
    for m in sorted({1, max(c - 1, 1), max(c, 1), c + 1, 64, 65, 300}):
        x = torch.randn(2, m, k, device="cuda", dtype=dtype)[1]  # a non-first slice, still contiguous
        y = lin(x)
        assert y.shape == (m, n)
        ref = reference_y(x, case, dtype, lin.bias)
        assert_close_rel(y, ref, dtype)
        if m <= 64:  # both paths agree with each other, not only with the reference
            yf = int4.gemm_small(x, w, torch.empty(m, n, dtype=dtype, device="cuda"))
            yd = int4.dequant_matmul(x, w)
            assert_close_rel(yf, yd.float(), dtype)


MID_MS = (1, *range(17, 66), 100, 127, 128, 129, 255, 300, 513, 1024)  # every m its dispatch may give it to 64


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gs,v1,sym,act", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_gemm_mid_against_the_reference(shape, gs, v1, sym, act, dtype):
    """The block-tiled kernel (m up to MID_MAX_M): partial row and column tiles, split-K and not, every
    variant; out poisoned with NaN, so every element must be written."""
    from scorer.kernels import int4

    k, n = shape
    lin, case = layer_on_gpu(k, n, gs, v1=v1, sym=sym, act=act, dtype=dtype, bias=True)
    w = lin._weight()
    for m in MID_MS:
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
        int4.gemm_mid(x, w, out)
        assert_close_rel(out, reference_y(x, case, dtype, lin.bias), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [100, 1024])
def test_gemm_mid_is_deterministic_and_reusable(m, dtype):
    """Split-K partials summed in a fixed order, counters reset by the last block: repeats are equal."""
    from scorer.kernels import int4

    k, n = 4096, 4104  # 65 column blocks: the last tile's second warp has none
    lin, case = layer_on_gpu(k, n, 128, v1=False, sym=False, act=True, dtype=dtype)
    w = lin._weight()
    ks, _ = int4.mid_split(*w.qweight.shape[:2], m, torch.cuda.get_device_properties(0).multi_processor_count)
    assert (ks > 1) == (m == 100), ks  # one case through the cross-block sum, one without
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    first = int4.gemm_mid(x, w, torch.empty(m, n, dtype=dtype, device="cuda")).clone()
    assert_close_rel(first, reference_y(x, case, dtype), dtype)
    for _ in range(3):
        again = int4.gemm_mid(x, w, torch.full((m, n), float("nan"), dtype=dtype, device="cuda"))
        assert torch.equal(again, first)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dispatch_with_gemm_mid(monkeypatch, dtype):
    """With gemm_mid on (MID_ENABLED), Int4Linear takes it in the buckets where it measured faster, and every
    m at and past each bucket's edge agrees with the reference."""
    from scorer.kernels import int4

    monkeypatch.setattr(int4, "MID_ENABLED", True)
    k, n = 4096, 4096
    lin, case = layer_on_gpu(k, n, 128, v1=True, sym=False, act=True, dtype=dtype, bias=True)
    w = lin._weight()
    wins = int4.mid_wins(w)
    assert len(wins) == len(int4.MID_PROBES) and w.mid_wins == wins  # measured once, kept by the layer
    w.mid_wins = tuple(i % 2 == 0 for i in range(len(wins)))  # whatever was measured: both paths run below
    ran = []
    real = int4.gemm_mid
    monkeypatch.setattr(int4, "gemm_mid", lambda x, w, out: ran.append(x.shape[0]) or real(x, w, out))
    ms = sorted({16, 17, 100, 1024, 1025, *int4.MID_PROBES, *(p + 1 for p in int4.MID_PROBES[:-1])})
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        assert_close_rel(lin(x), reference_y(x, case, dtype, lin.bias), dtype)
    assert ran and ran == [m for m in ms if int4.uses_mid(w, m)] and len(ran) < len(ms)
    assert not any(int4.uses_mid(w, m) for m in (16, 1025))


def test_wrappers_reject_bad_input():
    from scorer.kernels import int4

    lin, _ = layer_on_gpu(96, 40, 32, v1=False, sym=True, act=False, dtype=torch.float16)
    w = lin._weight()
    x = torch.randn(3, 96, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="x must be"):
        int4.gemm_small(x.float(), w, torch.empty(3, 40, device="cuda", dtype=torch.float16))
    with pytest.raises(ValueError, match="x must have 1 to 16 rows"):
        int4.gemv(torch.randn(17, 96, device="cuda", dtype=torch.float16), w,
                  torch.empty(17, 40, device="cuda", dtype=torch.float16))
    with pytest.raises(ValueError, match="ring must be one of"):
        int4.gemv(x, w, torch.empty(3, 40, device="cuda", dtype=torch.float16), ring=3)
    with pytest.raises(ValueError, match="x must have 1 to 64 rows"):
        int4.gemm_small(torch.randn(65, 96, device="cuda", dtype=torch.float16), w,
                        torch.empty(65, 40, device="cuda", dtype=torch.float16))
    with pytest.raises(ValueError, match="out"):
        int4.gemm_small(x, w, torch.empty(3, 41, device="cuda", dtype=torch.float16))
    with pytest.raises(ValueError, match="x must have 1 to 1024 rows"):
        int4.gemm_mid(torch.randn(1025, 96, device="cuda", dtype=torch.float16), w,
                      torch.empty(1025, 40, device="cuda", dtype=torch.float16))
    with pytest.raises(ValueError, match="dequant out"):
        int4.dequant(w, torch.empty(96, 40, device="cuda", dtype=torch.float16))  # wants W^T (N, K)
    with pytest.raises(ValueError, match="dequant_rows out"):
        int4.dequant_rows(w, torch.empty(40, 96, device="cuda", dtype=torch.float16))  # wants W (K, N)
    with pytest.raises(ValueError, match="dequant out"):
        int4.dequant(w, torch.empty(40, 96, device="cuda", dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="x must be"):
        int4.gemm_small(torch.randn(3, 97, device="cuda", dtype=torch.float16)[:, 1:], w,
                        torch.empty(3, 40, device="cuda", dtype=torch.float16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_int4linear_cuda_forward_3d_and_strided(dtype):
    lin, case = layer_on_gpu(1024, 4104, 64, v1=False, sym=False, act=True, dtype=dtype, bias=True)
    for shape in [(2, 3, 1024), (4, 40, 1024), (1, 1, 1024)]:
        x = torch.randn(*shape, device="cuda", dtype=dtype)
        y = lin(x)
        assert y.shape == (*shape[:-1], 4104)
        assert_close_rel(y.reshape(-1, 4104), reference_y(x.reshape(-1, 1024), case, dtype, lin.bias), dtype)
    xt = torch.randn(1024, 6, device="cuda", dtype=dtype).t()  # non-contiguous
    assert_close_rel(lin(xt), reference_y(xt, case, dtype, lin.bias), dtype)


def test_small_llama_gptq_on_gpu_matches_dequantized_bf16():
    """Two Llama-3-8B-wide layers, g128 act-order: probabilities within 2e-2, weight memory <= 30%."""
    import model_check

    res = model_check.run(layers=2, seq=64, rows=4)
    assert res["max_prob_diff"] < 2e-2, res
    assert res["linear_bytes_ratio"] <= 0.30, res
    assert res["host_embeddings_identical"], res
    assert res["bytes_4bit_gpu_host_table"] < res["bytes_4bit"], res
    assert np.isfinite(res["max_prob_diff"])


def test_small_llama_gptq_through_gemm_mid_matches_dequantized_bf16(monkeypatch):
    """The same model check with every 17..1024-row linear on gemm_mid (forced on): 256 and 32 tokens."""
    import model_check

    from scorer.kernels import int4

    calls = []
    real = int4.gemm_mid
    monkeypatch.setattr(int4, "MID_ENABLED", True)
    monkeypatch.setattr(int4, "uses_mid", lambda w, m: int4.GEMV_MAX_M < m <= int4.MID_MAX_M)
    monkeypatch.setattr(int4, "gemm_mid", lambda x, w, out: calls.append(x.shape[0]) or real(x, w, out))
    res = model_check.run(layers=2, seq=64, rows=4)
    assert set(calls) == {256, 32}, sorted(set(calls))  # its 4x64 and 4x8 batches (1x5 and kept tokens: gemv)
    assert res["max_prob_diff"] < 2e-2, res


@pytest.mark.parametrize("bias", [True, False])
def test_op_on_cuda_equals_eager_and_the_plain_torch_kernel(bias):
    """scorer::int4_matmul on CUDA (what a compiled layer calls) = Int4Linear's eager call, bit for bit, at
    fused and dequant m; its plain-torch kernel on the same buffers agrees; opcheck passes on CUDA."""
    from scorer.kernels import int4

    lin, case = layer_on_gpu(1024, 4104, 128, v1=False, sym=True, act=True, dtype=torch.bfloat16, bias=bias)
    for m in (1, 16, 40, 300):
        x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
        args = (x, lin.qweight, lin.scales, lin.qzeros, lin.perm, lin.bias, 1024, 4104, lin._group16)
        y = torch.ops.scorer.int4_matmul(*args)
        assert torch.equal(y, lin(x))
        assert_close_rel(y, int4.reference_matmul(*args).float(), torch.bfloat16)
        # x gathered beforehand (a compiled layer's act-order path): the op runs the layer's registered
        # perm-less view, with its plans and timings (an unregistered one would be planned every call)
        seq = (x.index_select(1, lin.perm), *args[1:4], None, *args[5:])
        assert int4._live.get(int4._key(*seq[1:])) is lin._weight().sequential()
        ys = torch.ops.scorer.int4_matmul(*seq)
        assert_close_rel(ys, int4.reference_matmul(*args).float(), torch.bfloat16)
    torch.library.opcheck(torch.ops.scorer.int4_matmul.default, args)


@pytest.mark.parametrize("shared", [False, True])
def test_compiled_4bit_model_is_one_graph_a_layer_and_equals_eager(tmp_path, shared):
    """Inductor-compiled 4-bit layers: no graph break at the linears, nothing compiled after warmup, and
    the same probabilities as the eager 4-bit model. shared: q/k/v and gate/up share their act-order
    order, as GPTQ writes them, and run fused, their gathers of x in the traced graph behind the norms."""
    from scorer import Scorer
    from scorer.api import Encoded
    from scorer.model.linear import Int4Linear
    from test_int4_model import quantized_pair

    qdir, _ = quantized_pair(tmp_path, 32, True, True, True, shared)
    torch._dynamo.reset()
    kw = dict(device="cuda", dtype="bfloat16", max_batch_tokens=200)
    eager = Scorer.from_pretrained(qdir, compile=False, cuda_graphs=False, **kw)
    sc = Scorer.from_pretrained(qdir, compile=True, **kw)
    assert sum(isinstance(m, Int4Linear) for m in sc.model.modules()) == sc.cfg.num_layers * (4 if shared else 7)
    torch._dynamo.utils.counters.clear()
    sc.warmup()
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    g = np.random.default_rng()
    with torch.compiler.set_stance("fail_on_recompile"):
        for lens in [(1,), (9,), (64,), (3, 70), (20, 21, 22, 5), tuple(g.integers(1, 40, 7))]:
            ids = [g.integers(4, sc.cfg.vocab_size, n).tolist() for n in lens]
            enc = Encoded.from_ids(ids)
            got, want = sc.score_encoded(enc), eager.score_encoded(enc)
            np.testing.assert_allclose(np.array(got["probs"].to_pylist()), np.array(want["probs"].to_pylist()),
                                       atol=2e-2, rtol=0)
    assert not torch._dynamo.utils.counters["graph_break"]
    assert sc._graphs is not None and sc._graphs.on and len(sc._graphs) > 0, "small batches replay CUDA graphs"



@pytest.mark.parametrize("act", [True, False])
def test_concat_on_cuda_equals_the_parts(act):
    """q|k|v fused by Int4Linear.concat (whole column blocks, and parts that end inside one) scores as its
    parts at every path's m: gemv, gemm_tiles and dequant + cuBLAS."""
    import dataclasses

    from scorer.model.linear import Int4Linear

    for ns in ((1024, 256, 256), (1000, 200, 256)):
        cases = [make_layer(512, n, 128, v1=True, sym=False, act_order=act, bias=True) for n in ns]
        g = cases[0].g_idx  # one input, one act-order order
        cases = [dataclasses.replace(c, g_idx=g, ckpt={**c.ckpt, "g_idx": torch.from_numpy(g.copy())}) for c in cases]
        parts = tuple(layer_on_gpu(512, n, 128, v1=True, sym=False, act=act, dtype=torch.bfloat16, bias=True,
                                   case=c)[0] for n, c in zip(ns, cases))
        fused = Int4Linear.concat(parts)
        assert fused.backend == "cuda" and (fused.perm is not None) == act
        assert torch.equal(fused.dequantized_weight(), torch.cat([p.dequantized_weight() for p in parts]))
        for m in (1, 5, 16, 40, 300):
            x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
            assert_close_rel(fused(x), torch.cat([p(x) for p in parts], dim=1).float(), torch.bfloat16)

