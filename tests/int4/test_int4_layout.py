"""The CUDA kernels' index math, emulated on the CPU (the GPU tests check the kernels themselves).

`repack` is checked nibble by nibble against the layout comment of int4.cu; the dequant kernel's
per-lane arithmetic (magic-number subtraction, one rounding, byte permutes, swizzled tile) and the
fused kernel's mma fragments (placed by the PTX ISA's m16n8k16 tables) are replayed in numpy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from int4_cases import make_layer, rng
from scorer.kernels import int4
from scorer.kernels import reference as ref


def nibble(words: np.ndarray, i: int) -> np.ndarray:
    return (words.view(np.uint32) >> np.uint32(4 * i)) & 0xF


@pytest.mark.parametrize("k,n", [(96, 40), (160, 136), (64, 64), (200, 72)])
def test_repack_matches_layout_comment(k, n):
    q = torch.from_numpy(rng().integers(0, 16, (k, n)))
    words = int4.repack(q).numpy()
    kp, np_ = int4.padded(k, n)
    assert words.shape == (np_ // 64, kp // 16, 32, 4)
    qp = np.zeros((kp, np_), dtype=np.int64)
    qp[:k, :n] = q.numpy()
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for j in range(4):
            for kk in range(4):
                for p in range(2):
                    i = 4 * (kk & 1) + 2 * (kk >> 1) + p
                    rows = 16 * np.arange(kp // 16)[None, :] + 4 * t + kk
                    cols = 64 * np.arange(np_ // 64)[:, None] + 8 * g + 2 * j + p
                    assert np.array_equal(nibble(words[:, :, lane, j], i), qp[rows, cols])
    assert torch.equal(int4.unrepack(torch.from_numpy(words), k, n), q)


def half2(bits_lo: np.ndarray, bits_hi: np.ndarray) -> np.ndarray:
    return (bits_lo.astype(np.uint32) | (bits_hi.astype(np.uint32) << 16)).astype(np.uint32)


def emulate_dequant_fp16(words, scales, zeros_true, k, n, group16):
    """int4_dequant<0> lane by lane: W^T (N, K) fp16 bits, columns in sequential order."""
    nbk, kt_n = words.shape[:2]
    out = np.full((n, k), 0x7E00, dtype=np.uint16)  # NaN poison
    sbits = scales.view(np.uint16)
    g_count = scales.shape[0]
    for nb in range(nbk):
        for by in range(-(-kt_n // 8)):
            tile = np.zeros((64, 16, 8), dtype=np.uint16)  # [row][physical chunk][8 halves]
            for warp in range(8):
                kt = by * 8 + warp
                if kt >= kt_n:
                    continue
                grp = min(kt // group16, g_count - 1)
                for lane in range(32):
                    g, t = lane >> 2, lane & 3
                    n0 = nb * 64 + 8 * g
                    for j in range(4):
                        w = np.uint32(words[nb, kt, lane, j])
                        for p in range(2):
                            c = 2 * j + p
                            z = zeros_true[grp, n0 + c] if n0 + c < n else 0
                            s = np.float16(sbits[grp, n0 + c].view(np.float16)) if n0 + c < n else np.float16(0)
                            vals = []
                            for reg in (p, 2 + p):
                                raw = ((int(w) >> (4 * reg)) & 0x000F000F) | 0x64006400
                                for half in (raw & 0xFFFF, raw >> 16):
                                    diff = np.float16(np.uint16(half).view(np.float16)) - np.float16(1024 + z)
                                    vals.append(np.float16(np.float32(diff) * np.float32(s)))  # one rounding
                            row, chunk = 8 * g + c, 2 * warp + (t >> 1)
                            tile[row, chunk ^ g, 4 * (t & 1): 4 * (t & 1) + 4] = np.array(vals).view(np.uint16)
            for row in range(64):
                for ch in range(16):
                    nn_, kk_ = nb * 64 + row, by * 128 + ch * 8
                    if nn_ < n and kk_ < k:
                        out[nn_, kk_: kk_ + 8] = tile[row, ch ^ (row >> 3)]
    return out.view(np.float16)


def test_dequant_kernel_emulation_is_bit_exact():
    k, n, gs = 160, 72, 32
    case = make_layer(k, n, gs, v1=True, sym=False, act_order=True)
    ck = case.ckpt
    g = ck["g_idx"].long()
    perm = torch.argsort(g, stable=True)
    q_seq = ref.unpack_qweight(ck["qweight"])[perm]
    words = int4.repack(q_seq).numpy()
    zeros = ref.unpack_qzeros(ck["qzeros"], True).numpy()
    out = emulate_dequant_fp16(words, ck["scales"].numpy(), zeros, k, n, gs // 16)
    want = case.weight(torch.float16)[perm].t().contiguous().numpy()  # W^T, columns in sequential order
    assert np.array_equal(out.view(np.uint16), want.view(np.uint16))


# PTX ISA, mma.m16n8k16 (.f16/.bf16 A and B, .f32 C): element positions of each lane's fragments.
def a_pos(lane, i):  # a0..a7 -> (row, col) of A (16 x 16)
    g, t = lane >> 2, lane & 3
    return g + 8 * ((i >> 1) & 1), 2 * t + (i & 1) + 8 * (i >> 2)


def b_pos(lane, i):  # b0..b3 -> (row, col) of B (16 x 8)
    g, t = lane >> 2, lane & 3
    return 2 * t + (i & 1) + 8 * (i >> 1), g


def c_pos(lane, i):  # c0..c3 -> (row, col) of C (16 x 8)
    g, t = lane >> 2, lane & 3
    return g + 8 * (i >> 1), 2 * t + (i & 1)


@pytest.mark.parametrize("m", [1, 5, 8, 13])
def test_fused_kernel_fragments_compute_x_at_w(m):
    k, n = 48, 128
    gen = rng()
    w = gen.standard_normal((k, n))  # any real W: the layout, not the dequant, is under test here
    q = torch.from_numpy(gen.integers(0, 16, (k, n)))
    words = int4.repack(q).numpy()
    x = gen.standard_normal((m, k))
    mt_n = -(-m // 8)
    y = np.zeros((m, n))
    for nb in range(words.shape[0]):
        acc = np.zeros((4, mt_n, 32, 4))
        for kt in range(words.shape[1]):
            for j in range(4):
                # the value each lane's A register halves hold: codes at the kernel's (n, k)
                a = np.zeros((16, 16))
                codes = np.zeros((16, 16))
                for lane in range(32):
                    g, t = lane >> 2, lane & 3
                    wd = int(np.uint32(words[nb, kt, lane, j]))
                    for s in range(4):
                        col_n = nb * 64 + 8 * g + 2 * j + (s & 1)
                        for h in range(2):  # half h of register s = a[2s + h]
                            kk = 2 * (s >> 1) + h
                            r, c = a_pos(lane, 2 * s + h)
                            codes[r, c] = (wd >> (4 * s + 16 * h)) & 0xF
                            a[r, c] = w[16 * kt + 4 * t + kk, col_n]
                for mt in range(mt_n):
                    b = np.zeros((16, 8))
                    for lane in range(32):
                        g, t = lane >> 2, lane & 3
                        row = mt * 8 + g
                        for i in range(4):  # xb[0] = x[row, 4t..4t+1], xb[1] = x[row, 4t+2..4t+3]
                            r, c = b_pos(lane, i)
                            b[r, c] = x[row, 16 * kt + 4 * t + i] if row < m else 0.0
                    cm = a @ b
                    for lane in range(32):
                        for i in range(4):
                            acc[j, mt, lane, i] += cm[c_pos(lane, i)]
                # the codes in A are the codes of W^T at the same places the values came from
                for lane in range(32):
                    g, t = lane >> 2, lane & 3
                    for s in range(4):
                        for h in range(2):
                            r, c = a_pos(lane, 2 * s + h)
                            kk = 2 * (s >> 1) + h
                            assert codes[r, c] == q[16 * kt + 4 * t + kk, nb * 64 + 8 * g + 2 * j + (s & 1)]
        # epilogue: acc[j][mt] = {y[m][n], y[m+1][n], y[m][n+1], y[m+1][n+1]}, m = 8mt + 2t, n = 8g + 2j
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            for j in range(4):
                for mt in range(mt_n):
                    mm, nn_ = mt * 8 + 2 * t, nb * 64 + 8 * g + 2 * j
                    for i, (dm, dn) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)]):
                        if mm + dm < m:
                            y[mm + dm, nn_ + dn] += acc[j, mt, lane, i]
    np.testing.assert_allclose(y, x @ w, rtol=1e-10, atol=1e-10)


def test_split_k_covers_every_row_block_once():
    for nbk, kt, mt in [(64, 256, 1), (448, 256, 2), (128, 1792, 8), (1, 6, 1), (18, 260, 4)]:
        ks, per = int4.split_k(nbk, kt, mt, 132)
        kw = int4.warps_of(mt)
        seen = np.zeros(kt, dtype=int)
        for b in range(ks):
            kb0, kb1 = b * per, min(kt, b * per + per)
            assert kb0 < kb1  # no empty block
            per_w = -(-(kb1 - kb0) // kw)
            for warp in range(kw):
                beg = kb0 + warp * per_w
                seen[beg: min(kb1, beg + per_w)] += 1
        assert (seen == 1).all()


@pytest.mark.parametrize("wm,mt", [(int4.MID_WM, int4.MID_MT), (4, 4)])
@pytest.mark.parametrize("k,n,m", [(200, 136, 150), (64, 64, 7), (1040, 200, 129)])
def test_gemm_mid_stages_feed_each_lane_its_fragments(k, n, m, wm, mt):
    """int4_gemm_mid's shared-memory stages, written byte for byte with its load_stage's index arithmetic
    over stale bytes, then read the way its warps read them: every lane gets the code word of its column
    block and tile and the x fragment of its row tile (zeros past M and past K), in partial row and column
    tiles, over every block and split-K slice; for the built warp shape and a 32-row one."""
    WM, WN, KB = wm, int4.MID_WN, int4.MID_KB
    BM, NT, WR = 8 * mt * WM, 32 * WM * WN, 8 * mt
    CODES = WN * KB * 512
    CC, XC = WN * KB * 32 // NT, KB * BM * 2 // NT
    kp, np_ = int4.padded(k, n)
    NB, KT = np_ // 64, kp // 16
    gen = rng()
    wq = gen.integers(0, 2**32, (NB, KT, 32, 4), dtype=np.uint64).astype(np.uint32)
    wq_bytes = wq.view(np.uint8).reshape(-1)
    x = gen.integers(1, 2**16, (m, k), dtype=np.uint64).astype(np.uint16)  # nonzero: a zero fill shows
    x_bytes = x.view(np.uint8).reshape(-1)
    ks, per = int4.mid_split(NB, KT, m, 3)
    assert (ks - 1) * per < KT <= ks * per
    seen = np.zeros((NB, KT, -(-m // BM) * WM), dtype=int)  # (column block, row block, warp's rows)
    for bx in range(-(-NB // WN)):
        for by in range(-(-m // BM)):
            nb0, m0 = bx * WN, by * BM
            for z in range(ks):
                kb0, kb1 = z * per, min(KT, z * per + per)
                for kt0 in range(kb0, kb1, KB):
                    st = np.full(CODES + KB * BM * 32, 0xAB, dtype=np.uint8)  # a stale stage
                    for tid in range(NT):  # load_stage: copy c = tid + i NT of each kind
                        for i in range(CC):
                            c = tid + i * NT
                            w, kk, lc = c // (KB * 32), (c >> 5) % KB, c & 31
                            if nb0 + w < NB and kt0 + kk < kb1:
                                src = (((nb0 + w) * KT + kk) * 32 + lc + kt0 * 32) * 16
                                dst = (w * KB + kk) * 512 + 16 * lc
                                st[dst: dst + 16] = wq_bytes[src: src + 16]
                        for i in range(XC):
                            c = tid + i * NT
                            kk, r, h = c // (2 * BM), (c >> 1) % BM, c & 1
                            if kt0 + kk >= kb1:
                                continue  # past the slice: not copied (and never read)
                            kcol = 16 * kk + 8 * h + 16 * kt0
                            ok = m0 + r < m and kcol < k
                            src = ((m0 + r) * k + kcol) * 2
                            dst = CODES + (kk * BM + r) * 32 + 16 * h
                            st[dst: dst + 16] = x_bytes[src: src + 16] if ok else 0
                    for warp in range(WM * WN):
                        wn, wmi = warp % WN, warp // WN
                        nb = nb0 + wn
                        if nb >= NB:
                            continue
                        for kk in range(KB):
                            kt = kt0 + kk
                            if kt >= kb1:
                                continue
                            seen[nb, kt, by * WM + wmi] += 1
                            for lane in range(32):
                                g, t = lane >> 2, lane & 3
                                sc = wn * KB * 512 + 16 * lane + kk * 512
                                assert np.array_equal(st[sc: sc + 16].view(np.uint32), wq[nb, kt, lane])
                                for mti in range(mt):
                                    p = CODES + wmi * WR * 32 + kk * BM * 32 + mti * 256 + 8 * lane
                                    got = st[p: p + 8].view(np.uint16)
                                    row, k0 = m0 + wmi * WR + 8 * mti + g, 16 * kt + 4 * t
                                    want = np.zeros(4, dtype=np.uint16)
                                    if row < m:
                                        want[: max(0, min(4, k - k0))] = x[row, k0: k0 + 4]
                                    assert np.array_equal(got, want), (nb, kt, lane, mti)
    assert (seen == 1).all()  # every (column block, row block, warp's rows) once: none lost, none twice


def test_gemm_mid_group_tracking_equals_the_group_of_each_row_block():
    """int4_gemm_mid follows groups with a running bound instead of min(kt / gs16, G - 1) per tile: the same
    group for every row block of every split-K slice, the clamp at G - 1 and G = 1 included."""
    INF, KB = 0x7FFFFFFF, int4.MID_KB
    for gs16 in (1, 2, 4, 8, 1 << 20):
        for KT in range(1, 41):
            for G in (range(1, -(-KT // gs16) + 3) if gs16 < 100 else (1,)):
                for per in range(KB, KT + KB, KB):
                    for z in range(-(-KT // per)):
                        kb0, kb1 = z * per, min(KT, z * per + per)
                        cur = min(kb0 // gs16, G - 1)
                        bound = (cur + 1) * gs16 if cur + 1 < G else INF
                        for kt in range(kb0, kb1):  # the kernel's (it, kk) walk, in order
                            if kt >= bound:
                                cur += 1
                                bound = bound + gs16 if cur + 1 < G else INF
                            assert cur == min(kt // gs16, G - 1), (gs16, KT, G, per, z, kt)


def test_gemm_mid_epilogue_rows_round_trip_the_fragments():
    """row8 gives a lane's 8 adjacent columns of one row in order, and the last block's sum puts slice
    partials (written by row8, read back as two float4) into the same accumulator slots."""
    for g in range(8):
        for t in range(4):
            acc = {}
            for j in range(4):
                for mt in range(8):
                    m, n = 8 * mt + 2 * t, 8 * g + 2 * j  # acc[j][mt] = {y[m][n], y[m+1][n], y[m][n+1], y[m+1][n+1]}
                    acc[j, mt, 0], acc[j, mt, 1], acc[j, mt, 2], acc[j, mt, 3] = (m, n), (m + 1, n), (m, n + 1), (m + 1, n + 1)
            ws = {}
            for mt in range(8):
                for d in range(2):
                    v = [None] * 8
                    for j in range(4):  # row8
                        v[2 * j], v[2 * j + 1] = acc[j, mt, d], acc[j, mt, 2 + d]
                    m = 8 * mt + 2 * t + d
                    assert v == [(m, 8 * g + c) for c in range(8)]
                    for c in range(8):
                        ws[m, 8 * g + c] = v[c]
            back = {}
            for h in range(2):
                for i in range(4):
                    for d in range(2):
                        mt, m = 4 * h + i, 8 * (4 * h + i) + 2 * t + d
                        v0 = [ws[m, 8 * g + c] for c in range(4)]
                        v1 = [ws[m, 8 * g + 4 + c] for c in range(4)]
                        back[0, mt, d], back[0, mt, 2 + d], back[1, mt, d], back[1, mt, 2 + d] = v0
                        back[2, mt, d], back[2, mt, 2 + d], back[3, mt, d], back[3, mt, 2 + d] = v1
            assert back == acc


def test_uses_mid_takes_each_buckets_measured_answer(monkeypatch):
    """m in (16, 32] asks the 32 probe, (32, 48] the 48 one, ...; nothing outside (16, 1024], and nothing
    at all unless MID_ENABLED."""
    w = int4.Int4Weight(torch.zeros(1, 1, 32, 4, dtype=torch.int32), torch.zeros(1, 64), torch.zeros(1, 8), None,
                        None, 16, 64, 1)
    probes = int4.MID_PROBES
    w.mid_wins = tuple(i % 2 == 1 for i in range(len(probes)))  # 48, 96, 192, 384, 768 won
    monkeypatch.setattr(int4, "MID_ENABLED", False)
    assert not any(int4.uses_mid(w, m) for m in range(1, 1100))
    monkeypatch.setattr(int4, "MID_ENABLED", True)
    got = {m for m in range(1, 1100) if int4.uses_mid(w, m)}
    lows = (int4.GEMV_MAX_M, *probes[:-1])
    want = {m for lo, hi, won in zip(lows, probes, w.mid_wins) if won for m in range(lo + 1, hi + 1)}
    assert got == want and min(got) == 33 and max(got) == 768 and 49 not in got and 97 not in got


def test_mid_split_covers_every_row_block_in_whole_stages():
    for nbk, kt, m, sms in [(64, 256, 100, 132), (64, 256, 1024, 132), (896, 512, 256, 132), (1, 2, 100, 132),
                            (17, 261, 300, 132), (65, 13, 65, 132), (4096, 64, 1024, 132), (3, 900, 65, 1)]:
        ks, per = int4.mid_split(nbk, kt, m, sms)
        assert per % int4.MID_KB == 0 and (ks - 1) * per < kt <= ks * per  # no empty slice, all covered
        tiles = -(-nbk // int4.MID_WN) * -(-m // int4.MID_BM)
        assert ks == 1 or (tiles <= int4._COUNTERS and kt >= 4 * int4.MID_KB * ks - 4 * int4.MID_KB)


@pytest.mark.parametrize("nbk,kt,sms", [(64, 256, 132), (896, 512, 132), (1, 6, 132), (18, 261, 7), (3, 1, 132),
                                        (224, 1792, 132), (17, 64, 1)])
def test_gemv_partition_covers_every_tile_once(nbk, kt, sms):
    """int4_gemv's stream-K cut: each tile in exactly one warp, one wave, pieces within the workspace."""
    chunk, warps, pmax = int4.gemv_layout(nbk, kt, sms)
    total = nbk * kt
    assert warps <= max(1, sms * int4.GEMV_WAVE) and (warps - 1) * chunk < total <= warps * chunk
    seen = np.zeros(total, dtype=int)
    owners = {}
    for w in range(warps):  # what the kernel does: tiles [w*chunk, min(total, (w+1)*chunk)), cut at each nb
        beg, end = w * chunk, min(total, (w + 1) * chunk)
        seen[beg:end] += 1
        for nb in range(beg // kt, (end - 1) // kt + 1):
            owners.setdefault(nb, []).append(w)
    assert (seen == 1).all()
    for nb in range(nbk):
        lo, pieces = int4.gemv_pieces(nb, kt, chunk)
        assert owners[nb] == list(range(lo, lo + pieces))  # the warps that write a piece of nb, in order
        assert pieces <= pmax
    # the fix-up's depth comes from the same pmax, and is one of the depths the module builds
    f = int4.gemv_fix_depth(pmax)
    assert f == (int4.GEMV_FIX_DEPTHS[0] if pmax <= int4.GEMV_FIX_FEW else int4.GEMV_FIX_DEPTHS[1])
    assert {f"int4_gemv_fix<{dt}, {mt}, {f}>" for dt in (0, 1) for mt in (1, 2)} <= set(int4._names())


def test_gemv_fp16_in_place_nibble_trick_is_exact():
    """int4_gemv's fp16 dequant: the nibble at bits 4..7 read as 1024 + 16q, times 1/16, plus -(64 + z),
    is q - z exactly (then one rounding by the scale, as the reference); the constants are those values."""
    f16 = lambda bits: float(np.uint16(bits).view(np.float16))  # noqa: E731
    assert f16(0x2C00) == 1 / 16
    for q in range(16):
        assert f16(0x6400 | (16 * q)) == 1024 + 16 * q  # and_or(w, 0x00F000F0, 0x64006400), one half
        assert f16(0x6400 | q) == 1024 + q
        for z in range(16):
            assert f16(0xD400 | (z << 4)) == -(64 + z)
            # fma.rn(1024 + 16q, 1/16, -(64 + z)): the exact real result is an integer, so no rounding
            exact = (1024 + 16 * q) / 16 - (64 + z)
            assert exact == q - z and float(np.float16(exact)) == exact


def test_launch_packs_kernel_params_once_and_rewrites_only_its_slots():
    """gemv's launches pack cuLaunchKernel's kernelParams once: pointers as 8 bytes, ints as 4, in order;
    a call rewrites only the named slots (x, y) and leaves the fixed arguments as packed."""
    import ctypes

    class Fn:
        ptr = 0xF00D

    args = [int4._Slot("x"), np.uint64(2**40 + 3), np.int32(-7), int4._Slot("y"), np.int32(2**31 - 1)]
    launch = int4._Launch(Fn(), (9, 2), 128, args)
    assert launch.f == 0xF00D and launch.grid == (9, 2, 1) and launch.slots == {"x": 0, "y": 3}
    params = ctypes.cast(launch.params, ctypes.POINTER(ctypes.c_void_p))
    read = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int32, ctypes.c_uint64, ctypes.c_int32]
    assert [t.from_address(params[i]).value for i, t in enumerate(read)] == [0, 2**40 + 3, -7, 0, 2**31 - 1]
    # __call__ with a stand-in for cupy.cuda.driver (no GPU here): what reaches cuLaunchKernel
    seen = []

    class Driver:
        @staticmethod
        def launchKernel(*a):
            params = ctypes.cast(a[9], ctypes.POINTER(ctypes.c_void_p))
            seen.append((a[:9], a[10], [t.from_address(params[i]).value for i, t in enumerate(read)]))

    saved, int4._cupy_driver = int4._cupy_driver, Driver
    try:
        launch(77, x=2**47 + 16, y=2**45 + 32)
        launch(78, y=2**45 + 64)
    finally:
        int4._cupy_driver = saved
    assert seen == [((0xF00D, 9, 2, 1, 128, 1, 1, 0, 77), 0, [2**47 + 16, 2**40 + 3, -7, 2**45 + 32, 2**31 - 1]),
                    ((0xF00D, 9, 2, 1, 128, 1, 1, 0, 78), 0, [2**47 + 16, 2**40 + 3, -7, 2**45 + 64, 2**31 - 1])]


