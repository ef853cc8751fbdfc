// Device helpers shared by the kernels: dtype conversion, 16-byte vector access, warp/block reductions, the
// deterministic column-sum kernel behind every "per-block partials + second pass" reduction, and the dispatch
// from DType to template arguments. Included by the .cu files only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels.h"

namespace gpt2fast {
namespace kernels {

// ------------------------------------------------------------------------------------------ architectures
// bf16 kernels are only compiled for sm_80 and later (V100/T4 have no bf16 arithmetic and the dispatcher never
// offers bf16 there). In the device pass for an older architecture a bf16 kernel's body is a trap; the host
// launchers refuse bf16 on such a device before launching, so the trap is never reached.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define GPT2FAST_DEVICE_HAS_BF16 0
#else
#define GPT2FAST_DEVICE_HAS_BF16 1
#endif

template <typename T>
struct CompiledForThisArch : std::true_type {};
template <>
struct CompiledForThisArch<__nv_bfloat16> : std::integral_constant<bool, GPT2FAST_DEVICE_HAS_BF16 == 1> {};

// Compute capability (major) of the current device, cached per device.
inline int current_device_major(int* device_out = nullptr) {
  static int majors[64] = {0};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (device_out) *device_out = device;
  if (device < 0 || device >= 64) {
    int major = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    return major;
  }
  if (majors[device] == 0) cudaDeviceGetAttribute(&majors[device], cudaDevAttrComputeCapabilityMajor, device);
  return majors[device];
}

// ------------------------------------------------------------------------------------------ launches
// Every kernel is launched through launch_kernel() and reaches its dynamic shared memory through
// GPT2FAST_DYNAMIC_SHARED, never with <<<>>> or `extern __shared__` directly: the tests compile these files with
// g++ against a CPU emulator of CUDA (tests/cpp/cuda_emu/), which defines GPT2FAST_CUDA_EMULATOR and its own
// versions of both (a launch runs block after block, one OS thread per CUDA thread).
#ifndef GPT2FAST_CUDA_EMULATOR
#define GPT2FAST_DYNAMIC_SHARED(T, name) extern __shared__ T name[]

// kernel<<<grid, block, smem, stream>>>(args...), each argument converted to its parameter's type as the
// triple-chevron launch converts it; returns the launch status.
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          Args... args) {
  kernel<<<grid, block, smem, stream>>>(static_cast<Params>(args)...);
  return cudaGetLastError();
}
#endif

inline bool device_supports(DType t) { return t != DType::kBFloat16 || current_device_major() >= 8; }

inline int sm_count(int device) {
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) return 1;
  return n;
}

// ------------------------------------------------------------------------------------------ conversions
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Elements of T in one 16-byte access.
template <typename T>
__host__ __device__ constexpr int vec_of() { return 16 / static_cast<int>(sizeof(T)); }

// N consecutive elements from p, converted to float. p must be 16-byte aligned and N * sizeof(T) a multiple of
// 16: the loads are 16-byte vector loads (LDG.128).
template <int N, typename T>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float (&out)[N]) {
  constexpr int kPer = vec_of<T>();
  static_assert(N % kPer == 0, "load_vec needs whole 16-byte words");
#pragma unroll
  for (int k = 0; k < N / kPer; ++k) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p + k * kPer);
    T e[kPer];
    memcpy(e, &raw, 16);
#pragma unroll
    for (int i = 0; i < kPer; ++i) out[k * kPer + i] = to_float(e[i]);
  }
}

template <int N, typename T>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const float (&in)[N]) {
  constexpr int kPer = vec_of<T>();
  static_assert(N % kPer == 0, "store_vec needs whole 16-byte words");
#pragma unroll
  for (int k = 0; k < N / kPer; ++k) {
    T e[kPer];
#pragma unroll
    for (int i = 0; i < kPer; ++i) e[i] = from_float<T>(in[k * kPer + i]);
    uint4 raw;
    memcpy(&raw, e, 16);
    *reinterpret_cast<uint4*>(p + k * kPer) = raw;
  }
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ------------------------------------------------------------------------------------------ reductions
// Butterfly (xor) reductions: every lane ends with the same, bitwise identical value, since each step adds the
// same two numbers in every lane (fp addition is commutative).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float2 warp_sum2(float2 v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, o);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, o);
  }
  return v;
}

