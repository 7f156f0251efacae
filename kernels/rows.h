// Shared pieces of fastkd's CPU row kernels (hidden.cpp, attention.cpp, logit.cpp).
//
// Every loss is a sum over rows; a kernel walks each row in blocks of kBlock elements. A block is
// read from memory once: reduced-precision inputs are converted into a small per-thread buffer
// that stays in L1, float32/float64 inputs are read in place. Arithmetic uses
// at::vec::Vectorized<acc_t>, with acc_t float32, or float64 when an input is float64. Rows are
// spread over threads with at::parallel_for; all offsets are int64_t.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace fastkd {

using at::vec::Vectorized;

// Elements of one row handled at a time: two float32 blocks and a gradient block fit in L1.
constexpr int64_t kBlock = 1024;

// Rows below which a kernel stays on one thread: about this many elements of work.
constexpr int64_t kParallelElements = 1 << 15;

inline int64_t grain_rows(int64_t cols) {
  return std::max<int64_t>(1, kParallelElements / std::max<int64_t>(cols, 1));
}

// Asks the cache for the line kBlock elements after p: the same place in the next block, so that
// its memory arrives while the current block is computed on. A hint only: never faults.
template <typename scalar_t>
inline void prefetch_next_block(const scalar_t* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) +
                                                   kBlock * sizeof(scalar_t)));
#endif
}

// float64 when either input is float64, float32 otherwise.
template <typename s_t, typename t_t>
using acc_type = std::conditional_t<std::is_same_v<s_t, double> || std::is_same_v<t_t, double>,
                                    double, float>;

inline at::ScalarType acc_scalar_type(const at::Tensor& s, const at::Tensor& t) {
  return s.scalar_type() == at::kDouble || t.scalar_type() == at::kDouble ? at::kDouble
                                                                           : at::kFloat;
}

// Runs BODY with s_t, t_t (the student's and the teacher's element types) and acc_t defined.
#define FASTKD_DISPATCH_PAIR(S_TYPE, T_TYPE, NAME, ...)                                      \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, S_TYPE, NAME, [&] {             \
    using s_t = scalar_t;                                                                    \
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, T_TYPE, NAME, [&] {           \
      using t_t = scalar_t;                                                                  \
      using acc_t = acc_type<s_t, t_t>;                                                      \
      __VA_ARGS__                                                                            \
    });                                                                                      \
  })

// The n elements at src as acc_t: src itself when the types agree, else converted into buf.
template <typename acc_t, typename scalar_t>
inline const acc_t* load_block(const scalar_t* src, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return src;
  } else if constexpr (std::is_same_v<acc_t, float>) {
    using Vec = Vectorized<scalar_t>;  // bfloat16 or half: twice the lanes of Vectorized<float>
    int64_t k = 0;
    for (; k + Vec::size() <= n; k += Vec::size()) {
      prefetch_next_block(src + k);
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(Vec::loadu(src + k));
      lo.store(buf + k);
      hi.store(buf + k + Vectorized<float>::size());
    }
    for (; k < n; ++k) {
      buf[k] = static_cast<float>(src[k]);
    }
    return buf;
  } else {
    for (int64_t k = 0; k < n; ++k) {
      buf[k] = static_cast<acc_t>(src[k]);
    }
    return buf;
  }
}

// Where a kernel writes n gradient values of type acc_t before they reach dst: dst itself when
// the types agree, else buf (then store_block converts them).
template <typename acc_t, typename scalar_t>
inline acc_t* out_block(scalar_t* dst, acc_t* buf) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return dst;
  } else {
    return buf;
  }
}

template <typename acc_t, typename scalar_t>
inline void store_block(const acc_t* src, scalar_t* dst, int64_t n) {
  if constexpr (!std::is_same_v<acc_t, scalar_t>) {
    at::vec::convert(src, dst, n);
  }
}

template <typename scalar_t>
inline void zero_row(scalar_t* dst, int64_t n) {
  std::fill(dst, dst + n, scalar_t(0));
}

// The vector of the n (< size) elements at src, the other lanes holding fill.
template <typename acc_t>
inline Vectorized<acc_t> load_tail(const acc_t* src, int64_t n, acc_t fill) {
  return Vectorized<acc_t>::set(Vectorized<acc_t>(fill), Vectorized<acc_t>::loadu(src, n), n);
}

