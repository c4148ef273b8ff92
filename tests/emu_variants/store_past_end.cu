// Harness self-test: a tile copy whose row loop runs one row too far (`<=` for `<`), storing one
// row past the end of the global output (mode "global") or of a __shared__ tile (mode
// "shared"). Built with SIGVLP_VARIANT_FIXED the bound is right; without it AddressSanitizer
// must report the overflow.
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "common.cuh"

namespace {
constexpr int kRows = 8, kCols = 32, kThreads = 64;
#ifdef SIGVLP_VARIANT_FIXED
constexpr int kLast = kRows - 1;
#else
constexpr int kLast = kRows;  // one row too many
#endif

__global__ void copy_global(const float* in, float* out) {
  for (int e = static_cast<int>(threadIdx.x); e < (kLast + 1) * kCols; e += kThreads) out[e] = in[e % (kRows * kCols)];
}

__global__ void copy_shared(const float* in, float* out) {
  __shared__ float tile[kRows * kCols];
  __shared__ float after[kCols];  // a neighbour the overflow would silently corrupt
  for (int e = static_cast<int>(threadIdx.x); e < (kLast + 1) * kCols; e += kThreads) tile[e] = in[e % (kRows * kCols)];
  for (int e = static_cast<int>(threadIdx.x); e < kCols; e += kThreads) after[e] = 0.f;
  __syncthreads();
  for (int e = static_cast<int>(threadIdx.x); e < kRows * kCols; e += kThreads) out[e] = tile[e] + after[e % kCols];
}
}  // namespace

int main(int argc, char** argv) {
  const bool shared = argc > 1 && std::strcmp(argv[1], "shared") == 0;
  float* in = static_cast<float*>(std::malloc(kRows * kCols * sizeof(float)));
  float* out = static_cast<float*>(std::malloc(kRows * kCols * sizeof(float)));
  for (int i = 0; i < kRows * kCols; ++i) in[i] = static_cast<float>(i);
  if (shared) {
    SIGVLP_LAUNCH(1, kThreads, 0, nullptr, copy_shared)(in, out);
  } else {
    SIGVLP_LAUNCH(1, kThreads, 0, nullptr, copy_global)(in, out);
  }
  int bad = 0;
  for (int i = 0; i < kRows * kCols; ++i) bad += out[i] != in[i];
  std::printf("mismatches: %d\n", bad);
  std::free(in);
  std::free(out);
  return bad ? 1 : 0;
}
