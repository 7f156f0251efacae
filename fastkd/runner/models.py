"""Models as the runner sees them: the features one stage asks for, and the LM head.

The runner talks to every model through a :class:`ModelAdapter`. transformers models are wrapped
by :class:`TransformersAdapter` automatically; a plain ``nn.Module`` is distilled by subclassing
:class:`ModelAdapter`, which asks for four attributes and two methods:

- ``module`` (the ``nn.Module``: its parameters, ``train()``/``eval()``), ``num_layers`` (blocks),
  ``hidden_size`` (width of the hidden states), ``num_heads`` (query heads of the attention);
- optionally ``causal`` (default True): whether the logits at position ``i`` predict token
  ``i + 1`` (a causal LM) rather than token ``i`` (a masked LM such as BERT); it decides which
  rows the logit loss counts when the batch has ``labels`` (:func:`fastkd.logit_mask`), and is the
  attention's causality where :class:`AttentionInputs` leaves ``causal`` at None;
- ``features(batch, *, hidden, attentions, head_input) -> Features``: run the model on ``batch``
  (a dict with ``input_ids`` and ``attention_mask``, ``[B, L]``) and return only what was asked:
  the hidden states with the indices in ``hidden`` (0 = embeddings, ``i`` = output of block ``i``;
  ``[B, L, hidden_size]``), the attention probabilities of the blocks in ``attentions`` (0-based,
  ``[B, H, L, L]``, before dropout) and, if ``head_input``, the input of the LM head's final linear
  layer (``[B, L, D]``); the LM head itself must not run;
- ``lm_head() -> (weight [V, D], bias [V] or None)``: that final linear layer; raise ``ValueError``
  when the model has none (the default);
- optionally ``head_transform() -> (logit_scale, softcap)`` (default ``(1.0, None)``): how the
  model's final logits are made from that layer's output ``y = h W^T + b``: ``z = y * logit_scale``,
  then ``softcap * tanh(z / softcap)`` when ``softcap`` is not None;
- optionally ``set_attention_maps(enabled)``: called when a stage starts, with whether the stage
  has ``att`` (the default does nothing).

That is enough for the runner's ``attention="maps"``. For ``attention="qk"`` and
``attention="relations"`` (the attention loss from the queries and keys, or the MiniLMv2 relations
of the queries, keys and values, with no ``[L, L]`` map ever made), an adapter also:

- overrides ``attention_inputs_unsupported(blocks) -> str | None`` to return None (the default
  returns a reason: maps only) or, where some of those 0-based blocks cannot be seen through their
  queries and keys alone, the reason;
- accepts ``features(..., attention_inputs="qk" | "qkv")``, passed only in those modes, and then
  returns, instead of maps, ``Features.attention_inputs``: one :class:`AttentionInputs` per block
  of ``attentions``, with the queries ``[B, H, L, d]``, keys ``[B, H_kv, L, d]`` (``H % H_kv ==
  0``; grouped-query keys as they are) and, for ``"qkv"``, values ``[B, H_kv, L, d_v]`` that the
  block's attention computes ``softmax(q k^T * scaling + mask) v`` from (after rotary embeddings),
  its ``scaling`` (None: ``d ** -0.5``) and whether it is ``causal`` (None: the adapter's
  ``causal``); its scores must be exactly that, the padding mask and (if causal) ``j <= i`` aside.

transformers models: fastkd's attention function, registered with transformers'
``AttentionInterface`` under the name ``"fastkd"``, runs in the stages with ``att``. With
``attention="maps"`` it computes eager attention for the blocks whose maps were asked for and
returns their probabilities before dropout (dropout still applies to the attention output as
usual), and calls SDPA for every other block. With ``"qk"``/``"relations"`` it keeps, for the blocks
asked for, the ``query``, ``key`` (and ``value``) tensors and the ``scaling`` it is called with and
the module's causality (``is_causal``), and computes every block's output with SDPA
(``sdpa_attention_forward``): no map is made. A model whose attention scores are more than ``q k^T *
scaling`` is refused for those two modes (:func:`attention_inputs_problem`: attention logit
soft-capping, a sliding or chunked window, ALiBi; checked again per call: ``softcap``, a
``sliding_window`` shorter than the sequence, attention sinks, a ``position_bias``). Stages without
``att`` run the model's own attention implementation (SDPA by default). The LM head is
``get_output_embeddings()``: a plain ``lm_head`` linear layer (Llama, Qwen2, GPT-2, ...), or BERT's
``cls.predictions``, whose transform (dense, activation, LayerNorm) is applied to the final hidden
states to make the head input; such a model is a masked LM unless ``config.is_decoder``, a model
with an ``lm_head`` is causal. Other heads need a :class:`ModelAdapter`. Final logits transformed
after the head (:func:`config_head_transform`) are read from the config, or its text config:
Gemma-2/3's ``final_logit_softcapping`` is the ``softcap``, Cohere's ``logit_scale`` the
``logit_scale``, Granite's ``logits_scaling`` divides (``logit_scale = 1 / logits_scaling``). A
config with another field that transforms the final logits (``UNAPPLIED_LOGIT_TRANSFORMS``), or any
field naming logits that fastkd does not know, is refused where the head is used.
"""

