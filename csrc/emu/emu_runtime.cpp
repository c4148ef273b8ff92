// The SIMT scheduler behind csrc/emu (see sigvlp_emu.h): fibers, barriers, warp collectives.
// This file is compiled without sanitizer instrumentation of its own accesses in the sanitizer
// builds (its bookkeeping is shared by fibers on purpose); it annotates the fiber switches and
// the happens-before edges of barriers for ThreadSanitizer and AddressSanitizer.
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "include/cuda_runtime.h"

// The sanitizer builds compile this file without instrumentation and define
// SIGVLP_EMU_ANNOTATE_TSAN / SIGVLP_EMU_ANNOTATE_ASAN so it still annotates for the runtime.
#if defined(__SANITIZE_THREAD__) || defined(SIGVLP_EMU_ANNOTATE_TSAN)
#define SIGVLP_EMU_TSAN 1
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_set_fiber_name(void* fiber, const char* name);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
}
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(SIGVLP_EMU_ANNOTATE_ASAN)
#define SIGVLP_EMU_ASAN 1
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
}
#endif

namespace sigvlp_emu {


namespace {

// ---- execution contexts: a hand-written switch on x86-64 (no signal-mask system call, which
// glibc's swapcontext makes twice per switch), ucontext elsewhere ----
#if defined(__x86_64__)
extern "C" void sigvlp_emu_switch(void** save_sp, void* to_sp);
asm(R"(
.text
.p2align 4
.globl sigvlp_emu_switch
.hidden sigvlp_emu_switch
.type sigvlp_emu_switch,@function
sigvlp_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size sigvlp_emu_switch,.-sigvlp_emu_switch
)");
struct Context {
  void* sp = nullptr;
};
inline void ctx_switch(Context& from, Context& to) { sigvlp_emu_switch(&from.sp, to.sp); }
void ctx_make(Context& c, char* stack, size_t size, void (*fn)()) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + size) & ~static_cast<uintptr_t>(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;                                   // fake return address of fn (fn never returns)
  *--sp = reinterpret_cast<uint64_t>(fn);      // popped by ret: rsp % 16 == 8 at fn's entry
  for (int i = 0; i < 6; ++i) *--sp = 0;       // rbp rbx r12 r13 r14 r15
  *--sp = 0x037F00001F80ull;                   // mxcsr (low), x87 control word (high)
  c.sp = sp;
}
#else
struct Context {
  ucontext_t uc;
};
inline void ctx_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
void ctx_make(Context& c, char* stack, size_t size, void (*fn)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, fn, 0);
}
#endif

inline void tsan_acquire(void* a) {
#ifdef SIGVLP_EMU_TSAN
  __tsan_acquire(a);
#else
  (void)a;
#endif
}
inline void tsan_release(void* a) {
#ifdef SIGVLP_EMU_TSAN
  __tsan_release(a);
#else
  (void)a;
#endif
}

Config make_config() {
  Config c;
  if (const char* w = std::getenv("SIGVLP_EMU_WORKERS")) c.workers = std::max(1, std::atoi(w));
  if (const char* s = std::getenv("SIGVLP_EMU_SM_COUNT")) c.sm_count = std::max(1, std::atoi(s));
  if (const char* g = std::getenv("SIGVLP_EMU_MAX_GRID_Y")) c.max_grid_y = std::max(1, std::atoi(g));
#ifdef SIGVLP_EMU_SHARED_STATIC
  c.workers = 1;  // static __shared__ objects are shared by every worker
#endif
  return c;
}

Config g_config = make_config();
std::string g_schedule_name = "forward";
std::mutex g_error_mutex;
std::string g_error_message;
thread_local int tl_last_error = 0;

enum State { kRunnable, kBarrier, kWarp, kDone };

struct Block;

struct Fiber {
  Context ctx;
  char* stack = nullptr;       // usable stack (above the header and guard pages)
  size_t stack_size = 0;
  void* mapping = nullptr;     // the whole mapping (2 * kStackBytes, for the alignment)
  ThreadCtx tc{};
  State state = kRunnable;
  Block* block = nullptr;
#ifdef SIGVLP_EMU_TSAN
  void* tsan_fiber = nullptr;
#endif
  void* asan_fake = nullptr;
};

