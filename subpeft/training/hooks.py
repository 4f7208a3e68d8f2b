"""The library's three training hooks, called from one place.

A method that trains with more than the task loss exposes, on its ``TunedModel``:

* ``regularization()``: a term added to the loss of every micro-batch (AdaLoRA's orthogonality,
  MPC, Diff pruning's gates);
* ``step(global_step)``: called after every optimizer step (and scheduler step), before the
  gradients are cleared (AdaLoRA's allocator reads them), with ``global_step`` = optimizer steps done
  so far (1 after the first), as ``TrainerState.global_step`` reads right after;
* ``finalize()``: called once when training ends (Diff pruning keeps its top-k entries).

What those hooks did once in a run (a phase switch, a final budget, a pruning) they report as events
(:func:`subpeft.methods.report_event`); :meth:`TrainingHooks.events` takes them, for the loop to log.

:class:`TrainingHooks` is the one object that calls them: the library's loop
(:class:`subpeft.training.loop.Trainer`, hence :func:`~subpeft.training.batches` ``train_classifier``) and the
Hugging Face ``Trainer`` integration (:mod:`subpeft.training.hf`) both go through it. A plain model
(no hooks) gets no-ops.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["TrainingHooks", "find_tuned"]


def find_tuned(model: nn.Module | None) -> nn.Module | None:
    """The object with ``regularization``/``step`` hooks in ``model`` or the wrappers around it (DDP's
    ``.module``, ``torch.compile``'s ``._orig_mod``); None if there is none."""
    seen = 0
    while model is not None and seen < 8:
        if callable(getattr(type(model), "regularization", None)) and callable(getattr(type(model), "step", None)):
            return model
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        seen += 1
    return None


class TrainingHooks:
    """The hooks of ``model`` (found through DDP / ``torch.compile`` wrappers), or no-ops for a plain model.

    ``tuned``: the object that has the hooks, or None.
    """

    def __init__(self, model: nn.Module | None, *, tuned: nn.Module | None = None) -> None:
        self.tuned = tuned if tuned is not None else find_tuned(model)

    def __bool__(self) -> bool:
        return self.tuned is not None

    def regularization(self, *, value: bool = True) -> tuple[torch.Tensor | None, float]:
        """(the term to add to the loss, or None when it carries no gradient; its value as a float, or 0.0
        without ``value``: reading it waits for the device)."""
        if self.tuned is None:
            return None, 0.0
        term: Any = self.tuned.regularization()
        value = float(term.detach() if torch.is_tensor(term) else term) if value else 0.0
        if torch.is_tensor(term) and term.requires_grad:
            return term, value
        return None, value

    def step(self, global_step: int) -> None:
        """After optimizer step number ``global_step`` (1-based), before the gradients are cleared."""
        if self.tuned is not None:
            self.tuned.step(global_step)

    def finalize(self) -> None:
        """Once, when training has ended."""
        fn = getattr(self.tuned, "finalize", None) if self.tuned is not None else None
        if callable(fn):
            fn()

    def events(self, step: int) -> list[dict[str, Any]]:
        """The phase events the hooks reported since the last call (:func:`subpeft.methods.report_event`); [] if none.
        An event without a step gets ``step`` (the optimizer step it was taken after)."""
        if self.tuned is None:
            return []
        from ..methods import drain_events as drain

        events = drain(self.tuned)
        for event in events:
            if event.get("step") is None:
                event["step"] = step
        return events


def event_line(event: dict[str, Any]) -> str:
    """One log line for a phase event: ``step N: method event: summary``."""
    return f"step {event['step']}: {event['method']} {event['event']}: {event['summary']}"
