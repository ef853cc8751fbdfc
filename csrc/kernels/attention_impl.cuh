// Causal (or full) flash attention on the tensor cores: the per-block bodies of the forward, dK/dV and dQ
// kernels, written against a small portability layer so that the same code runs on a GPU (attention.cu, where
// the layer is mma.sync PTX and warp shuffles) and on a CPU warp emulator (tests/cpp/test_attention_emu.cpp,
// where each thread of a block is an OS thread), which checks the index arithmetic, masking and online softmax
// on machines without a GPU.
//
// The including file defines, in namespace gpt2fast::kernels::attn_port, before including this header:
//   G2F_ATTN_FN                                   function qualifier (__device__ __forceinline__ / inline)
//   float shfl_xor(float v, int lane_mask)        value of lane (lane ^ lane_mask) of the same warp
//   void sync_block()                             barrier over the block's kThreads threads
//   template <class E> void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1)
//                                                 c += A (16x16, row) * B (16x8, col), E = fp16 or bf16
//   float exp2(float), float log2(float)
//   template <class E> float to_float(E), template <class E> uint32_t pack2(float lo, float hi)
//   uint32_t load_u32(const void* p), void store_u32(void* p, uint32_t w)   4-byte aligned accesses
//   void load16(const void* p, uint32_t (&w)[4])   one 16-byte load (LDG.128) from a 16-byte aligned address
//
// Fragments follow the PTX ISA's layout for mma.m16n8k16 with 16-bit inputs, lane = 4 * g + t (g = lane / 4,
// t = lane % 4), each 32-bit register holding two consecutive elements, the lower index in the low half:
//   A (16 x 16, row major): a[0] = (row g, cols 2t, 2t+1), a[1] = (row g+8, cols 2t..), a[2] = (row g, cols
//                           2t+8..), a[3] = (row g+8, cols 2t+8..)
//   B (16 x 8, "col"):      b0 = (rows 2t, 2t+1; col g), b1 = (rows 2t+8, 2t+9; col g)
//   C (16 x 8, fp32):       c[0], c[1] = (row g, cols 2t, 2t+1), c[2], c[3] = (row g+8, cols 2t, 2t+1)
// Two C tiles side by side (cols 0-7 and 8-15) hold exactly the elements of one A fragment (FlashAttention-2's
// trick): P = softmax(S) goes from the S accumulators to the P @ V operand without touching shared memory.
//
// Tiles: a block is 4 warps; a warp owns 16 rows (queries in the forward and dQ kernels, keys in the dK/dV
// kernel), a block 64. The operand that the mma wants as "B with k along rows" (V in P @ V, dO in P^T dO, Q in
// dS^T Q, K in dS K) is stored transposed in shared memory so that each lane's pair of elements is one 32-bit
// word. Rows are padded by 8 elements (16 bytes) so that the 8 x 4 lane pattern of a fragment load hits 32
// different banks.
//
// Scores are kept in log2 units: s2 = (q . k) * scale * log2(e), so that the softmax uses exp2. The forward
// saves lse = logsumexp of the natural-unit scores per row (fp32); the backward recomputes P from it.
#pragma once

#include <cstdint>
#include <cstring>

