// The CUDA C++ kernels of csrc/kernels (LayerNorm, bias + GELU, cross-entropy, AdamW) run on the CPU: g++ compiles
// their real source against the emulator in cuda_emu/ (one OS thread per CUDA thread, barriers for __syncthreads
// and warp shuffles, launch checks), and this file calls their host launchers (kernels.h) as the binding does.
// Every output is compared with a float64 reference by flash-attention's rule: the kernel's largest error at most
// twice that of a plain computation in the low precision (fp32 arithmetic, inputs and outputs in the storage
// dtype), plus one unit of the output dtype's rounding at the output's scale. Odd widths, strided and misaligned
// rows (the scalar variants) beside aligned ones (the vectorised variants), partial blocks, ignored and invalid
// targets, tensors across AdamW's chunk boundaries. Every buffer sits in guard elements holding a nan of its own,
// so a kernel that reads outside its rows gets nan and one that writes outside them is caught; the reductions
// that claim determinism run twice and must agree bitwise. GPT2FAST_EMU_VERBOSE=1 prints every comparison.
#include <cuda_runtime.h>  // the emulator: tests/cpp/cuda_emu comes first on the include path

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <iterator>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "harness.h"
#include "kernels/kernels.h"

namespace kn = gpt2fast::kernels;
using kn::DType;

#define CHECK_MSG(cond, message)                            \
  do {                                                      \
    if (!(cond)) ::tl::fail(__FILE__, __LINE__, (message)); \
  } while (0)

