// The two inner products of a tile in the CPU kernels, in our own AVX-512 register blocks where
// the CPU has the instructions:
//   scores      S = A B^T: a block of one side's rows against a tile of the other side's rows
//   accumulate  O += W B:  fp32 weights times the tile's rows
// fp32 rows (AVX-512F): one fused multiply-add per product, the reduction over D in a fixed order,
// so the bank gradient recomputes the forward's scores bit for bit, as with BLAS.
// bf16 rows (AVX512-BF16): vdpbf16ps multiplies pairs of bf16 values exactly and adds them into
// fp32 lanes, at twice the fp32 rate; scores are fp32 sums of exact products, as BLAS computes
// them from upcast rows, and only the weights of `accumulate` are rounded to bf16 (2^-9 relative),
// as the Triton and CUDA tensor-core kernels round them.
// Elsewhere (fp64 and fp16 rows, a CPU without the instructions, or CDCL_OPS_CPU_PRODUCTS=blas)
// the kernels call BLAS (at::cpu::mm_out / addmm_out); MKL takes its AVX2 kernels on AMD CPUs,
// which is where our fp32 blocks gain most.
#pragma once
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <string>
#include <vector>

namespace cdcl::cpu::products {

// How the kernels multiply rows of `dtype` here: "avx512", "avx512-bf16" or "blas". Reads
// CDCL_OPS_CPU_PRODUCTS ("auto" or unset: ours where the CPU allows; "blas": BLAS everywhere).
std::string path(c10::ScalarType dtype);

// One side's rows (queries or bank rows), each multiplied by its power-of-two scale (exact), in
// the layouts the products read; padding is zero. With dp = d rounded up to the reduction step
// (1 for fp32, 2 for bf16's pairs) and d16 = d rounded up to 16:
//   flat      rows x dp; the input itself when no row is scaled and nothing is padded
//   by_rows   [ceil(rows / 16)][dp / step][16][step]: 16 rows per vector, the operand B of scores
//   by_pairs  bf16 only: [ceil(rows / 2)][d16][2], two rows interleaved, the operand B of
//             accumulate (fp32 reads flat there)
template <typename T>
struct Rows {
  int64_t rows = 0, d = 0, dp = 0, d16 = 0;
  const T* flat = nullptr;
  std::vector<T> flat_store, by_rows, by_pairs;
};

// `scale` may be null (every factor 1). `as_a`: the side is operand A of scores (flat);
// `as_b`: operand B of scores (by_rows); `as_w_rows`: operand B of accumulate.
template <typename T>
Rows<T> pack(const T* src, int64_t rows, int64_t d, const float* scale, bool as_a, bool as_b,
             bool as_w_rows);

// c[i * ldc + j] = <a_(a0 + i), b_(r0 + j)> for i < m, j < n; r0 is a multiple of 16.
template <typename T>
void scores(const Rows<T>& a, int64_t a0, int64_t m, const Rows<T>& b, int64_t r0, int64_t n,
            float* c, int64_t ldc);

// out[i * ldo + c] += sum_(j < n) w[i * ldw + j] * b_(r0 + j)[c] for i < m, c < d; r0 is even.
// bf16: the weights are rounded to bf16 into `scratch` first.
template <typename T>
void accumulate(const float* w, int64_t ldw, int64_t m, const Rows<T>& b, int64_t r0, int64_t n,
                float* out, int64_t ldo, std::vector<c10::BFloat16>& scratch);

}  // namespace cdcl::cpu::products