namespace gpt2fast {
namespace kernels {
namespace attn {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRowsPerWarp = 16;
constexpr int kBlockRows = kWarps * kRowsPerWarp;  // 64 rows of the "owned" side per block
constexpr int kPad = 8;                            // elements of padding per shared-memory row
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -__builtin_huge_valf();
constexpr float kPosInf = __builtin_huge_valf();

// Element strides (the head dimension has stride 1) of a (B, H, T, D) tensor.
struct Strides {
  int64_t b, h, t;
};

struct Params {
  const void* q;
  const void* k;
  const void* v;
  const void* o;   // forward output (written by the forward, read by the backward's delta)
  const void* dout;
  void* out;       // forward: o; backward: dq (dQ kernel) -- see the launchers
  void* dk;
  void* dv;
  float* lse;      // (B * H, T): natural-log logsumexp of each query row's scores
  float* delta;    // (B * H, T): rowsum(dO * O)
  Strides sq, sk, sv, so, sdo, sout, sdk, sdv;
  int heads;
  int seq;
  float scale;     // softmax scale (1 / sqrt(D))
  bool causal;
};

// Sixteen bytes, the unit of every global <-> shared copy (16-byte aligned on both sides).
struct alignas(16) Chunk {
  uint32_t w[4];
};

// A Chunk read from global memory through the port, where the emulator checks the 16-byte alignment that the GPU
// demands. (load_tile's copies stay plain Chunk reads: routing them through the port cost the forward kernel 18
// registers at sm_80.)
G2F_ATTN_FN Chunk load_chunk(const void* p) {
  Chunk c;
  attn_port::load16(p, c.w);
  return c;
}

// Elements of a row-major (rows x d) shared-memory tile, and of the transposed (d x rows) one, padded rows.
#ifdef __CUDACC__
#define G2F_ATTN_CONSTEXPR __host__ __device__ constexpr
#else
#define G2F_ATTN_CONSTEXPR constexpr
#endif
G2F_ATTN_CONSTEXPR int tile_elements(int rows, int d) { return rows * (d + kPad); }
G2F_ATTN_CONSTEXPR int transposed_elements(int rows, int d) { return d * (rows + kPad); }

// Where element (d, r) of a transposed (d x rows) tile lives. Its 32-bit words (pairs r, r + 1) are XOR-swizzled
// by d / 8: a warp storing a tile transposed writes 8 (rows = 64) or 16 chunks of the same source rows, i.e.
// the same column r of rows d that are 8 apart, which the padding alone maps to one bank (8 * 36 words = 0 mod
// 32). The swizzle moves each such row's word by 4 (d / 8 mod rows / 8) words, spreading those stores over the
// banks, while the fragment loads, which read 8 rows d of one group of 8 at words 4 g + t, keep one XOR
// constant per load and stay conflict-free. The swizzled word stays inside the row's rows / 2 data words.
G2F_ATTN_FN int transposed_index(int rows, int d, int r) {
  const int word = (r / 2) ^ ((d / 8) % (rows / 8) * 4);
  return d * (rows + kPad) + 2 * word + (r & 1);
}

// Hands out consecutive regions of a block's shared memory (every region a multiple of 16 bytes long).
struct SmemCursor {
  unsigned char* next;
  template <class T>
  G2F_ATTN_FN T* take(int count) {
    T* region = reinterpret_cast<T*>(next);
    next += count * static_cast<int>(sizeof(T));
    return region;
  }
};

// Who this thread is: its warp, its lane's group g and index t within the group (lane = 4 g + t), and the
// batch and head of block row bh.
struct Coords {
  int warp, g, t, b, h;
};

G2F_ATTN_FN Coords coords_of(const Params& p, int bh, int tid) {
  return {tid / 32, (tid % 32) / 4, tid % 4, bh / p.heads, bh % p.heads};
}

template <class E>
G2F_ATTN_FN const E* row_ptr(const void* base, const Strides& s, int b, int h, int64_t t) {
  return static_cast<const E*>(base) + b * s.b + h * s.h + t * s.t;
}

template <class E>
G2F_ATTN_FN E* row_ptr_mut(void* base, const Strides& s, int b, int h, int64_t t) {
  return static_cast<E*>(base) + b * s.b + h * s.h + t * s.t;
}

// Copies rows [row0, row0 + n_rows) of a (T, D) slice into shared memory, zero rows past the sequence end:
// row-major into `rm` (row stride D + kPad) when not null, and transposed into `tr` (D x n_rows, laid out by
// transposed_index) when not null. Every thread of the block takes part.
template <class E, int D>
G2F_ATTN_FN void load_tile(const void* base, const Strides& s, int b, int h, int row0, int n_rows, int seq,
                           E* rm, E* tr, int tid) {
  constexpr int kChunksPerRow = D * static_cast<int>(sizeof(E)) / 16;
  constexpr int kPerChunk = 16 / static_cast<int>(sizeof(E));
  for (int i = tid; i < n_rows * kChunksPerRow; i += kThreads) {
    const int r = i / kChunksPerRow, c = i % kChunksPerRow;
    Chunk chunk{{0u, 0u, 0u, 0u}};
    if (row0 + r < seq) chunk = reinterpret_cast<const Chunk*>(row_ptr<E>(base, s, b, h, row0 + r))[c];
    if (rm) *reinterpret_cast<Chunk*>(rm + r * (D + kPad) + c * kPerChunk) = chunk;
    if (tr) {
      E elems[kPerChunk];
      memcpy(elems, &chunk, 16);
      for (int e = 0; e < kPerChunk; ++e) tr[transposed_index(n_rows, c * kPerChunk + e, r)] = elems[e];
    }
  }
}

// The 32-bit word holding elements (row, col) and (row, col + 1) of a shared-memory matrix of row stride `ld`.
template <class E>
G2F_ATTN_FN uint32_t word_at(const E* base, int ld, int row, int col) {
  return attn_port::load_u32(base + row * ld + col);
}

// A fragments of 16 rows x D columns of a row-major shared-memory tile, one per 16 columns.
template <class E, int D>
G2F_ATTN_FN void load_a_fragments(const E* tile, int row0, int g, int t, uint32_t (&a)[D / 16][4]) {
  constexpr int ld = D + kPad;
#pragma unroll
  for (int kb = 0; kb < D / 16; ++kb) {
    a[kb][0] = word_at(tile, ld, row0 + g, kb * 16 + 2 * t);
    a[kb][1] = word_at(tile, ld, row0 + g + 8, kb * 16 + 2 * t);
    a[kb][2] = word_at(tile, ld, row0 + g, kb * 16 + 2 * t + 8);
    a[kb][3] = word_at(tile, ld, row0 + g + 8, kb * 16 + 2 * t + 8);
  }
}

// acc[j] (16 x 8 tile j of a 16 x N product) += A (16 x D, fragments) times X^T, where X is a row-major
// shared-memory tile (N rows x D, row stride D + kPad): B[k][n] = X[n][k], one 32-bit word per lane per k16.
template <class E, int D, int N>
G2F_ATTN_FN void mma_a_times_rows_t(const uint32_t (&a)[D / 16][4], const E* x, int g, int t, float (&acc)[N / 8][4]) {
  constexpr int ld = D + kPad;
#pragma unroll
  for (int j = 0; j < N / 8; ++j) {
#pragma unroll
    for (int kb = 0; kb < D / 16; ++kb) {
      const uint32_t b0 = word_at(x, ld, j * 8 + g, kb * 16 + 2 * t);
      const uint32_t b1 = word_at(x, ld, j * 8 + g, kb * 16 + 2 * t + 8);
      attn_port::mma16816<E>(acc[j], a[kb], b0, b1);
    }
  }
}

// acc[dn] (16 x 8 tile dn of a 16 x D product) += P (16 x N, held as C tiles p[N / 8][4]) times Y, where Y
// (N x D) is stored transposed in shared memory: element (n, d) at yt[transposed_index(N, d, n)].
template <class E, int D, int N>
G2F_ATTN_FN void mma_c_times_transposed(const float (&p)[N / 8][4], const E* yt, int g, int t, float (&acc)[D / 8][4]) {
#pragma unroll
  for (int kk = 0; kk < N / 16; ++kk) {
    const uint32_t a[4] = {attn_port::pack2<E>(p[2 * kk][0], p[2 * kk][1]),
                           attn_port::pack2<E>(p[2 * kk][2], p[2 * kk][3]),
                           attn_port::pack2<E>(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                           attn_port::pack2<E>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      // transposed_index(N, 8 dn + g, 16 kk + 2 t [+ 8]) spelled so that only g and t are run-time values (the
      // swizzle of rows 8 dn..8 dn + 7 is one constant with clear low bits, so (8 kk ^ swz) + t is the word):
      // the unrolled loads are one base address plus constant offsets, as without the swizzle.
      const int swz = (dn % (N / 8)) * 4;
      const E* row = yt + (dn * 8 + g) * (N + kPad) + 2 * t;
      const uint32_t b0 = attn_port::load_u32(row + 2 * ((kk * 8) ^ swz));
      const uint32_t b1 = attn_port::load_u32(row + 2 * ((kk * 8 + 4) ^ swz));
      attn_port::mma16816<E>(acc[dn], a, b0, b1);
    }
  }
}

template <int N>
G2F_ATTN_FN void zero(float (&acc)[N][4]) {
#pragma unroll
  for (int j = 0; j < N; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
}

// Writes 16 rows x D of C tiles (times `scale`, per row half) to global rows row0 + g and row0 + g + 8.
template <class E, int D>
G2F_ATTN_FN void store_rows(const float (&acc)[D / 8][4], void* base, const Strides& s, int b, int h, int row0,
                            int seq, int g, int t, float scale_lo, float scale_hi) {
  for (int half = 0; half < 2; ++half) {
    const int row = row0 + g + 8 * half;
    if (row >= seq) continue;
    const float sc = half ? scale_hi : scale_lo;
    E* dst = row_ptr_mut<E>(base, s, b, h, row);
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      const uint32_t w = attn_port::pack2<E>(acc[dn][2 * half] * sc, acc[dn][2 * half + 1] * sc);
      attn_port::store_u32(dst + dn * 8 + 2 * t, w);
    }
  }
}

G2F_ATTN_FN bool visible(int query, int key, int seq, bool causal) {
  return query < seq && key < seq && (!causal || key <= query);
}

// ------------------------------------------------------------------------------------------ forward
template <class E, int D>
struct ForwardShape {
  static constexpr int kKeys = 64;  // keys per tile
  // Q (64 x D), K (keys x D), V transposed (D x keys)
  static constexpr int kSmemBytes =
      (2 * tile_elements(kBlockRows, D) + transposed_elements(kKeys, D)) * static_cast<int>(sizeof(E));
};

// Block (qblock, bh): queries [64 qblock, 64 qblock + 64) of batch*head bh. Writes o and lse.
template <class E, int D>
G2F_ATTN_FN void forward_block(const Params& p, int qblock, int bh, int tid, unsigned char* smem) {
  using Shape = ForwardShape<E, D>;
  constexpr int kKeys = Shape::kKeys;
  SmemCursor cursor{smem};
  E* qs = cursor.take<E>(tile_elements(kBlockRows, D));
  E* ks = cursor.take<E>(tile_elements(kKeys, D));
  E* vt = cursor.take<E>(transposed_elements(kKeys, D));
  const auto [warp, g, t, b, h] = coords_of(p, bh, tid);
  const int seq = p.seq, m0 = qblock * kBlockRows;
  const int row_lo = m0 + warp * kRowsPerWarp + g, row_hi = row_lo + 8;
  const float scale2 = p.scale * kLog2e;

  load_tile<E, D>(p.q, p.sq, b, h, m0, kBlockRows, seq, qs, nullptr, tid);
  attn_port::sync_block();
  uint32_t qa[D / 16][4];
  load_a_fragments<E, D>(qs, warp * kRowsPerWarp, g, t, qa);

  float o[D / 8][4];
  zero(o);
  float m_run[2] = {kNegInf, kNegInf};  // running max of s2 per row (lo, hi)
  float l_run[2] = {0.f, 0.f};          // this lane's share of the running sum of exp2(s2 - m_run)
  const int n_end = p.causal ? (m0 + kBlockRows < seq ? m0 + kBlockRows : seq) : seq;
  for (int n0 = 0; n0 < n_end; n0 += kKeys) {
    attn_port::sync_block();  // everyone is done with the previous K and V tiles
    load_tile<E, D>(p.k, p.sk, b, h, n0, kKeys, seq, ks, nullptr, tid);
    load_tile<E, D>(p.v, p.sv, b, h, n0, kKeys, seq, nullptr, vt, tid);
    attn_port::sync_block();

    float s[kKeys / 8][4];
    zero(s);
    mma_a_times_rows_t<E, D, kKeys>(qa, ks, g, t, s);
    float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
    for (int j = 0; j < kKeys / 8; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int key = n0 + j * 8 + 2 * t + (i & 1);
        const int query = i < 2 ? row_lo : row_hi;
        // Rows past the end are computed (their keys are visible) but never written.
        const bool ok = key < seq && (!p.causal || key <= query);
        s[j][i] = ok ? s[j][i] * scale2 : kNegInf;
        mx[i / 2] = s[j][i] > mx[i / 2] ? s[j][i] : mx[i / 2];
      }
    }
    float alpha[2], base[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float m = mx[r];
      float other = attn_port::shfl_xor(m, 1);
      m = other > m ? other : m;
      other = attn_port::shfl_xor(m, 2);
      m = other > m ? other : m;
      base[r] = m == kNegInf ? 0.f : m;  // a row with nothing visible yet: exp2(-inf - 0) = 0, not nan
      alpha[r] = attn_port::exp2(m_run[r] - base[r]);
      m_run[r] = m;
      l_run[r] *= alpha[r];
    }
#pragma unroll
    for (int j = 0; j < kKeys / 8; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        s[j][i] = attn_port::exp2(s[j][i] - base[i / 2]);
        l_run[i / 2] += s[j][i];
      }
    }
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      o[dn][0] *= alpha[0];
      o[dn][1] *= alpha[0];
      o[dn][2] *= alpha[1];
      o[dn][3] *= alpha[1];
    }
    mma_c_times_transposed<E, D, kKeys>(s, vt, g, t, o);
  }

  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += attn_port::shfl_xor(l, 1);
    l += attn_port::shfl_xor(l, 2);
    inv[r] = l > 0.f ? 1.f / l : 0.f;
    const int row = r ? row_hi : row_lo;
    if (t == 0 && row < seq) {
      p.lse[static_cast<int64_t>(bh) * seq + row] =
          l > 0.f ? (m_run[r] + attn_port::log2(l)) * kLn2 : kNegInf;
    }
  }
  store_rows<E, D>(o, p.out, p.sout, b, h, m0 + warp * kRowsPerWarp, seq, g, t, inv[0], inv[1]);
}

