// Softmax cross-entropy over the last dimension, forward and backward, in the logits' own dtype: nothing the
// size of the logits is written in fp32.
//
// One block per row. A row of V logits starts anywhere (50257 bf16 per row: every row has its own misalignment),
// so each kernel walks it in three parts: the `head` elements before the first 16-byte boundary, then whole
// 16-byte vectors (kUnroll of them in flight per thread), then the tail. Forward keeps a running max m and sum s
// of exp(x - m) per thread in fp32 (one exponential per element, one rescale per group of loads), merges the
// (m, s) pairs across the block and writes lse = m + log s and loss = lse - x[target]. Backward re-reads the row
// and writes (exp(x - lse) - onehot) * scale; the gradient may be written over the logits themselves.
#include <algorithm>
#include <cfloat>

#include "common.cuh"

namespace gpt2fast {
namespace kernels {
namespace {

constexpr int kMaxThreads = 1024;
constexpr int kVectorsPerThread = 16;  // block size: about this many vectors of the row per thread
constexpr int kUnroll = 4;             // vectors loaded before they are used, per thread
constexpr float kLog2e = 1.4426950408889634f;

// exp(d) for d = x - m <= 0 (or -inf): the difference is formed first, so elements close to the max (the ones
// that matter) lose nothing to the scaling by log2(e).
__device__ __forceinline__ float exp_of_difference(float d) { return exp2f(d * kLog2e); }

__device__ __forceinline__ void online_merge(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  s = s * exp_of_difference(m - mn) + s2 * exp_of_difference(m2 - mn);
  m = mn;
}

// Adds n values to the running (m, s): one rescale, n exponentials. fmaxf skips a nan, but the nan then makes
// its exponential, and so s and the loss, nan.
template <int n>
__device__ __forceinline__ void online_add(float& m, float& s, const float* v) {
  float mx = m;
#pragma unroll
  for (int i = 0; i < n; ++i) mx = fmaxf(mx, v[i]);
  float acc = s * exp_of_difference(m - mx);
#pragma unroll
  for (int i = 0; i < n; ++i) acc += exp_of_difference(v[i] - mx);
  m = mx;
  s = acc;
}

// Merges every thread's (m, s); the result is valid in thread 0. `scratch` holds 32 float2. Ends with a barrier,
// so the scratch may be reused right away.
__device__ __forceinline__ void block_merge(float& m, float& s, float2* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
    online_merge(m, s, m2, s2);
  }
  const int warps = blockDim.x >> 5;
  if (warps > 1) {
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = make_float2(m, s);
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 1; w < warps; ++w) online_merge(m, s, scratch[w].x, scratch[w].y);
    }
  }
  __syncthreads();
}

// Elements before the first 16-byte boundary of a row starting at p (at most n).
template <typename T>
__device__ __forceinline__ int64_t head_of(const T* p, int64_t n) {
  constexpr int V = vec_of<T>();
  const int mis = static_cast<int>((reinterpret_cast<uintptr_t>(p) & 15u) / sizeof(T));
  return min(static_cast<int64_t>(mis ? V - mis : 0), n);
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    cross_entropy_forward_kernel(const T* __restrict__ logits, int64_t stride, const int64_t* __restrict__ targets,
                                 float* __restrict__ loss, float* __restrict__ lse_out, int64_t rows,
                                 int64_t n_classes, int64_t ignore_index) {
  if constexpr (!CompiledForThisArch<T>::value) {
    __trap();
  } else {
    constexpr int V = vec_of<T>();
    __shared__ float2 scratch[32];
    const int tid = threadIdx.x, threads = blockDim.x;
    for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
      const T* x = logits + row * stride;
      // The lowest finite float, not -inf: exp(-inf - -inf) would be nan for a thread that sees no element.
      float m = -FLT_MAX, s = 0.f;
      const int64_t head = head_of(x, n_classes);
      for (int64_t i = tid; i < head; i += threads) {
        const float v = to_float(x[i]);
        online_add<1>(m, s, &v);
      }
      const T* xa = x + head;
      const int64_t n_vec = (n_classes - head) / V;
      int64_t k = tid;
      for (; k + (kUnroll - 1) * threads < n_vec; k += kUnroll * threads) {
        float v[kUnroll * V];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          float w[V];
          load_vec<V>(xa + (k + u * threads) * V, w);
#pragma unroll
          for (int j = 0; j < V; ++j) v[u * V + j] = w[j];
        }
        online_add<kUnroll * V>(m, s, v);
      }
      for (; k < n_vec; k += threads) {
        float v[V];
        load_vec<V>(xa + k * V, v);
        online_add<V>(m, s, v);
      }
      for (int64_t i = head + n_vec * V + tid; i < n_classes; i += threads) {
        const float v = to_float(x[i]);
        online_add<1>(m, s, &v);
      }
      block_merge(m, s, scratch);
      if (tid == 0) {
        const float lse = m + logf(s);
        const int64_t target = targets[row];
        float l;
        if (target == ignore_index) l = 0.f;
        else if (target >= 0 && target < n_classes) l = lse - to_float(x[target]);
        else l = __int_as_float(0x7fc00000);  // nan: a bad target the caller chose not to validate
        loss[row] = l;
        lse_out[row] = lse;
      }
    }
  }
}

