// Device helpers shared by the op kernels in csrc/.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launchers.h"

// Kernel launch: SIGVLP_LAUNCH(grid, block, dynamic_smem, stream, kernel)(args...). Under nvcc it
// is the <<<...>>> launch; in the CPU emulation (csrc/emu, SIGVLP_EMU defined) it runs the grid
// on the emulated SIMT machine. Dynamic shared memory: SIGVLP_EXTERN_SHARED(T, name) declares
// `name` as T[] (16-byte aligned) in both.
#ifdef SIGVLP_EMU
#define SIGVLP_LAUNCH(grid, block, smem, stream, ...) ::sigvlp_emu::launch(grid, block, smem, stream, __VA_ARGS__)
#define SIGVLP_EXTERN_SHARED(T, name) T* name = static_cast<T*>(::sigvlp_emu::current().dynamic_smem)
#else
#define SIGVLP_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define SIGVLP_EXTERN_SHARED(T, name) extern __shared__ __align__(16) T name[]
#endif

namespace sigvlp {

// Largest gridDim.y (and .z) a launch may use: the hardware's 65535, lowered in the emulation
// (SIGVLP_EMU_MAX_GRID_Y / sigvlp._cuda_emu.set_max_grid_y) so tests reach the chunking paths.
inline int64_t max_grid_y() {
#ifdef SIGVLP_EMU
  return ::sigvlp_emu::config().max_grid_y;
#else
  return 65535;
#endif
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// N consecutive elements moved as one aligned vector access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Index s of the sequence holding token `token`: the largest s < batch with
// cu_seqlens[s] <= token (empty sequences are skipped because their start equals the next one's).
__device__ __forceinline__ int64_t find_sequence(const int32_t* __restrict__ cu_seqlens,
                                                 int64_t batch, int64_t token) {
  int64_t lo = 0, hi = batch - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    if (static_cast<int64_t>(__ldg(cu_seqlens + mid)) <= token) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Multiprocessors of the current device, cached per device (queried once, not per launch).
inline int multiprocessor_count() {
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) return 1;
  if (cache[device] == 0) {
    int sms = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    cache[device] = sms > 0 ? sms : 1;
  }
  return cache[device];
}

// Dispatch a functor templated on the element type.
template <typename F>
int dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace sigvlp
