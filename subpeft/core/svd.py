"""One SVD service for every method that needs the singular subspaces of a frozen weight.

- Always computed in float32 (or float64 for a float64 weight), on the weight's device, under
  ``no_grad``; results are returned in that precision for the caller to store as buffers.
- Canonical signs: each left singular vector ``u_i`` is flipped so that its largest-magnitude
  entry is positive, and ``v_i`` with it (the pair's product is unchanged). A recomputation on
  other hardware or with another algorithm then gives the same factors up to round-off (for
  distinct singular values).
- ``rank=k`` asks for the top-k triplets only. When k is small against the matrix, a randomised
  SVD (``torch.svd_lowrank`` with oversampling and power iterations) is tried first and *checked*:
  every returned triplet must satisfy ``‖W·v_i − σ_i·u_i‖ ≤ tol·σ_1`` and
  ``‖Wᵀ·u_i − σ_i·v_i‖ ≤ tol·σ_1``. If the check fails (flat spectra, where randomised methods mix directions), the exact SVD
  runs instead. So the result is accurate either way, and fast where the spectrum allows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# randomised SVD is tried only when the rank asked for is at most this fraction of min(d_out, d_in)
RANDOMISED_MAX_FRACTION = 0.25
DEFAULT_TOL = 1e-4


class SVD(NamedTuple):
    U: torch.Tensor  # (d_out, k)
    S: torch.Tensor  # (k,) descending
    Vh: torch.Tensor  # (k, d_in)


def canonical_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip (u_i, v_i) pairs so that the largest-magnitude entry of each u_i is positive."""
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U.gather(0, idx.unsqueeze(0)).squeeze(0))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, Vh * signs.unsqueeze(1)


def _precision(w: torch.Tensor) -> torch.dtype:
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def _exact(w: torch.Tensor, k: int) -> SVD:
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    return SVD(U[:, :k], S[:k], Vh[:k])


def _randomised(w: torch.Tensor, k: int, tol: float, seed: int) -> SVD | None:
    m = min(w.shape)
    q = min(m, k + max(10, k // 2))
    devices = [w.device] if w.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(w, q=q, niter=6)
    U, S, Vh = U[:, :k], S[:k], V[:, :k].t()
    scale = S[0].clamp_min(torch.finfo(S.dtype).tiny)
    res_v = (w @ Vh.t() - U * S).norm(dim=0).max()
    res_u = (w.t() @ U - Vh.t() * S).norm(dim=0).max()
    if max(float(res_v), float(res_u)) > tol * float(scale):
        return None
    return SVD(U, S, Vh)


def svd(weight_2d: torch.Tensor, rank: int | None = None, *, tol: float = DEFAULT_TOL, seed: int = 0) -> SVD:
    """SVD of a (d_out, d_in) matrix: ``W ≈ U·diag(S)·Vh``, top ``rank`` triplets (all if None).

    Factors are float32 (float64 for a float64 input) with canonical signs.
    """
    if weight_2d.dim() != 2:
        raise ValueError(f"svd expects a 2-D (d_out, d_in) matrix, got shape {tuple(weight_2d.shape)}")
    with torch.no_grad():
        w = weight_2d.detach().to(_precision(weight_2d))
        m = min(w.shape)
        k = m if rank is None else max(1, min(int(rank), m))
        out = None
        if k <= RANDOMISED_MAX_FRACTION * m and m >= 64:
            out = _randomised(w, k, tol, seed)
        if out is None:
            out = _exact(w, k)
        U, Vh = canonical_signs(out.U, out.Vh)
        return SVD(U.contiguous(), out.S.contiguous(), Vh.contiguous())