// ------------------------------------------------------------------------------------------ backward
// delta[bh, row] = sum_d dO[row, d] * O[row, d] in fp32. A row belongs to a group of D / 8 consecutive lanes (8
// at D = 64: four rows per warp), lane j of the group taking columns [8 j, 8 j + 8) of the row of O and of dO:
// one 16-byte load per tensor and lane, and the group's loads together are the row's contiguous 128 or 256 bytes
// (coalesced). A lane adds its eight products in column order, then the group adds the lanes' sums in a xor
// butterfly: a fixed order for every row and launch, hence deterministic. Rows that are not 16-byte aligned
// (the launcher refuses them, but the body does not rely on it) take the same elements one at a time, in the
// same order, so both paths give bitwise the same delta. The products of two 16-bit floats are exact in fp32
// (short of underflow), so the GPU's fused multiply-adds round exactly as the emulator's separate ones do.
template <class E, int D>
struct DeltaShape {
  static constexpr int kPerLane = 16 / static_cast<int>(sizeof(E));
  static constexpr int kLanesPerRow = D / kPerLane;
  static constexpr int kRowsPerBlock = kThreads / kLanesPerRow;
  static_assert(D % kPerLane == 0 && 32 % kLanesPerRow == 0, "a row's lanes are an aligned part of one warp");
};