template <typename acc_t>
inline acc_t reduce_sum(const Vectorized<acc_t>& x) {
  return at::vec::vec_reduce_all<acc_t>(
      [](Vectorized<acc_t>& a, Vectorized<acc_t>& b) { return a + b; }, x);
}

template <typename acc_t>
inline acc_t reduce_max(const Vectorized<acc_t>& x) {
  return at::vec::vec_reduce_all<acc_t>(
      [](Vectorized<acc_t>& a, Vectorized<acc_t>& b) { return at::vec::maximum(a, b); }, x);
}

// exp(x) for float32 lanes, inlined (Cephes' expf: exp(r) * 2^n with x = n ln 2 + r,
// |r| <= ln 2 / 2, relative error about 1 ulp). x < ln(FLT_MIN) gives 0 (no subnormal results),
// x > 88 is treated as 88 (the kernels only take exp of values <= 0), NaN stays NaN.
inline Vectorized<float> vexp(const Vectorized<float>& x) {
  using Vec = Vectorized<float>;
  const Vec lo(-87.33654475f);
  const Vec xc = at::vec::clamp_max(x, Vec(88.0f));  // keeps NaN
  const Vec n = (xc * Vec(1.44269504088896341f)).round();
  Vec r = at::vec::fmadd(n, Vec(-0.693359375f), xc);  // ln 2 in two parts, the first exact
  r = at::vec::fmadd(n, Vec(2.12194440e-4f), r);
  Vec p(1.9875691500e-4f);
  p = at::vec::fmadd(p, r, Vec(1.3981999507e-3f));
  p = at::vec::fmadd(p, r, Vec(8.3334519073e-3f));
  p = at::vec::fmadd(p, r, Vec(4.1665795894e-2f));
  p = at::vec::fmadd(p, r, Vec(1.6666665459e-1f));
  p = at::vec::fmadd(p, r, Vec(5.0000001201e-1f));
  const Vec y = at::vec::fmadd(p, r * r, r + Vec(1.0f));
  // 2^n from its bit pattern, exact for n in [-126, 127]; below that the blend gives 0.
  const auto biased = at::vec::convert_to_int_of_same_size(n) + Vectorized<int32_t>(127);
  const Vec two_n = at::vec::cast<float>(biased << Vectorized<int32_t>(23));
  return Vec::blendv(y * two_n, Vec(0.0f), x < lo);
}

inline Vectorized<double> vexp(const Vectorized<double>& x) {
  return x.map([](double v) { return std::exp(v); });
}

// log(x) for float32 lanes, inlined (Cephes' logf: x = m 2^e with m in [sqrt(1/2), sqrt(2)), a
// polynomial in m - 1; relative error about 1 ulp) for normal x > 0; +inf and NaN stay as they are.
inline Vectorized<float> vlog(const Vectorized<float>& x) {
  using Vec = Vectorized<float>;
  using IVec = Vectorized<int32_t>;
  const IVec bits = at::vec::cast<int32_t>(x);
  // x = m 2^e with m in [1/2, 1); then m in [sqrt(1/2), sqrt(2)) by moving one factor 2.
  Vec m = at::vec::cast<float>((bits & IVec(0x007fffff)) | IVec(0x3f000000));
  Vec e = at::vec::convert_to_fp_of_same_size<float>((bits >> IVec(23)) - IVec(126));
  const Vec small = m < Vec(0.707106781186547524f);
  e = e - (small & Vec(1.0f));
  m = m + (small & m) - Vec(1.0f);
  const Vec z = m * m;
  Vec p(7.0376836292e-2f);
  p = at::vec::fmadd(p, m, Vec(-1.1514610310e-1f));
  p = at::vec::fmadd(p, m, Vec(1.1676998740e-1f));
  p = at::vec::fmadd(p, m, Vec(-1.2420140846e-1f));
  p = at::vec::fmadd(p, m, Vec(1.4249322787e-1f));
  p = at::vec::fmadd(p, m, Vec(-1.6668057665e-1f));
  p = at::vec::fmadd(p, m, Vec(2.0000714765e-1f));
  p = at::vec::fmadd(p, m, Vec(-2.4999993993e-1f));
  p = at::vec::fmadd(p, m, Vec(3.3333331174e-1f));
  Vec y = p * m * z;
  y = at::vec::fmadd(e, Vec(-2.12194440e-4f), y);  // ln 2 in two parts, the second here
  y = at::vec::fmadd(z, Vec(-0.5f), y);
  const Vec log_x = at::vec::fmadd(e, Vec(0.693359375f), m + y);
  return Vec::blendv(x, log_x, x < Vec(std::numeric_limits<float>::infinity()));
}

