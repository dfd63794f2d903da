// 4-bit GPTQ kernels for scorer: whole-layer dequant (for cuBLAS at large m) and a fused small-m GEMM.
// Compiled by NVRTC through cupy.RawModule: no #include at all; fp16/bf16 values travel as raw bits
// (u16 / u32 pairs) and the arithmetic is inline PTX, so no header is needed under NVRTC or nvcc.
//
// Weight layout ("tiles", written by scorer.kernels.int4.repack; K rows already in act-order sequence):
//   words[nb][kt][lane][j]   nb < Np/64 column blocks of 64, kt < KT = Kp/16 row blocks of 16,
//                            lane = 4*g + t (g < 8, t < 4), j < 4; one uint4 (16 B) per lane per tile.
//   nibble i = 4*(kk & 1) + 2*(kk >> 1) + p of word j holds q[k, n] for
//       k = 16*kt + 4*t + kk  (kk < 4),      n = 64*nb + 8*g + 2*j + p  (p < 2)
//   so (w >> 4s) & 0x000F000F holds, in its two 16-bit halves, the codes of column 8g+2j+(s&1) at
//   k = 4t + 2*(s>>1) + {0, 1}: exactly the A fragment register s of mma.m16n8k16 when the MMA's
//   rows are output columns (A = W^T) and its logical k columns {2t, 2t+1, 2t+8, 2t+9} are mapped to
//   the physical k {4t, 4t+1, 4t+2, 4t+3}; B (= x^T) is then one 8-byte load x[m, 4t .. 4t+3].
//   The same lane covers 8 adjacent output columns 8g .. 8g+7 across j (one 16-byte scale load, one
//   zero word) and 4 adjacent k of each (one 8-byte piece of a W^T row for the dequant kernel).
//   scales: [G][Np] in the activation dtype; qzeros: [G][Np/8] true zeros (v2), 8 nibbles a word.
//
// Dequant of one value: (magic | q) - (magic | z) is q - z exactly (magic = 1024 in fp16, 128 in bf16),
// then * s rounds once: bit-identical to scorer.kernels.reference.dequantize.

typedef unsigned int u32;
typedef unsigned short u16;

template <int DT> struct Tr;  // DT 0: fp16, 1: bf16
template <> struct Tr<0> {
  static constexpr u32 MAGIC = 0x64006400u;  // 1024.0 in each half
  static constexpr u32 NEG1 = 0xBC00BC00u;   // -1.0
};
template <> struct Tr<1> {
  static constexpr u32 MAGIC = 0x43004300u;  // 128.0
  static constexpr u32 NEG1 = 0xBF80BF80u;   // -1.0
};
static constexpr u32 NEG0 = 0x80008000u;     // -0.0: a * b + (-0) == a * b, sign of zero kept

template <int DT> __device__ __forceinline__ u32 fma2(u32 a, u32 b, u32 c) {
  u32 d;
  if constexpr (DT == 0) {
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  } else {
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  }
  return d;
}

// Two fp32 -> one packed pair (lo, hi), round to nearest even.
template <int DT> __device__ __forceinline__ u32 pack2(float lo, float hi) {
  u32 d;
  if constexpr (DT == 0) {
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  } else {
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  }
  return d;
}

template <int DT> __device__ __forceinline__ float to_f32(u16 h) {
  if constexpr (DT == 0) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
  } else {
    return __uint_as_float(((u32)h) << 16);
  }
}

// Half h (0: bits 0..15, 1: bits 16..31) of a packed pair, as fp32.
template <int DT> __device__ __forceinline__ float half_f32(u32 pair, int h) {
  return to_f32<DT>((u16)(h ? pair >> 16 : pair & 0xFFFFu));
}

