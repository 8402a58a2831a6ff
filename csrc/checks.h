// Argument checks shared by the CPU and CUDA implementations. The Python layer validates user
// input with ValueErrors; these guard direct calls of torch.ops.cdcl_ops_C.* from misuse.
#pragma once
#include <ATen/core/Tensor.h>
#include <tuple>
#include <utility>
#include <c10/util/Exception.h>

namespace cdcl {

inline void check_rows(const at::Tensor& t, const char* name, int64_t rows, int64_t d) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == d, name, ": expected shape (",
              rows, ", ", d, "), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

inline void check_ids(const at::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, ": expected shape (", n, "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kInt && t.is_contiguous(), name,
              ": expected a contiguous int32 tensor, got ", t.scalar_type());
}

inline void check_masks(const at::Tensor& q_lab, const at::Tensor& q_grp, const at::Tensor& k_lab,
                        const at::Tensor& k_grp, const at::Tensor& table, int64_t n, int64_t m) {
  check_ids(q_lab, "q_lab", n);
  check_ids(q_grp, "q_grp", n);
  check_ids(k_lab, "k_lab", m);
  check_ids(k_grp, "k_grp", m);
  TORCH_CHECK(table.dim() == 2 && table.size(0) == table.size(1) && table.size(0) > 0,
              "table: expected a non-empty square (G, G) tensor, got ", table.sizes());
  TORCH_CHECK(table.scalar_type() == at::kBool && table.is_contiguous(),
              "table: expected a contiguous bool tensor, got ", table.scalar_type());
}

// Group ids index the table: out-of-range ids would read out of bounds. The Python layer rejects
// them with a ValueError unless told not to check (check_inputs=False, or under torch.compile);
// host-side kernels re-check here (the CUDA kernels treat such rows as having no negatives).
inline void check_group_ids_host(const at::Tensor& grp, const char* name, int64_t groups) {
  const int32_t* g = grp.data_ptr<int32_t>();
  int32_t worst = -1;
  for (int64_t i = 0; i < grp.numel(); ++i) worst = g[i] > worst ? g[i] : worst;
  TORCH_CHECK(worst < groups, name, ": group ids must be < G=", groups, " (the table size), got ",
              worst);
}

// Features and masks of infonce_fwd (p given) or infonce_bank_grad (p null); returns (n, m, d).
inline std::tuple<int64_t, int64_t, int64_t> check_features_and_masks(
    const at::Tensor& q, const at::Tensor* p, const at::Tensor& k, const at::Tensor& q_lab,
    const at::Tensor& q_grp, const at::Tensor& k_lab, const at::Tensor& k_grp,
    const at::Tensor& table) {
  TORCH_CHECK(q.dim() == 2, "q: expected a 2-D tensor, got ", q.sizes());
  const int64_t n = q.size(0), m = k.size(0), d = q.size(1);
  check_rows(q, "q", n, d);
  if (p != nullptr) {
    check_rows(*p, "p", n, d);
    TORCH_CHECK(p->scalar_type() == q.scalar_type(), "p: expected the dtype of q");
  }
  check_rows(k, "k", m, d);
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "k: expected the dtype of q");
  check_masks(q_lab, q_grp, k_lab, k_grp, table, n, m);
  return {n, m, d};
}

inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// A per-row vector the kernels read: inverse norms, saved LSE, scaled upstream gradient.
inline void check_vector(const at::Tensor& t, const char* name, int64_t rows, at::ScalarType acc) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == rows && t.scalar_type() == acc && t.is_contiguous(),
              name, ": expected a contiguous (", rows, ",) tensor of dtype ", acc, ", got ",
              t.sizes(), " ", t.scalar_type());
}

// Inverse row norms of q, p (when given) and k, in the accumulation dtype of the features.
inline void check_inverse_norms(const at::Tensor& inv_q, const at::Tensor* inv_p,
                                const at::Tensor& inv_k, int64_t n, int64_t m,
                                at::ScalarType features) {
  const at::ScalarType acc = acc_type(features);
  check_vector(inv_q, "inv_q", n, acc);
  if (inv_p != nullptr) check_vector(*inv_p, "inv_p", n, acc);
  check_vector(inv_k, "inv_k", m, acc);
}

// patch_fg_counts input: (B, H, W) integer labels or (B, C, H, W) logits, H and W divisible by grid.
inline void check_patch_input(const at::Tensor& input, int64_t grid) {
  const bool logits = at::isFloatingType(input.scalar_type());
  TORCH_CHECK(logits ? input.dim() == 4 : input.dim() == 3,
              "labels_or_logits: expected (B, H, W) integer labels or (B, C, H, W) float logits, got ",
              input.scalar_type(), " of shape ", input.sizes());
  TORCH_CHECK(grid > 0, "grid: expected a positive patch grid, got ", grid);
  const int64_t h = input.size(-2), w = input.size(-1);
  TORCH_CHECK(h % grid == 0 && w % grid == 0, "labels_or_logits: H and W (", h, ", ", w,
              ") must be divisible by grid=", grid);
  TORCH_CHECK(!logits || input.size(1) > 0, "labels_or_logits: expected at least one class channel");
}

}  // namespace cdcl