struct Warp {
  int arrived = 0;
  unsigned gen = 0;
  unsigned mask = 0;
  int kind = -1;  // -1 none, 0 collective, 1 exchange, 2 syncwarp
  const char* what = nullptr;
  void* req[32] = {};
  uint64_t val[32] = {};
  int arg[32] = {};
  int width = 32;
  uint64_t out[32] = {};
  char tok[2] = {};
};

struct Block {
  std::vector<Fiber*> fibers;
  int n = 0;
  int live = 0;
  int at_barrier = 0;
  unsigned gen = 0;
  bool new_round = false;
  std::vector<Warp> warps;
  char bar_tok[2] = {};
  char launch_tok = 0;
  const std::function<void()>* body = nullptr;
  std::string error;
};

// Per OS worker: the fibers (stacks kept between blocks and launches) and the main context.
struct Worker {
  Context main_ctx;
  std::vector<Fiber*> pool;
  Fiber* running = nullptr;
  const void* main_stack_bottom = nullptr;
  size_t main_stack_size = 0;
#ifdef SIGVLP_EMU_TSAN
  void* main_fiber = nullptr;
#endif
  char done_tok = 0;
  ~Worker() {
    for (Fiber* f : pool) {
#ifdef SIGVLP_EMU_TSAN
      if (f->tsan_fiber) __tsan_destroy_fiber(f->tsan_fiber);
#endif
      munmap(f->mapping, 2 * kStackBytes);
      delete f;
    }
  }
};

thread_local Worker* tl_worker = nullptr;
thread_local Fiber* tl_starting = nullptr;

Fiber* current_fiber() { return tl_worker->running; }

// ---- switching ----
void switch_to_fiber(Worker& w, Fiber* f) {
  w.running = f;
#ifdef SIGVLP_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f->stack, f->stack_size);
#endif
#ifdef SIGVLP_EMU_TSAN
  __tsan_switch_to_fiber(f->tsan_fiber, 1 /* no sync */);
#endif
  ctx_switch(w.main_ctx, f->ctx);
#ifdef SIGVLP_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  w.running = nullptr;
}

void switch_to_main(Fiber* f, bool exiting) {
  Worker& w = *tl_worker;
#ifdef SIGVLP_EMU_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f->asan_fake, w.main_stack_bottom, w.main_stack_size);
#endif
#ifdef SIGVLP_EMU_TSAN
  __tsan_switch_to_fiber(w.main_fiber, 1 /* no sync */);
#endif
  ctx_switch(f->ctx, w.main_ctx);
#ifdef SIGVLP_EMU_ASAN
  // Resumed, possibly from another launch's OS thread: record that thread's stack.
  __sanitizer_finish_switch_fiber(f->asan_fake, &tl_worker->main_stack_bottom, &tl_worker->main_stack_size);
#endif
  (void)exiting;
}

void yield_current() { switch_to_main(current_fiber(), false); }

void fail_block(Block& b, const std::string& message) {
  if (b.error.empty()) b.error = message;
  // The worker reads (and frees) the message after the block: order it after this fiber.
  tsan_release(&tl_worker->done_tok);
}

// A thread exited: release a block barrier that now has every live thread.
void on_exit(Block& b, Fiber& f) {
  --b.live;
  Warp& w = b.warps[f.tc.warp];
  if (w.arrived > 0 && (w.mask >> f.tc.lane) & 1u) {
    fail_block(b, std::string("lane ") + std::to_string(f.tc.lane) + " of warp " + std::to_string(f.tc.warp) +
                      " exited while its warp waits in " + (w.what ? w.what : "a warp collective"));
  }
  if (b.at_barrier > 0 && b.at_barrier == b.live) {
    b.at_barrier = 0;
    ++b.gen;
    b.new_round = true;
    for (Fiber* g : b.fibers)
      if (g->state == kBarrier) g->state = kRunnable;
  }
}

