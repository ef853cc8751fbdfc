// A CPU emulator of the slice of CUDA that gpt2fast's kernels use, so that g++ compiles csrc/kernels/*.cu
// (layer_norm, bias_gelu, cross_entropy, adamw) unchanged and the tests run their real source on machines
// without a GPU. This directory is put first on the include path: cuda_runtime.h, cuda_runtime_api.h,
// cuda_fp16.h and cuda_bf16.h here all lead to this file.
//
// The model: a launch runs its blocks one after another; every thread of a block is an OS thread.
//   __syncthreads       a barrier over the block's threads; it also checks that every thread reached the same
//                       __syncthreads (same source line) and that no thread of the block has exited before it
//                       (both are undefined behaviour in CUDA, and would hang or corrupt on a GPU).
//   __shfl_xor_sync     an exchange through per-warp slots between two barriers over the warp's threads; checks a
//                       full mask, a full warp with no exited lane, and that all lanes are at the same call.
//   __shared__          `static`: one copy per kernel instantiation, shared by the block's threads (blocks never
//                       run at the same time).
//   stragglers          at a block's start and after each __syncthreads, about one warp in four (pseudo-random,
//                       reproducible) waits until all other threads sit in the next __syncthreads: a missing barrier
//                       then lets them overwrite shared memory the straggler has yet to read, and the results show it.
//   dynamic shared      GPT2FAST_DYNAMIC_SHARED: a heap buffer of exactly the launch's byte count, per block,
//                       filled with 0xff (nan) bytes: reading what the block did not write shows, and AddressSanitizer
//                       catches any access past the end.
//   launches            checked as the GPU checks them (block <= 1024 threads, grid limits, dynamic shared memory
//                       <= 48 KiB without an opt-in) and recorded (kernel, grid, block, bytes) for the tests.
//   __half, bf16        storage types with round-to-nearest-even conversions, as cvt.rn does on the GPU.
//   __expf, __fdividef  computed accurately (the GPU's are approximations within a few ulp; __expf keeps the
//                       x * log2(e) rounding of the hardware's ex2-based version).
// Not emulated: warp-synchronous code without __syncwarp, atomics, the GPU's FMA contraction (g++ does not
// contract across the host's x86 ops, so results may differ from a GPU's in the last bits).
#pragma once

#define GPT2FAST_CUDA_EMULATOR 1

#include <math.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <bit>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <source_location>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

// ------------------------------------------------------------------------------------------ qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define GPT2FAST_DYNAMIC_SHARED(T, name) T* const name = ::cuda_emu::dynamic_shared<T>()
#define CUDART_VERSION 0  // no CUDA runtime

// ------------------------------------------------------------------------------------------ vector types
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned int x, y;
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }

// ------------------------------------------------------------------------------------------ 16-bit floats
// Storage only, as cuda_fp16.h / cuda_bf16.h are with __CUDA_NO_HALF_OPERATORS__ and friends (torch's flags).
struct __half {
  uint16_t bits_;
};
struct __nv_bfloat16 {
  uint16_t bits_;
};

