// The runtime behind cuda_host.h: launches, fibers, __syncthreads, warp shuffles, the few CUDA
// runtime calls csrc/ makes, and the harness's own Python bindings.
//
// One block at a time: its threads are fibers on the launching OS thread, each with its own
// stack. A fiber runs until it waits (at __syncthreads, or at a shuffle for the other lanes of
// its mask) or returns; the last thread to arrive releases the others, which queue to run in an
// order shuffled by a generator seeded from the block's coordinates: every run of a launch is the
// same run, and a missing barrier meets both orders of its writer and its reader somewhere in a
// grid (in index order alone, a read of a value written by a later thread never shows). When no
// fiber can run and some have not returned, the block can never finish: on a GPU that is a hang
// (or undefined behaviour), here it is an error naming who waits where and who already returned.
#include <dlfcn.h>
#include <pthread.h>
#include <pybind11/stl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define VQIM_HOST_ASAN 1
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

// Defined by the build (one per `extern __shared__` array of the kernels): the calling thread's
// copy of each, kDynamicSharedBytes long.
extern "C" int vqim_host_dynamic_shared(void** out, int max);

namespace vqim_host {

using vqim::str_cat;

ThreadState current;

namespace {

// CUDA's default limit on the shared memory of one block (more needs an opt-in csrc never makes).
constexpr std::size_t kDynamicSharedBytes = 48 * 1024;
constexpr int kMaxThreads = 1024;
#if defined(VQIM_HOST_ASAN)
constexpr std::size_t kStackBytes = 512 * 1024;  // instrumented frames are several times larger
#else
constexpr std::size_t kStackBytes = 128 * 1024;
#endif

// ---- Context switch ----------------------------------------------------------------------------
// x86-64: callee-saved registers, the SSE and x87 control words, then the stack pointer; a few
// nanoseconds, where swapcontext makes a system call (the signal mask) on every switch. Elsewhere
// swapcontext.
#if defined(__x86_64__)
extern "C" void vqim_host_switch(void** save_sp, void* next_sp);
asm(R"(
  .text
  .globl vqim_host_switch
  .hidden vqim_host_switch
  .type vqim_host_switch, @function
vqim_host_switch:
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
  .size vqim_host_switch, .-vqim_host_switch
  .section .note.GNU-stack,"",@progbits
  .text
)");

struct Context {
  void* sp = nullptr;
  void* fake_stack = nullptr;  // ASan's, while this context is switched out
};

// A fresh context that enters `entry` (which never returns) on the stack [lo, lo + size).
void make_context(Context& c, char* lo, std::size_t size, void (*entry)()) {
  auto top = reinterpret_cast<std::uintptr_t>(lo + size) & ~std::uintptr_t{15};
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                           // entry's return address: none
  *--sp = reinterpret_cast<void*>(entry);    // popped by vqim_host_switch's ret
  for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp rbx r12 r13 r14 r15
  std::uint32_t mxcsr;
  std::uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  std::uint64_t words = mxcsr | (std::uint64_t{fpucw} << 32);
  *--sp = reinterpret_cast<void*>(words);
  c.sp = sp;
}

void swap_context(Context& from, Context& to) { vqim_host_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
  void* fake_stack = nullptr;  // ASan's, while this context is switched out
};

void make_context(Context& c, char* lo, std::size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = lo;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}

void swap_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ---- Block state ---------------------------------------------------------------------------------
enum class Wait { kRunnable, kBarrier, kShuffle, kReturned };

struct Site {
  const char* file = nullptr;
  int line = 0;
  bool operator==(const Site& o) const { return line == o.line && std::strcmp(file, o.file) == 0; }
  std::string str() const { return str_cat(file, ":", line); }
};

struct Fiber {
  Context ctx;
  char* stack = nullptr;  // kStackBytes, a guard page below
  uint3 thread_idx{};
  Wait wait = Wait::kRunnable;
  Site site;  // where it waits
};

struct WarpExchange {
  unsigned arrived = 0;  // lanes of the current generation that have arrived
  unsigned mask = 0;
  Shuffle kind = Shuffle::kXor;
  int width = 32;
  Site site;
  std::uint64_t generation = 0;
  // Double-buffered by generation: a lane may write generation g + 1 while slower lanes still
  // read generation g, never g + 2 (that needs every lane to have arrived at g + 1).
  std::uint64_t value[2][32] = {};
};

struct Block {
  int n = 0;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  std::vector<int> ready;  // runnable fibers, in the order they run from ready_head on
  std::size_t ready_head = 0;
  int running = -1;
  int returned = 0;
  int at_barrier = 0;
  Site barrier_site;
  std::vector<WarpExchange> warps;
  std::string error;  // set by a fiber that found a misuse; the block stops
  std::uint64_t rng = 0;  // xorshift64* state: where and in which order released fibers queue
  std::vector<int> waking;  // the fibers a barrier or shuffle releases

