"""The ``subpeft`` command line.

    subpeft methods          the registered methods: family, kind, mergeable, parameter formula
    subpeft methods --markdown   the same as the Markdown table of the README
    subpeft demo [...]       the main job: LoRA on MiniLM on the tweet sentiment task
    subpeft analyze DIR [DIR ...] [--reference REF] [--out OUT] [--base auto|minilm|smollm2|PATH|module:factory]
                  [--top K]  what saved adapters do to each weight (subpeft.analysis); with several
                             DIRs and a full fine-tune as REF, distance to it per layer and method
    subpeft train [--method NAME] [--config FILE.json] [--set key=value ...] [--model NAME|PATH]
                  [--task NAME | --data FILE] [--epochs N | --max-steps N] [--lr X] [--batch-size N]
                  [--seed N] [--out DIR] [--resume | --overwrite] ...
                             train a method (default: LoRA on MiniLM on the tweets task); writes the
                             adapter, metrics.json and train.log to DIR (a DIR holding files needs
                             --resume or --overwrite)
    subpeft eval --adapter DIR [--task NAME | --data FILE] [--split test]
                             the same metrics for a saved adapter
    subpeft compare --task NAME --methods a,b[r=2],b[r=4] [--seeds 3] [--lr-grid 3e-4,1e-3,3e-3|auto]
                  [--baselines none|full|head|full,head] [--split-seed N] [--out DIR] [--max-steps N] ...
                             every method (entries with options) and the baselines, lr tuned on dev,
                             a Markdown table, JSON and a plot

Exit status (EXIT_STATUS): 0 success, 1 the run failed, 2 bad input (one line, nothing written), 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from .app.run import UsageError


def _methods(args: argparse.Namespace) -> int:
    import subpeft as sp

    rows = [m.as_row() for m in sp.list_methods()]
    if args.markdown:
        print(methods_markdown())
        return 0
    if args.json:
        import json

        print(json.dumps(rows, indent=2))
        return 0
    header = ("method", "family", "kind", "mergeable", "params per layer", "layer types")
    table = [header] + [
        (r["name"], r["family"], r["kind"], "yes" if r["mergeable"] else "no", r["formula"], ", ".join(r["layer_types"]))
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def methods_markdown() -> str:
    """The README's method table, generated from the registry (a test keeps the README in sync)."""
    import subpeft as sp

    lines = [
        "| method | config | family | trains | params per adapted layer | merges | layer types |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in sp.list_methods():
        lines.append(
            f"| `{m.name}` | `sp.{m.config_cls.__name__}` | {m.family} | {m.trains} | {m.formula} | "
            f"{'yes' if m.mergeable else 'no'} | {', '.join(m.layer_types)} |"
        )
    return "\n".join(lines)


def _classifier_labels(directory: str) -> int | None:
    """The number of labels of a saved classification head (modules_to_save), if the adapter has one."""
    from .core.io import read_tensors

    tensors, _ = read_tensors(directory)
    for key, value in tensors.items():
        if key.endswith("classifier.weight") and value.dim() == 2:
            return int(value.shape[0])
    return None


def _base_model(spec: str, directory: str):
    """A fresh base model for the adapter in ``directory``. "auto": the model of the ``subpeft train`` run
    that wrote it (its run.json), else MiniLM; otherwise any name :func:`subpeft.train.models.load_model`
    resolves: "minilm" (the bundled MiniLM classifier), "smollm2", a local Hugging Face model folder or
    "module:factory" (a callable returning the model). A classifier gets as many labels as the
    adapter's saved head has."""
    from pathlib import Path

    from .app.models import ModelNameError, load_model, model_source

    if spec == "auto":
        from .app.run import find_run_json, load_run_base

        if find_run_json(Path(directory)) is not None:
            return load_run_base(directory)[2]
        spec = "minilm"
    try:
        labels = _classifier_labels(directory) if model_source(spec) in ("minilm", "folder") else None
        return load_model(spec, num_labels=labels, with_tokenizer=False)[0]
    except ModelNameError as exc:
        raise UsageError(f"--base {exc}") from None


#: weight files a reference directory may hold: save_pretrained's, or ``subpeft train --method full``'s
_REFERENCE_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.bin", "trainable.safetensors")


def _load_reference(path: str, base: str):
    """A fully fine-tuned reference: a weights file (.safetensors, .bin/.pt), a directory holding one
    (Hugging Face save_pretrained, or a ``subpeft train --method full`` run), or an adapter directory
    (loaded on a fresh base and merged)."""
    import os

    import torch

    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "adapter_config.json")):
            import subpeft as sp

            tuned = sp.load(_base_model(base, path), path)
            return tuned.merge_and_unload() if tuned.configs[tuned.active_adapter].mergeable else tuned.unload()
        for name in _REFERENCE_FILES:
            if os.path.exists(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise UsageError(f"--reference {path!r}: no {' or '.join(_REFERENCE_FILES)} in it")
    if not os.path.exists(path):
        raise UsageError(f"--reference {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as exc:
            raise UsageError(f"--reference {path!r}: not a readable safetensors file: {exc}") from None
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UsageError(f"--reference {path!r}: holds Python objects other than tensors, which are not loaded "
                         "(unpickling them could run code); give a .safetensors file or a state dict of tensors") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--reference {path!r}: not a weights file torch can read: {first}") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UsageError(f"--reference {path!r}: not a state dict of tensors (name -> tensor)")
    return state


def _labels(dirs: list[str], methods: list[str]) -> list[str]:
    """One label per adapter: its method, or method/folder where two adapters share a method."""
    import os

    out = []
    for d, m in zip(dirs, methods, strict=True):
        folder = os.path.basename(os.path.normpath(d))
        out.append(m if methods.count(m) == 1 else f"{m}/{folder}")
    if len(set(out)) < len(out):  # the same method in folders of the same name
        out = [f"{label}#{i + 1}" for i, label in enumerate(out)]
    return out


def _analyze(args: argparse.Namespace) -> int:
    import os
    import time

    import subpeft as sp
    from subpeft import analysis

    from .training.files import write_atomic

    for d in args.dirs:
        if not os.path.exists(os.path.join(d, "adapter_config.json")):
            raise UsageError(f"{d!r} is not an adapter directory (no adapter_config.json)")
    reference = _load_reference(args.reference, args.base) if args.reference else None
    reports, methods = [], []
    for d in args.dirs:
        start = time.perf_counter()
        tuned = sp.load(_base_model(args.base, d), d)
        rows = analysis.report(tuned, reference=reference, top=args.top)
        elapsed = time.perf_counter() - start
        reports.append(rows)
        methods.append(rows.method or "adapter")
        print(f"adapter {d}: {rows.method}, {len(rows)} adapted layers ({elapsed:.1f} s)")
        print(rows.to_table())
        _print_summary(rows.summary(), args.top)
        del tuned
    labels = _labels(args.dirs, methods)
    several = len(reports) > 1
    if several:
        print()
        print(_summary_table(labels, reports))
    if not args.out:
        return 0
    os.makedirs(args.out, exist_ok=True)
    plots = not args.no_plots
    for label, rows in zip(labels, reports, strict=True):
        out = os.path.join(args.out, label.replace("/", "_")) if several else args.out
        os.makedirs(out, exist_ok=True)
        write_atomic(os.path.join(out, "report.json"), rows.to_json() + "\n")
        print(f"wrote {os.path.join(out, 'report.json')}")
        if plots:
            try:
                files = analysis.plot_report(rows, out, label=label)
            except ImportError as exc:
                print(f"no plots: {exc}", file=sys.stderr)
                plots = False
            else:
                print(f"wrote {len(files)} plots under {out}")
    if plots and several and reference is not None:
        path = analysis.plot_distances(dict(zip(labels, reports, strict=True)),
                                       os.path.join(args.out, "distance_by_method.png"))
        print(f"wrote {path}")
    return 0


def _print_summary(summary: dict, top: int) -> None:
    if "mean_quantile" in summary:
        print(
            f"top-{top} change-rate directions per layer: mean spectrum quantile {summary['mean_quantile']:.2f} "
            f"(0 = largest σ, 1 = smallest), {100 * summary['fraction_in_top_10pct']:.0f}% in the top 10%, "
            f"{100 * summary['fraction_in_bottom_10pct']:.0f}% in the bottom 10%"
        )
    if "mean_distance_to_reference" in summary:
        print(f"mean distance to the reference: {summary['mean_distance_to_reference']:.3f} (0 = reached it, 1 = untouched)")
    if "mean_cosine_to_reference" in summary:
        print(f"mean cosine of ΔW with the reference's change: {summary['mean_cosine_to_reference']:.3f}; mean "
              f"‖ΔW‖/‖ΔW_ref‖: {summary['mean_norm_ratio_to_reference']:.3f}")


def _summary_table(labels: list[str], reports: list) -> str:
    """One line per adapter: layers, mean ‖ΔW‖/‖W‖, where its top directions sit, distance to the reference."""
    lines = ["| adapter | layers | mean ‖ΔW‖/‖W‖ | mean quantile of top directions | in bottom 10% | "
             "mean distance to reference | mean cosine with reference ΔW | mean ‖ΔW‖/‖ΔW_ref‖ |",
             "|---|---|---|---|---|---|---|---|"]
    for label, rows in zip(labels, reports, strict=True):
        s = rows.summary()
        rel = [r.relative_delta_norm for r in rows if r.relative_delta_norm is not None]
        cells = [label, str(len(rows)), f"{sum(rel) / len(rel):.4f}" if rel else "-",
                 f"{s['mean_quantile']:.2f}" if "mean_quantile" in s else "-",
                 f"{100 * s['fraction_in_bottom_10pct']:.0f}%" if "fraction_in_bottom_10pct" in s else "-",
                 f"{s['mean_distance_to_reference']:.3f}" if "mean_distance_to_reference" in s else "-",
                 f"{s['mean_cosine_to_reference']:.3f}" if "mean_cosine_to_reference" in s else "-",
                 f"{s['mean_norm_ratio_to_reference']:.2f}" if "mean_norm_ratio_to_reference" in s else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- errors and exit status

EXIT_STATUS = """exit status:
  0    success
  1    the run failed (e.g. the training loss became NaN), a file could not be written, or an internal
       error (printed with its traceback)
  2    bad input: an option, a file or a folder; one line says what to change, and nothing is written
  130  interrupted (Ctrl-C); a training run stopped inside its loop keeps a checkpoint: continue it with
       subpeft train --out DIR --resume"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the option and what is wrong) and exit status 2."""

    def error(self, message: str):
        _say_error(f"{self.prog}: error: {message} (see '{self.prog} --help')")
        self.exit(2)


#: how long a rank other than 0 of a multi-process launch waits before it prints its error (see _say_error)
ERROR_GRACE_S = 10.0


def _say_error(text: str) -> None:
    """Print an error line once per launch. A single process, or rank 0 of several, prints it at once. The other
    ranks of a launch (torchrun) first wait ERROR_GRACE_S: when rank 0 fails the same way (bad input: every rank
    checks the same options) it prints and exits first, and the launcher ends the waiting ranks, which then
    print nothing. An error rank 0 does not share is printed after the wait, marked with its rank; without the
    wait a rank that exited first had the launcher end rank 0 before it printed, and no line was left at all."""
    rank = os.environ.get("RANK", "0")
    if rank != "0":
        from . import distributed as spd

        if spd.launched():
            import time

            time.sleep(ERROR_GRACE_S)
            text = f"[rank {rank}] {text}"
    print(text, file=sys.stderr, flush=True)


def _one_line(exc: BaseException) -> str:
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return text or type(exc).__name__


def _usage_errors() -> tuple[type[BaseException], ...]:
    from .app.data import DataFileError, MissingPackageError
    from .core.errors import SubpeftError, UnsupportedLayerError
    from .training.files import UnreadableFileError
    from .training.loop import ResumeError

    # AnalysisError and ConfigError are SubpeftErrors; path errors of the user's files and folders too
    return (UsageError, SubpeftError, UnsupportedLayerError, DataFileError, MissingPackageError, ResumeError,
            UnreadableFileError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
            FileExistsError)


def _guarded(handler, args: argparse.Namespace) -> int:
    """Run a command: bad input ends with one 'error:' line and exit status 2, a failed run with one line
    and status 1, Ctrl-C with one line and status 130 (see EXIT_STATUS)."""
    from .app.compare import RunFailed

    name = f"subpeft {args.command}"
    try:
        _check_cli_options(args)
        return handler(args)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # Ctrl-C reaches every rank of a launch: rank 0 alone says it
            print(f"{name}: interrupted (Ctrl-C){getattr(args, 'interrupt_hint', '')}", file=sys.stderr)
        return 130
    except _usage_errors() as exc:
        _say_error(f"{name}: error: {_one_line(exc)}")
        return 2
    except (FloatingPointError, RunFailed, OSError) as exc:
        _say_error(f"{name}: error: {_one_line(exc)}")
        return 1
    finally:
        from . import distributed as spd

        spd.shutdown()


def _check_cli_options(args: argparse.Namespace) -> None:
    """The options that are not settings of a run (RunSpec.check validates those): threads, seeds, output
    files and folders, analyze's numbers."""
    import os

    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be >= 1 (torch CPU threads), got {threads}")
    if args.command == "compare":
        if args.seeds < 1:
            raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
        if args.seed_list is not None:
            try:
                seeds = [int(x) for x in args.seed_list.split(",")]
            except ValueError:
                raise UsageError(f"--seed-list takes comma-separated integers (e.g. 0,5,7), got "
                                 f"{args.seed_list!r}") from None
            if any(x < 0 for x in seeds):
                raise UsageError(f"--seed-list: seeds must be >= 0, got {args.seed_list!r}")
        if not [m for m in args.methods.split(",") if m.strip()]:
            raise UsageError("--methods names no method (e.g. --methods lora,ia3, or all)")
    if args.command == "eval" and args.json:
        if os.path.isdir(args.json):
            raise UsageError(f"--json {args.json!r} is a folder; give a file name, e.g. "
                             f"{os.path.join(args.json, 'eval.json')}")
    if args.command == "analyze":
        if args.top < 1:
            raise UsageError(f"--top must be >= 1 (directions per layer), got {args.top}")
    out = getattr(args, "out", None)
    if out is not None and os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out!r} is a file, not a folder; give a folder name")


# --------------------------------------------------------------------------- train / eval / compare

_S = argparse.SUPPRESS


def _size(text: str) -> int | None:
    """A split size: a count, or 0 / 'all' for the whole split."""
    if text.lower() in ("all", "0"):
        return 0
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is a count of examples, 0 or 'all' (the whole split), got "
                                         f"{text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a size must be >= 0 (0 or 'all': the whole split), got {value}")
    return value


def _data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=_S, help="minilm (default for classification), smollm2 (default for "
                   "generation) or a local Hugging Face model folder")
    p.add_argument("--task", default=_S, help="tweets (default), reviews or chat")
    p.add_argument("--data", default=_S, metavar="FILE", help="your own .csv/.tsv/.jsonl file instead of --task")
    p.add_argument("--text-col", default=_S, help="classification: the text column (default 'text')")
    p.add_argument("--label-col", default=_S, help="classification: the label column (default 'label')")
    p.add_argument("--prompt-col", default=_S, help="generation: the prompt column (default 'prompt')")
    p.add_argument("--response-col", default=_S, help="generation: the response column (default 'response')")
    p.add_argument("--max-length", type=int, default=_S, help="max tokens per example (default 128, at least 2)")
    p.add_argument("--test-size", type=_size, default=_S, help="exactly N test examples, carved from the data "
                   "(more than its 10%% part are moved out of the training part; an error if the data is too small); "
                   "0 or 'all': the whole 10%% part; default: the 10%% part, at most 2000")
    p.add_argument("--split-seed", type=int, default=_S, help="seed of the train/dev/test split (default 0), apart "
                   "from --seed: every seed sees the same test and dev examples")
    p.add_argument("--device", default=_S, help="cpu or cuda (default: cuda if available)")


