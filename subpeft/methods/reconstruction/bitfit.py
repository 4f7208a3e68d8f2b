"""BitFit (Ben Zaken et al., 2022): train only the biases, b' = b + Δb; every weight stays frozen.

y = base(x) + Δb, Δb ∈ ℝ^d_out (the bias's size), Δb = 0 at attach; d_out trainable numbers per
layer that has a bias (layers without one are not accepted). Mergeable: merging writes b + Δb into
the bias. Layers: nn.Linear, transformers Conv1D, nn.Conv2d (per output channel) and norms with a
bias (nn.LayerNorm, Hugging Face ``*LayerNorm``): every one of them is affine in its bias with
coefficient 1, so adding Δb to the output is exact, also on top of other adapters.

``targets=None`` (the default) means ``"all"``: every bias of the model, as in the paper; name
modules to train only chosen biases. Hugging Face PEFT has no BitFit (its ``bias="all"`` option
trains biases beside another method), so files are subpeft's format (one ``bias_delta`` per layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ...core.adapter import Adapter
from ...core.config import AdapterConfig
from ...core.layers import factory
from ...core.registry import register
from ...core.weights import read_weight, weight_access


def _has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), torch.Tensor)


@dataclass
class BitFit(AdapterConfig):
    """BitFit. ``sp.BitFit()`` trains every bias; ``sp.BitFit(targets=["query", "value"])`` chosen ones."""

    method = "bitfit"
    default_targets: ClassVar[list[str] | str | None] = "all"


@register
class BitFitAdapter(Adapter):
    config_cls = BitFit
    additive = True
    formula = "d_out (layers with a bias)"
    trains = "bias offsets Δb"
    layer_types = ("linear", "conv1d", "conv2d", "norm")

    def __init__(self, config: BitFit, base_layer: nn.Module, layer_type: str, **kwargs) -> None:
        super().__init__(config, base_layer, layer_type, **kwargs)
        self.bias_delta = nn.Parameter(torch.zeros(weight_access(base_layer, "bias").shape, **factory(base_layer)))

    @classmethod
    def accepts(cls, config: AdapterConfig, module: nn.Module, layer_type: str) -> bool:
        return _has_bias(module)

    def forward(self, x: torch.Tensor, base) -> torch.Tensor:
        y = base(x)
        delta = self.bias_delta.view(-1, 1, 1) if self.layer_type == "conv2d" else self.bias_delta
        return y + delta.to(y.dtype)

    def apply_to_weight(self, w: torch.Tensor) -> torch.Tensor:
        return w  # only the bias changes

    def merged_params(self) -> dict[str, torch.Tensor]:
        b = read_weight(self.base_layer, "bias")
        return {"bias": b + self.bias_delta.to(b.dtype)}

    def unmerged_params(self) -> dict[str, torch.Tensor]:
        b = read_weight(self.base_layer, "bias")
        return {"bias": b - self.bias_delta.to(b.dtype)}

    @classmethod
    def num_params(cls, config: BitFit, base_layer: nn.Module, layer_type: str) -> int:
        return weight_access(base_layer, "bias").numel if _has_bias(base_layer) else 0
