// Foreground pixel counts per patch (docs/design.md §3): (B, H, W) integer labels, or (B, C, H, W) logits
// whose argmax over C is taken on the fly (first maximum wins, as torch.argmax).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <type_traits>

#include "../checks.h"

namespace cdcl::cpu {
namespace {

template <typename T>
inline bool is_foreground_logit(const T* px, int64_t channels, int64_t channel_stride,
                                int64_t fg_class) {
  // fp32 comparisons (16-bit values convert exactly), double ones for float64 logits
  using cmp_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  int64_t best = 0;
  cmp_t best_v = static_cast<cmp_t>(px[0]);
  for (int64_t c = 1; c < channels; ++c) {
    const cmp_t v = static_cast<cmp_t>(px[c * channel_stride]);
    // NaN counts as the maximum, as in torch.argmax
    if (v > best_v || (v != v && best_v == best_v)) {
      best_v = v;
      best = c;
    }
  }
  return best == fg_class;
}

at::Tensor patch_fg_counts_cpu(const at::Tensor& input, int64_t grid, int64_t fg_class) {
  check_patch_input(input, grid);
  const bool logits = at::isFloatingType(input.scalar_type());
  const int64_t b = input.size(0), h = input.size(-2), w = input.size(-1);
  const int64_t channels = logits ? input.size(1) : 1;
  const at::Tensor x = input.contiguous();
  at::Tensor counts = at::empty({b, grid, grid}, input.options().dtype(at::kInt));
  int32_t* out = counts.data_ptr<int32_t>();
  const int64_t ph = h / grid, pw = w / grid;

  AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, x.scalar_type(), "patch_fg_counts",
                             [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    at::parallel_for(0, b * grid, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bi_row = begin; bi_row < end; ++bi_row) {
        const int64_t bi = bi_row / grid, gy = bi_row % grid;
        const scalar_t* image = src + bi * channels * h * w;
        for (int64_t gx = 0; gx < grid; ++gx) {
          int32_t count = 0;
          for (int64_t y = gy * ph; y < (gy + 1) * ph; ++y)
            for (int64_t xx = gx * pw; xx < (gx + 1) * pw; ++xx) {
              const scalar_t* px = image + y * w + xx;
              if constexpr (std::is_floating_point_v<scalar_t> ||
                            std::is_same_v<scalar_t, c10::Half> ||
                            std::is_same_v<scalar_t, c10::BFloat16>)
                count += is_foreground_logit(px, channels, h * w, fg_class);
              else
                count += static_cast<int64_t>(*px) == fg_class;
            }
          out[bi_row * grid + gx] = count;
        }
      }
    });
  });
  return counts;
}

}  // namespace
}  // namespace cdcl::cpu

TORCH_LIBRARY_IMPL(cdcl_ops_C, CPU, m) {
  m.impl("patch_fg_counts", &cdcl::cpu::patch_fg_counts_cpu);
}