#define CHECK_CUDA(expr)                                                                                   \
  do {                                                                                                     \
    const cudaError_t check_cuda_status_ = (expr);                                                         \
    if (check_cuda_status_ != cudaSuccess)                                                                 \
      ::tl::fail(__FILE__, __LINE__, std::string(#expr) + " returned " + cudaGetErrorString(check_cuda_status_)); \
  } while (0)

namespace {

// ------------------------------------------------------------------------------------------ element types
using Half = __half;
using Bf16 = __nv_bfloat16;

template <class E>
struct Type;
template <>
struct Type<float> {
  static constexpr DType kDtype = DType::kFloat32;
  static constexpr const char* kName = "fp32";
  static constexpr double kUnit = 0x1p-24;  // unit roundoff
};
template <>
struct Type<Half> {
  static constexpr DType kDtype = DType::kFloat16;
  static constexpr const char* kName = "fp16";
  static constexpr double kUnit = 0x1p-11;
};
template <>
struct Type<Bf16> {
  static constexpr DType kDtype = DType::kBFloat16;
  static constexpr const char* kName = "bf16";
  static constexpr double kUnit = 0x1p-8;
};

template <class E>
float to_f(E v) {
  if constexpr (std::is_same_v<E, float>) return v;
  else if constexpr (std::is_same_v<E, Half>) return __half2float(v);
  else return __bfloat162float(v);
}

template <class E>
E from_f(float v) {
  if constexpr (std::is_same_v<E, float>) return v;
  else if constexpr (std::is_same_v<E, Half>) return __float2half_rn(v);
  else return __float2bfloat16_rn(v);
}

template <class E>
float round_to(float v) {
  return to_f(from_f<E>(v));
}

// ------------------------------------------------------------------------------------------ guarded tensors
// A nan of E whose payload is this tensor's own (1 to 127): a kernel that reads outside a tensor computes with
// nan, and a nan it then writes outside another tensor differs from that tensor's guard value.
template <class E>
E guard_nan(unsigned id) {
  const uint32_t payload = 1 + id % 127;
  E e;
  if constexpr (std::is_same_v<E, float>) {
    const uint32_t bits = 0xff800000u | payload << 8;
    std::memcpy(&e, &bits, 4);
  } else {
    const uint16_t bits = static_cast<uint16_t>((std::is_same_v<E, Half> ? 0xfc00u : 0xff80u) | payload);
    std::memcpy(&e, &bits, 2);
  }
  return e;
}

// rows x width elements of E, row stride `stride`, the first one `offset` elements past a 64-byte boundary, inside
// guard elements (64 bytes before and after, and the padding of every row) that hold the tensor's guard nan.
template <class E>
class Tensor {
 public:
  Tensor(int64_t rows, int64_t width, int64_t stride, int64_t offset = 0)
      : rows_(rows), width_(width), stride_(stride), offset_(offset) {
    static unsigned tensors = 0;
    guard_ = guard_nan<E>(tensors++);
    const size_t n = static_cast<size_t>(rows > 0 ? (rows - 1) * stride + width : 0);
    bytes_ = kGuard + static_cast<size_t>(offset) * sizeof(E) + n * sizeof(E) + kGuard;
    storage_.assign(bytes_ + 64, 0);
    raw_ = storage_.data() + (64 - reinterpret_cast<uintptr_t>(storage_.data()) % 64) % 64;
    for (size_t b = 0; b < bytes_; b += sizeof(E)) std::memcpy(raw_ + b, &guard_, sizeof(E));
  }
  E* data() { return reinterpret_cast<E*>(raw_ + kGuard) + offset_; }
  const E* data() const { return reinterpret_cast<const E*>(raw_ + kGuard) + offset_; }
  int64_t rows() const { return rows_; }
  int64_t width() const { return width_; }
  int64_t stride() const { return stride_; }
  E& at(int64_t r, int64_t c) { return data()[r * stride_ + c]; }
  float get(int64_t r, int64_t c) const { return to_f(data()[r * stride_ + c]); }

  void randn(std::mt19937& rng, float mean, float sd) {
    std::normal_distribution<float> dist(mean, sd);
    for (int64_t r = 0; r < rows_; ++r)
      for (int64_t c = 0; c < width_; ++c) at(r, c) = from_f<E>(dist(rng));
  }
  std::vector<double> values() const {
    std::vector<double> out;
    for (int64_t r = 0; r < rows_; ++r)
      for (int64_t c = 0; c < width_; ++c) out.push_back(get(r, c));
    return out;
  }
  // The bytes of the logical elements, for bitwise comparisons.
  std::string bytes() const {
    std::string out;
    for (int64_t r = 0; r < rows_; ++r)
      out.append(reinterpret_cast<const char*>(data() + r * stride_), static_cast<size_t>(width_) * sizeof(E));
    return out;
  }
  // Whether every element outside the logical ones (guards, row padding) still holds the guard nan.
  bool untouched_outside() const {
    std::vector<bool> inside(bytes_, false);
    const size_t first = kGuard + static_cast<size_t>(offset_) * sizeof(E);
    for (int64_t r = 0; r < rows_; ++r)
      for (size_t b = 0; b < static_cast<size_t>(width_) * sizeof(E); ++b)
        inside[first + static_cast<size_t>(r * stride_) * sizeof(E) + b] = true;
    for (size_t b = 0; b < bytes_; b += sizeof(E))
      if (!inside[b] && std::memcmp(raw_ + b, &guard_, sizeof(E)) != 0) return false;
    return true;
  }

 private:
  static constexpr size_t kGuard = 64;
  int64_t rows_, width_, stride_, offset_;
  E guard_;
  size_t bytes_ = 0;
  std::vector<unsigned char> storage_;
  unsigned char* raw_ = nullptr;
};

template <class E>
void check_untouched(const std::string& name, const Tensor<E>& t) {
  CHECK_MSG(t.untouched_outside(), name + ": bytes outside the tensor's rows (guards or row padding) were written");
}

// ------------------------------------------------------------------------------------------ the error rule
double max_abs(const std::vector<double>& x) {
  double m = 0;
  for (double v : x) m = std::max(m, std::fabs(v));
  return m;
}

double max_err(const std::vector<double>& got, const std::vector<double>& ref) {
  double m = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double e = std::fabs(got[i] - ref[i]);
    if (!(e <= m)) m = e;  // a nan propagates
  }
  return m;
}

// flash-attention's rule: max|got - exact| <= 2 max|plain - exact| + unit * max|exact|.
void check_close(const std::string& what, const std::vector<double>& got, const std::vector<double>& exact,
                 const std::vector<double>& plain, double unit) {
  CHECK_MSG(got.size() == exact.size() && plain.size() == exact.size(), what + ": sizes differ");
  const double ours = max_err(got, exact), theirs = max_err(plain, exact);
  const double bound = 2 * theirs + unit * max_abs(exact);
  static const bool verbose = std::getenv("GPT2FAST_EMU_VERBOSE") != nullptr;
  if (verbose) std::printf("  %-100s error %.3g, bound %.3g (plain %.3g)\n", what.c_str(), ours, bound, theirs);
  if (!(ours <= bound)) {
    size_t worst = 0;
    for (size_t i = 0; i < got.size(); ++i)
      if (!(std::fabs(got[i] - exact[i]) <= std::fabs(got[worst] - exact[worst]))) worst = i;
    ::tl::fail(__FILE__, __LINE__,
               what + ": max error " + std::to_string(ours) + " > bound " + std::to_string(bound) +
                   " (plain low precision " + std::to_string(theirs) + "); worst at flat index " +
                   std::to_string(worst) + ": got " + std::to_string(got[worst]) + ", expected " +
                   std::to_string(exact[worst]));
  }
}

struct Output {
  const char* what;
  std::vector<double> got;
  const std::vector<double>& exact;
  const std::vector<double>& plain;
  double unit;
};

void check_outputs(const std::string& name, std::initializer_list<Output> outputs) {
  for (const Output& o : outputs) check_close(name + ": " + o.what, o.got, o.exact, o.plain, o.unit);
}

// ------------------------------------------------------------------------------------------ kernel variants
// The kernels a launch ran, from the emulator's record: the same configuration key must always run the same
// kernel and different keys different kernels, e.g. the aligned rows the vectorised variant and the misaligned
// ones the scalar variant.
void expect_kernels(const std::string& key, size_t launches) {
  static std::map<std::string, cuda_emu::AnyKernel> by_key;
  static std::map<cuda_emu::AnyKernel, std::string> by_kernel;
  CHECK_MSG(cuda_emu::g_launches.size() == launches, key + ": " + std::to_string(cuda_emu::g_launches.size()) +
                                                         " launches, expected " + std::to_string(launches));
  const cuda_emu::AnyKernel k = cuda_emu::g_launches.front().kernel;
  const auto known = by_key.find(key);
  CHECK_MSG(known == by_key.end() || known->second == k, key + ": launched another kernel than before");
  const auto seen = by_kernel.find(k);
  CHECK_MSG(seen == by_kernel.end() || seen->second == key, key + ": ran the kernel of " +
                                                                (seen == by_kernel.end() ? "" : seen->second));
  by_key[key] = k;
  by_kernel[k] = key;
}

std::string variant(const char* op, DType a, DType b, bool vec, const char* extra = "") {
  return std::string(op) + " " + std::to_string(static_cast<int>(a)) + "/" + std::to_string(static_cast<int>(b)) +
         (vec ? " vectorised" : " scalar") + extra;
}

// ------------------------------------------------------------------------------------------ LayerNorm
struct LayerNormCase {
  int64_t rows, width;
  bool residual, dh;
  int64_t pad;           // extra elements per input row
  int64_t offset;        // elements past a 64-byte boundary of the inputs
  int64_t partial_rows;  // for the backward; 0: what layer_norm_backward_partial_rows says
};

struct LayerNormRef {
  std::vector<double> y, mean, rstd, dx, dweight, dbias;
};

// LayerNorm forward and backward over the rounded h in Acc arithmetic; with `round` the outputs are rounded to
// the storage dtypes (T for y and dx, P for the parameter gradients): the plain low-precision computation.
template <class T, class P, class Acc>
LayerNormRef layer_norm_reference(const std::vector<std::vector<float>>& h, const Tensor<P>& w, const Tensor<P>& b,
                                  const Tensor<T>& dy, const Tensor<T>* dh, float eps, bool round) {
  LayerNormRef r;
  const int64_t W = w.width();
  std::vector<Acc> dw(static_cast<size_t>(W), 0), db(static_cast<size_t>(W), 0);
  for (size_t i = 0; i < h.size(); ++i) {
    const int64_t row = static_cast<int64_t>(i);
    Acc sum = 0;
    for (float v : h[i]) sum += v;
    const Acc mean = sum / static_cast<Acc>(W);
    Acc sq = 0;
    for (float v : h[i]) sq += (v - mean) * (v - mean);
    const Acc rstd = 1 / std::sqrt(sq / static_cast<Acc>(W) + static_cast<Acc>(eps));
    r.mean.push_back(static_cast<double>(mean));
    r.rstd.push_back(static_cast<double>(rstd));
    Acc sum_wdy = 0, sum_xhat_wdy = 0;
    for (int64_t c = 0; c < W; ++c) {
      const Acc xhat = (h[i][c] - mean) * rstd;
      const Acc y = xhat * static_cast<Acc>(w.get(0, c)) + static_cast<Acc>(b.get(0, c));
      r.y.push_back(round ? round_to<T>(static_cast<float>(y)) : static_cast<double>(y));
      const Acc g = dy.get(row, c);
      sum_wdy += static_cast<Acc>(w.get(0, c)) * g;
      sum_xhat_wdy += xhat * static_cast<Acc>(w.get(0, c)) * g;
      dw[c] += g * xhat;
      db[c] += g;
    }
    for (int64_t c = 0; c < W; ++c) {
      const Acc xhat = (h[i][c] - mean) * rstd;
      Acc dx = (static_cast<Acc>(w.get(0, c)) * static_cast<Acc>(dy.get(row, c)) - sum_wdy / static_cast<Acc>(W) -
                xhat * sum_xhat_wdy / static_cast<Acc>(W)) *
               rstd;
      if (dh) dx += static_cast<Acc>(dh->get(row, c));
      r.dx.push_back(round ? round_to<T>(static_cast<float>(dx)) : static_cast<double>(dx));
    }
  }
  for (int64_t c = 0; c < W; ++c) {
    r.dweight.push_back(round ? round_to<P>(static_cast<float>(dw[c])) : static_cast<double>(dw[c]));
    r.dbias.push_back(round ? round_to<P>(static_cast<float>(db[c])) : static_cast<double>(db[c]));
  }
  return r;
}

template <class T, class P>
void check_layer_norm(const LayerNormCase& c, unsigned seed) {
  constexpr DType kT = Type<T>::kDtype, kP = Type<P>::kDtype;
  const int64_t R = c.rows, W = c.width, S = W + c.pad;
  char name_buf[200];
  std::snprintf(name_buf, sizeof name_buf, "layer_norm %s/%s rows=%lld width=%lld%s%s pad=%lld offset=%lld",
                Type<T>::kName, Type<P>::kName, static_cast<long long>(R), static_cast<long long>(W),
                c.residual ? " residual" : "", c.dh ? " dh" : "", static_cast<long long>(c.pad),
                static_cast<long long>(c.offset));
  const std::string name = name_buf;
  ::tl::Context context(name);
  std::mt19937 rng(seed);
  const float eps = 1e-5f;

  // Forward. Inputs away from zero mean, so that a one-pass variance would lose digits.
  Tensor<T> x(R, W, S, c.offset), res(R, W, S, c.offset), y(R, W, W), h(R, W, W);
  Tensor<P> weight(1, W, W), bias(1, W, W);
  Tensor<float> mean(1, R, R), rstd(1, R, R);
  x.randn(rng, 3.f, 1.f);
  res.randn(rng, -1.f, 1.f);
  weight.randn(rng, 1.f, 0.5f);
  bias.randn(rng, 0.f, 0.5f);
  constexpr int V = 16 / sizeof(T);
  const bool vec = W % V == 0 && c.offset % V == 0 && S % V == 0;
  cuda_emu::g_launches.clear();
  CHECK_CUDA(kn::layer_norm_forward(kT, kP, x.data(), S, c.residual ? res.data() : nullptr, S, weight.data(),
                                    bias.data(), y.data(), c.residual ? h.data() : nullptr, mean.data(), rstd.data(),
                                    R, W, eps, nullptr));
  expect_kernels(variant("layer_norm_forward", kT, kP, vec, c.residual ? " residual" : ""), 1);

  // h is x + residual added in fp32 and rounded to T: exactly.
  std::vector<std::vector<float>> hv(static_cast<size_t>(R), std::vector<float>(static_cast<size_t>(W)));
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t col = 0; col < W; ++col) {
      hv[r][col] = c.residual ? round_to<T>(x.get(r, col) + res.get(r, col)) : x.get(r, col);
      const T expected = from_f<T>(hv[r][col]);
      if (c.residual)
        CHECK_MSG(std::memcmp(&h.at(r, col), &expected, sizeof(T)) == 0,
                  name + ": h[" + std::to_string(r) + ", " + std::to_string(col) + "] is not round(x + residual)");
    }
  }

  // Backward, from the stored h (or x) and the forward's statistics, as the autograd function calls it.
  const int64_t S2 = W + 2 * c.pad;  // another stride for dy
  Tensor<T> dy(R, W, S2, c.offset), dh(R, W, S, c.offset), dx(R, W, W), dx2(R, W, W);
  Tensor<P> dweight(1, W, W), dbias(1, W, W), dweight2(1, W, W), dbias2(1, W, W);
  dy.randn(rng, 0.f, 1.f);
  dh.randn(rng, 0.f, 1.f);
  const int64_t partial_rows =
      c.partial_rows > 0 ? c.partial_rows : kn::layer_norm_backward_partial_rows(kT, kP, R, W, 0);
  Tensor<float> partials(1, 2 * partial_rows * W, 2 * partial_rows * W);
  const void* hin = c.residual ? static_cast<const void*>(h.data()) : x.data();
  const int64_t h_stride = c.residual ? W : S;
  // h is the contiguous stored h, or x itself; dy and dh start where x does.
  const bool bwd_vec = W % V == 0 && c.offset % V == 0 && S2 % V == 0 && ((c.residual && !c.dh) || S % V == 0);
  auto backward = [&](Tensor<T>& dx_out, Tensor<P>& dw_out, Tensor<P>& db_out) {
    cuda_emu::g_launches.clear();
    CHECK_CUDA(kn::layer_norm_backward(kT, kP, hin, h_stride, dy.data(), S2, c.dh ? dh.data() : nullptr, S,
                                       weight.data(), mean.data(), rstd.data(), dx_out.data(), dw_out.data(),
                                       db_out.data(), partials.data(), partial_rows, R, W, nullptr));
    expect_kernels(variant("layer_norm_backward", kT, kP, bwd_vec, c.dh ? " dh" : ""), 2);
  };
  backward(dx, dweight, dbias);
  backward(dx2, dweight2, dbias2);
  CHECK_MSG(dx.bytes() == dx2.bytes() && dweight.bytes() == dweight2.bytes() && dbias.bytes() == dbias2.bytes(),
            name + ": the backward pass is not deterministic (two runs differ)");

  for (const auto* t : {&x, &res, &y, &h, &dy, &dh, &dx}) check_untouched(name, *t);
  for (const auto* t : {&weight, &bias, &dweight, &dbias}) check_untouched(name, *t);
  for (const auto* t : {&mean, &rstd, &partials}) check_untouched(name, *t);

  const LayerNormRef exact = layer_norm_reference<T, P, double>(hv, weight, bias, dy, c.dh ? &dh : nullptr, eps, false);
  const LayerNormRef plain = layer_norm_reference<T, P, float>(hv, weight, bias, dy, c.dh ? &dh : nullptr, eps, true);
  check_outputs(name, {{"y", y.values(), exact.y, plain.y, Type<T>::kUnit},
                       {"mean", mean.values(), exact.mean, plain.mean, Type<float>::kUnit},
                       {"rstd", rstd.values(), exact.rstd, plain.rstd, Type<float>::kUnit},
                       {"dx", dx.values(), exact.dx, plain.dx, Type<T>::kUnit},
                       {"dweight", dweight.values(), exact.dweight, plain.dweight, Type<P>::kUnit},
                       {"dbias", dbias.values(), exact.dbias, plain.dbias, Type<P>::kUnit}});
}

