// Extensions of the WMMA tile primitives of mma_tile.cuh used by the fused attention
// (csrc/attention.cu). Additive: namespace sigvlp::mma, nothing of mma_tile.cuh is changed.
//
//   row_index(rows, scratch)           warp-collective: rows (an fp32 16x16 accumulator fragment)
//                                      gets, in element e, the row (0..15) that element e of ANY
//                                      accumulator fragment of that type lies in. Fragment element
//                                      order stays opaque: positions are looked up, never assumed.
//                                      scratch: 256 floats of warp-private memory, 32-B aligned.
//   scale_rows(tile, factor, rows)     tile row r *= factor[r] (factor: WM floats, any memory).
//   for_each(tile, scratch, f)         f(row, col, value) for every element of the warp tile, each
//                                      16x16 fragment staged through scratch (256 warp-private
//                                      floats, 32-B aligned); lane-parallel, __syncwarp inside.
#pragma once
#include "mma_tile.cuh"

namespace sigvlp {
namespace mma {

template <typename Acc>
__device__ __forceinline__ void row_index(Acc& rows, float* scratch) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  for (int e = lane; e < 256; e += 32) scratch[e] = static_cast<float>(e / 16);
  __syncwarp();
  wmma::load_matrix_sync(rows, scratch, 16, wmma::mem_row_major);
  __syncwarp();
}

template <typename T, int WM, int WN>
__device__ __forceinline__ void scale_rows(WarpTile<T, WM, WN>& t, const float* factor,
                                           const typename WarpTile<T, WM, WN>::Acc& rows) {
#pragma unroll
  for (int i = 0; i < WarpTile<T, WM, WN>::FM; ++i)
#pragma unroll
    for (int j = 0; j < WarpTile<T, WM, WN>::FN; ++j)
#pragma unroll
      for (int e = 0; e < rows.num_elements; ++e) t.acc[i][j].x[e] *= factor[16 * i + static_cast<int>(rows.x[e])];
}

template <typename T, int WM, int WN, typename F>
__device__ __forceinline__ void for_each(const WarpTile<T, WM, WN>& t, float* scratch, F&& f) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
#pragma unroll
  for (int i = 0; i < WarpTile<T, WM, WN>::FM; ++i)
#pragma unroll
    for (int j = 0; j < WarpTile<T, WM, WN>::FN; ++j) {
      wmma::store_matrix_sync(scratch, t.acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) f(16 * i + e / 16, 16 * j + e % 16, scratch[e]);
      __syncwarp();
    }
}

}  // namespace mma
}  // namespace sigvlp
