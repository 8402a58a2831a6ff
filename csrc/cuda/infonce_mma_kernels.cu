// Tensor-core (WMMA, sm_80+) forward and bank gradient of the masked InfoNCE for bf16/fp16
// features, D <= 256, fp32 accumulation. Same results as the CUDA-core kernels of
// infonce_kernels.cu up to the 16-bit rounding of the unit rows and of the softmax weights that
// feed the second product (as the Triton kernels do).
//
// Forward: a block of 4 warps owns 64 queries (16 per warp: one fragment row), held in shared
// memory as 16-bit unit rows; bank tiles of 64 rows stream through shared memory. Per tile a warp
//   1. computes its 16 x 64 scores S = Q_w K^T with 16x16x16 MMAs into shared memory,
//   2. masks them and runs the online log-sum-exp row by row (the warp's 32 lanes split a row),
//      writing the weights P (16-bit) and each row's rescale factor,
//   3. rescales its O rows (fp32, shared memory) and accumulates O_w += P K with MMAs.
// WMMA keeps the accumulator layout opaque, so O lives in shared memory, where rows can be
// rescaled, and is loaded into fragments around each product.
// Bank gradient: the mirror image without rescaling: a block owns 64 bank rows and streams query
// tiles, W = J exp(s - lse) gs, dK_w += W Q. Every output row is produced by one warp in a fixed
// order: deterministic, no atomics.
#include <mma.h>

#include <cstdint>

#include "device_utils.cuh"
#include "launch.h"

namespace cdcl::cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int MW = 4;          // warps per block
constexpr int WR = 16;         // rows a warp owns (one fragment)
constexpr int BR = MW * WR;    // rows a block owns
constexpr int BT = 64;         // streamed rows per tile
constexpr int F = 16;          // fragment edge
constexpr int LDS = BT + 4;    // fp32 score rows (a multiple of 4, as WMMA asks of fp32)
constexpr int LDP = BT + 8;    // 16-bit weight rows (a multiple of 8)

// Shared-memory layout for a padded width dp (a multiple of 16). Every region starts on a
// 128-byte boundary and every fragment pointer lands on 32 bytes, as load/store_matrix_sync need.
struct Layout {
  int dp, ldh, ldo;  // padded D, 16-bit row stride, fp32 accumulator row stride
  size_t own, tile, scores, weights, acc, total;
  __host__ __device__ static size_t up(size_t bytes) { return (bytes + 127) / 128 * 128; }
  __host__ __device__ explicit Layout(int64_t d) {
    dp = int((d + F - 1) / F * F);
    ldh = dp + 8;
    ldo = dp + 4;
    own = 0;
    tile = own + up(size_t(BR) * ldh * 2);
    scores = tile + up(size_t(BT) * ldh * 2);
    weights = scores + up(size_t(BR) * LDS * 4);
    acc = weights + up(size_t(BR) * LDP * 2);
    total = acc + up(size_t(BR) * ldo * 4);
  }
};

template <typename T>
using FragA = wmma::fragment<wmma::matrix_a, F, F, F, T, wmma::row_major>;
template <typename T, typename Layout_>
using FragB = wmma::fragment<wmma::matrix_b, F, F, F, T, Layout_>;
using FragC = wmma::fragment<wmma::accumulator, F, F, F, float>;

// s (WR x BT, fp32, stride LDS) = own (WR x dp) . tile^T, tile (BT x dp) row-major.
template <typename T>
__device__ void scores_mma(float* s, const T* own, const T* tile, int dp, int ldh) {
  for (int nb = 0; nb < BT / F; ++nb) {
    FragC c;
    wmma::fill_fragment(c, 0.0f);
    for (int kk = 0; kk < dp / F; ++kk) {
      FragA<T> a;
      FragB<T, wmma::col_major> b;  // B[k][n] = tile[n][k]
      wmma::load_matrix_sync(a, own + kk * F, ldh);
      wmma::load_matrix_sync(b, tile + nb * F * ldh + kk * F, ldh);
      wmma::mma_sync(c, a, b, c);
    }
    wmma::store_matrix_sync(s + nb * F, c, LDS, wmma::mem_row_major);
  }
}

