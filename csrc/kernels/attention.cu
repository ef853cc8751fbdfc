// Flash attention on the tensor cores (mma.sync.m16n8k16, sm_80 and later): forward, and the FlashAttention-2
// backward as three kernels (delta = rowsum(dO * O); dK/dV per key block; dQ per query block), deterministic (no
// atomics). The per-block bodies live in attention_impl.cuh, shared with the CPU warp emulator of the C++ tests;
// this file supplies the GPU side of its portability layer, the __global__ wrappers and the launchers.
//
// Inputs are fp16 or bf16 (B, H, T, D) tensors with unit stride along D, 16-byte aligned, and B/H/T strides that
// are multiples of 8 elements; head dims 64 and 128. On devices before sm_80 the launchers return
// cudaErrorNotSupported (mma.m16n8k16 is an Ampere instruction); the dispatcher never offers this kernel there.
#include "common.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define GPT2FAST_DEVICE_HAS_MMA16816 0
#else
#define GPT2FAST_DEVICE_HAS_MMA16816 1
#endif

namespace gpt2fast {
namespace kernels {
namespace attn_port {

#define G2F_ATTN_FN __device__ __forceinline__

G2F_ATTN_FN float shfl_xor(float v, int lane_mask) { return __shfl_xor_sync(0xffffffffu, v, lane_mask); }
G2F_ATTN_FN void sync_block() { __syncthreads(); }
G2F_ATTN_FN float exp2(float x) { return exp2f(x); }
G2F_ATTN_FN float log2(float x) { return log2f(x); }
G2F_ATTN_FN uint32_t load_u32(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }
G2F_ATTN_FN void store_u32(void* p, uint32_t w) { *reinterpret_cast<uint32_t*>(p) = w; }
G2F_ATTN_FN void load16(const void* p, uint32_t (&w)[4]) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  w[0] = v.x;
  w[1] = v.y;
  w[2] = v.z;
  w[3] = v.w;
}

template <class E>
G2F_ATTN_FN float to_float(E v) {
  return ::gpt2fast::kernels::to_float(v);
}

template <class E>
G2F_ATTN_FN uint32_t pack2(float lo, float hi);

template <>
G2F_ATTN_FN uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);  // .x (lo) in the low 16 bits
  uint32_t w;
  memcpy(&w, &h, 4);
  return w;
}

template <>
G2F_ATTN_FN uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
#if GPT2FAST_DEVICE_HAS_BF16
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  uint32_t w;
  memcpy(&w, &h, 4);
  return w;
#else
  (void)lo;
  (void)hi;
  __trap();
  return 0;
#endif
}

template <class E>
G2F_ATTN_FN void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

// One specialisation per input type; the instruction differs only in the type suffix.
#if GPT2FAST_DEVICE_HAS_MMA16816
#define G2F_MMA16816(ELEM, PTX_TYPE)                                                                          \
  template <>                                                                                                 \
  G2F_ATTN_FN void mma16816<ELEM>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {          \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." PTX_TYPE "." PTX_TYPE                             \
                 ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"                   \
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                             \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));                            \
  }
#else
#define G2F_MMA16816(ELEM, PTX_TYPE)                                                                          \
  template <>                                                                                                 \
  G2F_ATTN_FN void mma16816<ELEM>(float (&)[4], const uint32_t (&)[4], uint32_t, uint32_t) {                  \
    __trap();                                                                                                 \
  }
#endif
G2F_MMA16816(__half, "f16")
G2F_MMA16816(__nv_bfloat16, "bf16")
#undef G2F_MMA16816

}  // namespace attn_port
}  // namespace kernels
}  // namespace gpt2fast

#include "attention_impl.cuh"

