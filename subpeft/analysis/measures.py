"""Subspace measures of what a fine-tune did to a weight (METHODS.md, "Analysis quantities").

Every function takes weights in PyTorch layout: W is a (d_out, d_in) matrix with the thin SVD
``W = U·diag(σ)·Vᵀ`` (σ descending, m = min(d_out, d_in) "core directions" (u_i, v_i)), computed by
the one SVD service :func:`subpeft.core.svd.svd` (float32, float64 for float64 input; canonical
signs). Functions that need the SVD of W accept it precomputed (``factors=``) so that a caller
analysing one matrix several ways pays for one SVD.

Bad input raises :class:`AnalysisError` (a :class:`~subpeft.core.errors.SubpeftError`, hence a
ValueError): wrong dimensions, mismatched shapes, a zero denominator.
"""

from __future__ import annotations

import math

import torch

from ..core.errors import SubpeftError
from ..core.svd import SVD, svd

__all__ = [
    "AnalysisError",
    "change_rates",
    "distance_to_reference",
    "effective_rank",
    "optimal_scale",
    "principal_angles",
    "project",
    "subspace_similarity",
    "task_specific_directions",
]


class AnalysisError(SubpeftError):
    """Input an analysis function cannot measure (shapes, zero denominators)."""


def _matrix(name: str, t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise AnalysisError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise AnalysisError(f"{name} must be a 2-D (d_out, d_in) matrix, got shape {tuple(t.shape)}")
    t = t.detach()
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _same_shape(**mats: torch.Tensor) -> list[torch.Tensor]:
    out = [_matrix(n, m) for n, m in mats.items()]
    shapes = {n: tuple(m.shape) for n, m in zip(mats, out, strict=True)}
    if len(set(shapes.values())) > 1:
        raise AnalysisError(f"matrices must have the same (d_out, d_in) shape, got {shapes}")
    dtype = torch.float64 if any(m.dtype == torch.float64 for m in out) else torch.float32
    return [m.to(dtype) for m in out]


def _factors(W: torch.Tensor, factors: SVD | None) -> SVD:
    if factors is None:
        return svd(W)
    m = min(W.shape)
    if factors.U.shape != (W.shape[0], m) or factors.Vh.shape != (m, W.shape[1]):
        raise AnalysisError(
            f"factors do not belong to a {tuple(W.shape)} matrix: need the full thin SVD, U {tuple(factors.U.shape)}, "
            f"Vh {tuple(factors.Vh.shape)}"
        )
    return factors


def change_rates(
    W: torch.Tensor, W_new: torch.Tensor, eps: float = 1e-8, *, factors: SVD | None = None
) -> torch.Tensor:
    """δ_i = |u_iᵀ·(W_new − W)·v_i| / (σ_i + eps) for every core direction i of W.

    Returns a (min(d_out, d_in),) tensor in W's singular-value order (index 0: the largest σ).
    A direction with σ_i = 0 (rank-deficient W) divides by eps alone. ``factors``: W's full thin
    SVD if already computed.
    """
    W, W_new = _same_shape(W=W, W_new=W_new)
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise AnalysisError(f"eps must be a number >= 0, got {eps!r}")
    U, S, Vh = _factors(W, factors)
    D = (W_new - W).to(U.dtype)
    coord = ((D @ Vh.t()) * U).sum(dim=0)  # u_iᵀ·D·v_i for all i at once
    denom = S + eps
    if bool((denom == 0).any()):
        raise AnalysisError("W has a zero singular value and eps = 0: its change rate divides by zero; use eps > 0")
    return coord.abs() / denom


def task_specific_directions(
    W: torch.Tensor, W_new: torch.Tensor, k: int, eps: float = 1e-8, *, factors: SVD | None = None
) -> torch.Tensor:
    """Indices (into W's descending spectrum) of the k core directions with the highest change
    rates, highest first (ties: the lower index first)."""
    rates = change_rates(W, W_new, eps, factors=factors)
    m = rates.numel()
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= m:
        raise AnalysisError(f"k must be an integer in [1, {m}] (W has {m} core directions), got {k!r}")
    order = torch.sort(rates, descending=True, stable=True).indices
    return order[:k]


def project(W: torch.Tensor, A: torch.Tensor, core_only: bool = False, *, factors: SVD | None = None) -> torch.Tensor:
    """Coordinates of A in W's global basis: Π_W(A)_ij = u_iᵀ·A·v_j, an (m, m) matrix with
    m = min(d_out, d_in) (the thin basis: when d_out ≠ d_in, the part of A outside span(U) or
    span(V) has no coordinate here). ``core_only=True``: only the core coordinates, its diagonal (m,)."""
    W, A = _same_shape(W=W, A=A)
    U, _, Vh = _factors(W, factors)
    A = A.to(U.dtype)
    if core_only:
        return ((A @ Vh.t()) * U).sum(dim=0)
    return U.t() @ A @ Vh.t()


def _orthonormal(name: str, B: torch.Tensor) -> torch.Tensor:
    if not isinstance(B, torch.Tensor):
        raise AnalysisError(f"{name} must be a torch.Tensor, got {type(B).__name__}")
    B = B.detach()
    if B.dim() == 1:
        B = B.unsqueeze(1)
    if B.dim() != 2 or B.shape[1] == 0 or B.shape[1] > B.shape[0]:
        raise AnalysisError(f"{name} must be a (d, k) basis with 1 <= k <= d, got shape {tuple(B.shape)}")
    B = B.to(torch.float64)
    Q, R = torch.linalg.qr(B, mode="reduced")
    diag = R.diagonal().abs()
    scale = B.norm(dim=0).max()
    if scale == 0 or bool((diag <= 1e-10 * scale).any()):
        raise AnalysisError(f"{name}'s columns are linearly dependent (or zero): not a basis of a {B.shape[1]}-dim subspace")
    return Q


def _bases(U1: torch.Tensor, U2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    Q1, Q2 = _orthonormal("U1", U1), _orthonormal("U2", U2)
    if Q1.shape[0] != Q2.shape[0]:
        raise AnalysisError(f"U1 and U2 must live in the same space: U1 has {Q1.shape[0]} rows, U2 {Q2.shape[0]}")
    return Q1, Q2


def principal_angles(U1: torch.Tensor, U2: torch.Tensor) -> torch.Tensor:
    """The min(k1, k2) principal angles (radians, ascending) between span(U1) and span(U2).

    U1 (d, k1) and U2 (d, k2) are any bases (orthonormalised here; a 1-D tensor is one vector).
    """
    Q1, Q2 = _bases(U1, U2)
    cosines = svd(Q1.t() @ Q2, method="lapack").S.clamp(0.0, 1.0)
    return torch.arccos(cosines)  # cosines descend, so the angles ascend


def subspace_similarity(U1: torch.Tensor, U2: torch.Tensor) -> float:
    """Σ_i cos²θ_i / k = ‖Q1ᵀ·Q2‖²_F / k with k = min(k1, k2), in [0, 1].

    Q1, Q2: orthonormal bases of span(U1), span(U2) (the inputs need not be orthonormal); θ_i
    their principal angles. 1 when the smaller subspace lies in the larger, 0 when they are
    orthogonal; two random k-dim subspaces of ℝ^d score about max(k1, k2)/d.
    """
    Q1, Q2 = _bases(U1, U2)
    k = min(Q1.shape[1], Q2.shape[1])
    value = float((Q1.t() @ Q2).pow(2).sum()) / k
    return min(1.0, max(0.0, value))


def optimal_scale(W: torch.Tensor, delta: torch.Tensor, W_target: torch.Tensor) -> float:
    """s* = ⟨W_target − W, ΔW⟩_F / ‖ΔW‖²_F: the scale of ΔW that brings W + s·ΔW closest (in
    Frobenius norm) to W_target."""
    W, delta, W_target = _same_shape(W=W, delta=delta, W_target=W_target)
    denom = float(delta.pow(2).sum())
    if denom == 0.0:
        raise AnalysisError("optimal_scale: ΔW is zero, every scale gives the same weight (‖ΔW‖_F = 0)")
    return float(((W_target - W) * delta).sum()) / denom


def distance_to_reference(W: torch.Tensor, W_tuned: torch.Tensor, W_ref: torch.Tensor) -> float:
    """‖W_ref − W_tuned‖_F / ‖W_ref − W‖_F: 0 when the method reached the reference (e.g. full
    fine-tuning) exactly, 1 when it is as far from it as the untouched weight."""
    W, W_tuned, W_ref = _same_shape(W=W, W_tuned=W_tuned, W_ref=W_ref)
    denom = float((W_ref - W).norm())
    if denom == 0.0:
        raise AnalysisError("distance_to_reference: the reference equals W (‖W_ref − W‖_F = 0), the ratio is undefined")
    return float((W_ref - W_tuned).norm()) / denom


def effective_rank(M: torch.Tensor, *, singular_values: torch.Tensor | None = None) -> float:
    """Effective rank (Roy & Vetterli, 2007): exp of the Shannon entropy of the normalised singular
    values p_i = σ_i / Σσ. Between 1 (one direction) and the rank; r equal singular values give r.
    0.0 for a zero matrix."""
    if singular_values is None:
        singular_values = svd(_matrix("M", M)).S
    s = singular_values.to(torch.float64).clamp_min(0)
    total = float(s.sum())
    if total == 0.0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))
