"""QLoRA: every weight-space method on a base stored in 4-bit NormalFloat (bitsandbytes), paged optimizers.

    import subpeft as sp
    from subpeft.quant import quantize, paged_adamw, merge_errors, dequantize_model

    model = sp.load_quantized("smollm2", double_quant=True)       # by name or folder; or quantize(any_model)
    tuned = sp.attach(model, sp.LoRA(r=8, targets="all-linear"))   # any weight-space method
    opt = paged_adamw(p for p in tuned.parameters() if p.requires_grad)
    ...
    tuned.merge(); merge_errors(tuned)                             # requantisation error per layer
    plain = dequantize_model(tuned.merge_and_unload())             # full precision
"""

from .nf4 import (
    DEFAULT_SKIP,
    PagedOptimizerWarning,
    QuantizationError,
    QuantizedMergeWarning,
    dequantize,
    dequantize_model,
    is_quantized,
    merge_errors,
    quantize,
    requantize,
    storage,
    to_linear4bit,
)
from .paged import paged_adamw

__all__ = [
    "DEFAULT_SKIP",
    "PagedOptimizerWarning",
    "QuantizationError",
    "QuantizedMergeWarning",
    "dequantize",
    "dequantize_model",
    "is_quantized",
    "merge_errors",
    "paged_adamw",
    "quantize",
    "requantize",
    "storage",
    "to_linear4bit",
]


def __getattr__(name: str):
    # Loading a model by name is the experiment side's (subpeft.train.models); quant imports core only.
    if name == "load_quantized":
        import warnings

        warnings.warn("subpeft.quant.load_quantized is deprecated: use sp.load_quantized "
                      "(subpeft.train.models.load_quantized)", DeprecationWarning, stacklevel=2)
        from ..train.models import load_quantized

        return load_quantized
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
