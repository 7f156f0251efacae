"""Models as the runner sees them: the features one stage asks for, and the LM head.

The runner talks to every model through a :class:`ModelAdapter`. transformers models are wrapped
by :class:`TransformersAdapter` automatically; a plain ``nn.Module`` is distilled by subclassing
:class:`ModelAdapter`, which asks for four attributes and two methods:

- ``module`` (the ``nn.Module``: its parameters, ``train()``/``eval()``), ``num_layers`` (blocks),
  ``hidden_size`` (width of the hidden states), ``num_heads`` (heads of the attention maps);
- optionally ``causal`` (default True): whether the logits at position ``i`` predict token
  ``i + 1`` (a causal LM) rather than token ``i`` (a masked LM such as BERT); it decides which
  rows the logit loss counts when the batch has ``labels`` (:func:`fastkd.logit_mask`);
- ``features(batch, *, hidden, attentions, head_input) -> Features``: run the model on ``batch``
  (a dict with ``input_ids`` and ``attention_mask``, ``[B, L]``) and return only what was asked:
  the hidden states with the indices in ``hidden`` (0 = embeddings, ``i`` = output of block ``i``;
  ``[B, L, hidden_size]``), the attention probabilities of the blocks in ``attentions`` (0-based,
  ``[B, H, L, L]``, before dropout) and, if ``head_input``, the input of the LM head's final linear
  layer (``[B, L, D]``); the LM head itself must not run;
- ``lm_head() -> (weight [V, D], bias [V] or None)``: that final linear layer; raise ``ValueError``
  when the model has none (the default);
- optionally ``set_attention_maps(enabled)``: called when a stage starts, with whether the stage
  needs attention maps (the default does nothing).

transformers models: attention maps come from fastkd's attention function, registered with
transformers' ``AttentionInterface`` under the name ``"fastkd"``. It computes eager attention for
the blocks whose maps were asked for and returns their probabilities before dropout (dropout still
applies to the attention output as usual), and calls SDPA for every other block. Stages without
``att`` run the model's own attention implementation (SDPA by default). The LM head is
``get_output_embeddings()``: a plain ``lm_head`` linear layer (Llama, Qwen2, GPT-2, ...), or BERT's
``cls.predictions``, whose transform (dense, activation, LayerNorm) is applied to the final hidden
states to make the head input; such a model is a masked LM unless ``config.is_decoder``, a model
with an ``lm_head`` is causal. Other heads need a :class:`ModelAdapter`. A model whose final
logits are transformed after the head (``LOGIT_TRANSFORMS``: Gemma-2/3's soft-capping, Cohere's
``logit_scale``, Granite's ``logits_scaling``) cannot be used in a stage with ``logit``: the logit
loss works on the head's linear output.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_NAME = "fastkd"

# transformers config field that transforms the final logits -> its value when it does not.
LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1, "logits_scaling": 1}


class Features(NamedTuple):
    """What a model returned for one stage; empty lists and ``None`` for what was not asked."""

    hidden: list[torch.Tensor]
    attentions: list[torch.Tensor]
    head_input: torch.Tensor | None


class ModelAdapter(abc.ABC):
    """The interface the runner needs from a model (see the module docstring)."""

    module: nn.Module
    num_layers: int
    hidden_size: int
    num_heads: int
    causal: bool = True

    @abc.abstractmethod
    def features(
        self,
        batch: Mapping[str, torch.Tensor],
        *,
        hidden: Sequence[int],
        attentions: Sequence[int],
        head_input: bool,
    ) -> Features:
        """The hidden states, attention probabilities and LM-head input asked for (module docstring)."""

    def lm_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight [V, D], bias [V] or None)`` of the LM head's final linear layer."""
        raise ValueError(f"{type(self.module).__name__} has no LM head, so a stage with 'logit' cannot use it")

    def set_attention_maps(self, enabled: bool) -> None:
        """Called when a stage starts: whether ``features`` will be asked for attention maps."""


# --------------------------------------------------------------------------------------------
# Pre-dropout attention maps through transformers' attention interface.


class _Recorder:
    """Counts the attention calls of one forward pass and keeps the maps of the wanted blocks."""

    def __init__(self, wanted: Sequence[int]) -> None:
        self.wanted = frozenset(wanted)
        self.calls = 0
        self.maps: dict[int, torch.Tensor] = {}


_active: _Recorder | None = None


@contextlib.contextmanager
def _recording(wanted: Sequence[int]) -> Iterator[_Recorder]:
    global _active
    recorder = _Recorder(wanted)
    previous, _active = _active, recorder
    try:
        yield recorder
    finally:
        _active = previous


