// Newton-Schulz iteration on tensor cores: three kernels per step, batched over matrices.
//
// For wide matrices X (batch, p, q), p <= q, contiguous, one step with coefficients (a, b, c) is
//   syrk_kernel   A = s^2 X X^T       only the lower triangle of 64 x 64 tiles is computed; each
//                                     tile is stored at (i, j) and, transposed, at (j, i)
//   syrk_kernel   B = c A A + b A     A is symmetric, so (A A)[i, j] = sum_k A[i, k] A[j, k]^T: the
//                                     same row-by-row product, with b A fused into the epilogue
//   gemm_kernel   X' = s (a X + B X)  one GEMM whose epilogue adds a X and writes X' (any strides)
// s = 1 / max(||X||_F, eps) per matrix on the first step (the normalisation folded into the
// first products' epilogues), 1 afterwards. Operands are T (bf16, fp16: WMMA m16n16k16; fp32:
// split-TF32 WMMA, close to fp32), accumulation is fp32, intermediates A, B, X are stored as T.
// Tiles come from csrc/mma_tile.cuh (shared with sigmoid_loss.cu). grid = (tiles, matrices);
// all offsets are int64.
#include "common.cuh"
#include "mma_tile.cuh"

namespace sigvlp {
namespace {

constexpr int kTile = 64;       // CTA tile (rows and columns)
constexpr int kTileK = 32;      // K slice per shared-memory stage
constexpr int kThreads = 128;   // 4 warps, 2 x 2, each a 32 x 32 warp tile
constexpr int kLdC = kTile + 4; // fp32 staging row length (multiple of 4 for WMMA stores)

// (i, j), j <= i, of the t-th tile of a lower triangle in row-major order: t = i (i + 1) / 2 + j.
__device__ __forceinline__ void triangle_tile(int64_t t, int64_t& i, int64_t& j) {
  i = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(t) + 1.0) - 1.0) * 0.5);
  if ((i + 1) * (i + 2) / 2 <= t) ++i;  // exact fix-up of the floating-point root
  if (i * (i + 1) / 2 > t) --i;
  j = t - i * (i + 1) / 2;
}

// out = alpha s^2 X X^T + beta C for one lower-triangle tile, mirrored. X: (p, K) rows with row
// stride ld; out, C: (p, p) contiguous; scale: per-matrix s (nullptr: 1).
template <typename T>
__global__ void __launch_bounds__(kThreads) syrk_kernel(const T* __restrict__ x, int64_t x_stride_b, int64_t ld,
                                                        int64_t p, int64_t K, T* __restrict__ out,
                                                        const T* __restrict__ c_in, float alpha, float beta,
                                                        const float* __restrict__ scale) {
  constexpr int kLdS = kTileK + mma::kSkew<T>;
  __shared__ __align__(128) T s_a[kTile * kLdS];
  __shared__ __align__(128) T s_b[kTile * kLdS];
  __shared__ __align__(128) float s_c[kTile * kLdC];

  const int64_t b = blockIdx.y;
  int64_t ti, tj;
  triangle_tile(blockIdx.x, ti, tj);
  const int64_t i0 = ti * kTile, j0 = tj * kTile;
  const T* xb = x + b * x_stride_b;

  mma::WarpTile<T, kTile / 2, kTile / 2> acc;
  acc.zero();
  const auto o = mma::warp_offset<kTile, kTile, 2, 2>(static_cast<int>(threadIdx.x) / 32);
  for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
    mma::load_tile<T, kTile, kTileK, kThreads>(s_a, kLdS, xb + i0 * ld + k0, ld, p - i0, K - k0);
    mma::load_tile<T, kTile, kTileK, kThreads>(s_b, kLdS, xb + j0 * ld + k0, ld, p - j0, K - k0);
    __syncthreads();
    acc.template mma<mma::RowMajor, mma::ColMajor>(s_a + o.row * kLdS, kLdS, s_b + o.col * kLdS, kLdS, kTileK);
    __syncthreads();
  }
  if (scale != nullptr) {
    const float s = scale[b];
    alpha *= s * s;
  }
  acc.store(s_c + o.row * kLdC + o.col, kLdC);
  __syncthreads();

  const int64_t pp = p * p;
  T* ob = out + b * pp;
  const T* cb = c_in != nullptr ? c_in + b * pp : nullptr;
  // Direct tile: consecutive threads along a row (coalesced); the fp32 value stays in s_c.
  for (int e = static_cast<int>(threadIdx.x); e < kTile * kTile; e += kThreads) {
    const int r = e / kTile, c = e % kTile;
    const int64_t gr = i0 + r, gc = j0 + c;
    if (gr < p && gc < p) {
      float v = alpha * s_c[r * kLdC + c];
      if (cb != nullptr) v += beta * to_float(cb[gr * p + gc]);
      s_c[r * kLdC + c] = v;
      ob[gr * p + gc] = from_float<T>(v);
    }
  }
  if (ti == tj) return;
  __syncthreads();
  // Mirror tile (j, i): the same values transposed, consecutive threads along its rows.
  for (int e = static_cast<int>(threadIdx.x); e < kTile * kTile; e += kThreads) {
    const int c = e / kTile, r = e % kTile;
    const int64_t gr = i0 + r, gc = j0 + c;
    if (gr < p && gc < p) ob[gc * p + gr] = from_float<T>(s_c[r * kLdC + c]);
  }
}

