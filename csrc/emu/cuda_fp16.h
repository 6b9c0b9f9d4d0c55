// __half for the CPU emulation of CUDA (see cuda_runtime.h): IEEE binary16 storage and the conversions the
// kernels use, rounding to nearest-even as the GPU does.
#pragma once

#include <cstdint>
#include <cstring>

namespace emu {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_half_bits(float f) {
  const uint32_t u = float_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN (quiet)
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to +-inf (and inf itself)
  if (a >= 0x38800000u) {  // a normal half: rebias the exponent, round the 13 dropped bits to nearest-even
    const uint32_t r = a - 0x38000000u + 0x0fffu + ((a >> 13) & 1u);
    return static_cast<uint16_t>(sign | (r >> 13));
  }
  // subnormal or zero: adding 0.5 puts the half's last mantissa bit at the float's, and the FPU rounds to even
  const float v = bits_float(a) + 0.5f;
  return static_cast<uint16_t>(sign | (float_bits(v) - 0x3f000000u));
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t(h) & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {
    const float v = static_cast<float>(m) * 5.9604644775390625e-08f;  // m * 2^-24, exact
    return bits_float(float_bits(v) | sign);
  }
  if (e == 31) return bits_float(sign | 0x7f800000u | (m << 13));
  return bits_float(sign | ((e + 112u) << 23) | (m << 13));
}

}  // namespace emu

struct __half {
  uint16_t __x;
  __half() = default;
  __half(float f) : __x(emu::float_to_half_bits(f)) {}
  operator float() const { return emu::half_bits_to_float(__x); }
};
static_assert(sizeof(__half) == 2, "__half is 2 bytes");

inline __half __float2half_rn(float f) { return __half(f); }
inline __half __float2half(float f) { return __half(f); }
inline float __half2float(__half h) { return emu::half_bits_to_float(h.__x); }
