"""(IA)³ (Liu et al., 2022): φ(W) = diag(l)·W, scaling the output rows; the bias is not scaled.

y = l ⊙ (W·x) + b, l ∈ ℝ^d_out, l = 1 at attach; d_out trainable numbers per layer. Mergeable
(merging scales the weight's rows and leaves the bias as it is). Layers: nn.Linear, transformers
Conv1D, nn.Conv2d (one scale per output channel).

``feedforward`` (optional) names targets whose *input* is scaled instead, φ(W) = W·diag(l),
l ∈ ℝ^d_in: faithful (IA)³ scales the FFN's post-activation hidden, i.e. the input of the FFN
down-projection (subpeft's SSL on that layer). Entries match as PEFT's ``feedforward_modules`` do:
a regex string matched against the whole module name, or list entries that module names end with.

Differences from Hugging Face PEFT's IA3: PEFT also scales the bias of output-scaled layers,
y = l ⊙ (W·x + b). ``scale_bias=True`` selects that form. With the default (bias unscaled, as
METHODS.md specifies), files are written in PEFT's format (``ia3_l`` tensors, an IA3Config) only
when no output-scaled layer has a non-zero bias, where both forms compute the same; otherwise in
subpeft's native format. A PEFT IA3 config reads as ``IA3(scale_bias=True, feedforward=...)``, so
a PEFT adapter computes in subpeft exactly what it computes in PEFT, biases included; or as ``SSL``
when every target is a feedforward module (input scaling: no bias question).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ...core.config import AdapterConfig
from ...core.errors import UnsupportedLayerError
from ...core.layers import dims
from ...core.registry import register
from ...mechanisms.scaling import (
    DiagonalScaling,
    all_feedforward,
    check_feedforward,
    feedforward_matches,
    peft_dict,
    peft_fields,
)


@dataclass
class IA3(AdapterConfig):
    """(IA)³. ``sp.IA3(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"])``."""

    method = "ia3"
    peft_type = "IA3"

    feedforward: list[str] | str | None = None
    scale_bias: bool = False  # True: PEFT's form l ⊙ (W·x + b)

    def validate(self) -> None:
        check_feedforward(self, self.feedforward)

    def to_peft_dict(self, layer_types: set[str] | frozenset[str] = frozenset()) -> dict[str, Any] | None:
        # [] rather than None: PEFT fills a missing feedforward_modules from its per-architecture table
        return peft_dict(self, layer_types, self.feedforward if self.feedforward is not None else [])

    @classmethod
    def accepts_peft(cls, data: dict[str, Any]) -> bool:
        return not all_feedforward(data)  # those are SSL

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> IA3:
        ff = data.get("feedforward_modules") or None
        return cls(feedforward=sorted(ff) if isinstance(ff, (set, tuple)) else ff, scale_bias=True,
                   **peft_fields(data, "IA3"))


@register
class IA3Adapter(DiagonalScaling):
    config_cls = IA3
    formula = "d_out (d_in on feedforward targets)"
    trains = "output scales l (input scales on feedforward targets)"
    layer_types = ("linear", "conv1d", "conv2d")
    peft_keys = True

    def sides(self, config: IA3) -> tuple[bool, bool]:
        feedforward = feedforward_matches(self.layer_name, config.feedforward)
        if feedforward and self.layer_type == "conv2d":
            raise UnsupportedLayerError(
                f"ia3: feedforward (input-side) scaling of nn.Conv2d {self.layer_name!r} is not supported (its d_in "
                f"is c_in·kh·kw); leave it out of feedforward= to scale its output channels"
            )
        return (not feedforward, feedforward)

    @classmethod
    def num_params(cls, config: IA3, base_layer: nn.Module, layer_type: str) -> int:
        return dims(base_layer, layer_type)[0]

    @classmethod
    def model_num_params(cls, config: AdapterConfig, layers: list[tuple[str, nn.Module, str]]) -> int:
        return sum(
            dims(layer, kind)[1] if feedforward_matches(name, config.feedforward) else dims(layer, kind)[0]
            for name, layer, kind in layers
        )
