"""The base class of every method's adapter: one adapter of one method on one base layer.

A weight-space method provides two views of the same transformation φ(W):

- ``forward(x, base)``: the efficient path; ``base(x)`` computes the layer below (the frozen base
  layer, or the adapters stacked under this one);
- ``merged_params()``: φ as new values of the base layer's tensors (by default
  ``{"weight": W + delta_weight()}``), used by merge, unmerge, export and analysis.

The generic test matrix checks that both views agree for every registered method.

Every ``nn.Parameter`` of an adapter is trained when the adapter is active; frozen tensors that
belong to the adapter (SVD factors, random projections, schedule state) are buffers, saved with
it unless registered with ``persistent=False``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from .config import AdapterConfig


class Adapter(nn.Module):
    # set by each method
    config_cls: ClassVar[type[AdapterConfig]]
    family: ClassVar[str] = "extension"
    kind: ClassVar[str] = "weight"
    mergeable: ClassVar[bool] = True
    formula: ClassVar[str] = ""
    layer_types: ClassVar[tuple[str, ...]] = ("linear", "conv1d")

    def __init__(self, config: AdapterConfig, base_layer: nn.Module, layer_type: str) -> None:
        super().__init__()
        self.config = config
        self.layer_type = layer_type
        # a plain reference, not a submodule: the base layer belongs to the model, not the adapter
        self.__dict__["_base_layer"] = base_layer

    @property
    def base_layer(self) -> nn.Module:
        return self.__dict__["_base_layer"]

    # -- the two views of φ ------------------------------------------------------------------
    def forward(self, x: torch.Tensor, base: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """φ(W) − W in the base layer's native weight layout (additive methods)."""
        raise NotImplementedError(f"{type(self).__name__} does not define delta_weight()")

    def merged_params(self) -> dict[str, torch.Tensor]:
        """New values for the base layer's tensors with this adapter folded in."""
        w = self.base_layer.weight
        return {"weight": w + self.delta_weight().to(w.dtype)}

    def unmerged_params(self) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`merged_params`, applied to the merged base layer."""
        w = self.base_layer.weight
        return {"weight": w - self.delta_weight().to(w.dtype)}

    # -- parameter accounting ------------------------------------------------------------------
    @classmethod
    def num_params(cls, config: AdapterConfig, base_layer: nn.Module, layer_type: str) -> int:
        """Trainable numbers this method adds to one layer (the METHODS.md formula)."""
        raise NotImplementedError

    # -- file format ---------------------------------------------------------------------------
    def file_key(self, key: str) -> str:
        """Name of a state_dict entry in the adapter file (after the module path)."""
        return key

    # -- training-time hooks ---------------------------------------------------------------------
    def regularization(self) -> torch.Tensor | None:
        return None

    def step(self, global_step: int) -> None:
        return None

    @classmethod
    def model_regularization(cls, adapters: list[Adapter]) -> torch.Tensor | None:
        """The loss term of one named adapter over all its layers (methods may average instead)."""
        terms = [t for t in (a.regularization() for a in adapters) if t is not None]
        return torch.stack(terms).sum() if terms else None

    @classmethod
    def model_step(cls, adapters: list[Adapter], global_step: int) -> None:
        """Called after each optimizer step with all layers of one named adapter (for global state)."""
        for a in adapters:
            a.step(global_step)
