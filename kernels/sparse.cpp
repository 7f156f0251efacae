// The sparse (top-k offline teacher) KL on CPU (fastkd.backends). Per row of V student logits s at
// temperature T and the teacher's k stored entries (ids[j] in [0, V), -1 for padding; J the stored
// ones, l_j their log-probabilities at T = 1):
//   s' = s / T,  log q = s' - lse_s,  lse_s = lse(s') over the whole row,
//   renormalize     lse_t = lse_J(l / T),  p_j = exp(l_j / T - lse_t),
//                   rows = T^2 sum_{J, p_j > 0} p_j (log p_j - log q_{id_j}),  a = T,  b_j = -T p_j
//   bucket (T = 1)  lse_t = lse_J(l),  p_j = exp(l_j),  P = sum_J p_j,  Q = sum_J q_{id_j},
//                   p_tail = max(1 - P, 0),  q_tail = 1 - Q,  the tail exists when |J| < V:
//                   rows = sum_{J, p_j > 0} p_j (l_j - log q_{id_j})
//                          + p_tail (log p_tail - log max(q_tail, TINY))  (tail exists, p_tail > 0)
//                   w = p_tail / q_tail (tail exists, q_tail > TINY; else 0),
//                   a = P - w Q,  b_j = w q_{id_j} - p_j
//   grad = grad_rows (a q + scatter_j b_j)  (b_j added at id_j),
//   stats = [lse_s, lse_t] (float64, [2, R]).
// A row contributes nothing when it is masked or lse_t = -inf: value 0, stats -inf, gradient 0.
// The student is a [R0, R1, V] row view (any strides for the two leading dims, last stride 1); ids
// a contiguous int64 [R, k], logprobs a contiguous [R, k] of float32 (float64 for a float64
// student). Arithmetic in float32 (float64 for a float64 student); the sums over the k stored
// entries (lse_t's, the value, P, Q) in float64: they cost k additions, and 1 - P, 1 - Q cancel.
//
// sparse_forward: one sweep over the row for lse_s (online maximum and sum, block by block), then
// the k stored entries (s gathered at the ids). sparse_forward_with_grad: the same sweep keeps its
// exps (in the gradient row, or a row of scratch for bfloat16/float16), then a second sweep over
// them (in cache) writes g a q, scaling each block's exps (no exp: one exp an entry in all), and at
// each id g (a q_{id_j} + b_j), computed once in acc_t and stored in the student's dtype.
// sparse_backward: lse_s and lse_t from the stats, the stored entries, then one sweep over the row
// writing g a q with q = exp((s' - hi_s) - lo_s).
#include "rows.h"

#include <string_view>

