// Residual add + LayerNorm, forward and backward.
//
// Layout: a row is handled by a "team" of blockDim.x threads (a multiple of 32, the smallest that keeps the row
// in registers); a block holds blockDim.y teams, one row each, so narrow rows (GPT-2's 768) still make blocks of
// 256 threads. A thread owns `chunks` chunks of V = 16 / sizeof(T) elements: chunk c of thread t is the run of V
// columns starting at (c * team + t) * V, read with one 16-byte load per tensor in the vectorised variant (rows
// 16-byte aligned, width a multiple of V) and element by element, each bound-checked, in the scalar one.
//
// Forward: one read of x (and residual), h = x + residual rounded to T and written (the backward pass reads the
// stored h, so it differentiates exactly what was normalised), mean and variance in two passes over registers
// (no E[x^2] - E[x]^2 cancellation), y written. Backward: per row, dx = rstd * (w dy - mean(w dy) - xhat *
// mean(xhat w dy)) (+ dh, the gradient reaching h from downstream); dweight and dbias accumulate in registers
// over the block's rows, are reduced across the block's teams in a fixed order and written as one row of fp32
// partials per block, which a second kernel sums in a fixed order: deterministic, no atomics.
#include <algorithm>

#include "common.cuh"

namespace gpt2fast {
namespace kernels {
namespace {

// Values of a row one thread holds, and the largest team. Forward keeps one array of them (at most 64
// registers at 1024 threads); backward keeps four (xhat, w*dy, dweight, dbias: about 100 registers), so its
// teams stop at 512 threads. ptxas -v shows no spills for the vectorised variants on sm_90.
constexpr int kFwdMaxElems = 32;
constexpr int kFwdMaxTeam = 1024;
constexpr int kBwdMaxElems = 16;
constexpr int kBwdMaxTeam = 512;
constexpr int kBlockThreads = 256;   // teams per block = kBlockThreads / team, when the team is smaller
constexpr int kMaxTeamsPerBlock = kBlockThreads / 32;
constexpr int kBwdBlocksPerSm = 4;   // backward blocks (= rows of partial sums) per SM; a tuning knob

// The team: the smallest multiple of 32 threads whose chunks cover the row.
int team_size(int64_t width, int vec, int max_elems) {
  const int64_t vecs = ceil_div(width, vec);
  const int64_t max_chunks = max_elems / vec;
  int64_t team = ceil_div(ceil_div(vecs, max_chunks), 32) * 32;
  return static_cast<int>(std::max<int64_t>(32, team));
}

struct FwdParams {
  const void* x;
  const void* residual;
  const void* weight;
  const void* bias;
  void* y;
  void* h;
  float* mean;
  float* rstd;
  int64_t x_stride;
  int64_t r_stride;
  int64_t rows;
  int64_t width;
  float eps;
  int chunks;
};

struct BwdParams {
  const void* h;
  const void* dy;
  const void* dh;
  const void* weight;
  const float* mean;
  const float* rstd;
  void* dx;
  float* partials;
  int64_t h_stride;
  int64_t dy_stride;
  int64_t dh_stride;
  int64_t rows;
  int64_t width;
  int64_t rows_per_block;
  int64_t groups;
  int chunks;
};

// Column of element j of chunk c for thread t of a team of `team` threads (32-bit: width <= max width). Both
// variants use the same layout; the scalar one (rows not 16-byte aligned, or width not a multiple of V) loads
// element by element with a bound check each. (A layout strided by the team, coalesced per load, made ptxas
// spill in the backward kernel: sixteen predicated loads with their own addresses.)
template <int V>
__device__ __forceinline__ int column(int c, int j, int t, int team) {
  return (c * team + t) * V + j;
}

template <typename T, typename P, bool kVec, bool kResidual>
__global__ void __launch_bounds__(kFwdMaxTeam) layer_norm_forward_kernel(FwdParams p) {
  if constexpr (!CompiledForThisArch<T>::value) {
    __trap();
  } else {
    constexpr int V = vec_of<T>();
    constexpr int C = kFwdMaxElems / V;
    __shared__ float2 scratch[kMaxTeamsPerBlock * 32];
    const T* __restrict__ x = static_cast<const T*>(p.x);
    const T* __restrict__ res = static_cast<const T*>(p.residual);
    const P* __restrict__ weight = static_cast<const P*>(p.weight);
    const P* __restrict__ bias = static_cast<const P*>(p.bias);
    T* __restrict__ y = static_cast<T*>(p.y);
    T* __restrict__ hout = static_cast<T*>(p.h);
    const int t = threadIdx.x, team = blockDim.x;
    const int width = static_cast<int>(p.width);
    const float fwidth = static_cast<float>(width);

    for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < p.rows;
         base += static_cast<int64_t>(gridDim.x) * blockDim.y) {
      const int64_t row = base + threadIdx.y;
      const bool active = row < p.rows;
      const int64_t r = active ? row : 0;
      const T* xr = x + r * p.x_stride;
      const T* rr = kResidual ? res + r * p.r_stride : nullptr;
      T* hr = kResidual ? hout + r * width : nullptr;
      T* yr = y + r * width;
      float v[C][V];
      float sum = 0.f;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        if (c >= p.chunks) continue;  // chunks never exceeds C; `continue` keeps the loop fully unrolled
        if constexpr (kVec) {
          const int col = column<V>(c, 0, t, team);
          if (active && col < width) {
            load_vec<V>(xr + col, v[c]);
            if constexpr (kResidual) {
              float rv[V];
              load_vec<V>(rr + col, rv);
#pragma unroll
              for (int j = 0; j < V; ++j) v[c][j] = to_float(from_float<T>(v[c][j] + rv[j]));
              store_vec<V>(hr + col, v[c]);  // exact: the values are already T's
            }
#pragma unroll
            for (int j = 0; j < V; ++j) sum += v[c][j];
          } else {
#pragma unroll
            for (int j = 0; j < V; ++j) v[c][j] = 0.f;
          }
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const int col = column<V>(c, j, t, team);
            v[c][j] = 0.f;
            if (active && col < width) {
              float hv = to_float(xr[col]);
              if constexpr (kResidual) {
                const T rounded = from_float<T>(hv + to_float(rr[col]));
                hr[col] = rounded;
                hv = to_float(rounded);
              }
              v[c][j] = hv;
              sum += hv;
            }
          }
        }
      }
      const float mean = team_sum(sum, scratch) / fwidth;

