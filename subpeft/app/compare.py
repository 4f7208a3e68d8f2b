"""``subpeft compare``: several methods (and the baselines) on one task, several seeds, one table.

Every method runs with the same data, steps, batch size and seeds. The train/dev/test split comes from the
split seed (``split_seed``, default 0), not from the run seeds: every seed sees the same test and dev
examples, so the spread over seeds measures the method, not the split.

**Entries.** ``methods`` names registered methods or baselines, each optionally with options in brackets:
``lora[r=2]``, ``lora[r=2,mpc=o]``, ``lora_dash[r=4]`` (values are JSON, else text). The same method may
appear several times with other options; each entry is one row, labelled with its options
("lora r=2 mpc=o"). ``options`` (``--set METHOD.KEY=VALUE``) apply to every entry of that method; bracket
options win over them. ``--lr`` and ``--lr-grid`` keys may name an entry exactly as written
(``lora[r=2]=1e-3``), a method, a kind (module, prompt), a family, or nothing (every entry); the most
specific key wins.

**Learning rates.** An entry's lr is the family default (:data:`~subpeft.app.run.DEFAULT_LR`) unless
``lr`` names one. With a grid (``lr_grid``: ``--lr-grid 3e-4,1e-3,3e-3`` for all, ``--lr-grid
full=1e-5,3e-5,1e-4`` for one key, ``--lr-grid auto`` for the entry's default lr × 1/3, 1, 3) the entry is
trained once per grid lr with the first seed, each such run scored on the **dev split only** (the run's
test split is replaced by its dev split before the task is built: the test examples are never read), and
the lr with the best dev score is chosen (the first in grid order on a tie). Then every seed runs at the
chosen lr; the first seed's run is the search run at that lr, scored on test afterwards from its saved
weights (same settings, no second training). The baselines are tuned like any entry (full fine-tuning at
its best is the reference); ``untrained`` has no lr.

**Baselines** (``baselines``): full fine-tuning and head-only (classification) or the untrained model
(generation) by default; a subset, or none. Without ``full``, "% of full FT" shows "–".

Each run is a separate ``subpeft train`` process by default, so that its peak-memory figure (the rise of
the process's max RSS) is its own; ``in_process=True`` runs them in this process (faster to start; memory
figures then only show rises above earlier runs). The results go to ``out``:

* ``results.md``: mean ± std over seeds of the task metric, % of full fine-tuning, trainable
  parameters (count and %), learning rate (and whether it was tuned, over which grid, on which split),
  training time and peak memory, the split sizes, and the exact command;
* ``results.json``: the same plus every run's ``metrics.json`` and the lr search (every grid lr's dev score);
* ``results.png``: metric against trainable parameters (log scale), error bars over seeds;
* ``runs/<entry>/seed<k>/``: each run's folder (``metrics.json``, ``run.json``, ``train.log``);
  ``runs/<entry>/lr-search/lr<x>/``: the search runs (scored on dev; their weights are removed once the
  chosen one has been scored on test).

A run whose ``metrics.json`` says its parameters barely moved (``movement.barely_moved``), or whose test score
equals the head-only baseline's for the same seed (classification), is warned about and marked "⚠" in the table.

With ``resume=True`` finished runs are not run again, if their ``run.json`` has the settings of this
comparison (else a one-line error names the run and the setting); a folder that already holds files needs
``resume`` or ``overwrite``.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
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
    upgrade_stored,
)

__all__ = ["Entry", "RunFailed", "auto_grid", "baselines_for", "parse_entry", "resolve_lr", "run_compare",
           "split_methods", "summarize", "write_outputs"]

#: the factors of an entry's default lr that ``--lr-grid auto`` tries
AUTO_GRID_FACTORS = (1 / 3, 1.0, 3.0)
#: settings that may differ between a finished run and the comparison that reuses it (--resume)
_RESUME_IGNORE = ("processes", "device", "strategy")


def baselines_for(kind: str) -> list[str]:
    """Full fine-tuning, and head-only (classification) or the untrained model (generation)."""
    return ["full", "head"] if kind == "classification" else ["full", "untrained"]


def weight_methods() -> list[str]:
    """Every registered weight-space method."""
    from ..core.registry import list_methods

    return [m.name for m in list_methods() if m.kind == "weight"]


# --------------------------------------------------------------------------- entries


@dataclass
class Entry:
    """One row of the comparison: a method with its options."""

    key: str  # as written, e.g. "lora[r=2]"
    method: str
    options: dict[str, Any] = field(default_factory=dict)  # --set options of the method, then the bracket ones
    given: dict[str, Any] = field(default_factory=dict)  # the bracket options alone
    dir_name: str | None = None  # the folder under runs/ (default: from the label)

    @property
    def label(self) -> str:
        """The row label: the method and its options, e.g. ``lora r=2 mpc=o``."""
        return " ".join([self.method] + [f"{k}={_show(v)}" for k, v in self.options.items()])

    @property
    def folder(self) -> str:
        if self.dir_name:
            return self.dir_name
        return re.sub(r"[^A-Za-z0-9._=+-]+", "_", self.label.replace(" ", "_")).strip("_") or "entry"


def _show(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return "+".join(_show(v) for v in value)
    return json.dumps(value, separators=(",", ":"))


def split_methods(text: str) -> list[str]:
    """Comma-separated entries; commas inside brackets belong to the entry (``lora[r=2,mpc=o],ia3``)."""
    items, depth, current = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth < 0:
                raise UsageError(f"--methods {text!r}: a ']' without its '['")
        if ch == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += ch
    if depth:
        raise UsageError(f"--methods {text!r}: a '[' without its ']' (e.g. lora[r=2,mpc=o]; quote the list in the "
                         "shell)")
    items.append(current.strip())
    return [i for i in items if i]


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_entry(text: str, options: dict[str, dict[str, Any]] | None = None) -> Entry:
    """``method`` or ``method[key=value,...]`` (values JSON, else text) as an :class:`Entry`; ``options``:
    per-method options (``--set``) that the bracket ones override."""
    text = text.strip()
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(?:\[(.*)\])?", text, re.S)
    if not match:
        raise UsageError(f"--methods entry {text!r}: write a method name, optionally with options in brackets, "
                         "e.g. lora or lora[r=2,mpc=o]")
    method, inner = match.group(1), match.group(2)
    method_family(method)  # an unknown name fails here
    given: dict[str, Any] = {}
    if inner is not None:
        for item in split_methods(inner):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise UsageError(f"--methods entry {text!r}: options are key=value (e.g. {method}[r=2]), got {item!r}")
            given[key.strip()] = _value(value.strip())
        if not given:
            raise UsageError(f"--methods entry {text!r}: empty brackets; give options (e.g. {method}[r=2]) or none")
    if method in BASELINES and given:
        raise UsageError(f"--methods entry {text!r}: the baseline {method!r} takes no options")
    key = method if not given else f"{method}[{','.join(f'{k}={_show_raw(v)}' for k, v in given.items())}]"
    return Entry(key=key, method=method, options={**(options or {}).get(method, {}), **given}, given=given)


def _show_raw(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


# --------------------------------------------------------------------------- learning rates


def _keys(method: str, key: str | None = None) -> list[str]:
    family, kind = method_family(method)
    return [k for k in (key, method, kind, family, "*") if k is not None]


def resolve_lr(method: str, lr: dict[str, float], key: str | None = None) -> float:
    """The learning rate of ``method`` (entry ``key``): ``lr[key]``, else ``lr[method]``, ``lr[kind]``,
    ``lr[family]``, ``lr["*"]``, else the default."""
    for k in _keys(method, key):
        if k in lr:
            return lr[k]
    return default_lr(method)


def auto_grid(method: str) -> list[float]:
    """``--lr-grid auto``: the method's default lr times 1/3, 1 and 3 (3 significant digits)."""
    d = default_lr(method)
    return [float(f"{d * f:.3g}") for f in AUTO_GRID_FACTORS]


