"""QLoRA: every weight-space method on a base stored in 4-bit NormalFloat (bitsandbytes), paged optimizers.

    import subpeft as sp
    from subpeft.quant import quantize, load_quantized, paged_adamw, merge_errors, dequantize_model

    model = load_quantized("smollm2", double_quant=True)          # or quantize(any_model)
    tuned = sp.attach(model, sp.LoRA(r=8, targets="all-linear"))   # any weight-space method
    opt = paged_adamw(p for p in tuned.parameters() if p.requires_grad)
    ...
    tuned.merge(); merge_errors(tuned)                             # requantisation error per layer
    plain = dequantize_model(tuned.merge_and_unload())             # full precision
"""

from .loading import load_quantized, paged_adamw
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

__all__ = [
    "DEFAULT_SKIP",
    "PagedOptimizerWarning",
    "QuantizationError",
    "QuantizedMergeWarning",
    "dequantize",
    "dequantize_model",
    "is_quantized",
    "load_quantized",
    "merge_errors",
    "paged_adamw",
    "quantize",
    "requantize",
    "storage",
    "to_linear4bit",
]
