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

CDCL_MULTIVERSION void classify_by_bits(uint8_t* code, int64_t n, int32_t label, const int32_t* lab,
                                        const int32_t* grp, uint64_t bits) {
  classify_by_bits_impl(code, n, label, lab, grp, bits);
}

CDCL_MULTIVERSION float positive_sum(const float* row, const uint8_t* code, const float* col,
                                     float* pw, int64_t n, int64_t* count) {
  return positive_sum_impl(row, code, col, pw, n, count);
}

CDCL_MULTIVERSION float positive_softplus(float* row, const uint8_t* code, const float* col,
                                          int64_t n, float scale, float lse, float* sig_sum) {
  return positive_softplus_impl(row, code, col, n, scale, lse, sig_sum);
}

CDCL_MULTIVERSION void contrast_grad_weights(bool all, float* row, const uint8_t* code,
                                             const float* lse, const float* gs_lse,
                                             const float* gs_pos, const float* q_scale,
                                             const float* q_inv, int64_t n, float k_inv) {
  if (all)
    contrast_grad_weights_impl<true>(row, code, lse, gs_lse, gs_pos, q_scale, q_inv, n, k_inv);
  else
    contrast_grad_weights_impl<false>(row, code, lse, gs_lse, gs_pos, q_scale, q_inv, n, k_inv);
}

}  // namespace cdcl::cpu
