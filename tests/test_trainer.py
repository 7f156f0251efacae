"""``fastkd.integrations.transformers.DistillationTrainer`` on tiny Llama models on CPU: the logged
loss parts and stages, the losses against the runner's and against fastkd's loss functions on the
models' own outputs, resuming from a checkpoint, DDP on 2 gloo processes, gradient accumulation,
saving a plain student, and the argument checks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from safetensors.torch import load_file  # noqa: E402
from transformers import LlamaForCausalLM, TrainingArguments, default_data_collator  # noqa: E402
from transformers.training_args import ParallelMode  # noqa: E402

import fastkd  # noqa: E402
from fastkd.integrations.transformers import PROJECTIONS_FILE, PROJECTIONS_NAME, DistillationTrainer  # noqa: E402
from fastkd.runner import Schedule, Stage, StageRunner  # noqa: E402
from ranks import run_ranks  # noqa: E402
from test_runner import V, llama  # noqa: E402

L = 8
TWO_STAGE = [2, 2]  # steps of the two-stage preset's stages: I (hidden + att), II (logit)


def _models(teacher_width=32):
    """A 4-layer teacher and a 2-layer, width-16 student (projections when the widths differ)."""
    torch.manual_seed(0)
    return llama(4, teacher_width), llama(2, 16)


def _data(n, padded=True, seed=0):
    """``n`` examples of ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding); with
    ``padded`` every odd example ends in 3 padding tokens."""
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        ids = torch.randint(1, V, (L,), generator=gen)
        mask = torch.ones(L, dtype=torch.long)
        if padded and i % 2:
            mask[L - 3 :] = 0
        examples.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return examples


def _args(output_dir, **options):
    settings = dict(
        output_dir=str(output_dir), use_cpu=True, per_device_train_batch_size=2, logging_steps=1, report_to="none",
        save_strategy="no", learning_rate=1e-2, seed=0, disable_tqdm=True,
    )
    settings.update(options)
    return TrainingArguments(**settings)


def _trainer(output_dir, data, steps=TWO_STAGE, models=None, **options):
    teacher, student = models or _models()
    return DistillationTrainer(
        model=student, teacher=teacher, schedule=Schedule.preset("two-stage", steps=steps),
        args=_args(output_dir, **options), train_dataset=data, data_collator=default_data_collator,
    )


def _training_logs(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def _parameters(trainer):
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


# ------------------------------------------------------------------------------------------
# One process.


def test_logs_each_stage_losses_and_the_runner_total(tmp_path):
    data = _data(2)  # one batch of both examples at every step
    trainer = _trainer(tmp_path, data)
    assert trainer.args.max_steps == sum(TWO_STAGE)
    assert len(trainer.runner.projections) == 3  # uniform map of 2 onto 4 blocks, widths 16 -> 32
    reference = StageRunner(*map(copy.deepcopy, _models()[::-1]), trainer.runner.schedule, None, cuda_graphs=False)
    reference.projections.load_state_dict(trainer.runner.projections.state_dict())
    expected, parts = reference.stage_losses(default_data_collator(data), 0)
    projections = [p.detach().clone() for p in trainer.runner.projections.parameters()]

    trainer.train()

    logs = _training_logs(trainer)
    assert [entry["step"] for entry in logs] == [1, 2, 3, 4]
    assert [entry["stage"] for entry in logs] == ["I", "I", "II", "II"]
    for entry in logs[:2]:
        assert "loss_logit" not in entry
        assert entry["loss"] == pytest.approx(entry["loss_hidden"] + entry["loss_att"], rel=1e-5)
    for entry in logs[2:]:
        assert "loss_hidden" not in entry and "loss_att" not in entry
        assert entry["loss"] == pytest.approx(entry["loss_logit"], rel=1e-5)
    assert logs[0]["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert logs[0]["loss_hidden"] == pytest.approx(parts["hidden"].item(), rel=1e-5)
    assert logs[0]["loss_att"] == pytest.approx(parts["att"].item(), rel=1e-5)
    assert logs[1]["loss_hidden"] < logs[0]["loss_hidden"]  # the hidden loss is trained
    # Trainer's optimizer trains the projections
    assert all(not torch.equal(p, q) for p, q in zip(projections, trainer.runner.projections.parameters()))


def test_losses_match_fastkd_losses_on_the_models_outputs(tmp_path):
    """Stage I (0.5 * hidden of student block 1 against teacher block 2, equal widths) and stage II
    (logit at temperature 2) against hidden_mse and logit_kl on the models' own outputs."""
    teacher, student = _models(teacher_width=16)
    schedule = Schedule([Stage("I", {"hidden": 0.5}, 1), Stage("II", {"logit": 1.0}, 1)])
    trainer = DistillationTrainer(
        model=student, teacher=teacher, schedule=schedule, layer_map=[(1, 2)], temperature=2.0,
        args=_args(tmp_path), train_dataset=_data(2),
    )
    assert len(trainer.runner.projections) == 0
    batch = default_data_collator(_data(2))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        s = student(**inputs, output_hidden_states=True)
        t = teacher(**inputs, output_hidden_states=True)
    mask = batch["attention_mask"]
    hidden = 0.5 * fastkd.hidden_mse([s.hidden_states[1]], [t.hidden_states[2]], mask=mask)
    logit = fastkd.logit_kl(s.logits, t.logits, temperature=2.0, mask=fastkd.logit_mask(batch["labels"], mask))
    with torch.no_grad():
        at_step_0 = trainer.compute_loss(trainer.model, batch)
        trainer.state.global_step = 1
        at_step_1 = trainer.compute_loss(trainer.model, batch)
    torch.testing.assert_close(at_step_0, hidden, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(at_step_1, logit, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("checkpoint", [1, 2])  # in the middle of stage I; at the stage boundary
def test_resume_from_a_checkpoint_continues_the_run(tmp_path, checkpoint):
    data = _data(8)
    full = _trainer(tmp_path / "full", data, save_strategy="steps", save_steps=1)
    full.train()
    resumed = _trainer(tmp_path / "resumed", data)
    with torch.no_grad():  # the projections must come from the checkpoint
        for p in resumed.runner.projections.parameters():
            p.add_(1.0)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / f"checkpoint-{checkpoint}"))

    after = [entry for entry in _training_logs(full) if entry["step"] > checkpoint]
    again = [entry for entry in _training_logs(resumed) if entry["step"] > checkpoint]
    assert [(e["step"], e["stage"]) for e in again] == [(e["step"], e["stage"]) for e in after]
    assert len(again) == sum(TWO_STAGE) - checkpoint
    for expected, got in zip(after, again):
        for name in ("loss", "loss_hidden", "loss_att", "loss_logit"):
            assert (name in got) == (name in expected)
            if name in got:
                assert got[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-7)
    final, other = _parameters(full), _parameters(resumed)
    assert final.keys() == other.keys() and any(name.startswith(PROJECTIONS_NAME) for name in final)
    for name in final:
        torch.testing.assert_close(other[name], final[name], rtol=1e-5, atol=1e-6, msg=name)


