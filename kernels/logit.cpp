// The logit family on CPU (fastkd.backends). Per row of V logits, s the student's and t the
// teacher's, at temperature T:
//   s' = s / T, t' = t / T,  q = softmax(s'), p = softmax(t'),  log q = s' - lse_s, log p = t' - lse_t,
//   rows = T^2 D (tvd: D), with D of the divergence
//     forward  KL(p || q) = sum_v p_v (log p_v - log q_v)
//     reverse  KL(q || p) = sum_v q_v (log q_v - log p_v)
//     jsd      beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
//     tvd      0.5 sum_v |p_v - q_v|
//   (0 log 0 = 0), and d rows / d s = c q (a - S), S = sum_v q_v a_v, c = T (tvd: 1 / T):
//     forward  q a = -p, S = -1                           -> T (q - p)
//     reverse  a = log q - log p, S = KL(q || p)          -> q (x - E_q[x]),  x = s - t
//     jsd      a = (1 - beta) log(q / m), S = (1 - beta) KL(q || m)
//     tvd      a = 0.5 sign(q - p),  S = 0.5 sum_v q_v sign(q_v - p_v)
//   with q a = 0 wherever q = 0. With labels, the hard-label cross-entropy at temperature 1:
//     ce_rows = lse(s) - s[label],  d ce_rows / d s = softmax(s) - onehot(label),
//   on rows that are valid and have a label in [0, V).
//   stats = [lse_s, lse_t, lse(s), S] (float64, [4, R]).
// A row contributes nothing to rows when it is masked or has no finite teacher logit: value 0,
// lse_s and lse_t -inf, S 0, KD gradient 0; lse(s) is -inf on rows without a cross-entropy.
// Inputs are [R0, R1, V] row views (any strides for the two leading dims, last stride 1).
//
// A row is read from memory once; the sweeps after the first read it from cache:
//   1. SoftmaxKL: maxima and sums online, and the cross sum of forward (KL(p || q)) or reverse
//      (E_q[x], so that KL(q || p) = E_q[x] / T - (lse_s - lse_t)); with a label at T != 1 also the
//      sums of exp(s - max s) for lse(s) (at T = 1, lse(s) = lse_s; at T = 2, 4, 8 squares of the
//      student's exps at T, not exps of their own). The exps are kept in a
//      SoftmaxKLScratch where a later sweep needs them.
//   2. jsd, tvd: q, p from the kept exps (and log q, log p from s, t): D and S; for the gradient,
//      q a takes the place of the teacher's exps. reverse: sum_v q_v (x_v - E_q[x]) from s, t,
//      what the rounding of sweep 1's E_q[x] left (so that x - E_q[x] keeps the precision of x).
//   3. logit_forward_with_grad: the gradient for grad_rows g and grad_ce_rows w from the kept values,
//        forward  (g T + w1) q - g T p
//        reverse  q (g (x - E_q[x]) + w1)   (s, t read again)
//        jsd, tvd g c q a - (g c S - w1) q
//      with w1 = w at T = 1 (softmax(s) = q), else 0 and the kept exps of s give w softmax(s);
//      then -w at the label.
// logit_backward (the two-pass path) takes the same formulas per block from the inputs and the
// stats: q = exp(s' - lse_s), p = exp(t' - lse_t), softmax(s) = exp(s - lse(s)); tvd takes the
// one-pass sweeps instead (its S must come from the q, p that give the signs of its a).
#include "rows.h"

#include <string_view>

