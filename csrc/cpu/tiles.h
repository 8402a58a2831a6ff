// What the CPU kernels of both losses share (infonce_cpu.cpp: masked InfoNCE; supcon_cpu.cpp: the
// supervised contrastive loss): the tile shapes, the raw rows' power-of-two scales and their use
// as BLAS or packed operands, the group table as bit sets, the mask of one row against a tile,
// and the dtype dispatch. Header-only: each kernel file instantiates what it uses.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "products.h"
#include "row_kernels.h"

namespace cdcl::cpu::tiles {

inline constexpr int64_t FWD_QUERY_BLOCK = 64;   // queries a thread owns in the forward
inline constexpr int64_t FWD_BANK_TILE = 256;    // bank rows per streamed tile
inline constexpr int64_t GRAD_BANK_BLOCK = 64;   // bank rows a thread owns in the bank gradient
inline constexpr int64_t GRAD_QUERY_TILE = 256;  // query rows per streamed tile
inline constexpr int64_t BIT_GROUPS = 64;        // up to this many groups, a table row is one bit set
static_assert(BIT_GROUPS == 64, "negatives_by_bits takes a 64-bit set");

template <typename acc_t>
at::Tensor view(const acc_t* ptr, int64_t rows, int64_t cols, int64_t row_stride,
                int64_t col_stride) {
  return at::from_blob(const_cast<acc_t*>(ptr), {rows, cols}, {row_stride, col_stride},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

// Per-row powers of two that bring a row's norm near 1, and the inverse norms of the scaled rows.
// Rows whose inverse norm lies in [2^-40, 2^40] (every clamped row among them: 1 / eps < 2^40)
// keep scale 1, so ordinary inputs are read in place; two such rows have an inner product below
// 2^80 in magnitude. A scaled row x * 2^e is exact (up to elements that fall below the float
// range, which the row's norm dwarfs) and x * 2^e * inv' = x * inv. NaN or zero inverse norms are
// left alone, so NaN propagates.
template <typename acc_t>
struct RowScales {
  std::vector<acc_t> scale, inv;
  bool any = false;
  RowScales(const acc_t* inv_norm, int64_t rows) : scale(rows, acc_t(1)), inv(inv_norm, inv_norm + rows) {
    const acc_t low = std::ldexp(acc_t(1), -40), high = std::ldexp(acc_t(1), 40);
    for (int64_t r = 0; r < rows; ++r) {
      const acc_t v = inv_norm[r];
      if (!(std::isfinite(v) && v > 0) || (v >= low && v <= high)) continue;
      const int e = std::ilogb(v);  // v = 2^e * f, f in [1, 2): the row's norm is ~2^-e
      scale[r] = std::ldexp(acc_t(1), e);
      inv[r] = std::ldexp(v, -e);
      any = true;
    }
  }
};

// 1/tau times each query's inverse norm: the factor the forward and the bank gradient both apply
// to a raw inner product first (one definition, so both get the same rounding).
template <typename acc_t>
std::vector<acc_t> score_scales(const RowScales<acc_t>& q, int64_t n, acc_t inv_tau) {
  std::vector<acc_t> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = inv_tau * q.inv[i];
  return out;
}

// Rows [first, first + rows) of a contiguous (., d) matrix as acc_t, each multiplied by its
// RowScales factor: the input itself when the dtypes agree and no factor differs from 1,
// otherwise upcast and scaled into `buf` (a factor of 1 leaves a value unchanged, so both paths
// give the same numbers).
template <typename in_t, typename acc_t>
const acc_t* rows_as_acc(const in_t* src, int64_t first, int64_t rows, int64_t d,
                         const RowScales<acc_t>& scales, std::vector<acc_t>& buf) {
  const acc_t* factor = scales.scale.data() + first;
  bool scaled = false;
  if (scales.any)
    for (int64_t r = 0; r < rows; ++r) scaled |= factor[r] != acc_t(1);
  if constexpr (std::is_same_v<in_t, acc_t>) {
    if (!scaled) return src + first * d;
  }
  buf.resize(static_cast<size_t>(rows * d));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < d; ++c)
      buf[r * d + c] = static_cast<acc_t>(src[(first + r) * d + c]) * factor[r];
  return buf.data();
}

// fp32 and bf16 rows may take our AVX-512 products (products.h), on rows packed once per call
template <typename in_t>
constexpr bool has_own_products = std::is_same_v<in_t, float> || std::is_same_v<in_t, c10::BFloat16>;

template <typename in_t>
bool own_products() {
  if constexpr (has_own_products<in_t>)
    return products::path(c10::CppTypeToScalarType<in_t>::value) != "blas";
  return false;
}

// the side's packed rows when `own`, else nothing
template <typename in_t, typename acc_t>
products::Rows<in_t> pack_rows(bool own, const in_t* src, int64_t rows, int64_t d,
                               const RowScales<acc_t>& s, bool as_a, bool as_b, bool as_w_rows) {
  if constexpr (has_own_products<in_t>)
    if (own)
      return products::pack(src, rows, d, s.any ? s.scale.data() : nullptr, as_a, as_b, as_w_rows);
  return {};
}

// Which groups a group may be contrasted with, as bit sets (used when G <= BIT_GROUPS).
// by_row[g] bit h = table[g][h]; by_col[h] bit g = table[g][h].
struct GroupBits {
  std::vector<uint64_t> by_row, by_col;
  explicit GroupBits(const at::Tensor& table) {
    const int64_t g = table.size(0);
    if (g > BIT_GROUPS) return;
    const bool* t = table.data_ptr<bool>();
    by_row.assign(g, 0);
    by_col.assign(g, 0);
    for (int64_t a = 0; a < g; ++a)
      for (int64_t b = 0; b < g; ++b)
        if (t[a * g + b]) {
          by_row[a] |= uint64_t(1) << b;
          by_col[b] |= uint64_t(1) << a;
        }
  }
  bool enabled() const { return !by_row.empty(); }
};

// ok[j] = J(one fixed row, other row j) over `n` rows of the other side. `bits` is the fixed row's
// bit set (when enabled) or `table_line` its table row/column read with `table_stride`.
inline void negatives(uint8_t* __restrict ok, int64_t n, int32_t label, const int32_t* __restrict lab,
                      const int32_t* __restrict grp, bool use_bits, uint64_t bits,
                      const bool* table_line, int64_t table_stride) {
  if (use_bits) {
    negatives_by_bits(ok, n, label, lab, grp, bits);
  } else {
    for (int64_t j = 0; j < n; ++j)
      ok[j] = grp[j] >= 0 && lab[j] != label && table_line[grp[j] * table_stride];
  }
}

// code[j] (row_kernels.h's CODE_*: nothing, negative, positive) of one fixed row against `n` rows
// of the other side, for the supervised loss; as `negatives` otherwise. `self`: the index among
// those n rows of the fixed row itself when the queries are their own bank (never a candidate of
// itself), else any value outside [0, n).
inline void classify(uint8_t* __restrict code, int64_t n, int32_t label,
                     const int32_t* __restrict lab, const int32_t* __restrict grp, bool use_bits,
                     uint64_t bits, const bool* table_line, int64_t table_stride, int64_t self) {
  if (use_bits) {
    classify_by_bits(code, n, label, lab, grp, bits);
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const bool ok = grp[j] >= 0 && table_line[grp[j] * table_stride];
      code[j] = ok ? (lab[j] == label ? CODE_POSITIVE : CODE_NEGATIVE) : CODE_NONE;
    }
  }
  if (self >= 0 && self < n) code[self] = CODE_NONE;
}

template <typename Fn>
void dispatch_input(at::ScalarType t, const char* name, Fn&& fn) {
  switch (t) {
    case at::kFloat: return fn(float{}, float{});
    case at::kDouble: return fn(double{}, double{});
    case at::kBFloat16: return fn(c10::BFloat16{}, float{});
    case at::kHalf: return fn(c10::Half{}, float{});
    default: TORCH_CHECK(false, name, ": expected float32/float64/bfloat16/float16 features, got ", t);
  }
}

}  // namespace cdcl::cpu::tiles
