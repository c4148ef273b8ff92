// Harness self-test: a block reduction through shared memory. Built with
// SIGVLP_VARIANT_FIXED it has the __syncthreads between the writes and the reads of the other
// threads' slots; without it the barrier is removed, and ThreadSanitizer must report the race.
#include <cstdio>
#include <cstdlib>

#include "common.cuh"

namespace {
constexpr int kThreads = 128;

__global__ void __launch_bounds__(kThreads) neighbour_sum(const float* in, float* out) {
  __shared__ float s[kThreads];
  const int t = static_cast<int>(threadIdx.x);
  s[t] = in[blockIdx.x * kThreads + t];
#ifdef SIGVLP_VARIANT_FIXED
  __syncthreads();
#endif
  out[blockIdx.x * kThreads + t] = s[t] + s[(t + 1) % kThreads];
}
}  // namespace

int main() {
  const int blocks = 3;
  float* in = static_cast<float*>(std::malloc(blocks * kThreads * sizeof(float)));
  float* out = static_cast<float*>(std::malloc(blocks * kThreads * sizeof(float)));
  for (int i = 0; i < blocks * kThreads; ++i) in[i] = static_cast<float>(i);
  SIGVLP_LAUNCH(blocks, kThreads, 0, nullptr, neighbour_sum)(in, out);
  if (cudaGetLastError() != cudaSuccess) return 3;
  int bad = 0;
  for (int b = 0; b < blocks; ++b)
    for (int t = 0; t < kThreads; ++t)
      bad += out[b * kThreads + t] != in[b * kThreads + t] + in[b * kThreads + (t + 1) % kThreads];
  std::printf("mismatches: %d\n", bad);
  std::free(in);
  std::free(out);
  return bad ? 1 : 0;
}