template <int DT> __device__ __forceinline__ void mma16816(float* c, const u32* a, u32 b0, u32 b1) {
  if constexpr (DT == 0) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ uint4 ld_stream_v4(const void* p) {  // read-once weights: skip L1
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}
__device__ __forceinline__ uint4 ld_v4(const void* p) {
  uint4 r;
  asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}
__device__ __forceinline__ uint2 ld_v2(const void* p) {
  uint2 r;
  asm volatile("ld.global.nc.v2.u32 {%0,%1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p));
  return r;
}
__device__ __forceinline__ u32 ld_u32(const void* p) {
  u32 r;
  asm volatile("ld.global.nc.u32 %0, [%1];" : "=r"(r) : "l"(p));
  return r;
}
__device__ __forceinline__ u16 ld_u16(const void* p) {
  u16 r;
  asm volatile("ld.global.nc.u16 %0, [%1];" : "=h"(r) : "l"(p));
  return r;
}
__device__ __forceinline__ float4 ld_cg_f4(const float* p) {  // L2 only: other blocks' partials
  float4 r;
  asm volatile("ld.global.cg.v4.f32 {%0,%1,%2,%3}, [%4];" : "=f"(r.x), "=f"(r.y), "=f"(r.z), "=f"(r.w) : "l"(p));
  return r;
}
__device__ __forceinline__ float2 ld_cg_f2(const float* p) {
  float2 r;
  asm volatile("ld.global.cg.v2.f32 {%0,%1}, [%2];" : "=f"(r.x), "=f"(r.y) : "l"(p));
  return r;
}
__device__ __forceinline__ void st_f2(float* p, float a, float b) {
  asm volatile("st.global.v2.f32 [%0], {%1,%2};" ::"l"(p), "f"(a), "f"(b) : "memory");
}
__device__ __forceinline__ void st_u32(void* p, u32 v) {
  asm volatile("st.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void st_v4(void* p, uint4 v) {
  asm volatile("st.global.v4.u32 [%0], {%1,%2,%3,%4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}
__device__ __forceinline__ void st_f4(float* p, float4 v) {
  asm volatile("st.global.v4.f32 [%0], {%1,%2,%3,%4};" ::"l"(p), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w) : "memory");
}

__device__ __forceinline__ u32 word(const uint4& v, int j) {  // j is a compile-time constant after unrolling
  return j == 0 ? v.x : (j == 1 ? v.y : (j == 2 ? v.z : v.w));
}

// Per column c (0..7) of a lane's 8 columns: the scale in both halves, and magic|zero in both halves.
__device__ __forceinline__ u32 scale2(const uint4& sv, int c) {
  return __byte_perm(word(sv, c >> 1), 0u, (c & 1) ? 0x3232u : 0x1010u);
}
template <int DT> __device__ __forceinline__ u32 zero2(u32 zv, int c) {
  return (((zv >> (4 * c)) & 0xFu) * 0x00010001u) | Tr<DT>::MAGIC;
}
// Fragment register s (0..3) of packed word w, dequantized: column 2j + (s & 1) of the lane.
template <int DT> __device__ __forceinline__ u32 dq(u32 w, int s, u32 zz, u32 ss) {
  const u32 raw = ((w >> (4 * s)) & 0x000F000Fu) | Tr<DT>::MAGIC;
  return fma2<DT>(fma2<DT>(zz, Tr<DT>::NEG1, raw), ss, NEG0);
}

template <int MT> __device__ __forceinline__ void zero_acc(float (&acc)[4][MT][4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[j][mt][r] = 0.f;
}

// One row block of a column block: the four code words of a lane dequantized into A fragments (word j:
// columns 2j, 2j + 1 of the lane's 8), each fed to the mma of the MT row tiles of x (row tiles >= mts
// skipped: rows past M).
template <int DT, int MT>
__device__ __forceinline__ void tile_mma(float (&acc)[4][MT][4], const uint4& wv, const u32 (&xb)[MT][2],
                                         const u32 (&zz)[8], const u32 (&ss)[8], int mts = MT) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const u32 w = word(wv, j);
    u32 a[4];
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const int c = 2 * j + (s & 1);
      a[s] = dq<DT>(w, s, zz[c], ss[c]);
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
      if (mt < mts) mma16816<DT>(acc[j][mt], a, xb[mt][0], xb[mt][1]);
  }
}

// x fragments of MT row tiles that cp.async staged in shared memory: row tile mt's 8 bytes for this lane
// at p + 256 mt + 8 lane, as the two B registers of mma.m16n8k16.
template <int MT> __device__ __forceinline__ void lds_x(const char* p, int lane, u32 (&xv)[MT][2]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const uint2 v = *reinterpret_cast<const uint2*>(p + mt * 256 + 8 * lane);
    xv[mt][0] = v.x;
    xv[mt][1] = v.y;
  }
}

__device__ __forceinline__ u32 smem_addr(const void* p) {
  u32 r;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
  return r;
}
__device__ __forceinline__ void cp_async16_cg(void* dst, const void* src) {  // weights: L2 only
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16;" ::"r"(smem_addr(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(smem_addr(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async8_zfill(void* dst, const void* src, bool valid) {  // zeros if !valid
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" ::"r"(smem_addr(dst)), "l"(src), "r"(valid ? 8 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async16_cg_s(u32 dst, const void* src) {  // dst: a shared-space address
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async16_zfill_s(u32 dst, const void* src, bool valid) {  // L2 only; zeros if !valid
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async8(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(smem_addr(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Programmatic dependent launch (sm_90+). The host launches gemv's kernels with the programmatic
// stream-serialization attribute (scorer.kernels.int4._Launch, pdl=True), so each may start before the
// kernel ahead of it in the stream has finished. pdl_wait() blocks until that kernel has completed and its
// writes are visible: a kernel calls it before reading anything another kernel writes and before writing
// anything at all. gemv alone reads before it (its codes, scales and zeros, to start its stream early), so
// the host launches gemv so only behind int4_stage_x, whose own pdl_wait comes first: by the time gemv may
// start, every kernel ahead of the gather has completed. pdl_launch() lets the next such launch start now
// (its blocks then take SMs as they free up and wait in their own pdl_wait). Under a plain launch both are
// no-ops.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// ---------------------------------------------------------------------------------------------------
// Dequant a whole layer into out[N][K] (row-major: nn.Linear's weight layout, so y = F.linear(x, out)
// runs cuBLAS's TN kernels) with the K rows in *sequential* (act-order sorted) order; under act-order
// the caller gathers x's columns with the same permutation. Block (kb, nb) = (blockIdx.x, blockIdx.y):
// 64 columns x 128 rows; warp w dequantizes tile kt = 8 kb + w (one coalesced 512-byte load) into shared
// memory, then the block writes 64 rows of 256 contiguous bytes with 16-byte stores. Shared chunks are
// XOR-swizzled by row / 8 so the lanes' 8-byte writes (rows 8g + c) spread over the banks. Blocks run
// k-major (gridDim.y = Np / 64 <= 65535), so neighbouring blocks read neighbouring 4 KB of codes and extend
// the same 64 rows of out. On an H200 that is 7-10% faster than column-block-major on the large layers
// (4.0-4.1 TB/s) and within 3% either way on the 4096 x 4096 / 6144 ones (RESULTS.md, fourteenth session).
template <int DT>
__global__ void __launch_bounds__(256) int4_dequant(const uint4* __restrict__ wq, const u16* __restrict__ scales,
                                                    const u32* __restrict__ qzeros, u16* __restrict__ out, int K,
                                                    int N, int Np, int KT, int G, int gs16) {
  __shared__ uint4 tile[64 * 16];  // [n 0..63][chunk 0..15 of 8 k], chunk index ^ (n >> 3)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int kb = blockIdx.x, nb = blockIdx.y, kt = kb * 8 + warp;
  if (kt < KT) {
    const uint4 wv = ld_stream_v4(wq + ((size_t)nb * KT + kt) * 32 + lane);
    const int grp = min(kt / gs16, G - 1);
    const int n0 = nb * 64 + 8 * g;
    const uint4 sv = ld_v4(scales + (size_t)grp * Np + n0);
    const u32 zv = ld_u32(qzeros + (size_t)grp * (Np >> 3) + (n0 >> 3));
    const int chunk = 2 * warp + (t >> 1);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const u32 w = word(wv, j);
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        const int c = 2 * j + p;
        const u32 zz = zero2<DT>(zv, c), ss = scale2(sv, c);
        // register p: (k = 4t, 4t+1) of column c; register 2 + p: (k = 4t+2, 4t+3)
        uint2 v = make_uint2(dq<DT>(w, p, zz, ss), dq<DT>(w, 2 + p, zz, ss));
        const int row = 8 * g + c;
        *reinterpret_cast<uint2*>(reinterpret_cast<char*>(&tile[row * 16 + (chunk ^ g)]) + 8 * (t & 1)) = v;
      }
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int idx = threadIdx.x + 256 * i;
    const int row = idx >> 4, ch = idx & 15;
    const int n = nb * 64 + row, k = kb * 128 + ch * 8;
    if (n < N && k < K) st_v4(out + (size_t)n * K + k, tile[row * 16 + (ch ^ (row >> 3))]);
  }
}

// ---------------------------------------------------------------------------------------------------
// Act-order layers: dequant into out[K][N] (row-major W, rows scattered back to their input order:
// row = perm[k]), for y = x @ out (cuBLAS NN) with no gather of x. One warp per (nb, kt) tile: a
// 512-byte coalesced load, and per lane 4 rows x 16-byte stores (8 adjacent columns).
template <int DT, bool ACT>
__global__ void __launch_bounds__(256) int4_dequant_rows(const uint4* __restrict__ wq, const u16* __restrict__ scales,
                                                    const u32* __restrict__ qzeros, const int* __restrict__ perm,
                                                    u16* __restrict__ out, int K, int N, int Np, int KT, int G,
                                                    int gs16, int units) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int unit = blockIdx.x * 8 + (threadIdx.x >> 5);
  if (unit >= units) return;
  const int nb = unit / KT, kt = unit - nb * KT;
  const int n0 = nb * 64 + 8 * g;
  const int k0 = kt * 16 + 4 * t;
  if (n0 >= N || k0 >= K) return;  // padding: K % 4 == 0 and N % 8 == 0, so all 4 rows / 8 columns agree
  const uint4 wv = ld_stream_v4(wq + (size_t)unit * 32 + lane);
  const int grp = min(kt / gs16, G - 1);
  const uint4 sv = ld_v4(scales + (size_t)grp * Np + n0);
  const u32 zv = ld_u32(qzeros + (size_t)grp * (Np >> 3) + (n0 >> 3));
  int rows[4];
  if constexpr (ACT) {
    const uint4 pr = ld_v4(perm + k0);
    rows[0] = (int)pr.x; rows[1] = (int)pr.y; rows[2] = (int)pr.z; rows[3] = (int)pr.w;
  } else {
    rows[0] = k0; rows[1] = k0 + 1; rows[2] = k0 + 2; rows[3] = k0 + 3;
  }
  u32 d[4][4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const int c = 2 * j + (s & 1);
      d[j][s] = dq<DT>(word(wv, j), s, zero2<DT>(zv, c), scale2(sv, c));
    }
  }
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const u32 sel = (kk & 1) ? 0x7632u : 0x5410u;  // high or low halves of (d[s0], d[s0 + 1])
    const int s0 = (kk >> 1) * 2;
    uint4 o;
    o.x = __byte_perm(d[0][s0], d[0][s0 + 1], sel);
    o.y = __byte_perm(d[1][s0], d[1][s0 + 1], sel);
    o.z = __byte_perm(d[2][s0], d[2][s0 + 1], sel);
    o.w = __byte_perm(d[3][s0], d[3][s0 + 1], sel);
    st_v4(out + (size_t)rows[kk] * N + n0, o);
  }
}

// ---------------------------------------------------------------------------------------------------
// Fused y[M][N] = x[M][K] @ W + bias for M <= 8 * MT, fp32 accumulation on the tensor cores; x's
// columns already in sequential order (the caller gathers them under act-order).
// mma.m16n8k16 with A = W^T (16 output columns x 16 k) and B = x^T (16 k x 8 rows of x): MT tiles of
// 8 rows. Grid (Np / 64, KS): block (nb, ks) owns 64 columns and the ks-th slice of the row blocks,
// split further over its KW warps. Each lane streams its own operands (16 B codes, 16 B scales, 4 B
// zeros, 8 B of x per row tile) through an S-stage cp.async ring in shared memory, so S row blocks
// are in flight per warp without holding registers. Warps reduce through shared memory in a fixed
// order; with KS > 1 each block writes its partial to ws[ks] and the last block to arrive (atomic
// counter) sums the KS partials in order ks = 0..KS-1 and resets the counter: deterministic, one launch.
#ifndef INT4_SMALL_WARPS
#define INT4_SMALL_WARPS 8  // (tuning hooks: NVRTC -D options; scorer.kernels.int4 mirrors the defaults)
#endif
#ifndef INT4_SMALL_STAGES
#define INT4_SMALL_STAGES 8
#endif
template <int MT> struct Cfg {
  static constexpr int KW = MT <= 2 ? INT4_SMALL_WARPS : 4;  // warps per block
  static constexpr int S = MT <= 2 ? INT4_SMALL_STAGES : 6;  // pipeline stages per warp
  static constexpr int STAGE = 32 * (16 + 16 + 4 + 8 * MT);             // bytes per warp and stage
  static constexpr int PIPE = KW * S * STAGE;
  static constexpr int RED = KW * MT * 8 * 65 * 4;                      // reduction tiles (fp32)
  static constexpr int SMEM = PIPE > RED ? PIPE : RED;
};

template <int DT, int MT>
__global__ void __launch_bounds__(Cfg<MT>::KW * 32)
    int4_gemm_small(const u16* __restrict__ x, const uint4* __restrict__ wq, const u16* __restrict__ scales,
                    const u32* __restrict__ qzeros, const u16* __restrict__ bias, u16* __restrict__ y,
                    float* __restrict__ ws, int* __restrict__ counters, int M, int K, int N, int Np, int KT, int G,
                    int gs16, int ktpb) {
  using C = Cfg<MT>;
  constexpr int KW = C::KW, S = C::S, NT = KW * 32;
  constexpr int ROW = 65;             // reduction row stride in floats (64 columns + 1)
  constexpr int TILE = MT * 8 * ROW;  // one warp's partial tile
  extern __shared__ uint4 dyn[];
  __shared__ int s_last;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int nb = blockIdx.x, ks = blockIdx.y, KS = gridDim.y;
  const int kb0 = ks * ktpb, kb1 = min(KT, kb0 + ktpb);
  const int per_w = (kb1 - kb0 + KW - 1) / KW;
  const int beg = kb0 + warp * per_w, end = min(kb1, beg + per_w);
  const int ncol = nb * 64 + 8 * g;  // this lane's 8 columns (padded space)

  // this warp's ring: S stages of [w: 32 x uint4][s: 32 x uint4][z: 32 x u32][x: MT x 32 x uint2]
  char* ring = reinterpret_cast<char*>(dyn) + warp * S * C::STAGE;
  const uint4* wbase = wq + (size_t)nb * KT * 32 + lane;

  auto issue = [&](int k, int slot) {
    char* st = ring + slot * C::STAGE;
    cp_async16_cg(st + 16 * lane, wbase + (size_t)k * 32);
    const int grp = min(k / gs16, G - 1);
    cp_async16(st + 512 + 16 * lane, scales + (size_t)grp * Np + ncol);
    cp_async4(st + 1024 + 4 * lane, qzeros + (size_t)grp * (Np >> 3) + (ncol >> 3));
    const int k0 = k * 16 + 4 * t;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int row = mt * 8 + g;
      const bool ok = row < M && k0 < K;
      cp_async8_zfill(st + 1152 + mt * 256 + 8 * lane, ok ? (const void*)(x + (size_t)row * K + k0) : (const void*)x,
                      ok);
    }
  };

  float acc[4][MT][4];
  zero_acc<MT>(acc);

  int cur = -1;
  u32 ss[8], zz[8];
#pragma unroll
  for (int c = 0; c < 8; ++c) ss[c] = zz[c] = 0u;

#pragma unroll
  for (int i = 0; i < S - 1; ++i) {
    if (beg + i < end) issue(beg + i, i);
    cp_async_commit();
  }
  for (int k = beg, i = 0; k < end; ++k, ++i) {
    cp_async_wait<S - 2>();  // this lane's copies for row block k have landed (each lane reads only its own)
    if (k + S - 1 < end) issue(k + S - 1, (i + S - 1) % S);
    cp_async_commit();
    const char* st = ring + (i % S) * C::STAGE;
    const int grp = min(k / gs16, G - 1);
    if (grp != cur) {  // warp-uniform: per-column scale and zero pairs of the new group
      cur = grp;
      const uint4 sv = *reinterpret_cast<const uint4*>(st + 512 + 16 * lane);
      const u32 zv = *reinterpret_cast<const u32*>(st + 1024 + 4 * lane);
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        ss[c] = scale2(sv, c);
        zz[c] = zero2<DT>(zv, c);
      }
    }
    const uint4 wv = *reinterpret_cast<const uint4*>(st + 16 * lane);
    u32 xb[MT][2];
    lds_x<MT>(st + 1152, lane, xb);
    tile_mma<DT, MT>(acc, wv, xb, zz, ss);
  }
  cp_async_wait<0>();
  __syncthreads();  // the rings are reused as the reduction tiles below

  // C fragment: acc[j][mt] = {y[m][n], y[m+1][n], y[m][n+1], y[m+1][n+1]}, m = 8mt + 2t, n = 8g + 2j.
  float* red = reinterpret_cast<float*>(dyn);
  float* mine = red + warp * TILE;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int m = mt * 8 + 2 * t, n = 8 * g + 2 * j;
      mine[m * ROW + n] = acc[j][mt][0];
      mine[(m + 1) * ROW + n] = acc[j][mt][1];
      mine[m * ROW + n + 1] = acc[j][mt][2];
      mine[(m + 1) * ROW + n + 1] = acc[j][mt][3];
    }
  }
  __syncthreads();

  constexpr int ITEMS = MT * 8 * 8;  // (row m, 8 adjacent columns)
  if (KS > 1) {
    for (int it = threadIdx.x; it < ITEMS; it += NT) {
      const int m = it >> 3, c8 = (it & 7) * 8;
      if (m >= M) continue;
      float s[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) s[i] = 0.f;
#pragma unroll
      for (int w = 0; w < KW; ++w)
#pragma unroll
        for (int i = 0; i < 8; ++i) s[i] += red[w * TILE + m * ROW + c8 + i];
      float* dst = ws + ((size_t)ks * M + m) * Np + nb * 64 + c8;
      st_f4(dst, make_float4(s[0], s[1], s[2], s[3]));
      st_f4(dst + 4, make_float4(s[4], s[5], s[6], s[7]));
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) s_last = (atomicAdd(counters + nb, 1) == KS - 1);
    __syncthreads();
    if (!s_last) return;
    __threadfence();
  }
  for (int it = threadIdx.x; it < ITEMS; it += NT) {
    const int m = it >> 3, c8 = (it & 7) * 8, n = nb * 64 + c8;
    if (m >= M || n >= N) continue;
    float s[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) s[i] = 0.f;
    if (KS > 1) {
      for (int k2 = 0; k2 < KS; ++k2) {
        const float* src = ws + ((size_t)k2 * M + m) * Np + n;
        const float4 a = ld_cg_f4(src), b = ld_cg_f4(src + 4);
        s[0] += a.x; s[1] += a.y; s[2] += a.z; s[3] += a.w;
        s[4] += b.x; s[5] += b.y; s[6] += b.z; s[7] += b.w;
      }
    } else {
#pragma unroll
      for (int w = 0; w < KW; ++w)
#pragma unroll
        for (int i = 0; i < 8; ++i) s[i] += red[w * TILE + m * ROW + c8 + i];
    }
    if (bias != nullptr) {
      const uint4 bv = ld_v4(bias + n);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const u32 b2 = word(bv, i);
        s[2 * i] += half_f32<DT>(b2, 0);
        s[2 * i + 1] += half_f32<DT>(b2, 1);
      }
    }
    uint4 o;
    o.x = pack2<DT>(s[0], s[1]);
    o.y = pack2<DT>(s[2], s[3]);
    o.z = pack2<DT>(s[4], s[5]);
    o.w = pack2<DT>(s[6], s[7]);
    st_v4(y + (size_t)m * N + n, o);
  }
  if (KS > 1 && threadIdx.x == 0) counters[nb] = 0;  // ready for the next launch on this stream
}


