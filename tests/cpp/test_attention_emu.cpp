// The tensor-core attention kernels (csrc/kernels/attention_impl.cuh) run on the CPU: every thread of a CUDA
// block is an OS thread, __syncthreads is a block-wide barrier, a warp shuffle and an mma.m16n8k16 are
// exchanges through per-warp slots between two warp-wide barriers, and the mma reassembles the 16x16 and 16x8
// operands from the 32 lanes' registers with the PTX ISA's fragment layout; a 16-byte vector load aborts on an
// address that is not 16-byte aligned, as the GPU faults on one. The kernels' own code (tiling, fragment loads,
// masking, online softmax, the three backward passes, strides) is what runs; only the portability layer below
// differs from the GPU build (csrc/kernels/attention.cu). Results are compared with a float64 reference with
// flash-attention's rule: the kernel's error at most twice that of a plain low-precision computation (scores
// and softmax in fp32, operands of every product rounded to the dtype); delta = rowsum(dO * O) with the bound
// of an fp32 sum, for aligned rows (vector loads) and misaligned ones (scalar loads), which must agree bitwise.
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "harness.h"

#define CHECK_MSG(cond, message)                                  \
  do {                                                            \
    if (!(cond)) ::tl::fail(__FILE__, __LINE__, (message));       \
  } while (0)

// ------------------------------------------------------------------------------------------ element types
struct Bf16 {
  uint16_t bits;
};

inline float bf16_to_float(Bf16 v) {
  const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline Bf16 bf16_from_float(float f) {  // round to nearest even (no NaNs here)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return Bf16{static_cast<uint16_t>(u >> 16)};
}

using Half = _Float16;

template <class E>
float to_f(E v) {
  if constexpr (std::is_same_v<E, Bf16>) return bf16_to_float(v);
  else return static_cast<float>(v);
}

template <class E>
E from_f(float v) {
  if constexpr (std::is_same_v<E, Bf16>) return bf16_from_float(v);
  else return static_cast<E>(v);
}

template <class E>
uint16_t bits_of(E v) {
  uint16_t b;
  std::memcpy(&b, &v, 2);
  return b;
}

template <class E>
E from_bits(uint16_t b) {
  E v;
  std::memcpy(&v, &b, 2);
  return v;
}

// ------------------------------------------------------------------------------------------ the emulated block
struct EmulatedBlock {
  static constexpr int kWarps = 4;
  std::barrier<> block{32 * kWarps};
  std::vector<std::unique_ptr<std::barrier<>>> warp;
  float shfl[kWarps][32];
  uint32_t a[kWarps][32][4];
  uint32_t b[kWarps][32][2];
  EmulatedBlock() {
    for (int w = 0; w < kWarps; ++w) warp.emplace_back(std::make_unique<std::barrier<>>(32));
  }
};

thread_local EmulatedBlock* tl_block = nullptr;
thread_local int tl_warp = 0;
thread_local int tl_lane = 0;

namespace gpt2fast {
namespace kernels {
namespace attn_port {

#define G2F_ATTN_FN inline

G2F_ATTN_FN float shfl_xor(float v, int lane_mask) {
  EmulatedBlock& blk = *tl_block;
  blk.shfl[tl_warp][tl_lane] = v;
  blk.warp[tl_warp]->arrive_and_wait();
  const float other = blk.shfl[tl_warp][tl_lane ^ lane_mask];
  blk.warp[tl_warp]->arrive_and_wait();
  return other;
}

G2F_ATTN_FN void sync_block() { tl_block->block.arrive_and_wait(); }
G2F_ATTN_FN float exp2(float x) { return std::exp2(x); }
G2F_ATTN_FN float log2(float x) { return std::log2(x); }
G2F_ATTN_FN uint32_t load_u32(const void* p) {
  uint32_t w;
  std::memcpy(&w, p, 4);
  return w;
}
G2F_ATTN_FN void store_u32(void* p, uint32_t w) { std::memcpy(p, &w, 4); }
G2F_ATTN_FN void load16(const void* p, uint32_t (&w)[4]) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {  // a GPU stops the kernel: misaligned address
    std::fprintf(stderr, "emulated GPU: 16-byte load from %p, which is not 16-byte aligned\n", p);
    std::abort();
  }
  std::memcpy(w, p, 16);
}

template <class E>
G2F_ATTN_FN float to_float(E v) {
  return to_f<E>(v);
}

template <class E>
G2F_ATTN_FN uint32_t pack2(float lo, float hi) {
  return static_cast<uint32_t>(bits_of(from_f<E>(lo))) | (static_cast<uint32_t>(bits_of(from_f<E>(hi))) << 16);
}

template <class E>
float half_of(uint32_t w, int which) {
  return to_f<E>(from_bits<E>(static_cast<uint16_t>(which ? w >> 16 : w & 0xffffu)));
}

// D = A (16x16) B (16x8) + C, operands gathered from the warp's lanes with the PTX m16n8k16 layout.
template <class E>
G2F_ATTN_FN void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  EmulatedBlock& blk = *tl_block;
  const int w = tl_warp, lane = tl_lane;
  for (int i = 0; i < 4; ++i) blk.a[w][lane][i] = a[i];
  blk.b[w][lane][0] = b0;
  blk.b[w][lane][1] = b1;
  blk.warp[w]->arrive_and_wait();
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int e = 0; e < 2; ++e) {
      A[g][2 * t + e] = half_of<E>(blk.a[w][l][0], e);
      A[g + 8][2 * t + e] = half_of<E>(blk.a[w][l][1], e);
      A[g][2 * t + 8 + e] = half_of<E>(blk.a[w][l][2], e);
      A[g + 8][2 * t + 8 + e] = half_of<E>(blk.a[w][l][3], e);
      B[2 * t + e][g] = half_of<E>(blk.b[w][l][0], e);
      B[2 * t + 8 + e][g] = half_of<E>(blk.b[w][l][1], e);
    }
  }
  blk.warp[w]->arrive_and_wait();
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
    float acc = 0.f;
    for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
    c[i] += acc;
  }
}

}  // namespace attn_port
}  // namespace kernels
}  // namespace gpt2fast

