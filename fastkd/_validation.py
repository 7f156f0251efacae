"""Input checks shared by every loss: each raises a ValueError or TypeError naming the argument,
what it got and what it expected, before any kernel runs. Nothing here reads a GPU's values: the
values of ``labels`` and of a sparse teacher's ids are checked on the host for CPU tensors, and by an asynchronous device assert
(``torch._assert_async``) on a GPU and under ``torch.compile``."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from typing import TypeVar

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without torch.distributed: there are no DTensors
    DTensor = None

REDUCTIONS = ("mean", "sum", "none")
DIVERGENCES = ("forward", "reverse", "jsd", "tvd")
VOCABS = ("exact", "common")
JSD_DEFAULT_BETA = 0.5  # TRL's GKD and Liger's JSD default
IGNORE_INDEX = -100  # transformers' label for "no target here"
TAILS = ("renormalize", "bucket")
PADDING_ID = -1  # a stored top-k entry that is not there (a row that kept fewer than k)
Choice = TypeVar("Choice")


def check_choice(name: str, value: object, choices: Collection[Choice]) -> Choice:
    """``value`` if it is one of ``choices``, else a ValueError naming the argument ``name``."""
    if value not in choices:
        raise ValueError(f"{name}: got {value!r}, expected one of {', '.join(map(repr, choices))}")
    return value


def check_reduction(reduction: object) -> str:
    return check_choice("reduction", reduction, REDUCTIONS)


def is_dtensor(x: object) -> bool:
    """Whether ``x`` is a ``torch.distributed.tensor.DTensor`` (``fastkd.distributed`` takes those)."""
    return DTensor is not None and isinstance(x, DTensor)


def check_float_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if is_dtensor(x):
        raise TypeError(
            f"{name}: a DTensor; fastkd takes DTensors only as logit_kl's logits and as the head weights and "
            "biases of fused_linear_kl and fused_linear_sparse_kl (give this one as a plain, local tensor)"
        )
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor (float32, bfloat16, float16, float64), got {x.dtype}")
    return x


# The temperatures every backend computes in float32 without overflow or underflow (T^2, 1/T,
# logits of +-1e4 over T) and with the accuracy the tests check against float64.
TEMPERATURE_RANGE = (0.01, 100.0)


def check_temperature(temperature: object) -> float:
    if isinstance(temperature, torch.Tensor) or not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
        raise TypeError(f"temperature: expected a Python float, got {type(temperature).__name__}")
    low, high = TEMPERATURE_RANGE
    if not (math.isfinite(temperature) and low <= temperature <= high):
        raise ValueError(f"temperature: expected a number in the supported range [{low:g}, {high:g}], got {temperature!r}")
    return float(temperature)


def check_pair(
    student: object,
    teacher: object,
    *,
    names: tuple[str, str] = ("student", "teacher"),
    what: str = "last dimension",
    exact_dim: int | None = None,
) -> None:
    """Student and teacher: floating tensors of one shape on one device, of rank ``exact_dim`` (if
    given) or at least 1, with a non-empty last dimension (``what`` names it in messages)."""
    s_name, t_name = names
    check_float_tensor(s_name, student)
    check_float_tensor(t_name, teacher)
    for name, x in ((s_name, student), (t_name, teacher)):
        if exact_dim is not None and x.dim() != exact_dim:
            raise ValueError(f"{name}: expected a {exact_dim}-D tensor, got shape {tuple(x.shape)}")
        if x.dim() < 1 or x.shape[-1] == 0:
            raise ValueError(f"{name}: expected at least one dimension and a non-empty {what}, got shape {tuple(x.shape)}")
    if teacher.shape[-1] != student.shape[-1]:
        raise ValueError(
            f"{t_name}: {what} {teacher.shape[-1]} does not match {s_name}'s {student.shape[-1]} "
            f"(shapes {tuple(teacher.shape)} and {tuple(student.shape)})"
        )
    if teacher.shape != student.shape:
        raise ValueError(f"{t_name}: shape {tuple(teacher.shape)} does not match {s_name}'s shape {tuple(student.shape)}")
    if teacher.device != student.device:
        raise ValueError(f"{t_name}: on {teacher.device}, but {s_name} is on {student.device}")


def as_layer_lists(**named: object) -> tuple[dict[str, list[torch.Tensor]], bool]:
    """The named arguments all tensors, or all sequences of one non-zero length (layer pairs):
    ({name: list of tensors}, is_sequence)."""
    sequences = {name: isinstance(x, (list, tuple)) for name, x in named.items()}
    if len(set(sequences.values())) != 1:
        count = {2: "two", 4: "four"}.get(len(named), str(len(named)))
        kinds = ", ".join(f"{name}: {type(x).__name__}" for name, x in named.items())
        raise TypeError(f"{', '.join(named)}: expected {count} tensors or {count} sequences of tensors, got {kinds}")
    if not next(iter(sequences.values())):
        return {name: [x] for name, x in named.items()}, False
    lengths = {name: len(x) for name, x in named.items()}
    first, length = next(iter(lengths.items()))
    for name, other in lengths.items():
        if other != length:
            raise ValueError(f"{name}: got {other} layers, but {first} has {length}")
    if length == 0:
        raise ValueError(f"{first}: expected at least one layer pair, got an empty sequence")
    return {name: list(x) for name, x in named.items()}, True


def as_pair_lists(student: object, teacher: object) -> tuple[list[torch.Tensor], list[torch.Tensor], bool]:
    """Both tensors, or both sequences of equal, non-zero length: (students, teachers, is_sequence)."""
    layers, is_sequence = as_layer_lists(student=student, teacher=teacher)
    return layers["student"], layers["teacher"], is_sequence


def check_one_device(students: list[torch.Tensor]) -> torch.device:
    """The device of every layer of ``student`` (a sequence of layer pairs lies on one device)."""
    device = students[0].device
    if any(s.device != device for s in students):
        raise ValueError(f"student: layers lie on several devices: {sorted({str(s.device) for s in students})}")
    return device


def check_mask(mask: object, shape: torch.Size, device: torch.device, what: str) -> torch.Tensor | None:
    """The mask as a contiguous float32 tensor of 0/1 (nonzero means valid), or None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask: expected a torch.Tensor or None, got {type(mask).__name__}")
    if mask.is_complex():
        raise TypeError(f"mask: expected a bool, integer or float tensor, got {mask.dtype}")
    if mask.shape != shape:
        raise ValueError(f"mask: expected shape {tuple(shape)} ({what}), got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask: on {mask.device}, but the inputs are on {device}")
    return (mask != 0).to(torch.float32).contiguous()