      float sq = 0.f;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        if (c >= p.chunks) continue;  // chunks never exceeds C; `continue` keeps the loop fully unrolled
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const int col = column<V>(c, j, t, team);
          const float d = v[c][j] - mean;
          if (active && col < width) sq += d * d;
        }
      }
      const float rstd = 1.f / sqrtf(team_sum(sq, scratch) / fwidth + p.eps);

#pragma unroll
      for (int c = 0; c < C; ++c) {
        if (c >= p.chunks) continue;  // chunks never exceeds C; `continue` keeps the loop fully unrolled
        if constexpr (kVec) {
          const int col = column<V>(c, 0, t, team);
          if (active && col < width) {
            float w[V], b[V], out[V];
            load_vec<V>(weight + col, w);
            load_vec<V>(bias + col, b);
#pragma unroll
            for (int j = 0; j < V; ++j) out[j] = (v[c][j] - mean) * rstd * w[j] + b[j];
            store_vec<V>(yr + col, out);
          }
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const int col = column<V>(c, j, t, team);
            if (active && col < width) {
              const float out = (v[c][j] - mean) * rstd * to_float(weight[col]) + to_float(bias[col]);
              yr[col] = from_float<T>(out);
            }
          }
        }
      }
      if (active && t == 0) {
        p.mean[row] = mean;
        p.rstd[row] = rstd;
      }
    }
  }
}

