"""4-bit NormalFloat (NF4) base layers through ``bitsandbytes``: the frozen base of QLoRA.

:func:`quantize` replaces every plain ``nn.Linear`` of any ``nn.Module`` by a
``bitsandbytes.nn.Linear4bit`` built from its weight (blockwise absmax quantisation, block 64, to
the 16 NF4 levels; with ``double_quant`` the per-block float32 constants are themselves quantised
to 8 bits in blocks of 256). It needs no ``transformers`` ``BitsAndBytesConfig``: tiny test models
and any PyTorch model quantise the same way, on CPU or CUDA. Output heads stay in full precision:
the model's output embeddings (``lm_head``), modules named in :data:`DEFAULT_SKIP` (classifier
heads) and in ``skip``, and any linear layer whose weight is tied to another module.

Every weight-space method of subpeft attaches to such a layer (its type is ``linear``): core reaches
its weight through the weight-access protocol (:mod:`subpeft.core.weights`), for which this module
registers :class:`NF4Access` on import: reading dequantises (SVD methods take the SVD of the
dequantised W), writing (a merge) requantises (:func:`requantize`): the rounding error that
introduces is recorded per layer and adapter (:func:`merge_errors`) and a
:class:`QuantizedMergeWarning` says so; a snapshot keeps the packed codes, so unmerging restores the
4-bit weight held before the merge exactly. :func:`dequantize_model` turns every 4-bit layer back into ``nn.Linear`` (what
``merge_and_unload(dequantize=True)`` gives).

On CPUs with AVX512-BF16, ``Linear4bit`` in eval mode repacks its weight for a CPU kernel the first
time it sees an input without grad; that repacking undoes double quantisation, rounds the block
constants to bfloat16 (the output then differs from the dequantised W) and fails on layers whose
d_out is not a multiple of 32. The layers built here switch it off.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..core.errors import SubpeftError
from ..core.layer import AdaptedLayer, densify_model
from ..core.targets import OUTPUT_HEAD_NAMES
from ..core.weights import WeightAccess, _looks_packed, is_packed, register_weight_access

__all__ = [
    "DEFAULT_SKIP",
    "PagedOptimizerWarning",
    "QuantizationError",
    "QuantizedMergeWarning",
    "dequantize",
    "dequantize_model",
    "is_quantized",
    "merge_errors",
    "quantize",
    "requantize",
    "storage",
    "to_linear4bit",
]

#: Module names (a name, or a run of dotted components of one) kept in full precision by default:
#: the output heads (:data:`subpeft.core.targets.OUTPUT_HEAD_NAMES`, the list ``"all-linear"`` skips).
#: The model's output embeddings are kept too, whatever their name.
DEFAULT_SKIP: tuple[str, ...] = OUTPUT_HEAD_NAMES
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BNB_PIP = "pip install bitsandbytes"


class QuantizationError(SubpeftError):
    """A model or option that cannot be quantised as asked."""


class QuantizedMergeWarning(UserWarning):
    """A merge into a 4-bit base requantised the weight (see :func:`merge_errors`)."""


class PagedOptimizerWarning(UserWarning):
    """A paged optimizer was asked for where there is no CUDA: a non-paged fallback is used."""


def require_bitsandbytes(purpose: str = "4-bit quantisation"):
    """Import and return ``bitsandbytes``; an ImportError naming the pip command if it is absent."""
    try:
        import bitsandbytes
    except ImportError as exc:
        raise ImportError(f"{purpose} needs the package 'bitsandbytes'; install it with: {BNB_PIP}") from exc
    return bitsandbytes


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a 4-bit layer (its weight a bitsandbytes ``Params4bit`` with a quant state)."""
    return is_packed(module)


# -- building 4-bit layers ------------------------------------------------------------------------
def _check_options(bits: int, quant_type: str, blocksize: int, compute_dtype: torch.dtype | None) -> None:
    if bits != 4:
        raise QuantizationError(f"bits must be 4 (NF4/FP4 through bitsandbytes' Linear4bit), got {bits!r}")
    if quant_type not in ("nf4", "fp4"):
        raise QuantizationError(f"quant_type must be 'nf4' (QLoRA's NormalFloat) or 'fp4', got {quant_type!r}")
    if blocksize not in BLOCKSIZES:
        raise QuantizationError(f"blocksize must be one of {BLOCKSIZES} (QLoRA uses 64), got {blocksize!r}")
    if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
        raise QuantizationError(
            f"compute_dtype must be None or one of {[str(d) for d in COMPUTE_DTYPES]}, got {compute_dtype!r}"
        )


