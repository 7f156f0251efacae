// hidden_mse on CPU: per row of D features of each (student, teacher) pair,
//   rows = sum_d (s_d - t_d)^2 / D,  d rows / d s = 2 (s - t) / D.
// Inputs are lists of [R0, R1, D] row views (any strides for the two leading dims, last stride 1);
// rows of all pairs are concatenated in order, and all pairs run in one parallel region.
#include "rows.h"

namespace fastkd {
namespace {

// Sum of (s - t)^2 over a row of cols elements.
template <typename acc_t, typename s_t, typename t_t>
acc_t squared_distance(const s_t* s_row, const t_t* t_row, int64_t cols, acc_t* buf_s,
                       acc_t* buf_t) {
  using Vec = Vectorized<acc_t>;
  Vec sum(0);
  for (int64_t c = 0; c < cols; c += kBlock) {
    const int64_t n = std::min(kBlock, cols - c);
    const acc_t* s = load_block(s_row + c, n, buf_s);
    const acc_t* t = load_block(t_row + c, n, buf_t);
    int64_t k = 0;
    for (; k + Vec::size() <= n; k += Vec::size()) {
      prefetch_next_block(s + k);
      prefetch_next_block(t + k);
      const Vec d = Vec::loadu(s + k) - Vec::loadu(t + k);
      sum = at::vec::fmadd(d, d, sum);
    }
    if (k < n) {
      const Vec d = Vec::loadu(s + k, n - k) - Vec::loadu(t + k, n - k);
      sum = at::vec::fmadd(d, d, sum);
    }
  }
  return reduce_sum(sum);
}

// out = scale * (s - t) over a row of cols elements.
template <typename acc_t, typename s_t, typename t_t>
void scaled_difference(const s_t* s_row, const t_t* t_row, int64_t cols, acc_t scale,
                       s_t* grad_row, acc_t* buf_s, acc_t* buf_t, acc_t* buf_g) {
  using Vec = Vectorized<acc_t>;
  const Vec vscale(scale);
  for (int64_t c = 0; c < cols; c += kBlock) {
    const int64_t n = std::min(kBlock, cols - c);
    const acc_t* s = load_block(s_row + c, n, buf_s);
    const acc_t* t = load_block(t_row + c, n, buf_t);
    acc_t* out = out_block<acc_t>(grad_row + c, buf_g);
    int64_t k = 0;
    for (; k + Vec::size() <= n; k += Vec::size()) {
      prefetch_next_block(s + k);
      prefetch_next_block(t + k);
      ((Vec::loadu(s + k) - Vec::loadu(t + k)) * vscale).store(out + k);
    }
    if (k < n) {
      ((Vec::loadu(s + k, n - k) - Vec::loadu(t + k, n - k)) * vscale).store(out + k, n - k);
    }
    store_block(out, grad_row + c, n);
  }
}

at::Tensor hidden_forward(at::TensorList students, at::TensorList teachers,
                          const std::optional<at::Tensor>& mask) {
  check_pairs(students, teachers, 3);
  const float* valid = mask_data(mask);
  std::vector<at::Tensor> pieces;
  std::vector<RowTask> tasks;
  std::vector<int64_t> counts;
  int64_t elements = 0;
  for (size_t i = 0; i < students.size(); ++i) {
    const at::Tensor& student = students[i];
    const at::Tensor& teacher = teachers[i];
    const int64_t count = row_count(student), cols = student.size(2);
    at::Tensor rows =
        at::empty({count}, student.options().dtype(acc_scalar_type(student, teacher)));
    FASTKD_DISPATCH_PAIR(student.scalar_type(), teacher.scalar_type(), "hidden_forward", {
      const s_t* s_base = student.const_data_ptr<s_t>();
      const t_t* t_base = teacher.const_data_ptr<t_t>();
      const RowView s_rows(student), t_rows(teacher);
      acc_t* out = rows.data_ptr<acc_t>();
      tasks.push_back([=](int64_t begin, int64_t end) {
        acc_t buf_s[kBlock], buf_t[kBlock];
        for (int64_t r = begin; r < end; ++r) {
          out[r] = valid != nullptr && valid[r] == 0
                       ? acc_t(0)
                       : squared_distance(s_rows.row(s_base, r), t_rows.row(t_base, r), cols,
                                          buf_s, buf_t) /
                             static_cast<acc_t>(cols);
        }
      });
    });
    pieces.push_back(rows);
    counts.push_back(count);
    elements += count * cols;
  }
  parallel_over_pairs(tasks, counts, elements);
  return concat_rows(pieces);
}

std::vector<at::Tensor> hidden_backward(at::TensorList students, at::TensorList teachers,
                                        const std::optional<at::Tensor>& mask,
                                        const at::Tensor& grad_rows) {
  check_pairs(students, teachers, 3);
  const float* valid = mask_data(mask);
  std::vector<at::Tensor> grads, pair_grad_rows;
  std::vector<RowTask> tasks;
  std::vector<int64_t> counts;
  int64_t offset = 0, elements = 0;
  for (size_t i = 0; i < students.size(); ++i) {
    const at::Tensor& student = students[i];
    const at::Tensor& teacher = teachers[i];
    const int64_t count = row_count(student), cols = student.size(2);
    pair_grad_rows.push_back(grad_rows.reshape(-1)
                                 .narrow(0, offset, count)
                                 .to(acc_scalar_type(student, teacher))
                                 .contiguous());
    at::Tensor grad = empty_grad(student);
    FASTKD_DISPATCH_PAIR(student.scalar_type(), teacher.scalar_type(), "hidden_backward", {
      const s_t* s_base = student.const_data_ptr<s_t>();
      const t_t* t_base = teacher.const_data_ptr<t_t>();
      const RowView s_rows(student), t_rows(teacher);
      s_t* grad_base = grad.data_ptr<s_t>();
      const acc_t* g = pair_grad_rows.back().const_data_ptr<acc_t>();
      const acc_t two_over_cols = acc_t(2) / static_cast<acc_t>(cols);
      tasks.push_back([=](int64_t begin, int64_t end) {
        acc_t buf_s[kBlock], buf_t[kBlock], buf_g[kBlock];
        for (int64_t r = begin; r < end; ++r) {
          s_t* grad_row = grad_base + r * cols;
          if (valid != nullptr && valid[r] == 0) {
            zero_row(grad_row, cols);
          } else {
            scaled_difference(s_rows.row(s_base, r), t_rows.row(t_base, r), cols,
                              g[r] * two_over_cols, grad_row, buf_s, buf_t, buf_g);
          }
        }
      });
    });
    grads.push_back(grad);
    counts.push_back(count);
    offset += count;
    elements += count * cols;
  }
  parallel_over_pairs(tasks, counts, elements);
  return grads;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastkd_native, m) {
  m.def("hidden_forward(Tensor[] students, Tensor[] teachers, Tensor? mask) -> Tensor",
        &hidden_forward);
  m.def("hidden_backward(Tensor[] students, Tensor[] teachers, Tensor? mask, Tensor grad_rows)"
        " -> Tensor[]",
        &hidden_backward);
}

}  // namespace fastkd