// out = s (a X + B X) for one 64 x 64 tile. B: (p, p) contiguous; X: (p, q) contiguous;
// out: any strides; scale: per-matrix s (nullptr: 1).
template <typename T>
__global__ void __launch_bounds__(kThreads) gemm_kernel(const T* __restrict__ bm, const T* __restrict__ x,
                                                        T* __restrict__ out, int64_t out_stride_b,
                                                        int64_t out_stride_r, int64_t out_stride_c, int64_t p,
                                                        int64_t q, int64_t tiles_n, float a_coef,
                                                        const float* __restrict__ scale) {
  constexpr int kLdA = kTileK + mma::kSkew<T>;
  constexpr int kLdB = kTile + mma::kSkew<T>;
  __shared__ __align__(128) T s_a[kTile * kLdA];
  __shared__ __align__(128) T s_b[kTileK * kLdB];
  __shared__ __align__(128) float s_c[kTile * kLdC];

  const int64_t b = blockIdx.y;
  const int64_t m0 = (static_cast<int64_t>(blockIdx.x) / tiles_n) * kTile;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) % tiles_n) * kTile;
  const T* bb = bm + b * p * p;
  const T* xb = x + b * p * q;

  mma::WarpTile<T, kTile / 2, kTile / 2> acc;
  acc.zero();
  const auto o = mma::warp_offset<kTile, kTile, 2, 2>(static_cast<int>(threadIdx.x) / 32);
  for (int64_t k0 = 0; k0 < p; k0 += kTileK) {
    mma::load_tile<T, kTile, kTileK, kThreads>(s_a, kLdA, bb + m0 * p + k0, p, p - m0, p - k0);
    mma::load_tile<T, kTileK, kTile, kThreads>(s_b, kLdB, xb + k0 * q + n0, q, p - k0, q - n0);
    __syncthreads();
    acc.template mma<mma::RowMajor, mma::RowMajor>(s_a + o.row * kLdA, kLdA, s_b + o.col, kLdB, kTileK);
    __syncthreads();
  }
  acc.store(s_c + o.row * kLdC + o.col, kLdC);
  __syncthreads();

  const float s = scale != nullptr ? scale[b] : 1.f;
  T* ob = out + b * out_stride_b;
  for (int e = static_cast<int>(threadIdx.x); e < kTile * kTile; e += kThreads) {
    const int r = e / kTile, c = e % kTile;
    const int64_t gr = m0 + r, gc = n0 + c;
    if (gr < p && gc < q) {
      const float v = s * (s_c[r * kLdC + c] + a_coef * to_float(xb[gr * q + gc]));
      ob[gr * out_stride_r + gc * out_stride_c] = from_float<T>(v);
    }
  }
}

