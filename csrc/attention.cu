// Varlen flash attention with 3D RoPE fused into the q/k tile loads (FlashAttention-2 structure on
// the WMMA tiles of mma_tile.cuh), forward and backward, fp16 and bf16. Mirrors kernels/attention.py.
//
// Layout and semantics: q (total_q, nheads, D), k/v (total_k, nheads_kv, D); query sequence b owns
// q rows cu_q[b]:cu_q[b+1] and attends to k/v rows cu_k[b]:cu_k[b+1]; query head h reads kv head
// h / (nheads / nheads_kv). Causal masks align bottom-right (query i sees key j iff
// j <= i + Lk - Lq); a query that sees no key gets out 0 and lse -inf.
//
// Rotation. No sin/cos in the attention kernels: attention_rotary_tables fills per-call cos/sin
// tables (rows, D/2) once, with rope3d's angle code (speeds theta^(-j/n_a) rounded once from fp64 on
// the host, angle = pos * speed in fp32, sincosf), so the angles agree bit for bit with rope3d's. For
// grid_thw inputs row r holds coordinate r on every axis (tiny: max_seqlen rows) and a token looks
// up its t, h or w per pair; for positions one row per token. q and k tiles are rotated in fp32 as
// they are copied from global to shared memory (the same expression as rope3d, rounded to the input
// type) and never written back; the backward rotates again and applies the transposed rotation to
// dQ and dK as it stores them.
//
// Work decomposition. Kernels loop over (block, sequence, head) with grid strides, so the grid
// (x: blocks of max_seqlen, y: batch, z: heads) never exceeds CUDA's limits; a block past its
// sequence's end skips at once. Sequence bounds are read from cu_seqlens inside and clamped into
// [0, total], table rows into the table, so any int32 cu_seqlens / grid values are memory-safe.
// Token offsets are int64.
//
// Forward: a CTA of NW warps owns 16 * NW query rows (16 per warp); per key block S = Q K^T by
// WMMA, the online softmax in fp32 (base 2) on the warp's rows in shared memory, P (input type)
// written over S, O += P V kept in WMMA accumulators, rescaled per row through a row-index fragment.
// Backward: delta = rowsum(dO * O) - dlse; a dK/dV kernel per key block and kv head (the group's
// query heads looped inside: GQA without atomics); a dQ kernel per query block in its own pass over
// the key blocks. No atomics anywhere: the backward is deterministic.
//
// Shared memory stays under the 48 KiB static limit for every head_dim (no opt-in needed on
// sm_80/86/89/90); tests/test_attention_cuda.py records ptxas registers and spills per kernel.
#include <cmath>

#include "attention_tile.cuh"
#include "common.cuh"

namespace sigvlp {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kMaxPairs = 64;  // head_dim <= 128

// ---------------------------------------------------------------------------- rotary tables

// Rotation speeds per pair, exactly as rope3d (csrc/rope.cu, make_pair_table): theta^(-j / n_a)
// in fp64 on the host, rounded once to fp32; 0 for unrotated pairs.
struct PairSpeeds {
  float speed[kMaxPairs];
  int8_t axis[kMaxPairs];
};

PairSpeeds make_pair_speeds(const AttentionTablesArgs& a) {
  PairSpeeds t{};
  for (int p = 0; p < kMaxPairs; ++p) {
    int axis = -1, j = 0, n = 1;
    if (p < a.n_t) {
      axis = 0; j = p; n = a.n_t;
    } else if (p < a.n_t + a.n_h) {
      axis = 1; j = p - a.n_t; n = a.n_h;
    } else if (p < a.n_t + a.n_h + a.n_w) {
      axis = 2; j = p - a.n_t - a.n_h; n = a.n_w;
    }
    t.axis[p] = static_cast<int8_t>(axis);
    t.speed[p] = axis < 0 ? 0.f : static_cast<float>(std::exp2(-(static_cast<double>(j) / n) * a.log2_theta));
  }
  return t;
}

__global__ void __launch_bounds__(256) rotary_table_kernel(AttentionTablesArgs a, PairSpeeds t) {
  const int64_t half = a.head_dim / 2;
  const int64_t n = a.rows * half;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / half;
    const int p = static_cast<int>(i % half);
    float cs = 1.f, sn = 0.f;
    const int axis = t.axis[p];
    if (axis >= 0) {
      const float pos = a.positions != nullptr ? a.positions[row * 3 + axis] : static_cast<float>(row);
      sincosf(pos * t.speed[p], &sn, &cs);
    }
    a.cos[i] = cs;
    a.sin[i] = sn;
  }
}

// ---------------------------------------------------------------------------- shared helpers

__host__ __device__ __forceinline__ int64_t min64(int64_t x, int64_t y) { return x < y ? x : y; }
__host__ __device__ __forceinline__ int64_t max64(int64_t x, int64_t y) { return x > y ? x : y; }

// (start, length) of sequence b, clamped into [0, total].
__device__ __forceinline__ void seq_bounds(const int32_t* cu, int64_t b, int64_t total, int64_t& start,
                                           int64_t& len) {
  int64_t s = __ldg(cu + b), e = __ldg(cu + b + 1);
  s = s < 0 ? 0 : (s > total ? total : s);
  e = e < s ? s : (e > total ? total : e);
  start = s;
  len = e - s;
}