def _eager_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal):
    """Eager attention ``softmax(q k^T * scaling + mask) v``; returns (output, probabilities before dropout).

    ``query`` is ``[B, H, Lq, d]``; ``key``/``value`` may have fewer heads (grouped-query attention).
    ``attention_mask`` is a boolean (True = attend) or additive float ``[B, 1, Lq, Lk]`` mask, or
    None (then causal if the module is causal). Masked keys get the dtype's lowest score, so a row
    without any valid key is uniform, never NaN (its loss rows are masked by the padding mask).
    """
    heads = query.shape[1]
    if key.shape[1] != heads:
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
        value = value.repeat_interleave(heads // value.shape[1], dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    lowest = torch.finfo(scores.dtype).min
    q_len, k_len = scores.shape[-2:]
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, lowest)
        else:
            scores = scores + attention_mask
    elif q_len > 1 and (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril(k_len - q_len)
        scores = scores.masked_fill(~causal, lowest)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(F.dropout(probs, p=dropout, training=module.training), value)
    return output.transpose(1, 2).contiguous(), probs


def attention_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """transformers attention function ``"fastkd"``: eager with pre-dropout maps for recorded blocks, else SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    recorder = _active
    if recorder is not None:
        index = recorder.calls
        recorder.calls += 1
        if index in recorder.wanted:
            if kwargs.get("softcap") is not None:
                raise ValueError("fastkd attention maps do not support attention logit soft-capping (softcap)")
            output, probs = _eager_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal)
            recorder.maps[index] = probs
            return output, probs
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


_registered = False


def register_attention() -> None:
    """Register ``"fastkd"`` with transformers' attention and attention-mask interfaces (SDPA masks)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    _registered = True


# --------------------------------------------------------------------------------------------
# transformers models.


def is_transformers_model(model: object) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def _mlm_predictions(model: nn.Module) -> nn.Module | None:
    """BERT's masked-LM head ``cls.predictions`` (transform + decoder), or None."""
    return getattr(getattr(model, "cls", None), "predictions", None)


def _head_parts(model: nn.Module) -> tuple[nn.Module | None, nn.Linear]:
    """(transform applied before the final linear layer or None, that linear layer) of the LM head."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(
            f"{type(model).__name__} has no LM head, so a stage with 'logit' cannot use it "
            "(load a model with a head, e.g. AutoModelForCausalLM or BertForMaskedLM)"
        )
    predictions = _mlm_predictions(model)
    if predictions is not None and getattr(predictions, "decoder", None) is head:
        return predictions.transform, head
    if getattr(model, "lm_head", None) is head and isinstance(head, nn.Linear):
        return None, head
    raise ValueError(
        f"{type(model).__name__}: its output layer is neither a linear `lm_head` nor BERT's "
        "`cls.predictions`; wrap the model in a fastkd.runner.ModelAdapter that says how to get the head input"
    )


def logit_transform(config) -> str | None:
    """``"field=value"`` of the first ``LOGIT_TRANSFORMS`` field that ``config`` (or its text config) turns on."""
    for part in (config, config.get_text_config()):
        for field, identity in LOGIT_TRANSFORMS.items():
            value = getattr(part, field, identity)
            if value is not None and value != identity:
                return f"{field}={value!r}"
    return None


class TransformersAdapter(ModelAdapter):
    """A transformers model (causal LM such as Llama, Qwen2, GPT-2; encoder such as BERT)."""

    def __init__(self, model: nn.Module) -> None:
        config = model.config
        self.module = model
        self.num_layers = config.num_hidden_layers
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.causal = _mlm_predictions(model) is None or bool(getattr(config, "is_decoder", False))
        self._logit_transform = logit_transform(config)
        self._own_attention = config._attn_implementation
        register_attention()

    def set_attention_maps(self, enabled: bool) -> None:
        name = ATTENTION_NAME if enabled else self._own_attention
        if self.module.config._attn_implementation != name:
            self.module.set_attn_implementation(name)

    def lm_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._logit_transform is not None:
            raise ValueError(
                f"{type(self.module).__name__}: its config sets {self._logit_transform}, which transforms the "
                "final logits after the LM head; the logit loss does not support that, so a stage with 'logit' "
                "cannot use this model"
            )
        _, head = _head_parts(self.module)
        return head.weight, head.bias

    def features(self, batch, *, hidden, attentions, head_input) -> Features:
        inputs = {name: value for name, value in batch.items() if name != "labels"}
        base = self.module.base_model
        if attentions and self.module.config._attn_implementation != ATTENTION_NAME:
            raise RuntimeError("attention maps were asked for, but set_attention_maps(True) was not called")
        with _recording(attentions) if attentions else contextlib.nullcontext() as recorder:
            out = base(**inputs, output_hidden_states=bool(hidden), use_cache=False, return_dict=True)
        maps = []
        if attentions:
            missing = [i for i in attentions if i not in recorder.maps]
            if missing:
                raise RuntimeError(
                    f"{type(self.module).__name__}: no attention map was recorded for block(s) {missing} "
                    f"({recorder.calls} attention call(s) in the forward pass)"
                )
            maps = [recorder.maps[i] for i in attentions]
        head_in = None
        if head_input:
            transform, _ = _head_parts(self.module)
            head_in = out.last_hidden_state if transform is None else transform(out.last_hidden_state)
        return Features([out.hidden_states[i] for i in hidden], maps, head_in)


def as_adapter(model: object, role: str) -> ModelAdapter:
    """``model`` itself if it is a :class:`ModelAdapter`, a :class:`TransformersAdapter` around a transformers model."""
    if isinstance(model, ModelAdapter):
        return model
    if is_transformers_model(model):
        return TransformersAdapter(model)
    raise TypeError(
        f"{role}: expected a transformers PreTrainedModel or a fastkd.runner.ModelAdapter, got {type(model).__name__} "
        "(wrap a plain nn.Module in a ModelAdapter subclass)"
    )
