"""The stage runner on tiny transformers models (and a plain module) on CPU, plus a CUDA-graph test.

Loss values are checked against the float64 formulas of ``reference.reference_loss``, from the models'
own eager outputs.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertForMaskedLM,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from fastkd.runner import Features, ModelAdapter, Schedule, Stage, StageRunner  # noqa: E402
from fastkd.runner.layer_map import resolve_layer_map  # noqa: E402
from reference import reference_loss  # noqa: E402

V = 97  # vocabulary: a size no other dimension has
B, L = 2, 7


def llama(layers, width, heads=4, dropout=0.0):
    config = LlamaConfig(
        vocab_size=V, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads // 2, attention_dropout=dropout,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def gpt2(layers, width, heads=4):
    config = GPT2Config(
        vocab_size=V, n_embd=width, n_layer=layers, n_head=heads, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def bert(layers, width, heads=4, cls=BertForMaskedLM):
    config = BertConfig(
        vocab_size=V, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=2 * width, max_position_embeddings=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return cls(config)


def teacher_and_student(family):
    """A 4-layer, width-32 teacher and a 2-layer, width-16 student of ``family``, built in that order."""
    build = {"llama": llama, "gpt2": gpt2, "bert": bert}[family]
    return build(4, 32), build(2, 16)


def make_batch(seed=0, labels=False):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, L), generator=gen)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, L - 3 :] = 0  # right padding
    batch = {"input_ids": ids, "attention_mask": mask}
    if labels:
        lab = ids.clone()
        lab[0, :2] = -100
        batch["labels"] = lab
    return batch


def expected_logit_rows(batch, causal):
    """The rows a logit loss counts, position by position: a causal LM's row ``i`` predicts token
    ``i + 1``, a masked LM's token ``i``; the row counts when it is not padding and its target has
    a label."""
    labels, mask = batch["labels"], batch["attention_mask"]
    rows = torch.zeros(labels.shape, dtype=torch.bool)
    for b in range(labels.shape[0]):
        for i in range(labels.shape[1]):
            target = i + 1 if causal else i
            rows[b, i] = bool(mask[b, i] != 0) and target < labels.shape[1] and bool(labels[b, target] != -100)
    return rows


def make_runner(student, teacher, schedule, **kwargs):
    module = student.module if isinstance(student, ModelAdapter) else student
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    return StageRunner(student, teacher, schedule, optimizer, quiet=True, **kwargs)


def eager_outputs(model, batch):
    """The model's own eager outputs (hidden states, pre-softmax-dropout maps with dropout off, logits)."""
    model.set_attn_implementation("eager")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True, output_attentions=True)


# ------------------------------------------------------------------------------------------
# Schedules and layer maps.


def test_presets_match_the_table():
    one = Schedule.preset("one-stage", steps=[5])
    assert [(s.name, tuple(s.losses), s.steps) for s in one] == [("I", ("hidden", "att", "logit"), 5)]
    two = Schedule.preset("two-stage", steps=[3, 4])
    assert [(s.name, tuple(s.losses), s.steps) for s in two] == [("I", ("hidden", "att"), 3), ("II", ("logit",), 4)]
    three = Schedule.preset("three-stage", steps=[1, 2, 3], weights={"att": 0.5})
    assert [(s.name, dict(s.losses), s.steps) for s in three] == [
        ("I", {"hidden": 1.0, "att": 0.5}, 1),
        ("II", {"hidden": 1.0, "att": 0.5, "logit": 1.0}, 2),
        ("III", {"logit": 1.0}, 3),
    ]
    assert three.total_steps == 6
    assert [three.locate(k) for k in range(6)] == [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2)]


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda: Schedule.preset("three-stage", steps=[1, 2]), ValueError, "3 stage"),
        (lambda: Schedule.preset("four-stage", steps=[1]), ValueError, "four-stage"),
        (lambda: Schedule.preset("one-stage", steps=[0]), ValueError, "steps"),
        (lambda: Schedule.preset("one-stage", steps=3), TypeError, "steps"),
        (lambda: Stage("I", {"hiden": 1.0}, 3), ValueError, "hiden"),
        (lambda: Stage("I", {}, 3), ValueError, "losses"),
        (lambda: Stage("I", {"logit": -1.0}, 3), ValueError, "logit"),
        (lambda: Stage("I", {"logit": 1.0}, -2), ValueError, "steps"),
        (lambda: Stage("I", {"logit": 1.0}, 2.5), TypeError, "steps"),
        (lambda: Schedule([]), ValueError, "stages"),
        (lambda: Schedule(["I"]), TypeError, "stages[0]"),
    ],
)
def test_schedule_errors(call, error, words):
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        call()


