"""A 4-bit (NF4) base under FSDP2 (``torch.distributed.fsdp.fully_shard``): QLoRA with a sharded base.

    from subpeft.quant import quantize
    from subpeft.quant.fsdp import prepare_for_fsdp, local_storage

    model = quantize(build_model())                     # Linear4bit layers (uint8 packed codes)
    tuned = sp.attach(model, sp.LoRA(r=8, targets="all-linear"))
    prepare_for_fsdp(tuned)                             # before fully_shard
    trainable = {p for p in tuned.parameters() if p.requires_grad}
    for block in tuned.model.model.layers:
        fully_shard(block, mesh=mesh, ignored_params=trainable)
    fully_shard(tuned.model, mesh=mesh, ignored_params=trainable)

How it works (verified on CPU with gloo, torch 2.13, bitsandbytes 0.50; see docs/qlora_fsdp.md):

- FSDP2 shards each ``Linear4bit`` weight as it is stored: the packed codes, a (d_out·d_in/2, 1)
  uint8 tensor, split on dim 0 (each rank keeps ~1/world of the codes). A block whose parameters
  mix dtypes (uint8 codes, float32 norms and biases) is all-gathered as bytes: FSDP2 does that by
  itself when the dtypes of a group differ, and requires one dtype only among *trainable*
  parameters (the adapter's, which are ignored here anyway). So ``quant_storage`` stays uint8.
- The quant state (block constants, double-quantisation constants, code table; ~3% of the codes'
  bytes with double quantisation) is not sharded: it lives on the module (``module.quant_state``)
  on every rank. The sharded parameter is a DTensor that has lost the ``quant_state`` a
  ``Params4bit`` carries; after FSDP2 all-gathers it in a forward or backward, the
  parameter is a plain uint8 tensor, and ``Linear4bit.forward`` wraps it again as a
  ``Params4bit`` with ``module.quant_state`` (bitsandbytes' own recovery,
  ``fix_4bit_weight_quant_state_from_module``). The wrapper shares the gathered storage, which
  FSDP2 frees when it reshards. :func:`prepare_for_fsdp` makes sure that recovery finds a correct
  state: ``module.quant_state`` is the weight's own, the codes are in bitsandbytes' standard layout
  (not the CPU kernel's repacked one), and that repacking stays off.
- Outside a forward, core reaches a sharded 4-bit weight through :class:`ShardedNF4Access`
  (registered through :mod:`subpeft.quant.nf4`'s accessor for ``nn.Linear``): ``read()`` gathers
  the codes (a collective: every rank calls it, in the same order) and dequantises; ``write()``
  requantises the full weight (the same on every rank) and keeps this rank's shard of the new
  codes; ``snapshot()`` / ``restore()`` keep the local shard and the quant state. So merge, unmerge
  and ``is_quantized`` work on the sharded model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.weights import _looks_packed
from .nf4 import NF4Access, QuantizationError, _unpack_cpu_format, require_bitsandbytes

__all__ = ["ShardedNF4Access", "local_storage", "prepare_for_fsdp", "sharded_nf4_access"]


def _is_dtensor(t: Any) -> bool:
    if type(t).__name__ != "DTensor":  # no import of torch.distributed for plain tensors
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _quant_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every bitsandbytes 4-bit layer of ``model`` (unwrapped: the base layers under adapters)."""
    bnb = require_bitsandbytes()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def prepare_for_fsdp(model: nn.Module) -> nn.Module:
    """Ready a model with 4-bit layers (a plain model or a TunedModel) for ``fully_shard``, in place;
    returns the model. Call it after :func:`~subpeft.quant.quantize` and attaching, before sharding.

    For every ``Linear4bit``: the codes are put back into bitsandbytes' standard layout if its CPU
    kernel had repacked them; ``module.quant_state`` is set to the weight's quant state (what the
    layer's forward restores from after FSDP2 has gathered the bare codes); the CPU repacking in
    eval mode is switched off (it would rewrite the gathered codes and the quant state on one rank
    only). A :class:`~subpeft.quant.QuantizationError` names a layer that cannot be sharded: one
    whose weight is not quantised yet, is not a contiguous (n, 1) tensor of packed codes, or is
    already sharded without a quant state on the module.
    """
    for name, module in _quant_modules(model):
        w = module.weight
        if _is_dtensor(w):
            if getattr(module, "quant_state", None) is None:
                raise QuantizationError(f"{name}: already sharded and its quant state is lost (prepare before fully_shard)")
            continue
        if not _looks_packed(w):
            raise QuantizationError(f"{name}: the 4-bit layer's weight is not quantised yet (no quant state)")
        _unpack_cpu_format(module)
        w = module.weight
        if w.dim() != 2 or w.shape[1] != 1 or not w.is_contiguous():
            raise QuantizationError(
                f"{name}: packed codes of shape {tuple(w.shape)} (stride {w.stride()}); FSDP2 sharding needs a "
                f"contiguous (n, 1) tensor, bitsandbytes' standard layout"
            )
        state = w.quant_state
        if state.absmax.device != w.device:
            state.to(w.device)
        module.quant_state = state
        module.support_avx512bf16_for_cpu = False
    return model