template <class T, class P>
void layer_norm_cases(unsigned seed) {
  const LayerNormCase cases[] = {
      {11, 768, true, true, 0, 0, 0},      // GPT-2's width, aligned: the vectorised kernels
      {11, 768, false, false, 8, 0, 3},    // strided rows (stride a multiple of every V), 3 partial rows
      {11, 768, true, false, 3, 1, 1},     // misaligned, odd stride: the scalar kernels, one partial row
      {5, 1, true, true, 0, 0, 0},         // a single column
      {9, 7, false, true, 2, 1, 2},
      {11, 257, true, false, 5, 0, 4},
      {3, 1023, false, true, 1, 0, 0},
      {6, 1088, true, true, 0, 0, 5},      // fp32: 64-thread teams (a reduction across warps), 6 rows in 4 teams
      {2, 4104, false, false, 0, 0, 0},    // teams of 160-544 threads, one team per block
      {40, 24, true, false, 0, 0, 20},     // 20 partial rows: the column sums' thread rows take several each
  };
  for (const LayerNormCase& c : cases) check_layer_norm<T, P>(c, seed++);
}

TEST_CASE(layer_norm_fp32) { layer_norm_cases<float, float>(100); }
TEST_CASE(layer_norm_fp16) { layer_norm_cases<Half, Half>(200); }
TEST_CASE(layer_norm_fp16_fp32_params) { layer_norm_cases<Half, float>(300); }
TEST_CASE(layer_norm_bf16) { layer_norm_cases<Bf16, Bf16>(400); }
TEST_CASE(layer_norm_bf16_fp32_params) { layer_norm_cases<Bf16, float>(500); }