def test_layer_maps():
    uniform = resolve_layer_map("uniform", 2, 4)
    assert uniform.hidden == ((0, 0), (1, 2), (2, 4))
    assert uniform.attention == ((0, 1), (1, 3))
    odd = resolve_layer_map("uniform", 3, 4)
    assert odd.hidden == ((0, 0), (1, 1), (2, 2), (3, 4))
    last = resolve_layer_map("last", 2, 4)
    assert (last.hidden, last.attention) == (((2, 4),), ((1, 3),))
    explicit = resolve_layer_map([(0, 0), (2, 3)], 2, 4)
    assert (explicit.hidden, explicit.attention) == (((0, 0), (2, 3)), ((1, 2),))
    with pytest.raises(ValueError, match="teacher hidden state 5"):
        resolve_layer_map([(1, 5)], 2, 4)
    with pytest.raises(ValueError, match="layer_map"):
        resolve_layer_map("middle", 2, 4)


# ------------------------------------------------------------------------------------------
# Losses against float64 formulas, on Llama, GPT-2 and BERT.


@pytest.mark.parametrize(
    "family", ["llama", "gpt2", "bert"],
)
def test_one_stage_losses_match_float64_formulas(family):
    torch.manual_seed(0)
    teacher, student = teacher_and_student(family)
    batch = make_batch(labels=True)
    temperature = 2.0
    runner = make_runner(student, teacher, Schedule.preset("one-stage", steps=[2]), temperature=temperature)
    proj = [p.weight.detach().clone() for p in runner.projections], [p.bias.detach().clone() for p in runner.projections]
    t_out, s_out = eager_outputs(teacher, batch), eager_outputs(student, batch)
    mask = batch["attention_mask"]
    hidden = reference_loss(
        "hidden_mse",
        [s_out.hidden_states[i].double() @ w.double().T + b.double() for (i, _), w, b in zip(((0, 0), (1, 2), (2, 4)), *proj)],
        [t_out.hidden_states[j] for j in (0, 2, 4)],
        mask=mask,
    )
    att = reference_loss(
        "attention_kl", [s_out.attentions[i] for i in (0, 1)], [t_out.attentions[j] for j in (1, 3)], mask=mask
    )
    logit_rows = expected_logit_rows(batch, causal=family != "bert")
    logit = reference_loss("logit_kl", s_out.logits, t_out.logits, mask=logit_rows, temperature=temperature)

    metrics = runner.step(batch)
    assert metrics["loss_hidden"] == pytest.approx(hidden.item(), rel=1e-5)
    assert metrics["loss_att"] == pytest.approx(att.item(), rel=1e-4, abs=1e-7)
    assert metrics["loss_logit"] == pytest.approx(logit.item(), rel=1e-4)
    assert metrics["loss"] == pytest.approx((hidden + att + logit).item(), rel=1e-5)


def test_bert_head_transform_is_applied():
    """A BERT MLM student learns logits through cls.predictions.transform: its logit loss equals the formula."""
    torch.manual_seed(1)
    teacher, student = bert(2, 32), bert(1, 32)
    batch = make_batch()
    runner = make_runner(student, teacher, Schedule([Stage("logit", {"logit": 1.0}, 1)]), temperature=1.5)
    expected = reference_loss("logit_kl", eager_outputs(student, batch).logits, eager_outputs(teacher, batch).logits,
                              mask=batch["attention_mask"], temperature=1.5)
    assert runner.step(batch)["loss_logit"] == pytest.approx(expected.item(), rel=1e-4)


# ------------------------------------------------------------------------------------------
# Stages: transitions, metric keys, what each model is asked for.