// One side's rotation (q or k) for one sequence.
struct Side {
  const float* cos;
  const float* sin;
  int64_t rows;   // table rows
  int64_t start;  // first token of the sequence
  int64_t H, W;   // grid (clamped >= 1); unused for positions
  bool positions;
};

__device__ __forceinline__ Side make_side(const AttentionArgs& a, bool q_side, int64_t b, int64_t start) {
  Side s;
  s.cos = q_side ? a.cos_q : a.cos_k;
  s.sin = q_side ? a.sin_q : a.sin_k;
  s.rows = q_side ? a.rows_q : a.rows_k;
  s.start = start;
  s.positions = q_side ? a.positions_q : a.positions_k;
  s.H = 1;
  s.W = 1;
  const int32_t* grid = q_side ? a.grid_q : a.grid_k;
  if (a.rotate && !s.positions) {
    const int64_t H = __ldg(grid + 3 * b + 1), W = __ldg(grid + 3 * b + 2);
    s.H = H < 1 ? 1 : H;
    s.W = W < 1 ? 1 : W;
  }
  return s;
}

// Table rows of one token, per axis (all three its own row for positions), clamped into the
// table: decoded once per row of a tile, then looked up per pair.
struct RowRows {
  int32_t t, h, w;  // a table never has 2^31 rows (it would hold 2^31 x head_dim / 2 floats)
};

__device__ __forceinline__ int32_t clamp_row(int64_t r, int64_t rows) {
  return static_cast<int32_t>(r < 0 ? 0 : (r >= rows ? rows - 1 : r));
}

__device__ __forceinline__ RowRows row_rows(const Side& s, int64_t local) {
  if (s.positions) {
    const int32_t r = clamp_row(s.start + local, s.rows);
    return {r, r, r};
  }
  // 32-bit decode: local < 2^31 (lengths come from int32 cu_seqlens), 1 <= H, W < 2^31.
  const int32_t n = static_cast<int32_t>(local), H = static_cast<int32_t>(s.H), W = static_cast<int32_t>(s.W);
  const int64_t hw = s.H * s.W;
  const int32_t t = hw > 2147483647 ? 0 : n / static_cast<int32_t>(hw);
  return {clamp_row(t, s.rows), clamp_row((n / W) % H, s.rows), clamp_row(n % W, s.rows)};
}

__device__ __forceinline__ int32_t pair_row(const RowRows& r, int p, int n_t, int n_h) {
  return p < n_t ? r.t : (p < n_t + n_h ? r.h : r.w);
}

__device__ __forceinline__ int pair_first(int p, bool interleaved) { return interleaved ? 2 * p : p; }
__device__ __forceinline__ int pair_second(int p, int half, bool interleaved) {
  return interleaved ? 2 * p + 1 : p + half;
}

// Copy a ROWS x D tile (rows past `valid` as 0) of q or k into shared memory, rotated in fp32 by
// the per-call tables when a.rotate (the expression of rope3d, rounded to T). THREADS / ROWS
// threads share a row: the token's table rows are decoded once per row, not per pair.
template <typename T, int ROWS, int D, int LDT, int THREADS>
__device__ __forceinline__ void load_rotated(T* __restrict__ s, const T* __restrict__ g, int64_t ldg, int64_t valid,
                                             int64_t local0, const Side& side, const AttentionArgs& a) {
  constexpr int HALF = D / 2;
  constexpr int G = THREADS >= ROWS ? THREADS / ROWS : 1;  // threads per row
  static_assert(THREADS % ROWS == 0 || ROWS % THREADS == 0, "rows and threads must tile");
  const int g0 = static_cast<int>(threadIdx.x) % G;
  for (int r = static_cast<int>(threadIdx.x) / G; r < ROWS; r += THREADS / G) {
    const bool ok = r < valid;
    RowRows rr{0, 0, 0};
    if (ok && a.rotate) rr = row_rows(side, local0 + r);
    const T* row = g + static_cast<int64_t>(r) * ldg;
#pragma unroll 2
    for (int p = g0; p < HALF; p += G) {
      const int f = pair_first(p, a.interleaved), sc = pair_second(p, HALF, a.interleaved);
      T x1 = from_float<T>(0.f), x2 = from_float<T>(0.f);
      if (ok) {
        x1 = row[f];
        x2 = row[sc];
        if (a.rotate) {
          const int64_t off = static_cast<int64_t>(pair_row(rr, p, a.n_t, a.n_h)) * HALF + p;
          const float cs = __ldg(side.cos + off), sn = __ldg(side.sin + off);
          const float e0 = to_float(x1), e1 = to_float(x2);
          x1 = from_float<T>(e0 * cs - e1 * sn);
          x2 = from_float<T>(e1 * cs + e0 * sn);
        }
      }
      s[r * LDT + f] = x1;
      s[r * LDT + sc] = x2;
    }
  }
}