// acc (WR x dp, fp32, stride ldo) += w (WR x BT, 16-bit, stride LDP) . tile (BT x dp)
template <typename T>
__device__ void accumulate_mma(float* acc, const T* w, const T* tile, int dp, int ldh, int ldo) {
  for (int j = 0; j < dp / F; ++j) {
    FragC c;
    wmma::load_matrix_sync(c, acc + j * F, ldo, wmma::mem_row_major);
    for (int kk = 0; kk < BT / F; ++kk) {
      FragA<T> a;
      FragB<T, wmma::row_major> b;  // B[k][n] = tile[k][n]
      wmma::load_matrix_sync(a, w + kk * F, LDP);
      wmma::load_matrix_sync(b, tile + kk * F * ldh + j * F, ldh);
      wmma::mma_sync(c, a, b, c);
    }
    wmma::store_matrix_sync(acc + j * F, c, ldo, wmma::mem_row_major);
  }
}

template <typename T>
__global__ void __launch_bounds__(MW * 32)
forward_mma_kernel(const T* __restrict__ q, const T* __restrict__ p, const T* __restrict__ k,
                   InverseNorms inv, Masks masks, int64_t n, int64_t m, int64_t d, float inv_tau,
                   float* __restrict__ loss, float* __restrict__ lse, float* __restrict__ o) {
  extern __shared__ __align__(128) unsigned char smem[];
  const Layout L(d);
  T* q_s = reinterpret_cast<T*>(smem + L.own);
  T* k_s = reinterpret_cast<T*>(smem + L.tile);
  __shared__ int32_t k_lab_s[BT], k_grp_s[BT];
  __shared__ float alpha_s[BR];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* s_w = reinterpret_cast<float*>(smem + L.scores) + warp * WR * LDS;
  T* p_w = reinterpret_cast<T*>(smem + L.weights) + warp * WR * LDP;
  float* o_w = reinterpret_cast<float*>(smem + L.acc) + warp * WR * L.ldo;
  const int64_t q0 = int64_t(blockIdx.x) * BR;

  load_rows(q_s, q, inv.q, q0, BR, n, d, L.dp, L.ldh);
  for (int idx = lane; idx < WR * L.ldo; idx += 32) o_w[idx] = 0.0f;

  // Row state: every lane of the warp holds the same copy for each of its 16 rows.
  float s_pos[WR], run_max[WR], run_sum[WR];
  int32_t my_lab[WR], my_grp[WR];
  bool any_active = false;
#pragma unroll
  for (int r = 0; r < WR; ++r) {
    const int64_t i = q0 + warp * WR + r;
    float dot = 0.0f;
    // unit-row products element by element: raw rows near the float maximum would overflow,
    // and inv.q * inv.p underflow
    if (i < n)
      for (int64_t c = lane; c < d; c += 32)
        dot += (to_f32(q[i * d + c]) * inv.q[i]) * (to_f32(p[i * d + c]) * inv.p[i]);
    s_pos[r] = score(warp_sum(dot), inv_tau);
    run_max[r] = s_pos[r];  // seeded with s+: a row without negatives keeps LSE = s+, loss 0
    run_sum[r] = 1.0f;
    my_lab[r] = i < n ? masks.q_lab[i] : 0;
    my_grp[r] = i < n ? masks.q_grp[i] : -1;
    any_active |= my_grp[r] >= 0;
  }
  any_active = __syncthreads_or(any_active);  // block-uniform, so every thread meets each barrier

  for (int64_t c0 = 0; any_active && c0 < m; c0 += BT) {
    __syncthreads();  // the previous tile is no longer read
    load_rows(k_s, k, inv.k, c0, BT, m, d, L.dp, L.ldh);
    stage_bank_ids(k_lab_s, k_grp_s, masks, c0, BT, m);
    __syncthreads();

    scores_mma(s_w, q_s + warp * WR * L.ldh, k_s, L.dp, L.ldh);
    __syncwarp();

    bool any_weight = false;
#pragma unroll
    for (int r = 0; r < WR; ++r) {
      float v[2], e[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int j = lane + 32 * h;
        const bool valid = is_negative(my_lab[r], my_grp[r], k_lab_s[j], k_grp_s[j], masks.table,
                                       masks.groups);
        v[h] = valid ? score(s_w[r * LDS + j], inv_tau) : -INFINITY;
      }
      const float tile_max = warp_max(nan_max(v[0], v[1]));
      float alpha = 1.0f;
      if (tile_max == -INFINITY) {  // warp-uniform: nothing from this tile for row r
        e[0] = e[1] = 0.0f;
      } else {
        const float m_new = fmaxf(run_max[r], tile_max);
        alpha = __expf(run_max[r] - m_new);
        for (int h = 0; h < 2; ++h) e[h] = v[h] == -INFINITY ? 0.0f : __expf(v[h] - m_new);
        run_sum[r] = run_sum[r] * alpha + warp_sum(e[0] + e[1]);
        run_max[r] = m_new;
        any_weight = true;
      }
      p_w[r * LDP + lane] = from_f32<T>(e[0]);
      p_w[r * LDP + lane + 32] = from_f32<T>(e[1]);
      if (lane == 0) alpha_s[warp * WR + r] = alpha;
    }
    __syncwarp();
    if (o != nullptr && any_weight) {  // any_weight is warp-uniform
      for (int idx = lane; idx < WR * L.dp; idx += 32) {
        const int r = idx / L.dp, c = idx % L.dp;
        o_w[r * L.ldo + c] *= alpha_s[warp * WR + r];
      }
      __syncwarp();
      accumulate_mma(o_w, p_w, k_s, L.dp, L.ldh, L.ldo);
      __syncwarp();
    }
  }

#pragma unroll
  for (int r = 0; r < WR; ++r) {
    const int64_t i = q0 + warp * WR + r;
    if (i >= n) continue;
    store_loss_lse(loss, lse, i, s_pos[r], run_max[r], run_sum[r]);
    if (o != nullptr) {
      const float inv_sum = 1.0f / run_sum[r];
      for (int64_t c = lane; c < d; c += 32) o[i * d + c] = o_w[r * L.ldo + c] * inv_sum;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(MW * 32)
bank_grad_mma_kernel(const T* __restrict__ q, const T* __restrict__ k, InverseNorms inv,
                     Masks masks, const float* __restrict__ lse, const float* __restrict__ gs,
                     int64_t n, int64_t m, int64_t d, float inv_tau, float* __restrict__ dk) {
  extern __shared__ __align__(128) unsigned char smem[];
  const Layout L(d);
  T* k_s = reinterpret_cast<T*>(smem + L.own);   // the bank rows this block owns
  T* q_s = reinterpret_cast<T*>(smem + L.tile);  // streamed queries
  __shared__ int32_t q_lab_s[BT], q_grp_s[BT];
  __shared__ float lse_s[BT], gs_s[BT];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* s_w = reinterpret_cast<float*>(smem + L.scores) + warp * WR * LDS;
  T* w_w = reinterpret_cast<T*>(smem + L.weights) + warp * WR * LDP;
  float* acc_w = reinterpret_cast<float*>(smem + L.acc) + warp * WR * L.ldo;
  const int64_t k0 = int64_t(blockIdx.x) * BR;

  load_rows(k_s, k, inv.k, k0, BR, m, d, L.dp, L.ldh);
  for (int idx = lane; idx < WR * L.ldo; idx += 32) acc_w[idx] = 0.0f;

  int32_t my_lab[WR], my_grp[WR];
  bool any_usable = false;
#pragma unroll
  for (int r = 0; r < WR; ++r) {
    const int64_t j = k0 + warp * WR + r;
    my_lab[r] = j < m ? masks.k_lab[j] : 0;
    my_grp[r] = j < m ? masks.k_grp[j] : -1;
    any_usable |= my_grp[r] >= 0;
  }
  any_usable = __syncthreads_or(any_usable);

  for (int64_t a = 0; any_usable && a < n; a += BT) {
    __syncthreads();
    load_rows(q_s, q, inv.q, a, BT, n, d, L.dp, L.ldh);
    stage_query_rows(q_lab_s, q_grp_s, lse_s, gs_s, masks, lse, gs, a, BT, n);
    __syncthreads();

    scores_mma(s_w, k_s + warp * WR * L.ldh, q_s, L.dp, L.ldh);
    __syncwarp();

    bool any_weight = false;
  #pragma unroll
  for (int r = 0; r < WR; ++r) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int i = lane + 32 * h;
        const bool valid = is_negative(q_lab_s[i], q_grp_s[i], my_lab[r], my_grp[r], masks.table,
                                       masks.groups);
        const float w =
            valid ? __expf(score(s_w[r * LDS + i], inv_tau) - lse_s[i]) * gs_s[i] : 0.0f;
        any_weight |= w != 0.0f;
        w_w[r * LDP + i] = from_f32<T>(w);
      }
    }
    __syncwarp();
    if (__any_sync(FULL, any_weight)) {
      accumulate_mma(acc_w, w_w, q_s, L.dp, L.ldh, L.ldo);
      __syncwarp();
    }
  }

#pragma unroll
  for (int r = 0; r < WR; ++r) {
    const int64_t j = k0 + warp * WR + r;
    if (j >= m) continue;
    for (int64_t c = lane; c < d; c += 32) dk[j * d + c] = acc_w[r * L.ldo + c];
  }
}

template <typename Kernel, typename... Args>
cudaError_t launch_mma(Kernel kernel, int64_t rows, int64_t d, cudaStream_t stream, Args... args) {
  const size_t bytes = Layout(d).total;
  int device = 0, limit = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  // the static arrays of the kernels take under 1 KB
  if (bytes + 1024 > size_t(limit)) return cudaErrorNotSupported;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  if (err != cudaSuccess) return err;
  const int64_t blocks = (rows + BR - 1) / BR;
  kernel<<<dim3(static_cast<unsigned>(blocks)), dim3(MW * 32), bytes, stream>>>(args...);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_infonce_fwd_mma(Dtype dtype, const void* q, const void* p, const void* k,
                                   const InverseNorms& inv, const Masks& masks, int64_t n,
                                   int64_t m, int64_t d, float inv_tau, float* loss, float* lse,
                                   float* o, cudaStream_t stream) {
  if (d > MMA_MAX_D) return cudaErrorNotSupported;
  switch (dtype) {
    case Dtype::f16: {
      using T = __half;
      return launch_mma(forward_mma_kernel<T>, n, d, stream, static_cast<const T*>(q),
                        static_cast<const T*>(p), static_cast<const T*>(k), inv, masks, n, m, d,
                        inv_tau, loss, lse, o);
    }
    case Dtype::bf16: {
      using T = __nv_bfloat16;
      return launch_mma(forward_mma_kernel<T>, n, d, stream, static_cast<const T*>(q),
                        static_cast<const T*>(p), static_cast<const T*>(k), inv, masks, n, m, d,
                        inv_tau, loss, lse, o);
    }
    default: return cudaErrorNotSupported;
  }
}

cudaError_t launch_infonce_bank_grad_mma(Dtype dtype, const void* q, const void* k,
                                         const InverseNorms& inv, const Masks& masks,
                                         const float* lse, const float* gs, int64_t n, int64_t m,
                                         int64_t d, float inv_tau, float* dk, cudaStream_t stream) {
  if (d > MMA_MAX_D) return cudaErrorNotSupported;
  switch (dtype) {
    case Dtype::f16: {
      using T = __half;
      return launch_mma(bank_grad_mma_kernel<T>, m, d, stream, static_cast<const T*>(q),
                        static_cast<const T*>(k), inv, masks, lse, gs, n, m, d, inv_tau, dk);
    }
    case Dtype::bf16: {
      using T = __nv_bfloat16;
      return launch_mma(bank_grad_mma_kernel<T>, m, d, stream, static_cast<const T*>(q),
                        static_cast<const T*>(k), inv, masks, lse, gs, n, m, d, inv_tau, dk);
    }
    default: return cudaErrorNotSupported;
  }
}

}  // namespace cdcl::cuda
