// Emulation of the WMMA API of <mma.h> (nvcuda::wmma) as warp-collective operations (see
// ../sigvlp_emu.h). load_matrix_sync, store_matrix_sync and mma_sync wait for all 32 lanes of
// the warp, then the last lane to arrive does the whole warp's work; they synchronise memory
// among the warp's lanes, as the _sync operations do.
//
// Fragment element order is deliberately NOT the hardware's: element i of lane l holds the
// matrix element at linear position ((32 i + l) * 37 + 11) mod (rows * cols), row-major. Code
// that treats fragments as opaque (element-wise operations on frag.x[i] only, as the CUDA
// programming guide requires) gives the same results as on hardware; code that assumes a
// layout gives wrong results here.
//
// Arithmetic: half and bf16 products are exact in fp32 and summed in fp32 in k order; tf32
// operands are truncated to tf32 (the low 13 mantissa bits ignored) before multiplying, as the
// tensor cores do with fp32 data; __float_to_tf32 rounds to nearest with ties away from zero
// (cvt.rna.tf32.f32).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"

namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

namespace detail {
template <typename T>
struct storage {
  using type = T;
};
template <>
struct storage<precision::tf32> {
  using type = float;
};
template <typename Use, int M, int N, int K>
struct shape;
template <int M, int N, int K>
struct shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};
inline float to_f(float v) { return v; }
inline float to_f(__half v) { return __half2float(v); }
inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
inline T from_f(float v) {
  if constexpr (std::is_same<T, __half>::value) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return __float2bfloat16_rn(v);
  } else {
    return v;
  }
}
inline float tf32_truncate(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  if ((b & 0x7f800000u) != 0x7f800000u) b &= 0xffffe000u;
  std::memcpy(&v, &b, 4);
  return v;
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  using element_type = typename detail::storage<T>::type;
  static constexpr int rows = detail::shape<Use, M, N, K>::rows;
  static constexpr int cols = detail::shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols / 32;
  static_assert(rows * cols % 32 == 0, "fragment size");
  element_type x[num_elements];
  // Emulation layout: (row, col) of element i of `lane`.
  static int position(int lane, int i) { return ((32 * i + lane) * 37 + 11) % (rows * cols); }
};

template <typename Use, int M, int N, int K, typename T, typename L, typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, const V& v) {
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = detail::from_f<typename fragment<Use, M, N, K, T, L>::element_type>(detail::to_f(v));
}

inline float __float_to_tf32(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  if ((b & 0x7f800000u) == 0x7f800000u) return v;  // inf, nan unchanged
  b += 0x1000u;  // round the magnitude to nearest, ties away from zero
  b &= 0xffffe000u;
  std::memcpy(&v, &b, 4);
  return v;
}

namespace detail {
template <typename Frag, typename P>
struct LoadReq {
  Frag* frag;
  const P* ptr;
  unsigned ldm;
  bool col;
};
template <typename Frag, typename P>
inline void load(Frag& f, const P* p, unsigned ldm, bool col_major) {
  LoadReq<Frag, P> req{&f, p, ldm, col_major};
  void** reqs = ::sigvlp_emu::warp_collective_begin(0xffffffffu, &req, "load_matrix_sync");
  if (reqs == nullptr) return;
  for (int lane = 0; lane < 32; ++lane) {
    auto* r = static_cast<LoadReq<Frag, P>*>(reqs[lane]);
    if (r->ptr != p || r->ldm != ldm || r->col != col_major)
      ::sigvlp_emu::kernel_fail("load_matrix_sync: the lanes of a warp passed different pointers or strides");
  }
  for (int lane = 0; lane < 32; ++lane) {
    Frag* fl = static_cast<LoadReq<Frag, P>*>(reqs[lane])->frag;
    for (int i = 0; i < Frag::num_elements; ++i) {
      const int pos = Frag::position(lane, i);
      const int r = pos / Frag::cols, c = pos % Frag::cols;
      const P v = col_major ? p[static_cast<int64_t>(c) * ldm + r] : p[static_cast<int64_t>(r) * ldm + c];
      fl->x[i] = from_f<typename Frag::element_type>(to_f(v));
    }
  }
  ::sigvlp_emu::warp_collective_end();
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename L, typename P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "accumulator loads need a layout_t");
  detail::load(f, p, ldm, std::is_same<L, col_major>::value);
}
template <int M, int N, int K, typename T, typename P>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T, void>& f, const P* p, unsigned ldm, layout_t layout) {
  detail::load(f, p, ldm, layout == mem_col_major);
}