inline Vectorized<double> vlog(const Vectorized<double>& x) {
  return x.map([](double v) { return std::log(v); });
}

// Row addressing of a [R0, R1, C] view: row r (row-major over the two leading dims) starts at
// base + (r / R1) * stride(0) + (r % R1) * stride(1).
struct RowView {
  int64_t r1, stride0, stride1;
  explicit RowView(const at::Tensor& x)
      : r1(x.size(1)), stride0(x.stride(0)), stride1(x.stride(1)) {}
  template <typename scalar_t>
  scalar_t* row(scalar_t* base, int64_t r) const {
    return base + (r / r1) * stride0 + (r % r1) * stride1;
  }
};

// Rows of a [R0, R1, C] view.
inline int64_t row_count(const at::Tensor& x) { return x.size(0) * x.size(1); }

// The kernel of one pair over its rows [begin, end).
using RowTask = std::function<void(int64_t begin, int64_t end)>;

// Runs the tasks of a list of pairs in one at::parallel_for over their rows concatenated (pair i
// owns counts[i] rows), so that many small pairs cost one parallel region, not one each.
inline void parallel_over_pairs(const std::vector<RowTask>& tasks,
                                const std::vector<int64_t>& counts, int64_t elements) {
  std::vector<int64_t> offsets(tasks.size() + 1, 0);
  for (size_t i = 0; i < tasks.size(); ++i) {
    offsets[i + 1] = offsets[i] + counts[i];
  }
  const int64_t rows = offsets.back();
  const int64_t grain = rows == 0 ? 1 : grain_rows(elements / rows);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (size_t i = 0; i < tasks.size(); ++i) {
      const int64_t lo = std::max(begin, offsets[i]), hi = std::min(end, offsets[i + 1]);
      if (lo < hi) {
        tasks[i](lo - offsets[i], hi - offsets[i]);
      }
    }
  });
}

// mask: a float32 0/1 tensor or none; nullptr stands for "every row valid".
inline const float* mask_data(const std::optional<at::Tensor>& mask) {
  if (!mask.has_value()) {
    return nullptr;
  }
  TORCH_CHECK(mask->scalar_type() == at::kFloat && mask->is_contiguous() && mask->is_cpu(),
              "fastkd native: mask must be a contiguous float32 CPU tensor");
  return mask->data_ptr<float>();
}

// A new contiguous tensor of like's shape and dtype for a gradient. On Linux its memory is marked
// for transparent huge pages before the kernel first writes it: a large fresh allocation otherwise
// costs one page fault per 4 KiB, as much time as the kernel's own work.
inline at::Tensor empty_grad(const at::Tensor& like) {
  at::Tensor grad = at::empty(like.sizes(), like.options());
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(1) << 21;
  const auto begin = reinterpret_cast<uintptr_t>(grad.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + grad.nbytes()) & ~(kHugePage - 1);
  if (last > first) {
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // a hint: result ignored
  }
#endif
  return grad;
}

// Per-pair rows ([n]) or stats ([2, n]) of a list of pairs, concatenated along the last dim;
// float64 when any piece is.
inline at::Tensor concat_rows(const std::vector<at::Tensor>& pieces) {
  return pieces.size() == 1 ? pieces[0] : at::cat(pieces, -1);
}

// Pair rows [offset, offset + count) of grad_rows (d loss / d rows of all pairs), contiguous acc.
inline at::Tensor pair_rows(const at::Tensor& grad_rows, int64_t offset, int64_t count,
                            at::ScalarType acc) {
  return grad_rows.reshape(-1).narrow(0, offset, count).to(acc).contiguous();
}