def resolve_grid(entry: Entry, lr: dict[str, float], grid: dict[str, Any]) -> list[float] | None:
    """The lr grid of an entry (None: a single lr, from ``lr`` or the default): the most specific key
    of ``lr`` and ``grid`` decides; a grid of one lr is that lr."""
    if entry.method == "untrained":
        return None
    for k in _keys(entry.method, entry.key):
        if k in grid and k in lr:
            raise UsageError(f"--lr and --lr-grid both name {k!r}: give one")
        if k in lr:
            return None
        if k in grid:
            values = auto_grid(entry.method) if grid[k] == "auto" else list(dict.fromkeys(grid[k]))
            return values if len(values) > 1 else None
    return None


def _fixed_lr(entry: Entry, lr: dict[str, float], grid: dict[str, Any]) -> float | None:
    if entry.method == "untrained":
        return None
    for k in _keys(entry.method, entry.key):
        if k in lr:
            return lr[k]
        if k in grid:
            values = auto_grid(entry.method) if grid[k] == "auto" else list(grid[k])
            return values[0]
    return default_lr(entry.method)


class RunFailed(RuntimeError):
    """A run of the comparison failed; the message is one line with the run's own error."""


def _run_subprocess(spec: RunSpec, run_dir: Path, threads: int | None, quiet: bool, on_step=None) -> dict[str, Any]:
    """``subpeft train`` in a child process; ``on_step(step, total)`` is called (about twice a second) with the
    child's progress, which it writes to a small file (``--progress-file``)."""
    import tempfile

    from ..training.files import write_json

    fd, spec_file = tempfile.mkstemp(prefix="subpeft-spec-", suffix=".json")
    os.close(fd)
    fd, progress_file = tempfile.mkstemp(prefix="subpeft-progress-", suffix=".txt")
    os.close(fd)
    try:
        write_json(spec_file, spec.to_dict())
        cmd = [sys.executable, "-m", "subpeft.cli", "train", "--spec", spec_file, "--out", str(run_dir), "--quiet",
               "--overwrite", "--progress-file", progress_file]
        if threads:
            cmd += ["--threads", str(threads)]
        with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
            proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, text=True)
            last = None
            try:
                while True:
                    try:
                        proc.wait(timeout=0.5)
                        break
                    except subprocess.TimeoutExpired:
                        pass
                    if on_step is not None:
                        last = _report(progress_file, last, on_step)
            except BaseException:  # Ctrl-C reached the child too: let it end, then make sure it did
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                raise
            stdout.seek(0)
            stderr.seek(0)
            out_text, err_text = stdout.read(), stderr.read()
    finally:
        os.unlink(spec_file)
        os.unlink(progress_file)
    if proc.returncode in (130, -2):  # the run was interrupted (Ctrl-C reaches the whole process group)
        raise KeyboardInterrupt
    if proc.returncode != 0:
        lines = [line for line in (err_text or out_text).strip().splitlines() if line.strip()]
        raise RunFailed(f"run {run_dir} failed (exit {proc.returncode}): {lines[-1].strip() if lines else 'no output'}")
    return json.loads((run_dir / "metrics.json").read_text())


