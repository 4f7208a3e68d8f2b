"""The base class of prompt-kind methods: one module for the whole model, not one per layer.

Prompt tuning and P-tuning change the model's input (virtual tokens before the real ones); prefix
tuning and P-tuning v2 give every attention layer extra keys and values. Neither is a function of
one weight, so a prompt-kind adapter is not attached to layers: :class:`~subpeft.core.model.TunedModel`
builds one :class:`PromptAdapter` per named adapter (``cls(config, model)``), keeps it with the
adapter's shared state (its tensors are saved once, under the keys ``shared_file_key`` gives), and
routes ``forward`` and ``generate`` through the active one:

- ``run(model, args, kwargs)`` calls ``model`` with the inputs changed (and the output put back
  in the caller's terms where needed);
- ``generate(model, args, kwargs)`` does the same for ``model.generate``.

``disable_adapter()`` bypasses it. Saving writes ``file_state()`` under ``file_config()``: a method
that trains in another form than it keeps (prefix tuning's reparametrisation MLP) returns the kept
form there, and a module built from that saved config must hold exactly those tensors (they are
loaded into ``file_state()``'s tensors in place).

How the inputs are changed (one definition for every prompt-kind method, see :meth:`PromptAdapter.rewrite`)
---------------------------------------------------------------------------------------------------------
With ``p`` virtual tokens and ``n`` real tokens in a call:

- *Input prompts* (``virtual_embeddings``): the ``p`` prompt vectors go **before** the real tokens
  (before ``[CLS]`` / ``<s>``), as in Hugging Face PEFT; the attention mask gets ``p`` ones in front,
  ``token_type_ids`` get ``p`` zeros in front.
- *Prefixes* (``virtual_kv``): every layer's self-attention gets ``p`` extra keys and values in front,
  through the model's own KV cache (the call's empty cache, e.g. the one ``generate`` made, or a new
  ``DynamicCache``, pre-filled with them: exactly what the model would hold had it already seen ``p``
  tokens); the attention mask gets ``p`` ones in front.
- **Positions** count the attended tokens, virtual ones first: virtual tokens (or prefix slots)
  take positions ``0..p-1`` and the real tokens ``p, p+1, ...`` counted over the attention mask. So a
  row gives the same outputs whether it is padded on the left, on the right or not at all (PEFT
  counts pads too, so its left-padded rows differ from the unpadded ones; for unpadded and
  right-padded inputs the two definitions agree). Explicit ``position_ids`` are taken as the real
  tokens' positions and shifted by ``p``.
- **Outputs** are in the caller's terms: logits and hidden states of the virtual positions are dropped,
  so ``out.logits`` has one row per real token (``(batch, n, vocab)``), aligned with ``input_ids``
  and ``labels`` (PEFT returns ``p + n`` rows). Attention maps (``output_attentions``) keep the virtual
  positions.
- **Labels** keep their meaning: token-level labels get ``-100`` for the virtual positions, and for a
  causal LM the first real token (which a virtual position would predict) is not a target either, so
  ``out.loss`` is computed over exactly the (context, next token) pairs of the base model's loss:
  ``out.loss == cross_entropy(out.logits[:, :-1], labels[:, 1:])``. PEFT adds the first real token
  as a target; the two losses agree whenever ``labels[:, 0] == -100``. Sequence-level labels are
  passed through.
- **The KV cache**: a cache that a routed call fills holds the ``p`` virtual entries first. A call
  that passes a non-empty cache (generation, or a caller's own incremental decoding with a cache
  returned by an earlier call) is a continuation: its mask gets the ``p`` ones and its positions the
  shift, and nothing is inserted again. ``generate`` therefore gives the same tokens with and without
  ``use_cache``, whatever the padding, and returns the caller's input ids followed by the new ids.
- **The cache's name**: transformers 5.25 renamed the models' ``past_key_values`` argument (and output
  field) ``cache``; ``generate`` passes ``cache=`` from 5.25 on and ``past_key_values=`` before, and
  ``past_key_values`` remains only a deprecated alias that a forward drops when ``cache`` is also given.
  A routed call may carry the cache under either name (:func:`passed_cache`); the model gets it under
  its own (:func:`cache_argument`, read from its forward's signature), the prefix carrier included, and
  the output's field is found by :func:`output_cache_field`. (Reading ``past_key_values`` only, on 5.25
  every decoding step of ``generate`` looked like a first call: input prompts were put in again at each
  step and the prefix went in a second cache that the model ignored.)
"""

from __future__ import annotations

import functools
import inspect
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from .config import AdapterConfig
from .errors import SubpeftError
from .instance import AdapterHooks, MethodInstance, MethodTraits, PromptInstance

IGNORE_INDEX = -100