inline void check_input(const at::Tensor& x, int64_t dim, const char* name) {
  TORCH_CHECK(x.is_cpu(), "fastkd native: ", name, " must be a CPU tensor");
  TORCH_CHECK(x.dim() == dim, "fastkd native: ", name, " must have ", dim, " dims, got ",
              x.dim());
  TORCH_CHECK(x.size(-1) <= 1 || x.stride(-1) == 1, "fastkd native: ", name,
              " must have a last dim of stride 1");
}

inline void check_pairs(const at::TensorList& students, const at::TensorList& teachers,
                        int64_t dim) {
  TORCH_CHECK(!students.empty() && students.size() == teachers.size(),
              "fastkd native: students and teachers must be non-empty lists of equal length");
  for (size_t i = 0; i < students.size(); ++i) {
    check_input(students[i], dim, "student");
    check_input(teachers[i], dim, "teacher");
  }
}

// f(k, len) for the vectors of n acc_t entries: len entries at k, Vectorized<acc_t>::size() but for
// a shorter last one (whose loads Vectorized::loadu(p, len) fill the other lanes with 0).
template <typename acc_t, typename F>
inline void for_each_vector(int64_t n, F&& f) {
  constexpr int64_t kSize = Vectorized<acc_t>::size();
  int64_t k = 0;
  for (; k + kSize <= n; k += kSize) {
    f(k, kSize);
  }
  if (k < n) {
    f(k, n - k);
  }
}

// out[k] = a x[k] + b y[k] for the n entries (out may be x or y).
template <typename acc_t>
inline void linear_combination(const acc_t* x, acc_t a, const acc_t* y, acc_t b, int64_t n,
                               acc_t* out) {
  using Vec = Vectorized<acc_t>;
  const Vec va(a), vb(b);
  for_each_vector<acc_t>(n, [&](int64_t k, int64_t len) {
    at::vec::fmadd(Vec::loadu(x + k, len), va, Vec::loadu(y + k, len) * vb).store(out + k, len);
  });
}

// out[k] = a x[k] + b y[k] + c z[k] for the n entries (out may be x, y or z).
template <typename acc_t>
inline void linear_combination(const acc_t* x, acc_t a, const acc_t* y, acc_t b, const acc_t* z,
                               acc_t c, int64_t n, acc_t* out) {
  using Vec = Vectorized<acc_t>;
  const Vec va(a), vb(b), vc(c);
  for_each_vector<acc_t>(n, [&](int64_t k, int64_t len) {
    at::vec::fmadd(Vec::loadu(x + k, len), va,
                   at::vec::fmadd(Vec::loadu(y + k, len), vb, Vec::loadu(z + k, len) * vc))
        .store(out + k, len);
  });
}

// What SoftmaxKL's cross sums, in the units of s_raw and t_raw.
enum class CrossSum {
  kTeacher,  // sum exp(t - max_t) (t_raw - s_raw), for KL(p || q): kl()
  kStudent,  // sum exp(s - max_s) (s_raw - t_raw), for KL(q || p): mean_difference()
  kNone,     // nothing (a divergence that needs p and q themselves takes a second sweep)
};

// Online softmax KL over one row of student scores s = scale * s_raw and teacher scores
// t = scale * t_raw (scale > 0):
//   q = softmax(s), p = softmax(t), kl = sum_k p_k (log p_k - log q_k).
// It keeps the running maxima max_s, max_t and, relative to them,
//   sum_s = sum exp(s - max_s),  sum_t = sum exp(t - max_t),  cross (CrossSum; by default
//   sum exp(t - max_t) (t_raw - s_raw)),
// rescaling them by exp(max_old - max_new) when a block raises a maximum, so that each element is
// read once. Then kl = scale cross / sum_t + lse_s - lse_t, with lse_s - lse_t taken as
// (max_s - max_t) + log(sum_s / sum_t): one rounding where two large logs would each round. With
// CrossSum::kStudent, mean_difference() = cross / sum_s = sum_k q_k (s_raw[k] - t_raw[k]) and
// KL(q || p) = scale mean_difference() - (lse_s - lse_t). An entry whose weight in cross is 0
// contributes 0 to it; a block can mark an entry as excluded from both softmaxes by setting s and t
// to -inf there. With raw_sums it also keeps max_raw = max s_raw and
// sum_raw = sum exp(s_raw - max_raw): the student's softmax at scale 1. At scale 2^-j (T = 2, 4,
// 8) those exps are the student's own raised to 2^j, exp(s - max_s)^(2^j) = exp(s_raw - 2^j max_s),
// j squarings instead of a third exp per entry: then max_raw = 2^j max_s (exactly).
template <typename acc_t>
struct SoftmaxKL {
  using Vec = Vectorized<acc_t>;
  static constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  CrossSum cross_sum = CrossSum::kTeacher;
  bool raw_sums = false;
  acc_t scale = 1;  // the scale of the entries added
  acc_t max_s = kNegInf, max_t = kNegInf, sum_s = 0, sum_t = 0, cross = 0;
  acc_t max_raw = kNegInf, sum_raw = 0;