def to_linear4bit(
    linear: nn.Linear, *, double_quant: bool = True, compute_dtype: torch.dtype | None = torch.float32,
    quant_type: str = "nf4", blocksize: int = 64,
) -> nn.Module:
    """A ``bitsandbytes.nn.Linear4bit`` holding ``linear``'s weight in 4 bits (and its bias as it is)."""
    bnb = require_bitsandbytes()
    _check_options(4, quant_type, blocksize, compute_dtype)
    w = linear.weight.detach()
    if not w.is_floating_point() or w.is_meta:
        raise QuantizationError(f"cannot quantise a {w.dtype} weight on {w.device} (need a floating-point weight)")
    if w.dtype not in COMPUTE_DTYPES:
        w = w.float()
    packed, state = bnb.functional.quantize_4bit(
        w.contiguous(), blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
    )
    q = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=compute_dtype,
        compress_statistics=double_quant, quant_type=quant_type, device="meta",
    )
    q.weight = bnb.nn.Params4bit(
        packed, requires_grad=False, quant_state=state, blocksize=blocksize, compress_statistics=double_quant,
        quant_type=quant_type, module=q, bnb_quantized=True,
    )
    q.quant_state = state
    if linear.bias is not None:
        q.bias = linear.bias
    q.support_avx512bf16_for_cpu = False  # see the module docstring
    q.train(linear.training)
    return q


def _matches(name: str, entries: Iterable[str]) -> bool:
    """Whether an entry is ``name`` or a run of its dotted components (``classifier`` matches
    ``classifier.out_proj``; ``attention.output.dense`` matches ``encoder.layer.0.attention.output.dense``)."""
    dotted = f".{name}."
    return any(f".{entry}." in dotted for entry in entries)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def quantize(
    model: nn.Module, bits: int = 4, *, double_quant: bool = True, compute_dtype: torch.dtype | None = torch.float32,
    quant_type: str = "nf4", blocksize: int = 64, skip: Sequence[str] | None = None,
) -> nn.Module:
    """Store the model's linear layers in 4 bits, in place (the model is returned).

    Every module of type exactly ``nn.Linear`` becomes a ``Linear4bit`` (NF4 by default, with double
    quantisation of the block constants when ``double_quant``), except the output embeddings, the
    heads named in :data:`DEFAULT_SKIP`, the names in ``skip`` (a name or dotted suffix, matched as
    whole components) and layers whose weight is tied to another module: those stay in full precision.
    ``compute_dtype`` is the dtype of the 4-bit matmul (float32 by default; bfloat16 is slower on CPU).
    Quantise before attaching adapters.
    """
    require_bitsandbytes()
    _check_options(bits, quant_type, blocksize, compute_dtype)
    if isinstance(skip, str):
        skip = [skip]
    entries = tuple(DEFAULT_SKIP) + tuple(skip or ())
    if any(isinstance(m, AdaptedLayer) for m in model.modules()):
        raise QuantizationError("the model already has adapters: quantise the base model first, then attach")
    keep: set[int] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        out = get_out()
        if isinstance(out, nn.Module):
            keep.add(id(out))
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    names = [
        name for name, m in model.named_modules()
        if type(m) is nn.Linear and id(m) not in keep and not _matches(name, entries) and uses.get(id(m.weight), 0) == 1
    ]
    for name in names:
        _set_submodule(model, name, to_linear4bit(
            model.get_submodule(name), double_quant=double_quant, compute_dtype=compute_dtype,
            quant_type=quant_type, blocksize=blocksize,
        ))
    return model


# -- reading and writing a 4-bit weight ------------------------------------------------------------
def _unpack_cpu_format(module: nn.Module) -> None:
    """Undo bitsandbytes' CPU kernel repacking (see the module docstring), in place."""
    w = module.weight
    state = w.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        bnb = require_bitsandbytes()
        w.data, w.quant_state = bnb.functional._convert_weight_packed_for_cpu_inverse(w.data, state)
        if hasattr(module, "quant_state"):
            module.quant_state = w.quant_state


def dequantize(module: nn.Module) -> torch.Tensor:
    """The 4-bit layer's weight as a (d_out, d_in) floating-point tensor (the dtype it was quantised from)."""
    bnb = require_bitsandbytes()
    _unpack_cpu_format(module)
    w = module.weight
    return bnb.functional.dequantize_4bit(w.data, w.quant_state)


