// Tensor-core tile-GEMM building blocks (WMMA, sm_80+, fp32 accumulation), shared by the op
// kernels in csrc/ (sigmoid_loss.cu; newton_schulz.cu). Device code only; include after
// common.cuh. This API is stable: extend it, do not change what is documented here.
//
// Element types T: __half, __nv_bfloat16 (WMMA m16n16k16) and float (WMMA m16n16k8 on TF32
// with the split a = a_hi + a_lo, each part TF32: a*b ~= a_hi*b_hi + a_hi*b_lo + a_lo*b_hi + a_lo*b_lo,
// four TF32 products, close to fp32 accuracy. The usual 3xTF32 drops a_lo*b_lo (up to 2^-22 of
// |a b|), which left the sigmoid-loss gradients above the fp32 floor the tests ask for (found by
// running the kernels under the CPU emulation, csrc/emu)).
// Accumulators are always fp32.
//
//   namespace sigvlp::mma
//   RowMajor, ColMajor                 layout tags for an operand held in shared memory:
//                                      A (m, k) is at m*ld + k (RowMajor) or k*ld + m (ColMajor);
//                                      B (k, n) is at k*ld + n (RowMajor) or n*ld + k (ColMajor).
//                                      So C = X Y^T with X, Y row-major tiles is A=RowMajor,
//                                      B=ColMajor (B(k, n) = Y(n, k)).
//   Traits<T>::kK                      K of one MMA step (16, or 8 for float).
//   kSkew<T>                           padding (elements) to add to a shared tile's row length:
//                                      ld = COLS + kSkew<T> keeps every WMMA pointer 32-byte
//                                      aligned and spreads rows over banks.
//   load_tile<T, ROWS, COLS, THREADS>(s, lds, g, ldg, rows, cols)
//                                      all THREADS threads of the block copy a ROWS x COLS tile
//                                      from row-major global memory g (row stride ldg elements)
//                                      into shared s (row stride lds); elements at row >= rows or
//                                      col >= cols are written as 0. 16-byte vector loads where
//                                      alignment allows. No barrier inside: __syncthreads() after.
//   WarpTile<T, WM, WN>                one warp's WM x WN fp32 accumulator (WM, WN multiples of 16):
//     .zero()                          acc = 0
//     .mma<LA, LB>(sA, lda, sB, ldb, K) acc += A(WM x K) * B(K x WN); sA points at element
//                                      A(warp's first row, k = 0), sB at B(k = 0, warp's first col);
//                                      K multiple of Traits<T>::kK; shared memory, 32-B aligned.
//     .store(C, ldc) / .load(C, ldc)   the accumulator to/from fp32 memory (shared or global,
//                                      row-major, ldc a multiple of 4, C 32-byte aligned) at C,
//                                      the warp tile's top-left element.
//     .scale(s)                        acc *= s (element-wise ops on fragments are position-free).
//   warp_offset<BM, BN, WARPS_M, WARPS_N>(warp) -> {row, col} of a warp's tile in a CTA tile
//                                      split WARPS_M x WARPS_N (warp = threadIdx.x / 32).
//   block_sum<THREADS>(v, scratch)     deterministic block-wide fp32 sum (fixed order), result in
//                                      every thread; scratch: THREADS / 32 floats of shared memory.
//
// Typical CTA GEMM (C = A B^T, BM x BN tile, 2 x 2 warps):
//   __shared__ __align__(128) T sA[BM * (BK + kSkew<T>)], sB[BN * (BK + kSkew<T>)];
//   WarpTile<T, BM / 2, BN / 2> w; w.zero();
//   const auto o = warp_offset<BM, BN, 2, 2>(threadIdx.x / 32);
//   for (k0 = 0; k0 < K; k0 += BK) {
//     load_tile<T, BM, BK, 128>(sA, BK + kSkew<T>, A + m0 * lda + k0, lda, M - m0, K - k0);
//     load_tile<T, BN, BK, 128>(sB, BK + kSkew<T>, B + n0 * ldb + k0, ldb, N - n0, K - k0);
//     __syncthreads();
//     w.mma<RowMajor, ColMajor>(sA + o.row * (BK + kSkew<T>), BK + kSkew<T>,
//                               sB + o.col * (BK + kSkew<T>), BK + kSkew<T>, BK);
//     __syncthreads();
//   }
//   w.store(sC + o.row * ldc + o.col, ldc);  // then an element-wise epilogue from sC
#pragma once
#include <mma.h>