def _run_options(p: argparse.ArgumentParser) -> None:
    """Training settings shared by train and compare."""
    p.add_argument("--epochs", type=float, default=_S, help="passes over the training data (default 1)")
    p.add_argument("--max-steps", type=int, default=_S, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=_S, help="examples per micro-batch (default 16)")
    p.add_argument("--grad-accum", type=int, default=_S, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--weight-decay", type=float, default=_S, help="AdamW weight decay of matrices, >= 0 (default 0)")
    p.add_argument("--warmup-ratio", type=float, default=_S, help="linear warm-up share of the steps, in [0, 1] "
                   "(default 0.06)")
    p.add_argument("--max-grad-norm", type=float, default=_S, help="gradient clipping norm, > 0 (default 1.0)")
    p.add_argument("--train-size", type=_size, default=_S, help="at most N training examples (default 6400; 0 or "
                   "'all': the whole training part, what --dev-size/--test-size leave)")
    p.add_argument("--dev-size", type=_size, default=_S, help="exactly N dev examples, carved like --test-size; "
                   "0 or 'all': the whole 10%% part; default: the 10%% part, at most 1000")
    p.add_argument("--max-new-tokens", type=int, default=_S, help="generation: greedy answer length (default 32)")
    p.add_argument("--head-lr", type=float, default=_S, help="classification: the fresh head's peak learning "
                   "rate, the same for every method (default 5e-3, the head-only baseline's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no log lines on the terminal")


_NON_FINITE = {"nan": math.nan, "inf": math.inf, "+inf": math.inf, "-inf": -math.inf, "infinity": math.inf,
               "+infinity": math.inf, "-infinity": -math.inf}


def _parse_value(text: str):
    """A --set value: JSON (numbers, true/false, lists, strings in quotes), nan/inf as the float they name
    (so that the check can say it is not finite), else the text itself."""
    import json

    if text.lower() in _NON_FINITE:
        return _NON_FINITE[text.lower()]
    try:
        return json.loads(text)
    except ValueError:
        return text


def _parse_sets(items: list[str], what: str = "--set") -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{what} takes key=value (e.g. {what} r=16), got {item!r}")
        out[key.strip()] = _parse_value(value.strip())
    return out


def _spec_keys() -> set[str]:
    import dataclasses

    from .app.run import RunSpec

    return {f.name for f in dataclasses.fields(RunSpec)}


def _train_spec(args: argparse.Namespace):
    """(RunSpec, out dir) from the command line: defaults < --spec file < run.json (with --resume) < options.
    The spec is checked here (RunSpec.check), so that a bad value from a file names that file."""
    from pathlib import Path

    from .app.run import RunSpec, stored_spec
    from .training.files import read_json

    given = {k: v for k, v in vars(args).items() if k in _spec_keys() and k != "options"}
    options: dict = {}
    if getattr(args, "config", None):
        data = read_json(args.config, "--config")
        if "method" in data:
            if "method" in given and given["method"] != data["method"]:
                raise UsageError(f"--method {given['method']} but --config is for {data['method']!r}")
            given["method"] = data["method"]
        options.update({k: v for k, v in data.items() if k not in ("method", "subpeft_version")})
    options.update(_parse_sets(getattr(args, "set", None) or []))
    if options:
        given["options"] = options
    if "data" in given and "task" in given:
        raise UsageError("give either --task or --data, not both")
    if "data" in given:
        given["task"] = None
    base: dict = {}
    source = None
    if getattr(args, "spec", None):
        from .app.run import upgrade_stored

        base = upgrade_stored(read_json(args.spec, "--spec"))
        source = f"--spec {args.spec}"
    out = getattr(args, "out", None)
    if out is None:
        merged = {**base, **given}
        label = merged.get("task") or Path(str(merged.get("data") or "tweets")).stem
        if "data" not in merged and "task" not in merged:
            label = "tweets"
        out = str(Path("runs") / f"{merged.get('method', 'lora')}-{label}")
    args.out = out
    if args.resume:
        from . import distributed as spd

        processes = int(os.environ.get("WORLD_SIZE", "1")) if spd.launched() else 1
        base, source = stored_spec(out, given, processes), f"--resume: {Path(out) / 'run.json'}"
    try:
        spec = RunSpec.from_dict({**base, **given})
    except UsageError as exc:
        raise UsageError(f"{source}: {exc}" if source else str(exc)) from None
    try:
        spec.check()
    except UsageError as exc:
        if source and exc.field is not None and exc.field not in given and exc.field in base:
            raise UsageError(f"{source}: {exc}", exc.field) from None
        raise
    return spec, out


def _threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def _train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .app.run import train_run
    from .training.loop import TrainingInterrupted, find_checkpoint

    _threads(args)
    spec, out = _train_spec(args)
    try:
        on_step = None
        if getattr(args, "progress_file", None):  # subpeft compare follows its runs' steps through this file
            def on_step(trainer, step, path=args.progress_file):
                with open(path, "w") as f:  # not durable on purpose: a half-written line is read again later
                    f.write(f"{step} {trainer.args.total_steps}\n")

        m = train_run(spec, out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
                      echo=not args.quiet, on_step=on_step)
    except TrainingInterrupted as exc:
        hint = f"; continue with: subpeft train --out {out} --resume" if exc.checkpoint else ""
        if os.environ.get("RANK", "0") == "0":
            print(f"subpeft train: {exc}{hint}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        if Path(out).is_dir() and find_checkpoint(out) is not None:
            args.interrupt_hint = f"; the checkpoint stays: continue with: subpeft train --out {out} --resume"
        else:
            args.interrupt_hint = "; nothing was written"
        raise
    if os.environ.get("RANK", "0") != "0":
        return 0
    metric = m["metric"]
    print(f"{m['method']} on {m['model']}, task {m['task']}: test {metric} {m['test'][metric]:.4f} "
          f"({m['test']['examples']} examples)")
    print(f"trainable {m['trainable_parameters']:,} of {m['total_parameters']:,} parameters "
          f"({m['trainable_percent']:.3f}%)")
    if "train_seconds" in m:
        print(f"trained {m['steps']} steps in {m['train_seconds']:.1f} s; loss {m['train_loss_first']:.4f} -> "
              f"{m['train_loss_last']:.4f}; peak memory +{m['peak_memory']['max_rss_rise_during_training_mb']:.0f} MB "
              "(max RSS rise)")
    print(f"wrote {out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .app.run import eval_run
    from .training.files import write_json

    _threads(args)
    overrides = {k: v for k, v in vars(args).items() if k in _spec_keys()}
    if "data" in overrides:
        overrides["task"] = None
    result = eval_run(args.adapter, overrides, split=args.split)
    scores = result[args.split]
    print(f"{result['method']} ({args.adapter}) on {result['model']}, task {result['task']}, {args.split} split:")
    for key, value in scores.items():
        print(f"  {key:<20} {value:.4f}" if isinstance(value, float) else f"  {key:<20} {value}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .app.compare import run_compare, split_methods, weight_methods
    from .training.loop import setting_problem

    _threads(args)
    common = {k: v for k, v in vars(args).items() if k in _spec_keys() and k not in ("method", "options", "seed", "lr")}
    if "data" in common and "task" in common:
        raise UsageError("give either --task or --data, not both")
    if "data" in common:
        common["task"] = None
    methods = []
    for m in split_methods(args.methods):
        for name in (weight_methods() if m == "all" else [m]):
            if name not in methods:
                methods.append(name)
    lr: dict[str, float] = {}
    for item in args.lr or []:
        key, sep, value = item.rpartition("=")
        try:
            lr[key if sep else "*"] = float(value)
        except ValueError:
            raise UsageError(f"--lr takes a number or NAME=number (NAME a method or family), got {item!r}") from None
        problem = setting_problem("lr", lr[key if sep else "*"])
        if problem:
            raise UsageError(f"--lr {problem} (e.g. 2e-3 or lora=2e-3), got {item!r}")
    grid: dict[str, object] = {}
    for item in args.lr_grid or []:
        key, sep, values = item.rpartition("=")
        key = key.strip() if sep else "*"
        if values.strip().lower() == "auto":
            grid[key] = "auto"
            continue
        try:
            rates = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            rates = []
        if not rates or any(setting_problem("lr", x) for x in rates):
            raise UsageError(f"--lr-grid takes [NAME=]X,Y,... (positive numbers, e.g. 3e-4,1e-3,3e-3 or "
                             f"full=1e-5,3e-5,1e-4) or [NAME=]auto, got {item!r}")
        grid[key] = rates
    baselines = None
    if args.baselines is not None:
        text = args.baselines.strip().lower()
        baselines = [] if text == "none" else [b.strip() for b in text.split(",") if b.strip()]
        if not baselines and text != "none":
            raise UsageError(f"--baselines takes none, full, head (untrained for generation) or a list such as "
                             f"full,head; got {args.baselines!r}")
    options: dict[str, dict] = {}
    for key, value in _parse_sets(args.set or []).items():
        method, dot, option = key.partition(".")
        if not dot:
            raise UsageError(f"compare's --set takes method.key=value (e.g. lora.r=16), got {key!r}")
        options.setdefault(method, {})[option] = value
    label = common.get("task") or "data"
    out = args.out or f"runs/compare/{label}"
    seeds = list(range(args.seeds)) if args.seed_list is None else [int(s) for s in args.seed_list.split(",")]
    import shlex

    command = "subpeft " + shlex.join(args.argv)
    if args.lr_extend < 0:
        raise UsageError(f"--lr-extend must be >= 0 (extra search runs per entry), got {args.lr_extend}")
    if args.lr_extend and not grid:
        raise UsageError("--lr-extend extends an lr search: give --lr-grid too")
    if args.lr_seeds != 1 and not grid:
        raise UsageError("--lr-seeds chooses the lr of an --lr-grid search: give --lr-grid too")
    results = run_compare(methods, common, out, seeds=seeds, lr=lr, lr_grid=grid, lr_extend=args.lr_extend,
                          lr_seeds=args.lr_seeds, options=options,
                          baselines=baselines, in_process=args.in_process,
                          resume=args.resume, overwrite=args.overwrite, threads=args.threads, command=command,
                          echo=(lambda s: None) if args.quiet else print,
                          bar=not args.quiet and sys.stderr.isatty())
    from .app.compare import markdown

    print(markdown(results))
    print(f"wrote {out}/results.md, results.json, results.png ({results['wall_seconds']:.0f} s)")
    return 0


def _add_train_parsers(sub) -> None:
    p = sub.add_parser("train", help="train a method on a task (default: LoRA, MiniLM, tweets)", epilog=EXIT_STATUS,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default=_S, help="a registered method (see 'subpeft methods') or a baseline: full, "
                   "head, untrained (default lora)")
    p.add_argument("--config", help="JSON file of method options (may name the method)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a method option, e.g. --set r=16 "
                   "(values are JSON: --set targets='[\"query\",\"value\"]'); repeatable")
    p.add_argument("--spec", help="a run.json of an earlier run to repeat (other options override it)")
    _data_options(p)
    _run_options(p)
    p.add_argument("--lr", type=float, default=_S, help="peak learning rate (default: by family, see DEFAULT_LR)")
    p.add_argument("--seed", type=int, default=_S, help="seed of the head and adapter init and the batch order "
                   "(the split has its own, --split-seed)")
    p.add_argument("--eval-every", type=int, default=_S, help="evaluate on dev every N steps, keep the best in DIR/best")
    p.add_argument("--load-best-at-end", action="store_true", default=_S, help="end with the best dev checkpoint")
    p.add_argument("--save-every", type=int, default=_S, help="write the resumable checkpoint every N steps "
                   "(default 200; also written at the end and on Ctrl-C)")
    p.add_argument("--eval-before", action="store_true", default=_S, help="also score the untrained model")
    p.add_argument("--no-save", dest="save", action="store_false", default=_S, help="do not write the final adapter")
    p.add_argument("--quantize", choices=["nf4"], default=_S, help="4-bit base model (QLoRA; needs subpeft.quant)")
    p.add_argument("--model-dropout", type=float, default=_S, metavar="P",
                   help="the base model's own dropout rate (default: the model's; 0 turns it off)")
    p.add_argument("--strategy", choices=["ddp", "fsdp"], default=_S,
                   help="several processes, launched by torchrun --nproc-per-node N -m subpeft train ...: "
                        "ddp (default) or fsdp (the frozen base sharded); --batch-size is per process")
    p.add_argument("--out", help="output folder (default runs/<method>-<task>); a folder that already holds "
                   "files needs --resume or --overwrite")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--progress-file", help=argparse.SUPPRESS)  # "step total" after each step, for subpeft compare
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out: the files a run writes "
                   "(adapter, run.json, metrics.json, train.log, checkpoints/last, best/) are removed, other "
                   "files stay")

    p = sub.add_parser("eval", help="the metrics of a saved adapter")
    p.add_argument("--adapter", required=True, help="adapter folder written by 'subpeft train'")
    _data_options(p)
    p.add_argument("--split", choices=["train", "dev", "test"], default="test", help="split to score (default test)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", help="also write the result to this JSON file")

    p = sub.add_parser("compare", help="several methods and the baselines on one task: table, JSON, plot")
    p.add_argument("--methods", required=True, help="comma-separated entries: a method name, or a method with "
                   "options in brackets, so that one method can appear with several settings side by side, e.g. "
                   "'lora[r=2],lora[r=4],lora[r=4,mpc=o],lora_dash[r=2]' (quote it in the shell; values are JSON, "
                   "else text); each entry is one row labelled with its options ('lora r=4 mpc=o'); 'all' stands "
                   "for every weight-space method (e.g. all,houlsby,prompt_tuning)")
    p.add_argument("--baselines", metavar="LIST", help="none, or some of full,head (generation: full,untrained); "
                   "default: both. Without full, %% of full FT shows '-'")
    _data_options(p)
    _run_options(p)
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument("--seed-list", help="explicit seeds, e.g. 0,5,7 (instead of --seeds)")
    p.add_argument("--lr", action="append", metavar="[NAME=]X", help="learning rate for all, or for an entry (as "
                   "written in --methods), a method, a kind or a family (repeatable): --lr extension=1e-3 --lr ia3=1e-2 "
                   "--lr 'lora[r=2]=3e-3'")
    p.add_argument("--lr-grid", action="append", metavar="[NAME=]X,Y,...|auto", help="tune the learning rate: each "
                   "entry trains once per lr of the grid (first seed; --lr-seeds N: first N), scored on the dev split only (the search runs "
                   "never read the test split), and the best dev lr is used for every seed; NAME as for --lr "
                   "(repeatable): --lr-grid 3e-4,1e-3,3e-3 --lr-grid full=1e-5,3e-5,1e-4. 'auto': each entry's "
                   "default lr x 1/3, 1, 3. The most specific of --lr and --lr-grid decides an entry's lr")
    p.add_argument("--eval-every", type=int, default=_S, help="score the dev split every N steps of each run: the "
                   "curve goes into each run's metrics.json (dev.history); the runs keep no weights")
    p.add_argument("--lr-extend", type=int, default=0, metavar="N", help="with --lr-grid: while an entry's dev-best "
                   "lr is the largest (smallest) tried, try one more a grid step beyond it, up to N more runs "
                   "per entry (default 0)")
    p.add_argument("--lr-seeds", type=int, default=1, metavar="N", help="with --lr-grid: train each lr on the "
                   "first N seeds and choose the best mean dev score (default 1); those seeds' search runs at the "
                   "chosen lr are then their seed runs (scored on test), so N costs (N - 1) x grid runs, minus "
                   "the N - 1 seed runs it saves")
    p.add_argument("--set", action="append", metavar="METHOD.KEY=VALUE", help="a method option for every entry of "
                   "that method, e.g. lora.r=16 (bracket options in --methods win)")
    p.add_argument("--out", help="output folder (default runs/compare/<task>)")
    p.add_argument("--in-process", action="store_true", help="run every training in this process (faster start; "
                   "memory figures then not per run)")
    p.add_argument("--resume", action="store_true", help="keep the finished runs (metrics.json) of the comparison in "
                   "--out; a finished run whose settings differ from this command's is an error")
    p.add_argument("--overwrite", action="store_true", help="replace the comparison in --out (its results and "
                   "the runs it makes; other files stay)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _Parser(prog="subpeft", description="Parameter-efficient fine-tuning, the subspace view.",
                     epilog=EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_methods = sub.add_parser("methods", help="list the registered methods")
    p_methods.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p_methods.add_argument("--markdown", action="store_true", help="print the README's Markdown table")
    sub.add_parser("demo", help="run the main job (LoRA on MiniLM, tweet sentiment)", add_help=False)
    p_an = sub.add_parser("analyze", help="what a saved adapter does to each weight (change rates, spectra)")
    p_an.add_argument("dirs", nargs="+", metavar="DIR",
                      help="adapter directories saved by subpeft (e.g. subpeft train's --out) or Hugging Face PEFT; "
                           "several are compared (e.g. one per method)")
    p_an.add_argument("--reference", help="fully fine-tuned weights: a directory (save_pretrained, a "
                                          "'subpeft train --method full' run, or an adapter) or a weights file")
    p_an.add_argument("--out", help="directory for report.json and PNG plots (one sub-folder per adapter when "
                                    "several, and distance_by_method.png with a reference)")
    p_an.add_argument("--base", default="auto",
                      help="base model: 'auto' (default: the model named by the run.json that subpeft train wrote "
                           "beside the adapter, else minilm), 'minilm', 'smollm2', a local Hugging Face model folder or "
                           "'module:factory'")
    p_an.add_argument("--top", type=int, default=8, help="task-specific directions per layer (default 8)")
    p_an.add_argument("--no-plots", action="store_true", help="with --out, write report.json only")
    _add_train_parsers(sub)
    if argv and argv[0] == "demo":
        from .demo import main as demo_main

        return demo_main(argv[1:]) or 0
    args = parser.parse_args(argv)
    args.argv = list(argv)
    if args.command == "methods":
        return _methods(args)
    handler = {"analyze": _analyze, "train": _train, "eval": _eval, "compare": _compare}.get(args.command)
    if handler is not None:
        return _guarded(handler, args)
    parser.error(f"unknown command {args.command!r}")
    return 2


def entry() -> None:
    """The ``subpeft`` program (the console script, ``python -m subpeft``, what torchrun starts): :func:`main`,
    then the exit. In a process of a multi-process launch the exit skips the interpreter's finalization
    (:func:`subpeft.distributed.end_process`: gloo's worker threads can otherwise abort a finished run)."""
    from . import distributed as spd

    if not spd.launched():
        raise SystemExit(main())
    try:
        status = main()
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2, its line already printed)
        status = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        status = 130
    except BaseException:  # an internal error: its traceback, then the same orderly exit
        import traceback

        traceback.print_exc()
        status = 1
    spd.end_process(status)


if __name__ == "__main__":
    entry()
