"""LayerNorm tuning (Zhao et al., 2024): train only the norms' weights (and biases): w' = w + Δw, b' = b + Δb.

Δw (and Δb where the norm has a bias) start at 0; 2·d trainable numbers per norm with a bias, d
without. Mergeable: merging writes w + Δw (and b + Δb). Layers: ``norm`` only (nn.LayerNorm,
nn.RMSNorm and Hugging Face ``*LayerNorm`` / ``*RMSNorm`` classes); ``targets=None`` (the default)
means every norm of the model.

Forward: the base norm evaluated with substituted parameters, f_{w+Δw, b+Δb}(x)
(``torch.func.functional_call``; a direct ``F.layer_norm`` / ``F.rms_norm`` for plain torch norms),
so it is exact for any norm class whatever its formula (Llama's RMSNorm, Gemma's x̂·(1 + w), ...).
Stacked on other adapters of the same norm (``base`` a chain, e.g. BitFit's Δb below), it adds its
own change instead: ``base(x) + f_{w+Δw, b+Δb}(x) − f_{w, b}(x)``. Every norm is affine in its weight
and bias (y = x̂ ⊙ (a + w) + b), so that equals the merged stack exactly, in any order.

Hugging Face PEFT's LN_TUNING trains a full copy of each norm (files hold w' and b', not Δ), so
files are subpeft's format (``weight_delta``, ``bias_delta``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...core.adapter import Adapter
from ...core.config import AdapterConfig
from ...core.layers import factory
from ...core.registry import register
from ...core.weights import read_weight, weight_access


@dataclass
class LayerNormTuning(AdapterConfig):
    """LayerNorm tuning. ``sp.LayerNormTuning()`` tunes every norm; ``targets=[...]`` chosen ones."""

    method = "layernorm"
    default_targets: ClassVar[list[str] | str | None] = "all"


def _plain(module: nn.Module, cls: type) -> bool:
    """A torch norm whose forward is the functional call it wraps, without hooks that would see it."""
    return (type(module).forward is cls.forward and not module._forward_hooks and not module._forward_pre_hooks)


@register
class LayerNormTuningAdapter(Adapter):
    config_cls = LayerNormTuning
    additive = True
    formula = "2·d (d for a norm without bias)"
    trains = "norm weights and biases (Δw, Δb)"
    layer_types = ("norm",)

    def __init__(self, config: LayerNormTuning, base_layer: nn.Module, layer_type: str, **kwargs) -> None:
        super().__init__(config, base_layer, layer_type, **kwargs)
        kw = factory(base_layer)
        self.weight_delta = nn.Parameter(torch.zeros(weight_access(base_layer).shape, **kw))
        has_bias = isinstance(getattr(base_layer, "bias", None), torch.Tensor)
        self.bias_delta = nn.Parameter(torch.zeros(weight_access(base_layer, "bias").shape, **kw)) if has_bias else None

    def _params(self, sign: float = 1.0, base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The norm's tensors (``base``, else the layer's own) with the deltas added (sign=-1:
        subtracted), in their dtypes."""
        w = self.base_layer.weight if base is None else base["weight"]
        out = {"weight": w + sign * self.weight_delta.to(w.dtype)}
        if self.bias_delta is not None:
            b = self.base_layer.bias if base is None else base["bias"]
            out["bias"] = b + sign * self.bias_delta.to(b.dtype)
        return out

    def _read_base(self) -> dict[str, torch.Tensor]:
        """The norm's tensors read through the weight access (for merging, outside forward)."""
        names = ("weight", "bias") if self.bias_delta is not None else ("weight",)
        return {n: read_weight(self.base_layer, n) for n in names}

    def _norm(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The base norm evaluated with these parameters."""
        m = self.base_layer
        if isinstance(m, nn.LayerNorm) and _plain(m, nn.LayerNorm):
            return F.layer_norm(x, m.normalized_shape, params["weight"], params.get("bias"), m.eps)
        rms = getattr(nn, "RMSNorm", None)
        if rms is not None and isinstance(m, rms) and _plain(m, rms):
            return F.rms_norm(x, m.normalized_shape, params["weight"], m.eps)
        return torch.func.functional_call(m, params, (x,))

    def forward(self, x: torch.Tensor, base) -> torch.Tensor:
        tuned = self._norm(x, self._params())
        if base is self.base_layer:
            return tuned
        # other adapters below on this norm: add only this adapter's change (exact: norms are affine
        # in their weight and bias)
        params = {"weight": self.base_layer.weight}
        if self.bias_delta is not None:
            params["bias"] = self.base_layer.bias
        return base(x) + (tuned - self._norm(x, params))

    def delta_weight(self) -> torch.Tensor:
        return self.weight_delta

    def merged_params(self) -> dict[str, torch.Tensor]:
        return self._params(base=self._read_base())

    def unmerged_params(self) -> dict[str, torch.Tensor]:
        return self._params(-1.0, self._read_base())

    @classmethod
    def num_params(cls, config: LayerNormTuning, base_layer: nn.Module, layer_type: str) -> int:
        bias = getattr(base_layer, "bias", None)
        return weight_access(base_layer).numel * (2 if isinstance(bias, torch.Tensor) else 1)
