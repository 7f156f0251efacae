// attention_kl on CPU: per query row of each (student, teacher) pair of [B, H, Lq, Lk] maps,
//   rows = sum_k p_k (log p_k - log q_k),
// kind "probs" (scores=false): q = s, p = t, terms with p_k = 0 are 0, log q_k uses
//   max(q_k, kTiny); d rows / d s_k = -p_k / q_k where p_k > 0 and q_k >= kTiny, else 0.
// kind "scores" (scores=true): q = softmax(s), p = softmax(t) over the kept keys: key k is dropped
//   from both when mask[b, k] == 0 or either score is -inf or <= the lowest finite value of its
//   dtype; stats = [lse(s), lse(t)] (float64) over kept keys; d rows / d s = q - p on kept
//   keys, 0 elsewhere; a row without a kept key (or masked) has value 0, stats -inf, gradient 0.
// mask [B, Lq] marks the valid query rows (and, for scores, the kept keys; Lq == Lk then).
// attention_forward_with_grad writes the gradient for given grad_rows in the forward sweep.
#include "rows.h"

namespace fastkd {
namespace {

constexpr double kTiny = std::numeric_limits<float>::min();  // the smallest normal float32

// Kind "probs" over n entries: returns sum_{p_k > 0} p_k (log p_k - log max(q_k, kTiny)) when
// kValue (else 0), and writes out_k = g * (-p_k / q_k) where p_k > 0 and q_k >= kTiny (else 0)
// when kGrad, from the same loads.
template <bool kValue, bool kGrad, typename acc_t>
acc_t probs_terms(const acc_t* q_row, const acc_t* p_row, int64_t n, acc_t g, acc_t* out) {
  using Vec = Vectorized<acc_t>;
  const Vec zero(0), tiny(static_cast<acc_t>(kTiny)), minus_g(-g);
  Vec sum(0);
  auto step = [&](const Vec& q, const Vec& p, int64_t k, int64_t len) {
    if constexpr (kValue) {
      const Vec term = p * (vlog(p) - vlog(at::vec::maximum(q, tiny)));
      sum = sum + Vec::blendv(zero, term, p > zero);
    }
    if constexpr (kGrad) {
      Vec::blendv(zero, minus_g * p / q, (p > zero) & (q >= tiny)).store(out + k, len);
    }
  };
  int64_t k = 0;
  for (; k + Vec::size() <= n; k += Vec::size()) {
    prefetch_next_block(q_row + k);
    prefetch_next_block(p_row + k);
    step(Vec::loadu(q_row + k), Vec::loadu(p_row + k), k, Vec::size());
  }
  if (k < n) {
    step(Vec::loadu(q_row + k, n - k), Vec::loadu(p_row + k, n - k), k, n - k);
  }
  return reduce_sum(sum);
}

// Kind "scores": copies n student (s) and teacher (t) scores into kept_s/kept_t, with -inf in
// both where the key is dropped: s <= lowest_s, t <= lowest_t, or key_bias (0 or -inf per key,
// nullptr without a mask) is -inf.
template <typename acc_t>
void keep_keys(const acc_t* s, const acc_t* t, const acc_t* key_bias, int64_t n, acc_t lowest_s,
               acc_t lowest_t, acc_t* kept_s, acc_t* kept_t) {
  using Vec = Vectorized<acc_t>;
  const Vec neg_inf(-std::numeric_limits<acc_t>::infinity()), low_s(lowest_s), low_t(lowest_t);
  auto keep = [&](int64_t k, int64_t len) {
    Vec vs = Vec::loadu(s + k, len), vt = Vec::loadu(t + k, len);
    if (key_bias != nullptr) {
      const Vec bias = Vec::loadu(key_bias + k, len);
      vs = vs + bias;
      vt = vt + bias;
    }
    const Vec kept = (vs > low_s) & (vt > low_t);
    Vec::blendv(neg_inf, vs, kept).store(kept_s + k, len);
    Vec::blendv(neg_inf, vt, kept).store(kept_t + k, len);
  };
  int64_t k = 0;
  for (; k + Vec::size() <= n; k += Vec::size()) {
    prefetch_next_block(s + k);
    prefetch_next_block(t + k);
    keep(k, Vec::size());
  }
  if (k < n) {
    keep(k, n - k);
  }
}

// Everything a row loop needs about one pair.
struct Pair {
  const at::Tensor& student;
  const at::Tensor& teacher;
  int64_t heads, lq, lk, count;

