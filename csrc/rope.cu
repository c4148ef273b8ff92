// 3D rotary position embedding over varlen packed sequences.
//
// One thread owns a (token, group of rotary pairs) slot: it decodes the token's (t, h, w)
// position once (binary search in cu_seqlens, then the t-major grid decode, or a read of the
// positions table), computes the pairs' angles in fp32 with sincosf, and reuses them for every
// head. No cos/sin tables are read. Angles: pos_a * theta^(-j / n_a) for pair j of axis a.
#include <cmath>

#include "common.cuh"

namespace sigvlp {
namespace {

// Per-pair rotation speeds theta^(-j / n_a), computed on the host in fp64 and rounded once to
// fp32 (correctly rounded), passed by value as a kernel argument. Forming them on the device as
// exp2f(hi) * (1 + lo ln2) was up to a few ulp off (exp2f itself is 2 ulp on the GPU), which at
// positions ~300 put the angles, and so the outputs, at twice torch's fp32 error (found by the
// CPU emulation, tests/test_cuda_emu.py). Pairs past kTablePairs (head_dim > 512) use the same
// formula in fp64 on the device.
constexpr int kTablePairs = 256;

struct PairTable {
  float scale[kTablePairs];      // theta^(-j / n_a); 0 for unrotated pairs
  int8_t axis[kTablePairs];      // 0 = t, 1 = h, 2 = w, -1 = unrotated
};

struct PairAxis {
  float pos_scale;
  int axis;
};

__host__ __device__ __forceinline__ void pair_index(int64_t p, int n_t, int n_h, int n_w, int& axis, int& j, int& n) {
  axis = -1;
  j = 0;
  n = 1;
  if (p < n_t) {
    axis = 0; j = static_cast<int>(p); n = n_t;
  } else if (p < n_t + n_h) {
    axis = 1; j = static_cast<int>(p) - n_t; n = n_h;
  } else if (p < static_cast<int64_t>(n_t) + n_h + n_w) {
    axis = 2; j = static_cast<int>(p) - n_t - n_h; n = n_w;
  }
}

__device__ __forceinline__ PairAxis pair_axis(int64_t p, const PairTable& table, int n_t, int n_h, int n_w,
                                              double log2_theta) {
  if (p < kTablePairs) return {table.scale[p], table.axis[p]};
  int axis, j, n;
  pair_index(p, n_t, n_h, n_w, axis, j, n);
  if (axis < 0) return {0.f, axis};
  return {static_cast<float>(exp2(-(static_cast<double>(j) / static_cast<double>(n)) * log2_theta)), axis};
}

PairTable make_pair_table(const Rope3dArgs& a) {
  PairTable t{};
  for (int p = 0; p < kTablePairs; ++p) {
    int axis, j, n;
    pair_index(p, a.n_t, a.n_h, a.n_w, axis, j, n);
    t.axis[p] = static_cast<int8_t>(axis);
    t.scale[p] = axis < 0 ? 0.f : static_cast<float>(std::exp2(-(static_cast<double>(j) / n) * a.log2_theta));
  }
  return t;
}

// PAIRS rotary pairs per thread. VECTOR: the thread's elements are loaded as aligned vectors.
template <typename T, int PAIRS, bool INTERLEAVED, bool VECTOR>
__global__ void __launch_bounds__(256) rope3d_kernel(Rope3dArgs a, int64_t groups_per_token, PairTable table) {
  const T* __restrict__ x = static_cast<const T*>(a.x);
  T* __restrict__ out = static_cast<T*>(a.out);
  const int64_t half = a.head_dim / 2;
  const int64_t n_slots = a.total_tokens * groups_per_token;
  for (int64_t slot = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; slot < n_slots;
       slot += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t token = slot / groups_per_token;
    const int64_t first_pair = (slot % groups_per_token) * PAIRS;

    float pos[3];
    if (a.positions != nullptr) {
      pos[0] = a.positions[token * 3 + 0];
      pos[1] = a.positions[token * 3 + 1];
      pos[2] = a.positions[token * 3 + 2];
    } else {
      // Memory-safe for any int32 cu_seqlens / grid values (they are not validated on the GPU
      // path): s is in [0, batch), the start is clamped to [0, token], H and W to >= 1, so bad
      // values give wrong positions, never an out-of-bounds access or a division by zero.
      const int64_t s = find_sequence(a.cu_seqlens, a.batch, token);
      const int64_t start = static_cast<int64_t>(__ldg(a.cu_seqlens + s));
      const int64_t n = token - (start < 0 ? 0 : (start > token ? token : start));
      int64_t H = __ldg(a.grid_thw + 3 * s + 1), W = __ldg(a.grid_thw + 3 * s + 2);
      H = H < 1 ? 1 : H;
      W = W < 1 ? 1 : W;
      pos[0] = static_cast<float>(n / (H * W));
      pos[1] = static_cast<float>((n / W) % H);
      pos[2] = static_cast<float>(n % W);
    }

    float cs[PAIRS], sn[PAIRS];
#pragma unroll
    for (int i = 0; i < PAIRS; ++i) {
      const int64_t p = first_pair + i;
      cs[i] = 1.f;
      sn[i] = 0.f;
      if (p < half) {
        const PairAxis pa = pair_axis(p, table, a.n_t, a.n_h, a.n_w, a.log2_theta);
        if (pa.axis >= 0) {
          sincosf(pos[pa.axis] * pa.pos_scale, &sn[i], &cs[i]);
          if (a.inverse) sn[i] = -sn[i];
        }
      }
    }

    for (int64_t head = 0; head < a.nheads; ++head) {
      const T* src = x + token * a.x_stride_token + head * a.x_stride_head;
      T* dst = out + token * a.out_stride_token + head * a.out_stride_head;
      // First and second element of each pair, in fp32.
      float e0[PAIRS], e1[PAIRS];
      if constexpr (INTERLEAVED) {
        constexpr int N = 2 * PAIRS;
        T buf[N];
        if constexpr (VECTOR) {
          const Vec<T, N> v = *reinterpret_cast<const Vec<T, N>*>(src + 2 * first_pair);
#pragma unroll
          for (int k = 0; k < N; ++k) buf[k] = v.v[k];
        } else {
#pragma unroll
          for (int k = 0; k < N; ++k) buf[k] = (first_pair + k / 2 < half) ? src[2 * first_pair + k] : T{};
        }
#pragma unroll
        for (int i = 0; i < PAIRS; ++i) {
          e0[i] = to_float(buf[2 * i]);
          e1[i] = to_float(buf[2 * i + 1]);
        }
#pragma unroll
        for (int i = 0; i < PAIRS; ++i) {
          buf[2 * i] = from_float<T>(e0[i] * cs[i] - e1[i] * sn[i]);
          buf[2 * i + 1] = from_float<T>(e1[i] * cs[i] + e0[i] * sn[i]);
        }
        if constexpr (VECTOR) {
          Vec<T, N> v;
#pragma unroll
          for (int k = 0; k < N; ++k) v.v[k] = buf[k];
          *reinterpret_cast<Vec<T, N>*>(dst + 2 * first_pair) = v;
        } else {
#pragma unroll
          for (int k = 0; k < N; ++k)
            if (first_pair + k / 2 < half) dst[2 * first_pair + k] = buf[k];
        }
      } else {
        T lo[PAIRS], hi[PAIRS];
        if constexpr (VECTOR) {
          const Vec<T, PAIRS> vlo = *reinterpret_cast<const Vec<T, PAIRS>*>(src + first_pair);
          const Vec<T, PAIRS> vhi = *reinterpret_cast<const Vec<T, PAIRS>*>(src + half + first_pair);
#pragma unroll
          for (int i = 0; i < PAIRS; ++i) {
            lo[i] = vlo.v[i];
            hi[i] = vhi.v[i];
          }
        } else {
#pragma unroll
          for (int i = 0; i < PAIRS; ++i) {
            const bool ok = first_pair + i < half;
            lo[i] = ok ? src[first_pair + i] : T{};
            hi[i] = ok ? src[half + first_pair + i] : T{};
          }
        }
#pragma unroll
        for (int i = 0; i < PAIRS; ++i) {
          e0[i] = to_float(lo[i]);
          e1[i] = to_float(hi[i]);
          lo[i] = from_float<T>(e0[i] * cs[i] - e1[i] * sn[i]);
          hi[i] = from_float<T>(e1[i] * cs[i] + e0[i] * sn[i]);
        }
        if constexpr (VECTOR) {
          Vec<T, PAIRS> vlo, vhi;
#pragma unroll
          for (int i = 0; i < PAIRS; ++i) {
            vlo.v[i] = lo[i];
            vhi.v[i] = hi[i];
          }
          *reinterpret_cast<Vec<T, PAIRS>*>(dst + first_pair) = vlo;
          *reinterpret_cast<Vec<T, PAIRS>*>(dst + half + first_pair) = vhi;
        } else {
#pragma unroll
          for (int i = 0; i < PAIRS; ++i) {
            if (first_pair + i < half) {
              dst[first_pair + i] = lo[i];
              dst[half + first_pair + i] = hi[i];
            }
          }
        }
      }
    }
  }
}

bool aligned_to(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename T, int PAIRS, bool INTERLEAVED, bool VECTOR>
int launch(const Rope3dArgs& a) {
  const int64_t half = a.head_dim / 2;
  const int64_t groups = (half + PAIRS - 1) / PAIRS;
  const int64_t slots = a.total_tokens * groups;
  if (slots == 0) return 0;
  constexpr int kThreads = 256;
  const int64_t wanted = (slots + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(multiprocessor_count()) * 32;  // grid-stride beyond this
  const unsigned blocks = static_cast<unsigned>(wanted < cap ? wanted : cap);
  SIGVLP_LAUNCH(blocks, kThreads, 0, static_cast<cudaStream_t>(a.stream),
                rope3d_kernel<T, PAIRS, INTERLEAVED, VECTOR>)(a, groups, make_pair_table(a));
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_for_type(const Rope3dArgs& a) {
  // 16-byte accesses when the head layout allows them, otherwise one pair per thread.
  constexpr int kVecElems = 16 / sizeof(T);
  const int64_t half = a.head_dim / 2;
  const int64_t bytes = 16;
  const bool strides_ok = (a.x_stride_token % kVecElems == 0) && (a.x_stride_head % kVecElems == 0) &&
                          (a.out_stride_token % kVecElems == 0) && (a.out_stride_head % kVecElems == 0) &&
                          aligned_to(a.x, bytes) && aligned_to(a.out, bytes);
  if (a.interleaved) {
    if (strides_ok && a.head_dim % kVecElems == 0) return launch<T, kVecElems / 2, true, true>(a);
    return launch<T, 1, true, false>(a);
  }
  if (strides_ok && half % kVecElems == 0) return launch<T, kVecElems, false, true>(a);
  return launch<T, 1, false, false>(a);
}

}  // namespace

int rope3d(const Rope3dArgs& args) {
  // Shape facts only (free on the host): the grid path needs at least one sequence.
  if (args.total_tokens > 0 && args.positions == nullptr &&
      (args.batch < 1 || args.cu_seqlens == nullptr || args.grid_thw == nullptr)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (args.head_dim % 2 != 0 || args.n_t < 0 || args.n_h < 0 || args.n_w < 0) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  return dispatch_dtype(args.dtype, [&](auto tag) { return launch_for_type<decltype(tag)>(args); });
}

}  // namespace sigvlp
