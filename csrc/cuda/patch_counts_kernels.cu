// Foreground pixel counts per patch (docs/design.md §3): one block per (image, patch); the argmax over
// classes is fused when logits are given (first maximum wins, NaN counts as the maximum, as
// torch.argmax). Integer counts, so the block reduction is exact whatever the order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launch.h"

namespace cdcl::cuda {
namespace {

constexpr int THREADS = 128;

// logits compared in fp32 (16-bit values convert exactly), float64 ones in double
__device__ __forceinline__ float logit(float x) { return x; }
__device__ __forceinline__ double logit(double x) { return x; }
__device__ __forceinline__ float logit(__half x) { return __half2float(x); }
__device__ __forceinline__ float logit(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ int64_t argmax_channel(const T* px, int64_t channels, int64_t stride) {
  int64_t best = 0;
  auto best_v = logit(px[0]);
  for (int64_t c = 1; c < channels; ++c) {
    const auto v = logit(px[c * stride]);
    if (v > best_v || (v != v && best_v == best_v)) {
      best_v = v;
      best = c;
    }
  }
  return best;
}

template <typename T, bool LOGITS>
__global__ void __launch_bounds__(THREADS)
patch_counts_kernel(const T* __restrict__ input, int64_t channels, int64_t h, int64_t w,
                    int64_t grid, int64_t fg_class, int32_t* __restrict__ counts) {
  const int64_t patch = blockIdx.x;  // (image, gy, gx) flattened
  const int64_t image = patch / (grid * grid), gy = (patch / grid) % grid, gx = patch % grid;
  const int64_t ph = h / grid, pw = w / grid;
  const T* base = input + image * channels * h * w;
  int count = 0;
  for (int64_t idx = threadIdx.x; idx < ph * pw; idx += THREADS) {
    const int64_t y = gy * ph + idx / pw, x = gx * pw + idx % pw;
    const T* px = base + y * w + x;
    if constexpr (LOGITS) count += argmax_channel(px, channels, h * w) == fg_class;
    else count += static_cast<int64_t>(*px) == fg_class;
  }
  for (int off = 16; off > 0; off >>= 1) count += __shfl_xor_sync(0xffffffffu, count, off);
  __shared__ int warp_counts[THREADS / 32];
  if (threadIdx.x % 32 == 0) warp_counts[threadIdx.x / 32] = count;
  __syncthreads();
  if (threadIdx.x == 0) {
    int total = 0;
    for (int i = 0; i < THREADS / 32; ++i) total += warp_counts[i];
    counts[patch] = total;
  }
}

template <typename T, bool LOGITS>
cudaError_t launch_typed(const void* input, int64_t b, int64_t c, int64_t h, int64_t w,
                         int64_t grid, int64_t fg_class, int32_t* counts, cudaStream_t stream) {
  const int64_t patches = b * grid * grid;
  if (patches == 0) return cudaSuccess;
  patch_counts_kernel<T, LOGITS><<<dim3(static_cast<unsigned>(patches)), dim3(THREADS), 0, stream>>>(
      static_cast<const T*>(input), c, h, w, grid, fg_class, counts);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_patch_fg_counts(PixelType type, const void* input, int64_t b, int64_t c,
                                   int64_t h, int64_t w, int64_t grid, int64_t fg_class,
                                   int32_t* counts, cudaStream_t stream) {
  switch (type) {
    case PixelType::i64: return launch_typed<int64_t, false>(input, b, 1, h, w, grid, fg_class, counts, stream);
    case PixelType::i32: return launch_typed<int32_t, false>(input, b, 1, h, w, grid, fg_class, counts, stream);
    case PixelType::i16: return launch_typed<int16_t, false>(input, b, 1, h, w, grid, fg_class, counts, stream);
    case PixelType::i8: return launch_typed<int8_t, false>(input, b, 1, h, w, grid, fg_class, counts, stream);
    case PixelType::u8: return launch_typed<uint8_t, false>(input, b, 1, h, w, grid, fg_class, counts, stream);
    case PixelType::boolean: return launch_typed<bool, false>(input, b, 1, h, w, grid, fg_class, counts, stream);
    case PixelType::f32: return launch_typed<float, true>(input, b, c, h, w, grid, fg_class, counts, stream);
    case PixelType::f64: return launch_typed<double, true>(input, b, c, h, w, grid, fg_class, counts, stream);
    case PixelType::f16: return launch_typed<__half, true>(input, b, c, h, w, grid, fg_class, counts, stream);
    case PixelType::bf16: return launch_typed<__nv_bfloat16, true>(input, b, c, h, w, grid, fg_class, counts, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cdcl::cuda
