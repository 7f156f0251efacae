"""Backends: modules that compute the per-row values of the three losses and their gradients.

Every backend module (``torch_ref``, ``triton``, ``native``) defines the same fifteen functions. The
public API (``fastkd.hidden``, ``fastkd.attention``, ``fastkd.attention_qk``, ``fastkd.logit``) validates the inputs, brings
them into the layouts below and calls these through ``torch.library`` custom ops; backends never
validate, never reduce over rows and never synchronise with the host.

Layouts (``R = R0 * R1`` rows; the last dimension always has stride 1):

- ``hidden``/``logit`` inputs are 3-D row views ``[R0, R1, C]`` of the user's tensors (any strides
  for the two leading dims); a backend may index them with ``stride(0)``/``stride(1)``.
- ``attention`` inputs are contiguous ``[B, H, Lq, Lk]`` tensors.
- ``mask`` is ``None`` (every row valid) or a contiguous float32 tensor of 0/1: ``[R]`` for
  ``hidden`` and ``logit``, ``[B, Lq]`` for ``attention`` (and, for ``kind="scores"``, the key mask
  ``mask[b, k]``, ``Lq == Lk``).
- Per-row values (``rows``) are float32 (float64 when an input is float64), masked rows exactly 0:
    hidden:    sum_d (s - t)^2 / D
    attention: kl = sum_k p_k (log p_k - log q_k)   (see ``fastkd.attention`` for p, q)
    logit:     the divergence of the row (below)
- A row *contributes nothing* when it is masked, or when it has no entry that counts: a teacher
  row of logits that are all ``-inf``, an attention row whose keys are all dropped. Its value is 0,
  its stats are ``-inf`` and its gradient is 0; ``n`` of the mean is still the mask's count.
- ``stats`` is a float64 ``[2, R]`` tensor (``[4, R]`` for ``logit``, below) a forward pass leaves for its backward: the log-sum-exps
  of the student's and the teacher's (scaled) scores per row over the entries that count; ``-inf``
  (the log-sum-exp of nothing) in both for a row that contributes nothing, which is how backward
  knows it. float64, so that ``exp(x - lse)`` keeps float32 precision where ``|x|`` is large
  (logits of 1e4 at T = 0.05): a float32 lse would be off by half an ulp of ``|x|``, which moves
  every probability. Backward passes compute ``x - lse`` as ``(x - hi) - lo`` with
  ``hi = float32(lse)``, ``lo = float32(lse - hi)``. ``attention`` with ``kind="probs"`` returns a
  ``[2, 0]`` tensor.
- Backward functions take ``grad_rows`` (same shape as ``rows``: d loss / d rows) and return the
  gradient of each student input, contiguous, of the student's shape and dtype, 0 on rows that
  contribute nothing.
  For sequences of pairs, ``rows`` and ``grad_rows`` are the pairs' rows concatenated in order.

Functions::

    hidden_forward(students, teachers, mask) -> rows
    hidden_backward(students, teachers, mask, grad_rows) -> list of grads
    attention_forward(students, teachers, mask, kind) -> (rows, stats)
    attention_backward(students, teachers, mask, kind, stats, grad_rows) -> list of grads
    logit_forward(student, teacher, mask, temperature, divergence, beta, labels) -> (rows, ce_rows, stats)
    logit_backward(student, teacher, mask, temperature, divergence, beta, labels, stats, grad_rows,
                   grad_ce_rows) -> grad
    sparse_forward(student, ids, logprobs, mask, temperature, tail) -> (rows, stats)
    sparse_backward(student, ids, logprobs, mask, temperature, tail, stats, grad_rows) -> grad
    attention_qk_forward(student_q, student_k, teacher_q, teacher_k, scales, mask, causal) -> (rows, stats)
    attention_qk_backward(student_q, student_k, teacher_q, teacher_k, scales, mask, causal, stats,
                          grad_rows) -> (grads_q, grads_k)

One pass (``fastkd._one_pass``): ``grad_rows`` known before the row pass, the forward also writes
the gradient, each input element read once from memory; ``rows`` are those of the forward, the
gradients those the backward would return for these ``grad_rows``::

    hidden_forward_with_grad(students, teachers, mask, grad_rows) -> (rows, grads)
    attention_forward_with_grad(students, teachers, mask, kind, grad_rows) -> (rows, grads)
    logit_forward_with_grad(student, teacher, mask, temperature, divergence, beta, labels, grad_rows,
                            grad_ce_rows) -> (rows, ce_rows, grad)
    sparse_forward_with_grad(student, ids, logprobs, mask, temperature, tail, grad_rows) -> (rows, grad)
    scale_gradients_(grads, upstream, expected) -> None

``scale_gradients_`` multiplies each gradient in place by ``upstream / expected`` (0-d tensors of
the loss's dtype, read on the device by the kernel: no host synchronisation), by 0 where
``expected == 0``, and reads and writes nothing when ``upstream == expected``.

The logit functions. With ``s' = s / T``, ``t' = t / T``, ``q = softmax(s')``, ``p = softmax(t')``
(an entry of ``-inf`` has probability 0), ``divergence`` one of::

    "forward"  rows = T^2 sum_v p_v (log p_v - log q_v)            (terms with p_v = 0 are 0)
    "reverse"  rows = T^2 sum_v q_v (log q_v - log p_v)            (terms with q_v = 0 are 0)
    "jsd"      rows = T^2 (beta KL(p || m) + (1 - beta) KL(q || m)),  m = beta p + (1 - beta) q
    "tvd"      rows = 0.5 sum_v |p_v - q_v|                         (no T^2)

``beta`` (a float) is read by ``"jsd"`` only. ``labels``: ``None`` or int64 ``[R]``; a row that is
valid and whose label is in ``[0, V)`` (``-100``: none) has ``ce_rows = lse(s) - s[label]`` at
temperature 1, other rows 0; without labels ``ce_rows`` is empty (``[0]``). The cross-entropy does
not depend on the teacher. ``stats`` is ``[4, R]``: ``lse(s')``, ``lse(t')``, ``lse(s)`` (``-inf``
on rows without a cross-entropy) and ``S = sum_v q_v a_v``, the one row sum the gradient needs::

    grad = grad_rows * c q (a - S) + grad_ce_rows * (softmax(s) - onehot(label))
    c = T (tvd: 1 / T);  q a = -p ("forward": the gradient T (q - p)),
    a = log q - log p ("reverse"), (1 - beta) log(q / m) ("jsd"), 0.5 sign(q - p) ("tvd")

with ``q a = 0`` wherever ``q = 0``. ``grad_ce_rows`` is ``None`` without labels (no cross-entropy
gradient).

The sparse (top-k teacher) functions. ``student`` is a ``[R0, R1, V]`` row view as for ``logit``;
``ids`` a contiguous int64 ``[R, k]`` of the teacher's stored token ids per row, ``-1`` for padding
(an entry that is not there, whatever its log-probability), the others distinct and in ``[0, V)``;
``logprobs`` a contiguous ``[R, k]`` of the loss's dtype (float32; float64 for a float64 student):
the teacher's log-probabilities at T = 1 of those ids. With ``s' = s / T``, ``log q = s' - lse(s')``
over the whole vocabulary and ``J`` the row's stored entries (``ids >= 0``)::

    "renormalize"  lse_t = lse_{j in J}(l_j / T),  p_j = exp(l_j / T - lse_t)
                   rows  = T^2 sum_{j in J, p_j > 0} p_j (log p_j - log q_{id_j})
                   grad  = grad_rows * (a q + scatter_j b_j),  a = T,  b_j = -T p_j
    "bucket"       (T = 1) lse_t = lse_{j in J}(l_j),  p_j = exp(l_j),  P = sum_J p_j,
                   Q = sum_J q_{id_j},  p_tail = max(1 - P, 0),  q_tail = 1 - Q
                   rows  = sum_{j in J, p_j > 0} p_j (l_j - log q_{id_j})
                           + p_tail (log p_tail - log max(q_tail, TINY))   (only when the tail
                             exists, |J| < V, and p_tail > 0)
                   w     = p_tail / q_tail where the tail exists and q_tail > TINY, else 0
                   grad  = grad_rows * (a q + scatter_j b_j),  a = P - w Q,  b_j = w q_{id_j} - p_j

(``TINY``: float32's smallest normal number, ``fastkd._constants``; ``scatter_j b_j`` adds ``b_j``
at entry ``id_j``). A row contributes nothing when it is masked or ``lse_t = -inf`` (no stored
entry with a finite log-probability). ``stats`` is ``[2, R]``: ``lse(s')`` and ``lse_t``. The
k-sized values (``p``, ``P``, ``Q``, ``w``) are recomputed from ``ids``, ``logprobs`` and the
stats in backward.

``attention_qk_*`` take lists (layer pairs) of contiguous queries ``[B, H, L, d]`` and keys
``[B, H_kv, L, d]`` (``H % H_kv == 0``; query head ``h`` reads key head ``h // (H / H_kv)``), ``scales``
``[scale_s, scale_t]`` of each pair in turn, a ``[B, L]`` mask of query rows and keys, and ``causal``
(keys ``j > i`` dropped); their rows and stats are those of ``attention`` with ``kind="scores"`` on
``S = query key^T * scale``, which never exists as a whole: ``[B, H, L]`` rows per pair.

``students``/``teachers`` are lists of tensors (layer pairs), ``temperature`` a Python float.
Every backend names things alike: the student first, ``_s``/``_t`` for the student's and the
teacher's values, ``q``/``p`` for their distributions (``docs/design.md`` gives the whole scheme).
"""
