"""Pfeiffer adapter (Pfeiffer et al., 2021): one bottleneck per transformer block, after the FFN.

The bottleneck (:mod:`.bottleneck`) sits on the FFN output projection of every block (found by the
architecture description, :mod:`subpeft.core.arch`), before the residual add and LayerNorm:
2·d·m + d + m trainable numbers per block. Norms stay frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...core.registry import register
from ...mechanisms.bottleneck import Bottleneck, BottleneckAdapter


@dataclass
class Pfeiffer(Bottleneck):
    """Pfeiffer adapter. ``sp.Pfeiffer(size=None, reduction_factor=None, activation="relu")`` (m = d // 16
    by default)."""

    method = "pfeiffer"
    positions = ("ffn_out",)


@register
class PfeifferAdapter(BottleneckAdapter):
    config_cls = Pfeiffer
    formula = "2·d·m + d + m per block"
    trains = "1 bottleneck per block (after the FFN)"
