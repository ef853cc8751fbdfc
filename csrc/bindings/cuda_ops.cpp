// gpt2fast._cuda_ops: the CUDA kernels of csrc/kernels behind checked PyTorch entry points.
//
// One module, in one section per op (LayerNorm, bias + GELU, cross-entropy, attention, AdamW), each holding the
// op's entry points and ending in the bind_<op> function that adds them to the module; the checks they share come
// first. gpt2fast/ops/<op>.py registers an op's entry points as its torch.library custom operators.
//
// Each function checks its tensors (CUDA, one device, supported dtype, shapes, a contiguous last dimension and
// rows that collapse to one row stride, so no hidden copy is made), raises a ValueError-like RuntimeError
// (TORCH_CHECK) naming the offending value and what to do otherwise, allocates its outputs, and launches on
// PyTorch's current stream of the tensors' device. Autograd is not here: gpt2fast/ops wraps these functions.
//
// Streams come from c10/cuda/CUDAStream.h, the header behind at::cuda::getCurrentCUDAStream, rather than
// ATen/cuda/CUDAContext.h, which also pulls in cuBLAS/cuSPARSE/cuSOLVER headers these kernels do not need.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/extension.h>

#include <cmath>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../kernels/kernels.h"

namespace kern = gpt2fast::kernels;

namespace {

// ======================================================================================= shared checks, build info
kern::DType kernel_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return kern::DType::kFloat32;
    case at::kHalf:
      return kern::DType::kFloat16;
    case at::kBFloat16:
      return kern::DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": ", name, " has dtype ", t.scalar_type(),
                  "; the CUDA kernels take float32, float16 or bfloat16");
  }
  return kern::DType::kFloat32;  // not reached
}

int device_major(int device) {
  int major = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  TORCH_CHECK(err == cudaSuccess, "gpt2fast._cuda_ops: cannot query the compute capability of cuda:", device, ": ",
              cudaGetErrorString(err));
  return major;
}

void check_bf16_supported(kern::DType dtype, const at::Device& device, const char* op) {
  if (dtype != kern::DType::kBFloat16) return;
  const int major = device_major(device.index());
  TORCH_CHECK(major >= 8, op, ": bfloat16 needs a GPU of compute capability 8.0 or newer, but ", device,
              " is sm_", major, "x; use float16 there, or the torch backend");
}

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined (None)");
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " is on ", t.device(),
              "; the CUDA kernels need CUDA tensors (move it with .cuda(), or use the torch backend)");
}

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  check_cuda(t, op, name);
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but the first input is on ",
              ref.device(), "; put every input on one GPU");
}

void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but the input has ",
              ref.scalar_type(), "; they must match");
}

// A parameter vector of shape (width,), contiguous, of the input's dtype or float32.
kern::DType check_param(const at::Tensor& p, const at::Tensor& x, int64_t width, const char* op, const char* name) {
  check_same_device(p, x, op, name);
  TORCH_CHECK(p.dim() == 1 && p.size(0) == width, op, ": ", name, " has shape ", p.sizes(), " but the input has shape ",
              x.sizes(), "; ", name, " must have shape (", width, ",) (the input's last dimension)");
  TORCH_CHECK(p.is_contiguous(), op, ": ", name, " must be contiguous (stride 1), got stride ", p.strides());
  const kern::DType d = kernel_dtype(p, op, name);
  TORCH_CHECK(p.scalar_type() == x.scalar_type() || p.scalar_type() == at::kFloat, op, ": ", name, " has dtype ",
              p.scalar_type(), " but the input has ", x.scalar_type(), "; ", name,
              " must have the input's dtype or float32");
  return d;
}

// A tensor seen as a (rows, width) matrix without a copy: the last dimension contiguous and the leading
// dimensions collapsing into one with a single row stride.
struct Rows {
  int64_t rows;
  int64_t width;
  int64_t stride;
};

