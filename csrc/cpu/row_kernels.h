// Element-wise passes over one row of a (query block x bank tile) score buffer. They run on data
// already in L1/L2 and are written so the compiler vectorises them; the float versions are also
// built for AVX-512 (x86-64-v4) and AVX2 and picked at load time (target_clones), so the wheel
// stays portable (no -march).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__x86_64__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define CDCL_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#endif
#endif
#ifndef CDCL_MULTIVERSION
#define CDCL_MULTIVERSION
#endif

namespace cdcl::cpu {

// exp(x) for x <= ~0 (a score minus a running maximum). glibc's expf is not vectorised without
// -ffast-math, so: x = n ln2 + r with |r| <= ln2/2, e^r by its degree-7 Taylor polynomial (error
// below 1e-8 relative), 2^n written into the exponent bits. NaN in, NaN out (the integer
// conversion below never sees it).
static inline __attribute__((always_inline)) float exp_nonpositive(float x) {
  const bool nan = x != x;
  x = nan ? 0.0f : (x < -87.0f ? -87.0f : (x > 80.0f ? 80.0f : x));
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  float n = (x * 1.44269504088896341f + shifter) - shifter;
  float r = x - n * 0.693145751953125f;  // ln2 split in two so n * hi is exact
  r = r - n * 1.42860682030941723e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return nan ? std::numeric_limits<float>::quiet_NaN() : p * scale;
}

static inline __attribute__((always_inline)) double exp_nonpositive(double x) { return std::exp(x); }

// row := ok ? (row * scale) * col : -inf (raw inner products of one query to scores: scale is
// 1/tau times the query's inverse norm, col the bank rows' inverse norms; grad_weights forms the
// same products in the same order, so the bank gradient sees the forward's scores bit for bit);
// returns the maximum: -inf when nothing is valid, NaN when a valid score is NaN (a plain max
// would drop it, and a NaN bank row would leave the loss finite)
template <typename T>
static inline __attribute__((always_inline)) T mask_scale_max_impl(T* __restrict row,
                                                                   const uint8_t* __restrict ok,
                                                                   const T* __restrict col,
                                                                   int64_t n, T scale) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  T mx = neg_inf;
  int any_nan = 0;
#pragma omp simd reduction(max : mx) reduction(| : any_nan)
  for (int64_t j = 0; j < n; ++j) {
    T v = ok[j] ? row[j] * scale * col[j] : neg_inf;
    row[j] = v;
    mx = v > mx ? v : mx;
    any_nan |= v != v;
  }
  return any_nan ? std::numeric_limits<T>::quiet_NaN() : mx;
}

// row := exp(row - shift) * col, exactly 0 where row is -inf; returns the sum of exp(row - shift)
// (the written weights multiply raw bank rows, hence the inverse norms col)
template <typename T>
static inline __attribute__((always_inline)) T exp_sum_impl(T* __restrict row,
                                                            const T* __restrict col, int64_t n,
                                                            T shift) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    T v = row[j];
    T e = exp_nonpositive(v - shift);
    e = v == neg_inf ? T(0) : e;
    row[j] = e * col[j];
    sum += e;
  }
  return sum;
}

// row_i := ok_i ? exp((row_i * q_scale_i) * k_inv - lse_i) * gs_i * q_inv_i : 0   (one bank row
// against a query tile: raw inner products in, weights of the raw query rows out). The score is
// the product mask_scale_max formed in the forward, in the same order: with tau = 1e-4 a score is
// ~1e4, and one rounding more or less there moves exp(s - lse) by ~5e-4.
template <typename T>
static inline __attribute__((always_inline)) void grad_weights_impl(
    T* __restrict row, const uint8_t* __restrict ok, const T* __restrict lse,
    const T* __restrict gs, const T* __restrict q_scale, const T* __restrict q_inv, int64_t n,
    T k_inv) {
  // two passes: in one, the compiler may fuse s - lse into a multiply-add that skips the rounding
  // of s, and at tau = 1e-4 that one rounding moves the weight by ~1e-4 (the AVX-512 clone did)
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) row[i] = row[i] * q_scale[i] * k_inv;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    T w = exp_nonpositive(row[i] - lse[i]) * gs[i] * q_inv[i];
    row[i] = ok[i] ? w : T(0);
  }
}

// ok[j] = J(row, j) for one fixed row of label `label` whose allowed groups are the bit set `bits`
static inline __attribute__((always_inline)) void negatives_by_bits_impl(
    uint8_t* __restrict ok, int64_t n, int32_t label, const int32_t* __restrict lab,
    const int32_t* __restrict grp, uint64_t bits) {
  for (int64_t j = 0; j < n; ++j) {
    const uint64_t g = static_cast<uint32_t>(grp[j]);  // negative ids become huge: rejected
    ok[j] = static_cast<uint8_t>((g < 64) & (lab[j] != label) & ((bits >> (g & 63)) & 1));
  }
}