from __future__ import annotations

import abc
import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_NAME = "fastkd"

# transformers config fields that transform the final logits, as config_head_transform applies them.
SOFTCAP_FIELD = "final_logit_softcapping"  # Gemma-2/3: softcap
SCALE_FIELDS = {"logit_scale": False, "logits_scaling": True}  # Cohere, Granite -> whether it divides
# Config fields that transform the final logits in ways fastkd does not apply -> their value when they do not.
UNAPPLIED_LOGIT_TRANSFORMS = {
    "logits_soft_cap": None,  # RecurrentGemma
    "output_logit_soft_cap": None,  # xLSTM
    "output_multiplier": 1,  # MuseGlimmer, MuseSpark
    "lm_head_multiplier": 1,  # Falcon-H1
    "logits_mup_width_multiplier": 1,  # Inkling
}
# Config fields whose names mention logits but that leave the final logits as they are.
NOT_FINAL_LOGITS = frozenset({
    "attn_logit_softcapping", "attention_logit_cap", "conf_attention_logit_cap", "moe_router_logit_softcapping",
    "output_router_logits", "num_logits_to_keep",
})


class AttentionInputs(NamedTuple):
    """What one block's attention computes its scores ``q k^T * scaling`` from (module docstring)."""

    query: torch.Tensor  # [B, H, L, d], as attention sees it (after rotary embeddings)
    key: torch.Tensor  # [B, H_kv, L, d], H % H_kv == 0
    value: torch.Tensor | None = None  # [B, H_kv, L, d_v], when asked for with attention_inputs="qkv"
    scaling: float | None = None  # None: d ** -0.5
    causal: bool | None = None  # whether key j > i is dropped; None: the adapter's ``causal``


class Features(NamedTuple):
    """What a model returned for one stage; empty lists and ``None`` for what was not asked."""

    hidden: list[torch.Tensor]
    attentions: list[torch.Tensor]
    head_input: torch.Tensor | None
    attention_inputs: Sequence[AttentionInputs] = ()


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
        """The hidden states, attention probabilities and LM-head input asked for (module docstring).

        An adapter that gives attention inputs also takes ``attention_inputs="qk" | "qkv"`` (passed
        only with the runner's ``attention="qk"``/``"relations"``) and then returns
        ``Features.attention_inputs`` for the blocks in ``attentions`` instead of their maps.
        """

    def lm_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight [V, D], bias [V] or None)`` of the LM head's final linear layer."""
        raise ValueError(f"{type(self.module).__name__} has no LM head, so a stage with 'logit' cannot use it")

    def head_transform(self) -> tuple[float, float | None]:
        """``(logit_scale, softcap)``: the final logits are ``softcap * tanh(z / softcap)`` (``z`` when
        ``softcap`` is None) of ``z = (h W^T + b) * logit_scale``, ``W, b = lm_head()``."""
        return 1.0, None

    def set_attention_maps(self, enabled: bool) -> None:
        """Called when a stage starts: whether the stage has ``att`` (maps or attention inputs will be asked for)."""

    def attention_inputs_unsupported(self, blocks: Sequence[int]) -> str | None:
        """Why ``features`` cannot return the :class:`AttentionInputs` of ``blocks`` (None when it can)."""
        return (
            f"{type(self).__name__} gives attention maps only (a ModelAdapter that returns queries and keys "
            "overrides attention_inputs_unsupported and returns Features.attention_inputs)"
        )


# --------------------------------------------------------------------------------------------
# Pre-dropout attention maps through transformers' attention interface.


