"""The bottleneck adapter mechanism that Houlsby, Pfeiffer, AdaMix and UniPELT share.

On a projection with output ``h`` (d features) the adapter computes
``h + f(h·W_downᵀ + b_down)·W_upᵀ + b_up``, W_down (m, d), W_up (d, m): a bottleneck of size m
*after* the projection and before whatever the block does next (dropout, residual add, LayerNorm).
The adapted layer is the projection itself (``forward(x, base)`` runs ``h = base(x)``), so the same
mechanism serves any Linear / Conv1D a user names in ``targets``; ``targets=None`` places it from the
architecture description (:mod:`subpeft.core.arch`) at the config's ``positions`` (Houlsby: attention
output and FFN output of every block; Pfeiffer: FFN output).

Init: W_down as nn.Linear's default (Kaiming-uniform, a = √5; b_down uniform in ±1/√d), or
``init="normal"``: W_down ~ N(0, 0.01²), b_down = 0; W_up = 0 and b_up = 0 always, so the adapter
is exactly the identity at attach. Trainable numbers per adapted layer: 2·d·m + d + m (METHODS.md).
m is ``size``, or d // ``reduction_factor`` (at least 1); neither given: reduction factor 16 (the
AdapterHub default). Not mergeable (the activation sits between the projections).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import Adapter
from ..core.arch import describe
from ..core.config import AdapterConfig
from ..core.errors import ConfigError
from ..core.layers import dims, factory

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu, "gelu": F.gelu, "swish": F.silu, "silu": F.silu, "tanh": torch.tanh,
}
DEFAULT_REDUCTION_FACTOR = 16
INITS = ("linear", "normal")


@dataclass
class Bottleneck(AdapterConfig):
    """Options every bottleneck adapter shares: its size (``size`` = m, or ``reduction_factor``: m = d // rf),
    the activation f (relu, gelu, swish/silu, tanh) and the down-projection's init ("linear" or "normal")."""

    # Architecture fields (of subpeft.core.arch.Architecture) adapted in every block when targets=None
    positions: ClassVar[tuple[str, ...]] = ()

    size: int | None = None
    reduction_factor: float | None = None
    activation: str = "relu"
    init: str = "linear"

    def validate(self) -> None:
        name = type(self).__name__
        if self.size is not None and self.reduction_factor is not None:
            raise ConfigError(f"{name}: give size (the bottleneck m) or reduction_factor (m = d // rf), not both")
        if self.size is not None:
            self._check_positive_int("size")
        rf = self.reduction_factor
        if rf is not None and (isinstance(rf, bool) or not isinstance(rf, (int, float)) or not 0 < rf < math.inf):
            raise ConfigError(f"{name}.reduction_factor must be a positive number (m = d // rf), got {rf!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"{name}.activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.init not in INITS:
            raise ConfigError(f"{name}.init must be 'linear' (nn.Linear's default) or 'normal' (N(0, 0.01²)), "
                              f"got {self.init!r}")

    def bottleneck_size(self, d: int) -> int:
        """m for a projection with d output features."""
        if self.size is not None:
            return int(self.size)
        return max(1, int(d // (self.reduction_factor or DEFAULT_REDUCTION_FACTOR)))


def init_down(config: Bottleneck, shape: tuple[int, ...], kw: dict) -> tuple[nn.Parameter, nn.Parameter]:
    """W_down of ``shape`` (..., m, d) and b_down (..., m), by ``config.init``."""
    d = shape[-1]
    weight, bias = torch.empty(shape, **kw), torch.empty(shape[:-1], **kw)
    if config.init == "normal":
        nn.init.normal_(weight, std=1e-2)
        nn.init.zeros_(bias)
    else:
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Linear.reset_parameters
        nn.init.uniform_(bias, -1 / math.sqrt(d), 1 / math.sqrt(d))
    return nn.Parameter(weight), nn.Parameter(bias)


class BottleneckAdapter(Adapter):
    """``h + f(h·W_downᵀ + b_down)·W_upᵀ + b_up`` on the adapted projection's output h (see module doc)."""

    config_cls = Bottleneck
    kind = "module"
    mergeable = False
    layer_types = ("linear", "conv1d")
    formula = "2·d·m + d + m (d = the projection's output size)"
    trains = "bottleneck down/up projections"

    def __init__(self, config: Bottleneck, base_layer: nn.Module, layer_type: str, **kwargs) -> None:
        super().__init__(config, base_layer, layer_type, **kwargs)
        d = dims(base_layer, layer_type)[0]
        self.act = ACTIVATIONS[config.activation]
        self.init_weights(config, factory(base_layer), d, config.bottleneck_size(d))

    def init_weights(self, config: Bottleneck, kw: dict, d: int, m: int) -> None:
        """Create down_weight (m, d), down_bias (m), up_weight (d, m), up_bias (d)."""
        self.down_weight, self.down_bias = init_down(config, (m, d), kw)
        self.up_weight = nn.Parameter(torch.zeros(d, m, **kw))
        self.up_bias = nn.Parameter(torch.zeros(d, **kw))

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W_down, b_down, W_up, b_up) this forward uses."""
        return self.down_weight, self.down_bias, self.up_weight, self.up_bias

    def bottleneck(self, h: torch.Tensor, wd: torch.Tensor, bd: torch.Tensor, wu: torch.Tensor,
                   bu: torch.Tensor) -> torch.Tensor:
        """f(h·W_downᵀ + b_down)·W_upᵀ + b_up, in h's dtype."""
        z = h if h.dtype == wd.dtype else h.to(wd.dtype)
        return F.linear(self.act(F.linear(z, wd, bd)), wu, bu).to(h.dtype)

    def forward(self, x: torch.Tensor, base) -> torch.Tensor:
        h = base(x)
        return h + self.bottleneck(h, *self.weights())

    # -- placement and accounting -----------------------------------------------------------------
    @classmethod
    def prepare_config(cls, config: Bottleneck, model: nn.Module) -> Bottleneck:
        """``targets=None``: the config's ``positions`` of every block, by the architecture description."""
        if config.targets is None:
            if not config.positions:
                raise ConfigError(f"{config.method}: pass targets= (the projections to put adapters after)")
            parts = describe(model, config.method)
            per_field = [parts.per_block(f) for f in config.positions]
            config = config.replace(targets=[n for block in zip(*per_field, strict=True) for n in block])
        return config

    @classmethod
    def num_params(cls, config: Bottleneck, base_layer: nn.Module, layer_type: str) -> int:
        d = dims(base_layer, layer_type)[0]
        m = config.bottleneck_size(d)
        return 2 * d * m + d + m
