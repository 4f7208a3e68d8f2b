"""The library's training loop: the one loop that calls the training hooks (:mod:`subpeft.training.hooks`).

``subpeft train`` runs it, and so does :func:`train_classifier` (labelled texts, the demo and the real tier).

:class:`Trainer` runs AdamW (fused where torch has it: :func:`fused_adamw`) with a linear warm-up/decay
schedule, gradient accumulation and clipping on any :class:`Workload` (the task loss is
:meth:`Workload.loss`: the forward's ``loss``, or a causal LM's on its answer rows only), and calls the library's training hooks: ``tuned.regularization()``
is added to every micro-batch's loss (divided by the accumulation steps, like the task loss),
``tuned.step(global_step)`` runs after every optimizer step, before the gradients are cleared
(AdaLoRA reads them), and ``tuned.finalize()`` once training has ended (``TrainArgs.finalize``).
After each of those it takes the phase events the methods reported (LoRA-Dash's switch, AdaLoRA's
final budget, Diff pruning's finalize: :func:`subpeft.methods.report_event`), logs one line each and
keeps them in ``TrainState.events`` (saved with the checkpoint; ``subpeft train`` writes them to
metrics.json).
It can evaluate on the dev split every N steps and keep the best adapter, and it writes a checkpoint
every N steps, at the end, and when interrupted (Ctrl-C: the current optimizer step finishes, the checkpoint is written, then
:class:`TrainingInterrupted` is raised; a second Ctrl-C stops at once).

A checkpoint (``<out>/checkpoints/last``) holds everything a run depends on: the adapter (every
tensor, method state such as AdaLoRA's importance EMAs and LoRA-Dash's phase included) or, for a
plain model, its trainable parameters; the optimizer and scheduler state; the torch, Python and
NumPy RNG states; the data position (the batch order of every epoch is a permutation drawn from
the seed and the epoch, so the position is one counter) and the run's history. Tensors are stored
as safetensors and everything else as JSON (no pickle). Resuming from it continues bit for bit: on
CPU with the same seed, the result equals the uninterrupted run's exactly.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.io import write_atomic
from .batches import (  # noqa: F401 - iter_batches, predict_logits, evaluate_accuracy: also reachable here
    DEFAULT_MAX_LENGTH,
    _collate,
    _device_of,
    _to,
    encode,
    evaluate_accuracy,
    iter_batches,
    linear_warmup_decay,
    predict_logits,
)
from .hooks import TrainingHooks, event_line

__all__ = [
    "FLOAT_SETTINGS",
    "INT_SETTINGS",
    "ResumeError",
    "TrainArgs",
    "TrainResult",
    "TrainSettings",
    "TrainState",
    "Trainer",
    "TrainingInterrupted",
    "Workload",
    "find_checkpoint",
    "load_model_state",
    "model_tensors",
    "read_state",
    "save_model_state",
    "setting_problem",
    "settings_diff",
    "train_classifier",
]

TRAINABLE_NAME = "trainable.safetensors"
STATE_NAME = "trainer_state.json"


class Workload:
    """What the loop trains on (the experiment app's workloads, :mod:`subpeft.app.workloads`, implement it): ``metric`` (the primary score) and whether greater is better."""

    kind: str = ""
    metric: str = ""
    greater_is_better: bool = True
    #: the training split's size in examples
    num_train: int = 0

    def train_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, split: str, *, batch_size: int = 64, full: bool = True) -> dict[str, Any]:
        """Scores of ``model`` on ``split``; ``full=False`` may skip costly extras (greedy decoding)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The task loss of ``model`` on ``batch`` (already on the model's device): the forward's ``loss``."""
        return model(**batch).loss

    def loss_units(self, batch: dict[str, torch.Tensor]) -> int:
        """What the model's loss on ``batch`` is a mean over: its examples (a causal LM's workload counts its
        answer tokens). Several processes weight their losses by it (:class:`Trainer`)."""
        return int(next(iter(batch.values())).shape[0])

    def better(self, a: float, b: float | None) -> bool:
        """Whether score ``a`` beats ``b`` (None: anything does)."""
        if b is None:
            return True
        return a > b if self.greater_is_better else a < b


