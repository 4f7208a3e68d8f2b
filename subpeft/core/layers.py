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

W's values, shape and dtype are read through the weight-access protocol (:mod:`.weights`), never
from ``module.weight`` directly: a 4-bit layer (``bitsandbytes.nn.Linear4bit``, registered by
:mod:`subpeft.quant`) is of type ``linear`` but stores packed codes, and other storage (sharded
weights) may follow. :func:`base_weight` (native layout) and :func:`weight_2d` give the dense values,
:func:`dims` / :func:`weight_shape` the logical shape, :func:`factory` the dtype for new tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from .weights import is_packed, weight_access

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


def is_quantized(module: nn.Module) -> bool:
    """Whether the layer stores its weight packed (a 4-bit layer), see :func:`.weights.is_packed`."""
    return is_packed(module)


def base_weight(module: nn.Module) -> torch.Tensor:
    """W in the layer's native layout, as floating point: the weight itself, or for a 4-bit layer a
    dequantised copy (in the dtype it was quantised from). ``weight_access(module).read()``."""
    return weight_access(module).read()


def weight_shape(module: nn.Module) -> torch.Size:
    """Shape of the layer's native weight (the logical one for a 4-bit layer, not its packed storage)."""
    return weight_access(module).shape


def dims(module: nn.Module, kind: str) -> tuple[int, int]:
    """(d_out, d_in) of the layer's 2-D weight view."""
    shape = weight_access(module).shape
    if kind == "linear":
        return shape[0], shape[1]
    if kind in ("conv1d", "embedding"):
        return shape[1], shape[0]
    if kind == "conv2d":
        return shape[0], shape[1:].numel()
    if kind == "norm":
        return shape[0], shape[0]
    raise ValueError(f"unknown layer type {kind!r}")


def weight_2d(module: nn.Module, kind: str) -> torch.Tensor:
    """The weight as a (d_out, d_in) matrix (a view where the layout allows; dequantised for a 4-bit
    layer, see :func:`base_weight`)."""
    return to_2d(module, kind, weight_access(module).read())


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
        return mat.reshape(weight_access(module).shape)
    raise ValueError(f"unknown layer type {kind!r}")


def factory(module: nn.Module) -> dict:
    """device/dtype for new adapter tensors of this layer.

    The base weight's device; the dtype of its dense values when that is float32 or float64, else
    float32 (half precision, integers), as Hugging Face PEFT does: small trainable tensors keep full
    precision, the forward casts at the boundary. A 4-bit layer's adapters are float32 (float64 when
    it was quantised from float64).
    """
    access = weight_access(module)
    dtype = access.dtype if access.dtype in (torch.float32, torch.float64) else torch.float32
    return {"device": access.device, "dtype": dtype}
