"""scorer::int4_matmul, the op Int4Linear's CUDA layout runs through under torch.compile, on the CPU.

With linear.TILES_OFF_CUDA, prepare() builds the kernels' tile layout on the CPU too and the op's
plain-torch kernel runs it: the same buffers, schema and fake kernel a GPU run traces. So the CPU suite
checks the op against the formula, torch.library's own consistency checks, and a compiled 4-bit model
that traces each decoder layer as one graph (no graph break at the linears) and compiles nothing after
warmup."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from int4_cases import all_cases, make_layer, rng
from scorer import Scorer
from scorer.api import Encoded
from scorer.kernels import int4
from scorer.model import linear, llama
from scorer.model.linear import Int4Linear
from test_int4_linear import loaded
from test_int4_model import quantized_pair


@pytest.fixture
def tiles(monkeypatch):
    monkeypatch.setattr(linear, "TILES_OFF_CUDA", True)


def _x(m: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(rng().standard_normal((m, k)).astype(np.float32)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k,n,gs,v1,sym,act", all_cases()[1::4])
def test_op_equals_the_reference_layer(tiles, k, n, gs, v1, sym, act, dtype):
    case = make_layer(k, n, gs, v1=v1, sym=sym, act_order=act, bias=True)
    lin = loaded(case, gs, v1, sym, act, dtype, bias=True)
    assert lin.backend == "cuda" and lin.qweight.dim() == 4  # the tile layout, on the CPU
    # W from the tiles (unrepack, group per row block, perm scattered back) is the formula's, bit for bit
    assert torch.equal(lin.dequantized_weight(), case.weight(dtype).t())
    w = case.weight(torch.float32)  # fp16 W widened: the reference the products are compared with
    for m in (1, 5, 17):
        x = _x(m, k, dtype)
        y = lin(x)
        assert y.dtype == dtype and y.shape == (m, n)
        want = x.double() @ case.weight(dtype).double() + case.ckpt["bias"].to(dtype).double()
        np.testing.assert_allclose(y.double().numpy(), want.numpy(), atol=3e-2 if dtype == torch.bfloat16 else 4e-3,
                                   rtol=0)
    assert lin(x.new_empty(0, k)).shape == (0, n)
    assert lin(_x(6, k, dtype).view(2, 3, k)).shape == (2, 3, n)
    del w


@pytest.mark.parametrize("act,bias", [(True, True), (False, False)])
def test_op_passes_torch_library_checks(tiles, act, bias):
    case = make_layer(160, 72, 32, v1=False, sym=False, act_order=act, bias=bias)
    lin = loaded(case, 32, False, False, act, torch.bfloat16, bias=bias)
    args = (_x(7, 160, torch.bfloat16), lin.qweight, lin.scales, lin.qzeros, lin.perm, lin.bias, 160, 72, lin._group16)
    torch.library.opcheck(torch.ops.scorer.int4_matmul.default, args)
    got = torch.ops.scorer.int4_matmul(*args)
    assert torch.equal(got, int4.reference_matmul(*args))


def _batches(vocab: int) -> list[list[list[int]]]:
    g = np.random.default_rng(3)
    shapes = [(1,), (7,), (19,), (2, 2), (31, 9), (5, 40, 41, 3), tuple(g.integers(1, 50, 9))]
    return [[g.integers(4, vocab, n).tolist() for n in lens] for lens in shapes]


@pytest.mark.parametrize("kernel,shared", [("cudnn", False), ("flash", False), ("cudnn", True)])
def test_compiled_4bit_layers_are_one_graph(tmp_path, tiles, kernel, shared):
    # shared: q/k/v and gate/up share their act-order column order (as GPTQ writes them) and fuse
    qdir, _ = quantized_pair(tmp_path, 32, True, True, True, shared)
    torch._dynamo.reset()
    kw = dict(device="cpu", dtype="bfloat16", attention="packed", attention_kernel=kernel, compile=False,
              max_batch_tokens=120)
    sc, eager = (Scorer.from_pretrained(qdir, **kw) for _ in range(2))
    lins = [m for m in sc.model.modules() if isinstance(m, Int4Linear)]
    assert lins and all(m.backend == "cuda" for m in lins)
    assert len(lins) == sc.cfg.num_layers * (4 if shared else 7)
    llama.compile_layers(sc.model, backend="eager")
    torch._dynamo.utils.counters.clear()
    sc.warmup()
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    with torch.compiler.set_stance("fail_on_recompile"):
        for ids in _batches(sc.cfg.vocab_size):
            enc = Encoded.from_ids(ids)
            got, want = sc.score_encoded(enc), eager.score_encoded(enc)
            np.testing.assert_allclose(np.array(got["probs"].to_pylist()), np.array(want["probs"].to_pylist()),
                                       atol=1e-6, rtol=0)
    assert sc.grid == (kernel == "cudnn")
    assert not torch._dynamo.utils.counters["graph_break"]


def _sharing_g_idx(cases: list) -> list:
    """The cases with the first one's g_idx: projections of one input, as GPTQ quantizes them."""
    g = cases[0].g_idx
    return [dataclasses.replace(c, g_idx=g, ckpt={**c.ckpt, "g_idx": torch.from_numpy(g.copy())}) for c in cases]