// ---- the supervised contrastive loss (supcon_cpu.cpp; docs/design.md §7)

// What bank row j is to a fixed query, or query j to a fixed bank row: 0 nothing, 1 a negative,
// 2 a positive (CODE_*). `bits` is the fixed row's bit set of allowed groups, as in
// negatives_by_bits.
enum : uint8_t { CODE_NONE = 0, CODE_NEGATIVE = 1, CODE_POSITIVE = 2 };

static inline __attribute__((always_inline)) void classify_by_bits_impl(
    uint8_t* __restrict code, int64_t n, int32_t label, const int32_t* __restrict lab,
    const int32_t* __restrict grp, uint64_t bits) {
  for (int64_t j = 0; j < n; ++j) {
    const uint64_t g = static_cast<uint32_t>(grp[j]);
    const uint8_t ok = static_cast<uint8_t>((g < 64) & ((bits >> (g & 63)) & 1));
    code[j] = static_cast<uint8_t>(ok * (1 + (lab[j] == label)));
  }
}

// The sum of the (already scaled) scores of the positives in `row`, and their count; pw (when not
// null) := the positives' inverse norms, 0 elsewhere: the weights of the raw rows whose sum the
// query gradient needs
template <typename T>
static inline __attribute__((always_inline)) T positive_sum_impl(const T* __restrict row,
                                                                 const uint8_t* __restrict code,
                                                                 const T* __restrict col,
                                                                 T* __restrict pw, int64_t n,
                                                                 int64_t* count) {
  T sum = 0;
  int64_t c = 0;
#pragma omp simd reduction(+ : sum, c)
  for (int64_t j = 0; j < n; ++j) {
    const bool p = code[j] == CODE_POSITIVE;
    sum += p ? row[j] : T(0);
    c += p;
  }
  if (pw != nullptr)
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) pw[j] = code[j] == CODE_POSITIVE ? col[j] : T(0);
  *count += c;
  return sum;
}

// log(1 + e) for e in [0, 1]: 2 atanh(z) with z = e / (2 + e) in [0, 1/3], its odd series to z^15
// (relative error below 2e-8); vectorised where std::log1p is not
static inline __attribute__((always_inline)) float log1p_unit(float e) {
  const float z = e / (2.0f + e), z2 = z * z;
  float p = 1.0f / 15.0f;
  p = p * z2 + 1.0f / 13.0f;
  p = p * z2 + 1.0f / 11.0f;
  p = p * z2 + 1.0f / 9.0f;
  p = p * z2 + 1.0f / 7.0f;
  p = p * z2 + 1.0f / 5.0f;
  p = p * z2 + 1.0f / 3.0f;
  p = p * z2 + 1.0f;
  return 2.0f * z * p;
}
static inline __attribute__((always_inline)) double log1p_unit(double e) { return std::log1p(e); }

// softplus(t) = log(1 + e^t) and sigmoid(t), from e = exp(-|t|) (never overflows); t = -inf
// gives exactly 0 for both (exp_nonpositive stops at e^-87)
template <typename T>
static inline __attribute__((always_inline)) void softplus_sigmoid(T t, T* softplus, T* sigmoid) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const T e = exp_nonpositive(t > T(0) ? -t : t);
  const T inv = T(1) / (T(1) + e);
  *softplus = t == neg_inf ? T(0) : (t > T(0) ? t : T(0)) + log1p_unit(e);
  *sigmoid = t == neg_inf ? T(0) : (t >= T(0) ? inv : e * inv);
}

// "negatives", second pass, one query against a tile: for its positives p, with the scores
// s = (row * scale) * col (as mask_scale_max forms them) and t = lse - s, the sums of
// softplus(t) (the loss) and of sigmoid(t) (into *sig_sum); row := sigmoid(t) * col at the
// positives, 0 elsewhere (the weights of the raw rows). lse is finite (the caller skips a query
// without negatives: its loss is 0).
template <typename T>
static inline __attribute__((always_inline)) T positive_softplus_impl(T* __restrict row,
                                                                      const uint8_t* __restrict code,
                                                                      const T* __restrict col,
                                                                      int64_t n, T scale, T lse,
                                                                      T* sig_sum) {
  T soft_sum = 0, sig = 0;
#pragma omp simd reduction(+ : soft_sum, sig)
  for (int64_t j = 0; j < n; ++j) {
    T soft, sg;
    softplus_sigmoid(lse - row[j] * scale * col[j], &soft, &sg);
    const bool p = code[j] == CODE_POSITIVE;
    soft_sum += p ? soft : T(0);
    sig += p ? sg : T(0);
    row[j] = p ? sg * col[j] : T(0);
  }
  *sig_sum += sig;
  return soft_sum;
}

