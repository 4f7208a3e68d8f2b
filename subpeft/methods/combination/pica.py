"""PiCa (projected input column adaptation): φ(W) = W + M·P.

P = Vh[:r] of W (the input-side top-r singular vectors, (r, d_in)) is a frozen per-layer float32
buffer from :func:`subpeft.core.svd.svd`, saved with the adapter; M (d_out, r) trains, M = 0 at
attach. With ``share=True`` (the default) one M serves every layer of the same *role*: the
``targets`` list entry that matched the module (the first one in list order), or, for a regex,
``"all-linear"`` or ``"all"``, the module's last name component (e.g. every ``q_proj``). So the
trainable count is r·d_out per role, independent of depth. The shared Ms live in the adapter's
shared state (saved once, as ``base_model.shared.M.<role>``, dots in a role written as ``-``).
Layers of one role must share d_out (d_in may differ: P is per layer). ``share=False``: one M per
layer, r·d_out each. r is clamped to min(d_out, d_in) of each layer, and with sharing to the
smallest such value over the role's layers (so one M fits all of them). Mergeable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...core.adapter import Adapter
from ...core.config import AdapterConfig
from ...core.errors import ConfigError
from ...core.instance import LayerInstance
from ...core.layers import dims, factory, from_2d, weight_2d
from ...core.registry import register
from ...core.svd import svd
from ...core.targets import name_matches

Layers = list[tuple[str, nn.Module, str]]


@dataclass
class PiCa(AdapterConfig):
    """PiCa. ``sp.PiCa(r=256, share=True, targets=[...])``."""

    method = "pica"

    r: int = 256
    share: bool = True

    def validate(self) -> None:
        self._check_positive_int("r")
        if not isinstance(self.share, bool):
            raise ConfigError(f"PiCa.share must be True (one M per role) or False (one M per layer), got {self.share!r}")


def role_of(name: str, targets: list[str] | str | None) -> str:
    """The role of a module: the first ``targets`` entry that matches it, else its last name part."""
    if isinstance(targets, list):
        for entry in targets:
            if name_matches(name, entry):
                return entry
    return name.rsplit(".", 1)[-1]


def role_key(role: str) -> str:
    """The role as a parameter name (no dots; never an attribute of nn.ParameterDict)."""
    key = role.replace(".", "-")
    return "role-" + key if hasattr(nn.ParameterDict(), key) else key


def _roles(config: PiCa, layers: Layers) -> dict[str, tuple[int, int]]:
    """role -> (d_out, r) over the targets; raises ConfigError when a role's d_out differs."""
    groups: dict[str, list[tuple[str, int, int]]] = {}
    for name, module, kind in layers:
        groups.setdefault(role_of(name, config.targets), []).append((name, *dims(module, kind)))
    out = {}
    for role, members in groups.items():
        if len({d_out for _, d_out, _ in members}) > 1:
            listing = ", ".join(f"{n} (d_out={d_out})" for n, d_out, _ in members)
            raise ConfigError(
                f"PiCa shares one M per role, so the layers of role {role!r} must have the same d_out; got {listing}. "
                f"Give them different targets entries (separate roles) or use share=False."
            )
        out[role] = (members[0][1], min(config.r, *(min(d_out, d_in) for _, d_out, d_in in members)))
    return out


class PiCaInstance(LayerInstance):
    """One named PiCa adapter: with ``share=True`` one M per role, shared by the layers of that role."""

    def create_shared(self, layers: Layers) -> nn.Module | None:
        config = self.config
        if not config.share:
            return None
        shared = nn.Module()
        shared.M = nn.ParameterDict()
        for role, (d_out, r) in _roles(config, layers).items():
            module = next(m for n, m, _ in layers if role_of(n, config.targets) == role)
            shared.M[role_key(role)] = nn.Parameter(torch.zeros(d_out, r, **factory(module)))
        return shared


@register
class PiCaAdapter(Adapter):
    instance_cls = PiCaInstance
    config_cls = PiCa
    additive = True
    formula = "r·d_out per role (per layer with share=False)"
    trains = "output maps M on the top-r input singular subspace"
    layer_types = ("linear", "conv1d")

    def __init__(self, config: PiCa, base_layer: nn.Module, layer_type: str, **kwargs) -> None:
        super().__init__(config, base_layer, layer_type, **kwargs)
        kw = factory(base_layer)
        d_out, d_in = dims(base_layer, layer_type)
        if self.shared is not None:
            self.role = role_of(self.layer_name, config.targets)
            r = self.shared.M[role_key(self.role)].shape[1]
        else:
            r = min(config.r, d_out, d_in)
            self.M = nn.Parameter(torch.zeros(d_out, r, **kw))
        self.register_buffer("P", svd(weight_2d(base_layer, layer_type), rank=r).Vh.to(**kw))

    def matrix(self) -> torch.Tensor:
        """M (d_out, r): the role's shared one, or this layer's own."""
        return self.shared.M[role_key(self.role)] if self.shared is not None else self.M

    def delta_weight(self) -> torch.Tensor:
        return from_2d(self.base_layer, self.layer_type, self.matrix() @ self.P)

    def forward(self, x: torch.Tensor, base) -> torch.Tensor:
        y = base(x)
        return y + F.linear(F.linear(x.to(self.P.dtype), self.P), self.matrix()).to(y.dtype)

    @classmethod
    def num_params(cls, config: PiCa, base_layer: nn.Module, layer_type: str) -> int:
        d_out, d_in = dims(base_layer, layer_type)
        return min(config.r, d_out, d_in) * d_out

    @classmethod
    def model_num_params(cls, config: PiCa, layers: Layers) -> int:
        if not config.share:
            return super().model_num_params(config, layers)
        return sum(d_out * r for d_out, r in _roles(config, layers).values())
