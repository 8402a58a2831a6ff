// A CPU emulation of the part of the CUDA execution model that csrc/cuda uses, so that the CUDA
// kernels run (slowly, on small shapes) in the CPU tests. The .cu files are compiled by the host
// C++ compiler against the shim headers of include/ (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h,
// mma.h), after tests/native/cuda_emulator.py has rewritten the two constructs C++ cannot parse:
// `kernel<<<grid, block, smem, stream>>>(args)` and `extern __shared__ T name[];`.
//
// Model: blocks run one after another; the threads of a block are fibers (ucontext) on one OS
// thread that switch only at barriers. A fiber runs until it reaches __syncthreads, __syncwarp,
// a shuffle or a WMMA load/store, which is the most adversarial order for a missing barrier: a
// thread that reads shared memory its neighbours have not written yet sees the poison pattern the
// emulator fills shared memory with (NaN for floats) instead of the data. Barriers that not every
// thread of the block (or warp) reaches are reported as a deadlock. Warp collectives need the full
// mask. WMMA fragments are held whole by every lane (their layout is opaque to the kernels, which
// use only load/store/fill/mma), with the alignment rules of the CUDA documentation checked.
//
// What this does not model: the memory system (caching, coalescing, bank conflicts), the timing
// of real warps (races that need a particular interleaving other than the ones tried), hardware
// transcendental approximations (__expf is expf here) or the instruction-level accumulation order
// of the tensor cores. It checks the kernels' logic: indexing, tiling and ragged edges, masks,
// the online log-sum-exp, barriers, launch configuration and shared-memory limits.
#pragma once
#include <math.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
// Set by the scheduler before it resumes a fiber.
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotSupported = 801,
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };

namespace cdcl_emu {

// The emulated device: an sm_90 part with 227 KB of opt-in shared memory per block (H100/H200).
constexpr size_t DEFAULT_SMEM = 48 * 1024;
constexpr size_t OPTIN_SMEM = 227 * 1024;
constexpr unsigned FULL_MASK = 0xffffffffu;

// Runtime (runtime.cpp).
void fail(const char* what);  // ends the launch with cudaErrorLaunchFailure and this message
void run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem,
              const std::function<void()>& body);
void set_last_error(cudaError_t err);
cudaError_t take_last_error();
cudaError_t set_max_dynamic_smem(const void* kernel, int bytes);
void* dynamic_shared();
void warp_sync();
void block_sync();
int block_or(int pred);
uint64_t warp_exchange(uint64_t bits, int src_lane);  // value of lane src_lane; a warp barrier
int warp_any(int pred);

template <typename... P>
struct Launcher {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  template <typename... A>
  void operator()(A&&... args) const {
    std::tuple<P...> params(std::forward<A>(args)...);  // converted once, as the launch does
    run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem,
             [&] { std::apply(kernel, params); });
  }
};
template <typename... P>
Launcher<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem = 0,
                      cudaStream_t = nullptr) {
  return {kernel, grid, block, smem};
}

template <typename T>
T* dynamic_shared_as() {
  return static_cast<T*>(dynamic_shared());
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 64 bits");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}
inline void check_full(unsigned mask) {
  if (mask != FULL_MASK) fail("warp collective with a partial mask (the emulator needs all 32 lanes)");
}

}  // namespace cdcl_emu

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  cdcl_emu::check_full(mask);
  if (width != 32) cdcl_emu::fail("shuffle width other than 32");
  return cdcl_emu::from_bits<T>(cdcl_emu::warp_exchange(cdcl_emu::to_bits(v), src_lane & 31));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  cdcl_emu::check_full(mask);
  if (width != 32) cdcl_emu::fail("shuffle width other than 32");
  const int lane = int(threadIdx.x % 32);
  return cdcl_emu::from_bits<T>(cdcl_emu::warp_exchange(cdcl_emu::to_bits(v), (lane ^ lane_mask) & 31));
}
inline int __any_sync(unsigned mask, int pred) {
  cdcl_emu::check_full(mask);
  return cdcl_emu::warp_any(pred);
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  cdcl_emu::check_full(mask);
  cdcl_emu::warp_sync();
}
inline void __syncthreads() { cdcl_emu::block_sync(); }
inline int __syncthreads_or(int pred) { return cdcl_emu::block_or(pred); }
inline float __expf(float x) { return expf(x); }
inline float __fmul_rn(float a, float b) { return a * b; }  // never fused into an FMA

inline cudaError_t cudaGetLastError() { return cdcl_emu::take_last_error(); }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0 || attr != cudaDevAttrMaxSharedMemoryPerBlockOptin) return cudaErrorInvalidValue;
  *value = int(cdcl_emu::OPTIN_SMEM);
  return cudaSuccess;
}
template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return cdcl_emu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), value);
}

// 16-bit floating-point types: storage plus the conversions the kernels call (round to nearest
// even, as the _rn intrinsics).
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

// Bit-level conversions (no dependence on the compiler's _Float16); tested against torch.
inline float __half2float(__half h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16, exp = (h.bits >> 10) & 0x1fu,
                 mant = h.bits & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24
    const float f = float(mant) * 5.9604644775390625e-8f;
    return sign ? -f : f;
  }
  return cdcl_emu::from_bits<float>(
      sign | (exp == 31 ? 0x7f800000u | (mant << 13) : ((exp + 112u) << 23) | (mant << 13)));
}
inline __half __float2half_rn(float x) {
  const uint32_t u = uint32_t(cdcl_emu::to_bits(x));
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  __half h;
  if (a >= 0x7f800000u) {  // inf, NaN (kept quiet)
    h.bits = sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u);
  } else if (a >= 0x477ff000u) {  // 65520 and above round to inf
    h.bits = sign | 0x7c00u;
  } else if (a < 0x38800000u) {  // below 2^-14: a subnormal half, round(|x| * 2^24) to even
    h.bits = sign | uint16_t(std::nearbyint(cdcl_emu::from_bits<float>(a) * 16777216.0f));
  } else {
    uint32_t bits = ((a >> 23) - 112u) << 10 | ((a & 0x7fffffu) >> 13);
    const uint32_t rest = a & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (bits & 1u))) ++bits;  // a carry may reach inf
    h.bits = sign | uint16_t(bits);
  }
  return h;
}
inline float __bfloat162float(__nv_bfloat16 h) { return cdcl_emu::from_bits<float>(uint32_t(h.bits) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  const uint32_t u = uint32_t(cdcl_emu::to_bits(x));
  __nv_bfloat16 h;
  if (std::isnan(x)) {
    h.bits = uint16_t((u >> 16) | 0x40);  // stays a quiet NaN
  } else {
    h.bits = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  return h;
}