# -- the weight access of a sharded 4-bit weight -----------------------------------------------------
def _local_shard(full: torch.Tensor, dtensor: Any) -> torch.Tensor:
    """This rank's piece of ``full`` as FSDP2 shards it: torch.chunk on the DTensor's Shard dim."""
    from torch.distributed.tensor import Shard

    shards = [(i, p) for i, p in enumerate(dtensor.placements) if isinstance(p, Shard)]
    if len(shards) != 1:
        raise QuantizationError(f"a 4-bit weight with placements {dtensor.placements}: exactly one Shard(dim) is supported")
    ((mesh_dim, placement),) = shards
    mesh = dtensor.device_mesh
    chunks = torch.chunk(full, mesh.size(mesh_dim), dim=placement.dim)
    rank = mesh.get_local_rank(mesh_dim)
    local = dtensor.to_local()
    piece = chunks[rank] if rank < len(chunks) else full.narrow(placement.dim, 0, 0)
    if piece.shape != local.shape:
        raise QuantizationError(f"shard of shape {tuple(piece.shape)} for a local tensor of {tuple(local.shape)}")
    return piece


class ShardedNF4Access(NF4Access):
    """The weight-access protocol for a ``Linear4bit`` whose packed codes FSDP2 has sharded (a
    ``DTensor``) and whose quant state is on the module: ``read()`` all-gathers the codes and
    dequantises (a collective), ``write()`` requantises the full weight and stores this rank's shard
    of the new codes (every rank must write the same value, as merge does), ``snapshot()`` the local
    codes and the quant state (no communication), ``shape`` the logical (d_out, d_in)."""

    __slots__ = ()

    @property
    def _state(self) -> Any:  # the quant state lives on the module once the weight is sharded
        return self.module.quant_state

    @property
    def device(self) -> torch.device:
        return self.tensor.to_local().device

    def read(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        bnb = require_bitsandbytes()
        codes = self.tensor.full_tensor().contiguous()
        w = bnb.functional.dequantize_4bit(codes, self._state)
        return w if dtype is None or w.dtype == dtype else w.to(dtype)

    def write(self, value: torch.Tensor) -> dict[str, float]:
        bnb = require_bitsandbytes()
        state = self._state
        local = self.tensor.to_local()
        target = value.detach().to(device=local.device, dtype=state.dtype).contiguous()
        if tuple(target.shape) != tuple(state.shape):
            raise QuantizationError(f"write: weight of shape {tuple(target.shape)} for a {tuple(state.shape)} layer")
        packed, new_state = bnb.functional.quantize_4bit(
            target, blocksize=state.blocksize, compress_statistics=state.nested, quant_type=state.quant_type,
            quant_storage=local.dtype,
        )
        with torch.no_grad():
            local.copy_(_local_shard(packed.view(-1, 1), self.tensor))
        self.module.quant_state = new_state
        err = bnb.functional.dequantize_4bit(packed, new_state).float() - target.float()
        norm = target.float().norm()
        return {"max_abs": err.abs().max().item(), "rel_fro": (err.norm() / norm).item() if norm > 0 else 0.0}

    def snapshot(self) -> tuple[torch.Tensor, Any]:
        return self.tensor.to_local().detach().clone(), self._state

    def restore(self, token: tuple[torch.Tensor, Any]) -> None:
        local, state = token
        with torch.no_grad():
            self.tensor.to_local().copy_(local)
        self.module.quant_state = state

    def dense_module(self) -> nn.Module | None:
        raise QuantizationError("dequantising a sharded 4-bit layer into a dense one is not supported under FSDP2; "
                                "gather the model first")


def sharded_nf4_access(module: nn.Module, name: str) -> ShardedNF4Access | None:
    """The accessor of a sharded 4-bit weight (a DTensor ``weight`` of a module that holds a
    ``quant_state``), else None. A weight-access factory for DTensors should ask this one first."""
    if name != "weight" or getattr(module, "quant_state", None) is None:
        return None
    return ShardedNF4Access(module, name) if _is_dtensor(getattr(module, "weight", None)) else None


# -- memory per rank -------------------------------------------------------------------------------
def local_storage(model: nn.Module) -> dict[str, int]:
    """Bytes this rank holds for ``model``'s parameters, buffers and 4-bit quant states (each tensor
    once): ``sharded_bytes`` (the local shards of parameters FSDP2 manages: DTensors),
    ``replicated_bytes`` (plain parameters and buffers: ignored parameters such as the adapter,
    and anything not sharded), ``quant_state_bytes`` (the 4-bit layers' block constants and code
    tables, replicated), ``packed_code_bytes`` (the part of ``sharded_bytes`` + ``replicated_bytes``
    that is 4-bit codes) and ``total_bytes``. Call between steps (parameters sharded)."""
    from .nf4 import _state_tensors

    seen: set[tuple[int, int]] = set()

    def nbytes(t: torch.Tensor) -> int:
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            return 0
        seen.add(key)
        return t.numel() * t.element_size()

    code_ids: set[int] = set()
    states = []
    for _, module in _quant_modules(model):
        code_ids.add(id(module.weight))
        state = module.quant_state if _is_dtensor(module.weight) else getattr(module.weight, "quant_state", None)
        if state is not None:
            states.append(state)
    sharded = replicated = codes = 0
    for t in list(model.parameters()) + list(model.buffers()):
        b = nbytes(t.to_local()) if _is_dtensor(t) else nbytes(t)
        if _is_dtensor(t):
            sharded += b
        else:
            replicated += b
        if id(t) in code_ids:
            codes += b
    state_bytes = sum(nbytes(x) for s in states for x in _state_tensors(s))
    return {
        "sharded_bytes": sharded, "replicated_bytes": replicated, "quant_state_bytes": state_bytes,
        "packed_code_bytes": codes, "total_bytes": sharded + replicated + state_bytes,
    }
