// Our AVX-512 products (products.h). Register blocks of up to 6 rows x 64 columns: 24 fp32
// accumulators, 4 loaded vectors and one broadcast out of 32 registers; masked loads and stores
// at the edges, so no output is padded. Only the block functions carry an AVX-512 target; `path()`
// keeps them from running on a CPU without the instructions.
#include "products.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#define CDCL_HAS_AVX512 1
#include <immintrin.h>
#define CDCL_AVX512 __attribute__((target("avx512f")))
#define CDCL_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#endif

namespace cdcl::cpu::products {
namespace {

constexpr int64_t MAX_ROWS = 6;   // rows of a register block
constexpr int64_t MAX_VECS = 4;   // 16-lane vectors of a register block
constexpr int64_t LANES = 16;
constexpr int64_t F32_CHUNK = 64;  // tile rows per pass of the fp32 accumulate

template <typename T>
constexpr bool is_bf16 = std::is_same_v<T, c10::BFloat16>;
template <typename T>
constexpr int64_t STEP = is_bf16<T> ? 2 : 1;  // values of the reduction one lane takes at once

struct Cpu {
  bool avx512 = false, avx512_bf16 = false;
};

const Cpu& cpu() {
  static const Cpu has = [] {
    Cpu c;
#ifdef CDCL_HAS_AVX512
    __builtin_cpu_init();
    c.avx512 = __builtin_cpu_supports("avx512f");
    c.avx512_bf16 = c.avx512 && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
#endif
    return c;
  }();
  return has;
}

bool blas_asked() {
  const char* env = std::getenv("CDCL_OPS_CPU_PRODUCTS");
  if (env == nullptr || env[0] == '\0' || std::string_view(env) == "auto") return false;
  TORCH_CHECK(std::string_view(env) == "blas",
              "CDCL_OPS_CPU_PRODUCTS: expected 'auto' or 'blas', got '", env, "'");
  return true;
}

}  // namespace

std::string path(c10::ScalarType dtype) {
  const bool blas = blas_asked();
  if (!blas && dtype == c10::kFloat && cpu().avx512) return "avx512";
  if (!blas && dtype == c10::kBFloat16 && cpu().avx512_bf16) return "avx512-bf16";
  return "blas";
}

template <typename T>
Rows<T> pack(const T* src, int64_t rows, int64_t d, const float* scale, bool as_a, bool as_b,
             bool as_w_rows) {
  constexpr int64_t step = STEP<T>;
  Rows<T> out;
  out.rows = rows;
  out.d = d;
  out.dp = (d + step - 1) / step * step;
  out.d16 = (d + LANES - 1) / LANES * LANES;
  const int64_t dp = out.dp, d16 = out.d16;
  const bool flat = as_a || (!is_bf16<T> && as_w_rows);
  const bool copy_flat = flat && (scale != nullptr || dp != d);
  const bool pairs = is_bf16<T> && as_w_rows;
  if (copy_flat) out.flat_store.assign(static_cast<size_t>(rows * dp), T(0.0f));
  if (as_b) out.by_rows.assign(static_cast<size_t>((rows + 15) / 16 * 16 * dp), T(0.0f));
  if (pairs) out.by_pairs.assign(static_cast<size_t>((rows + 1) / 2 * 2 * d16), T(0.0f));
  if (copy_flat || as_b || pairs)
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const float f = scale ? scale[r] : 1.0f;
        for (int64_t c = 0; c < d; ++c) {
          // f is a power of two: exact (the conversion back to T rounds nothing)
          const T v = f == 1.0f ? src[r * d + c] : T(static_cast<float>(src[r * d + c]) * f);
          if (copy_flat) out.flat_store[r * dp + c] = v;
          if (as_b)
            out.by_rows[((r / 16) * (dp / step) + c / step) * 16 * step + (r % 16) * step +
                        c % step] = v;
          if (pairs) out.by_pairs[((r / 2) * d16 + c) * 2 + r % 2] = v;
        }
      }
    });
  if (flat) out.flat = copy_flat ? out.flat_store.data() : src;
  return out;
}

#ifdef CDCL_HAS_AVX512
namespace {

CDCL_AVX512 inline __mmask16 lanes(int64_t cols) {
  return cols >= LANES ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << cols) - 1);
}

CDCL_AVX512 inline __m512 load_cols(const float* src, int64_t cols) {
  return _mm512_maskz_loadu_ps(lanes(cols), src);
}

CDCL_AVX512 inline void store_cols(float* dst, __m512 x, int64_t cols) {
  _mm512_mask_storeu_ps(dst, lanes(cols), x);
}

