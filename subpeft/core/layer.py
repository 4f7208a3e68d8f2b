"""Wrappers that replace modules of the base model.

- :class:`AdaptedLayer` wraps one base layer and holds its named adapters, the active set and the
  merge state. Its forward chains the active, unmerged adapters around the base layer. On a 4-bit
  base (:mod:`subpeft.quant`) a merge dequantises, adds and requantises: the error requantising
  introduced is recorded per adapter in ``quant_error`` ({"max_abs", "rel_fro"}, see
  :func:`subpeft.quant.merge_errors`), and unmerge restores the 4-bit weight held before the merge
  exactly.
- :class:`TrainableCopy` wraps a module listed in ``modules_to_save``: one trainable copy per
  adapter, the original kept for ``disable_adapter()`` and ``unload()``.
"""

from __future__ import annotations

import copy
from functools import partial

import torch
from torch import nn

from .adapter import Adapter
from .errors import UnsafeMergeError
from .layers import is_quantized


class AdaptedLayer(nn.Module):
    def __init__(self, base_layer: nn.Module, layer_type: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layer_type = layer_type
        self.adapters: nn.ModuleDict = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.merged: list[str] = []
        self.disabled = False
        # 4-bit base only: per merged adapter, the error requantising introduced, and the packed
        # weight before its merge (restored exactly by unmerge)
        self.quant_error: dict[str, dict[str, float]] = {}
        self._quant_saved: dict[str, tuple] = {}

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "adapters"):
                raise
            # model code reads e.g. `.weight`, `.in_features`, `.padding_idx` of the layer it wraps
            return getattr(self.base_layer, name)

    def _running(self) -> list[Adapter]:
        if self.disabled:
            return []
        return [self.adapters[n] for n in self.active if n in self.adapters and n not in self.merged]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        running = self._running()
        if not running:
            return self.base_layer(x, *args, **kwargs)
        base = self.base_layer if not (args or kwargs) else partial(self.base_layer, *args, **kwargs)
        if len(running) == 1:
            return running[0](x, base)
        for adapter in running:
            base = partial(adapter, base=base)
        return base(x)

    # -- merging ---------------------------------------------------------------------------------
    def _write(self, values: dict[str, torch.Tensor]) -> dict[str, float] | None:
        """Write new values into the base layer's tensors. A 4-bit weight is requantised: the error
        that introduced ({"max_abs", "rel_fro"}) is returned (None when no weight was requantised)."""
        error = None
        with torch.no_grad():
            for name, value in values.items():
                if name == "weight" and is_quantized(self.base_layer):
                    from ..quant.nf4 import requantize

                    error = requantize(self.base_layer, value)
                    continue
                target = getattr(self.base_layer, name)
                target.copy_(value.to(target.dtype))
        return error

    def check_mergeable(self, name: str) -> None:
        """Raise UnsafeMergeError if merging adapter `name` would write NaN/inf."""
        with torch.no_grad():
            for pname, value in self.adapters[name].merged_params().items():
                if not torch.isfinite(value).all():
                    raise UnsafeMergeError(
                        f"merging adapter {name!r} would write NaN/inf into {pname!r} of this layer; "
                        f"nothing was merged (check the adapter's tensors)"
                    )

    def merge(self, name: str) -> None:
        if name in self.merged:
            return
        with torch.no_grad():
            values = self.adapters[name].merged_params()
            if is_quantized(self.base_layer) and "weight" in values:
                from ..quant.nf4 import snapshot, warn_requantized

                self._quant_saved[name] = snapshot(self.base_layer)
                self.quant_error[name] = self._write(values)
                warn_requantized()
            else:
                self._write(values)
        self.merged.append(name)

    def unmerge(self, name: str | None = None) -> None:
        """Unmerge `name`, or every merged adapter (in reverse merge order)."""
        names = list(reversed(self.merged)) if name is None else [name]
        for n in names:
            if n not in self.merged:
                continue
            # adapters merged after `n` must come off first: their params were computed on top of it
            later = self.merged[self.merged.index(n) + 1 :]
            for m in reversed(later):
                self._unmerge_one(m)
            self._unmerge_one(n)
            for m in later:
                self.merge(m)

    def _unmerge_one(self, name: str) -> None:
        with torch.no_grad():
            values = self.adapters[name].unmerged_params()
            saved = self._quant_saved.pop(name, None)
            if saved is not None:  # a 4-bit weight: back to its exact state before the merge
                from ..quant.nf4 import restore

                restore(self.base_layer, saved)
                values = {k: v for k, v in values.items() if k != "weight"}
                self.quant_error.pop(name, None)
            self._write(values)
        self.merged.remove(name)


class TrainableCopy(nn.Module):
    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.copies: nn.ModuleDict = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False

    def add(self, name: str) -> None:
        clone = copy.deepcopy(self.original)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.copies[name] = clone

    def current(self) -> nn.Module:
        if not self.disabled and self.active is not None and self.active in self.copies:
            return self.copies[self.active]
        return self.original

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original", "copies"):
                raise
            return getattr(self.current(), name)

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)
