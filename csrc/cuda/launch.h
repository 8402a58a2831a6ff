// Plain C++ interface between the torch glue (cuda_glue.cpp) and the CUDA kernels (*.cu). The .cu
// files include no torch headers, so they compile with nvcc alone (the compile-only check on CPU
// machines) and the glue keeps the ATen/c10 parts: streams, device guards, error checks.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace cdcl::cuda {

enum class Dtype { f32, f16, bf16 };

// The canonical mask encoding of cdcl_ops/_validate.py (device pointers).
struct Masks {
  const int32_t* q_lab;
  const int32_t* q_grp;
  const int32_t* k_lab;
  const int32_t* k_grp;
  const bool* table;  // (groups, groups)
  int64_t groups;
};

// Inverse L2 norms of the raw feature rows (device pointers, fp32): the kernels scale every row
// as they load it, so they work on unit rows without a normalised copy. p is unused by the
// bank gradient.
struct InverseNorms {
  const float* q;
  const float* p;
  const float* k;
};

constexpr int64_t MAX_D = 512;

// loss, lse: (n,) fp32; o: (n, d) fp32 or nullptr when the query gradient is not needed.
// tensor_cores: use the tensor-core kernels where they apply (16-bit features, d <= MMA_MAX_D,
// enough shared memory), the CUDA-core kernels otherwise.
cudaError_t launch_infonce_fwd(Dtype dtype, const void* q, const void* p, const void* k,
                               const InverseNorms& inv, const Masks& masks, int64_t n, int64_t m,
                               int64_t d, float inv_tau, bool tensor_cores, float* loss,
                               float* lse, float* o, cudaStream_t stream);

// dk: (m, d) fp32, the gradient with respect to the unit bank rows; lse, gs: (n,) fp32
// (gs = upstream gradient / tau).
cudaError_t launch_infonce_bank_grad(Dtype dtype, const void* q, const void* k,
                                     const InverseNorms& inv, const Masks& masks, const float* lse,
                                     const float* gs, int64_t n, int64_t m, int64_t d,
                                     float inv_tau, bool tensor_cores, float* dk,
                                     cudaStream_t stream);

// The tensor-core kernels (infonce_mma_kernels.cu), same arguments; cudaErrorNotSupported where
// they do not apply (fp32 features, d > MMA_MAX_D, too little shared memory on this device).
constexpr int64_t MMA_MAX_D = 256;
cudaError_t launch_infonce_fwd_mma(Dtype dtype, const void* q, const void* p, const void* k,
                                   const InverseNorms& inv, const Masks& masks, int64_t n,
                                   int64_t m, int64_t d, float inv_tau, float* loss, float* lse,
                                   float* o, cudaStream_t stream);
cudaError_t launch_infonce_bank_grad_mma(Dtype dtype, const void* q, const void* k,
                                         const InverseNorms& inv, const Masks& masks,
                                         const float* lse, const float* gs, int64_t n, int64_t m,
                                         int64_t d, float inv_tau, float* dk, cudaStream_t stream);

enum class PixelType { i64, i32, i16, i8, u8, boolean, f32, f64, f16, bf16 };

// counts: (b, grid, grid) int32. Integer input: (b, h, w) labels; float input: (b, c, h, w)
// logits, contiguous.
cudaError_t launch_patch_fg_counts(PixelType type, const void* input, int64_t b, int64_t c,
                                   int64_t h, int64_t w, int64_t grid, int64_t fg_class,
                                   int32_t* counts, cudaStream_t stream);

}  // namespace cdcl::cuda