TEST_CASE(layer_norm_widest_rows) {
  const int64_t widest = kn::layer_norm_max_width();
  check_layer_norm<float, float>({2, widest, true, true, 0, 0, 0}, 600);
  check_layer_norm<Bf16, float>({2, widest - 3, false, false, 0, 0, 0}, 601);
  float dummy = 0;
  CHECK_EQ(kn::layer_norm_forward(DType::kFloat32, DType::kFloat32, &dummy, widest + 1, nullptr, 0, &dummy, &dummy,
                                  &dummy, nullptr, &dummy, &dummy, 1, widest + 1, 1e-5f, nullptr),
           cudaErrorInvalidValue);
}

TEST_CASE(layer_norm_backward_without_rows_zeroes_parameter_gradients) {
  Tensor<float> dweight(1, 33, 33), dbias(1, 33, 33);
  float dummy = 0;
  CHECK_CUDA(kn::layer_norm_backward(DType::kFloat32, DType::kFloat32, &dummy, 33, &dummy, 33, nullptr, 0, &dummy,
                                     &dummy, &dummy, &dummy, dweight.data(), dbias.data(), &dummy, 1, 0, 33, nullptr));
  for (double v : dweight.values()) CHECK_EQ(v, 0.0);
  for (double v : dbias.values()) CHECK_EQ(v, 0.0);
}