Rows as_rows(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() >= 1, op, ": ", name, " must have at least one dimension, got a scalar");
  Rows r{1, t.size(-1), t.size(-1)};
  for (int64_t i = 0; i + 1 < t.dim(); ++i) r.rows *= t.size(i);
  if (r.rows == 0 || r.width == 0) return r;
  TORCH_CHECK(t.stride(-1) == 1 || r.width == 1, op, ": ", name, " has strides ", t.strides(),
              "; its last dimension must be contiguous (stride 1): call .contiguous() first");
  bool first = true;
  int64_t expected = 0;
  for (int64_t i = t.dim() - 2; i >= 0; --i) {
    if (t.size(i) == 1) continue;
    if (first) {
      r.stride = t.stride(i);
      first = false;
    } else {
      TORCH_CHECK(t.stride(i) == expected, op, ": ", name, " of shape ", t.sizes(), " and strides ", t.strides(),
                  " does not flatten to rows of one stride; call .contiguous() first");
    }
    expected = t.stride(i) * t.size(i);
  }
  if (r.rows == 1) r.stride = r.width;
  TORCH_CHECK(r.stride >= r.width, op, ": ", name, " has overlapping rows (row stride ", r.stride, " < width ",
              r.width, "); call .contiguous() first");
  return r;
}

void check_same_shape(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                      const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " has shape ", t.sizes(), " but ", ref_name, " has shape ",
              ref.sizes(), "; they must be equal");
}