// The bank gradient's weights of one bank row against a query tile (as grad_weights, the score
// formed as the forward formed it, in a pass of its own):
//   ALL:   row_i := ([code != 0] gs_lse_i exp(s - lse_i) - [code == 2] gs_pos_i) * q_inv_i
//   else:  row_i := ([code == 1] gs_lse_i exp(s - lse_i)
//                    - [code == 2] gs_pos_i sigmoid(lse_i - s)) * q_inv_i
template <bool ALL, typename T>
static inline __attribute__((always_inline)) void contrast_grad_weights_impl(
    T* __restrict row, const uint8_t* __restrict code, const T* __restrict lse,
    const T* __restrict gs_lse, const T* __restrict gs_pos, const T* __restrict q_scale,
    const T* __restrict q_inv, int64_t n, T k_inv) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) row[i] = row[i] * q_scale[i] * k_inv;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t c = code[i];
    const bool in_lse = ALL ? c != CODE_NONE : c == CODE_NEGATIVE;
    const T e = exp_nonpositive(row[i] - lse[i]) * gs_lse[i];
    T pos = gs_pos[i];
    if constexpr (!ALL) {
      T soft, sg;
      softplus_sigmoid(lse[i] - row[i], &soft, &sg);
      pos *= sg;
    }
    row[i] = ((in_lse ? e : T(0)) - (c == CODE_POSITIVE ? pos : T(0))) * q_inv[i];
  }
}

// defined in row_kernels.cpp with CDCL_MULTIVERSION (the attribute goes on the definition only:
// callers in other files link to the load-time resolved symbol)
float mask_scale_max(float* row, const uint8_t* ok, const float* col, int64_t n, float scale);
float exp_sum(float* row, const float* col, int64_t n, float shift);
void grad_weights(float* row, const uint8_t* ok, const float* lse, const float* gs,
                  const float* q_scale, const float* q_inv, int64_t n, float k_inv);
void negatives_by_bits(uint8_t* ok, int64_t n, int32_t label, const int32_t* lab,
                       const int32_t* grp, uint64_t bits);
void classify_by_bits(uint8_t* code, int64_t n, int32_t label, const int32_t* lab,
                      const int32_t* grp, uint64_t bits);
float positive_sum(const float* row, const uint8_t* code, const float* col, float* pw, int64_t n,
                   int64_t* count);
float positive_softplus(float* row, const uint8_t* code, const float* col, int64_t n, float scale,
                        float lse, float* sig_sum);
void contrast_grad_weights(bool all, float* row, const uint8_t* code, const float* lse,
                           const float* gs_lse, const float* gs_pos, const float* q_scale,
                           const float* q_inv, int64_t n, float k_inv);

inline double mask_scale_max(double* row, const uint8_t* ok, const double* col, int64_t n,
                             double scale) {
  return mask_scale_max_impl(row, ok, col, n, scale);
}
inline double exp_sum(double* row, const double* col, int64_t n, double shift) {
  return exp_sum_impl(row, col, n, shift);
}
inline void grad_weights(double* row, const uint8_t* ok, const double* lse, const double* gs,
                         const double* q_scale, const double* q_inv, int64_t n, double k_inv) {
  grad_weights_impl(row, ok, lse, gs, q_scale, q_inv, n, k_inv);
}

inline double positive_sum(const double* row, const uint8_t* code, const double* col, double* pw,
                           int64_t n, int64_t* count) {
  return positive_sum_impl(row, code, col, pw, n, count);
}
inline double positive_softplus(double* row, const uint8_t* code, const double* col, int64_t n,
                                double scale, double lse, double* sig_sum) {
  return positive_softplus_impl(row, code, col, n, scale, lse, sig_sum);
}
inline void contrast_grad_weights(bool all, double* row, const uint8_t* code, const double* lse,
                                  const double* gs_lse, const double* gs_pos, const double* q_scale,
                                  const double* q_inv, int64_t n, double k_inv) {
  if (all)
    contrast_grad_weights_impl<true>(row, code, lse, gs_lse, gs_pos, q_scale, q_inv, n, k_inv);
  else
    contrast_grad_weights_impl<false>(row, code, lse, gs_lse, gs_pos, q_scale, q_inv, n, k_inv);
}

}  // namespace cdcl::cpu
