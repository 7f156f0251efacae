"""Which logit rows the runner counts (causal LMs predict the next token) and their labels, and the
models whose final logits are transformed after the LM head (soft-capped, scaled), which the runner
distils with the transform applied, or refuses when it cannot apply it.

Expected values are the float64 formulas of ``reference.reference_loss`` or ``fastkd.logit_kl`` on
the models' own logits, with the rows written out position by position
(``test_runner.expected_logit_rows``).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertLMHeadModel,
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

import fastkd  # noqa: E402
from fastkd.runner import Schedule, Stage  # noqa: E402
from fastkd.runner.models import TransformersAdapter, config_head_transform  # noqa: E402
from fastkd.runner.plain import PlainRunner  # noqa: E402
from reference import reference_loss  # noqa: E402
from test_runner import (  # noqa: E402
    V,
    TinyAdapter,
    TinyLM,
    bert,
    eager_outputs,
    expected_logit_rows,
    llama,
    make_batch,
    make_runner,
    teacher_and_student,
)

LOGIT_ONLY = Schedule([Stage("logit", {"logit": 1.0}, 1)])


def prompt_batch():
    """Labels -100 on a two-token prompt of row 0 and on the padding of row 1 (as a collator sets them)."""
    batch = make_batch(labels=True)
    batch["labels"][batch["attention_mask"] == 0] = -100
    return batch


# ------------------------------------------------------------------------------------------
# fastkd.logit_mask


def test_logit_mask_rule():
    labels = torch.tensor([[-100, -100, 5, 6, 7], [1, 2, 3, -100, -100]])
    attention = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    causal = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    masked = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(fastkd.logit_mask(labels, attention), causal)
    assert torch.equal(fastkd.logit_mask(labels, attention, causal=False), masked)
    assert torch.equal(fastkd.logit_mask(None, attention), attention.bool())
    assert torch.equal(fastkd.logit_mask(labels), torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool))
    assert fastkd.logit_mask(labels, attention).dtype == torch.bool


def test_logit_labels_rule():
    """Each row's target, written out: a causal LM's row i has token i + 1's label, a masked LM's
    token i's; -100 wherever logit_mask is False."""
    labels = torch.tensor([[-100, -100, 5, 6, 7], [1, 2, 3, 4, 9]])
    attention = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    # row 1: position 2 is a token whose next token (padding, but labelled) is its target
    causal = torch.tensor([[-100, 5, 6, 7, -100], [2, 3, 4, -100, -100]])
    masked = torch.tensor([[-100, -100, 5, 6, 7], [1, 2, 3, -100, -100]])
    assert torch.equal(fastkd.logit_labels(labels, attention), causal)
    assert torch.equal(fastkd.logit_labels(labels, attention, causal=False), masked)
    assert torch.equal(fastkd.logit_labels(labels), torch.tensor([[-100, 5, 6, 7, -100], [2, 3, 4, 9, -100]]))
    for flag in (True, False):
        assert torch.equal(fastkd.logit_labels(labels, attention, causal=flag) != -100,
                           fastkd.logit_mask(labels, attention, causal=flag))
    assert fastkd.logit_labels(labels.int()).dtype == torch.int32
    with pytest.raises(TypeError, match="labels: expected a \\[B, L\\] tensor"):
        fastkd.logit_labels(None, attention)
    with pytest.raises(ValueError, match="attention_mask"):
        fastkd.logit_labels(labels, attention[:, :4])


@pytest.mark.parametrize(
    "args, error, words",
    [
        ((None, None), ValueError, "labels, attention_mask"),
        ((torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 4)), ValueError, "attention_mask"),
        ((torch.zeros(5, dtype=torch.long),), TypeError, "labels"),
        ((None, [[1, 1]]), TypeError, "attention_mask"),
    ],
)
def test_logit_mask_errors(args, error, words):
    with pytest.raises(error, match=words):
        fastkd.logit_mask(*args)


# ------------------------------------------------------------------------------------------
# The runner and the plain way count a causal LM's row i when token i + 1 has a label.


def logit_reference(student, teacher, batch, rows, temperature):
    s, t = eager_outputs(student, batch).logits, eager_outputs(teacher, batch).logits
    return reference_loss("logit_kl", s, t, mask=rows, temperature=temperature).item()