// Store 16 rows of a gradient held in rotated coordinates (fp32, shared, row stride ld) after the
// transposed rotation: rows with local index < valid; one warp, two lanes per row.
template <typename T, int D>
__device__ __forceinline__ void store_unrotated(T* __restrict__ g, int64_t ldg, const float* buf, int ld, int64_t valid,
                                                int64_t local0, const Side& side, const AttentionArgs& a) {
  constexpr int HALF = D / 2;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int r = lane >> 1;
  if (r >= valid) return;
  RowRows rr{0, 0, 0};
  if (a.rotate) rr = row_rows(side, local0 + r);
  T* row = g + static_cast<int64_t>(r) * ldg;
  for (int p = lane & 1; p < HALF; p += 2) {
    const int f = pair_first(p, a.interleaved), sc = pair_second(p, HALF, a.interleaved);
    float g1 = buf[r * ld + f], g2 = buf[r * ld + sc];
    if (a.rotate) {
      const int64_t off = static_cast<int64_t>(pair_row(rr, p, a.n_t, a.n_h)) * HALF + p;
      const float cs = __ldg(side.cos + off), sn = __ldg(side.sin + off);
      const float u = g1 * cs + g2 * sn, w = g2 * cs - g1 * sn;
      g1 = u;
      g2 = w;
    }
    row[f] = from_float<T>(g1);
    row[sc] = from_float<T>(g2);
  }
}

// Launch configuration per head_dim: NW warps of 16 rows each own the CTA's rows; BN is the
// block of the operand looped over. Chosen so that every kernel's static shared memory stays
// under 48 KiB (the sizes are static_asserted below).
// Register spills (ptxas -v, nvcc -O3 -lineinfo, CUDA 13, this file as built for 80;90a; measured
// without a GPU, see tests/test_spills.py for the Triton kernels): every kernel compiles without
// local memory except, in bytes of spill stores / loads per thread (stack frame):
//   sm_90a dkdv<bf16,128> 32 / 32 (16), dkdv<fp16,128> 16 / 32 (16);
//   sm_80  dkdv<fp16,128> 16 / 16 (8), dkdv<bf16,96> 36 / 44 (24), dkdv<bf16,64> 16 / 16 (8),
//          dq<bf16,96> 8 / 8 (8).
// Kept for now: a dK/dV warp holds both 16 x D fp32 accumulators (D / 2 registers per lane each,
// 128 in all at D = 128) beside its K/V fragments, so it runs at the 255-register limit; the spill
// is at most 44 B per thread (L1-resident), while removing it (a warp owning 8 keys, or D split
// across two warps) would double the passes over Q and dO. Where the spilled words sit in the loop
// is not checked yet: revisit with GPU timings (benches/bench_attention.py, sigvlp_cuda).
template <int D>
struct Config {
  static constexpr int kFwdWarps = 4;
  static constexpr int kFwdBlockN = D <= 32 ? 64 : 32;
  static constexpr int kBwdWarps = D <= 64 ? 4 : 2;
  static constexpr int kBwdBlock = 32;
};

using AccFrag = mma::wmma::fragment<mma::wmma::accumulator, 16, 16, 16, float>;

// ---------------------------------------------------------------------------- forward

