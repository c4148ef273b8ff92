// Host emulation of the half type of <cuda_fp16.h> (see ../sigvlp_emu.h): IEEE binary16 with
// round-to-nearest-even conversions, as the device's __float2half_rn.
#pragma once
#include <cstdint>
#include <cstring>

struct __half_raw {
  unsigned short x;
};

// An aggregate (no constructors), unlike cuda_fp16.h's class: GCC guards block-scope
// thread_local arrays (static __shared__ here) of non-aggregate types with a flag that every
// fiber would touch. Kernels convert explicitly (__float2half_rn, __half2float).
struct __half {
  unsigned short __x;
};

inline float __half2float(__half h) {
  const uint32_t s = static_cast<uint32_t>(h.__x & 0x8000u) << 16;
  const uint32_t e = (h.__x >> 10) & 0x1fu;
  const uint32_t m = h.__x & 0x3ffu;
  uint32_t bits;
  if (e == 0) {
    if (m == 0) {
      bits = s;
    } else {  // subnormal: value m * 2^-24
      float f = static_cast<float>(m) * 5.9604644775390625e-8f;
      std::memcpy(&bits, &f, 4);
      bits |= s;
    }
  } else if (e == 31) {
    bits = s | 0x7f800000u | (m << 13);
  } else {
    bits = s | ((e + 112) << 23) | (m << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline __half __float2half_rn(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  __half h;
  if (ax >= 0x7f800000u) {  // inf or nan
    h.__x = static_cast<unsigned short>(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
    return h;
  }
  if (ax >= 0x477ff000u) {  // rounds to >= 65520: overflow to inf
    h.__x = static_cast<unsigned short>(sign | 0x7c00u);
    return h;
  }
  if (ax < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
    // value / 2^-24, rounded to nearest even, as an integer mantissa
    float a;
    std::memcpy(&a, &ax, 4);
    const float scaled = a * 16777216.0f;  // exact (power of two)
    uint32_t m = static_cast<uint32_t>(scaled);
    const float rem = scaled - static_cast<float>(m);
    if (rem > 0.5f || (rem == 0.5f && (m & 1u))) ++m;
    h.__x = static_cast<unsigned short>(sign | m);
    return h;
  }
  uint32_t r = ax - 0x38000000u;  // rebias exponent 127 -> 15 (in the float bit layout)
  r = r + 0xfffu + ((r >> 13) & 1u);
  h.__x = static_cast<unsigned short>(sign | (r >> 13));
  return h;
}
inline __half __float2half(float f) { return __float2half_rn(f); }
inline __half __ushort_as_half(unsigned short x) {
  __half h;
  h.__x = x;
  return h;
}
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
typedef __half half;

struct alignas(4) __half2 {
  __half x, y;
};
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