  SoftmaxKL() = default;
  SoftmaxKL(CrossSum cross_sum, bool raw_sums) : cross_sum(cross_sum), raw_sums(raw_sums) {}

  // Adds n entries: s_k = scale * s_raw[k], t_k = scale * t_raw[k].
  void add(const acc_t* s_raw, const acc_t* t_raw, int64_t n, acc_t scale) {
    add_block<false>(s_raw, t_raw, n, scale, nullptr, nullptr, nullptr);
  }

  // The same, and stores the entries' exps relative to the running maxima after this block:
  //   exps_s[k] = exp(s_k - shift_s()),  exps_t[k] = exp(t_k - shift_t()),
  //   exps_raw[k] = exp(s_raw[k] - shift_raw())  (with raw_sums, unless exps_raw is null)
  // (the exps the sums are made of; 0 where an entry is -inf).
  void add(const acc_t* s_raw, const acc_t* t_raw, int64_t n, acc_t scale, acc_t* exps_s,
           acc_t* exps_t, acc_t* exps_raw = nullptr) {
    add_block<true>(s_raw, t_raw, n, scale, exps_s, exps_t, exps_raw);
  }

  // What exps are taken relative to: the running maximum, 0 while it is -inf (no entry yet).
  acc_t shift_s() const { return max_s == kNegInf ? acc_t(0) : max_s; }
  acc_t shift_t() const { return max_t == kNegInf ? acc_t(0) : max_t; }
  acc_t shift_raw() const { return max_raw == kNegInf ? acc_t(0) : max_raw; }

  // Whether the teacher has an entry (a finite maximum); a row without one contributes nothing.
  bool teacher_has_entries() const { return max_t != kNegInf; }
  // The log-sum-exps in float64: a float32 lse would be off by half an ulp of |s|, and every
  // exp(s - lse) of the backward pass with it.
  double lse_s() const { return static_cast<double>(max_s) + std::log(static_cast<double>(sum_s)); }
  double lse_t() const { return static_cast<double>(max_t) + std::log(static_cast<double>(sum_t)); }
  double lse_raw() const {
    return static_cast<double>(max_raw) + std::log(static_cast<double>(sum_raw));
  }
  acc_t kl() const { return scale * cross / sum_t + (max_s - max_t) + std::log(sum_s / sum_t); }
  acc_t mean_difference() const { return cross / sum_s; }

 private:
  // j where scale = 2^-j for j in 1..3, else 0.
  static int squarings_of(acc_t scale) {
    for (int j = 1; j <= 3; ++j) {
      if (scale == acc_t(1) / static_cast<acc_t>(1 << j)) {
        return j;
      }
    }
    return 0;
  }

  // e^(2^j), with results below the smallest normal number taken as 0 (as vexp gives them).
  static Vec squared(Vec e, int j) {
    const Vec smallest(std::numeric_limits<acc_t>::min()), zero(0);
    for (int i = 0; i < j; ++i) {
      e = e * e;
      e = Vec::blendv(e, zero, e < smallest);
    }
    return e;
  }

