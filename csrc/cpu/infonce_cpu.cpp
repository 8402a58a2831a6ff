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
#include "tiles.h"

namespace cdcl::cpu {
namespace {

using namespace tiles;  // the helpers both losses' kernels share (tiles.h)

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
