// The emulator's scheduler: blocks one after another, the threads of a block as fibers that
// switch at barriers (see emu.h). Single-threaded; one launch at a time.
#include <ucontext.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "emu.h"

namespace cdcl_emu {
namespace {

constexpr size_t STACK_BYTES = 256 * 1024;
constexpr unsigned char POISON = 0xff;  // NaN in every float type, -1 in every integer

struct Barrier {
  unsigned arrived = 0;
  uint64_t generation = 0;
};

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
};

struct State {
  cudaError_t last_error = cudaSuccess;
  std::string message;  // why the last launch failed
  std::map<const void*, int> smem_optin;
  unsigned schedule_seed = 0;  // 0: threads in index order; else a fresh random order per round
  uint64_t fiber_switches = 0;

  // the launch in progress
  const std::function<void()>* body = nullptr;
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = -1;
  unsigned threads = 0;
  bool failed = false;
  bool progress = false;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<uint64_t> exchange;  // one slot per thread for the warp collectives
  int block_or_acc = 0;
  unsigned char* smem = nullptr;
};
State S;

void yield() {
  ++S.fiber_switches;
  swapcontext(&S.fibers[S.current].ctx, &S.scheduler);
}

void wait(Barrier& b, unsigned expected) {
  S.progress = true;
  const uint64_t gen = b.generation;
  if (++b.arrived == expected) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  while (b.generation == gen) yield();
}

unsigned lanes_in_my_warp() {
  const unsigned warp = threadIdx.x / 32;
  return std::min(32u, S.threads - warp * 32);
}

void fiber_main() {
  (*S.body)();
  S.fibers[S.current].done = true;
  S.progress = true;
  swapcontext(&S.fibers[S.current].ctx, &S.scheduler);
}

}  // namespace

void fail(const char* what) {
  S.failed = true;
  S.message = what;
  if (S.current < 0) return;  // host side: the launch reports it
  S.message += " (block " + std::to_string(blockIdx.x) + ", thread " + std::to_string(threadIdx.x) + ")";
  swapcontext(&S.fibers[S.current].ctx, &S.scheduler);  // the scheduler never resumes this fiber
  std::abort();
}

void set_last_error(cudaError_t err) {
  if (S.last_error == cudaSuccess) S.last_error = err;
}
cudaError_t take_last_error() {
  const cudaError_t err = S.last_error;
  S.last_error = cudaSuccess;
  return err;
}

cudaError_t set_max_dynamic_smem(const void* kernel, int bytes) {
  if (bytes < 0 || size_t(bytes) > OPTIN_SMEM) return cudaErrorInvalidValue;
  S.smem_optin[kernel] = bytes;
  return cudaSuccess;
}

void* dynamic_shared() { return S.smem; }

void warp_sync() { wait(S.warp_barriers[threadIdx.x / 32], lanes_in_my_warp()); }
void block_sync() { wait(S.block_barrier, S.threads); }

int block_or(int pred) {
  block_sync();  // everyone has read the previous result
  if (threadIdx.x == 0) S.block_or_acc = 0;
  block_sync();
  S.block_or_acc |= pred != 0;
  block_sync();
  return S.block_or_acc;
}

uint64_t warp_exchange(uint64_t bits, int src_lane) {
  if (lanes_in_my_warp() != 32) fail("warp collective in a partial warp");
  const unsigned base = threadIdx.x / 32 * 32;
  S.exchange[threadIdx.x] = bits;
  warp_sync();
  const uint64_t got = S.exchange[base + unsigned(src_lane)];
  warp_sync();  // every lane has read before the next collective overwrites the slots
  return got;
}

int warp_any(int pred) {
  const unsigned base = threadIdx.x / 32 * 32;
  S.exchange[threadIdx.x] = pred != 0;
  warp_sync();
  int any = 0;
  for (unsigned l = 0; l < 32; ++l) any |= int(S.exchange[base + l]);
  warp_sync();
  return any;
}

void run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem,
              const std::function<void()>& body) {
  const unsigned threads = block.x * block.y * block.z;
  if (block.y != 1 || block.z != 1 || grid.y != 1 || grid.z != 1) {
    S.message = "the emulator runs 1-D grids of 1-D blocks only";
    return set_last_error(cudaErrorNotSupported);
  }
  if (threads == 0 || threads > 1024 || grid.x == 0) {
    S.message = "invalid launch configuration";
    return set_last_error(cudaErrorInvalidConfiguration);
  }
  const auto optin = S.smem_optin.find(kernel);
  const size_t limit = optin == S.smem_optin.end() ? DEFAULT_SMEM : size_t(optin->second);
  if (smem > std::max(limit, DEFAULT_SMEM)) {
    S.message = "dynamic shared memory of " + std::to_string(smem) + " bytes over the kernel's limit of " +
                std::to_string(std::max(limit, DEFAULT_SMEM));
    return set_last_error(cudaErrorInvalidValue);
  }

  std::vector<unsigned char> smem_buf(smem + 128);
  unsigned char* smem_aligned = smem_buf.data() + (128 - reinterpret_cast<uintptr_t>(smem_buf.data()) % 128) % 128;
  S.body = &body;
  S.threads = threads;
  S.fibers.assign(threads, Fiber{});
  for (auto& f : S.fibers) f.stack.resize(STACK_BYTES);
  S.warp_barriers.assign((threads + 31) / 32, Barrier{});
  S.exchange.assign(threads, 0);
  S.smem = smem_aligned;
  S.failed = false;
  blockDim = block;
  gridDim = grid;
  std::mt19937 rng(S.schedule_seed);
  std::vector<unsigned> order(threads);

  for (unsigned b = 0; b < grid.x && !S.failed; ++b) {
    blockIdx = dim3(b);
    std::memset(S.smem, POISON, smem);  // shared memory starts undefined
    S.block_barrier = Barrier{};
    for (auto& w : S.warp_barriers) w = Barrier{};
    for (unsigned t = 0; t < threads; ++t) {
      Fiber& f = S.fibers[t];
      f.done = false;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.data();
      f.ctx.uc_stack.ss_size = f.stack.size();
      f.ctx.uc_link = nullptr;
      makecontext(&f.ctx, fiber_main, 0);
    }
    unsigned finished = 0;
    while (finished < threads && !S.failed) {
      for (unsigned t = 0; t < threads; ++t) order[t] = t;
      if (S.schedule_seed != 0) std::shuffle(order.begin(), order.end(), rng);
      S.progress = false;
      for (unsigned t : order) {
        if (S.fibers[t].done) continue;
        S.current = int(t);
        threadIdx = dim3(t);
        swapcontext(&S.scheduler, &S.fibers[t].ctx);
        S.current = -1;
        if (S.failed) break;
        if (S.fibers[t].done) ++finished;
      }
      if (!S.progress && !S.failed) {
        S.failed = true;
        S.message = "deadlock: threads wait at a barrier that others of the block never reach (block " +
                    std::to_string(b) + ")";
      }
    }
  }
  S.body = nullptr;
  S.smem = nullptr;
  if (S.failed) set_last_error(cudaErrorLaunchFailure);
}

}  // namespace cdcl_emu

// The C interface tests/native/cuda_emulator.py loads with ctypes.
extern "C" {
void cdcl_emu_set_schedule(unsigned seed) { cdcl_emu::S.schedule_seed = seed; }
const char* cdcl_emu_message() { return cdcl_emu::S.message.c_str(); }
void cdcl_emu_clear_message() { cdcl_emu::S.message.clear(); }
unsigned long long cdcl_emu_fiber_switches() { return cdcl_emu::S.fiber_switches; }
}
