"""``subpeft compare``: several methods (and the baselines) on one task, several seeds, one table.

Every method runs with the same data, steps, batch size and seeds; the learning rate is the
family default (:data:`~subpeft.train.run.DEFAULT_LR`) unless given. Each run is a separate
``subpeft train`` process by default, so that its peak-memory figure (the rise of the process's
max RSS) is its own; ``in_process=True`` runs them in this process (faster to start; memory figures
then only show rises above earlier runs). The results go to ``out``:

* ``results.md``: mean ± std over seeds of the task metric, % of full fine-tuning, trainable
  parameters (count and %), learning rate, training time and peak memory, and the exact command;
* ``results.json``: the same plus every run's ``metrics.json``;
* ``results.png``: metric against trainable parameters (log scale), error bars over seeds;
* ``runs/<method>/seed<k>/``: each run's folder (``metrics.json``, ``run.json``, ``train.log``).

With ``resume=True`` runs that already have a ``metrics.json`` are not run again; a folder that already
holds files needs ``resume`` or ``overwrite``.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .run import (
    BASELINES,
    RunSpec,
    UsageError,
    build_task,
    check_method_options,
    default_lr,
    method_family,
    total_steps,
    train_run,
)

__all__ = ["RunFailed", "baselines_for", "resolve_lr", "run_compare", "summarize", "write_outputs"]


def baselines_for(kind: str) -> list[str]:
    """Full fine-tuning, and head-only (classification) or the untrained model (generation)."""
    return ["full", "head"] if kind == "classification" else ["full", "untrained"]


def weight_methods() -> list[str]:
    """Every registered weight-space method."""
    from ..core.registry import list_methods

    return [m.name for m in list_methods() if m.kind == "weight"]


def resolve_lr(method: str, lr: dict[str, float]) -> float:
    """The learning rate of ``method``: ``lr[method]``, else ``lr[family]``, else ``lr["*"]``, else the default."""
    family, kind = method_family(method)
    for key in (method, kind, family, "*"):
        if key in lr:
            return lr[key]
    return default_lr(method)


class RunFailed(RuntimeError):
    """A run of the comparison failed; the message is one line with the run's own error."""


def _run_subprocess(spec: RunSpec, run_dir: Path, threads: int | None, quiet: bool) -> dict[str, Any]:
    import tempfile

    from ..training.files import write_json

    fd, spec_file = tempfile.mkstemp(prefix="subpeft-spec-", suffix=".json")
    os.close(fd)
    try:
        write_json(spec_file, spec.to_dict())
        cmd = [sys.executable, "-m", "subpeft.cli", "train", "--spec", spec_file, "--out", str(run_dir), "--quiet",
               "--overwrite"]
        if threads:
            cmd += ["--threads", str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        os.unlink(spec_file)
    if proc.returncode in (130, -2):  # the run was interrupted (Ctrl-C reaches the whole process group)
        raise KeyboardInterrupt
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()]
        raise RunFailed(f"run {run_dir} failed (exit {proc.returncode}): {lines[-1].strip() if lines else 'no output'}")
    return json.loads((run_dir / "metrics.json").read_text())


def run_compare(
    methods: list[str],
    common: dict[str, Any],
    out: str | os.PathLike,
    *,
    seeds: list[int] = (0,),
    lr: dict[str, float] | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    in_process: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    threads: int | None = None,
    echo=print,
    command: str = "",
) -> dict[str, Any]:
    """Train every method (baselines first) for every seed; write and return the results.

    Every run's settings are checked before the first run starts. A non-empty ``out`` needs ``resume``
    (runs that wrote metrics.json are kept) or ``overwrite`` (the runs and results are replaced; other
    files stay). If no run finishes, the folders this call created are removed."""
    from ..training.files import first_missing, remove_created

    lr, options = dict(lr or {}), dict(options or {})
    if not seeds:
        raise UsageError("--seeds must be >= 1 (or --seed-list must name a seed)")
    if resume and overwrite:
        raise UsageError("give --resume (keep finished runs) or --overwrite (replace them), not both")
    probe = RunSpec.from_dict({**common, "method": "full"})
    probe.check()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file, not a folder; give a folder name")
    if out.is_dir() and any(out.iterdir()) and not (resume or overwrite):
        raise UsageError(f"--out {str(out)!r} is not empty: continue that comparison with --resume, replace it "
                         "with --overwrite, or choose another --out")
    task = build_task(probe)  # fails early on a bad task or data file
    names = baselines_for(task.kind) + [m for m in methods if m not in BASELINES]
    for m in names:
        method_family(m)  # unknown names fail before any training
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise UsageError(f"options given for methods not in the comparison: {unknown}")
    plan = []
    for seed in seeds:
        for m in names:
            spec = RunSpec.from_dict({
                **common, "method": m, "options": options.get(m, {}), "seed": seed, "lr": resolve_lr(m, lr),
                "save": False, "keep_checkpoint": False, "save_every": 0,
            })
            spec.check()
            check_method_options(spec, task, total_steps(spec, len(task.train)))
            plan.append((seed, m, spec, out / "runs" / m / f"seed{seed}"))
    created = first_missing(out)
    runs: list[dict[str, Any]] = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        total, done = len(plan), 0
        start = time.perf_counter()
        for seed, m, spec, run_dir in plan:
            done += 1
            if resume and (run_dir / "metrics.json").is_file():
                metrics = json.loads((run_dir / "metrics.json").read_text())
                echo(f"[{done}/{total}] {m} seed {seed}: done before")
            else:
                t0 = time.perf_counter()
                if in_process:
                    metrics = train_run(spec, run_dir, overwrite=True, progress=False, echo=False)
                else:
                    metrics = _run_subprocess(spec, run_dir, threads, quiet=True)
                echo(f"[{done}/{total}] {m} seed {seed}: {metrics['metric']} "
                     f"{metrics['test'][metrics['metric']]:.4f} ({time.perf_counter() - t0:.0f} s)")
            runs.append(metrics)
    except BaseException:
        if not runs:
            remove_created(created)
        raise
    results = summarize(runs)
    results.update(command=command, settings=common, seeds=list(seeds),
                   learning_rates={m: resolve_lr(m, lr) for m in names if m != "untrained"},
                   wall_seconds=time.perf_counter() - start)
    write_outputs(results, out)
    return results


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-method mean ± std over seeds, and % of full fine-tuning."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["method"], []).append(r)
    metric = runs[0]["metric"]
    extra = "exact_match" if metric == "answer_loss" else None
    rows = []
    for method, rs in by.items():
        mean, std = _mean_std([r["test"][metric] for r in rs])
        row = {
            "method": method,
            "family": rs[0]["family"],
            "seeds": len(rs),
            metric: mean,
            f"{metric}_std": std,
            "trainable_parameters": rs[0]["trainable_parameters"],
            "trainable_percent": rs[0]["trainable_percent"],
            "lr": rs[0].get("lr"),
            "train_seconds": _mean_std([r.get("train_seconds", 0.0) for r in rs])[0],
            "peak_rss_rise_mb": _mean_std([r["peak_memory"]["max_rss_rise_during_training_mb"] for r in rs])[0],
        }
        if "cuda_max_allocated_mb" in rs[0]["peak_memory"]:
            row["cuda_max_allocated_mb"] = _mean_std([r["peak_memory"]["cuda_max_allocated_mb"] for r in rs])[0]
        if extra:
            row[extra], row[f"{extra}_std"] = _mean_std([r["test"].get(extra) for r in rs])
        rows.append(row)
    full = next((r[metric] for r in rows if r["method"] == "full"), None)
    for r in rows:
        r["percent_of_full"] = 100 * r[metric] / full if full else None
    return {"metric": metric, "greater_is_better": runs[0]["greater_is_better"], "task": runs[0]["task"],
            "model": runs[0]["model"], "summary": rows, "runs": runs}


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else (f"{n / 1e3:.1f}k" if n >= 1e3 else str(n))


