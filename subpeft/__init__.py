"""subpeft: parameter-efficient fine-tuning organised by the subspace view.

    import subpeft as sp
    tuned = sp.attach(model, sp.LoRA(r=8, alpha=16, targets=["query", "value"]))
"""

__version__ = "0.1.0"

from . import analysis
from .core.adapter import Adapter
from .core.arch import Architecture, describe, register_architecture
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
from .core.instance import LayerInstance, MethodInstance, MethodTraits, PromptInstance
from .core.model import TunedModel, attach, load
from .core.registry import MethodInfo, config_from_dict, get_method, list_methods, register
from .mechanisms.low_rank import LowRank
from .methods.combination.dora import DoRA
from .methods.combination.lora_dash import LoRADash
from .methods.combination.pica import PiCa
from .methods.combination.spectral import SpectralAdapter
from .methods.combination.svdiff import SVDiff
from .methods.extension.adalora import AdaLoRA
from .methods.extension.adamix import AdaMix
from .methods.extension.flora import FLoRA
from .methods.extension.houlsby import Houlsby
from .methods.extension.lora import LoRA
from .methods.extension.parallel import ParallelAdapter
from .methods.extension.pfeiffer import Pfeiffer
from .methods.extension.trilora import TriLoRA
from .methods.extension.vera import VeRA
from .methods.frameworks.unipelt import UniPELT
from .methods.reconstruction.bitfit import BitFit
from .methods.reconstruction.diff_pruning import DiffPruning
from .methods.reconstruction.ia3 import IA3
from .methods.reconstruction.layernorm import LayerNormTuning
from .methods.reconstruction.p_tuning import PTuning
from .methods.reconstruction.p_tuning_v2 import PTuningV2
from .methods.reconstruction.prefix import PrefixTuning
from .methods.reconstruction.prompt_tuning import PromptTuning
from .methods.reconstruction.sam_parser import SAMParser
from .methods.reconstruction.ssb import SSB
from .methods.reconstruction.ssl import SSL
from .quant import quantize

__all__ = [
    "UniPELT",
    "register_architecture",
    "PTuningV2",
    "PTuning",
    "PromptTuning",
    "PrefixTuning",
    "Pfeiffer",
    "Houlsby",
    "describe",
    "Architecture",
    "AdaMix",
    "analysis",
    "AdaLoRA",
    "Adapter",
    "AdapterConfig",
    "LayerInstance",
    "MethodInstance",
    "MethodTraits",
    "PromptInstance",
    "AdapterLoadError",
    "AdapterNameError",
    "attach",
    "BitFit",
    "config_from_dict",
    "ConfigError",
    "DiffPruning",
    "DoRA",
    "FLoRA",
    "get_method",
    "IA3",
    "LayerNormTuning",
    "list_methods",
    "load",
    "load_quantized",
    "LoRA",
    "LoRADash",
    "LowRank",
    "MethodInfo",
    "ParallelAdapter",
    "PiCa",
    "quantize",
    "register",
    "SAMParser",
    "SpectralAdapter",
    "SSB",
    "SSL",
    "SubpeftError",
    "SVDiff",
    "TargetError",
    "TriLoRA",
    "TunedModel",
    "UnsafeMergeError",
    "UnsupportedLayerError",
    "VeRA",
    "__version__",
]


def __getattr__(name: str):
    if name == "load_quantized":  # loads models by name: the experiment side's, imported on first use
        from .app.models import load_quantized

        return load_quantized
    # config classes of methods registered elsewhere (plug-ins), by class name: sp.<ConfigName>
    for info in list_methods():
        if info.config_cls.__name__ == name:
            return info.config_cls
    raise AttributeError(f"module 'subpeft' has no attribute {name!r}")