inline float __half2float(__half h) { return static_cast<float>(std::bit_cast<_Float16>(h.bits_)); }
inline __half __float2half_rn(float v) {  // round to nearest even, subnormals kept
  return __half{std::bit_cast<uint16_t>(static_cast<_Float16>(v))};
}
inline float __bfloat162float(__nv_bfloat16 b) { return std::bit_cast<float>(static_cast<uint32_t>(b.bits_) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u = std::bit_cast<uint32_t>(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fff};  // nan: the canonical one, as cvt.rn gives
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}

// ------------------------------------------------------------------------------------------ math
inline float __expf(float x) { return exp2f(x * 1.4426950408889634f); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __int_as_float(int i) { return std::bit_cast<float>(i); }
inline int __float_as_int(float f) { return std::bit_cast<int>(f); }
[[noreturn]] inline void __trap() {
  std::fprintf(stderr, "cuda_emu: __trap() reached in a kernel\n");
  std::abort();
}

// CUDA's min/max overloads (device code calls them unqualified, e.g. on int64_t).
#define CUDA_EMU_MIN_MAX(T)                        \
  inline T min(T a, T b) { return b < a ? b : a; } \
  inline T max(T a, T b) { return a < b ? b : a; }
CUDA_EMU_MIN_MAX(int)
CUDA_EMU_MIN_MAX(unsigned int)
CUDA_EMU_MIN_MAX(long)
CUDA_EMU_MIN_MAX(unsigned long)
CUDA_EMU_MIN_MAX(long long)
CUDA_EMU_MIN_MAX(unsigned long long)
#undef CUDA_EMU_MIN_MAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

// ------------------------------------------------------------------------------------------ runtime API
enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotSupported = 801,
};
typedef enum cudaError cudaError_t;

enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
};

struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;

