"""Wrappers that replace modules of the base model.

- :class:`AdaptedLayer` wraps one base layer and holds its named adapters, the active set and the
  merge state. Its forward chains the active, unmerged adapters around the base layer (the first
  active one innermost; merged adapters are in the weight, below all of them).

  Merge and unmerge, one mechanism for every method and weight format, through the weight-access
  protocol (:mod:`.weights`): a merge keeps a snapshot of each tensor it overwrites (a copy of a dense
  weight or bias; for a 4-bit weight its packed codes and quant state, no copy, as requantising
  replaces both) and unmerge restores it, so the base is restored bit for bit in any dtype, however
  many cycles run and whatever the adapter's values (a float inverse such as W + ΔW − ΔW drifts in
  bfloat16 and cannot undo NaN). A merge that would write NaN/inf
  where the base was finite raises :class:`UnsafeMergeError` before writing. On a 4-bit base a merge
  dequantises, adds and requantises (the accessor's write rounds): the error it reports is recorded
  per adapter in ``quant_error`` ({"max_abs", "rel_fro"}, see :func:`subpeft.quant.merge_errors`) and
  the accessor's ``rounding_warning`` is given. :func:`densify_model` swaps packed layers for their
  dense form (``merge_and_unload(dequantize=True)``).
- :class:`TrainableCopy` wraps a module listed in ``modules_to_save``: one trainable copy per
  adapter, the original kept for ``disable_adapter()`` and ``unload()``.
"""

from __future__ import annotations

import copy
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import UnsafeMergeError
from .weights import WeightAccess, register_weight_access, warn_rounding, weight_access

if TYPE_CHECKING:
    from .adapter import Adapter


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
    def _write(self, values: dict[str, torch.Tensor]) -> tuple[WeightAccess, dict[str, float]] | None:
        """Write new values into the base layer's tensors (through their weight access). Returns the
        accessor and rounding error of a storage that did not write exactly (a 4-bit weight), else None."""
        rounded = None
        with torch.no_grad():
            for pname, value in values.items():
                access = weight_access(self.base_layer, pname)
                error = access.write(value)
                if error is not None:
                    rounded = access, error
        return rounded

    def _check_finite(self, name: str, values: dict[str, torch.Tensor], where: str = "") -> None:
        """UnsafeMergeError if writing ``values`` would put NaN/inf where the base tensor is finite."""
        for pname, value in values.items():
            bad = ~torch.isfinite(value)
            if not bool(bad.any()):
                continue
            current = weight_access(self.base_layer, pname).read()
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
        """Snapshots (weight-access tokens) of the base tensors ``names`` as they are now, for :meth:`_restore`."""
        return {pname: weight_access(self.base_layer, pname).snapshot() for pname in names}

    def _restore(self, saved: dict[str, object]) -> None:
        with torch.no_grad():
            for pname, token in saved.items():
                weight_access(self.base_layer, pname).restore(token)

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
            rounded = self._write(values)
            if rounded is not None:
                access, self.quant_error[name] = rounded
                warn_rounding(access, stacklevel=3)
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


    def replace_base(self, new: nn.Module) -> None:
        """Put ``new`` in place of the base layer under the same adapters (nothing may be merged)."""
        if self.merged:
            raise RuntimeError(f"replace_base with merged adapters {self.merged}: unmerge them first")
        self.base_layer = new
        for adapter in self.adapters.values():
            adapter.__dict__["_base_layer"] = new  # Adapter.base_layer: a plain reference


# an AdaptedLayer's tensors are its base layer's (its attribute lookup forwards to it)
register_weight_access(AdaptedLayer, lambda module, name: weight_access(module.base_layer, name))


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in ``root`` at the dotted ``name`` (replacing what is there)."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def densify_model(model: nn.Module) -> nn.Module:
    """Replace every layer whose weight access has a dense form (a 4-bit layer: an ``nn.Linear`` with
    the dequantised weight, see :meth:`.weights.WeightAccess.dense_module`) by that form, in place;
    returns the model (the new layer when ``model`` itself is one).

    Adapters stay: a wrapped layer is replaced under them, and adapters merged into it are unmerged
    first (restoring the stored weight exactly) and merged again into the dense weight, exact then."""
    for layer in list(model.modules()):
        if isinstance(layer, AdaptedLayer):
            access = weight_access(layer.base_layer)
            if not access.packed:
                continue
            merged = list(layer.merged)
            layer.unmerge()
            dense = access.dense_module()
            if dense is None:
                for n in merged:
                    layer.merge(n)
                continue
            layer.replace_base(dense)
            for n in merged:
                layer.merge(n)
    for name, module in list(model.named_modules()):
        if isinstance(module, AdaptedLayer) or not isinstance(module._parameters.get("weight"), torch.Tensor):
            continue
        dense = weight_access(module).dense_module()
        if dense is None:
            continue
        if not name:
            return dense
        set_submodule(model, name, dense)
    return model


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