// ---------------------------------------------------------------------------------------------------
// The fused kernels' input where it must be staged: xs[m][k] = x[m][perm[k]] (act-order; x[m][k] without
// perm) for k < K and zero for K <= k < Kp, x's rows K apart and xs's Kp apart (K and Kp multiples of 8, x
// and perm 16-byte aligned: Int4Weight.check and the wrappers). 8 columns a thread, one 16-byte store; one
// launch instead of torch's index_select (+ pad and copy). The 8 perm entries come in two 16-byte loads,
// then all 8 gathers are in flight at once: two round trips. (Loaded a pair at a time, each gather behind
// its own perm load, it was 8 dependent round trips: ~3 us for a few KB.)
__global__ void int4_stage_x(const u16* __restrict__ x, const int* __restrict__ perm, u16* __restrict__ xs,
                             int K, int Kp) {
  pdl_wait();    // x is the kernel ahead's output; xs may still be read by a kernel ahead
  pdl_launch();  // gemv may start its weight stream now (it waits for xs in its own pdl_wait)
  const int c8 = (blockIdx.x * blockDim.x + threadIdx.x) * 8, m = blockIdx.y;
  if (c8 >= Kp) return;
  const u16* xr = x + (size_t)m * K;
  uint4 o = make_uint4(0u, 0u, 0u, 0u);
  if (c8 < K) {  // all 8 columns are in K
    if (perm == nullptr) {
      o = ld_v4(xr + c8);
    } else {
      const uint4 p0 = ld_v4(perm + c8), p1 = ld_v4(perm + c8 + 4);
      u32 h[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        h[i] = ld_u16(xr + word(p0, i));
        h[4 + i] = ld_u16(xr + word(p1, i));
      }
      o = make_uint4(h[0] | (h[1] << 16), h[2] | (h[3] << 16), h[4] | (h[5] << 16), h[6] | (h[7] << 16));
    }
  }
  st_v4(xs + (size_t)m * Kp + c8, o);
}


