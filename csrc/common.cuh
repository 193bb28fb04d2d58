// Shared device helpers: dtype codes, strided matrix arguments, typed loads, the projection hash.
#pragma once

#include <cstdint>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels.h"

namespace ippo {

// Load element i of a (fp16 | bf16 | fp32 | fp64) buffer as A. The switch is uniform across a launch.
template <class A>
__device__ __forceinline__ A load_as(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case kF16:
      return static_cast<A>(__half2float(static_cast<const __half*>(p)[i]));
    case kBF16:  // bf16 is the top half of an fp32: widen exactly by a shift
      return static_cast<A>(__uint_as_float(static_cast<uint32_t>(static_cast<const uint16_t*>(p)[i]) << 16));
    case kF32:
      return static_cast<A>(static_cast<const float*>(p)[i]);
    default:
      return static_cast<A>(static_cast<const double*>(p)[i]);
  }
}

// The projection hash of ippo/kernels/projection.py, bit for bit (uint32 arithmetic wraps mod 2^32).
constexpr uint32_t kRowMult = 0x9E3779B1u;
constexpr uint32_t kColMult = 0x85EBCA77u;
constexpr uint32_t kFmixMult1 = 0x85EBCA6Bu;
constexpr uint32_t kFmixMult2 = 0xC2B2AE35u;

__host__ __device__ __forceinline__ uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= kFmixMult1;
  h ^= h >> 13;
  h *= kFmixMult2;
  h ^= h >> 16;
  return h;
}

// sign(j, c) in {-1, +1}: +1 when fmix32(j * ROW + c * COL + salt) < 2^31.
__host__ __device__ __forceinline__ bool sign_negative(uint32_t j, uint32_t c, uint32_t salt) {
  return (fmix32(j * kRowMult + c * kColMult + salt) >> 31) != 0u;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace ippo
