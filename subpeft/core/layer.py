"""Wrappers that replace modules of the base model.

- :class:`AdaptedLayer` wraps one base layer and holds its named adapters, the active set and the
  merge state. Its forward chains the active, unmerged adapters around the base layer (the first
  active one innermost; merged adapters are in the weight, below all of them).

  Merge and unmerge, one mechanism for every method and weight format: a merge keeps the tensors it
  overwrites (a copy of a dense weight or bias; for a 4-bit weight its packed codes and quant state,
  no copy, as requantising replaces both) and unmerge puts them back, so the base is restored bit
  for bit in any dtype, however many cycles run and whatever the adapter's values (a float inverse
  such as W + ΔW − ΔW drifts in bfloat16 and cannot undo NaN). A merge that would write NaN/inf
  where the base was finite raises :class:`UnsafeMergeError` before writing. On a 4-bit base a merge
  dequantises, adds and requantises: the error requantising introduced is recorded per adapter in
  ``quant_error`` ({"max_abs", "rel_fro"}, see :func:`subpeft.quant.merge_errors`).
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
        # per merged adapter: the base tensors its merge overwrote, put back by unmerge
        self._saved: dict[str, dict[str, object]] = {}
        # 4-bit base only: per merged adapter, the error requantising introduced
        self.quant_error: dict[str, dict[str, float]] = {}

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
        for i, adapter in enumerate(running):
            if i and adapter.reads_stack:
                base = partial(adapter, base=base, below=tuple(running[:i]))
            else:
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

    def _check_finite(self, name: str, values: dict[str, torch.Tensor], where: str = "") -> None:
        """UnsafeMergeError if writing ``values`` would put NaN/inf where the base tensor is finite."""
        for pname, value in values.items():
            bad = ~torch.isfinite(value)
            if not bool(bad.any()):
                continue
            if pname == "weight" and is_quantized(self.base_layer):
                from .layers import base_weight

                current = base_weight(self.base_layer)
            else:
                current = getattr(self.base_layer, pname)
            if bool((bad & torch.isfinite(current)).any()):
                layer = f" of layer {where!r}" if where else " of this layer"
                raise UnsafeMergeError(
                    f"merging adapter {name!r} would write NaN/inf into {pname!r}{layer}; nothing was merged "
                    f"(check the adapter's tensors)"
                )

    def check_mergeable(self, name: str, where: str = "") -> None:
        """Raise UnsafeMergeError if merging adapter `name` would write NaN/inf."""
        with torch.no_grad():
            self._check_finite(name, self.adapters[name].merged_params(), where)

    def _snapshot(self, names) -> dict[str, object]:
        """The base tensors ``names`` as they are now, for :meth:`_restore`."""
        saved: dict[str, object] = {}
        for pname in names:
            if pname == "weight" and is_quantized(self.base_layer):
                from ..quant.nf4 import snapshot

                saved[pname] = snapshot(self.base_layer)
            else:
                saved[pname] = getattr(self.base_layer, pname).detach().clone()
        return saved

    def _restore(self, saved: dict[str, object]) -> None:
        for pname, value in saved.items():
            if pname == "weight" and is_quantized(self.base_layer):
                from ..quant.nf4 import restore

                restore(self.base_layer, value)
            else:
                getattr(self.base_layer, pname).copy_(value)

    def merge(self, name: str, *, keep: bool = True, where: str = "") -> None:
        """Fold adapter ``name`` into the base tensors. ``keep=False`` keeps no copy of what it
        overwrites (for merge_and_unload, which never unmerges): unmerge then falls back to the
        adapter's approximate inverse."""
        if name in self.merged:
            return
        with torch.no_grad():
            values = self.adapters[name].merged_params()
            self._check_finite(name, values, where)
            if keep:
                self._saved[name] = self._snapshot(values)
            error = self._write(values)
            if error is not None:
                from ..quant.nf4 import warn_requantized

                self.quant_error[name] = error
                warn_requantized()
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
            saved = self._saved.pop(name, None)
            if saved is not None:  # the tensors before the merge, exactly
                self._restore(saved)
            else:
                self._write(self.adapters[name].unmerged_params())
        self.quant_error.pop(name, None)
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