def test_pdl_launch_fills_cuLaunchKernelEx_config_as_the_driver_reads_it(monkeypatch, caplog):
    """A pdl launch goes through cuLaunchKernelEx: CUlaunchConfig and CUlaunchAttribute laid out as cuda.h
    (x86-64: attribute 72 bytes, value at 8; config 56 bytes, stream at 32, attrs at 40, count at 48), the
    programmatic stream-serialization attribute (id 6) set to 1, the packed params, this call's stream."""
    import ctypes

    assert ctypes.sizeof(int4._LaunchAttr) == 72 and int4._LaunchAttr.value.offset == 8
    assert ctypes.sizeof(int4._LaunchConfig) == 56
    assert (int4._LaunchConfig.hStream.offset, int4._LaunchConfig.attrs.offset,
            int4._LaunchConfig.numAttrs.offset) == (32, 40, 48)
    seen = []

    def fake_ex(cfg, f, params, extra):
        a = cfg.attrs[0]
        vals = ctypes.cast(params, ctypes.POINTER(ctypes.c_void_p))
        seen.append(((cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ, cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ,
                      cfg.sharedMemBytes, cfg.hStream, cfg.numAttrs), (a.id, a.value[0]), f, extra,
                     ctypes.c_uint64.from_address(vals[0]).value))
        return 0

    class Fn:
        ptr = 0xBEEF

    monkeypatch.setattr(int4, "_cu_launch_ex", [fake_ex])
    monkeypatch.setattr(int4, "PDL", True)
    launch = int4._Launch(Fn(), (5,), 256, [int4._Slot("y"), np.int32(3)], pdl=True)
    launch(99, y=2**44)
    assert seen == [((5, 1, 1, 256, 1, 1, 0, 99, 1), (6, 1), 0xBEEF, None, 2**44)]
    monkeypatch.setattr(int4, "PDL", False)  # SCORER_PDL=0: the plain launch
    assert int4._Launch(Fn(), (5,), 256, [np.int32(3)], pdl=True).ex is None
    # a driver that refuses the launch (outside a capture): a warning, then this launch goes out plainly
    monkeypatch.setattr(int4, "PDL", True)
    monkeypatch.setattr(int4, "_cu_launch_ex", [lambda *a: 801])  # CUDA_ERROR_NOT_SUPPORTED
    plain = []

    class Driver:
        @staticmethod
        def launchKernel(*a):
            plain.append(a[:9])

    monkeypatch.setattr(int4, "_cupy_driver", Driver)
    refused = int4._Launch(Fn(), (5,), 256, [int4._Slot("y")], pdl=True)
    with caplog.at_level("WARNING", logger=int4.__name__):
        refused(7, y=16)
    assert plain == [(0xBEEF, 5, 1, 1, 256, 1, 1, 0, 7)] and refused.ex is None
    assert caplog.text.count("SCORER_PDL=0") == 1
    assert int4._launch_ex() is None, "later plans launch plainly"
    refused(8, y=32)  # now plain at once
    assert plain[-1] == (0xBEEF, 5, 1, 1, 256, 1, 1, 0, 8) and caplog.text.count("SCORER_PDL=0") == 1


