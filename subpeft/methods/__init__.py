"""Every PEFT method, one file each, in the folder of its family (``reconstruction/``, ``extension/``,
``combination/``, ``frameworks/``): the folder is where a built-in method's family is declared (see
:func:`subpeft.core.registry.family_of_module`). The mechanisms methods share are in
:mod:`subpeft.mechanisms`.

Importing :mod:`subpeft` registers them all (see :func:`subpeft.core.registry.list_methods`).

Deprecated old names, kept importable: ``subpeft.methods.modules.*`` (Houlsby, Pfeiffer, AdaMix, now in
``extension/``; ``bottleneck`` is :mod:`subpeft.mechanisms.bottleneck`) and ``subpeft.methods.prompts.*``
(prompt-kind methods, now in ``reconstruction/``), each the new module under its old name.
"""

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
