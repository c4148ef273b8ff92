// Host emulation of the bfloat16 type of <cuda_bf16.h> (see ../sigvlp_emu.h), with
// round-to-nearest-even conversion as the device's __float2bfloat16_rn.
#pragma once
#include <cstdint>
#include <cstring>

#include "cuda_fp16.h"

// An aggregate, as __half in cuda_fp16.h (see there).
struct __nv_bfloat16 {
  unsigned short __x;
};

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t bits = static_cast<uint32_t>(h.__x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  __nv_bfloat16 h;
  if ((x & 0x7fffffffu) > 0x7f800000u) {
    h.__x = static_cast<unsigned short>((x >> 16) | 0x40u);  // quiet nan
    return h;
  }
  x += 0x7fffu + ((x >> 16) & 1u);
  h.__x = static_cast<unsigned short>(x >> 16);
  return h;
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
typedef __nv_bfloat16 nv_bfloat16;
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
