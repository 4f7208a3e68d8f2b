"""SVDiff (Han et al., 2023): φ(W) = U·diag(ReLU(σ + δ))·Vh, only the spectral shift δ trains, δ = 0.

W = U·diag(σ)·Vh is the full SVD of the frozen weight's (d_out, d_in) view: conv kernels are
reshaped to (c_out, c_in·kh·kw) as in the paper (nn.Conv2d, any groups: the reshaped kernel's
spectrum is shifted), transformers Conv1D and nn.Embedding (W = Eᵀ) through their 2-D views. The
ReLU keeps every singular value non-negative: a shift that would make σ_i + δ_i negative gives 0.
min(d_in, d_out) trainable numbers per layer; mergeable. At attach ReLU(σ + 0) − σ = 0 exactly.

The layer is SAM-PARSER's mechanism (:class:`~subpeft.methods.reconstruction.sam_parser.SpectrumAdapter`)
with new singular values ReLU(σ + δ): it adds U·diag(ReLU(σ + δ) − σ)·Vh to the layer below,
materialised or factored by cost (see that module), and stores U, σ, Vh as float32 buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...core.config import AdapterConfig
from ...core.registry import register
from ..reconstruction.sam_parser import SpectrumAdapter


@dataclass
class SVDiff(AdapterConfig):
    """SVDiff. ``sp.SVDiff(targets=[...])``: trains a shift of each target's singular values."""

    method = "svdiff"


@register
class SVDiffAdapter(SpectrumAdapter):
    config_cls = SVDiff
    formula = "min(d_in, d_out)"
    trains = "spectral shifts δ"

    def init_spectrum(self, S: torch.Tensor) -> None:
        self.delta = nn.Parameter(torch.zeros_like(S))

    def spectrum(self) -> torch.Tensor:
        return torch.relu(self.S + self.delta)
