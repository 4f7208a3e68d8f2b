"""SSL, scaling the input-side singular subspace (Si et al., 2024): φ(W) = W·diag(l).

y = W·(l ⊙ x) + b, l ∈ ℝ^d_in, l = 1 at attach; d_in trainable numbers per layer. Mergeable
(merging scales the weight's columns; the bias is unchanged). Layers: nn.Linear, transformers Conv1D
(not nn.Conv2d: its d_in is c_in·kh·kw, which no per-channel input scaling covers).

SSL is exactly Hugging Face PEFT's IA3 with every target a feedforward module (PEFT scales the input
of those and leaves their bias alone), so its files are PEFT's: an IA3Config with
``feedforward_modules`` equal to ``target_modules`` (``".*"`` when the targets are a regex), and one
``ia3_l`` tensor of shape (1, d_in) per layer. Such PEFT configs read back as SSL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ...core.config import AdapterConfig
from ...core.layers import dims
from ...core.registry import register
from ...mechanisms.scaling import DiagonalScaling, all_feedforward, peft_dict, peft_fields


@dataclass
class SSL(AdapterConfig):
    """SSL. ``sp.SSL(targets=["key", "value", "intermediate.dense"])``."""

    method = "ssl"
    peft_type = "IA3"

    def to_peft_dict(self, layer_types: set[str] | frozenset[str] = frozenset()) -> dict[str, Any] | None:
        feedforward = list(self.targets) if isinstance(self.targets, list) else ".*"
        return peft_dict(self, layer_types, feedforward)

    @classmethod
    def accepts_peft(cls, data: dict[str, Any]) -> bool:
        return all_feedforward(data)

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> SSL:
        return cls(**peft_fields(data, "SSL"))


@register
class SSLAdapter(DiagonalScaling):
    config_cls = SSL
    formula = "d_in"
    trains = "input scales l"
    peft_keys = True

    def sides(self, config: SSL) -> tuple[bool, bool]:
        return (False, True)

    @classmethod
    def num_params(cls, config: SSL, base_layer: nn.Module, layer_type: str) -> int:
        return dims(base_layer, layer_type)[1]
