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

// defined in row_kernels.cpp with CDCL_MULTIVERSION (the attribute goes on the definition only:
// callers in other files link to the load-time resolved symbol)
float mask_scale_max(float* row, const uint8_t* ok, const float* col, int64_t n, float scale);
float exp_sum(float* row, const float* col, int64_t n, float shift);
void grad_weights(float* row, const uint8_t* ok, const float* lse, const float* gs,
                  const float* q_scale, const float* q_inv, int64_t n, float k_inv);
void negatives_by_bits(uint8_t* ok, int64_t n, int32_t label, const int32_t* lab,
                       const int32_t* grp, uint64_t bits);

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

}  // namespace cdcl::cpu
