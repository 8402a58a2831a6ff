// C entry points over the launchers of csrc/cuda/launch.h, for ctypes
// (tests/native/cuda_emulator.py).
// Pointers are host memory here: the emulated device shares the CPU's address space.
#include "emu.h"
#include "launch.h"

using namespace cdcl::cuda;

extern "C" {

int cdcl_emu_infonce_fwd(int dtype, const void* q, const void* p, const void* k, const float* inv_q,
                         const float* inv_p, const float* inv_k, const int32_t* q_lab,
                         const int32_t* q_grp, const int32_t* k_lab, const int32_t* k_grp,
                         const bool* table, int64_t groups, int64_t n, int64_t m, int64_t d,
                         float inv_tau, int tensor_cores, float* loss, float* lse, float* o) {
  return launch_infonce_fwd(Dtype(dtype), q, p, k, InverseNorms{inv_q, inv_p, inv_k},
                            Masks{q_lab, q_grp, k_lab, k_grp, table, groups}, n, m, d, inv_tau,
                            tensor_cores != 0, loss, lse, o, nullptr);
}

int cdcl_emu_infonce_bank_grad(int dtype, const void* q, const void* k, const float* inv_q,
                               const float* inv_k, const int32_t* q_lab, const int32_t* q_grp,
                               const int32_t* k_lab, const int32_t* k_grp, const bool* table,
                               int64_t groups, const float* lse, const float* gs, int64_t n,
                               int64_t m, int64_t d, float inv_tau, int tensor_cores, float* dk) {
  return launch_infonce_bank_grad(Dtype(dtype), q, k, InverseNorms{inv_q, nullptr, inv_k},
                                  Masks{q_lab, q_grp, k_lab, k_grp, table, groups}, lse, gs, n, m,
                                  d, inv_tau, tensor_cores != 0, dk, nullptr);
}

int cdcl_emu_patch_fg_counts(int pixel_type, const void* input, int64_t b, int64_t c, int64_t h,
                             int64_t w, int64_t grid, int64_t fg_class, int32_t* counts) {
  return launch_patch_fg_counts(PixelType(pixel_type), input, b, c, h, w, grid, fg_class, counts,
                                nullptr);
}

}  // extern "C"
