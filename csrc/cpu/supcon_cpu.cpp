// CPU forward and bank gradient of the supervised contrastive loss (docs/design.md §7), on the
// tiles, products and row passes of the masked InfoNCE kernels (tiles.h, products.h,
// row_kernels.h). As there, a thread owns a block of rows (queries in the forward, bank rows in
// the bank gradient) and streams tiles of the other side through a small score buffer: no N x M
// buffer exists.
//   "all": one pass over the bank: the online log-sum-exp over positives and negatives with its
//   O = sum_j pi_ij kh_j, and the positives' count, score sum and (for the query gradient) the
//   sum of their rows, a second product per tile with the positives' weights.
//   "negatives": the same pass over the negatives alone (their log-sum-exp L and O; positives
//   counted), then a second pass over the positives against the final L: softplus(L - s) is the
//   loss term of a positive and sigmoid(L - s) its weight, summed for the negatives' share and
//   multiplied into the positives' rows for the query gradient.
// The bank gradient recomputes each score exactly as the forward formed it (as infonce_cpu.cpp).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string_view>
#include <vector>

#include "../checks.h"
#include "products.h"
#include "row_kernels.h"
#include "tiles.h"

namespace cdcl::cpu {
namespace {

using namespace tiles;  // the helpers both losses' kernels share (tiles.h)

// The per-query outputs (ContrastRows of cdcl_ops/backends/interface.py).
template <typename acc_t>
struct ContrastOut {
  acc_t *loss, *lse, *lse_weight, *pos_coef, *u;
  int32_t* n_pos;
};

// out += w t: the weights of a (rows x mt) buffer times the tile's raw rows, our products or BLAS
template <typename in_t, typename acc_t>
void accumulate_tile(bool own, const acc_t* w, int64_t rows, const products::Rows<in_t>& packed,
                     int64_t c0, int64_t mt, const acc_t* tile, int64_t d, acc_t* out,
                     std::vector<c10::BFloat16>& w_buf) {
  if constexpr (has_own_products<in_t>)
    if (own) products::accumulate(w, mt, rows, packed, c0, mt, out, d, w_buf);
  if (!own) {
    at::Tensor o_view = view(out, rows, d, d, 1);
    at::cpu::addmm_out(o_view, o_view, view(w, rows, mt, mt, 1), view(tile, mt, d, d, 1));
  }
}

template <typename in_t, typename acc_t>
void forward_kernel(const at::Tensor& q, const at::Tensor* p, const at::Tensor& k,
                    const at::Tensor& inv_q, const at::Tensor* inv_p, const at::Tensor& inv_k,
                    const at::Tensor& q_lab, const at::Tensor& q_grp, const at::Tensor& k_lab,
                    const at::Tensor& k_grp, const at::Tensor& table, acc_t inv_tau, bool all,
                    bool exclude_self, bool need_u, ContrastOut<acc_t> res) {
  const int64_t n = q.size(0), m = k.size(0), d = q.size(1), g = table.size(0);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const in_t* qp = q.data_ptr<in_t>();
  const in_t* pp = p != nullptr ? p->data_ptr<in_t>() : nullptr;
  const in_t* kp = k.data_ptr<in_t>();
  const RowScales<acc_t> q_rows(inv_q.data_ptr<acc_t>(), n), k_rows(inv_k.data_ptr<acc_t>(), m);
  const RowScales<acc_t> p_rows(p != nullptr ? inv_p->data_ptr<acc_t>() : nullptr, p != nullptr ? n : 0);
  const std::vector<acc_t> q_scale = score_scales(q_rows, n, inv_tau);
  const acc_t *iq = q_rows.inv.data(), *ik = k_rows.inv.data();
  const int32_t *ql = q_lab.data_ptr<int32_t>(), *qg = q_grp.data_ptr<int32_t>();
  const int32_t *kl = k_lab.data_ptr<int32_t>(), *kg = k_grp.data_ptr<int32_t>();
  const bool* tab = table.data_ptr<bool>();
  const GroupBits bits(table);
  const int64_t n_blocks = (n + FWD_QUERY_BLOCK - 1) / FWD_QUERY_BLOCK;
  const bool own = own_products<in_t>();
  const auto q_pk = pack_rows(own, qp, n, d, q_rows, true, false, false);
  const auto k_pk = pack_rows(own, kp, m, d, k_rows, false, true, need_u);
  const bool pos_rows = all && need_u;  // "all" keeps the sum of the positives' rows

  at::parallel_for(0, n_blocks, 1, [&](int64_t blk_begin, int64_t blk_end) {
    constexpr int64_t B = FWD_QUERY_BLOCK, T = FWD_BANK_TILE;
    std::vector<acc_t> q_buf, k_buf, s_pair(B), run_max(B), run_sum(B), pos_score(B), soft(B),
        sig(B), scores(B * T), pw(pos_rows ? B * T : 0), out(need_u ? B * d : 0),
        out2(need_u ? B * d : 0);
    std::vector<int64_t> count(B);
    std::vector<uint8_t> code(T), ok(T), paired(B), live(B);
    std::vector<c10::BFloat16> w_buf;
    for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
      const int64_t a = blk * B, nb = std::min(B, n - a);
      const acc_t* qb = rows_as_acc(qp, a, nb, d, q_rows, q_buf);
      const at::Tensor q_view = view(qb, nb, d, d, 1);
      bool any_active = false;
      for (int64_t i = 0; i < nb; ++i) {
        paired[i] = pp != nullptr && qg[a + i] >= 0;
        s_pair[i] = 0;
        if (paired[i]) {  // as infonce_cpu.cpp forms s+
          const acc_t p_factor = p_rows.scale[a + i];
          acc_t dot = 0;
          for (int64_t c = 0; c < d; ++c)
            dot += qb[i * d + c] * (static_cast<acc_t>(pp[(a + i) * d + c]) * p_factor);
          s_pair[i] = dot * iq[a + i] * p_rows.inv[a + i] * inv_tau;
        }
        // "all": the paired positive is in the log-sum-exp's set and seeds it
        run_max[i] = all && paired[i] ? s_pair[i] : neg_inf;
        run_sum[i] = all && paired[i] ? 1 : 0;
        pos_score[i] = paired[i] ? s_pair[i] : 0;
        count[i] = paired[i];
        any_active |= qg[a + i] >= 0;
      }
      if (need_u) {
        std::fill(out.begin(), out.begin() + nb * d, acc_t(0));
        std::fill(out2.begin(), out2.begin() + nb * d, acc_t(0));
      }
      // a tile of scores, raw inner products of the block against bank rows [c0, c0 + mt)
      auto tile_scores = [&](int64_t c0, int64_t mt) -> const acc_t* {
        if constexpr (has_own_products<in_t>)
          if (own) {
            products::scores(q_pk, a, nb, k_pk, c0, mt, scores.data(), mt);
            return nullptr;
          }
        const acc_t* kt = rows_as_acc(kp, c0, mt, d, k_rows, k_buf);
        at::Tensor s_view = view(scores.data(), nb, mt, mt, 1);
        at::cpu::mm_out(s_view, q_view, view(kt, d, mt, 1, d));
        return kt;
      };
      auto classify_row = [&](int64_t i, int64_t c0, int64_t mt) {
        const int32_t grp = qg[a + i];
        classify(code.data(), mt, ql[a + i], kl + c0, kg + c0, bits.enabled(),
                 bits.enabled() ? bits.by_row[grp] : 0, tab + grp * g, 1,
                 exclude_self ? a + i - c0 : -1);
      };

      // pass 1: the online log-sum-exp over P u N ("all") or N ("negatives"), with O in `out`
      for (int64_t c0 = 0; any_active && c0 < m; c0 += T) {
        const int64_t mt = std::min(T, m - c0);
        const acc_t* kt = tile_scores(c0, mt);
        bool any_weight = false, any_positive = false;
        for (int64_t i = 0; i < nb; ++i) {
          acc_t* row = scores.data() + i * mt;
          acc_t* pw_row = pos_rows ? pw.data() + i * mt : nullptr;
          if (qg[a + i] < 0) {
            std::fill(row, row + mt, acc_t(0));
            if (pw_row != nullptr) std::fill(pw_row, pw_row + mt, acc_t(0));
            continue;
          }
          classify_row(i, c0, mt);
          const uint8_t* in_set = code.data();  // "all": every candidate (a code != 0)
          if (!all) {
            int64_t c = 0;
            for (int64_t j = 0; j < mt; ++j) {
              ok[j] = code[j] == CODE_NEGATIVE;
              c += code[j] == CODE_POSITIVE;
            }
            count[i] += c;
            in_set = ok.data();
          }
          const acc_t tile_max = mask_scale_max(row, in_set, ik + c0, mt, q_scale[a + i]);
          if (all) {  // between the scaling and the exponentials: the positives' scores
            const int64_t before = count[i];
            pos_score[i] += positive_sum(row, code.data(), ik + c0, pw_row, mt, &count[i]);
            any_positive |= count[i] > before;
          }
          if (tile_max == neg_inf) {
            std::fill(row, row + mt, acc_t(0));
            continue;
          }
          // a NaN tile maximum keeps run_max: exp_sum then makes the sum (and the loss) NaN
          if (tile_max > run_max[i]) {
            const acc_t alpha = run_max[i] == neg_inf ? acc_t(0) : std::exp(run_max[i] - tile_max);
            run_sum[i] *= alpha;
            if (need_u)
              for (int64_t c = 0; c < d; ++c) out[i * d + c] *= alpha;
            run_max[i] = tile_max;
          }
          run_sum[i] += exp_sum(row, ik + c0, mt, run_max[i]);
          any_weight = true;
        }
        if (need_u && any_weight)
          accumulate_tile(own, scores.data(), nb, k_pk, c0, mt, kt, d, out.data(), w_buf);
        if (pos_rows && any_positive)
          accumulate_tile(own, pw.data(), nb, k_pk, c0, mt, kt, d, out2.data(), w_buf);
      }

      bool any_live = false;
      for (int64_t i = 0; i < nb; ++i) {
        const int64_t r = a + i;
        const acc_t log_sum = std::log(run_sum[i]);
        const acc_t lse = run_max[i] + log_sum;  // -inf for an empty set
        const acc_t inv_count = count[i] > 0 ? acc_t(1) / static_cast<acc_t>(count[i]) : acc_t(0);
        res.lse[r] = lse;
        res.n_pos[r] = static_cast<int32_t>(count[i]);
        const acc_t inv_sum = run_sum[i] > 0 ? acc_t(1) / run_sum[i] : acc_t(0);
        if (!all) {
          // pass 2 for queries with a positive and a negative (NaN: let it through); O's mean
          live[i] = count[i] > 0 && !(lse == neg_inf);
          any_live |= live[i] != 0;
          soft[i] = sig[i] = 0;
          if (need_u)
            for (int64_t c = 0; c < d; ++c) out[i * d + c] *= inv_sum;
          continue;
        }
        const bool has = count[i] > 0;
        // (m - mean) + log l: the large terms cancel before the small one is added
        res.loss[r] = has ? (run_max[i] - pos_score[i] * inv_count) + log_sum : acc_t(0);
        res.lse_weight[r] = has ? acc_t(1) : acc_t(0);
        res.pos_coef[r] = paired[i] ? std::exp(s_pair[i] - lse) - inv_count : acc_t(0);
        if (need_u)
          for (int64_t c = 0; c < d; ++c)
            res.u[r * d + c] = has ? out[i * d + c] * inv_sum - out2[i * d + c] * inv_count : acc_t(0);
      }
      if (all) continue;

      // pass 2 ("negatives"): each positive against L; sum_p sigmoid(L - s_p) kh_p into out2
      for (int64_t c0 = 0; any_live && c0 < m; c0 += T) {
        const int64_t mt = std::min(T, m - c0);
        const acc_t* kt = tile_scores(c0, mt);
        for (int64_t i = 0; i < nb; ++i) {
          acc_t* row = scores.data() + i * mt;
          if (!live[i]) {
            std::fill(row, row + mt, acc_t(0));
            continue;
          }
          classify_row(i, c0, mt);
          soft[i] += positive_softplus(row, code.data(), ik + c0, mt, q_scale[a + i], res.lse[a + i],
                                       &sig[i]);
        }
        if (need_u) accumulate_tile(own, scores.data(), nb, k_pk, c0, mt, kt, d, out2.data(), w_buf);
      }
      for (int64_t i = 0; i < nb; ++i) {
        const int64_t r = a + i;
        if (!live[i]) {  // no positive, or positives against nothing: -log 1 each
          res.loss[r] = res.lse_weight[r] = res.pos_coef[r] = 0;
          if (need_u) std::fill(res.u + r * d, res.u + (r + 1) * d, acc_t(0));
          continue;
        }
        const acc_t inv_count = acc_t(1) / static_cast<acc_t>(count[i]);
        acc_t sig_pair = 0;
        if (paired[i]) {
          acc_t soft_pair;
          softplus_sigmoid(res.lse[r] - s_pair[i], &soft_pair, &sig_pair);
          soft[i] += soft_pair;
          sig[i] += sig_pair;
        }
        res.loss[r] = soft[i] * inv_count;
        res.lse_weight[r] = sig[i] * inv_count;
        res.pos_coef[r] = -sig_pair * inv_count;
        if (need_u)
          for (int64_t c = 0; c < d; ++c)
            res.u[r * d + c] = out[i * d + c] * res.lse_weight[r] - out2[i * d + c] * inv_count;
      }
    }
  });
}

template <typename in_t, typename acc_t>
void bank_grad_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& inv_q,
                      const at::Tensor& inv_k, const at::Tensor& q_lab, const at::Tensor& q_grp,
                      const at::Tensor& k_lab, const at::Tensor& k_grp, const at::Tensor& table,
                      const at::Tensor& lse, const at::Tensor& gs_lse, const at::Tensor& gs_pos,
                      acc_t inv_tau, bool all, bool exclude_self, at::Tensor& dk) {
  const int64_t n = q.size(0), m = k.size(0), d = q.size(1), g = table.size(0);
  const in_t* qp = q.data_ptr<in_t>();
  const in_t* kp = k.data_ptr<in_t>();
  const RowScales<acc_t> q_rows(inv_q.data_ptr<acc_t>(), n), k_rows(inv_k.data_ptr<acc_t>(), m);
  const std::vector<acc_t> q_scale = score_scales(q_rows, n, inv_tau);
  const acc_t *iq = q_rows.inv.data(), *ik = k_rows.inv.data();
  const int32_t *ql = q_lab.data_ptr<int32_t>(), *qg = q_grp.data_ptr<int32_t>();
  const int32_t *kl = k_lab.data_ptr<int32_t>(), *kg = k_grp.data_ptr<int32_t>();
  const bool* tab = table.data_ptr<bool>();
  const acc_t *lse_p = lse.data_ptr<acc_t>(), *gl = gs_lse.data_ptr<acc_t>(), *gp = gs_pos.data_ptr<acc_t>();
  acc_t* dk_p = dk.data_ptr<acc_t>();
  const GroupBits bits(table);
  const int64_t n_blocks = (m + GRAD_BANK_BLOCK - 1) / GRAD_BANK_BLOCK;
  const bool own = own_products<in_t>();
  const auto k_pk = pack_rows(own, kp, m, d, k_rows, true, false, false);
  const auto q_pk = pack_rows(own, qp, n, d, q_rows, false, true, true);

  // each bank block is one thread's and sums the query tiles in a fixed order: deterministic
  at::parallel_for(0, n_blocks, 1, [&](int64_t blk_begin, int64_t blk_end) {
    constexpr int64_t B = GRAD_BANK_BLOCK, T = GRAD_QUERY_TILE;
    std::vector<acc_t> k_buf, q_buf, scores(B * T), acc(B * d);
    std::vector<uint8_t> code(T);
    std::vector<c10::BFloat16> w_buf;
    for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
      const int64_t c0 = blk * B, mb = std::min(B, m - c0);
      const acc_t* kb = own ? nullptr : rows_as_acc(kp, c0, mb, d, k_rows, k_buf);
      std::fill(acc.begin(), acc.begin() + mb * d, acc_t(0));
      const at::Tensor k_view = own ? at::Tensor() : view(kb, mb, d, d, 1);
      bool any_usable = false;
      for (int64_t j = 0; j < mb; ++j) any_usable |= kg[c0 + j] >= 0;

      for (int64_t a = 0; any_usable && a < n; a += T) {
        const int64_t nt = std::min(T, n - a);
        const acc_t* qt = nullptr;
        if constexpr (has_own_products<in_t>)
          if (own) products::scores(k_pk, c0, mb, q_pk, a, nt, scores.data(), nt);
        if (!own) {
          qt = rows_as_acc(qp, a, nt, d, q_rows, q_buf);
          at::Tensor s_view = view(scores.data(), mb, nt, nt, 1);
          at::cpu::mm_out(s_view, k_view, view(qt, d, nt, 1, d));
        }
        for (int64_t j = 0; j < mb; ++j) {
          acc_t* row = scores.data() + j * nt;
          const int32_t grp = kg[c0 + j];
          if (grp < 0) {
            std::fill(row, row + nt, acc_t(0));
            continue;
          }
          classify(code.data(), nt, kl[c0 + j], ql + a, qg + a, bits.enabled(),
                   bits.enabled() ? bits.by_col[grp] : 0, tab + grp, g,
                   exclude_self ? c0 + j - a : -1);
          contrast_grad_weights(all, row, code.data(), lse_p + a, gl + a, gp + a,
                                q_scale.data() + a, iq + a, nt, ik[c0 + j]);
        }
        accumulate_tile(own, scores.data(), mb, q_pk, a, nt, qt, d, acc.data(), w_buf);
      }
      std::copy(acc.begin(), acc.begin() + mb * d, dk_p + c0 * d);
    }
  });
}

