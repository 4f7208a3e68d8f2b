"""FLoRA (2-D Tucker core): φ(W) = W + s·B·G·A, A (r, d_in), G (r, r) full, B (d_out, r), s = α/r.

LoRA with a full trainable r×r core between the factors (the paper ranks the forms
B·G·A > B·diag·A > B·A). Init: A, B ~ N(0, 0.02²), G = 0: exactly the identity at attach, and the
first gradient reaches G only. Built on the :class:`~subpeft.methods.extension.lora.LowRank`
mechanism (dropout, rsLoRA and MPC options as LoRA; MPC constrains A and B, not G). Native file
format (Hugging Face PEFT has no FLoRA). Mergeable.

On Conv2d this is the 2-D form of the kernel reshaped to (c_out, c_in·kh·kw): A is a
(r, c_in, kh, kw) convolution with the base layer's stride/padding/dilation, G mixes the r channels,
B is a 1×1 convolution. The paper's N-D Tucker form (a core with one factor per mode, so that the
kernel's spatial modes keep their own factors) is **not** implemented here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...core.registry import register
from ...mechanisms.low_rank import LowRank, LowRankAdapter


@dataclass
class FLoRA(LowRank):
    """FLoRA. ``sp.FLoRA(r=8, alpha=8, dropout=0.0, targets=[...], rslora=False, mpc=None)``."""

    method = "flora"


@register
class FLoRAAdapter(LowRankAdapter):
    config_cls = FLoRA
    formula = "r·(d_in + d_out) + r²"
    trains = "low-rank factors A, B and the r×r core G between them"
    has_middle = True

    def init_factors(self, config: LowRank, kw: dict, d_out: int, d_in: int) -> None:
        super().init_factors(config, kw, d_out, d_in)  # lora_A, lora_B in the mechanism's shapes
        with torch.no_grad():
            nn.init.normal_(self.lora_A, std=0.02)
            nn.init.normal_(self.lora_B, std=0.02)
        self.lora_G = nn.Parameter(torch.zeros(config.r, config.r, **kw))

    def core(self) -> tuple[torch.Tensor, bool]:
        return self.lora_G, False  # a full r×r core

    @classmethod
    def num_params(cls, config: LowRank, base_layer: nn.Module, layer_type: str) -> int:
        return super().num_params(config, base_layer, layer_type) + config.r**2
