"""Method schedules given in optimizer steps or as a fraction of the run.

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
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

from ..core.errors import ConfigError

__all__ = ["check_steps", "is_fraction", "resolve_steps"]


def is_fraction(value: Any) -> bool:
    """Whether a step option's value is a fraction of the run (a float in (0, 1))."""
    return isinstance(value, float) and 0.0 < value < 1.0


def check_steps(owner: str, name: str, value: Any, *, minimum: int = 0, allow_none: bool = False,
                none_means: str = "") -> None:
    """:class:`ConfigError` unless ``value`` is an int >= ``minimum`` (steps) or a float in (0, 1) (a fraction)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not (isinstance(value, int) and value >= minimum or is_fraction(value)):
        hint = " (an int is a number of steps; a float is a fraction, so 1.0 or 2.0 are refused: write 1 or 2)" \
            if isinstance(value, float) else ""
        none = f", or None ({none_means})" if allow_none else ""
        raise ConfigError(f"{owner}.{name} must be an integer >= {minimum} (optimizer steps) or a fraction in "
                          f"(0, 1) of the run's optimizer steps (e.g. 0.1){none}, got {value!r}{hint}")


def resolve_steps(value: int | float, total: int, *, minimum: int = 0) -> int:
    """Steps for a step option: an int as it is, a fraction as round(fraction·total) (halves up), at least
    ``minimum``."""
    if not is_fraction(value):
        return int(value)
    return max(minimum, math.floor(Fraction(str(value)) * int(total) + Fraction(1, 2)))