@pytest.mark.parametrize("family, causal", [("llama", True), ("gpt2", True), ("bert", False)])
def test_logit_loss_counts_the_rows_with_a_target(family, causal):
    torch.manual_seed(0)
    teacher, student = teacher_and_student(family)
    batch = prompt_batch()
    shifted = expected_logit_rows(batch, causal=True)
    unshifted = expected_logit_rows(batch, causal=False)
    assert not torch.equal(shifted, unshifted)
    want = logit_reference(student, teacher, batch, shifted if causal else unshifted, 2.0)
    other = logit_reference(student, teacher, batch, unshifted if causal else shifted, 2.0)
    assert abs(want - other) > 1e-3 * abs(want)

    fused = make_runner(student, teacher, LOGIT_ONLY, temperature=2.0)
    assert fused.student.causal is causal and fused.teacher.causal is causal
    assert fused.step(batch)["loss_logit"] == pytest.approx(want, rel=1e-4)
    torch.manual_seed(0)
    teacher, student = teacher_and_student(family)
    plain = PlainRunner(student, teacher, LOGIT_ONLY, torch.optim.AdamW(student.parameters()), temperature=2.0,
                        quiet=True)
    assert plain.step(batch)["loss_logit"] == pytest.approx(want, rel=1e-4)


def test_without_labels_every_unpadded_row_counts():
    torch.manual_seed(0)
    teacher, student = teacher_and_student("llama")
    batch = make_batch()
    want = logit_reference(student, teacher, batch, batch["attention_mask"], 1.0)
    assert make_runner(student, teacher, LOGIT_ONLY).step(batch)["loss_logit"] == pytest.approx(want, rel=1e-4)


def test_which_models_are_causal():
    torch.manual_seed(0)
    assert TransformersAdapter(llama(1, 16)).causal is True
    assert TransformersAdapter(bert(1, 16)).causal is False
    decoder = bert(1, 16, cls=BertLMHeadModel)
    decoder.config.is_decoder = True
    assert TransformersAdapter(decoder).causal is True
    assert TinyAdapter(TinyLM(1, 8)).causal is True  # the ModelAdapter default


def test_causal_and_masked_lm_are_not_paired_for_logits():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="causal LM and the teacher a masked LM"):
        make_runner(llama(1, 16), bert(2, 32), LOGIT_ONLY)


# ------------------------------------------------------------------------------------------
# Final logits transformed after the head: applied by the logit and ce losses.

# initializer_range 0.5: logits of a few units, so that a softcap of 2 or 3 changes them
COMMON = dict(vocab_size=V, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
              max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.5)

# family -> (model class, config class, extra config fields, the field that transforms the logits,
# the student's and the teacher's value of it (small enough to matter), the value that leaves them as they are,
# the (logit_scale, softcap) the student's value means)
FAMILIES = {
    "gemma2": (Gemma2ForCausalLM, Gemma2Config, {"head_dim": 8}, "final_logit_softcapping", 2.0, 3.0, None,
               (1.0, 2.0)),
    "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig, {"head_dim": 8}, "final_logit_softcapping", 2.0, 3.0, None,
               (1.0, 2.0)),
    "cohere": (CohereForCausalLM, CohereConfig, {}, "logit_scale", 0.25, 0.5, 1.0, (0.25, None)),
    "granite": (GraniteForCausalLM, GraniteConfig, {}, "logits_scaling", 4.0, 0.5, 1.0, (0.25, None)),
}


def family_model(family, layers, value):
    model_class, config_class, extra, field = FAMILIES[family][:4]
    return model_class(config_class(num_hidden_layers=layers, **COMMON, **extra, **{field: value}))


