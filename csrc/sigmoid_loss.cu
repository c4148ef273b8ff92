// Blockwise SigLIP sigmoid loss on tensor cores (WMMA via mma_tile.cuh, sm_80+, fp32 accumulation).
//
// One kernel, one "pass" (same algorithm as kernels/sigmoid_loss.py): CTA p owns rows
// [64p, 64p + 64) of A (Na x D) and walks all of B (Nb x D) in 64-row tiles. Per tile:
//   1. S = A_blk B_tile^T (64 x 64, K = D in 32-wide steps) on tensor cores, fp32 accumulators;
//   2. element-wise epilogue from shared memory: logits = t*S + b, loss += softplus(-z*logits),
//      G = sigmoid(logits) - [z = +1], dt += G*S, db += G (per-thread fp32 sums);
//   3. with a gradient, dA_blk += G B_tile in 64-wide chunks of D, accumulating in an fp32
//      workspace (Na_pad x D_pad) that only this CTA touches (deterministic, no atomics).
// At the end the CTA writes dA = (t * inv_norm) * workspace in A's dtype and its three partial
// sums (fixed-order block reduction); the host sums the partials in a fixed order.
// Row pass: A = X, B = Y (loss, dX, dt, db). Column pass: A = Y, B = X, ids swapped (dY).
// Never stores anything of size Na x Nb. FLOPs per pass: 4 Na Nb D (2 without the gradient).
// fp32 inputs run on TF32 tensor cores with the hi/lo TF32 split of mma_tile.cuh (about fp32 accuracy).
#include "common.cuh"
#include "mma_tile.cuh"