// Block (rblock, bh) of kThreads threads: rows [kRowsPerBlock rblock, kRowsPerBlock (rblock + 1)) of bh. Every
// lane, even one of a row past the end (which loads and writes nothing), takes part in every shuffle.
template <class E, int D>
G2F_ATTN_FN void delta_block(const Params& p, int rblock, int bh, int tid) {
  using Shape = DeltaShape<E, D>;
  constexpr int kPer = Shape::kPerLane;
  const int b = bh / p.heads, h = bh % p.heads;
  const int row = rblock * Shape::kRowsPerBlock + tid / Shape::kLanesPerRow;
  const int part = tid % Shape::kLanesPerRow;
  float acc = 0.f;
  if (row < p.seq) {
    const E* o = row_ptr<E>(p.o, p.so, b, h, row) + part * kPer;
    const E* d = row_ptr<E>(p.dout, p.sdo, b, h, row) + part * kPer;
    E oe[kPer], de[kPer];
    if (((reinterpret_cast<uintptr_t>(o) | reinterpret_cast<uintptr_t>(d)) & 15u) == 0) {
      const Chunk oc = load_chunk(o), dc = load_chunk(d);
      memcpy(oe, &oc, 16);
      memcpy(de, &dc, 16);
    } else {
#pragma unroll
      for (int e = 0; e < kPer; ++e) {
        oe[e] = o[e];
        de[e] = d[e];
      }
    }
#pragma unroll
    for (int e = 0; e < kPer; ++e) acc += attn_port::to_float(oe[e]) * attn_port::to_float(de[e]);
  }
#pragma unroll
  for (int m = Shape::kLanesPerRow / 2; m > 0; m /= 2) acc += attn_port::shfl_xor(acc, m);
  if (row < p.seq && part == 0) p.delta[static_cast<int64_t>(bh) * p.seq + row] = acc;
}