// ---------------------------------------------------------------------------------------------------
// Streaming fused GEMM for M <= 8 * MT rows (MT 1 or 2: m <= 16), where a layer is memory-bound:
// y[M][N] = x[M][K] @ W + bias, x's columns in sequential order, rows ldx = Kp apart, zero in K..Kp.
// Stream-K: the tiles of every column block, in memory order (nb, kt), are cut into equal contiguous
// chunks of `chunk` tiles, one per warp of a single wave, so every warp streams the same bytes and no
// SM idles in a tail. A warp keeps S tiles of codes (16 B per lane) and their x fragments (8 B per lane
// and row tile) in flight in a shared-memory ring (or D of them in registers, GEMV_RING 0) and loads the
// next group's scales and zeros while the current group runs. Per tile: one 16-byte copy, q - z of each
// code (fp16: the nibbles at bits 4..7 stay in place as 1024 + 16q and one fma by 1/16 takes off the zero,
// so one shift per word; bf16: one shift per nibble pair), MT x 4 mma.m16n8k16 with fp32 accumulation,
// and the scales applied to the fp32 sums at each group's end (GEMV_FOLD, below).
// Each column block a warp finishes (or leaves, at its chunk's end) is a "piece": its fp32 partial goes
// to ws[nb][piece]; int4_gemv_fix, a second launch with one thread per output pair, sums them in piece
// order (deterministic), adds the bias and writes y. (Summing inline, by the last warp of a column block to
// arrive, was measured twice: one warp's serial sums of up to 33 pieces cost more than the extra launch,
// and with 16 loads in flight it was within 1.5 us of the launch at m <= 4 and slower at m >= 8 and on the
// large layers, where fences and a ticket's round trip replace a launch that a graph overlaps with this
// one's tail: RESULTS.md, twelfth session.)
#ifndef GEMV_WARPS
#define GEMV_WARPS 4  // warps per block (scorer.kernels.int4 mirrors it)
#endif
// Defaults from benchmarks/gemv_sweep.py on an H200 (benchmarks/RESULTS.md). The warps are latency-bound
// (ncu on the register ring: ~60% of cycles on long scoreboard at 25% occupancy), so the tiles in flight
// live in a 12-stage shared-memory ring per warp, filled by cp.async (or a bulk-copy ring, below). With
// the scales folded, 4 blocks a SM at m <= 8 and 3 at m <= 16 stream faster than 5 or 6 and 4.
#ifndef GEMV_RING
#define GEMV_RING 1  // the default ring R of int4_gemv<DT, MT, R>: 0 registers, 1 cp.async, 2 bulk copies
#endif
#ifndef GEMV_D1
#define GEMV_D1 4  // register ring: tiles in flight per warp, m <= 8
#endif
#ifndef GEMV_D2
#define GEMV_D2 4  // the same, m <= 16
#endif
#ifndef GEMV_S1
#define GEMV_S1 12  // shared-memory ring: stages per warp, m <= 8 (4 warps x 12 x 768 B = 36 KB a block)
#endif
#ifndef GEMV_S2
#define GEMV_S2 12  // m <= 16 (4 x 12 x 1024 B = 48 KB, the static limit)
#endif
#ifndef GEMV_B1
#define GEMV_B1 4  // blocks per SM the launch bounds ask registers for, m <= 8 (eleventh session: 4 of 4..6)
#endif
#ifndef GEMV_B2
#define GEMV_B2 3  // m <= 16 (3 of 2..4)
#endif
#ifndef GEMV_T
#define GEMV_T 1  // shared-memory ring: tiles a cp.async group (a burst of T * 512 contiguous bytes)
#endif
#ifndef GEMV_PF
#define GEMV_PF 0  // > 0: also prefetch into L2 the tile this many ahead of the one being fetched
#endif
// Ring 2 (sm_90+: the bulk copy engine): each warp's chunk of tiles is contiguous in memory, so lane 0
// copies it T3 tiles (T3 * 512 bytes) at a time into an S3-stage ring with one cp.async.bulk per stage,
// completing on that stage's mbarrier; x fragments come from L1/L2 in registers, loaded before the stage's
// wait. On the H200 it streams large layers 10-25% faster than ring 1 and small ones about as fast
// (gemv_sweep.py), so the host times both on each layer shape once and keeps the faster
// (scorer.kernels.int4.gemv_ring). Measured and not kept (RESULTS.md, thirteenth session): rings past the
// 48 KB static limit in dynamic shared memory with 2-4 blocks a SM (slower: more warps, not deeper rings,
// feed this stream), tiles interleaved across warps so the wave reads as a sweep (no faster), a block's
// warps on one k range so x comes from L1 (slower), and the zero point taken out of the dequant (~25%
// fewer instructions, no faster: the stream is not issue-bound). Fourteenth session: a chunk a block of 4
// warps, one wgmma.m64nNk16 (sm_90a, A from registers: warp w dequantizes word w) a tile, x in shared
// memory. Correct and bit-identical to ring 1 where the pieces coincide, but 1.2-2.1x slower, and 2.3x
// slower on the largest layer even with the wgmma left out: four lockstep warps on one tile repeat its
// bookkeeping and add a block barrier a stage: several times this ring's instructions a tile.
#ifndef GEMV_S3
#define GEMV_S3 2  // bulk-copy ring: stages per warp, m <= 8 (4 warps x 2 x 8 x 512 B = 32 KB a block)
#endif
#ifndef GEMV_T3
#define GEMV_T3 8  // bulk-copy ring: tiles a stage, m <= 8 (of 2x8, 2x10, 3x6, 4x4, 8x2: 2x8 fastest)
#endif
#ifndef GEMV_S3_16
#define GEMV_S3_16 3  // the same, m <= 16 (4 x 3 x 6 x 512 B = 36 KB a block)
#endif
#ifndef GEMV_T3_16
#define GEMV_T3_16 6
#endif
// GEMV_FOLD 1: the dequant leaves the scale out (A = q - z, exact in fp16 and bf16), and the mma's fp32
// sums of one group are scaled once, at the group's end, per output column: 4 fewer instructions per code
// word (a quarter of a tile's), so the warps' issue slots stop hiding the stream. On the H200 this was
// 8192x57344 at m = 1 77 -> 70 us, 2-9% elsewhere (RESULTS.md, eleventh session). The weights are then
// not rounded to fp16/bf16 before the product, so y is off the reference's (dequant, then matmul) by about
// that rounding: relative error 2.8e-4 against 2.1e-4 at fp16. 0: s * (q - z) rounded once before the
// mma, as int4_dequant. Neither is bit-identical to dequant + cuBLAS (whose sums run in another order).
#ifndef GEMV_FOLD
#define GEMV_FOLD 1
#endif
#ifndef GEMV_XAHEAD
#define GEMV_XAHEAD 0  // bulk-copy ring: 1 loads the next stage's x fragments a stage ahead (more registers)
#endif
#ifndef GEMV_HINT
#define GEMV_HINT 1  // 1: the bulk copies carry an L2 evict-first hint (codes are read once): 1-4% faster
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define GEMV_BULK 0  // no bulk copy engine before sm_90: ring 2 builds as ring 1 there
#else
#define GEMV_BULK 1
#endif
template <int MT> struct GemvCfg {
  static constexpr int D = MT == 1 ? GEMV_D1 : GEMV_D2;
  static constexpr int B = MT == 1 ? GEMV_B1 : GEMV_B2;
  static constexpr int S = MT == 1 ? GEMV_S1 : GEMV_S2;
  static constexpr int S3 = MT == 1 ? GEMV_S3 : GEMV_S3_16, T3 = MT == 1 ? GEMV_T3 : GEMV_T3_16;
  static constexpr int PIECE = MT * 8 * 64;  // floats of one partial: [8 MT rows][64 columns]
};
static constexpr u32 ONE16 = 0x2C002C00u;  // fp16 1/16 in each half

// (a & b) | c in one instruction: LUT = (0xF0 & 0xCC) | 0xAA
__device__ __forceinline__ u32 and_or(u32 a, u32 mask, u32 magic) {
  u32 d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(mask), "r"(magic));
  return d;
}

