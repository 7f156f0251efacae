// hidden_mse on CPU: per row of D features of each (student, teacher) pair,
//   rows = sum_d (s_d - t_d)^2 / D,  d rows / d s = 2 (s - t) / D.
// Inputs are lists of [R0, R1, D] row views (any strides for the two leading dims, last stride 1);
// rows of all pairs are concatenated in order, and all pairs run in one parallel region. The
// forward, the backward and the one-pass forward with gradient (fastkd._one_pass) are one sweep
// over each row: kRows sums (s - t)^2, kGrad writes the gradient from the same loads.
#include "rows.h"

namespace fastkd {
namespace {

// Over a row of cols elements: returns sum (s - t)^2 when kRows (else 0), and writes
// grad_row = scale * (s - t) when kGrad.
template <bool kRows, bool kGrad, typename acc_t, typename s_t, typename t_t>
acc_t difference_row(const s_t* s_row, const t_t* t_row, int64_t cols, acc_t scale,
                     s_t* grad_row, acc_t* buf_s, acc_t* buf_t, acc_t* buf_g) {
  using Vec = Vectorized<acc_t>;
  const Vec vscale(scale);
  Vec sum(0);
  for (int64_t c = 0; c < cols; c += kBlock) {
    const int64_t n = std::min(kBlock, cols - c);
    const acc_t* s = load_block(s_row + c, n, buf_s);
    const acc_t* t = load_block(t_row + c, n, buf_t);
    acc_t* out = kGrad ? out_block<acc_t>(grad_row + c, buf_g) : nullptr;
    auto step = [&](const Vec& d, int64_t k, int64_t len) {
      if constexpr (kRows) {
        sum = at::vec::fmadd(d, d, sum);
      }
      if constexpr (kGrad) {
        (d * vscale).store(out + k, len);
      }
    };
    int64_t k = 0;
    for (; k + Vec::size() <= n; k += Vec::size()) {
      prefetch_next_block(s + k);
      prefetch_next_block(t + k);
      step(Vec::loadu(s + k) - Vec::loadu(t + k), k, Vec::size());
    }
    if (k < n) {
      step(Vec::loadu(s + k, n - k) - Vec::loadu(t + k, n - k), k, n - k);
    }
    if constexpr (kGrad) {
      store_block(out, grad_row + c, n);
    }
  }
  return reduce_sum(sum);
}

// rows (when want_rows; else an empty tensor) and, with grad_rows, the gradients for them.
std::tuple<at::Tensor, std::vector<at::Tensor>> hidden_pass(
    at::TensorList students, at::TensorList teachers, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& grad_rows, bool want_rows) {
  check_pairs(students, teachers, 3);
  const float* valid = mask_data(mask);
  std::vector<at::Tensor> pieces, grads, pair_grad_rows;
  std::vector<RowTask> tasks;
  std::vector<int64_t> counts;
  int64_t offset = 0, elements = 0;
  for (size_t i = 0; i < students.size(); ++i) {
    const at::Tensor& student = students[i];
    const at::Tensor& teacher = teachers[i];
    const int64_t count = row_count(student), cols = student.size(2);
    const auto acc = acc_scalar_type(student, teacher);
    at::Tensor rows = at::empty({want_rows ? count : 0}, student.options().dtype(acc));
    at::Tensor grad = grad_rows.has_value() ? empty_grad(student) : at::Tensor();
    if (grad_rows.has_value()) {
      pair_grad_rows.push_back(pair_rows(*grad_rows, offset, count, acc));
    }
    FASTKD_DISPATCH_PAIR(student.scalar_type(), teacher.scalar_type(), "hidden", {
      const s_t* s_base = student.const_data_ptr<s_t>();
      const t_t* t_base = teacher.const_data_ptr<t_t>();
      const RowView s_rows(student), t_rows(teacher);
      acc_t* out = want_rows ? rows.data_ptr<acc_t>() : nullptr;
      s_t* grad_base = grad.defined() ? grad.data_ptr<s_t>() : nullptr;
      const acc_t* g = grad.defined() ? pair_grad_rows.back().const_data_ptr<acc_t>() : nullptr;
      const acc_t two_over_cols = acc_t(2) / static_cast<acc_t>(cols);
      tasks.push_back([=](int64_t begin, int64_t end) {
        acc_t buf_s[kBlock], buf_t[kBlock], buf_g[kBlock];
        for (int64_t r = begin; r < end; ++r) {
          const s_t* s_row = s_rows.row(s_base, r);
          const t_t* t_row = t_rows.row(t_base, r);
          s_t* grad_row = grad_base == nullptr ? nullptr : grad_base + r * cols;
          const acc_t scale = g == nullptr ? acc_t(0) : g[r] * two_over_cols;
          acc_t value = 0;
          if (valid != nullptr && valid[r] == 0) {
            if (grad_row != nullptr) {
              zero_row(grad_row, cols);
            }
          } else if (out == nullptr) {
            difference_row<false, true>(s_row, t_row, cols, scale, grad_row, buf_s, buf_t, buf_g);
          } else if (grad_row == nullptr) {
            value = difference_row<true, false>(s_row, t_row, cols, scale, grad_row, buf_s, buf_t,
                                                buf_g);
          } else {
            value = difference_row<true, true>(s_row, t_row, cols, scale, grad_row, buf_s, buf_t,
                                               buf_g);
          }
          if (out != nullptr) {
            out[r] = value / static_cast<acc_t>(cols);
          }
        }
      });
    });
    pieces.push_back(rows);
    if (grad.defined()) {
      grads.push_back(grad);
    }
    counts.push_back(count);
    offset += count;
    elements += count * cols;
  }
  TORCH_CHECK(!grad_rows.has_value() || grad_rows->numel() == offset,
              "fastkd native: grad_rows does not match the rows of the pairs");
  parallel_over_pairs(tasks, counts, elements);
  return {concat_rows(pieces), grads};
}

at::Tensor hidden_forward(at::TensorList students, at::TensorList teachers,
                          const std::optional<at::Tensor>& mask) {
  return std::get<0>(hidden_pass(students, teachers, mask, std::nullopt, true));
}

std::vector<at::Tensor> hidden_backward(at::TensorList students, at::TensorList teachers,
                                        const std::optional<at::Tensor>& mask,
                                        const at::Tensor& grad_rows) {
  return std::get<1>(hidden_pass(students, teachers, mask, grad_rows, false));
}

std::tuple<at::Tensor, std::vector<at::Tensor>> hidden_forward_with_grad(
    at::TensorList students, at::TensorList teachers, const std::optional<at::Tensor>& mask,
    const at::Tensor& grad_rows) {
  return hidden_pass(students, teachers, mask, grad_rows, true);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastkd_native, m) {
  m.def("hidden_forward(Tensor[] students, Tensor[] teachers, Tensor? mask) -> Tensor",
        &hidden_forward);
  m.def("hidden_backward(Tensor[] students, Tensor[] teachers, Tensor? mask, Tensor grad_rows)"
        " -> Tensor[]",
        &hidden_backward);
  m.def("hidden_forward_with_grad(Tensor[] students, Tensor[] teachers, Tensor? mask,"
        " Tensor grad_rows) -> (Tensor, Tensor[])",
        &hidden_forward_with_grad);
}

}  // namespace fastkd