template <class E, int D>
struct BackwardShape {
  // The other side's tile: 64 rows for head dim 64; 32 for 128, which keeps the accumulators in registers.
  static constexpr int kOther = D <= 64 ? 64 : 32;
  // dK/dV kernel: K and V (64 x D) once; per query tile Q and dO row-major and transposed, lse and delta.
  static constexpr int kDkdvSmemBytes =
      (2 * tile_elements(kBlockRows, D) + 2 * tile_elements(kOther, D) + 2 * transposed_elements(kOther, D)) *
          static_cast<int>(sizeof(E)) +
      2 * kOther * static_cast<int>(sizeof(float));
  // dQ kernel: Q and dO (64 x D) once; per key tile K and V row-major, K transposed.
  static constexpr int kDqSmemBytes =
      (2 * tile_elements(kBlockRows, D) + 2 * tile_elements(kOther, D) + transposed_elements(kOther, D)) *
      static_cast<int>(sizeof(E));
};

// Block (kblock, bh): keys [64 kblock, 64 kblock + 64) of bh; walks the query tiles that can see them and
// accumulates dK and dV in registers. Writes dk, dv.
template <class E, int D>
G2F_ATTN_FN void dkdv_block(const Params& p, int kblock, int bh, int tid, unsigned char* smem) {
  using Shape = BackwardShape<E, D>;
  constexpr int kQ = Shape::kOther;
  SmemCursor cursor{smem};
  E* ks = cursor.take<E>(tile_elements(kBlockRows, D));
  E* vs = cursor.take<E>(tile_elements(kBlockRows, D));
  E* qs = cursor.take<E>(tile_elements(kQ, D));
  E* dos = cursor.take<E>(tile_elements(kQ, D));
  E* qt = cursor.take<E>(transposed_elements(kQ, D));
  E* dot = cursor.take<E>(transposed_elements(kQ, D));
  float* lse2s = cursor.take<float>(kQ);
  float* deltas = cursor.take<float>(kQ);
  const auto [warp, g, t, b, h] = coords_of(p, bh, tid);
  const int seq = p.seq, n0 = kblock * kBlockRows;
  const int key_lo = n0 + warp * kRowsPerWarp + g, key_hi = key_lo + 8;
  const float scale2 = p.scale * kLog2e;

  load_tile<E, D>(p.k, p.sk, b, h, n0, kBlockRows, seq, ks, nullptr, tid);
  load_tile<E, D>(p.v, p.sv, b, h, n0, kBlockRows, seq, vs, nullptr, tid);
  attn_port::sync_block();
  uint32_t ka[D / 16][4], va[D / 16][4];
  load_a_fragments<E, D>(ks, warp * kRowsPerWarp, g, t, ka);
  load_a_fragments<E, D>(vs, warp * kRowsPerWarp, g, t, va);

  float dk[D / 8][4], dv[D / 8][4];
  zero(dk);
  zero(dv);
  // Causal: queries before n0 see none of these keys (n0 is a multiple of kQ, as kQ divides 64).
  for (int m0 = p.causal ? n0 : 0; m0 < seq; m0 += kQ) {
    attn_port::sync_block();  // everyone is done with the previous query tile
    load_tile<E, D>(p.q, p.sq, b, h, m0, kQ, seq, qs, qt, tid);
    load_tile<E, D>(p.dout, p.sdo, b, h, m0, kQ, seq, dos, dot, tid);
    for (int i = tid; i < kQ; i += kThreads) {
      const bool in = m0 + i < seq;
      const int64_t at = static_cast<int64_t>(bh) * seq + m0 + i;
      lse2s[i] = in ? p.lse[at] * kLog2e : kPosInf;
      deltas[i] = in ? p.delta[at] : 0.f;
    }
    attn_port::sync_block();

    float pt[kQ / 8][4];  // P^T: rows = this warp's keys, cols = the tile's queries
    zero(pt);
    mma_a_times_rows_t<E, D, kQ>(ka, qs, g, t, pt);
    float dpt[kQ / 8][4];  // dP^T = V dO^T
    zero(dpt);
    mma_a_times_rows_t<E, D, kQ>(va, dos, g, t, dpt);
#pragma unroll
    for (int j = 0; j < kQ / 8; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int col = j * 8 + 2 * t + (i & 1);
        const int key = i < 2 ? key_lo : key_hi;
        const float pv = visible(m0 + col, key, seq, p.causal) ? attn_port::exp2(pt[j][i] * scale2 - lse2s[col])
                                                                : 0.f;
        pt[j][i] = pv;
        dpt[j][i] = pv * (dpt[j][i] - deltas[col]);  // dS^T
      }
    }
    mma_c_times_transposed<E, D, kQ>(pt, dot, g, t, dv);   // dV += P^T dO
    mma_c_times_transposed<E, D, kQ>(dpt, qt, g, t, dk);   // dK += dS^T Q (scaled at the end)
  }
  store_rows<E, D>(dk, p.dk, p.sdk, b, h, n0 + warp * kRowsPerWarp, seq, g, t, p.scale, p.scale);
  store_rows<E, D>(dv, p.dv, p.sdv, b, h, n0 + warp * kRowsPerWarp, seq, g, t, 1.f, 1.f);
}