def test_saved_student_is_a_plain_model_and_projections_are_beside_it(tmp_path):
    trainer = _trainer(tmp_path, _data(4), steps=[1, 1])
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    loaded, info = LlamaForCausalLM.from_pretrained(str(tmp_path / "saved"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    student = {k: v for k, v in trainer.model.state_dict().items() if not k.startswith(PROJECTIONS_NAME)}
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, student[name], msg=name)
    projections = load_file(str(tmp_path / "saved" / PROJECTIONS_FILE))
    assert projections.keys() == trainer.runner.projections.state_dict().keys()
    for name, value in trainer.runner.projections.state_dict().items():
        torch.testing.assert_close(projections[name], value, msg=name)


def test_gradient_accumulation_matches_one_step_on_the_whole_batch(tmp_path):
    """2 micro-batches of 2 per optimizer step (plain SGD, no clipping) = one batch of 4: every example
    has as many tokens, so the mean of the micro-batches' means is the whole batch's mean."""
    data = _data(4, padded=False)
    options = dict(optim="sgd", max_grad_norm=0.0, lr_scheduler_type="constant", learning_rate=0.5)
    whole = _trainer(tmp_path / "whole", data, steps=[1, 1], per_device_train_batch_size=4, **options)
    whole.train()
    accumulated = _trainer(tmp_path / "accumulated", data, steps=[1, 1], gradient_accumulation_steps=2, **options)
    accumulated.train()
    for a, b in zip(_training_logs(whole), _training_logs(accumulated)):
        assert a["stage"] == b["stage"]
        for name in ("loss", "grad_norm", "loss_hidden", "loss_att", "loss_logit"):
            assert (name in a) == (name in b)
            if name in a:
                assert b[name] == pytest.approx(a[name], rel=1e-4), name
    final, other = _parameters(whole), _parameters(accumulated)
    assert any(not torch.equal(p, q) for p, q in zip(final.values(), _parameters(_trainer(tmp_path, data)).values()))
    for name in final:
        torch.testing.assert_close(other[name], final[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bad_arguments_raise_naming_them(tmp_path):
    teacher, student = _models()
    schedule = Schedule.preset("two-stage", steps=TWO_STAGE)
    args = _args(tmp_path)
    cases = [
        (dict(model=None, teacher=teacher, schedule=schedule), TypeError, "model"),
        (dict(model=student, teacher="teacher", schedule=schedule), TypeError, "teacher"),
        (dict(model=student, teacher=teacher, schedule=[2, 2]), TypeError, "schedule"),
        (dict(model=student, teacher=teacher, schedule=schedule, compute_loss_func=lambda *a: 0), ValueError,
         "compute_loss_func"),
        (dict(model=student, teacher=teacher, schedule=schedule, divergence="kl"), ValueError, "divergence"),
    ]
    for kwargs, error, words in cases:
        with pytest.raises(error, match=words):
            DistillationTrainer(args=args, **kwargs)
    with pytest.raises(ValueError, match=r"args\.max_steps: 5, but the schedule has 4 steps"):
        DistillationTrainer(model=student, teacher=teacher, schedule=schedule, args=_args(tmp_path, max_steps=5))
    with pytest.raises(ValueError, match=r"args\.bf16"):
        DistillationTrainer(model=student, teacher=teacher, schedule=schedule, args=_args(tmp_path, bf16=True))
    trainer = DistillationTrainer(model=student, teacher=teacher, schedule=schedule, args=args)
    trainer.state.global_step = 4
    with pytest.raises(RuntimeError, match="past the end of the schedule"):
        trainer.compute_loss(trainer.model, default_data_collator(_data(2)))
    with pytest.raises(NotImplementedError, match="return_outputs"):
        trainer.compute_loss(trainer.model, default_data_collator(_data(2)), return_outputs=True)


# ------------------------------------------------------------------------------------------
# DDP on 2 processes.


def _ddp_train(rank, world, output_dir):
    trainer = _trainer(output_dir, _data(8), ddp_backend="gloo")
    assert trainer.args.parallel_mode == ParallelMode.DISTRIBUTED and trainer.args.world_size == world
    before = _parameters(trainer)
    trainer.train()
    assert isinstance(trainer.model_wrapped, DistributedDataParallel)
    assert trainer.runner.wrapper is trainer.model_wrapped
    after = _parameters(trainer)
    assert any(name.startswith(PROJECTIONS_NAME) for name in after)
    for name, value in after.items():
        assert not torch.equal(value, before[name]) or "lm_head" in name or "embed" in name, f"{name} not trained"
        reference = value.clone()
        dist.broadcast(reference, 0)
        assert torch.equal(value, reference), f"{name} differs between the ranks"
    logs = _training_logs(trainer)
    assert [entry["stage"] for entry in logs] == ["I", "I", "II", "II"]
    # the logged parts are means over the ranks: equal on both
    values = torch.tensor([entry[name] for entry in logs for name in ("loss_hidden", "loss_att", "loss_logit")
                           if name in entry], dtype=torch.float64)
    assert len(values) == 6
    reference = values.clone()
    dist.broadcast(reference, 0)
    assert torch.equal(values, reference)


def test_ddp_two_processes_keep_parameters_equal(tmp_path):
    run_ranks(_ddp_train, str(tmp_path))