#include "../../csrc/kernels/attention_impl.cuh"

namespace attn = gpt2fast::kernels::attn;

// Runs body(block_x, block_y, tid, smem) for every block of a grid, 128 OS threads per block.
void run_grid(int grid_x, int grid_y, size_t smem_bytes,
              const std::function<void(int, int, int, unsigned char*)>& body) {
  std::vector<unsigned char> smem_storage(smem_bytes + 16);
  unsigned char* smem = smem_storage.data() + (16 - reinterpret_cast<uintptr_t>(smem_storage.data()) % 16) % 16;
  for (int by = 0; by < grid_y; ++by) {
    for (int bx = 0; bx < grid_x; ++bx) {
      std::memset(smem, 0xff, smem_bytes);  // stale garbage: a kernel must not read what it did not write
      EmulatedBlock block;
      std::vector<std::thread> threads;
      for (int tid = 0; tid < attn::kThreads; ++tid) {
        threads.emplace_back([&, tid] {
          tl_block = &block;
          tl_warp = tid / 32;
          tl_lane = tid % 32;
          body(bx, by, tid, smem);
        });
      }
      for (auto& th : threads) th.join();
    }
  }
}

// ------------------------------------------------------------------------------------------ the test case
struct Layout {  // strides of a (B, H, T, D) tensor stored in (B, T, H, D) order (a view of a fused projection)
  int64_t b, h, t;
};

template <class E>
struct Case {
  int B, H, T, D;
  bool causal;
  std::vector<E> q, k, v, dout;  // stored (B, T, H, D): strided (B, H, T, D) views
  Layout in;
  std::vector<E> o, dq, dk, dv;  // contiguous (B, H, T, D)
  std::vector<float> lse, delta;
};

template <class E>
void fill(std::vector<E>& x, size_t n, std::mt19937& rng, float scale) {
  std::normal_distribution<float> dist(0.f, scale);
  x.resize(n);
  for (auto& e : x) e = from_f<E>(dist(rng));
}

struct Reference {  // float64 outputs and gradients of one (b, h) slice set, laid out contiguous (B, H, T, D)
  std::vector<double> o, dq, dk, dv, lse;
};

