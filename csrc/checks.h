// Argument checks shared by the CPU and CUDA implementations. The Python layer validates user
// input with ValueErrors; these guard direct calls of torch.ops.cdcl_ops_C.* from misuse.
#pragma once
#include <ATen/core/Tensor.h>
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

inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace cdcl
