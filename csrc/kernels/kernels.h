// Host launchers of gpt2fast's CUDA kernels. Plain CUDA C++: no torch, no Python.
//
// Every launcher takes raw device pointers, sizes and row strides (in elements), enqueues its kernels on
// `stream` and returns the launch status (cudaGetLastError after each launch), or cudaErrorInvalidValue for
// arguments it cannot take, or cudaErrorNotSupported for a dtype the current device lacks (bf16 before sm_80).
// Callers (csrc/bindings/cuda_ops.cpp) check arguments first and turn a non-success status into an error.
//
// Conventions: "rows" x "width" matrices whose last dimension is contiguous; a row stride is the distance in
// elements between the starts of consecutive rows (>= width). Outputs documented as contiguous have row
// stride == width. Arithmetic is fp32 in registers whatever the storage dtype.
//
// One section per op, in the binding's order, each naming the .cu file (in csrc/kernels) that defines it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace gpt2fast {
namespace kernels {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline int dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

// The architectures the kernels were compiled for, as nvcc's __CUDA_ARCH_LIST__ spells them ("750,800,900"),
// or "unknown"; and the CUDA runtime version they were built against (CUDART_VERSION, e.g. 13000). Defined in
// layer_norm.cu.
const char* compiled_architectures();
int cuda_runtime_version_built();

// ======================================================================================= LayerNorm (layer_norm.cu)
// Widest row the LayerNorm kernels take: a row lives in the registers of one block.
int64_t layer_norm_max_width();

// y = LN(h) * weight + bias over the last dimension, h = x + residual (rounded to x's dtype and written to `h`)
// when `residual` is not null, else h = x. Statistics in fp32: writes mean[rows] and rstd[rows] = 1/sqrt(var +
// eps) for the backward pass. x, residual, y, h have dtype `dtype`; weight and bias have `param_dtype`, which is
// `dtype` or kFloat32. y and h are contiguous; x and residual may have a row stride.
cudaError_t layer_norm_forward(DType dtype, DType param_dtype, const void* x, int64_t x_row_stride,
                               const void* residual, int64_t residual_row_stride, const void* weight,
                               const void* bias, void* y, void* h, float* mean, float* rstd, int64_t rows,
                               int64_t width, float eps, cudaStream_t stream);

// How many rows of fp32 partial sums layer_norm_backward uses for these sizes on `device`: the caller allocates
// a workspace of 2 * partial_rows * width floats and passes both to layer_norm_backward.
int64_t layer_norm_backward_partial_rows(DType dtype, DType param_dtype, int64_t rows, int64_t width, int device);

// Gradients of layer_norm_forward. h is the normalised input (the stored h, or x when there was no residual);
// dy the gradient of y; dh (may be null) the gradient reaching h from downstream (the residual stream), added to
// dx. Writes dx (contiguous, `dtype`), dweight and dbias (`param_dtype`). dweight/dbias are reduced as
// partial_rows per-block partial sums (in `partials`), then summed in a fixed order: deterministic.
cudaError_t layer_norm_backward(DType dtype, DType param_dtype, const void* h, int64_t h_row_stride,
                                const void* dy, int64_t dy_row_stride, const void* dh, int64_t dh_row_stride,
                                const void* weight, const float* mean, const float* rstd, void* dx, void* dweight,
                                void* dbias, float* partials, int64_t partial_rows, int64_t rows, int64_t width,
                                cudaStream_t stream);

// ====================================================================================== bias + GELU (bias_gelu.cu)
// y = gelu_tanh(x + bias), bias broadcast over rows. x, y: `dtype`; bias: `bias_dtype` (`dtype` or kFloat32).
// x may have a row stride; y is contiguous.
cudaError_t bias_gelu_forward(DType dtype, DType bias_dtype, const void* x, int64_t x_row_stride,
                              const void* bias, void* y, int64_t rows, int64_t width, cudaStream_t stream);

// Rows of fp32 partial sums bias_gelu_backward uses: the caller allocates partial_rows * width floats.
int64_t bias_gelu_backward_partial_rows(DType dtype, DType bias_dtype, int64_t rows, int64_t width, int device);

// dx = dy * gelu_tanh'(x + bias) (contiguous, `dtype`); dbias = column sums of dx (`bias_dtype`), deterministic.
cudaError_t bias_gelu_backward(DType dtype, DType bias_dtype, const void* x, int64_t x_row_stride,
                               const void* bias, const void* dy, int64_t dy_row_stride, void* dx, void* dbias,
                               float* partials, int64_t partial_rows, int64_t rows, int64_t width,
                               cudaStream_t stream);

// ================================================================================ cross-entropy (cross_entropy.cu)
// Per row of logits (rows x n_classes, row stride `row_stride`, `dtype`) and int64 targets[rows]:
// lse[r] = logsumexp(logits[r]) and loss[r] = lse[r] - logits[r, target] (fp32), one streaming read of the row.
// loss is 0 where target == ignore_index, and nan for a target outside [0, n_classes) that is not ignored.
cudaError_t cross_entropy_forward(DType dtype, const void* logits, int64_t row_stride, const int64_t* targets,
                                  float* loss, float* lse, int64_t rows, int64_t n_classes, int64_t ignore_index,
                                  cudaStream_t stream);

// grad[r, c] = (softmax(logits[r])[c] - (c == target[r])) * scale[0], in `dtype`; zero on ignored rows, nan on
// rows with an out-of-range target. scale is a device scalar (grad_loss / n_valid: no host sync). grad has its
// own row stride and may be `logits` itself (each element is read before it is written, by the same thread).
cudaError_t cross_entropy_backward(DType dtype, const void* logits, int64_t row_stride, const int64_t* targets,
                                   const float* lse, const float* scale, void* grad, int64_t grad_row_stride,
                                   int64_t rows, int64_t n_classes, int64_t ignore_index, cudaStream_t stream);

// ==================================================================== attention (attention.cu, attention_impl.cuh)
// One (B, H, T, D) tensor: data and element strides of the batch, head and time dimensions (D has stride 1).
// The kernels read and write 16-byte chunks: data 16-byte aligned, strides multiples of 8 elements.
struct AttentionTensor {
  const void* data;  // written through for outputs
  int64_t stride_b;
  int64_t stride_h;
  int64_t stride_t;
};

struct AttentionArgs {
  DType dtype;  // kFloat16 or kBFloat16
  int batch, heads, seq, head_dim;
  float scale;  // softmax scale, usually 1 / sqrt(head_dim)
  bool causal;
  AttentionTensor q, k, v, o, dout, dq, dk, dv;
  float* lse;    // (batch * heads, seq) fp32, contiguous: written by the forward, read by the backward
  float* delta;  // (batch * heads, seq) fp32 workspace of the backward
};

// Head dims the attention kernels are instantiated for (64 and 128).
bool attention_head_dim_supported(int head_dim);

// o = softmax(q k^T * scale, causal mask if `causal`) v, and lse = logsumexp of each query's scaled scores.
// Reads q, k, v; writes o and lse. Needs sm_80 or later (cudaErrorNotSupported before), batch * heads <= 65535.
cudaError_t attention_forward(const AttentionArgs& args, cudaStream_t stream);

// Gradients dq, dk, dv of attention_forward from dout, recomputing the probabilities from q, k and lse.
// Reads q, k, v, o, dout, lse; writes delta (workspace), dq, dk, dv. Deterministic.
cudaError_t attention_backward(const AttentionArgs& args, cudaStream_t stream);

// ================================================================================================ AdamW (adamw.cu)
// One tensor of a parameter group, as the kernel reads it from device memory. first_chunk is the index of the
// tensor's first chunk of kAdamWChunk elements in the launch: sum of ceil(numel / kAdamWChunk) of the tensors
// before it. Tensors with numel == 0 may be left out.
struct AdamWTensor {
  void* param;          // param_dtype, updated in place
  const void* grad;     // grad_dtype
  float* exp_avg;       // fp32, updated in place
  float* exp_avg_sq;    // fp32, updated in place
  int64_t numel;
  int64_t first_chunk;
};
static_assert(sizeof(AdamWTensor) == 48, "AdamWTensor is shared with the binding as six 64-bit words");

constexpr int64_t kAdamWChunk = 16384;

// torch.optim.AdamW's step (decoupled weight decay, bias correction for `step` >= 1, no amsgrad), in fp32, over
// every tensor of `table` (device memory, num_tensors entries) in one launch of total_chunks blocks.
// param_dtype: kFloat32, kFloat16 or kBFloat16; grad_dtype: param_dtype or kFloat32.
cudaError_t adamw_step(DType param_dtype, DType grad_dtype, const AdamWTensor* table, int num_tensors,
                       int64_t total_chunks, float lr, float beta1, float beta2, float eps, float weight_decay,
                       int64_t step, cudaStream_t stream);

}  // namespace kernels
}  // namespace gpt2fast