namespace cuda_emu {

struct Device {
  int major, minor, sms;
};
// 0: an H100 (sm_90, 132 SMs); 1: a V100 (sm_70, no bf16); 2: a small sm_80 part with 3 SMs, so that the
// "blocks per SM" sizing of the reductions gives few partial rows.
inline Device g_devices[] = {{9, 0, 132}, {7, 0, 80}, {8, 0, 3}};
inline constexpr int kDevices = 3;
inline int g_current_device = 0;
inline cudaError_t g_last_error = cudaSuccess;
inline constexpr size_t kMaxDynamicShared = 48 * 1024;  // without cudaFuncAttributeMaxDynamicSharedMemorySize

using AnyKernel = void (*)();
struct LaunchRecord {
  AnyKernel kernel;
  dim3 grid, block;
  size_t smem;
};
inline std::vector<LaunchRecord> g_launches;  // every launch since the test last cleared it

}  // namespace cuda_emu

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = cuda_emu::g_last_error;
  cuda_emu::g_last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return cuda_emu::g_last_error; }
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorNotSupported: return "operation not supported";
  }
  return "unknown error";
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = cuda_emu::g_current_device;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= cuda_emu::kDevices) return cudaErrorInvalidDevice;
  cuda_emu::g_current_device = device;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device < 0 || device >= cuda_emu::kDevices) return cudaErrorInvalidDevice;
  const cuda_emu::Device& d = cuda_emu::g_devices[device];
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = static_cast<int>(cuda_emu::kMaxDynamicShared); return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = d.sms; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = d.major; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = d.minor; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t = nullptr) {
  if (bytes) std::memset(p, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemset(void* p, int value, size_t bytes) { return cudaMemsetAsync(p, value, bytes); }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

// ------------------------------------------------------------------------------------------ the block
namespace cuda_emu {

// Where a thread is: the call it waits in (for the checks and for the watchdog's report).
struct Site {
  const char* file = "";
  unsigned line = 0;
  const char* what = "running";
};
inline bool same_call(const Site& a, const Site& b) {
  return a.line == b.line && std::strcmp(a.file, b.file) == 0 && std::strcmp(a.what, b.what) == 0;
}

class Block;
inline thread_local Block* tl_block = nullptr;
inline thread_local int tl_tid = 0;
inline thread_local uint3 tl_thread_idx{0, 0, 0};
inline thread_local uint3 tl_block_idx{0, 0, 0};
inline thread_local dim3 tl_block_dim;
inline thread_local dim3 tl_grid_dim;

class Block {
 public:
  struct SyncCheck {
    Block* block;
    void operator()() noexcept { block->check_sync(); }
  };

  Block(int threads, size_t smem_bytes, uint64_t seed)
      : seed_(seed),
        threads_(threads),
        sync_(threads, SyncCheck{this}),
        sites_(static_cast<size_t>(threads)),
        exited_(static_cast<size_t>(threads)),
        phases_(static_cast<size_t>(threads), 0),
        smem_(static_cast<unsigned char*>(::operator new[](smem_bytes, std::align_val_t{16}))) {
    std::memset(smem_, 0xff, smem_bytes);
    for (int w = 0; w * 32 < threads; ++w) warps_.push_back(std::make_unique<Warp>(std::min(32, threads - 32 * w)));
    for (auto& e : exited_) e.store(false);
  }
  ~Block() { ::operator delete[](smem_, std::align_val_t{16}); }
  Block(const Block&) = delete;
  Block& operator=(const Block&) = delete;

  unsigned char* smem() const { return smem_; }

  void fail(const std::string& message) {
    std::lock_guard<std::mutex> lock(mu_);
    if (error_.empty()) error_ = message;
  }
  std::string error() {
    std::lock_guard<std::mutex> lock(mu_);
    return error_;
  }

  void sync_threads(const std::source_location& where) {
    sites_[tl_tid] = Site{where.file_name(), static_cast<unsigned>(where.line()), "__syncthreads"};
    waiting_.fetch_add(1);
    note_parked();
    sync_.arrive_and_wait();
    sites_[tl_tid].what = "running";
    maybe_straggle();
  }

  // Races on shared memory (a missing __syncthreads) rarely show when every thread runs freely. So at the start
  // and after each __syncthreads about one warp in four (chosen pseudo-randomly, the same in every run) holds back
  // until every other thread has reached the next __syncthreads or exited: the others run ahead into what comes
  // next (overwriting what the stragglers have yet to read), as a slow warp on a GPU would let them.
  void maybe_straggle() {
    if (warps_.size() < 2) return;
    const uint64_t phase = phases_[tl_tid]++;
    if (!straggler(phase, tl_tid / 32)) return;
    int others = threads_;
    for (size_t w = 0; w < warps_.size(); ++w)
      if (straggler(phase, static_cast<int>(w))) others -= warps_[w]->size;
    for (;;) {
      const int seen = parked_.load();
      if (waiting_.load() + exited_count_.load() >= others) return;
      parked_.wait(seen);  // the watchdog of run_grid reports a hang
    }
  }

  template <class T>
  T shuffle(unsigned mask, T value, int src_lane, int width, const std::source_location& where) {
    static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move words of up to 8 bytes");
    const int lane = tl_tid % 32;
    Warp& w = *warps_[tl_tid / 32];
    std::memcpy(&w.slots[lane], &value, sizeof(T));
    const Site site{where.file_name(), static_cast<unsigned>(where.line()), "warp shuffle"};
    sites_[tl_tid] = site;
    w.barrier.arrive_and_wait();
    if (mask != 0xffffffffu || width != 32)
      fail(where_text(site) + ": only full-warp shuffles (mask 0xffffffff, width 32) are emulated");
    if (w.size != 32 || w.exited.load() != 0)
      fail(where_text(site) + ": a full-mask shuffle in a warp with " + std::to_string(w.size - w.exited.load()) +
           " live lanes (undefined: every lane of the mask must take part)");
    const int first = tl_tid - lane;
    if (!same_call(sites_[first], site))
      fail(where_text(site) + ": lanes of one warp in different shuffles (lane 0 at " + where_text(sites_[first]) + ")");
    T out = value;
    if (src_lane >= 0 && src_lane < w.size) std::memcpy(&out, &w.slots[src_lane], sizeof(T));
    w.barrier.arrive_and_wait();
    sites_[tl_tid].what = "running";
    return out;
  }

  // A thread leaves the block: the barriers stop counting it.
  void exit_thread() {
    Warp& w = *warps_[tl_tid / 32];
    sites_[tl_tid].what = "exited";
    exited_[tl_tid].store(true);
    exited_count_.fetch_add(1);
    note_parked();
    w.exited.fetch_add(1);
    sync_.arrive_and_drop();
    w.barrier.arrive_and_drop();
  }

  void note_parked() {
    parked_.fetch_add(1);
    parked_.notify_all();
  }

  bool straggler(uint64_t phase, int warp) const {
    uint64_t z = seed_ + 0x9e3779b97f4a7c15ull * (phase + 1) + 0xbf58476d1ce4e5b9ull * static_cast<uint64_t>(warp + 1);
    z = (z ^ (z >> 31)) * 0x94d049bb133111ebull;
    return ((z ^ (z >> 29)) & 3) == 0;
  }

  std::string report_sites() const {
    std::string out;
    for (int t = 0; t < threads_; ++t) out += "    thread " + std::to_string(t) + ": " + where_text(sites_[t]) + "\n";
    return out;
  }

 private:
  struct Warp {
    explicit Warp(int n) : size(n), barrier(n) {}
    int size;
    std::barrier<> barrier;
    uint64_t slots[32] = {};
    std::atomic<int> exited{0};
  };

  static std::string where_text(const Site& s) {
    return std::string(s.what) + " at " + s.file + ":" + std::to_string(s.line);
  }

  // Runs once per phase of the block barrier, in the last thread to arrive (or leave), before any is released.
  // A phase with no thread in __syncthreads is the block's end: every thread has left.
  void check_sync() {
    if (waiting_.exchange(0) == 0) return;
    int first = -1;
    for (int t = 0; t < threads_; ++t) {
      if (exited_[t].load()) {
        fail("__syncthreads at " + where_text(sites_[first < 0 ? t : first]) + " after thread " + std::to_string(t) +
             " exited (undefined: the whole block must reach every __syncthreads)");
        return;
      }
      if (first < 0) first = t;
      else if (!same_call(sites_[t], sites_[first]))
        fail("threads of one block in different __syncthreads: thread " + std::to_string(first) + " " +
             where_text(sites_[first]) + ", thread " + std::to_string(t) + " " + where_text(sites_[t]));
    }
  }

  uint64_t seed_;
  int threads_;
  std::barrier<SyncCheck> sync_;
  std::atomic<int> waiting_{0};  // threads in the current __syncthreads
  std::atomic<int> exited_count_{0};
  std::atomic<int> parked_{0};  // changes whenever a thread enters __syncthreads or exits: wakes the stragglers
  std::vector<Site> sites_;
  std::vector<std::atomic<bool>> exited_;
  std::vector<uint64_t> phases_;  // per thread: barriers passed
  std::vector<std::unique_ptr<Warp>> warps_;
  unsigned char* smem_;
  std::mutex mu_;
  std::string error_;
};

template <class T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(tl_block->smem());
}

// Seconds a launch may run before the emulator reports where the threads of its current block are and aborts (a
// hang is a bug: a barrier that some threads never reach).
inline constexpr int kWatchdogSeconds = 300;

// Runs the blocks of the grid one after another, each on the same `threads` OS threads (made once per launch);
// stops at the first block in which a check failed and returns cudaErrorLaunchFailure, after printing why.
template <class Body>
cudaError_t run_grid(dim3 grid, dim3 block, size_t smem, const Body& body) {
  const int threads = static_cast<int>(block.x * block.y * block.z);
  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  static uint64_t launches = 0;
  const uint64_t seed = ++launches << 32;
  std::unique_ptr<Block> current = std::make_unique<Block>(threads, smem, seed);
  uint64_t index = 0;
  std::string error;
  // Runs when every thread has left block `index`: records its failure, or sets up the next block.
  auto next_block = [&]() noexcept {
    const std::string e = current->error();
    if (!e.empty()) {
      char where[160];
      std::snprintf(where, sizeof where, "block %llu of grid (%u, %u, %u) x block (%u, %u, %u): ",
                    static_cast<unsigned long long>(index), grid.x, grid.y, grid.z, block.x, block.y, block.z);
      error = where + e;
    }
    ++index;
    current = (index < blocks && error.empty()) ? std::make_unique<Block>(threads, smem, seed + index) : nullptr;
  };
  std::barrier<decltype(next_block)> between_blocks(threads, next_block);
  std::mutex mu;
  std::condition_variable cv;
  int finished = 0;
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads));
  for (int tid = 0; tid < threads; ++tid) {
    pool.emplace_back([&, tid] {
      tl_tid = tid;
      tl_thread_idx = uint3{tid % block.x, (tid / block.x) % block.y, tid / (block.x * block.y)};
      tl_block_dim = block;
      tl_grid_dim = grid;
      for (Block* blk = current.get(); blk != nullptr; blk = current.get()) {
        tl_block = blk;
        tl_block_idx = uint3{static_cast<unsigned>(index % grid.x), static_cast<unsigned>(index / grid.x % grid.y),
                             static_cast<unsigned>(index / grid.x / grid.y)};
        blk->maybe_straggle();
        body();
        blk->exit_thread();
        between_blocks.arrive_and_wait();
      }
      tl_block = nullptr;
      std::lock_guard<std::mutex> lock(mu);
      if (++finished == threads) cv.notify_one();
    });
  }
  {
    std::unique_lock<std::mutex> lock(mu);
    if (!cv.wait_for(lock, std::chrono::seconds(kWatchdogSeconds), [&] { return finished == threads; })) {
      std::fprintf(stderr, "cuda_emu: a launch still running after %d s; the threads of its block %llu:\n%s",
                   kWatchdogSeconds, static_cast<unsigned long long>(index), current->report_sites().c_str());
      std::abort();
    }
  }
  for (auto& t : pool) t.join();
  if (!error.empty()) {
    std::fprintf(stderr, "cuda_emu: %s\n", error.c_str());
    return cudaErrorLaunchFailure;
  }
  return cudaSuccess;
}