// One register block of either product: c (MR x up to 16 NV, ldc) = (add ? c : 0) + the sum
// over k < ksteps of a's column k (rows lda apart) times b's row k (vector v at
// b + k * kstride + v * vstride); `cols` of the columns are read and stored. scores: a the flat
// rows, b a by_rows group; accumulate: a the weights, b the other side's rows. One per ISA: the
// two need different target attributes.

// fp32: one FMA per product, over k in order
template <int MR, int NV>
CDCL_AVX512 void block_f32(const float* a, int64_t lda, const float* b, int64_t kstride,
                           int64_t vstride, int64_t ksteps, float* c, int64_t ldc, int64_t cols,
                           bool add) {
  __mmask16 mask[NV];
  __m512 acc[MR][NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) mask[v] = lanes(cols - v * LANES);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[r][v] = add ? _mm512_maskz_loadu_ps(mask[v], c + r * ldc + v * LANES) : _mm512_setzero_ps();
  const bool full = cols >= NV * LANES;  // masked loads of b only at the edge (raw rows end there)
  for (int64_t k = 0; k < ksteps; ++k) {
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      bv[v] = full ? _mm512_loadu_ps(b + k * kstride + v * vstride)
                   : _mm512_maskz_loadu_ps(mask[v], b + k * kstride + v * vstride);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * lda + k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(c + r * ldc + v * LANES, mask[v], acc[r][v]);
}

CDCL_AVX512_BF16 inline __m512bh broadcast_pair(const uint16_t* p) {
  int32_t pair;
  std::memcpy(&pair, p, sizeof(pair));
  return (__m512bh)_mm512_set1_epi32(pair);
}

// bf16: vdpbf16ps, a pair of products per lane and instruction; a's rows hold 2 ksteps values
// (b's layouts are padded, so its loads need no mask)
template <int MR, int NV>
CDCL_AVX512_BF16 void block_bf16(const uint16_t* a, int64_t lda, const uint16_t* b,
                                 int64_t kstride, int64_t vstride, int64_t ksteps, float* c,
                                 int64_t ldc, int64_t cols, bool add) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[r][v] = add ? load_cols(c + r * ldc + v * LANES, cols - v * LANES) : _mm512_setzero_ps();
  for (int64_t k = 0; k < ksteps; ++k) {
    __m512bh bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      bv[v] = (__m512bh)_mm512_loadu_si512(b + k * kstride + v * vstride);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512bh av = broadcast_pair(a + r * lda + 2 * k);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store_cols(c + r * ldc + v * LANES, acc[r][v], cols - v * LANES);
}

// dst[0, n) = bf16(src[0, n)) rounded to nearest even, dst[n] = 0 when n is odd
CDCL_AVX512_BF16 void round_row(const float* src, int64_t n, uint16_t* dst) {
  for (int64_t j = 0; j < n; j += LANES) {
    const __mmask16 mask = lanes(n - j);
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, src + j));
    _mm256_mask_storeu_epi16(dst + j, mask, (__m256i)h);
  }
  if (n & 1) dst[n] = 0;
}

// the register blocks by shape, for the edges of a product
template <int MR, int NV>
struct BlockF32 {
  static void run(const float* a, int64_t lda, const float* b, int64_t kstride, int64_t vstride,
                  int64_t ksteps, float* c, int64_t ldc, int64_t cols, bool add) {
    block_f32<MR, NV>(a, lda, b, kstride, vstride, ksteps, c, ldc, cols, add);
  }
};

template <int MR, int NV>
struct BlockBf16 {
  static void run(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t kstride,
                  int64_t vstride, int64_t ksteps, float* c, int64_t ldc, int64_t cols, bool add) {
    block_bf16<MR, NV>(a, lda, b, kstride, vstride, ksteps, c, ldc, cols, add);
  }
};

template <template <int, int> class Block, int MR>
auto pick_vecs(int64_t nv) -> decltype(&Block<MR, 1>::run) {
  switch (nv) {
    case 1: return &Block<MR, 1>::run;
    case 2: return &Block<MR, 2>::run;
    case 3: return &Block<MR, 3>::run;
    default: return &Block<MR, 4>::run;
  }
}

template <template <int, int> class Block>
auto pick(int64_t mr, int64_t nv) -> decltype(&Block<1, 1>::run) {
  switch (mr) {
    case 1: return pick_vecs<Block, 1>(nv);
    case 2: return pick_vecs<Block, 2>(nv);
    case 3: return pick_vecs<Block, 3>(nv);
    case 4: return pick_vecs<Block, 4>(nv);
    case 5: return pick_vecs<Block, 5>(nv);
    default: return pick_vecs<Block, 6>(nv);
  }
}

// c (m x n) or out (m x cols) walked in register blocks: `call(i0, mr, j0, cols, nv)`
template <typename Call>
void blocks(int64_t m, int64_t n, Call&& call) {
  const int64_t block_cols = MAX_VECS * LANES;
  for (int64_t j0 = 0; j0 < n; j0 += block_cols) {
    const int64_t cols = std::min(block_cols, n - j0);
    for (int64_t i0 = 0; i0 < m; i0 += MAX_ROWS)
      call(i0, std::min(MAX_ROWS, m - i0), j0, cols, (cols + LANES - 1) / LANES);
  }
}

