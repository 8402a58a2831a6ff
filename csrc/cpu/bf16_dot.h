// The two inner products of the CPU kernels for bfloat16 rows on CPUs with AVX512-BF16
// (vdpbf16ps: pairs of bf16 products summed into fp32 lanes, twice the fp32 FMA rate).
//
// Scores are sums of exact products in fp32, as the fp32 path computes them from the upcast rows;
// only the weights of the second product (softmax weights times gs, fp32) are rounded to bf16
// (relative error 2^-9 per weight), as the Triton and CUDA tensor-core kernels round them.
// Elsewhere (no AVX512-BF16, or CDCL_OPS_CPU_BF16_DOT=0) the kernels upcast bf16 rows per tile
// and call fp32 BLAS, which is also what fp16 rows always get.
#pragma once
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <vector>

namespace cdcl::cpu::bf16 {

// The CPU executes AVX512-BF16 and the environment does not turn the path off.
bool enabled();

// One side's rows (queries or bank rows), each multiplied by its power-of-two scale (exact), in
// the layouts the products read; padding is zero.
//   flat:     rows x dp, dp = d rounded up to even: the broadcast operand of `scores`
//   by_rows:  [ceil(rows / 16)][dp / 2][16][2]: 16 rows' pairs (x_2c, x_2c+1) per vector
//   by_pairs: [ceil(rows / 2)][d16][2], d16 = d rounded up to 16: two rows interleaved
struct Rows {
  int64_t rows = 0, d = 0, dp = 0, d16 = 0;
  std::vector<c10::BFloat16> flat, by_rows, by_pairs;
};

// `scale` may be null (all factors 1). Only the layouts asked for are filled.
Rows pack(const c10::BFloat16* src, int64_t rows, int64_t d, const float* scale, bool flat,
          bool by_rows, bool by_pairs);

// c[i * ldc + j] = <a_(a0 + i), b_(r0 + j)> for i < m, j < n: a's flat rows against b's
// by_rows; r0 is a multiple of 16.
void scores(const Rows& a, int64_t a0, int64_t m, const Rows& b, int64_t r0, int64_t n, float* c,
            int64_t ldc);

// out[i * ldo + c] += sum_(j < n) bf16(w[i * ldw + j]) * b_(r0 + j)[c] for i < m, c < d, with
// b's by_pairs; r0 is even. `scratch` holds the rounded weights.
void accumulate(const float* w, int64_t ldw, int64_t m, const Rows& b, int64_t r0, int64_t n,
                float* out, int64_t ldo, std::vector<c10::BFloat16>& scratch);

}  // namespace cdcl::cpu::bf16
