"""SSB, scaling both singular subspaces (Si et al., 2024): φ(W) = diag(l_out)·W·diag(l_in).

y = l_out ⊙ (W·(l_in ⊙ x)) + b: the bias is not scaled. l_in ∈ ℝ^d_in and l_out ∈ ℝ^d_out, both 1 at
attach; d_in + d_out trainable numbers per layer. Mergeable (the weight's rows and columns are
scaled; the bias is unchanged). Layers: nn.Linear, transformers Conv1D (not nn.Conv2d: its d_in is
c_in·kh·kw). Tensors ``scale_in`` (1, d_in) and ``scale_out`` (d_out, 1).

Hugging Face PEFT has no SSB (its IA3 scales one side per layer), so files are subpeft's format.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...core.config import AdapterConfig
from ...core.layers import dims
from ...core.registry import register
from ...mechanisms.scaling import DiagonalScaling


@dataclass
class SSB(AdapterConfig):
    """SSB. ``sp.SSB(targets=["query", "key", "value", "intermediate.dense", "output.dense"])``."""

    method = "ssb"


@register
class SSBAdapter(DiagonalScaling):
    config_cls = SSB
    formula = "d_in + d_out"
    trains = "input and output scales"

    def sides(self, config: SSB) -> tuple[bool, bool]:
        return (True, True)

    @classmethod
    def num_params(cls, config: SSB, base_layer: nn.Module, layer_type: str) -> int:
        d_out, d_in = dims(base_layer, layer_type)
        return d_in + d_out
