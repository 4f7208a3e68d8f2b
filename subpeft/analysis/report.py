"""Per-layer analysis of one adapter of a :class:`~subpeft.core.model.TunedModel`.

``report(tuned)`` measures, for every adapted matrix W (the frozen base weight in its 2-D
(d_out, d_in) view, see :func:`subpeft.core.layers.weight_2d`) and the adapter's change ΔW:

- ``delta_norm`` ‖ΔW‖_F and ``relative_delta_norm`` ‖ΔW‖_F / ‖W‖_F;
- ``effective_rank`` of ΔW: exp of the entropy of its normalised singular values (Roy & Vetterli);
- ``top``: the ``top`` core directions of W with the highest change rates δ_i (the task-specific
  directions), each with its index in W's descending spectrum, σ_i, σ_i/σ_1 and its quantile
  i/(m − 1) (0: W's largest singular value, 1: its smallest);
- ``overlap``: subspace_similarity of ΔW's top-k left singular subspace with W's top-k
  (k = min(top, numerical rank of ΔW)); ``overlap_random`` = k/d_out is what random subspaces score;
- with ``reference`` (a fully fine-tuned model with the same module names, or a dict of its
  weights): ``distance_to_reference`` ‖W_ref − (W + ΔW)‖_F / ‖W_ref − W‖_F.

ΔW is ``adapter.delta_weight()`` for methods whose merge is W + delta_weight() (no cancellation
error), else ``merged_params()["weight"] − W``, which covers every mergeable method. Singular
values of ΔW below its noise floor (max(d)·ε·σ_1, plus max(d)·ε·σ_1(W) when ΔW is a difference)
are treated as zero. Non-mergeable adapters and norm layers are listed with a note and no numbers.

One SVD of W per matrix, cached per base layer while its weight is unchanged (keyed by the
weight tensor's version counter), and one SVD of ΔW. Quantised bases are dequantised first
(a bitsandbytes 4-bit layer as every method reads it, ``subpeft.core.layers.base_weight``; else a
weight with a ``dequantize()`` method, or a module with one).
"""

from __future__ import annotations

import json
import math
import os
import weakref
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ..core.adapter import Adapter
from ..core.layers import base_weight, is_quantized, weight_2d
from ..core.layers import layer_type as module_layer_type
from ..core.svd import SVD, svd
from .measures import AnalysisError, distance_to_reference, effective_rank, project, subspace_similarity

__all__ = ["AnalysisReport", "Direction", "LayerAnalysis", "analyze_layer", "clear_cache", "report", "weight_svd"]

_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, SVD]] = weakref.WeakKeyDictionary()


@dataclass
class Direction:
    """One core direction of W: its index in W's descending spectrum and how much it changed."""

    index: int
    rate: float  # change rate δ_i
    singular_value: float  # σ_i
    relative_singular_value: float  # σ_i / σ_1
    quantile: float  # i / (m − 1): 0 = W's largest singular value, 1 = its smallest


@dataclass
class LayerAnalysis:
    """What one adapter did to one adapted matrix (None where not measured, with ``note``)."""

    layer: str
    layer_type: str
    shape: tuple[int, int]  # (d_out, d_in) of W's 2-D view
    delta_norm: float | None = None
    relative_delta_norm: float | None = None
    effective_rank: float | None = None
    top: list[Direction] = field(default_factory=list)
    overlap: float | None = None
    overlap_k: int = 0
    overlap_random: float | None = None
    distance_to_reference: float | None = None
    cosine_to_reference: float | None = None  # ⟨ΔW, ΔW_ref⟩ / (‖ΔW‖·‖ΔW_ref‖): same direction as the reference's change?
    norm_ratio_to_reference: float | None = None  # ‖ΔW‖ / ‖ΔW_ref‖: how far it moved, relative to the reference
    note: str = ""
    singular_values: list[float] = field(default_factory=list, repr=False)  # W's, descending
    change_rates: list[float] = field(default_factory=list, repr=False)  # δ_i in W's order

    @property
    def measured(self) -> bool:
        return self.delta_norm is not None


