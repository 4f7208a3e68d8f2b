"""The base class of every method's adapter: one adapter of one method on one base layer.

A weight-space method provides two views of the same transformation φ(W):

- ``forward(x, base)``: the efficient path; ``base(x)`` computes the layer below (the frozen base
  layer, or the adapters stacked under this one);
- ``merged_params()``: φ as new values of the base layer's tensors (by default
  ``{"weight": apply_to_weight(W)}`` = ``{"weight": W + delta_weight()}``), used by merge, export
  and analysis. Unmerge does not invert it: the layer keeps the tensors a merge overwrote and puts
  them back bit for bit (:class:`~subpeft.core.layer.AdaptedLayer`).

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

from .instance import LayerInstance, MethodInstance, MethodTraits
from .layers import base_weight

if TYPE_CHECKING:
    from .config import AdapterConfig


class Adapter(MethodTraits, nn.Module):
    """One adapter of a weight-space or module-level method on one base layer. The method's class
    attributes (``config_cls``, ``family``, ``mergeable``, ...) are declared as in :class:`MethodTraits`;
    one named adapter of the method is a :class:`~subpeft.core.instance.LayerInstance`, which creates
    one of these per targeted layer and calls the ``model_*`` hooks below over all of them."""

    instance_cls: ClassVar[type[MethodInstance]] = LayerInstance
    #: the forward is ``base(x) + g(x)`` with g independent of the layer below (LoRA-type, VeRA, BitFit,
    #: ...): such adapters commute, so one may be merged while another stays unmerged below it.
    #: False (the safe default) for methods that transform what the layer below computes (scalings,
    #: DoRA's normalisation, bottleneck modules)
    additive: ClassVar[bool] = False
    #: the forward reads the weight as the adapters running below it on the same layer leave it
    #: (DoRA's row norm): the layer then passes them as ``forward(x, base, below=(...))``
    reads_stack: ClassVar[bool] = False

    def __init__(
        self, config: AdapterConfig, base_layer: nn.Module, layer_type: str, *, name: str = "",
        shared: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.layer_type = layer_type
        self.layer_name = name  # the module's name in the model (e.g. "encoder.layer.0.attention.self.query")
        # plain references, not submodules: the base layer belongs to the model, and the shared
        # state (see LayerInstance.create_shared) to the TunedModel, which registers and saves it once
        self.__dict__["_base_layer"] = base_layer
        self.__dict__["_shared"] = shared

    @property
    def base_layer(self) -> nn.Module:
        return self.__dict__["_base_layer"]

    @property
    def shared(self) -> nn.Module | None:
        """The state this adapter shares with the other layers of the same named adapter, if any."""
        return self.__dict__["_shared"]

    # -- which layers, and state shared between them ---------------------------------------------
    @classmethod
    def accepts(cls, config: AdapterConfig, module: nn.Module, layer_type: str) -> bool:
        """Whether this method can adapt the module (e.g. BitFit: only modules with a bias). Targets
        named explicitly that are not accepted raise; ``targets="all"`` skips them."""
        return True

    # -- the two views of φ ------------------------------------------------------------------
    def forward(self, x: torch.Tensor, base: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """φ(W) − W in the base layer's native weight layout (additive methods)."""
        raise NotImplementedError(f"{type(self).__name__} does not define delta_weight()")

    def apply_to_weight(self, w: torch.Tensor) -> torch.Tensor:
        """φ's weight for the weight ``w`` below this adapter (native layout, w's dtype): ``w + ΔW``
        for additive methods; a method whose φ reads W (scalings, DoRA) applies itself to ``w``."""
        return w + self.delta_weight().to(w.dtype)

    def merged_params(self) -> dict[str, torch.Tensor]:
        """New values for the base layer's tensors with this adapter folded in."""
        w = base_weight(self.base_layer)  # the weight itself; dequantised for a 4-bit layer
        return {"weight": self.apply_to_weight(w)}

    def stack_weight(self, below: tuple[Adapter, ...]) -> torch.Tensor:
        """The base layer's weight as the adapters ``below`` (running under this one on the same
        layer, bottom first) leave it: what a merge of them in that order would write. Adapters
        without a weight form (not mergeable) are left out. No autograd graph."""
        with torch.no_grad():
            w = base_weight(self.base_layer)
            for adapter in below:
                if type(adapter).mergeable and adapter.config.mergeable:
                    w = adapter.apply_to_weight(w)
            return w

    def unmerged_params(self) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`merged_params`, applied to the merged base layer (up to round-off; unmerge
        itself restores the saved tensors exactly, this serves analysis of a merged adapter)."""
        w = base_weight(self.base_layer)
        return {"weight": w - self.delta_weight().to(w.dtype)}

    # -- parameter accounting ------------------------------------------------------------------
    @classmethod
    def usable_rank(cls, config: AdapterConfig, base_layer: nn.Module, layer_type: str) -> int | None:
        """The largest value of the config's rank ``r`` this layer can make use of (LoRA-type:
        min(d_in, d_out)); None for methods without a rank, or that clamp it themselves. Attach warns
        for layers below the rank asked for and refuses a rank no targeted layer can use."""
        return None

    @classmethod
    def num_params(cls, config: AdapterConfig, base_layer: nn.Module, layer_type: str) -> int:
        """Trainable numbers this method adds to one layer (the METHODS.md formula)."""
        raise NotImplementedError

    @classmethod
    def model_num_params(cls, config: AdapterConfig, layers: list[tuple[str, nn.Module, str]]) -> int:
        """Trainable numbers of one named adapter over all its layers (shared state counted once)."""
        return sum(cls.num_params(config, layer, kind) for _, layer, kind in layers)

    # -- file format ---------------------------------------------------------------------------
    def file_key(self, key: str) -> str:
        """Name of a state_dict entry in the adapter file (after the module path)."""
        return key

    def optional_keys(self) -> set[str]:
        """Keys of this adapter's state_dict that a file may lack: training state that Hugging Face PEFT
        does not save (e.g. AdaLoRA's importance EMAs). Missing from a file, they keep their attach-time
        values; present, they load as usual."""
        return set()

    def peft_compatible(self) -> bool:
        """Whether Hugging Face PEFT computes exactly this adapter from the PEFT form of its config
        (e.g. PEFT's (IA)³ also scales the bias, so (IA)³ on a layer with a bias is not). When any
        layer says no, the adapter is written in subpeft's native format instead."""
        return True

    # -- training-time hooks (the adapter-wide ones are the method instance's, core/instance.py) ----------
    def regularization(self) -> torch.Tensor | None:
        """This layer's loss term; the named adapter's :class:`~subpeft.core.instance.LayerInstance` adds
        the layers' terms up (a method's own instance class may do otherwise)."""
        return None

    def step(self, global_step: int) -> None:
        return None
