"""Method registry: a name maps to its config class, its adapter (layer) class and its family."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from .adapter import Adapter
    from .config import AdapterConfig

FAMILIES = ("reconstruction", "extension", "combination", "framework")
#: the package of the built-in methods; its sub-packages are the families (the one place a built-in
#: method's family is declared: the folder its file is in)
METHODS_PACKAGE = "subpeft.methods"
FAMILY_FOLDERS = {"reconstruction": "reconstruction", "extension": "extension", "combination": "combination",
                  "frameworks": "framework"}
KINDS = ("weight", "module", "prompt")


@dataclass(frozen=True)
class MethodInfo:
    name: str
    family: str
    mergeable: bool
    kind: str
    config_cls: type
    adapter_cls: type
    formula: str  # per-layer trainable-parameter formula, for docs and `subpeft methods`
    layer_types: tuple[str, ...]
    trains: str = ""  # what trains, in a few words
    instance_cls: type | None = None  # the MethodInstance subclass for one named adapter of it

    def as_row(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "mergeable": self.mergeable,
            "kind": self.kind,
            "formula": self.formula,
            "trains": self.trains,
            "layer_types": list(self.layer_types),
        }


_REGISTRY: dict[str, MethodInfo] = {}
_PEFT_TYPES: dict[str, list[str]] = {}
_LOADED = False


def register(adapter_cls: type[Adapter]) -> type[Adapter]:
    """Class decorator for an :class:`~subpeft.core.adapter.Adapter` subclass.

    The adapter class names its config class (``config_cls``), its ``kind``, ``mergeable`` and
    ``formula``; the config class's ``method`` is the registered name. A built-in method's family is
    the folder its module is in (``subpeft/methods/<family>/``, see :func:`family_of_module`) and is
    set on the class here; a method defined elsewhere declares ``family`` as a class attribute.
    """
    config_cls = adapter_cls.config_cls
    name = config_cls.method
    if not name:
        raise TypeError(f"{config_cls.__name__}.method must be set to the registered name")
    folder_family = family_of_module(adapter_cls.__module__)
    if folder_family is not None:
        declared = vars(adapter_cls).get("family", folder_family)
        if declared != folder_family:
            raise TypeError(
                f"{adapter_cls.__name__} is in {adapter_cls.__module__} (family {folder_family!r}) but declares "
                f"family {declared!r}: a built-in method's family is its folder, declare none"
            )
        adapter_cls.family = folder_family
    if adapter_cls.family not in FAMILIES:
        raise TypeError(f"{adapter_cls.__name__}.family must be one of {FAMILIES}")
    if adapter_cls.kind not in KINDS:
        raise TypeError(f"{adapter_cls.__name__}.kind must be one of {KINDS}")
    if name in _REGISTRY and _REGISTRY[name].adapter_cls is not adapter_cls:
        raise TypeError(f"method {name!r} is registered twice")
    _REGISTRY[name] = MethodInfo(
        name=name,
        family=adapter_cls.family,
        mergeable=adapter_cls.mergeable,
        kind=adapter_cls.kind,
        config_cls=config_cls,
        adapter_cls=adapter_cls,
        formula=adapter_cls.formula,
        layer_types=tuple(adapter_cls.layer_types),
        trains=adapter_cls.trains,
        instance_cls=adapter_cls.instance_cls,
    )
    if config_cls.peft_type:
        names = _PEFT_TYPES.setdefault(config_cls.peft_type, [])
        if name not in names:
            names.append(name)
    return adapter_cls


def family_of_module(module: str) -> str | None:
    """The family of a method defined in ``module``: the folder under ``subpeft/methods/`` for the
    built-in methods, None for a module elsewhere (the class's own ``family`` attribute counts)."""
    parts = module.split(".")
    root = METHODS_PACKAGE.split(".")
    if parts[: len(root)] != root:
        return None
    folder = parts[len(root)] if len(parts) > len(root) else ""
    if folder not in FAMILY_FOLDERS:
        raise TypeError(f"{module}: built-in methods live in subpeft/methods/<family>/, one of {sorted(FAMILY_FOLDERS)}")
    return FAMILY_FOLDERS[folder]


def _load_builtin_methods() -> None:
    """Import every module under subpeft.methods so that each registers itself."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from .. import methods

    for mod in pkgutil.walk_packages(methods.__path__, prefix=methods.__name__ + "."):
        importlib.import_module(mod.name)


def get_method(name: str) -> MethodInfo:
    _load_builtin_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigError(f"unknown method {name!r}{hint} Known methods: {', '.join(sorted(_REGISTRY))}") from None


def method_for_config(config: AdapterConfig) -> MethodInfo:
    return get_method(type(config).method)


def list_methods() -> list[MethodInfo]:
    """Every registered method: name, family, mergeable, kind (and formula, layer types)."""
    _load_builtin_methods()
    return sorted(_REGISTRY.values(), key=lambda m: (FAMILIES.index(m.family), m.name))


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """A config from its JSON dict: ``data["method"]`` is the registered name.

    A Hugging Face PEFT config dict (with ``peft_type``) is accepted for the methods that PEFT
    shares with subpeft.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a dict, got {type(data).__name__}")
    if "method" in data:
        method = data["method"]
        if not isinstance(method, str) or not method:
            raise ConfigError(
                f"a config's 'method' must be the name of a registered method (a string such as 'lora'), "
                f"got {method!r}; see sp.list_methods()"
            )
        return get_method(method).config_cls.from_dict(data)
    if "peft_type" in data:
        _load_builtin_methods()
        if not isinstance(data["peft_type"], str):
            raise ConfigError(f"a PEFT config's 'peft_type' must be a string such as 'LORA', got {data['peft_type']!r}")
        peft_type = data["peft_type"].upper()
        if peft_type not in _PEFT_TYPES:
            raise ConfigError(
                f"PEFT adapter type {peft_type!r} is not supported by subpeft; supported PEFT types: "
                f"{', '.join(sorted(_PEFT_TYPES)) or 'none'}"
            )
        # several subpeft methods can share one PEFT type (LoRA and DoRA; (IA)³ and SSL): the one
        # whose config accepts this dict reads it
        for name in sorted(_PEFT_TYPES[peft_type]):
            config_cls = get_method(name).config_cls
            if config_cls.accepts_peft(data):
                return config_cls.from_peft_dict(data)
        raise ConfigError(
            f"this PEFT {peft_type} config uses a combination of options that no subpeft method reads "
            f"(candidates: {', '.join(sorted(_PEFT_TYPES[peft_type]))})"
        )
    raise ConfigError("a config dict needs a 'method' key naming a registered method (see sp.list_methods())")


def unregister(name: str) -> None:
    """Remove a registered method (methods defined for a while only, e.g. in a test); the built-in
    methods stay registered."""
    info = _REGISTRY.pop(name, None)
    if info is not None and info.config_cls.peft_type:
        names = _PEFT_TYPES.get(info.config_cls.peft_type, [])
        if name in names:
            names.remove(name)
        if not names:
            _PEFT_TYPES.pop(info.config_cls.peft_type, None)