  // add_block<kStoreExps, kCross, kRawSums> for this row's cross_sum and raw_sums.
  template <bool kStoreExps>
  void add_block(const acc_t* s_raw, const acc_t* t_raw, int64_t n, acc_t scale, acc_t* exps_s,
                 acc_t* exps_t, acc_t* exps_raw) {
    auto with_cross = [&](auto cross_tag) {
      constexpr CrossSum kCross = decltype(cross_tag)::value;
      if (raw_sums) {
        add_block<kStoreExps, kCross, true>(s_raw, t_raw, n, scale, exps_s, exps_t, exps_raw);
      } else {
        add_block<kStoreExps, kCross, false>(s_raw, t_raw, n, scale, exps_s, exps_t, exps_raw);
      }
    };
    switch (cross_sum) {
      case CrossSum::kTeacher:
        return with_cross(std::integral_constant<CrossSum, CrossSum::kTeacher>{});
      case CrossSum::kStudent:
        return with_cross(std::integral_constant<CrossSum, CrossSum::kStudent>{});
      case CrossSum::kNone:
        return with_cross(std::integral_constant<CrossSum, CrossSum::kNone>{});
    }
  }

  template <bool kStoreExps, CrossSum kCross, bool kRawSums>
  void add_block(const acc_t* s_raw, const acc_t* t_raw, int64_t n, acc_t scale, acc_t* exps_s,
                 acc_t* exps_t, acc_t* exps_raw) {
    Vec block_max_s(kNegInf), block_max_t(kNegInf);
    int64_t k = 0;
    for (; k + Vec::size() <= n; k += Vec::size()) {
      block_max_s = at::vec::clamp_min(Vec::loadu(s_raw + k), block_max_s);
      block_max_t = at::vec::clamp_min(Vec::loadu(t_raw + k), block_max_t);
    }
    if (k < n) {
      block_max_s = at::vec::clamp_min(load_tail(s_raw + k, n - k, kNegInf), block_max_s);
      block_max_t = at::vec::clamp_min(load_tail(t_raw + k, n - k, kNegInf), block_max_t);
    }
    // scale > 0, so the maximum of the scaled values is the scaled maximum, rounding included.
    this->scale = scale;
    const acc_t old_max_s = max_s, old_max_t = max_t, old_max_raw = max_raw;
    const acc_t block_max_raw = reduce_max(block_max_s);
    max_s = std::max(max_s, block_max_raw * scale);
    max_t = std::max(max_t, reduce_max(block_max_t) * scale);
    const int squarings = kRawSums ? squarings_of(scale) : 0;
    if constexpr (kRawSums) {
      max_raw = squarings > 0 ? max_s * static_cast<acc_t>(1 << squarings)
                              : std::max(max_raw, block_max_raw);
    }
    // exp(scale * x - shift) as one fused multiply-add.
    const Vec neg_shift_s(-shift_s()), neg_shift_t(-shift_t()), neg_shift_raw(-shift_raw());
    const Vec vscale(scale), zero(0);
    Vec block_sum_s(0), block_sum_t(0), block_cross(0), block_sum_raw(0);
    auto accumulate = [&](const Vec& s, const Vec& t, int64_t pos, int64_t len) {
      const Vec e_s = vexp(at::vec::fmadd(s, vscale, neg_shift_s));
      const Vec e_t = vexp(at::vec::fmadd(t, vscale, neg_shift_t));
      block_sum_s = block_sum_s + e_s;
      block_sum_t = block_sum_t + e_t;
      if constexpr (kCross == CrossSum::kTeacher) {
        block_cross = at::vec::fmadd(e_t, Vec::blendv(t - s, zero, e_t == zero), block_cross);
      } else if constexpr (kCross == CrossSum::kStudent) {
        block_cross = at::vec::fmadd(e_s, Vec::blendv(s - t, zero, e_s == zero), block_cross);
      }
      if constexpr (kStoreExps) {
        e_s.store(exps_s + pos, len);
        e_t.store(exps_t + pos, len);
      }
      if constexpr (kRawSums) {
        const Vec e_raw = squarings > 0 ? squared(e_s, squarings) : vexp(s + neg_shift_raw);
        block_sum_raw = block_sum_raw + e_raw;
        if (kStoreExps && exps_raw != nullptr) {
          e_raw.store(exps_raw + pos, len);
        }
      }
    };
    for (k = 0; k + Vec::size() <= n; k += Vec::size()) {
      prefetch_next_block(s_raw + k);
      prefetch_next_block(t_raw + k);
      accumulate(Vec::loadu(s_raw + k), Vec::loadu(t_raw + k), k, Vec::size());
    }
    if (k < n) {
      accumulate(load_tail(s_raw + k, n - k, kNegInf), load_tail(t_raw + k, n - k, kNegInf), k,
                 n - k);
    }
    auto rescale = [](acc_t old_max, acc_t max) {
      return old_max == kNegInf ? acc_t(0) : std::exp(old_max - max);
    };
    const acc_t rescale_s = rescale(old_max_s, max_s), rescale_t = rescale(old_max_t, max_t);
    sum_s = sum_s * rescale_s + reduce_sum(block_sum_s);
    sum_t = sum_t * rescale_t + reduce_sum(block_sum_t);
    if constexpr (kCross != CrossSum::kNone) {
      cross = cross * (kCross == CrossSum::kTeacher ? rescale_t : rescale_s) +
              reduce_sum(block_cross);
    }
    if constexpr (kRawSums) {
      sum_raw = sum_raw * rescale(old_max_raw, max_raw) + reduce_sum(block_sum_raw);
    }
  }
};