// Attention and its gradients in `Acc` arithmetic. With `lowp` the operands of each product are rounded to the
// element type first (P before P @ V, dS before dS @ K and dS^T @ Q, and the outputs): "plain PyTorch in low
// precision". Without it, everything is float64: the reference.
template <class E, class Acc>
Reference reference(const Case<E>& c, bool lowp) {
  const int B = c.B, H = c.H, T = c.T, D = c.D;
  auto at = [&](const std::vector<E>& x, int b, int h, int t, int d) {
    return static_cast<Acc>(to_f<E>(x[b * c.in.b + h * c.in.h + t * c.in.t + d]));
  };
  auto round = [&](Acc v) { return lowp ? static_cast<Acc>(to_f<E>(from_f<E>(static_cast<float>(v)))) : v; };
  const Acc scale = static_cast<Acc>(1.0 / std::sqrt(static_cast<double>(D)));
  Reference r;
  const size_t n = static_cast<size_t>(B) * H * T * D;
  r.o.assign(n, 0);
  r.dq.assign(n, 0);
  r.dk.assign(n, 0);
  r.dv.assign(n, 0);
  r.lse.assign(static_cast<size_t>(B) * H * T, 0);
  std::vector<Acc> P(static_cast<size_t>(T) * T), dS(static_cast<size_t>(T) * T);
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < H; ++h) {
      const size_t base = (static_cast<size_t>(b) * H + h) * T * D;
      for (int i = 0; i < T; ++i) {
        Acc mx = -INFINITY;
        for (int j = 0; j < T; ++j) {
          Acc s = 0;
          for (int d = 0; d < D; ++d) s += at(c.q, b, h, i, d) * at(c.k, b, h, j, d);
          P[i * T + j] = (c.causal && j > i) ? -INFINITY : s * scale;
          mx = std::max(mx, P[i * T + j]);
        }
        Acc sum = 0;
        for (int j = 0; j < T; ++j) sum += std::exp(P[i * T + j] - mx);
        r.lse[(static_cast<size_t>(b) * H + h) * T + i] = static_cast<double>(mx + std::log(sum));
        for (int j = 0; j < T; ++j) P[i * T + j] = std::exp(P[i * T + j] - mx) / sum;
        for (int d = 0; d < D; ++d) {
          Acc acc = 0;
          for (int j = 0; j < T; ++j) acc += round(P[i * T + j]) * at(c.v, b, h, j, d);
          r.o[base + i * D + d] = static_cast<double>(round(acc));
        }
      }
      for (int i = 0; i < T; ++i) {
        Acc delta = 0;  // rowsum(dO * O) with O as stored (rounded)
        for (int d = 0; d < D; ++d) delta += at(c.dout, b, h, i, d) * static_cast<Acc>(r.o[base + i * D + d]);
        for (int j = 0; j < T; ++j) {
          Acc dp = 0;
          for (int d = 0; d < D; ++d) dp += at(c.dout, b, h, i, d) * at(c.v, b, h, j, d);
          dS[i * T + j] = P[i * T + j] * (dp - delta);
        }
      }
      for (int j = 0; j < T; ++j) {
        for (int d = 0; d < D; ++d) {
          Acc dv = 0, dk = 0;
          for (int i = 0; i < T; ++i) {
            dv += round(P[i * T + j]) * at(c.dout, b, h, i, d);
            dk += round(dS[i * T + j]) * at(c.q, b, h, i, d);
          }
          r.dv[base + j * D + d] = static_cast<double>(round(dv));
          r.dk[base + j * D + d] = static_cast<double>(round(dk * scale));
        }
      }
      for (int i = 0; i < T; ++i) {
        for (int d = 0; d < D; ++d) {
          Acc dq = 0;
          for (int j = 0; j < T; ++j) dq += round(dS[i * T + j]) * at(c.k, b, h, j, d);
          r.dq[base + i * D + d] = static_cast<double>(round(dq * scale));
        }
      }
    }
  }
  return r;
}

// Runs the backward's first kernel, delta = rowsum(dO * O), on p's o and dout (B * H * p.seq rows) into a buffer
// with nan guards on both sides, checks that the guards are untouched and returns the rows.
template <class E, int D>
std::vector<float> run_delta(attn::Params p, int B, int H) {
  constexpr size_t kGuard = 16;
  const size_t rows = static_cast<size_t>(B) * H * p.seq;
  std::vector<float> buf(rows + 2 * kGuard, NAN);
  p.delta = buf.data() + kGuard;
  constexpr int kRows = attn::DeltaShape<E, D>::kRowsPerBlock;
  run_grid((p.seq + kRows - 1) / kRows, B * H, 0,
           [&](int bx, int by, int tid, unsigned char*) { attn::delta_block<E, D>(p, bx, by, tid); });
  for (size_t i = 0; i < kGuard; ++i) {
    CHECK_MSG(std::isnan(buf[i]) && std::isnan(buf[kGuard + rows + i]), "delta written outside its rows");
  }
  return std::vector<float>(buf.begin() + kGuard, buf.end() - kGuard);
}