  std::uint64_t next_random() {
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return rng * 0x2545F4914F6CDD1DULL >> 32;
  }

  // Queue `waking`, shuffled, at a random place among the fibers still waiting to run: a warp
  // released from a shuffle may run ahead of threads queued long before it, as on a GPU.
  void release() {
    if (ready_head == ready.size() || ready_head > 4096) {  // drop the fibers already run
      ready.erase(ready.begin(), ready.begin() + static_cast<std::ptrdiff_t>(ready_head));
      ready_head = 0;
    }
    for (std::size_t i = waking.size(); i > 1; --i) std::swap(waking[i - 1], waking[next_random() % i]);
    const std::size_t at = ready_head + next_random() % (ready.size() - ready_head + 1);
    ready.insert(ready.begin() + static_cast<std::ptrdiff_t>(at), waking.begin(), waking.end());
    waking.clear();
  }
};

Context g_main;
std::vector<Fiber> g_fibers;  // the pool, grown to the largest block seen
Block g_block;
bool g_in_launch = false;
std::map<const void*, long> g_launches;  // kernel -> launches
cudaError_t g_last_error = cudaSuccess;
cudaError_t g_explained_error = cudaSuccess;  // the error g_last_error_text explains
std::string g_last_error_text;
std::vector<std::pair<std::int64_t, std::int64_t>> g_shared_ranges;  // (offset, bytes) in the TLS block
std::map<std::uintptr_t, std::int64_t> g_static_shared;  // kernel (offset in this module) -> bytes

#if defined(VQIM_HOST_ASAN)
const void* g_main_bottom = nullptr;  // the launching thread's stack, for ASan's bookkeeping
std::size_t g_main_size = 0;
#endif
thread_local char g_tls_anchor;  // taking its address allocates this module's thread_local block

void set_current(int f) {
  g_block.running = f;
  current.thread_idx = g_fibers[f].thread_idx;
}

// Switch from fiber `from` (or main, -1) to fiber `to` (or main); a returning fiber is never
// switched back to.
void switch_fiber(int from, int to, bool from_returns) {
  Context& a = from < 0 ? g_main : g_fibers[from].ctx;
  Context& b = to < 0 ? g_main : g_fibers[to].ctx;
  if (to >= 0) set_current(to);
#if defined(VQIM_HOST_ASAN)
  __sanitizer_start_switch_fiber(from_returns ? nullptr : &a.fake_stack, to < 0 ? g_main_bottom : g_fibers[to].stack,
                                 to < 0 ? g_main_size : kStackBytes);
  swap_context(a, b);
  __sanitizer_finish_switch_fiber(a.fake_stack, nullptr, nullptr);
#else
  (void)from_returns;
  swap_context(a, b);
#endif
}

// The running fiber stops: on to the next runnable one, or back to main when none is left.
void yield_to_next(bool returning) {
  const int me = g_block.running;
  int next = -1;
  if (g_block.error.empty() && g_block.ready_head < g_block.ready.size()) next = g_block.ready[g_block.ready_head++];
  switch_fiber(me, next, returning);
}

void fiber_entry() {
#if defined(VQIM_HOST_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
  try {
    g_block.body(g_block.ctx);
  } catch (const std::exception& e) {
    if (g_block.error.empty()) g_block.error = str_cat("a CUDA thread threw: ", e.what());
  }
  g_fibers[g_block.running].wait = Wait::kReturned;
  ++g_block.returned;
  yield_to_next(true);
  std::abort();  // a returned fiber is never resumed
}

void fail(std::string message) {
  if (g_block.error.empty()) g_block.error = std::move(message);
  switch_fiber(g_block.running, -1, false);
  std::abort();  // main never resumes a fiber after an error
}

std::string thread_name(int f) {
  const uint3 t = g_fibers[f].thread_idx;
  return str_cat("(", t.x, ",", t.y, ",", t.z, ")");
}

// Thread ids as ranges of linear indices: "0-31, 64".
std::string id_ranges(const std::vector<int>& ids) {
  std::ostringstream os;
  for (std::size_t i = 0; i < ids.size();) {
    std::size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    os << (i ? ", " : "") << ids[i];
    if (j > i) os << "-" << ids[j];
    i = j + 1;
  }
  return os.str();
}

// The block cannot go on: who waits where, who returned.
std::string deadlock_report() {
  std::map<std::string, std::vector<int>> by_wait;
  std::vector<int> returned;
  for (int f = 0; f < g_block.n; ++f) {
    const Fiber& fb = g_fibers[f];
    if (fb.wait == Wait::kReturned) returned.push_back(f);
    else if (fb.wait == Wait::kBarrier) by_wait["__syncthreads at " + fb.site.str()].push_back(f);
    else if (fb.wait == Wait::kShuffle) by_wait["a warp shuffle at " + fb.site.str()].push_back(f);
  }
  std::ostringstream os;
  if (g_block.at_barrier > 0) {
    os << "__syncthreads at " << g_block.barrier_site.str() << " reached by " << g_block.at_barrier << " of "
       << g_block.n << " threads of the block (undefined behaviour on a GPU: a hang or worse)";
  } else {
    os << "a warp shuffle waits for lanes that never arrive";
  }
  os << "; threads (linear index) ";
  const char* sep = "";
  for (const auto& [where, ids] : by_wait) {
    os << sep << id_ranges(ids) << " wait at " << where;
    sep = "; ";
  }
  if (!returned.empty()) os << sep << id_ranges(returned) << " returned";
  return os.str();
}

// ---- Shared memory ---------------------------------------------------------------------------------
// The calling thread's block of this module's thread_local storage, where the __shared__ arrays
// live (cuda_host.h).
char* tls_block() {
  volatile char* anchor = &g_tls_anchor;
  (void)anchor;
  Dl_info info{};
  dladdr(reinterpret_cast<void*>(&tls_block), &info);
  void* handle = dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD);
  void* tls = nullptr;
  if (handle != nullptr) {
    dlinfo(handle, RTLD_DI_TLS_DATA, &tls);
    dlclose(handle);
  }
  if (tls == nullptr) throw std::runtime_error("vqim cuda_host: no thread_local block for the __shared__ arrays");
  return static_cast<char*>(tls);
}

// Before every block: shared memory holds 0xFF bytes (NaN, -1), not the last block's values, so
// a read before any write shows; under ASan the dynamic arrays end at the launch's byte count.
void poison_shared(char* tls, std::size_t dynamic_bytes) {
  void* bufs[64];
  const int n = vqim_host_dynamic_shared(bufs, 64);
  for (int i = 0; i < n; ++i) {
#if defined(VQIM_HOST_ASAN)
    ASAN_UNPOISON_MEMORY_REGION(bufs[i], kDynamicSharedBytes);
#endif
    std::memset(bufs[i], 0xFF, kDynamicSharedBytes);
#if defined(VQIM_HOST_ASAN)
    ASAN_POISON_MEMORY_REGION(static_cast<char*>(bufs[i]) + dynamic_bytes, kDynamicSharedBytes - dynamic_bytes);
#endif
  }
  for (const auto& [offset, bytes] : g_shared_ranges) std::memset(tls + offset, 0xFF, bytes);
}

// ---- Launch ------------------------------------------------------------------------------------
std::uintptr_t module_offset(const void* p) {
  Dl_info info{};
  dladdr(p, &info);
  return reinterpret_cast<std::uintptr_t>(p) - reinterpret_cast<std::uintptr_t>(info.dli_fbase);
}

char* new_stack() {
  const long page = sysconf(_SC_PAGESIZE);
  void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("vqim cuda_host: cannot map a fiber stack");
  mprotect(p, page, PROT_NONE);  // an overflow faults instead of writing over another stack
  return static_cast<char*>(p) + page;
}

// CUDA's launch checks: a bad configuration is a launch error (cudaGetLastError), not a crash.
// A block gets 48 KiB of shared memory, its static arrays and the launch's dynamic bytes together.
bool config_ok(const LaunchConfig& c, std::int64_t static_bytes) {
  const std::uint64_t threads = std::uint64_t{c.block.x} * c.block.y * c.block.z;
  std::string why;
  cudaError_t err = cudaErrorInvalidConfiguration;
  if (c.block.x == 0 || c.block.y == 0 || c.block.z == 0 || c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0) {
    why = str_cat("a zero grid or block dimension: grid (", c.grid.x, ",", c.grid.y, ",", c.grid.z, "), block (",
                  c.block.x, ",", c.block.y, ",", c.block.z, ")");
  } else if (threads > kMaxThreads || c.block.x > 1024 || c.block.y > 1024 || c.block.z > 64) {
    why = str_cat("a block of (", c.block.x, ",", c.block.y, ",", c.block.z, ") threads: at most 1024, and x, y <= "
                  "1024, z <= 64");
  } else if (c.grid.x > 2147483647u || c.grid.y > 65535 || c.grid.z > 65535) {
    why = str_cat("a grid of (", c.grid.x, ",", c.grid.y, ",", c.grid.z, "): x < 2^31, y, z <= 65535");
  } else if (c.smem + static_bytes > kDynamicSharedBytes) {
    why = str_cat(c.smem, " bytes of dynamic shared memory and ", static_bytes, " of static: more than the ",
                  kDynamicSharedBytes, " a block gets without an opt-in");
    err = cudaErrorInvalidValue;
  } else {
    return true;
  }
  g_last_error = g_explained_error = err;
  g_last_error_text = why;
  return false;
}

void run_block(int n) {
  g_block.ready.clear();
  g_block.ready_head = 0;
  g_block.returned = 0;
  g_block.at_barrier = 0;
  g_block.error.clear();
  g_block.n = n;
  g_block.warps.assign((n + 31) / 32, WarpExchange{});
  const dim3 bd = current.block_dim;
  const uint3 bi = current.block_idx;
  g_block.rng = 0x9E3779B97F4A7C15ULL ^ (bi.x + 1) * 0xBF58476D1CE4E5B9ULL ^ (bi.y + 1) * 0x94D049BB133111EBULL ^
                (bi.z + 1) * 0xD6E8FEB86659FD93ULL ^ static_cast<std::uint64_t>(n);
  for (int f = 0; f < n; ++f) {
    Fiber& fb = g_fibers[f];
#if defined(VQIM_HOST_ASAN)
    // A fiber left waiting by an earlier error never unwound its frames: clear their poison.
    ASAN_UNPOISON_MEMORY_REGION(fb.stack, kStackBytes);
#endif
    make_context(fb.ctx, fb.stack, kStackBytes, fiber_entry);
    fb.thread_idx = make_uint3(f % bd.x, (f / bd.x) % bd.y, f / (bd.x * bd.y));
    fb.wait = Wait::kRunnable;
    g_block.waking.push_back(f);
  }
  g_block.release();
  g_block.ready_head = 1;
  switch_fiber(-1, g_block.ready[0], false);
  if (!g_block.error.empty()) throw std::runtime_error(g_block.error);
  if (g_block.returned != n) throw std::runtime_error(deadlock_report());
}

}  // namespace