@pytest.mark.parametrize("layout", ["reference", "tiles"])
@pytest.mark.parametrize("act,aligned", [(True, True), (False, True), (True, False)])
def test_concat_fuses_projections_of_one_input(monkeypatch, layout, act, aligned):
    monkeypatch.setattr(linear, "TILES_OFF_CUDA", layout == "tiles")
    dtype = torch.bfloat16 if layout == "tiles" else torch.float32
    # whole 64-column blocks but the last, or a part that ends inside a block (its codes are tiled again)
    ns = (128, 64, 72) if aligned else (72, 40, 64)
    k = 160
    cases = _sharing_g_idx([make_layer(k, n, 32, v1=True, sym=False, act_order=act, bias=True,
                                       gen=np.random.default_rng(10 + i)) for i, n in enumerate(ns)])
    parts = tuple(loaded(c, 32, True, False, act, dtype, bias=True) for c in cases)
    assert all(p.backend == ("cuda" if layout == "tiles" else "reference") for p in parts)
    assert (parts[0].perm is not None) == act
    assert Int4Linear.fusable(parts) == (True, "")
    fused = llama.concat_linears(parts, "q/k/v")
    assert type(fused) is Int4Linear and fused.out_features == sum(ns) and fused.backend == parts[0].backend
    # the same codes, scales and zeros: W bit for bit, and each output column the same dot product
    assert torch.equal(fused.dequantized_weight(), torch.cat([p.dequantized_weight() for p in parts]))
    want = torch.cat([c.weight(dtype) for c in cases], dim=1).t()
    assert torch.equal(fused.dequantized_weight(), want)
    for m in (1, 7):
        x = _x(m, k, dtype)
        tol = dict(rtol=0, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1.3e-6, atol=1e-5)
        torch.testing.assert_close(fused(x), torch.cat([p(x) for p in parts], dim=1), **tol)
    assert fused.weight_bytes() <= sum(p.weight_bytes() for p in parts)


def test_layers_that_cannot_fuse_stay_apart(tiles):
    dtype = torch.bfloat16
    own = [make_layer(160, 64, 32, v1=False, sym=True, act_order=True, gen=np.random.default_rng(i)) for i in range(2)]
    parts = tuple(loaded(c, 32, False, True, True, dtype) for c in own)
    ok, why = Int4Linear.fusable(parts)
    assert not ok and "permutations" in why  # layers quantized apart: each keeps its own order
    assert llama.concat_linears(parts, "gate/up") is None
    with pytest.raises(ValueError, match="cannot fuse"):
        Int4Linear.concat(parts)
    dense = nn.Linear(160, 64, dtype=dtype)
    assert llama.concat_linears((parts[0], dense)) is None


