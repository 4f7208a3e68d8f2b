"""Diagonal scaling of a frozen weight: φ(W) = diag(l_out)·W·diag(l_in), the bias left unscaled.

The one mechanism behind (IA)³ (output side only), SSL (input side only) and SSB (both sides).
Each side's vector starts at 1 (identity at attach). Forward, with ``base`` the layer below (the base
layer or a chain of adapters over it):

    y = l_out ⊙ base(l_in ⊙ x) + (1 − l_out) ⊙ c

where c is the bias of the layer ``base`` computes: the base layer's bias, or, for a chain, the
chain's output at x = 0 (every weight-space method is affine in x, so that is its bias, e.g.
b + Δb under BitFit). Subtracting the real bias before scaling keeps forward and merge equal for any
stack: merging writes ``diag(l_out)·W·diag(l_in)`` into the weight and never touches the bias.

Tensors use Hugging Face PEFT's (IA)³ shapes so that (IA)³ and SSL files are PEFT's: the input-side
vector is (1, d_in), the output-side one (d_out, 1) (Conv2d: (1, c_out, 1, 1)). PEFT's (IA)³ differs
on the output side: it scales the bias too (``l ⊙ (W·x + b)``), so it equals subpeft's (IA)³ only on
layers without a bias (or with a zero one); on the input side (PEFT's ``feedforward_modules``) the
two are the same: SSL is PEFT's (IA)³ with every target a feedforward module.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch import nn

from ..core.adapter import Adapter
from ..core.config import AdapterConfig
from ..core.errors import ConfigError
from ..core.layers import base_weight, dims, factory, from_2d, to_2d, weight_2d
from ..core.weights import read_weight, weight_access


def _dtype(layer: nn.Module, value: torch.Tensor) -> torch.dtype:
    """The dtype a merged weight is written in: that of the base weight's dense values (a 4-bit
    weight: the dtype it was quantised from); the value's own where those are not floating point."""
    dtype = weight_access(layer).dtype
    return dtype if dtype.is_floating_point else value.dtype


class DiagonalScaling(Adapter):
    """diag(l_out)·W·diag(l_in) on one layer; subclasses say which sides this layer scales."""

    layer_types = ("linear", "conv1d")
    peft_keys = False  # (IA)³ and SSL: the one vector is written as PEFT's `ia3_l`

    def sides(self, config: AdapterConfig) -> tuple[bool, bool]:
        """(scale the output, scale the input) of this layer."""
        raise NotImplementedError

    def __init__(self, config: AdapterConfig, base_layer: nn.Module, layer_type: str, **kwargs) -> None:
        super().__init__(config, base_layer, layer_type, **kwargs)
        out_side, in_side = self.sides(config)
        d_out, d_in = dims(base_layer, layer_type)
        kw = factory(base_layer)
        out_shape = (1, d_out, 1, 1) if layer_type == "conv2d" else (d_out, 1)
        self.scale_out = nn.Parameter(torch.ones(out_shape, **kw)) if out_side else None
        self.scale_in = nn.Parameter(torch.ones(1, d_in, **kw)) if in_side else None
        # PEFT's (IA)³ form, l ⊙ (W·x + b): the bias is scaled with the output (IA3(scale_bias=True))
        self.scales_bias = bool(getattr(config, "scale_bias", False)) and out_side

    # -- forward ---------------------------------------------------------------------------------
    def _bias(self, x: torch.Tensor, base) -> torch.Tensor | None:
        """The bias (one value per output feature) of the layer that ``base`` computes."""
        if base is self.base_layer:
            return self.base_layer.bias
        # a chain of adapters: an affine map of x, whose value at x = 0 is its bias
        if self.layer_type == "conv2d":
            return base(x.new_zeros(1, *x.shape[-3:]))[0, :, 0, 0]
        return base(x.new_zeros(1, x.shape[-1]))[0]

    def forward(self, x: torch.Tensor, base) -> torch.Tensor:
        if self.scale_in is not None:
            l_in = self.scale_in.view(-1)
            x = (x.to(l_in.dtype) * l_in).to(x.dtype)
        y = base(x)
        if self.scale_out is None:
            return y
        shape = (-1, 1, 1) if self.layer_type == "conv2d" else (-1,)
        l_out = self.scale_out.view(shape)
        c = None if self.scales_bias else self._bias(x, base)
        if c is None:
            return (y.to(l_out.dtype) * l_out).to(y.dtype)
        # l ⊙ y + (1 − l) ⊙ c = l ⊙ (y − c) + c, with one pass over the activation
        return torch.addcmul(c.view(shape).to(l_out.dtype) * (1 - l_out), y.to(l_out.dtype), l_out).to(y.dtype)

    # -- merging -----------------------------------------------------------------------------------
    def apply_to_weight(self, w: torch.Tensor) -> torch.Tensor:
        mat = to_2d(self.base_layer, self.layer_type, w)
        for vec, shape in ((self.scale_out, (-1, 1)), (self.scale_in, (1, -1))):
            if vec is not None:
                mat = mat * vec.reshape(shape)
        return from_2d(self.base_layer, self.layer_type, mat).to(w.dtype)

    def _scaled_weight(self, inverse: bool = False) -> torch.Tensor:
        """diag(l_out)·W·diag(l_in) (or its inverse) in the base layer's native layout."""
        mat = weight_2d(self.base_layer, self.layer_type)
        for vec, shape in ((self.scale_out, (-1, 1)), (self.scale_in, (1, -1))):
            if vec is not None:
                mat = mat / vec.reshape(shape) if inverse else mat * vec.reshape(shape)
        return from_2d(self.base_layer, self.layer_type, mat)

    def delta_weight(self) -> torch.Tensor:
        w = base_weight(self.base_layer)
        return self._scaled_weight() - w

    def _scaled_bias(self, inverse: bool = False) -> dict[str, torch.Tensor]:
        if not self.scales_bias or self.base_layer.bias is None:
            return {}
        bias = read_weight(self.base_layer, "bias")
        l_out = self.scale_out.reshape(-1)
        return {"bias": (bias / l_out if inverse else bias * l_out).to(bias.dtype)}

    def merged_params(self) -> dict[str, torch.Tensor]:
        weight = self._scaled_weight()
        return {"weight": weight.to(_dtype(self.base_layer, weight)), **self._scaled_bias()}

    def unmerged_params(self) -> dict[str, torch.Tensor]:
        weight = self._scaled_weight(inverse=True)
        return {"weight": weight.to(_dtype(self.base_layer, weight)), **self._scaled_bias(inverse=True)}

    # -- files -------------------------------------------------------------------------------------
    def file_key(self, key: str) -> str:
        return "ia3_l" if self.peft_keys else key

    def peft_compatible(self) -> bool:
        # PEFT scales the bias with the output; identical only where there is no (non-zero) bias
        if self.scale_out is None or self.scales_bias or self.base_layer.bias is None:
            return True
        return not bool(read_weight(self.base_layer, "bias").detach().any())