void syncthreads(const char* file, int line) {
  Block& b = g_block;
  const Site site{file, line};
  if (b.at_barrier == 0) {
    b.barrier_site = site;
  } else if (!(site == b.barrier_site)) {
    fail(str_cat("thread ", thread_name(b.running), " reached __syncthreads at ", site.str(), " while ",
                 b.at_barrier, " threads wait at __syncthreads at ", b.barrier_site.str(),
                 " (a barrier in divergent code: undefined behaviour on a GPU)"));
  }
  if (++b.at_barrier == b.n) {
    b.at_barrier = 0;
    for (int f = 0; f < b.n; ++f) {
      if (g_fibers[f].wait == Wait::kBarrier) {
        g_fibers[f].wait = Wait::kRunnable;
        b.waking.push_back(f);
      }
    }
    b.release();
    return;
  }
  Fiber& me = g_fibers[b.running];
  me.wait = Wait::kBarrier;
  me.site = site;
  yield_to_next(false);
}

std::uint64_t shuffle(Shuffle kind, unsigned mask, std::uint64_t bits, int operand, int width, const char* file,
                      int line) {
  Block& b = g_block;
  const int f = b.running;
  const int lane = f % 32, w = f / 32;
  const int lanes = std::min(32, b.n - 32 * w);
  const unsigned existing = lanes == 32 ? 0xFFFFFFFFu : (1u << lanes) - 1;
  const Site site{file, line};
  const char* name = kind == Shuffle::kXor ? "__shfl_xor_sync" : "__shfl_up_sync";
  if (!(width == 32 || width == 16 || width == 8 || width == 4 || width == 2 || width == 1)) {
    fail(str_cat(name, " at ", site.str(), ": width ", width, " is not a power of two <= 32"));
  }
  if ((mask & ~existing) != 0) {
    fail(str_cat(name, " at ", site.str(), ": mask 0x", std::hex, mask, " names lanes warp ", std::dec, w,
                 " does not have (", lanes, " threads)"));
  }
  if ((mask >> lane & 1u) == 0) {
    fail(str_cat(name, " at ", site.str(), ": lane ", lane, " of warp ", w, " calls it with mask 0x", std::hex, mask,
                 ", which leaves it out"));
  }
  WarpExchange& x = b.warps[w];
  if (x.arrived == 0) {
    x.mask = mask;
    x.kind = kind;
    x.width = width;
    x.site = site;
  } else if (!(site == x.site) || mask != x.mask || kind != x.kind || width != x.width) {
    fail(str_cat("lane ", lane, " of warp ", w, " calls ", name, " at ", site.str(), " with mask 0x", std::hex, mask,
                 std::dec, " while lanes of its warp wait at a shuffle at ", x.site.str(), " with mask 0x", std::hex,
                 x.mask, std::dec, " (divergent shuffles: undefined behaviour on a GPU)"));
  }
  const std::uint64_t gen = x.generation;
  x.value[gen & 1][lane] = bits;
  x.arrived |= 1u << lane;
  if (x.arrived == mask) {
    x.arrived = 0;
    ++x.generation;
    for (int l = 0; l < lanes; ++l) {
      Fiber& o = g_fibers[32 * w + l];
      if (l != lane && o.wait == Wait::kShuffle) {
        o.wait = Wait::kRunnable;
        b.waking.push_back(32 * w + l);
      }
    }
    b.release();
  } else {
    Fiber& me = g_fibers[f];
    me.wait = Wait::kShuffle;
    me.site = site;
    yield_to_next(false);
  }
  // Source lane, as CUDA defines it within each segment of `width` lanes: xor may not reach a
  // later segment, up not below the segment's first lane; then the lane keeps its own value.
  const int seg = lane / width * width;
  int src = lane;
  if (kind == Shuffle::kXor) {
    const int s = lane ^ operand;
    if (s < seg + width) src = s;
  } else {
    if (lane - operand >= seg) src = lane - operand;
  }
  if (src < 0 || src >= 32 || (mask >> src & 1u) == 0) {
    fail(str_cat(name, " at ", site.str(), ": lane ", lane, " of warp ", w, " reads lane ", src,
                 ", which is not in the mask 0x", std::hex, mask, " (its value is undefined on a GPU)"));
  }
  return x.value[gen & 1][src];
}