void fiber_entry() {
  Fiber* f = tl_starting;
#ifdef SIGVLP_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &tl_worker->main_stack_bottom, &tl_worker->main_stack_size);
#endif
  for (;;) {
    Block& b = *f->block;
    tsan_acquire(&b.launch_tok);
    (*b.body)();
    // Writes of exited threads are visible to threads still waiting at a barrier.
    tsan_release(&b.bar_tok[b.gen & 1]);
    tsan_release(&tl_worker->done_tok);
    f->state = kDone;
    on_exit(b, *f);
    switch_to_main(f, false);  // a finished fiber is resumed for the next block it runs
  }
}

Fiber* make_fiber(Worker& w) {
  Fiber* f = new Fiber();
  void* mem = mmap(nullptr, 2 * kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mem == MAP_FAILED) {
    delete f;
    return nullptr;
  }
  f->mapping = mem;
  const uintptr_t base = (reinterpret_cast<uintptr_t>(mem) + kStackBytes - 1) & ~(uintptr_t(kStackBytes) - 1);
  *reinterpret_cast<ThreadCtx**>(base) = &f->tc;     // see current() in sigvlp_emu.h
  const size_t page = 4096;
  mprotect(reinterpret_cast<void*>(base + page), page, PROT_NONE);  // guard page below the stack
  f->stack = reinterpret_cast<char*>(base + 2 * page);
  f->stack_size = kStackBytes - 2 * page;
#ifdef SIGVLP_EMU_TSAN
  f->tsan_fiber = __tsan_create_fiber(0);
#endif
  ctx_make(f->ctx, f->stack, f->stack_size, fiber_entry);
  (void)w;
  return f;
}

std::vector<int> make_order(int n, const Block& b, uint64_t block_linear) {
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  if (g_config.schedule == 1) {
    std::reverse(order.begin(), order.end());
  } else if (g_config.schedule == 2) {
    std::mt19937_64 rng(g_config.seed * 0x9e3779b97f4a7c15ull + block_linear * 0x632be59bd9b4e019ull + b.gen);
    std::shuffle(order.begin(), order.end(), rng);
  }
  return order;
}

void run_block(Worker& w, Block& b, dim3 grid, dim3 block_dim, uint3 bidx, void* dyn_smem) {
  const int n = static_cast<int>(block_dim.x * block_dim.y * block_dim.z);
  while (static_cast<int>(w.pool.size()) < n) {
    Fiber* f = make_fiber(w);
    if (f == nullptr) {
      fail_block(b, "could not allocate a fiber stack");
      return;
    }
    w.pool.push_back(f);
  }
  b.n = n;
  b.live = n;
  b.fibers.assign(w.pool.begin(), w.pool.begin() + n);
  b.warps.assign((n + 31) / 32, Warp{});
  for (int t = 0; t < n; ++t) {
    Fiber* f = b.fibers[t];
    f->block = &b;
    f->state = kRunnable;
    f->tc.thread_idx = {static_cast<unsigned>(t % block_dim.x), static_cast<unsigned>((t / block_dim.x) % block_dim.y),
                        static_cast<unsigned>(t / (block_dim.x * block_dim.y))};
    f->tc.block_idx = bidx;
    f->tc.block_dim = block_dim;
    f->tc.grid_dim = grid;
    f->tc.tid = t;
    f->tc.lane = t % 32;
    f->tc.warp = t / 32;
    f->tc.dynamic_smem = dyn_smem;
  }
  tsan_release(&b.launch_tok);
  const uint64_t linear = bidx.x + static_cast<uint64_t>(grid.x) * (bidx.y + static_cast<uint64_t>(grid.y) * bidx.z);
  std::vector<int> order = make_order(n, b, linear);
  while (b.live > 0 && b.error.empty()) {
    bool ran = false;
    for (int idx : order) {
      Fiber* f = b.fibers[idx];
      if (f->state != kRunnable) continue;
      tl_starting = f;
      switch_to_fiber(w, f);
      ran = true;
      if (!b.error.empty()) break;
    }
    if (!b.error.empty()) break;
    if (!ran) {
      int at_bar = 0, at_warp = 0;
      for (Fiber* f : b.fibers) {
        at_bar += f->state == kBarrier;
        at_warp += f->state == kWarp;
      }
      fail_block(b, "deadlock: " + std::to_string(at_bar) + " threads wait at __syncthreads and " +
                        std::to_string(at_warp) + " in warp collectives, none can proceed");
      break;
    }
    if (b.new_round) {
      b.new_round = false;
      order = make_order(n, b, linear);
    }
  }
  if (!b.error.empty()) {
    // Fibers stuck mid-kernel are abandoned: rebuild them for later blocks.
    for (Fiber* f : b.fibers) {
      if (f->state != kDone) ctx_make(f->ctx, f->stack, f->stack_size, fiber_entry);
    }
  }
  tsan_acquire(&w.done_tok);
}