def check_divergence(divergence: object, beta: object) -> tuple[str, float]:
    """``(divergence, beta)``: beta in (0, 1) for ``"jsd"`` (None: 0.5), None for the others
    (returned as 0.0, which the kernels do not read)."""
    divergence = check_choice("divergence", divergence, DIVERGENCES)
    if divergence != "jsd":
        if beta is not None:
            raise ValueError(f"beta: only divergence='jsd' takes a beta, got beta={beta!r} with divergence={divergence!r}")
        return divergence, 0.0
    if beta is None:
        return divergence, JSD_DEFAULT_BETA
    if isinstance(beta, (bool, torch.Tensor)) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta: expected a Python float in (0, 1), got {type(beta).__name__}")
    if not 0 < beta < 1:
        raise ValueError(
            f"beta: expected a number in the open interval (0, 1), got {beta!r} "
            "(beta 0 and 1 are divergence='forward' and 'reverse')"
        )
    return divergence, float(beta)


def check_vocab(vocab: object, v_student: int, v_teacher: int, names: tuple[str, str]) -> int:
    """The vocabulary size the loss compares: ``V`` for ``"exact"`` (``V_s == V_t`` required), the
    first ``min(V_s, V_t)`` entries for ``"common"``."""
    vocab = check_choice("vocab", vocab, VOCABS)
    if vocab == "exact" and v_student != v_teacher:
        s_name, t_name = names
        raise ValueError(
            f"{t_name}: vocabulary size V_t={v_teacher} differs from {s_name}'s V_s={v_student}; pass "
            "vocab='common' to compare the first min(V_s, V_t) entries (vocabularies that differ only by "
            "padding rows)"
        )
    return min(v_student, v_teacher)


def check_labels(labels: object, shape: torch.Size, device: torch.device, vocab: int, what: str) -> torch.Tensor | None:
    """``labels`` as a contiguous int64 ``[rows]`` tensor of class ids in ``[0, vocab)`` or -100, or None."""
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels: expected an integer torch.Tensor or None, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels: expected an integer tensor (int64) of class ids, got {labels.dtype}")
    if labels.shape != shape:
        raise ValueError(f"labels: expected shape {tuple(shape)} ({what}), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels: on {labels.device}, but the inputs are on {device}")
    labels = labels.reshape(-1).to(torch.int64).contiguous()
    in_range = ((labels == IGNORE_INDEX) | ((labels >= 0) & (labels < vocab))).all()
    message = f"labels: expected class ids in [0, {vocab}) or {IGNORE_INDEX} (ignored)"
    check_values(in_range, message, lambda: f"values from {int(labels.min())} to {int(labels.max())}")
    return labels