#include <type_traits>

#include "common.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "csrc/mma_tile.cuh needs sm_80 or newer (bf16 and tf32 WMMA); set SIGVLP_CUDA_ARCHS accordingly"
#endif

namespace sigvlp {
namespace mma {

namespace wmma = nvcuda::wmma;

struct RowMajor {
  using wmma_layout = wmma::row_major;
};
struct ColMajor {
  using wmma_layout = wmma::col_major;
};

template <typename T>
struct Traits;

template <>
struct Traits<__half> {
  static constexpr int kK = 16;
  using frag_elem = __half;
  static constexpr bool kSplit = false;
};
template <>
struct Traits<__nv_bfloat16> {
  static constexpr int kK = 16;
  using frag_elem = __nv_bfloat16;
  static constexpr bool kSplit = false;
};
template <>
struct Traits<float> {
  static constexpr int kK = 8;
  using frag_elem = wmma::precision::tf32;
  static constexpr bool kSplit = true;  // hi/lo split, four TF32 products
};

template <typename T>
inline constexpr int kSkew = static_cast<int>(16 / sizeof(T));

struct Offset {
  int row;
  int col;
};

template <int BM, int BN, int WARPS_M, int WARPS_N>
__device__ __forceinline__ Offset warp_offset(int warp) {
  static_assert(BM % (16 * WARPS_M) == 0 && BN % (16 * WARPS_N) == 0, "warp tiles must be multiples of 16");
  return {(warp / WARPS_N) * (BM / WARPS_M), (warp % WARPS_N) * (BN / WARPS_N)};
}

template <typename T, int ROWS, int COLS, int THREADS>
__device__ __forceinline__ void load_tile(T* __restrict__ s, int lds, const T* __restrict__ g, int64_t ldg,
                                          int64_t rows, int64_t cols) {
  constexpr int kVec = static_cast<int>(16 / sizeof(T));
  static_assert(COLS % kVec == 0, "tile width must be a multiple of a 16-byte vector");
  constexpr int kChunksPerRow = COLS / kVec;
  constexpr int kChunks = ROWS * kChunksPerRow;
  const bool vec_ok = (reinterpret_cast<uintptr_t>(g) % 16 == 0) && (ldg % kVec == 0) && (lds % kVec == 0);
  for (int c = static_cast<int>(threadIdx.x); c < kChunks; c += THREADS) {
    const int r = c / kChunksPerRow;
    const int k = (c % kChunksPerRow) * kVec;
    T* dst = s + r * lds + k;
    const T* src = g + static_cast<int64_t>(r) * ldg + k;
    if (vec_ok && r < rows && k + kVec <= cols) {
      *reinterpret_cast<Vec<T, kVec>*>(dst) = *reinterpret_cast<const Vec<T, kVec>*>(src);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) dst[e] = (r < rows && k + e < cols) ? src[e] : from_float<T>(0.f);
    }
  }
}

template <typename T, int WM, int WN>
struct WarpTile {
  static_assert(WM % 16 == 0 && WN % 16 == 0, "warp tile must be a multiple of 16 x 16");
  static constexpr int kK = Traits<T>::kK;
  static constexpr int FM = WM / 16;
  static constexpr int FN = WN / 16;
  using Elem = typename Traits<T>::frag_elem;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, kK, float>;