// ------------------------------------------------------------------------------------------ bias + GELU
template <class Acc>
Acc gelu_ref(Acc z) {
  const Acc k = static_cast<Acc>(0.7978845608028654), c = static_cast<Acc>(0.044715);
  return static_cast<Acc>(0.5) * z * (1 + std::tanh(k * (z + c * z * z * z)));
}

template <class Acc>
Acc gelu_grad_ref(Acc z) {
  const Acc k = static_cast<Acc>(0.7978845608028654), c = static_cast<Acc>(0.044715);
  const Acc t = std::tanh(k * (z + c * z * z * z));
  return static_cast<Acc>(0.5) * (1 + t) + static_cast<Acc>(0.5) * z * (1 - t * t) * k * (1 + 3 * c * z * z);
}

struct GeluRef {
  std::vector<double> y, dx, dbias;
};

template <class T, class B, class Acc>
GeluRef bias_gelu_reference(const Tensor<T>& x, const Tensor<B>& bias, const Tensor<T>& dy, bool round) {
  GeluRef r;
  std::vector<Acc> db(static_cast<size_t>(x.width()), 0);
  for (int64_t row = 0; row < x.rows(); ++row) {
    for (int64_t c = 0; c < x.width(); ++c) {
      const Acc z = static_cast<Acc>(x.get(row, c)) + static_cast<Acc>(bias.get(0, c));
      const Acc y = gelu_ref(z), dx = static_cast<Acc>(dy.get(row, c)) * gelu_grad_ref(z);
      r.y.push_back(round ? round_to<T>(static_cast<float>(y)) : static_cast<double>(y));
      r.dx.push_back(round ? round_to<T>(static_cast<float>(dx)) : static_cast<double>(dx));
      db[c] += dx;
    }
  }
  for (Acc v : db) r.dbias.push_back(round ? round_to<B>(static_cast<float>(v)) : static_cast<double>(v));
  return r;
}

struct GeluCase {
  int64_t rows, width, pad, offset, partial_rows;  // partial_rows 0: what bias_gelu_backward_partial_rows says
};

template <class T, class B>
void check_bias_gelu(const GeluCase& c, unsigned seed) {
  constexpr DType kT = Type<T>::kDtype, kB = Type<B>::kDtype;
  const int64_t R = c.rows, W = c.width, S = W + c.pad;
  char name_buf[200];
  std::snprintf(name_buf, sizeof name_buf, "bias_gelu %s/%s rows=%lld width=%lld pad=%lld offset=%lld",
                Type<T>::kName, Type<B>::kName, static_cast<long long>(R), static_cast<long long>(W),
                static_cast<long long>(c.pad), static_cast<long long>(c.offset));
  const std::string name = name_buf;
  ::tl::Context context(name);
  std::mt19937 rng(seed);
  Tensor<T> x(R, W, S, c.offset), y(R, W, W), dy(R, W, S, c.offset), dx(R, W, W), dx2(R, W, W);
  Tensor<B> bias(1, W, W), dbias(1, W, W), dbias2(1, W, W);
  x.randn(rng, 0.f, 2.5f);  // both tails: sigmoid(2u) near 0 and near 1
  if (R > 1 && W > 1) {     // and far out, where exp(2u) would overflow
    x.at(0, 0) = from_f<T>(40.f);
    x.at(1, W - 1) = from_f<T>(-40.f);
  }
  bias.randn(rng, 0.f, 0.5f);
  dy.randn(rng, 0.f, 1.f);
  constexpr int V = 16 / sizeof(T);
  const bool vec = W % V == 0 && c.offset % V == 0 && S % V == 0;

  cuda_emu::g_launches.clear();
  CHECK_CUDA(kn::bias_gelu_forward(kT, kB, x.data(), S, bias.data(), y.data(), R, W, nullptr));
  expect_kernels(variant("bias_gelu_forward", kT, kB, vec), 1);

  const int64_t partial_rows = c.partial_rows > 0 ? c.partial_rows : kn::bias_gelu_backward_partial_rows(kT, kB, R, W, 0);
  Tensor<float> partials(1, partial_rows * W, partial_rows * W);
  auto backward = [&](Tensor<T>& dx_out, Tensor<B>& db_out) {
    cuda_emu::g_launches.clear();
    CHECK_CUDA(kn::bias_gelu_backward(kT, kB, x.data(), S, bias.data(), dy.data(), S, dx_out.data(), db_out.data(),
                                      partials.data(), partial_rows, R, W, nullptr));
    expect_kernels(variant("bias_gelu_backward", kT, kB, vec), 2);
  };
  backward(dx, dbias);
  backward(dx2, dbias2);
  CHECK_MSG(dx.bytes() == dx2.bytes() && dbias.bytes() == dbias2.bytes(),
            name + ": the backward pass is not deterministic (two runs differ)");
  for (const auto* t : {&x, &y, &dy, &dx}) check_untouched(name, *t);
  for (const auto* t : {&bias, &dbias}) check_untouched(name, *t);
  check_untouched(name, partials);

  const GeluRef exact = bias_gelu_reference<T, B, double>(x, bias, dy, false);
  const GeluRef plain = bias_gelu_reference<T, B, float>(x, bias, dy, true);
  check_outputs(name, {{"y", y.values(), exact.y, plain.y, Type<T>::kUnit},
                       {"dx", dx.values(), exact.dx, plain.dx, Type<T>::kUnit},
                       {"dbias", dbias.values(), exact.dbias, plain.dbias, Type<B>::kUnit}});
}

template <class T, class B>
void bias_gelu_cases(unsigned seed) {
  const GeluCase cases[] = {
      {37, 768, 0, 0, 0},    // aligned: 16-byte vectors; 37 rows: the last forward block partly filled
      {37, 768, 1, 0, 3},    // odd stride: one element per thread
      {20, 256, 8, 1, 2},    // misaligned
      {3, 1, 0, 0, 0},
      {19, 7, 2, 0, 4},      // 19 rows in 4 groups of 5: rows left after the two-row loop
      {17, 257, 0, 0, 1},
      {5, 1023, 3, 0, 2},
      {9, 1032, 0, 0, 0},    // several column tiles of the vectorised layout
      {40, 40, 0, 0, 20},    // 20 partial rows: the column sums' thread rows take several each
  };
  for (const GeluCase& c : cases) check_bias_gelu<T, B>(c, seed++);
}

