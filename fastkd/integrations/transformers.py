"""``DistillationTrainer``: a ``transformers.Trainer`` whose loss is a fastkd schedule's stage losses.

The trainer builds a :class:`~fastkd.runner.StageRunner` in losses-only mode (``optimizer=None``,
no CUDA graphs) and its :meth:`compute_loss` returns ``runner.stage_losses(batch, global_step)``'s
total: the stage of ``self.state.global_step`` (every micro-batch of one optimizer step, with
gradient accumulation, has the same step), computed by the runner's own code. ``Trainer`` does the
rest: the backward pass, the optimizer and scheduler, gradient accumulation (it divides the
loss by the accumulation steps), DDP, checkpoints, logging.

- ``args.max_steps``: set to ``schedule.total_steps`` when not set (``-1``); any other value is
  an error, as is a step past the schedule's end.
- The runner's projections (``nn.Linear`` per hidden pair when the widths differ) are registered
  on the student as the submodule ``fastkd_projections`` before ``Trainer`` wraps it, so that
  ``Trainer``'s optimizer trains them and DDP averages their gradients. ``save_model`` (and every
  checkpoint) writes the student without them, loadable by ``from_pretrained`` as a plain
  transformers model, and the projections beside it in ``fastkd_projections.safetensors``, which
  ``train(resume_from_checkpoint=...)`` and ``load_best_model_at_end`` read back.
- Each training log adds ``loss_<name>`` for each loss that ran in the logging interval (the mean
  over its micro-batches there, and over the ranks under DDP) and ``stage``, the name of the stage
  of the interval's last step.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers import Trainer

from fastkd.runner import Schedule, StageRunner
from fastkd.runner.parallel import world_size

PROJECTIONS_NAME = "fastkd_projections"  # the student's submodule holding the runner's projections
PROJECTIONS_FILE = "fastkd_projections.safetensors"  # the projections' file in a saved directory


class DistillationTrainer(Trainer):
    """A ``Trainer`` that distils ``model`` (the student) from ``teacher`` through ``schedule``.

    Args:
        model: the student, a transformers model (causal LM or BERT) on the device ``Trainer`` uses.
        teacher: the teacher, a transformers model; moved to the student's device (unless loaded with
            a ``device_map``). It runs in eval mode without gradients and is not saved.
        schedule: the :class:`fastkd.Schedule` whose stage of the global step gives the losses.
        layer_map, temperature, divergence, beta, vocab, attention: as
            :class:`~fastkd.runner.StageRunner` takes them.
        args: ``TrainingArguments``; ``max_steps`` unset (``-1``) becomes ``schedule.total_steps``,
            another value than that is refused, and so are ``bf16`` and ``fp16`` (accelerate's autocast
            applies to the model's forward, which the stage losses do not call).
        **kwargs: ``Trainer``'s other arguments (``train_dataset``, ``data_collator``, ...), except
            ``compute_loss_func`` (the schedule gives the loss).

    ``trainer.runner`` is the runner; ``evaluate`` and ``predict`` are not supported (they ask
    :meth:`compute_loss` for the model's outputs, which the stage losses do not give).
    """

    # The stage losses are means over the micro-batch: Trainer divides them by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: nn.Module | None = None,
        teacher: nn.Module | None = None,
        schedule: Schedule | None = None,
        *,
        layer_map: object = "uniform",
        temperature: float = 1.0,
        divergence: str = "forward",
        beta: float | None = None,
        vocab: str = "exact",
        attention: str | None = None,
        args=None,
        **kwargs,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected the student, a transformers model, got {type(model).__name__}")
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher: expected a transformers model, got {type(teacher).__name__}")
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule: expected a fastkd.Schedule, got {type(schedule).__name__}")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("compute_loss_func: the schedule's stage losses are the loss, so it takes none")
        if args is not None and args.max_steps > 0 and args.max_steps != schedule.total_steps:
            raise ValueError(
                f"args.max_steps: {args.max_steps}, but the schedule has {schedule.total_steps} steps; leave "
                "max_steps unset (-1) and it is set to the schedule's total steps"
            )
        for flag in ("bf16", "fp16"):
            if args is not None and getattr(args, flag):
                raise ValueError(
                    f"args.{flag}: accelerate's autocast wraps the model's forward, which the stage losses do not "
                    "run through; load the student and the teacher in the dtype wanted instead"
                )
        super().__init__(model=model, args=args, **kwargs)
        if self.args.max_steps <= 0:
            self.args.max_steps = schedule.total_steps
        # Trainer has put the student on its device; the runner's projections and weights go there too.
        device = next(self.model.parameters()).device
        if getattr(teacher, "hf_device_map", None) is None and next(teacher.parameters()).device != device:
            teacher.to(device)
        self.runner = StageRunner(
            self.model, teacher, schedule, None, layer_map=layer_map, temperature=temperature,
            divergence=divergence, beta=beta, vocab=vocab, attention=attention, cuda_graphs=False, quiet=True,
        )
        if self.runner.projections:
            self.model.add_module(PROJECTIONS_NAME, self.runner.projections)
        # No loss keywords for the model: Trainer need not count each batch's labelled tokens.
        self.model_accepts_loss_kwargs = False
        # loss name -> (sum of its values, count) since the last log
        self._parts: dict[str, tuple[torch.Tensor, int]] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The weighted total of the stage losses of ``self.state.global_step`` on ``inputs``."""
        if return_outputs:
            raise NotImplementedError(
                "compute_loss: return_outputs=True (evaluate, predict) is not supported: the stage losses "
                "give no model outputs"
            )
        step = self.state.global_step
        total_steps = self.runner.schedule.total_steps
        if step >= total_steps:
            raise RuntimeError(f"global step {step}: past the end of the schedule ({total_steps} steps)")
        if isinstance(model, DistributedDataParallel):
            self.runner.wrapper = model
        elif model is self.model:
            self.runner.wrapper = None
        else:
            raise NotImplementedError(
                f"model: Trainer wrapped the student in {type(model).__name__}; DistillationTrainer runs on "
                "one process or under DDP (FSDP and DeepSpeed are not supported)"
            )
        total, values = self.runner.stage_losses(inputs, step)
        for name, value in values.items():
            summed, count = self._parts.get(name, (0.0, 0))
            self._parts[name] = (summed + value, count + 1)
        return total

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """``Trainer.log``, with each training log's loss parts and stage added (module docstring)."""
        if "loss" in logs and self._parts:
            names = list(self._parts)
            sums = torch.stack([self._parts[name][0] for name in names])
            counts = torch.tensor([self._parts[name][1] for name in names], dtype=sums.dtype, device=sums.device)
            totals = torch.cat([sums, counts])
            if world_size() > 1:
                dist.all_reduce(totals)
            means = (totals[: len(names)] / totals[len(names) :]).tolist()
            logs.update({f"loss_{name}": mean for name, mean in zip(names, means)})
            last = min(self.state.global_step, self.runner.schedule.total_steps) - 1
            logs["stage"] = self.runner.schedule[self.runner.schedule.locate(last)[0]].name
            self._parts = {}
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The student without its projections (a plain transformers model), and the projections in
        ``fastkd_projections.safetensors`` beside it."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if state_dict is None:
            state_dict = self.model.state_dict()
        prefix = PROJECTIONS_NAME + "."
        projections = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        student = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
        super()._save(output_dir, state_dict=student)
        if projections and self.args.should_save:
            save_file({k: v.contiguous() for k, v in projections.items()}, os.path.join(output_dir, PROJECTIONS_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_projections(resume_from_checkpoint)

    def _issue_warnings_after_load(self, load_result) -> None:
        # The projections are not in the student's weights: they are restored from their own file.
        missing = [key for key in load_result.missing_keys if not key.startswith(PROJECTIONS_NAME + ".")]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))

    def _load_best_model(self) -> None:
        super()._load_best_model()
        self._load_projections(self.state.best_model_checkpoint)

    def _load_projections(self, directory: str) -> None:
        """Restore the projections from ``directory``'s ``fastkd_projections.safetensors``."""
        if not self.runner.projections:
            return
        path = os.path.join(directory, PROJECTIONS_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"resume_from_checkpoint: {directory} has no {PROJECTIONS_FILE}, the runner's hidden-state "
                "projections (written with every checkpoint of a DistillationTrainer)"
            )
        device = next(self.runner.projections.parameters()).device
        self.runner.projections.load_state_dict(load_file(path, device=str(device)))