void launch(const void* kernel, const LaunchConfig& cfg, void (*body)(void*), void* ctx) {
  if (g_in_launch) throw std::runtime_error("vqim cuda_host: a kernel launched from a kernel");
  const auto found = g_static_shared.find(module_offset(kernel));
  if (!config_ok(cfg, found == g_static_shared.end() ? 0 : found->second)) return;
  ++g_launches[kernel];
  const int n = static_cast<int>(cfg.block.x * cfg.block.y * cfg.block.z);
  while (static_cast<int>(g_fibers.size()) < n) {
    g_fibers.emplace_back();
    g_fibers.back().stack = new_stack();
  }
#if defined(VQIM_HOST_ASAN)
  pthread_attr_t attr;
  pthread_getattr_np(pthread_self(), &attr);
  void* lo = nullptr;
  pthread_attr_getstack(&attr, &lo, &g_main_size);
  pthread_attr_destroy(&attr);
  g_main_bottom = lo;
#endif
  char* tls = tls_block();
  g_in_launch = true;
  g_block.body = body;
  g_block.ctx = ctx;
  current.grid_dim = cfg.grid;
  current.block_dim = cfg.block;
  try {
    for (unsigned z = 0; z < cfg.grid.z; ++z) {
      for (unsigned y = 0; y < cfg.grid.y; ++y) {
        for (unsigned x = 0; x < cfg.grid.x; ++x) {
          current.block_idx = make_uint3(x, y, z);
          poison_shared(tls, cfg.smem);
          try {
            run_block(n);
          } catch (const std::runtime_error& e) {
            throw std::runtime_error(str_cat("vqim cuda_host: block (", x, ",", y, ",", z, ") of grid (", cfg.grid.x,
                                             ",", cfg.grid.y, ",", cfg.grid.z, "), ", n, " threads: ", e.what()));
          }
        }
      }
    }
  } catch (...) {
    g_in_launch = false;
    throw;
  }
  g_in_launch = false;
}

}  // namespace vqim_host