def test_kernels_launched_with_pdl_wait_before_touching_memory():
    """The host launches int4_stage_x, int4_gemv and int4_gemv_fix with PDL (_gemv_plan): each must call
    pdl_wait() before it reads another kernel's output or writes anything (int4.cu's PDL comment); gemv
    in each of its rings, ahead of the first x fetch."""
    import re

    src = int4.SOURCE.read_text()
    heads = list(re.finditer(r"__global__ void (?:__launch_bounds__\([^)]*\)\s*)?(int4_\w+)\(", src))
    body = {h.group(1): src[h.start():(heads[i + 1].start() if i + 1 < len(heads) else len(src))]
            for i, h in enumerate(heads)}
    assert {"int4_stage_x", "int4_gemv", "int4_gemv_fix", "int4_dequant"} <= set(body), sorted(body)
    stage, fix, gemv = body["int4_stage_x"], body["int4_gemv_fix"], body["int4_gemv"]
    assert stage.index("pdl_wait();") < stage.index("ld_v4(") < stage.index("st_v4(")
    assert fix.index("pdl_wait();") < fix.index("sum_pieces<")
    rings = [gemv.index(mark) for mark in ("if constexpr (RING == 0)", "else if constexpr (RING == 2)",
                                           "// ---- ring of S tiles per warp in shared memory")]
    waits = [m.start() for m in re.finditer(r"pdl_wait\(\);", gemv)]
    fetches = [gemv.index("fetch(wb[d], xb[d]);", rings[0]), gemv.index("load_x();", rings[1]),
               gemv.index("issue_burst(bu * T);", rings[2])]
    for ring, first in zip(rings, fetches):
        assert any(ring < w < first for w in waits), (ring, first)
    assert "pdl_wait" not in body["int4_dequant"], "kernels launched plainly need no wait"