template <typename T, typename P, bool kVec, bool kDh>
__global__ void __launch_bounds__(kBwdMaxTeam) layer_norm_backward_kernel(BwdParams p) {
  if constexpr (!CompiledForThisArch<T>::value) {
    __trap();
  } else {
    constexpr int V = vec_of<T>();
    constexpr int C = kBwdMaxElems / V;
    __shared__ float2 scratch[kMaxTeamsPerBlock * 32];
    GPT2FAST_DYNAMIC_SHARED(float, team_partials);  // 2 * width floats, when blockDim.y > 1
    const T* __restrict__ h = static_cast<const T*>(p.h);
    const T* __restrict__ dy = static_cast<const T*>(p.dy);
    const T* __restrict__ dh = static_cast<const T*>(p.dh);
    const P* __restrict__ weight = static_cast<const P*>(p.weight);
    T* __restrict__ dx = static_cast<T*>(p.dx);
    const int t = threadIdx.x, team = blockDim.x;
    const int width = static_cast<int>(p.width);
    const float fwidth = static_cast<float>(width);

    float dw[C][V], db[C][V];
#pragma unroll
    for (int c = 0; c < C; ++c) {
#pragma unroll
      for (int j = 0; j < V; ++j) dw[c][j] = db[c][j] = 0.f;
    }

    const int64_t first = static_cast<int64_t>(blockIdx.x) * p.rows_per_block;
    const int64_t end = min(first + p.rows_per_block, p.rows);
    for (int64_t base = first; base < end; base += blockDim.y) {
      const int64_t row = base + threadIdx.y;
      const bool active = row < end;
      const int64_t r = active ? row : 0;
      const T* hr = h + r * p.h_stride;
      const T* gr = dy + r * p.dy_stride;
      const T* dhr = kDh ? dh + r * p.dh_stride : nullptr;
      T* dxr = dx + r * width;
      const float mu = active ? p.mean[row] : 0.f;
      const float rs = active ? p.rstd[row] : 0.f;
      float xhat[C][V], wdy[C][V];
      float sum_xhat_wdy = 0.f, sum_wdy = 0.f;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        if (c >= p.chunks) continue;  // chunks never exceeds C; `continue` keeps the loop fully unrolled
#pragma unroll
        for (int j = 0; j < V; ++j) xhat[c][j] = wdy[c][j] = 0.f;
        if constexpr (kVec) {
          const int col = column<V>(c, 0, t, team);
          if (active && col < width) {
            float hv[V], g[V], w[V];
            load_vec<V>(hr + col, hv);
            load_vec<V>(gr + col, g);
            load_vec<V>(weight + col, w);
#pragma unroll
            for (int j = 0; j < V; ++j) {
              xhat[c][j] = (hv[j] - mu) * rs;
              wdy[c][j] = w[j] * g[j];
              sum_xhat_wdy += xhat[c][j] * wdy[c][j];
              sum_wdy += wdy[c][j];
              dw[c][j] += g[j] * xhat[c][j];
              db[c][j] += g[j];
            }
          }
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const int col = column<V>(c, j, t, team);
            if (active && col < width) {
              const float g = to_float(gr[col]);
              xhat[c][j] = (to_float(hr[col]) - mu) * rs;
              wdy[c][j] = to_float(weight[col]) * g;
              sum_xhat_wdy += xhat[c][j] * wdy[c][j];
              sum_wdy += wdy[c][j];
              dw[c][j] += g * xhat[c][j];
              db[c][j] += g;
            }
          }
        }
      }
      const float2 sums = team_sum2(make_float2(sum_xhat_wdy, sum_wdy), scratch);
      const float c_xhat = sums.x / fwidth, c_mean = sums.y / fwidth;

#pragma unroll
      for (int c = 0; c < C; ++c) {
        if (c >= p.chunks) continue;  // chunks never exceeds C; `continue` keeps the loop fully unrolled
        if constexpr (kVec) {
          const int col = column<V>(c, 0, t, team);
          if (active && col < width) {
            float out[V];
#pragma unroll
            for (int j = 0; j < V; ++j) out[j] = (wdy[c][j] - (xhat[c][j] * c_xhat + c_mean)) * rs;
            if constexpr (kDh) {
              float g[V];
              load_vec<V>(dhr + col, g);
#pragma unroll
              for (int j = 0; j < V; ++j) out[j] += g[j];
            }
            store_vec<V>(dxr + col, out);
          }
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const int col = column<V>(c, j, t, team);
            if (active && col < width) {
              float out = (wdy[c][j] - (xhat[c][j] * c_xhat + c_mean)) * rs;
              if constexpr (kDh) out += to_float(dhr[col]);
              dxr[col] = from_float<T>(out);
            }
          }
        }
      }
    }

    // This block's dweight and dbias: the teams' sums added in team order, then one row of partials.
    float* dw_out = p.partials + static_cast<int64_t>(blockIdx.x) * width;
    float* db_out = p.partials + (p.groups + blockIdx.x) * width;
    const int teams = blockDim.y;
    for (int y = 0; y < teams; ++y) {
      if (threadIdx.y == y) {
#pragma unroll
        for (int c = 0; c < C; ++c) {
          if (c >= p.chunks) continue;  // chunks never exceeds C; `continue` keeps the loop fully unrolled
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const int col = column<V>(c, j, t, team);
            if (col < width) {
              float w_sum = dw[c][j], b_sum = db[c][j];
              if (y > 0) {
                w_sum += team_partials[col];
                b_sum += team_partials[width + col];
              }
              if (y == teams - 1) {
                dw_out[col] = w_sum;
                db_out[col] = b_sum;
              } else {
                team_partials[col] = w_sum;
                team_partials[width + col] = b_sum;
              }
            }
          }
        }
      }
      if (teams > 1) __syncthreads();
    }
  }
}

