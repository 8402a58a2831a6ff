// CPU forward and bank gradient of the masked InfoNCE (docs/design.md §3).
//
// Both are tiled so that no N x M buffer exists: a thread owns a block of rows (queries in the
// forward, bank rows in the bank gradient) and streams tiles of the other side through a small
// score buffer. The two inner products per tile run single-threaded in each thread: our AVX-512
// register blocks for fp32 and bf16 rows where the CPU has the instructions (products.h; bf16
// then multiplies in bf16 with fp32 sums), otherwise BLAS calls (at::cpu::mm_out / addmm_out on
// views of the buffers) with 16-bit rows upcast per tile; masking, the online log-sum-exp and
// the gradient weights are fused row passes on the buffer while it is in cache (row_kernels.h).
// fp32 and fp64 compute in their own precision, fp16 and bf16 rows in fp32.
// The kernels read the raw rows: the inverse row norms scale the inner products in the row passes
// (cosine similarity without a normalised copy of the inputs), and the weights that multiply raw
// rows carry their inverse norms, so O and the bank gradient are those of the unit rows.
// Rows whose norm is far from 1 are first scaled by a power of two (RowScales): exact, and it keeps
// the raw inner products of rows up to the float32 maximum finite.
// The bank gradient recomputes each score exactly as the forward formed it (same BLAS inner
// product, same scale factors, same order of multiplication): exp(s - lse) is then exact for the
// dominant terms even where s ~ 1 / tau is large.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../checks.h"
#include "products.h"
#include "row_kernels.h"

