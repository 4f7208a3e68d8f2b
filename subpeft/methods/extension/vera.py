"""VeRA: φ(W) = W + diag(b)·B·diag(d)·A with A (r, d_in), B (d_out, r) frozen, random and shared.

One pair A, B serves every layer of a named adapter: sized to the largest targeted (d_out, d_in) and
sliced (``A[:, :d_in]``, ``B[:d_out]``), drawn Kaiming-uniform (gain √2, bound √(6 / fan_in)) from a
CPU ``torch.Generator`` seeded with ``seed``: A first, then B, as Hugging Face PEFT does, so the
projections equal PEFT's for the same ``projection_prng_key``. By default they are regenerated,
never saved: a file holds only b (``vera_lambda_b``, d_out, init 0) and d (``vera_lambda_d``, r, init
``d_init``) per layer and a PEFT ``VeraConfig`` with ``save_projection=False``. With
``save_projection=True`` (PEFT's default, and what PEFT files saved that way load as) the projections
are also written, where PEFT puts them (``base_model.vera_A`` / ``base_model.vera_B``), and read back.
PEFT's VeraConfig has no ``exclude_modules``: an adapter with ``exclude`` is written in subpeft's format.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.adapter import Adapter
from ...core.config import AdapterConfig, peft_int, peft_number
from ...core.errors import ConfigError
from ...core.instance import LayerInstance
from ...core.layers import dims, factory, from_2d
from ...core.registry import register


@dataclass
class VeRA(AdapterConfig):
    """VeRA (Kopiczko et al., 2024). ``sp.VeRA(r=256, d_init=0.1, seed=0, dropout=0.0, targets=[...])``."""

    method = "vera"
    peft_type = "VERA"

    r: int = 256
    d_init: float = 0.1
    seed: int = 0
    dropout: float = 0.0
    save_projection: bool = False  # True: the shared A, B are written to the file too (PEFT's default)

    def validate(self) -> None:
        self._check_positive_int("r")
        if not isinstance(self.save_projection, bool):
            raise ConfigError(f"VeRA.save_projection must be True or False, got {self.save_projection!r}")
        self._check_range("dropout", 0.0, 1.0)
        if isinstance(self.d_init, bool) or not isinstance(self.d_init, (int, float)) or not math.isfinite(self.d_init):
            raise ConfigError(f"VeRA.d_init must be a finite number (the initial value of d), got {self.d_init!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"VeRA.seed must be an integer >= 0 (it regenerates the shared A, B), got {self.seed!r}")

    # -- Hugging Face PEFT's VeraConfig --------------------------------------------------------------
    def to_peft_dict(self, layer_types: set[str] | frozenset[str] = frozenset()) -> dict[str, Any] | None:
        if self.exclude is not None:
            return None  # VeraConfig has no exclude_modules
        return {
            "peft_type": "VERA",
            "task_type": None,
            "r": self.r,
            "target_modules": self.targets,
            "projection_prng_key": self.seed,
            "save_projection": self.save_projection,
            "vera_dropout": self.dropout,
            "d_initial": self.d_init,
            "fan_in_fan_out": "conv1d" in layer_types,
            "bias": "none",
            "modules_to_save": self.modules_to_save,
            "init_weights": True,
            "layers_to_transform": None,
            "layers_pattern": None,
            "inference_mode": True,
        }

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> VeRA:
        bad = [k for k, v in {"bias": (data.get("bias") or "none") != "none",
                              "layers_to_transform": data.get("layers_to_transform") is not None}.items() if v]
        if bad:
            raise ConfigError(f"this PEFT VeRA adapter uses options subpeft's VeRA does not have: {bad}")
        unknown = sorted(k for k, v in data.items() if k not in _PEFT_KNOWN and v)
        if unknown:
            warnings.warn(f"VeRA: ignoring PEFT config options subpeft does not know: {unknown}", UserWarning, stacklevel=2)
        targets = data.get("target_modules")
        if isinstance(targets, (set, tuple)):
            targets = sorted(targets)
        return cls(r=peft_int(data, "r", 256), d_init=peft_number(data, "d_initial", 0.1),
                   seed=peft_int(data, "projection_prng_key", 0),
                   dropout=peft_number(data, "vera_dropout", 0.0), targets=targets,
                   save_projection=bool(data.get("save_projection", True)),
                   modules_to_save=data.get("modules_to_save"))


_PEFT_KNOWN = frozenset({
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "r", "target_modules", "projection_prng_key", "save_projection", "vera_dropout", "d_initial", "fan_in_fan_out",
    "bias", "modules_to_save", "init_weights", "layers_to_transform", "layers_pattern",
})


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(−b, b) with b = √3·√2/√fan_in (fan_in = shape[1]), drawn from ``generator`` (PEFT's VeRA init)."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRAShared(nn.Module):
    """The shared projections of one named adapter: non-persistent buffers, rebuilt from the seed."""

    def __init__(self, config: VeRA, d_out: int, d_in: int, kw: dict) -> None:
        super().__init__()
        gen = torch.Generator(device="cpu").manual_seed(config.seed)
        keep = config.save_projection
        self.register_buffer("vera_A", kaiming_uniform((config.r, d_in), gen).to(**kw), persistent=keep)
        self.register_buffer("vera_B", kaiming_uniform((d_out, config.r), gen).to(**kw), persistent=keep)


class VeRAInstance(LayerInstance):
    """One named VeRA adapter: the random projections A, B, shared by all its layers, sized for the largest."""

    def create_shared(self, layers: list[tuple[str, nn.Module, str]]) -> nn.Module | None:
        if not layers:
            return None
        shapes = [dims(layer, kind) for _, layer, kind in layers]
        d_out, d_in = max(s[0] for s in shapes), max(s[1] for s in shapes)
        return VeRAShared(self.config, d_out, d_in, factory(layers[0][1]))


@register
class VeRAAdapter(Adapter):
    instance_cls = VeRAInstance
    """Per layer: ``vera_lambda_b`` (d_out) and ``vera_lambda_d`` (r); A and B from ``self.shared``."""

    config_cls = VeRA
    formula = "d_out + r"
    trains = "scaling vectors b, d"
    layer_types = ("linear", "conv1d")
    additive = True

    @classmethod
    def shared_file_key(cls, config: VeRA, key: str) -> str:
        return "base_model." + key  # where PEFT saves its projections (save_projection=True)

    def __init__(self, config: VeRA, base_layer: nn.Module, layer_type: str, **kwargs) -> None:
        super().__init__(config, base_layer, layer_type, **kwargs)
        kw = factory(base_layer)
        self.d_out, self.d_in = dims(base_layer, layer_type)
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.d_out, **kw))
        self.vera_lambda_d = nn.Parameter(torch.full((config.r,), float(config.d_init), **kw))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None

    def _projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        shared = self.shared
        return shared.vera_A[:, : self.d_in], shared.vera_B[: self.d_out]

    def forward(self, x: torch.Tensor, base) -> torch.Tensor:
        y = base(x)
        A, B = self._projections()
        h = x if self.dropout is None else self.dropout(x)
        if h.dtype != A.dtype:
            h = h.to(A.dtype)
        # b ⊙ (B·(d ⊙ (A·x))): scaling the rank-r and d_out activations keeps the backward to the two
        # skinny GEMMs plus elementwise work (scaling A and B instead would add two weight-gradient GEMMs)
        delta = F.linear(F.linear(h, A) * self.vera_lambda_d, B) * self.vera_lambda_b
        return y + delta.to(y.dtype)

    def delta_2d(self) -> torch.Tensor:
        A, B = self._projections()
        return (self.vera_lambda_b.unsqueeze(1) * B) @ (self.vera_lambda_d.unsqueeze(1) * A)

    def delta_weight(self) -> torch.Tensor:
        return from_2d(self.base_layer, self.layer_type, self.delta_2d())

    @classmethod
    def usable_rank(cls, config: VeRA, base_layer: nn.Module, layer_type: str) -> int | None:
        # ΔW = Σ_k d_k·(b ⊙ B_k)·A_kᵀ: r > min(d_out, d_in) still adds directions (as in the paper), up to
        # the d_out·d_in dimensions of the weight
        d_out, d_in = dims(base_layer, layer_type)
        return d_out * d_in

    @classmethod
    def num_params(cls, config: VeRA, base_layer: nn.Module, layer_type: str) -> int:
        return dims(base_layer, layer_type)[0] + config.r
