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