class _Recorder:
    """Counts the attention calls of one forward pass and keeps what the wanted blocks give: their
    maps (``inputs`` None) or their :class:`AttentionInputs` (``inputs`` ``"qk"`` or ``"qkv"``)."""

    def __init__(self, wanted: Sequence[int], inputs: str | None = None) -> None:
        self.wanted = frozenset(wanted)
        self.inputs = inputs
        self.calls = 0
        self.maps: dict[int, torch.Tensor] = {}
        self.recorded: dict[int, AttentionInputs] = {}


_active: _Recorder | None = None


@contextlib.contextmanager
def _recording(wanted: Sequence[int], inputs: str | None = None) -> Iterator[_Recorder]:
    global _active
    recorder = _Recorder(wanted, inputs)
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


def _unseen_in_call(kwargs: Mapping[str, object], keys: int) -> str | None:
    """What of an attention call's arguments changes its scores beyond ``q k^T * scaling`` and the
    padding/causal mask (None when nothing does)."""
    if kwargs.get("softcap") is not None:
        return f"attention logit soft-capping (softcap={kwargs['softcap']!r})"
    window = kwargs.get("sliding_window")
    if window is not None and keys > window:
        return f"a sliding window of {window} keys over {keys} (sliding_window)"
    for name in ("s_aux", "sinks"):
        if kwargs.get(name) is not None:
            return f"attention sinks ({name})"
    if kwargs.get("position_bias") is not None:
        return "a position bias added to the scores (position_bias)"
    return None