@pytest.mark.parametrize("m", [1, 2, 3, 8, 9, 15, 16])
def test_gemv_pieces_round_trip_the_c_fragments(m):
    """gemv's flush and int4_gemv_fix replayed: each lane's C fragments stored at row pair p = 4 mt + t as
    {y[2p][c], y[2p][c+1], y[2p+1][c], y[2p+1][c+1]} in 16-byte slots (2 floats in 8-byte slots where
    2p + 1 is past M, none where 2p is), read back by the fix-up thread of (p, column pair), land on the
    elements of y the mma.m16n8k16 C layout gives them, every element of the m x 64 block exactly once,
    nothing unstored is read, and the stored floats are contiguous (m = 1: the first 64 of the piece)."""
    mt_n = int4.mt_of(m)
    y = rng().standard_normal((mt_n * 8, 64))
    piece = np.full(mt_n * 8 * 64, np.nan)
    for lane in range(32):  # flush: acc[j][mt] = {y[r][c], y[r+1][c], y[r][c+1], y[r+1][c+1]}, r = 8mt+2t, c = 8g+2j
        g, t = lane >> 2, lane & 3
        for mt in range(mt_n):
            p = mt * 4 + t
            for j in range(4):
                r, c = mt * 8 + 2 * t, 8 * g + 2 * j
                acc = [y[r, c], y[r + 1, c], y[r, c + 1], y[r + 1, c + 1]]
                q = 8 * j + g
                if 2 * p + 1 < m:
                    piece[128 * p + 4 * q:128 * p + 4 * q + 4] = acc[0], acc[2], acc[1], acc[3]
                elif 2 * p < m:
                    piece[128 * p + 2 * q:128 * p + 2 * q + 2] = acc[0], acc[2]
    out = np.full((m, 64), np.nan)
    for idx in range(int4.gemv_fix_threads(1, m)):  # the fix-up's threads of one column block (nb = 0)
        r, c = 2 * (idx >> 5), 8 * (idx & 7) + 2 * ((idx >> 3) & 3)
        p, q = idx >> 5, idx & 31
        s = piece[4 * idx: 4 * idx + 4] if r + 1 < m else piece[128 * p + 2 * q: 128 * p + 2 * q + 2]
        assert not np.isnan(s).any(), "the fix-up read a value the flush did not store"
        assert np.isnan(out[r, c:c + 2]).all()
        out[r, c:c + 2] = s[0], s[1]
        if r + 1 < m:
            assert np.isnan(out[r + 1, c:c + 2]).all()
            out[r + 1, c:c + 2] = s[2], s[3]
    np.testing.assert_array_equal(out, y[:m])
    assert not np.isnan(piece[:m * 64]).any() and np.isnan(piece[m * 64:]).all()