@pytest.mark.parametrize("layout", ["reference", "tiles"])
def test_permute_outputs_moves_whole_columns(monkeypatch, layout):
    monkeypatch.setattr(linear, "TILES_OFF_CUDA", layout == "tiles")
    dtype = torch.bfloat16 if layout == "tiles" else torch.float32
    case = make_layer(160, 200, 32, v1=True, sym=False, act_order=True, bias=True)  # 200: a partial block
    lin = loaded(case, 32, True, False, True, dtype, bias=True)
    w, b = lin.dequantized_weight(), lin.bias.clone()
    x = _x(5, 160, dtype)
    y = lin(x)
    order = torch.from_numpy(rng().permutation(200))
    lin.permute_outputs(order)
    assert torch.equal(lin.dequantized_weight(), w[order]) and torch.equal(lin.bias, b[order])
    tol = dict(rtol=0, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1.3e-6, atol=1e-5)
    torch.testing.assert_close(lin(x), y[:, order], **tol)
    with pytest.raises(ValueError, match="200 entries"):
        lin.permute_outputs(order[:-8])


def _fx_index_selects(sc) -> list[int]:
    """index_select nodes in each graph torch.compile traces for the decoder layers (eager backend)."""
    counts = []

    def backend(gm, example_inputs):
        counts.append(sum(1 for n in gm.graph.nodes if "index_select" in str(n.target)))
        return gm.forward

    llama.compile_layers(sc.model, backend=backend)
    sc.score_encoded(Encoded.from_ids([[5, 6, 7, 8, 9, 10, 11]]))
    return counts


@pytest.mark.parametrize("shared", [False, True])
def test_act_order_gathers_in_the_graph_sit_behind_the_norms_only(tmp_path, tiles, shared):
    """Under torch.compile the projections right behind an RMSNorm gather x's columns in the traced graph,
    one index_select each (for inductor to fuse into the norm's kernel: the GPU profile shows one
    `triton_red_fused_..index_select..rsqrt` kernel); o_proj keeps the op's own gather and down_proj needs
    none (gate/up write its sequential order)."""
    qdir, _ = quantized_pair(tmp_path, 32, True, True, True, shared)
    torch._dynamo.reset()
    sc = Scorer.from_pretrained(qdir, device="cpu", dtype="bfloat16", attention="packed", compile=False)
    counts = _fx_index_selects(sc)
    behind_norm = 2 if shared else 5  # q|k|v and gate|up fused, or each of q, k, v, gate, up
    assert counts and all(c == behind_norm for c in counts), counts  # one per layer graph, nothing else
    mods = [m for m in sc.model.modules() if isinstance(m, Int4Linear)]
    assert sum(m.gather_in_graph for m in mods) == behind_norm * sc.cfg.num_layers
    o = [m for n, m in sc.model.named_modules() if n.endswith("o_proj")]
    down = [m for n, m in sc.model.named_modules() if n.endswith("down_proj")]
    assert all(m.perm is not None and not m.gather_in_graph for m in o)
    assert all(m.perm is None for m in down)


def test_the_op_finds_a_layers_perm_less_view(tiles):
    """The op looks a layer up by its tensors: with perm, the layer; with perm=None (x gathered before the
    op), the layer's one `sequential()` view, which keeps its own plans and timings."""
    case = make_layer(160, 72, 32, v1=False, sym=True, act_order=True)
    lin = loaded(case, 32, False, True, True, torch.bfloat16)
    w = int4.Int4Weight(lin.qweight, lin.scales, lin.qzeros, lin.perm, None, 160, 72, lin._group16)
    seq = w.sequential()
    assert seq is w.sequential() and seq.perm is None and seq.qweight is w.qweight
    int4.register(w)
    int4.register(seq)
    args = (lin.qweight, lin.scales, lin.qzeros)
    assert int4._live.get(int4._key(*args, lin.perm, None, 160, 72, lin._group16)) is w
    assert int4._live.get(int4._key(*args, None, None, 160, 72, lin._group16)) is seq
    static = int4.Int4Weight(lin.qweight, lin.scales, lin.qzeros, None, None, 160, 72, lin._group16)
    assert static.sequential() is static
