"""Spectral Adapter (Zhang & Pilanci, 2024): fine-tune the top-r singular vectors of W.

With W = U·diag(σ)·Vh (PyTorch layout: the input-side vectors V_r are the rows ``Vh[:r]``, the
output-side U_r the columns ``U[:, :r]``), computed at attach (top-r only) by
:func:`subpeft.core.svd.svd` and kept as float32 buffers ``U_r`` (d_out, r), ``S_r`` (r,),
``Vh_r`` (r, d_in):

- ``mode="additive"``: φ(W) = [U_r + A_U, U_⊥]·diag(σ)·[V_r + A_V, V_⊥]ᵀ, i.e.
  ΔW = A_U·Σ_r·V_rᵀ + U_r·Σ_r·A_Vᵀ + A_U·Σ_r·A_Vᵀ, A_U (d_out, r) and A_V (d_in, r) trainable, both 0
  at attach; r·(d_in + d_out) trainable numbers. Gradients are non-zero at that init through the
  cross terms (∂/∂A_U = g·(x·V_r·Σ_r), ∂/∂A_V through U_r·Σ_r).
- ``mode="rotational"``: φ(W) = [U_r·R_U, U_⊥]·diag(σ)·[V_r·R_V, V_⊥]ᵀ, i.e.
  ΔW = U_r·(R_U·Σ_r·R_Vᵀ − Σ_r)·V_rᵀ with Cayley rotations R = (I + Q)(I − Q)⁻¹ of skew-symmetric
  Q built from r(r−1)/2 trainable numbers each (``q_U``, ``q_V``, 0 at attach so R = I);
  2·r(r−1)/2 trainable numbers. φ(W) keeps W's singular values.

Both are low-rank: the forward adds ΔW·x through rank-r (additive: 2r) products, never a full
weight. Mergeable. Where r exceeds min(d_out, d_in) of a layer it is clamped to that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...core.adapter import Adapter
from ...core.config import AdapterConfig
from ...core.errors import ConfigError
from ...core.layers import dims, factory, from_2d, weight_2d
from ...core.registry import register
from ...core.svd import svd

MODES = ("additive", "rotational")


@dataclass
class SpectralAdapter(AdapterConfig):
    """Spectral Adapter. ``sp.SpectralAdapter(r=8, mode="additive" | "rotational", targets=[...])``."""

    method = "spectral"

    r: int = 8
    mode: str = "additive"

    def validate(self) -> None:
        self._check_positive_int("r")
        if self.mode not in MODES:
            raise ConfigError(f"SpectralAdapter.mode must be 'additive' or 'rotational', got {self.mode!r}")


def cayley(q: torch.Tensor, r: int) -> torch.Tensor:
    """R = (I + Q)(I − Q)⁻¹ for the skew-symmetric Q whose strict upper triangle is q (orthogonal)."""
    rows, cols = torch.triu_indices(r, r, 1, device=q.device)
    upper = torch.zeros(r, r, dtype=q.dtype, device=q.device).index_put((rows, cols), q)
    Q = upper - upper.t()
    eye = torch.eye(r, dtype=q.dtype, device=q.device)
    return torch.linalg.solve(eye - Q, eye + Q)  # (I − Q)⁻¹ and (I + Q) commute


def _rank(config: SpectralAdapter, base_layer: nn.Module, layer_type: str) -> int:
    return min(config.r, *dims(base_layer, layer_type))


@register
class SpectralLayer(Adapter):
    config_cls = SpectralAdapter
    additive = True
    formula = "r·(d_in + d_out) additive; 2·r(r−1)/2 rotational"
    trains = "top-r singular vectors (additive shifts or Cayley rotations)"
    layer_types = ("linear", "conv1d")

    def __init__(self, config: SpectralAdapter, base_layer: nn.Module, layer_type: str, **kwargs) -> None:
        super().__init__(config, base_layer, layer_type, **kwargs)
        kw = factory(base_layer)
        d_out, d_in = dims(base_layer, layer_type)
        self.r = r = _rank(config, base_layer, layer_type)
        self.additive = config.mode == "additive"
        U, S, Vh = svd(weight_2d(base_layer, layer_type), rank=r)
        self.register_buffer("U_r", U.to(**kw))
        self.register_buffer("S_r", S.to(**kw))
        self.register_buffer("Vh_r", Vh.to(**kw))
        if self.additive:
            self.A_U = nn.Parameter(torch.zeros(d_out, r, **kw))
            self.A_V = nn.Parameter(torch.zeros(d_in, r, **kw))
        else:
            self.q_U = nn.Parameter(torch.zeros(r * (r - 1) // 2, **kw))
            self.q_V = nn.Parameter(torch.zeros(r * (r - 1) // 2, **kw))

    def core(self) -> torch.Tensor:
        """Rotational: the (r, r) matrix R_U·Σ_r·R_Vᵀ − Σ_r, so that ΔW = U_r·core·V_rᵀ."""
        R_U, R_V = cayley(self.q_U, self.r), cayley(self.q_V, self.r)
        return (R_U * self.S_r) @ R_V.t() - torch.diag(self.S_r)

    def delta_2d(self) -> torch.Tensor:
        """ΔW as a (d_out, d_in) matrix."""
        if self.additive:
            return (self.A_U * self.S_r) @ (self.Vh_r + self.A_V.t()) + (self.U_r * self.S_r) @ self.A_V.t()
        return self.U_r @ self.core() @ self.Vh_r

    def delta_weight(self) -> torch.Tensor:
        return from_2d(self.base_layer, self.layer_type, self.delta_2d())

    def forward(self, x: torch.Tensor, base) -> torch.Tensor:
        y = base(x)
        h = x.to(self.Vh_r.dtype)
        if self.additive:
            # [p, q] = x·[V_r, A_V]; ΔW·x = A_U·Σ(p + q) + U_r·Σ·q, one GEMM in and one out
            pq = F.linear(h, torch.cat([self.Vh_r, self.A_V.t()]))
            p, q = pq[..., : self.r], pq[..., self.r :]
            hidden = torch.cat([(p + q) * self.S_r, q * self.S_r], dim=-1)
            delta = F.linear(hidden, torch.cat([self.A_U, self.U_r], dim=1))
        else:
            delta = F.linear(F.linear(F.linear(h, self.Vh_r), self.core()), self.U_r)
        return y + delta.to(y.dtype)

    @classmethod
    def num_params(cls, config: SpectralAdapter, base_layer: nn.Module, layer_type: str) -> int:
        r = _rank(config, base_layer, layer_type)
        d_out, d_in = dims(base_layer, layer_type)
        return r * (d_in + d_out) if config.mode == "additive" else r * (r - 1)