inline bool launch_config_ok(dim3 grid, dim3 block, size_t smem) {
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  return threads >= 1 && threads <= 1024 && block.x <= 1024 && block.y <= 1024 && block.z <= 64 && grid.x >= 1 &&
         grid.x <= 0x7fffffffu && grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 && grid.z <= 65535 &&
         smem <= kMaxDynamicShared;
}

// kernel<<<grid, block, smem, stream>>>(args...), run to completion before it returns.
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t, Args... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "a kernel launch passes every parameter");
  g_launches.push_back(LaunchRecord{reinterpret_cast<AnyKernel>(kernel), grid, block, smem});
  if (!launch_config_ok(grid, block, smem)) {
    std::fprintf(stderr, "cuda_emu: invalid launch: grid (%u, %u, %u), block (%u, %u, %u), %zu bytes of shared memory\n",
                 grid.x, grid.y, grid.z, block.x, block.y, block.z, smem);
    return cudaErrorInvalidConfiguration;
  }
  const std::tuple<std::decay_t<Params>...> params(static_cast<Params>(args)...);
  return run_grid(grid, block, smem, [&] { std::apply(kernel, params); });
}

}  // namespace cuda_emu

// The kernels' view: read-only built-in variables and the device functions.
#define threadIdx (static_cast<const uint3&>(::cuda_emu::tl_thread_idx))
#define blockIdx (static_cast<const uint3&>(::cuda_emu::tl_block_idx))
#define blockDim (static_cast<const dim3&>(::cuda_emu::tl_block_dim))
#define gridDim (static_cast<const dim3&>(::cuda_emu::tl_grid_dim))

inline void __syncthreads(std::source_location where = std::source_location::current()) {
  cuda_emu::tl_block->sync_threads(where);
}

template <class T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32,
                  std::source_location where = std::source_location::current()) {
  return cuda_emu::tl_block->shuffle(mask, value, (cuda_emu::tl_tid % 32) ^ lane_mask, width, where);
}

namespace gpt2fast {
namespace kernels {
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          Args... args) {
  return ::cuda_emu::launch(kernel, grid, block, smem, stream, args...);
}
}  // namespace kernels
}  // namespace gpt2fast
