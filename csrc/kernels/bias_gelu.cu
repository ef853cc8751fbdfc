// GELU (tanh approximation) of x + bias, forward and backward.
//
// Both kernels tile the (rows x width) matrix with blocks of 32 column vectors x 8 thread rows; a thread owns one
// vector of N = 16 / sizeof(T) columns (one 16-byte load per tensor when the rows are aligned, else N = 1) and
// keeps the bias for it in registers across its rows. Forward: a thread handles kForwardRows rows of its block,
// loads issued before the math so several are in flight. Backward: a block owns a contiguous run of rows; its
// threads accumulate dbias in registers, the block's 8 thread rows are added in a fixed order into one row of
// fp32 partials, and a second kernel sums the partial rows in a fixed order: deterministic, no atomics.
//
// gelu_tanh(z) = z * sigmoid(2u), u = sqrt(2/pi) (z + 0.044715 z^3), with sigmoid(2u) and its derivative s (1 - s)
// both formed from t = exp(-|2u|) <= 1: no overflow, and no 1 - s cancellation where s is close to 1.
#include <algorithm>
#include <initializer_list>

#include "common.cuh"

namespace gpt2fast {
namespace kernels {
namespace {

constexpr int kThreadsX = 32;      // column vectors per block
constexpr int kThreadsY = 8;       // thread rows per block
constexpr int kForwardRows = 4;    // rows per thread, forward: a block covers 32 rows
constexpr int kBwdBlocksPerSm = 8; // backward blocks per SM (256 threads each); a tuning knob

constexpr float kTwoSqrt2OverPi = 2.0f * 0.7978845608028654f;
constexpr float kCubic = 0.044715f;

// s = sigmoid(2u) and ds = s (1 - s), for z = x + bias.
__device__ __forceinline__ void gelu_parts(float z, float& s, float& ds) {
  const float u2 = kTwoSqrt2OverPi * (z + kCubic * z * z * z);
  const float t = __expf(-fabsf(u2));          // in (0, 1]: the fast exponential is accurate here
  const float r = __fdividef(1.0f, 1.0f + t);  // denominator in [1, 2]
  s = u2 >= 0.f ? r : t * r;
  ds = t * r * r;
}

__device__ __forceinline__ float gelu(float z) {
  float s, ds;
  gelu_parts(z, s, ds);
  return z * s;
}

__device__ __forceinline__ float gelu_grad(float z, float dy) {
  float s, ds;
  gelu_parts(z, s, ds);
  const float du2 = kTwoSqrt2OverPi * (1.0f + 3.0f * kCubic * z * z);
  return dy * (s + z * ds * du2);
}

template <int N, typename T>
__device__ __forceinline__ void load_n(const T* __restrict__ p, float (&out)[N]) {
  if constexpr (N == 1) out[0] = to_float(*p);
  else load_vec<N>(p, out);
}

template <int N, typename T>
__device__ __forceinline__ void store_n(T* __restrict__ p, const float (&in)[N]) {
  if constexpr (N == 1) *p = from_float<T>(in[0]);
  else store_vec<N>(p, in);
}

template <typename T, typename B, int N>
__global__ void __launch_bounds__(kThreadsX * kThreadsY)
    bias_gelu_forward_kernel(const T* __restrict__ x, int64_t x_stride, const B* __restrict__ bias,
                             T* __restrict__ y, int64_t rows, int64_t width) {
  if constexpr (!CompiledForThisArch<T>::value) {
    __trap();
  } else {
    const int64_t col = (static_cast<int64_t>(blockIdx.y) * kThreadsX + threadIdx.x) * N;
    if (col >= width) return;  // N divides width, so a vector is all in or all out
    float b[N];
    load_n<N>(bias + col, b);
    const int64_t row0 = static_cast<int64_t>(blockIdx.x) * (kThreadsY * kForwardRows) + threadIdx.y;
    float v[kForwardRows][N];
#pragma unroll
    for (int r = 0; r < kForwardRows; ++r) {
      const int64_t row = row0 + r * kThreadsY;
      if (row < rows) load_n<N>(x + row * x_stride + col, v[r]);
    }
#pragma unroll
    for (int r = 0; r < kForwardRows; ++r) {
      const int64_t row = row0 + r * kThreadsY;
      if (row < rows) {
        float out[N];
#pragma unroll
        for (int j = 0; j < N; ++j) out[j] = gelu(v[r][j] + b[j]);
        store_n<N>(y + row * width + col, out);
      }
    }
  }
}

template <typename T, typename B, int N>
__global__ void __launch_bounds__(kThreadsX * kThreadsY)
    bias_gelu_backward_kernel(const T* __restrict__ x, int64_t x_stride, const B* __restrict__ bias,
                              const T* __restrict__ dy, int64_t dy_stride, T* __restrict__ dx,
                              float* __restrict__ partials, int64_t rows, int64_t width, int64_t rows_per_block) {
  if constexpr (!CompiledForThisArch<T>::value) {
    __trap();
  } else {
    __shared__ float sums[kThreadsY][kThreadsX * N];
    const int64_t col = (static_cast<int64_t>(blockIdx.y) * kThreadsX + threadIdx.x) * N;
    const bool in_range = col < width;
    float acc[N];
#pragma unroll
    for (int j = 0; j < N; ++j) acc[j] = 0.f;
    if (in_range) {
      float b[N];
      load_n<N>(bias + col, b);
      const int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_block;
      const int64_t end = min(first + rows_per_block, rows);
      // Two rows per trip: both rows' loads are issued before either's math.
      int64_t row = first + threadIdx.y;
      for (; row + kThreadsY < end; row += 2 * kThreadsY) {
        float xv[2][N], g[2][N];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          load_n<N>(x + (row + r * kThreadsY) * x_stride + col, xv[r]);
          load_n<N>(dy + (row + r * kThreadsY) * dy_stride + col, g[r]);
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float out[N];
#pragma unroll
          for (int j = 0; j < N; ++j) {
            out[j] = gelu_grad(xv[r][j] + b[j], g[r][j]);
            acc[j] += out[j];
          }
          store_n<N>(dx + (row + r * kThreadsY) * width + col, out);
        }
      }
      if (row < end) {
        float xv[N], g[N], out[N];
        load_n<N>(x + row * x_stride + col, xv);
        load_n<N>(dy + row * dy_stride + col, g);
#pragma unroll
        for (int j = 0; j < N; ++j) {
          out[j] = gelu_grad(xv[j] + b[j], g[j]);
          acc[j] += out[j];
        }
        store_n<N>(dx + row * width + col, out);
      }
    }
    // dbias of this block: the 8 thread rows added in order, one row of partial sums.
#pragma unroll
    for (int j = 0; j < N; ++j) sums[threadIdx.y][threadIdx.x * N + j] = acc[j];
    __syncthreads();
    if (threadIdx.y == 0 && in_range) {
#pragma unroll
      for (int j = 0; j < N; ++j) {
        float total = 0.f;
#pragma unroll
        for (int y = 0; y < kThreadsY; ++y) total += sums[y][threadIdx.x * N + j];
        partials[static_cast<int64_t>(blockIdx.x) * width + col + j] = total;
      }
    }
  }
}

int vector_width(DType dtype, DType bias_dtype, int64_t width, std::initializer_list<const void*> ptrs,
                 std::initializer_list<int64_t> strides) {
  const int n = 16 / dtype_size(dtype);
  (void)bias_dtype;  // a float bias with n = 8 is two aligned 16-byte loads: needs only the base aligned
  if (width % n != 0) return 1;
  for (const void* p : ptrs)
    if (!aligned16(p)) return 1;
  for (int64_t s : strides)
    if (s % n != 0) return 1;
  return n;
}

int64_t column_tiles(int64_t width, int n) { return ceil_div(ceil_div(width, n), kThreadsX); }

}  // namespace

cudaError_t bias_gelu_forward(DType dtype, DType bias_dtype, const void* x, int64_t x_row_stride,
                              const void* bias, void* y, int64_t rows, int64_t width, cudaStream_t stream) {
  if (width <= 0 || rows < 0 || x_row_stride < width) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  const int n = vector_width(dtype, bias_dtype, width, {x, bias, y}, {x_row_stride});
  const int64_t tiles = column_tiles(width, n);
  const int64_t row_blocks = ceil_div(rows, kThreadsY * kForwardRows);
  if (tiles > 65535 || row_blocks > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(tiles));
  const dim3 block(kThreadsX, kThreadsY);
  return dispatch_pair(dtype, bias_dtype, [&](auto t_tag, auto b_tag) -> cudaError_t {
    using T = decltype(t_tag);
    using B = decltype(b_tag);
    constexpr int V = vec_of<T>();
    return launch_kernel(n == V ? bias_gelu_forward_kernel<T, B, V> : bias_gelu_forward_kernel<T, B, 1>, grid, block,
                         0, stream, static_cast<const T*>(x), x_row_stride, static_cast<const B*>(bias),
                         static_cast<T*>(y), rows, width);
  });
}

int64_t bias_gelu_backward_partial_rows(DType dtype, DType bias_dtype, int64_t rows, int64_t width, int device) {
  (void)bias_dtype;
  if (rows <= 0 || width <= 0) return 1;
  const int64_t tiles = column_tiles(width, 16 / dtype_size(dtype));  // the vectorised layout's tiles
  const int64_t target = ceil_div(static_cast<int64_t>(sm_count(device)) * kBwdBlocksPerSm, tiles);
  return std::max<int64_t>(1, std::min(target, ceil_div(rows, kThreadsY)));
}

cudaError_t bias_gelu_backward(DType dtype, DType bias_dtype, const void* x, int64_t x_row_stride,
                               const void* bias, const void* dy, int64_t dy_row_stride, void* dx, void* dbias,
                               float* partials, int64_t partial_rows, int64_t rows, int64_t width,
                               cudaStream_t stream) {
  if (width <= 0 || rows < 0 || partial_rows < 1 || x_row_stride < width || dy_row_stride < width)
    return cudaErrorInvalidValue;
  const int n = vector_width(dtype, bias_dtype, width, {x, bias, dy, dx}, {x_row_stride, dy_row_stride});
  const int64_t tiles = column_tiles(width, n);
  if (tiles > 65535) return cudaErrorInvalidValue;
  return dispatch_pair(dtype, bias_dtype, [&](auto t_tag, auto b_tag) -> cudaError_t {
    using T = decltype(t_tag);
    using B = decltype(b_tag);
    if (rows == 0) return cudaMemsetAsync(dbias, 0, static_cast<size_t>(width) * sizeof(B), stream);
    const int64_t rows_per_block = ceil_div(rows, std::min(partial_rows, rows));
    const int64_t groups = ceil_div(rows, rows_per_block);  // <= partial_rows; every block has rows
    const dim3 grid(static_cast<unsigned>(groups), static_cast<unsigned>(tiles));
    const dim3 block(kThreadsX, kThreadsY);
    constexpr int V = vec_of<T>();
    cudaError_t err = launch_kernel(
        n == V ? bias_gelu_backward_kernel<T, B, V> : bias_gelu_backward_kernel<T, B, 1>, grid, block, 0, stream,
        static_cast<const T*>(x), x_row_stride, static_cast<const B*>(bias), static_cast<const T*>(dy),
        dy_row_stride, static_cast<T*>(dx), partials, rows, width, rows_per_block);
    if (err != cudaSuccess) return err;
    return launch_column_sums<B>(partials, groups, width, static_cast<B*>(dbias), static_cast<B*>(dbias), 1,
                                 stream);
  });
}

}  // namespace kernels
}  // namespace gpt2fast
