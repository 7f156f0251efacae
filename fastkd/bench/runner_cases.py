"""Runner steps per configuration: the plain way against fastkd (eager, and CUDA-graphed on CUDA).

One call of an implementation is one training step of each stage of the configuration, in order
(three steps for three-stage), on one batch: its time is their sum and its peak memory the
largest step's, above what models, projections and optimizer state hold between calls. Each
implementation owns its models (same seed, so the same weights) and its optimizer (AdamW at
learning rate 0, so that every call sees the same weights and returns the same losses: the work
of a step does not depend on the rate). It returns the losses of each stage's step, which the
harness compares with the plain way's.

- ``plain``: :class:`fastkd.runner.plain.PlainRunner`: whole models with
  ``output_hidden_states=True, output_attentions=True`` (eager attention), full logits, losses in
  eager PyTorch.
- ``fastkd``: :class:`fastkd.StageRunner` with ``cuda_graphs=False``.
- ``fastkd+graphs`` (CUDA): :class:`fastkd.StageRunner` with each stage's step captured in a CUDA
  graph after 3 eager warm-up steps. Its peak memory as the harness measures it leaves out the
  graphs' private memory pools, which are allocated at capture and held between steps: compare
  its time with the others, and its memory only with that in mind.

Models: Llama-style causal LMs (8 heads, MLP width 2.75x), teacher and student of the sizes below,
``layer_map="uniform"``, temperature 2. CPU runs set glibc's mmap threshold to 1 MiB
(:func:`fastkd.runner.measure.fix_mmap_threshold`) so that the resident set follows the tensors.
"""

from __future__ import annotations

import torch

from fastkd.bench.cases import Case
from fastkd.runner.schedule import PRESETS, STAGE_NAMES

# device -> size -> (teacher (layers, width), student (layers, width), vocabulary, (batch, length), dtype)
RUNNER_SIZES = {
    "cpu": {
        "tiny": ((2, 64), (1, 32), 500, (2, 16), torch.float32),
        "quick": ((4, 256), (2, 128), 8000, (4, 128), torch.float32),
        "default": ((8, 512), (4, 256), 32000, (4, 256), torch.float32),
    },
    "cuda": {
        "tiny": ((2, 64), (1, 32), 500, (2, 16), torch.float32),
        "quick": ((8, 512), (4, 256), 32000, (4, 256), torch.bfloat16),
        "default": ((16, 1024), (8, 512), 32000, (8, 1024), torch.bfloat16),
    },
}
HEADS = 8


def _model(layers: int, width: int, vocab: int, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=int(2.75 * width), num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=4096,
    )
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


class ConfigurationStep:
    """One step of each stage of ``preset``, by the plain way or fastkd (module docstring)."""

    def __init__(self, way: str, preset: str, size: tuple, device: str) -> None:
        self.way, self.preset, self.size, self.device = way, preset, size, device
        self.runners = None

    def _build(self) -> None:
        from fastkd.runner import Schedule, Stage, StageRunner
        from fastkd.runner.plain import PlainRunner

        (t_layers, t_width), (s_layers, s_width), vocab, _, dtype = self.size
        torch.manual_seed(0)
        teacher = _model(t_layers, t_width, vocab, self.device, dtype)
        student = _model(s_layers, s_width, vocab, self.device, dtype)
        optimizer = torch.optim.AdamW(student.parameters(), lr=0.0)
        graphs = self.way == "fastkd+graphs"
        runner_class = PlainRunner if self.way == "plain" else StageRunner
        extra = {} if self.way == "plain" else {"cuda_graphs": graphs}
        # One runner per stage, each a one-stage schedule that never ends, so that a CUDA graph
        # is captured once per stage and kept. measure=True: every step ends synchronised, and resets
        # the peak memory statistics when it starts.
        self.runners = [
            runner_class(
                student, teacher, Schedule([Stage(STAGE_NAMES[i], dict.fromkeys(losses, 1.0), 1 << 30)]),
                optimizer, temperature=2.0, quiet=True, measure=True, **extra,
            )
            for i, losses in enumerate(PRESETS[self.preset])
        ]

    def __call__(self, batch: dict) -> torch.Tensor:
        if self.runners is None:
            self._build()
        losses = []
        for runner in self.runners:
            metrics = runner.step(batch)
            losses.extend(v for k, v in metrics.items() if k.startswith("loss"))
        return torch.tensor(losses, dtype=torch.float64)


def _inputs(size: tuple, device: str):
    from fastkd.runner.measure import fix_mmap_threshold

    if device == "cpu":
        fix_mmap_threshold()
    _, _, vocab, (batch, length), _ = size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[-1, length - length // 4 :] = 0  # one padded row
    return {"batch": {"input_ids": ids.to(device), "attention_mask": mask.to(device)}}


def _flops(preset: str, size: tuple) -> int:
    """Matmul FLOPs of one step of each stage: teacher forward, student forward + backward (2x forward),
    the LM heads only in stages with 'logit'."""
    (t_layers, t_width), (s_layers, s_width), vocab, (batch, length), _ = size
    tokens = batch * length

    def forward(layers, width, head):
        per_layer = 2 * tokens * (4 * width * width + 3 * width * int(2.75 * width)) + 4 * tokens * length * width
        return layers * per_layer + (2 * tokens * width * vocab if head else 0)

    return sum(
        forward(t_layers, t_width, "logit" in losses) + 3 * forward(s_layers, s_width, "logit" in losses)
        for losses in PRESETS[preset]
    )


def runner_case(preset: str, device: str, size: str) -> Case:
    dims = RUNNER_SIZES[device][size]
    (t_layers, t_width), (s_layers, s_width), vocab, (batch, length), dtype = dims
    ways = ["plain", "fastkd"] + (["fastkd+graphs"] if device == "cuda" else [])
    return Case(
        op="runner",
        shape=f"{preset}: teacher {t_layers}x{t_width}, student {s_layers}x{s_width}, V={vocab}, {batch}x{length}",
        dtype=dtype,
        device=device,
        size=size,
        make_inputs=lambda: _inputs(dims, device),
        impls={way: ConfigurationStep(way, preset, dims, device) for way in ways},
        bytes=0,
        flops=_flops(preset, dims),
        configs={
            "plain": "whole models, output_hidden_states + output_attentions (eager), full logits, eager losses",
            "fastkd": "StageRunner, eager: stage-aware features, fused losses, fused_linear_kl",
            "fastkd+graphs": "StageRunner, each stage's step in a CUDA graph",
        },
        reference="plain",
        backward=False,
        tolerance=1e-3 if dtype == torch.float32 else 3e-2,
    )


CASES = [runner_case(p, d, s) for d in RUNNER_SIZES for s in RUNNER_SIZES[d] for p in PRESETS]
