"""Prefix tuning (Li & Liang, 2021): p trainable keys and values in front of every attention layer.

Every self-attention layer ℓ attends over ``[P_k^ℓ; K]`` and ``[P_v^ℓ; V]``; the real tokens' own keys
and values are unchanged. The kept tensor is one table ``(p, 2·L·d_kv)`` (d_kv = kv_heads · head_dim),
laid out as PEFT's ``prompt_embeddings``: per virtual slot, layer 0's key, layer 0's value, layer
1's key, ... each ``(kv_heads, head_dim)``. While training the table is reparametrised,
``P = MLP(P')`` with ``P'`` ∈ ℝ^{p×d_model} (N(0, 1)) and MLP = Linear(d_model, h) → tanh →
Linear(h, 2·L·d_kv), h = ``projection_dim`` (default 512); saving writes the table it produces, and
``tuned.finalize()`` folds the MLP away in place. Trainable numbers: p·d + d·h + h + h·2Ld_kv + 2Ld_kv
while training, 2·L·p·d_kv kept. Not mergeable.

How the prefix gets in: through the model's own KV cache (see :mod:`subpeft.core.prompt`): a
``DynamicCache`` holding the prefix as if the model had already seen p tokens, the attention mask
with p ones in front, and the real tokens at positions p, p+1, ... (PEFT's definition). transformers'
BERT (5.x) uses a cache passed to its encoder layers and sizes its bidirectional mask by the 2-D
mask, and Llama-family decoders use it natively, so one mechanism serves encoders, decoders and
cached generation. Prefix keys are used as given (no rotary embedding is applied to them).

Reusable parts (UniPELT builds on them): :class:`~subpeft.mechanisms.prefix_kv.PrefixKV` (the table,
optionally reparametrised, and its per-layer keys/values; re-exported here) and
:func:`subpeft.core.prompt.rewrite_call` (puts per-layer keys/values into a model call).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core.prompt import cache_argument, new_cache
from ...core.registry import register
from ...mechanisms.prefix_kv import PrefixKV, join_layers, split_layers
from ...mechanisms.virtual import VirtualAdapter, VirtualTokens, embedding_factory

__all__ = ["PrefixAdapter", "PrefixKV", "PrefixTuning", "PrefixTuningAdapter", "activation_table", "join_layers",
           "split_layers"]


def activation_table(model: nn.Module, num_virtual: int, num_layers: int) -> torch.Tensor:
    """The keys/values the model computes for p random vocabulary tokens, as a prefix table."""
    emb = model.get_input_embeddings()
    ids = torch.randint(0, emb.num_embeddings, (1, num_virtual), device=emb.weight.device)
    cache = new_cache(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(input_ids=ids, **{cache_argument(model): cache})
    finally:
        model.train(was_training)
    layers = cache.layers[:num_layers]
    return join_layers([(layer.keys[0], layer.values[0]) for layer in layers]).float()


@dataclass(kw_only=True)
class PrefixTuning(VirtualTokens):
    """Prefix tuning. ``sp.PrefixTuning(num_virtual_tokens=20, projection_dim=512)``."""

    method = "prefix_tuning"
    peft_type = "PREFIX_TUNING"

    projection_dim: int = 512

    def validate(self) -> None:
        super().validate()
        self._check_positive_int("projection_dim")

    def to_peft_dict(self, layer_types: set[str] | frozenset[str] = frozenset()) -> dict[str, Any] | None:
        out = self._peft_common()
        if out is not None:
            out.update(prefix_projection=True, encoder_hidden_size=self.projection_dim, init_weights=None)
        return out

    @classmethod
    def accepts_peft(cls, data: dict[str, Any]) -> bool:
        return bool(data.get("prefix_projection"))

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> PrefixTuning:
        fields = cls._peft_fields(data, {"prefix_projection", "encoder_hidden_size", "init_weights"})
        return cls(**fields, projection_dim=int(data.get("encoder_hidden_size") or 512))


class PrefixAdapter(VirtualAdapter):
    """Per-layer prefix keys/values (prefix tuning, P-tuning v2) routed through the KV cache."""

    uses_kv = True
    reparametrise = True  # prefix tuning trains through the MLP; P-tuning v2 does not

    def __init__(self, config: VirtualTokens, model: nn.Module) -> None:
        super().__init__(config, model)
        L, heads = config.num_layers, config.num_attention_heads
        projection = getattr(config, "projection_dim", None) if self.reparametrise and not config.folded else None
        factory = embedding_factory(model)
        self.prefix = PrefixKV(config.num_virtual_tokens, L, heads, config.token_dim // heads,
                               d_model=model.get_input_embeddings().embedding_dim, projection_dim=projection, **factory)
        if config.folded:
            with torch.no_grad():
                self.prefix.prompt_embeddings.zero_()  # the values come from a file

    def virtual_kv(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.prefix.layers_kv(batch_size)

    def file_state(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.prefix.kept_table()}

    def file_config(self) -> VirtualTokens:
        return self.config.replace(folded=True)

    def finalize(self) -> VirtualTokens | None:
        if self.config.folded:
            return None
        self.prefix.fold()
        self.config = self.config.replace(folded=True)
        return self.config

    @classmethod
    def num_params(cls, config: VirtualTokens, model: nn.Module) -> int:
        config = cls.prepare_config(config, model)
        p, L, d_kv = config.num_virtual_tokens, config.num_layers, config.token_dim
        kept = 2 * L * p * d_kv
        if config.folded or not cls.reparametrise:
            return kept
        d, h = model.get_input_embeddings().embedding_dim, config.projection_dim
        return p * d + (d * h + h) + (h * 2 * L * d_kv + 2 * L * d_kv)


@register
class PrefixTuningAdapter(PrefixAdapter):
    config_cls = PrefixTuning
    formula = "2·L·p·d_kv kept (+ the MLP while training)"
    trains = "per-layer prefix keys/values through an MLP"
