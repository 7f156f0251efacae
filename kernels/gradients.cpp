// scale_gradients_ on CPU (fastkd._one_pass): the gradients a one-pass forward wrote for an
// expected upstream gradient, scaled in place to the actual one:
//   grad *= upstream / expected  (0 where expected == 0),  nothing read or written when equal.
// upstream and expected are 0-d float32/float64 tensors read through their data pointers, so that
// nothing dispatches (no .item(), no host synchronisation on any device a caller may model).
#include "rows.h"

namespace fastkd {
namespace {

// Elements of a gradient handed to a task at a time.
constexpr int64_t kChunk = kBlock;

// The factor upstream / expected in their dtype (as grads * (upstream / expected) in torch), 0
// where expected == 0, or nothing when they are equal.
template <typename scalar_t>
std::optional<double> scale_factor(const at::Tensor& upstream, const at::Tensor& expected) {
  const scalar_t u = *upstream.const_data_ptr<scalar_t>();
  const scalar_t e = *expected.const_data_ptr<scalar_t>();
  if (u == e) {
    return std::nullopt;
  }
  return e == 0 ? 0.0 : static_cast<double>(u / e);
}

void scale_gradients_(at::TensorList grads, const at::Tensor& upstream,
                      const at::Tensor& expected) {
  TORCH_CHECK(upstream.is_cpu() && expected.is_cpu() && upstream.numel() == 1 &&
                  expected.numel() == 1 && upstream.scalar_type() == expected.scalar_type() &&
                  (upstream.scalar_type() == at::kFloat || upstream.scalar_type() == at::kDouble),
              "fastkd native: upstream and expected must be 0-d CPU tensors of one dtype, "
              "float32 or float64");
  const std::optional<double> factor = upstream.scalar_type() == at::kFloat
                                           ? scale_factor<float>(upstream, expected)
                                           : scale_factor<double>(upstream, expected);
  if (!factor.has_value()) {
    return;
  }
  std::vector<RowTask> tasks;
  std::vector<int64_t> counts;
  int64_t elements = 0;
  for (const at::Tensor& grad : grads) {
    TORCH_CHECK(grad.is_cpu() && grad.is_contiguous(),
                "fastkd native: gradients must be contiguous CPU tensors");
    const int64_t numel = grad.numel();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(),
                                    "scale_gradients_", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      scalar_t* data = grad.data_ptr<scalar_t>();
      const Vectorized<acc_t> scale(static_cast<acc_t>(*factor));
      // Chunks [begin, end) of kChunk elements; bfloat16/float16 are scaled in float32.
      tasks.push_back([=](int64_t begin, int64_t end) {
        const int64_t first = begin * kChunk, last = std::min(end * kChunk, numel);
        at::vec::map([=](const Vectorized<acc_t>& x) { return x * scale; }, data + first,
                     data + first, last - first);
      });
    });
    counts.push_back((numel + kChunk - 1) / kChunk);
    elements += numel;
  }
  parallel_over_pairs(tasks, counts, elements);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastkd_native, m) {
  m.def("scale_gradients_(Tensor(a!)[] grads, Tensor upstream, Tensor expected) -> ()",
        &scale_gradients_);
}

}  // namespace fastkd
