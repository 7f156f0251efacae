// logit_kl on CPU: per row of V logits,
//   rows = T^2 * sum_v p_v (log p_v - log q_v),  q = softmax(s / T),  p = softmax(t / T),
//   stats = [lse(s / T), lse(t / T)] (float64),  d rows / d s = T (q - p);
// logit_forward_with_grad writes the gradient for given grad_rows in the forward sweep.
// A row that contributes nothing (masked, or no finite teacher logit) has value 0, stats -inf
// and gradient 0. Inputs are [R0, R1, V] row views (any strides for the two leading dims, last
// stride 1).
#include "rows.h"

namespace fastkd {
namespace {

// rows, stats and, with grad_rows, the gradient for them from the same sweep (fastkd._one_pass):
// the exps of each row are kept in a SoftmaxKLScratch, s and t are read once.
std::tuple<at::Tensor, at::Tensor, at::Tensor> logit_pass(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& mask,
    double temperature, const std::optional<at::Tensor>& grad_rows) {
  check_input(student, 3, "student");
  check_input(teacher, 3, "teacher");
  const int64_t count = row_count(student), cols = student.size(2);
  const auto acc = acc_scalar_type(student, teacher);
  at::Tensor rows = at::empty({count}, student.options().dtype(acc));
  at::Tensor stats = at::empty({2, count}, student.options().dtype(at::kDouble));
  at::Tensor g_rows, grad;
  if (grad_rows.has_value()) {
    TORCH_CHECK(grad_rows->numel() == count,
                "fastkd native: grad_rows does not match the rows of student");
    g_rows = pair_rows(*grad_rows, 0, count, acc);
    grad = empty_grad(student);
  }
  const float* valid = mask_data(mask);
  FASTKD_DISPATCH_PAIR(student.scalar_type(), teacher.scalar_type(), "logit_forward", {
    const s_t* s_base = student.const_data_ptr<s_t>();
    const t_t* t_base = teacher.const_data_ptr<t_t>();
    const RowView s_rows(student), t_rows(teacher);
    acc_t* out = rows.data_ptr<acc_t>();
    double* lse_s = stats.data_ptr<double>();
    double* lse_t = lse_s + count;
    s_t* grad_base = grad.defined() ? grad.data_ptr<s_t>() : nullptr;
    const acc_t* g = grad.defined() ? g_rows.const_data_ptr<acc_t>() : nullptr;
    const acc_t t2 = static_cast<acc_t>(temperature * temperature);
    const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
    at::parallel_for(0, count, grain_rows(cols), [&](int64_t begin, int64_t end) {
      acc_t buf_s[kBlock], buf_t[kBlock], buf_g[kBlock];
      SoftmaxKLScratch<acc_t> scratch(grad_base == nullptr ? 0 : cols);
      for (int64_t r = begin; r < end; ++r) {
        out[r] = 0;
        lse_s[r] = lse_t[r] = kNoEntries;
        s_t* grad_row = grad_base == nullptr ? nullptr : grad_base + r * cols;
        SoftmaxKL<acc_t> kl;
        if (grad_row != nullptr) {
          scratch.start_row(grad_row);
        }
        if (valid == nullptr || valid[r] != 0) {
          const s_t* s_row = s_rows.row(s_base, r);
          const t_t* t_row = t_rows.row(t_base, r);
          for (int64_t c = 0; c < cols; c += kBlock) {
            const int64_t n = std::min(kBlock, cols - c);
            const acc_t* s = load_block(s_row + c, n, buf_s);
            const acc_t* t = load_block(t_row + c, n, buf_t);
            if (grad_row == nullptr) {
              kl.add(s, t, n, inv_t);
            } else {
              scratch.add(kl, c, s, t, n, inv_t);
            }
          }
        }
        if (kl.teacher_has_entries()) {
          out[r] = t2 * kl.kl();
          lse_s[r] = kl.lse_s();
          lse_t[r] = kl.lse_t();
        }
        if (grad_row != nullptr) {
          if (kl.teacher_has_entries()) {
            scratch.write_grad(kl, static_cast<double>(g[r]) * temperature, grad_row, buf_g);
          } else {
            zero_row(grad_row, cols);
          }
        }
      }
    });
  });
  return {rows, stats, grad};
}

std::tuple<at::Tensor, at::Tensor> logit_forward(const at::Tensor& student,
                                                 const at::Tensor& teacher,
                                                 const std::optional<at::Tensor>& mask,
                                                 double temperature) {
  auto [rows, stats, grad] = logit_pass(student, teacher, mask, temperature, std::nullopt);
  return {rows, stats};
}

std::tuple<at::Tensor, at::Tensor> logit_forward_with_grad(const at::Tensor& student,
                                                           const at::Tensor& teacher,
                                                           const std::optional<at::Tensor>& mask,
                                                           double temperature,
                                                           const at::Tensor& grad_rows) {
  auto [rows, stats, grad] = logit_pass(student, teacher, mask, temperature, grad_rows);
  return {rows, grad};
}

at::Tensor logit_backward(const at::Tensor& student, const at::Tensor& teacher,
                          const std::optional<at::Tensor>& mask, double temperature,
                          const at::Tensor& stats, const at::Tensor& grad_rows) {
  check_input(student, 3, "student");
  check_input(teacher, 3, "teacher");
  const int64_t count = row_count(student), cols = student.size(2);
  const auto acc = acc_scalar_type(student, teacher);
  const at::Tensor lse = stats.to(at::kDouble).contiguous();
  const at::Tensor g_rows = grad_rows.to(acc).contiguous();
  TORCH_CHECK(lse.numel() == 2 * count && g_rows.numel() == count,
              "fastkd native: stats/grad_rows do not match the rows of student");
  at::Tensor grad = empty_grad(student);
  const float* valid = mask_data(mask);
  FASTKD_DISPATCH_PAIR(student.scalar_type(), teacher.scalar_type(), "logit_backward", {
    const s_t* s_base = student.const_data_ptr<s_t>();
    const t_t* t_base = teacher.const_data_ptr<t_t>();
    const RowView s_rows(student), t_rows(teacher);
    s_t* grad_base = grad.data_ptr<s_t>();
    const double* lse_s = lse.const_data_ptr<double>();
    const double* lse_t = lse_s + count;
    const acc_t* g = g_rows.const_data_ptr<acc_t>();
    const acc_t t = static_cast<acc_t>(temperature);
    const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
    at::parallel_for(0, count, grain_rows(cols), [&](int64_t begin, int64_t end) {
      acc_t buf_s[kBlock], buf_t[kBlock], buf_g[kBlock];
      for (int64_t r = begin; r < end; ++r) {
        s_t* grad_row = grad_base + r * cols;
        if ((valid != nullptr && valid[r] == 0) || lse_t[r] == kNoEntries) {
          zero_row(grad_row, cols);
          continue;
        }
        const s_t* s_row = s_rows.row(s_base, r);
        const t_t* t_row = t_rows.row(t_base, r);
        const SplitLse<acc_t> row_lse_s(lse_s[r]), row_lse_t(lse_t[r]);
        const acc_t row_g = g[r] * t;
        for (int64_t c = 0; c < cols; c += kBlock) {
          const int64_t n = std::min(kBlock, cols - c);
          acc_t* out = out_block<acc_t>(grad_row + c, buf_g);
          softmax_kl_grad(load_block(s_row + c, n, buf_s), load_block(t_row + c, n, buf_t), n,
                          inv_t, row_lse_s, row_lse_t, row_g, out);
          store_block(out, grad_row + c, n);
        }
      }
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastkd_native, m) {
  m.def("logit_forward(Tensor student, Tensor teacher, Tensor? mask, float temperature)"
        " -> (Tensor, Tensor)",
        &logit_forward);
  m.def("logit_backward(Tensor student, Tensor teacher, Tensor? mask, float temperature,"
        " Tensor stats, Tensor grad_rows) -> Tensor",
        &logit_backward);
  m.def("logit_forward_with_grad(Tensor student, Tensor teacher, Tensor? mask, float temperature,"
        " Tensor grad_rows) -> (Tensor, Tensor)",
        &logit_forward_with_grad);
}

}  // namespace fastkd
