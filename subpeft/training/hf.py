"""Hugging Face ``Trainer`` integration: the library's training hooks (:mod:`subpeft.training.hooks`), called
for you. Public as :mod:`subpeft.integrations`.

Methods such as AdaLoRA (rank budget, orthogonality loss), LoRA-Dash (phase switch), MPC and Diff
pruning (loss terms) need ``tuned.regularization()`` added to the loss and
``tuned.step(global_step)`` called after every optimizer step. Two ways to get both with ``Trainer``:

``SubpeftTrainer`` (recommended): a ``Trainer`` subclass.
    ``compute_loss`` adds ``tuned.regularization()`` to the training loss (scaled like the loss for
    gradient accumulation, so it counts once per optimizer step), a :class:`SubpeftCallback` runs the
    step hook, and a ``TunedModel`` is handled like a PEFT model: the data collator keeps the columns
    the *base* model's ``forward`` takes, ``labels`` are recognised, and checkpoints hold the adapter
    (``save_pretrained``) instead of the whole model; ``resume_from_checkpoint`` and
    ``load_best_model_at_end`` load them back (method state included).

``SubpeftCallback`` with a plain ``Trainer``.
    A callback cannot change the loss, so it adds the regulariser's *gradient* instead: at
    ``on_step_begin`` (before the optimizer step's first micro-batch, gradients cleared, parameters as
    they will be for the whole step) it back-propagates ``tuned.regularization()`` once. The
    micro-batches then accumulate on top and clipping sees the sum, so the update equals that of
    ``loss + regularization`` exactly (for a deterministic regulariser; Diff pruning's stochastic
    gates draw one sample per optimizer step instead of one per micro-batch). The logged loss does not
    include the term. Limits: under fp16 loss scaling (``fp16=True``) or DeepSpeed the unscaled term is
    wrong: use ``SubpeftTrainer`` there. A plain ``Trainer`` also needs
    ``TrainingArguments(remove_unused_columns=False, label_names=["labels"])`` with a ``TunedModel``
    (it reads the wrapper's ``forward(*args, **kwargs)`` signature).

Both call ``tuned.step(state.global_step + 1)`` from ``on_optimizer_step`` (transformers ≥ 4.39):
after ``optimizer.step()`` and before ``zero_grad()`` (AdaLoRA's allocator reads the gradients), with the
number of optimizer steps done, as ``TrainerState.global_step`` reads right after. Under DeepSpeed (ZeRO-1/2),
whose engine clears the gradients inside ``backward``, SubpeftTrainer takes them before the engine's step and
hands them to the hook (``SubpeftTrainer._capture_deepspeed_gradients``); under ZeRO-3 it refuses methods with
hooks. At the end of training (``on_train_end``) ``tuned.finalize()`` runs (Diff pruning keeps its top-k
entries), unless ``finalize=False``.

    from subpeft.integrations import SubpeftTrainer  # or subpeft.training.hf
    trainer = SubpeftTrainer(model=tuned, args=TrainingArguments(...), train_dataset=ds)
    trainer.train()

Several processes (``accelerate launch`` / ``torchrun``; see docs/distributed_hf.md): under DDP the step hook
reads the all-reduced gradients, so every rank makes the same decisions; checkpoints and ``save_model`` write the
adapter from rank 0 only. Under accelerate's FSDP2 the trainable tensors stay whole on every rank (FSDP2 shards the
frozen base; SubpeftTrainer averages the whole tensors' gradients), so the methods' hooks see plain tensors.
Where training shards the adapter (FSDP2 when everything trains, DeepSpeed ZeRO-3 partitions),
every rank joins a gather of the adapter's tensors (not the whole model's) and rank 0 writes them whole;
loading a checkpoint's adapter shards it back (under DeepSpeed, ``resume_from_checkpoint`` reads the engine's
own checkpoint instead). Methods whose parameters sit out of some forwards (LoRA-Dash before
its switch) need ``ddp_find_unused_parameters=True``, what Trainer picks for a ``TunedModel`` by default.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

try:
    from transformers import Trainer, TrainerCallback
except ImportError as exc:  # pragma: no cover - transformers is a dependency
    raise ImportError("subpeft.integrations needs transformers: pip install transformers") from exc

from .hooks import TrainingHooks, event_line, find_tuned

__all__ = ["SubpeftCallback", "SubpeftTrainer", "find_tuned", "full_adapter_state"]


def _is_dtensor(value: Any) -> bool:
    return callable(getattr(value, "full_tensor", None))


def _is_zero3(value: Any) -> bool:
    return hasattr(value, "ds_id")  # a DeepSpeed ZeRO-3 parameter (each rank holds a partition, .data is empty)


@contextlib.contextmanager
def _whole_adapter_tensors(tuned: nn.Module, *, write_back: bool = False) -> Iterator[None]:
    """Inside this block ``tuned.adapter_state_dict`` gives whole tensors on every rank also where training
    shards them, so that ``save_pretrained`` writes them and ``load_model_state`` checks and fills them:
    trainable DeepSpeed ZeRO-3 parameters are gathered (``GatheredParameters``; with ``write_back``, what
    rank 0 wrote into them is partitioned back); FSDP2 DTensors are gathered with ``full_tensor()`` and, inside the block,
    ``adapter_state_dict`` answers with these copies (with ``write_back``, each rank then copies its shard of
    them back into the live parameter). A collective: every rank enters it. A no-op when nothing is sharded."""
    # a state dict holds detached tensors, which do not carry ZeRO-3's attributes: gather the trainable
    # parameters (the adapters being trained; a frozen adapter under ZeRO-3 stays partitioned)
    zero3 = [p for p in tuned.parameters() if p.requires_grad and _is_zero3(p)]
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=0 if write_back else None):
            yield
        return
    names = list(getattr(tuned, "instances", {}))
    live = {n: tuned.adapter_state_dict(n) for n in names}
    if not any(_is_dtensor(v) for tensors in live.values() for v in tensors.values()):
        yield
        return
    with torch.no_grad():
        whole = {n: {k: v.full_tensor() if _is_dtensor(v) else v for k, v in tensors.items()}
                 for n, tensors in live.items()}
    tuned.adapter_state_dict = whole.__getitem__  # an instance attribute: shadows the method in this block
    try:
        yield
    finally:
        del tuned.adapter_state_dict
    if write_back:
        from torch.distributed.tensor import distribute_tensor

        with torch.no_grad():
            for n, tensors in live.items():
                for k, v in tensors.items():
                    if _is_dtensor(v):  # every rank holds the whole tensor: each keeps its own shard
                        shard = distribute_tensor(whole[n][k].to(v.dtype), v.device_mesh, v.placements,
                                                  src_data_rank=None)
                        v.to_local().copy_(shard.to_local())


def full_adapter_state(tuned: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """Copies of the adapter's tensors (file keys), whole on every rank also when training shards them (FSDP2
    DTensors, DeepSpeed ZeRO-3 partitions): a collective, so every rank must call this together."""
    name = adapter_name if adapter_name is not None else tuned.active_adapter
    with _whole_adapter_tensors(tuned), torch.no_grad():
        return {k: v.detach().clone() for k, v in tuned.adapter_state_dict(name).items()}


def _write_changes_to_deepspeed_master(before: dict[nn.Parameter, torch.Tensor]) -> None:
    """Copy what a step hook wrote into parameters (their values now against ``before``) into DeepSpeed's fp32
    partitions, only the entries that changed (no rounding of the rest under bf16). Every rank calls it with the
    same parameters; the set of changed ones is agreed on first, since reading the fp32 values is a collective."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    changed = torch.tensor([not torch.equal(old, p.detach()) for p, old in before.items()], dtype=torch.int32)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(changed, op=torch.distributed.ReduceOp.MAX)
    for (p, old), flag in zip(before.items(), changed.tolist(), strict=True):
        master = safe_get_full_fp32_param(p) if flag else None
        if master is not None:
            moved = p.detach() != old
            master[moved] = p.detach()[moved].to(master.dtype)
            safe_set_full_fp32_param(p, master)


