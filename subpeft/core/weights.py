"""The one way to reach a base layer's tensors: the weight-access protocol.

Every place outside a forward pass that reads or writes a frozen base tensor (a layer's ``weight``,
or its ``bias``) goes through a :class:`WeightAccess`: attach (SVD of W, DoRA's row norms), merge and
unmerge, ``merged_params()`` of every method, analysis, parameter counts. It says, for one tensor of
one module:

- ``read(dtype=None)``: the tensor's values as a dense floating-point tensor in the layer's native
  layout (``nn.Linear``: (d_out, d_in); Conv1D: (d_in, d_out); ...). For plain storage this is the
  stored tensor itself, no copy (never write into it); for other storage a fresh tensor;
- ``write(value)``: store dense values (native layout, logical shape). Returns None when the values
  were stored exactly, else the rounding error the storage introduced (``{"max_abs", "rel_fro"}``);
  a merge records it per adapter and gives ``rounding_warning`` once;
- ``snapshot()`` → an opaque token and ``restore(token)``: the storage as it is now, put back bit
  for bit (merge keeps one per overwritten tensor, unmerge restores it: exact in any dtype and
  format, whatever the adapter's values). The token is whatever is cheapest to keep: a clone for
  plain storage, the packed codes and quant state (no copy) for a 4-bit weight;
- ``shape`` / ``numel``: the logical shape and parameter count (d_out·d_in for a 4-bit weight,
  not its packed bytes), ``dtype`` (what ``read()`` gives) and ``device``;
- ``packed``: whether the stored tensor is not W's values (4-bit codes: ``read()`` decodes);
- ``dense_module()``: an equivalent plain module that holds the tensor densely (for
  ``merge_and_unload(dequantize=True)``), or None where the layer already does.

Forward passes are not part of it: a layer's forward computes with its own tensors, and the
adapters' fast paths read them as the layer does (only for layer types they recognise).

Implementations are found by :func:`weight_access` from a registry keyed by class
(:func:`register_weight_access`). The tensor's class is looked up first (its MRO), then the module's:
a factory ``factory(module, name)`` returns an accessor, or None to pass (e.g. a 4-bit layer's
``bias`` is plain). Where none answers, the tensor is plain storage (:class:`WeightAccess` itself:
``nn.Linear``, transformers' Conv1D, ``nn.Conv2d``, ``nn.Embedding``, norms, and any module with a
dense tensor). :mod:`subpeft.quant` registers the 4-bit one (``bitsandbytes.nn.Linear4bit``) when
imported, which ``import subpeft`` does; core never imports quant. A packed 4-bit weight met
without a registered accessor is an :class:`~subpeft.core.errors.UnsupportedLayerError`, never read
as its raw codes.

Adding a storage format (for whoever adds sharded FSDP2 weights next): subclass
:class:`WeightAccess` and register it; nothing in core or the methods changes. FSDP2's
``fully_shard`` leaves the classes of the layers inside a sharded block alone and turns their
parameters into ``DTensor``s, so register by the tensor's class::

    register_weight_access(DTensor, lambda module, name: ShardedAccess(module, name))

with ``read()`` = ``full_tensor()`` (a collective: every rank calls it, in the same order, which
attach, merge and unmerge already do), ``write(value)`` copying this rank's shard of ``value`` (the
same on every rank: it is computed from the gathered W and the replicated adapter) into the local
tensor, ``snapshot()`` a clone of the local shard only (1/world of the memory, no communication) and
``restore()`` copying it back; ``shape`` / ``numel`` are the global ones (``DTensor.shape``). During
forward FSDP2 has unsharded the parameters, so forward code needs nothing. A format that combines
two (a sharded 4-bit weight) registers its own accessor under the class looked up first.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from .errors import UnsupportedLayerError

__all__ = [
    "WeightAccess",
    "WeightAccessFactory",
    "is_packed",
    "read_weight",
    "register_weight_access",
    "weight_access",
]


class WeightAccess:
    """Access to one tensor (``name``) of one module stored as a plain dense tensor; subclasses
    implement other storage (see the module docstring)."""

    __slots__ = ("module", "name")

    #: whether the stored tensor is not the values themselves (read() decodes, write() encodes)
    packed: ClassVar[bool] = False
    #: (category, message) of the warning a merge gives when write() rounded; None: writes are exact
    rounding_warning: ClassVar[tuple[type[Warning], str] | None] = None

    def __init__(self, module: Any, name: str = "weight") -> None:
        self.module = module
        self.name = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.module).__name__}.{self.name}, shape={tuple(self.shape)})"

    @property
    def tensor(self) -> torch.Tensor:
        """The stored tensor (for a packed format: its storage, not W's values)."""
        return getattr(self.module, self.name)

    # -- what it is ------------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        """The logical shape in the layer's native layout."""
        return self.tensor.shape

    @property
    def numel(self) -> int:
        """The logical number of parameters."""
        return self.shape.numel()

    @property
    def dtype(self) -> torch.dtype:
        """The dtype :meth:`read` gives (a packed weight: the dtype it was quantised from)."""
        return self.tensor.dtype

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    # -- values ----------------------------------------------------------------------------------
    def read(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The values as a dense tensor in the native layout (in ``dtype`` if given). Plain storage:
        the stored tensor itself when no cast is needed; do not write into what this returns."""
        t = self.tensor
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def write(self, value: torch.Tensor) -> dict[str, float] | None:
        """Store ``value`` (native layout, logical shape). None: stored exactly (after a cast to the
        tensor's dtype); else the rounding error ``{"max_abs", "rel_fro"}`` the storage introduced."""
        t = self.tensor
        if tuple(value.shape) != tuple(t.shape):
            raise ValueError(f"cannot write a {tuple(value.shape)} tensor into {self.name!r} of shape {tuple(t.shape)}")
        with torch.no_grad():
            t.copy_(value.to(t.dtype))
        return None

    # -- exact save and restore --------------------------------------------------------------------
    def snapshot(self) -> Any:
        """An opaque token holding the storage as it is now, for :meth:`restore`."""
        return self.tensor.detach().clone()

    def restore(self, token: Any) -> None:
        """Put back the storage a :meth:`snapshot` of this tensor held, bit for bit."""
        with torch.no_grad():
            self.tensor.copy_(token)

    # -- format conversion --------------------------------------------------------------------------
    def dense_module(self) -> nn.Module | None:
        """A plain module equivalent to this one that stores the tensor densely, or None when the
        module already does."""
        return None


#: ``factory(module, name)`` → a :class:`WeightAccess`, or None to leave the tensor to the next one
WeightAccessFactory = Callable[[Any, str], "WeightAccess | None"]

_REGISTRY: dict[type, WeightAccessFactory] = {}
# (tensor class, module class) -> the factories that may answer, in lookup order
_RESOLVED: dict[tuple[type, type], tuple[WeightAccessFactory, ...]] = {}


def register_weight_access(cls: type, factory: WeightAccessFactory) -> None:
    """Use ``factory(module, name)`` for tensors of class ``cls`` (a ``torch.Tensor`` subclass, e.g.
    a sharded ``DTensor``) or of modules of class ``cls`` (an ``nn.Module`` subclass, e.g.
    ``Linear4bit``), subclasses included. Tensor classes are looked up before module classes; a
    later registration for the same class replaces the earlier one."""
    if not isinstance(cls, type):
        raise TypeError(f"register_weight_access needs a class, got {cls!r}")
    if cls in (torch.Tensor, nn.Parameter, object):
        raise ValueError(f"register a specific tensor or module class, not {cls.__name__} (plain tensors are the default)")
    _REGISTRY[cls] = factory
    _RESOLVED.clear()


def _looks_packed(t: torch.Tensor) -> bool:
    # bitsandbytes keeps a 4-bit weight's QuantState as an instance attribute of the parameter. Plain
    # getattr, not t.__dict__: torch.compile's Dynamo fails on a tensor's __dict__ (an internal error
    # in torch 2.13), and DoRA reads the base weight through here inside forward
    return getattr(t, "quant_state", None) is not None


def weight_access(module: Any, name: str = "weight") -> WeightAccess:
    """The accessor of ``module``'s tensor ``name`` (see the module docstring)."""
    t = getattr(module, name, None)
    if not isinstance(t, torch.Tensor):
        raise UnsupportedLayerError(f"{type(module).__name__} has no tensor {name!r} to read or write")
    key = (type(t), type(module))
    chain = _RESOLVED.get(key)
    if chain is None:
        classes = (*type(t).__mro__, *type(module).__mro__)
        chain = _RESOLVED[key] = tuple(_REGISTRY[c] for c in classes if c in _REGISTRY)
    for factory in chain:
        access = factory(module, name)
        if access is not None:
            return access
    if _looks_packed(t):
        raise UnsupportedLayerError(
            f"the {name!r} of this {type(module).__name__} is stored packed (4-bit codes with a quant state) and no "
            f"weight access is registered for it: import subpeft.quant (it registers bitsandbytes' Linear4bit), "
            f"or register_weight_access() one for {type(module).__name__}"
        )
    return WeightAccess(module, name)


def read_weight(module: Any, name: str = "weight", dtype: torch.dtype | None = None) -> torch.Tensor:
    """``weight_access(module, name).read(dtype)``: the tensor's values, dense, in native layout."""
    return weight_access(module, name).read(dtype)


def is_packed(module: Any, name: str = "weight") -> bool:
    """Whether ``module`` stores tensor ``name`` packed (e.g. 4-bit codes); False where it has none.
    A packed tensor without a registered accessor counts as packed."""
    t = getattr(module, name, None)
    if not isinstance(t, torch.Tensor):
        return False
    try:
        return weight_access(module, name).packed
    except UnsupportedLayerError:
        return _looks_packed(t)


def warn_rounding(access: WeightAccess, stacklevel: int = 2) -> None:
    """Give ``access.rounding_warning`` (nothing for a format that stores exactly)."""
    if access.rounding_warning is not None:
        category, message = access.rounding_warning
        warnings.warn(message, category, stacklevel=stacklevel + 1)