def markdown(results: dict[str, Any]) -> str:
    metric, rows = results["metric"], results["summary"]
    extra = "exact_match" if metric == "answer_loss" else None
    s = results.get("settings", {})
    head_lrs = {r["head_lr"] for r in results.get("runs", []) if r.get("head_lr") is not None}
    lines = [
        f"# Method comparison: {results['task']} on {results['model']}",
        "",
        f"Command: `{results.get('command') or 'subpeft compare'}`",
        "",
        f"Seeds {results.get('seeds')}; " + ", ".join(f"{k} {v}" for k, v in s.items() if v is not None) + ". "
        f"Metric: test {metric} ({'higher' if results['greater_is_better'] else 'lower'} is better), mean ± std "
        "over seeds. Trainable parameters include the classification head where one trains"
        + (f"; that fresh head trains at lr {head_lrs.pop():g} for every method" if len(head_lrs) == 1 else "")
        + ". Peak memory: rise of the training process's max RSS over the training loop.",
        "",
        f"| method | family | {metric} | " + (f"{extra} | " if extra else "")
        + "% of full FT | trainable params | trainable % | lr | train time (s) | peak RSS rise (MB) |",
        "|---|---|---|" + ("---|" if extra else "") + "---|---|---|---|---|---|",
    ]
    for r in rows:
        pct = f"{r['percent_of_full']:.1f}" if r.get("percent_of_full") is not None else "–"
        lr = f"{r['lr']:g}" if r.get("lr") else "–"
        cells = [f"`{r['method']}`", r["family"], f"{r[metric]:.4f} ± {r[metric + '_std']:.4f}"]
        if extra:
            cells.append(f"{r[extra]:.4f} ± {r[extra + '_std']:.4f}")
        cells += [pct, _fmt_params(r["trainable_parameters"]), f"{r['trainable_percent']:.3f}", lr,
                  f"{r['train_seconds']:.1f}", f"{r['peak_rss_rise_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: str | os.PathLike) -> None:
    """Metric against trainable parameters (log x), error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, rows = results["metric"], results["summary"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    colors = {"baseline": "black", "reconstruction": "tab:green", "extension": "tab:blue",
              "combination": "tab:orange", "framework": "tab:purple"}
    for r in rows:
        if r["trainable_parameters"] <= 0:  # untrained: no trainable parameters, a reference line
            ax.axhline(r[metric], color="gray", linestyle="--", linewidth=1)
            ax.annotate(r["method"], (0.01, r[metric]), xycoords=("axes fraction", "data"), fontsize=8,
                        color="gray", va="bottom")
            continue
        ax.errorbar(r["trainable_parameters"], r[metric], yerr=r[metric + "_std"] or None, fmt="o",
                    color=colors.get(r["family"], "tab:red"), capsize=3)
        ax.annotate(r["method"], (r["trainable_parameters"], r[metric]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"test {metric}")
    ax.set_title(f"{results['task']} on {results['model']}: {metric} vs trainable parameters")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    import io

    from ..training.files import write_atomic

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=120, format="png")
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


def write_outputs(results: dict[str, Any], out: str | os.PathLike) -> list[Path]:
    """results.json, results.md and results.png in ``out``, each replaced atomically."""
    from ..training.files import write_atomic, write_json

    out = Path(out)
    files = [out / "results.json", out / "results.md"]
    write_json(files[0], results)
    write_atomic(files[1], markdown(results))
    try:
        plot(results, out / "results.png")
        files.append(out / "results.png")
    except ImportError:  # matplotlib is optional
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
    return files
