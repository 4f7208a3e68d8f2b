"""QLoRA's paged optimizers (``sp.load_quantized``, loading a model by name in 4 bits, is
:func:`subpeft.train.models.load_quantized`)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .nf4 import PagedOptimizerWarning, QuantizationError, require_bitsandbytes

__all__ = ["paged_adamw"]

# -- paged optimizers -------------------------------------------------------------------------------
_BNB_ONLY = ("optim_bits", "args", "min_8bit_size", "percentile_clipping", "block_wise")


def _params_on_cuda(params: list) -> bool:
    for item in params:
        tensors = item["params"] if isinstance(item, dict) else [item]
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        if any(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors):
            return True
    return False


def paged_adamw(params: Iterable[nn.Parameter] | Iterable[dict], bits: int = 32, lr: float = 1e-3,
                **kwargs: Any) -> torch.optim.Optimizer:
    """QLoRA's paged AdamW: optimizer state in CUDA unified memory, paged to host RAM under memory
    pressure (``bitsandbytes.optim.PagedAdamW32bit``, or ``PagedAdamW8bit`` with ``bits=8``).

    Paging needs CUDA. Without it (no CUDA, or parameters not on a CUDA device) a
    :class:`PagedOptimizerWarning` says so and the same update runs unpaged: ``torch.optim.AdamW`` for
    ``bits=32``, bitsandbytes' (non-paged) ``AdamW8bit`` for ``bits=8`` (8-bit state; it runs on CPU).
    ``kwargs``: AdamW's (``betas``, ``eps``, ``weight_decay``, ``amsgrad``) and, for bitsandbytes,
    ``min_8bit_size``, ``percentile_clipping``, ``block_wise`` (dropped by the torch fallback).
    """
    if bits not in (8, 32):
        raise QuantizationError(f"paged_adamw: bits must be 8 or 32, got {bits!r}")
    params = list(params)
    if torch.cuda.is_available() and _params_on_cuda(params):  # untested here: no CUDA on the dev machines
        bnb = require_bitsandbytes("a paged optimizer")
        cls = bnb.optim.PagedAdamW8bit if bits == 8 else bnb.optim.PagedAdamW32bit
        return cls(params, lr=lr, **kwargs)
    reason = "CUDA is not available" if not torch.cuda.is_available() else "the parameters are not on a CUDA device"
    if bits == 8:
        bnb = require_bitsandbytes("an 8-bit optimizer")
        warnings.warn(f"paged_adamw(bits=8): paging needs CUDA and {reason}; using bitsandbytes' non-paged "
                      "AdamW8bit (8-bit optimizer state, kept in ordinary memory)", PagedOptimizerWarning, stacklevel=2)
        return bnb.optim.AdamW8bit(params, lr=lr, **kwargs)
    dropped = sorted(k for k in kwargs if k in _BNB_ONLY)
    kwargs = {k: v for k, v in kwargs.items() if k not in _BNB_ONLY}
    extra = f"; bitsandbytes-only options {dropped} ignored" if dropped else ""
    warnings.warn(f"paged_adamw(bits=32): paging needs CUDA and {reason}; using torch.optim.AdamW (32-bit state, "
                  f"not paged){extra}", PagedOptimizerWarning, stacklevel=2)
    return torch.optim.AdamW(params, lr=lr, **kwargs)