// Sum over the "team" of threads that share threadIdx.y (blockDim.x threads, a multiple of 32), returned to all
// of them. `scratch` holds blockDim.y * 32 float2 in shared memory. Must be reached by every thread of the block
// (it synchronises the block when a team spans several warps). The warps' sums are added in a fixed order.
__device__ __forceinline__ float2 team_sum2(float2 v, float2* scratch) {
  v = warp_sum2(v);
  if (blockDim.x == 32) return v;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  float2* slot = scratch + threadIdx.y * 32;
  __syncthreads();  // the previous call's readers are done with the slots
  if (lane == 0) slot[warp] = v;
  __syncthreads();
  float2 total = make_float2(0.f, 0.f);
  for (int w = 0; w < warps; ++w) {
    total.x += slot[w].x;
    total.y += slot[w].y;
  }
  return total;
}

__device__ __forceinline__ float team_sum(float v, float2* scratch) {
  return team_sum2(make_float2(v, 0.f), scratch).x;
}

// ------------------------------------------------------------------------------------------ column sums
// out_k[c] = sum over g of partials_k[g * width + c] for k < n_outputs (gridDim.y == n_outputs), in a fixed
// order: thread row ty sums groups ty, ty + 8, ...; the eight sums are then added in order. Block (32, 8).
constexpr int kColumnSumThreadsX = 32;
constexpr int kColumnSumThreadsY = 8;

template <typename W>
__global__ void __launch_bounds__(kColumnSumThreadsX * kColumnSumThreadsY)
    column_sums_kernel(const float* __restrict__ partials, int64_t groups, int64_t width, W* __restrict__ out0,
                       W* __restrict__ out1) {
  if constexpr (!CompiledForThisArch<W>::value) {
    __trap();
  } else {
    __shared__ float sums[kColumnSumThreadsY][kColumnSumThreadsX];
    const int64_t col = static_cast<int64_t>(blockIdx.x) * kColumnSumThreadsX + threadIdx.x;
    const float* src = partials + static_cast<int64_t>(blockIdx.y) * groups * width;
    float acc = 0.f;
    if (col < width) {
      for (int64_t g = threadIdx.y; g < groups; g += kColumnSumThreadsY) acc += src[g * width + col];
    }
    sums[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && col < width) {
      float total = 0.f;
#pragma unroll
      for (int y = 0; y < kColumnSumThreadsY; ++y) total += sums[y][threadIdx.x];
      (blockIdx.y == 0 ? out0 : out1)[col] = from_float<W>(total);
    }
  }
}

template <typename W>
cudaError_t launch_column_sums(const float* partials, int64_t groups, int64_t width, W* out0, W* out1,
                               int n_outputs, cudaStream_t stream) {
  const dim3 block(kColumnSumThreadsX, kColumnSumThreadsY);
  const dim3 grid(static_cast<unsigned>((width + kColumnSumThreadsX - 1) / kColumnSumThreadsX),
                  static_cast<unsigned>(n_outputs));
  return launch_kernel(column_sums_kernel<W>, grid, block, 0, stream, partials, groups, width, out0, out1);
}

// ------------------------------------------------------------------------------------------ dispatch
template <DType D>
struct StorageOf;
template <>
struct StorageOf<DType::kFloat32> { using type = float; };
template <>
struct StorageOf<DType::kFloat16> { using type = __half; };
template <>
struct StorageOf<DType::kBFloat16> { using type = __nv_bfloat16; };

// Calls f(T{}, P{}) for the storage types of (dtype, other), where `other` is `dtype` itself or kFloat32: the
// pairs the kernels are instantiated for. Returns cudaErrorInvalidValue for any other pair and
// cudaErrorNotSupported for bf16 on a device older than sm_80.
template <typename F>
cudaError_t dispatch_pair(DType dtype, DType other, F&& f) {
  if (!device_supports(dtype)) return cudaErrorNotSupported;
  if (other != dtype && other != DType::kFloat32) return cudaErrorInvalidValue;
  const bool same = other == dtype;
  switch (dtype) {
    case DType::kFloat32:
      return f(float{}, float{});
    case DType::kFloat16:
      return same ? f(__half{}, __half{}) : f(__half{}, float{});
    case DType::kBFloat16:
      return same ? f(__nv_bfloat16{}, __nv_bfloat16{}) : f(__nv_bfloat16{}, float{});
  }
  return cudaErrorInvalidValue;
}

template <typename F>
cudaError_t dispatch_one(DType dtype, F&& f) {
  if (!device_supports(dtype)) return cudaErrorNotSupported;
  switch (dtype) {
    case DType::kFloat32:
      return f(float{});
    case DType::kFloat16:
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace kernels
}  // namespace gpt2fast