namespace cdcl::cpu {
namespace {

constexpr int64_t FWD_QUERY_BLOCK = 64;   // queries a thread owns in the forward
constexpr int64_t FWD_BANK_TILE = 256;    // bank rows per streamed tile
constexpr int64_t GRAD_BANK_BLOCK = 64;   // bank rows a thread owns in the bank gradient
constexpr int64_t GRAD_QUERY_TILE = 256;  // query rows per streamed tile
constexpr int64_t BIT_GROUPS = 64;        // up to this many groups, a table row is one bit set
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

template <typename in_t, typename acc_t>
void forward_kernel(const at::Tensor& q, const at::Tensor& p, const at::Tensor& k,
                    const at::Tensor& inv_q, const at::Tensor& inv_p, const at::Tensor& inv_k,
                    const at::Tensor& q_lab, const at::Tensor& q_grp, const at::Tensor& k_lab,
                    const at::Tensor& k_grp, const at::Tensor& table, acc_t inv_tau, bool need_o,
                    at::Tensor& loss, at::Tensor& lse, at::Tensor& o) {
  const int64_t n = q.size(0), m = k.size(0), d = q.size(1), g = table.size(0);
  const in_t* qp = q.data_ptr<in_t>();
  const in_t* pp = p.data_ptr<in_t>();
  const in_t* kp = k.data_ptr<in_t>();
  const RowScales<acc_t> q_rows(inv_q.data_ptr<acc_t>(), n), p_rows(inv_p.data_ptr<acc_t>(), n),
      k_rows(inv_k.data_ptr<acc_t>(), m);
  const std::vector<acc_t> q_scale = score_scales(q_rows, n, inv_tau);
  const acc_t *iq = q_rows.inv.data(), *ip = p_rows.inv.data(), *ik = k_rows.inv.data();
  const int32_t *ql = q_lab.data_ptr<int32_t>(), *qg = q_grp.data_ptr<int32_t>();
  const int32_t *kl = k_lab.data_ptr<int32_t>(), *kg = k_grp.data_ptr<int32_t>();
  const bool* tab = table.data_ptr<bool>();
  acc_t* loss_p = loss.data_ptr<acc_t>();
  acc_t* lse_p = lse.data_ptr<acc_t>();
  acc_t* o_p = need_o ? o.data_ptr<acc_t>() : nullptr;
  const GroupBits bits(table);
  const int64_t n_blocks = (n + FWD_QUERY_BLOCK - 1) / FWD_QUERY_BLOCK;
  const bool own = own_products<in_t>();
  const auto q_pk = pack_rows(own, qp, n, d, q_rows, true, false, false);
  const auto k_pk = pack_rows(own, kp, m, d, k_rows, false, true, need_o);

  at::parallel_for(0, n_blocks, 1, [&](int64_t blk_begin, int64_t blk_end) {
    std::vector<acc_t> q_buf, k_buf, s_pos(FWD_QUERY_BLOCK), run_max(FWD_QUERY_BLOCK),
        run_sum(FWD_QUERY_BLOCK), scores(FWD_QUERY_BLOCK * FWD_BANK_TILE),
        out(need_o ? FWD_QUERY_BLOCK * d : 0);
    std::vector<uint8_t> ok(FWD_BANK_TILE);
    std::vector<c10::BFloat16> w_buf;
    for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
      const int64_t a = blk * FWD_QUERY_BLOCK, nb = std::min(FWD_QUERY_BLOCK, n - a);
      const acc_t* qb = rows_as_acc(qp, a, nb, d, q_rows, q_buf);
      bool any_active = false;
      for (int64_t i = 0; i < nb; ++i) {
        const acc_t p_factor = p_rows.scale[a + i];
        acc_t dot = 0;
        for (int64_t c = 0; c < d; ++c)
          dot += qb[i * d + c] * (static_cast<acc_t>(pp[(a + i) * d + c]) * p_factor);
        s_pos[i] = dot * iq[a + i] * ip[a + i] * inv_tau;
        run_max[i] = s_pos[i];  // seeding the max with s+ keeps rows without negatives finite
        run_sum[i] = 1;
        any_active |= qg[a + i] >= 0;
      }
      if (need_o) std::fill(out.begin(), out.begin() + nb * d, acc_t(0));
      at::Tensor q_view = view(qb, nb, d, d, 1);
      at::Tensor o_view = need_o ? view(out.data(), nb, d, d, 1) : at::Tensor();

      for (int64_t c0 = 0; any_active && c0 < m; c0 += FWD_BANK_TILE) {
        const int64_t mt = std::min(FWD_BANK_TILE, m - c0);
        const acc_t* kt = nullptr;
        at::Tensor s_view = view(scores.data(), nb, mt, mt, 1);
        if constexpr (has_own_products<in_t>)
          if (own) products::scores(q_pk, a, nb, k_pk, c0, mt, scores.data(), mt);
        if (!own) {
          kt = rows_as_acc(kp, c0, mt, d, k_rows, k_buf);
          at::cpu::mm_out(s_view, q_view, view(kt, d, mt, 1, d));
        }
        bool any_weight = false;
        for (int64_t i = 0; i < nb; ++i) {
          acc_t* row = scores.data() + i * mt;
          const int32_t grp = qg[a + i];
          if (grp < 0) {
            std::fill(row, row + mt, acc_t(0));
            continue;
          }
          negatives(ok.data(), mt, ql[a + i], kl + c0, kg + c0, bits.enabled(),
                    bits.enabled() ? bits.by_row[grp] : 0, tab + grp * g, 1);
          const acc_t tile_max = mask_scale_max(row, ok.data(), ik + c0, mt, q_scale[a + i]);
          if (tile_max == -std::numeric_limits<acc_t>::infinity()) {
            std::fill(row, row + mt, acc_t(0));
            continue;
          }
          // a NaN tile maximum keeps run_max: exp_sum then makes the sum (and the loss) NaN
          if (tile_max > run_max[i]) {
            const acc_t alpha = std::exp(run_max[i] - tile_max);
            run_sum[i] *= alpha;
            if (need_o)
              for (int64_t c = 0; c < d; ++c) out[i * d + c] *= alpha;
            run_max[i] = tile_max;
          }
          run_sum[i] += exp_sum(row, ik + c0, mt, run_max[i]);
          any_weight = true;
        }
        if (need_o && any_weight) {
          if constexpr (has_own_products<in_t>)
            if (own) products::accumulate(scores.data(), mt, nb, k_pk, c0, mt, out.data(), d, w_buf);
          if (!own) at::cpu::addmm_out(o_view, o_view, s_view, view(kt, mt, d, d, 1));
        }
      }

      for (int64_t i = 0; i < nb; ++i) {
        const acc_t log_sum = std::log(run_sum[i]);
        loss_p[a + i] = (run_max[i] - s_pos[i]) + log_sum;
        lse_p[a + i] = run_max[i] + log_sum;
        if (need_o) {
          const acc_t inv_sum = acc_t(1) / run_sum[i];
          for (int64_t c = 0; c < d; ++c) o_p[(a + i) * d + c] = out[i * d + c] * inv_sum;
        }
      }
    }
  });
}

template <typename in_t, typename acc_t>
void bank_grad_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& inv_q,
                      const at::Tensor& inv_k, const at::Tensor& q_lab,
                      const at::Tensor& q_grp, const at::Tensor& k_lab, const at::Tensor& k_grp,
                      const at::Tensor& table, const at::Tensor& lse, const at::Tensor& gs,
                      acc_t inv_tau, at::Tensor& dk) {
  const int64_t n = q.size(0), m = k.size(0), d = q.size(1), g = table.size(0);
  const in_t* qp = q.data_ptr<in_t>();
  const in_t* kp = k.data_ptr<in_t>();
  const RowScales<acc_t> q_rows(inv_q.data_ptr<acc_t>(), n), k_rows(inv_k.data_ptr<acc_t>(), m);
  const std::vector<acc_t> q_scale = score_scales(q_rows, n, inv_tau);
  const acc_t *iq = q_rows.inv.data(), *ik = k_rows.inv.data();
  const int32_t *ql = q_lab.data_ptr<int32_t>(), *qg = q_grp.data_ptr<int32_t>();
  const int32_t *kl = k_lab.data_ptr<int32_t>(), *kg = k_grp.data_ptr<int32_t>();
  const bool* tab = table.data_ptr<bool>();
  const acc_t* lse_p = lse.data_ptr<acc_t>();
  const acc_t* gs_p = gs.data_ptr<acc_t>();
  acc_t* dk_p = dk.data_ptr<acc_t>();
  const GroupBits bits(table);
  const int64_t n_blocks = (m + GRAD_BANK_BLOCK - 1) / GRAD_BANK_BLOCK;
  const bool own = own_products<in_t>();
  const auto k_pk = pack_rows(own, kp, m, d, k_rows, true, false, false);
  const auto q_pk = pack_rows(own, qp, n, d, q_rows, false, true, true);

  // Each bank block is owned by one thread and sums the query tiles in a fixed order: the result
  // does not depend on the thread count or on scheduling.
  at::parallel_for(0, n_blocks, 1, [&](int64_t blk_begin, int64_t blk_end) {
    std::vector<acc_t> k_buf, q_buf, scores(GRAD_BANK_BLOCK * GRAD_QUERY_TILE),
        acc(GRAD_BANK_BLOCK * d);
    std::vector<uint8_t> ok(GRAD_QUERY_TILE);
    std::vector<c10::BFloat16> w_buf;
    for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
      const int64_t c0 = blk * GRAD_BANK_BLOCK, mb = std::min(GRAD_BANK_BLOCK, m - c0);
      const acc_t* kb = own ? nullptr : rows_as_acc(kp, c0, mb, d, k_rows, k_buf);
      std::fill(acc.begin(), acc.begin() + mb * d, acc_t(0));
      at::Tensor k_view = own ? at::Tensor() : view(kb, mb, d, d, 1);
      at::Tensor acc_view = view(acc.data(), mb, d, d, 1);
      bool any_usable = false;
      for (int64_t j = 0; j < mb; ++j) any_usable |= kg[c0 + j] >= 0;

      for (int64_t a = 0; any_usable && a < n; a += GRAD_QUERY_TILE) {
        const int64_t nt = std::min(GRAD_QUERY_TILE, n - a);
        const acc_t* qt = nullptr;
        at::Tensor s_view = view(scores.data(), mb, nt, nt, 1);
        if constexpr (has_own_products<in_t>)
          if (own) products::scores(k_pk, c0, mb, q_pk, a, nt, scores.data(), nt);
        if (!own) {
          qt = rows_as_acc(qp, a, nt, d, q_rows, q_buf);
          at::cpu::mm_out(s_view, k_view, view(qt, d, nt, 1, d));
        }
        for (int64_t j = 0; j < mb; ++j) {
          acc_t* row = scores.data() + j * nt;
          const int32_t grp = kg[c0 + j];
          if (grp < 0) {
            std::fill(row, row + nt, acc_t(0));
            continue;
          }
          negatives(ok.data(), nt, kl[c0 + j], ql + a, qg + a, bits.enabled(),
                    bits.enabled() ? bits.by_col[grp] : 0, tab + grp, g);
          grad_weights(row, ok.data(), lse_p + a, gs_p + a, q_scale.data() + a, iq + a, nt,
                       ik[c0 + j]);
        }
        if constexpr (has_own_products<in_t>)
          if (own) products::accumulate(scores.data(), nt, mb, q_pk, a, nt, acc.data(), d, w_buf);
        if (!own) at::cpu::addmm_out(acc_view, acc_view, s_view, view(qt, nt, d, d, 1));
      }
      std::copy(acc.begin(), acc.begin() + mb * d, dk_p + c0 * d);
    }
  });
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_fwd_cpu(
    const at::Tensor& q, const at::Tensor& p, const at::Tensor& k, const at::Tensor& inv_q,
    const at::Tensor& inv_p, const at::Tensor& inv_k, const at::Tensor& q_lab,
    const at::Tensor& q_grp, const at::Tensor& k_lab, const at::Tensor& k_grp,
    const at::Tensor& table, double inv_tau, bool need_o, bool /*tensor_cores: CUDA only*/) {
  const auto [n, m, d] = check_features_and_masks(q, &p, k, q_lab, q_grp, k_lab, k_grp, table);
  check_inverse_norms(inv_q, &inv_p, inv_k, n, m, q.scalar_type());
  check_group_ids_host(q_grp, "q_grp", table.size(0));
  check_group_ids_host(k_grp, "k_grp", table.size(0));
  const auto opts = q.options().dtype(acc_type(q.scalar_type()));
  at::Tensor loss = at::empty({n}, opts), lse = at::empty({n}, opts);
  at::Tensor o = at::empty({need_o ? n : 0, d}, opts);
  dispatch_input(q.scalar_type(), "q", [&](auto in, auto acc) {
    using in_t = decltype(in);
    using acc_t = decltype(acc);
    forward_kernel<in_t, acc_t>(q, p, k, inv_q, inv_p, inv_k, q_lab, q_grp, k_lab, k_grp, table,
                                static_cast<acc_t>(inv_tau), need_o, loss, lse, o);
  });
  return {loss, lse, o};
}

