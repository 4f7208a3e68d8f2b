"""Subspace analysis: what a fine-tune did to the weights (METHODS.md, "Analysis quantities").

    from subpeft import analysis
    analysis.change_rates(W, W_new)              # δ_i per core direction of W
    rows = analysis.report(tuned)                # per adapted layer; rows.to_table(), rows.to_json()
    analysis.plot_report(rows, "out/")           # PNGs (needs matplotlib)
"""

from .measures import (
    AnalysisError,
    change_rates,
    distance_to_reference,
    effective_rank,
    optimal_scale,
    principal_angles,
    project,
    subspace_similarity,
    task_specific_directions,
)
from .report import AnalysisReport, Direction, LayerAnalysis, analyze_layer, clear_cache, report, weight_svd

__all__ = [
    "AnalysisError",
    "AnalysisReport",
    "Direction",
    "LayerAnalysis",
    "analyze_layer",
    "change_rates",
    "clear_cache",
    "distance_to_reference",
    "effective_rank",
    "optimal_scale",
    "plot_distances",
    "plot_report",
    "principal_angles",
    "project",
    "report",
    "subspace_similarity",
    "task_specific_directions",
    "weight_svd",
]


def plot_report(*args, **kwargs):  # noqa: ANN002, ANN003
    """PNG plots of a report (see :func:`subpeft.analysis.plots.plot_report`); imports matplotlib lazily."""
    from .plots import plot_report as _plot

    return _plot(*args, **kwargs)


def plot_distances(*args, **kwargs):  # noqa: ANN002, ANN003
    """Distance to the reference per layer, one line per labelled report (see
    :func:`subpeft.analysis.plots.plot_distances`); imports matplotlib lazily."""
    from .plots import plot_distances as _plot

    return _plot(*args, **kwargs)
