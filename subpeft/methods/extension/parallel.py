"""Parallel adapter (He et al., 2022): y = W·x + b + s·B·drop(ReLU(A·x)), A (r, d_in), B (d_out, r).

A bottleneck beside the layer: down-projection A, ReLU, dropout on the hidden (as the reference
code: ``dropout(relu(down_proj(x)))``), up-projection B, scaled by s (``scale=1``: PA; ``scale=4``:
scaled PA). Init: A Kaiming-uniform (a = √5), B = 0 (on every layer type, Embedding included), so
the adapter is the identity at attach. This is exactly LoRA with ``mpc="n"`` (whose default
``mpc_n_form="reference"`` has this form with s = 1), so the layer *is* the
:class:`~subpeft.methods.extension.lora.LowRankAdapter` mechanism with its ReLU on; the config
exposes only what makes sense here (``r``, ``scale``, ``dropout`` on the hidden). The ReLU means
there is no weight delta: not mergeable, and saved in subpeft's native format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ...core.config import AdapterConfig
from ...core.errors import ConfigError
from ...core.registry import register
from ...mechanisms.low_rank import LowRankAdapter


@dataclass
class ParallelAdapter(AdapterConfig):
    """Parallel adapter. ``sp.ParallelAdapter(r=8, scale=1.0, dropout=0.0, targets=[...])``."""

    method = "parallel_adapter"
    mpc: ClassVar[str] = "n"  # read by the LowRank mechanism: a ReLU between the factors, no MPC loss
    mpc_n_form: ClassVar[str] = "reference"  # dropout on the hidden after the ReLU; the scale is s

    r: int = 8
    scale: float = 1.0
    dropout: float = 0.0

    def validate(self) -> None:
        self._check_positive_int("r")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not 0 < self.scale < math.inf:
            raise ConfigError(f"ParallelAdapter.scale must be a positive number (1: PA, 4: scaled PA), got {self.scale!r}")
        self._check_range("dropout", 0.0, 1.0)

    @property
    def scaling(self) -> float:
        """s, as the mechanism reads it."""
        return float(self.scale)


@register
class ParallelAdapterLayer(LowRankAdapter):
    config_cls = ParallelAdapter
    mergeable = False
    formula = "r·(d_in + d_out)"
    trains = "down- and up-projections A, B"

