"""One stage's training step (forward, backward, optimizer step) captured in a CUDA graph.

Static shapes: the first batch of the stage fixes ``[B, L]`` (``L`` is ``pad_to`` when given);
later batches are padded on the right to ``L`` (``input_ids`` and ``token_type_ids`` with 0,
``attention_mask`` with 0, ``labels`` with -100, an offline teacher's ``teacher_ids`` ``[B, L, k]``
with -1 and ``teacher_logprobs`` with -inf), which changes no loss since every loss is masked by the
padding mask. A batch with another ``B`` or a longer ``L`` runs that step eagerly.

Life of a stage: the first ``warmup`` steps run eagerly on a side stream (lazy state such as the
optimizer's moments is allocated there, outside the graph), the next step captures the graph and
every step from then on copies its batch into the static buffers and replays it. The optimizer must
be capturable (``capturable=True``, set by :func:`make_capturable` with the learning rate moved into
a tensor, so that an LR scheduler's ``fill_`` reaches the captured step); the loss weights likewise
live in a tensor that the runner fills before every step. When capture fails, the reason is logged
and the stage runs eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch

log = logging.getLogger("fastkd.runner")

PAD_VALUES = {"input_ids": 0, "attention_mask": 0, "token_type_ids": 0, "labels": -100, "teacher_ids": -1,
              "teacher_logprobs": float("-inf")}


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> str | None:
    """Switch ``optimizer`` to capturable mode with tensor learning rates; the reason if it cannot be."""
    for group in optimizer.param_groups:
        if "capturable" not in group:
            return f"{type(optimizer).__name__} has no capturable mode (use e.g. torch.optim.AdamW)"
    for group in optimizer.param_groups:
        group["capturable"] = True
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
    return None


def pad_batch(batch: Mapping[str, torch.Tensor], shape: tuple[int, int]) -> dict[str, torch.Tensor] | None:
    """``batch`` (tensors ``[B, L, ...]``) padded on the right of ``L`` to ``shape`` ([B, L]); None
    if it does not fit."""
    rows, length = shape
    padded = {}
    for name, value in batch.items():
        if value.dim() < 2 or value.shape[0] != rows or value.shape[1] > length:
            return None
        if value.shape[1] < length:
            if name not in PAD_VALUES:
                return None
            widths = (0, 0) * (value.dim() - 2) + (0, length - value.shape[1])
            value = torch.nn.functional.pad(value, widths, value=PAD_VALUES[name])
        padded[name] = value
    return padded


class StageGraph:
    """Warm-up, capture and replay of one stage's step ``train_step(batch) -> values`` (see module docstring).

    ``loss_fn(batch)`` returns a 1-D tensor whose element 0 is the loss to minimise; ``eager_step``
    is the same step run eagerly (zero_grad, loss_fn, backward, optimizer step).
    """

    def __init__(
        self,
        loss_fn: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
        eager_step: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
        optimizer: torch.optim.Optimizer,
        *,
        warmup: int,
        pad_to: int | None,
    ) -> None:
        self.loss_fn = loss_fn
        self.eager_step = eager_step
        self.optimizer = optimizer
        self.warmup = warmup
        self.pad_to = pad_to
        self.shape: tuple[int, int] | None = None
        self.warm_steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: dict[str, torch.Tensor] = {}
        self.values: torch.Tensor | None = None
        self.failed: str | None = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def step(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.failed is not None:
            return self.eager_step(batch)
        if self.shape is None:
            rows, length = batch["input_ids"].shape
            self.shape = (rows, max(length, self.pad_to or 0))
        padded = pad_batch(batch, self.shape)
        if padded is None:
            log.info("batch of shape %s does not fit the graph's %s: this step runs eagerly",
                     tuple(batch["input_ids"].shape), self.shape)
            return self.eager_step(batch)
        if self.warm_steps < self.warmup:
            self.warm_steps += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                values = self.eager_step(padded)
            torch.cuda.current_stream().wait_stream(side)
            values.record_stream(torch.cuda.current_stream())  # read there later, after no synchronisation
            return values
        if self.graph is None and not self._capture(padded):
            return self.eager_step(padded)
        for name, value in padded.items():
            self.static[name].copy_(value)
        self.graph.replay()
        return self.values.clone()

    def _capture(self, batch: Mapping[str, torch.Tensor]) -> bool:
        self.static = {name: value.clone() for name, value in batch.items()}
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                values = self.loss_fn(self.static)
                values[0].backward()
                self.optimizer.step()
        except Exception as exc:  # any failure to capture means: run this stage eagerly
            self.failed = f"{type(exc).__name__}: {exc}"
            log.warning("CUDA graph capture failed, the stage runs eagerly: %s", self.failed)
            torch.cuda.synchronize()
            self.optimizer.zero_grad(set_to_none=True)
            self.static = {}
            return False
        self.graph, self.values = graph, values.detach()
        return True
