// Harness self-test: each block writes its partial sums to its own row of the output. Built
// without SIGVLP_VARIANT_FIXED every block writes row 0 (a wrong row index): blocks run on
// different workers with no synchronisation between them, and ThreadSanitizer must report the
// race between blocks (run with SIGVLP_EMU_WORKERS=2).
#include <cstdio>
#include <cstdlib>

#include "common.cuh"

namespace {
constexpr int kThreads = 64;

__global__ void row_partials(const float* in, float* out) {
  const int t = static_cast<int>(threadIdx.x);
#ifdef SIGVLP_VARIANT_FIXED
  const int row = static_cast<int>(blockIdx.x);
#else
  const int row = 0;
#endif
  out[row * kThreads + t] = 2.f * in[blockIdx.x * kThreads + t];
}
}  // namespace

int main() {
  const int blocks = 4;
  float* in = static_cast<float*>(std::malloc(blocks * kThreads * sizeof(float)));
  float* out = static_cast<float*>(std::calloc(blocks * kThreads, sizeof(float)));
  for (int i = 0; i < blocks * kThreads; ++i) in[i] = static_cast<float>(i);
  SIGVLP_LAUNCH(blocks, kThreads, 0, nullptr, row_partials)(in, out);
  if (cudaGetLastError() != cudaSuccess) return 3;
  int bad = 0;
  for (int i = 0; i < blocks * kThreads; ++i) bad += out[i] != 2.f * in[i];
  std::printf("mismatches: %d\n", bad);
  std::free(in);
  std::free(out);
  return bad ? 1 : 0;
}
