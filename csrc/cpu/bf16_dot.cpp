// AVX512-BF16 products for bfloat16 rows (bf16_dot.h). Register blocks of up to 6 rows x 64
// columns: 24 fp32 accumulators, 4 loaded vectors and one broadcast pair out of 32 registers.
// Only the functions below carry the AVX-512 target; the rest of the extension stays portable and
// `enabled()` keeps them from running on a CPU without the instructions.
#include "bf16_dot.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string_view>

#if defined(__x86_64__) && defined(__GNUC__)
#define CDCL_HAS_BF16_DOT 1
#include <immintrin.h>
#define CDCL_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#endif

namespace cdcl::cpu::bf16 {
namespace {

constexpr int64_t MAX_ROWS = 6;   // rows of a register block
constexpr int64_t MAX_VECS = 4;   // 16-lane vectors of a register block
constexpr int64_t LANES = 16;

bool cpu_has_bf16_dot() {
#ifdef CDCL_HAS_BF16_DOT
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  }();
  return has;
#else
  return false;
#endif
}

}  // namespace

bool enabled() {
  if (!cpu_has_bf16_dot()) return false;
  const char* env = std::getenv("CDCL_OPS_CPU_BF16_DOT");  // "0": the fp32 BLAS path, for tests
  return env == nullptr || std::string_view(env) != "0";
}

Rows pack(const c10::BFloat16* src, int64_t rows, int64_t d, const float* scale, bool flat,
          bool by_rows, bool by_pairs) {
  Rows out;
  out.rows = rows;
  out.d = d;
  out.dp = d + (d & 1);
  out.d16 = (d + LANES - 1) / LANES * LANES;
  const int64_t kp = out.dp / 2;
  if (flat) out.flat.assign(static_cast<size_t>(rows * out.dp), c10::BFloat16(0.0f));
  if (by_rows)
    out.by_rows.assign(static_cast<size_t>((rows + 15) / 16 * kp * 32), c10::BFloat16(0.0f));
  if (by_pairs)
    out.by_pairs.assign(static_cast<size_t>((rows + 1) / 2 * out.d16 * 2), c10::BFloat16(0.0f));
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float f = scale ? scale[r] : 1.0f;
      for (int64_t c = 0; c < d; ++c) {
        const c10::BFloat16 x = src[r * d + c];
        // a power of two: exact (c10's conversion rounds to nearest, which changes nothing here)
        const c10::BFloat16 v = f == 1.0f ? x : c10::BFloat16(static_cast<float>(x) * f);
        if (flat) out.flat[r * out.dp + c] = v;
        if (by_rows) out.by_rows[((r / 16) * kp + c / 2) * 32 + (r % 16) * 2 + (c % 2)] = v;
        if (by_pairs) out.by_pairs[((r / 2) * out.d16 + c) * 2 + (r % 2)] = v;
      }
    }
  });
  return out;
}

#ifdef CDCL_HAS_BF16_DOT
namespace {

CDCL_BF16_TARGET inline __m512 load_cols(const float* src, int64_t cols) {
  if (cols >= LANES) return _mm512_loadu_ps(src);
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << cols) - 1), src);
}

CDCL_BF16_TARGET inline void store_cols(float* dst, __m512 x, int64_t cols) {
  if (cols >= LANES)
    _mm512_storeu_ps(dst, x);
  else
    _mm512_mask_storeu_ps(dst, static_cast<__mmask16>((1u << cols) - 1), x);
}

CDCL_BF16_TARGET inline __m512bh broadcast_pair(const uint16_t* p) {
  int32_t pair;
  std::memcpy(&pair, p, sizeof(pair));
  return (__m512bh)_mm512_set1_epi32(pair);
}

// c (MR x up to 16 NV, ldc) = a (MR rows of 2 kp bf16, lda) against 16 NV rows of b in the
// by_rows layout (groups `group` apart); `cols` of the columns are stored.
template <int MR, int NV>
CDCL_BF16_TARGET void score_block(const uint16_t* a, int64_t lda, const uint16_t* b,
                                  int64_t group, int64_t kp, float* c, int64_t ldc,
                                  int64_t cols) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kp; ++k) {
    __m512bh bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      bv[v] = (__m512bh)_mm512_loadu_si512(b + v * group + k * 2 * LANES);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512bh av = broadcast_pair(a + r * lda + 2 * k);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) store_cols(c + r * ldc + v * LANES, acc[r][v], cols - v * LANES);
}

// out (MR x up to 16 NV, ldo) += w (MR rows of 2 pairs bf16 weights, ldw) times `pairs` pairs of
// b rows in the by_pairs layout (`stride` apart); `cols` of the columns are read and stored.
template <int MR, int NV>
CDCL_BF16_TARGET void accumulate_block(const uint16_t* w, int64_t ldw, const uint16_t* b,
                                       int64_t stride, int64_t pairs, float* out, int64_t ldo,
                                       int64_t cols) {
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = load_cols(out + r * ldo + v * LANES, cols - v * LANES);
  for (int64_t k = 0; k < pairs; ++k) {
    __m512bh bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      bv[v] = (__m512bh)_mm512_loadu_si512(b + k * stride + v * 2 * LANES);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512bh av = broadcast_pair(w + r * ldw + 2 * k);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) store_cols(out + r * ldo + v * LANES, acc[r][v], cols - v * LANES);
}

