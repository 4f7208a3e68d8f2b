"""Phase events: what a method's training-time hooks did that a run should record.

A method's hook (``step`` or ``finalize`` of its instance) calls :func:`report` when something
happens once in a run (LoRA-Dash's switch to the dash phase and the directions it chose,
AdaLoRA's final rank budget, Diff pruning's top-k at finalize). The event waits on the adapter's
instance until a training loop takes it with :func:`drain` (the library's
:class:`~subpeft.training.loop.Trainer` does after every optimizer step and after ``finalize``: it
writes one line per event to train.log and keeps the events in its state, which ``subpeft train``
writes to metrics.json under ``"events"``). A loop of one's own may call ``drain(tuned)`` itself, or
ignore them (a handful per run; nothing else depends on them).

An event is a JSON-ready dict: ``event`` (its name), ``method``, ``adapter``, ``step`` (the optimizer
step it happened after; None from ``finalize``, which the trainer fills in), ``summary`` (one line
for people), and the method's details.
"""

from __future__ import annotations

from typing import Any

__all__ = ["drain", "report"]


def report(instance: Any, event: str, summary: str, *, step: int | None = None, **details: Any) -> dict[str, Any]:
    """Queue an event on ``instance`` (a method instance: one named adapter); returns it."""
    record = {"event": event, "method": instance.config.method, "adapter": instance.name, "step": step,
              "summary": summary, **details}
    instance.__dict__.setdefault("pending_events", []).append(record)
    return record


def drain(tuned: Any) -> list[dict[str, Any]]:
    """Take every queued event of every adapter of ``tuned`` (a TunedModel), in adapter order."""
    out: list[dict[str, Any]] = []
    for instance in getattr(tuned, "instances", {}).values():
        queue = instance.__dict__.get("pending_events")
        if queue:
            out.extend(queue)
            queue.clear()
    return out