// Sum of pieces 0..pieces-1 of V (2 or 4) floats, in piece order, F loads in flight at a time (the adds run
// in the same order whatever F is: the same bits).
template <int V, int F> __device__ __forceinline__ float4 sum_pieces(const float* p0, int pieces, int stride) {
  float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int p = 0; p < pieces; p += F) {
    float4 v[F];
#pragma unroll
    for (int i = 0; i < F; ++i) {
      v[i] = make_float4(0.f, 0.f, 0.f, 0.f);
      if (p + i < pieces) {
        const float* q = p0 + (size_t)(p + i) * stride;
        if constexpr (V == 4) {
          v[i] = ld_cg_f4(q);
        } else {
          const float2 h = ld_cg_f2(q);
          v[i].x = h.x;
          v[i].y = h.y;
        }
      }
    }
#pragma unroll
    for (int i = 0; i < F; ++i) {
      s.x += v[i].x;
      s.y += v[i].y;
      s.z += v[i].z;
      s.w += v[i].w;
    }
  }
  return s;
}

template <int DT> __device__ __forceinline__ void store_pair(u16* y, const u16* bias, int n, float2 v) {
  if (bias != nullptr) {
    const u32 bb = ld_u32(bias + n);
    v.x += half_f32<DT>(bb, 0);
    v.y += half_f32<DT>(bb, 1);
  }
  st_u32(y, pack2<DT>(v.x, v.y));
}

// The fix-up: one thread per (column block, row pair p, column pair) of gemv's pieces, all in parallel: the
// 4 floats at 4 r = 4 (32 p + 8 j + g) of each piece (see gemv's flush), rows 2p and 2p + 1 of columns
// 8g + 2j and 8g + 2j + 1; where 2p + 1 is past M, the 2 floats of row 2p at 128 p + 2 (8 j + g).
// F: the pieces a thread sums at a time (all F loads in flight, then F adds, in piece order: the same bits for
// every F). ptxas keeps a loop's loads in flight only when the launch bounds leave it the registers: under
// __launch_bounds__(256) alone it aims at 32 registers and puts the adds between the loads (~3 in flight
// whatever F is; cuobjdump -sass), the most blocks a SM, which suits layers whose column blocks have few
// pieces. With a minimum of 1 block it keeps all 16 of F = 16 in flight (80 registers) for the layers with
// many (the host picks F by pmax: scorer.kernels.int4.gemv_fix_depth).
template <int DT, int MT, int F>
__global__ void __launch_bounds__(256, F > 8 ? 1 : 0)
    int4_gemv_fix(const float* __restrict__ ws, const u16* __restrict__ bias, u16* __restrict__ y, int M, int N,
                  int Np, int KT, int chunk, int pmax) {
  pdl_wait();  // the pieces are gemv's output
  constexpr int PIECE = GemvCfg<MT>::PIECE;
  const int per_nb = (M + 1) / 2 * 32;
  const int idx = blockIdx.x * blockDim.x + threadIdx.x, nb = idx / per_nb, r = idx - nb * per_nb;
  if (nb >= (Np >> 6)) return;
  const int m = 2 * (r >> 5), n = nb * 64 + 8 * (r & 7) + 2 * ((r >> 3) & 3);
  if (n >= N) return;
  const int w_lo = (nb * KT) / chunk, pieces = ((nb + 1) * KT - 1) / chunk - w_lo + 1;
  const bool pair = m + 1 < M;
  const float* p0 = ws + (size_t)nb * pmax * PIECE + (pair ? 4 * r : 128 * (r >> 5) + 2 * (r & 31));
  if (pair) {
    const float4 s = sum_pieces<4, F>(p0, pieces, PIECE);
    store_pair<DT>(y + (size_t)m * N + n, bias, n, make_float2(s.x, s.y));
    store_pair<DT>(y + (size_t)(m + 1) * N + n, bias, n, make_float2(s.z, s.w));
  } else {
    const float4 s = sum_pieces<2, F>(p0, pieces, PIECE);
    store_pair<DT>(y + (size_t)m * N + n, bias, n, make_float2(s.x, s.y));
  }
}

__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

#if GEMV_BULK
// mbarrier and bulk-copy primitives (PTX ISA 8.0, sm_90), as CUTLASS's SM90 pipelines issue them.
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }
__device__ __forceinline__ void mbar_expect_tx(u32 bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
// Wait for the phase of the given parity to complete. Bounded: a copy that never lands traps (the launch
// fails with an error) instead of hanging the stream.
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
  for (u32 spin = 0;; ++spin) {
    u32 done;
    asm volatile(
        "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
        : "=r"(done) : "r"(bar), "r"(parity) : "memory");
    if (done) return;
    if (spin == (1u << 26)) __trap();
  }
}
__device__ __forceinline__ void bulk_g2s(u32 dst, const void* src, u32 bytes, u32 bar) {
#if GEMV_HINT
  asm volatile(
      "{ .reg .b64 pol; createpolicy.fractional.L2::evict_first.b64 pol, 1.0;\n"
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], pol; }"
      ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
#else
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
#endif
}
#else
__device__ __forceinline__ void mbar_init(u32, u32) {}
__device__ __forceinline__ void mbar_init_fence() {}
__device__ __forceinline__ void mbar_expect_tx(u32, u32) {}
__device__ __forceinline__ void mbar_wait(u32, u32) {}
__device__ __forceinline__ void bulk_g2s(u32, const void*, u32, u32) {}
#endif

