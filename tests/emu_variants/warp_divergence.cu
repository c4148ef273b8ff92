// Harness self-test: a warp sum by __shfl_xor_sync with the full mask. Built with
// SIGVLP_VARIANT_FIXED every lane takes part; without it only the low half-warp calls the
// shuffle (a divergent branch around a full-mask collective, undefined on the GPU: it hangs or
// reads garbage), and the emulation must fail the launch naming the lanes.
#include <cstdio>
#include <cstdlib>

#include "common.cuh"

namespace {
__global__ void warp_sum(const float* in, float* out) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  float v = in[threadIdx.x];
#ifdef SIGVLP_VARIANT_FIXED
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
#else
  if (lane < 16) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  } else {
    for (int o = 16; o > 0; o >>= 1) v += v;
  }
#endif
  if (lane == 0) out[threadIdx.x / 32] = v;
}
}  // namespace

int main() {
  float* in = static_cast<float*>(std::malloc(64 * sizeof(float)));
  float* out = static_cast<float*>(std::malloc(2 * sizeof(float)));
  for (int i = 0; i < 64; ++i) in[i] = static_cast<float>(i);
  SIGVLP_LAUNCH(1, 64, 0, nullptr, warp_sum)(in, out);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    std::printf("launch failed: %s: %s\n", cudaGetErrorString(err), sigvlp_emu::last_error_message());
    return 3;
  }
  int bad = (out[0] != 496.f) + (out[1] != 1520.f);
  std::printf("mismatches: %d\n", bad);
  std::free(in);
  std::free(out);
  return bad ? 1 : 0;
}