using ScoreFn = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, float*,
                         int64_t, int64_t);
using AccumulateFn = ScoreFn;  // same argument list, other meaning (see the two blocks)

template <template <int, int> class Block, int MR>
ScoreFn pick_vecs(int64_t nv) {
  switch (nv) {
    case 1: return &Block<MR, 1>::run;
    case 2: return &Block<MR, 2>::run;
    case 3: return &Block<MR, 3>::run;
    default: return &Block<MR, 4>::run;
  }
}

template <template <int, int> class Block>
ScoreFn pick(int64_t mr, int64_t nv) {
  switch (mr) {
    case 1: return pick_vecs<Block, 1>(nv);
    case 2: return pick_vecs<Block, 2>(nv);
    case 3: return pick_vecs<Block, 3>(nv);
    case 4: return pick_vecs<Block, 4>(nv);
    case 5: return pick_vecs<Block, 5>(nv);
    default: return pick_vecs<Block, 6>(nv);
  }
}

template <int MR, int NV>
struct ScoreBlock {
  static void run(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t group, int64_t kp,
                  float* c, int64_t ldc, int64_t cols) {
    score_block<MR, NV>(a, lda, b, group, kp, c, ldc, cols);
  }
};

template <int MR, int NV>
struct AccumulateBlock {
  static void run(const uint16_t* w, int64_t ldw, const uint16_t* b, int64_t stride,
                  int64_t pairs, float* out, int64_t ldo, int64_t cols) {
    accumulate_block<MR, NV>(w, ldw, b, stride, pairs, out, ldo, cols);
  }
};

// dst[0, n) = bf16(src[0, n)) rounded to nearest even, dst[n] = 0 when n is odd
CDCL_BF16_TARGET void round_row(const float* src, int64_t n, uint16_t* dst) {
  for (int64_t j = 0; j < n; j += LANES) {
    const int64_t cols = std::min<int64_t>(LANES, n - j);
    const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1);
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, src + j));
    _mm256_mask_storeu_epi16(dst + j, mask, (__m256i)h);
  }
  if (n & 1) dst[n] = 0;
}

const uint16_t* bits(const std::vector<c10::BFloat16>& v) {
  return reinterpret_cast<const uint16_t*>(v.data());
}

}  // namespace

void scores(const Rows& a, int64_t a0, int64_t m, const Rows& b, int64_t r0, int64_t n, float* c,
            int64_t ldc) {
  TORCH_CHECK(a.dp == b.dp && r0 % 16 == 0, "bf16 scores: inconsistent operands");
  const int64_t kp = a.dp / 2, group = kp * 2 * LANES;
  const uint16_t* ab = bits(a.flat) + a0 * a.dp;
  const uint16_t* bb = bits(b.by_rows) + (r0 / 16) * group;
  const int64_t block_cols = MAX_VECS * LANES;
  for (int64_t j0 = 0; j0 < n; j0 += block_cols) {
    const int64_t cols = std::min(block_cols, n - j0);
    const int64_t nv = (cols + LANES - 1) / LANES;
    for (int64_t i0 = 0; i0 < m; i0 += MAX_ROWS) {
      const int64_t mr = std::min(MAX_ROWS, m - i0);
      pick<ScoreBlock>(mr, nv)(ab + i0 * a.dp, a.dp, bb + (j0 / LANES) * group, group, kp,
                               c + i0 * ldc + j0, ldc, cols);
    }
  }
}

void accumulate(const float* w, int64_t ldw, int64_t m, const Rows& b, int64_t r0, int64_t n,
                float* out, int64_t ldo, std::vector<c10::BFloat16>& scratch) {
  TORCH_CHECK(r0 % 2 == 0, "bf16 accumulate: inconsistent operands");
  const int64_t np = n + (n & 1);
  scratch.resize(static_cast<size_t>(m * np));
  uint16_t* wb = reinterpret_cast<uint16_t*>(scratch.data());
  for (int64_t i = 0; i < m; ++i) round_row(w + i * ldw, n, wb + i * np);
  const int64_t stride = b.d16 * 2;
  const uint16_t* bp = bits(b.by_pairs) + (r0 / 2) * stride;
  const int64_t block_cols = MAX_VECS * LANES;
  for (int64_t c0 = 0; c0 < b.d; c0 += block_cols) {
    const int64_t cols = std::min(block_cols, b.d - c0);
    const int64_t nv = (cols + LANES - 1) / LANES;
    for (int64_t i0 = 0; i0 < m; i0 += MAX_ROWS) {
      const int64_t mr = std::min(MAX_ROWS, m - i0);
      pick<AccumulateBlock>(mr, nv)(wb + i0 * np, np, bp + c0 * 2, stride, np / 2,
                                    out + i0 * ldo + c0, ldo, cols);
    }
  }
}

#else  // no AVX512-BF16 build: enabled() is false, so these are never reached

void scores(const Rows&, int64_t, int64_t, const Rows&, int64_t, int64_t, float*, int64_t) {
  TORCH_CHECK(false, "bf16 scores: not built for this CPU");
}

void accumulate(const float*, int64_t, int64_t, const Rows&, int64_t, int64_t, float*, int64_t,
                std::vector<c10::BFloat16>&) {
  TORCH_CHECK(false, "bf16 accumulate: not built for this CPU");
}

#endif

}  // namespace cdcl::cpu::bf16