def test_stage_transitions_and_metric_keys():
    torch.manual_seed(0)
    runner = make_runner(llama(2, 16), llama(4, 32), Schedule.preset("three-stage", steps=[2, 1, 2]))
    records = list(runner.run([make_batch(k) for k in range(9)]))
    assert [(r["stage"], r["step"]) for r in records] == [("I", 0), ("I", 1), ("II", 2), ("III", 3), ("III", 4)]
    keys = {"I": {"loss_hidden", "loss_att"}, "II": {"loss_hidden", "loss_att", "loss_logit"}, "III": {"loss_logit"}}
    for r in records:
        assert set(r) == {"stage", "step", "loss"} | keys[r["stage"]]
    assert runner.finished
    with pytest.raises(RuntimeError, match="ended"):
        runner.step(make_batch())
    measured = make_runner(llama(2, 16), llama(4, 32), Schedule.preset("two-stage", steps=[1, 1]), measure=True)
    for r in measured.run([make_batch(k) for k in range(2)]):
        assert {k for k in r if not k.startswith("loss")} == {"stage", "step", "time_ms", "peak_mem_mb"}
        assert r["time_ms"] > 0


@pytest.mark.parametrize("preset", ["one-stage", "two-stage", "three-stage"])
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_every_preset_runs_end_to_end(family, preset):
    """Each preset on each model family: every stage in order, its own losses only, all finite."""
    torch.manual_seed(0)
    teacher, student = teacher_and_student(family)
    stages = len(PRESET_LOSSES[preset])
    schedule = Schedule.preset(preset, steps=[2] * stages)
    records = list(make_runner(student, teacher, schedule).run([make_batch(k) for k in range(20)]))
    assert [r["stage"] for r in records] == [name for name in ("I", "II", "III")[:stages] for _ in (0, 1)]
    for r in records:
        losses = PRESET_LOSSES[preset][("I", "II", "III").index(r["stage"])]
        assert {k for k in r if k.startswith("loss_")} == {f"loss_{name}" for name in losses}
        assert all(math.isfinite(r[k]) for k in r if k.startswith("loss"))


PRESET_LOSSES = {  # the configurations' table (README, docs/design.md)
    "one-stage": [("hidden", "att", "logit")],
    "two-stage": [("hidden", "att"), ("logit",)],
    "three-stage": [("hidden", "att"), ("hidden", "att", "logit"), ("logit",)],
}