template <typename T, int D>
__global__ void __launch_bounds__(Config<D>::kFwdWarps * 32, 1) attention_fwd_kernel(AttentionArgs a) {
  constexpr int NW = Config<D>::kFwdWarps, BM = 16 * NW, BN = Config<D>::kFwdBlockN, THREADS = NW * 32;
  constexpr int LDT = D + mma::kSkew<T>;
  constexpr int LDS = BN + 4;    // fp32 scores
  constexpr int LDP = 2 * LDS;   // P in T, written over the scores of the same row
  constexpr int kBytes = (BM + 2 * BN) * LDT * static_cast<int>(sizeof(T)) + BM * LDS * 4 + 3 * BM * 4;
  static_assert(kBytes <= 48 * 1024, "forward tile exceeds 48 KiB of static shared memory");
  __shared__ __align__(128) T sQ[BM * LDT];
  __shared__ __align__(128) T sK[BN * LDT];
  __shared__ __align__(128) T sV[BN * LDT];
  __shared__ __align__(128) float sS[BM * LDS];
  __shared__ float sM[BM], sL[BM], sA[BM];

  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) & 31;
  const int w16 = warp * 16;
  float* const slab = sS + w16 * LDS;                 // this warp's rows of S (warp-private)
  T* const pslab = reinterpret_cast<T*>(slab);         // P over S, row stride LDP
  AccFrag rows;
  mma::row_index(rows, slab);

  const int64_t group = a.nheads / a.nheads_kv;
  const int64_t nblocks = (a.max_q + BM - 1) / BM;
  const float scale_log2 = a.softmax_scale * kLog2e;
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  T* out = static_cast<T*>(a.out);
  const int r = lane >> 1, hf = lane & 1;  // softmax: two lanes per row, BN/2 columns each

  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    int64_t q_start, Lq, k_start, Lk;
    seq_bounds(a.cu_q, b, a.total_q, q_start, Lq);
    seq_bounds(a.cu_k, b, a.total_k, k_start, Lk);
    const Side side_q = make_side(a, true, b, q_start), side_k = make_side(a, false, b, k_start);
    const int64_t offset = Lk - Lq;
    for (int64_t h = blockIdx.z; h < a.nheads; h += gridDim.z) {
      const int64_t kh = h / group;
      for (int64_t pid = blockIdx.x; pid < nblocks; pid += gridDim.x) {
        const int64_t m0 = (a.causal ? nblocks - 1 - pid : pid) * BM;  // causal: longest rows first
        if (m0 >= Lq) continue;
        __syncthreads();  // the previous tile's readers are done with shared memory
        load_rotated<T, BM, D, LDT, THREADS>(sQ, q + (q_start + m0) * a.q_stride_token + h * a.q_stride_head,
                                             a.q_stride_token, Lq - m0, m0, side_q, a);
        if (hf == 0) {
          sM[w16 + r] = -INFINITY;
          sL[w16 + r] = 0.f;
        }
        __syncwarp();
        // O in two column halves: the P V product loads half of V's fragments at a time (registers).
        mma::WarpTile<T, 16, D / 2> o[2];
        o[0].zero();
        o[1].zero();
        const int64_t end = a.causal ? min64(max64(m0 + BM + offset, 0), Lk) : Lk;
        const int64_t qi = m0 + w16 + r;
        for (int64_t n0 = 0; n0 < end; n0 += BN) {
          __syncthreads();
          load_rotated<T, BN, D, LDT, THREADS>(sK, k + (k_start + n0) * a.k_stride_token + kh * a.k_stride_head,
                                               a.k_stride_token, Lk - n0, n0, side_k, a);
          mma::load_tile<T, BN, D, THREADS>(sV, LDT, v + (k_start + n0) * a.v_stride_token + kh * a.v_stride_head,
                                            a.v_stride_token, Lk - n0, D);
          __syncthreads();
          mma::WarpTile<T, 16, BN> s;
          s.zero();
          s.template mma<mma::RowMajor, mma::ColMajor>(sQ + w16 * LDT, LDT, sK, LDT, D);
          s.store(slab, LDS);
          __syncwarp();
          float p[BN / 2];
          float mx = -INFINITY;
#pragma unroll
          for (int i = 0; i < BN / 2; ++i) {
            const int c = hf * (BN / 2) + i;
            const int64_t kj = n0 + c;
            const bool ok = kj < Lk && (!a.causal || kj <= qi + offset);
            p[i] = ok ? slab[r * LDS + c] * scale_log2 : -INFINITY;
            mx = fmaxf(mx, p[i]);
          }
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          const float m_old = sM[w16 + r];
          const float m_new = fmaxf(m_old, mx);
          const float m_use = m_new == -INFINITY ? 0.f : m_new;  // nothing seen yet: p = 0
          float sum = 0.f;
#pragma unroll
          for (int i = 0; i < BN / 2; ++i) {
            p[i] = exp2f(p[i] - m_use);
            sum += p[i];
          }
          sum += __shfl_xor_sync(0xffffffffu, sum, 1);
          const float alpha = exp2f(m_old - m_use);
          __syncwarp();  // every lane has read its S row before P overwrites it
#pragma unroll
          for (int i = 0; i < BN / 2; ++i) pslab[r * LDP + hf * (BN / 2) + i] = from_float<T>(p[i]);
          if (hf == 0) {
            sM[w16 + r] = m_new;
            sL[w16 + r] = sL[w16 + r] * alpha + sum;
            sA[w16 + r] = alpha;
          }
          __syncwarp();
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            mma::scale_rows(o[half], sA + w16, rows);
            o[half].template mma<mma::RowMajor, mma::RowMajor>(pslab, LDP, sV + half * (D / 2), LDT, BN);
          }
        }
        // Epilogue: out = O / l, lse = m ln2 + ln l (natural log); rows seeing no key: 0 and -inf.
        const float l = sL[w16 + r];
        if (hf == 0) {
          sA[w16 + r] = l == 0.f ? 0.f : 1.f / l;
          if (qi < Lq) {
            a.lse[h * a.lse_stride_head + q_start + qi] =
                l == 0.f ? -INFINITY : (sM[w16 + r] + log2f(l)) * kLn2;
          }
        }
        __syncwarp();
        T* orow0 = out + (q_start + m0 + w16) * a.out_stride_token + h * a.out_stride_head;
        const int64_t valid = Lq - m0 - w16;
        const int64_t ost = a.out_stride_token;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          mma::scale_rows(o[half], sA + w16, rows);
          T* base = orow0 + half * (D / 2);
          mma::for_each(o[half], slab, [&](int rr, int cc, float val) {
            if (rr < valid) base[rr * ost + cc] = from_float<T>(val);
          });
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------- backward

// delta[h, t] = rowsum(dO * O) - dlse[h, t]: one warp per (token, head) row, coalesced over D,
// reduced by a fixed shuffle tree (deterministic).
template <typename T>
__global__ void __launch_bounds__(256) attention_delta_kernel(AttentionArgs a) {
  const T* o = static_cast<const T*>(a.out);
  const T* d = static_cast<const T*>(a.dout);
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t warps_per_block = blockDim.x / 32;
  const int64_t n = a.total_q * a.nheads;
  for (int64_t i = blockIdx.x * warps_per_block + threadIdx.x / 32; i < n; i += gridDim.x * warps_per_block) {
    const int64_t t = i / a.nheads, h = i % a.nheads;
    const T* orow = o + t * a.out_stride_token + h * a.out_stride_head;
    const T* drow = d + t * a.dout_stride_token + h * a.dout_stride_head;
    float acc = 0.f;
    for (int64_t c = lane; c < a.head_dim; c += 32) acc += to_float(orow[c]) * to_float(drow[c]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) {
      if (a.dlse != nullptr) acc -= a.dlse[h * a.dlse_stride_head + t];
      a.delta[h * a.lse_stride_head + t] = acc;
    }
  }
}

// lse in base 2 (+inf for rows that see no key, so P = 0 there) and delta of BM query rows.
template <int BM>
__device__ __forceinline__ void load_row_stats(float* sL, float* sD, const AttentionArgs& a, int64_t h,
                                               int64_t q_start, int64_t m0, int64_t Lq, int threads) {
  for (int i = static_cast<int>(threadIdx.x); i < BM; i += threads) {
    float l2 = INFINITY, dl = 0.f;
    if (m0 + i < Lq) {
      const float lse = a.lse[h * a.lse_stride_head + q_start + m0 + i];
      l2 = lse == -INFINITY ? INFINITY : lse * kLog2e;
      dl = a.delta[h * a.lse_stride_head + q_start + m0 + i];
    }
    sL[i] = l2;
    sD[i] = dl;
  }
}

// dK, dV of one block of 16 * NW keys and one kv head; loops over the group's query heads and the
// query blocks that see the keys.
template <typename T, int D>
__global__ void __launch_bounds__(Config<D>::kBwdWarps * 32, 1) attention_dkdv_kernel(AttentionArgs a) {
  constexpr int NW = Config<D>::kBwdWarps, BN = 16 * NW, BM = Config<D>::kBwdBlock, THREADS = NW * 32;
  constexpr int LDT = D + mma::kSkew<T>;
  constexpr int LDS = BM + 4;
  constexpr int LDP = 2 * LDS;
  constexpr int LDE = D + 4;  // fp32 epilogue rows
  constexpr int kTile = (2 * BN + 2 * BM) * LDT * static_cast<int>(sizeof(T)) + 2 * BN * LDS * 4;
  static_assert(kTile + 2 * BM * 4 <= 48 * 1024, "dK/dV tile exceeds 48 KiB of static shared memory");
  static_assert(BN * LDE * 4 <= kTile - 2 * BN * LDT * static_cast<int>(sizeof(T)), "epilogue buffer");
  __shared__ __align__(128) unsigned char smem[kTile];
  __shared__ float sL[BM], sD[BM];
  T* const sK = reinterpret_cast<T*>(smem);
  T* const sV = sK + BN * LDT;
  T* const sQ = sV + BN * LDT;
  T* const sO = sQ + BM * LDT;  // dO
  float* const sS = reinterpret_cast<float*>(sO + BM * LDT);
  float* const sP = sS + BN * LDS;
  float* const sE = reinterpret_cast<float*>(sQ);  // epilogue, over sQ .. sP

  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) & 31;
  const int w16 = warp * 16;
  float* const s_slab = sS + w16 * LDS;
  float* const p_slab = sP + w16 * LDS;
  T* const pt = reinterpret_cast<T*>(s_slab);   // P^T over S^T
  T* const dst = reinterpret_cast<T*>(p_slab);  // dS^T over dP^T

  const int64_t group = a.nheads / a.nheads_kv;
  const int64_t nblocks = (a.max_k + BN - 1) / BN;
  const float scale_log2 = a.softmax_scale * kLog2e;
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  const T* dout = static_cast<const T*>(a.dout);
  T* dk = static_cast<T*>(a.dk);
  T* dv = static_cast<T*>(a.dv);
  const int r = lane >> 1, hf = lane & 1;

  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    int64_t q_start, Lq, k_start, Lk;
    seq_bounds(a.cu_q, b, a.total_q, q_start, Lq);
    seq_bounds(a.cu_k, b, a.total_k, k_start, Lk);
    const Side side_q = make_side(a, true, b, q_start), side_k = make_side(a, false, b, k_start);
    const int64_t offset = Lk - Lq;
    for (int64_t kh = blockIdx.z; kh < a.nheads_kv; kh += gridDim.z) {
      for (int64_t pid = blockIdx.x; pid < nblocks; pid += gridDim.x) {
        const int64_t n0 = pid * BN;
        if (n0 >= Lk) continue;
        __syncthreads();
        load_rotated<T, BN, D, LDT, THREADS>(sK, k + (k_start + n0) * a.k_stride_token + kh * a.k_stride_head,
                                             a.k_stride_token, Lk - n0, n0, side_k, a);
        mma::load_tile<T, BN, D, THREADS>(sV, LDT, v + (k_start + n0) * a.v_stride_token + kh * a.v_stride_head,
                                          a.v_stride_token, Lk - n0, D);
        mma::WarpTile<T, 16, D> acc_k, acc_v;
        acc_k.zero();
        acc_v.zero();
        const int64_t kj = n0 + w16 + r;
        // Causal: key j is seen by queries i >= j - offset; start at the block holding n0 - offset.
        const int64_t first_q = a.causal ? max64(n0 - offset, 0) : 0;
        for (int64_t hq = 0; hq < group; ++hq) {
          const int64_t h = kh * group + hq;
          for (int64_t m0 = (first_q / BM) * BM; m0 < Lq; m0 += BM) {
            __syncthreads();
            load_rotated<T, BM, D, LDT, THREADS>(sQ, q + (q_start + m0) * a.q_stride_token + h * a.q_stride_head,
                                                 a.q_stride_token, Lq - m0, m0, side_q, a);
            mma::load_tile<T, BM, D, THREADS>(sO, LDT,
                                              dout + (q_start + m0) * a.dout_stride_token + h * a.dout_stride_head,
                                              a.dout_stride_token, Lq - m0, D);
            load_row_stats<BM>(sL, sD, a, h, q_start, m0, Lq, THREADS);
            __syncthreads();
            {
              mma::WarpTile<T, 16, BM> st;  // S^T = K Q^T
              st.zero();
              st.template mma<mma::RowMajor, mma::ColMajor>(sK + w16 * LDT, LDT, sQ, LDT, D);
              st.store(s_slab, LDS);
              mma::WarpTile<T, 16, BM> dpt;  // dP^T = V dO^T
              dpt.zero();
              dpt.template mma<mma::RowMajor, mma::ColMajor>(sV + w16 * LDT, LDT, sO, LDT, D);
              dpt.store(p_slab, LDS);
            }
            __syncwarp();
            float pv[BM / 2], dsv[BM / 2];
#pragma unroll
            for (int i = 0; i < BM / 2; ++i) {
              const int c = hf * (BM / 2) + i;
              const int64_t qi = m0 + c;
              const bool ok = qi < Lq && (!a.causal || kj <= qi + offset);
              pv[i] = ok ? exp2f(s_slab[r * LDS + c] * scale_log2 - sL[c]) : 0.f;
              dsv[i] = pv[i] * (p_slab[r * LDS + c] - sD[c]);
            }
            __syncwarp();
#pragma unroll
            for (int i = 0; i < BM / 2; ++i) {
              pt[r * LDP + hf * (BM / 2) + i] = from_float<T>(pv[i]);
              dst[r * LDP + hf * (BM / 2) + i] = from_float<T>(dsv[i]);
            }
            __syncwarp();
            acc_v.template mma<mma::RowMajor, mma::RowMajor>(pt, LDP, sO, LDT, BM);   // dV += P^T dO
            acc_k.template mma<mma::RowMajor, mma::RowMajor>(dst, LDP, sQ, LDT, BM);  // dK += dS^T Q
          }
        }
        __syncthreads();  // everyone is done with sQ .. sP: the epilogue buffer goes over them
        float* const e_slab = sE + w16 * LDE;
        const int64_t valid = Lk - n0 - w16;
        acc_k.scale(a.softmax_scale);
        acc_k.store(e_slab, LDE);
        __syncwarp();
        store_unrotated<T, D>(dk + (k_start + n0 + w16) * a.dk_stride_token + kh * a.dk_stride_head, a.dk_stride_token,
                              e_slab, LDE, valid, n0 + w16, side_k, a);
        __syncwarp();
        acc_v.store(e_slab, LDE);
        __syncwarp();
        T* dvrow0 = dv + (k_start + n0 + w16) * a.dv_stride_token + kh * a.dv_stride_head;
        for (int c = lane; c < 16 * D; c += 32) {
          const int rr = c / D, cc = c % D;
          if (rr < valid) dvrow0[rr * a.dv_stride_token + cc] = from_float<T>(e_slab[rr * LDE + cc]);
        }
      }
    }
  }
}