def own_logits(model, batch):
    """The model's own output logits (transformers applies its transform) and its LM head's linear output."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        return out.logits, model.lm_head(out.hidden_states[-1])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_transformed_logits_are_distilled_with_the_transform(family):
    """Student and teacher transform their logits each with its own value: the runner's logit loss (and
    ce, from the same pass) equals logit_kl of the models' own output logits, not of the heads' outputs."""
    *_, student_value, teacher_value, _, head = FAMILIES[family]
    torch.manual_seed(0)
    student, teacher = family_model(family, 1, student_value), family_model(family, 2, teacher_value)
    batch = prompt_batch()
    (s, s_linear), (t, t_linear) = own_logits(student, batch), own_logits(teacher, batch)
    rows = fastkd.logit_mask(batch["labels"], batch["attention_mask"])
    targets = fastkd.logit_labels(batch["labels"], batch["attention_mask"])
    want = fastkd.logit_kl(s, t, mask=rows, temperature=2.0, labels=targets, ce_weight=0.5, return_parts=True)
    untransformed = fastkd.logit_kl(s_linear, t_linear, mask=rows, temperature=2.0)
    assert abs(untransformed.item() - want.kd.item()) > 1e-2 * want.kd.item()
    runner = make_runner(student, teacher, Schedule([Stage("logit", {"logit": 1.0, "ce": 0.5}, 1)]), temperature=2.0)
    assert runner.head_transforms["student"] == pytest.approx(head)
    metrics = runner.step(batch)
    assert metrics["loss_logit"] == pytest.approx(want.kd.item(), rel=1e-4)
    assert metrics["loss_ce"] == pytest.approx(want.ce.item(), rel=1e-4)
    assert metrics["loss"] == pytest.approx(want.loss.item(), rel=1e-4)


@pytest.mark.parametrize("family", ["gemma2", "cohere"])
def test_ce_alone_applies_the_students_transform(family):
    """A ce-only stage's loss is F.cross_entropy of the student's own (transformed) logits."""
    torch.manual_seed(0)
    student, teacher = family_model(family, 1, FAMILIES[family][4]), family_model(family, 2, FAMILIES[family][5])
    batch = prompt_batch()
    logits, _ = own_logits(student, batch)
    targets = fastkd.logit_labels(batch["labels"], batch["attention_mask"])
    want = torch.nn.functional.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=-100)
    runner = make_runner(student, teacher, Schedule([Stage("ce", {"ce": 1.0}, 1)]))
    assert runner.step(batch)["loss_ce"] == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_same_family_without_the_transform_is_distilled_exactly(family):
    torch.manual_seed(0)
    off = FAMILIES[family][6]
    student, teacher = family_model(family, 1, off), family_model(family, 2, off)
    batch = make_batch()
    s = student(**batch).logits.detach()
    with torch.no_grad():
        t = teacher(**batch).logits
    want = reference_loss("logit_kl", s, t, mask=batch["attention_mask"], temperature=2.0).item()
    runner = make_runner(student, teacher, LOGIT_ONLY, temperature=2.0)
    assert runner.head_transforms == {"student": (1.0, None), "teacher": (1.0, None)}
    assert runner.step(batch)["loss_logit"] == pytest.approx(want, rel=1e-4)


def test_transform_in_a_nested_text_config_is_found():
    text = dict(num_hidden_layers=1, **COMMON, head_dim=8)
    assert config_head_transform(Gemma3Config(text_config={**text, "final_logit_softcapping": 30.0})) == (1.0, 30.0)
    assert config_head_transform(Gemma3Config(text_config=text)) == (1.0, None)


def llama_with(layers, **fields):
    """A tiny Llama whose config also sets ``fields`` (attributes a config class may not know)."""
    config = LlamaConfig(num_hidden_layers=layers, **COMMON)
    for name, value in fields.items():
        setattr(config, name, value)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"lm_head_multiplier": 2.0}, "lm_head_multiplier=2.0, which transforms the final logits in a way fastkd does "
                                      "not apply"),
        ({"logits_soft_cap": 30.0}, "logits_soft_cap=30.0, which transforms"),
        ({"final_logit_bias": 0.5}, "final_logit_bias=0.5, a field fastkd does not know"),
        ({"logit_temperature": 2}, "logit_temperature=2, a field fastkd does not know"),
        ({"logits_scaling": 0.0}, r"logits_scaling=0.0, expected a finite number > 0"),
    ],
)
def test_logit_transforms_fastkd_cannot_apply_are_refused(fields, words):
    """A config field that transforms the logits in a way fastkd does not apply, or that fastkd does not
    know at all, is refused for the stages that use the LM head, on either side; other stages run."""
    torch.manual_seed(0)
    for student_fields, teacher_fields in ((fields, {}), ({}, fields)):
        student, teacher = llama_with(1, **student_fields), llama_with(2, **teacher_fields)
        for schedule in (LOGIT_ONLY, Schedule([Stage("ce", {"ce": 1.0}, 1)])):
            if schedule is not LOGIT_ONLY and not student_fields:
                make_runner(student, teacher, schedule)  # ce uses the student's head only
                continue
            with pytest.raises(ValueError, match=words + r".*ModelAdapter whose head_transform\(\)"):
                make_runner(student, teacher, schedule)
    make_runner(llama_with(1, **fields), llama_with(2, **fields), Schedule([Stage("h", {"hidden": 1.0}, 1)]))
    # Fields that name logits but leave the final logits as they are.
    assert config_head_transform(llama_with(1, output_router_logits=True, num_logits_to_keep=1).config) == (1.0, None)


def test_a_model_adapter_declares_its_head_transform():
    """A ModelAdapter's head_transform() is applied, and checked."""

    class Capped(TinyAdapter):
        def __init__(self, module, transform):
            super().__init__(module)
            self.transform = transform

        def head_transform(self):
            return self.transform

    torch.manual_seed(0)
    student, teacher = TinyLM(1, 8), TinyLM(2, 16)
    batch = make_batch()
    with torch.no_grad():
        s = 1.5 * torch.tanh(student.head(student(batch["input_ids"], batch["attention_mask"])[0][-1]) * 0.5 / 1.5)
        t = teacher.head(teacher(batch["input_ids"], batch["attention_mask"])[0][-1])
    want = fastkd.logit_kl(s, t, mask=batch["attention_mask"])
    runner = make_runner(Capped(student, (0.5, 1.5)), TinyAdapter(teacher), LOGIT_ONLY)
    assert runner.step(batch)["loss_logit"] == pytest.approx(want.item(), rel=1e-4)
    with pytest.raises(ValueError, match="student_softcap: expected a finite number > 0"):
        make_runner(Capped(student, (1.0, -1.0)), TinyAdapter(teacher), LOGIT_ONLY)