def _report(path: str, last: str | None, on_step) -> str | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return last
    if text and text != last:
        try:
            step, total = (int(x) for x in text.split())
        except ValueError:  # caught mid-write
            return last
        on_step(step, total)
        return text
    return last


# --------------------------------------------------------------------------- the plan


@dataclass
class _Run:
    entry: Entry
    seed: int
    spec: RunSpec | None  # None: a final run whose spec waits for the chosen lr
    run_dir: Path
    search: bool = False  # a learning-rate search run (scored on dev)


def _finished(run_dir: Path, spec: RunSpec) -> dict[str, Any] | None:
    """The metrics of the finished run in ``run_dir`` if it has the spec's settings; None if unfinished;
    :class:`UsageError` naming the run and the first differing setting otherwise."""
    from ..training.files import read_json
    from ..training.loop import settings_diff

    if not (run_dir / "metrics.json").is_file():
        return None
    hint = "replace it with --overwrite, or choose another --out"
    if not (run_dir / "run.json").is_file():
        raise UsageError(f"--resume: the finished run {run_dir} has no run.json, so its settings are unknown; {hint}")
    stored = upgrade_stored(read_json(run_dir / "run.json", "--resume"))
    diffs = settings_diff(stored, spec.to_dict(), ignore=_RESUME_IGNORE, was="run")
    if diffs:
        more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
        raise UsageError(f"--resume: the finished run {run_dir} has other settings than this comparison: "
                         f"{diffs[0]}{more}; {hint}")
    return json.loads((run_dir / "metrics.json").read_text())


def _set_aside_superseded(run_dir: Path, spec: RunSpec) -> tuple[float, Path] | None:
    """A finished seed run that differs from ``spec`` in its lr alone, when the comparison chose the lr (a grown
    search found a better one): rename it to ``<seedN>-lr<old>`` (kept, never deleted) so that the seed runs again
    at the chosen lr. Returns (old lr, new path), or None when there is nothing to set aside."""
    from ..training.files import read_json

    if not ((run_dir / "metrics.json").is_file() and (run_dir / "run.json").is_file()):
        return None
    stored = upgrade_stored(read_json(run_dir / "run.json", "--resume"))
    now = spec.to_dict()
    if [k for k, v in now.items() if k not in _RESUME_IGNORE and stored.get(k) != v] != ["lr"]:
        return None
    old = stored["lr"]
    target = run_dir.with_name(f"{run_dir.name}-lr{old:g}")
    n = 2
    while target.exists():
        target, n = run_dir.with_name(f"{run_dir.name}-lr{old:g}-{n}"), n + 1
    run_dir.rename(target)
    return old, target