// Worker states (fibers and their stacks) live for the whole process and are reused by every
// launch: launches are serialised (g_launch_mutex), and worker i of a launch runs on state i.
std::mutex g_launch_mutex;
std::vector<Worker*> g_workers;

void worker_loop(Worker* state, int worker, int workers, dim3 grid, dim3 block, size_t smem,
                 const std::function<void()>* body, std::string* error) {
  Worker& w = *state;
  tl_worker = &w;
#ifdef SIGVLP_EMU_TSAN
  w.main_fiber = __tsan_get_current_fiber();
#endif
  const uint64_t total = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  std::vector<unsigned char> dyn;
  for (uint64_t lin = worker; lin < total; lin += workers) {
    Block b;
    b.body = body;
    const uint3 bidx{static_cast<unsigned>(lin % grid.x), static_cast<unsigned>((lin / grid.x) % grid.y),
                     static_cast<unsigned>(lin / (static_cast<uint64_t>(grid.x) * grid.y))};
    // Dynamic shared memory: a fresh allocation per block (uninitialised, as on the device).
    unsigned char* dyn_smem = smem ? static_cast<unsigned char*>(std::malloc(smem)) : nullptr;
    run_block(w, b, grid, block, bidx, dyn_smem);
    std::free(dyn_smem);
    if (!b.error.empty()) {
      *error = "block (" + std::to_string(bidx.x) + ", " + std::to_string(bidx.y) + ", " + std::to_string(bidx.z) +
               "): " + b.error;
      break;
    }
  }
  tl_worker = nullptr;
}

}  // namespace

Config& config() { return g_config; }

bool set_schedule(const char* spec) {
  const std::string s(spec ? spec : "");
  if (s == "forward" || s.empty()) {
    g_config.schedule = 0;
    g_schedule_name = "forward";
  } else if (s == "reversed") {
    g_config.schedule = 1;
    g_schedule_name = "reversed";
  } else if (s.rfind("shuffle", 0) == 0) {
    uint64_t seed = 0;
    if (s.size() > 7) {
      if (s[7] != ':') return false;
      seed = std::strtoull(s.c_str() + 8, nullptr, 10);
    }
    g_config.schedule = 2;
    g_config.seed = seed;
    g_schedule_name = "shuffle:" + std::to_string(seed);
  } else {
    return false;
  }
  return true;
}

namespace {
struct ScheduleFromEnv {
  ScheduleFromEnv() {
    if (const char* s = std::getenv("SIGVLP_EMU_SCHEDULE")) {
      if (!set_schedule(s)) std::fprintf(stderr, "sigvlp emu: SIGVLP_EMU_SCHEDULE=%s not understood\n", s);
    }
  }
} schedule_from_env;
}  // namespace

const char* schedule_name() { return g_schedule_name.c_str(); }

const char* last_error_message() { return g_error_message.c_str(); }

const char* sanitizer() {
#if defined(SIGVLP_EMU_TSAN)
  return "thread";
#elif defined(SIGVLP_EMU_ASAN)
  return "address";
#else
  return "";
#endif
}

int get_last_error(bool clear) {
  const int e = tl_last_error;
  if (clear) tl_last_error = 0;
  return e;
}

void set_last_error(int code, const char* message) {
  tl_last_error = code;
  std::lock_guard<std::mutex> lock(g_error_mutex);
  g_error_message = message ? message : "";
}

