// Harness self-test: an element offset row * ld + col formed in int32. With rows of 30,000
// per block and ld = 40,000 the offset passes 2^31 from the third block on. Built with
// SIGVLP_VARIANT_FIXED the offset is int64; without it UndefinedBehaviorSanitizer must report
// the signed overflow (on a GPU it would silently wrap to a negative offset).
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "common.cuh"

namespace {
__global__ void offsets(int ld, int64_t* out) {
  const int row = static_cast<int>(blockIdx.x) * 30000 + static_cast<int>(threadIdx.x);
  const int col = 7;
#ifdef SIGVLP_VARIANT_FIXED
  const int64_t off = static_cast<int64_t>(row) * ld + col;
#else
  const int64_t off = row * ld + col;  // int32 arithmetic, widened too late
#endif
  out[blockIdx.x * blockDim.x + threadIdx.x] = off;
}
}  // namespace

int main() {
  const int blocks = 4, threads = 32, ld = 40000;
  int64_t* out = static_cast<int64_t*>(std::malloc(blocks * threads * sizeof(int64_t)));
  SIGVLP_LAUNCH(blocks, threads, 0, nullptr, offsets)(ld, out);
  if (cudaGetLastError() != cudaSuccess) return 3;
  int bad = 0;
  for (int b = 0; b < blocks; ++b)
    for (int t = 0; t < threads; ++t)
      bad += out[b * threads + t] != (static_cast<int64_t>(b) * 30000 + t) * ld + 7;
  std::printf("mismatches: %d\n", bad);
  std::free(out);
  return bad ? 1 : 0;
}