// steps = 0: out = s X.
template <typename T>
__global__ void __launch_bounds__(256) scale_kernel(const T* __restrict__ x, T* __restrict__ out,
                                                    int64_t out_stride_b, int64_t out_stride_r,
                                                    int64_t out_stride_c, int64_t p, int64_t q,
                                                    const float* __restrict__ scale) {
  const int64_t b = blockIdx.y;
  const float s = scale[b];
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < p * q;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / q, c = e % q;
    out[b * out_stride_b + r * out_stride_r + c * out_stride_c] = from_float<T>(s * to_float(x[b * p * q + e]));
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
int run(const NewtonSchulzArgs& a) {
  const auto stream = static_cast<cudaStream_t>(a.stream);
  const int64_t p = a.rows, q = a.cols;
  const T* x = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);
  T* gram = static_cast<T*>(a.gram);
  T* poly = static_cast<T*>(a.poly);
  T* scratch[2] = {static_cast<T*>(a.scratch0), static_cast<T*>(a.scratch1)};
  const int64_t tiles = ceil_div(p, kTile);
  const int64_t n_tri = tiles * (tiles + 1) / 2;
  const int64_t tiles_n = ceil_div(q, kTile);
  const int64_t n_gemm = tiles * tiles_n;
  if (n_tri > 0x7fffffff || n_gemm > 0x7fffffff) return static_cast<int>(cudaErrorInvalidConfiguration);
  const int64_t max_grid = max_grid_y();  // matrices per launch (gridDim.y)

  if (a.steps == 0) {
    for (int64_t b0 = 0; b0 < a.batch; b0 += max_grid) {
      const int64_t nb = a.batch - b0 < max_grid ? a.batch - b0 : max_grid;
      const int64_t blocks = ceil_div(p * q, 256) < 1024 ? ceil_div(p * q, 256) : 1024;
      SIGVLP_LAUNCH(dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(nb)), 256, 0, stream, scale_kernel<T>)(
          x + b0 * p * q, out + b0 * a.out_stride_batch, a.out_stride_batch, a.out_stride_row, a.out_stride_col, p,
          q, a.inv_norm + b0);
    }
    return static_cast<int>(cudaGetLastError());
  }

  const T* src = x;
  for (int step = 0; step < a.steps; ++step) {
    const float ca = a.coefficients[3 * step], cb = a.coefficients[3 * step + 1], cc = a.coefficients[3 * step + 2];
    const bool last = step == a.steps - 1;
    T* dst = last ? out : scratch[(a.steps - 1 - step) % 2 == 1 ? 0 : 1];
    const int64_t sb = last ? a.out_stride_batch : p * q;
    const int64_t sr = last ? a.out_stride_row : q;
    const int64_t sc = last ? a.out_stride_col : 1;
    const float* scale = step == 0 ? a.inv_norm : nullptr;
    for (int64_t b0 = 0; b0 < a.batch; b0 += max_grid) {
      const int64_t nb = a.batch - b0 < max_grid ? a.batch - b0 : max_grid;
      const dim3 tri(static_cast<unsigned>(n_tri), static_cast<unsigned>(nb));
      const dim3 full(static_cast<unsigned>(n_gemm), static_cast<unsigned>(nb));
      const float* sc0 = scale != nullptr ? scale + b0 : nullptr;
      SIGVLP_LAUNCH(tri, kThreads, 0, stream, syrk_kernel<T>)(src + b0 * p * q, p * q, q, p, q, gram + b0 * p * p,
                                                              nullptr, 1.f, 0.f, sc0);
      SIGVLP_LAUNCH(tri, kThreads, 0, stream, syrk_kernel<T>)(gram + b0 * p * p, p * p, p, p, p, poly + b0 * p * p,
                                                              gram + b0 * p * p, cc, cb, nullptr);
      SIGVLP_LAUNCH(full, kThreads, 0, stream, gemm_kernel<T>)(poly + b0 * p * p, src + b0 * p * q, dst + b0 * sb, sb,
                                                               sr, sc, p, q, tiles_n, ca, sc0);
    }
    src = dst;
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int newton_schulz(const NewtonSchulzArgs& args) {
  if (args.batch == 0 || args.rows == 0 || args.cols == 0) return 0;
  if (args.rows > args.cols || args.steps < 0) return static_cast<int>(cudaErrorInvalidValue);
  return dispatch_dtype(args.dtype, [&](auto tag) { return run<decltype(tag)>(args); });
}

}  // namespace sigvlp