struct LaunchShape {
  int team;
  int teams;
  int chunks;
};

LaunchShape shape_for(int64_t width, int vec, int max_elems) {
  LaunchShape s;
  s.team = team_size(width, vec, max_elems);
  s.teams = std::max(1, kBlockThreads / s.team);
  s.chunks = static_cast<int>(ceil_div(ceil_div(width, vec), s.team));
  return s;
}

bool row_aligned(const void* p, int64_t stride, int vec) { return p == nullptr || (aligned16(p) && stride % vec == 0); }

// Variadic: built for several architectures in one nvcc call (the extension's -gencode list), __CUDA_ARCH_LIST__
// expands to 750,800,900, which a one-parameter macro receives as three arguments (a compile error).
// #__VA_ARGS__ keeps the commas; nvcc defines the list without spaces, so the string is "750,800,900".
#define GPT2FAST_STRINGIFY2(...) #__VA_ARGS__
#define GPT2FAST_STRINGIFY(...) GPT2FAST_STRINGIFY2(__VA_ARGS__)

}  // namespace

// Build facts for the diagnostics (python -m gpt2fast.ops.info); here because every build compiles this file.
const char* compiled_architectures() {
#ifdef __CUDA_ARCH_LIST__
  return GPT2FAST_STRINGIFY(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

int cuda_runtime_version_built() { return CUDART_VERSION; }

int64_t layer_norm_max_width() {
  return std::min<int64_t>(static_cast<int64_t>(kFwdMaxTeam) * kFwdMaxElems,
                           static_cast<int64_t>(kBwdMaxTeam) * kBwdMaxElems);
}

cudaError_t layer_norm_forward(DType dtype, DType param_dtype, const void* x, int64_t x_row_stride,
                               const void* residual, int64_t residual_row_stride, const void* weight,
                               const void* bias, void* y, void* h, float* mean, float* rstd, int64_t rows,
                               int64_t width, float eps, cudaStream_t stream) {
  if (width <= 0 || width > layer_norm_max_width() || rows < 0 || x_row_stride < width) return cudaErrorInvalidValue;
  if (residual != nullptr && (h == nullptr || residual_row_stride < width)) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  return dispatch_pair(dtype, param_dtype, [&](auto t_tag, auto p_tag) -> cudaError_t {
    using T = decltype(t_tag);
    using P = decltype(p_tag);
    constexpr int V = vec_of<T>();
    const LaunchShape s = shape_for(width, V, kFwdMaxElems);
    const bool vec = width % V == 0 && row_aligned(x, x_row_stride, V) &&
                     row_aligned(residual, residual_row_stride, V) && aligned16(y) && (h == nullptr || aligned16(h)) &&
                     aligned16(weight) && aligned16(bias);
    FwdParams p{x, residual, weight, bias, y, h, mean, rstd, x_row_stride, residual_row_stride, rows, width, eps,
                s.chunks};
    const dim3 block(s.team, s.teams);
    const unsigned grid = static_cast<unsigned>(std::min<int64_t>(ceil_div(rows, s.teams), 1 << 30));
    const bool has_res = residual != nullptr;
    void (*kernel)(FwdParams) =
        vec ? (has_res ? layer_norm_forward_kernel<T, P, true, true> : layer_norm_forward_kernel<T, P, true, false>)
            : (has_res ? layer_norm_forward_kernel<T, P, false, true> : layer_norm_forward_kernel<T, P, false, false>);
    return launch_kernel(kernel, grid, block, 0, stream, p);
  });
}

int64_t layer_norm_backward_partial_rows(DType dtype, DType param_dtype, int64_t rows, int64_t width, int device) {
  (void)param_dtype;
  if (rows <= 0 || width <= 0) return 1;
  const LaunchShape s = shape_for(width, 16 / dtype_size(dtype), kBwdMaxElems);
  const int64_t target = static_cast<int64_t>(sm_count(device)) * kBwdBlocksPerSm;
  return std::max<int64_t>(1, std::min(ceil_div(rows, s.teams), target));
}

cudaError_t layer_norm_backward(DType dtype, DType param_dtype, const void* h, int64_t h_row_stride,
                                const void* dy, int64_t dy_row_stride, const void* dh, int64_t dh_row_stride,
                                const void* weight, const float* mean, const float* rstd, void* dx, void* dweight,
                                void* dbias, float* partials, int64_t partial_rows, int64_t rows, int64_t width,
                                cudaStream_t stream) {
  if (width <= 0 || width > layer_norm_max_width() || rows < 0 || partial_rows < 1 || h_row_stride < width ||
      dy_row_stride < width || (dh != nullptr && dh_row_stride < width))
    return cudaErrorInvalidValue;
  return dispatch_pair(dtype, param_dtype, [&](auto t_tag, auto p_tag) -> cudaError_t {
    using T = decltype(t_tag);
    using P = decltype(p_tag);
    if (rows == 0) {  // no rows: zero parameter gradients
      const size_t bytes = static_cast<size_t>(width) * sizeof(P);
      cudaError_t err = cudaMemsetAsync(dweight, 0, bytes, stream);
      return err != cudaSuccess ? err : cudaMemsetAsync(dbias, 0, bytes, stream);
    }
    constexpr int V = vec_of<T>();
    const LaunchShape s = shape_for(width, V, kBwdMaxElems);
    const int64_t groups = std::min(partial_rows, rows);
    const bool vec = width % V == 0 && row_aligned(h, h_row_stride, V) && row_aligned(dy, dy_row_stride, V) &&
                     row_aligned(dh, dh_row_stride, V) && aligned16(dx) && aligned16(weight);
    BwdParams p{h,    dy,       dh,   weight, mean,   rstd,  dx, partials, h_row_stride, dy_row_stride,
                dh_row_stride, rows, width, ceil_div(rows, groups), 0, s.chunks};
    p.groups = ceil_div(rows, p.rows_per_block);  // <= groups: every block has at least one row
    const dim3 block(s.team, s.teams);
    const unsigned grid = static_cast<unsigned>(p.groups);
    const size_t smem = s.teams > 1 ? 2 * static_cast<size_t>(width) * sizeof(float) : 0;
    const bool has_dh = dh != nullptr;
    void (*kernel)(BwdParams) =
        vec ? (has_dh ? layer_norm_backward_kernel<T, P, true, true> : layer_norm_backward_kernel<T, P, true, false>)
            : (has_dh ? layer_norm_backward_kernel<T, P, false, true> : layer_norm_backward_kernel<T, P, false, false>);
    cudaError_t err = launch_kernel(kernel, grid, block, smem, stream, p);
    if (err != cudaSuccess) return err;
    // The partials have p.groups rows per output; the dbias half starts at row p.groups.
    return launch_column_sums<P>(partials, p.groups, width, static_cast<P*>(dweight), static_cast<P*>(dbias), 2,
                                 stream);
  });
}

}  // namespace kernels
}  // namespace gpt2fast