def requantize(module: nn.Module, weight: torch.Tensor) -> dict[str, float]:
    """Store ``weight`` (d_out, d_in) in the 4-bit layer with its own format (type, block size, double
    quantisation). Returns the rounding error: ``max_abs`` = max |Q(W) − W| and ``rel_fro`` =
    ‖Q(W) − W‖_F / ‖W‖_F."""
    bnb = require_bitsandbytes()
    _unpack_cpu_format(module)
    w = module.weight
    state = w.quant_state
    target = weight.detach().to(device=w.device, dtype=state.dtype).contiguous()
    if tuple(target.shape) != tuple(state.shape):
        raise QuantizationError(f"requantize: weight of shape {tuple(target.shape)} for a {tuple(state.shape)} layer")
    packed, new_state = bnb.functional.quantize_4bit(
        target, blocksize=state.blocksize, compress_statistics=state.nested, quant_type=state.quant_type,
        quant_storage=w.data.dtype,
    )
    w.data = packed
    w.quant_state = new_state
    if hasattr(module, "quant_state"):
        module.quant_state = new_state
    err = bnb.functional.dequantize_4bit(packed, new_state).float() - target.float()
    norm = target.float().norm()
    return {"max_abs": err.abs().max().item(), "rel_fro": (err.norm() / norm).item() if norm > 0 else 0.0}


def snapshot(module: nn.Module) -> tuple[torch.Tensor, Any]:
    """The 4-bit weight's current storage (packed data, quant state), for :func:`restore`. No copy:
    :func:`requantize` replaces both objects rather than writing into them."""
    _unpack_cpu_format(module)
    return module.weight.data, module.weight.quant_state


def restore(module: nn.Module, saved: tuple[torch.Tensor, Any]) -> None:
    """Put back a :func:`snapshot` (moved to the layer's device if the layer moved since)."""
    data, state = saved
    w = module.weight
    if data.device != w.device:
        data = data.to(w.device)
        state.to(w.device)
    w.data = data
    w.quant_state = state
    if hasattr(module, "quant_state"):
        module.quant_state = state


_REQUANTIZED = (
    "merging into a 4-bit base dequantises, adds and requantises the weight: the merged model differs "
    "from the unmerged one by that rounding error; subpeft.quant.merge_errors(tuned) gives it per layer "
    "(max-abs and relative Frobenius); merge_and_unload(dequantize=True) gives an exact full-precision model"
)