int run_grid(dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& body) {
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  char msg[256];
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > g_config.max_grid_x || grid.y > g_config.max_grid_y || grid.z > g_config.max_grid_z) {
    std::snprintf(msg, sizeof msg,
                  "invalid launch configuration: grid (%u, %u, %u) block (%u, %u, %u); limits grid (%lld, %lld, %lld)",
                  grid.x, grid.y, grid.z, block.x, block.y, block.z, static_cast<long long>(g_config.max_grid_x),
                  static_cast<long long>(g_config.max_grid_y), static_cast<long long>(g_config.max_grid_z));
    set_last_error(cudaErrorInvalidConfiguration, msg);
    return cudaErrorInvalidConfiguration;
  }
  if (dynamic_smem > 48 * 1024) {
    set_last_error(cudaErrorInvalidValue, "dynamic shared memory above 48 KiB needs cudaFuncSetAttribute");
    return cudaErrorInvalidValue;
  }
  const uint64_t total = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  const int workers = static_cast<int>(std::min<uint64_t>(std::max(1, g_config.workers), total));
  if (tl_worker != nullptr) {
    set_last_error(cudaErrorLaunchFailure, "kernel launch from inside a kernel (dynamic parallelism) is not emulated");
    return cudaErrorLaunchFailure;
  }
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  while (static_cast<int>(g_workers.size()) < workers) g_workers.push_back(new Worker());
  std::vector<std::string> errors(workers);
  if (workers == 1) {
    worker_loop(g_workers[0], 0, 1, grid, block, dynamic_smem, &body, &errors[0]);
  } else {
    std::vector<std::thread> pool;
    for (int i = 0; i < workers; ++i)
      pool.emplace_back(worker_loop, g_workers[i], i, workers, grid, block, dynamic_smem, &body, &errors[i]);
    for (auto& t : pool) t.join();
  }
  for (const auto& e : errors) {
    if (!e.empty()) {
      set_last_error(cudaErrorLaunchFailure, e.c_str());
      return cudaErrorLaunchFailure;
    }
  }
  return cudaSuccess;
}

void syncthreads() {
  Fiber* f = current_fiber();
  Block& b = *f->block;
  const unsigned g = b.gen;
  tsan_release(&b.bar_tok[g & 1]);
  if (++b.at_barrier == b.live) {
    b.at_barrier = 0;
    ++b.gen;
    b.new_round = true;
    for (Fiber* o : b.fibers)
      if (o->state == kBarrier) o->state = kRunnable;
    tsan_acquire(&b.bar_tok[g & 1]);
    return;
  }
  f->state = kBarrier;
  yield_current();
  tsan_acquire(&b.bar_tok[g & 1]);
}

namespace {
// Lanes of warp `w` that exist in the block.
unsigned warp_lanes(const Block& b, int warp) {
  const int first = warp * 32;
  const int count = std::min(32, b.n - first);
  return count == 32 ? 0xffffffffu : ((1u << count) - 1u);
}

// Arrive at a warp rendezvous. Returns true for the last lane to arrive (which must then call
// finish_rendezvous), false for the others once the last one has finished.
bool arrive(int kind, unsigned mask, const char* what, bool sync, unsigned* gen_out) {
  Fiber* f = current_fiber();
  Block& b = *f->block;
  Warp& w = b.warps[f->tc.warp];
  const unsigned lanes = warp_lanes(b, f->tc.warp);
  if (!((mask >> f->tc.lane) & 1u)) kernel_fail((std::string(what) + ": calling lane is not in the mask").c_str());
  if ((mask & ~lanes) != 0) kernel_fail((std::string(what) + ": mask names lanes that do not exist").c_str());
  if (w.arrived == 0) {
    w.mask = mask;
    w.kind = kind;
    w.what = what;
  } else if (w.mask != mask || w.kind != kind || w.what != what) {
    kernel_fail((std::string("warp divergence: lane ") + std::to_string(f->tc.lane) + " reached " + what +
                 " while other lanes wait in " + w.what)
                    .c_str());
  }
  for (int l = 0; l < 32; ++l) {
    if (((mask >> l) & 1u) && b.fibers[f->tc.warp * 32 + l]->state == kDone)
      kernel_fail((std::string(what) + ": lane " + std::to_string(l) + " has exited").c_str());
  }
  const unsigned g = w.gen;
  *gen_out = g;
  if (sync) tsan_release(&w.tok[g & 1]);
  if (++w.arrived == __builtin_popcount(mask)) {
    if (sync) tsan_acquire(&w.tok[g & 1]);
    return true;
  }
  f->state = kWarp;
  yield_current();
  if (sync) tsan_acquire(&w.tok[g & 1]);
  return false;
}

void finish_rendezvous(bool sync) {
  Fiber* f = current_fiber();
  Block& b = *f->block;
  Warp& w = b.warps[f->tc.warp];
  const unsigned g = w.gen++;
  w.arrived = 0;
  if (sync) tsan_release(&w.tok[g & 1]);
  for (int l = 0; l < 32; ++l) {
    if ((w.mask >> l) & 1u) {
      Fiber* o = b.fibers[f->tc.warp * 32 + l];
      if (o->state == kWarp) o->state = kRunnable;
    }
  }
  w.kind = -1;
}
}  // namespace

