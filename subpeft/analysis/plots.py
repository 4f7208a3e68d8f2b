"""PNG plots of an :class:`~subpeft.analysis.report.AnalysisReport` (matplotlib, imported lazily).

- ``layers/<layer>.png``: W's singular spectrum with the task-specific directions marked, and the
  change-rate profile δ_i over W's spectrum (both against the index i, 0 = largest σ);
- ``overview.png``: per layer, where its top change-rate directions sit in W's spectrum (quantile,
  0 = largest σ, 1 = smallest) and ‖ΔW‖_F / ‖W‖_F;
- ``distance.png`` (when the report has a reference, or several reports are given to
  :func:`plot_distances`): distance to the reference per layer, one line per method.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from .report import AnalysisReport, LayerAnalysis

__all__ = ["PlotsUnavailableError", "plot_distances", "plot_layer", "plot_report"]

PIP_COMMAND = "pip install matplotlib"


class PlotsUnavailableError(ImportError):
    """matplotlib is not installed."""


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotsUnavailableError(f"the analysis plots need matplotlib, which is not installed: {PIP_COMMAND}") from exc
    return plt


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "layer"


def plot_layer(row: LayerAnalysis, path: str | os.PathLike) -> str:
    """One layer: W's spectrum with its task-specific directions marked, and the change-rate profile."""
    plt = _pyplot()
    fig, (ax_s, ax_r) = plt.subplots(1, 2, figsize=(11, 3.8))
    idx = list(range(len(row.singular_values)))
    top = [d.index for d in row.top]
    ax_s.semilogy(idx, [max(s, 1e-30) for s in row.singular_values], color="0.35", lw=1.2, label="σ_i of W")
    if top:
        ax_s.scatter(top, [max(row.singular_values[i], 1e-30) for i in top], color="crimson", zorder=3, s=22,
                     label=f"top-{len(top)} change rate")
    ax_s.set(xlabel="index i in W's spectrum (0 = largest)", ylabel="singular value", title=f"{row.layer}: spectrum of W")
    ax_s.legend(fontsize=8)
    ax_r.plot(idx, row.change_rates, color="tab:blue", lw=1.0)
    if top:
        ax_r.scatter(top, [row.change_rates[i] for i in top], color="crimson", zorder=3, s=22)
    if any(r > 0 for r in row.change_rates):
        ax_r.set_yscale("log")
    ax_r.set(xlabel="index i in W's spectrum (0 = largest)", ylabel="δ_i = |u_iᵀ ΔW v_i| / σ_i", title="change rates")
    subtitle = f"|ΔW|/|W| = {row.relative_delta_norm:.3g}, eff. rank(ΔW) = {row.effective_rank:.2f}"
    if row.overlap is not None:
        subtitle += f", overlap top-{row.overlap_k} = {row.overlap:.2f} (random {row.overlap_random:.2f})"
    fig.suptitle(subtitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.fspath(path)


def _overview(report: AnalysisReport, path: str, label: str) -> str:
    plt = _pyplot()
    rows = [r for r in report if r.measured]
    fig, (ax_q, ax_n) = plt.subplots(2, 1, figsize=(max(7, 0.25 * len(rows) + 3), 6.5), sharex=True)
    for x, r in enumerate(rows):
        qs = [d.quantile for d in r.top]
        ax_q.scatter([x] * len(qs), qs, s=[14 + 30 * (len(qs) - k) / max(1, len(qs)) for k in range(len(qs))],
                     color="crimson", alpha=0.6)
    ax_q.set(ylabel="quantile in W's spectrum\n(0 = largest σ, 1 = smallest)", ylim=(-0.05, 1.05),
             title=f"{label}: where the top change-rate directions sit (bigger = higher rate)")
    ax_n.bar(range(len(rows)), [r.relative_delta_norm for r in rows], color="tab:blue")
    ax_n.set(ylabel="|ΔW|_F / |W|_F")
    ax_n.set_xticks(range(len(rows)))
    ax_n.set_xticklabels([r.layer for r in rows], rotation=90, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_distances(reports: Mapping[str, AnalysisReport], path: str | os.PathLike) -> str:
    """Distance to the reference per layer, one line per labelled report (e.g. per method); below it,
    the cosine of each layer's ΔW with the reference's change (direction, whatever the scale)."""
    plt = _pyplot()
    layers: list[str] = []
    for rep in reports.values():
        layers += [r.layer for r in rep if r.distance_to_reference is not None and r.layer not in layers]
    if not layers:
        raise ValueError("no report has distances to a reference (pass reference= to report())")
    with_cos = any(r.cosine_to_reference is not None for rep in reports.values() for r in rep)
    fig, axes = plt.subplots(2 if with_cos else 1, 1, sharex=True, squeeze=False,
                             figsize=(max(7, 0.25 * len(layers) + 3), 7.5 if with_cos else 4.5))
    panels = [("distance_to_reference", "|W_ref − φ(W)|_F / |W_ref − W|_F",
               "distance to the reference (0 = reached, 1 = untouched)", 1.0)]
    if with_cos:
        panels.append(("cosine_to_reference", "cos(ΔW, W_ref − W)",
                       "cosine of ΔW with the reference's change (1 = same direction, 0 = orthogonal)", 0.0))
    for ax, (key, ylabel, title, line) in zip(axes[:, 0], panels, strict=True):
        for label, rep in reports.items():
            by_layer = {r.layer: getattr(r, key) for r in rep if getattr(r, key) is not None}
            xs = [i for i, n in enumerate(layers) if n in by_layer]
            ax.plot(xs, [by_layer[layers[i]] for i in xs], marker="o", ms=3, lw=1, label=label)
        ax.axhline(line, color="0.6", lw=0.8, ls="--")
        ax.set(ylabel=ylabel, title=title)
        ax.legend(fontsize=8)
    ax = axes[-1, 0]
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=90, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.fspath(path)


def plot_report(report: AnalysisReport, out_dir: str | os.PathLike, label: str = "") -> list[str]:
    """Write every plot of one report under ``out_dir``; returns the files written."""
    _pyplot()  # fail before writing anything when matplotlib is missing
    out_dir = os.fspath(out_dir)
    layer_dir = os.path.join(out_dir, "layers")
    os.makedirs(layer_dir, exist_ok=True)
    label = label or report.method or "adapter"
    files = [plot_layer(r, os.path.join(layer_dir, _safe(r.layer) + ".png")) for r in report if r.measured]
    if files:
        files.append(_overview(report, os.path.join(out_dir, "overview.png"), label))
    if any(r.distance_to_reference is not None for r in report):
        files.append(plot_distances({label: report}, os.path.join(out_dir, "distance.png")))
    return files
