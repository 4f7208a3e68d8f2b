"""Training in several processes with the existing engines: torch.distributed DDP and FSDP2.

Launch with ``torchrun --nproc-per-node N`` (one process per device; on CPU the gloo backend, on CUDA
nccl, chosen by :func:`init`). Then, in every process, the same code::

    import subpeft as sp
    from subpeft import distributed as spd

    device = spd.init()                      # the process group, from torchrun's environment
    tuned = sp.attach(model, sp.LoRA(r=8))   # attach first (SVD-based methods read the full W)
    model = spd.wrap(tuned, "ddp")           # DistributedDataParallel, or "fsdp": spd.shard(tuned)

The library's :class:`~subpeft.training.loop.Trainer` does the rest: each process takes its slice of every
global micro-batch, the loss is weighted so that N processes with batch b compute the gradient of 1 process
with batch N·b, only rank 0 writes files and prints, and the adapter is checked to be the same on every rank.

**DDP** (:func:`wrap` with ``"ddp"``): ``DistributedDataParallel`` around the tuned model, with
``find_unused_parameters`` only for methods that declare that some trainable tensors sit out part of
training (``MethodTraits.idle_parameters``: LoRA-Dash's Δσ before its switch). Buffers are not broadcast
at every forward: the adapters' buffers (AdaLoRA's masks, LoRA-Dash's directions) are computed by the
same code from the same all-reduced gradients on every rank, which :func:`check_consistent` verifies.

**FSDP2** (:func:`shard`): ``torch.distributed.fsdp.fully_shard`` on every transformer block and on the
root. FSDP2 shards the **frozen base** (each rank keeps 1/N of it; a block is gathered for its forward
and backward). The trainable tensors of a PEFT run (adapters, a fresh head, BitFit's biases) are small
and many methods' training hooks read or rank them as a whole (AdaLoRA's budget, LoRA-Dash's top-s
directions, Diff pruning's top-k), so they stay whole on every rank (``ignored_params``) and
:func:`sync_gradients` averages their gradients with one ``all_reduce`` per optimizer step, before
clipping. Consequences: one dtype per FSDP group comes for free (groups hold only base weights: float32
adapters on a bf16 base work); tensors shared across blocks (PiCa's per-role M, VeRA's projections) are
either trainable (whole on every rank) or buffers, which FSDP does not shard. When every parameter trains
(full fine-tuning) nothing is left whole: FSDP2 shards everything and reduces the gradients itself.

**Attach before sharding.** SVD-based attaches (SAM-PARSER, SVDiff, Spectral, PiCa) and the layer swap
itself need the modules as they were; attaching to a sharded model is an error that says so. After
sharding, what reads or writes a base weight outside a forward (merge, unmerge, LoRA-Dash's switch,
analysis) goes through the weight-access protocol: :class:`ShardedAccess`, registered for ``DTensor``,
gathers the full W (a collective: every rank calls it, in the same order) and writes back each rank's
shard.

**Files**: adapters are whole on every rank, so rank 0 writes exactly what a single process would; an
adapter loads into a model before it is sharded (``sp.load``) or after (the adapter's tensors are whole).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn

from .core.errors import SubpeftError
from .core.weights import WeightAccess, register_weight_access

__all__ = [
    "RankDivergenceError",
    "ShardedAccess",
    "STRATEGIES",
    "all_reduce_sum",
    "barrier",
    "check_consistent",
    "end_process",
    "full_tensor",
    "gather_objects",
    "init",
    "is_main",
    "is_sharded",
    "launched",
    "rank",
    "shard",
    "shutdown",
    "sync_gradients",
    "unwrap",
    "world_size",
    "wrap",
]

#: what ``--strategy`` accepts
STRATEGIES = ("ddp", "fsdp")


class RankDivergenceError(SubpeftError):
    """The processes of a run no longer hold the same adapter (a per-rank decision drifted)."""


# --------------------------------------------------------------------------- the process group


def launched() -> bool:
    """Whether this process was started by a launcher for several processes (torchrun's ``WORLD_SIZE`` > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def active() -> bool:
    """Whether a process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one that prints and writes files."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


_OWNED = False  # whether init() started the group (shutdown() ends only that one)


def init(device: str | torch.device | None = None) -> torch.device:
    """Start the process group from the launcher's environment (nothing when there is one process or a group
    is running already) and return this process's device: ``cuda:LOCAL_RANK`` where CUDA is available (nccl),
    else the CPU (gloo). ``device`` forces one (``"cpu"``: gloo even where CUDA is)."""
    global _OWNED
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is not None:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None and launched():
            dev = torch.device("cuda", local)
    else:
        dev = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if launched() and not (dist.is_available() and dist.is_initialized()):
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
        _OWNED = True
    return dev


def shutdown() -> None:
    """End the process group :func:`init` started (a no-op otherwise)."""
    global _OWNED
    if _OWNED and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED = False


def end_process(status: int) -> NoReturn:
    """Leave a process of a multi-process launch: end the process group, flush the logs and the output
    streams, and exit with ``status`` without the interpreter's finalization (``os._exit``).

    Why not a normal exit: a gloo worker thread may still hold the last reference to a finished collective's
    work (e.g. ``all_gather_object``'s tensors, whose Python objects it must release). Where it lets go only
    after the interpreter began finalizing, taking the GIL ends that thread with a forced unwind and the whole
    process aborts ("terminate called without an active exception", SIGABRT): a finished, saved run would
    report failure to torchrun. Seen in this project's CI under load (core dump: ``AsyncAllgatherWork``
    destroyed in ``ProcessGroupGloo::runLoop`` while the main thread ran the exit-time garbage collection);
    torch's guard checks ``Py_IsInitialized`` where it would need ``Py_IsFinalizing`` (pytorch/pytorch#190489,
    open for torch 2.13). Call it last, after every file is written and closed: ``atexit`` hooks do not run
    (logging's is called here)."""
    shutdown()
    if dist.is_available() and dist.is_initialized():  # a group started elsewhere (not by init): end it too
        dist.destroy_process_group()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said there
            pass
    os._exit(status)


def all_reduce_sum(values: list[float]) -> list[float]:
    """The sums over ranks of a few numbers (float64; one collective); the numbers themselves in one process."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` in one process)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# --------------------------------------------------------------------------- wrapping


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` (the model itself otherwise: FSDP2 shards in place)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _tuned_instances(model: nn.Module) -> list[Any]:
    instances = getattr(unwrap(model), "instances", None)
    return list(instances.values()) if isinstance(instances, dict) else []


def idle_parameters(model: nn.Module) -> list[str]:
    """The methods of ``model`` whose trainable tensors sit out part of training (they need DDP's
    ``find_unused_parameters``)."""
    return [inst.config.method for inst in _tuned_instances(model)
            if getattr(getattr(inst, "method", None), "idle_parameters", False)]


def wrap(model: nn.Module, strategy: str, device: torch.device | None = None) -> nn.Module:
    """``model`` ready for training in every process of the group: ``"ddp"`` → ``DistributedDataParallel``,
    ``"fsdp"`` → :func:`shard` (in place). Needs a running group of several processes (:func:`init`)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if not active():
        raise RuntimeError("wrap() needs a process group of several processes: launch with torchrun "
                           "--nproc-per-node N and call subpeft.distributed.init() first")
    if strategy == "fsdp":
        return shard(model)
    from torch.nn.parallel import DistributedDataParallel

    device = device or next(model.parameters()).device
    return DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None,
        find_unused_parameters=bool(idle_parameters(model)), **_no_buffer_sync(),
    )