bool all_of(std::string_view denominator) {
  TORCH_CHECK(denominator == "all" || denominator == "negatives",
              "denominator: expected \"all\" or \"negatives\", got \"", std::string(denominator), "\"");
  return denominator == "all";
}

// exclude_self: k is q itself (the caller passes the same rows), so it has q's rows
void check_self(bool exclude_self, const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK(!exclude_self || k.size(0) == q.size(0),
              "k: expected the queries' own rows with exclude_self, got ", k.size(0), " rows for ",
              q.size(0), " queries");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> supcon_fwd_cpu(
    const at::Tensor& q, const std::optional<at::Tensor>& p, const at::Tensor& k,
    const at::Tensor& inv_q, const std::optional<at::Tensor>& inv_p, const at::Tensor& inv_k,
    const at::Tensor& q_lab, const at::Tensor& q_grp, const at::Tensor& k_lab,
    const at::Tensor& k_grp, const at::Tensor& table, double inv_tau, c10::string_view denominator,
    bool exclude_self, bool need_u) {
  const bool all = all_of(std::string_view(denominator.data(), denominator.size()));
  TORCH_CHECK(p.has_value() == inv_p.has_value(), "p, inv_p: expected both or none");
  const at::Tensor* p_ptr = p.has_value() ? &*p : nullptr;
  const at::Tensor* inv_p_ptr = inv_p.has_value() ? &*inv_p : nullptr;
  const auto [n, m, d] = check_features_and_masks(q, p_ptr, k, q_lab, q_grp, k_lab, k_grp, table);
  check_inverse_norms(inv_q, inv_p_ptr, inv_k, n, m, q.scalar_type());
  check_self(exclude_self, q, k);
  check_group_ids_host(q_grp, "q_grp", table.size(0));
  check_group_ids_host(k_grp, "k_grp", table.size(0));
  const auto opts = q.options().dtype(acc_type(q.scalar_type()));
  at::Tensor loss = at::empty({n}, opts), lse = at::empty({n}, opts);
  at::Tensor lse_weight = at::empty({n}, opts), pos_coef = at::empty({n}, opts);
  at::Tensor n_pos = at::empty({n}, q.options().dtype(at::kInt));
  at::Tensor u = at::empty({need_u ? n : 0, d}, opts);
  dispatch_input(q.scalar_type(), "q", [&](auto in, auto acc) {
    using in_t = decltype(in);
    using acc_t = decltype(acc);
    ContrastOut<acc_t> res{loss.data_ptr<acc_t>(), lse.data_ptr<acc_t>(),
                           lse_weight.data_ptr<acc_t>(), pos_coef.data_ptr<acc_t>(),
                           need_u ? u.data_ptr<acc_t>() : nullptr, n_pos.data_ptr<int32_t>()};
    forward_kernel<in_t, acc_t>(q, p_ptr, k, inv_q, inv_p_ptr, inv_k, q_lab, q_grp, k_lab, k_grp,
                                table, static_cast<acc_t>(inv_tau), all, exclude_self, need_u, res);
  });
  return {loss, lse, n_pos, lse_weight, pos_coef, u};
}

at::Tensor supcon_bank_grad_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& inv_q,
                                const at::Tensor& inv_k, const at::Tensor& q_lab,
                                const at::Tensor& q_grp, const at::Tensor& k_lab,
                                const at::Tensor& k_grp, const at::Tensor& table,
                                const at::Tensor& lse, const at::Tensor& gs_lse,
                                const at::Tensor& gs_pos, double inv_tau,
                                c10::string_view denominator, bool exclude_self) {
  const bool all = all_of(std::string_view(denominator.data(), denominator.size()));
  const auto [n, m, d] = check_features_and_masks(q, nullptr, k, q_lab, q_grp, k_lab, k_grp, table);
  check_inverse_norms(inv_q, nullptr, inv_k, n, m, q.scalar_type());
  check_self(exclude_self, q, k);
  check_group_ids_host(q_grp, "q_grp", table.size(0));
  check_group_ids_host(k_grp, "k_grp", table.size(0));
  const auto acc = acc_type(q.scalar_type());
  check_vector(lse, "lse", n, acc);
  check_vector(gs_lse, "gs_lse", n, acc);
  check_vector(gs_pos, "gs_pos", n, acc);
  at::Tensor dk = at::empty({m, d}, k.options().dtype(acc));
  dispatch_input(q.scalar_type(), "q", [&](auto in, auto acc_v) {
    using in_t = decltype(in);
    using acc_t = decltype(acc_v);
    bank_grad_kernel<in_t, acc_t>(q, k, inv_q, inv_k, q_lab, q_grp, k_lab, k_grp, table, lse,
                                  gs_lse, gs_pos, static_cast<acc_t>(inv_tau), all, exclude_self, dk);
  });
  return dk;
}

}  // namespace
}  // namespace cdcl::cpu

TORCH_LIBRARY_IMPL(cdcl_ops_C, CPU, m) {
  m.impl("supcon_fwd", &cdcl::cpu::supcon_fwd_cpu);
  m.impl("supcon_bank_grad", &cdcl::cpu::supcon_bank_grad_cpu);
}