TEST_CASE(bias_gelu_fp32) { bias_gelu_cases<float, float>(700); }
TEST_CASE(bias_gelu_fp16) { bias_gelu_cases<Half, Half>(800); }
TEST_CASE(bias_gelu_fp16_fp32_bias) { bias_gelu_cases<Half, float>(900); }
TEST_CASE(bias_gelu_bf16) { bias_gelu_cases<Bf16, Bf16>(1000); }
TEST_CASE(bias_gelu_bf16_fp32_bias) { bias_gelu_cases<Bf16, float>(1100); }

// ------------------------------------------------------------------------------------------ cross-entropy
constexpr int64_t kIgnore = -100;

enum class GradLayout { kOwnRows, kOwnMisalignedRows, kInPlace };

struct CrossEntropyCase {
  int64_t rows, classes, pad, offset;
  GradLayout grad;
};

template <class T>
void check_cross_entropy(const CrossEntropyCase& c, unsigned seed) {
  constexpr DType kT = Type<T>::kDtype;
  const int64_t R = c.rows, C = c.classes, S = C + c.pad;
  const char* layouts[] = {"own rows", "own misaligned rows", "in place"};
  char name_buf[200];
  std::snprintf(name_buf, sizeof name_buf, "cross_entropy %s rows=%lld classes=%lld pad=%lld offset=%lld grad %s",
                Type<T>::kName, static_cast<long long>(R), static_cast<long long>(C), static_cast<long long>(c.pad),
                static_cast<long long>(c.offset), layouts[static_cast<int>(c.grad)]);
  const std::string name = name_buf;
  ::tl::Context context(name);
  std::mt19937 rng(seed);
  Tensor<T> logits(R, C, S, c.offset);
  logits.randn(rng, 0.f, 3.f);
  // Targets: valid ones, then (with enough rows) an ignored row and two out of range, which give nan.
  std::vector<int64_t> targets(static_cast<size_t>(R));
  std::uniform_int_distribution<int64_t> pick(0, C - 1);
  for (auto& t : targets) t = pick(rng);
  if (R >= 5) {
    targets[1] = kIgnore;
    targets[2] = C;
    targets[4] = -7;
  }
  if (C > 1) targets[0] = C - 1;  // the last class: the tail of the row
  auto valid = [&](int64_t r) { return targets[r] >= 0 && targets[r] < C; };
  int64_t n_valid = 0;
  for (int64_t r = 0; r < R; ++r) n_valid += valid(r);
  const float scale = 1.f / static_cast<float>(std::max<int64_t>(1, n_valid));

  // References from the logits as stored (before an in-place backward overwrites them).
  std::vector<double> lse_exact, lse_plain;
  for (int64_t r = 0; r < R; ++r) {
    double mx = -INFINITY, sum = 0;
    float mxf = -INFINITY, sumf = 0;
    for (int64_t i = 0; i < C; ++i) {
      mx = std::max(mx, static_cast<double>(logits.get(r, i)));
      mxf = std::max(mxf, logits.get(r, i));
    }
    for (int64_t i = 0; i < C; ++i) {
      sum += std::exp(logits.get(r, i) - mx);
      sumf += std::exp(logits.get(r, i) - mxf);
    }
    lse_exact.push_back(mx + std::log(sum));
    lse_plain.push_back(mxf + std::log(sumf));
  }
  std::vector<double> loss_exact, loss_plain, grad_exact[2], grad_plain[2];  // [0]: other classes, [1]: targets
  for (int64_t r = 0; r < R; ++r) {
    if (!valid(r)) continue;
    loss_exact.push_back(lse_exact[r] - logits.get(r, targets[r]));
    loss_plain.push_back(static_cast<float>(lse_plain[r]) - logits.get(r, targets[r]));
    for (int64_t i = 0; i < C; ++i) {
      const bool is_target = i == targets[r];
      const double ge = (std::exp(logits.get(r, i) - lse_exact[r]) - is_target) * scale;
      const float gp = (std::exp(logits.get(r, i) - static_cast<float>(lse_plain[r])) - is_target) * scale;
      grad_exact[is_target].push_back(ge);
      grad_plain[is_target].push_back(round_to<T>(gp));
    }
  }

  Tensor<float> loss(1, R, R), lse(1, R, R), scale_buf(1, 1, 1);
  scale_buf.at(0, 0) = scale;
  CHECK_CUDA(kn::cross_entropy_forward(kT, logits.data(), S, targets.data(), loss.data(), lse.data(), R, C, kIgnore,
                                       nullptr));
  check_untouched(name, loss);
  check_untouched(name, lse);
  check_close(name + ": lse", lse.values(), lse_exact, lse_plain, Type<float>::kUnit);
  std::vector<double> loss_valid;
  for (int64_t r = 0; r < R; ++r) {
    const float l = loss.get(0, r);
    if (valid(r)) loss_valid.push_back(l);
    else if (targets[r] == kIgnore) CHECK_MSG(l == 0.f && !std::signbit(l), name + ": an ignored row's loss is not 0");
    else CHECK_MSG(std::isnan(l), name + ": a row with an out-of-range target has loss " + std::to_string(l));
  }
  check_close(name + ": loss", loss_valid, loss_exact, loss_plain, Type<float>::kUnit);

  // Backward into its own rows (another stride: 16-byte multiple or not) or over the logits.
  const int64_t gstride = c.grad == GradLayout::kInPlace ? S : c.grad == GradLayout::kOwnRows ? S + 16 : S + 1;
  Tensor<T> own(R, C, gstride, c.offset);
  Tensor<T>& grad = c.grad == GradLayout::kInPlace ? logits : own;
  const bool vec = c.grad != GradLayout::kOwnMisalignedRows;
  cuda_emu::g_launches.clear();
  CHECK_CUDA(kn::cross_entropy_backward(kT, logits.data(), S, targets.data(), lse.data(), scale_buf.data(),
                                        grad.data(), gstride, R, C, kIgnore, nullptr));
  expect_kernels(variant("cross_entropy_backward", kT, kT, vec || R <= 1), 1);
  check_untouched(name, logits);
  check_untouched(name, own);
  std::vector<double> grad_got[2];
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t i = 0; i < C; ++i) {
      const float g = grad.get(r, i);
      if (valid(r)) grad_got[i == targets[r]].push_back(g);
      else if (targets[r] == kIgnore) CHECK_MSG(g == 0.f, name + ": an ignored row's gradient is not 0");
      else CHECK_MSG(std::isnan(g), name + ": a row with an out-of-range target has gradient " + std::to_string(g));
    }
  }
  check_close(name + ": grad (other classes)", grad_got[0], grad_exact[0], grad_plain[0], Type<T>::kUnit);
  check_close(name + ": grad (target classes)", grad_got[1], grad_exact[1], grad_plain[1], Type<T>::kUnit);
}

