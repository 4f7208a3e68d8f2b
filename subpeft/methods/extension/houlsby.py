"""Houlsby adapter (Houlsby et al., 2019): two bottlenecks per transformer block, LayerNorms trained.

One bottleneck (:mod:`.bottleneck`) after the attention output projection and one after the FFN
output projection of every block, each before the block's residual add and LayerNorm:
``h ← h + f(h·W_downᵀ + b_down)·W_upᵀ + b_up``; 2·(2·d·m + d + m) trainable numbers per block. With
``train_norms=True`` (the default, as in the paper) the block's norms (BERT: both LayerNorms; Llama:
both RMSNorms) train too: they are added to ``modules_to_save`` (a trainable copy per adapter, saved
with it, counted apart from the formula). The blocks and norms come from the architecture
description (:mod:`subpeft.core.arch`). In BERT the adapter acts on the dense output before the
block's dropout (the paper: after it); the two agree in evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...core.arch import describe
from ...core.errors import ConfigError
from ...core.registry import register
from ...mechanisms.bottleneck import Bottleneck, BottleneckAdapter


@dataclass
class Houlsby(Bottleneck):
    """Houlsby adapter. ``sp.Houlsby(size=None, reduction_factor=None, activation="relu", train_norms=True)``
    (neither size nor reduction_factor: m = d // 16)."""

    method = "houlsby"
    positions = ("attn_out", "ffn_out")

    train_norms: bool = True

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.train_norms, bool):
            raise ConfigError(f"Houlsby.train_norms must be True or False, got {self.train_norms!r}")


@register
class HoulsbyAdapter(BottleneckAdapter):
    config_cls = Houlsby
    formula = "2·d·m + d + m per adapter, 2 per block (+ the block's norms)"
    trains = "2 bottlenecks per block + block LayerNorms"

    @classmethod
    def prepare_config(cls, config: Houlsby, model: nn.Module) -> Houlsby:
        config = super().prepare_config(config, model)
        if config.train_norms:
            try:
                norms = describe(model, config.method).per_block("norms")
            except ConfigError as exc:
                raise ConfigError(f"{exc}. (Houlsby trains the blocks' norms; on another model pass "
                                  "train_norms=False and name them in modules_to_save)") from None
            saved = list(config.modules_to_save or [])
            config = config.replace(modules_to_save=saved + [n for n in norms if n not in saved])
        return config