// ---- The CUDA runtime calls csrc/ makes --------------------------------------------------------
// Host memory stands in for device memory: every pointer is on device 0, so the params-struct
// checks run in full and only the memory-type check (csrc/common.h check_device_pointers) is moot.
extern "C" {

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attr, const void* ptr) {
  *attr = cudaPointerAttributes{};
  attr->type = cudaMemoryTypeDevice;
  attr->device = 0;
  attr->devicePointer = const_cast<void*>(ptr);
  attr->hostPointer = const_cast<void*>(ptr);
  return cudaSuccess;
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = vqim_host::g_last_error;
  vqim_host::g_last_error = cudaSuccess;
  return e;
}

const char* cudaGetErrorString(cudaError_t error) {
  static thread_local std::string text;
  const char* what = error == cudaSuccess                   ? "no error"
                     : error == cudaErrorInvalidConfiguration ? "invalid configuration argument"
                     : error == cudaErrorInvalidValue         ? "invalid argument"
                                                              : "unknown error";
  text = error != vqim_host::g_explained_error
             ? what
             : vqim::str_cat(what, " (cuda_host: ", vqim_host::g_last_error_text, ")");
  return text.c_str();
}

cudaError_t cudaRuntimeGetVersion(int* version) {
  *version = CUDART_VERSION;
  return cudaSuccess;
}

}  // extern "C"

// ---- Python: what the tests need to know ----------------------------------------------------------
VQIM_REGISTER_OP(cuda_host, [](vqim::py::module_& m) {
  m.def(
      "cuda_host_launches",
      [] {
        std::vector<std::pair<std::uintptr_t, long>> out;
        for (const auto& [kernel, count] : vqim_host::g_launches) {
          out.emplace_back(vqim_host::module_offset(kernel), count);
        }
        return out;
      },
      "(offset of the kernel in this module, launches) for every kernel launched so far");
  m.def(
      "cuda_host_set_shared",
      [](std::vector<std::pair<std::int64_t, std::int64_t>> ranges,
         std::vector<std::pair<std::uintptr_t, std::int64_t>> per_kernel) {
        vqim_host::g_shared_ranges = std::move(ranges);
        vqim_host::g_static_shared = {per_kernel.begin(), per_kernel.end()};
      },
      "the static __shared__ arrays: (offset, bytes) of each in this module's thread_local block, and "
      "(offset of a kernel in this module, its static bytes)");
});