namespace fastkd {
namespace {

enum class Tail { kRenormalize, kBucket };

Tail parse_tail(std::string_view name) {
  if (name == "renormalize") {
    return Tail::kRenormalize;
  }
  TORCH_CHECK(name == "bucket", "fastkd native: unknown tail '", name, "'");
  return Tail::kBucket;
}

// The student's softmax over a row: lse_s = max_s + log(sum_s), sum_s = sum exp(s' - max_s).
template <typename acc_t>
struct StudentSums {
  acc_t max_s, sum_s;
  double lse_s() const {
    return static_cast<double>(max_s) + std::log(static_cast<double>(sum_s));
  }
};

// The sums over a row of cols student logits, s' = scale s (scale > 0): per block the maximum,
// then the sum of exp(s' - max) relative to the running maximum (a block that raises it rescales
// the sum by exp(old - new)); lse_s -inf for a row of -inf. With exps (cols values) and shifts
// (one a block), the exps are kept for the gradient: exps[v] = exp(s'_v - shifts[b]) in block b,
// shifts[b] the running maximum after it (-inf, exps 0, while there is none).
template <typename acc_t, typename s_t>
StudentSums<acc_t> student_sums(const s_t* s_row, int64_t cols, acc_t scale, acc_t* buf_s,
                                acc_t* exps, acc_t* shifts) {
  using Vec = Vectorized<acc_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const Vec vscale(scale);
  StudentSums<acc_t> sums{kNegInf, 0};
  for (int64_t c = 0; c < cols; c += kBlock) {
    const int64_t n = std::min(kBlock, cols - c);
    const acc_t* s = load_block(s_row + c, n, buf_s);
    Vec block_max(kNegInf);
    int64_t k = 0;
    for (; k + Vec::size() <= n; k += Vec::size()) {
      prefetch_next_block(s + k);
      block_max = at::vec::clamp_min(Vec::loadu(s + k), block_max);
    }
    if (k < n) {
      block_max = at::vec::clamp_min(load_tail(s + k, n - k, kNegInf), block_max);
    }
    // scale > 0, so the maximum of the scaled values is the scaled maximum, rounding included.
    const acc_t max_s = std::max(sums.max_s, reduce_max(block_max) * scale);
    if (exps != nullptr) {
      shifts[c / kBlock] = max_s;
    }
    if (max_s == kNegInf) {
      if (exps != nullptr) {
        std::fill(exps + c, exps + c + n, acc_t(0));
      }
      continue;
    }
    const Vec neg_max(-max_s);
    Vec block_sum(0);
    auto accumulate = [&](const Vec& x, int64_t pos, int64_t len) {
      const Vec e = vexp(at::vec::fmadd(x, vscale, neg_max));
      block_sum = block_sum + e;
      if (exps != nullptr) {
        e.store(exps + c + pos, len);
      }
    };
    for (k = 0; k + Vec::size() <= n; k += Vec::size()) {
      accumulate(Vec::loadu(s + k), k, Vec::size());
    }
    if (k < n) {
      accumulate(load_tail(s + k, n - k, kNegInf), k, n - k);
    }
    sums.sum_s = (sums.max_s == kNegInf ? acc_t(0) : sums.sum_s * std::exp(sums.max_s - max_s)) +
                 reduce_sum(block_sum);
    sums.max_s = max_s;
  }
  return sums;
}

// lse_J(scale l) over a row's stored entries (ids >= 0), summed in float64; -inf without a
// finite one.
template <typename acc_t>
double teacher_lse(const int64_t* ids, const acc_t* l, int64_t k, acc_t scale) {
  acc_t max_t = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < k; ++j) {
    if (ids[j] >= 0) {
      max_t = std::max(max_t, l[j]);
    }
  }
  if (max_t == -std::numeric_limits<acc_t>::infinity()) {
    return kNoEntries;
  }
  const acc_t shift_t = max_t * scale;
  double sum_t = 0;
  for (int64_t j = 0; j < k; ++j) {
    if (ids[j] >= 0) {
      sum_t += std::exp(std::fma(l[j], scale, -shift_t));
    }
  }
  return static_cast<double>(shift_t) + std::log(sum_t);
}

// The row value and the gradient's coefficient a of q.
template <typename acc_t>
struct StoredTerms {
  acc_t value, a;
};

// The stored entries of a row (see the top): the row value and a; per entry j, q[j] = q_{id_j}
// and b[j] (both 0 at padding). log q_{id_j} = (s'_{id_j} - hi_s) - lo_s, renormalize's
// log p_j = (l_j / T - hi_t) - lo_t, with the split float64 lses.
template <typename acc_t, typename s_t>
StoredTerms<acc_t> stored_terms(Tail tail, const s_t* s_row, const int64_t* ids, const acc_t* l,
                                int64_t k, int64_t cols, double temperature, acc_t scale,
                                SplitLse<acc_t> lse_s, SplitLse<acc_t> lse_t, acc_t* q,
                                acc_t* b) {
  double value = 0, total_p = 0, total_q = 0;
  int64_t stored = 0;
  for (int64_t j = 0; j < k; ++j) {
    if (ids[j] < 0) {
      q[j] = b[j] = 0;
      continue;
    }
    ++stored;
    const acc_t log_q =
        std::fma(static_cast<acc_t>(s_row[ids[j]]), scale, -lse_s.hi) - lse_s.lo;
    const acc_t log_p =
        tail == Tail::kRenormalize ? std::fma(l[j], scale, -lse_t.hi) - lse_t.lo : l[j];
    const acc_t p = std::exp(log_p);
    q[j] = std::exp(log_q);
    b[j] = p;
    if (p > 0) {
      value += p * (log_p - log_q);
    }
    total_p += p;
    total_q += q[j];
  }
  if (tail == Tail::kRenormalize) {
    const acc_t t = static_cast<acc_t>(temperature);
    for (int64_t j = 0; j < k; ++j) {
      b[j] *= -t;
    }
    return {static_cast<acc_t>(temperature * temperature * value), t};
  }
  const acc_t tiny = std::numeric_limits<float>::min();  // the smallest normal float32
  const acc_t p_tail = static_cast<acc_t>(std::max(1 - total_p, 0.0));
  const acc_t q_tail = static_cast<acc_t>(1 - total_q);
  const bool has_tail = stored < cols;
  if (has_tail && p_tail > 0) {
    value += p_tail * (std::log(p_tail) - std::log(std::max(q_tail, tiny)));
  }
  const acc_t w = has_tail && q_tail > tiny ? p_tail / q_tail : acc_t(0);
  for (int64_t j = 0; j < k; ++j) {
    b[j] = w * q[j] - b[j];
  }
  return {static_cast<acc_t>(value), static_cast<acc_t>(total_p - w * total_q)};
}

// grad_row = coef q over the row from the inputs (backward): q = exp(scale s - lse_s) taken as
// exp((scale s - hi) - lo), in the student's dtype.
template <typename acc_t, typename s_t>
void write_dense_grad(const s_t* s_row, int64_t cols, acc_t scale, SplitLse<acc_t> lse_s,
                      acc_t coef, s_t* grad_row, acc_t* buf_s, acc_t* buf_g) {
  using Vec = Vectorized<acc_t>;
  const Vec vscale(scale), neg_hi(-lse_s.hi), neg_lo(-lse_s.lo), vcoef(coef);
  for (int64_t c = 0; c < cols; c += kBlock) {
    const int64_t n = std::min(kBlock, cols - c);
    const acc_t* s = load_block(s_row + c, n, buf_s);
    acc_t* out = out_block<acc_t>(grad_row + c, buf_g);
    for_each_vector<acc_t>(n, [&](int64_t k, int64_t len) {
      prefetch_next_block(s + k);
      const Vec q = vexp(at::vec::fmadd(Vec::loadu(s + k, len), vscale, neg_hi) + neg_lo);
      (q * vcoef).store(out + k, len);
    });
    store_block(out, grad_row + c, n);
  }
}

// grad_row = coef q over the row from the exps student_sums kept (forward_with_grad, no exp):
// q_v = exps[v] exp(shifts[b] - max_s) / sum_s in block b, the factor in float64 (1 where the
// block's shift is the row's maximum, 0 for a block of -inf). exps may be grad_row itself.
template <typename acc_t, typename s_t>
void write_kept_grad(const acc_t* exps, const acc_t* shifts, int64_t cols,
                     const StudentSums<acc_t>& sums, double coef, s_t* grad_row, acc_t* buf_g) {
  using Vec = Vectorized<acc_t>;
  const double coef_s = coef / static_cast<double>(sums.sum_s);
  for (int64_t c = 0; c < cols; c += kBlock) {
    const int64_t n = std::min(kBlock, cols - c);
    const acc_t shift = shifts[c / kBlock];
    const double factor = shift == sums.max_s ? 1.0
                                              : std::exp(static_cast<double>(shift) -
                                                         static_cast<double>(sums.max_s));
    const Vec vcoef(static_cast<acc_t>(coef_s * factor));
    acc_t* out = out_block<acc_t>(grad_row + c, buf_g);
    for_each_vector<acc_t>(n, [&](int64_t k, int64_t len) {
      (Vec::loadu(exps + c + k, len) * vcoef).store(out + k, len);
    });
    store_block(out, grad_row + c, n);
  }
}

// (rows, stats, grad): the forward's rows and stats and, with grad_rows, the gradient for them;
// with stats_in (backward) the lses come from there and only the gradient is returned.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_pass(
    const at::Tensor& student, const at::Tensor& ids, const at::Tensor& logprobs,
    const std::optional<at::Tensor>& mask, double temperature, Tail tail,
    const std::optional<at::Tensor>& grad_rows, const std::optional<at::Tensor>& stats_in) {
  check_input(student, 3, "student");
  const int64_t count = row_count(student), cols = student.size(2);
  const auto acc = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(ids.is_cpu() && ids.scalar_type() == at::kLong && ids.is_contiguous() &&
                  ids.dim() == 2 && ids.size(0) == count,
              "fastkd native: ids must be a contiguous int64 CPU tensor [rows, k]");
  TORCH_CHECK(logprobs.is_cpu() && logprobs.scalar_type() == acc && logprobs.is_contiguous() &&
                  logprobs.sizes() == ids.sizes(),
              "fastkd native: logprobs must be a contiguous CPU tensor of ids' shape, float32 "
              "(float64 for a float64 student)");
  const int64_t k = ids.size(1);
  const bool backward = stats_in.has_value();
  at::Tensor rows = at::empty({backward ? 0 : count}, student.options().dtype(acc));
  at::Tensor stats = at::empty({2, backward ? 0 : count}, student.options().dtype(at::kDouble));
  const at::Tensor row_stats = backward ? stats_in->to(at::kDouble).contiguous() : at::Tensor();
  TORCH_CHECK(!backward || row_stats.numel() == 2 * count,
              "fastkd native: stats do not match the rows of student");
  TORCH_CHECK(!grad_rows.has_value() || grad_rows->numel() == count,
              "fastkd native: grad_rows does not match the rows of student");
  const at::Tensor g_rows =
      grad_rows.has_value() ? pair_rows(*grad_rows, 0, count, acc) : at::Tensor();
  at::Tensor grad = g_rows.defined() ? empty_grad(student) : at::Tensor();
  const float* valid = mask_data(mask);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "sparse", [&] {
    using s_t = scalar_t;
    using acc_t = std::conditional_t<std::is_same_v<s_t, double>, double, float>;
    const s_t* s_base = student.const_data_ptr<s_t>();
    const RowView s_rows(student);
    const int64_t* id_base = ids.const_data_ptr<int64_t>();
    const acc_t* l_base = logprobs.const_data_ptr<acc_t>();
    acc_t* out = backward ? nullptr : rows.data_ptr<acc_t>();
    double* out_lse_s = backward ? nullptr : stats.data_ptr<double>();
    double* out_lse_t = backward ? nullptr : out_lse_s + count;
    const double* in_lse_s = backward ? row_stats.const_data_ptr<double>() : nullptr;
    const double* in_lse_t = backward ? in_lse_s + count : nullptr;
    s_t* grad_base = grad.defined() ? grad.data_ptr<s_t>() : nullptr;
    const acc_t* g = grad.defined() ? g_rows.const_data_ptr<acc_t>() : nullptr;
    const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
    at::parallel_for(0, count, grain_rows(cols), [&](int64_t begin, int64_t end) {
      acc_t buf_s[kBlock], buf_g[kBlock];
      std::vector<acc_t> q(k), b(k);
      // forward_with_grad keeps the student's exps: in the gradient row when it has acc_t's type,
      // else in a row of scratch (in cache for the gradient sweep)
      const bool keep_exps = grad_base != nullptr && !backward;
      std::vector<acc_t> scratch(keep_exps && !std::is_same_v<s_t, acc_t> ? cols : 0);
      std::vector<acc_t> shifts(keep_exps ? (cols + kBlock - 1) / kBlock : 0);
      for (int64_t r = begin; r < end; ++r) {
        const s_t* s_row = s_rows.row(s_base, r);
        const int64_t* row_ids = id_base + r * k;
        const acc_t* row_l = l_base + r * k;
        s_t* grad_row = grad_base == nullptr ? nullptr : grad_base + r * cols;
        acc_t* exps = keep_exps ? out_block<acc_t>(grad_row, scratch.data()) : nullptr;
        double lse_s = kNoEntries, lse_t = kNoEntries;
        StudentSums<acc_t> sums{};
        if (valid == nullptr || valid[r] != 0) {
          if (backward) {
            lse_s = in_lse_s[r];
            lse_t = in_lse_t[r];
          } else {
            lse_t = teacher_lse(row_ids, row_l, k, inv_t);
            if (lse_t != kNoEntries) {
              sums = student_sums(s_row, cols, inv_t, buf_s, exps, shifts.data());
              lse_s = sums.lse_s();
            }
          }
        }
        const bool counts = lse_t != kNoEntries;
        if (!backward) {
          out[r] = 0;
          out_lse_s[r] = counts ? lse_s : kNoEntries;
          out_lse_t[r] = lse_t;
        }
        if (!counts) {
          if (grad_row != nullptr) {
            zero_row(grad_row, cols);
          }
          continue;
        }
        const SplitLse<acc_t> split_s(lse_s);
        const StoredTerms<acc_t> terms =
            stored_terms(tail, s_row, row_ids, row_l, k, cols, temperature, inv_t, split_s,
                         SplitLse<acc_t>(lse_t), q.data(), b.data());
        if (!backward) {
          out[r] = terms.value;
        }
        if (grad_row == nullptr) {
          continue;
        }
        if (keep_exps) {
          write_kept_grad(exps, shifts.data(), cols, sums,
                          static_cast<double>(g[r]) * static_cast<double>(terms.a), grad_row, buf_g);
        } else {
          write_dense_grad(s_row, cols, inv_t, split_s, g[r] * terms.a, grad_row, buf_s, buf_g);
        }
        for (int64_t j = 0; j < k; ++j) {
          if (row_ids[j] >= 0) {
            grad_row[row_ids[j]] = static_cast<s_t>(g[r] * (terms.a * q[j] + b[j]));
          }
        }
      }
    });
  });
  return {rows, stats, grad};
}

