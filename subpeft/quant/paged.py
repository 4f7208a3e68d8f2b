"""Loading a model with its linear layers in 4 bits, and QLoRA's paged optimizers."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .nf4 import PagedOptimizerWarning, QuantizationError, _check_options, quantize, require_bitsandbytes

__all__ = ["load_quantized", "paged_adamw"]

TASKS = ("causal-lm", "sequence-classification", "base")
_AUTO = {"causal-lm": "AutoModelForCausalLM", "sequence-classification": "AutoModelForSequenceClassification",
         "base": "AutoModel"}


def _task_of(path: str, task: str | None) -> str:
    if task is not None:
        task = task.replace("_", "-")
        if task == "classification":
            task = "sequence-classification"
        if task not in TASKS:
            raise QuantizationError(f"task must be one of {TASKS} (or None to read it from config.json), got {task!r}")
        return task
    from transformers import AutoConfig

    archs = getattr(AutoConfig.from_pretrained(path, local_files_only=True), "architectures", None) or []
    if any(a.endswith("ForCausalLM") for a in archs):
        return "causal-lm"
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "sequence-classification"
    return "base"


def load_quantized(
    path_or_name: str | os.PathLike, bits: int = 4, *, double_quant: bool = True,
    compute_dtype: torch.dtype | None = torch.float32, quant_type: str = "nf4", blocksize: int = 64,
    task: str | None = None, num_labels: int | None = None, skip: Sequence[str] | None = None,
    with_tokenizer: bool = False, **from_pretrained: Any,
) -> Any:
    """Load a Hugging Face model and store its linear layers in 4 bits (see :func:`quantize`).

    ``path_or_name``: a local Hugging Face model folder, or ``"minilm"`` (the bundled
    all-MiniLM-L6-v2 with a fresh ``num_labels``-way classifier, default 3) or ``"smollm2"``
    (SmolLM2-135M-Instruct, a causal LM) from :mod:`subpeft.train.models`. ``task`` picks the
    model class for a folder: ``"causal-lm"``, ``"sequence-classification"`` (with ``num_labels``) or
    ``"base"``; None reads it from the folder's ``config.json``. Heads (``lm_head``, ``classifier``,
    ``score``) stay in full precision. The weights are loaded in full precision, then quantised
    layer by layer. Returns the model, or ``(model, tokenizer)`` with ``with_tokenizer=True``.
    """
    _check_options(bits, quant_type, blocksize, compute_dtype)
    require_bitsandbytes()
    name = os.fspath(path_or_name)
    if name == "minilm":
        from ..train.models import load_minilm_classifier

        model, tokenizer = load_minilm_classifier(num_labels or 3)
    elif name == "smollm2":
        from ..train.models import load_smollm2

        model, tokenizer = load_smollm2()
    else:
        if not os.path.isdir(name):
            raise QuantizationError(
                f"load_quantized: {name!r} is neither a local model folder nor one of 'minilm', 'smollm2' "
                "(no model hub is reached)"
            )
        import transformers

        from ..train.models import quiet_transformers

        kind = _task_of(name, task)
        kwargs = dict(from_pretrained)
        if kind == "sequence-classification" and num_labels is not None:
            kwargs["num_labels"] = num_labels
        with quiet_transformers():
            model = getattr(transformers, _AUTO[kind]).from_pretrained(name, local_files_only=True, **kwargs)
            tokenizer = (transformers.AutoTokenizer.from_pretrained(name, local_files_only=True)
                         if with_tokenizer else None)
    quantize(model, bits, double_quant=double_quant, compute_dtype=compute_dtype, quant_type=quant_type,
             blocksize=blocksize, skip=skip)
    return (model, tokenizer) if with_tokenizer else model


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