template <class T>
void cross_entropy_cases(unsigned seed) {
  const CrossEntropyCase cases[] = {
      {6, 1000, 0, 0, GradLayout::kOwnRows},  // rows 16-byte aligned or not depending on the dtype
      {6, 1000, 3, 1, GradLayout::kInPlace},  // every row with its own misalignment
      {6, 1000, 5, 0, GradLayout::kOwnMisalignedRows},
      {5, 1, 0, 0, GradLayout::kOwnRows},
      {5, 7, 1, 3, GradLayout::kInPlace},
      {7, 257, 2, 0, GradLayout::kOwnMisalignedRows},
      {3, 5003, 1, 2, GradLayout::kOwnRows},  // 64-128 threads: merged across warps
      {1, 50, 0, 1, GradLayout::kOwnMisalignedRows},
  };
  for (const CrossEntropyCase& c : cases) check_cross_entropy<T>(c, seed++);
}

TEST_CASE(cross_entropy_fp32) { cross_entropy_cases<float>(1200); }
TEST_CASE(cross_entropy_fp16) { cross_entropy_cases<Half>(1300); }
TEST_CASE(cross_entropy_bf16) { cross_entropy_cases<Bf16>(1400); }

// ------------------------------------------------------------------------------------------ AdamW
struct AdamWHyper {
  float lr, beta1, beta2, eps, weight_decay;
  int64_t step;
};

// One element of torch's AdamW step in Acc arithmetic (the documented formula of adamw.cu).
template <class Acc>
void adamw_ref(Acc& p, Acc g, Acc& m, Acc& v, const AdamWHyper& h) {
  const Acc b1 = h.beta1, b2 = h.beta2;
  const Acc step_size = static_cast<Acc>(h.lr) / (1 - std::pow(b1, static_cast<Acc>(h.step)));
  const Acc bc2_sqrt = std::sqrt(1 - std::pow(b2, static_cast<Acc>(h.step)));
  p *= 1 - static_cast<Acc>(h.lr) * static_cast<Acc>(h.weight_decay);
  m += (1 - b1) * (g - m);
  v = b2 * v + (1 - b2) * g * g;
  p -= step_size * m / (std::sqrt(v) / bc2_sqrt + static_cast<Acc>(h.eps));
}

