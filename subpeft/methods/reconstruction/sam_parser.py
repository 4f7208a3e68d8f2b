"""SAM-PARSER (singular-value tuning): φ(W) = U·diag(σ')·Vh, only σ' trains, σ' = σ(W) at attach.

W = U·diag(σ)·Vh is the full SVD of the frozen weight's (d_out, d_in) view (conv kernels as
(c_out, c_in·kh·kw)), computed once at attach by :func:`subpeft.core.svd.svd` and kept as float32
buffers ``U``, ``S``, ``Vh`` (saved with the adapter, as METHODS.md asks: note that this makes the
file about as large as the adapted weights). min(d_in, d_out) trainable numbers per layer; mergeable.

The layer adds the *difference* ``U·diag(σ' − σ)·Vh`` to the layer below: φ(W)·x = W·x + that term,
because W = U·diag(σ)·Vh. This is exactly the identity at attach (σ' − σ = 0, no SVD round-off),
composes with adapters stacked below (``base`` may be a chain), and merges as W + ΔW. The merged
weight equals U·diag(σ')·Vh up to the SVD's round-off (≈1e-7 relative).

Cost: ΔW is full rank, so there is no low-rank path. For N tokens, applying it factored,
``((x·Vhᵀ)·(σ' − σ))·Uᵀ``, costs N·m·(d_in + d_out) (m = min(d)), i.e. up to twice a dense GEMM;
materialising ΔW costs m·d_in·d_out once per forward, after which it is folded into the base GEMM
(on a plain nn.Linear / nn.Conv2d: one GEMM with W + ΔW, no second pass over x). Training batches
have N ≫ m, so the layer materialises when N·(d_in + d_out) ≥ d_in·d_out and goes factored
below (generation, one token at a time). Measured (2 threads, forward + backward, 576 → 1536):
2048 tokens 45 ms materialised against 69 ms factored; 64 tokens (576 → 576) 4.5 against 1.4 ms. Conv2d always materialises (its kernel is small against
the positions it slides over); an embedding always goes factored (a lookup of N rows of Vhᵀ).

:class:`SpectrumAdapter` is the mechanism; SVDiff (``U·diag(ReLU(σ + δ))·Vh``) reuses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...core.adapter import Adapter
from ...core.config import AdapterConfig
from ...core.layers import dims, factory, from_2d, weight_2d
from ...core.registry import register
from ...core.svd import svd
from ...mechanisms.fastpath import has_hooks


class SpectrumAdapter(Adapter):
    """φ(W) = U·diag(s)·Vh, W = U·diag(σ)·Vh the frozen full SVD, s = :meth:`spectrum` (trainable).

    Subclasses create their parameters in :meth:`init_spectrum` and define :meth:`spectrum`.
    """

    layer_types = ("linear", "conv1d", "conv2d", "embedding")
    additive = True

    def __init__(self, config: AdapterConfig, base_layer: nn.Module, layer_type: str, **kwargs) -> None:
        super().__init__(config, base_layer, layer_type, **kwargs)
        kw = factory(base_layer)
        U, S, Vh = svd(weight_2d(base_layer, layer_type))
        self.register_buffer("U", U.to(**kw))  # (d_out, m)
        self.register_buffer("S", S.to(**kw))  # (m,)
        self.register_buffer("Vh", Vh.to(**kw))  # (m, d_in)
        self.init_spectrum(self.S)

    def init_spectrum(self, S: torch.Tensor) -> None:
        raise NotImplementedError

    def spectrum(self) -> torch.Tensor:
        """The new singular values s (m,)."""
        raise NotImplementedError

    # -- the two views ---------------------------------------------------------------------------
    def delta_2d(self) -> torch.Tensor:
        """ΔW = U·diag(s − σ)·Vh as a (d_out, d_in) matrix."""
        return (self.U * (self.spectrum() - self.S)) @ self.Vh

    def delta_weight(self) -> torch.Tensor:
        return from_2d(self.base_layer, self.layer_type, self.delta_2d())

    def forward(self, x: torch.Tensor, base) -> torch.Tensor:
        kind, layer = self.layer_type, self.base_layer
        if kind == "embedding":
            h = F.embedding(x, self.Vh.t()) * (self.spectrum() - self.S)
            y = base(x)
            return y + F.linear(h, self.U).to(y.dtype)
        plain = base is layer and not has_hooks(layer)
        if kind == "conv2d":
            delta = self.delta_weight()
            if plain and type(layer) is nn.Conv2d:
                return layer._conv_forward(x, layer.weight + delta.to(layer.weight.dtype), layer.bias)
            y = base(x)
            return y + layer._conv_forward(x.to(delta.dtype), delta, None).to(y.dtype)
        d_out, d_in = self.U.shape[0], self.Vh.shape[1]
        tokens = x.numel() // max(x.shape[-1], 1)
        if tokens * (d_in + d_out) < d_in * d_out:  # few tokens: the factored path is cheaper
            h = F.linear(x.to(self.Vh.dtype), self.Vh) * (self.spectrum() - self.S)
            y = base(x)
            return y + F.linear(h, self.U).to(y.dtype)
        delta = self.delta_2d()
        if plain and type(layer) is nn.Linear:
            return F.linear(x, layer.weight + delta.to(layer.weight.dtype), layer.bias)
        y = base(x)
        return y + F.linear(x.to(delta.dtype), delta).to(y.dtype)

    @classmethod
    def num_params(cls, config: AdapterConfig, base_layer: nn.Module, layer_type: str) -> int:
        return min(dims(base_layer, layer_type))


@dataclass
class SAMParser(AdapterConfig):
    """SAM-PARSER. ``sp.SAMParser(targets=[...])``: trains the singular values of each target."""

    method = "sam_parser"


@register
class SAMParserAdapter(SpectrumAdapter):
    config_cls = SAMParser
    formula = "min(d_in, d_out)"
    trains = "singular values σ'"

    def init_spectrum(self, S: torch.Tensor) -> None:
        self.sigma = nn.Parameter(S.clone())

    def spectrum(self) -> torch.Tensor:
        return self.sigma
