"""LoRA: φ(W) = W + (α/r)·B·A, A (r, d_in), B (d_out, r), on the low-rank mechanism
(:mod:`subpeft.mechanisms.low_rank`, whose :class:`LowRank` and :class:`LowRankAdapter` are
re-exported here under their old import path).

Init: A Kaiming-uniform (a = √5), B = 0 (for nn.Embedding, as in Hugging Face PEFT: A = 0,
B ~ N(0, 1)); both give the identity at attach. Dropout acts on the LoRA input only.
rsLoRA scales by α/√r. Files use Hugging Face PEFT's key names and config fields, so adapters
move between subpeft and ``peft`` in both directions.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from ...core.config import peft_int, peft_number
from ...core.errors import ConfigError
from ...core.registry import register
from ...mechanisms.low_rank import MPC_MODES, LowRank, LowRankAdapter

__all__ = ["LoRA", "LoRAAdapter", "LowRank", "LowRankAdapter", "MPC_MODES", "PEFT_LORA_FIELDS"]


@dataclass
class LoRA(LowRank):
    """LoRA (Hu et al., 2021). ``sp.LoRA(r=8, alpha=16, dropout=0.0, targets=[...], rslora=False, mpc=None)``."""

    method = "lora"
    peft_type = "LORA"

    # -- Hugging Face PEFT's LoraConfig ------------------------------------------------------------
    def to_peft_dict(self, layer_types: set[str] | frozenset[str] = frozenset()) -> dict[str, Any] | None:
        if self.mpc is not None:
            return None  # PEFT has no matrix pattern constraints
        return {
            "peft_type": "LORA",
            "task_type": None,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "use_rslora": self.rslora,
            "target_modules": self.targets,
            "exclude_modules": self.exclude,
            "modules_to_save": self.modules_to_save,
            "bias": "none",
            "fan_in_fan_out": "conv1d" in layer_types,  # PEFT's flag for GPT-2 style Conv1D
            "init_lora_weights": True,
            "inference_mode": True,
            "use_dora": False,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": {},
            "alpha_pattern": {},
        }

    @classmethod
    def accepts_peft(cls, data: dict[str, Any]) -> bool:
        return not data.get("use_dora")  # DoRA reads those

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> LoRA:
        return cls(**cls._peft_fields(data))

    @classmethod
    def _peft_fields(cls, data: dict[str, Any], allowed: tuple[str, ...] = ()) -> dict[str, Any]:
        """subpeft fields from a PEFT LoraConfig dict; options subpeft lacks are refused by name."""
        unsupported = {
            "bias": (data.get("bias", "none") or "none") != "none",
            "use_dora": bool(data.get("use_dora")) and "use_dora" not in allowed,
            "rank_pattern": bool(data.get("rank_pattern")),
            "alpha_pattern": bool(data.get("alpha_pattern")),
            "layers_to_transform": data.get("layers_to_transform") is not None,
            "lora_bias": bool(data.get("lora_bias")),
            "target_parameters": bool(data.get("target_parameters")),
            "trainable_token_indices": bool(data.get("trainable_token_indices")),
            "layer_replication": bool(data.get("layer_replication")),
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ConfigError(f"this PEFT LoRA adapter uses options subpeft's LoRA does not have: {bad}")
        unknown = sorted(k for k, v in data.items() if k not in PEFT_LORA_FIELDS and k not in unsupported and v)
        if unknown:
            warnings.warn(f"LoRA: ignoring PEFT config options subpeft does not know: {unknown}", UserWarning, stacklevel=2)
        targets = data.get("target_modules")
        if isinstance(targets, (set, tuple)):
            targets = sorted(targets)
        return dict(
            r=peft_int(data, "r", 8),
            alpha=peft_number(data, "lora_alpha", 8),
            dropout=peft_number(data, "lora_dropout", 0.0),
            rslora=bool(data.get("use_rslora", False)),
            targets=targets,
            exclude=data.get("exclude_modules"),
            modules_to_save=data.get("modules_to_save"),
        )


# LoraConfig fields that are read above, or that are bookkeeping / initialisation-only (they do not
# change what a saved adapter computes). Any other field set in a PEFT config warns on load.
PEFT_LORA_FIELDS = frozenset({
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules", "exclude_modules",
    "modules_to_save", "fan_in_fan_out", "init_lora_weights", "layers_pattern", "megatron_config",
    "megatron_core", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "qalora_group_size",
    "use_qalora", "ensure_weight_tying", "use_dora",
})


@register
class LoRAAdapter(LowRankAdapter):
    config_cls = LoRA
    formula = "r·(d_in + d_out)"
    trains = "low-rank factors A, B"

    def file_key(self, key: str) -> str:
        if self.layer_type == "embedding":
            return {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}[key]
        return key + ".weight"
