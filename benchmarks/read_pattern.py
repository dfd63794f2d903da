"""How fast can one wave of warps stream a layer's bytes, by the order they read them in?

    python benchmarks/read_pattern.py [--mib 256] [--warps-per-sm 24] [--waves 1,2,4,8]

gemv gives each warp of one wave a contiguous chunk of the layer (stream-K), so at any moment the wave
reads ~3,000 addresses spread over the whole layer. A copy kernel instead sweeps: neighbouring warps read
neighbouring bytes, so the addresses in flight sit in a narrow window. This times pure reads (no math) of
one buffer in both orders, with 16-byte loads per lane (8 in flight per warp) and with bulk copies of
2 KB into a 4-stage shared-memory ring (as gemv's ring 2), against a device-to-device copy: if the sweep
is much faster, storing each warp's tiles interleaved (tile s of every warp side by side) would pay.

`--waves W` cuts the same bytes over W times as many warps (W waves, shorter chunks), which the block
scheduler hands out as SMs free up: if one wave's equal chunks leave a tail (some SMs streaming slower than
others), more waves close it. fp16 cuBLAS GEMV (m = 1) on a 4096-column layer of the same size is timed
beside them: the read rate the hardware gives a library kernel.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cupy  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from scorer.kernels import int4  # noqa: E402

# The kernels below use int4.cu's own primitives (the 16-byte streaming load, shared-memory addresses,
# the mbarrier and bulk-copy wrappers gemv's ring 2 issues), so they stream the way gemv does; the source
# is appended to int4.cu's, built without the evict-first hint these figures were taken without.
SRC = r"""
// SWEEP 0: warp w reads its own contiguous chunk of `per` 512-byte pieces; 1: piece i of warp w sits at
// i * W + w (all warps side by side)
template <int SWEEP> __global__ void rd(const uint4* __restrict__ p, int per, u32* out) {
  const int lane = threadIdx.x & 31, W = gridDim.x * (blockDim.x >> 5);
  const int gw = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  u32 acc = 0;
  for (int i = 0; i < per; i += 8) {
    uint4 v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const size_t piece = SWEEP ? (size_t)(i + u) * W + gw : (size_t)gw * per + i + u;
      v[u] = ld_stream_v4(p + piece * 32 + lane);
    }
#pragma unroll
    for (int u = 0; u < 8; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  if (acc == 0x9E3779B9u) out[0] = acc;
}
// the same through a 4-stage ring of 2 KB bulk copies per warp (4 pieces a stage)
template <int SWEEP> __global__ void rd_bulk(const uint4* __restrict__ p, int per, u32* out) {
  constexpr int S = 4, T = 4;
  __shared__ __align__(128) uint4 ring_all[4 * S * T * 32];
  __shared__ __align__(8) unsigned long long bar_all[4 * S];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, W = gridDim.x * (blockDim.x >> 5);
  const int gw = blockIdx.x * (blockDim.x >> 5) + wid;
  uint4* ring = ring_all + wid * S * T * 32;
  const u32 r0 = smem_addr(ring), b0 = smem_addr(bar_all + wid * S);
  const int stages = per / T;
  int issued = 0;
  auto issue = [&](int st) {
    if (issued < stages) {
      const size_t piece = SWEEP ? ((size_t)issued * W + gw) * T : (size_t)gw * per + (size_t)issued * T;
      mbar_expect_tx(b0 + 8 * st, T * 512);
      bulk_g2s(r0 + st * T * 512, p + piece * 32, T * 512, b0 + 8 * st);
      ++issued;
    }
  };
  if (lane == 0) {
    for (int st = 0; st < S; ++st) mbar_init(b0 + 8 * st, 1);
    mbar_init_fence();
    for (int st = 0; st < S; ++st) issue(st);
  }
  __syncwarp();
  u32 acc = 0, phase = 0;
  for (int i = 0, st = 0; i < stages; ++i) {
    mbar_wait(b0 + 8 * st, (phase >> st) & 1u);
    phase ^= 1u << st;
#pragma unroll
    for (int u = 0; u < T; ++u) {
      const uint4 v = ring[st * T * 32 + u * 32 + lane];
      acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    __syncwarp();
    if (lane == 0) issue(st);
    st = st + 1 == S ? 0 : st + 1;
  }
  if (acc == 0x9E3779B9u) out[0] = acc;
}
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--warps-per-sm", type=int, default=24)
    ap.add_argument("--waves", default="1", help="comma-separated wave counts (warps = waves x one wave)")
    a = ap.parse_args()
    names = [f"rd<{s}>" for s in (0, 1)] + [f"rd_bulk<{s}>" for s in (0, 1)]
    mod = cupy.RawModule(code=int4.SOURCE.read_text() + SRC, options=("-std=c++17", "-DGEMV_HINT=0"),
                         name_expressions=names)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cap = a.mib * 2**20
    bufs = [torch.randint(0, 2**31, (cap // 4,), dtype=torch.int32, device="cuda") for _ in range(3)]
    out = torch.zeros(1, dtype=torch.int32, device="cuda")

    def timed(fn, pool=bufs) -> float:  # median of 10 launches, each on one of three buffers in turn
        ts = []
        for r in range(12):
            b = pool[r % 3]
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn(b)
            e.record()
            e.synchronize()
            ts.append(s.elapsed_time(e) / 1e3)
        return float(np.median(ts[2:]))

    print(f"# {torch.cuda.get_device_name()}: reads of up to {a.mib} MiB, one wave = {sms} SMs x "
          f"{a.warps_per_sm} warps, 512-byte pieces\n")
    print("| pattern | waves | warps | pieces a warp | us | TB/s |")
    print("|---|---:|---:|---:|---:|---:|")
    dst = torch.empty_like(bufs[0])
    t = timed(lambda b: dst.copy_(b))
    print(f"| device copy (read + write counted) | | | | {t * 1e6:.1f} | {2 * cap / t / 1e12:.2f} |")
    wt = [torch.randn(cap // 2 // 4096, 4096, device="cuda", dtype=torch.float16) for _ in range(3)]
    xv = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    t = timed(lambda w: torch.nn.functional.linear(xv, w), wt)
    print(f"| fp16 cuBLAS GEMV, m = 1, {wt[0].shape[0]}x4096 | | | | {t * 1e6:.1f} | {cap / t / 1e12:.2f} |")
    del wt
    labels = ["chunk per warp, 16 B loads", "sweep, 16 B loads", "chunk per warp, 2 KB bulk copies",
              "sweep, 2 KB bulk copies"]
    for waves in (int(v) for v in a.waves.split(",")):
        blocks = sms * a.warps_per_sm // 4 * waves
        W = blocks * 4
        per = max(16, (cap // 512 // W) // 16 * 16)  # pieces per warp, a multiple of 16
        while per > 16 and per * W * 512 > cap:
            per -= 16
        nbytes = per * W * 512
        if nbytes > cap:
            print(f"| ({waves} waves need {nbytes >> 20} MiB: skipped) | | | | | |")
            continue
        for name, label in zip(names, labels):
            fn = mod.get_function(name)

            def run(b, fn=fn, blocks=blocks, per=per):
                with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
                    fn((blocks,), (128,), (np.uint64(b.data_ptr()), np.int32(per), np.uint64(out.data_ptr())))

            t = timed(run)
            print(f"| {label} | {waves} | {W} | {per} | {t * 1e6:.1f} | {nbytes / t / 1e12:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