class TrainingInterrupted(Exception):
    """Training stopped on request (Ctrl-C); ``checkpoint`` is the folder to resume from (or None)."""

    def __init__(self, step: int, checkpoint: str | None) -> None:
        self.step, self.checkpoint = step, checkpoint
        where = f"; checkpoint saved in {checkpoint}" if checkpoint else " (no output folder: nothing saved)"
        super().__init__(f"training interrupted after optimizer step {step}{where}")


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed with these settings."""


# --------------------------------------------------------------------------- the run's settings

#: The training settings' rules, declared once: TrainArgs checks its fields with them, and so does the
#: experiment app's run spec (:meth:`subpeft.app.run.RunSpec.check`), which words the message for its user.
#: Integers: name -> (lowest, highest or None).
INT_SETTINGS: dict[str, tuple[int, int | None]] = {
    "total_steps": (1, None), "batch_size": (1, None), "grad_accum": (1, None), "eval_batch_size": (1, None),
    "eval_every": (0, None), "save_every": (0, None), "seed": (0, 2**32 - 1),
}
#: Finite numbers: name -> rule (a key of FLOAT_RULES).
FLOAT_SETTINGS: dict[str, str] = {
    "lr": "> 0", "head_lr": "> 0", "weight_decay": ">= 0", "warmup_ratio": "in [0, 1]", "max_grad_norm": "> 0",
}
FLOAT_RULES: dict[str, Callable[[float], bool]] = {
    "> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, "in [0, 1]": lambda v: 0 <= v <= 1,
}


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def setting_problem(name: str, value: Any, *, low: int | None = None, high: int | None = None,
                    rule: str | None = None) -> str | None:
    """What is wrong with ``value`` for the setting ``name`` ("must be ..."), or None when it is right. The
    rule is the setting's in :data:`INT_SETTINGS` / :data:`FLOAT_SETTINGS`, or the one given (the app's own
    settings)."""
    if name in INT_SETTINGS or low is not None:
        low, high = (low, high) if low is not None else INT_SETTINGS[name]
        if not is_int(value) or value < low or (high is not None and value > high):
            return "must be " + (f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}")
        return None
    rule = rule if rule is not None else FLOAT_SETTINGS[name]
    if not is_number(value) or not math.isfinite(value) or not FLOAT_RULES[rule](value):
        return f"must be a finite number {rule}"
    return None


@dataclass(kw_only=True)
class TrainSettings:
    """The settings a user gives a training run, declared once: :class:`TrainArgs` (the loop's settings) and
    the experiment app's run spec (:class:`subpeft.app.run.RunSpec`) both are these, plus their own."""

    lr: float = 1e-3
    # a fresh classification head (parameters under a module of TrainArgs.head_modules) trains at head_lr
    head_lr: float | None = None
    batch_size: int = 16
    grad_accum: int = 1
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_grad_norm: float | None = 1.0
    seed: int = 0
    eval_every: int = 0  # evaluate on dev every N optimizer steps and keep the best (0: never)
    save_every: int = 0  # write the checkpoint every N optimizer steps (0: only at the end / on Ctrl-C)
    load_best_at_end: bool = False
    keep_checkpoint: bool = True  # keep checkpoints/last once training has finished


@dataclass(kw_only=True)
class TrainArgs(TrainSettings):
    """Settings of one run of the loop. ``total_steps`` counts optimizer steps; each takes ``grad_accum``
    micro-batches of ``batch_size`` examples."""

    total_steps: int
    eval_batch_size: int = 64
    progress: bool = True
    head_modules: tuple[str, ...] = ()
    finalize: bool = True  # call the model's finalize() hook once training has ended
    desc: str = "train"  # the progress bar's label
    keep_best: bool = True  # write the best dev adapter to out_dir/best (load_best_at_end needs it)

    #: settings that may be None (head_lr: no separate head lr; max_grad_norm: no clipping)
    OPTIONAL = ("head_lr", "max_grad_norm")

    def __post_init__(self) -> None:
        for name in (*INT_SETTINGS, *FLOAT_SETTINGS):
            value = getattr(self, name)
            if value is None and name in self.OPTIONAL:
                continue
            problem = setting_problem(name, value)
            if problem:
                raise ValueError(f"{name} {problem}, got {value!r}")

    # settings a resumed run must share with the run that wrote the checkpoint
    _FINGERPRINT = ("total_steps", "lr", "batch_size", "grad_accum", "weight_decay", "warmup_ratio",
                    "max_grad_norm", "seed", "eval_every", "head_lr")

    def fingerprint(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._FINGERPRINT}


@dataclass
class TrainState:
    """The run's progress and history (saved as JSON in every checkpoint)."""

    global_step: int = 0
    micro: int = 0  # micro-batches consumed: the data position
    losses: list[float] = field(default_factory=list)  # task loss per optimizer step
    regularization: list[float] = field(default_factory=list)  # the hooks' term per optimizer step
    learning_rates: list[float] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    best_score: float | None = None
    best_step: int | None = None
    seconds: float = 0.0  # training time over all sessions of the run
    events: list[dict[str, Any]] = field(default_factory=list)  # the methods' phase events (subpeft.methods.events)

    def tail_loss(self, first: bool = False) -> float:
        """Mean task loss over the first (or last) 10% of steps."""
        if not self.losses:
            return math.nan
        k = max(1, len(self.losses) // 10)
        part = self.losses[:k] if first else self.losses[-k:]
        return sum(part) / len(part)


def settings_diff(saved: dict[str, Any], now: dict[str, Any], *, ignore: tuple[str, ...] = (),
                  was: str = "checkpoint") -> list[str]:
    """The settings in ``now`` that differ from ``saved`` (except those in ``ignore``), as
    ``"name: <was> X, now Y"``: the one comparison of a resumed run's settings with its saved ones (the
    trainer's with its checkpoint, the app's run spec with its run.json)."""
    return [f"{k}: {was} {saved.get(k)!r}, now {v!r}" for k, v in now.items() if k not in ignore and saved.get(k) != v]


# --------------------------------------------------------------------------- checkpoint files


def find_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """``<out_dir>/checkpoints/last`` (or its predecessor, if a save was cut between two renames), if it
    holds a trainer state."""
    last = Path(out_dir) / "checkpoints" / "last"
    for path in (last, last.with_name(".last.old")):
        if (path / STATE_NAME).is_file():
            return path
    return None


def read_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The trainer state of a checkpoint folder; :class:`ResumeError` naming the file when it is damaged."""
    from .files import UnreadableFileError, read_json

    path = Path(checkpoint) / STATE_NAME
    try:
        doc = read_json(path, "--resume")
    except UnreadableFileError as exc:
        raise ResumeError(str(exc)) from None
    missing = [k for k in ("state", "args", "optimizer", "scheduler", "rng") if k not in doc]
    if missing:
        raise ResumeError(f"--resume: {str(path)!r} lacks {missing} (not written by this version of subpeft?)")
    return doc


# --------------------------------------------------------------------------- model state


def _is_tuned(model: nn.Module) -> bool:
    return hasattr(model, "adapter_state_dict") and getattr(model, "active_adapter", None) is not None


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The live tensors a run changes: the active adapter's (file keys) or a plain model's trainable ones."""
    if _is_tuned(model):
        return model.adapter_state_dict(model.active_adapter)
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    payload = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    write_atomic(path, save(payload, metadata=metadata))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def param_groups(model: nn.Module, args: TrainArgs) -> list[dict[str, Any]]:
    """AdamW groups: matrices with weight decay, vectors without; a fresh head's parameters (under a
    module named in ``args.head_modules``) at ``args.head_lr`` when one is given. Empty groups are left out."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    heads = set(args.head_modules) if args.head_lr is not None else set()
    for name, p in model.named_parameters():
        if p.requires_grad:
            is_head = bool(heads.intersection(name.split(".")))
            groups.setdefault((is_head, p.ndim >= 2), []).append(p)
    out = []
    for (is_head, decays), params in sorted(groups.items()):
        group: dict[str, Any] = {"params": params, "weight_decay": args.weight_decay if decays else 0.0}
        if is_head:
            group["lr"] = args.head_lr
        out.append(group)
    return out


def fused_adamw(params: Sequence[torch.Tensor]) -> bool | None:
    """Whether AdamW runs fused (one kernel over all tensors instead of a loop of per-tensor ops): for
    floating-point parameters on CPU or CUDA (FSDP2's sharded ones included), else torch's default (None).
    On CPU it is ~5x faster for SmolLM2's 135M weights: the step is memory-bound, and the loop reads and
    writes every state tensor several times (benchmarks/adamw_speed.py). The same update up to float
    rounding. A resumed run keeps the choice its checkpoint was made with (it is in the saved groups)."""
    ok = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return True if ok and params else None


def save_model_state(model: nn.Module, directory: str | os.PathLike) -> None:
    """A loadable adapter folder (TunedModel) or ``trainable.safetensors`` (a plain model's trainable tensors).
    In several processes every rank calls it (sharded tensors are gathered) and rank 0 writes."""
    from .. import distributed as spd

    model = spd.unwrap(model)
    directory = Path(directory)
    if spd.is_main():
        directory.mkdir(parents=True, exist_ok=True)
    if _is_tuned(model):
        model.save_pretrained(str(directory), adapter_name=model.active_adapter)
    else:
        tensors = {k: spd.full_tensor(v) for k, v in model_tensors(model).items()}
        if spd.is_main():
            _save_tensors(directory / TRAINABLE_NAME, tensors, {"format": "pt"})


def load_model_state(model: nn.Module, directory: str | os.PathLike) -> None:
    """Copy the tensors saved by :func:`save_model_state` into ``model`` (same keys and shapes required; a
    sharded tensor takes its rank's part)."""
    from .. import distributed as spd

    model = spd.unwrap(model)
    directory = Path(directory)
    if _is_tuned(model):
        from ..core.io import read_tensors

        saved, _ = read_tensors(directory)
    else:
        path = directory / TRAINABLE_NAME
        if not path.is_file():
            raise ResumeError(f"no {TRAINABLE_NAME} in {str(directory)!r}")
        saved = _load_tensors(path)
    live = model_tensors(model)
    missing, unexpected = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
    bad = [k for k in live if k in saved and saved[k].shape != live[k].shape]
    if missing or unexpected or bad:
        raise ResumeError(
            f"the state in {str(directory)!r} does not fit this model (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, shape mismatches {bad[:3]}): was it written by another method or model?"
        )
    for k, v in live.items():
        spd.load_full(v, saved[k])


# --------------------------------------------------------------------------- optimizer and RNG


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from ..distributed import full_tensor

    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = full_tensor(value)  # a sharded parameter's state: gathered
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                          meta: dict[str, Any]) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        pid, key = flat.split(".", 1)
        p = params[int(pid)] if int(pid) < len(params) else None
        if isinstance(p, DTensor) and torch.is_tensor(value) and value.shape == p.shape:  # this rank's part
            value = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
        state.setdefault(int(pid), {})[key] = value
    groups = meta["param_groups"]
    for saved, live in zip(groups, optimizer.param_groups, strict=True):
        for key, value in live.items():  # JSON turned tuples (AdamW's betas) into lists
            if isinstance(value, tuple) and isinstance(saved.get(key), list):
                saved[key] = tuple(saved[key])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _rng_to_files() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    meta: dict[str, Any] = {"python": [version, list(internal), gauss]}
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return tensors, meta
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype("int64"))
    meta["numpy"] = [name, int(pos), int(has_gauss), float(cached)]
    return tensors, meta


def _rng_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = sorted((int(k.split(".")[1]), v) for k, v in tensors.items() if k.startswith("cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([v for _, v in cuda])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in meta:
        import numpy as np

        name, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((name, tensors["numpy"].numpy().astype("uint32"), pos, has_gauss, cached))


# --------------------------------------------------------------------------- the loop


class Trainer:
    """Train ``model`` (a TunedModel, or a plain model whose trainable parameters have
    ``requires_grad``) on ``workload``; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        workload: Workload,
        args: TrainArgs,
        out_dir: str | os.PathLike | None = None,
        *,
        log: Callable[[str], None] | None = None,
        on_step: Callable[[Trainer, int], None] | None = None,
    ) -> None:
        if workload.num_train == 0:
            raise ValueError("the training split is empty: nothing to train on")
        from .. import distributed as spd

        self.model, self.workload, self.args = model, workload, args
        # in several processes (subpeft.distributed): model may be DDP-wrapped; inner is what it wraps
        self.inner = spd.unwrap(model)
        self.rank, self.world = spd.rank(), spd.world_size()
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.log = (log or (lambda msg: None)) if self.rank == 0 else (lambda msg: None)
        self.on_step = on_step
        self.state = TrainState()
        self._stop = False
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters (requires_grad=True)")
        self.optimizer = torch.optim.AdamW(param_groups(model, args), lr=args.lr, fused=fused_adamw(self.params))
        self.scheduler = linear_warmup_decay(
            self.optimizer, int(round(args.warmup_ratio * args.total_steps)), args.total_steps
        )
        # every micro-batch is a global one of batch_size x processes examples; each rank takes its slice
        self.global_batch = args.batch_size * self.world
        self.batches_per_epoch = math.ceil(workload.num_train / self.global_batch)
        self._order_epoch, self._order = -1, []
        self._resumed_from: Path | None = None

    # -- paths -------------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path | None:
        return self.out_dir / "checkpoints" / "last" if self.out_dir is not None else None

    @property
    def best_dir(self) -> Path | None:
        keep = self.args.keep_best or self.args.load_best_at_end
        return self.out_dir / "best" if self.out_dir is not None and keep else None

    def request_stop(self) -> None:
        """Stop after the current optimizer step, writing the checkpoint (what Ctrl-C does)."""
        self._stop = True

    # -- data --------------------------------------------------------------------------------------
    def _indices(self, micro: int) -> list[int]:
        epoch, b = divmod(micro, self.batches_per_epoch)
        if epoch != self._order_epoch:
            gen = torch.Generator().manual_seed(self.args.seed * 1_000_003 + epoch)
            self._order = torch.randperm(self.workload.num_train, generator=gen).tolist()
            self._order_epoch = epoch
        bs = self.global_batch
        return self._order[b * bs : (b + 1) * bs]

    def _micro_batch(self, micro: int) -> tuple[dict[str, torch.Tensor], float]:
        """This rank's part of global micro-batch ``micro`` and the factor its mean loss is scaled by, so that
        the ranks' gradients, averaged (DDP, :func:`subpeft.distributed.sync_gradients`), are the gradient of
        the mean loss over the whole global batch: units_rank / units_all x processes, where units are what the
        loss averages over (examples, or answer tokens: :meth:`Workload.loss_units`). A rank whose slice is
        empty (the epoch's last, short batch) runs its first example at weight 0: every rank takes part in
        every forward and backward, as DDP and FSDP need."""
        indices = self._indices(micro)
        if self.world == 1:
            return self.workload.train_batch(indices), 1.0
        from .. import distributed as spd

        b = self.args.batch_size
        mine = indices[self.rank * b : (self.rank + 1) * b]
        batch = self.workload.train_batch(mine or indices[:1])
        units = float(self.workload.loss_units(batch)) if mine else 0.0
        total = spd.all_reduce_sum([units])[0]
        return batch, (units * self.world / total if total > 0 else 0.0)

    # -- checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/last`` atomically (a complete new folder replaces the old one)."""
        from .. import distributed as spd

        assert self.checkpoint_dir is not None
        final = self.checkpoint_dir
        tmp = final.with_name(".last.tmp")
        old = final.with_name(".last.old")
        main = spd.is_main()
        spd.check_consistent(self.model, "the trained tensors")  # several processes: they must agree
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        save_model_state(self.model, tmp)  # every rank takes part (sharded tensors are gathered), rank 0 writes
        tensors, meta = _optimizer_to_files(self.optimizer)
        # each rank's RNG state (dropout draws differ between ranks): resumed with as many ranks, each gets its own
        rngs = spd.gather_objects(_rng_to_files())
        if main:
            _save_tensors(tmp / "optimizer.safetensors", tensors)
            rng_tensors = dict(rngs[0][0])
            for r, (ts, _) in enumerate(rngs[1:], start=1):
                rng_tensors.update({f"rank{r}.{k}": v for k, v in ts.items()})
            _save_tensors(tmp / "rng.safetensors", rng_tensors)
            doc = {
                "state": asdict(self.state),
                "args": self.fingerprint(),
                "optimizer": meta,
                "scheduler": self.scheduler.state_dict(),
                "rng": rngs[0][1],
                "processes": self.world,
                "rng_ranks": [m for _, m in rngs[1:]],
            }
            write_atomic(tmp / STATE_NAME, json.dumps(doc) + "\n")
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        spd.barrier()
        return final

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed run must share with its checkpoint; ``batch_size`` is the global one (per
        process x processes), so a run can resume with another number of processes."""
        return {**self.args.fingerprint(), "batch_size": self.global_batch}

    def find_checkpoint(self) -> Path | None:
        """``checkpoints/last`` (or its predecessor, if a save was cut between two renames)."""
        return find_checkpoint(self.out_dir) if self.out_dir is not None else None

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore model, optimizer, scheduler, RNG and progress from a checkpoint folder."""
        from safetensors import SafetensorError

        path = Path(path)
        doc = read_state(path)
        diff = settings_diff(doc["args"], self.fingerprint())
        if self.world > 1 or doc.get("processes", 1) > 1:
            diff = [d + (" (the global batch: --batch-size x processes)" if d.startswith("batch_size:") else "")
                    for d in diff]
        if diff:
            raise ResumeError(f"cannot resume from {path}: the run's settings changed ({'; '.join(diff)}). "
                              "Resume with the original settings, or start a new run in another folder.")
        try:
            load_model_state(self.model, path)
            _optimizer_from_files(self.optimizer, _load_tensors(path / "optimizer.safetensors"), doc["optimizer"])
            self.scheduler.load_state_dict(doc["scheduler"])
            rng, rng_meta = _load_tensors(path / "rng.safetensors"), doc["rng"]
            if self.rank > 0 and doc.get("processes", 1) == self.world:  # this rank's own state
                prefix = f"rank{self.rank}."
                rng = {k[len(prefix):]: v for k, v in rng.items() if k.startswith(prefix)}
                rng_meta = doc["rng_ranks"][self.rank - 1]
            _rng_from_files(rng, rng_meta)
            self.state = TrainState(**doc["state"])
        except (OSError, SafetensorError, KeyError, TypeError, ValueError) as exc:
            from ..core.errors import SubpeftError

            if isinstance(exc, (ResumeError, SubpeftError)):
                raise
            raise ResumeError(f"--resume: the checkpoint in {str(path)!r} is damaged or incomplete: "
                              f"{type(exc).__name__}: {exc}") from None
        self._resumed_from = path

    def resume(self) -> Path:
        """Load the run's checkpoint (what ``train(resume=True)`` continues from); :class:`ResumeError`
        when there is none, it is damaged or the settings changed."""
        path = self.find_checkpoint()
        if path is None:
            raise ResumeError(f"nothing to resume: no checkpoint in {self.checkpoint_dir}; run without --resume")
        self.load_checkpoint(path)
        return path

    # -- evaluation -----------------------------------------------------------------------------
    def _evaluate_dev(self) -> None:
        with torch.random.fork_rng(devices=[]):  # every rank scores the whole split (FSDP needs all in each forward)
            scores = self.workload.evaluate(self.inner, "dev", batch_size=self.args.eval_batch_size, full=False)
        score = scores[self.workload.metric]
        self.state.evals.append({"step": self.state.global_step, **scores})
        improved = self.workload.better(score, self.state.best_score)
        if improved:
            self.state.best_score, self.state.best_step = score, self.state.global_step
            if self.best_dir is not None:
                from .. import distributed as spd
                from .files import write_json

                save_model_state(self.model, self.best_dir)
                if spd.is_main():
                    write_json(self.best_dir / "best.json", self.state.evals[-1])
                spd.barrier()
        self.log(f"step {self.state.global_step}: dev {self.workload.metric} {score:.4f}"
                 + (" (best so far)" if improved else f" (best {self.state.best_score:.4f} at step {self.state.best_step})"))

    # -- training -------------------------------------------------------------------------------
    def _sigint(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        if self._stop:
            raise KeyboardInterrupt
        self._stop = True
        self.log("interrupted: finishing this optimizer step and saving a checkpoint (Ctrl-C again to quit now)")

    def train(self, resume: bool = False) -> TrainState:
        """Run until ``total_steps`` optimizer steps are done (continuing the saved run with ``resume``)."""
        args, model, state = self.args, self.model, self.state
        if resume:
            path = self._resumed_from if self._resumed_from is not None else self.resume()
            state = self.state
            self.log(f"resumed from {path} at optimizer step {state.global_step} of {args.total_steps}")
        else:
            torch.manual_seed(args.seed)
            random.seed(args.seed)
        from contextlib import nullcontext

        from .. import distributed as spd

        hooks = TrainingHooks(model)
        device = _device_of(model)
        # DDP: gradients are all-reduced at the last micro-batch of a step only
        no_sync = getattr(model, "no_sync", None) if self.world > 1 else None

        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, self._sigint)
        from tqdm.auto import tqdm

        bar = tqdm(total=args.total_steps, initial=state.global_step, desc=args.desc, unit="step",
                   disable=not args.progress or self.rank != 0, dynamic_ncols=True)
        start = time.perf_counter()
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        try:
            while state.global_step < args.total_steps:
                task_loss = reg_value = 0.0
                for k in range(args.grad_accum):
                    batch, weight = self._micro_batch(state.micro)
                    state.micro += 1
                    with no_sync() if no_sync is not None and k < args.grad_accum - 1 else nullcontext():
                        loss = self.workload.loss(model, _to(batch, device))
                        if weight != 1.0:  # several processes: this rank's share of the global mean
                            loss = loss * weight
                        task_loss += loss.detach().item() / args.grad_accum
                        if hooks:
                            term, value = hooks.regularization()
                            if term is not None:
                                loss = loss + term
                            reg_value += value / args.grad_accum
                        (loss / args.grad_accum).backward()
                if self.world > 1:
                    spd.sync_gradients(model)  # FSDP2: the whole (trainable) tensors' gradients
                    # the global mean loss, and whether any rank was asked to stop: the same on every rank
                    total, stops = spd.all_reduce_sum([task_loss, float(self._stop)])
                    task_loss, self._stop = total / self.world, stops > 0
                if not math.isfinite(task_loss + reg_value):
                    what = "the loss" if math.isfinite(reg_value) or not math.isfinite(task_loss) else \
                        "the method's regularization term"
                    if state.global_step == 0:  # no update yet: the learning rate cannot be the cause
                        raise FloatingPointError(
                            f"{what} is {task_loss + reg_value} before the first optimizer step, so the learning "
                            "rate is not the cause: the model with the method attached gives it; check the "
                            "method options (--set/--config), the model and the data"
                        )
                    raise FloatingPointError(
                        f"{what} became {task_loss + reg_value} at optimizer step {state.global_step + 1}; "
                        f"try a lower learning rate (--lr, now {args.lr:g})"
                    )
                if args.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(self.params, args.max_grad_norm)
                state.learning_rates.append(self.optimizer.param_groups[0]["lr"])
                self.optimizer.step()
                self.scheduler.step()
                state.global_step += 1
                hooks.step(state.global_step)  # gradients are still there (AdaLoRA reads them)
                self._record_events(hooks)
                self.optimizer.zero_grad(set_to_none=True)
                state.losses.append(task_loss)
                state.regularization.append(reg_value)
                bar.update(1)
                if state.global_step % 10 == 0 or state.global_step == args.total_steps:
                    recent = state.losses[-10:]
                    bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}", refresh=False)
                    self.log(f"step {state.global_step}: loss {sum(recent) / len(recent):.4f} "
                             f"lr {state.learning_rates[-1]:.3g}" + (f" reg {reg_value:.4g}" if reg_value else ""))
                if args.eval_every and state.global_step % args.eval_every == 0:
                    self._evaluate_dev()
                if self.on_step is not None:
                    self.on_step(self, state.global_step)
                done = state.global_step >= args.total_steps
                if self._stop and not done:
                    state.seconds += time.perf_counter() - start
                    start = time.perf_counter()
                    path = self.save_checkpoint() if self.out_dir is not None else None
                    raise TrainingInterrupted(state.global_step, str(path) if path else None)
                if self.out_dir is not None and args.save_every and state.global_step % args.save_every == 0 \
                        and not done:
                    state.seconds += time.perf_counter() - start
                    start = time.perf_counter()
                    self.save_checkpoint()
        finally:
            bar.close()
            model.eval()
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        state.seconds += time.perf_counter() - start
        if self.out_dir is not None and args.keep_checkpoint:
            self.save_checkpoint()  # which first checks that the ranks agree
        else:
            spd.check_consistent(model, "the trained tensors")
        if args.load_best_at_end and state.best_step is not None and state.best_step != state.global_step:
            if self.best_dir is None:
                raise ValueError("load_best_at_end needs an output folder (the best adapter is kept there)")
            load_model_state(model, self.best_dir)
            self.log(f"loaded the best adapter (step {state.best_step}, dev {self.workload.metric} "
                     f"{state.best_score:.4f})")
        if args.finalize:
            hooks.finalize()
            spd.check_consistent(model, "the finalized tensors")  # e.g. Diff pruning's top-k, on every rank
            self._record_events(hooks)
        return state

    def _record_events(self, hooks: TrainingHooks) -> None:
        """Keep the methods' phase events in the state (saved with checkpoints) and log one line each."""
        for event in hooks.events(self.state.global_step):
            self.state.events.append(event)
            self.log(event_line(event))


# --------------------------------------------------------------------------- a classifier from texts


@dataclass
class TrainResult:
    """What :func:`train_classifier` did."""

    steps: int
    epochs: float
    seconds: float
    losses: list[float] = field(default_factory=list)  # task loss + regularization, per step
    learning_rates: list[float] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        """Mean loss over the last 10% of steps (at least one)."""
        if not self.losses:
            return math.nan
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return sum(tail) / len(tail)

    @property
    def first_loss(self) -> float:
        """Mean loss over the first 10% of steps (at least one)."""
        if not self.losses:
            return math.nan
        head = self.losses[: max(1, len(self.losses) // 10)]
        return sum(head) / len(head)


class _Texts(Workload):
    """Labelled texts, tokenised once: the workload :func:`train_classifier` hands the loop."""

    kind, metric = "classification", "accuracy"

    def __init__(self, tokenizer, texts: Sequence[str], labels: Sequence[int], max_length: int) -> None:
        self.tokenizer, self.labels = tokenizer, labels
        self.encoded = encode(tokenizer, texts, max_length)
        self.num_train = len(texts)

    def train_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        batch = _collate(self.tokenizer, self.encoded, indices)
        batch["labels"] = torch.tensor([int(self.labels[i]) for i in indices], dtype=torch.long)
        return batch


def train_classifier(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    epochs: float = 1.0,
    max_steps: int | None = None,
    lr: float = 1e-3,
    batch_size: int = 16,
    max_length: int = DEFAULT_MAX_LENGTH,
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.06,
    max_grad_norm: float | None = 1.0,
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
    finalize: bool = True,
) -> TrainResult:
    """Fine-tune a sequence classifier (plain model or ``TunedModel``) on labelled texts with :class:`Trainer`.

    Only parameters with ``requires_grad`` are optimised (AdamW). The learning rate warms up linearly over
    ``warmup_ratio`` of the steps and then decays linearly to 0; gradients are clipped to ``max_grad_norm``
    (``None`` disables clipping). Training runs for ``max_steps`` optimizer steps when given (cycling
    through reshuffled epochs), otherwise for ``epochs`` passes over the data. ``seed`` fixes the batch
    order and seeds torch's global RNG (dropout). The model is left in eval mode.

    The library's hooks run as in every run of the loop (:mod:`subpeft.training.hooks`):
    ``regularization()`` is added to each step's loss, ``step(global_step)`` follows each optimizer step,
    and with ``finalize=True`` ``finalize()`` runs once training has finished.
    """
    if len(texts) != len(labels):
        raise ValueError(f"got {len(texts)} texts but {len(labels)} labels")
    if len(texts) == 0:
        raise ValueError("train_classifier needs at least one training example")
    steps_per_epoch = math.ceil(len(texts) / batch_size)
    total = max_steps if max_steps is not None else math.ceil(epochs * steps_per_epoch)
    if total < 1:
        raise ValueError(f"nothing to train: epochs={epochs}, max_steps={max_steps}")
    args = TrainArgs(total_steps=total, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                     warmup_ratio=warmup_ratio, max_grad_norm=max_grad_norm, seed=seed, keep_checkpoint=False,
                     progress=progress, finalize=finalize, desc=desc)
    state = Trainer(model, _Texts(tokenizer, texts, labels, max_length), args).train()
    return TrainResult(
        steps=state.global_step,
        epochs=state.global_step / steps_per_epoch,
        seconds=state.seconds,
        # the step's loss as the float32 sum it was (task loss + regularization; one micro-batch per step)
        losses=(torch.tensor(state.losses, dtype=torch.float32)
                + torch.tensor(state.regularization, dtype=torch.float32)).tolist(),
        learning_rates=list(state.learning_rates),
    )