at::Tensor infonce_bank_grad_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& inv_q,
                                 const at::Tensor& inv_k, const at::Tensor& q_lab,
                                 const at::Tensor& q_grp, const at::Tensor& k_lab,
                                 const at::Tensor& k_grp, const at::Tensor& table,
                                 const at::Tensor& lse, const at::Tensor& gs, double inv_tau,
                                 bool /*tensor_cores: CUDA only*/) {
  const auto [n, m, d] = check_features_and_masks(q, nullptr, k, q_lab, q_grp, k_lab, k_grp, table);
  check_inverse_norms(inv_q, nullptr, inv_k, n, m, q.scalar_type());
  check_group_ids_host(q_grp, "q_grp", table.size(0));
  check_group_ids_host(k_grp, "k_grp", table.size(0));
  const auto acc = acc_type(q.scalar_type());
  check_vector(lse, "lse", n, acc);
  check_vector(gs, "gs", n, acc);
  at::Tensor dk = at::empty({m, d}, k.options().dtype(acc));
  dispatch_input(q.scalar_type(), "q", [&](auto in, auto acc_v) {
    using in_t = decltype(in);
    using acc_t = decltype(acc_v);
    bank_grad_kernel<in_t, acc_t>(q, k, inv_q, inv_k, q_lab, q_grp, k_lab, k_grp, table, lse, gs,
                                  static_cast<acc_t>(inv_tau), dk);
  });
  return dk;
}

}  // namespace
}  // namespace cdcl::cpu

TORCH_LIBRARY_IMPL(cdcl_ops_C, CPU, m) {
  m.impl("infonce_fwd", &cdcl::cpu::infonce_fwd_cpu);
  m.impl("infonce_bank_grad", &cdcl::cpu::infonce_bank_grad_cpu);
}