def _as_search(metrics: dict[str, Any]) -> dict[str, Any]:
    """A search run's metrics with its score under ``dev_final`` (train_run wrote it as "test", computed on dev)."""
    if "dev_final" not in metrics and "test" in metrics:
        metrics = dict(metrics)
        metrics["dev_final"] = metrics.pop("test")
        metrics["score_split"] = "dev"
        metrics["splits"] = {**metrics.get("splits", {}), "test": 0}
        metrics["note"] = "learning-rate search run: scored on the dev split (dev_final); the test split was not read"
    return metrics


_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_config.json", "trainable.safetensors")


def _has_weights(run_dir: Path) -> bool:
    return (run_dir / "adapter_config.json").is_file() or (run_dir / "trainable.safetensors").is_file()


def _drop_weights(run_dir: Path) -> None:
    import shutil

    shutil.rmtree(run_dir / "best", ignore_errors=True)  # the best dev adapter of --eval-every
    for name in _WEIGHT_FILES:
        try:
            (run_dir / name).unlink()
        except FileNotFoundError:
            pass


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {(seconds % 3600) // 60:02d} min"


class _Progress:
    """Runs done / total, elapsed time and an ETA from the mean time of the runs trained so far. On a terminal
    (``bar``): one tqdm bar over the runs, showing the current run's optimizer steps; the lines above it.
    Elsewhere (CI logs): one plain line per finished run, nothing per step."""

    def __init__(self, total: int, echo, bar: bool = False) -> None:
        self.total, self.echo, self.done = total, echo, 0
        self.start = time.perf_counter()
        self.trained: list[float] = []
        self.bar = None
        if bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} runs [{elapsed}]{postfix}")

    def eta(self) -> str:
        left = self.total - self.done
        if not left or not self.trained:
            return ""
        return f"ETA {_fmt_time(left * statistics.fmean(self.trained))}"

    def __call__(self, message: str, seconds: float | None = None) -> None:
        self.done += 1
        if seconds is not None:
            self.trained.append(seconds)
        eta = self.eta()
        line = (f"[{self.done}/{self.total}] {message} (elapsed {_fmt_time(time.perf_counter() - self.start)}"
                + (f", {eta}" if eta else "") + ")")
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(eta, refresh=False)
            self.bar.write(line, file=sys.stdout)
        else:
            self.echo(line)

    def note(self, message: str) -> None:
        """A line that is not a finished run."""
        if self.bar is not None:
            self.bar.write(message, file=sys.stdout)
        else:
            self.echo(message)

    def show_step(self, what: str, step: int, total: int) -> None:
        """The current run's progress (shown on the bar only)."""
        if self.bar is not None:
            eta = self.eta()
            self.bar.set_postfix_str(f"{what}: step {step}/{total}" + (f"; {eta}" if eta else ""))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_compare(
    methods: list[str],
    common: dict[str, Any],
    out: str | os.PathLike,
    *,
    seeds: list[int] = (0,),
    lr: dict[str, float] | None = None,
    lr_grid: dict[str, Any] | None = None,
    lr_extend: int = 0,
    lr_seeds: int = 1,
    options: dict[str, dict[str, Any]] | None = None,
    baselines: list[str] | None = None,
    in_process: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    threads: int | None = None,
    echo=print,
    warn=None,
    bar: bool = False,
    command: str = "",
) -> dict[str, Any]:
    """Train every entry (baselines first) for every seed, after the lr search of the entries that have a
    grid; write and return the results.

    ``methods``: entries (``"lora"``, ``"lora[r=2]"``); ``lr``: fixed lrs by key; ``lr_grid``: lists of lrs
    (or ``"auto"``) by key; ``lr_extend``: up to this many more search runs per entry while its dev-best lr is
    the largest (or smallest) tried, each one grid step further out (the ratio of the two outermost lrs
    tried on that side); ``lr_seeds``: the search trains every lr on the first this many seeds and chooses the
    best mean dev score (those seeds' search runs at the chosen lr are then scored on test as their seed runs);
    ``baselines``: None for the task's default two, or a list (``[]``: none).
    Every run's settings are checked before the first run starts. A non-empty ``out`` needs ``resume``
    (finished runs with the same settings are kept) or ``overwrite`` (the runs and results are replaced;
    other files stay). If no run finishes, the folders this call created are removed."""
    from ..training.files import first_missing, remove_created

    lr, lr_grid, options = dict(lr or {}), dict(lr_grid or {}), dict(options or {})
    warn = warn if warn is not None else (lambda text: print(text, file=sys.stderr))
    if not seeds:
        raise UsageError("--seeds must be >= 1 (or --seed-list must name a seed)")
    seeds = list(seeds)
    if not 1 <= lr_seeds <= len(seeds):
        raise UsageError(f"--lr-seeds must be between 1 and the number of seeds ({len(seeds)}), got {lr_seeds}")
    search_seeds = seeds[:lr_seeds]
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
    task = build_task(probe)  # fails early on a bad task, data file or split sizes
    splits = {n: len(task.split(n)) for n in ("train", "dev", "test")}
    if baselines is None:
        baselines = baselines_for(task.kind)
    for b in baselines:
        if b not in BASELINES:
            raise UsageError(f"--baselines: unknown baseline {b!r}; give none, or some of full, "
                             f"{'head' if task.kind == 'classification' else 'untrained'}")
        if b == "head" and task.kind != "classification":
            raise UsageError("--baselines head: a generation task has no fresh head; use untrained")
    entries: list[Entry] = []
    for text in [*baselines, *methods]:
        entry = parse_entry(text, options)
        if entry.method == "head" and task.kind != "classification":
            raise UsageError("--methods head: a generation task has no fresh head; use untrained")
        if entry.key not in [e.key for e in entries]:
            entries.append(entry)
    labels = [e.label for e in entries]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise UsageError(f"--methods: two entries are both {twice[0]!r}; give them different options")
    folders: dict[str, int] = {}
    for e in entries:  # distinct folders even where labels only differ in characters a folder name drops
        n = folders[e.folder] = folders.get(e.folder, 0) + 1
        if n > 1:
            e.dir_name = f"{e.folder}-{n}"
    unknown = sorted(set(options) - {e.method for e in entries})
    if unknown:
        raise UsageError(f"options given for methods not in the comparison: {unknown}")
    keys = {k for e in entries for k in _keys(e.method, e.key)}
    for name, what in ((lr, "--lr"), (lr_grid, "--lr-grid")):
        stray = sorted(set(name) - keys)
        if stray:
            raise UsageError(f"{what} names {stray[0]!r}, which no entry of the comparison is (an entry as written in "
                             "--methods, a method, kind or family)")

    def folder(e: Entry) -> Path:
        return out / "runs" / e.folder

    def search_runs(e: Entry, rate: float) -> list[_Run]:
        """The search runs of one lr: one per search seed (seed 0's folder keeps the one-seed name)."""
        return [_Run(e, seed, spec_for(e, seed, rate, search=True),
                     folder(e) / "lr-search" / (f"lr{rate:g}" if seed == seeds[0] else f"lr{rate:g}-seed{seed}"),
                     search=True) for seed in search_seeds]

    def spec_for(e: Entry, seed: int, rate: float | None, search: bool = False) -> RunSpec:
        spec = RunSpec.from_dict({
            **common, "method": e.method, "options": e.options, "seed": seed, "lr": rate,
            "save": search, "keep_checkpoint": False, "save_every": 0,
            **({"score_split": "dev"} if search else {}),
        })
        spec.check()
        return spec

    grids = {e.key: resolve_grid(e, lr, lr_grid) for e in entries}
    search: list[_Run] = []
    final: list[_Run] = []
    for e in entries:
        check_method_options(spec_for(e, seeds[0], _fixed_lr(e, lr, lr_grid)), task,
                             total_steps(spec_for(e, seeds[0], None), len(task.train)))
        for rate in grids[e.key] or []:
            search += search_runs(e, rate)
    for seed in seeds:
        for e in entries:
            rate = None if grids[e.key] else _fixed_lr(e, lr, lr_grid)
            final.append(_Run(e, seed, None if grids[e.key] else spec_for(e, seed, rate), folder(e) / f"seed{seed}"))
    if search:
        need = build_task(RunSpec.from_dict({**common, "method": "full", "score_split": "dev"}))
        del need  # the dev split exists (not empty): checked before any run starts

    if resume:  # a finished run with other settings fails now, before anything trains
        for run in [*search, *final]:
            if run.spec is not None:
                _finished(run.run_dir, run.spec)
    echo(f"data   {task.summary()}; split seed {probe.split_seed}, the same for every seed")
    created = first_missing(out)
    runs: list[dict[str, Any]] = []
    progress = _Progress(len(search) + len(final), echo, bar=bar)
    start = time.perf_counter()
    searched: dict[str, list[dict[str, Any]]] = {}
    chosen: dict[str, float] = {}

    def train(run: _Run) -> tuple[dict[str, Any], bool, float]:
        """(metrics, whether it was done before, seconds)."""
        if resume:
            metrics = _finished(run.run_dir, run.spec)
            if metrics is not None:
                return metrics, True, 0.0
        t0 = time.perf_counter()
        what = tag(run) + (f", lr {run.spec.lr:g}" if run.search else "")
        if in_process:
            metrics = train_run(run.spec, run.run_dir, overwrite=True, progress=False, echo=False,
                                on_step=lambda trainer, step: progress.show_step(what, step, trainer.args.total_steps))
        else:
            metrics = _run_subprocess(run.spec, run.run_dir, threads, quiet=True,
                                      on_step=lambda step, total: progress.show_step(what, step, total))
        return metrics, False, time.perf_counter() - t0

    def tag(run: _Run) -> str:
        return f"{run.entry.label} seed {run.seed}"

    def search_run(run: _Run) -> None:
        metrics, before, seconds = train(run)
        metrics = _as_search(metrics)
        if not before:
            from ..training.files import write_json

            write_json(run.run_dir / "metrics.json", metrics)
        metric = metrics["metric"]
        searched.setdefault(run.entry.key, []).append(
            {"lr": run.spec.lr, "seed": run.seed, "dev": metrics["dev_final"][metric], "dir": str(run.run_dir)})
        runs.append(metrics)
        progress(f"{tag(run)}, lr search {run.spec.lr:g}: " + ("done before" if before else
                 f"dev {metric} {metrics['dev_final'][metric]:.4f} ({seconds:.0f} s)"),
                 None if before else seconds)

    def mean_dev(tried: list[dict[str, Any]]) -> dict[float, float]:
        """Each lr tried: its dev score averaged over the search seeds (in the order the lrs were tried)."""
        by: dict[float, list[float]] = {}
        for t in tried:
            by.setdefault(t["lr"], []).append(t["dev"])
        return {rate: sum(v) / len(v) for rate, v in by.items()}

    def best_of(tried: list[dict[str, Any]]) -> dict[str, Any]:
        greater = runs[-1]["greater_is_better"] if runs else True
        means = list(mean_dev(tried).items())
        best = means[0]  # the first in grid order on a tie
        for rate, dev in means[1:]:
            if (dev > best[1]) if greater else (dev < best[1]):
                best = (rate, dev)
        return {"lr": best[0], "dev": best[1]}

    def beyond(tried: list[dict[str, Any]]) -> float | None:
        """The next lr out, when the dev-best is the largest or the smallest lr tried (None otherwise)."""
        rates = sorted(mean_dev(tried))
        best = best_of(tried)["lr"]
        if len(rates) < 2 or rates[0] < best < rates[-1]:
            return None
        nxt = rates[-1] ** 2 / rates[-2] if best == rates[-1] else rates[0] ** 2 / rates[1]
        return float(f"{nxt:.3g}")

    try:
        out.mkdir(parents=True, exist_ok=True)
        for run in search:
            search_run(run)
        for e in entries:
            if grids[e.key]:
                for _ in range(lr_extend):  # the dev-best at an edge: one grid step further out, then decide again
                    rate = beyond(searched[e.key])
                    if rate is None or any(t["lr"] == rate for t in searched[e.key]):
                        break
                    progress.total += len(search_seeds)
                    for extra in search_runs(e, rate):
                        if resume:
                            _finished(extra.run_dir, extra.spec)  # other settings: fail with the run's name
                        search_run(extra)
                chosen[e.key] = best_of(searched[e.key])["lr"]
        final_runs: list[dict[str, Any]] = []
        for run in final:
            e = run.entry
            if run.spec is None:
                run.spec = spec_for(e, run.seed, chosen[e.key])
            source = None
            if grids[e.key] and run.seed in search_seeds:
                source = next(Path(t["dir"]) for t in searched[e.key]
                              if t["lr"] == chosen[e.key] and t["seed"] == run.seed)
            if resume and grids[e.key] and (moved := _set_aside_superseded(run.run_dir, run.spec)) is not None:
                progress.note(f"{tag(run)}: its finished run at lr {moved[0]:g} is superseded by the dev-best lr "
                         f"{chosen[e.key]:g}; kept as {moved[1].name}, running again")
            done = _finished(run.run_dir, run.spec) if resume else None
            if done is not None:
                metrics = done
                progress(f"{tag(run)}: done before")
            elif source is not None and _has_weights(source):
                t0 = time.perf_counter()
                metrics = _score_search_run(source, run, splits)
                for t in searched[e.key]:  # the other lrs' weights, and this one's: never needed again
                    if t["lr"] != chosen[e.key] or Path(t["dir"]) == source:
                        _drop_weights(Path(t["dir"]))
                progress(f"{tag(run)}: the lr search run at lr {chosen[e.key]:g}, scored on test: "
                         f"{metrics['metric']} {metrics['test'][metrics['metric']]:.4f}", time.perf_counter() - t0)
            else:
                metrics, before, seconds = train(run)
                progress(f"{tag(run)}: {metrics['metric']} {metrics['test'][metrics['metric']]:.4f} ({seconds:.0f} s)",
                         seconds)
            metrics = {**metrics, "label": e.label, "entry": e.key, "options_given": e.options}
            runs.append(metrics)
            final_runs.append(metrics)
    except BaseException:
        if not runs:
            remove_created(created)
        raise
    finally:
        progress.close()
    results = summarize(final_runs)
    for line in _mark_barely_moved(results, task.kind):
        warn(line)
    lr_search = {
        e.label: {"grid": grids[e.key], "extended": [t["lr"] for t in searched[e.key] if t["lr"] not in grids[e.key]],
                  "split": "dev", "dev_examples": splits["dev"], "seed": seeds[0], "seeds": search_seeds,
                  "metric": results["metric"], "chosen": chosen[e.key],
                  "dev_scores": [{"lr": t["lr"], "seed": t["seed"], "dev": t["dev"]} for t in searched[e.key]],
                  "dev_means": [{"lr": rate, "dev": dev} for rate, dev in mean_dev(searched[e.key]).items()]}
        for e in entries if grids[e.key]
    }
    results.update(command=command, settings=common, seeds=seeds, splits=splits,
                   split_seed=probe.split_seed, baselines=list(baselines),
                   learning_rates={e.label: (chosen.get(e.key) or _fixed_lr(e, lr, lr_grid)) for e in entries
                                   if e.method != "untrained"},
                   lr_search=lr_search, wall_seconds=time.perf_counter() - start)
    for row in results["summary"]:
        row["lr_tuned"] = row["label"] in lr_search
    write_outputs(results, out)
    return results