// Block (qblock, bh): queries [64 qblock, 64 qblock + 64) of bh; walks the key tiles they see and accumulates
// dQ in registers. Writes p.out (= dq).
template <class E, int D>
G2F_ATTN_FN void dq_block(const Params& p, int qblock, int bh, int tid, unsigned char* smem) {
  using Shape = BackwardShape<E, D>;
  constexpr int kK = Shape::kOther;
  SmemCursor cursor{smem};
  E* qs = cursor.take<E>(tile_elements(kBlockRows, D));
  E* dos = cursor.take<E>(tile_elements(kBlockRows, D));
  E* ks = cursor.take<E>(tile_elements(kK, D));
  E* vs = cursor.take<E>(tile_elements(kK, D));
  E* kt = cursor.take<E>(transposed_elements(kK, D));
  const auto [warp, g, t, b, h] = coords_of(p, bh, tid);
  const int seq = p.seq, m0 = qblock * kBlockRows;
  const int row_lo = m0 + warp * kRowsPerWarp + g, row_hi = row_lo + 8;
  const float scale2 = p.scale * kLog2e;

  load_tile<E, D>(p.q, p.sq, b, h, m0, kBlockRows, seq, qs, nullptr, tid);
  load_tile<E, D>(p.dout, p.sdo, b, h, m0, kBlockRows, seq, dos, nullptr, tid);
  attn_port::sync_block();
  uint32_t qa[D / 16][4], doa[D / 16][4];
  load_a_fragments<E, D>(qs, warp * kRowsPerWarp, g, t, qa);
  load_a_fragments<E, D>(dos, warp * kRowsPerWarp, g, t, doa);
  float lse2[2], delta[2];
  for (int r = 0; r < 2; ++r) {
    const int row = r ? row_hi : row_lo;
    const int64_t at = static_cast<int64_t>(bh) * seq + row;
    lse2[r] = row < seq ? p.lse[at] * kLog2e : kPosInf;
    delta[r] = row < seq ? p.delta[at] : 0.f;
  }

  float dq[D / 8][4];
  zero(dq);
  const int n_end = p.causal ? (m0 + kBlockRows < seq ? m0 + kBlockRows : seq) : seq;
  for (int n0 = 0; n0 < n_end; n0 += kK) {
    attn_port::sync_block();
    load_tile<E, D>(p.k, p.sk, b, h, n0, kK, seq, ks, kt, tid);
    load_tile<E, D>(p.v, p.sv, b, h, n0, kK, seq, vs, nullptr, tid);
    attn_port::sync_block();

    float s[kK / 8][4];
    zero(s);
    mma_a_times_rows_t<E, D, kK>(qa, ks, g, t, s);
    float dp[kK / 8][4];  // dP = dO V^T
    zero(dp);
    mma_a_times_rows_t<E, D, kK>(doa, vs, g, t, dp);
#pragma unroll
    for (int j = 0; j < kK / 8; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int key = n0 + j * 8 + 2 * t + (i & 1);
        const int query = i < 2 ? row_lo : row_hi;
        const float pv = visible(query, key, seq, p.causal) ? attn_port::exp2(s[j][i] * scale2 - lse2[i / 2]) : 0.f;
        s[j][i] = pv * (dp[j][i] - delta[i / 2]);  // dS
      }
    }
    mma_c_times_transposed<E, D, kK>(s, kt, g, t, dq);  // dQ += dS K (scaled at the end)
  }
  store_rows<E, D>(dq, p.out, p.sout, b, h, m0 + warp * kRowsPerWarp, seq, g, t, p.scale, p.scale);
}

}  // namespace attn
}  // namespace kernels
}  // namespace gpt2fast
