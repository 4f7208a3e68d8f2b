"""P-tuning v2 (Liu et al., 2022, deep prompt tuning): prefix tuning without the reparametrisation.

Every attention layer gets p trainable keys and values in front, trained directly: the table
``(p, 2·L·d_kv)`` of :mod:`.prefix` is the parameter. 2·L·p·d_kv trainable numbers, not mergeable.
For NLU, train it with a randomly initialised classification head (``modules_to_save=["classifier"]``).
Init (``init``): ``"random"`` (default) N(0, 1), as PEFT's; ``"vocab"`` the keys and values the frozen
model computes for p random vocabulary tokens (prefix initialisation "from real-token activations").
Files are PEFT's ``PREFIX_TUNING`` format with ``prefix_projection=False``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core.errors import ConfigError
from ...core.registry import register
from ...mechanisms.virtual import VirtualTokens
from .prefix import PrefixAdapter, activation_table


@dataclass(kw_only=True)
class PTuningV2(VirtualTokens):
    """P-tuning v2. ``sp.PTuningV2(num_virtual_tokens=20, init="random")`` or ``init="vocab"``."""

    method = "p_tuning_v2"
    peft_type = "PREFIX_TUNING"

    init: str = "random"

    def validate(self) -> None:
        super().validate()
        if self.init not in ("random", "vocab"):
            raise ConfigError(f'PTuningV2.init must be "random" or "vocab", got {self.init!r}')

    def to_peft_dict(self, layer_types: set[str] | frozenset[str] = frozenset()) -> dict[str, Any] | None:
        out = self._peft_common()
        if out is not None:
            out.update(prefix_projection=False, encoder_hidden_size=self.token_dim, init_weights=None)
        return out

    @classmethod
    def accepts_peft(cls, data: dict[str, Any]) -> bool:
        return not data.get("prefix_projection")

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> PTuningV2:
        return cls(**cls._peft_fields(data, {"prefix_projection", "encoder_hidden_size", "init_weights"}))


@register
class PTuningV2Adapter(PrefixAdapter):
    config_cls = PTuningV2
    formula = "2·L·p·d_kv"
    trains = "per-layer prefix keys/values"
    reparametrise = False

    def __init__(self, config: PTuningV2, model: nn.Module) -> None:
        super().__init__(config, model)
        if config.init == "vocab" and not config.folded:
            with torch.no_grad():
                self.prefix.prompt_embeddings.copy_(activation_table(model, config.num_virtual_tokens, config.num_layers))
