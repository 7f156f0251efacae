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
``layer_map="uniform"``, temperature 2.

Offline teachers, op ``runner_offline``: a ``logit`` stage from stored top-64 log-probabilities
(``OfflineStep``: no teacher model in memory during the timed steps) against the same stage with
the live teacher, each returned as its loss over its own eager formula; the ``offline`` row's
``speed-up`` and ``peak vs ref`` are against the live one.

Long sequences (CPU; teacher 4 x 256, student 2 x 128, V=8000, batch 2, ``LONG_SIZES``), where the
attention maps are what costs, with the runner's ``attention="qk"`` (the attention KL from queries
and keys, ``fastkd.attention_kl_qk``, no ``[L, L]`` map):

- op ``runner_stage``: a stage with ``att`` alone against a stage with ``hidden`` alone, both
  ``StageRunner(attention="qk")``: implementations ``hidden`` (the reference) and ``att``, so that the
  ``att`` row's ``speed-up`` is ``hidden ms / att ms`` and its ``peak vs ref`` ``att MB / hidden MB``.
  Each returns its losses divided by the plain way's on the same batch and models (the plain step
  runs once, at the first call, then is dropped): 1 where they agree, which the check compares.
- op ``runner_long``: the three configurations, ``plain`` against ``fastkd`` (``attention="qk"``);
- op ``runner_4096``: the same at L=4096, opt-in (``fastkd bench --ops runner_4096``): several
  minutes on 2 cores and about 15 GB for the plain way's maps, too long for the default suite.
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
    """One step of each stage of ``stages`` (a preset's stages: ``PRESETS[name]``), by the plain way
    or fastkd (module docstring); ``attention`` (None: the runner's default) is passed to fastkd's
    ``StageRunner``."""

    def __init__(self, way: str, stages: tuple, size: tuple, device: str, attention: str | None = None) -> None:
        self.way, self.stages, self.size, self.device, self.attention = way, stages, size, device, attention
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
        if self.way != "plain" and self.attention is not None:
            extra["attention"] = self.attention
        # One runner per stage, each a one-stage schedule that never ends, so that a CUDA graph
        # is captured once per stage and kept. measure=True: every step ends synchronised, and resets
        # the peak memory statistics when it starts.
        self.runners = [
            runner_class(
                student, teacher, Schedule([Stage(STAGE_NAMES[i], dict.fromkeys(losses, 1.0), 1 << 30)]),
                optimizer, temperature=2.0, quiet=True, measure=True, **extra,
            )
            for i, losses in enumerate(self.stages)
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
    _, _, vocab, (batch, length), _ = size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[-1, length - length // 4 :] = 0  # one padded row
    return {"batch": {"input_ids": ids.to(device), "attention_mask": mask.to(device)}}


def _flops(stages: tuple, size: tuple) -> int:
    """Matmul FLOPs of one step of each stage: teacher forward, student forward + backward (2x forward),
    the LM heads only in stages with 'logit'."""
    (t_layers, t_width), (s_layers, s_width), vocab, (batch, length), _ = size
    tokens = batch * length

    def forward(layers, width, head):
        per_layer = 2 * tokens * (4 * width * width + 3 * width * int(2.75 * width)) + 4 * tokens * length * width
        return layers * per_layer + (2 * tokens * width * vocab if head else 0)

    return sum(
        forward(t_layers, t_width, "logit" in losses) + 3 * forward(s_layers, s_width, "logit" in losses)
        for losses in stages
    )


def _models_label(dims: tuple) -> str:
    (t_layers, t_width), (s_layers, s_width), vocab, (batch, length), _ = dims
    return f"teacher {t_layers}x{t_width}, student {s_layers}x{s_width}, V={vocab}, {batch}x{length}"


CONFIGS = {
    "plain": "whole models, output_hidden_states + output_attentions (eager), full logits, eager losses",
    "fastkd": "StageRunner, eager: stage-aware features, fused losses, fused_linear_kl",
    "fastkd+graphs": "StageRunner, each stage's step in a CUDA graph",
}
QK_CONFIG = "StageRunner(attention='qk'), eager: att from queries and keys (attention_kl_qk, no [L, L] map), " \
    "stage-aware features, fused losses, fused_linear_kl"


def runner_case(preset: str, device: str, size: str, *, op: str = "runner", dims: tuple | None = None,
                attention: str | None = None, opt_in: bool = False) -> Case:
    """The configuration ``preset``: the plain way against fastkd (and fastkd+graphs on CUDA), at
    ``RUNNER_SIZES[device][size]`` unless ``dims`` is given; ``attention`` is passed to fastkd's runner."""
    dims = RUNNER_SIZES[device][size] if dims is None else dims
    dtype = dims[-1]
    ways = ["plain", "fastkd"] + (["fastkd+graphs"] if device == "cuda" else [])
    configs = dict(CONFIGS)
    if attention == "qk":
        configs["fastkd"] = QK_CONFIG
    elif attention is not None:
        configs["fastkd"] = f"StageRunner(attention={attention!r}), eager"
    return Case(
        op=op,
        shape=f"{preset}: {_models_label(dims)}",
        dtype=dtype,
        device=device,
        size=size,
        make_inputs=lambda: _inputs(dims, device),
        impls={way: ConfigurationStep(way, PRESETS[preset], dims, device, attention) for way in ways},
        bytes=0,
        flops=_flops(PRESETS[preset], dims),
        configs=configs,
        reference="plain",
        backward=False,
        tolerance=1e-3 if dtype == torch.float32 else 3e-2,
        opt_in=opt_in,
    )


# --------------------------------------------------------------------------------------------
# A logit stage from an offline teacher against the same stage with the live teacher.

OFFLINE_K = 64


class OfflineStep:
    """One step of a ``{"logit": 1.0}`` stage of ``StageRunner`` from an offline teacher: the
    teacher's top ``OFFLINE_K`` log-probabilities of the batch (``fastkd.topk_logprobs``) are
    computed at the first call (the check's, not timed), then the teacher is dropped, so that the
    timed steps hold only the student. Returns the step's loss over DistillKit's eager formula
    (:func:`fastkd.eager.sparse_logit_kl`) on the student's full logits, computed at that first call
    too: 1 where they agree (at learning rate 0 the weights do not move)."""

    def __init__(self, size: tuple, device: str) -> None:
        self.size, self.device = size, device
        self.runner = self.stored = self.expected = None

    def _build(self, batch: dict) -> None:
        import fastkd
        from fastkd import eager
        from fastkd.runner import Schedule, Stage, StageRunner

        (t_layers, t_width), (s_layers, s_width), vocab, _, dtype = self.size
        torch.manual_seed(0)
        teacher = _model(t_layers, t_width, vocab, self.device, dtype)
        student = _model(s_layers, s_width, vocab, self.device, dtype)
        with torch.no_grad():
            ids, logprobs = fastkd.topk_logprobs(teacher(**batch).logits, OFFLINE_K)
            valid = batch["attention_mask"] != 0
            self.stored = {"teacher_ids": ids.masked_fill(~valid[..., None], -1).int(),
                           "teacher_logprobs": logprobs.masked_fill(~valid[..., None], -torch.inf).half()}
            logits = student(**batch).logits.flatten(0, 1)
            self.expected = float(eager.sparse_logit_kl(
                logits, self.stored["teacher_ids"].flatten(0, 1), self.stored["teacher_logprobs"].flatten(0, 1),
                valid.flatten(), 2.0,
            ))
        del teacher
        self.runner = StageRunner(
            student, None, Schedule([Stage("logit", {"logit": 1.0}, 1 << 30)]),
            torch.optim.AdamW(student.parameters(), lr=0.0), temperature=2.0, quiet=True, measure=True,
            cuda_graphs=False,
        )

    def __call__(self, batch: dict) -> torch.Tensor:
        if self.runner is None:
            self._build(batch)
        metrics = self.runner.step({**batch, **self.stored})
        losses = [float(metrics[name]) for name in ("loss", "loss_logit")]
        return torch.tensor(losses, dtype=torch.float64) / self.expected


def offline_case(device: str, size: str) -> Case:
    """A ``logit`` stage from an offline teacher (k = ``OFFLINE_K``) against the same stage with the
    live teacher, each as its loss over its eager formula's."""
    dims = RUNNER_SIZES[device][size]
    stages = (("logit",),)
    live = PlainRatio(ConfigurationStep("fastkd", stages, dims, device), ConfigurationStep("plain", stages, dims, device))
    return Case(
        op="runner_offline",
        shape=f"logit stage, live vs offline k={OFFLINE_K}: {_models_label(dims)}",
        dtype=dims[-1],
        device=device,
        size=size,
        make_inputs=lambda: _inputs(dims, device),
        impls={"live": live, "offline": OfflineStep(dims, device)},
        bytes=0,
        flops=_flops(stages, dims),
        configs={
            "live": "StageRunner(student, teacher), one stage {'logit': 1.0} (fused_linear_kl); returns its loss over "
                    "the plain way's (run once, at the first call): 1.0 where they agree",
            "offline": f"StageRunner(student, None), batches carrying the teacher's top-{OFFLINE_K} (int32 ids, fp16 "
                       "log-probabilities; fused_linear_sparse_kl), no teacher model; returns its loss over DistillKit's "
                       "eager formula on the student's logits: 1.0 where they agree",
        },
        reference="live",
        backward=False,
        tolerance=1e-3,
    )


# --------------------------------------------------------------------------------------------
# Long sequences (module docstring): size -> dims as in RUNNER_SIZES; LONGEST: the opt-in L=4096.

LONG_SIZES = {
    "cpu": {
        "tiny": ((2, 64), (1, 32), 500, (2, 32), torch.float32),
        "quick": ((4, 256), (2, 128), 8000, (2, 512), torch.float32),
        "default": ((4, 256), (2, 128), 8000, (2, 2048), torch.float32),
    },
}
LONGEST = ((4, 256), (2, 128), 8000, (2, 4096), torch.float32)


class PlainRatio:
    """``step``'s losses divided by ``plain``'s on the same batch, each a :class:`ConfigurationStep`
    with its own models of the same seed. ``plain`` runs once, at the first call (the check's, which
    is not timed), and is then dropped with its models; ``step`` runs at every call."""

    def __init__(self, step: ConfigurationStep, plain: ConfigurationStep) -> None:
        self.step, self.plain, self.expected = step, plain, None

    def __call__(self, batch: dict) -> torch.Tensor:
        if self.expected is None:
            self.expected = self.plain(batch)
            self.plain = None
        return self.step(batch) / self.expected


def stage_case(device: str, size: str) -> Case:
    """A stage with ``att`` alone against one with ``hidden`` alone, ``StageRunner(attention="qk")``."""
    dims = LONG_SIZES[device][size]

    def ratio(loss: str) -> PlainRatio:
        stages = ((loss,),)
        return PlainRatio(ConfigurationStep("fastkd", stages, dims, device, "qk"),
                          ConfigurationStep("plain", stages, dims, device))

    what = "StageRunner(attention='qk'), one stage {{'{}': 1.0}}; returns its loss over the plain way's " \
        "(whole models, eager attention, eager loss; run once, at the first call): 1.0 where they agree"
    return Case(
        op="runner_stage",
        shape=f"att alone vs hidden alone: {_models_label(dims)}",
        dtype=dims[-1],
        device=device,
        size=size,
        make_inputs=lambda: _inputs(dims, device),
        impls={"hidden": ratio("hidden"), "att": ratio("att")},
        bytes=0,
        flops=_flops((("hidden",),), dims),  # the models' work, the same in both stages
        configs={"hidden": what.format("hidden"), "att": what.format("att")},
        reference="hidden",
        backward=False,
        tolerance=1e-3,
    )


def long_cases() -> list[Case]:
    cases = []
    for device, sizes in LONG_SIZES.items():
        for size, dims in sizes.items():
            cases.append(stage_case(device, size))
            if size != "quick":  # the quick suite has the stage comparison only
                cases += [runner_case(p, device, size, op="runner_long", dims=dims, attention="qk") for p in PRESETS]
    cases += [
        runner_case(p, "cpu", "default", op="runner_4096", dims=LONGEST, attention="qk", opt_in=True) for p in PRESETS
    ]
    return cases


CASES = [runner_case(p, d, s) for d in RUNNER_SIZES for s in RUNNER_SIZES[d] for p in PRESETS] + long_cases()
CASES += [offline_case(d, s) for d in RUNNER_SIZES for s in RUNNER_SIZES[d]]