class AnalysisReport(list):
    """A list of :class:`LayerAnalysis` rows (one per adapted layer) with table and JSON output."""

    def __init__(self, rows: list[LayerAnalysis], adapter_name: str = "", method: str = "") -> None:
        super().__init__(rows)
        self.adapter_name = adapter_name
        self.method = method

    def to_dict(self, spectra: bool = True) -> dict[str, Any]:
        """Plain data; ``spectra=False`` leaves out the per-direction singular values and change rates."""
        layers = []
        for row in self:
            d = asdict(row)
            d["shape"] = list(row.shape)
            if not spectra:
                d.pop("singular_values")
                d.pop("change_rates")
            layers.append(d)
        return {"adapter": self.adapter_name, "method": self.method, "summary": self.summary(), "layers": layers}

    def to_json(self, path: str | os.PathLike | None = None, spectra: bool = True) -> str:
        """JSON text of :meth:`to_dict` (NaN written as null); also written to ``path`` if given."""
        text = json.dumps(_finite(self.to_dict(spectra)), indent=2)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        return text

    def summary(self) -> dict[str, Any]:
        """Where the task-specific directions sit, over all measured layers: the quantiles of every
        layer's top directions (mean, median, fraction in the top 10% and bottom 10% of the spectrum)."""
        rows = [r for r in self if r.measured]
        qs = sorted(d.quantile for r in rows for d in r.top)
        out: dict[str, Any] = {"layers": len(self), "measured": len(rows)}
        if qs:
            out.update(
                top_directions=len(qs),
                mean_quantile=sum(qs) / len(qs),
                median_quantile=qs[len(qs) // 2] if len(qs) % 2 else (qs[len(qs) // 2 - 1] + qs[len(qs) // 2]) / 2,
                fraction_in_top_10pct=sum(q <= 0.1 for q in qs) / len(qs),
                fraction_in_bottom_10pct=sum(q >= 0.9 for q in qs) / len(qs),
            )
        for key in ("distance_to_reference", "cosine_to_reference", "norm_ratio_to_reference"):
            values = [getattr(r, key) for r in rows]
            if rows and all(v is not None for v in values):
                out[f"mean_{key}"] = sum(values) / len(values)
        return out

    def to_table(self, directions: int = 3) -> str:
        """A fixed-width text table, one line per layer; the top ``directions`` shown as ``index@quantile``."""
        show_ref = any(r.distance_to_reference is not None for r in self)
        header = ["layer", "shape", "|dW|", "|dW|/|W|", "eff.rank", "top δ dirs (index@quantile)", "overlap (random)"]
        if show_ref:
            header += ["dist. to ref", "cos to ref ΔW", "|dW|/|dW_ref|"]
        lines = [header]
        for r in self:
            if not r.measured:
                lines.append([r.layer, f"{r.shape[0]}x{r.shape[1]}", "-", "-", "-", r.note, "-"] + (["-"] * 3 if show_ref else []))
                continue
            dirs = " ".join(f"{d.index}@{d.quantile:.2f}" for d in r.top[:directions])
            overlap = "-" if r.overlap is None else f"{r.overlap:.3f} ({r.overlap_random:.3f})"
            line = [r.layer, f"{r.shape[0]}x{r.shape[1]}", f"{r.delta_norm:.3g}", f"{r.relative_delta_norm:.3g}",
                    f"{r.effective_rank:.2f}", dirs, overlap]
            if show_ref:
                line += ["-" if v is None else f"{v:.3f}" for v in
                         (r.distance_to_reference, r.cosine_to_reference, r.norm_ratio_to_reference)]
            lines.append(line)
        widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
        return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)

    def __str__(self) -> str:
        return self.to_table()


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# -- weights -----------------------------------------------------------------------------------------
def _dense(weight: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
    """A floating-point copy-free view of the weight, dequantising a quantised one (a 4-bit layer as
    every method reads it, :func:`subpeft.core.layers.base_weight`)."""
    if module is not None and module.weight is weight and is_quantized(module):
        return base_weight(module).detach().float()
    if weight.is_floating_point():
        return weight.detach()
    for owner in (weight, module):
        dq = getattr(owner, "dequantize", None)
        if callable(dq):
            out = dq()
            if isinstance(out, nn.Module):
                out = out.weight
            return out.detach().float()
    raise AnalysisError(f"cannot analyse a {weight.dtype} weight: it is not floating point and has no dequantize()")


def _to_2d(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """A native-layout weight tensor as its (d_out, d_in) matrix (float32, float64 kept)."""
    mat = weight_2d(SimpleNamespace(weight=weight), kind)  # type: ignore[arg-type]
    return mat if mat.dtype in (torch.float32, torch.float64) else mat.float()


def weight_svd(module: nn.Module, kind: str) -> tuple[torch.Tensor, SVD]:
    """(W, its full thin SVD) of a base layer, the SVD cached while the weight is unchanged."""
    w = module.weight
    key = (w._version, w.data_ptr(), tuple(w.shape), w.dtype, w.device)
    W = _to_2d(_dense(w, module), kind)
    hit = _CACHE.get(module)
    if hit is not None and hit[0] == key:
        return W, hit[1]
    factors = svd(W)
    _CACHE[module] = (key, factors)
    return W, factors


def clear_cache() -> None:
    """Forget every cached SVD (they are also dropped with their layer, or when its weight changes)."""
    _CACHE.clear()


def _delta(adapter: Adapter, W: torch.Tensor, kind: str) -> tuple[torch.Tensor | None, bool]:
    """(ΔW as a (d_out, d_in) matrix or None if the weight is unchanged, whether it is a difference)."""
    if type(adapter).merged_params is Adapter.merged_params:
        try:
            return _to_2d(adapter.delta_weight().detach(), kind).to(W.dtype), False
        except NotImplementedError:
            pass
    merged = adapter.merged_params()
    if "weight" not in merged:
        return None, True
    return _to_2d(_dense(merged["weight"]), kind).to(W.dtype) - W, True


# -- reference -------------------------------------------------------------------------------------
def _reference_weight(reference: Any, name: str, kind: str, shape: tuple[int, int]) -> torch.Tensor:
    if isinstance(reference, dict):
        keys = (name, name + ".weight", name + ".base_layer.weight")  # the last: a subpeft-wrapped state_dict
        tensor = next((reference[key] for key in keys if key in reference), None)
        if tensor is None:
            raise AnalysisError(f"the reference has no weight for layer {name!r} (tried keys {list(keys)})")
        mat = _to_2d(_dense(torch.as_tensor(tensor)), kind)
    elif isinstance(reference, nn.Module):
        root = getattr(reference, "model", reference) if type(reference).__name__ == "TunedModel" else reference
        try:
            module = root.get_submodule(name)
        except AttributeError:
            raise AnalysisError(f"the reference model has no module {name!r}") from None
        module = getattr(module, "base_layer", module)
        ref_kind = module_layer_type(module) or kind
        mat = _to_2d(_dense(module.weight, module), ref_kind)
    else:
        raise AnalysisError(f"reference must be a model or a dict of weights (name -> tensor), got {type(reference).__name__}")
    if tuple(mat.shape) != shape:
        raise AnalysisError(f"reference weight of {name!r} has (d_out, d_in) {tuple(mat.shape)}, the model's has {shape}")
    return mat


# -- the report ------------------------------------------------------------------------------------
def _noise_floor(D_S: torch.Tensor, W_S: torch.Tensor, shape: tuple[int, int], difference: bool) -> float:
    eps = torch.finfo(D_S.dtype).eps
    scale = float(D_S[0]) + (float(W_S[0]) if difference else 0.0)
    return max(shape) * eps * scale


def analyze_layer(
    name: str, kind: str, W: torch.Tensor, factors: SVD, D: torch.Tensor, *, difference: bool = False,
    top: int = 8, eps: float = 1e-8, W_ref: torch.Tensor | None = None,
) -> LayerAnalysis:
    """All measures for one matrix W (with its full thin SVD ``factors``) and its change D = ΔW."""
    shape = (int(W.shape[0]), int(W.shape[1]))
    row = LayerAnalysis(name, kind, shape)
    S = factors.S
    row.singular_values = S.tolist()
    delta_norm = float(D.norm())
    w_norm = float(W.norm())
    row.delta_norm = delta_norm
    row.relative_delta_norm = delta_norm / w_norm if w_norm > 0 else math.inf
    # δ_i = |u_iᵀ·ΔW·v_i| / (σ_i + eps), from ΔW directly (change_rates(W, W + ΔW) would round W + ΔW)
    rates = project(W, D, core_only=True, factors=factors).abs() / (S + eps)
    row.change_rates = rates.tolist()
    m = S.numel()
    k = min(top, m)
    order = torch.sort(rates, descending=True, stable=True).indices[:k].tolist()
    s1 = float(S[0]) if m else 0.0
    row.top = [
        Direction(i, float(rates[i]), float(S[i]), float(S[i]) / s1 if s1 > 0 else 0.0, i / (m - 1) if m > 1 else 0.0)
        for i in order
    ]
    if W_ref is not None:
        try:
            row.distance_to_reference = distance_to_reference(W, W + D, W_ref)
        except AnalysisError:
            row.note = "reference equals W here"
        else:
            D_ref = W_ref - W
            ref_norm = float(D_ref.norm())
            row.norm_ratio_to_reference = delta_norm / ref_norm
            if delta_norm > 0:
                row.cosine_to_reference = float((D * D_ref).sum()) / (delta_norm * ref_norm)
    if delta_norm == 0.0:
        row.effective_rank = 0.0
        row.note = row.note or "ΔW = 0"
        return row
    d_factors = svd(D, method="lapack")  # ΔW is usually rank-deficient: the Gram path would be tried and refused
    floor = _noise_floor(d_factors.S, S, shape, difference)
    kept = d_factors.S[d_factors.S > floor]
    row.effective_rank = effective_rank(D, singular_values=kept)
    k_over = min(top, int(kept.numel()))
    if k_over > 0:
        row.overlap_k = k_over
        row.overlap = subspace_similarity(d_factors.U[:, :k_over], factors.U[:, :k_over])
        row.overlap_random = k_over / shape[0]
    return row


def report(
    tuned: nn.Module, adapter_name: str | None = None, reference: Any = None, *, top: int = 8, eps: float = 1e-8,
) -> AnalysisReport:
    """Analyse what adapter ``adapter_name`` (default: the active one) does to every adapted matrix.

    ``reference``: a fully fine-tuned model with the same module names (or a TunedModel around one),
    or a dict mapping layer names (or ``<layer>.weight``, e.g. a ``state_dict()``) to weights in the
    layer's native layout. ``top``: how many task-specific directions to keep per layer (and the
    dimension of the overlap subspaces). Returns an :class:`AnalysisReport` (a list of rows).
    """
    if not hasattr(tuned, "adapters_of") or not hasattr(tuned, "configs"):
        raise AnalysisError(f"report() needs a subpeft TunedModel (sp.attach / sp.load), got {type(tuned).__name__}")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise AnalysisError(f"top must be a positive integer, got {top!r}")
    if adapter_name is None:
        adapter_name = tuned.active_adapter or (next(iter(tuned.configs)) if len(tuned.configs) == 1 else None)
        if adapter_name is None:
            raise AnalysisError(f"several adapters and none active: pass adapter_name, one of {sorted(tuned.configs)}")
    if adapter_name not in tuned.configs:
        raise AnalysisError(f"no adapter named {adapter_name!r}; adapters: {sorted(tuned.configs)}")
    config = tuned.configs[adapter_name]
    rows: list[LayerAnalysis] = []
    layers = dict(tuned.adapted_layers())
    with torch.no_grad():
        for name, adapter in tuned.adapters_of(adapter_name):
            layer = layers[name]
            kind = layer.layer_type
            base = layer.base_layer
            if kind == "norm":
                d = base.weight.shape[0]
                rows.append(LayerAnalysis(name, kind, (d, d), note="norm layer: not a matrix"))
                continue
            if not config.mergeable:
                d_out, d_in = _to_2d(_dense(base.weight, base), kind).shape
                rows.append(LayerAnalysis(name, kind, (d_out, d_in), note=f"{config.method} is not mergeable: no ΔW"))
                continue
            if adapter_name in layer.merged:
                W_new = _to_2d(_dense(base.weight, base), kind)
                W = _to_2d(_dense(adapter.unmerged_params()["weight"]), kind)
                factors = svd(W)
                D, difference = W_new - W, True
            else:
                W, factors = weight_svd(base, kind)
                D, difference = _delta(adapter, W, kind)
                if D is None:
                    rows.append(LayerAnalysis(name, kind, tuple(W.shape), note=f"{config.method} changes no weight here"))
                    continue
            W_ref = None if reference is None else _reference_weight(reference, name, kind, tuple(W.shape))
            rows.append(analyze_layer(name, kind, W, factors, D, difference=difference, top=top, eps=eps, W_ref=W_ref))
    return AnalysisReport(rows, adapter_name, config.method)