def attention_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """transformers attention function ``"fastkd"``: for the recorded blocks, eager with pre-dropout
    maps, or SDPA with their queries and keys kept (module docstring); SDPA for every other block."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    recorder = _active
    if recorder is not None:
        index = recorder.calls
        recorder.calls += 1
        if index in recorder.wanted and recorder.inputs is None:
            if kwargs.get("softcap") is not None:
                raise ValueError("fastkd attention maps do not support attention logit soft-capping (softcap)")
            output, probs = _eager_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal)
            recorder.maps[index] = probs
            return output, probs
        if index in recorder.wanted:
            unseen = _unseen_in_call(kwargs, key.shape[2])
            if unseen is not None:
                raise ValueError(
                    f"{type(module).__name__} (attention call {index}) applies {unseen}, which the queries and "
                    "keys do not show; use attention='maps'"
                )
            causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
            recorder.recorded[index] = AttentionInputs(
                query, key, value if recorder.inputs == "qkv" else None, scaling, bool(causal)
            )
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


def attention_inputs_problem(config, blocks: Sequence[int]) -> str | None:
    """Why the attention of the 0-based ``blocks`` of a model with ``config`` is more than ``q k^T *
    scaling`` and the padding/causal mask (so ``attention="qk"``/``"relations"`` cannot see it), or None."""
    text = config.get_text_config()
    for part in (config,) if text is config else (config, text):
        cap = getattr(part, "attn_logit_softcapping", None)
        if cap is not None:
            return f"its config sets attn_logit_softcapping={cap!r} (soft-capped attention scores)"
        if getattr(part, "alibi", False):
            return "its config sets alibi=True (a position bias added to the attention scores)"
        window = getattr(part, "sliding_window", None)
        types = getattr(part, "layer_types", None)
        if types is not None:
            windowed = ("sliding_attention", "chunked_attention")
            local = [(i, types[i]) for i in blocks if i < len(types) and types[i] in windowed]
            if local:
                i, kind = local[0]
                size = window if kind == "sliding_attention" else getattr(part, "attention_chunk_size", None)
                return f"its config sets layer_types[{i}]={kind!r} (a window of {size} keys)"
        elif window is not None and getattr(part, "use_sliding_window", True) is not False:
            return f"its config sets sliding_window={window!r} (sliding-window attention)"
    return None


def config_head_transform(config) -> tuple[float, float | None]:
    """``(logit_scale, softcap)`` of a transformers model's final logits (see
    :meth:`ModelAdapter.head_transform`), from ``config`` and its text config: ``softcap =
    final_logit_softcapping``, ``logit_scale = logit_scale / logits_scaling`` (each 1 when unset).

    ValueError when a field of ``UNAPPLIED_LOGIT_TRANSFORMS`` changes the logits, when a field whose
    name mentions logits is none of those fastkd knows, or when a value is not a finite number > 0.
    """
    text = config.get_text_config()
    parts = (config,) if text is config else (config, text)

    def refused(field, value, why):
        return ValueError(
            f"{type(config).__name__}: its config sets {field}={value!r}, {why}; the LM head's logits cannot be "
            "made as this model makes them, so a stage whose losses use the LM head cannot use it (a "
            "fastkd.runner.ModelAdapter whose head_transform() says how its logits are made can)"
        )

    known = {SOFTCAP_FIELD, *SCALE_FIELDS, *UNAPPLIED_LOGIT_TRANSFORMS, *NOT_FINAL_LOGITS}
    values = {}
    for part in parts:
        for field, value in vars(part).items():
            if value is None or field.startswith("_"):
                continue
            if field in UNAPPLIED_LOGIT_TRANSFORMS and value != UNAPPLIED_LOGIT_TRANSFORMS[field]:
                raise refused(field, value, "which transforms the final logits in a way fastkd does not apply")
            if "logit" in field.lower() and field not in known and value is not False:
                raise refused(field, value, "a field fastkd does not know, which may transform the final logits")
            if field == SOFTCAP_FIELD or field in SCALE_FIELDS:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value > 0
                ):
                    raise refused(field, value, "expected a finite number > 0")
                values[field] = float(value)
    scale = 1.0
    for field, divides in SCALE_FIELDS.items():
        value = values.get(field, 1.0)
        scale = scale / value if divides else scale * value
    return scale, values.get(SOFTCAP_FIELD)


def _keep_output_capture(model: nn.Module) -> None:
    """Let ``output_hidden_states`` work on a model whose classes were swapped after it was built.

    transformers records hidden states with hooks looked up by the model's class (name), registered
    when the model is built; FSDP2's ``fully_shard`` swaps each sharded module's class for a
    subclass, which has no entry, so the hidden states would silently be None. Each submodel's
    entry is registered again under its class now.
    """
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # a transformers without class-keyed output capture
        return
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel) and not _CAN_RECORD_REGISTRY.get(module):
            _CAN_RECORD_REGISTRY[module] = module._can_record_outputs


class TransformersAdapter(ModelAdapter):
    """A transformers model (causal LM such as Llama, Qwen2, GPT-2; encoder such as BERT)."""

    def __init__(self, model: nn.Module) -> None:
        _keep_output_capture(model)
        config = model.config
        self.module = model
        self.num_layers = config.num_hidden_layers
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.causal = _mlm_predictions(model) is None or bool(getattr(config, "is_decoder", False))
        self._own_attention = config._attn_implementation
        register_attention()

    def attention_inputs_unsupported(self, blocks: Sequence[int]) -> str | None:
        return attention_inputs_problem(self.module.config, blocks)

    def set_attention_maps(self, enabled: bool) -> None:
        name = ATTENTION_NAME if enabled else self._own_attention
        if self.module.config._attn_implementation != name:
            self.module.set_attn_implementation(name)

    def lm_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        _, head = _head_parts(self.module)
        return head.weight, head.bias

    def head_transform(self) -> tuple[float, float | None]:
        return config_head_transform(self.module.config)

    def features(self, batch, *, hidden, attentions, head_input, attention_inputs=None) -> Features:
        if attention_inputs not in (None, "qk", "qkv"):
            raise ValueError(f"attention_inputs: expected None, 'qk' or 'qkv', got {attention_inputs!r}")
        inputs = {name: value for name, value in batch.items() if name != "labels"}
        base = self.module.base_model
        if attentions and self.module.config._attn_implementation != ATTENTION_NAME:
            raise RuntimeError("attention maps were asked for, but set_attention_maps(True) was not called")
        with _recording(attentions, attention_inputs) if attentions else contextlib.nullcontext() as recorder:
            out = base(**inputs, output_hidden_states=bool(hidden), use_cache=False, return_dict=True)
        maps, recorded = [], []
        if attentions:
            kept = recorder.maps if attention_inputs is None else recorder.recorded
            missing = [i for i in attentions if i not in kept]
            if missing:
                what = "attention map" if attention_inputs is None else "attention query and key"
                raise RuntimeError(
                    f"{type(self.module).__name__}: no {what} was recorded for block(s) {missing} "
                    f"({recorder.calls} attention call(s) in the forward pass)"
                )
            if attention_inputs is None:
                maps = [recorder.maps[i] for i in attentions]
            else:
                recorded = [recorder.recorded[i] for i in attentions]
        head_in = None
        if head_input:
            transform, _ = _head_parts(self.module)
            head_in = out.last_hidden_state if transform is None else transform(out.last_hidden_state)
        return Features([out.hidden_states[i] for i in hidden], maps, head_in, recorded)


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