template <typename T>
const uint16_t* bits(const T* p) {
  return reinterpret_cast<const uint16_t*>(p);
}

}  // namespace

template <typename T>
void scores(const Rows<T>& a, int64_t a0, int64_t m, const Rows<T>& b, int64_t r0, int64_t n,
            float* c, int64_t ldc) {
  TORCH_CHECK(a.dp == b.dp && r0 % 16 == 0, "scores: inconsistent operands");
  const int64_t kd = a.dp / STEP<T>, group = 16 * a.dp;  // k steps; values per 16-row group
  const T* ab = a.flat + a0 * a.dp;
  const T* bb = b.by_rows.data() + (r0 / 16) * group;
  blocks(m, n, [&](int64_t i0, int64_t mr, int64_t j0, int64_t cols, int64_t nv) {
    const T* b_block = bb + (j0 / 16) * group;
    if constexpr (is_bf16<T>)
      pick<BlockBf16>(mr, nv)(bits(ab + i0 * a.dp), a.dp, bits(b_block), 2 * LANES, group, kd,
                              c + i0 * ldc + j0, ldc, cols, false);
    else
      pick<BlockF32>(mr, nv)(ab + i0 * a.dp, a.dp, b_block, LANES, group, kd, c + i0 * ldc + j0,
                             ldc, cols, false);
  });
}

template <typename T>
void accumulate(const float* w, int64_t ldw, int64_t m, const Rows<T>& b, int64_t r0, int64_t n,
                float* out, int64_t ldo, std::vector<c10::BFloat16>& scratch) {
  TORCH_CHECK(r0 % 2 == 0, "accumulate: inconsistent operands");
  if constexpr (is_bf16<T>) {
    const int64_t np = n + (n & 1);
    scratch.resize(static_cast<size_t>(m * np));
    uint16_t* wb = reinterpret_cast<uint16_t*>(scratch.data());
    for (int64_t i = 0; i < m; ++i) round_row(w + i * ldw, n, wb + i * np);
    const int64_t stride = 2 * b.d16;
    const uint16_t* bp = bits(b.by_pairs.data()) + (r0 / 2) * stride;
    blocks(m, b.d, [&](int64_t i0, int64_t mr, int64_t c0, int64_t cols, int64_t nv) {
      pick<BlockBf16>(mr, nv)(wb + i0 * np, np, bp + 2 * c0, stride, 2 * LANES, np / 2,
                              out + i0 * ldo + c0, ldo, cols, true);
    });
  } else {
    // the tile's rows in chunks of F32_CHUNK (16 KB of a 64-column block, in L1 for every row
    // block); the sums still run over j in order, so the result is that of one pass
    const float* bp = b.flat + r0 * b.dp;
    for (int64_t j0 = 0; j0 < n; j0 += F32_CHUNK) {
      const int64_t nj = std::min(F32_CHUNK, n - j0);
      blocks(m, b.d, [&](int64_t i0, int64_t mr, int64_t c0, int64_t cols, int64_t nv) {
        pick<BlockF32>(mr, nv)(w + i0 * ldw + j0, ldw, bp + j0 * b.dp + c0, b.dp, LANES, nj,
                               out + i0 * ldo + c0, ldo, cols, true);
      });
    }
  }
}

#else  // no AVX-512 in this build: path() is "blas", so these are never reached

template <typename T>
void scores(const Rows<T>&, int64_t, int64_t, const Rows<T>&, int64_t, int64_t, float*, int64_t) {
  TORCH_CHECK(false, "scores: not built for this CPU");
}

template <typename T>
void accumulate(const float*, int64_t, int64_t, const Rows<T>&, int64_t, int64_t, float*, int64_t,
                std::vector<c10::BFloat16>&) {
  TORCH_CHECK(false, "accumulate: not built for this CPU");
}

#endif

#define CDCL_INSTANTIATE(T)                                                                     \
  template Rows<T> pack(const T*, int64_t, int64_t, const float*, bool, bool, bool);           \
  template void scores(const Rows<T>&, int64_t, int64_t, const Rows<T>&, int64_t, int64_t,      \
                       float*, int64_t);                                                        \
  template void accumulate(const float*, int64_t, int64_t, const Rows<T>&, int64_t, int64_t,    \
                           float*, int64_t, std::vector<c10::BFloat16>&);
CDCL_INSTANTIATE(float)
CDCL_INSTANTIATE(c10::BFloat16)
#undef CDCL_INSTANTIATE

}  // namespace cdcl::cpu::products
