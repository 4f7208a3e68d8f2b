"""What subpeft knows about base layer types: their kind, their (d_out, d_in) view, their factories.

Every supported layer is a linear map with a weight W that has a 2-D view of shape (d_out, d_in)
in PyTorch ``nn.Linear`` layout:

- ``linear``    nn.Linear, weight (d_out, d_in)
- ``conv1d``    transformers' Conv1D (GPT-2 style), weight stored transposed, (d_in, d_out)
- ``embedding`` nn.Embedding, weight (num_embeddings, dim): a lookup is one-hot · E, so W = Eᵀ
- ``conv2d``    nn.Conv2d, weight (c_out, c_in, kh, kw): W = weight reshaped to (c_out, c_in·kh·kw)

and one that is not a linear map but has trainable per-feature tensors:

- ``norm``      nn.LayerNorm, nn.RMSNorm and the norms of Hugging Face models (classes named
                ``*LayerNorm`` / ``*RMSNorm``), with an elementwise 1-D ``weight``;
                (d_out, d_in) = (d, d) by convention. Only LayerNorm tuning and BitFit adapt them.

A 4-bit layer (``bitsandbytes.nn.Linear4bit``, see :mod:`subpeft.quant`) is of type ``linear``: its
``weight`` is packed uint8 (two 4-bit codes a byte) with a ``quant_state`` holding the shape, the
block constants and the dtype it was quantised from. Methods never read ``module.weight`` for W's
values: :func:`base_weight` (native layout) and :func:`weight_2d` dequantise such a layer, and
:func:`dims` / :func:`weight_shape` read its logical shape.
"""

from __future__ import annotations

import torch
from torch import nn

LAYER_TYPES = ("linear", "conv1d", "embedding", "conv2d", "norm")


def is_hf_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def layer_type(module: nn.Module) -> str | None:
    """The subpeft layer type of a module, or None if it is not a supported weight layer."""
    if isinstance(module, nn.Linear):
        return "linear"
    if is_hf_conv1d(module):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if is_norm(module):
        return "norm"
    return None


def is_norm(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    if not (isinstance(w, torch.Tensor) and w.dim() == 1):
        return False
    name = type(module).__name__
    return isinstance(module, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))) or name.endswith(("LayerNorm", "RMSNorm"))


def quant_state(module: nn.Module):
    """The bitsandbytes ``QuantState`` of a 4-bit layer's weight, or None for any other layer."""
    w = getattr(module, "weight", None)
    # Params4bit keeps it in the instance __dict__: a dict lookup, cheap on the full-precision path
    return getattr(w, "__dict__", {}).get("quant_state")


def is_quantized(module: nn.Module) -> bool:
    """Whether the layer stores its weight in 4 bits (bitsandbytes ``Params4bit`` with a quant state)."""
    return quant_state(module) is not None


def base_weight(module: nn.Module) -> torch.Tensor:
    """W in the layer's native layout, as floating point: the weight itself, or for a 4-bit layer a
    dequantised copy (in the dtype it was quantised from). The one way methods read W's values."""
    w = module.weight
    if getattr(w, "__dict__", {}).get("quant_state") is None:
        return w
    from ..quant.nf4 import dequantize

    return dequantize(module)


def weight_shape(module: nn.Module) -> torch.Size:
    """Shape of the layer's native weight (the logical one for a 4-bit layer, not its packed storage)."""
    qs = quant_state(module)
    return torch.Size(qs.shape) if qs is not None else module.weight.shape


def dims(module: nn.Module, kind: str) -> tuple[int, int]:
    """(d_out, d_in) of the layer's 2-D weight view."""
    w = module.weight
    if kind == "linear":
        qs = getattr(w, "__dict__", {}).get("quant_state")
        shape = qs.shape if qs is not None else w.shape
        return shape[0], shape[1]
    if kind == "conv1d":
        return w.shape[1], w.shape[0]
    if kind == "embedding":
        return w.shape[1], w.shape[0]
    if kind == "conv2d":
        return w.shape[0], w[0].numel()
    if kind == "norm":
        return w.shape[0], w.shape[0]
    raise ValueError(f"unknown layer type {kind!r}")


def weight_2d(module: nn.Module, kind: str) -> torch.Tensor:
    """The weight as a (d_out, d_in) matrix (a view where the layout allows; dequantised for a 4-bit
    layer, see :func:`base_weight`)."""
    w = base_weight(module) if kind == "linear" else module.weight
    if kind == "linear":
        return w
    if kind in ("conv1d", "embedding"):
        return w.t()
    if kind == "conv2d":
        return w.reshape(w.shape[0], -1)
    raise ValueError(f"unknown layer type {kind!r}")


def to_2d(module: nn.Module, kind: str, w: torch.Tensor) -> torch.Tensor:
    """A weight ``w`` in the layer's native layout as a (d_out, d_in) matrix (:func:`weight_2d` of a
    given tensor, e.g. the weight as the adapters below another one leave it)."""
    if kind == "linear":
        return w
    if kind in ("conv1d", "embedding"):
        return w.t()
    if kind == "conv2d":
        return w.reshape(w.shape[0], -1)
    raise ValueError(f"unknown layer type {kind!r}")


def from_2d(module: nn.Module, kind: str, mat: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`weight_2d`: a (d_out, d_in) matrix in the layer's native weight layout."""
    if kind == "linear":
        return mat
    if kind in ("conv1d", "embedding"):
        return mat.t()
    if kind == "conv2d":
        return mat.reshape(module.weight.shape)
    raise ValueError(f"unknown layer type {kind!r}")


def factory(module: nn.Module) -> dict:
    """device/dtype for new adapter tensors of this layer.

    The base weight's device; float32 when the base is half precision (float16/bfloat16) or not
    floating point (quantised), as Hugging Face PEFT does: small trainable tensors keep full
    precision, the forward casts at the boundary. A 4-bit layer's adapters are float32 (its dequantised
    dtype when that is float64).
    """
    w = module.weight
    qs = getattr(w, "__dict__", {}).get("quant_state")
    if qs is not None:
        return {"device": w.device, "dtype": torch.float64 if qs.dtype == torch.float64 else torch.float32}
    dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
    return {"device": w.device, "dtype": dtype}