// dQ of one block of 16 * NW queries and one head, in its own pass over the key blocks.
template <typename T, int D>
__global__ void __launch_bounds__(Config<D>::kBwdWarps * 32, 1) attention_dq_kernel(AttentionArgs a) {
  constexpr int NW = Config<D>::kBwdWarps, BM = 16 * NW, BN = Config<D>::kBwdBlock, THREADS = NW * 32;
  constexpr int LDT = D + mma::kSkew<T>;
  constexpr int LDS = BN + 4;
  constexpr int LDP = 2 * LDS;
  constexpr int LDE = D + 4;
  constexpr int kTile = (2 * BM + 2 * BN) * LDT * static_cast<int>(sizeof(T)) + 2 * BM * LDS * 4;
  static_assert(kTile + 2 * BM * 4 <= 48 * 1024, "dQ tile exceeds 48 KiB of static shared memory");
  static_assert(BM * LDE * 4 <= kTile, "epilogue buffer");
  __shared__ __align__(128) unsigned char smem[kTile];
  __shared__ float sL[BM], sD[BM];
  T* const sQ = reinterpret_cast<T*>(smem);
  T* const sO = sQ + BM * LDT;  // dO
  T* const sK = sO + BM * LDT;
  T* const sV = sK + BN * LDT;
  float* const sS = reinterpret_cast<float*>(sV + BN * LDT);
  float* const sP = sS + BM * LDS;
  float* const sE = reinterpret_cast<float*>(smem);  // epilogue, over everything

  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) & 31;
  const int w16 = warp * 16;
  float* const s_slab = sS + w16 * LDS;
  float* const p_slab = sP + w16 * LDS;
  T* const ds = reinterpret_cast<T*>(p_slab);  // dS over dP

  const int64_t group = a.nheads / a.nheads_kv;
  const int64_t nblocks = (a.max_q + BM - 1) / BM;
  const float scale_log2 = a.softmax_scale * kLog2e;
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  const T* dout = static_cast<const T*>(a.dout);
  T* dq = static_cast<T*>(a.dq);
  const int r = lane >> 1, hf = lane & 1;

  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    int64_t q_start, Lq, k_start, Lk;
    seq_bounds(a.cu_q, b, a.total_q, q_start, Lq);
    seq_bounds(a.cu_k, b, a.total_k, k_start, Lk);
    const Side side_q = make_side(a, true, b, q_start), side_k = make_side(a, false, b, k_start);
    const int64_t offset = Lk - Lq;
    for (int64_t h = blockIdx.z; h < a.nheads; h += gridDim.z) {
      const int64_t kh = h / group;
      for (int64_t pid = blockIdx.x; pid < nblocks; pid += gridDim.x) {
        const int64_t m0 = (a.causal ? nblocks - 1 - pid : pid) * BM;
        if (m0 >= Lq) continue;
        __syncthreads();
        load_rotated<T, BM, D, LDT, THREADS>(sQ, q + (q_start + m0) * a.q_stride_token + h * a.q_stride_head,
                                             a.q_stride_token, Lq - m0, m0, side_q, a);
        mma::load_tile<T, BM, D, THREADS>(sO, LDT, dout + (q_start + m0) * a.dout_stride_token + h * a.dout_stride_head,
                                          a.dout_stride_token, Lq - m0, D);
        load_row_stats<BM>(sL, sD, a, h, q_start, m0, Lq, THREADS);
        mma::WarpTile<T, 16, D> acc;
        acc.zero();
        const int64_t end = a.causal ? min64(max64(m0 + BM + offset, 0), Lk) : Lk;
        const int64_t qi = m0 + w16 + r;
        for (int64_t n0 = 0; n0 < end; n0 += BN) {
          __syncthreads();
          load_rotated<T, BN, D, LDT, THREADS>(sK, k + (k_start + n0) * a.k_stride_token + kh * a.k_stride_head,
                                               a.k_stride_token, Lk - n0, n0, side_k, a);
          mma::load_tile<T, BN, D, THREADS>(sV, LDT, v + (k_start + n0) * a.v_stride_token + kh * a.v_stride_head,
                                            a.v_stride_token, Lk - n0, D);
          __syncthreads();
          {
            mma::WarpTile<T, 16, BN> s;  // S = Q K^T
            s.zero();
            s.template mma<mma::RowMajor, mma::ColMajor>(sQ + w16 * LDT, LDT, sK, LDT, D);
            s.store(s_slab, LDS);
            mma::WarpTile<T, 16, BN> dp;  // dP = dO V^T
            dp.zero();
            dp.template mma<mma::RowMajor, mma::ColMajor>(sO + w16 * LDT, LDT, sV, LDT, D);
            dp.store(p_slab, LDS);
          }
          __syncwarp();
          const float l2 = sL[w16 + r], dl = sD[w16 + r];
          float dsv[BN / 2];
#pragma unroll
          for (int i = 0; i < BN / 2; ++i) {
            const int c = hf * (BN / 2) + i;
            const int64_t kj = n0 + c;
            const bool ok = kj < Lk && (!a.causal || kj <= qi + offset);
            const float p = ok ? exp2f(s_slab[r * LDS + c] * scale_log2 - l2) : 0.f;
            dsv[i] = p * (p_slab[r * LDS + c] - dl);
          }
          __syncwarp();
#pragma unroll
          for (int i = 0; i < BN / 2; ++i) ds[r * LDP + hf * (BN / 2) + i] = from_float<T>(dsv[i]);
          __syncwarp();
          acc.template mma<mma::RowMajor, mma::RowMajor>(ds, LDP, sK, LDT, BN);  // dQ += dS K
        }
        __syncthreads();  // the epilogue buffer goes over every tile
        float* const e_slab = sE + w16 * LDE;
        acc.scale(a.softmax_scale);
        acc.store(e_slab, LDE);
        __syncwarp();
        store_unrotated<T, D>(dq + (q_start + m0 + w16) * a.dq_stride_token + h * a.dq_stride_head, a.dq_stride_token,
                              e_slab, LDE, Lq - m0 - w16, m0 + w16, side_q, a);
      }
    }
  }
}