template <int M, int N, int K, typename T, typename P>
inline void store_matrix_sync(P* p, const fragment<accumulator, M, N, K, T, void>& f, unsigned ldm, layout_t layout) {
  using Frag = fragment<accumulator, M, N, K, T, void>;
  struct Req {
    const Frag* frag;
    P* ptr;
    unsigned ldm;
    layout_t layout;
  } req{&f, p, ldm, layout};
  void** reqs = ::sigvlp_emu::warp_collective_begin(0xffffffffu, &req, "store_matrix_sync");
  if (reqs == nullptr) return;
  for (int lane = 0; lane < 32; ++lane) {
    const Req* r = static_cast<const Req*>(reqs[lane]);
    if (r->ptr != p || r->ldm != ldm || r->layout != layout)
      ::sigvlp_emu::kernel_fail("store_matrix_sync: the lanes of a warp passed different pointers or strides");
  }
  for (int lane = 0; lane < 32; ++lane) {
    const Frag* fl = static_cast<const Req*>(reqs[lane])->frag;
    for (int i = 0; i < Frag::num_elements; ++i) {
      const int pos = Frag::position(lane, i);
      const int r = pos / Frag::cols, c = pos % Frag::cols;
      P* dst = layout == mem_col_major ? p + static_cast<int64_t>(c) * ldm + r : p + static_cast<int64_t>(r) * ldm + c;
      *dst = detail::from_f<P>(detail::to_f(fl->x[i]));
    }
  }
  ::sigvlp_emu::warp_collective_end();
}

template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB, typename TC>
inline void mma_sync(fragment<accumulator, M, N, K, TC, void>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, TC, void>& c) {
  static_assert(std::is_same<TA, TB>::value, "A and B fragments of one precision");
  static_assert((std::is_same<TA, precision::tf32>::value && M == 16 && N == 16 && K == 8) ||
                    ((std::is_same<TA, __half>::value || std::is_same<TA, __nv_bfloat16>::value) && M == 16 &&
                     N == 16 && K == 16),
                "emulated WMMA shapes: m16n16k16 (half, bf16), m16n16k8 (tf32)");
  using FA = fragment<matrix_a, M, N, K, TA, LA>;
  using FB = fragment<matrix_b, M, N, K, TB, LB>;
  using FC = fragment<accumulator, M, N, K, TC, void>;
  struct Req {
    FC* d;
    const FA* a;
    const FB* b;
    const FC* c;
  } req{&d, &a, &b, &c};
  void** reqs = ::sigvlp_emu::warp_collective_begin(0xffffffffu, &req, "mma_sync");
  if (reqs == nullptr) return;
  float A[M][K], B[K][N], C[M][N];
  for (int lane = 0; lane < 32; ++lane) {
    const Req* r = static_cast<const Req*>(reqs[lane]);
    for (int i = 0; i < FA::num_elements; ++i) {
      const int pos = FA::position(lane, i);
      float v = detail::to_f(r->a->x[i]);
      if (std::is_same<TA, precision::tf32>::value) v = detail::tf32_truncate(v);
      A[pos / K][pos % K] = v;
    }
    for (int i = 0; i < FB::num_elements; ++i) {
      const int pos = FB::position(lane, i);
      float v = detail::to_f(r->b->x[i]);
      if (std::is_same<TB, precision::tf32>::value) v = detail::tf32_truncate(v);
      B[pos / N][pos % N] = v;
    }
    for (int i = 0; i < FC::num_elements; ++i) {
      const int pos = FC::position(lane, i);
      C[pos / N][pos % N] = detail::to_f(r->c->x[i]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float acc = C[m][n];
      // The operands have at most 11 significant bits, so each product is exact in fp32 and
      // this is one rounding per step, as a fused multiply-add.
      for (int k = 0; k < K; ++k) acc += A[m][k] * B[k][n];
      C[m][n] = acc;
    }
  for (int lane = 0; lane < 32; ++lane) {
    const Req* r = static_cast<const Req*>(reqs[lane]);
    for (int i = 0; i < FC::num_elements; ++i) {
      const int pos = FC::position(lane, i);
      r->d->x[i] = detail::from_f<typename FC::element_type>(C[pos / N][pos % N]);
    }
  }
  ::sigvlp_emu::warp_collective_end();
}

}  // namespace wmma
}  // namespace nvcuda