# The names under which a transformers model takes (and returns) its KV cache: ``cache`` from
# transformers 5.25 on, ``past_key_values`` before (5.25 keeps the old name as a deprecated alias of
# the model's forward and of its outputs, but ``generate`` and the models pass only ``cache`` on).
CACHE_ARGUMENTS = ("cache", "past_key_values")


def cache_argument(model: nn.Module) -> str:
    """The name under which ``model``'s forward takes the KV cache: ``"cache"`` (transformers >= 5.25)
    or ``"past_key_values"`` (earlier). Read from the forward's signature (or, for a head whose forward
    passes the cache on in ``**kwargs``, its base model's), else from transformers' output classes."""
    seen: set[int] = set()
    for module in (model, getattr(model, "base_model", None)):
        if module is None or id(module) in seen:
            continue
        seen.add(id(module))
        sig = _signature(module.forward)
        if sig is not None:
            for name in CACHE_ARGUMENTS:
                if name in sig.parameters:
                    return name
    return _library_cache_name()


@functools.lru_cache(maxsize=1)
def _library_cache_name() -> str:
    try:
        from transformers.modeling_outputs import BaseModelOutputWithPast
    except ImportError:  # pragma: no cover - transformers is a dependency of every prompt-kind method
        return "past_key_values"
    return "cache" if "cache" in getattr(BaseModelOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


def passed_cache(call: dict[str, Any]) -> Any:
    """The KV cache a model call carries, under either name (see :data:`CACHE_ARGUMENTS`), or None."""
    given = [call[name] for name in CACHE_ARGUMENTS if call.get(name) is not None]
    if len(given) > 1 and given[0] is not given[1]:
        raise SubpeftError("the call passes two different KV caches (cache= and past_key_values=): pass one")
    return given[0] if given else None


def output_cache_field(out: Any) -> str | None:
    """The field of a model output that holds the KV cache (``cache`` or ``past_key_values``), or None."""
    keys = out.keys() if hasattr(out, "keys") else ()
    return next((name for name in CACHE_ARGUMENTS if name in keys), None)


def cache_length(cache: Any) -> int:
    """Number of tokens a KV cache already holds (0 for None or an empty cache)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    raise SubpeftError(
        f"past_key_values of type {type(cache).__name__} is not a transformers Cache; prompt-kind adapters "
        "need a Cache object (e.g. transformers.DynamicCache)"
    )


def fill_cache(cache: Any, layers_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """Put per-layer prefix keys/values (each ``(batch, kv_heads, p, head_dim)``) into an empty cache."""
    p = layers_kv[0][0].shape[-2]
    positions = torch.arange(p, device=layers_kv[0][0].device)
    for layer_idx, (k, v) in enumerate(layers_kv):
        cache.update(k, v, layer_idx, {"cache_position": positions})
    return cache


def new_cache(model: nn.Module) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=getattr(model, "config", None))


def _is_causal_lm(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return False
    can_generate = getattr(model, "can_generate", None)
    return bool(can_generate()) if callable(can_generate) else False


def _is_sequence_level(model: nn.Module) -> bool:
    return type(model).__name__.endswith(("ForSequenceClassification", "ForMultipleChoice"))


class PromptAdapter(MethodTraits, AdapterHooks, nn.Module):
    """The module of one named prompt-kind adapter (one per model, not per layer); its named adapter
    is a :class:`~subpeft.core.instance.PromptInstance`. Class attributes as in :class:`MethodTraits`."""

    kind: ClassVar[str] = "prompt"
    mergeable: ClassVar[bool] = False
    layer_types: ClassVar[tuple[str, ...]] = ()
    instance_cls: ClassVar[type[MethodInstance]] = PromptInstance

    def __init__(self, config: AdapterConfig, model: nn.Module) -> None:
        super().__init__()
        self.config = config

    @classmethod
    def prepare_config(cls, config: AdapterConfig, model: nn.Module) -> AdapterConfig:
        """The config with the model's dimensions filled in (as PEFT records them in its config)."""
        return config

    @classmethod
    def num_params(cls, config: AdapterConfig, model: nn.Module) -> int:
        """Trainable numbers of the adapter on this model (the METHODS.md formula)."""
        raise NotImplementedError

    # -- what a method provides ------------------------------------------------------------------
    @property
    def num_virtual(self) -> int:
        """p: virtual tokens (input prompts) or prefix slots (per-layer keys/values)."""
        return int(self.config.num_virtual_tokens)

    def virtual_embeddings(self, batch_size: int) -> torch.Tensor | None:
        """Input prompts ``(batch, p, d_model)`` put before the real tokens' embeddings, or None."""
        return None

    def virtual_kv(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per-layer prefix ``(key, value)``, each ``(batch, kv_heads, p, head_dim)``, or None."""
        return None

    # -- routing the model's calls -------------------------------------------------------------
    def run(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        call = bind_call(model.forward, args, kwargs)
        call, finish = self.rewrite(model, call)
        return finish(model(**call))

    def generate(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        """``model.generate`` with every forward it makes routed through :meth:`rewrite`."""
        if not hasattr(model, "generate"):
            raise SubpeftError(f"{type(model).__name__} has no generate()")
        own = model.__dict__.get("forward")
        original = model.forward

        @functools.wraps(original)
        def routed(*a: Any, **k: Any) -> Any:
            call, finish = self.rewrite(model, bind_call(original, a, k))
            return finish(original(**call))

        model.forward = routed
        try:
            return model.generate(*args, **kwargs)
        finally:
            if own is None:
                del model.forward
            else:
                model.forward = own

    def rewrite(self, model: nn.Module, call: dict[str, Any]) -> tuple[dict[str, Any], Callable[[Any], Any]]:
        """The model call with this adapter's virtual tokens put in, and the function that puts its
        output back in the caller's terms (see the module docstring for the definition)."""
        return rewrite_call(model, call, self.num_virtual, self.virtual_embeddings, self.virtual_kv,
                            name=type(self).__name__)

    # -- saving --------------------------------------------------------------------------------
    def file_state(self) -> dict[str, torch.Tensor]:
        return self.state_dict()

    def file_config(self) -> AdapterConfig:
        return self.config


def rewrite_call(
    model: nn.Module,
    call: dict[str, Any],
    num_virtual: int,
    prompts: Callable[[int], torch.Tensor | None] | None = None,
    prefix: Callable[[int], list[tuple[torch.Tensor, torch.Tensor]] | None] | None = None,
    name: str = "prompt-kind adapter",
) -> tuple[dict[str, Any], Callable[[Any], Any]]:
    """One model call (keyword arguments) with p = ``num_virtual`` virtual tokens put in.

    ``prompts(batch)`` gives input prompts ``(batch, p, d_model)`` and/or ``prefix(batch)`` per-layer
    ``(key, value)`` pairs ``(batch, kv_heads, p, head_dim)``; either may be None. Returns the call to
    make and the function that puts its output back in the caller's terms. The definition (masks,
    positions, labels, outputs, cache continuation) is in this module's docstring. Reusable by any
    method that adds virtual tokens or prefixes (UniPELT's prefix, e.g. from a forward pre-hook).
    """
    call = dict(call)
    ids, embeds = call.get("input_ids"), call.get("inputs_embeds")
    ref = ids if ids is not None else embeds
    if ref is None:
        raise SubpeftError(f"{name} needs input_ids or inputs_embeds")
    batch, n = ref.shape[0], ref.shape[1]
    p = int(num_virtual)
    device = ref.device
    # the KV cache, under the name this transformers version uses (a caller or generate may use either)
    cache_name = cache_argument(model)
    past = passed_cache(call)
    cache_given = any(name in call for name in CACHE_ARGUMENTS)
    for name in CACHE_ARGUMENTS:
        call.pop(name, None)
    if cache_given:
        call[cache_name] = past
    seen = cache_length(past)
    fresh = seen == 0
    if not fresh and seen < p:
        raise SubpeftError(
            f"past_key_values holds {seen} tokens, fewer than the adapter's {p} virtual tokens: a cache passed "
            "to a model with a prompt-kind adapter must come from an earlier call of that model"
        )
    virtual = (prompts(batch) if prompts is not None else None) if fresh else None
    kv = (prefix(batch) if prefix is not None else None) if fresh else None
    inserted = p if virtual is not None else 0  # virtual positions in this call's sequence

    # attention mask: p ones in front of the caller's mask (which covers the cache and this call)
    mask = call.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        raise SubpeftError(f"{name} needs a 2-D attention mask (batch, length); got shape {tuple(mask.shape)}")
    if mask is None:
        mask = torch.ones(batch, (seen - p if not fresh else 0) + n, dtype=torch.long, device=device)
    full_mask = torch.cat([torch.ones(batch, p, dtype=mask.dtype, device=mask.device), mask], dim=1)
    call["attention_mask"] = full_mask

    # positions: virtual 0..p-1, real tokens p.. counted over the mask (or the caller's + p)
    positions = call.get("position_ids")
    if positions is not None:
        positions = positions + p
        if inserted:
            front = torch.arange(p, device=positions.device).expand(positions.shape[0], p)
            positions = torch.cat([front, positions], dim=1)
        call["position_ids"] = positions
    elif _takes(model, "position_ids"):
        counted = full_mask.long().cumsum(-1) - 1
        call["position_ids"] = counted.clamp(min=0)[:, -(n + inserted):]
    _check_positions(model, call.get("position_ids"), p)

    if inserted:
        types = call.get("token_type_ids")
        if types is not None:
            zeros = torch.zeros(types.shape[0], p, dtype=types.dtype, device=types.device)
            call["token_type_ids"] = torch.cat([zeros, types], dim=1)
        labels = call.get("labels")
        if labels is not None and labels.dim() >= 2 and labels.shape[1] == n and not _is_sequence_level(model):
            pad = torch.full((labels.shape[0], p, *labels.shape[2:]), IGNORE_INDEX, dtype=labels.dtype,
                             device=labels.device)
            labels = torch.cat([pad, labels], dim=1)
            if _is_causal_lm(model):
                labels[:, p] = IGNORE_INDEX  # the first real token would be predicted by a virtual one
            call["labels"] = labels
        if embeds is None:
            embeds = model.get_input_embeddings()(ids)
        call["inputs_embeds"] = torch.cat([virtual.to(embeds.dtype), embeds], dim=1)
        call["input_ids"] = None
    created = kv is not None and past is None  # a cache made here only to carry the prefix
    if kv is not None:
        dtype = _cache_dtype(model)
        kv = [(k.to(dtype), v.to(dtype)) for k, v in kv]
        call[cache_name] = fill_cache(past if past is not None else new_cache(model), kv)

    as_tuple = call.get("return_dict") is False
    if as_tuple:
        call["return_dict"] = True

    def finish(out: Any) -> Any:
        if inserted:
            out = _drop_virtual(out, n)
        field = output_cache_field(out) if created and call.get("use_cache") is False else None
        if field is not None:  # the caller asked for no cache: do not hand back the prefix carrier
            _clear_field(out, field)
        if as_tuple and hasattr(out, "to_tuple"):
            out = out.to_tuple()
        return out

    return call, finish


def _position_limit(model: nn.Module) -> int | None:
    """Size of a learned absolute position table (BERT's, GPT-2's), or None (rotary, relative)."""
    base = getattr(model, "base_model", model)
    for holder, name in ((getattr(base, "embeddings", None), "position_embeddings"), (base, "wpe")):
        table = getattr(holder, name, None) if holder is not None else None
        if isinstance(table, nn.Embedding):
            return table.num_embeddings
    return None


def _check_positions(model: nn.Module, positions: torch.Tensor | None, p: int) -> None:
    limit = _position_limit(model) if positions is not None and positions.numel() else None
    if limit is not None and int(positions.max()) >= limit:
        raise SubpeftError(
            f"{p} virtual tokens + the real tokens need position {int(positions.max())}, but the model has "
            f"{limit} position embeddings: shorten the input or use fewer virtual tokens"
        )


# -- helpers ---------------------------------------------------------------------------------------
def _signature(fn: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def bind_call(fn: Callable, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Positional arguments of a model call turned into keywords (HF forwards take keywords)."""
    if not args:
        return dict(kwargs)
    sig = _signature(fn)
    if sig is None:
        raise SubpeftError("prompt-kind adapters need keyword arguments (input_ids=..., attention_mask=...)")
    bound = sig.bind_partial(*args, **kwargs)
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise SubpeftError("prompt-kind adapters need keyword arguments beyond the model's named inputs")
        else:
            out[name] = value
    return out


def _takes(model: nn.Module, name: str) -> bool:
    sig = _signature(model.forward)
    return sig is not None and name in sig.parameters


def _cache_dtype(model: nn.Module) -> torch.dtype:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    return weight.dtype if weight is not None and weight.is_floating_point() else torch.get_default_dtype()


def _clear_field(out: Any, field: str) -> None:
    """Set an output field to None as the model leaves an unset one: absent from the keys and the tuple
    (a ModelOutput refuses ``del``; its dict entry goes, the attribute stays as None)."""
    if isinstance(out, OrderedDict):
        OrderedDict.__delitem__(out, field)
        setattr(out, field, None)  # a None value is not put back into the dict
    else:
        out[field] = None


def _drop_virtual(out: Any, n: int) -> Any:
    """Keep only the last n (real) positions of per-token outputs."""

    def cut(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() >= 3 and t.shape[1] > n:
            return t[:, t.shape[1] - n:]
        return t

    for field in ("logits", "last_hidden_state", "start_logits", "end_logits"):
        value = out.get(field) if hasattr(out, "get") else None
        if field in ("start_logits", "end_logits") and isinstance(value, torch.Tensor) and value.dim() == 2:
            if value.shape[1] > n:
                out[field] = value[:, value.shape[1] - n:]
        elif value is not None:
            out[field] = cut(value)
    hidden = out.get("hidden_states") if hasattr(out, "get") else None
    if isinstance(hidden, tuple):
        out["hidden_states"] = tuple(cut(h) for h in hidden)
    return out
