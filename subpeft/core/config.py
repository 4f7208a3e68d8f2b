"""Base configuration shared by every method: targets, exclusions, JSON round-trip.

A method's config is a dataclass that subclasses :class:`AdapterConfig` and is registered under a
name (see :mod:`subpeft.core.registry`). Its fields are the method's options; the three fields
below are common to all methods and keyword-only, so that ``sp.LoRA(8, 16)`` reads as
``r=8, alpha=16``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import ConfigError


def _version() -> str:
    from .. import __version__

    return __version__


_FIELD_TYPES: dict[type, dict[str, tuple]] = {}


def _field_types(cls: type) -> dict[str, tuple]:
    """Per field of a config class, the plain types its annotation names (``int | None`` ->
    (int, NoneType)); parametrised types count as their origin (``list[str]`` -> list)."""
    if cls not in _FIELD_TYPES:
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # noqa: BLE001 - an annotation we cannot resolve: no type checks for it
            hints = {}
        out = {}
        for name, hint in hints.items():
            args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
            out[name] = tuple(typing.get_origin(a) or a for a in args)
        _FIELD_TYPES[cls] = out
    return _FIELD_TYPES[cls]


def _non_finite(value: Any) -> float | None:
    """The first NaN or infinite float in an option value (nested lists, tuples, dicts), or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for v in value:
            bad = _non_finite(v)
            if bad is not None:
                return bad
    return None


def peft_int(data: dict[str, Any], key: str, default: int | None) -> Any:
    """An integer field of a PEFT config dict (``default`` where absent or null), without coercion:
    ``int(True)`` would read ``"r": true`` as rank 1, ``int(2.5)`` as 2."""
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"PEFT config field {key!r} must be an integer, got {value!r}")
    return value


def peft_number(data: dict[str, Any], key: str, default: float | None) -> Any:
    """A numeric field of a PEFT config dict (``default`` where absent or null), finite, not a bool."""
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"PEFT config field {key!r} must be a finite number, got {value!r}")
    return value


@dataclass(kw_only=True)
class AdapterConfig:
    """Fields every method shares.

    targets: which modules to adapt: a list of names (an exact module name or a dotted suffix of
        one, ``"query"`` matches ``encoder.layer.0.attention.self.query``), a regular expression
        string matched against whole module names, or ``"all-linear"`` (every Linear/Conv1D except
        the output head). ``None`` uses the method's default for known architectures.
    exclude: modules never adapted, in the same forms as ``targets``.
    modules_to_save: modules trained in full and saved with the adapter (e.g. a freshly
        initialised classification head), matched like list ``targets``.
    """

    method: ClassVar[str] = ""
    # targets used when `targets=None` for every model (e.g. "all" norms); None: the model's default
    default_targets: ClassVar[list[str] | str | None] = None

    targets: list[str] | str | None = None
    exclude: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        for name in ("targets", "exclude"):
            value = getattr(self, name)
            if isinstance(value, (tuple, set)):
                setattr(self, name, sorted(value) if isinstance(value, set) else list(value))
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, list)):
                raise ConfigError(f"{name} must be a list of module names, a regex string or None, got {value!r}")
            if isinstance(value, list) and not all(isinstance(v, str) and v for v in value):
                raise ConfigError(f"{name} must contain non-empty strings, got {value!r}")
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                self.modules_to_save = [self.modules_to_save]
            self.modules_to_save = list(self.modules_to_save)
        self._check_values()
        self.validate()

    def _check_values(self) -> None:
        """Checks every option of every method shares, before the method's own :meth:`validate`:
        a float anywhere in an option (also inside a list or dict) must be finite, and an option
        declared ``int`` or ``float`` does not take a bool (``r: true`` would otherwise read as 1)."""
        hints = _field_types(type(self))
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            value = getattr(self, f.name)
            bad = _non_finite(value)
            if bad is not None:
                raise ConfigError(f"{type(self).__name__}.{f.name} must be a finite number, got {bad!r}")
            allowed = hints.get(f.name, ())
            if isinstance(value, bool) and bool not in allowed and (int in allowed or float in allowed):
                kind = "an integer" if float not in allowed else "a number"
                raise ConfigError(f"{type(self).__name__}.{f.name} must be {kind}, got {value!r} (a bool)")

    # -- per-method hooks -------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`ConfigError` on invalid option values (overridden by methods)."""

    # -- helpers for validate() -------------------------------------------------------------
    def _check_positive_int(self, name: str) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{type(self).__name__}.{name} must be a positive integer, got {value!r}")

    def _check_range(self, name: str, low: float, high: float, *, high_inclusive: bool = False) -> None:
        value = getattr(self, name)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value
        ok = ok and (value <= high if high_inclusive else value < high)
        if not ok:
            bracket = "]" if high_inclusive else ")"
            raise ConfigError(f"{type(self).__name__}.{name} must be in [{low}, {high}{bracket}, got {value!r}")

    # -- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Native JSON form: ``{"method": ..., "subpeft_version": ..., **fields}``."""
        out: dict[str, Any] = {"method": self.method, "subpeft_version": _version()}
        for f in dataclasses.fields(self):
            out[f.name] = getattr(self, f.name)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """Build from the native form; unknown keys (from a newer version) warn and are ignored."""
        data = dict(data)
        method = data.pop("method", cls.method)
        data.pop("subpeft_version", None)
        if method != cls.method:
            raise ConfigError(f"config is for method {method!r}, not {cls.method!r}")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - names)
        if unknown:
            warnings.warn(
                f"{cls.__name__}: ignoring unknown config keys {unknown} (written by a newer subpeft?)",
                UserWarning,
                stacklevel=2,
            )
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    # PEFT interoperability: methods whose definition equals a Hugging Face PEFT method override
    # these two so that their adapters are written in (and read from) PEFT's format.
    peft_type: ClassVar[str | None] = None

    def to_peft_dict(self, layer_types: set[str] | frozenset[str] = frozenset()) -> dict[str, Any] | None:
        """The equivalent PEFT config dict, or None if PEFT has no identical method.

        ``layer_types`` are the kinds of layer the adapter sits on (e.g. {"linear", "conv1d"}).
        """
        return None

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        raise ConfigError(f"{cls.__name__} cannot be read from a PEFT config")

    @classmethod
    def accepts_peft(cls, data: dict[str, Any]) -> bool:
        """Whether this class reads a PEFT dict of its ``peft_type`` (when several classes share one)."""
        return True

    @property
    def mergeable(self) -> bool:
        """Whether adapters of this config fold into the base weights (options can turn it off)."""
        from .registry import method_for_config

        return method_for_config(self).mergeable

    def replace(self, **changes: Any) -> AdapterConfig:
        return dataclasses.replace(self, **changes)

