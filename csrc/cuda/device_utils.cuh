// Device helpers shared by the CUDA-core and tensor-core InfoNCE kernels.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launch.h"

namespace cdcl::cuda {

constexpr unsigned FULL = 0xffffffffu;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// max of two scores that keeps NaN (fmaxf drops it, and a NaN bank row would leave the loss finite)
__device__ __forceinline__ float nan_max(float a, float b) { return (a != a || a > b) ? a : b; }
__device__ __forceinline__ float warp_max(float v) {
  for (int off = 16; off > 0; off >>= 1) v = nan_max(v, __shfl_xor_sync(FULL, v, off));
  return v;
}

// s * inv_tau, rounded on its own: with tau = 1e-4 a score is ~1e4, and the bank gradient must
// see the forward's number bit for bit, which an FMA contracted with the next subtraction in one
// kernel but not the other would break (one rounding at 1e4 moves exp(s - lse) by ~5e-4)
__device__ __forceinline__ float score(float dot, float inv_tau) { return __fmul_rn(dot, inv_tau); }
__device__ __forceinline__ float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(FULL, v, off);
  return v;
}

// J(query, bank row) of docs/design.md §2 in the canonical encoding. Group ids >= groups (possible only
// when the caller skipped the input checks) count as no negative rather than reading past the table.
__device__ __forceinline__ bool is_negative(int32_t q_lab, int32_t q_grp, int32_t k_lab,
                                            int32_t k_grp, const bool* table, int64_t groups) {
  return q_grp >= 0 && k_grp >= 0 && q_grp < groups && k_grp < groups && q_lab != k_lab &&
         table[q_grp * groups + k_grp];
}

// Query i's results from its final running max and sum (online log-sum-exp seeded with s+);
// lane 0 of the warp writes them.
__device__ __forceinline__ void store_loss_lse(float* loss, float* lse, int64_t i, float s_pos,
                                               float run_max, float run_sum) {
  if (threadIdx.x % 32 == 0) {
    const float log_sum = logf(run_sum);
    loss[i] = (run_max - s_pos) + log_sum;
    lse[i] = run_max + log_sum;
  }
}

// Stage the per-row vectors of a streamed tile in shared memory (threads 0..tile-1 of the block):
// bank labels and groups for the forward; query labels, groups, LSE and gs for the bank gradient.
// Rows past the end get group -1 (no negative) and zero weight.
__device__ __forceinline__ void stage_bank_ids(int32_t* lab_s, int32_t* grp_s, const Masks& masks,
                                               int64_t row0, int tile, int64_t m) {
  if (threadIdx.x < tile) {
    const int64_t j = row0 + threadIdx.x;
    lab_s[threadIdx.x] = j < m ? masks.k_lab[j] : 0;
    grp_s[threadIdx.x] = j < m ? masks.k_grp[j] : -1;
  }
}
__device__ __forceinline__ void stage_query_rows(int32_t* lab_s, int32_t* grp_s, float* lse_s,
                                                 float* gs_s, const Masks& masks, const float* lse,
                                                 const float* gs, int64_t row0, int tile,
                                                 int64_t n) {
  if (threadIdx.x < tile) {
    const int64_t i = row0 + threadIdx.x;
    lab_s[threadIdx.x] = i < n ? masks.q_lab[i] : 0;
    grp_s[threadIdx.x] = i < n ? masks.q_grp[i] : -1;
    lse_s[threadIdx.x] = i < n ? lse[i] : 0.0f;
    gs_s[threadIdx.x] = i < n ? gs[i] : 0.0f;
  }
}

// Copy rows [row0, row0 + rows) of a (total, d) matrix into shared memory as unit rows (each
// scaled by its inverse norm, computed in fp32, stored as Dst) with row stride ld, zero-filling
// missing rows and the padding columns d..cols. All threads of the block take part.
template <typename Dst, typename T>
__device__ void load_rows(Dst* dst, const T* src, const float* inv_norm, int64_t row0, int rows,
                          int64_t total, int64_t d, int cols, int ld) {
  for (int idx = threadIdx.x; idx < rows * cols; idx += blockDim.x) {
    const int r = idx / cols, c = idx % cols;
    const int64_t row = row0 + r;
    dst[r * ld + c] =
        from_f32<Dst>((row < total && c < d) ? to_f32(src[row * d + c]) * inv_norm[row] : 0.0f);
  }
}

}  // namespace cdcl::cuda
