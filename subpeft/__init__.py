"""subpeft: parameter-efficient fine-tuning organised by the subspace view.

    import subpeft as sp
    tuned = sp.attach(model, sp.LoRA(r=8, alpha=16, targets=["query", "value"]))
"""

__version__ = "0.1.0"

from .core.adapter import Adapter
from .core.config import AdapterConfig
from .core.errors import (
    AdapterLoadError,
    AdapterNameError,
    ConfigError,
    SubpeftError,
    TargetError,
    UnsafeMergeError,
    UnsupportedLayerError,
)
from .core.model import TunedModel, attach, load
from .core.registry import MethodInfo, config_from_dict, get_method, list_methods, register
from .methods.extension.lora import LoRA

__all__ = [
    "Adapter",
    "AdapterConfig",
    "AdapterLoadError",
    "AdapterNameError",
    "ConfigError",
    "LoRA",
    "MethodInfo",
    "SubpeftError",
    "TargetError",
    "TunedModel",
    "UnsafeMergeError",
    "UnsupportedLayerError",
    "__version__",
    "attach",
    "config_from_dict",
    "get_method",
    "list_methods",
    "load",
    "register",
]


def __getattr__(name: str):
    # config classes of registered methods by class name (sp.IA3, sp.DoRA, ...), so that a method's
    # one file is all it takes; the common ones are also imported above
    for info in list_methods():
        if info.config_cls.__name__ == name:
            return info.config_cls
    raise AttributeError(f"module 'subpeft' has no attribute {name!r}")