def _no_buffer_sync() -> dict[str, bool]:
    """DDP's option that turns off broadcasting buffers at every forward (renamed in newer torch releases)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    names = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in names else {"broadcast_buffers": False}


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the items of the ``nn.ModuleList`` that holds the most parameters."""
    best, size = None, 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            n = sum(p.numel() for p in module.parameters())
            if n > size:
                best, size = module, n
    return list(best) if best is not None else []


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 manages (part of) ``model``."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in unwrap(model).modules())


def shard(model: nn.Module, mesh: Any = None, *, reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``model`` (a ``TunedModel`` or a plain model) with FSDP2 ``fully_shard``, in place: every block,
    then the root. The frozen base is sharded; trainable tensors stay whole on every rank (see the module
    docstring) unless every parameter trains. ``mesh``: a 1-D ``DeviceMesh`` (default: all ranks)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if is_sharded(model):
        raise SubpeftError("the model is sharded already (subpeft.distributed.shard was called before)")
    if any(getattr(m, "quant_state", None) is not None or type(m).__name__ == "Linear4bit" for m in model.modules()):
        from .quant.fsdp import prepare_for_fsdp  # 4-bit base layers: their quant state onto the module

        prepare_for_fsdp(model)
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    whole = set(trainable) if len(trainable) < len(params) else set()
    blocks = _blocks(model)
    # a parameter used by several blocks (shared across layers) belongs to the root's group
    owners: dict[nn.Parameter, int] = {}
    for i, block in enumerate(blocks):
        for p in block.parameters():
            owners[p] = owners.get(p, i) if owners.get(p, i) == i else -1
    shared = {p for p, owner in owners.items() if owner == -1}
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=whole | shared)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=whole or None)
    if callable(getattr(model, "generate", None)):
        register_fsdp_forward_method(model, "generate")
    return model