def check_values(ok: torch.Tensor, message: str, got: Callable[[], str]) -> None:
    """A check of tensor values (``ok``: a 0-d bool tensor) without a host synchronisation where
    one would cost: on CPU a ValueError ``"{message}, got {got()}"``; on a GPU and under
    ``torch.compile`` ``torch._assert_async``, which fails the stream with ``message``."""
    if ok.device.type == "cpu" and not torch.compiler.is_compiling():
        if not ok:
            raise ValueError(f"{message}, got {got()}")
    else:
        torch._assert_async(ok, message)


def check_ce_weight(ce_weight: object, labels: torch.Tensor | None) -> float | torch.Tensor:
    """``ce_weight``: a finite float >= 0 (or a 0-d floating tensor), nonzero only with ``labels``."""
    if isinstance(ce_weight, torch.Tensor):
        if ce_weight.dim() != 0 or not ce_weight.is_floating_point():
            raise TypeError(f"ce_weight: expected a float or a 0-d floating tensor, got a {ce_weight.dtype} tensor of shape {tuple(ce_weight.shape)}")
    elif isinstance(ce_weight, bool) or not isinstance(ce_weight, (int, float)):
        raise TypeError(f"ce_weight: expected a float, got {type(ce_weight).__name__}")
    elif not (math.isfinite(ce_weight) and ce_weight >= 0):
        raise ValueError(f"ce_weight: expected a finite number >= 0, got {ce_weight!r}")
    if labels is None and (isinstance(ce_weight, torch.Tensor) or ce_weight != 0):
        raise ValueError("ce_weight: a hard-label cross-entropy weight needs labels=, got labels=None")
    return ce_weight if isinstance(ce_weight, torch.Tensor) else float(ce_weight)


def check_tail(tail: object, temperature: float) -> str:
    """``tail``: ``"renormalize"`` or ``"bucket"``; ``"bucket"`` needs ``temperature=1``."""
    tail = check_choice("tail", tail, TAILS)
    if tail == "bucket" and temperature != 1.0:
        raise ValueError(
            f"tail: 'bucket' compares the stored probabilities at T = 1 with their tail and needs "
            f"temperature=1.0, got temperature={temperature!r}; use tail='renormalize' for T != 1"
        )
    return tail


def check_sparse_teacher(
    ids: object, logprobs: object, shape: torch.Size, device: torch.device, vocab: int, what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``teacher_ids`` (int32/int64) and ``teacher_logprobs`` (floating), both ``shape + (k,)``,
    as contiguous ``[rows, k]`` tensors (int64 ids). Ids are ``-1`` (padding) or distinct within a
    row and in ``[0, vocab)``; the log-probabilities of stored ids are not NaN or +inf."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"teacher_ids: expected an int32 or int64 torch.Tensor, got {type(ids).__name__}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"teacher_ids: expected an int32 or int64 tensor of token ids, got {ids.dtype}")
    check_float_tensor("teacher_logprobs", logprobs)
    if ids.dim() != len(shape) + 1 or ids.shape[:-1] != shape or ids.shape[-1] == 0:
        raise ValueError(f"teacher_ids: expected shape {tuple(shape)} + (k,) with k >= 1 ({what}), got {tuple(ids.shape)}")
    if logprobs.shape != ids.shape:
        raise ValueError(f"teacher_logprobs: shape {tuple(logprobs.shape)} differs from teacher_ids' {tuple(ids.shape)}")
    for name, x in (("teacher_ids", ids), ("teacher_logprobs", logprobs)):
        if x.device != device:
            raise ValueError(f"{name}: on {x.device}, but the student is on {device}")
    k = ids.shape[-1]
    if k > vocab:
        raise ValueError(f"teacher_ids: k = {k} ids per row, more than the student's vocabulary of {vocab}")
    ids = ids.reshape(-1, k).to(torch.int64).contiguous()
    logprobs = logprobs.reshape(-1, k).contiguous()
    check_values(
        ((ids >= PADDING_ID) & (ids < vocab)).all(),
        f"teacher_ids: expected token ids in [0, {vocab}) or {PADDING_ID} (padding)",
        lambda: f"values from {int(ids.min())} to {int(ids.max())}",
    )
    ordered = ids.sort(-1).values
    check_values(
        ~((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] != PADDING_ID)).any(),
        "teacher_ids: expected distinct ids in each row (besides the padding id -1)",
        lambda: "a row with a repeated id",
    )
    stored = ids != PADDING_ID
    check_values(
        ~(stored & (logprobs.isnan() | (logprobs == torch.inf))).any(),
        "teacher_logprobs: expected log-probabilities (finite or -inf) at the stored ids",
        lambda: "NaN or +inf",
    )
    return ids, logprobs