class NF4Access(WeightAccess):
    """The weight-access protocol (:mod:`subpeft.core.weights`) for a bitsandbytes 4-bit weight:
    ``read()`` dequantises, ``write()`` requantises in the layer's own format and returns the rounding
    error, ``snapshot()`` keeps the packed codes and quant state (no copy), ``shape`` / ``numel`` are
    the logical (d_out, d_in), ``dense_module()`` an ``nn.Linear`` with the dequantised weight."""

    __slots__ = ()
    packed = True
    rounding_warning = (QuantizedMergeWarning, _REQUANTIZED)

    @property
    def _state(self) -> Any:
        return self.module.weight.quant_state

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._state.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self._state.dtype

    def read(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = dequantize(self.module)
        return w if dtype is None or w.dtype == dtype else w.to(dtype)

    def write(self, value: torch.Tensor) -> dict[str, float]:
        return requantize(self.module, value)

    def snapshot(self) -> tuple[torch.Tensor, Any]:
        return snapshot(self.module)

    def restore(self, token: tuple[torch.Tensor, Any]) -> None:
        restore(self.module, token)

    def dense_module(self) -> nn.Linear:
        return _dense_linear(self.module)


def _nf4_access(module: nn.Module, name: str) -> NF4Access | None:
    """The 4-bit accessor for a quantised weight (:class:`~subpeft.quant.fsdp.ShardedNF4Access` for one
    FSDP2 has sharded); None (plain) for the bias, for a Linear4bit whose weight is not quantised yet,
    and for every plain ``nn.Linear``."""
    if name != "weight":
        return None
    if _looks_packed(module.weight):
        return NF4Access(module, name)
    if type(module.weight).__name__ == "DTensor" and getattr(module, "quant_state", None) is not None:
        from .fsdp import sharded_nf4_access  # a 4-bit weight FSDP2 has sharded (torch.distributed)

        return sharded_nf4_access(module, name)
    return None


# Registered for nn.Linear, of which bitsandbytes' Linear4bit is a subclass: naming Linear4bit itself
# would import bitsandbytes (seconds, and log lines) on every `import subpeft`.
register_weight_access(nn.Linear, _nf4_access)


def merge_errors(tuned: nn.Module) -> dict[str, dict[str, dict[str, float]]]:
    """The rounding error of every merge into a 4-bit layer of ``tuned`` (a TunedModel), as
    ``{layer name: {adapter name: {"max_abs": ..., "rel_fro": ...}}}``; empty when nothing merged
    into a 4-bit layer. ``max_abs`` is max |Q(W') − W'|, ``rel_fro`` ‖Q(W') − W'‖_F / ‖W'‖_F, with W'
    the merged full-precision weight and Q(W') what the 4-bit layer now holds."""
    return {name: dict(layer.quant_error) for name, layer in tuned.adapted_layers() if layer.quant_error}


def _dense_linear(module: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` holding the 4-bit layer's dequantised weight (and its bias)."""
    weight = dequantize(module)
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                       device="meta", dtype=weight.dtype)
    linear.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach().to(weight.dtype), requires_grad=module.bias.requires_grad)
    linear.train(module.training)
    return linear


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every 4-bit layer by an ``nn.Linear`` holding its dequantised weight (in the dtype it was
    quantised from), in place; the model is returned.

    Works on a plain model and on a model with adapters (a TunedModel, or the model inside one): a
    wrapped 4-bit base layer is replaced under its adapters, and adapters merged into it are unmerged
    first (restoring the 4-bit weight exactly) and merged again into the full-precision weight, which
    is then exact (no requantisation). This is ``merge_and_unload(dequantize=True)``: dequantise, then
    merge and unload. (:func:`subpeft.core.layer.densify_model` with :class:`NF4Access`'s dense form.)
    """
    return densify_model(model)


# -- memory accounting ------------------------------------------------------------------------------
def _state_tensors(state: Any) -> list[torch.Tensor]:
    out = [t for t in (state.absmax, state.code, getattr(state, "offset", None)) if isinstance(t, torch.Tensor)]
    nested = getattr(state, "state2", None) if state.nested else None
    if nested is not None:
        out += [t for t in (nested.absmax, nested.code) if isinstance(t, torch.Tensor)]
    return out


def _sharded(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def _local(t: torch.Tensor) -> torch.Tensor:
    """A tensor's storage on this rank: the local shard of a DTensor (FSDP2), else its data."""
    return t.to_local() if _sharded(t) else t.data


def storage(model: nn.Module) -> dict[str, float]:
    """Bytes held by the model's 4-bit layers and by everything else.

    ``quantized_params``: logical parameters (d_out·d_in) of the 4-bit weights; ``quantized_bytes``:
    their packed codes plus every quant-state tensor (block constants, the nested constants of double
    quantisation, code tables; a tensor shared by several layers counted once);
    ``bytes_per_quantized_param``; ``other_params`` / ``other_bytes``: every other parameter and
    buffer (biases, embeddings, norms, heads) as stored; ``bytes_per_param``: all bytes over all
    logical parameters. On a model FSDP2 has sharded, bytes are this rank's (local shards, and the
    replicated quant states); parameter counts stay the logical, global ones."""
    seen: set[tuple[int, int]] = set()

    def nbytes(t: torch.Tensor) -> int:
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.device.type != "meta" else (id(t), 0)
        if key in seen:
            return 0
        seen.add(key)
        return t.numel() * t.element_size()

    q_params = q_bytes = o_params = o_bytes = 0
    quant_weights: set[int] = set()
    for module in model.modules():
        if is_quantized(module) and id(module.weight) not in quant_weights:  # (an AdaptedLayer shows its base's)
            w = module.weight
            quant_weights.add(id(w))
            state = module.quant_state if _sharded(w) else w.quant_state
            q_params += int(torch.Size(state.shape).numel())
            q_bytes += nbytes(_local(w)) + sum(nbytes(t) for t in _state_tensors(state))
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in quant_weights:
            o_params += t.numel()
            o_bytes += nbytes(_local(t))
    total_params = q_params + o_params
    return {
        "quantized_params": q_params, "quantized_bytes": q_bytes,
        "bytes_per_quantized_param": q_bytes / q_params if q_params else float("nan"),
        "other_params": o_params, "other_bytes": o_bytes,
        "bytes_per_param": (q_bytes + o_bytes) / total_params if total_params else float("nan"),
    }
