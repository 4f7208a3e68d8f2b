"""Every PEFT method, one file each, in the folder of its family (``reconstruction/``, ``extension/``,
``combination/``, ``frameworks/``): the folder is where a built-in method's family is declared (see
:func:`subpeft.core.registry.family_of_module`). The mechanisms methods share are in
:mod:`subpeft.mechanisms`.

Importing :mod:`subpeft` registers them all (see :func:`subpeft.core.registry.list_methods`).

Deprecated old names, kept importable: ``subpeft.methods.modules.*`` (Houlsby, Pfeiffer, AdaMix, now in
``extension/``; ``bottleneck`` is :mod:`subpeft.mechanisms.bottleneck`) and ``subpeft.methods.prompts.*``
(prompt-kind methods, now in ``reconstruction/``), each the new module under its old name.

Two helpers the methods' training-time hooks share live here (defined before the methods are imported):

**Schedules** (``check_steps``, ``resolve_steps``, ``is_fraction``).
Method schedules given in optimizer steps or as a fraction of the run.

Options that count optimizer steps (LoRA-Dash's ``prelaunch_steps``, AdaLoRA's ``init_warmup`` and
``final_warmup``) take either

- an **int** ``>= 0``: that many optimizer steps (what they always meant), or
- a **float in (0, 1)**: that fraction of the run's optimizer steps (AdaLoRA: of its ``total_steps``,
  which the run application sets to the run's length), resolved as ``round(fraction·steps)`` with
  halves rounded up, computed on the decimal the user wrote (``0.1`` of 25 steps is 3, not
  2.5000000000000004 rounded).

Any other value (``1.5``, ``1.0``, ``2.0``, ``-1``, a string) is a :class:`ConfigError` that names the
option. A config resolves its fractions with ``config.resolve_schedule(total_steps)``, which returns
a config whose step options are all ints: the run application (``subpeft train`` / ``compare``) calls
it with the run's optimizer steps before attaching, so the saved ``adapter_config.json`` and the
run's ``metrics.json`` record the resolved step counts. ``sp.attach`` alone does not know the run's
length: a fraction that needs it fails there with a message saying what to do (give steps, or call
``resolve_schedule`` first).

**Phase events** (``report_event``, ``drain_events``).
What a method's training-time hooks did once in a run, for the run to record. A method's hook
(``step`` or ``finalize`` of its instance) calls :func:`report_event` when something
happens once in a run (LoRA-Dash's switch to the dash phase and the directions it chose,
AdaLoRA's final rank budget, Diff pruning's top-k at finalize). The event waits on the adapter's
instance until a training loop takes it with :func:`drain_events` (the library's
:class:`~subpeft.training.loop.Trainer` does after every optimizer step and after ``finalize``: it
writes one line per event to train.log and keeps the events in its state, which ``subpeft train``
writes to metrics.json under ``"events"``). A loop of one's own may call ``drain_events(tuned)`` itself, or
ignore them (a handful per run; nothing else depends on them).

An event is a JSON-ready dict: ``event`` (its name), ``method``, ``adapter``, ``step`` (the optimizer
step it happened after; None from ``finalize``, which the trainer fills in), ``summary`` (one line
for people), and the method's details.
"""

# ruff: noqa: E402 - the methods are imported after the helpers they import from here
from __future__ import annotations

import math as _math
from fractions import Fraction as _Fraction
from typing import Any as _Any

from ..core.errors import ConfigError as _ConfigError


# -- schedules: optimizer steps, or a fraction of the run ----------------------------------------------
def is_fraction(value: _Any) -> bool:
    """Whether a step option's value is a fraction of the run (a float in (0, 1))."""
    return isinstance(value, float) and 0.0 < value < 1.0


def check_steps(owner: str, name: str, value: _Any, *, minimum: int = 0, allow_none: bool = False,
                none_means: str = "") -> None:
    """:class:`ConfigError` unless ``value`` is an int >= ``minimum`` (steps) or a float in (0, 1) (a fraction)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not (isinstance(value, int) and value >= minimum or is_fraction(value)):
        hint = " (an int is a number of steps; a float is a fraction, so 1.0 or 2.0 are refused: write 1 or 2)" \
            if isinstance(value, float) else ""
        none = f", or None ({none_means})" if allow_none else ""
        raise _ConfigError(f"{owner}.{name} must be an integer >= {minimum} (optimizer steps) or a fraction in "
                           f"(0, 1) of the run's optimizer steps (e.g. 0.1){none}, got {value!r}{hint}")


def resolve_steps(value: int | float, total: int, *, minimum: int = 0) -> int:
    """Steps for a step option: an int as it is, a fraction as round(fraction·total) (halves up, on the decimal
    written), at least ``minimum``."""
    if not is_fraction(value):
        return int(value)
    return max(minimum, _math.floor(_Fraction(str(value)) * int(total) + _Fraction(1, 2)))


# -- phase events ------------------------------------------------------------------------------------
def report_event(instance: _Any, event: str, summary: str, *, step: int | None = None,
                 **details: _Any) -> dict[str, _Any]:
    """Queue an event on ``instance`` (a method instance: one named adapter); returns it."""
    record = {"event": event, "method": instance.config.method, "adapter": instance.name, "step": step,
              "summary": summary, **details}
    instance.__dict__.setdefault("pending_events", []).append(record)
    return record


def drain_events(tuned: _Any) -> list[dict[str, _Any]]:
    """Take every queued event of every adapter of ``tuned`` (a TunedModel), in adapter order."""
    out: list[dict[str, _Any]] = []
    for instance in getattr(tuned, "instances", {}).values():
        queue = instance.__dict__.get("pending_events")
        if queue:
            out.extend(queue)
            queue.clear()
    return out


# -- the methods (after the helpers they import) ----------------------------------------------------
import sys as _sys
import types as _types

from ..mechanisms import bottleneck as _bottleneck
from .extension import adamix as _adamix
from .extension import houlsby as _houlsby
from .extension import pfeiffer as _pfeiffer
from .reconstruction import p_tuning as _p_tuning
from .reconstruction import p_tuning_v2 as _p_tuning_v2
from .reconstruction import prefix as _prefix
from .reconstruction import prompt_tuning as _prompt_tuning

for _old, _members in {
    "modules": {"adamix": _adamix, "houlsby": _houlsby, "pfeiffer": _pfeiffer, "bottleneck": _bottleneck},
    "prompts": {"p_tuning": _p_tuning, "p_tuning_v2": _p_tuning_v2, "prefix": _prefix, "prompt_tuning": _prompt_tuning},
}.items():
    _package = _types.ModuleType(f"{__name__}.{_old}", "Deprecated old package name: its modules are now "
                                 + ", ".join(m.__name__ for m in _members.values()))
    _package.__path__ = []  # a package, so that ``import subpeft.methods.<old>.<name>`` finds the aliases
    for _name, _module in _members.items():
        setattr(_package, _name, _module)
        _sys.modules[f"{__name__}.{_old}.{_name}"] = _module
    _sys.modules[_package.__name__] = _package
    globals()[_old] = _package
