"""TriLoRA: φ(W) = W + s·B·diag(e)·A, A (r, d_in), B (d_out, r), e ∈ ℝ^r, s = α/r.

The AdaLoRA form (a trainable diagonal between the two factors) without AdaLoRA's rank allocation
and orthogonality loss. Init: A and B Kaiming-uniform (a = √5), e = 0, so the adapter is exactly
the identity at attach while both factors are non-zero: the first gradient reaches e only (∂L/∂e ≠ 0,
∂L/∂A = ∂L/∂B = 0 at e = 0). Built on the :class:`~subpeft.methods.extension.lora.LowRank`
mechanism (Linear, Conv1D, Embedding, Conv2d; dropout, rsLoRA and MPC options as LoRA; MPC
constrains A and B, not e). Native file format (Hugging Face PEFT has no TriLoRA). Mergeable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ...core.registry import register
from ...mechanisms.low_rank import LowRank, LowRankAdapter


@dataclass
class TriLoRA(LowRank):
    """TriLoRA. ``sp.TriLoRA(r=8, alpha=8, dropout=0.0, targets=[...], rslora=False, mpc=None)``."""

    method = "trilora"


@register
class TriLoRAAdapter(LowRankAdapter):
    config_cls = TriLoRA
    formula = "r·(d_in + d_out) + r"
    trains = "low-rank factors A, B and the diagonal e between them"
    has_middle = True

    def init_factors(self, config: LowRank, kw: dict, d_out: int, d_in: int) -> None:
        super().init_factors(config, kw, d_out, d_in)  # lora_A, lora_B in the mechanism's shapes
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        self.lora_e = nn.Parameter(torch.zeros(config.r, **kw))

    def core(self) -> tuple[torch.Tensor, bool]:
        return self.lora_e, True  # diag(e)

    @classmethod
    def num_params(cls, config: LowRank, base_layer: nn.Module, layer_type: str) -> int:
        return super().num_params(config, base_layer, layer_type) + config.r