class RecordShapes(TorchDispatchMode):
    """Records the shape of every tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def count_calls(modules):
    counts = {"calls": 0, "maps": 0}

    def hook(module, args, output):
        counts["calls"] += 1
        if isinstance(output, tuple) and len(output) > 1 and output[1] is not None:
            counts["maps"] += 1

    handles = [m.register_forward_hook(hook) for m in modules]
    return counts, handles


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_stage_aware_requests(family):
    """No LM head runs without 'logit'; a logit-only stage builds no attention maps and no hidden-state lists."""
    torch.manual_seed(0)
    teacher, student = teacher_and_student(family)
    # attention="maps": the mapped blocks return their maps (under the default "qk" none does,
    # tests/test_runner_attention.py).
    runner = make_runner(student, teacher, Schedule.preset("two-stage", steps=[1, 1]), attention="maps")
    heads = [m.get_output_embeddings() for m in (student, teacher)]
    if family == "bert":
        heads += [m.cls.predictions.transform for m in (student, teacher)]
    attention_modules = [m for model in (student, teacher) for name, m in model.named_modules()
                         if name.endswith(("self_attn", "attention.self"))]
    assert len(attention_modules) == 6
    head_counts, h1 = count_calls(heads)
    att_counts, h2 = count_calls(attention_modules)

    with RecordShapes() as rec:
        runner.step(make_batch())  # stage I: hidden + att
    assert head_counts["calls"] == 0
    assert not [s for s in rec.shapes if s and s[-1] == V], "a [.., V] tensor was built without 'logit'"
    assert att_counts["maps"] == 4  # the mapped blocks only: 2 student + 2 of the teacher's 4

    att_counts.update(calls=0, maps=0)
    with RecordShapes() as rec:
        runner.step(make_batch(1))  # stage II: logit only
    assert att_counts["calls"] == 6 and att_counts["maps"] == 0
    assert not [s for s in rec.shapes if len(s) == 4 and s[1:] == (4, L, L)], "attention maps built in a logit-only stage"
    assert not [s for s in rec.shapes if s[:2] == (B * L, V) or s[:3] == (B, L, V)], "full logits materialised"
    for h in h1 + h2:
        h.remove()


def test_attention_maps_are_before_dropout():
    """With attention dropout 0.1 in train mode, loss_att equals the loss with dropout 0 (same weights)."""
    torch.manual_seed(0)
    teacher = llama(2, 32)
    losses = {}
    for p in (0.0, 0.1):
        torch.manual_seed(1)
        student = llama(1, 32, dropout=p)  # one block: its map does not depend on earlier dropout
        runner = make_runner(student, teacher, Schedule([Stage("att", {"att": 1.0}, 1)]))
        losses[p] = runner.step(make_batch())["loss_att"]
    assert losses[0.1] == losses[0.0]
    # The same student's maps after dropout (what transformers returns in train mode) give another loss.
    torch.manual_seed(1)
    student = llama(1, 32, dropout=0.1)
    student.set_attn_implementation("eager")
    student.train()
    batch = make_batch()
    post = student(**batch, output_attentions=True).attentions[0]
    t_map = eager_outputs(teacher, batch).attentions[1]
    assert abs(reference_loss("attention_kl", [post], [t_map], mask=batch["attention_mask"]).item() - losses[0.0]) > 1e-3


# ------------------------------------------------------------------------------------------
# Projections, checkpoints, loading.


def test_projections_created_trained_and_saved(tmp_path):
    torch.manual_seed(0)
    student, teacher = llama(2, 16), llama(4, 32)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    runner = StageRunner(student, teacher, Schedule.preset("one-stage", steps=[3]), optimizer, quiet=True)
    assert len(runner.projections) == 3
    assert all(p.in_features == 16 and p.out_features == 32 for p in runner.projections)
    assert len(optimizer.param_groups) == 2
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == {id(p) for p in runner.projections.parameters()}
    before = [p.weight.detach().clone() for p in runner.projections]
    list(runner.run([make_batch(k) for k in range(2)]))
    assert all(not torch.equal(b, p.weight) for b, p in zip(before, runner.projections))
    runner.save(tmp_path / "ck.pt")
    saved = torch.load(tmp_path / "ck.pt", weights_only=False)
    for k, p in enumerate(runner.projections):
        assert torch.equal(saved["projections"][f"{k}.weight"], p.weight)
    same_width = make_runner(llama(2, 32), teacher, Schedule.preset("one-stage", steps=[1]))
    assert len(same_width.projections) == 0


def test_resume_is_bit_for_bit(tmp_path):
    """Stop in the middle of stage II of three-stage, resume in fresh objects: same losses, same weights."""

    def build():
        torch.manual_seed(0)
        student = llama(2, 16, dropout=0.1)
        torch.manual_seed(1)
        teacher = llama(4, 32)
        return make_runner(student, teacher, Schedule.preset("three-stage", steps=[2, 3, 2]))

    data = [make_batch(k) for k in range(7)]
    torch.manual_seed(123)
    whole = build()
    full = list(whole.run(data))

    torch.manual_seed(123)
    first = build()
    head = list(first.run(data[:3]))
    first.save(tmp_path / "ck.pt")
    torch.manual_seed(999)  # disturb the RNG: load must restore it
    second = build()
    second.load(tmp_path / "ck.pt")
    assert second.step_index == 3 and second.stage.name == "II"
    tail = list(second.run(data[3:]))

    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("time_ms", "peak_mem_mb")} for r in rs]  # noqa: E731
    assert strip(head + tail) == strip(full)
    for a, b in zip(whole.student.module.state_dict().values(), second.student.module.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(whole.projections.parameters(), second.projections.parameters()):
        assert torch.equal(a, b)


def test_checkpoint_dir_and_schedule_check(tmp_path):
    torch.manual_seed(0)
    runner = make_runner(llama(2, 16), llama(4, 32), Schedule.preset("two-stage", steps=[1, 1]),
                         checkpoint_dir=tmp_path / "ck")
    runner.step(make_batch())
    assert (tmp_path / "ck" / "latest.pt").exists()
    other = make_runner(llama(2, 16), llama(4, 32), Schedule.preset("two-stage", steps=[2, 1]))
    with pytest.raises(ValueError, match="schedule"):
        other.load(tmp_path / "ck" / "latest.pt")


def test_save_pretrained_models_round_trip(tmp_path):
    torch.manual_seed(0)
    llama(4, 32).save_pretrained(tmp_path / "teacher")
    gpt2(2, 16).save_pretrained(tmp_path / "student_gpt2")  # another family, same vocabulary and heads
    teacher = LlamaForCausalLM.from_pretrained(tmp_path / "teacher")
    student = GPT2LMHeadModel.from_pretrained(tmp_path / "student_gpt2")
    runner = make_runner(student, teacher, Schedule.preset("three-stage", steps=[1, 1, 1]))
    records = list(runner.run([make_batch(k) for k in range(3)]))
    assert [r["stage"] for r in records] == ["I", "II", "III"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)


def test_model_errors():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="head counts"):
        make_runner(llama(2, 16, heads=2), llama(4, 32), Schedule.preset("one-stage", steps=[1]))
    with pytest.raises(ValueError, match="no LM head"):
        make_runner(bert(2, 16, cls=BertModel), bert(4, 32), Schedule.preset("two-stage", steps=[1, 1]))
    make_runner(bert(2, 16, cls=BertModel), bert(4, 32), Schedule([Stage("I", {"hidden": 1.0, "att": 1.0}, 1)]))
    wide = llama(4, 32)
    wide.resize_token_embeddings(V + 3)
    with pytest.raises(ValueError, match="vocabulary"):
        make_runner(llama(2, 16), wide, Schedule.preset("two-stage", steps=[1, 1]))
    with pytest.raises(TypeError, match="student"):
        make_runner(nn.Linear(3, 3), llama(4, 32), Schedule.preset("one-stage", steps=[1]))
    with pytest.raises(ValueError, match="temperature"):
        make_runner(llama(2, 16), llama(4, 32), Schedule.preset("one-stage", steps=[1]), temperature=0.0)


# ------------------------------------------------------------------------------------------
# A plain nn.Module through the adapter interface.


class TinyLM(nn.Module):
    """Embedding, single-head attention blocks with explicit probabilities, a linear LM head."""

    def __init__(self, layers, width):
        super().__init__()
        self.embed = nn.Embedding(V, width)
        self.qkv = nn.ModuleList(nn.Linear(width, 3 * width) for _ in range(layers))
        self.head = nn.Linear(width, V)

    def forward(self, ids, mask):
        h = self.embed(ids)
        hidden, maps = [h], []
        keep = mask[:, None, :].bool()
        for qkv in self.qkv:
            q, k, v = qkv(h).chunk(3, dim=-1)
            probs = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~keep, -1e9).softmax(-1)
            h = h + probs @ v
            hidden.append(h)
            maps.append(probs[:, None])  # [B, 1, L, L]
        return hidden, maps


class TinyAdapter(ModelAdapter):
    def __init__(self, module):
        self.module = module
        self.num_layers = len(module.qkv)
        self.hidden_size = module.embed.embedding_dim
        self.num_heads = 1

    def features(self, batch, *, hidden, attentions, head_input):
        states, maps = self.module(batch["input_ids"], batch["attention_mask"])
        return Features([states[i] for i in hidden], [maps[i] for i in attentions], states[-1] if head_input else None)

    def lm_head(self):
        return self.module.head.weight, self.module.head.bias


def test_plain_module_adapter():
    torch.manual_seed(0)
    teacher, student = TinyLM(4, 24), TinyLM(2, 12)
    batch = make_batch()
    mask = batch["attention_mask"]
    with torch.no_grad():
        t_h, t_m = teacher(batch["input_ids"], mask)
        s_h, s_m = student(batch["input_ids"], mask)
    runner = make_runner(TinyAdapter(student), TinyAdapter(teacher), Schedule.preset("one-stage", steps=[2]), temperature=3.0)
    proj = runner.projections
    with torch.no_grad():
        hidden = reference_loss(
            "hidden_mse", [proj[k](s_h[i]) for k, i in enumerate((0, 1, 2))], [t_h[j] for j in (0, 2, 4)], mask=mask
        )
    att = reference_loss("attention_kl", [s_m[0], s_m[1]], [t_m[1], t_m[3]], mask=mask)
    logit = reference_loss("logit_kl", student.head(s_h[-1]), teacher.head(t_h[-1]), mask=mask, temperature=3.0)
    metrics = runner.step(batch)
    assert metrics["loss_hidden"] == pytest.approx(hidden.item(), rel=1e-5)
    assert metrics["loss_att"] == pytest.approx(att.item(), rel=1e-4)
    assert metrics["loss_logit"] == pytest.approx(logit.item(), rel=1e-4)
    assert runner.step(make_batch(1))["loss"] < metrics["loss"] * 1.5


# ------------------------------------------------------------------------------------------
# CUDA graphs (run where CUDA is available).


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("preset", ["one-stage", "two-stage", "three-stage"])
def test_cuda_graphs_capture_every_stage_and_match_eager(preset, caplog):
    steps = {"one-stage": [6], "two-stage": [5, 5], "three-stage": [5, 5, 5]}[preset]
    runs = {}
    for graphs in (False, "auto"):
        torch.manual_seed(0)
        teacher, student = llama(4, 64).cuda(), llama(2, 32).cuda()
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
        runner = StageRunner(student, teacher, Schedule.preset(preset, steps), optimizer,
                             cuda_graphs=graphs, graph_warmup=2, quiet=True)
        records, captured = [], []
        with caplog.at_level(logging.WARNING, logger="fastkd.runner"):
            for k in range(sum(steps)):
                records.append(runner.step({n: t.cuda() for n, t in make_batch(k % 3).items()}))
                captured.append(runner.graph_captured)
        runs[graphs] = records
        if graphs == "auto":
            assert not [r for r in caplog.records if "capture failed" in r.getMessage()], caplog.text
            starts = [sum(steps[:i]) for i in range(len(steps))]
            for start, n in zip(starts, steps):
                assert captured[start + 2 : start + n] == [True] * (n - 2), captured
    for eager, graphed in zip(runs[False], runs["auto"]):
        for key in eager:
            if key.startswith("loss"):
                assert graphed[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-6), (eager, graphed)


# ------------------------------------------------------------------------------------------
# fastkd distill.


def test_distill_cli_with_config_files(tmp_path, capsys):
    from fastkd.distill import main

    configs = {}
    for role, (layers, width) in {"teacher": (2, 32), "student": (1, 16)}.items():
        config = LlamaConfig(vocab_size=V, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=4)
        configs[role] = tmp_path / f"{role}.json"
        config.to_json_file(configs[role])
    data = tmp_path / "data.txt"
    data.write_text("the quick brown fox jumps over the lazy dog " * 20)
    argv = ["--teacher", str(configs["teacher"]), "--student", str(configs["student"]), "--preset", "two-stage",
            "--steps", "2", "--batch-size", "2", "--seq-len", "8", "--data", str(data), "--quiet",
            "--save", str(tmp_path / "out")]
    assert main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("two-stage")]
    assert [line.split()[1] for line in lines] == ["plain", "fastkd"]
    # Same weights, no dropout: both ways report the same last losses.
    plain, fast = (float(line.split("logit=")[1].split()[0]) for line in lines)
    assert fast == pytest.approx(plain, rel=1e-3)
    saved = LlamaForCausalLM.from_pretrained(tmp_path / "out" / "two-stage")
    assert saved.config.num_hidden_layers == 1
    assert (tmp_path / "out" / "two-stage" / "projections.pt").exists()


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_right_padding_for_static_shapes_changes_no_loss(family):
    """CUDA-graphed stages pad batches on the right to a fixed length: the losses must not change."""
    from fastkd.runner.graphs import pad_batch

    batch = make_batch(labels=True)
    padded = pad_batch(batch, (B, L + 5))
    assert padded["input_ids"].shape == (B, L + 5)
    assert padded["attention_mask"][:, L:].eq(0).all() and padded["labels"][:, L:].eq(-100).all()
    assert pad_batch(batch, (B + 1, L + 5)) is None and pad_batch(batch, (B, L - 1)) is None
    metrics = []
    for b in (batch, padded):
        torch.manual_seed(0)
        teacher, student = teacher_and_student(family)
        metrics.append(make_runner(student, teacher, Schedule.preset("one-stage", steps=[1]), temperature=2.0).step(b))
    for key in ("loss_hidden", "loss_att", "loss_logit"):
        assert metrics[1][key] == pytest.approx(metrics[0][key], rel=1e-5, abs=1e-8)