namespace gpt2fast {
namespace kernels {
namespace {

using attn::kThreads;

// Only the mma architectures get real bodies; older ones (compiled so that one binary serves every GPU) trap,
// and the launchers refuse them before launching.
#if GPT2FAST_DEVICE_HAS_MMA16816
#define G2F_ATTN_BODY(call) call
#else
#define G2F_ATTN_BODY(call) __trap()
#endif

template <class E, int D>
__global__ void __launch_bounds__(kThreads) attention_forward_kernel(const attn::Params p) {
  extern __shared__ __align__(16) unsigned char attention_smem[];
  G2F_ATTN_BODY((attn::forward_block<E, D>(p, blockIdx.x, blockIdx.y, threadIdx.x, attention_smem)));
}

template <class E, int D>
__global__ void __launch_bounds__(kThreads) attention_delta_kernel(const attn::Params p) {
  G2F_ATTN_BODY((attn::delta_block<E, D>(p, blockIdx.x, blockIdx.y, threadIdx.x)));
}

template <class E, int D>
__global__ void __launch_bounds__(kThreads) attention_dkdv_kernel(const attn::Params p) {
  extern __shared__ __align__(16) unsigned char attention_smem[];
  G2F_ATTN_BODY((attn::dkdv_block<E, D>(p, blockIdx.x, blockIdx.y, threadIdx.x, attention_smem)));
}

template <class E, int D>
__global__ void __launch_bounds__(kThreads) attention_dq_kernel(const attn::Params p) {
  extern __shared__ __align__(16) unsigned char attention_smem[];
  G2F_ATTN_BODY((attn::dq_block<E, D>(p, blockIdx.x, blockIdx.y, threadIdx.x, attention_smem)));
}

attn::Strides strides_of(const AttentionTensor& t) { return {t.stride_b, t.stride_h, t.stride_t}; }

bool usable(const AttentionTensor& t, int element_size) {
  const int64_t per16 = 16 / element_size;
  return t.data != nullptr && aligned16(t.data) && t.stride_b % per16 == 0 && t.stride_h % per16 == 0 &&
         t.stride_t % per16 == 0;
}

attn::Params params_of(const AttentionArgs& a) {
  attn::Params p{};
  p.q = a.q.data;
  p.k = a.k.data;
  p.v = a.v.data;
  p.o = a.o.data;
  p.dout = a.dout.data;
  p.dk = const_cast<void*>(a.dk.data);
  p.dv = const_cast<void*>(a.dv.data);
  p.lse = a.lse;
  p.delta = a.delta;
  p.sq = strides_of(a.q);
  p.sk = strides_of(a.k);
  p.sv = strides_of(a.v);
  p.so = strides_of(a.o);
  p.sdo = strides_of(a.dout);
  p.sdk = strides_of(a.dk);
  p.sdv = strides_of(a.dv);
  p.heads = a.heads;
  p.seq = a.seq;
  p.scale = a.scale;
  p.causal = a.causal;
  return p;
}

template <class Kernel>
cudaError_t launch(Kernel kernel, dim3 grid, int smem_bytes, const attn::Params& p, cudaStream_t stream) {
  // Above 48 KB a kernel must opt in to more dynamic shared memory (sm_80: 163 KB, sm_90: 227 KB).
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess) return err;
  kernel<<<grid, kThreads, smem_bytes, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t check_args(const AttentionArgs& a, std::initializer_list<const AttentionTensor*> tensors) {
  if (a.dtype != DType::kFloat16 && a.dtype != DType::kBFloat16) return cudaErrorInvalidValue;
  if (!attention_head_dim_supported(a.head_dim)) return cudaErrorInvalidValue;
  if (a.batch <= 0 || a.heads <= 0 || a.seq <= 0) return cudaErrorInvalidValue;
  if (static_cast<int64_t>(a.batch) * a.heads > 65535) return cudaErrorInvalidValue;
  for (const AttentionTensor* t : tensors) {
    if (!usable(*t, 2)) return cudaErrorInvalidValue;
  }
  if (current_device_major() < 8) return cudaErrorNotSupported;
  return cudaSuccess;
}

template <class E, int D>
cudaError_t forward_typed(const AttentionArgs& a, cudaStream_t stream) {
  attn::Params p = params_of(a);
  p.out = const_cast<void*>(a.o.data);
  p.sout = strides_of(a.o);
  const dim3 grid(static_cast<unsigned>(ceil_div(a.seq, attn::kBlockRows)),
                  static_cast<unsigned>(a.batch * a.heads));
  return launch(attention_forward_kernel<E, D>, grid, attn::ForwardShape<E, D>::kSmemBytes, p, stream);
}

template <class E, int D>
cudaError_t backward_typed(const AttentionArgs& a, cudaStream_t stream) {
  attn::Params p = params_of(a);
  const dim3 delta_grid(static_cast<unsigned>(ceil_div(a.seq, attn::DeltaShape<E, D>::kRowsPerBlock)),
                        static_cast<unsigned>(a.batch * a.heads));
  attention_delta_kernel<E, D><<<delta_grid, kThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(ceil_div(a.seq, attn::kBlockRows)),
                  static_cast<unsigned>(a.batch * a.heads));
  err = launch(attention_dkdv_kernel<E, D>, grid, attn::BackwardShape<E, D>::kDkdvSmemBytes, p, stream);
  if (err != cudaSuccess) return err;
  p.out = const_cast<void*>(a.dq.data);
  p.sout = strides_of(a.dq);
  return launch(attention_dq_kernel<E, D>, grid, attn::BackwardShape<E, D>::kDqSmemBytes, p, stream);
}

template <class F64, class F128>
cudaError_t by_head_dim(int head_dim, F64&& f64, F128&& f128) {
  return head_dim == 64 ? f64() : f128();
}

}  // namespace

bool attention_head_dim_supported(int head_dim) { return head_dim == 64 || head_dim == 128; }

cudaError_t attention_forward(const AttentionArgs& a, cudaStream_t stream) {
  const cudaError_t err = check_args(a, {&a.q, &a.k, &a.v, &a.o});
  if (err != cudaSuccess) return err;
  if (a.lse == nullptr) return cudaErrorInvalidValue;
  if (a.dtype == DType::kFloat16) {
    return by_head_dim(a.head_dim, [&] { return forward_typed<__half, 64>(a, stream); },
                       [&] { return forward_typed<__half, 128>(a, stream); });
  }
  return by_head_dim(a.head_dim, [&] { return forward_typed<__nv_bfloat16, 64>(a, stream); },
                     [&] { return forward_typed<__nv_bfloat16, 128>(a, stream); });
}

cudaError_t attention_backward(const AttentionArgs& a, cudaStream_t stream) {
  const cudaError_t err = check_args(a, {&a.q, &a.k, &a.v, &a.o, &a.dout, &a.dq, &a.dk, &a.dv});
  if (err != cudaSuccess) return err;
  if (a.lse == nullptr || a.delta == nullptr) return cudaErrorInvalidValue;
  if (a.dtype == DType::kFloat16) {
    return by_head_dim(a.head_dim, [&] { return backward_typed<__half, 64>(a, stream); },
                       [&] { return backward_typed<__half, 128>(a, stream); });
  }
  return by_head_dim(a.head_dim, [&] { return backward_typed<__nv_bfloat16, 64>(a, stream); },
                     [&] { return backward_typed<__nv_bfloat16, 128>(a, stream); });
}

}  // namespace kernels
}  // namespace gpt2fast