// The exps of a row kept for the sweeps after SoftmaxKL's: the one-pass gradient
// (fastkd._one_pass), and the divergences that need p and q themselves. The row has cols entries,
// walked in blocks of kBlock: add hands a block to SoftmaxKL::add, which stores the block's exps
// here (a per-thread scratch of 2 x cols values, 3 x cols with raw exps, reused row after row,
// small enough to stay in cache; the student's exps go straight into the gradient row when it has
// acc_t's type, so that its lines are fetched while s and t stream in and the gradient sweep
// rewrites them in cache), and records the block's shifts. After the row, for_each_block hands
// each block's stored values and the factors that normalise them,
//   q_k = exps_s[k] factor_s / sum_s,  factor_s = exp(shift_s_b - max_s)  (b the block of k),
// likewise p_k from exps_t and softmax(s_raw)_k from exps_raw; write_grad turns them into
//   out_k = g (q_k - p_k).
// An entry costs 2 exps (forward and backward: 4), and s, t are read from memory once (forward and
// backward: twice).
template <typename acc_t>
class SoftmaxKLScratch {
 public:
  // A block of the row: n entries at column c, the values stored for them, the shifts of its exps
  // and the factors above (float64; 1 where the block's shift is the row's maximum, 0 for a stream
  // without entries).
  struct Block {
    int64_t c, n;
    acc_t *exps_s, *exps_t, *exps_raw;
    acc_t shift_s, shift_t;
    double factor_s, factor_t, factor_raw;
  };

  // raw_exps: room for the exps of SoftmaxKL's raw sums too.
  explicit SoftmaxKLScratch(int64_t cols, bool raw_exps = false)
      : cols_(cols),
        raw_exps_(raw_exps),
        exps_((raw_exps ? 3 : 2) * cols),
        shifts_(3 * ((cols + kBlock - 1) / kBlock)) {}

  // Starts a row whose gradient goes to grad_row (null: a row without one): the student's exps are
  // kept there when its type is acc_t, else in the scratch.
  template <typename s_t>
  void start_row(s_t* grad_row) {
    exps_s_ = exps_.data();
    if constexpr (std::is_same_v<s_t, acc_t>) {
      if (grad_row != nullptr) {
        exps_s_ = grad_row;
      }
    }
  }

  // kl.add of the n entries of the block at column c (a multiple of kBlock), keeping their exps.
  void add(SoftmaxKL<acc_t>& kl, int64_t c, const acc_t* s_raw, const acc_t* t_raw, int64_t n,
           acc_t scale) {
    kl.add(s_raw, t_raw, n, scale, exps_s_ + c, exps_t() + c,
           raw_exps_ ? exps_raw() + c : nullptr);
    acc_t* shifts = shifts_.data() + 3 * (c / kBlock);
    shifts[0] = kl.shift_s();
    shifts[1] = kl.shift_t();
    shifts[2] = kl.shift_raw();
  }