std::tuple<at::Tensor, at::Tensor> sparse_forward(const at::Tensor& student,
                                                  const at::Tensor& ids,
                                                  const at::Tensor& logprobs,
                                                  const std::optional<at::Tensor>& mask,
                                                  double temperature, c10::string_view tail) {
  auto [rows, stats, grad] = sparse_pass(student, ids, logprobs, mask, temperature,
                                         parse_tail(tail), std::nullopt, std::nullopt);
  return {rows, stats};
}

std::tuple<at::Tensor, at::Tensor> sparse_forward_with_grad(
    const at::Tensor& student, const at::Tensor& ids, const at::Tensor& logprobs,
    const std::optional<at::Tensor>& mask, double temperature, c10::string_view tail,
    const at::Tensor& grad_rows) {
  auto [rows, stats, grad] = sparse_pass(student, ids, logprobs, mask, temperature,
                                         parse_tail(tail), grad_rows, std::nullopt);
  return {rows, grad};
}

at::Tensor sparse_backward(const at::Tensor& student, const at::Tensor& ids,
                           const at::Tensor& logprobs, const std::optional<at::Tensor>& mask,
                           double temperature, c10::string_view tail, const at::Tensor& stats,
                           const at::Tensor& grad_rows) {
  return std::get<2>(sparse_pass(student, ids, logprobs, mask, temperature, parse_tail(tail),
                                 grad_rows, stats));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastkd_native, m) {
  m.def("sparse_forward(Tensor student, Tensor ids, Tensor logprobs, Tensor? mask,"
        " float temperature, str tail) -> (Tensor, Tensor)",
        &sparse_forward);
  m.def("sparse_backward(Tensor student, Tensor ids, Tensor logprobs, Tensor? mask,"
        " float temperature, str tail, Tensor stats, Tensor grad_rows) -> Tensor",
        &sparse_backward);
  m.def("sparse_forward_with_grad(Tensor student, Tensor ids, Tensor logprobs, Tensor? mask,"
        " float temperature, str tail, Tensor grad_rows) -> (Tensor, Tensor)",
        &sparse_forward_with_grad);
}

}  // namespace fastkd
