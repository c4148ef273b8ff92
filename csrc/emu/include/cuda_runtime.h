// Emulation of <cuda_runtime.h> for compiling csrc/*.cu with a host C++ compiler (see
// ../sigvlp_emu.h). Only what the kernels in csrc/ use, plus the common neighbours.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../sigvlp_emu.h"

// ---- keywords ----
#define __global__
#define __device__
#define __host__
#define __noinline__ __attribute__((noinline))
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __constant__ static
// Static shared memory is one object per (kernel, OS worker): thread_local at block scope is
// static per OS thread, and each block's fibers share their worker's OS thread. The ASan build
// uses plain statics (globals get redzones) with a single worker.
#if defined(SIGVLP_EMU_SHARED_STATIC)
#define __shared__ static
#else
#define __shared__ thread_local
#endif
#define threadIdx (::sigvlp_emu::current().thread_idx)
#define blockIdx (::sigvlp_emu::current().block_idx)
#define blockDim (::sigvlp_emu::current().block_dim)
#define gridDim (::sigvlp_emu::current().grid_dim)
#define warpSize 32

// ---- errors and runtime API ----
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorLaunchFailure = 719,
};
typedef cudaError_t cudaError;
enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxGridDimX = 5,
  cudaDevAttrMaxGridDimY = 6,
  cudaDevAttrMaxGridDimZ = 7,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
struct cudaFuncAttributes {
  size_t sharedSizeBytes;
  size_t constSizeBytes;
  size_t localSizeBytes;
  int maxThreadsPerBlock;
  int numRegs;
  int ptxVersion;
  int binaryVersion;
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

const char* cudaGetErrorString(cudaError_t error);
inline cudaError_t cudaGetLastError() { return static_cast<cudaError_t>(::sigvlp_emu::get_last_error(true)); }
inline cudaError_t cudaPeekAtLastError() { return static_cast<cudaError_t>(::sigvlp_emu::get_last_error(false)); }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
inline cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDriverGetVersion(int* v) {
  *v = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  const auto& c = ::sigvlp_emu::config();
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrMaxGridDimX: *value = static_cast<int>(c.max_grid_x); break;
    case cudaDevAttrMaxGridDimY: *value = static_cast<int>(c.max_grid_y); break;
    case cudaDevAttrMaxGridDimZ: *value = static_cast<int>(c.max_grid_z); break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 * 1024; break;
    case cudaDevAttrMultiProcessorCount: *value = c.sm_count; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 99 * 1024; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
template <typename F>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attrs, F) {
  std::memset(attrs, 0, sizeof(*attrs));
  attrs->maxThreadsPerBlock = 1024;
  return cudaSuccess;
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) {
  return cudaSuccess;
}

// ---- vector types ----
#define SIGVLP_EMU_VEC2(name, T, A) \
  struct alignas(A) name {          \
    T x, y;                         \
  };                                \
  inline name make_##name(T x, T y) { return name{x, y}; }
#define SIGVLP_EMU_VEC4(name, T, A) \
  struct alignas(A) name {          \
    T x, y, z, w;                   \
  };                                \
  inline name make_##name(T x, T y, T z, T w) { return name{x, y, z, w}; }
SIGVLP_EMU_VEC2(float2, float, 8)
SIGVLP_EMU_VEC4(float4, float, 16)
SIGVLP_EMU_VEC2(int2, int, 8)
SIGVLP_EMU_VEC4(int4, int, 16)
SIGVLP_EMU_VEC2(uint2, unsigned int, 8)
SIGVLP_EMU_VEC4(uint4, unsigned int, 16)
SIGVLP_EMU_VEC2(double2, double, 16)
SIGVLP_EMU_VEC2(longlong2, long long, 16)
struct float3 {
  float x, y, z;
};
inline float3 make_float3(float x, float y, float z) { return {x, y, z}; }
struct int3 {
  int x, y, z;
};
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return {x, y, z}; }
#undef SIGVLP_EMU_VEC2
#undef SIGVLP_EMU_VEC4

// ---- barriers, warp primitives ----
inline void __syncthreads() { ::sigvlp_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::sigvlp_emu::syncwarp(mask); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

namespace sigvlp_emu {
template <typename T>
inline T shfl(unsigned mask, T v, int kind, int arg, int width) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a value up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = warp_exchange(mask, bits, kind, arg, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
}  // namespace sigvlp_emu

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return ::sigvlp_emu::shfl(mask, v, 0, src, width);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::sigvlp_emu::shfl(mask, v, 1, static_cast<int>(delta), width);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::sigvlp_emu::shfl(mask, v, 2, static_cast<int>(delta), width);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::sigvlp_emu::shfl(mask, v, 3, lane_mask, width);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return static_cast<unsigned>(::sigvlp_emu::warp_exchange(mask, pred != 0, 4, 0, 32));
}
inline int __any_sync(unsigned mask, int pred) {
  return static_cast<int>(::sigvlp_emu::warp_exchange(mask, pred != 0, 5, 0, 32));
}
inline int __all_sync(unsigned mask, int pred) {
  return static_cast<int>(::sigvlp_emu::warp_exchange(mask, pred != 0, 6, 0, 32));
}
inline unsigned __activemask() { return 0xffffffffu; }

// ---- loads, atomics ----
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
template <typename T>
inline T atomicAdd(T* p, T v) {
  if constexpr (std::is_integral<T>::value) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
  } else {
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange_n(p, &old, old + v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
  }
}
template <typename T>
inline T atomicSub(T* p, T v) {
  return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED);
}
template <typename T>
inline T atomicExch(T* p, T v) {
  return __atomic_exchange_n(p, v, __ATOMIC_RELAXED);
}
template <typename T>
inline T atomicCAS(T* p, T expected, T desired) {
  __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return expected;
}
template <typename T>
inline T atomicMax(T* p, T v) {
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
template <typename T>
inline T atomicMin(T* p, T v) {
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (old > v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}

// ---- math intrinsics (fast variants computed accurately) ----
using std::sqrt;
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline void __sincosf(float x, float* s, float* c) {
  *s = std::sin(x);
  *c = std::cos(x);
}
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.f / x; }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline int __float2int_rn(float x) { return static_cast<int>(std::nearbyint(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline float __int_as_float(int x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
inline int __float_as_int(float f) {
  int x;
  std::memcpy(&x, &f, 4);
  return x;
}
inline unsigned __float_as_uint(float f) {
  unsigned x;
  std::memcpy(&x, &f, 4);
  return x;
}
inline float __uint_as_float(unsigned x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
// sincosf, exp2f, expf, log1pf, fmaf, fmaxf, fabsf, ... come from the C library (<cmath>).
