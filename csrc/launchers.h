// C++ declarations of the CUDA launchers, shared by the .cu files and bindings.cpp.
// Host-only and free of CUDA and torch headers: bindings.cpp is compiled by the host
// compiler, and the module must never depend on libtorch.
#pragma once
#include <cstdint>

namespace sigvlp {

// Element types understood by every launcher (mirrors sigvlp/ops/_cuda.py).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Launchers return a cudaError_t value (0 = success); error_string() explains it.
const char* error_string(int code);
int device_count();
int runtime_version();
int driver_version();
// The architectures the module was compiled for, as nvcc's __CUDA_ARCH_LIST__ ("800,900").
const char* compiled_arch_list();
// 0 when the module holds a kernel image the given device can run, else a cudaError_t.
int check_kernel_image(int device);

struct Rope3dArgs {
  const void* x;
  void* out;
  DType dtype;
  int64_t total_tokens;
  int64_t nheads;
  int64_t head_dim;
  int64_t x_stride_token, x_stride_head;      // in elements; last dim contiguous
  int64_t out_stride_token, out_stride_head;  // in elements; last dim contiguous
  const int32_t* cu_seqlens;                  // (batch + 1,)
  int64_t batch;
  const int32_t* grid_thw;                    // (batch, 3) or nullptr
  const float* positions;                     // (total_tokens, 3) contiguous or nullptr
  double log2_theta;                          // log2(theta), in fp64
  int32_t n_t, n_h, n_w;                      // rotary pairs per axis
  bool interleaved;
  bool inverse;
  void* stream;                               // cudaStream_t
};

int rope3d(const Rope3dArgs& args);

}  // namespace sigvlp