void syncwarp(unsigned mask) {
  unsigned g;
  if (arrive(2, mask, "__syncwarp", true, &g)) finish_rendezvous(true);
}

void** warp_collective_begin(unsigned mask, void* req, const char* what) {
  Fiber* f = current_fiber();
  Warp& w = f->block->warps[f->tc.warp];
  w.req[f->tc.lane] = req;
  unsigned g;
  if (arrive(0, mask, what, true, &g)) return w.req;
  return nullptr;
}

void warp_collective_end() { finish_rendezvous(true); }

uint64_t warp_exchange(unsigned mask, uint64_t value, int kind, int arg, int width) {
  Fiber* f = current_fiber();
  Block& b = *f->block;
  Warp& w = b.warps[f->tc.warp];
  const int lane = f->tc.lane;
  w.val[lane] = value;
  w.arg[lane] = arg;
  w.width = width;
  static const char* names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
                                "__ballot_sync", "__any_sync", "__all_sync"};
  unsigned g;
  if (arrive(1 + 16 * kind, mask, names[kind], false, &g)) {
    if (width <= 0 || width > 32 || (width & (width - 1)) != 0) kernel_fail("shuffle width must be a power of two <= 32");
    uint64_t ballot = 0;
    for (int l = 0; l < 32; ++l)
      if ((mask >> l) & 1u) ballot |= (w.val[l] != 0 ? 1ull : 0ull) << l;
    for (int l = 0; l < 32; ++l) {
      if (!((mask >> l) & 1u)) continue;
      const int base = l & ~(width - 1);
      int src = l;
      switch (kind) {
        case 0: src = base + (w.arg[l] & (width - 1)); break;
        case 1: src = (l - base) >= w.arg[l] ? l - w.arg[l] : l; break;
        case 2: src = (l - base) + w.arg[l] < width ? l + w.arg[l] : l; break;
        case 3: src = ((l ^ w.arg[l]) & ~(width - 1)) == (l & ~(width - 1)) ? (l ^ w.arg[l]) : l; break;
        default: break;
      }
      if (kind <= 3) {
        if (!((mask >> src) & 1u)) kernel_fail("shuffle reads a lane outside the mask");
        w.out[l] = w.val[src];
      } else if (kind == 4) {
        w.out[l] = ballot;
      } else if (kind == 5) {
        w.out[l] = ballot != 0;
      } else {
        w.out[l] = ballot == static_cast<uint64_t>(mask);
      }
    }
    finish_rendezvous(false);
  }
  return w.out[lane];
}

void kernel_fail(const char* message) {
  Fiber* f = current_fiber();
  Block& b = *f->block;
  fail_block(b, std::string("thread (") + std::to_string(f->tc.thread_idx.x) + ", " +
                    std::to_string(f->tc.thread_idx.y) + ", " + std::to_string(f->tc.thread_idx.z) + "): " + message);
  f->state = kBarrier;  // never resumed: the block is abandoned
  switch_to_main(f, false);
  std::abort();  // unreachable
}

}  // namespace sigvlp_emu

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}