  Acc acc[FM][FN];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  }

  __device__ __forceinline__ void scale(float s) {
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j)
#pragma unroll
        for (int e = 0; e < acc[i][j].num_elements; ++e) acc[i][j].x[e] *= s;
  }

  template <typename LA, typename LB>
  __device__ __forceinline__ void mma(const T* sA, int lda, const T* sB, int ldb, int K) {
    using FragA = wmma::fragment<wmma::matrix_a, 16, 16, kK, Elem, typename LA::wmma_layout>;
    using FragB = wmma::fragment<wmma::matrix_b, 16, 16, kK, Elem, typename LB::wmma_layout>;
    for (int k = 0; k < K; k += kK) {
      FragA a[FM];
      FragB b[FN];
#pragma unroll
      for (int i = 0; i < FM; ++i) wmma::load_matrix_sync(a[i], sA + a_offset<LA>(16 * i, k, lda), lda);
#pragma unroll
      for (int j = 0; j < FN; ++j) wmma::load_matrix_sync(b[j], sB + b_offset<LB>(k, 16 * j, ldb), ldb);
      if constexpr (Traits<T>::kSplit) {
        FragA a_lo[FM];
        FragB b_lo[FN];
#pragma unroll
        for (int i = 0; i < FM; ++i) split_tf32(a[i], a_lo[i]);
#pragma unroll
        for (int j = 0; j < FN; ++j) split_tf32(b[j], b_lo[j]);
#pragma unroll
        for (int i = 0; i < FM; ++i)
#pragma unroll
          for (int j = 0; j < FN; ++j) {
            wmma::mma_sync(acc[i][j], a_lo[i], b_lo[j], acc[i][j]);
            wmma::mma_sync(acc[i][j], a_lo[i], b[j], acc[i][j]);
            wmma::mma_sync(acc[i][j], a[i], b_lo[j], acc[i][j]);
            wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
          }
      } else {
#pragma unroll
        for (int i = 0; i < FM; ++i)
#pragma unroll
          for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
      }
    }
  }

  __device__ __forceinline__ void store(float* C, int64_t ldc) const {
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j)
        wmma::store_matrix_sync(C + 16 * i * ldc + 16 * j, acc[i][j], static_cast<unsigned>(ldc),
                                wmma::mem_row_major);
  }

  __device__ __forceinline__ void load(const float* C, int64_t ldc) {
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j)
        wmma::load_matrix_sync(acc[i][j], C + 16 * i * ldc + 16 * j, static_cast<unsigned>(ldc),
                               wmma::mem_row_major);
  }

 private:
  template <typename L>
  static __device__ __forceinline__ int a_offset(int m, int k, int ld) {
    return std::is_same<L, RowMajor>::value ? m * ld + k : k * ld + m;
  }
  template <typename L>
  static __device__ __forceinline__ int b_offset(int k, int n, int ld) {
    return std::is_same<L, RowMajor>::value ? k * ld + n : n * ld + k;
  }
  // hi = tf32(x), lo = tf32(x - hi): the TF32 split of a loaded fp32 fragment.
  template <typename Frag>
  static __device__ __forceinline__ void split_tf32(Frag& hi, Frag& lo) {
#pragma unroll
    for (int e = 0; e < hi.num_elements; ++e) {
      const float x = hi.x[e];
      const float h = wmma::__float_to_tf32(x);
      hi.x[e] = h;
      lo.x[e] = wmma::__float_to_tf32(x - h);
    }
  }
};

template <int THREADS>
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  static_assert(THREADS % 32 == 0 && THREADS <= 1024, "whole warps only");
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = static_cast<int>(threadIdx.x) / 32;
  __syncthreads();  // scratch may still be read from a previous call
  if ((threadIdx.x & 31) == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < THREADS / 32; ++w) total += scratch[w];
  return total;
}

}  // namespace mma
}  // namespace sigvlp
