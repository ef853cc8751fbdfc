// AdamW over every tensor of a parameter group in one launch ("multi-tensor apply").
//
// The caller uploads a table of AdamWTensor entries (pointers, sizes, first chunk index) to device memory; block b
// finds its tensor by binary search over first_chunk and updates that tensor's chunk of kAdamWChunk elements.
// Math is torch.optim.AdamW's, in fp32 registers whatever the parameter dtype:
//   p *= 1 - lr * weight_decay
//   m  = m + (1 - beta1) (g - m)                    (torch's lerp)
//   v  = beta2 v + (1 - beta2) g^2
//   p -= lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)
// Traffic per element: read p, g, m, v and write p, m, v (28 bytes with fp32 everything, 22 with bf16 p and g).
#include <algorithm>
#include <cmath>

#include "common.cuh"

namespace gpt2fast {
namespace kernels {
namespace {

constexpr int kThreads = 512;
constexpr int kPack = 4;  // elements per thread per step: one 16-byte access to m and v

struct Hyper {
  float decay;         // 1 - lr * weight_decay
  float one_minus_b1;  // 1 - beta1
  float beta2;
  float one_minus_b2;  // 1 - beta2
  float step_size;     // lr / (1 - beta1^step)
  float bc2_sqrt;      // sqrt(1 - beta2^step)
  float eps;
};

__device__ __forceinline__ void adamw_update(float& p, float g, float& m, float& v, const Hyper& h) {
  p *= h.decay;
  m = fmaf(h.one_minus_b1, g - m, m);
  v = fmaf(h.one_minus_b2, g * g, h.beta2 * v);
  const float denom = sqrtf(v) / h.bc2_sqrt + h.eps;
  p -= h.step_size * (m / denom);
}

// kPack consecutive elements of T: one 16-byte access for float, one 8-byte access for 16-bit types.
template <typename T>
struct Pack {
  using Raw = typename std::conditional<sizeof(T) == 4, uint4, uint2>::type;
  static_assert(sizeof(Raw) == kPack * sizeof(T), "a pack is kPack elements");
  __device__ __forceinline__ static void load(const T* p, float (&out)[kPack]) {
    const Raw raw = *reinterpret_cast<const Raw*>(p);
    T e[kPack];
    memcpy(e, &raw, sizeof(Raw));
#pragma unroll
    for (int i = 0; i < kPack; ++i) out[i] = to_float(e[i]);
  }
  __device__ __forceinline__ static void store(T* p, const float (&in)[kPack]) {
    T e[kPack];
#pragma unroll
    for (int i = 0; i < kPack; ++i) e[i] = from_float<T>(in[i]);
    Raw raw;
    memcpy(&raw, e, sizeof(Raw));
    *reinterpret_cast<Raw*>(p) = raw;
  }
};

template <typename T>
__device__ __forceinline__ bool pack_aligned(const T* p) {
  return (reinterpret_cast<uintptr_t>(p) % (kPack * sizeof(T))) == 0;
}

template <typename P, typename G>
__global__ void __launch_bounds__(kThreads)
    adamw_kernel(const AdamWTensor* __restrict__ table, int num_tensors, Hyper hyper) {
  if constexpr (!CompiledForThisArch<P>::value) {
    __trap();
  } else {
    // The last tensor whose first chunk is at or before this block's.
    const int64_t chunk = blockIdx.x;
    int lo = 0, hi = num_tensors - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (table[mid].first_chunk <= chunk) lo = mid;
      else hi = mid - 1;
    }
    const AdamWTensor d = table[lo];
    const int64_t start = (chunk - d.first_chunk) * kAdamWChunk;
    if (start < 0 || start >= d.numel) return;  // a malformed table: do nothing rather than stray
    const int n = static_cast<int>(min(static_cast<int64_t>(kAdamWChunk), d.numel - start));
    P* __restrict__ p = static_cast<P*>(d.param) + start;
    const G* __restrict__ g = static_cast<const G*>(d.grad) + start;
    float* __restrict__ m = d.exp_avg + start;
    float* __restrict__ v = d.exp_avg_sq + start;

    int i0 = 0;
    if (pack_aligned(p) && pack_aligned(g) && pack_aligned(m) && pack_aligned(v)) {
      const int packs = n / kPack;
      for (int k = threadIdx.x; k < packs; k += kThreads) {
        float pv[kPack], gv[kPack], mv[kPack], vv[kPack];
        Pack<P>::load(p + k * kPack, pv);
        Pack<G>::load(g + k * kPack, gv);
        Pack<float>::load(m + k * kPack, mv);
        Pack<float>::load(v + k * kPack, vv);
#pragma unroll
        for (int j = 0; j < kPack; ++j) adamw_update(pv[j], gv[j], mv[j], vv[j], hyper);
        Pack<P>::store(p + k * kPack, pv);
        Pack<float>::store(m + k * kPack, mv);
        Pack<float>::store(v + k * kPack, vv);
      }
      i0 = packs * kPack;
    }
    for (int i = i0 + threadIdx.x; i < n; i += kThreads) {
      float pv = to_float(p[i]), mv = m[i], vv = v[i];
      adamw_update(pv, to_float(g[i]), mv, vv, hyper);
      p[i] = from_float<P>(pv);
      m[i] = mv;
      v[i] = vv;
    }
  }
}

}  // namespace

cudaError_t adamw_step(DType param_dtype, DType grad_dtype, const AdamWTensor* table, int num_tensors,
                       int64_t total_chunks, float lr, float beta1, float beta2, float eps, float weight_decay,
                       int64_t step, cudaStream_t stream) {
  if (num_tensors < 0 || total_chunks < 0 || total_chunks > 0x7fffffff || step < 1) return cudaErrorInvalidValue;
  if (num_tensors == 0 || total_chunks == 0) return cudaSuccess;
  if (table == nullptr) return cudaErrorInvalidValue;
  // Scalars in double, as torch forms them in Python, then rounded once.
  const double b1 = beta1, b2 = beta2;
  Hyper h;
  h.decay = static_cast<float>(1.0 - static_cast<double>(lr) * weight_decay);
  h.one_minus_b1 = static_cast<float>(1.0 - b1);
  h.beta2 = beta2;
  h.one_minus_b2 = static_cast<float>(1.0 - b2);
  h.step_size = static_cast<float>(lr / (1.0 - std::pow(b1, static_cast<double>(step))));
  h.bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(b2, static_cast<double>(step))));
  h.eps = eps;
  const unsigned grid = static_cast<unsigned>(total_chunks);
  return dispatch_pair(param_dtype, grad_dtype, [&](auto p_tag, auto g_tag) -> cudaError_t {
    using P = decltype(p_tag);
    using G = decltype(g_tag);
    return launch_kernel(adamw_kernel<P, G>, grid, kThreads, 0, stream, table, num_tensors, h);
  });
}

}  // namespace kernels
}  // namespace gpt2fast