void check_stats(const at::Tensor& s, const at::Tensor& x, int64_t rows, const char* op, const char* name) {
  check_same_device(s, x, op, name);
  TORCH_CHECK(s.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", s.scalar_type());
  TORCH_CHECK(s.numel() == rows && s.is_contiguous(), op, ": ", name, " must be a contiguous float32 tensor of ",
              rows, " elements (one per row), got shape ", s.sizes(), " and strides ", s.strides());
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error ", cudaGetErrorName(err), ": ", cudaGetErrorString(err));
}

cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

void bind_build_info(py::module_& m) {
  m.def("compiled_architectures", []() { return std::string(kern::compiled_architectures()); },
        "the architectures the kernels were built for, as nvcc's __CUDA_ARCH_LIST__ (\"800,900\")");
  m.def("cuda_runtime_version_built", &kern::cuda_runtime_version_built, "CUDART_VERSION at build time");
}

// ========================================================================== LayerNorm (csrc/kernels/layer_norm.cu)
std::tuple<at::Tensor, std::optional<at::Tensor>, at::Tensor, at::Tensor> layer_norm_forward(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const std::optional<at::Tensor>& residual,
    double eps) {
  const char* op = "gpt2fast._cuda_ops.layer_norm_forward";
  check_cuda(x, op, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const kern::DType dtype = kernel_dtype(x, op, "x");
  check_bf16_supported(dtype, x.device(), op);
  const Rows xr = as_rows(x, op, "x");
  TORCH_CHECK(xr.width > 0, op, ": x has shape ", x.sizes(), "; its last dimension (the one normalised) is empty");
  TORCH_CHECK(xr.width <= kern::layer_norm_max_width(), op, ": width ", xr.width, " exceeds the kernels' limit of ",
              kern::layer_norm_max_width(), " (a row lives in one block's registers); use the torch backend");
  TORCH_CHECK(eps > 0 && std::isfinite(eps), op, ": eps must be a positive finite number, got ", eps);
  const kern::DType pdtype = check_param(weight, x, xr.width, op, "weight");
  check_param(bias, x, xr.width, op, "bias");
  TORCH_CHECK(weight.scalar_type() == bias.scalar_type(), op, ": weight is ", weight.scalar_type(), " but bias is ",
              bias.scalar_type(), "; they must match");
  Rows rr{0, 0, 0};
  if (residual.has_value()) {
    check_same_device(*residual, x, op, "residual");
    check_same_dtype(*residual, x, op, "residual");
    check_same_shape(*residual, x, op, "residual", "x");
    rr = as_rows(*residual, op, "residual");
  }
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  std::optional<at::Tensor> h;
  if (residual.has_value()) h = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor mean = at::empty({xr.rows}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({xr.rows}, x.options().dtype(at::kFloat));
  check_launch(kern::layer_norm_forward(dtype, pdtype, x.const_data_ptr(), xr.stride,
                                        residual.has_value() ? residual->const_data_ptr() : nullptr, rr.stride,
                                        weight.const_data_ptr(), bias.const_data_ptr(), y.data_ptr(),
                                        h.has_value() ? h->data_ptr() : nullptr, mean.data_ptr<float>(),
                                        rstd.data_ptr<float>(), xr.rows, xr.width, static_cast<float>(eps),
                                        stream_of(x)),
               op);
  return {y, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(const at::Tensor& h, const at::Tensor& dy,
                                                                   const std::optional<at::Tensor>& dh,
                                                                   const at::Tensor& weight, const at::Tensor& mean,
                                                                   const at::Tensor& rstd) {
  const char* op = "gpt2fast._cuda_ops.layer_norm_backward";
  check_cuda(h, op, "h");
  const c10::cuda::CUDAGuard guard(h.device());
  const kern::DType dtype = kernel_dtype(h, op, "h");
  check_bf16_supported(dtype, h.device(), op);
  const Rows hr = as_rows(h, op, "h");
  TORCH_CHECK(hr.width > 0 && hr.width <= kern::layer_norm_max_width(), op, ": width ", hr.width,
              " is outside the kernels' range [1, ", kern::layer_norm_max_width(), "]");
  check_same_device(dy, h, op, "dy");
  check_same_dtype(dy, h, op, "dy");
  check_same_shape(dy, h, op, "dy", "h");
  const Rows gr = as_rows(dy, op, "dy");
  Rows dhr{0, 0, 0};
  if (dh.has_value()) {
    check_same_device(*dh, h, op, "dh");
    check_same_dtype(*dh, h, op, "dh");
    check_same_shape(*dh, h, op, "dh", "h");
    dhr = as_rows(*dh, op, "dh");
  }
  const kern::DType pdtype = check_param(weight, h, hr.width, op, "weight");
  check_stats(mean, h, hr.rows, op, "mean");
  check_stats(rstd, h, hr.rows, op, "rstd");

  at::Tensor dx = at::empty(h.sizes(), h.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dweight = at::empty_like(weight);
  at::Tensor dbias = at::empty_like(weight);
  const int64_t partial_rows =
      kern::layer_norm_backward_partial_rows(dtype, pdtype, hr.rows, hr.width, h.device().index());
  at::Tensor partials = at::empty({2 * partial_rows * hr.width}, h.options().dtype(at::kFloat));
  check_launch(kern::layer_norm_backward(dtype, pdtype, h.const_data_ptr(), hr.stride, dy.const_data_ptr(), gr.stride,
                                         dh.has_value() ? dh->const_data_ptr() : nullptr, dhr.stride,
                                         weight.const_data_ptr(), mean.const_data_ptr<float>(),
                                         rstd.const_data_ptr<float>(), dx.data_ptr(), dweight.data_ptr(),
                                         dbias.data_ptr(), partials.data_ptr<float>(), partial_rows, hr.rows,
                                         hr.width, stream_of(h)),
               op);
  return {dx, dweight, dbias};
}

void bind_layer_norm(py::module_& m) {
  m.def("layer_norm_forward", &layer_norm_forward, "residual add + LayerNorm: (y, h or None, mean, rstd)",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("residual") = py::none(), py::arg("eps") = 1e-5);
  m.def("layer_norm_backward", &layer_norm_backward, "LayerNorm gradients: (dx, dweight, dbias)", py::arg("h"),
        py::arg("dy"), py::arg("dh"), py::arg("weight"), py::arg("mean"), py::arg("rstd"));
  m.def("layer_norm_max_width", &kern::layer_norm_max_width, "widest row the LayerNorm kernels take");
}

// ========================================================================= bias + GELU (csrc/kernels/bias_gelu.cu)
void check_bias_gelu_args(const at::Tensor& x, const at::Tensor& bias, const char* op, kern::DType* dtype,
                          kern::DType* bdtype, Rows* xr) {
  check_cuda(x, op, "x");
  *dtype = kernel_dtype(x, op, "x");
  check_bf16_supported(*dtype, x.device(), op);
  *xr = as_rows(x, op, "x");
  TORCH_CHECK(xr->width > 0, op, ": x has shape ", x.sizes(), "; its last dimension is empty");
  *bdtype = check_param(bias, x, xr->width, op, "bias");
}

at::Tensor bias_gelu_forward(const at::Tensor& x, const at::Tensor& bias) {
  const char* op = "gpt2fast._cuda_ops.bias_gelu_forward";
  check_cuda(x, op, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  kern::DType dtype, bdtype;
  Rows xr;
  check_bias_gelu_args(x, bias, op, &dtype, &bdtype, &xr);
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  check_launch(kern::bias_gelu_forward(dtype, bdtype, x.const_data_ptr(), xr.stride, bias.const_data_ptr(),
                                       y.data_ptr(), xr.rows, xr.width, stream_of(x)),
               op);
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_backward(const at::Tensor& x, const at::Tensor& bias,
                                                      const at::Tensor& dy) {
  const char* op = "gpt2fast._cuda_ops.bias_gelu_backward";
  check_cuda(x, op, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  kern::DType dtype, bdtype;
  Rows xr;
  check_bias_gelu_args(x, bias, op, &dtype, &bdtype, &xr);
  check_same_device(dy, x, op, "dy");
  check_same_dtype(dy, x, op, "dy");
  check_same_shape(dy, x, op, "dy", "x");
  const Rows gr = as_rows(dy, op, "dy");
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dbias = at::empty_like(bias);
  const int64_t partial_rows =
      kern::bias_gelu_backward_partial_rows(dtype, bdtype, xr.rows, xr.width, x.device().index());
  at::Tensor partials = at::empty({partial_rows * xr.width}, x.options().dtype(at::kFloat));
  check_launch(kern::bias_gelu_backward(dtype, bdtype, x.const_data_ptr(), xr.stride, bias.const_data_ptr(),
                                        dy.const_data_ptr(), gr.stride, dx.data_ptr(), dbias.data_ptr(),
                                        partials.data_ptr<float>(), partial_rows, xr.rows, xr.width, stream_of(x)),
               op);
  return {dx, dbias};
}

void bind_bias_gelu(py::module_& m) {
  m.def("bias_gelu_forward", &bias_gelu_forward, "tanh GELU of x + bias", py::arg("x"), py::arg("bias"));
  m.def("bias_gelu_backward", &bias_gelu_backward, "bias + GELU gradients: (dx, dbias)", py::arg("x"),
        py::arg("bias"), py::arg("dy"));
}

// =================================================================== cross-entropy (csrc/kernels/cross_entropy.cu)
Rows check_cross_entropy_args(const at::Tensor& logits, const at::Tensor& targets, const char* op) {
  check_cuda(logits, op, "logits");
  check_bf16_supported(kernel_dtype(logits, op, "logits"), logits.device(), op);
  const Rows lr = as_rows(logits, op, "logits");
  TORCH_CHECK(lr.width > 0, op, ": logits has shape ", logits.sizes(), "; the class dimension (last) is empty");
  check_same_device(targets, logits, op, "targets");
  TORCH_CHECK(targets.scalar_type() == at::kLong, op, ": targets must be int64 class indices, got ",
              targets.scalar_type(), " (convert with .long())");
  TORCH_CHECK(targets.numel() == lr.rows && targets.is_contiguous(), op, ": targets must be a contiguous tensor of ",
              lr.rows, " class indices (one per row of logits of shape ", logits.sizes(), "), got shape ",
              targets.sizes(), " and strides ", targets.strides());
  return lr;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& logits, const at::Tensor& targets,
                                                         int64_t ignore_index) {
  const char* op = "gpt2fast._cuda_ops.cross_entropy_forward";
  check_cuda(logits, op, "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  const Rows lr = check_cross_entropy_args(logits, targets, op);
  at::Tensor loss = at::empty({lr.rows}, logits.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({lr.rows}, logits.options().dtype(at::kFloat));
  check_launch(kern::cross_entropy_forward(kernel_dtype(logits, op, "logits"), logits.const_data_ptr(), lr.stride,
                                           targets.const_data_ptr<int64_t>(), loss.data_ptr<float>(),
                                           lse.data_ptr<float>(), lr.rows, lr.width, ignore_index,
                                           stream_of(logits)),
               op);
  return {loss, lse};
}

at::Tensor cross_entropy_backward(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                                  const at::Tensor& scale, int64_t ignore_index,
                                  const std::optional<at::Tensor>& out) {
  const char* op = "gpt2fast._cuda_ops.cross_entropy_backward";
  check_cuda(logits, op, "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  const Rows lr = check_cross_entropy_args(logits, targets, op);
  check_stats(lse, logits, lr.rows, op, "lse");
  check_same_device(scale, logits, op, "scale");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == 1, op,
              ": scale must be a float32 tensor of one element (grad_loss / n_valid), got ", scale.scalar_type(),
              " of shape ", scale.sizes());
  at::Tensor grad;
  if (out.has_value()) {
    grad = *out;
    check_same_device(grad, logits, op, "out");
    check_same_dtype(grad, logits, op, "out");
    check_same_shape(grad, logits, op, "out", "logits");
  } else if (lr.stride == lr.width || lr.rows <= 1) {
    grad = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  } else {  // the logits' row stride, so that both are aligned alike (a padded vocabulary stays padded)
    grad = at::empty_strided({lr.rows, lr.width}, {lr.stride, 1}, logits.options()).view(logits.sizes());
  }
  const Rows gr = as_rows(grad, op, "out");
  check_launch(kern::cross_entropy_backward(kernel_dtype(logits, op, "logits"), logits.const_data_ptr(), lr.stride,
                                            targets.const_data_ptr<int64_t>(), lse.const_data_ptr<float>(),
                                            scale.const_data_ptr<float>(), grad.data_ptr(), gr.stride, lr.rows,
                                            lr.width, ignore_index, stream_of(logits)),
               op);
  return grad;
}

void bind_cross_entropy(py::module_& m) {
  m.def("cross_entropy_forward", &cross_entropy_forward, "per-row (loss, lse), fp32", py::arg("logits"),
        py::arg("targets"), py::arg("ignore_index") = -100);
  m.def("cross_entropy_backward", &cross_entropy_backward, "(softmax - onehot) * scale in the logits' dtype",
        py::arg("logits"), py::arg("targets"), py::arg("lse"), py::arg("scale"), py::arg("ignore_index") = -100,
        py::arg("out") = py::none());
}

// ======================================================= attention (csrc/kernels/attention.cu, attention_impl.cuh)
// A (B, H, T, D) operand the kernels can read without a copy: fp16/bf16 like q, q's shape, unit stride along D,
// 16-byte aligned data and B/H/T strides that are multiples of 8 elements.
void check_attention_operand(const at::Tensor& t, const at::Tensor& q, const char* op, const char* name) {
  check_same_device(t, q, op, name);
  check_same_dtype(t, q, op, name);
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must have 4 dimensions (B, H, T, D), got shape ", t.sizes());
  check_same_shape(t, q, op, name, "q");
  TORCH_CHECK(t.stride(3) == 1, op, ": ", name, " has strides ", t.strides(),
              "; the head dimension must be contiguous (stride 1): call .contiguous() first");
  TORCH_CHECK(t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 && t.stride(2) % 8 == 0 &&
                  (reinterpret_cast<uintptr_t>(t.const_data_ptr()) & 15u) == 0,
              op, ": ", name, " (strides ", t.strides(), ") is not 16-byte aligned per row; the kernels read rows "
              "in 16-byte chunks: call .contiguous() first");
}

struct AttentionShape {
  kern::DType dtype;
  int batch, heads, seq, head_dim;
};

// Checks q, k and v (q on the current device guard's GPU) and returns their common shape.
AttentionShape check_attention_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  check_cuda(q, op, "q");
  TORCH_CHECK(q.dim() == 4, op, ": q must have 4 dimensions (B, H, T, D), got shape ", q.sizes());
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op, ": q has dtype ",
              q.scalar_type(), "; the CUDA attention kernel takes float16 or bfloat16 (use the triton or torch "
              "backend for float32)");
  const kern::DType dtype = kernel_dtype(q, op, "q");
  const int major = device_major(q.device().index());
  TORCH_CHECK(major >= 8, op, ": the CUDA attention kernel uses mma.m16n8k16 (sm_80 and later), but ", q.device(),
              " is sm_", major, "x; use the triton or torch backend");
  TORCH_CHECK(kern::attention_head_dim_supported(static_cast<int>(q.size(3))), op, ": head dim ", q.size(3),
              " is not supported by the CUDA attention kernel (64 or 128); use the triton or torch backend");
  TORCH_CHECK(q.size(0) > 0 && q.size(1) > 0 && q.size(2) > 0, op, ": q has an empty dimension: shape ", q.sizes());
  TORCH_CHECK(q.size(0) * q.size(1) <= 65535, op, ": batch * heads = ", q.size(0) * q.size(1),
              " exceeds the kernel grid's limit of 65535");
  TORCH_CHECK(q.size(2) <= (int64_t{1} << 30), op, ": sequence length ", q.size(2), " is too long");
  check_attention_operand(q, q, op, "q");
  check_attention_operand(k, q, op, "k");
  check_attention_operand(v, q, op, "v");
  return {dtype, static_cast<int>(q.size(0)), static_cast<int>(q.size(1)), static_cast<int>(q.size(2)),
          static_cast<int>(q.size(3))};
}

kern::AttentionTensor attention_tensor(const at::Tensor& t) {
  return {t.const_data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

// An empty (B, H, T, D) tensor laid out like `like`: stored (B, T, H, D) when `like` is a view of that order (the
// model's q, k, v are slices of one fused projection), so that transposing the result back is free.
at::Tensor empty_attention_like(const at::Tensor& like) {
  const int64_t B = like.size(0), H = like.size(1), T = like.size(2), D = like.size(3);
  if (H > 1 && T > 1 && like.stride(1) < like.stride(2)) {
    return at::empty({B, T, H, D}, like.options().memory_format(at::MemoryFormat::Contiguous)).transpose(1, 2);
  }
  return at::empty({B, H, T, D}, like.options().memory_format(at::MemoryFormat::Contiguous));
}

// The kernels' arguments for q, k, v of `shape`; the caller adds outputs and workspaces.
kern::AttentionArgs attention_args(const AttentionShape& shape, const std::optional<double>& scale, bool causal,
                                   const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  const double s = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(shape.head_dim));
  TORCH_CHECK(std::isfinite(s) && s > 0, op, ": scale must be a positive finite number, got ", s);
  kern::AttentionArgs args{};
  args.dtype = shape.dtype;
  args.batch = shape.batch;
  args.heads = shape.heads;
  args.seq = shape.seq;
  args.head_dim = shape.head_dim;
  args.scale = static_cast<float>(s);
  args.causal = causal;
  args.q = attention_tensor(q);
  args.k = attention_tensor(k);
  args.v = attention_tensor(v);
  return args;
}

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     bool causal, const std::optional<double>& scale) {
  const char* op = "gpt2fast._cuda_ops.attention_forward";
  check_cuda(q, op, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  const AttentionShape shape = check_attention_qkv(q, k, v, op);
  at::Tensor o = empty_attention_like(q);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  kern::AttentionArgs args = attention_args(shape, scale, causal, q, k, v, op);
  args.o = attention_tensor(o);
  args.lse = lse.data_ptr<float>();
  check_launch(kern::attention_forward(args, stream_of(q)), op);
  return {o, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const at::Tensor& dout, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& o, const at::Tensor& lse,
                                                                  bool causal, const std::optional<double>& scale) {
  const char* op = "gpt2fast._cuda_ops.attention_backward";
  check_cuda(q, op, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  const AttentionShape shape = check_attention_qkv(q, k, v, op);
  check_attention_operand(o, q, op, "o");
  check_attention_operand(dout, q, op, "dout");
  check_same_device(lse, q, op, "lse");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  lse.numel() == q.size(0) * q.size(1) * q.size(2),
              op, ": lse must be the contiguous float32 (B, H, T) tensor attention_forward returned, got ",
              lse.scalar_type(), " of shape ", lse.sizes());
  at::Tensor dq = empty_attention_like(q);
  at::Tensor dk = empty_attention_like(k);
  at::Tensor dv = empty_attention_like(v);
  at::Tensor delta = at::empty_like(lse);
  kern::AttentionArgs args = attention_args(shape, scale, causal, q, k, v, op);
  args.o = attention_tensor(o);
  args.dout = attention_tensor(dout);
  args.dq = attention_tensor(dq);
  args.dk = attention_tensor(dk);
  args.dv = attention_tensor(dv);
  args.lse = lse.data_ptr<float>();
  args.delta = delta.data_ptr<float>();
  check_launch(kern::attention_backward(args, stream_of(q)), op);
  return {dq, dk, dv};
}

void bind_attention(py::module_& m) {
  m.def("attention_forward", &attention_forward,
        "flash attention on the tensor cores (sm_80+, fp16/bf16, head dim 64/128): (o, lse)", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("causal") = true, py::arg("scale") = py::none());
  m.def("attention_backward", &attention_backward, "gradients of attention_forward: (dq, dk, dv)",
        py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"), py::arg("lse"),
        py::arg("causal") = true, py::arg("scale") = py::none());
}

// =================================================================================== AdamW (csrc/kernels/adamw.cu)
void adamw_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs, double lr,
                double beta1, double beta2, double eps, double weight_decay, int64_t step) {
  const char* op = "gpt2fast._cuda_ops.adamw_step";
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n, op,
              ": params, grads, exp_avgs and exp_avg_sqs must be lists of one length, got ", n, ", ", grads.size(),
              ", ", exp_avgs.size(), ", ", exp_avg_sqs.size());
  TORCH_CHECK(step >= 1, op, ": step must be >= 1 (the count including this step), got ", step);
  TORCH_CHECK(lr >= 0 && std::isfinite(lr), op, ": lr must be a finite number >= 0, got ", lr);
  TORCH_CHECK(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1, op, ": betas must be in [0, 1), got (", beta1, ", ",
              beta2, ")");
  TORCH_CHECK(eps >= 0 && weight_decay >= 0, op, ": eps and weight_decay must be >= 0, got ", eps, " and ",
              weight_decay);
  if (n == 0) return;
  const at::Tensor& p0 = params[0];
  check_cuda(p0, op, "params[0]");
  const c10::cuda::CUDAGuard guard(p0.device());
  const kern::DType pdtype = kernel_dtype(p0, op, "params[0]");
  check_bf16_supported(pdtype, p0.device(), op);
  const kern::DType gdtype = kernel_dtype(grads[0], op, "grads[0]");

  std::vector<kern::AdamWTensor> table;
  table.reserve(n);
  int64_t chunks = 0;
  for (size_t i = 0; i < n; ++i) {
    const std::string idx = "[" + std::to_string(i) + "]";
    const std::string pn = "params" + idx, gn = "grads" + idx, mn = "exp_avgs" + idx, vn = "exp_avg_sqs" + idx;
    const at::Tensor &p = params[i], &g = grads[i], &m = exp_avgs[i], &v = exp_avg_sqs[i];
    check_same_device(p, p0, op, pn.c_str());
    check_same_device(g, p0, op, gn.c_str());
    check_same_device(m, p0, op, mn.c_str());
    check_same_device(v, p0, op, vn.c_str());
    TORCH_CHECK(p.scalar_type() == p0.scalar_type(), op, ": ", pn, " is ", p.scalar_type(), " but params[0] is ",
                p0.scalar_type(), "; one launch takes one parameter dtype (split the group by dtype)");
    TORCH_CHECK(g.scalar_type() == grads[0].scalar_type(), op, ": ", gn, " is ", g.scalar_type(), " but grads[0] is ",
                grads[0].scalar_type(), "; one launch takes one gradient dtype");
    TORCH_CHECK(g.scalar_type() == p.scalar_type() || g.scalar_type() == at::kFloat, op, ": ", gn, " is ",
                g.scalar_type(), " but ", pn, " is ", p.scalar_type(),
                "; a gradient must have its parameter's dtype or float32");
    TORCH_CHECK(m.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat, op, ": ", mn, " and ", vn,
                " must be float32 (the fp32 optimizer state), got ", m.scalar_type(), " and ", v.scalar_type());
    TORCH_CHECK(g.numel() == p.numel() && m.numel() == p.numel() && v.numel() == p.numel(), op, ": ", pn, " has ",
                p.numel(), " elements but ", gn, ", ", mn, ", ", vn, " have ", g.numel(), ", ", m.numel(), ", ",
                v.numel());
    TORCH_CHECK(p.is_contiguous() && g.is_contiguous() && m.is_contiguous() && v.is_contiguous(), op, ": ", pn, ", ",
                gn, ", ", mn, " and ", vn, " must all be contiguous");
    if (p.numel() == 0) continue;
    table.push_back(kern::AdamWTensor{p.data_ptr(), g.data_ptr(), m.data_ptr<float>(), v.data_ptr<float>(),
                                      p.numel(), chunks});
    chunks += (p.numel() + kern::kAdamWChunk - 1) / kern::kAdamWChunk;
  }
  if (table.empty()) return;
  TORCH_CHECK(chunks <= 0x7fffffff, op, ": ", chunks, " chunks of ", kern::kAdamWChunk,
              " elements exceed one launch; split the group");
  // The table travels as int64 words through pinned memory: the copy is asynchronous on the current stream, and
  // PyTorch's caching host allocator keeps the pinned block alive until the copy has run.
  const int64_t words = static_cast<int64_t>(table.size() * sizeof(kern::AdamWTensor) / sizeof(int64_t));
  at::Tensor host = at::empty({words}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(host.data_ptr(), table.data(), table.size() * sizeof(kern::AdamWTensor));
  at::Tensor device_table = host.to(p0.device(), at::kLong, /*non_blocking=*/true);
  check_launch(kern::adamw_step(pdtype, gdtype, reinterpret_cast<const kern::AdamWTensor*>(device_table.const_data_ptr()),
                                static_cast<int>(table.size()), chunks, static_cast<float>(lr),
                                static_cast<float>(beta1), static_cast<float>(beta2), static_cast<float>(eps),
                                static_cast<float>(weight_decay), step, stream_of(p0)),
               op);
  // Written through raw pointers: bump the version counters as torch's in-place optimizer ops would, so that
  // autograd still notices a parameter saved for a backward pass having changed.
  for (size_t i = 0; i < n; ++i) {
    params[i].unsafeGetTensorImpl()->bump_version();
    exp_avgs[i].unsafeGetTensorImpl()->bump_version();
    exp_avg_sqs[i].unsafeGetTensorImpl()->bump_version();
  }
}

void bind_adamw(py::module_& m) {
  m.def("adamw_step", &adamw_step, "torch.optim.AdamW's step over a parameter group, one launch", py::arg("params"),
        py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("lr"), py::arg("beta1"),
        py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("step"));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gpt2fast's CUDA C++ kernels (csrc/kernels), with input checks; wrapped by gpt2fast.ops";
  bind_build_info(m);
  bind_layer_norm(m);
  bind_bias_gelu(m);
  bind_cross_entropy(m);
  bind_attention(m);
  bind_adamw(m);
}
