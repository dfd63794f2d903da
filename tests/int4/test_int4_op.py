"""scorer::int4_matmul, the op Int4Linear's CUDA layout runs through under torch.compile, on the CPU.

With linear.TILES_OFF_CUDA, prepare() builds the kernels' tile layout on the CPU too and the op's
plain-torch kernel runs it: the same buffers, schema and fake kernel a GPU run traces. So the CPU suite
checks the op against the formula, torch.library's own consistency checks, and a compiled 4-bit model
that traces each decoder layer as one graph (no graph break at the linears) and compiles nothing after
warmup."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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


@pytest.mark.parametrize("kernel", ["cudnn", "flash"])
def test_compiled_4bit_layers_are_one_graph(tmp_path, tiles, kernel):
    qdir, _ = quantized_pair(tmp_path, 32, True, True, True)
    torch._dynamo.reset()
    kw = dict(device="cpu", dtype="bfloat16", attention="packed", attention_kernel=kernel, compile=False,
              max_batch_tokens=120)
    sc, eager = (Scorer.from_pretrained(qdir, **kw) for _ in range(2))
    lins = [m for m in sc.model.modules() if isinstance(m, Int4Linear)]
    assert lins and all(m.backend == "cuda" for m in lins)
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