template <int DT, int MT, int R = GEMV_RING>
__global__ void __launch_bounds__(GEMV_WARPS * 32, GemvCfg<MT>::B)
    int4_gemv(const u16* __restrict__ x, const uint4* __restrict__ wq, const u16* __restrict__ scales,
              const u32* __restrict__ qzeros, const u16* __restrict__ bias, u16* __restrict__ y,
              float* __restrict__ ws, int M, int ldx, int N, int Np, int KT, int G, int gs16, int chunk,
              int pmax) {
  constexpr int PIECE = GemvCfg<MT>::PIECE;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int gw = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
  const int nbk = Np >> 6, total = nbk * KT;
  const int beg = gw * chunk;
  pdl_launch();  // the fix-up may launch now: its blocks take SMs as this wave's leave, and wait there
  if (beg >= total) return;  // no block-wide barrier below: idle warps may leave
  const int end = min(total, beg + chunk);

  int nb = beg / KT, kt = beg - nb * KT;  // the tile being consumed
  // B fragments: x row 8 mt + g (rows >= M read row M - 1; their outputs are never written)
  const u16* xrow[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) xrow[mt] = x + (size_t)min(mt * 8 + g, M - 1) * ldx + 4 * t;

  // ---- group state: the current group's per-column pairs; the next group's raw words in flight
  u32 sc[8], zc[8];
  float sf[8];  // GEMV_FOLD: the scales of the lane's 8 columns, applied to each group's sums
  uint4 sv_next = make_uint4(0u, 0u, 0u, 0u);
  u32 zv_next = 0u;
  auto load_group = [&](int nb2, int g2) {
    if (nb2 < nbk) {
      sv_next = ld_v4(scales + (size_t)g2 * Np + nb2 * 64 + 8 * g);
      zv_next = ld_u32(qzeros + (size_t)g2 * (Np >> 3) + nb2 * 8 + g);
    }
  };
  auto take_group = [&]() {  // next -> current, in the form the dequant below wants
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      if constexpr (GEMV_FOLD) {
        sf[c] = half_f32<DT>(word(sv_next, c >> 1), c & 1);
      } else {
        sc[c] = scale2(sv_next, c);
      }
      const u32 z = (zv_next >> (4 * c)) & 0xFu;
      if (DT == 0 && (c & 1)) {
        zc[c] = 0xD400D400u | ((z << 4) * 0x00010001u);  // -(64 + z): for 1024 + 16q scaled by 1/16
      } else {
        zc[c] = (z * 0x00010001u) | Tr<DT>::MAGIC;  // 1024 + z (fp16) or 128 + z (bf16)
      }
    }
  };
  int grp = min(kt / gs16, G - 1);
  load_group(nb, grp);
  take_group();
  int nkt = grp + 1 < G ? (grp + 1) * gs16 : KT;  // next event: a new group, or (== KT) the block's end
  if (grp + 1 < G) load_group(nb, grp + 1); else load_group(nb + 1, 0);

  float acc[4][MT][4];  // GEMV_FOLD: the current group's sums of (q - z) x, else the column block's
  zero_acc<MT>(acc);
  float tot[4][MT][4];  // GEMV_FOLD: the column block's, each group's sums times its scales
  zero_acc<MT>(tot);
  auto fold = [&]() {  // GEMV_FOLD, at a group's end: tot += s acc, acc = 0 (elements 0, 1: column 2j; 2, 3: 2j + 1)
    if constexpr (GEMV_FOLD) {
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            tot[j][mt][r] = __fmaf_rn(sf[2 * j + (r >> 1)], acc[j][mt][r], tot[j][mt][r]);
            acc[j][mt][r] = 0.f;
          }
    }
  };
  // C fragment: acc[j][mt] = {y[m][n], y[m+1][n], y[m][n+1], y[m+1][n+1]}, m = 8mt + 2t, n = 8g + 2j.
  // A piece is [row pair p = m / 2][j][g] x {y[m][n], y[m][n+1], y[m+1][n], y[m+1][n+1]}: a lane stores 16
  // bytes, and the 8 lanes of one t fill 128 contiguous bytes. Where m + 1 is past M (the last pair of an odd
  // M) the slots are 8 bytes, {y[m][n], y[m][n+1]}, so the piece stays contiguous; nothing where m is.
  // (Stored as rows of y, each lane's 8-byte pairs of 4 rows a store, the m = 16 pieces took ~40% of a
  // small layer's stream.)
  auto flush = [&]() {  // this warp's piece of column block nb is complete
    const int w_lo = (nb * KT) / chunk;  // the first warp with a piece of column block nb
    float* mine = ws + ((size_t)nb * pmax + (gw - w_lo)) * PIECE;
    float(&res)[4][MT][4] = GEMV_FOLD ? tot : acc;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int p = mt * 4 + t;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (2 * p + 1 < M) {
          st_f4(mine + 128 * p + 4 * (8 * j + g),
                make_float4(res[j][mt][0], res[j][mt][2], res[j][mt][1], res[j][mt][3]));
        } else if (2 * p < M) {
          st_f2(mine + 128 * p + 2 * (8 * j + g), res[j][mt][0], res[j][mt][2]);
        }
#pragma unroll
        for (int r = 0; r < 4; ++r) res[j][mt][r] = 0.f;
      }
    }
  };

  // One tile: dequant (bit-exact, as int4_dequant), MT x 4 mma, then the group / column-block events.
  auto consume = [&](const uint4& wv, const u32 (&xv)[MT][2]) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const u32 w = word(wv, j);
      u32 a[4];  // q - z (exact), times s unless GEMV_FOLD
      if constexpr (DT == 0) {
        const u32 w8 = w >> 8, magic = Tr<0>::MAGIC;
        a[0] = fma2<0>(zc[2 * j], Tr<0>::NEG1, and_or(w, 0x000F000Fu, magic));
        a[1] = fma2<0>(and_or(w, 0x00F000F0u, magic), ONE16, zc[2 * j + 1]);
        a[2] = fma2<0>(zc[2 * j], Tr<0>::NEG1, and_or(w8, 0x000F000Fu, magic));
        a[3] = fma2<0>(and_or(w8, 0x00F000F0u, magic), ONE16, zc[2 * j + 1]);
      } else {
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          a[s] = fma2<1>(zc[2 * j + (s & 1)], Tr<1>::NEG1, and_or(w >> (4 * s), 0x000F000Fu, Tr<1>::MAGIC));
        }
      }
      if constexpr (!GEMV_FOLD) {
#pragma unroll
        for (int s = 0; s < 4; ++s) a[s] = fma2<DT>(a[s], sc[2 * j + (s & 1)], NEG0);
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) mma16816<DT>(acc[j][mt], a, xv[mt][0], xv[mt][1]);
    }
    if (++kt == nkt) {  // rare: a new group, or this column block's end
      fold();
      if (kt == KT) {
        flush();
        ++nb;
        kt = 0;
        grp = 0;
      } else {
        ++grp;
      }
      take_group();  // loaded while the previous group ran
      nkt = grp + 1 < G ? (grp + 1) * gs16 : KT;
      if (grp + 1 < G) load_group(nb, grp + 1); else load_group(nb + 1, 0);
    }
  };

  auto consume2 = [&](const uint4& wv, const uint2 (&xp)[MT]) {  // x fragments held as one uint2 a row tile
    u32 xv[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      xv[mt][0] = xp[mt].x;
      xv[mt][1] = xp[mt].y;
    }
    consume(wv, xv);
  };

  const uint4* wp = wq + (size_t)beg * 32 + lane;  // the next tile to fetch (all tiles are in memory order)
  const int xwrap = 16 * KT;
  int fetched = beg, xoff = 16 * kt;  // its index, and its x column offset (wraps at 16 KT)
  constexpr int RING = R == 2 && !GEMV_BULK ? 1 : R;
  if constexpr (RING == 0) {
    // ---- ring of D tiles in registers, refilled right after each is consumed
    constexpr int D = GemvCfg<MT>::D;
    uint4 wb[D];
    uint2 xb[D][MT];
    auto fetch = [&](uint4& wd, uint2 (&xd)[MT]) {
      if (fetched < end) {
        if (GEMV_PF > 0 && fetched + GEMV_PF < end) prefetch_l2(wp + GEMV_PF * 32);
        wd = ld_stream_v4(wp);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) xd[mt] = ld_v2(xrow[mt] + xoff);
        wp += 32;
        ++fetched;
        xoff += 16;
        xoff = xoff == xwrap ? 0 : xoff;
      }
    };
    pdl_wait();  // x (its fetches carry x) and ws come from kernels ahead
#pragma unroll
    for (int d = 0; d < D; ++d) fetch(wb[d], xb[d]);
    for (int i = beg; i < end; i += D) {
#pragma unroll
      for (int d = 0; d < D; ++d) {
        if (i + d < end) {
          consume2(wb[d], xb[d]);
          fetch(wb[d], xb[d]);  // refill this slot, D tiles ahead
        }
      }
    }
  } else if constexpr (RING == 2) {
    // ---- ring of S3 stages of T3 tiles per warp, each filled by one bulk copy that lane 0 issues
    constexpr int S = GemvCfg<MT>::S3, T = GemvCfg<MT>::T3, TS = T * 32;  // uint4 a stage
    static_assert(S >= 2 && T >= 1 && S <= 32, "the bulk-copy ring holds 2 to 32 stages");
    __shared__ __align__(128) uint4 ring_all[GEMV_WARPS * S * TS];
    __shared__ __align__(8) unsigned long long bar_all[GEMV_WARPS * S];
    const int wid = threadIdx.x >> 5;
    const uint4* ring = ring_all + wid * S * TS;
    const u32 ring0 = smem_addr(ring), bar0 = smem_addr(bar_all + wid * S);
    int issued = beg;  // the next tile to copy
    auto issue = [&](int st) {  // lane 0: the next stage's tiles into slot st
      if (issued < end) {
        const u32 bytes = (u32)min(T, end - issued) * 512u;
        mbar_expect_tx(bar0 + 8 * st, bytes);
        bulk_g2s(ring0 + st * TS * 16, wq + (size_t)issued * 32, bytes, bar0 + 8 * st);
        issued += T;
      }
    };
    if (lane == 0) {
      for (int st = 0; st < S; ++st) mbar_init(bar0 + 8 * st, 1);
      mbar_init_fence();
      for (int st = 0; st < S; ++st) issue(st);
    }
    __syncwarp();
    pdl_wait();  // the codes, scales and zeros are already streaming; x and ws come from kernels ahead
    uint2 xn[T][MT];  // the next stage's x fragments (x offsets wrap inside the row: always in bounds)
    auto load_x = [&]() {
#pragma unroll
      for (int u = 0; u < T; ++u) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) xn[u][mt] = ld_v2(xrow[mt] + xoff);
        xoff += 16;
        xoff = xoff == xwrap ? 0 : xoff;
      }
    };
    if constexpr (GEMV_XAHEAD) load_x();
    u32 phase = 0u;  // bit st: the parity of slot st's next completion
    int st = 0;
    for (int i = beg; i < end; i += T) {
      uint2 xc[T][MT];
      if constexpr (!GEMV_XAHEAD) load_x();
#pragma unroll
      for (int u = 0; u < T; ++u)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) xc[u][mt] = xn[u][mt];
      if constexpr (GEMV_XAHEAD) load_x();
      mbar_wait(bar0 + 8 * st, (phase >> st) & 1u);
      phase ^= 1u << st;
      const uint4* sp = ring + st * TS + lane;
