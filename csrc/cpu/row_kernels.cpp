// The float row passes, compiled once per target of CDCL_MULTIVERSION.
#include "row_kernels.h"

namespace cdcl::cpu {

CDCL_MULTIVERSION float mask_scale_max(float* row, const uint8_t* ok, const float* col, int64_t n,
                                        float scale) {
  return mask_scale_max_impl(row, ok, col, n, scale);
}

CDCL_MULTIVERSION float exp_sum(float* row, const float* col, int64_t n, float shift) {
  return exp_sum_impl(row, col, n, shift);
}

CDCL_MULTIVERSION void grad_weights(float* row, const uint8_t* ok, const float* lse,
                                    const float* gs, const float* q_scale, const float* q_inv,
                                    int64_t n, float k_inv) {
  grad_weights_impl(row, ok, lse, gs, q_scale, q_inv, n, k_inv);
}

CDCL_MULTIVERSION void negatives_by_bits(uint8_t* ok, int64_t n, int32_t label, const int32_t* lab,
                                         const int32_t* grp, uint64_t bits) {
  negatives_by_bits_impl(ok, n, label, lab, grp, bits);
}

}  // namespace cdcl::cpu