  // f(Block) for each block of the row, in order, once every block went through add.
  template <typename F>
  void for_each_block(const SoftmaxKL<acc_t>& kl, F&& f) {
    auto factor = [](acc_t shift, acc_t max) {
      if (max == SoftmaxKL<acc_t>::kNegInf) {
        return 0.0;
      }
      return shift == max ? 1.0 : std::exp(static_cast<double>(shift) - static_cast<double>(max));
    };
    for (int64_t c = 0; c < cols_; c += kBlock) {
      const acc_t* shifts = shifts_.data() + 3 * (c / kBlock);
      f(Block{c, std::min(kBlock, cols_ - c), exps_s_ + c, exps_t() + c,
              raw_exps_ ? exps_raw() + c : nullptr, shifts[0], shifts[1],
              factor(shifts[0], kl.max_s), factor(shifts[1], kl.max_t),
              factor(shifts[2], kl.max_raw)});
    }
  }

  // grad_row = g (q - p), in grad_row's type, once every block of the row went through add (buf_g:
  // kBlock values for the conversion).
  template <typename s_t>
  void write_grad(const SoftmaxKL<acc_t>& kl, double g, s_t* grad_row, acc_t* buf_g) {
    // g factor / sum per block, in float64: one rounding, none where shift_b is max.
    const double g_s = g / static_cast<double>(kl.sum_s), g_t = g / static_cast<double>(kl.sum_t);
    for_each_block(kl, [&](const Block& b) {
      acc_t* out = out_block<acc_t>(grad_row + b.c, buf_g);  // exps_s itself, or buf_g
      linear_combination(b.exps_s, static_cast<acc_t>(g_s * b.factor_s), b.exps_t,
                         static_cast<acc_t>(-g_t * b.factor_t), b.n, out);
      store_block(out, grad_row + b.c, b.n);
    });
  }

 private:
  acc_t* exps_t() { return exps_.data() + cols_; }
  acc_t* exps_raw() { return exps_.data() + 2 * cols_; }

  int64_t cols_;
  bool raw_exps_;
  std::vector<acc_t> exps_;    // exps_s at [0, cols) (unless in the gradient row), exps_t at
                               // [cols, 2 cols), exps_raw at [2 cols, 3 cols)
  acc_t* exps_s_ = nullptr;    // where this row's student exps are
  std::vector<acc_t> shifts_;  // shift_s, shift_t, shift_raw of each block
};

// The log-sum-exp of no entry: the stats of a row that contributes nothing (see fastkd.backends).
constexpr double kNoEntries = -std::numeric_limits<double>::infinity();

// A float64 lse as hi + lo, both acc_t: x - lse is computed as (x - hi) - lo, which keeps acc_t's
// precision in exp(x - lse) where |x| is large.
template <typename acc_t>
struct SplitLse {
  acc_t hi, lo;
  explicit SplitLse(double lse)
      : hi(static_cast<acc_t>(lse)), lo(static_cast<acc_t>(lse - static_cast<double>(hi))) {}
};

// Gradient of the softmax KL above with respect to s_raw, for one block:
//   out_k = g * (q_k - p_k),
//   q_k = exp(scale * s_raw[k] - lse_s),  p_k = exp(scale * t_raw[k] - lse_t).
template <typename acc_t>
inline void softmax_kl_grad(const acc_t* s_raw, const acc_t* t_raw, int64_t n, acc_t scale,
                            SplitLse<acc_t> lse_s, SplitLse<acc_t> lse_t, acc_t g, acc_t* out) {
  using Vec = Vectorized<acc_t>;
  const Vec vscale(scale), vg(g);
  const Vec hi_s(-lse_s.hi), lo_s(-lse_s.lo), hi_t(-lse_t.hi), lo_t(-lse_t.lo);
  auto grad = [&](const Vec& s, const Vec& t) {
    const Vec q = vexp(at::vec::fmadd(s, vscale, hi_s) + lo_s);
    const Vec p = vexp(at::vec::fmadd(t, vscale, hi_t) + lo_t);
    return (q - p) * vg;
  };
  int64_t k = 0;
  for (; k + Vec::size() <= n; k += Vec::size()) {
    prefetch_next_block(s_raw + k);
    prefetch_next_block(t_raw + k);
    grad(Vec::loadu(s_raw + k), Vec::loadu(t_raw + k)).store(out + k);
  }
  if (k < n) {
    grad(Vec::loadu(s_raw + k, n - k), Vec::loadu(t_raw + k, n - k)).store(out + k, n - k);
  }
}

}  // namespace fastkd