#pragma unroll
      for (int u = 0; u < T; ++u) {
        if (i + u < end) {
          consume2(sp[u * 32], xc[u]);
        }
      }
      __syncwarp();  // every lane has read slot st
      if (lane == 0) issue(st);
      st = st + 1 == S ? 0 : st + 1;
    }
  } else {
    // ---- ring of S tiles per warp in shared memory, filled by cp.async: each lane copies and later reads
    // only its own 16 bytes of codes and 8 bytes of x per row tile, so its own wait_group is the only sync
    constexpr int S = GemvCfg<MT>::S, STAGE = 32 * (16 + 8 * MT);
    __shared__ __align__(16) char ring_all[GEMV_WARPS * S * STAGE];
    char* ring = ring_all + (threadIdx.x >> 5) * S * STAGE;
    // Tiles go in bursts of T contiguous ones (T * 512 bytes of codes) as one cp.async group each; NB bursts
    // make the ring (S = T * NB). T = 1: one tile a group, refilled as each is consumed.
    constexpr int T = GEMV_T, NB = S / T;
    static_assert(S % T == 0 && NB >= 2, "the shared-memory ring holds at least two bursts");
    auto issue_burst = [&](int first_slot) {
#pragma unroll
      for (int u = 0; u < T; ++u) {
        if (fetched < end) {
          if (GEMV_PF > 0 && fetched + GEMV_PF < end) prefetch_l2(wp + GEMV_PF * 32);
          char* st = ring + (first_slot + u) * STAGE;
          cp_async16_cg(st + 16 * lane, wp);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) cp_async8(st + 512 + mt * 256 + 8 * lane, xrow[mt] + xoff);
          wp += 32;
          ++fetched;
          xoff += 16;
          xoff = xoff == xwrap ? 0 : xoff;
        }
      }
      cp_async_commit();  // an empty group past the end keeps the count uniform
    };
    pdl_wait();  // x (its bursts carry x) and ws come from kernels ahead
#pragma unroll
    for (int bu = 0; bu < NB - 1; ++bu) issue_burst(bu * T);
    int slot = 0, burst = 0;  // the tile's slot, and its burst's
    for (int i = beg; i < end; ++i) {
      if (slot == burst * T) {  // the first tile of a burst
        cp_async_wait<NB - 2>();  // this lane's copies of this burst have landed
        issue_burst((burst == 0 ? NB - 1 : burst - 1) * T);  // NB - 1 bursts ahead, where the last one was
      }
      const char* st = ring + slot * STAGE;
      const uint4 wv = *reinterpret_cast<const uint4*>(st + 16 * lane);
      u32 xv[MT][2];
      lds_x<MT>(st + 512, lane, xv);
      consume(wv, xv);
      if (++slot == S) slot = 0;
      if (slot == burst * T + T || slot == 0) burst = slot / T;
    }
    cp_async_wait<0>();
  }
  if (kt != 0) {  // the chunk ended inside a column block
    fold();
    flush();
  }
}


// ---------------------------------------------------------------------------------------------------
// Mid-size m (17 .. MID_MAX_M rows in scorer.kernels.int4): too many rows for gemm_small, whose blocks
// each re-read all of x for one column block (8192x57344 at m = 64 reads ~0.9 GB of x from L2), too
// few for the dequant pass to hide behind cuBLAS. y[M][N] = x[M][K] @ W + bias with the dequant in the
// mainloop. Block tile BM = 8 MID_MT MID_WM rows x BN = 64 MID_WN columns (built: 128 x 128, four warps);
// warp (wm, wn) owns 8 MID_MT rows of column block nb = MID_WN blockIdx.x + wn, with int4_gemm_small's
// fragments: A = W^T from one 16-byte code word per lane and tile, B = x^T from 8 bytes per lane and row
// tile. The block's stages live in shared memory, filled by cp.async from every thread (a thread's 16-byte
// copies are the same in every stage, so their fixed parts are computed once), MID_KB tiles (16 k each) a
// stage, MID_S stages: the codes of the MID_WN column blocks (512 contiguous bytes a tile, as in global)
// and x of the BM rows as [tile][row][32 bytes], so a row tile's fragments are 256 contiguous bytes (the
// lds_x layout, conflict-free). Rows past M and k past K are zero-filled: x = 0 is what keeps padding out
// (a code of 0 dequantizes to -z * s); row tiles wholly past M skip their MMAs. Scales and zeros of the
// next group are loaded a group ahead into registers. Split-K over gridDim.z (slices of ktpb row blocks):
// each block writes its fp32 tile to ws[ks] (16-byte stores: a thread's 8 columns are adjacent) and the
// last of an output tile's blocks to arrive (counter per tile) sums ws[0 .. KS-1] in that order, all of a
// slice's loads in flight at once: deterministic, one launch.
// Correct on an H200 but slower than dequant + cuBLAS or gemm_small everywhere measured (RESULTS.md,
// ninth session: its staging and split-K fix-up, not its arithmetic), so scorer.kernels.int4 leaves it
// out unless MID_ENABLED.
#ifndef MID_WM
#define MID_WM 2  // (scorer.kernels.int4 mirrors these)
#endif
#ifndef MID_MT
#define MID_MT 8  // row tiles of 8 a warp: BM = 8 MID_MT MID_WM rows a block
#endif
#ifndef MID_MINB
#define MID_MINB 2  // blocks a SM the launch bounds ask registers for
#endif
#ifndef MID_WN
#define MID_WN 2
#endif
#ifndef MID_KB
#define MID_KB 4
#endif
#ifndef MID_S
#define MID_S 4
#endif
struct MidCfg {
  static constexpr int WM = MID_WM, WN = MID_WN, KB = MID_KB, S = MID_S, MT = MID_MT;
  static constexpr int NT = WM * WN * 32;
  static constexpr int BM = WM * 8 * MT, BN = WN * 64;
  static constexpr int CODES = WN * KB * 512;  // bytes of a stage's codes
  static constexpr int XB = KB * BM * 32;      // bytes of a stage's x
  static constexpr int STAGE = CODES + XB;
  static constexpr int SMEM = S * STAGE;
  static constexpr int CC = WN * KB * 32 / NT, XC = KB * BM * 2 / NT;  // 16-byte copies a thread: codes, x
  static_assert(CC * NT == WN * KB * 32 && XC * NT == KB * BM * 2, "a stage's copies split evenly over threads");
  static_assert(MT % 2 == 0, "the split-K sum loads half the row tiles at a time");
};

// A thread's 8 adjacent columns of one row, with bias, as one 16-byte store.
template <int DT> __device__ __forceinline__ void store_row8(u16* y, const float (&v)[8], const float (&b)[8]) {
  uint4 o;
  o.x = pack2<DT>(v[0] + b[0], v[1] + b[1]);
  o.y = pack2<DT>(v[2] + b[2], v[3] + b[3]);
  o.z = pack2<DT>(v[4] + b[4], v[5] + b[5]);
  o.w = pack2<DT>(v[6] + b[6], v[7] + b[7]);
  st_v4(y, o);
}

// Row d (0, 1) of row tile mt of the accumulators, as the 8 columns 8g .. 8g+7 in order:
// acc[j][mt] = {y[m][n], y[m+1][n], y[m][n+1], y[m+1][n+1]}, n = 8g + 2j.
template <int MT> __device__ __forceinline__ void row8(const float (&acc)[4][MT][4], int mt, int d, float (&v)[8]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    v[2 * j] = acc[j][mt][d];
    v[2 * j + 1] = acc[j][mt][2 + d];
  }
}