# -- Hugging Face PEFT's IA3Config ------------------------------------------------------------------
# fields read below, or bookkeeping / initialisation-only (a saved adapter computes the same without them)
_PEFT_KNOWN = frozenset({
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out",
    "modules_to_save", "init_ia3_weights",
})


def feedforward_matches(name: str, spec: list[str] | str | None) -> bool:
    """Whether module ``name`` is a feedforward target, by PEFT's rule for ``feedforward_modules``:
    a string is a regex matched against the whole name, a list entry matches names ending with it."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name.endswith(entry) for entry in spec)


def check_feedforward(config: AdapterConfig, value: Any) -> None:
    name = type(config).__name__
    if value is None:
        return
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as exc:
            raise ConfigError(f"{name}.feedforward {value!r} is not a valid regular expression: {exc}") from None
        return
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{name}.feedforward must be None, a regex string or a list of module names, got {value!r}")
    if isinstance(config.targets, list) and not set(value) <= set(config.targets):
        raise ConfigError(
            f"{name}.feedforward must name targets (entries of targets=), as PEFT requires; "
            f"{sorted(set(value) - set(config.targets))} are not in targets={config.targets!r}"
        )


def _as_set(value: Any) -> Any:
    return frozenset(value) if isinstance(value, (list, tuple, set, frozenset)) else value


def all_feedforward(data: dict[str, Any]) -> bool:
    """Whether a PEFT IA3 config scales the input of every target (then it is SSL)."""
    ff = data.get("feedforward_modules")
    if not ff:
        return False
    return ff == ".*" or _as_set(ff) == _as_set(data.get("target_modules"))


def peft_dict(config: AdapterConfig, layer_types: set[str] | frozenset[str], feedforward: Any) -> dict[str, Any] | None:
    if config.targets == "all":  # subpeft's own selector; PEFT would read it as a regex
        return None
    return {
        "peft_type": "IA3",
        "task_type": None,
        "target_modules": config.targets,
        "exclude_modules": config.exclude,
        "feedforward_modules": feedforward,
        "modules_to_save": config.modules_to_save,
        "fan_in_fan_out": "conv1d" in layer_types,  # PEFT's flag for GPT-2 style Conv1D
        "init_ia3_weights": True,
        "inference_mode": True,
    }


def peft_fields(data: dict[str, Any], method: str) -> dict[str, Any]:
    """targets / exclude / modules_to_save of a PEFT IA3 config dict; unknown options warn."""
    unknown = sorted(k for k, v in data.items() if k not in _PEFT_KNOWN and v)
    if unknown:
        warnings.warn(f"{method}: ignoring PEFT config options subpeft does not know: {unknown}", UserWarning, stacklevel=3)

    def names(value: Any) -> Any:
        return sorted(value) if isinstance(value, (set, tuple)) else value

    return dict(targets=names(data.get("target_modules")), exclude=names(data.get("exclude_modules")),
                modules_to_save=data.get("modules_to_save"))