// ---------------------------------------------------------------------------- launchers

dim3 attention_grid(int64_t blocks, int64_t batch, int64_t heads) {
  const int64_t cap_y = max_grid_y();
  const int64_t x = min64(max64(blocks, 1), 2147483647);
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(min64(max64(batch, 1), cap_y)),
              static_cast<unsigned>(min64(max64(heads, 1), cap_y)));
}

unsigned flat_blocks(int64_t n, int threads) {
  const int64_t wanted = (n + threads - 1) / threads;
  const int64_t cap = static_cast<int64_t>(multiprocessor_count()) * 32;
  return static_cast<unsigned>(max64(1, min64(wanted, cap)));
}

template <typename T, int D>
int forward_for(const AttentionArgs& a) {
  constexpr int BM = 16 * Config<D>::kFwdWarps;
  SIGVLP_LAUNCH(attention_grid((a.max_q + BM - 1) / BM, a.batch, a.nheads), Config<D>::kFwdWarps * 32, 0,
                static_cast<cudaStream_t>(a.stream), attention_fwd_kernel<T, D>)(a);
  return static_cast<int>(cudaGetLastError());
}

template <typename T, int D>
int backward_for(const AttentionArgs& a) {
  const auto stream = static_cast<cudaStream_t>(a.stream);
  SIGVLP_LAUNCH(flat_blocks(a.total_q * a.nheads * 32, 256), 256, 0, stream, attention_delta_kernel<T>)(a);
  int err = static_cast<int>(cudaGetLastError());
  if (err != 0) return err;
  constexpr int B = 16 * Config<D>::kBwdWarps;
  if (a.total_k > 0 && a.max_k > 0) {
    SIGVLP_LAUNCH(attention_grid((a.max_k + B - 1) / B, a.batch, a.nheads_kv), Config<D>::kBwdWarps * 32, 0, stream,
                  attention_dkdv_kernel<T, D>)(a);
    err = static_cast<int>(cudaGetLastError());
    if (err != 0) return err;
  }
  SIGVLP_LAUNCH(attention_grid((a.max_q + B - 1) / B, a.batch, a.nheads), Config<D>::kBwdWarps * 32, 0, stream,
                attention_dq_kernel<T, D>)(a);
  return static_cast<int>(cudaGetLastError());
}

