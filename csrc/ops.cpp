// Schemas of the native ops (namespace cdcl_ops_C, apart from the Python-defined cdcl_ops:: ops)
// and the Python module entry point, so that `import cdcl_ops._C` loads the registrations.
#include <Python.h>
#include <torch/library.h>

#include "cpu/products.h"

TORCH_LIBRARY(cdcl_ops_C, m) {
  // Raw contiguous feature rows with their inverse L2 norms (the kernels compare the unit rows
  // x * inv); masks in the canonical encoding of cdcl_ops/_validate.py. The bank gradient is with
  // respect to the unit bank rows, in the accumulation dtype (cdcl_ops/ops.py projects it).
  // tensor_cores asks the CUDA kernels for their tensor-core path where it applies (16-bit
  // features); the CPU kernels have none and ignore it.
  m.def("infonce_fwd(Tensor q, Tensor p, Tensor k, Tensor inv_q, Tensor inv_p, Tensor inv_k, "
        "Tensor q_lab, Tensor q_grp, Tensor k_lab, Tensor k_grp, Tensor table, float inv_tau, "
        "bool need_o, bool tensor_cores) -> (Tensor, Tensor, Tensor)");
  m.def("infonce_bank_grad(Tensor q, Tensor k, Tensor inv_q, Tensor inv_k, Tensor q_lab, "
        "Tensor q_grp, Tensor k_lab, Tensor k_grp, Tensor table, Tensor lse, Tensor gs, "
        "float inv_tau, bool tensor_cores) -> Tensor");
  // The supervised contrastive loss (CPU kernels only: csrc/cpu/supcon_cpu.cpp). p and inv_p are
  // absent without paired positives; exclude_self: k is q itself. Returns loss, lse, n_pos (int32),
  // lse_weight, pos_coef and u (cdcl_ops/backends/interface.py ContrastRows).
  m.def("supcon_fwd(Tensor q, Tensor? p, Tensor k, Tensor inv_q, Tensor? inv_p, Tensor inv_k, "
        "Tensor q_lab, Tensor q_grp, Tensor k_lab, Tensor k_grp, Tensor table, float inv_tau, "
        "str denominator, bool exclude_self, bool need_u) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("supcon_bank_grad(Tensor q, Tensor k, Tensor inv_q, Tensor inv_k, Tensor q_lab, "
        "Tensor q_grp, Tensor k_lab, Tensor k_grp, Tensor table, Tensor lse, Tensor gs_lse, "
        "Tensor gs_pos, float inv_tau, str denominator, bool exclude_self) -> Tensor");
  m.def("patch_fg_counts(Tensor labels_or_logits, int grid, int fg_class) -> Tensor");
  // how the CPU kernels multiply rows of a dtype here (csrc/cpu/products.h)
  m.def("cpu_products(ScalarType dtype) -> str", &cdcl::cpu::products::path);
}

static struct PyModuleDef cdcl_ops_c_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "Native kernels of cdcl_ops; the ops live in torch.ops.cdcl_ops_C", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&cdcl_ops_c_module); }
