// Torch side of the CUDA kernels: argument checks, output allocation, device guard, the current
// stream, and an error check after every launch. Built only in CUDA builds of the extension.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "launch.h"

namespace cdcl::cuda {
namespace {

Dtype feature_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::f32;
    case at::kHalf: return Dtype::f16;
    case at::kBFloat16: return Dtype::bf16;
    default:
      TORCH_CHECK(false, name, ": the cuda backend takes float32/float16/bfloat16 features, got ",
                  t.scalar_type());
  }
  return Dtype::f32;  // not reached
}

Masks device_masks(const at::Tensor& q_lab, const at::Tensor& q_grp, const at::Tensor& k_lab,
                   const at::Tensor& k_grp, const at::Tensor& table) {
  return Masks{q_lab.data_ptr<int32_t>(), q_grp.data_ptr<int32_t>(), k_lab.data_ptr<int32_t>(),
               k_grp.data_ptr<int32_t>(), table.data_ptr<bool>(), table.size(0)};
}

void check_device(const at::Tensor& q, std::initializer_list<std::pair<const at::Tensor*, const char*>> others) {
  TORCH_CHECK(q.is_cuda(), "q: expected a CUDA tensor");
  for (const auto& [t, name] : others)
    TORCH_CHECK(t->device() == q.device(), name, ": expected a tensor on ", q.device(), ", got ",
                t->device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_fwd_cuda(
    const at::Tensor& q, const at::Tensor& p, const at::Tensor& k, const at::Tensor& inv_q,
    const at::Tensor& inv_p, const at::Tensor& inv_k, const at::Tensor& q_lab,
    const at::Tensor& q_grp, const at::Tensor& k_lab, const at::Tensor& k_grp,
    const at::Tensor& table, double inv_tau, bool need_o, bool tensor_cores) {
  const auto [n, m, d] = check_features_and_masks(q, &p, k, q_lab, q_grp, k_lab, k_grp, table);
  TORCH_CHECK(d >= 1 && d <= MAX_D, "q: the cuda backend takes 1 <= D <= ", MAX_D, ", got D=", d);
  const Dtype dtype = feature_dtype(q, "q");
  check_inverse_norms(inv_q, &inv_p, inv_k, n, m, q.scalar_type());
  check_device(q, {{&p, "p"}, {&k, "k"}, {&inv_q, "inv_q"}, {&inv_p, "inv_p"}, {&inv_k, "inv_k"},
                   {&q_lab, "q_lab"}, {&q_grp, "q_grp"}, {&k_lab, "k_lab"}, {&k_grp, "k_grp"},
                   {&table, "table"}});
  const c10::cuda::CUDAGuard guard(q.device());
  const auto opts = q.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({n}, opts), lse = at::empty({n}, opts);
  at::Tensor o = at::empty({need_o ? n : 0, d}, opts);
  const cudaError_t err = launch_infonce_fwd(
      dtype, q.data_ptr(), p.data_ptr(), k.data_ptr(),
      InverseNorms{inv_q.data_ptr<float>(), inv_p.data_ptr<float>(), inv_k.data_ptr<float>()},
      device_masks(q_lab, q_grp, k_lab, k_grp, table), n, m, d, static_cast<float>(inv_tau),
      tensor_cores, loss.data_ptr<float>(), lse.data_ptr<float>(),
      need_o ? o.data_ptr<float>() : nullptr, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, lse, o};
}

at::Tensor infonce_bank_grad_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& inv_q,
                                  const at::Tensor& inv_k, const at::Tensor& q_lab,
                                  const at::Tensor& q_grp, const at::Tensor& k_lab,
                                  const at::Tensor& k_grp, const at::Tensor& table,
                                  const at::Tensor& lse, const at::Tensor& gs, double inv_tau,
                                  bool tensor_cores) {
  const auto [n, m, d] = check_features_and_masks(q, nullptr, k, q_lab, q_grp, k_lab, k_grp, table);
  TORCH_CHECK(d >= 1 && d <= MAX_D, "q: the cuda backend takes 1 <= D <= ", MAX_D, ", got D=", d);
  const Dtype dtype = feature_dtype(q, "q");
  check_inverse_norms(inv_q, nullptr, inv_k, n, m, q.scalar_type());
  check_vector(lse, "lse", n, at::kFloat);
  check_vector(gs, "gs", n, at::kFloat);
  check_device(q, {{&k, "k"}, {&inv_q, "inv_q"}, {&inv_k, "inv_k"}, {&q_lab, "q_lab"},
                   {&q_grp, "q_grp"}, {&k_lab, "k_lab"}, {&k_grp, "k_grp"}, {&table, "table"},
                   {&lse, "lse"}, {&gs, "gs"}});
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dk = at::empty({m, d}, k.options().dtype(at::kFloat));
  const cudaError_t err = launch_infonce_bank_grad(
      dtype, q.data_ptr(), k.data_ptr(), InverseNorms{inv_q.data_ptr<float>(), nullptr,
                                                      inv_k.data_ptr<float>()},
      device_masks(q_lab, q_grp, k_lab, k_grp, table), lse.data_ptr<float>(),
      gs.data_ptr<float>(), n, m, d, static_cast<float>(inv_tau), tensor_cores,
      dk.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dk;
}

PixelType pixel_type(at::ScalarType t) {
  switch (t) {
    case at::kLong: return PixelType::i64;
    case at::kInt: return PixelType::i32;
    case at::kShort: return PixelType::i16;
    case at::kChar: return PixelType::i8;
    case at::kByte: return PixelType::u8;
    case at::kBool: return PixelType::boolean;
    case at::kFloat: return PixelType::f32;
    case at::kDouble: return PixelType::f64;
    case at::kHalf: return PixelType::f16;
    case at::kBFloat16: return PixelType::bf16;
    default: TORCH_CHECK(false, "labels_or_logits: unsupported dtype ", t);
  }
  return PixelType::i64;  // not reached
}

at::Tensor patch_fg_counts_cuda(const at::Tensor& input, int64_t grid, int64_t fg_class) {
  check_patch_input(input, grid);
  const bool logits = at::isFloatingType(input.scalar_type());
  const int64_t b = input.size(0), h = input.size(-2), w = input.size(-1);
  const int64_t channels = logits ? input.size(1) : 1;
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  at::Tensor counts = at::empty({b, grid, grid}, input.options().dtype(at::kInt));
  const cudaError_t err = launch_patch_fg_counts(pixel_type(x.scalar_type()), x.data_ptr(), b,
                                                 channels, h, w, grid, fg_class,
                                                 counts.data_ptr<int32_t>(),
                                                 c10::cuda::getCurrentCUDAStream());
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return counts;
}

}  // namespace
}  // namespace cdcl::cuda

TORCH_LIBRARY_IMPL(cdcl_ops_C, CUDA, m) {
  m.impl("infonce_fwd", &cdcl::cuda::infonce_fwd_cuda);
  m.impl("infonce_bank_grad", &cdcl::cuda::infonce_bank_grad_cuda);
  m.impl("patch_fg_counts", &cdcl::cuda::patch_fg_counts_cuda);
}
