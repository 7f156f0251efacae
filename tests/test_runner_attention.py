"""The runner's ``attention`` modes: ``"qk"`` (queries and keys, no maps), ``"maps"`` and ``"relations"``.

Tiny random Llama, GPT-2 and BERT models on CPU, sequences of 16 tokens with padding. ``"qk"`` is
checked against ``"maps"`` and the float64 formula of ``reference.reference_loss`` on the models'
own eager maps, ``"relations"`` against ``reference.relation_rows`` on the models' own projections.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertForMaskedLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

import fastkd  # noqa: E402
from fastkd.runner import Features, Schedule, Stage  # noqa: E402
from fastkd.runner import models as runner_models  # noqa: E402
from fastkd.runner.models import AttentionInputs, TransformersAdapter  # noqa: E402
from reference import reference_loss, reduce, relation_rows  # noqa: E402
from test_runner import PRESET_LOSSES, V, RecordShapes, TinyAdapter, TinyLM, make_runner  # noqa: E402

B, L = 2, 16
ATT = Schedule([Stage("att", {"att": 1.0}, 1)])


def llama(layers, width, heads=4, kv_heads=None, init=0.02):
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=V, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads or heads // 2, max_position_embeddings=64,
        initializer_range=init,
    ))


def gpt2(layers, width, heads=4, init=0.02, **extra):
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=V, n_embd=width, n_layer=layers, n_head=heads, n_positions=64, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, initializer_range=init, **extra,
    ))


def bert(layers, width, heads=4, init=0.02):
    return BertForMaskedLM(BertConfig(
        vocab_size=V, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=2 * width, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, initializer_range=init,
    ))


BUILD = {"llama": llama, "gpt2": gpt2, "bert": bert}


def teacher_and_student(family, init=0.02, **extra):
    """A 4-block, width-32 teacher and a 2-block, width-16 student, 4 heads each, built in that order."""
    torch.manual_seed(0)
    build = BUILD[family]
    return build(4, 32, init=init, **extra), build(2, 16, init=init, **extra)


def make_batch(seed=0, padding="right"):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, L), generator=gen)
    mask = torch.ones(B, L, dtype=torch.long)
    if padding == "right":
        mask[1, L - 5 :] = 0
    else:
        mask[1, :5] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of the three attention losses and of the eager (map-making) attention,
    keeping each call's arguments."""
    seen = {"attention_kl": [], "attention_kl_qk": [], "relation_kl": [], "eager": 0}
    for name in ("attention_kl", "attention_kl_qk", "relation_kl"):
        original = getattr(fastkd, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            seen[_name].append((args, kwargs))
            return _original(*args, **kwargs)

        monkeypatch.setattr(fastkd, name, spy)
    eager = runner_models._eager_attention

    def eager_spy(*args, **kwargs):
        seen["eager"] += 1
        return eager(*args, **kwargs)

    monkeypatch.setattr(runner_models, "_eager_attention", eager_spy)
    return seen


def attention_options(attention):
    return {"attention": attention, "relation_heads": 2} if attention == "relations" else {"attention": attention}


# ------------------------------------------------------------------------------------------
# The presets, end to end.


@pytest.mark.parametrize("attention", ["qk", "relations"])
@pytest.mark.parametrize("preset", ["one-stage", "two-stage", "three-stage"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_every_preset_runs_end_to_end(family, preset, attention, calls):
    """Every stage in order with its own losses, all finite, att > 0 through the chosen loss only,
    and the student trained."""
    teacher, student = teacher_and_student(family)
    stages = len(PRESET_LOSSES[preset])
    runner = make_runner(student, teacher, Schedule.preset(preset, steps=[2] * stages), **attention_options(attention))
    assert runner.attention == attention
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    records = list(runner.run([make_batch(k) for k in range(2 * stages)]))
    assert [r["stage"] for r in records] == [name for name in ("I", "II", "III")[:stages] for _ in (0, 1)]
    att_steps = 0
    for r in records:
        losses = PRESET_LOSSES[preset][("I", "II", "III").index(r["stage"])]
        assert {k for k in r if k.startswith("loss_")} == {f"loss_{name}" for name in losses}
        assert all(math.isfinite(r[k]) for k in r if k.startswith("loss"))
        if "att" in losses:
            att_steps += 1
            assert r["loss_att"] > 0
    # One attention loss per step with 'att', of the chosen kind; no map anywhere.
    used = {"qk": "attention_kl_qk", "relations": "relation_kl"}[attention]
    assert len(calls[used]) == att_steps * (3 if attention == "relations" else 1)
    assert calls["attention_kl"] == [] and calls["eager"] == 0
    changed = [name for name, p in student.named_parameters() if not torch.equal(before[name], p)]
    assert len(changed) == len(before), f"unchanged: {set(before) - set(changed)}"


# ------------------------------------------------------------------------------------------
# "qk" and "maps": the same loss, and no map under "qk".


def eager_maps(model, batch):
    model.set_attn_implementation("eager")
    with torch.no_grad():
        maps = model(**batch, output_attentions=True).attentions
    model.set_attn_implementation("sdpa")
    return maps


QK_CASES = {
    "llama-right-padding": ("llama", "right", {}),
    "llama-left-padding": ("llama", "left", {}),
    "gpt2": ("gpt2", "right", {}),
    # a scaling per block (1 / (layer + 1)): each pair on its own, then the mean
    "gpt2-inverse-layer-scaling": ("gpt2", "right", {"scale_attn_by_inverse_layer_idx": True}),
    "bert": ("bert", "right", {}),
}


@pytest.mark.parametrize("case", list(QK_CASES))
def test_qk_and_maps_give_the_same_loss(case, calls):
    """One step of hidden + att + logit: loss_att of "qk" equals that of "maps" and the float64
    formula on the models' eager maps (weights at init_range 0.2, so that the KL is far from 0)."""
    family, padding, extra = QK_CASES[case]
    batch = make_batch(padding=padding)
    teacher, student = teacher_and_student(family, init=0.2, **extra)
    t_maps, s_maps = eager_maps(teacher, batch), eager_maps(student, batch)
    want = reference_loss("attention_kl", [s_maps[0], s_maps[1]], [t_maps[1], t_maps[3]], mask=batch["attention_mask"])
    got = {}
    for attention in ("qk", "maps"):
        teacher, student = teacher_and_student(family, init=0.2, **extra)
        runner = make_runner(student, teacher, Schedule.preset("one-stage", steps=[1]), attention=attention)
        got[attention] = runner.step(batch)["loss_att"]
    assert want.item() > 0.05
    assert got["qk"] == pytest.approx(got["maps"], rel=1e-4)
    assert got["qk"] == pytest.approx(want.item(), rel=1e-4)
    assert len(calls["attention_kl"]) == 1  # the "maps" step
    if extra:  # GPT-2's scaling d ** -0.5 / (block + 1): student blocks 0, 1 (d = 4), teacher 1, 3 (d = 8)
        assert [(kw["student_scale"], kw["teacher_scale"]) for _, kw in calls["attention_kl_qk"]] == [
            pytest.approx((0.5, 8**-0.5 / 2)), pytest.approx((0.25, 8**-0.5 / 4))
        ]
        return
    (qk_args, qk_kwargs), = calls["attention_kl_qk"]
    student_q, student_k, teacher_q, teacher_k = qk_args
    assert qk_kwargs["causal"] is (family != "bert")
    assert (qk_kwargs["student_scale"], qk_kwargs["teacher_scale"]) == pytest.approx((0.5, 8**-0.5))
    assert [q.shape for q in student_q] == [torch.Size((B, 4, L, 4))] * 2
    assert [q.shape for q in teacher_q] == [torch.Size((B, 4, L, 8))] * 2
    kv_heads = 2 if family == "llama" else 4  # grouped-query keys are passed with their own heads
    assert [k.shape[1] for k in (*student_k, *teacher_k)] == [kv_heads] * 4


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_qk_makes_no_attention_map(family, calls):
    """Under "qk" no [B, H, L, L] tensor is made in the whole step (forward and backward), the
    attention modules return no maps and the eager attention never runs; "maps" makes them."""
    built = {}
    for attention in ("qk", "maps"):
        teacher, student = teacher_and_student(family)
        modules = [m for model in (student, teacher) for name, m in model.named_modules()
                   if name.endswith(("self_attn", "attention.self", ".attn"))]
        assert len(modules) == 6
        returned = []
        handles = [m.register_forward_hook(lambda mod, args, out: returned.append(out[1])) for m in modules]
        runner = make_runner(student, teacher, ATT, attention=attention)
        with RecordShapes() as rec:
            runner.step(make_batch())
        for h in handles:
            h.remove()
        built[attention] = [s for s in rec.shapes if len(s) == 4 and s[1] > 1 and s[2:] == (L, L)]
        assert len(returned) == 6
        if attention == "qk":
            assert all(r is None for r in returned)
            assert calls["eager"] == 0 and calls["attention_kl"] == [] and len(calls["attention_kl_qk"]) == 1
        else:
            assert sum(r is not None for r in returned) == 4  # the paired blocks
            assert calls["eager"] == 4
    assert built["qk"] == []
    assert (B, 4, L, L) in built["maps"]


# ------------------------------------------------------------------------------------------
# "relations": models with different head counts and widths.


def gpt2_projections(model, batch, blocks):
    """The ``[B, L, D]`` queries, keys and values of GPT-2's ``blocks`` (c_attn's output, split)."""
    kept = {}
    handles = [
        model.transformer.h[i].attn.c_attn.register_forward_hook(
            lambda mod, args, out, i=i: kept.__setitem__(i, out.detach().split(out.shape[-1] // 3, dim=-1))
        )
        for i in blocks
    ]
    with torch.no_grad():
        model(**batch)
    for h in handles:
        h.remove()
    return [kept[i] for i in blocks]


@pytest.mark.parametrize("projections", [("q", "k", "v"), ("v",), ("k", "q")])
def test_relations_with_different_head_counts_match_the_formula(projections):
    """Teacher: 8 heads of width 8; student: 4 heads of width 4 (GPT-2). loss_att is the mean over
    projections and pairs of MiniLMv2's relation KL, in float64 from the models' own projections."""
    torch.manual_seed(0)
    teacher, student = gpt2(4, 64, heads=8, init=0.2), gpt2(2, 16, heads=4, init=0.2)
    batch = make_batch()
    mask = batch["attention_mask"]
    t_x, s_x = gpt2_projections(teacher, batch, [1, 3]), gpt2_projections(student, batch, [0, 1])
    order = [{"q": 0, "k": 1, "v": 2}[p] for p in projections]
    values = [
        reduce(relation_rows(s[p], t[p], 2, mask, causal=True), mask, "mean", attention=True)
        for s, t in zip(s_x, t_x) for p in order
    ]
    want = torch.stack(values).mean().item()
    runner = make_runner(student, teacher, ATT, attention="relations", relation_heads=2,
                         relation_projections=projections)
    assert runner.relation_projections == tuple(p for p in "qkv" if p in projections)
    assert want > 0.01
    assert runner.step(batch)["loss_att"] == pytest.approx(want, rel=1e-4)


def test_different_head_counts_train_under_relations_and_are_refused_otherwise():
    """Llama teacher of 8 heads (width 64, 4 key heads), student of 4 heads (width 16, 2 key heads)."""
    torch.manual_seed(0)
    teacher, student = llama(4, 64, heads=8), llama(2, 16, heads=4)
    for attention in (None, "qk", "maps"):
        with pytest.raises(ValueError, match="head counts.*attention='relations'"):
            make_runner(student, teacher, ATT, **({} if attention is None else {"attention": attention}))
    schedule = Schedule([Stage("att", {"att": 1.0}, 12)])
    runner = make_runner(student, teacher, schedule, attention="relations", relation_heads=4)
    before = student.model.layers[0].self_attn.k_proj.weight.detach().clone()
    batch = make_batch()
    losses = [m["loss_att"] for m in runner.run([batch] * 12)]
    assert all(math.isfinite(x) and x > 0 for x in losses)
    assert losses[-1] < 0.9 * losses[0], losses
    assert not torch.equal(before, student.model.layers[0].self_attn.k_proj.weight)
    # relation_heads alone means attention="relations"
    assert make_runner(student, teacher, ATT, relation_heads=2).attention == "relations"


# ------------------------------------------------------------------------------------------
# Defaults, refused models, argument errors.


def test_default_attention():
    teacher, student = teacher_and_student("llama")
    assert make_runner(student, teacher, ATT).attention == "qk"
    # A maps-only ModelAdapter: the default is "maps"; "qk" and "relations" are refused.
    assert make_runner(TinyAdapter(TinyLM(2, 12)), TinyAdapter(TinyLM(4, 24)), ATT).attention == "maps"
    for attention in ("qk", "relations"):
        with pytest.raises(ValueError, match="TinyAdapter gives attention maps only.*attention='maps'"):
            make_runner(TinyAdapter(TinyLM(2, 12)), TinyAdapter(TinyLM(4, 24)), ATT, **attention_options(attention))


def mistral(layers, window):
    return MistralForCausalLM(MistralConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=window,
    ))


def gemma2(layers):
    return Gemma2ForCausalLM(Gemma2Config(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=4, max_position_embeddings=64, pad_token_id=0,
    ))


def test_attention_that_queries_and_keys_do_not_show_is_refused(caplog):
    """Soft-capped scores (Gemma-2) and sliding windows (Mistral) need attention='maps'."""
    torch.manual_seed(0)
    for attention in ("qk", "relations"):
        with pytest.raises(ValueError, match=r"attn_logit_softcapping=50\.0.*attention='maps'"):
            make_runner(gemma2(1), gemma2(2), ATT, **attention_options(attention))
        with pytest.raises(ValueError, match=r"sliding_window=4.*attention='maps'"):
            make_runner(mistral(1, 4), mistral(2, 4), ATT, **attention_options(attention))
    with caplog.at_level("INFO", logger="fastkd.runner"):
        runner = make_runner(mistral(1, 4), mistral(2, 4), ATT)
    assert runner.attention == "maps" and "sliding_window=4" in caplog.text
    assert math.isfinite(runner.step(make_batch())["loss_att"])
    assert make_runner(mistral(1, None), mistral(2, None), ATT).attention == "qk"


def test_a_window_seen_in_the_attention_call_is_refused(monkeypatch):
    """If the config check misses a window shorter than the sequence, the attention call refuses it."""
    monkeypatch.setattr(TransformersAdapter, "attention_inputs_unsupported", lambda self, blocks: None)
    torch.manual_seed(0)
    runner = make_runner(mistral(1, 4), mistral(2, 4), ATT, attention="qk")
    with pytest.raises(ValueError, match="sliding window of 4 keys over 16.*attention='maps'"):
        runner.step(make_batch())
    # A window as long as the sequence changes nothing: the loss is that of "maps". The KL of these
    # tiny models is about 2e-5, and the maps come from transformers' eager attention, whose softmax
    # rounds to float32: roundings move that KL by up to about 2e-4 of itself (1.4e-4 measured with
    # AVX2 kernels, 2e-5 with float64 models), a window applied wrongly by O(1).
    losses = {}
    for attention in ("qk", "maps"):
        torch.manual_seed(0)
        losses[attention] = make_runner(mistral(1, L), mistral(2, L), ATT, attention=attention).step(make_batch())
    assert losses["qk"]["loss_att"] == pytest.approx(losses["maps"]["loss_att"], rel=1e-3)


@pytest.mark.parametrize(
    "options, error, words",
    [
        ({"attention": "flash"}, ValueError, "attention: expected one of 'qk', 'maps', 'relations'"),
        ({"attention": "relations"}, ValueError, "relation_heads: attention='relations' needs"),
        ({"attention": "relations", "relation_heads": 0}, ValueError, "relation_heads: expected a positive int"),
        ({"attention": "relations", "relation_heads": 2.0}, TypeError, "relation_heads"),
        ({"attention": "relations", "relation_heads": True}, TypeError, "relation_heads"),
        ({"attention": "relations", "relation_heads": 3}, ValueError, "relation_heads: 3 does not divide"),
        ({"attention": "qk", "relation_heads": 2}, ValueError, "relation_heads: only used with attention='relations'"),
        ({"attention": "maps", "relation_projections": ("q",)}, ValueError, "relation_projections: only used"),
        ({"relation_heads": 2, "relation_projections": ()}, ValueError, "relation_projections: expected a non-empty"),
        ({"relation_heads": 2, "relation_projections": ("q", "x")}, ValueError, "relation_projections"),
        ({"relation_heads": 2, "relation_projections": ("q", "q")}, ValueError, "relation_projections"),
        ({"relation_heads": 2, "relation_projections": "qk"}, TypeError, "relation_projections"),
    ],
)
def test_attention_argument_errors(options, error, words):
    teacher, student = teacher_and_student("llama")
    with pytest.raises(error, match=words.replace("(", r"\(")):
        make_runner(student, teacher, ATT, **options)


# ------------------------------------------------------------------------------------------
# A plain module that gives its queries and keys.


class TinyQK(TinyLM):
    """TinyLM that also returns each block's single-head query, key and value."""

    def forward(self, ids, mask):
        h = self.embed(ids)
        hidden, maps, inputs = [h], [], []
        keep = mask[:, None, :].bool()
        for qkv in self.qkv:
            q, k, v = qkv(h).chunk(3, dim=-1)
            probs = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~keep, -1e9).softmax(-1)
            h = h + probs @ v
            hidden.append(h)
            maps.append(probs[:, None])
            inputs.append(AttentionInputs(q[:, None], k[:, None], v[:, None], causal=False))
        return hidden, maps, inputs


class TinyQKAdapter(TinyAdapter):
    def attention_inputs_unsupported(self, blocks):
        return None

    def features(self, batch, *, hidden, attentions, head_input, attention_inputs=None):
        states, maps, inputs = self.module(batch["input_ids"], batch["attention_mask"])
        if attention_inputs is None:
            return Features([states[i] for i in hidden], [maps[i] for i in attentions], None)
        return Features([states[i] for i in hidden], [], None, [inputs[i] for i in attentions])


def test_plain_module_adapter_with_attention_inputs():
    """A ModelAdapter returning AttentionInputs (bidirectional, causal=False): "qk" gives the loss of
    its maps; "relations" of its values the float64 formula."""
    batch = make_batch()
    mask = batch["attention_mask"]
    losses = {}
    for attention in ("qk", "maps", "relations"):
        torch.manual_seed(0)
        teacher, student = TinyQK(4, 24), TinyQK(2, 12)
        if attention == "relations":
            with torch.no_grad():
                s_in = student(batch["input_ids"], mask)[2]
                t_in = teacher(batch["input_ids"], mask)[2]
            want = torch.stack([
                reduce(relation_rows(s_in[i].value[:, 0], t_in[j].value[:, 0], 2, mask), mask, "mean", attention=True)
                for i, j in ((0, 1), (1, 3))
            ]).mean().item()
        options = {"relation_heads": 2, "relation_projections": ["v"]} if attention == "relations" else {}
        runner = make_runner(TinyQKAdapter(student), TinyQKAdapter(teacher), ATT, attention=attention, **options)
        losses[attention] = runner.step(batch)["loss_att"]
    assert losses["qk"] > 0.01
    assert losses["qk"] == pytest.approx(losses["maps"], rel=1e-4)
    assert losses["relations"] == pytest.approx(want, rel=1e-4)


# ------------------------------------------------------------------------------------------
# fastkd distill --attention, --relation-heads.


def test_distill_cli_with_relations(tmp_path, capsys):
    from fastkd.cli import main

    configs = {}
    for role, (layers, width, heads) in {"teacher": (2, 64, 8), "student": (1, 16, 4)}.items():
        config = LlamaConfig(vocab_size=V, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=heads // 2)
        configs[role] = tmp_path / f"{role}.json"
        config.to_json_file(configs[role])
    common = ["distill", "--teacher", str(configs["teacher"]), "--student", str(configs["student"]),
              "--preset", "two-stage", "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--quiet"]
    log = tmp_path / "log.jsonl"
    assert main([*common, "--attention", "relations", "--relation-heads", "2", "--log", str(log)]) == 0
    out = capsys.readouterr().out
    assert "the plain way is skipped" in out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("two-stage")] == ["fastkd"]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["way"], r["stage"]) for r in records] == [("fastkd", "I")] * 2 + [("fastkd", "II")] * 2
    assert all(math.isfinite(r["loss_att"]) and r["loss_att"] > 0 for r in records[:2])
    for bad in (["--attention", "relations"], ["--attention", "qk", "--relation-heads", "2"],
                ["--relation-heads", "0"], ["--attention", "flash"]):
        with pytest.raises(SystemExit):
            main([*common, *bad])
    # Without --attention, different head counts are refused, naming the way out.
    with pytest.raises(ValueError, match="attention='relations'"):
        main(common)
