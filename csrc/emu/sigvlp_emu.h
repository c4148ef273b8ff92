// SIMT emulation of the CUDA execution model on the CPU (sigvlp._cuda_emu and the sanitizer
// builds of the tests). Each thread of a block is a fiber with its own stack, run by one OS
// worker thread; __syncthreads, __syncwarp, the shuffles and the WMMA operations are real
// barriers (a fiber waits until every participating thread has arrived). Blocks of one launch
// are spread over SIGVLP_EMU_WORKERS OS threads (block b runs on worker b % workers).
//
// Under ThreadSanitizer, fibers are TSan fibers switched without synchronisation; the only
// happens-before edges between threads of a block are the barriers (and the warp-synchronous
// WMMA operations, __syncwarp), so a missing __syncthreads is a data race TSan reports. Blocks on
// different workers never synchronise with each other. Under AddressSanitizer the fiber switches
// are annotated; static __shared__ arrays are globals (with redzones) and one worker is used.
//
// Schedules (SIGVLP_EMU_SCHEDULE or set_schedule): "forward" (thread 0 first), "reversed", or
// "shuffle:SEED" (a fresh seeded permutation of the block's threads after every block barrier).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#ifndef SIGVLP_EMU
#define SIGVLP_EMU 1
#endif

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return {x, y, z}; }
};

typedef struct CUstream_st* cudaStream_t;

namespace sigvlp_emu {

// What a running CUDA thread sees.
struct ThreadCtx {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  int tid;     // linear thread index in the block
  int lane;    // tid % 32
  int warp;    // tid / 32
  void* dynamic_smem;
};

// Every fiber stack is kStackBytes long and kStackBytes-aligned; its lowest word points at the
// fiber's ThreadCtx, so kernel code finds its thread from the stack pointer (no TLS lookup).
constexpr size_t kStackBytes = size_t(1) << 18;
inline ThreadCtx& current() {
  const uintptr_t base = reinterpret_cast<uintptr_t>(__builtin_frame_address(0)) & ~(uintptr_t(kStackBytes) - 1);
  return **reinterpret_cast<ThreadCtx**>(base);
}

struct Config {
  int schedule = 0;        // 0 forward, 1 reversed, 2 shuffle
  uint64_t seed = 0;
  int workers = 1;
  int64_t max_grid_x = 2147483647;
  int64_t max_grid_y = 65535;
  int64_t max_grid_z = 65535;
  int sm_count = 4;        // cudaDevAttrMultiProcessorCount
};
Config& config();
// Parses "forward", "reversed", "shuffle" or "shuffle:SEED"; false if not understood.
bool set_schedule(const char* spec);
const char* schedule_name();
const char* last_error_message();
// Sanitizer the runtime was compiled with: "", "thread" or "address".
const char* sanitizer();

// ---- runtime entry points (emu_runtime.cpp) ----
int run_grid(dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& body);
void syncthreads();
void syncwarp(unsigned mask);
// Warp collective with memory synchronisation (WMMA): every lane in `mask` deposits `req`; the
// last to arrive gets the array of the 32 lanes' requests (nullptr for lanes outside the mask)
// and must call warp_collective_end() after doing the work; the others get nullptr once it is done.
void** warp_collective_begin(unsigned mask, void* req, const char* what);
void warp_collective_end();
// Register exchange without memory synchronisation (the shuffles and votes).
// kind: 0 idx, 1 up, 2 down, 3 xor, 4 ballot, 5 any, 6 all
uint64_t warp_exchange(unsigned mask, uint64_t value, int kind, int arg, int width);
// Report an error from kernel code (the launch fails with its message).
[[noreturn]] void kernel_fail(const char* message);
int get_last_error(bool clear);
void set_last_error(int code, const char* message);

// ---- kernel launch: SIGVLP_LAUNCH(grid, block, smem, stream, kernel)(args...) ----
template <typename... P>
struct Launch {
  dim3 grid, block;
  size_t smem;
  void (*kernel)(P...);
  template <typename... A>
  void operator()(A&&... a) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
    // Arguments are converted to the kernel's parameter types once, on the host, as CUDA does.
    const std::tuple<std::decay_t<P>...> args(std::forward<A>(a)...);
    auto k = kernel;
    run_grid(grid, block, smem, [&args, k]() { std::apply(k, args); });
  }
};

template <typename... P>
Launch<P...> launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, void (*kernel)(P...)) {
  return Launch<P...>{grid, block, smem, kernel};
}

}  // namespace sigvlp_emu