template <typename T, bool BACKWARD>
int by_head_dim(const AttentionArgs& a) {
  switch (a.head_dim) {
    case 32: return BACKWARD ? backward_for<T, 32>(a) : forward_for<T, 32>(a);
    case 64: return BACKWARD ? backward_for<T, 64>(a) : forward_for<T, 64>(a);
    case 96: return BACKWARD ? backward_for<T, 96>(a) : forward_for<T, 96>(a);
    case 128: return BACKWARD ? backward_for<T, 128>(a) : forward_for<T, 128>(a);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

// Shape facts only (free on the host).
bool shapes_ok(const AttentionArgs& a) {
  if (a.dtype != DType::kFloat16 && a.dtype != DType::kBFloat16) return false;  // fp32: tensor cores in 16 bit
  if (a.nheads < 1 || a.nheads_kv < 1 || a.nheads % a.nheads_kv != 0) return false;
  if (a.batch < 0 || a.max_q < 0 || a.max_k < 0 || a.total_q < 0 || a.total_k < 0) return false;
  if (a.rotate) {
    if (a.rows_q < 1 || a.rows_k < 1 || a.cos_q == nullptr || a.sin_q == nullptr || a.cos_k == nullptr ||
        a.sin_k == nullptr)
      return false;
    if ((!a.positions_q && a.grid_q == nullptr) || (!a.positions_k && a.grid_k == nullptr)) return false;
  }
  return true;
}

template <bool BACKWARD>
int run(const AttentionArgs& a) {
  if (!shapes_ok(a)) return static_cast<int>(cudaErrorInvalidValue);
  if (a.total_q == 0 || a.batch == 0 || a.max_q == 0) return 0;  // nothing to do (dk/dv zeroed by the caller)
  if (a.dtype == DType::kFloat16) return by_head_dim<__half, BACKWARD>(a);
  return by_head_dim<__nv_bfloat16, BACKWARD>(a);
}

}  // namespace

int attention_rotary_tables(const AttentionTablesArgs& a) {
  if (a.head_dim % 2 != 0 || a.head_dim / 2 > kMaxPairs || a.rows < 0 || a.n_t < 0 || a.n_h < 0 || a.n_w < 0)
    return static_cast<int>(cudaErrorInvalidValue);
  const int64_t n = a.rows * (a.head_dim / 2);
  if (n == 0) return 0;
  SIGVLP_LAUNCH(flat_blocks(n, 256), 256, 0, static_cast<cudaStream_t>(a.stream), rotary_table_kernel)(
      a, make_pair_speeds(a));
  return static_cast<int>(cudaGetLastError());
}

int attention_forward(const AttentionArgs& args) { return run<false>(args); }

int attention_backward(const AttentionArgs& args) { return run<true>(args); }

}  // namespace sigvlp