def _score_search_run(source: Path, run: _Run, splits: dict[str, int]) -> dict[str, Any]:
    """The final metrics of the first seed at the chosen lr: the search run at that lr (same settings, only
    scored on dev), now scored on test from its saved weights; written to the seed's folder with the run.json
    that training it anew would have."""
    from ..training.files import write_json
    from .run import eval_run

    metrics = json.loads((source / "metrics.json").read_text())
    scored = eval_run(source, {"score_split": "test"}, split="test")
    metrics = {k: v for k, v in metrics.items() if k not in ("dev_final", "score_split", "note")}
    metrics["test"] = scored["test"]
    metrics["dev_final"] = _as_search(json.loads((source / "metrics.json").read_text()))["dev_final"]
    metrics["splits"] = dict(splits)
    metrics["from_lr_search"] = str(source)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run.run_dir / "run.json", run.spec.to_dict())
    write_json(run.run_dir / "metrics.json", metrics)
    return metrics


def _mark_barely_moved(results: dict[str, Any], kind: str) -> list[str]:
    """Flag the runs whose metrics say they barely moved, or whose test score equals the head-only
    baseline's for the same seed (classification); mark their rows. Returns the warning lines."""
    metric, lines = results["metric"], []
    head = {r["seed"]: r["test"][metric] for r in results["runs"] if r.get("label") == "head"}
    flagged: dict[str, list[str]] = {}
    for r in results["runs"]:
        label = r.get("label", r["method"])
        if label in ("head", "untrained"):
            continue
        movement = r.get("movement") if isinstance(r.get("movement"), dict) else {}
        why = None
        if movement.get("barely_moved") is True:
            rel = movement.get("relative_delta")
            why = "its weights barely moved" + (f" (relative change {rel:.2g})" if isinstance(rel, (int, float)) else "")
        elif kind == "classification" and r["seed"] in head and r["test"][metric] == head[r["seed"]]:
            why = f"its test {metric} equals the head-only baseline's exactly"
        if why:
            r["barely_moved"] = why
            flagged.setdefault(label, []).append(f"seed {r['seed']}: {why}")
            lines.append(f"warning: {label} seed {r['seed']}: {why}; its row is marked ⚠ (check its lr and options)")
    for row in results["summary"]:
        if row["label"] in flagged:
            row["barely_moved"] = flagged[row["label"]]
    return lines


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-method mean ± std over seeds, and % of full fine-tuning."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(r.get("label", r["method"]), []).append(r)
    metric = runs[0]["metric"]
    extra = "exact_match" if metric == "answer_loss" else None
    rows = []
    for label, rs in by.items():
        mean, std = _mean_std([r["test"][metric] for r in rs])
        row = {
            "label": label,
            "method": rs[0]["method"],
            "options": rs[0].get("options_given", {}),
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
    full = next((r[metric] for r in rows if r["label"] == "full"), None)
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
    ]
    splits = results.get("splits")
    if splits:
        lines += ["", f"Splits: train {splits['train']:,}, dev {splits['dev']:,}, test {splits['test']:,} examples, "
                  f"from split seed {results.get('split_seed', 0)}: the same examples for every seed."]
    if "baselines" in results:
        lines += ["", "Baselines: " + (", ".join(results["baselines"]) or "none")
                  + ("" if "full" in results["baselines"] else " (no full fine-tuning: no % of full FT)") + "."]
    search = results.get("lr_search") or {}
    if search:
        first = next(iter(search.values()))
        on = first.get("seeds") or [first["seed"]]
        lines += ["", f"Learning rates marked * were tuned on the **dev split** ({first['dev_examples']:,} examples, "
                  + (f"seed {on[0]}): each lr of the grid trained once, the best dev {metric} chosen" if len(on) == 1
                     else f"seeds {', '.join(map(str, on))}): each lr of the grid trained once per seed, the best "
                     f"mean dev {metric} chosen")
                  + "; the test split was not read for the choice (the search runs never load it), and the test "
                  "scores are those of the chosen lr. Grids:"]
        for label, info in search.items():
            means = info.get("dev_means") or info["dev_scores"]
            tried = ", ".join(f"{t['lr']:g} → {t['dev']:.4f}" for t in means)
            lines.append(f"- `{label}`: {tried} (dev {metric}); chosen {info['chosen']:g}")
    lines += [
        "",
        f"| method | family | {metric} | " + (f"{extra} | " if extra else "")
        + "% of full FT | trainable params | trainable % | lr | train time (s) | peak RSS rise (MB) |",
        "|---|---|---|" + ("---|" if extra else "") + "---|---|---|---|---|---|",
    ]
    flagged = []
    for r in rows:
        pct = f"{r['percent_of_full']:.1f}" if r.get("percent_of_full") is not None else "–"
        lr = (f"{r['lr']:g}" + ("*" if r.get("lr_tuned") else "")) if r.get("lr") else "–"
        label = f"`{r.get('label', r['method'])}`"
        if r.get("barely_moved"):
            label += " ⚠"
            flagged.append(r)
        cells = [label, r["family"], f"{r[metric]:.4f} ± {r[metric + '_std']:.4f}"]
        if extra:
            cells.append(f"{r[extra]:.4f} ± {r[extra + '_std']:.4f}")
        cells += [pct, _fmt_params(r["trainable_parameters"]), f"{r['trainable_percent']:.3f}", lr,
                  f"{r['train_seconds']:.1f}", f"{r['peak_rss_rise_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if flagged:
        lines += ["", "⚠ barely moved: " + "; ".join(f"`{r['label']}` ({', '.join(r['barely_moved'])})"
                                                     for r in flagged)
                  + ". Such a row measures the head (or nothing), not the method."]
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
            ax.annotate(r.get("label", r["method"]), (0.01, r[metric]), xycoords=("axes fraction", "data"), fontsize=8,
                        color="gray", va="bottom")
            continue
        ax.errorbar(r["trainable_parameters"], r[metric], yerr=r[metric + "_std"] or None, fmt="o",
                    color=colors.get(r["family"], "tab:red"), capsize=3)
        ax.annotate(r.get("label", r["method"]), (r["trainable_parameters"], r[metric]), textcoords="offset points",
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