// The first row of delta (rows bh * T + t) farther from the float64 rowsum(dO * O) of the same stored elements than
// an fp32 sum can be, or -1. The products of two 16-bit floats are exact in fp32, so only the D - 1 additions
// round: in any order, within D u sum_d |O dO| (u = 2^-24). A delta that misses or repeats one lane's eight
// products is off by about their sum, thousands of times that.
template <class E, int D>
int64_t first_bad_delta(const std::vector<float>& got, const E* o, const attn::Strides& so, const E* dout,
                        const attn::Strides& sdo, int B, int H, int T) {
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < H; ++h) {
      for (int t = 0; t < T; ++t) {
        double exact = 0, magnitude = 0;
        for (int d = 0; d < D; ++d) {
          const double x = static_cast<double>(to_f<E>(o[b * so.b + h * so.h + t * so.t + d])) *
                           static_cast<double>(to_f<E>(dout[b * sdo.b + h * sdo.h + t * sdo.t + d]));
          exact += x;
          magnitude += std::fabs(x);
        }
        const int64_t row = (static_cast<int64_t>(b) * H + h) * T + t;
        if (!(std::fabs(static_cast<double>(got[row]) - exact) <= D * 0x1p-24 * magnitude)) return row;
      }
    }
  }
  return -1;
}

template <class E, int D>
void run_kernels(Case<E>& c) {
  const int B = c.B, H = c.H, T = c.T;
  const size_t n = static_cast<size_t>(B) * H * T * D;
  c.o.assign(n, from_f<E>(NAN));
  c.dq.assign(n, from_f<E>(NAN));
  c.dk.assign(n, from_f<E>(NAN));
  c.dv.assign(n, from_f<E>(NAN));
  c.lse.assign(static_cast<size_t>(B) * H * T, NAN);
  c.delta.assign(static_cast<size_t>(B) * H * T, NAN);
  const attn::Strides in{c.in.b, c.in.h, c.in.t};
  const attn::Strides contiguous{static_cast<int64_t>(H) * T * D, static_cast<int64_t>(T) * D, D};
  attn::Params p{};
  p.q = c.q.data();
  p.k = c.k.data();
  p.v = c.v.data();
  p.o = c.o.data();
  p.dout = c.dout.data();
  p.dk = c.dk.data();
  p.dv = c.dv.data();
  p.lse = c.lse.data();
  p.delta = c.delta.data();
  p.sq = p.sk = p.sv = p.sdo = in;
  p.so = p.sdk = p.sdv = contiguous;
  p.heads = H;
  p.seq = T;
  p.scale = 1.f / std::sqrt(static_cast<float>(D));
  p.causal = c.causal;
  const int blocks = (T + attn::kBlockRows - 1) / attn::kBlockRows;

  p.out = c.o.data();
  p.sout = contiguous;
  run_grid(blocks, B * H, attn::ForwardShape<E, D>::kSmemBytes, [&](int bx, int by, int tid, unsigned char* smem) {
    attn::forward_block<E, D>(p, bx, by, tid, smem);
  });
  c.delta = run_delta<E, D>(p, B, H);
  p.delta = c.delta.data();
  run_grid(blocks, B * H, attn::BackwardShape<E, D>::kDkdvSmemBytes,
           [&](int bx, int by, int tid, unsigned char* smem) { attn::dkdv_block<E, D>(p, bx, by, tid, smem); });
  p.out = c.dq.data();
  run_grid(blocks, B * H, attn::BackwardShape<E, D>::kDqSmemBytes,
           [&](int bx, int by, int tid, unsigned char* smem) { attn::dq_block<E, D>(p, bx, by, tid, smem); });
}

template <class E>
double max_err(const std::vector<E>& got, const std::vector<double>& ref) {
  double m = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double e = std::fabs(static_cast<double>(to_f<E>(got[i])) - ref[i]);
    if (!(e <= m)) m = e;  // a nan propagates
  }
  return m;
}

double max_err_d(const std::vector<double>& got, const std::vector<double>& ref) {
  double m = 0;
  for (size_t i = 0; i < ref.size(); ++i) m = std::max(m, std::fabs(got[i] - ref[i]));
  return m;
}