template <int DT>
__global__ void __launch_bounds__(MidCfg::NT, MID_MINB)
    int4_gemm_mid(const u16* __restrict__ x, const uint4* __restrict__ wq, const u16* __restrict__ scales,
                  const u32* __restrict__ qzeros, const u16* __restrict__ bias, u16* __restrict__ y,
                  float* __restrict__ ws, int* __restrict__ counters, int M, int K, int ldx, int N, int Np,
                  int KT, int G, int gs16, int ktpb) {
  using C = MidCfg;
  constexpr int MT = C::MT, KB = C::KB, S = C::S, WN = C::WN, WR = 8 * MT;  // WR: a warp's rows
  extern __shared__ uint4 dyn[];
  __shared__ int s_last;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int wn = warp % WN, wm = warp / WN;
  const int NB = Np >> 6;
  const int nb0 = blockIdx.x * WN, m0 = blockIdx.y * C::BM;
  const int ks = blockIdx.z, KS = gridDim.z;
  const int kb0 = ks * ktpb, kb1 = min(KT, kb0 + ktpb);
  const int nb = nb0 + wn;
  const int mw = m0 + wm * WR;  // this warp's first row
  const bool active = nb < NB && mw < M;  // warp-uniform: a column block past Np, or rows all past M
  const int mts = min(MT, (M - mw + 7) >> 3);  // row tiles with a real row (when active)
  const int ncol = nb * 64 + 8 * g;

  // This thread's copies of a stage: CC code chunks (copy c: column block c / (KB 32), tile c / 32 % KB,
  // chunk c % 32) and XC of x (tile c / (2 BM), row c / 2 % BM, half c % 2), c = tid + i NT; the
  // per-copy parts that do not change from stage to stage are computed once.
  const u32 sbase = smem_addr(dyn);
  const uint4* csrc[C::CC];
  u32 cdst[C::CC];
  int ckk[C::CC];
  bool cok[C::CC];
#pragma unroll
  for (int i = 0; i < C::CC; ++i) {
    const int c = tid + i * C::NT, w = c / (KB * 32), kk = (c >> 5) % KB, l = c & 31;
    cok[i] = nb0 + w < NB;
    ckk[i] = kk;
    csrc[i] = wq + ((size_t)(cok[i] ? nb0 + w : 0) * KT + kk) * 32 + l;
    cdst[i] = (w * KB + kk) * 512 + 16 * l;
  }
  const u16* xsrc[C::XC];
  u32 xdst[C::XC];
  int xkk[C::XC], xk[C::XC];
  bool xok[C::XC];
#pragma unroll
  for (int i = 0; i < C::XC; ++i) {
    const int c = tid + i * C::NT, kk = c / (2 * C::BM), r = (c >> 1) % C::BM, h = c & 1;
    xok[i] = m0 + r < M;
    xkk[i] = kk;
    xk[i] = 16 * kk + 8 * h;
    xsrc[i] = x + (size_t)(xok[i] ? m0 + r : 0) * ldx + xk[i];
    xdst[i] = C::CODES + (kk * C::BM + r) * 32 + 16 * h;
  }

  auto load_stage = [&](int slot, int kt0) {
    const u32 st = sbase + slot * C::STAGE;
#pragma unroll
    for (int i = 0; i < C::CC; ++i)
      if (cok[i] && kt0 + ckk[i] < kb1) cp_async16_cg_s(st + cdst[i], csrc[i] + (size_t)kt0 * 32);
#pragma unroll
    for (int i = 0; i < C::XC; ++i) {
      if (kt0 + xkk[i] < kb1) {  // past the slice: never read
        const bool ok = xok[i] && 16 * kt0 + xk[i] < K;
        cp_async16_zfill_s(st + xdst[i], ok ? (const void*)(xsrc[i] + 16 * kt0) : (const void*)x, ok);
      }
    }
  };

  float acc[4][MT][4];
  zero_acc<MT>(acc);

  // group of the current row block (cur), the first row block of the next one (bound), and that next
  // group's raw scales and zeros, loaded a group ahead
  int cur = min(kb0 / gs16, G - 1);
  int bound = cur + 1 < G ? (cur + 1) * gs16 : 0x7fffffff;
  u32 ss[8], zz[8];
  uint4 nsv = make_uint4(0u, 0u, 0u, 0u);
  u32 nzv = 0u;
  auto take_group = [&](const uint4& sv, u32 zv) {  // raw scales and zeros -> the dequant's pairs
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      ss[c] = scale2(sv, c);
      zz[c] = zero2<DT>(zv, c);
    }
  };
  auto fetch_next = [&]() {  // the group after cur, if any
    if (cur + 1 < G) {
      nsv = ld_v4(scales + (size_t)(cur + 1) * Np + ncol);
      nzv = ld_u32(qzeros + (size_t)(cur + 1) * (Np >> 3) + (ncol >> 3));
    }
  };
  if (active) {
    take_group(ld_v4(scales + (size_t)cur * Np + ncol), ld_u32(qzeros + (size_t)cur * (Np >> 3) + (ncol >> 3)));
    fetch_next();
  } else {
#pragma unroll
    for (int c = 0; c < 8; ++c) ss[c] = zz[c] = 0u;
  }

  const int iters = (kb1 - kb0 + KB - 1) / KB;
#pragma unroll
  for (int i = 0; i < S - 1; ++i) {
    if (i < iters) load_stage(i, kb0 + i * KB);
    cp_async_commit();  // empty groups past the end keep the count uniform
  }
  const char* smem = reinterpret_cast<const char*>(dyn);
  for (int it = 0; it < iters; ++it) {
    cp_async_wait<S - 2>();
    __syncthreads();  // stage it has landed for every thread, and no warp still reads stage it - 1
    if (it + S - 1 < iters) load_stage((it + S - 1) % S, kb0 + (it + S - 1) * KB);
    cp_async_commit();
    if (active) {
      const char* st = smem + (it % S) * C::STAGE;
      const char* sc = st + wn * KB * 512 + 16 * lane;
      const char* sx = st + C::CODES + wm * WR * 32;
#pragma unroll
      for (int kk = 0; kk < KB; ++kk) {
        const int kt = kb0 + it * KB + kk;
        if (kt < kb1) {
          if (kt >= bound) {  // warp-uniform: the next group (row blocks go up by one, groups by at most one)
            ++cur;
            bound = cur + 1 < G ? bound + gs16 : 0x7fffffff;
            take_group(nsv, nzv);
            fetch_next();
          }
          const uint4 wv = *reinterpret_cast<const uint4*>(sc + kk * 512);
          u32 xb[MT][2];
          lds_x<MT>(sx + kk * C::BM * 32, lane, xb);
          tile_mma<DT, MT>(acc, wv, xb, zz, ss, mts);
        }
      }
    }
  }
  cp_async_wait<0>();

  // a thread's outputs: rows mw + 8mt + 2t + d (d < 2) x columns ncol .. ncol + 7 (all < N or none)
  const bool cols = active && ncol < N;
  float bv[8];
  auto load_bias = [&]() {
#pragma unroll
    for (int i = 0; i < 8; ++i) bv[i] = 0.f;
    if (cols && bias != nullptr) {
      const uint4 b = ld_v4(bias + ncol);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        bv[2 * i] = half_f32<DT>(word(b, i), 0);
        bv[2 * i + 1] = half_f32<DT>(word(b, i), 1);
      }
    }
  };
  // f(m, v) for each of this thread's rows m < M, v its 8 accumulated columns in order
  auto for_rows = [&](auto&& f) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int d = 0; d < 2; ++d) {
        const int m = mw + 8 * mt + 2 * t + d;
        if (m < M) {
          float v[8];
          row8<MT>(acc, mt, d, v);
          f(m, v);
        }
      }
  };
  auto store_y = [&](int m, const float (&v)[8]) { store_row8<DT>(y + (size_t)m * N + ncol, v, bv); };
  if (KS == 1) {
    load_bias();
    if (cols) for_rows(store_y);
    return;
  }
  if (active) {
    float* part = ws + (size_t)ks * M * Np;
    for_rows([&](int m, const float (&v)[8]) {
      st_f4(part + (size_t)m * Np + ncol, make_float4(v[0], v[1], v[2], v[3]));
      st_f4(part + (size_t)m * Np + ncol + 4, make_float4(v[4], v[5], v[6], v[7]));
    });
  }
  __threadfence();
  __syncthreads();
  const int tile = blockIdx.y * gridDim.x + blockIdx.x;
  if (tid == 0) s_last = (atomicAdd(counters + tile, 1) == KS - 1);
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  load_bias();
  if (cols) {
    // sum[mt][d][8] in the accumulators' registers: ws[0], then ws[1], ... (the same order whichever block
    // is last); half the row tiles at a time, so each slice's loads are in flight together
    constexpr int H = MT / 2;
    zero_acc<MT>(acc);
    for (int k2 = 0; k2 < KS; ++k2) {
      const float* src = ws + (size_t)k2 * M * Np + ncol;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float4 v[H][2][2];
#pragma unroll
        for (int i = 0; i < H; ++i)
#pragma unroll
          for (int d = 0; d < 2; ++d) {
            const int m = mw + 8 * (H * h + i) + 2 * t + d;
            if (m < M) {
              v[i][d][0] = ld_cg_f4(src + (size_t)m * Np);
              v[i][d][1] = ld_cg_f4(src + (size_t)m * Np + 4);
            } else {
              v[i][d][0] = v[i][d][1] = make_float4(0.f, 0.f, 0.f, 0.f);
            }
          }
#pragma unroll
        for (int i = 0; i < H; ++i)
#pragma unroll
          for (int d = 0; d < 2; ++d) {
            const int mt = H * h + i;
            acc[0][mt][d] += v[i][d][0].x;
            acc[0][mt][2 + d] += v[i][d][0].y;
            acc[1][mt][d] += v[i][d][0].z;
            acc[1][mt][2 + d] += v[i][d][0].w;
            acc[2][mt][d] += v[i][d][1].x;
            acc[2][mt][2 + d] += v[i][d][1].y;
            acc[3][mt][d] += v[i][d][1].z;
            acc[3][mt][2 + d] += v[i][d][1].w;
          }
      }
    }
    for_rows(store_y);
  }
  if (tid == 0) counters[tile] = 0;  // ready for the next launch on this stream
}