# --------------------------------------------------------------------------- gradients and consistency


def sync_gradients(model: nn.Module) -> None:
    """Average over ranks the gradients of the trainable tensors FSDP2 leaves whole (:func:`shard`), in one
    ``all_reduce`` per dtype; nothing for a DDP or unsharded model (DDP averages its own)."""
    inner = unwrap(model)
    if not active() or inner is not model or not is_sharded(inner):
        return
    from torch.distributed.tensor import DTensor

    whole = [p for p in inner.parameters() if p.requires_grad and not isinstance(p, DTensor)]
    grads: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in whole:
        if p.grad is not None:
            grads.setdefault(p.grad.dtype, []).append(p.grad)
    world = dist.get_world_size()
    for group in grads.values():
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in group:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()


def _state_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """What must be equal on every rank: the trainable tensors that are whole, and the adapters' buffers."""
    inner = unwrap(model)
    from torch.distributed.tensor import DTensor

    for name, p in inner.named_parameters():
        if p.requires_grad and not isinstance(p, DTensor):
            yield name, p
    for name, b in inner.named_buffers():
        if not isinstance(b, DTensor) and {"adapters", "shared"}.intersection(name.split(".")):
            yield name, b


def check_consistent(model: nn.Module, what: str = "the adapter") -> None:
    """Raise :class:`RankDivergenceError` when the ranks do not hold the same trainable tensors and adapter
    buffers (hashes gathered from every rank; the message names the first tensors that differ)."""
    if not active():
        return
    digests = {}
    for name, t in _state_tensors(model):
        data = t.detach().to("cpu").contiguous().reshape(-1)
        digests[name] = hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()
    whole = hashlib.sha256("".join(f"{k}={v};" for k, v in sorted(digests.items())).encode()).hexdigest()
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, whole)
    if len(set(gathered)) == 1:
        return
    per_rank: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, digests)
    differ = sorted(k for k in per_rank[0] if len({d.get(k) for d in per_rank}) > 1)
    ranks = [r for r, h in enumerate(gathered) if h != gathered[0]]
    raise RankDivergenceError(
        f"{what} differs between ranks (ranks {ranks} differ from rank 0) in {len(differ)} tensors, e.g. "
        f"{differ[:3]}: a per-rank decision or update drifted apart"
    )


# --------------------------------------------------------------------------- sharded tensors


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a ``DTensor`` (a collective: every rank calls it); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def load_full(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole tensor into ``target``: this rank's shard of it when ``target`` is a ``DTensor``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(target, DTensor):
            local = distribute_tensor(value.to(target.device, target.dtype), target.device_mesh, target.placements)
            target.to_local().copy_(local.to_local())
        else:
            target.copy_(value.to(target.dtype))


class ShardedAccess(WeightAccess):
    """A base tensor that FSDP2 has sharded (a ``DTensor`` between forwards): ``read`` gathers the whole W
    (every rank calls it, in the same order), ``write`` stores each rank's shard of the given whole value,
    ``snapshot`` keeps only the local shard."""

    __slots__ = ()

    def read(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = self.tensor.full_tensor()
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def write(self, value: torch.Tensor) -> dict[str, float] | None:
        if tuple(value.shape) != tuple(self.shape):
            raise ValueError(f"cannot write a {tuple(value.shape)} tensor into {self.name!r} of shape {tuple(self.shape)}")
        load_full(self.tensor, value)
        return None

    def snapshot(self) -> Any:
        return self.tensor.to_local().detach().clone()

    def restore(self, token: Any) -> None:
        with torch.no_grad():
            self.tensor.to_local().copy_(token)


def _register() -> None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return
    register_weight_access(DTensor, _sharded_access)


def _sharded_access(module: nn.Module, name: str) -> WeightAccess | None:
    # a 4-bit layer keeps its quant state on the module once sharded: its own accessor (subpeft.quant, registered
    # for the module's class, looked up next) reads and writes it
    return None if getattr(module, "quant_state", None) is not None else ShardedAccess(module, name)


_register()