def _method_names(tuned: Any) -> list[str]:
    """The methods of the active adapters, for error messages."""
    return sorted({tuned.configs[n].method for n in getattr(tuned, "active_adapters", [])})


@contextlib.contextmanager
def _sharded_adapter_hint(hooks: TrainingHooks) -> Iterator[None]:
    """Turn the error a method's hook meets on a sharded adapter (FSDP2 DTensors, outside the forward) into one
    line that says what to do."""
    try:
        yield
    except RuntimeError as exc:
        if "DTensor" not in str(exc):
            raise
        methods = _method_names(hooks.tuned) or ["the method"]
        raise ValueError(
            f"{', '.join(methods)}: its training hook (loss term or step) reads the adapter as whole tensors, but this "
            "run shards the adapter (FSDP2 DTensors). With accelerate's FSDP2 use SubpeftTrainer, which keeps the "
            "trainable tensors whole (not with a device mesh of more than one dimension), or "
            "subpeft.distributed.shard / `subpeft train --strategy fsdp`, or DDP") from exc


class _TrainableTensors(nn.Module):
    """Stands for a model's trainable tensors in accelerate's FSDP2 ``ignored_modules`` (which takes modules):
    its ``parameters()`` are looked up in the model by name when asked, since preparing the model may replace the
    Parameter objects (``cpu_ram_efficient_loading`` moves it to the meta device first), and ``to()`` moves them in
    place, in the model."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        object.__setattr__(self, "_model", model)  # not a submodule: the model stays the model's
        self._names = frozenset(names)

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:  # noqa: D102
        return iter([p for n, p in self._model.named_parameters() if n in self._names])

    def to(self, *args: Any, **kwargs: Any) -> _TrainableTensors:  # noqa: D102
        for p in self.parameters():
            p.data = p.data.to(*args, **kwargs)
        return self


class SubpeftCallback(TrainerCallback):
    """Calls ``tuned.step(global_step)`` after every optimizer step and ``tuned.finalize()`` at the end;
    with ``regularization=True`` also adds the gradient of ``tuned.regularization()`` once per
    optimizer step (see the module docstring; :class:`SubpeftTrainer` turns that off and adds the term
    to the loss instead).

    ``tuned``: the TunedModel; by default the model the Trainer passes to the callback events.

    The methods' phase events (LoRA-Dash's switch, AdaLoRA's final budget, Diff pruning's finalize) are
    collected in :attr:`events` (the whole records), logged on the ``subpeft`` logger and added to the
    Trainer's ``state.log_history`` (step, event, summary: ``trainer_state.json`` keeps them).
    """

    def __init__(self, tuned: nn.Module | None = None, *, regularization: bool = True, finalize: bool = True) -> None:
        self.tuned = tuned
        self.regularization = regularization
        self.finalize = finalize
        self.calls: int = 0  # optimizer steps seen (for checks)
        #: a context manager factory around the step hook (SubpeftTrainer sets it under DeepSpeed)
        self.around_step: Any = contextlib.nullcontext
        self.events: list[dict[str, Any]] = []  # the methods' phase events, in order

    def _take_events(self, hooks: TrainingHooks, state) -> None:
        import logging

        for event in hooks.events(state.global_step):
            self.events.append(event)
            logging.getLogger("subpeft").info(event_line(event))
            state.log_history.append({"step": event["step"], "subpeft_event": event["event"],
                                      "method": event["method"], "summary": event["summary"]})

    def _hooks(self, kwargs: dict[str, Any]) -> TrainingHooks:
        return TrainingHooks(kwargs.get("model"), tuned=self.tuned)

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: D102
        if not self.regularization:
            return control
        hooks = self._hooks(kwargs)
        if hooks:
            with torch.enable_grad(), _sharded_adapter_hint(hooks):
                term, _ = hooks.regularization(value=False)
                if term is not None:
                    term.backward()
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):  # noqa: D102
        hooks = self._hooks(kwargs)
        if hooks:
            with self.around_step(), _sharded_adapter_hint(hooks):
                hooks.step(state.global_step + 1)  # global_step is incremented after zero_grad()
            self.calls += 1
            self._take_events(hooks, state)
        return control

    def on_train_end(self, args, state, control, **kwargs):  # noqa: D102
        if self.finalize:
            hooks = self._hooks(kwargs)
            hooks.finalize()
            self._take_events(hooks, state)
        return control


class SubpeftTrainer(Trainer):
    """A ``Trainer`` that adds ``tuned.regularization()`` to the training loss and runs
    :class:`SubpeftCallback` for the step hook (see the module docstring). Takes ``Trainer``'s arguments,
    plus ``finalize`` (default True: ``tuned.finalize()`` when training ends)."""

    def __init__(self, *args: Any, finalize: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        callbacks = [cb for cb in self.callback_handler.callbacks if isinstance(cb, SubpeftCallback)]
        for cb in callbacks:
            cb.regularization = False  # the term is in the loss here: never twice
            cb.finalize = cb.finalize and finalize
        if not callbacks:
            callbacks = [SubpeftCallback(regularization=False, finalize=finalize)]
            self.add_callback(callbacks[0])
        self._deepspeed_grads: dict[nn.Parameter, torch.Tensor] | None = None  # see _deepspeed_step_hook
        self._deepspeed_engine: Any = None
        self._deepspeed_clip = 0.0
        if getattr(self, "is_deepspeed_enabled", False):
            for cb in callbacks:
                cb.around_step = self._deepspeed_step_hook
        self._whole_under_fsdp2 = self._keep_trainable_whole_under_fsdp2()
        base = self._base_model()
        if base is not None:
            from transformers.utils import can_return_loss, find_labels

            if self.args.label_names is None:
                self.label_names = find_labels(base.__class__)
            self.can_return_loss = can_return_loss(base.__class__)
            # Trainer reads this from the model's forward, and TunedModel.forward takes **kwargs: ask the base
            # model, as Trainer does for a PEFT model. It decides whether the loss is taken as normalised by
            # num_items_in_batch (then not divided by the accumulation steps, and multiplied by the number of
            # processes when tokens are averaged across devices).
            accepts = getattr(base, "accepts_loss_kwargs", None)
            if accepts is None:
                accepts = any(p.kind == inspect.Parameter.VAR_KEYWORD
                              for p in inspect.signature(base.forward).parameters.values())
            self.model_accepts_loss_kwargs = bool(accepts)

    def _keep_trainable_whole_under_fsdp2(self) -> bool:
        """Under accelerate's FSDP2 (``fsdp_version=2``), keep a TunedModel's trainable tensors whole on every rank,
        as :func:`subpeft.distributed.shard` does: they are given to ``fully_shard`` as ignored parameters (through
        the plugin's ``ignored_modules``, added to any the user set), so FSDP2 shards the frozen base only, and the
        methods' hooks (AdaLoRA's budget and orthogonality term, LoRA-Dash's switch) see plain tensors.
        :meth:`training_step` then averages their gradients over the ranks, as FSDP2 would. Returns whether it
        applies (not without FSDP2, for a model that is not a TunedModel, when everything trains, or with a device
        mesh of more than one dimension)."""
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None) if getattr(self, "is_fsdp_enabled", False) else None
        if plugin is None or getattr(plugin, "fsdp_version", 1) != 2 or find_tuned(self.model) is None:
            return False
        mesh = getattr(self.accelerator, "torch_device_mesh", None)
        if mesh is not None and mesh.ndim > 1:
            return False
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        if not names or len(names) == len(list(self.model.parameters())):
            return False
        from .. import distributed  # noqa: F401  (registers the weight access of sharded base weights)

        given = plugin.ignored_modules
        if isinstance(given, str):
            pattern = re.compile(given)
            given = [m for name, m in self.model.named_modules() if pattern.fullmatch(name)]
        plugin.ignored_modules = [*(given or []), _TrainableTensors(self.model, names)]
        return True

    def training_step(self, model, inputs, num_items_in_batch=None):  # noqa: D102
        if getattr(self, "is_deepspeed_enabled", False):
            self._capture_deepspeed_gradients()
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._whole_under_fsdp2 and self.accelerator.sync_gradients:  # the accumulation's last micro-batch
            from ..distributed import sync_gradients

            sync_gradients(model)  # the whole trainable tensors' gradients, averaged as spd.shard's loop does
        return loss

    def _scheduled_trainables(self) -> list[nn.Parameter]:
        """The trainable tensors, when an active method has a step hook that reads or changes them (AdaLoRA's
        allocator, LoRA-Dash's switch: ``step_needs_unmerged``); else empty."""
        tuned = find_tuned(self.model)
        instances = getattr(tuned, "instances", {})
        if not any(getattr(instances[n], "step_needs_unmerged", False) for n in getattr(tuned, "active_adapters", [])):
            return []
        return [p for p in tuned.parameters() if p.requires_grad]

    def _capture_deepspeed_gradients(self) -> None:
        """Under DeepSpeed, accelerate's ``backward`` runs the engine's whole step (clip, update, clear the
        gradients) before Trainer's ``on_optimizer_step``, and the engine keeps the gradients and the fp32
        weights in its own partitions: the step hook (AdaLoRA's allocator reads the gradients) would find none.
        So the engine's ``step`` is wrapped once: at a gradient accumulation boundary it first takes the full
        gradients (``deepspeed.utils.safe_get_full_grad``, every rank alike), scaled as the engine's clipping
        will scale them; :meth:`_deepspeed_step_hook` hands them to the hook."""
        wrapper = getattr(self.accelerator, "deepspeed_engine_wrapped", None)
        engine = getattr(wrapper, "engine", None)
        if engine is None or engine is self._deepspeed_engine:
            return
        self._deepspeed_engine = engine
        params = self._scheduled_trainables()
        self._refuse_hooks_under_zero3(bool(params))
        if not params:
            return
        from deepspeed.utils import safe_get_full_grad

        original = engine.step

        def step(*args: Any, **kwargs: Any) -> Any:
            if engine.is_gradient_accumulation_boundary():
                grads = {p: safe_get_full_grad(p) for p in params}
                self._deepspeed_grads = {p: g.detach().clone() for p, g in grads.items() if g is not None}
                self._deepspeed_clip = engine.gradient_clipping()
            return original(*args, **kwargs)

        engine.step = step  # an instance attribute: accelerate's wrapper calls engine.step()

    def _refuse_hooks_under_zero3(self, scheduled: bool) -> None:
        """ZeRO-3 keeps only partitions of the adapter (and of the base) outside the forward, where the methods'
        regularization term and step hook read them (AdaLoRA, LoRA-Dash's switch reads W, MPC, Diff pruning):
        stop with one clear line before the first step instead of an error deep inside the method."""
        tuned = find_tuned(self.model)
        zero3 = [p for p in tuned.parameters() if p.requires_grad and _is_zero3(p)] if tuned is not None else []
        if not zero3:
            return
        term = None
        if not scheduled:  # does any method add a loss term? (read on whole tensors, nothing changes)
            import deepspeed

            hooks = TrainingHooks(tuned)
            with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None), torch.no_grad():
                term, _ = hooks.regularization(value=False)
        if scheduled or term is not None:
            raise ValueError(
                f"{', '.join(_method_names(tuned))} under DeepSpeed ZeRO-3: the method's "
                f"{'step hook' if scheduled else 'regularization term'} reads the adapter (LoRA-Dash's switch also "
                "the base weights) outside the forward, where ZeRO-3 keeps only this rank's partition; use ZeRO-1 "
                "or ZeRO-2 (\"zero_optimization\": {\"stage\": 2}), DDP or FSDP2 for it")

    @contextlib.contextmanager
    def _deepspeed_step_hook(self) -> Iterator[None]:
        """Around the step hook under DeepSpeed: the gradients taken before the engine's step are put back on
        the parameters (clipped as the engine clipped them) and the weights the hook changes (AdaLoRA's masks)
        are written into the engine's fp32 partitions (``safe_set_full_fp32_param``), which would otherwise
        overwrite them at the next step."""
        grads, self._deepspeed_grads = self._deepspeed_grads, None
        if not grads:
            yield
            return
        clip = self._deepspeed_clip
        norm = self._deepspeed_engine.get_global_grad_norm() if clip and clip > 0 else None
        factor = (float(norm) + 1e-6) / clip if norm is not None else 1.0  # the engine's rule (engine.py)
        before = {p: p.detach().clone() for p in grads}
        for p, g in grads.items():
            p.grad = (g / factor if factor > 1 else g).to(p.dtype)
        try:
            yield
        finally:
            for p in grads:
                p.grad = None
        _write_changes_to_deepspeed_master(before)

    def _base_model(self) -> nn.Module | None:
        tuned = find_tuned(self.model)
        inner = getattr(tuned, "model", None) if tuned is not None else None
        return inner if isinstance(inner, nn.Module) else None

    def _set_signature_columns_if_needed(self) -> None:
        base = self._base_model()
        if self._signature_columns is None and base is not None:
            names = list(inspect.signature(base.forward).parameters)
            self._signature_columns = names + list({"label", "label_ids", *(self.label_names or [])})
            return
        super()._set_signature_columns_if_needed()

    def _loss_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Whether Trainer treats the loss as already normalised over the accumulated batch (it then does
        not divide it by the accumulation steps), as ``Trainer.training_step`` decides."""
        flag = getattr(self, "loss_is_scaled_for_ga", None)
        if flag is not None:
            return bool(flag)
        return bool((getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
                    or getattr(self, "compute_loss_func", None) is not None)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):  # noqa: D102
        try:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
        except RuntimeError as exc:
            if "Expected to have finished reduction in the prior iteration" not in str(exc):
                raise
            raise ValueError(
                "DDP found a trainable adapter parameter that took no part in the last forward: some methods "
                "train parameters that sit out of the forward for a while (LoRA-Dash's dash_sigma before its phase "
                "switch, AdaMix's unrouted experts). Use TrainingArguments(ddp_find_unused_parameters=True) (what "
                "Trainer picks for a TunedModel when left at None) with such methods") from exc
        hooks = TrainingHooks(model)
        if not hooks or not model.training or not torch.is_grad_enabled():
            return result
        with _sharded_adapter_hint(hooks):
            term, _ = hooks.regularization(value=False)
        if term is None:
            return result
        if self._loss_scaled_for_ga(num_items_in_batch):
            steps = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
            term = term / steps
        if return_outputs:
            loss, outputs = result
            return loss + term.to(loss.device), outputs
        return result + term.to(result.device)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        tuned = find_tuned(self.model)
        if tuned is None or not hasattr(tuned, "save_pretrained") or not hasattr(tuned, "configs"):
            return super()._save(output_dir, state_dict)
        import os

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        with _whole_adapter_tensors(tuned):  # FSDP2, ZeRO-3: every rank gathers, rank 0 writes
            if not self.args.should_save:
                return None
            os.makedirs(output_dir, exist_ok=True)
            tuned.save_pretrained(output_dir)  # the adapter (and method state), not the frozen base model
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        return None

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:  # noqa: D102
        # Under FSDP and DeepSpeed, Trainer first gathers the whole model's state dict (or, with FSDP's
        # SHARDED_STATE_DICT, skips _save; with ZeRO-3 and no 16-bit gather, writes an engine checkpoint): the
        # adapter needs none of that, every rank joins _save's gather of its own tensors.
        sharded = getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False)
        if sharded and find_tuned(self.model) is not None:
            self._save(output_dir if output_dir is not None else self.args.output_dir)
            if self.args.push_to_hub and not _internal_call:
                self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
            return None
        return super().save_model(output_dir, _internal_call=_internal_call)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if not self._load_adapter(resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is None or not self._load_adapter(best):
            super()._load_best_model()

    def _load_adapter(self, directory: str) -> bool:
        """Copy a checkpoint's adapter tensors into the TunedModel (what ``_save`` wrote); False if not one."""
        import os

        tuned = find_tuned(self.model)
        if tuned is None or not os.path.isfile(os.path.join(directory, "adapter_config.json")):
            return False
        from .loop import load_model_state

        with _whole_adapter_tensors(tuned, write_back=True):
            load_model_state(tuned, directory)
        return True
