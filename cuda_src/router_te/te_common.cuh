// Shared by the TE forms of the router (dense forward, backward, aux-loss scores): the routing-map
// kinds, the warps per block, and the float -> T stores.
#pragma once
#include "../common/common.cuh"

template <typename T>
__device__ __forceinline__ T ds4_from_float(float v);
template <>
__device__ __forceinline__ float ds4_from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half ds4_from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 ds4_from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

#define DS4_MAP_NONE 0
#define DS4_MAP_BYTES 1
#define DS4_MAP_BITS 2
#define DS4_MAP_INDICES 3
#define DS4_MAP_ALL 4  // every expert counts as selected (the aux-loss scores' backward)
#define DS4_DENSE_WARPS 4
#define DS4_BITMAP_WORDS 96  // E <= 3072
