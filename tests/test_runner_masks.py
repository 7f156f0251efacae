"""Which logit rows the runner counts (causal LMs predict the next token), and the models whose
final logits are transformed after the LM head, which the runner refuses in a stage with 'logit'.

Expected values are the float64 formulas of ``reference.reference_loss`` on the models' own logits,
with the rows written out position by position (``test_runner.expected_logit_rows``).
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
)

import fastkd  # noqa: E402
from fastkd.runner import Schedule, Stage  # noqa: E402
from fastkd.runner.models import TransformersAdapter, logit_transform  # noqa: E402
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
# Final logits transformed after the head: refused in stages with 'logit'.

COMMON = dict(vocab_size=V, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
              max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# family -> (model class, config class, extra config fields, the field and a value that transforms the logits,
# the value that leaves them as they are)
FAMILIES = {
    "gemma2": (Gemma2ForCausalLM, Gemma2Config, {"head_dim": 8}, "final_logit_softcapping", 30.0, None),
    "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig, {"head_dim": 8}, "final_logit_softcapping", 30.0, None),
    "cohere": (CohereForCausalLM, CohereConfig, {}, "logit_scale", 0.0625, 1.0),
    "granite": (GraniteForCausalLM, GraniteConfig, {}, "logits_scaling", 8.0, 1.0),
}


def family_model(family, layers, value):
    model_class, config_class, extra, field, _, _ = FAMILIES[family]
    return model_class(config_class(num_hidden_layers=layers, **COMMON, **extra, **{field: value}))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_transformed_logits_are_refused(family):
    _, _, _, field, on, off = FAMILIES[family]
    torch.manual_seed(0)
    for student_value, teacher_value in ((on, off), (off, on)):
        student, teacher = family_model(family, 1, student_value), family_model(family, 2, teacher_value)
        with pytest.raises(ValueError, match=f"{field}={on!r}"):
            make_runner(student, teacher, LOGIT_ONLY)
    # Stages without 'logit' never use the head.
    make_runner(family_model(family, 1, on), family_model(family, 2, on), Schedule([Stage("h", {"hidden": 1.0}, 1)]))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_same_family_without_the_transform_is_distilled_exactly(family):
    torch.manual_seed(0)
    student, teacher = family_model(family, 1, FAMILIES[family][-1]), family_model(family, 2, FAMILIES[family][-1])
    batch = make_batch()
    s = student(**batch).logits.detach()
    with torch.no_grad():
        t = teacher(**batch).logits
    want = reference_loss("logit_kl", s, t, mask=batch["attention_mask"], temperature=2.0).item()
    assert make_runner(student, teacher, LOGIT_ONLY, temperature=2.0).step(batch)["loss_logit"] == pytest.approx(
        want, rel=1e-4
    )


def test_transform_in_a_nested_text_config_is_found():
    text = dict(num_hidden_layers=1, **COMMON, head_dim=8)
    assert logit_transform(Gemma3Config(text_config={**text, "final_logit_softcapping": 30.0})) == (
        "final_logit_softcapping=30.0"
    )
    assert logit_transform(Gemma3Config(text_config=text)) is None
