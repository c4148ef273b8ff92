// Runtime queries used by sigvlp.info and backend availability checks.
#include "common.cuh"

namespace sigvlp {

namespace {
__global__ void probe_kernel() {}

#define SIGVLP_STR2(...) #__VA_ARGS__
#define SIGVLP_STR(...) SIGVLP_STR2(__VA_ARGS__)
#ifdef __CUDA_ARCH_LIST__
constexpr const char* kArchList = SIGVLP_STR(__CUDA_ARCH_LIST__);
#else
constexpr const char* kArchList = "";
#endif
}  // namespace

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}

int runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

int driver_version() {
  int v = 0;
  cudaDriverGetVersion(&v);
  return v;
}

const char* compiled_arch_list() { return kArchList; }

int check_kernel_image(int device) {
  int previous = 0;
  cudaError_t err = cudaGetDevice(&previous);
  if (err != cudaSuccess) return static_cast<int>(err);
  err = cudaSetDevice(device);
  if (err != cudaSuccess) return static_cast<int>(err);
  cudaFuncAttributes attrs;
  err = cudaFuncGetAttributes(&attrs, probe_kernel);
  cudaGetLastError();
  cudaSetDevice(previous);
  return static_cast<int>(err);
}

}  // namespace sigvlp