// kVec: the gradient rows are misaligned exactly as the logits rows, so one head serves both.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kMaxThreads)
    cross_entropy_backward_kernel(const T* logits, int64_t stride, const int64_t* __restrict__ targets,
                                  const float* __restrict__ lse_in, const float* __restrict__ scale_in, T* grad,
                                  int64_t grad_stride, int64_t rows, int64_t n_classes, int64_t ignore_index) {
  if constexpr (!CompiledForThisArch<T>::value) {
    __trap();
  } else {
    constexpr int V = vec_of<T>();
    const int tid = threadIdx.x, threads = blockDim.x;
    for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
      const T* x = logits + row * stride;  // not __restrict__: grad may be the logits
      T* g = grad + row * grad_stride;
      const int64_t target = targets[row];
      if (target == ignore_index) {  // exactly zero, without reading x (which may hold inf)
        for (int64_t i = tid; i < n_classes; i += threads) g[i] = from_float<T>(0.f);
        continue;
      }
      const float lse = lse_in[row];
      const float scale = (target >= 0 && target < n_classes) ? *scale_in : __int_as_float(0x7fc00000);
      auto grad_of = [&](float v, int64_t i) {
        return (exp_of_difference(v - lse) - (i == target ? 1.f : 0.f)) * scale;
      };
      const int64_t head = kVec ? head_of(x, n_classes) : 0;
      for (int64_t i = tid; i < head; i += threads) g[i] = from_float<T>(grad_of(to_float(x[i]), i));
      const int64_t n_vec = kVec ? (n_classes - head) / V : 0;
      int64_t k = tid;
      for (; k + (kUnroll - 1) * threads < n_vec; k += kUnroll * threads) {
        float v[kUnroll][V];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) load_vec<V>(x + head + (k + u * threads) * V, v[u]);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t i0 = head + (k + u * threads) * V;
#pragma unroll
          for (int j = 0; j < V; ++j) v[u][j] = grad_of(v[u][j], i0 + j);
          store_vec<V>(g + i0, v[u]);
        }
      }
      for (; k < n_vec; k += threads) {
        float v[V];
        const int64_t i0 = head + k * V;
        load_vec<V>(x + i0, v);
#pragma unroll
        for (int j = 0; j < V; ++j) v[j] = grad_of(v[j], i0 + j);
        store_vec<V>(g + i0, v);
      }
      for (int64_t i = head + n_vec * V + tid; i < n_classes; i += threads)
        g[i] = from_float<T>(grad_of(to_float(x[i]), i));
    }
  }
}

int threads_for(int64_t n_classes, int vec) {
  const int64_t vecs = ceil_div(n_classes, vec);
  int threads = 32;
  while (threads < kMaxThreads && vecs > static_cast<int64_t>(threads) * kVectorsPerThread) threads *= 2;
  return threads;
}

unsigned grid_for(int64_t rows) { return static_cast<unsigned>(std::min<int64_t>(rows, 0x7fffffff)); }

}  // namespace

cudaError_t cross_entropy_forward(DType dtype, const void* logits, int64_t row_stride, const int64_t* targets,
                                  float* loss, float* lse, int64_t rows, int64_t n_classes, int64_t ignore_index,
                                  cudaStream_t stream) {
  if (n_classes <= 0 || rows < 0 || (rows > 1 && row_stride < n_classes)) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  return dispatch_one(dtype, [&](auto t_tag) -> cudaError_t {
    using T = decltype(t_tag);
    const int threads = threads_for(n_classes, vec_of<T>());
    return launch_kernel(cross_entropy_forward_kernel<T>, grid_for(rows), threads, 0, stream,
                         static_cast<const T*>(logits), row_stride, targets, loss, lse, rows, n_classes,
                         ignore_index);
  });
}

cudaError_t cross_entropy_backward(DType dtype, const void* logits, int64_t row_stride, const int64_t* targets,
                                   const float* lse, const float* scale, void* grad, int64_t grad_row_stride,
                                   int64_t rows, int64_t n_classes, int64_t ignore_index, cudaStream_t stream) {
  if (n_classes <= 0 || rows < 0 || (rows > 1 && (row_stride < n_classes || grad_row_stride < n_classes)))
    return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  return dispatch_one(dtype, [&](auto t_tag) -> cudaError_t {
    using T = decltype(t_tag);
    const int threads = threads_for(n_classes, vec_of<T>());
    // One head serves both rows when grad - logits is a multiple of 16 bytes in every row.
    const int64_t byte_gap = static_cast<int64_t>(reinterpret_cast<uintptr_t>(grad) - reinterpret_cast<uintptr_t>(logits));
    const bool vec = byte_gap % 16 == 0 &&
                     (rows <= 1 || ((grad_row_stride - row_stride) * static_cast<int64_t>(sizeof(T))) % 16 == 0);
    const T* x = static_cast<const T*>(logits);
    T* g = static_cast<T*>(grad);
    return launch_kernel(vec ? cross_entropy_backward_kernel<T, true> : cross_entropy_backward_kernel<T, false>,
                         grid_for(rows), threads, 0, stream, x, row_stride, targets, lse, scale, g,
                         grad_row_stride, rows, n_classes, ignore_index);
  });
}

}  // namespace kernels
}  // namespace gpt2fast
