"""Float64 formulas of the three losses, written from their definitions, and the checks that use them.

Each ``*_rows`` function returns the per-row value ``r`` of one loss in float64 (or in ``dtype``,
to measure what float32 arithmetic itself can reach) and is differentiable in the student (the
teacher is detached). ``reduce`` turns rows into the value of a ``reduction``. Nothing here calls
fastkd: these are the independent oracle.
"""

from __future__ import annotations

import torch

TINY = 1.1754944e-38  # smallest normal float32: the floor of q in log q for kind="probs"


F64 = torch.float64


def hidden_rows(s: torch.Tensor, t: torch.Tensor, dtype: torch.dtype = F64) -> torch.Tensor:
    """``sum_d (s - t)^2 / D`` per row, ``[..., D] -> [...]``."""
    return (s.to(dtype) - t.detach().to(dtype)).pow(2).mean(-1)


def _kl_terms(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``sum a (log a - log b)`` over the last dim, terms with ``a = 0`` exactly 0 (in value and in
    gradient: the difference is replaced before it is multiplied, so no ``0 * inf`` appears)."""
    return (a * torch.where(a > 0, log_a - log_b, 0.0)).sum(-1)


def logit_rows(s: torch.Tensor, t: torch.Tensor, temperature: float, dtype: torch.dtype = F64,
               divergence: str = "forward", beta: float | None = None) -> torch.Tensor:
    """The per-row divergence of ``logit_kl``, ``p = softmax(t / T)``, ``q = softmax(s / T)``:

    - ``"forward"``: ``T^2 KL(p || q)``, ``"reverse"``: ``T^2 KL(q || p)``;
    - ``"jsd"``: ``T^2 (beta KL(p || m) + (1 - beta) KL(q || m))``, ``m = beta p + (1 - beta) q``;
    - ``"tvd"``: ``0.5 sum |p - q|``.

    Terms of a zero probability contribute 0; a row whose teacher has no finite logit has no
    distribution and contributes 0 (no gradient flows there).
    """
    t = t.detach().to(dtype)
    empty = torch.isneginf(t).all(-1, keepdim=True)
    # Rows without a teacher get dummy zeros, so that neither value nor gradient is NaN there.
    s64 = torch.where(empty, 0.0, s.to(dtype))
    t64 = torch.where(empty, 0.0, t)
    log_q = torch.log_softmax(s64 / temperature, dim=-1)
    log_p = torch.log_softmax(t64 / temperature, dim=-1)
    p, q = log_p.exp(), log_q.exp()
    if divergence == "forward":
        rows = temperature**2 * _kl_terms(p, log_p, log_q)
    elif divergence == "reverse":
        rows = temperature**2 * _kl_terms(q, log_q, log_p)
    elif divergence == "jsd":
        m = beta * p + (1 - beta) * q
        log_m = torch.log(torch.where(m > 0, m, 1.0))
        rows = temperature**2 * (beta * _kl_terms(p, log_p, log_m) + (1 - beta) * _kl_terms(q, log_q, log_m))
    else:
        rows = 0.5 * (p - q).abs().sum(-1)
    return torch.where(empty.squeeze(-1), 0.0, rows)


def ce_rows(s: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype = F64) -> torch.Tensor:
    """The student's hard-label cross-entropy per row at temperature 1, 0 where the label is -100."""
    flat = s.to(dtype).reshape(-1, s.shape[-1])
    ce = torch.nn.functional.cross_entropy(flat, labels.reshape(-1), reduction="none", ignore_index=-100)
    return ce.view(s.shape[:-1])


def logit_loss(s, t, *, mask=None, reduction="mean", dtype=F64, temperature=1.0, divergence="forward",
               beta=None, labels=None, ce_weight=0.0, vocab="exact"):
    """``logit_kl``'s value: the reduced divergence plus ``ce_weight`` times the cross-entropy,
    averaged over the rows with a label and a valid mask (``"sum"``: summed; ``"none"``: per row)."""
    if vocab == "common":
        width = min(s.shape[-1], t.shape[-1])
        s, t = s[..., :width], t[..., :width]
    kd = reduce(logit_rows(s, t, temperature, dtype, divergence, beta), mask, reduction)
    if labels is None:
        return kd
    return kd + ce_weight * _ce_reduced(s, labels, mask, reduction, dtype)


def sparse_rows(s: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, temperature: float,
                tail: str, dtype: torch.dtype = F64) -> torch.Tensor:
    """The per-row divergence of ``sparse_logit_kl``, written over the whole vocabulary: the stored
    teacher as a dense distribution ``p`` (0 off the stored ids; ids of -1 are not stored),
    ``q = softmax(s / T)``:

    - ``"renormalize"``: ``p`` = softmax of ``logprobs / T`` over the stored ids, ``T^2 KL(p || q)``;
    - ``"bucket"`` (T = 1): ``p = exp(logprobs)`` at the stored ids, plus the tail class:
      ``KL(p || q) + p_tail (log p_tail - log max(q_tail, TINY))`` with ``p_tail = max(1 - sum p, 0)``,
      ``q_tail`` the student's mass off the stored ids, no tail term where the ids cover the
      vocabulary or ``p_tail = 0``.

    A row without a stored finite log-probability contributes 0.
    """
    vocab = s.shape[-1]
    stored = ids >= 0
    index = torch.where(stored, ids, 0).long()
    logprobs = torch.where(stored, logprobs.detach().to(dtype), -torch.inf)
    empty = torch.isneginf(logprobs).all(-1, keepdim=True)
    s64 = torch.where(empty, 0.0, s.to(dtype))
    on_ids = torch.zeros(s.shape, dtype=dtype).scatter_add(-1, index, stored.to(dtype)) > 0
    log_q = torch.log_softmax(s64 / temperature, dim=-1)
    if tail == "renormalize":
        weights = torch.softmax(torch.where(empty, 0.0, logprobs / temperature), dim=-1)
    else:
        weights = logprobs.exp()
    p = torch.zeros(s.shape, dtype=dtype).scatter_add(-1, index, torch.where(stored, weights, 0.0))
    log_p = torch.log(torch.where(p > 0, p, 1.0))
    rows = _kl_terms(p, log_p, log_q)
    if tail == "renormalize":
        rows = temperature**2 * rows
    else:
        p_tail = (1 - p.sum(-1)).clamp_min(0)
        q_tail = torch.where(on_ids, 0.0, log_q.exp()).sum(-1)
        has_tail = (p_tail > 0) & ~on_ids.all(-1)
        log_ratio = torch.log(torch.where(has_tail, p_tail, 1.0)) - torch.log(q_tail.clamp_min(TINY))
        rows = rows + torch.where(has_tail, p_tail * log_ratio, 0.0)
    return torch.where(empty.squeeze(-1), 0.0, rows)


def sparse_loss(s, teacher, *, mask=None, reduction="mean", dtype=F64, temperature=1.0, tail="renormalize",
                labels=None, ce_weight=0.0):
    """``sparse_logit_kl``'s value (``teacher = (ids, logprobs)``), with the cross-entropy term of
    ``logit_loss``."""
    kd = reduce(sparse_rows(s, *teacher, temperature, tail, dtype), mask, reduction)
    if labels is None:
        return kd
    return kd + ce_weight * _ce_reduced(s, labels, mask, reduction, dtype)


def _ce_reduced(s, labels, mask, reduction, dtype):
    labelled = labels != -100
    if mask is not None:
        labelled = labelled & (mask != 0)
    ce = torch.where(labelled, ce_rows(s, labels, dtype), 0.0)
    if reduction == "mean":
        return ce.sum() / labelled.sum().clamp_min(1)
    return ce.sum() if reduction == "sum" else ce


def attention_probs_rows(s: torch.Tensor, t: torch.Tensor, dtype: torch.dtype = F64) -> torch.Tensor:
    """``sum_k p_k (log p_k - log max(q_k, TINY))`` with ``p = t``, ``q = s``; ``p_k = 0`` adds 0."""
    q = s.to(dtype)
    p = t.detach().to(dtype)
    log_p = torch.log(torch.where(p > 0, p, 1.0))
    log_q = torch.log(torch.clamp_min(q, TINY))
    return (torch.where(p > 0, p * (log_p - log_q), 0.0)).sum(-1)


def dropped_keys(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Keys excluded from both softmaxes for ``kind="scores"``, ``[B, H, Lq, Lk]`` bool.

    A key is dropped where ``mask[b, k] == 0`` or where either score is ``-inf`` or the lowest
    finite value of its own dtype.
    """
    drop = (
        torch.isneginf(s)
        | torch.isneginf(t)
        | (s == torch.finfo(s.dtype).min)
        | (t == torch.finfo(t.dtype).min)
    )
    if mask is not None:
        drop = drop | (mask[:, None, None, :] == 0)
    return drop


def attention_scores_rows(
    s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None = None, dtype: torch.dtype = F64
) -> torch.Tensor:
    """KL of ``softmax(t)`` from ``softmax(s)`` over the keys that are not dropped; 0 for rows
    where every key is dropped (and no gradient flows there)."""
    drop = dropped_keys(s, t.detach(), mask)
    alive = ~drop.all(-1, keepdim=True)
    # Rows with no key get dummy zeros, so that neither value nor gradient is NaN there.
    s64 = torch.where(alive, s.to(dtype).masked_fill(drop, float("-inf")), 0.0)
    t64 = torch.where(alive, t.detach().to(dtype).masked_fill(drop, float("-inf")), 0.0)
    log_q = torch.log_softmax(s64, dim=-1)
    log_p = torch.log_softmax(t64, dim=-1)
    diff = torch.where(drop, 0.0, log_p - log_q)
    return torch.where(alive.squeeze(-1), (log_p.exp() * diff).sum(-1), 0.0)


def qk_scores(q: torch.Tensor, k: torch.Tensor, scale: float, dtype: torch.dtype = F64) -> torch.Tensor:
    """``q k^T * scale`` per head, ``[B, H, L, d] x [B, H_kv, L, d] -> [B, H, L, L]``; each key head
    serves ``H / H_kv`` consecutive query heads."""
    k = k.to(dtype).repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return q.to(dtype) @ k.transpose(-1, -2) * scale


def attention_qk_rows(q_s, k_s, q_t, k_t, scale_s, scale_t, mask=None, causal=False, dtype=F64):
    """Per query row KL of ``softmax(S_t)`` from ``softmax(S_s)``, ``S = q k^T * scale``, over the keys
    kept: ``mask[b, j] != 0`` and, when ``causal``, ``j <= i``. 0 where no key is kept."""
    s = qk_scores(q_s, k_s, scale_s, dtype)
    t = qk_scores(q_t.detach(), k_t.detach(), scale_t, dtype)
    length = s.shape[-1]
    future = torch.ones(length, length, dtype=torch.bool, device=s.device).triu(1)
    drop = torch.zeros_like(s, dtype=torch.bool) | (future if causal else False)
    if mask is not None:
        drop = drop | (mask[:, None, None, :] == 0)
    return attention_scores_rows(s.masked_fill(drop, -torch.inf), t.masked_fill(drop, -torch.inf), dtype=dtype)


def relation_rows(x_s, x_t, heads: int, mask=None, causal=False, dtype=F64):
    """MiniLMv2: ``[B, L, D]`` split into ``heads`` heads of width ``D / heads``; the KL per query
    row of the teacher's relation ``softmax(x x^T / sqrt(D / heads))`` from the student's."""
    def split(x):
        batch, length, width = x.shape
        return x.reshape(batch, length, heads, width // heads).permute(0, 2, 1, 3)

    s, t = split(x_s), split(x_t.detach())
    return attention_qk_rows(s, s, t, t, s.shape[-1] ** -0.5, t.shape[-1] ** -0.5, mask, causal, dtype)


def attention_rows(s, t, kind: str, mask=None, dtype: torch.dtype = F64) -> torch.Tensor:
    """Per-row KL of one attention pair, ``[B, H, Lq, Lk] -> [B, H, Lq]``."""
    if kind == "probs":
        return attention_probs_rows(s, t, dtype)
    return attention_scores_rows(s, t, mask, dtype)


def row_mask(mask: torch.Tensor | None, rows: torch.Tensor, attention: bool) -> torch.Tensor:
    """The 0/1 weight of every row, of ``rows``' dtype and shape (``[B, 1, Lq]`` broadcast for
    attention)."""
    if mask is None:
        return torch.ones_like(rows)
    m = (mask != 0).to(rows.device, rows.dtype)
    if attention:
        m = m[:, None, :]
    return m.expand_as(rows)


def reduce(rows: torch.Tensor, mask, reduction: str, attention: bool = False) -> torch.Tensor:
    """``none``: rows with masked rows 0; ``sum``: ``sum m r``; ``mean``: ``sum m r / max(sum m, 1)``."""
    m = row_mask(mask, rows, attention)
    kept = torch.where(m > 0, rows, 0.0)
    if reduction == "none":
        return kept
    if reduction == "sum":
        return kept.sum()
    return kept.sum() / m.sum().clamp_min(1.0)


def reference_loss(loss: str, students, teachers, *, mask=None, reduction="mean", dtype=F64, **options):
    """The float64 (or ``dtype``) value of ``fastkd.<loss>`` for a pair or a sequence of pairs.

    ``loss`` is ``"hidden_mse"``, ``"attention_kl"``, ``"logit_kl"`` or ``"sparse_logit_kl"`` (whose
    teacher is ``(ids, logprobs)``); ``options`` holds ``kind``, or ``logit_loss``'s or
    ``sparse_loss``'s options.
    """
    single = torch.is_tensor(students)
    if single:
        students, teachers = [students], [teachers]
    values = []
    for s, t in zip(students, teachers):
        if loss == "hidden_mse":
            rows = hidden_rows(s, t, dtype)
        elif loss == "logit_kl":
            values.append(logit_loss(s, t, mask=mask, reduction=reduction, dtype=dtype, **options))
            continue
        elif loss == "sparse_logit_kl":
            values.append(sparse_loss(s, t, mask=mask, reduction=reduction, dtype=dtype, **options))
            continue
        else:
            rows = attention_rows(s, t, options.get("kind", "probs"), mask, dtype)
        values.append(reduce(rows, mask, reduction, attention=loss == "attention_kl"))
    if single:
        return values[0]
    if reduction == "none":
        return values
    total = torch.stack(values).sum()
    return total / len(values) if reduction == "mean" else total


# --------------------------------------------------------------------------------------------
# comparison


def norm(x: torch.Tensor) -> float:
    """The 2-norm of ``x`` in float64, scaled first so that values near float64's smallest do not
    underflow when squared."""
    x = x.double().cpu()
    unit = x.abs().max().item() if x.numel() else 0.0
    if not 0 < unit < float("inf"):
        return x.norm().item()
    return (x / unit).norm().item() * unit


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Norm-wise relative error ``||got - want|| / ||want||`` (absolute when ``want`` is 0)."""
    got, want = got.double().cpu(), want.double().cpu()
    scale, err = norm(want), norm(got - want)
    return err / scale if scale > 0 else err


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str,
                 elementwise: bool = True, atol: float | None = None) -> None:
    """``got`` is finite, of ``want``'s shape, within ``rtol`` norm-wise, and elementwise within
    ``rtol * |want| + rtol * max|want|`` (reported with the worst element). Where ``want`` is all
    zero, ``||got||`` must be at most ``atol`` (default ``rtol``): float32 log-domain arithmetic
    leaves ~1e-7 of the magnitudes it works with in an exact 0. The same absolute bound holds where
    ``want`` is not 0 but below it (a gradient that vanishes, of 1e-100, is 0 or rounding noise in
    float32)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    g, w = got.double().cpu(), want.double().cpu()
    assert torch.isfinite(g).all(), f"{what}: {(~torch.isfinite(g)).sum().item()} non-finite values"
    bound = rtol if atol is None else atol
    if norm(w) <= bound:
        err = norm(g - w)
        assert err <= bound, f"{what}: off by norm {err:.3g} > {bound:.3g} where {'0' if not w.any() else 'about 0'} is expected"
        return
    err = rel_err(g, w)
    assert err <= rtol, f"{what}: norm-wise relative error {err:.3g} > {rtol:.1g}"
    if elementwise and w.numel() > 1:
        bound = rtol * w.abs() + rtol * w.abs().max()
        excess = (g - w).abs() - bound
        worst = excess.argmax()
        assert excess.max() <= 0, (
            f"{what}: element {tuple(int(i) for i in torch.unravel_index(worst, w.shape))}: "
            f"got {g.flatten()[worst].item():.9g}, want {w.flatten()[worst].item():.9g}"
        )


def loss_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32."""
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