  Pair(const at::Tensor& s, const at::Tensor& t)
      : student(s), teacher(t), heads(s.size(1)), lq(s.size(2)), lk(s.size(3)),
        count(s.size(0) * s.size(1) * s.size(2)) {
    TORCH_CHECK(s.is_contiguous() && t.is_contiguous() && s.sizes() == t.sizes(),
                "fastkd native: attention maps must be contiguous and of equal shapes");
  }
  int64_t batch_of(int64_t r) const { return r / (heads * lq); }
  // Index of row r's query in the [B, Lq] mask.
  int64_t query_of(int64_t r) const { return batch_of(r) * lq + r % lq; }
};

// Per key of each batch: 0 when mask[b, k] != 0, else -inf ([B * Lk], acc_t); empty without mask.
template <typename acc_t>
std::vector<acc_t> key_biases(const float* valid, const Pair& pair, bool scores) {
  std::vector<acc_t> bias;
  if (valid == nullptr || !scores) {
    return bias;
  }
  TORCH_CHECK(pair.lq == pair.lk, "fastkd native: kind='scores' with a mask needs Lq == Lk");
  const int64_t batch = pair.student.size(0);
  bias.resize(batch * pair.lk);
  for (int64_t i = 0; i < batch * pair.lk; ++i) {
    bias[i] = valid[i] != 0 ? acc_t(0) : -std::numeric_limits<acc_t>::infinity();
  }
  return bias;
}

// rows, stats and, with grad_rows, the gradients for them from the same sweep (fastkd._one_pass):
// kind "probs" takes value and gradient from the same loads, kind "scores" keeps each row's exps
// in a SoftmaxKLScratch; s and t are read once.
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> attention_pass(
    at::TensorList students, at::TensorList teachers, const std::optional<at::Tensor>& mask,
    bool scores, const std::optional<at::Tensor>& grad_rows) {
  check_pairs(students, teachers, 4);
  const float* valid = mask_data(mask);
  std::vector<at::Tensor> row_pieces, stat_pieces, grads, pair_grad_rows;
  std::vector<RowTask> tasks;
  std::vector<int64_t> counts;
  int64_t offset = 0, elements = 0;
  for (size_t i = 0; i < students.size(); ++i) {
    const Pair pair(students[i], teachers[i]);
    const auto acc = acc_scalar_type(pair.student, pair.teacher);
    at::Tensor rows = at::empty({pair.count}, pair.student.options().dtype(acc));
    at::Tensor stats =
        at::empty({2, scores ? pair.count : 0}, pair.student.options().dtype(at::kDouble));
    at::Tensor grad;
    if (grad_rows.has_value()) {
      pair_grad_rows.push_back(pair_rows(*grad_rows, offset, pair.count, acc));
      grad = empty_grad(pair.student);
    }
    FASTKD_DISPATCH_PAIR(pair.student.scalar_type(), pair.teacher.scalar_type(),
                         "attention_forward", {
      const s_t* s_base = pair.student.const_data_ptr<s_t>();
      const t_t* t_base = pair.teacher.const_data_ptr<t_t>();
      acc_t* out = rows.data_ptr<acc_t>();
      double* lse_s = stats.data_ptr<double>();
      double* lse_t = lse_s + pair.count;
      s_t* grad_base = grad.defined() ? grad.data_ptr<s_t>() : nullptr;
      const acc_t* g = grad.defined() ? pair_grad_rows.back().const_data_ptr<acc_t>() : nullptr;
      const acc_t lowest_s = static_cast<acc_t>(std::numeric_limits<s_t>::lowest());
      const acc_t lowest_t = static_cast<acc_t>(std::numeric_limits<t_t>::lowest());
      const int64_t cols = pair.lk;
      tasks.push_back([=, bias = key_biases<acc_t>(valid, pair, scores)](int64_t begin,
                                                                          int64_t end) {
        acc_t buf_s[kBlock], buf_t[kBlock], kept_s[kBlock], kept_t[kBlock], buf_g[kBlock];
        SoftmaxKLScratch<acc_t> scratch(scores && grad_base != nullptr ? cols : 0);
        for (int64_t r = begin; r < end; ++r) {
          const bool row_valid = valid == nullptr || valid[pair.query_of(r)] != 0;
          const s_t* s_row = s_base + r * cols;
          const t_t* t_row = t_base + r * cols;
          s_t* grad_row = grad_base == nullptr ? nullptr : grad_base + r * cols;
          if (!scores) {
            acc_t kl = 0;
            for (int64_t c = 0; row_valid && c < cols; c += kBlock) {
              const int64_t n = std::min(kBlock, cols - c);
              const acc_t* s = load_block(s_row + c, n, buf_s);
              const acc_t* t = load_block(t_row + c, n, buf_t);
              if (grad_row == nullptr) {
                kl += probs_terms<true, false, acc_t>(s, t, n, acc_t(0), nullptr);
              } else {
                acc_t* grad_out = out_block<acc_t>(grad_row + c, buf_g);
                kl += probs_terms<true, true>(s, t, n, g[r], grad_out);
                store_block(grad_out, grad_row + c, n);
              }
            }
            if (grad_row != nullptr && !row_valid) {
              zero_row(grad_row, cols);
            }
            out[r] = kl;
            continue;
          }
          SoftmaxKL<acc_t> kl;
          if (grad_row != nullptr) {
            scratch.start_row(grad_row);
          }
          const acc_t* row_bias = bias.empty() ? nullptr : bias.data() + pair.batch_of(r) * cols;
          for (int64_t c = 0; row_valid && c < cols; c += kBlock) {
            const int64_t n = std::min(kBlock, cols - c);
            keep_keys(load_block(s_row + c, n, buf_s), load_block(t_row + c, n, buf_t),
                      row_bias == nullptr ? nullptr : row_bias + c, n, lowest_s, lowest_t,
                      kept_s, kept_t);
            if (grad_row == nullptr) {
              kl.add(kept_s, kept_t, n, acc_t(1));
            } else {
              scratch.add(kl, c, kept_s, kept_t, n, acc_t(1));
            }
          }
          const bool any = kl.teacher_has_entries();
          out[r] = any ? kl.kl() : acc_t(0);
          lse_s[r] = any ? kl.lse_s() : kNoEntries;
          lse_t[r] = any ? kl.lse_t() : kNoEntries;
          if (grad_row != nullptr) {
            if (any) {
              scratch.write_grad(kl, static_cast<double>(g[r]), grad_row, buf_g);
            } else {
              zero_row(grad_row, cols);
            }
          }
        }
      });
    });
    row_pieces.push_back(rows);
    stat_pieces.push_back(stats);
    if (grad.defined()) {
      grads.push_back(grad);
    }
    counts.push_back(pair.count);
    offset += pair.count;
    elements += pair.count * pair.lk;
  }
  TORCH_CHECK(!grad_rows.has_value() || grad_rows->numel() == offset,
              "fastkd native: grad_rows does not match the rows of the pairs");
  parallel_over_pairs(tasks, counts, elements);
  return {concat_rows(row_pieces), concat_rows(stat_pieces), grads};
}

std::tuple<at::Tensor, at::Tensor> attention_forward(at::TensorList students,
                                                     at::TensorList teachers,
                                                     const std::optional<at::Tensor>& mask,
                                                     bool scores) {
  auto [rows, stats, grads] = attention_pass(students, teachers, mask, scores, std::nullopt);
  return {rows, stats};
}

std::tuple<at::Tensor, std::vector<at::Tensor>> attention_forward_with_grad(
    at::TensorList students, at::TensorList teachers, const std::optional<at::Tensor>& mask,
    bool scores, const at::Tensor& grad_rows) {
  auto [rows, stats, grads] = attention_pass(students, teachers, mask, scores, grad_rows);
  return {rows, grads};
}

std::vector<at::Tensor> attention_backward(at::TensorList students, at::TensorList teachers,
                                           const std::optional<at::Tensor>& mask, bool scores,
                                           const at::Tensor& stats, const at::Tensor& grad_rows) {
  check_pairs(students, teachers, 4);
  const float* valid = mask_data(mask);
  std::vector<at::Tensor> grads, pair_grad_rows, pair_stats;
  std::vector<RowTask> tasks;
  std::vector<int64_t> counts;
  int64_t offset = 0, elements = 0;
  for (size_t i = 0; i < students.size(); ++i) {
    const Pair pair(students[i], teachers[i]);
    const auto acc = acc_scalar_type(pair.student, pair.teacher);
    pair_grad_rows.push_back(pair_rows(grad_rows, offset, pair.count, acc));
    pair_stats.push_back(scores ? stats.narrow(1, offset, pair.count).to(at::kDouble).contiguous()
                                : at::empty({2, 0}, stats.options().dtype(at::kDouble)));
    at::Tensor grad = empty_grad(pair.student);
    FASTKD_DISPATCH_PAIR(pair.student.scalar_type(), pair.teacher.scalar_type(),
                         "attention_backward", {
      const s_t* s_base = pair.student.const_data_ptr<s_t>();
      const t_t* t_base = pair.teacher.const_data_ptr<t_t>();
      s_t* grad_base = grad.data_ptr<s_t>();
      const acc_t* g = pair_grad_rows.back().const_data_ptr<acc_t>();
      const double* lse_s = pair_stats.back().const_data_ptr<double>();
      const double* lse_t = lse_s + pair_stats.back().size(1);
      const acc_t lowest_s = static_cast<acc_t>(std::numeric_limits<s_t>::lowest());
      const acc_t lowest_t = static_cast<acc_t>(std::numeric_limits<t_t>::lowest());
      const int64_t cols = pair.lk;
      tasks.push_back([=, bias = key_biases<acc_t>(valid, pair, scores)](int64_t begin,
                                                                          int64_t end) {
        acc_t buf_s[kBlock], buf_t[kBlock], kept_s[kBlock], kept_t[kBlock], buf_g[kBlock];
        for (int64_t r = begin; r < end; ++r) {
          s_t* grad_row = grad_base + r * cols;
          if ((valid != nullptr && valid[pair.query_of(r)] == 0) ||
              (scores && lse_t[r] == kNoEntries)) {
            zero_row(grad_row, cols);
            continue;
          }
          const s_t* s_row = s_base + r * cols;
          const t_t* t_row = t_base + r * cols;
          const acc_t* row_bias = bias.empty() ? nullptr : bias.data() + pair.batch_of(r) * cols;
          // Only kind "scores" has stats (the lse of the row's kept keys).
          const SplitLse<acc_t> row_lse_s(scores ? lse_s[r] : 0.0);
          const SplitLse<acc_t> row_lse_t(scores ? lse_t[r] : 0.0);
          for (int64_t c = 0; c < cols; c += kBlock) {
            const int64_t n = std::min(kBlock, cols - c);
            const acc_t* s = load_block(s_row + c, n, buf_s);
            const acc_t* t = load_block(t_row + c, n, buf_t);
            acc_t* out = out_block<acc_t>(grad_row + c, buf_g);
            if (scores) {
              keep_keys(s, t, row_bias == nullptr ? nullptr : row_bias + c, n, lowest_s,
                        lowest_t, kept_s, kept_t);
              softmax_kl_grad(kept_s, kept_t, n, acc_t(1), row_lse_s, row_lse_t, g[r], out);
            } else {
              probs_terms<false, true>(s, t, n, g[r], out);
            }
            store_block(out, grad_row + c, n);
          }
        }
      });
    });
    grads.push_back(grad);
    counts.push_back(pair.count);
    offset += pair.count;
    elements += pair.count * pair.lk;
  }
  parallel_over_pairs(tasks, counts, elements);
  return grads;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastkd_native, m) {
  m.def("attention_forward(Tensor[] students, Tensor[] teachers, Tensor? mask, bool scores)"
        " -> (Tensor, Tensor)",
        &attention_forward);
  m.def("attention_backward(Tensor[] students, Tensor[] teachers, Tensor? mask, bool scores,"
        " Tensor stats, Tensor grad_rows) -> Tensor[]",
        &attention_backward);
  m.def("attention_forward_with_grad(Tensor[] students, Tensor[] teachers, Tensor? mask,"
        " bool scores, Tensor grad_rows) -> (Tensor, Tensor[])",
        &attention_forward_with_grad);
}

}  // namespace fastkd