namespace sigvlp {
namespace {

constexpr int kBlock = 64;    // rows of A per CTA = rows of a B tile = width of a D chunk
constexpr int kBK = 32;       // K step of S = A B^T
constexpr int kThreads = 128; // 4 warps, 2 x 2 warp tiles of 32 x 32
constexpr int kLdS = kBlock + 4;

template <typename T>
struct Layout {
  static constexpr int kLdK = kBK + mma::kSkew<T>;     // A and B K-step tiles
  static constexpr int kLdG = kBlock + mma::kSkew<T>;  // G tile and B D-chunk tile
  static constexpr bool kGInS = std::is_same<T, float>::value && kLdG == kLdS;  // fp32 G overwrites S
  static constexpr int kRegion1 = (2 * kBlock * kLdK * static_cast<int>(sizeof(T)) > kBlock * kLdG * static_cast<int>(sizeof(T)))
                                      ? 2 * kBlock * kLdK * static_cast<int>(sizeof(T))
                                      : kBlock * kLdG * static_cast<int>(sizeof(T));
  static constexpr int kRegionS = kBlock * kLdS * static_cast<int>(sizeof(float));
  static constexpr int kRegionG = kGInS ? 0 : kBlock * kLdG * static_cast<int>(sizeof(T));
  static constexpr int kBytes = kRegion1 + kRegionS + kRegionG;
  static_assert(kRegion1 % 128 == 0 && kRegionS % 128 == 0, "regions keep 128-byte alignment");
  static_assert(kBytes <= 48 * 1024, "static shared memory limit");
};

template <typename T>
__global__ void __launch_bounds__(kThreads) sigmoid_loss_pass_kernel(SigmoidLossPassArgs p) {
  using L = Layout<T>;
  __shared__ __align__(128) unsigned char smem[L::kBytes];
  __shared__ int64_t s_aid[kBlock];
  __shared__ float scratch[kThreads / 32];

  T* sA = reinterpret_cast<T*>(smem);
  T* sB = sA + kBlock * L::kLdK;
  T* sBd = reinterpret_cast<T*>(smem);  // phase 3 reuses region 1
  float* sS = reinterpret_cast<float*>(smem + L::kRegion1);
  T* sG = L::kGInS ? reinterpret_cast<T*>(sS) : reinterpret_cast<T*>(smem + L::kRegion1 + L::kRegionS);

  const T* __restrict__ A = static_cast<const T*>(p.a);
  const T* __restrict__ B = static_cast<const T*>(p.b);
  const bool with_grad = p.da != nullptr;
  const bool has_ids = p.a_ids != nullptr;
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kBlock;
  const int64_t rows_valid = p.na - r0 < kBlock ? p.na - r0 : kBlock;
  const float scale = *p.scale;
  const float bias = *p.bias;
  const mma::Offset o = mma::warp_offset<kBlock, kBlock, 2, 2>(tid / 32);

  for (int r = tid; r < kBlock; r += kThreads) s_aid[r] = (has_ids && r < rows_valid) ? p.a_ids[r0 + r] : r0 + r;

  float loss = 0.f, dt = 0.f, db = 0.f;
  const int c = tid % kBlock;  // this thread's column of every epilogue tile
  for (int64_t j0 = 0; j0 < p.nb; j0 += kBlock) {
    const int64_t cols_valid = p.nb - j0 < kBlock ? p.nb - j0 : kBlock;

    // 1. S = A_blk B_tile^T
    mma::WarpTile<T, 32, 32> s;
    s.zero();
    for (int64_t k0 = 0; k0 < p.d; k0 += kBK) {
      mma::load_tile<T, kBlock, kBK, kThreads>(sA, L::kLdK, A + r0 * p.a_stride + k0, p.a_stride, rows_valid,
                                               p.d - k0);
      mma::load_tile<T, kBlock, kBK, kThreads>(sB, L::kLdK, B + j0 * p.b_stride + k0, p.b_stride, cols_valid,
                                               p.d - k0);
      __syncthreads();
      s.template mma<mma::RowMajor, mma::ColMajor>(sA + o.row * L::kLdK, L::kLdK, sB + o.col * L::kLdK, L::kLdK,
                                                   kBK);
      __syncthreads();
    }
    s.store(sS + o.row * kLdS + o.col, kLdS);
    __syncthreads();

    // 2. element-wise epilogue (also writes G, 0 outside the matrix)
    const int64_t col = j0 + c;
    const bool col_ok = c < cols_valid;
    const int64_t b_id = has_ids ? (col_ok ? p.b_ids[col] : 0) : col;
    for (int r = tid / kBlock; r < kBlock; r += kThreads / kBlock) {
      const float sv = sS[r * kLdS + c];
      float g = 0.f;
      if (col_ok && r < rows_valid) {
        const bool pos = s_aid[r] == b_id;
        const float logit = fmaf(scale, sv, bias);
        const float u = pos ? -logit : logit;
        const float e = expf(-fabsf(logit));  // never overflows; |u| == |logit|
        loss += fmaxf(u, 0.f) + log1pf(e);
        g = (logit >= 0.f ? 1.f : e) / (1.f + e) - (pos ? 1.f : 0.f);
        dt += g * sv;
        db += g;
      }
      sG[r * L::kLdG + c] = from_float<T>(g);
    }

    // 3. dA_blk += G B_tile, chunk by chunk of D, in the fp32 workspace
    if (with_grad) {
      __syncthreads();
      for (int64_t d0 = 0; d0 < p.d; d0 += kBlock) {
        mma::load_tile<T, kBlock, kBlock, kThreads>(sBd, L::kLdG, B + j0 * p.b_stride + d0, p.b_stride, cols_valid,
                                                    p.d - d0);
        __syncthreads();
        float* w = p.workspace + (r0 + o.row) * p.workspace_ld + d0 + o.col;
        mma::WarpTile<T, 32, 32> acc;
        acc.load(w, p.workspace_ld);
        acc.template mma<mma::RowMajor, mma::RowMajor>(sG + o.row * L::kLdG, L::kLdG, sBd + o.col, L::kLdG, kBlock);
        acc.store(w, p.workspace_ld);
        __syncthreads();
      }
    }
    __syncthreads();
  }

  if (with_grad) {
    // Every warp's workspace writes are visible to the whole CTA after the barrier above.
    T* __restrict__ da = static_cast<T*>(p.da);
    const float coef = scale * p.inv_norm;
    const int64_t n = rows_valid * p.d;
    for (int64_t e = tid; e < n; e += kThreads) {
      const int64_t r = e / p.d, k = e % p.d;
      da[(r0 + r) * p.da_stride + k] = from_float<T>(p.workspace[(r0 + r) * p.workspace_ld + k] * coef);
    }
  }
  const float loss_sum = mma::block_sum<kThreads>(loss, scratch);
  const float dt_sum = mma::block_sum<kThreads>(dt, scratch);
  const float db_sum = mma::block_sum<kThreads>(db, scratch);
  if (tid == 0) {
    p.partials[3 * blockIdx.x + 0] = loss_sum;
    p.partials[3 * blockIdx.x + 1] = dt_sum;
    p.partials[3 * blockIdx.x + 2] = db_sum;
  }
}

template <typename T>
int launch(const SigmoidLossPassArgs& p) {
  const int64_t blocks = (p.na + kBlock - 1) / kBlock;
  if (blocks == 0) return 0;
  if (blocks > 0x7fffffff) return static_cast<int>(cudaErrorInvalidValue);
  SIGVLP_LAUNCH(static_cast<unsigned>(blocks), kThreads, 0, static_cast<cudaStream_t>(p.stream),
                sigmoid_loss_pass_kernel<T>)(p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int sigmoid_loss_pass(const SigmoidLossPassArgs& args) {
  if (args.da != nullptr && (args.workspace == nullptr || args.workspace_ld % kBlock != 0)) {
    return static_cast<int>(cudaErrorInvalidValue);  // the workspace must be (ceil(Na/64)*64, ceil(D/64)*64)
  }
  return dispatch_dtype(args.dtype, [&](auto tag) { return launch<decltype(tag)>(args); });
}

}  // namespace sigvlp
