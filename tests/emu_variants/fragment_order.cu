// Harness self-test: C = A B on one warp with WMMA (m16n16k16, half in, fp32 out). Built with
// SIGVLP_VARIANT_FIXED the accumulator is written with store_matrix_sync; without it the kernel
// writes acc.x[i] itself, assuming the sm_80 hardware layout of the accumulator fragment
// (lane l: rows l/4 and l/4 + 8, columns 2 (l % 4) + {0, 1} and + 8). The emulation's element
// order differs on purpose, so that variant must give a wrong product.
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include <mma.h>

#include "common.cuh"

namespace {
namespace wmma = nvcuda::wmma;

__global__ void gemm16(const __half* a, const __half* b, float* c) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.f);
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::mma_sync(acc, fa, fb, acc);
#ifdef SIGVLP_VARIANT_FIXED
  wmma::store_matrix_sync(c, acc, 16, wmma::mem_row_major);
#else
  const int lane = static_cast<int>(threadIdx.x) % 32;
  for (int i = 0; i < acc.num_elements; ++i) {
    const int row = lane / 4 + 8 * ((i / 2) % 2);
    const int col = 2 * (lane % 4) + (i % 2) + 8 * (i / 4);
    c[row * 16 + col] = acc.x[i];
  }
#endif
}
}  // namespace

int main() {
  __half* a = static_cast<__half*>(std::malloc(256 * sizeof(__half)));
  __half* b = static_cast<__half*>(std::malloc(256 * sizeof(__half)));
  float* c = static_cast<float*>(std::malloc(256 * sizeof(float)));
  for (int i = 0; i < 256; ++i) {
    a[i] = __float2half_rn(static_cast<float>((i * 7) % 11) - 5.f);
    b[i] = __float2half_rn(static_cast<float>((i * 5) % 13) - 6.f);
    c[i] = NAN;
  }
  SIGVLP_LAUNCH(1, 32, 0, nullptr, gemm16)(a, b, c);
  if (cudaGetLastError() != cudaSuccess) return 3;
  int bad = 0;
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float ref = 0.f;
      for (int k = 0; k < 16; ++k) ref += __half2float(a[m * 16 + k]) * __half2float(b[k * 16 + n]);
      bad += !(c[m * 16 + n] == ref);
    }
  std::printf("mismatches: %d\n", bad);
  std::free(a);
  std::free(b);
  std::free(c);
  return bad ? 1 : 0;
}