namespace fastkd {
namespace {

enum class Divergence { kForward, kReverse, kJsd, kTvd };

Divergence parse_divergence(std::string_view name) {
  if (name == "forward") {
    return Divergence::kForward;
  }
  if (name == "reverse") {
    return Divergence::kReverse;
  }
  if (name == "jsd") {
    return Divergence::kJsd;
  }
  TORCH_CHECK(name == "tvd", "fastkd native: unknown divergence '", name, "'");
  return Divergence::kTvd;
}

// The cross sum sweep 1 takes for a divergence (jsd and tvd take sweep 2 instead).
CrossSum cross_sum_of(Divergence divergence) {
  switch (divergence) {
    case Divergence::kForward:
      return CrossSum::kTeacher;
    case Divergence::kReverse:
      return CrossSum::kStudent;
    default:
      return CrossSum::kNone;
  }
}

// rows = factor D, d rows / d s = c q (a - S).
struct Scales {
  double factor, c;
  Scales(Divergence divergence, double temperature)
      : factor(divergence == Divergence::kTvd ? 1.0 : temperature * temperature),
        c(divergence == Divergence::kTvd ? 1.0 / temperature : temperature) {}
};

// labels: int64 [R] or none; nullptr stands for "no row has a label".
const int64_t* label_data(const std::optional<at::Tensor>& labels, int64_t count) {
  if (!labels.has_value()) {
    return nullptr;
  }
  TORCH_CHECK(labels->scalar_type() == at::kLong && labels->is_contiguous() && labels->is_cpu() &&
                  labels->numel() == count,
              "fastkd native: labels must be a contiguous int64 CPU tensor of one label a row");
  return labels->const_data_ptr<int64_t>();
}

// The label of row r when it has one in [0, cols), else -1.
int64_t label_of(const int64_t* labels, int64_t r, int64_t cols) {
  return labels != nullptr && labels[r] >= 0 && labels[r] < cols ? labels[r] : -1;
}

// d loss / d rows (or ce_rows) as contiguous acc; an undefined tensor for none.
at::Tensor upstream(const std::optional<at::Tensor>& grad, int64_t count, at::ScalarType acc,
                    const char* name) {
  if (!grad.has_value()) {
    return {};
  }
  TORCH_CHECK(grad->numel() == count, "fastkd native: ", name,
              " does not match the rows of student");
  return pair_rows(*grad, 0, count, acc);
}

// The terms of D and q a at a vector of entries, for the divergences that need q and p themselves.
template <typename acc_t>
struct Terms {
  Vectorized<acc_t> value, q_a;
};

// jsd from wq = (1 - beta) q, wp = beta p, log q and log p:
//   value = wp (log p - log m) + wq (log q - log m),  q a = wq (log q - log m),  m = wp + wq.
// The logs are taken as at least the lowest number (an entry of -inf has weight 0: no 0 * inf), m
// as at least the smallest normal one (where it underflows, p and q do too: negligible terms).
template <typename acc_t>
inline Terms<acc_t> jsd_terms(const Vectorized<acc_t>& wq, const Vectorized<acc_t>& wp,
                              const Vectorized<acc_t>& log_q, const Vectorized<acc_t>& log_p) {
  using Vec = Vectorized<acc_t>;
  const Vec lowest(std::numeric_limits<acc_t>::lowest());
  const Vec log_m = vlog(at::vec::clamp_min(wp + wq, Vec(std::numeric_limits<acc_t>::min())));
  const Vec q_a = wq * (at::vec::clamp_min(log_q, lowest) - log_m);
  return {at::vec::fmadd(wp, at::vec::clamp_min(log_p, lowest) - log_m, q_a), q_a};
}

// tvd: value = 0.5 |q - p|,  q a = 0.5 q sign(q - p).
template <typename acc_t>
inline Terms<acc_t> tvd_terms(const Vectorized<acc_t>& q, const Vectorized<acc_t>& p) {
  using Vec = Vectorized<acc_t>;
  const Vec d = q - p, zero(0), half(0.5);
  return {d.abs() * half, q * Vec::blendv(Vec::blendv(zero, half, d > zero), Vec(-0.5), d < zero)};
}

// The normalisation of block b's kept exps: q_k = exps_s[k] coef_q, p_k = exps_t[k] coef_p.
template <typename acc_t, typename Block>
std::pair<acc_t, acc_t> block_coefficients(const SoftmaxKL<acc_t>& kl, const Block& b) {
  return {static_cast<acc_t>(b.factor_s / static_cast<double>(kl.sum_s)),
          static_cast<acc_t>(b.factor_t / static_cast<double>(kl.sum_t))};
}

// Sweep 2 of jsd and tvd over the exps kept by sweep 1: (D, S) of the row; with keep_terms, q a
// replaces exps_t for the gradient sweep (which takes q from exps_s). jsd takes
// log q_k = (s'_k - shift_s_b) + log coef_q in block b, the exp's argument of sweep 1 plus
// log coef_q rounded to acc_t: it differs from the log of that very q_k = exps_s[k] coef_q by the
// rounding off_q of log coef_q. D and S are linear in log q, so each block's sums lose
// off_q sum_b wq (likewise off_p sum_b wp for D): D, which can be far smaller than its terms, is
// then free of the roundings of the normalisation to first order.
template <Divergence kDiv, typename acc_t, typename s_t, typename t_t>
std::pair<double, double> mixture_sweep(SoftmaxKLScratch<acc_t>& scratch,
                                        const SoftmaxKL<acc_t>& kl, const s_t* s_row,
                                        const t_t* t_row, acc_t beta, bool keep_terms,
                                        acc_t* buf_s, acc_t* buf_t) {
  using Vec = Vectorized<acc_t>;
  constexpr bool kJsd = kDiv == Divergence::kJsd;
  static_assert(kJsd || kDiv == Divergence::kTvd);
  const Vec vscale(kl.scale);
  double value = 0, total = 0;
  scratch.for_each_block(kl, [&](const auto& b) {
    const auto [coef_q, coef_p] = block_coefficients(kl, b);
    const acc_t log_coef_q = std::log(coef_q), log_coef_p = std::log(coef_p);
    // jsd weighs q and p straight away: wq = (1 - beta) q, wp = beta p
    const Vec weight_q(kJsd ? (1 - beta) * coef_q : coef_q), weight_p(kJsd ? beta * coef_p : coef_p);
    const Vec neg_shift_s(-b.shift_s), neg_shift_t(-b.shift_t);
    const Vec vlog_coef_q(log_coef_q), vlog_coef_p(log_coef_p);
    const acc_t* s = kJsd ? load_block(s_row + b.c, b.n, buf_s) : nullptr;
    const acc_t* t = kJsd ? load_block(t_row + b.c, b.n, buf_t) : nullptr;
    Vec block_value(0), block_total(0), block_wq(0), block_wp(0);
    for_each_vector<acc_t>(b.n, [&](int64_t k, int64_t len) {
      const Vec q = Vec::loadu(b.exps_s + k, len) * weight_q;  // jsd: wq
      const Vec p = Vec::loadu(b.exps_t + k, len) * weight_p;  // jsd: wp
      Terms<acc_t> terms;
      if constexpr (kJsd) {
        // (s'_k - shift_s_b) + log coef_q: the argument in one rounding, the sum in another
        const Vec log_q =
            at::vec::fmadd(Vec::loadu(s + k, len), vscale, neg_shift_s) + vlog_coef_q;
        const Vec log_p =
            at::vec::fmadd(Vec::loadu(t + k, len), vscale, neg_shift_t) + vlog_coef_p;
        terms = jsd_terms(q, p, log_q, log_p);
        block_wq = block_wq + q;
        block_wp = block_wp + p;
      } else {
        terms = tvd_terms(q, p);
      }
      block_value = block_value + terms.value;
      block_total = block_total + terms.q_a;
      if (keep_terms) {
        terms.q_a.store(b.exps_t + k, len);
      }
    });
    value += reduce_sum(block_value);
    total += reduce_sum(block_total);
    if constexpr (kJsd) {
      // off sum_b w, off = log coef rounded - log coef; a block without mass (coef 0) has none.
      auto offset_mass = [](acc_t coef, acc_t log_coef, const Vec& mass) {
        return coef == 0 ? 0.0
                         : (static_cast<double>(log_coef) - std::log(static_cast<double>(coef))) *
                               static_cast<double>(reduce_sum(mass));
      };
      const double q_part = offset_mass(coef_q, log_coef_q, block_wq);
      value -= q_part + offset_mass(coef_p, log_coef_p, block_wp);
      total -= q_part;
    }
  });
  return {value, total};
}

// x = s - t at a vector of entries, 0 where q is (s and t may both be -inf there).
template <typename acc_t>
inline Vectorized<acc_t> difference(const Vectorized<acc_t>& s, const Vectorized<acc_t>& t,
                                    const Vectorized<acc_t>& q) {
  const Vectorized<acc_t> zero(0);
  return Vectorized<acc_t>::blendv(s - t, zero, q == zero);
}

// Sweep 2 of reverse over the exps kept by sweep 1: sum_k q_k (x_k - mean), mean = E_q[x] from
// sweep 1's cross sum: what its rounding left. Where q is concentrated, x - E_q[x] is far smaller
// than x; (x - mean) - residual keeps it to the precision of x (exactly 0 on a one-hot q). A row
// with q_v > 0 = p_v has mean +inf (KL(q || p) = +inf) and no residual.
template <typename acc_t, typename s_t, typename t_t>
double reverse_residual(SoftmaxKLScratch<acc_t>& scratch, const SoftmaxKL<acc_t>& kl,
                        const s_t* s_row, const t_t* t_row, acc_t* buf_s, acc_t* buf_t) {
  using Vec = Vectorized<acc_t>;
  double residual = 0;
  if (!std::isfinite(kl.mean_difference())) {
    return residual;
  }
  const Vec mean(kl.mean_difference());
  scratch.for_each_block(kl, [&](const auto& b) {
    const Vec coef_q(block_coefficients(kl, b).first);
    const acc_t* s = load_block(s_row + b.c, b.n, buf_s);
    const acc_t* t = load_block(t_row + b.c, b.n, buf_t);
    Vec block(0);
    for_each_vector<acc_t>(b.n, [&](int64_t k, int64_t len) {
      const Vec q = Vec::loadu(b.exps_s + k, len) * coef_q;
      const Vec x = difference(Vec::loadu(s + k, len), Vec::loadu(t + k, len), q);
      block = at::vec::fmadd(q, x - mean, block);
    });
    residual += reduce_sum(block);
  });
  return residual;
}

// What the gradient of a row is made of (both paths).
template <typename acc_t>
struct RowGrad {
  bool kd;               // false on a row that contributes nothing to rows: KD gradient 0
  double g_c, total;     // grad_rows c, S
  acc_t g, mean, mean_lo;  // grad_rows; reverse: E_q[x] = mean + mean_lo
  double w;              // grad_ce_rows, 0 without a cross-entropy gradient
  int64_t label;         // -1 for none
};

// out = q (g ((x - mean) - mean_lo) + w1) + c_raw exps_raw for a block of reverse,
// q = exps_s coef_q (exps_raw: null for no raw term).
template <typename acc_t>
inline void reverse_grad(const acc_t* exps_s, acc_t coef_q, const acc_t* s, const acc_t* t,
                         const acc_t* exps_raw, acc_t coef_raw, int64_t n,
                         const RowGrad<acc_t>& row, acc_t w1, acc_t* out) {
  using Vec = Vectorized<acc_t>;
  const Vec vcoef(coef_q), mean(row.mean), mean_lo(row.mean_lo), vg(row.g), vw1(w1);
  const Vec vcoef_raw(coef_raw);
  for_each_vector<acc_t>(n, [&](int64_t k, int64_t len) {
    const Vec q = Vec::loadu(exps_s + k, len) * vcoef;
    const Vec x = difference(Vec::loadu(s + k, len), Vec::loadu(t + k, len), q);
    Vec grad = q * at::vec::fmadd((x - mean) - mean_lo, vg, vw1);
    if (exps_raw != nullptr) {
      grad = at::vec::fmadd(Vec::loadu(exps_raw + k, len), vcoef_raw, grad);
    }
    grad.store(out + k, len);
  });
}

// The gradient sweep of logit_forward_with_grad (sweep 3 above) over the values the row's earlier
// sweeps kept; at T = 1 (unit_t) the cross-entropy's softmax(s) is q, else the kept raw exps.
template <typename acc_t, typename s_t, typename t_t>
void write_row_grad(Divergence divergence, SoftmaxKLScratch<acc_t>& scratch,
                    const SoftmaxKL<acc_t>& kl, const RowGrad<acc_t>& row, bool unit_t,
                    const s_t* s_row, const t_t* t_row, s_t* grad_row, acc_t* buf_s, acc_t* buf_t,
                    acc_t* buf_g) {
  const double w1 = unit_t ? row.w : 0.0;
  // The coefficients of the exps in the forward form (also a row without KD: g c = 0), float64.
  const double g_q = (row.g_c + w1) / kl.sum_s, g_p = row.kd ? row.g_c / kl.sum_t : 0.0;
  const double w_raw = kl.raw_sums ? row.w / kl.sum_raw : 0.0;
  const Divergence form = row.kd ? divergence : Divergence::kForward;
  scratch.for_each_block(kl, [&](const auto& b) {
    acc_t* out = out_block<acc_t>(grad_row + b.c, buf_g);  // exps_s itself, or buf_g
    const acc_t coef_raw = static_cast<acc_t>(w_raw * b.factor_raw);
    if (form == Divergence::kReverse) {
      reverse_grad(b.exps_s, block_coefficients(kl, b).first,
                   load_block(s_row + b.c, b.n, buf_s), load_block(t_row + b.c, b.n, buf_t),
                   w_raw == 0 ? nullptr : b.exps_raw, coef_raw, b.n, row,
                   static_cast<acc_t>(w1), out);
    } else {
      // forward: g_q factor_s exps_s - g_p factor_t exps_t; jsd, tvd (exps_t holds q a):
      // g c q a + (w1 - g c S) coef_q exps_s
      const bool forward = form == Divergence::kForward;
      const acc_t a = static_cast<acc_t>(forward ? g_q * b.factor_s
                                                 : (w1 - row.g_c * row.total) * b.factor_s /
                                                       static_cast<double>(kl.sum_s));
      const acc_t c = static_cast<acc_t>(forward ? -g_p * b.factor_t : row.g_c);
      if (w_raw == 0) {
        linear_combination(b.exps_s, a, b.exps_t, c, b.n, out);
      } else {
        linear_combination(b.exps_s, a, b.exps_t, c, b.exps_raw, coef_raw, b.n, out);
      }
    }
    if (row.label >= b.c && row.label < b.c + b.n) {
      out[row.label - b.c] -= static_cast<acc_t>(row.w);
    }
    store_block(out, grad_row + b.c, b.n);
  });
}

// rows, ce_rows, stats and, with grad_rows, the gradient for them (and grad_ce_rows) from the same
// sweeps (fastkd._one_pass).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logit_pass(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& mask,
    double temperature, Divergence divergence, double beta,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& grad_rows,
    const std::optional<at::Tensor>& grad_ce_rows) {
  check_input(student, 3, "student");
  check_input(teacher, 3, "teacher");
  const int64_t count = row_count(student), cols = student.size(2);
  const auto acc = acc_scalar_type(student, teacher);
  const int64_t* label = label_data(labels, count);
  at::Tensor rows = at::empty({count}, student.options().dtype(acc));
  at::Tensor ce_rows = at::empty({label == nullptr ? 0 : count}, student.options().dtype(acc));
  at::Tensor stats = at::empty({4, count}, student.options().dtype(at::kDouble));
  const at::Tensor g_rows = upstream(grad_rows, count, acc, "grad_rows");
  const at::Tensor g_ce = label == nullptr ? at::Tensor() : upstream(grad_ce_rows, count, acc,
                                                                     "grad_ce_rows");
  at::Tensor grad = g_rows.defined() ? empty_grad(student) : at::Tensor();
  const float* valid = mask_data(mask);
  const Scales scales(divergence, temperature);
  const bool unit_t = temperature == 1.0;
  // Sweep 1 keeps the exps for the gradient sweep, and for sweep 2 of reverse, jsd and tvd.
  const bool keep_exps = grad.defined() || divergence != Divergence::kForward;
  FASTKD_DISPATCH_PAIR(student.scalar_type(), teacher.scalar_type(), "logit_forward", {
    const s_t* s_base = student.const_data_ptr<s_t>();
    const t_t* t_base = teacher.const_data_ptr<t_t>();
    const RowView s_rows(student), t_rows(teacher);
    acc_t* out = rows.data_ptr<acc_t>();
    acc_t* ce_out = label == nullptr ? nullptr : ce_rows.data_ptr<acc_t>();
    double* lse_s = stats.data_ptr<double>();
    double* lse_t = lse_s + count;
    double* lse_raw = lse_t + count;
    double* total = lse_raw + count;
    s_t* grad_base = grad.defined() ? grad.data_ptr<s_t>() : nullptr;
    const acc_t* g = grad.defined() ? g_rows.const_data_ptr<acc_t>() : nullptr;
    const acc_t* w = g_ce.defined() && grad.defined() ? g_ce.const_data_ptr<acc_t>() : nullptr;
    const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
    const acc_t beta_acc = static_cast<acc_t>(beta);
    at::parallel_for(0, count, grain_rows(cols), [&](int64_t begin, int64_t end) {
      acc_t buf_s[kBlock], buf_t[kBlock], buf_g[kBlock];
      // the raw exps give the cross-entropy's softmax(s) to the gradient at T != 1
      SoftmaxKLScratch<acc_t> scratch(keep_exps ? cols : 0, w != nullptr && !unit_t);
      for (int64_t r = begin; r < end; ++r) {
        out[r] = 0;
        lse_s[r] = lse_t[r] = lse_raw[r] = kNoEntries;
        total[r] = 0;
        if (ce_out != nullptr) {
          ce_out[r] = 0;
        }
        s_t* grad_row = grad_base == nullptr ? nullptr : grad_base + r * cols;
        if (valid != nullptr && valid[r] == 0) {
          if (grad_row != nullptr) {
            zero_row(grad_row, cols);
          }
          continue;
        }
        const int64_t row_label = label_of(label, r, cols);
        const s_t* s_row = s_rows.row(s_base, r);
        const t_t* t_row = t_rows.row(t_base, r);
        SoftmaxKL<acc_t> kl(cross_sum_of(divergence), row_label >= 0 && !unit_t);
        if (keep_exps) {
          scratch.start_row(grad_row);
        }
        for (int64_t c = 0; c < cols; c += kBlock) {
          const int64_t n = std::min(kBlock, cols - c);
          const acc_t* s = load_block(s_row + c, n, buf_s);
          const acc_t* t = load_block(t_row + c, n, buf_t);
          if (keep_exps) {
            scratch.add(kl, c, s, t, n, inv_t);
          } else {
            kl.add(s, t, n, inv_t);
          }
        }
        RowGrad<acc_t> row{kl.teacher_has_entries(), 0, 0, 0, 0, 0, 0, row_label};
        if (row.kd) {
          lse_s[r] = kl.lse_s();
          lse_t[r] = kl.lse_t();
          double value = 0;
          switch (divergence) {
            case Divergence::kForward:
              value = kl.kl();
              row.total = -1;
              break;
            case Divergence::kReverse: {  // KL(q || p) = E_q[x] / T - (lse_s - lse_t)
              const double residual = reverse_residual(scratch, kl, s_row, t_row, buf_s, buf_t);
              row.mean = kl.mean_difference();
              row.mean_lo = static_cast<acc_t>(residual);
              value = row.total = (static_cast<double>(row.mean) + residual) / temperature -
                                  (lse_s[r] - lse_t[r]);
              break;
            }
            case Divergence::kJsd:
              std::tie(value, row.total) = mixture_sweep<Divergence::kJsd>(
                  scratch, kl, s_row, t_row, beta_acc, grad_row != nullptr, buf_s, buf_t);
              break;
            case Divergence::kTvd:
              std::tie(value, row.total) = mixture_sweep<Divergence::kTvd>(
                  scratch, kl, s_row, t_row, beta_acc, grad_row != nullptr, buf_s, buf_t);
              break;
          }
          out[r] = static_cast<acc_t>(scales.factor * value);
          total[r] = row.total;
        }
        if (row_label >= 0) {
          lse_raw[r] = unit_t ? kl.lse_s() : kl.lse_raw();
          ce_out[r] = static_cast<acc_t>(lse_raw[r] - static_cast<acc_t>(s_row[row_label]));
          row.w = w == nullptr ? 0.0 : static_cast<double>(w[r]);
        }
        if (grad_row == nullptr) {
          continue;
        }
        if (!row.kd && row_label < 0) {
          zero_row(grad_row, cols);
          continue;
        }
        if (row.kd) {
          row.g = g[r];
          row.g_c = static_cast<double>(g[r]) * scales.c;
        }
        write_row_grad(divergence, scratch, kl, row, unit_t, s_row, t_row, grad_row, buf_s, buf_t,
                       buf_g);
      }
    });
  });
  return {rows, ce_rows, stats, grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logit_forward(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& mask,
    double temperature, c10::string_view divergence, double beta,
    const std::optional<at::Tensor>& labels) {
  auto [rows, ce_rows, stats, grad] =
      logit_pass(student, teacher, mask, temperature, parse_divergence(divergence), beta, labels,
                 std::nullopt, std::nullopt);
  return {rows, ce_rows, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logit_forward_with_grad(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& mask,
    double temperature, c10::string_view divergence, double beta,
    const std::optional<at::Tensor>& labels, const at::Tensor& grad_rows,
    const std::optional<at::Tensor>& grad_ce_rows) {
  auto [rows, ce_rows, stats, grad] =
      logit_pass(student, teacher, mask, temperature, parse_divergence(divergence), beta, labels,
                 grad_rows, grad_ce_rows);
  return {rows, ce_rows, grad};
}

// What a block of the two-pass gradient needs of its row: the split lses of the stats, the RowGrad
// and w1 (w at T = 1 on a KD row: its softmax(s) is q; else 0).
template <typename acc_t>
struct BackwardRow {
  acc_t scale, beta;
  SplitLse<acc_t> lse_s, lse_t;
  RowGrad<acc_t> grad;
  acc_t w1;
};

// One block of the two-pass gradient (the gradient sweep's formulas), from the inputs:
//   q = exp(s' - lse_s), p = exp(t' - lse_t).
template <Divergence kDiv, typename acc_t>
void backward_block(const acc_t* s, const acc_t* t, int64_t n, const BackwardRow<acc_t>& row,
                    acc_t* out) {
  using Vec = Vectorized<acc_t>;
  const Vec vscale(row.scale), hi_s(-row.lse_s.hi), lo_s(-row.lse_s.lo);
  const Vec hi_t(-row.lse_t.hi), lo_t(-row.lse_t.lo), vw1(row.w1);
  const Vec g_c(static_cast<acc_t>(row.grad.g_c)), vg(row.grad.g);
  const Vec mean(row.grad.mean), mean_lo(row.grad.mean_lo);
  const Vec weight_q(1 - row.beta), weight_p(row.beta);
  // the coefficient of q: forward g T + w1, jsd w1 - g c S
  const Vec g_q(kDiv == Divergence::kForward
                    ? static_cast<acc_t>(row.grad.g_c + row.w1)
                    : static_cast<acc_t>(row.w1 - row.grad.g_c * row.grad.total));
  for_each_vector<acc_t>(n, [&](int64_t k, int64_t len) {
    prefetch_next_block(s + k);
    prefetch_next_block(t + k);
    const Vec sv = Vec::loadu(s + k, len), tv = Vec::loadu(t + k, len);
    const Vec log_q = at::vec::fmadd(sv, vscale, hi_s) + lo_s;
    const Vec q = vexp(log_q);
    Vec grad;
    if constexpr (kDiv == Divergence::kReverse) {  // q (g (x - E_q[x]) + w1)
      grad = q * at::vec::fmadd((difference(sv, tv, q) - mean) - mean_lo, vg, vw1);
    } else {
      const Vec log_p = at::vec::fmadd(tv, vscale, hi_t) + lo_t;
      const Vec p = vexp(log_p);
      if constexpr (kDiv == Divergence::kForward) {  // (g T + w1) q - g T p
        grad = at::vec::fmsub(q, g_q, p * g_c);
      } else {  // g c q a + (w1 - g c S) q
        static_assert(kDiv == Divergence::kJsd);
        grad = at::vec::fmadd(jsd_terms(q * weight_q, p * weight_p, log_q, log_p).q_a, g_c,
                              q * g_q);
      }
    }
    grad.store(out + k, len);
  });
}

// out += w exp(s - lse) for a block: the cross-entropy's w softmax(s).
template <typename acc_t>
void add_softmax(const acc_t* s, int64_t n, SplitLse<acc_t> lse, acc_t w, acc_t* out) {
  using Vec = Vectorized<acc_t>;
  const Vec hi(lse.hi), lo(lse.lo), vw(w);
  for_each_vector<acc_t>(n, [&](int64_t k, int64_t len) {
    at::vec::fmadd(vexp((Vec::loadu(s + k, len) - hi) - lo), vw, Vec::loadu(out + k, len))
        .store(out + k, len);
  });
}

at::Tensor logit_backward(const at::Tensor& student, const at::Tensor& teacher,
                          const std::optional<at::Tensor>& mask, double temperature,
                          c10::string_view divergence_name, double beta,
                          const std::optional<at::Tensor>& labels, const at::Tensor& stats,
                          const at::Tensor& grad_rows,
                          const std::optional<at::Tensor>& grad_ce_rows) {
  const Divergence divergence = parse_divergence(divergence_name);
  if (divergence == Divergence::kTvd) {
    // a = 0.5 sign(q - p) jumps where q = p (a student and a teacher that agree, both saturated):
    // S must come from the very q, p that give the signs, so tvd takes the one-pass sweeps again.
    return std::get<3>(logit_pass(student, teacher, mask, temperature, divergence, beta, labels,
                                  grad_rows, grad_ce_rows));
  }
  check_input(student, 3, "student");
  check_input(teacher, 3, "teacher");
  const int64_t count = row_count(student), cols = student.size(2);
  const auto acc = acc_scalar_type(student, teacher);
  const int64_t* label = label_data(labels, count);
  const at::Tensor row_stats = stats.to(at::kDouble).contiguous();
  TORCH_CHECK(row_stats.numel() == 4 * count,
              "fastkd native: stats do not match the rows of student");
  const at::Tensor g_rows = upstream(grad_rows, count, acc, "grad_rows");
  const at::Tensor g_ce = label == nullptr ? at::Tensor() : upstream(grad_ce_rows, count, acc,
                                                                     "grad_ce_rows");
  at::Tensor grad = empty_grad(student);
  const float* valid = mask_data(mask);
  const Scales scales(divergence, temperature);
  const bool unit_t = temperature == 1.0;
  FASTKD_DISPATCH_PAIR(student.scalar_type(), teacher.scalar_type(), "logit_backward", {
    const s_t* s_base = student.const_data_ptr<s_t>();
    const t_t* t_base = teacher.const_data_ptr<t_t>();
    const RowView s_rows(student), t_rows(teacher);
    s_t* grad_base = grad.data_ptr<s_t>();
    const double* lse_s = row_stats.const_data_ptr<double>();
    const double* lse_t = lse_s + count;
    const double* lse_raw = lse_t + count;
    const double* total = lse_raw + count;
    const acc_t* g = g_rows.const_data_ptr<acc_t>();
    const acc_t* w = g_ce.defined() ? g_ce.const_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, count, grain_rows(cols), [&](int64_t begin, int64_t end) {
      acc_t buf_s[kBlock], buf_t[kBlock], buf_g[kBlock];
      for (int64_t r = begin; r < end; ++r) {
        s_t* grad_row = grad_base + r * cols;
        const int64_t row_label = label_of(label, r, cols);
        const bool kd = lse_t[r] != kNoEntries;
        if ((valid != nullptr && valid[r] == 0) || (!kd && row_label < 0)) {
          zero_row(grad_row, cols);
          continue;
        }
        const s_t* s_row = s_rows.row(s_base, r);
        const t_t* t_row = t_rows.row(t_base, r);
        const double row_w = row_label >= 0 && w != nullptr ? static_cast<double>(w[r]) : 0.0;
        // reverse: E_q[x] = T (S + lse_s - lse_t), as mean + mean_lo
        const double mean = divergence == Divergence::kReverse && kd
                                ? temperature * (total[r] + (lse_s[r] - lse_t[r]))
                                : 0.0;
        const SplitLse<acc_t> split_mean(mean);
        const BackwardRow<acc_t> row{
            static_cast<acc_t>(1.0 / temperature),
            static_cast<acc_t>(beta),
            SplitLse<acc_t>(lse_s[r]),
            SplitLse<acc_t>(lse_t[r]),
            RowGrad<acc_t>{kd, static_cast<double>(g[r]) * scales.c, total[r], g[r],
                           split_mean.hi, split_mean.lo, row_w, row_label},
            static_cast<acc_t>(unit_t && kd ? row_w : 0.0)};
        // The cross-entropy's softmax(s) from lse(s) where it is not q.
        const bool add_ce_softmax = row_w != 0 && row.w1 == 0;
        const SplitLse<acc_t> row_lse_raw(add_ce_softmax ? lse_raw[r] : 0.0);
        for (int64_t c = 0; c < cols; c += kBlock) {
          const int64_t n = std::min(kBlock, cols - c);
          acc_t* out = out_block<acc_t>(grad_row + c, buf_g);
          const acc_t* s = load_block(s_row + c, n, buf_s);
          const acc_t* t = load_block(t_row + c, n, buf_t);
          if (!kd) {
            std::fill(out, out + n, acc_t(0));
          } else if (divergence == Divergence::kForward) {
            backward_block<Divergence::kForward>(s, t, n, row, out);
          } else if (divergence == Divergence::kReverse) {
            backward_block<Divergence::kReverse>(s, t, n, row, out);
          } else {
            backward_block<Divergence::kJsd>(s, t, n, row, out);
          }
          if (add_ce_softmax) {
            add_softmax(s, n, row_lse_raw, static_cast<acc_t>(row_w), out);
          }
          if (row_label >= c && row_label < c + n) {
            out[row_label - c] -= static_cast<acc_t>(row_w);
          }
          store_block(out, grad_row + c, n);
        }
      }
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastkd_native, m) {
  m.def("logit_forward(Tensor student, Tensor teacher, Tensor? mask, float temperature,"
        " str divergence, float beta, Tensor? labels) -> (Tensor, Tensor, Tensor)",
        &logit_forward);
  m.def("logit_backward(Tensor student, Tensor teacher, Tensor? mask, float temperature,"
        " str divergence, float beta, Tensor? labels, Tensor stats, Tensor grad_rows,"
        " Tensor? grad_ce_rows) -> Tensor",
        &logit_backward);
  m.def("logit_forward_with_grad(Tensor student, Tensor teacher, Tensor? mask,"
        " float temperature, str divergence, float beta, Tensor? labels, Tensor grad_rows,"
        " Tensor? grad_ce_rows) -> (Tensor, Tensor, Tensor)",
        &logit_forward_with_grad);
}

}  // namespace fastkd
