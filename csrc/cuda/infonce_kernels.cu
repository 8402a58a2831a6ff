// CUDA forward and bank gradient of the masked InfoNCE (docs/design.md §3), fp32 accumulation for
// fp32/bf16/fp16 features.
//
// Forward: a block of 4 warps owns 16 queries (4 per warp), kept in shared memory as fp32; bank
// tiles of 32 rows are streamed through shared memory. Lane j of a warp scores bank row j of the
// tile against the warp's 4 queries, the warp then updates each query's running max, running sum
// and output row O_i (lane owns columns lane, lane + 32, ...) with the online log-sum-exp.
// Bank gradient: the mirror image, a block owns 16 bank rows and streams query tiles; every dK row
// is summed by one warp in a fixed order, so the result is deterministic (no atomics).
// Rows are scaled by their inverse norms as they are loaded (the inputs are the raw features), so
// everything below works on unit rows. Inner products run on CUDA cores in fp32; the tensor-core
// kernels for 16-bit features are in infonce_mma_kernels.cu, chosen by the launchers at the end.
#include <cstdint>

#include "device_utils.cuh"
#include "launch.h"

namespace cdcl::cuda {
namespace {

constexpr int WARPS = 4;
constexpr int ROWS_PER_WARP = 4;
constexpr int OWN_ROWS = WARPS * ROWS_PER_WARP;  // rows a block owns
constexpr int TILE = 32;                         // streamed rows per tile: one per lane

// Layout of the dynamic shared memory: own rows (OWN_ROWS x cols), then the streamed tile
// (TILE x (cols + 1): the odd stride keeps lanes reading different rows off the same bank).
__host__ __device__ constexpr int tile_ld(int cols) { return cols + 1; }
__host__ __device__ constexpr size_t smem_bytes(int cols) {
  return sizeof(float) * (size_t(OWN_ROWS) * cols + size_t(TILE) * tile_ld(cols));
}

template <typename T, int DT>
__global__ void __launch_bounds__(WARPS * 32)
forward_kernel(const T* __restrict__ q, const T* __restrict__ p, const T* __restrict__ k,
               InverseNorms inv, Masks masks, int64_t n, int64_t m, int64_t d, float inv_tau,
               float* __restrict__ loss, float* __restrict__ lse, float* __restrict__ o) {
  constexpr int COLS = 32 * DT;
  extern __shared__ float smem[];
  float* q_s = smem;                       // OWN_ROWS x COLS
  float* k_s = smem + OWN_ROWS * COLS;     // TILE x tile_ld(COLS)
  __shared__ int32_t k_lab_s[TILE], k_grp_s[TILE];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t q0 = int64_t(blockIdx.x) * OWN_ROWS;
  load_rows(q_s, q, inv.q, q0, OWN_ROWS, n, d, COLS, COLS);
  __syncthreads();

  float s_pos[ROWS_PER_WARP], run_max[ROWS_PER_WARP], run_sum[ROWS_PER_WARP];
  float out[ROWS_PER_WARP][DT];
  int32_t my_lab[ROWS_PER_WARP], my_grp[ROWS_PER_WARP];
#pragma unroll
  for (int r = 0; r < ROWS_PER_WARP; ++r) {
    const int local = warp * ROWS_PER_WARP + r;
    const int64_t i = q0 + local;
    float dot = 0.0f;
    // the positive scaled to a unit row element by element: a raw row near the float maximum
    // would overflow the sum
    if (i < n)
      for (int64_t c = lane; c < d; c += 32)
        dot += q_s[local * COLS + c] * (to_f32(p[i * d + c]) * inv.p[i]);
    s_pos[r] = score(warp_sum(dot), inv_tau);
    run_max[r] = s_pos[r];  // seeded with s+: a row without negatives keeps LSE = s+, loss 0
    run_sum[r] = 1.0f;
    my_lab[r] = i < n ? masks.q_lab[i] : 0;
    my_grp[r] = i < n ? masks.q_grp[i] : -1;
#pragma unroll
    for (int t = 0; t < DT; ++t) out[r][t] = 0.0f;
  }
  bool any_active = false;
  for (int r = 0; r < ROWS_PER_WARP; ++r) any_active |= my_grp[r] >= 0;
  // block-uniform decision, so every thread reaches the same __syncthreads
  any_active = __syncthreads_or(any_active);

  for (int64_t c0 = 0; any_active && c0 < m; c0 += TILE) {
    __syncthreads();  // the previous tile is no longer read
    load_rows(k_s, k, inv.k, c0, TILE, m, d, COLS, tile_ld(COLS));
    stage_bank_ids(k_lab_s, k_grp_s, masks, c0, TILE, m);
    __syncthreads();

    float s[ROWS_PER_WARP] = {};
    const float* k_row = k_s + lane * tile_ld(COLS);
    for (int64_t c = 0; c < d; ++c) {
      const float kv = k_row[c];
#pragma unroll
      for (int r = 0; r < ROWS_PER_WARP; ++r) s[r] += q_s[(warp * ROWS_PER_WARP + r) * COLS + c] * kv;
    }
    const int32_t kl = k_lab_s[lane], kg = k_grp_s[lane];
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; ++r) {
      const bool valid = is_negative(my_lab[r], my_grp[r], kl, kg, masks.table, masks.groups);
      const float v = valid ? score(s[r], inv_tau) : -INFINITY;
      const float tile_max = warp_max(v);
      if (tile_max == -INFINITY) continue;  // warp-uniform: nothing to add for this query
      if (tile_max > run_max[r]) {  // false for NaN: the NaN score then makes run_sum NaN below
        const float alpha = __expf(run_max[r] - tile_max);
        run_sum[r] *= alpha;
#pragma unroll
        for (int t = 0; t < DT; ++t) out[r][t] *= alpha;
        run_max[r] = tile_max;
      }
      const float w = valid ? __expf(v - run_max[r]) : 0.0f;
      run_sum[r] += warp_sum(w);
      if (o != nullptr) {
        for (int j = 0; j < TILE; ++j) {
          const float wj = __shfl_sync(FULL, w, j);
          const float* kj = k_s + j * tile_ld(COLS);
#pragma unroll
          for (int t = 0; t < DT; ++t) out[r][t] += wj * kj[lane + 32 * t];
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < ROWS_PER_WARP; ++r) {
    const int64_t i = q0 + warp * ROWS_PER_WARP + r;
    if (i >= n) continue;
    store_loss_lse(loss, lse, i, s_pos[r], run_max[r], run_sum[r]);
    if (o != nullptr) {
      const float inv_sum = 1.0f / run_sum[r];
#pragma unroll
      for (int t = 0; t < DT; ++t) {
        const int64_t c = lane + 32 * t;
        if (c < d) o[i * d + c] = out[r][t] * inv_sum;
      }
    }
  }
}

template <typename T, int DT>
__global__ void __launch_bounds__(WARPS * 32)
bank_grad_kernel(const T* __restrict__ q, const T* __restrict__ k, InverseNorms inv, Masks masks,
                 const float* __restrict__ lse, const float* __restrict__ gs, int64_t n, int64_t m,
                 int64_t d, float inv_tau, float* __restrict__ dk) {
  constexpr int COLS = 32 * DT;
  extern __shared__ float smem[];
  float* k_s = smem;                    // OWN_ROWS x COLS: the bank rows this block owns
  float* q_s = smem + OWN_ROWS * COLS;  // TILE x tile_ld(COLS): streamed queries
  __shared__ int32_t q_lab_s[TILE], q_grp_s[TILE];
  __shared__ float lse_s[TILE], gs_s[TILE];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t k0 = int64_t(blockIdx.x) * OWN_ROWS;
  load_rows(k_s, k, inv.k, k0, OWN_ROWS, m, d, COLS, COLS);

  float acc[ROWS_PER_WARP][DT];
  int32_t my_lab[ROWS_PER_WARP], my_grp[ROWS_PER_WARP];
  bool any_usable = false;
#pragma unroll
  for (int r = 0; r < ROWS_PER_WARP; ++r) {
    const int64_t j = k0 + warp * ROWS_PER_WARP + r;
    my_lab[r] = j < m ? masks.k_lab[j] : 0;
    my_grp[r] = j < m ? masks.k_grp[j] : -1;
    any_usable |= my_grp[r] >= 0;
#pragma unroll
    for (int t = 0; t < DT; ++t) acc[r][t] = 0.0f;
  }
  any_usable = __syncthreads_or(any_usable);

  for (int64_t a = 0; any_usable && a < n; a += TILE) {
    __syncthreads();
    load_rows(q_s, q, inv.q, a, TILE, n, d, COLS, tile_ld(COLS));
    stage_query_rows(q_lab_s, q_grp_s, lse_s, gs_s, masks, lse, gs, a, TILE, n);
    __syncthreads();

    float s[ROWS_PER_WARP] = {};
    const float* q_row = q_s + lane * tile_ld(COLS);
    for (int64_t c = 0; c < d; ++c) {
      const float qv = q_row[c];
#pragma unroll
      for (int r = 0; r < ROWS_PER_WARP; ++r) s[r] += k_s[(warp * ROWS_PER_WARP + r) * COLS + c] * qv;
    }
    const int32_t ql = q_lab_s[lane], qg = q_grp_s[lane];
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; ++r) {
      const bool valid = is_negative(ql, qg, my_lab[r], my_grp[r], masks.table, masks.groups);
      const float w = valid ? __expf(score(s[r], inv_tau) - lse_s[lane]) * gs_s[lane] : 0.0f;
      if (!__any_sync(FULL, w != 0.0f)) continue;  // NaN != 0: a NaN weight is accumulated
      for (int i = 0; i < TILE; ++i) {
        const float wi = __shfl_sync(FULL, w, i);
        const float* qi = q_s + i * tile_ld(COLS);
#pragma unroll
        for (int t = 0; t < DT; ++t) acc[r][t] += wi * qi[lane + 32 * t];
      }
    }
  }

#pragma unroll
  for (int r = 0; r < ROWS_PER_WARP; ++r) {
    const int64_t j = k0 + warp * ROWS_PER_WARP + r;
    if (j >= m) continue;
#pragma unroll
    for (int t = 0; t < DT; ++t) {
      const int64_t c = lane + 32 * t;
      if (c < d) dk[j * d + c] = acc[r][t];
    }
  }
}

int column_chunks(int64_t d) {
  const int64_t need = (d + 31) / 32;
  for (int dt : {1, 2, 4, 8, 16})
    if (need <= dt) return dt;
  return 0;
}

template <typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, int64_t rows, int dt, cudaStream_t stream, Args... args) {
  const size_t bytes = smem_bytes(32 * dt);
  if (bytes > 48 * 1024) {  // above the default limit the kernel must opt in
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
    if (err != cudaSuccess) return err;
  }
  const int64_t blocks = (rows + OWN_ROWS - 1) / OWN_ROWS;
  kernel<<<dim3(static_cast<unsigned>(blocks)), dim3(WARPS * 32), bytes, stream>>>(args...);
  return cudaGetLastError();
}

template <typename T>
cudaError_t forward_typed(const void* q, const void* p, const void* k, const InverseNorms& inv,
                          const Masks& masks, int64_t n, int64_t m, int64_t d, float inv_tau,
                          float* loss, float* lse, float* o, cudaStream_t stream) {
  const auto* qt = static_cast<const T*>(q);
  const auto* pt = static_cast<const T*>(p);
  const auto* kt = static_cast<const T*>(k);
  switch (column_chunks(d)) {
#define CDCL_FWD_CASE(DT)                                                                      \
  case DT:                                                                                     \
    return launch(forward_kernel<T, DT>, n, DT, stream, qt, pt, kt, inv, masks, n, m, d,      \
                  inv_tau, loss, lse, o);
    CDCL_FWD_CASE(1) CDCL_FWD_CASE(2) CDCL_FWD_CASE(4) CDCL_FWD_CASE(8) CDCL_FWD_CASE(16)
#undef CDCL_FWD_CASE
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t bank_grad_typed(const void* q, const void* k, const InverseNorms& inv,
                            const Masks& masks, const float* lse, const float* gs, int64_t n,
                            int64_t m, int64_t d, float inv_tau, float* dk, cudaStream_t stream) {
  const auto* qt = static_cast<const T*>(q);
  const auto* kt = static_cast<const T*>(k);
  switch (column_chunks(d)) {
#define CDCL_GRAD_CASE(DT)                                                                     \
  case DT:                                                                                     \
    return launch(bank_grad_kernel<T, DT>, m, DT, stream, qt, kt, inv, masks, lse, gs, n, m,  \
                  d, inv_tau, dk);
    CDCL_GRAD_CASE(1) CDCL_GRAD_CASE(2) CDCL_GRAD_CASE(4) CDCL_GRAD_CASE(8) CDCL_GRAD_CASE(16)
#undef CDCL_GRAD_CASE
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_infonce_fwd(Dtype dtype, const void* q, const void* p, const void* k,
                               const InverseNorms& inv, const Masks& masks, int64_t n, int64_t m,
                               int64_t d, float inv_tau, bool tensor_cores, float* loss,
                               float* lse, float* o, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (tensor_cores) {
    const cudaError_t err =
        launch_infonce_fwd_mma(dtype, q, p, k, inv, masks, n, m, d, inv_tau, loss, lse, o, stream);
    if (err != cudaErrorNotSupported) return err;
  }
  switch (dtype) {
    case Dtype::f32:
      return forward_typed<float>(q, p, k, inv, masks, n, m, d, inv_tau, loss, lse, o, stream);
    case Dtype::f16:
      return forward_typed<__half>(q, p, k, inv, masks, n, m, d, inv_tau, loss, lse, o, stream);
    case Dtype::bf16:
      return forward_typed<__nv_bfloat16>(q, p, k, inv, masks, n, m, d, inv_tau, loss, lse, o,
                                          stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_infonce_bank_grad(Dtype dtype, const void* q, const void* k,
                                     const InverseNorms& inv, const Masks& masks, const float* lse,
                                     const float* gs, int64_t n, int64_t m, int64_t d,
                                     float inv_tau, bool tensor_cores, float* dk,
                                     cudaStream_t stream) {
  if (m == 0) return cudaSuccess;
  if (tensor_cores) {
    const cudaError_t err = launch_infonce_bank_grad_mma(dtype, q, k, inv, masks, lse, gs, n, m, d,
                                                         inv_tau, dk, stream);
    if (err != cudaErrorNotSupported) return err;
  }
  switch (dtype) {
    case Dtype::f32:
      return bank_grad_typed<float>(q, k, inv, masks, lse, gs, n, m, d, inv_tau, dk, stream);
    case Dtype::f16:
      return bank_grad_typed<__half>(q, k, inv, masks, lse, gs, n, m, d, inv_tau, dk, stream);
    case Dtype::bf16:
      return bank_grad_typed<__nv_bfloat16>(q, k, inv, masks, lse, gs, n, m, d, inv_tau, dk,
                                            stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cdcl::cuda