double max_abs(const std::vector<double>& x) {
  double m = 0;
  for (double v : x) m = std::max(m, std::fabs(v));
  return m;
}

template <class E, int D>
void check_case(const char* dtype, int B, int H, int T, bool causal, unsigned seed) {
  std::mt19937 rng(seed);
  Case<E> c{B, H, T, D, causal, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}};
  const size_t n = static_cast<size_t>(B) * H * T * D;
  fill(c.q, n, rng, 1.0f);
  fill(c.k, n, rng, 1.0f);
  fill(c.v, n, rng, 1.0f);
  fill(c.dout, n, rng, 1.0f);
  c.in = Layout{static_cast<int64_t>(T) * H * D, D, static_cast<int64_t>(H) * D};  // (B, T, H, D) storage
  run_kernels<E, D>(c);
  const Reference exact = reference<E, double>(c, false);
  const Reference lowp = reference<E, float>(c, true);

  char name[160];
  std::snprintf(name, sizeof(name), "%s D=%d B=%d H=%d T=%d %s", dtype, D, B, H, T, causal ? "causal" : "full");
  std::vector<double> lse(c.lse.begin(), c.lse.end());
  const double lse_err = max_err_d(lse, exact.lse);
  CHECK_MSG(lse_err <= 1e-3 * std::max(1.0, max_abs(exact.lse)), std::string(name) + ": lse error " +
                                                                      std::to_string(lse_err));
  const attn::Strides in{c.in.b, c.in.h, c.in.t};
  const attn::Strides contiguous{static_cast<int64_t>(H) * T * D, static_cast<int64_t>(T) * D, D};
  const int64_t bad = first_bad_delta<E, D>(c.delta, c.o.data(), contiguous, c.dout.data(), in, B, H, T);
  CHECK_MSG(bad < 0, std::string(name) + ": delta of row " + std::to_string(bad) + " off its float64 value");
  const struct {
    const char* what;
    const std::vector<E>& got;
    const std::vector<double>& exact;
    const std::vector<double>& lowp;
  } outputs[] = {{"o", c.o, exact.o, lowp.o},
                 {"dq", c.dq, exact.dq, lowp.dq},
                 {"dk", c.dk, exact.dk, lowp.dk},
                 {"dv", c.dv, exact.dv, lowp.dv}};
  for (const auto& out : outputs) {
    const double ours = max_err(out.got, out.exact);
    const double plain = max_err_d(out.lowp, out.exact);
    // The flash-attention rule, with a floor of one rounding step at the inputs' scale (1) or the output's,
    // for outputs that the plain computation gets exactly (T = 1: dq is exactly 0, while the kernel's
    // delta = rowsum(dO * O) reads the rounded O, as flash-attention's does).
    const double eps = std::is_same<E, Bf16>::value ? 0x1p-8 : 0x1p-11;
    const double bound = 2 * plain + eps * std::max(1.0, max_abs(out.exact));
    CHECK_MSG(ours <= bound, std::string(name) + ": " + out.what + " max error " + std::to_string(ours) +
                                 " > bound " + std::to_string(bound) + " (plain low precision " +
                                 std::to_string(plain) + ")");
  }
}

// A (B, H, T, D) tensor stored in (B, T, H, D) order with `pad` nan elements after each time step (a read past a
// row's end gets nan), its first element `shift` elements past a 16-byte boundary.
template <class E>
struct Stored {
  std::vector<E> buf;
  const E* data;
  attn::Strides s;
};

template <class E>
Stored<E> store_bthd(const std::vector<E>& bhtd, int B, int H, int T, int D, int pad, int shift) {
  Stored<E> st;
  const int64_t t_stride = static_cast<int64_t>(H) * D + pad;
  st.s = attn::Strides{T * t_stride, D, t_stride};
  st.buf.assign(static_cast<size_t>(B * st.s.b + shift + 16), from_f<E>(NAN));
  const size_t lead = (16 - reinterpret_cast<uintptr_t>(st.buf.data()) % 16) % 16 / sizeof(E);
  E* base = st.buf.data() + lead + shift;
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int t = 0; t < T; ++t)
        for (int d = 0; d < D; ++d)
          base[b * st.s.b + h * st.s.h + t * st.s.t + d] = bhtd[((static_cast<size_t>(b) * H + h) * T + t) * D + d];
  st.data = base;
  return st;
}