template <class P, class G>
void check_adamw(unsigned seed) {
  constexpr DType kP = Type<P>::kDtype, kG = Type<G>::kDtype;
  const std::string name = std::string("adamw ") + Type<P>::kName + " params, " + Type<G>::kName + " grads";
  ::tl::Context context(name);
  std::mt19937 rng(seed);
  // Sizes across the chunk boundaries, an empty tensor in the middle and one at the end (both in the table),
  // and offsets that make some tensors' packs misaligned (the scalar loop).
  const int64_t sizes[] = {1, 7, 0, 16383, 16385, 3, 40000, 0};
  const int64_t p_offsets[] = {0, 1, 0, 0, 1, 0, 0, 0};
  const int64_t m_offsets[] = {0, 0, 0, 2, 0, 0, 0, 0};
  std::vector<Tensor<P>> params;
  std::vector<Tensor<G>> grads;
  std::vector<Tensor<float>> ms, vs;
  std::vector<kn::AdamWTensor> table;
  int64_t chunks = 0;
  for (size_t i = 0; i < std::size(sizes); ++i) {
    const int64_t n = sizes[i];
    params.emplace_back(1, n, n, p_offsets[i]);
    grads.emplace_back(1, n, n);
    ms.emplace_back(1, n, n, m_offsets[i]);
    vs.emplace_back(1, n, n);
  }
  for (size_t i = 0; i < std::size(sizes); ++i) {
    params[i].randn(rng, 0.f, 1.f);
    ms[i].randn(rng, 0.f, 0.1f);
    vs[i].randn(rng, 0.f, 0.1f);
    for (int64_t e = 0; e < sizes[i]; ++e) vs[i].at(0, e) = std::fabs(vs[i].at(0, e));  // second moments >= 0
    table.push_back(kn::AdamWTensor{params[i].data(), grads[i].data(), ms[i].data(), vs[i].data(), sizes[i], chunks});
    chunks += (sizes[i] + kn::kAdamWChunk - 1) / kn::kAdamWChunk;
  }
  // Two steps, the second far from the first (bias corrections near 1); a large learning rate so that the update
  // shows in bf16 parameters.
  const AdamWHyper steps[] = {{0.05f, 0.9f, 0.999f, 1e-8f, 0.1f, 1}, {0.02f, 0.8f, 0.99f, 1e-6f, 0.0f, 1000}};
  for (const AdamWHyper& h : steps) {
    std::vector<double> p_exact, m_exact, v_exact, p_plain, m_plain, v_plain;
    for (size_t i = 0; i < std::size(sizes); ++i) {
      grads[i].randn(rng, 0.f, 1.f);
      for (int64_t e = 0; e < sizes[i]; ++e) {
        double pd = params[i].get(0, e), md = ms[i].get(0, e), vd = vs[i].get(0, e);
        float pf = params[i].get(0, e), mf = ms[i].get(0, e), vf = vs[i].get(0, e);
        adamw_ref<double>(pd, grads[i].get(0, e), md, vd, h);
        adamw_ref<float>(pf, grads[i].get(0, e), mf, vf, h);
        p_exact.push_back(pd);
        m_exact.push_back(md);
        v_exact.push_back(vd);
        p_plain.push_back(round_to<P>(pf));
        m_plain.push_back(mf);
        v_plain.push_back(vf);
      }
    }
    cuda_emu::g_launches.clear();
    CHECK_CUDA(kn::adamw_step(kP, kG, table.data(), static_cast<int>(table.size()), chunks, h.lr, h.beta1, h.beta2,
                              h.eps, h.weight_decay, h.step, nullptr));
    CHECK_EQ(cuda_emu::g_launches.size(), size_t{1});
    CHECK_EQ(cuda_emu::g_launches[0].grid.x, static_cast<unsigned>(chunks));
    std::vector<double> p_got, m_got, v_got;
    for (size_t i = 0; i < std::size(sizes); ++i) {
      check_untouched(name, params[i]);
      check_untouched(name, grads[i]);
      check_untouched(name, ms[i]);
      check_untouched(name, vs[i]);
      for (double d : params[i].values()) p_got.push_back(d);
      for (double d : ms[i].values()) m_got.push_back(d);
      for (double d : vs[i].values()) v_got.push_back(d);
    }
    const std::string at = name + " step " + std::to_string(h.step);
    check_outputs(at, {{"param", p_got, p_exact, p_plain, Type<P>::kUnit},
                       {"exp_avg", m_got, m_exact, m_plain, Type<float>::kUnit},
                       {"exp_avg_sq", v_got, v_exact, v_plain, Type<float>::kUnit}});
  }
}

TEST_CASE(adamw_fp32) { check_adamw<float, float>(1500); }
TEST_CASE(adamw_fp16) { check_adamw<Half, Half>(1600); }
TEST_CASE(adamw_fp16_fp32_grads) { check_adamw<Half, float>(1700); }
TEST_CASE(adamw_bf16) { check_adamw<Bf16, Bf16>(1800); }
TEST_CASE(adamw_bf16_fp32_grads) { check_adamw<Bf16, float>(1900); }

// ------------------------------------------------------------------------------------------ devices, arguments
// On a device without bf16 (emulated device 1 is sm_70) every launcher refuses bf16 before launching anything;
// fp16 still runs there.
TEST_CASE(bf16_refused_before_sm80) {
  CHECK_CUDA(cudaSetDevice(1));
  struct Restore {
    ~Restore() { cudaSetDevice(0); }
  } restore;
  float f[64] = {};
  int64_t target = 0;
  cuda_emu::g_launches.clear();
  const DType bf = DType::kBFloat16;
  CHECK_EQ(kn::layer_norm_forward(bf, bf, f, 8, nullptr, 8, f, f, f, nullptr, f, f, 1, 8, 1e-5f, nullptr),
           cudaErrorNotSupported);
  CHECK_EQ(kn::bias_gelu_forward(bf, DType::kFloat32, f, 8, f, f, 1, 8, nullptr), cudaErrorNotSupported);
  CHECK_EQ(kn::cross_entropy_forward(bf, f, 8, &target, f, f, 1, 8, kIgnore, nullptr), cudaErrorNotSupported);
  kn::AdamWTensor t{f, f, f, f, 8, 0};
  CHECK_EQ(kn::adamw_step(bf, DType::kFloat32, &t, 1, 1, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.f, 1, nullptr),
           cudaErrorNotSupported);
  CHECK(cuda_emu::g_launches.empty());
  check_bias_gelu<Half, float>({5, 24, 0, 0, 0}, 2000);
}

TEST_CASE(invalid_arguments_refused) {
  float f[64] = {};
  int64_t targets[2] = {0, 0};
  const DType f32 = DType::kFloat32;
  cuda_emu::g_launches.clear();
  CHECK_EQ(kn::layer_norm_forward(f32, f32, f, 8, nullptr, 8, f, f, f, nullptr, f, f, 2, 0, 1e-5f, nullptr),
           cudaErrorInvalidValue);
  CHECK_EQ(kn::layer_norm_forward(f32, f32, f, 7, nullptr, 8, f, f, f, nullptr, f, f, 2, 8, 1e-5f, nullptr),
           cudaErrorInvalidValue);
  CHECK_EQ(kn::layer_norm_forward(DType::kFloat16, DType::kBFloat16, f, 8, nullptr, 8, f, f, f, nullptr, f, f, 2, 8,
                                  1e-5f, nullptr),
           cudaErrorInvalidValue);
  CHECK_EQ(kn::bias_gelu_forward(f32, f32, f, 3, f, f, 2, 4, nullptr), cudaErrorInvalidValue);
  CHECK_EQ(kn::cross_entropy_forward(f32, f, 3, targets, f, f, 2, 4, kIgnore, nullptr), cudaErrorInvalidValue);
  kn::AdamWTensor t{f, f, f, f, 8, 0};
  CHECK_EQ(kn::adamw_step(f32, f32, &t, 1, 1, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.f, 0, nullptr), cudaErrorInvalidValue);
  CHECK(cuda_emu::g_launches.empty());
}

}  // namespace
