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

Reusable parts (UniPELT builds on them): :class:`PrefixKV` (the table, optionally reparametrised,
and its per-layer keys/values) and :func:`subpeft.core.prompt.rewrite_call` (puts per-layer
keys/values into a model call).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core.errors import ConfigError
from ...core.prompt import cache_argument, new_cache
from ...core.registry import register
from ._virtual import VirtualAdapter, VirtualTokens, embedding_factory


def split_layers(table: torch.Tensor, num_layers: int, kv_heads: int, batch_size: int
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Table ``(p, 2·L·d_kv)`` → per-layer ``(key, value)``, each ``(batch, kv_heads, p, head_dim)``."""
    p = table.shape[0]
    per = table.view(p, 2 * num_layers, kv_heads, -1).permute(1, 2, 0, 3)  # (2L, heads, p, head_dim)
    return [(per[2 * i].unsqueeze(0).expand(batch_size, -1, -1, -1),
             per[2 * i + 1].unsqueeze(0).expand(batch_size, -1, -1, -1)) for i in range(num_layers)]


def join_layers(layers_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Inverse of :func:`split_layers` for one example: ``[(k, v)]`` with k ``(kv_heads, p, head_dim)``
    → the table ``(p, 2·L·d_kv)``."""
    per = torch.stack([t for kv in layers_kv for t in kv])  # (2L, heads, p, head_dim)
    return per.permute(2, 0, 1, 3).reshape(per.shape[2], -1)


class PrefixKV(nn.Module):
    """p prefix slots for every layer: the table ``(p, 2·L·d_kv)``, stored or produced by the
    reparametrisation MLP (``projection_dim``), and its per-layer keys/values."""

    def __init__(self, num_virtual: int, num_layers: int, kv_heads: int, head_dim: int, *, d_model: int | None = None,
                 projection_dim: int | None = None, **factory: Any) -> None:
        super().__init__()
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        width = 2 * num_layers * kv_heads * head_dim
        if projection_dim:
            if not d_model:
                raise ConfigError("the prefix reparametrisation needs d_model (the width of its p inputs)")
            self.embedding = nn.Parameter(torch.randn(num_virtual, d_model, **factory))
            self.transform = nn.Sequential(nn.Linear(d_model, projection_dim, **factory), nn.Tanh(),
                                           nn.Linear(projection_dim, width, **factory))
        else:
            self.prompt_embeddings = nn.Parameter(torch.randn(num_virtual, width, **factory))

    @property
    def reparametrised(self) -> bool:
        return hasattr(self, "transform")

    def table(self) -> torch.Tensor:
        return self.transform(self.embedding) if self.reparametrised else self.prompt_embeddings

    def kept_table(self) -> torch.Tensor:
        """The table as saved: the MLP's output (a detached copy) while reparametrised, else the parameter."""
        if self.reparametrised:
            with torch.no_grad():
                return self.table().detach().clone()
        return self.prompt_embeddings

    def layers_kv(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return split_layers(self.table(), self.num_layers, self.kv_heads, batch_size)

    def fold(self) -> None:
        """Replace the MLP by the table it produces now (the kept form)."""
        if not self.reparametrised:
            return
        table = self.kept_table()
        del self.transform
        del self.embedding
        self.prompt_embeddings = nn.Parameter(table)


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