// delta on its own, for O and dO with every row 16-byte aligned (the vector loads); both shifted by one element
// with a time stride of 1 mod 8 elements (one row in eight aligned: both paths within a warp); and only dO so
// (a kernel that checked only O's alignment would make a misaligned vector load). Each against float64, and all
// three bitwise equal (both paths add the same products in the same order). Then the check itself: a delta
// missing one lane's eight products must fail it.
template <class E, int D>
void check_delta(const char* dtype, int B, int H, int T, unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<E> o, dout;
  const size_t n = static_cast<size_t>(B) * H * T * D;
  fill(o, n, rng, 1.0f);
  fill(dout, n, rng, 1.0f);
  char name[120];
  std::snprintf(name, sizeof(name), "delta %s D=%d B=%d H=%d T=%d", dtype, D, B, H, T);
  const struct {
    const char* what;
    int o_pad, o_shift, do_pad, do_shift;
  } layouts[] = {{"aligned", 8, 0, 8, 0}, {"misaligned", 9, 1, 9, 1}, {"dO misaligned", 8, 0, 9, 1}};
  std::vector<float> first;
  for (const auto& l : layouts) {
    const Stored<E> so = store_bthd(o, B, H, T, D, l.o_pad, l.o_shift);
    const Stored<E> sd = store_bthd(dout, B, H, T, D, l.do_pad, l.do_shift);
    attn::Params p{};
    p.o = so.data;
    p.dout = sd.data;
    p.so = so.s;
    p.sdo = sd.s;
    p.heads = H;
    p.seq = T;
    const std::vector<float> got = run_delta<E, D>(p, B, H);
    const std::string what = std::string(name) + " (" + l.what + ")";
    const int64_t bad = first_bad_delta<E, D>(got, so.data, so.s, sd.data, sd.s, B, H, T);
    CHECK_MSG(bad < 0, what + ": row " + std::to_string(bad) + " off its float64 value");
    if (first.empty()) {
      first = got;
      std::vector<float> broken = got;  // lane 1's columns [kPer, 2 kPer) of the middle row left out
      const int64_t row = static_cast<int64_t>(got.size() / 2), bh = row / T, t = row % T;
      constexpr int kPer = attn::DeltaShape<E, D>::kPerLane;
      for (int d = kPer; d < 2 * kPer; ++d) {
        const int64_t at_o = bh / H * so.s.b + bh % H * so.s.h + t * so.s.t + d;
        const int64_t at_d = bh / H * sd.s.b + bh % H * sd.s.h + t * sd.s.t + d;
        broken[row] -= to_f<E>(so.data[at_o]) * to_f<E>(sd.data[at_d]);
      }
      const int64_t caught = first_bad_delta<E, D>(broken, so.data, so.s, sd.data, sd.s, B, H, T);
      CHECK_MSG(caught == row, what + ": the float64 check misses a delta without one lane's products");
    } else {
      CHECK_MSG(std::memcmp(got.data(), first.data(), got.size() * sizeof(float)) == 0,
                what + ": not bitwise equal to the aligned rows' delta");
    }
  }
}

TEST_CASE(attention_delta) {
  check_delta<Bf16, 64>("bf16", 2, 3, 37, 301);
  check_delta<Half, 64>("fp16", 1, 2, 16, 302);   // whole blocks of rows only
  check_delta<Bf16, 128>("bf16", 1, 3, 9, 303);   // a second block with one row
  check_delta<Half, 128>("fp16", 2, 1, 1, 304);
}

TEST_CASE(attention_bf16_head_dim_64) {
  const int seqs[] = {1, 17, 64, 65, 130};
  unsigned seed = 1;
  for (int T : seqs) {
    for (bool causal : {true, false}) check_case<Bf16, 64>("bf16", T == 130 ? 1 : 2, T == 1 ? 1 : 3, T, causal, seed++);
  }
}

TEST_CASE(attention_fp16_head_dim_64) {
  check_case<Half, 64>("fp16", 2, 2, 77, true, 101);
  check_case<Half, 64>("fp16", 1, 1, 129, false, 102);
}

TEST_CASE(attention_head_dim_128) {
  check_case<Bf16, 128>("bf16", 1, 2, 97, true, 201);
  check_case<Half, 128>("fp16", 1, 1, 33, false, 202);
}