def tolerances(*tensors: torch.Tensor) -> tuple[float, float]:
    """(loss rtol, gradient rtol): the loss is accumulated in float32 whatever the input dtype;
    the gradient is rounded to the student's dtype."""
    low = tensors[0].dtype in (torch.bfloat16, torch.float16)
    return 1e-5, 1e-2 if low else 1e-5


def _rounded(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded to ``dtype`` (saturated at its largest finite value), back in float64."""
    limit = torch.finfo(dtype).max
    return x.clamp(-limit, limit).to(dtype).double()


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def run_and_compare(fn, loss: str, students, teachers, *, mask=None, reduction="mean", upstream=None, **options):
    """Call ``fn`` (``fastkd.<loss>`` or anything with its signature) and the float64 reference on
    the same inputs, backpropagate the same upstream gradient through both (``upstream``, a float
    for scalar losses, else a random scalar, or a random tensor for ``"none"``), and compare values,
    dtypes and the students' gradients.

    The tolerances are those of ``tolerances``, or four times the error of the same formula
    evaluated in float32 where that is larger: a loss computed in float32 cannot beat float32
    arithmetic where the loss is ill conditioned (a KL of 1e-4 of the log-probabilities it is made
    from), and another order of the same float32 operations rounds differently. A gradient beyond
    the range of the student's dtype (``-p / q`` of a tiny float16 ``q``) is compared saturated: it
    overflows to inf there, as PyTorch's own float16 arithmetic does.

    ``students`` must require grad (leaves or views of leaves). Returns ``fn``'s output.
    """
    single = torch.is_tensor(students)
    s_list = [students] if single else list(students)
    t_list = [teachers] if single else list(teachers)
    # the loss's dtype follows the tensors of the pair (a sparse teacher's stored values do not count)
    dtype = loss_dtype(*s_list, *(t for t in t_list if torch.is_tensor(t)))

    def reference(precision):
        leaves = [s.detach().to(precision).requires_grad_() for s in s_list]
        value = reference_loss(loss, leaves[0] if single else leaves, teachers, mask=mask, reduction=reduction,
                               dtype=precision, **options)
        return _as_list(value), leaves

    out = fn(students, teachers, mask=mask, reduction=reduction, **options)
    outs = _as_list(out)
    wants, s64 = reference(torch.float64)
    assert len(outs) == len(wants), f"{len(outs)} results, expected {len(wants)}"
    if upstream is None:
        upstream = [torch.randn(w.shape, dtype=torch.float32) for w in wants]
    else:
        upstream = [torch.full(w.shape, upstream, dtype=torch.float32) for w in wants]
    want_grads = torch.autograd.grad(wants, s64, [u.double().to(w.device) for u, w in zip(upstream, wants)])

    loss_rtols, grad_rtols = [tolerances(s_list[0])[0]] * len(wants), [tolerances(s_list[0])[1]] * len(s64)
    if dtype == torch.float32:
        wants32, s32 = reference(torch.float32)
        grads32 = torch.autograd.grad(wants32, s32, [u.to(w.device) for u, w in zip(upstream, wants32)])
        loss_rtols = [max(r, 4 * rel_err(a.detach(), b.detach())) for r, a, b in zip(loss_rtols, wants32, wants)]
        grad_rtols = [max(r, 4 * rel_err(a, b)) for r, a, b in zip(grad_rtols, grads32, want_grads)]
    # a gradient returned in the student's dtype cannot beat the exact one rounded to it (float16
    # gradients of T (q - p) / n at T = 0.01 fall into float16's subnormal range)
    grad_rtols = [max(r, 4 * rel_err(_rounded(w, s.dtype), w)) for r, s, w in zip(grad_rtols, s_list, want_grads)]

    for i, (o, w, rtol) in enumerate(zip(outs, wants, loss_rtols)):
        assert o.dtype == dtype, f"loss {i}: dtype {o.dtype}, expected {dtype}"
        assert o.device == s_list[0].device, f"loss {i}: device {o.device}"
        assert o.requires_grad, f"loss {i} does not require grad"
        # rows of logit_kl are T^2 * kl (and their gradients T (q - p)): so are rounding errors
        zero_atol = rtol * options.get("temperature", 1.0) ** 2
        assert_close(o.detach(), w.detach(), rtol, f"loss {i}", atol=zero_atol)

    grads = torch.autograd.grad(outs, s_list, [u.to(o.device, o.dtype) for u, o in zip(upstream, outs)])
    for i, (s, g, w, rtol) in enumerate(zip(s_list, grads, want_grads, grad_rtols)):
        assert g.dtype == s.dtype, f"grad {i}: dtype {g.dtype}, expected the student's {s.dtype}"
        limit = torch.finfo(s.dtype).max
        g, w = g.double().clamp(-limit, limit), w.clamp(-limit, limit)
        assert_close(g, w, rtol, f"grad {i}", atol=rtol * options.get("temperature", 1.0))
    return out
