"""One training run, end to end: what ``subpeft train`` and ``subpeft eval`` do.

A :class:`RunSpec` names the method (any registered method, or a baseline: ``full`` fine-tuning,
``head`` only, ``untrained``), its options, the model, the task and the training settings.
:func:`train_run` checks the input and loads everything before it writes anything (unknown method or
task, bad options, numbers out of range or not finite, data files without the named columns, a single
class, empty splits, a model folder that does not load, a non-empty output folder without ``resume`` or
``overwrite``), trains with :class:`~subpeft.training.loop.Trainer`, and writes to the output folder
(JSON files replaced atomically; a run that fails before its first checkpoint leaves nothing behind):

* the adapter (``adapter_model.safetensors`` + ``adapter_config.json``; a baseline writes
  ``trainable.safetensors``, its trained tensors), ``best/`` when evaluating every N steps,
  ``checkpoints/last`` (what ``--resume`` continues from);
* ``run.json`` (the spec, so that ``subpeft eval`` and ``--resume`` need nothing else);
* ``metrics.json``: the task metric on held-out test data, losses, trainable parameters and %,
  wall time, peak memory;
* ``train.log``.

Peak memory on CPU is the rise of the process's maximum resident set size (``getrusage``
``ru_maxrss``) over the training loop: how far training pushed the process's memory high-water
mark above what loading the model and data had already reached (0 if it never rose above it). It
counts everything the process holds (weights, activations, gradients, optimizer state, allocator
caches), not tensors alone. On CUDA, ``torch.cuda.max_memory_allocated`` is reported as well.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.model import parameter_counts
from ..core.targets import CLASSIFICATION_HEAD_NAMES
from ..training.loop import FLOAT_SETTINGS, INT_SETTINGS, TrainArgs, TrainSettings, setting_problem
from .data import SPLITS, PairTask, Task, check_splits, load_data_file, load_task
from .models import DEFAULT_MODELS, ModelNameError, load_model, model_source

__all__ = [
    "BASELINES",
    "DEFAULT_LR",
    "RunLog",
    "RunSpec",
    "UsageError",
    "check_method_options",
    "check_out_dir",
    "default_lr",
    "eval_run",
    "load_run_base",
    "stored_spec",
    "train_run",
]

#: Baselines every comparison needs, accepted wherever a method name is.
BASELINES: dict[str, str] = {
    "full": "full fine-tuning: every parameter of the model trains",
    "head": "head only: the base model is frozen, only the fresh classification head trains",
    "untrained": "no training: the base model (with its fresh head) as loaded",
}

#: Default peak learning rate by method family (``--lr`` overrides). Chosen once, by family, from the
#: usual practice and not tuned per method: full fine-tuning 1e-4 (the BERT range 2e-5..1e-4, upper
#: end because runs here are short); low-rank and combination methods 2e-3 (LoRA's usual 1e-3..3e-3;
#: the demo's LoRA reaches ~70% on tweets with it); reconstruction methods, which train a few scales,
#: biases or singular values per layer, 5e-3; a head alone 5e-3; module adapters 1e-3; soft prompts
#: 1e-2 (prompt tuning's usual range is 1e-2..3e-1).
DEFAULT_LR: dict[str, float] = {
    "full": 1e-4,
    "head": 5e-3,
    "reconstruction": 5e-3,
    "extension": 2e-3,
    "combination": 2e-3,
    "framework": 2e-3,
    "module": 1e-3,
    "prompt": 1e-2,
}


class UsageError(ValueError):
    """Bad command-line input; the message says what to change. ``field``: the RunSpec field at fault, if one."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def option_name(field: str) -> str:
    """How a user sets a RunSpec field: its command-line flag, or its key in a --spec / run.json file."""
    if field in ("keep_checkpoint", "exact_match_limit", "processes"):
        return f"{field!r} (in the --spec/run.json file)"
    if field == "save":
        return "--no-save"
    if field == "options":
        return "the method options (--set/--config)"
    return "--" + field.replace("_", "-")


def _bad(field: str, rule: str, value: Any) -> UsageError:
    shown = repr(value) if isinstance(value, str) else value
    return UsageError(f"{option_name(field)} {rule}, got {shown}", field)


# A run's settings, checked by RunSpec.check with one rule each: the training settings' rules are the library's
# (subpeft.training.loop.INT_SETTINGS / FLOAT_SETTINGS), the app's own are here.
# integers: field -> (lowest, highest or None, None allowed)
_INT_FIELDS: dict[str, tuple[int, int | None, bool]] = {
    "max_steps": (*INT_SETTINGS["total_steps"], True),
    **{name: (*INT_SETTINGS[name], False) for name in ("batch_size", "grad_accum")},
    "max_length": (2, None, False),
    "seed": (*INT_SETTINGS["seed"], False), "split_seed": (*INT_SETTINGS["seed"], False),
    "train_size": (0, None, True), "dev_size": (0, None, True), "test_size": (0, None, True),
    **{name: (*INT_SETTINGS[name], False) for name in ("eval_every", "save_every")},
    "max_new_tokens": (1, None, False), "exact_match_limit": (0, None, True), "processes": (1, None, False),
}
_INT_HINTS = {
    "train_size": " (0: the whole split)", "dev_size": " (0: the whole 10% part)",
    "test_size": " (0: the whole 10% part)",
    "eval_every": " (0: never)", "save_every": " (0: only at the end and on Ctrl-C)",
    "max_length": " (tokens per example)",
}
# finite numbers: field -> (rule, None allowed); lr None: the method's default (default_lr)
_FLOAT_FIELDS: dict[str, tuple[str, bool]] = {
    "epochs": ("> 0", False),
    **{name: (rule, name in ("lr", *TrainArgs.OPTIONAL)) for name, rule in FLOAT_SETTINGS.items()},
}
_FLOAT_HINTS = {
    "max_grad_norm": " (the gradient clipping norm; default 1.0)", "lr": " (e.g. 2e-3)", "head_lr": " (e.g. 5e-3)",
    "warmup_ratio": " (the share of the steps spent warming up)", "weight_decay": " (default 0)",
}
_BOOL_FIELDS = ("load_best_at_end", "eval_before", "save", "keep_checkpoint")
_STR_FIELDS = ("model", "task", "data", "text_col", "label_col", "prompt_col", "response_col", "quantize", "device",
               "strategy", "score_split")


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    return False


def _check_options(options: Any) -> None:
    """Method options: a dict of names to JSON values, no NaN or infinity anywhere (a NaN option would
    only show up later as a NaN loss, blamed on the learning rate)."""
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise _bad("options", "must be a JSON object of option names to values", options)
    for key, value in options.items():
        if _non_finite(value):
            raise UsageError(f"method option {key}={value} (--set/--config): must be a finite number", "options")


DATA_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")


def _check_data_path(data: str) -> None:
    path = Path(data).expanduser()
    if path.is_dir():
        raise UsageError(f"--data {data!r} is a folder; give a .csv, .tsv or .jsonl file", "data")
    if not path.is_file():
        raise UsageError(f"--data {data!r} does not exist; give a .csv, .tsv or .jsonl file", "data")
    if path.suffix.lower() not in DATA_SUFFIXES:
        raise UsageError(f"--data {data!r}: unknown file type {path.suffix!r}; give a .csv, .tsv or .jsonl file",
                         "data")


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"--device {device!r}: not a device; use cpu, cuda or cuda:N", "device") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device!r}: CUDA is not available here; use --device cpu", "device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device!r}: there are {torch.cuda.device_count()} GPUs here", "device")


def method_family(method: str) -> tuple[str, str]:
    """(family, kind) of a method name or baseline; raises UsageError for an unknown name."""
    if method in BASELINES:
        return "baseline", "baseline"
    from ..core.errors import ConfigError
    from ..core.registry import get_method

    try:
        info = get_method(method)
    except ConfigError as exc:
        raise UsageError(f"{exc}. Baselines: {', '.join(BASELINES)}", "method") from None
    return info.family, info.kind


def default_lr(method: str) -> float:
    """The default learning rate of a method: by baseline, kind (module, prompt) or family."""
    if method in ("full", "head"):
        return DEFAULT_LR[method]
    if method == "untrained":
        return DEFAULT_LR["head"]
    family, kind = method_family(method)
    return DEFAULT_LR.get(kind) if kind in ("module", "prompt") else DEFAULT_LR.get(family, 1e-3)


@dataclass(kw_only=True)
class RunSpec(TrainSettings):
    """Everything one run depends on (saved as ``run.json``): the training settings (the library's
    :class:`~subpeft.training.loop.TrainSettings`, with the defaults below where they differ) and the
    experiment's own. Sizes of ``None`` mean the whole split."""

    method: str = "lora"
    options: dict[str, Any] = field(default_factory=dict)  # the method's config options
    model: str | None = None  # minilm | smollm2 | a folder; None: minilm (classification), smollm2 (generation)
    task: str | None = "tweets"
    data: str | None = None
    text_col: str | None = None
    label_col: str | None = None
    prompt_col: str | None = None
    response_col: str | None = None
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float | None = None  # None: DEFAULT_LR of the method's family
    # head_lr None: DEFAULT_LR["head"]
    max_length: int = 128
    # split sizes: train_size caps the training part (None or 0: all of it); dev_size and test_size ask for
    # exactly N examples (carved, growing the 10% part out of the training part when it is smaller; the
    # data must be large enough), 0 for the whole 10% part, None (default) for the 10% part capped at
    # DEFAULT_SIZES (1000 dev, 2000 test)
    train_size: int | None = 6400
    dev_size: int | None = None
    test_size: int | None = None
    # the seed of the train/dev/test split and its caps, apart from ``seed`` (init, batch order): runs with
    # several seeds see the same examples, so their spread measures the method and not the split
    split_seed: int = 0
    # the split the run's final score (metrics.json "test") is computed on: "test", or "dev" for a
    # learning-rate search run (subpeft compare --lr-grid): then the task's test split is replaced by its dev
    # split before anything is built, so the test examples are never read
    score_split: str = "test"
    save_every: int = 200
    eval_before: bool = False
    save: bool = True
    max_new_tokens: int = 32
    exact_match_limit: int | None = 200
    quantize: str | None = None
    device: str | None = None
    model_dropout: float | None = None  # the base model's own dropout rate (None: as the model has it)
    # several processes (torchrun): ddp or fsdp (None: ddp when launched so); batch_size is per process
    strategy: str | None = None
    processes: int = 1  # how many processes trained (recorded by train_run, not a setting)

    # options that may change when resuming (they do not change what is trained; a resumed run may use another
    # number of processes and strategy, with the same global batch). Not test_size: an exact size larger than
    # the 10% part moves examples out of the training part
    RESUME_FREE = ("save_every", "eval_before", "max_new_tokens", "exact_match_limit", "save",
                   "keep_checkpoint", "device", "load_best_at_end", "strategy", "processes")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UsageError(f"unknown run settings {unknown}; known: {sorted(names)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The fields, the experiment's first (method, options, model, task, ...), then the training settings."""
        data = dataclasses.asdict(self)
        shared = {f.name for f in dataclasses.fields(TrainSettings)}
        return {k: data[k] for k in sorted(data, key=lambda k: k in shared)}

    def check(self) -> None:
        """Raise :class:`UsageError` on settings that cannot work, before anything is loaded or written: every
        field's type and range (numbers finite), the method and its options' values, the task, the data
        file, the model folder and the device. The one place where a run's settings are validated (train,
        eval, compare and --resume all call it); the message names the option and what would be right."""
        for name, (low, high, optional) in _INT_FIELDS.items():
            value = getattr(self, name)
            if value is None and optional:
                continue
            problem = setting_problem(name, value, low=low, high=high)
            if problem:
                raise _bad(name, problem + _INT_HINTS.get(name, ""), value)
        for name, (rule, optional) in _FLOAT_FIELDS.items():
            value = getattr(self, name)
            if value is None and optional:
                continue
            problem = setting_problem(name, value, rule=rule)
            if problem:
                raise _bad(name, problem + _FLOAT_HINTS.get(name, ""), value)
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, "must be true or false", getattr(self, name))
        for name in _STR_FIELDS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise _bad(name, "must be a string", value)
        if not isinstance(self.method, str):
            raise _bad("method", "must be a method name (see 'subpeft methods')", self.method)
        method_family(self.method)
        _check_options(self.options)
        if self.method in BASELINES and self.options:
            raise UsageError(f"the baseline {self.method!r} takes no method options (got {sorted(self.options)})")
        if self.data is None and self.task is None:
            raise UsageError("give a task (--task tweets|reviews|chat) or a data file (--data FILE)")
        if self.data is None:
            from .data import TASKS

            if self.task not in TASKS:
                raise UsageError(f"unknown task {self.task!r} (--task); available: {', '.join(sorted(TASKS))} (or "
                                 "--data FILE for your own CSV/JSONL)", "task")
        else:
            _check_data_path(self.data)
        if self.model is not None:
            try:
                model_source(self.model, factory=False)
            except ModelNameError as exc:
                raise UsageError(f"--model {exc}", "model") from None
        if self.score_split not in ("test", "dev"):
            raise _bad("score_split", "must be 'test' or 'dev'", self.score_split)
        if self.quantize not in (None, "nf4"):
            raise _bad("quantize", "must be 'nf4'", self.quantize)
        if self.load_best_at_end and not self.eval_every:
            raise UsageError("--load-best-at-end needs --eval-every N (the best adapter is chosen on the dev split "
                             "every N steps)", "load_best_at_end")
        if self.device is not None:
            _check_device(self.device)
        if self.model_dropout is not None:
            problem = setting_problem("model_dropout", self.model_dropout, rule="in [0, 1]")
            if problem or self.model_dropout == 1:
                raise _bad("model_dropout", "must be a dropout rate in [0, 1) (0 turns the model's dropout off)",
                           self.model_dropout)
        if self.strategy not in (None, "ddp", "fsdp"):
            raise _bad("strategy", "must be ddp or fsdp (for several processes: torchrun --nproc-per-node N -m "
                       "subpeft train ...)", self.strategy)

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else default_lr(self.method)

    @property
    def resolved_head_lr(self) -> float:
        """The fresh head's lr: ``head_lr``, else the head baseline's, for every method alike (so that a
        comparison does not credit or blame a method for the speed its head learns at); for the head
        baseline itself, its lr."""
        if self.method == "head":
            return self.resolved_lr
        return self.head_lr if self.head_lr is not None else DEFAULT_LR["head"]

    def train_args(self, total_steps: int, heads: tuple[str, ...] = (), *, progress: bool = True) -> TrainArgs:
        """The library loop's settings for this run (the spec's training settings, the method's default lr
        resolved, a fresh head's lr when the model has ``heads``): the one place a run spec becomes them."""
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainSettings)}
        settings.update(lr=self.resolved_lr, head_lr=self.resolved_head_lr if heads else None)
        return TrainArgs(**settings, total_steps=total_steps, progress=progress, head_modules=tuple(heads),
                         keep_best=self.save or self.load_best_at_end)  # --no-save runs write no weights


class RunLog:
    """Lines to ``train.log`` (appended) and, unless quiet, to stderr (above the progress bar). Without a
    path the lines are kept until :meth:`open` names the file (a run writes nothing before it has
    checked its input and loaded its model)."""

    def __init__(self, path: str | os.PathLike | None = None, echo: bool = True, write: bool = True) -> None:
        self.path, self.echo = (Path(path) if path else None), echo
        self.write = write  # False: a log that keeps nothing (the ranks > 0 of a run in several processes)
        self.pending: list[str] = []

    def open(self, path: str | os.PathLike) -> None:
        """Write to ``path`` from now on, starting with the lines kept so far."""
        self.path = Path(path)
        lines, self.pending = self.pending, []
        self._write(lines)

    def _write(self, lines: list[str]) -> None:
        if self.path is None:
            self.pending += lines
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(lines)

    def __call__(self, message: str) -> None:
        if not self.write:
            return
        self._write([f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n"])
        if self.echo:
            from tqdm.auto import tqdm

            tqdm.write(message, file=sys.stderr)


# --------------------------------------------------------------------------- building blocks


#: the dev and test sizes of a run that names none: its 10% part, at most this many examples
DEFAULT_SIZES: dict[str, int] = {"dev": 1000, "test": 2000}


def _caps(spec: RunSpec) -> dict[str, int | None]:
    """Caps of the 80/10/10 parts: train_size (0/None: none); dev/test the default caps when no size is asked."""
    return {"train": spec.train_size or None,
            **{n: (DEFAULT_SIZES[n] if getattr(spec, f"{n}_size") is None else None) for n in ("dev", "test")}}


def _sizes(spec: RunSpec) -> dict[str, int | None]:
    """The exact dev/test sizes asked for (None: none asked, or 0: the whole part)."""
    return {n: getattr(spec, f"{n}_size") or None for n in ("dev", "test")}


def build_task(spec: RunSpec, need_dev: bool = False) -> Task | PairTask:
    """The task of the spec, checked: the train and test splits (and dev, if needed) are not empty. Split with
    ``split_seed``; with ``score_split="dev"`` the test split is replaced by the dev split (never read)."""
    need = ("train", "test", "dev") if need_dev else ("train", "test")
    if spec.data is not None:
        task = load_data_file(spec.data, text_col=spec.text_col, label_col=spec.label_col,
                              prompt_col=spec.prompt_col, response_col=spec.response_col, seed=spec.split_seed,
                              max_per_split=_caps(spec), sizes=_sizes(spec))
        source = spec.data
    else:
        task = load_task(spec.task, _caps(spec), seed=spec.split_seed, sizes=_sizes(spec))
        source = f"task {spec.task!r}"
    if spec.score_split == "dev":
        need = ("train", "dev")
        task = dataclasses.replace(task, test=task.dev)
    check_splits(task, source, need)
    return task


def upgrade_stored(data: dict[str, Any]) -> dict[str, Any]:
    """A run.json written before the split seed and exact split sizes, read as it was meant: the split came
    from the run's seed, and the stored dev/test sizes were caps (the old defaults 1000/2000 are the
    default caps now)."""
    if not isinstance(data, dict) or "split_seed" in data:
        return data
    data = {**data, "split_seed": data.get("seed", 0)}
    for name in ("dev", "test"):
        key = f"{name}_size"
        if data.get(key) == DEFAULT_SIZES[name]:
            data[key] = None
        elif key in data and data[key] is None:
            data[key] = 0  # None was the whole part
    return data


def model_name(spec: RunSpec, task: Task | PairTask) -> str:
    return spec.model if spec.model is not None else DEFAULT_MODELS[task.kind]


def load_base(spec: RunSpec, task: Task | PairTask):
    """(model, tokenizer) for the spec's model and the task's kind (:func:`subpeft.train.models.load_model`)."""
    from safetensors import SafetensorError

    name = model_name(spec, task)
    try:
        return load_model(name, task.kind, num_labels=getattr(task, "num_labels", None), seed=spec.seed,
                          factory=False)
    except ModelNameError as exc:
        raise UsageError(f"--model {exc}", "model") from None
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:  # a damaged or foreign folder
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--model {name}: cannot load the model: {first}", "model") from None


def _quantize(model: nn.Module, scheme: str) -> tuple[nn.Module, int]:
    """The base model's linear layers in 4 bits (QLoRA, :func:`subpeft.quant.quantize`), before the
    method is attached. Returns the model and the number of 4-bit layers."""
    from ..quant import is_quantized, quantize

    try:
        quantize(model, 4, quant_type=scheme)
    except ImportError as exc:  # bitsandbytes missing: the message names the pip command
        raise UsageError(f"--quantize {scheme}: {exc}") from None
    return model, sum(1 for m in model.modules() if is_quantized(m))


def head_modules(model: nn.Module) -> list[str]:
    """Names of the classification head modules (``classifier``, ``score``) of a sequence classifier."""
    return [n for n, _ in model.named_children() if n in CLASSIFICATION_HEAD_NAMES]


def total_steps(spec: RunSpec, num_train: int) -> int:
    if spec.max_steps is not None:
        return spec.max_steps
    per_epoch = math.ceil(num_train / spec.batch_size)
    return max(1, math.ceil(spec.epochs * per_epoch / spec.grad_accum))


def method_config(spec: RunSpec, model: nn.Module | None, task: Task | PairTask, steps: int):
    """The method's config from the spec's options, completed: a fresh classification head of ``model``
    trains with the adapter (``modules_to_save``), and ``total_steps`` (AdaLoRA's budget schedule) is the
    run's."""
    from ..core.errors import ConfigError
    from ..core.registry import config_from_dict, get_method

    info = get_method(spec.method)
    options = dict(spec.options)
    options.pop("method", None)
    options.pop("subpeft_version", None)
    fields = {f.name for f in dataclasses.fields(info.config_cls) if f.init}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise UsageError(f"{spec.method} has no option {', '.join(map(repr, unknown))} (--set/--config); its "
                         f"options are {', '.join(sorted(fields))}", "options")
    if model is not None and task.kind == "classification" and "modules_to_save" not in options:
        heads = head_modules(model)
        if heads:
            options["modules_to_save"] = heads
    if "total_steps" in fields and options.get("total_steps") is None:
        options["total_steps"] = steps
    try:
        config = config_from_dict({"method": spec.method, **options})
        # schedules given as a fraction of the run (or left to a run-length default) become optimizer steps
        resolve = getattr(config, "resolve_schedule", None)
        return resolve(steps) if callable(resolve) else config
    except (ConfigError, TypeError) as exc:
        raise UsageError(f"method option of {spec.method} (--set/--config): {exc}", "options") from None


def method_schedule(spec: RunSpec, config: Any, steps: int) -> dict[str, Any]:
    """The method's schedule options as the run resolved them, for metrics.json and train.log:
    ``{"run_steps": steps, option: {"given": what the spec said (None: the default), "steps": resolved}}``;
    {} for a method without schedule options."""
    names = getattr(config, "schedule_options", ())
    if not names:
        return {}
    out: dict[str, Any] = {"run_steps": steps}
    for name in names:
        out[name] = {"given": spec.options.get(name), "steps": getattr(config, name)}
    return out


def check_method_options(spec: RunSpec, task: Task | PairTask, steps: int) -> None:
    """Build the method's config from the spec's options (without the model): bad option names and values
    fail here, before the model is loaded."""
    if spec.method not in BASELINES:
        method_config(spec, None, task, steps)


def prepare_model(spec: RunSpec, model: nn.Module, task: Task | PairTask, steps: int) -> nn.Module:
    """Attach the method (or set up a baseline); the seed fixes the adapter's random init."""
    if spec.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if spec.method in ("head", "untrained"):
        heads = head_modules(model)
        if spec.method == "head" and not heads:
            raise UsageError("--method head needs a model with a fresh classification head (classifier/score); "
                             "for a generation task compare against 'untrained'")
        for name, p in model.named_parameters():
            p.requires_grad_(spec.method == "head" and name.split(".")[0] in heads)
        return model
    import subpeft as sp

    config = method_config(spec, model, task, steps)
    torch.manual_seed(spec.seed)
    return sp.attach(model, config)


def _max_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _device(spec: RunSpec) -> torch.device:
    if spec.device:
        return torch.device(spec.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------- train


def check_out_dir(out: Path, *, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse an output folder that a run would damage: a file, a folder inside a file, a non-empty folder
    without ``resume`` or ``overwrite``, ``resume`` without a checkpoint."""
    from ..training.files import run_files
    from ..training.loop import find_checkpoint

    if resume and overwrite:
        raise UsageError("give --resume (continue the run in --out) or --overwrite (replace it), not both")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file, not a folder; give a folder name")
    parent = out
    while not parent.exists() and parent.parent != parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"--out {str(out)!r}: {str(parent)!r} is a file, not a folder")
    if resume:
        if find_checkpoint(out) is None:
            from ..training.loop import ResumeError

            raise ResumeError(f"--resume: no checkpoint in {str(out / 'checkpoints' / 'last')!r}; start the run "
                              "without --resume")
    elif out.is_dir() and any(out.iterdir()) and not overwrite:
        what = "holds a run" if run_files(out) else "is not empty"
        raise UsageError(f"--out {str(out)!r} {what}: continue that run with --resume, replace it with --overwrite "
                         "(only the files a run writes are removed), or choose another --out")


def stored_spec(out: str | os.PathLike, given: dict[str, Any], processes: int = 1) -> dict[str, Any]:
    """The settings of the run in ``out`` (its run.json), for ``--resume``; :class:`UsageError` when ``given``
    (settings the user named) differ from them, except those a resumed run may change (``RESUME_FREE``).
    The trainer then checks the checkpoint against the same settings (:func:`subpeft.training.loop.settings_diff`).

    Resumed in another number of ``processes``, the run keeps its global batch: the per-process
    ``batch_size`` becomes the run's global batch / ``processes`` (a given ``--batch-size`` must be that)."""
    from ..training.files import read_json
    from ..training.loop import settings_diff

    run_json = Path(out) / "run.json"
    if not run_json.is_file():
        raise UsageError(f"--resume: no run in {out} (no run.json); start it without --resume")
    stored = upgrade_stored(read_json(run_json, "--resume"))
    saved = stored.get("processes", 1)
    if processes != saved and isinstance(stored.get("batch_size"), int) and isinstance(saved, int):
        total = stored["batch_size"] * saved
        if total % processes:
            raise UsageError(f"--resume with {processes} processes: the run's global batch, {total} examples "
                             f"({stored['batch_size']} in each of {saved} processes), cannot be split evenly over "
                             f"{processes}; resume with a number of processes that divides {total}", "batch_size")
        stored = {**stored, "batch_size": total // processes, "processes": processes}
    conflicts = settings_diff(stored, given, ignore=RunSpec.RESUME_FREE, was="run")
    if conflicts:
        raise UsageError(f"--resume with other settings than the run in {out}: {'; '.join(conflicts)}")
    return stored


#: relative_delta below this: the run "barely moved" its weights (a warning in the run's output)
BARELY_MOVED = 1e-4


def _adapter_movement(model: nn.Module) -> tuple[float, int] | str | None:
    """(‖ΔW‖_F / ‖W‖_F over every weight the active adapter changes, how many tensors); None when the adapter
    has no weight form (not mergeable); a string saying why not when it cannot be measured (merged, or the
    adapted tensors are all zero). Both norms are totals over the adapted layers (sqrt of the sums of squares). ΔW is ``delta_weight()`` for additive methods, else ``merged_params()``
    minus the base tensors (which also covers BitFit's biases and LayerNorm tuning's weights)."""
    from ..core.adapter import Adapter
    from ..core.layers import base_weight

    name = getattr(model, "active_adapter", None)
    if not name or not hasattr(model, "adapters_of") or not model.configs[name].mergeable:
        return None
    layers = dict(model.adapted_layers())
    moved = size = 0.0
    count = 0
    with torch.no_grad():
        for layer_name, adapter in model.adapters_of(name):
            layer = layers[layer_name]
            if name in layer.merged:
                return "the adapter is merged"
            base = layer.base_layer
            if type(adapter).merged_params is Adapter.merged_params:
                pairs = [(adapter.delta_weight(), base_weight(base))]
            else:
                merged = adapter.merged_params()
                pairs = [(merged[k].float() - (base_weight(base) if k == "weight" else getattr(base, k)).float(),
                          base_weight(base) if k == "weight" else getattr(base, k)) for k in merged]
            for delta, old in pairs:
                moved += float(delta.detach().float().pow(2).sum())
                size += float(old.detach().float().pow(2).sum())
                count += 1
    if count == 0:
        return "the adapter changes no weight"
    if size == 0.0:
        return "the adapted tensors are all zero in the base model (e.g. zero biases): no scale to compare with"
    return math.sqrt(moved) / math.sqrt(size), count


def _trained_tensors(spec: RunSpec, model: nn.Module) -> list[torch.Tensor]:
    """What a run without a weight delta trains: the adapter's own tensors (its head copies aside), or for the
    baselines every trainable parameter."""
    name = getattr(model, "active_adapter", None)
    if name and hasattr(model, "instances"):
        return list(model.instances[name].parameters())
    return [p for p in model.parameters() if p.requires_grad]


def movement(spec: RunSpec, model: nn.Module, start: list[torch.Tensor] | None) -> tuple[dict[str, Any] | None, str]:
    """metrics.json's ``"movement"``: ``{"relative_delta", "barely_moved", "what"}``, or (None, why not).

    Weight-space methods: ‖ΔW‖_F / ‖W‖_F over the adapted weights (:func:`_adapter_movement`). Methods without
    a weight delta (prompts, adapters, MPC_n) and the baselines ``full``/``head``: ‖θ − θ₀‖ / ‖θ₀‖ over the
    tensors the run trains, θ₀ copied when training started (``start``)."""
    weight = _adapter_movement(model)
    if isinstance(weight, str):
        return None, weight
    if weight is not None:
        rel, count = weight
        what = f"‖ΔW‖_F / ‖W‖_F over the {count} adapted weight tensors"
    else:
        if start is None:
            return None, "no weight delta, and the trained tensors' starting values were not kept"
        now = _trained_tensors(spec, model)
        if len(now) != len(start) or any(a.shape != b.shape for a, b in zip(now, start, strict=True)):
            return None, "the trained tensors changed form during the run (finalize)"
        moved = math.sqrt(sum(float((a.detach().float().cpu() - b).pow(2).sum()) for a, b in zip(now, start, strict=True)))
        size = math.sqrt(sum(float(b.pow(2).sum()) for b in start))
        if size == 0.0:
            return None, "the trained tensors started at zero: no scale to compare their change with"
        rel = moved / size
        what = (f"‖θ − θ₀‖ / ‖θ₀‖ over the {len(start)} trained tensors ("
                + ("no weight delta: " + spec.method if spec.method not in BASELINES else f"baseline {spec.method}") + ")")
    return {"relative_delta": rel, "barely_moved": rel < BARELY_MOVED,
            "what": what + f"; barely_moved: below {BARELY_MOVED:g}"}, ""


def train_run(
    spec: RunSpec,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    echo: bool = True,
    on_step=None,
) -> dict[str, Any]:
    """Train as the spec says, write the outputs to ``out_dir`` and return the metrics.

    Everything is checked and loaded before anything is written (the spec, the output folder, the data,
    the method options, the model, the checkpoint to resume). A non-empty ``out_dir`` needs ``resume``
    (continue its run from the checkpoint) or ``overwrite`` (replace its run: only the files a run writes
    are removed, right before the new run writes its own). A run that fails before its first checkpoint
    leaves nothing behind: the folders it created are removed, or else the files it wrote.
    """
    from .. import distributed as spd
    from ..training.files import first_missing, remove_created, remove_run_files, write_json
    from ..training.loop import ResumeError, Trainer, find_checkpoint, read_state
    from .workloads import make_workload

    wall = time.perf_counter()
    spec.check()
    # several processes (torchrun): the process group, this rank's device; rank 0 alone prints and writes
    device = spd.init(spec.device) if spd.launched() else _device(spec)
    spec.processes = spd.world_size()
    main = spd.is_main()
    progress, echo = progress and main, echo and main
    out = Path(out_dir)
    check_out_dir(out, resume=resume, overwrite=overwrite)
    if resume:
        read_state(find_checkpoint(out))  # a damaged checkpoint fails now, not after loading the model
    need_dev = spec.eval_every > 0 or spec.load_best_at_end
    task = build_task(spec, need_dev=need_dev)
    if spec.method == "head" and task.kind == "generation":
        raise UsageError("--method head needs a classification task (a causal LM has no fresh head); "
                         "compare against 'untrained' instead")
    steps = total_steps(spec, len(task.train))
    check_method_options(spec, task, steps)
    log = RunLog(echo=echo, write=main)  # kept until the folder is written
    log(f"data   {task.summary()}" + ("; scored on dev (a learning-rate search run: 'test' above is the dev split, "
                                       "the test split is not read)" if spec.score_split == "dev" else ""))

    model, tokenizer = load_base(spec, task)
    if spec.model_dropout is not None:
        from .models import set_model_dropout

        set_model_dropout(model, spec.model_dropout)
        log(f"model  dropout {spec.model_dropout:g} (--model-dropout)")
    quantized = None
    if spec.quantize:
        model, quantized = _quantize(model, spec.quantize)
        log(f"quantize {quantized} linear layers to 4-bit {spec.quantize}")
    model.to(device)
    workload = make_workload(task, tokenizer, max_length=spec.max_length, max_new_tokens=spec.max_new_tokens,
                             exact_match_limit=spec.exact_match_limit or None)
    before = None
    if spec.eval_before or spec.method == "untrained":
        before = workload.evaluate(model, "test")
        log(f"untrained test {workload.metric}: {before[workload.metric]:.4f}")

    heads = tuple(head_modules(model)) if task.kind == "classification" else ()  # before any wrapping
    model = prepare_model(spec, model, task, steps)
    # a method without a weight delta (and the baselines): its trained tensors' values before training, for
    # "movement"; taken before a resume loads the checkpoint (attach and the fresh head are seeded: a resumed
    # run starts from the same values)
    start = None
    name = getattr(model, "active_adapter", None)
    weight_form = bool(name) and hasattr(model, "configs") and model.configs[name].mergeable
    if spec.method != "untrained" and not weight_form and not (spec.processes > 1 and spec.strategy == "fsdp"):
        start = [t.detach().float().cpu().clone() for t in _trained_tensors(spec, model)]
    trainable, total = parameter_counts(model)
    family, kind = method_family(spec.method)
    log(f"model  {model_name(spec, task)} + {spec.method}: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / max(total, 1):.3f}%)")
    schedule = {}
    if hasattr(model, "configs") and getattr(model, "active_adapter", None):
        schedule = method_schedule(spec, model.configs[model.active_adapter], steps)
    if schedule:
        log("method schedule: " + ", ".join(
            f"{k} {v['steps']}" + ("" if v["given"] is None or v["given"] == v["steps"] else f" (given {v['given']!r})")
            for k, v in schedule.items() if k != "run_steps") + f" of {steps} optimizer steps")
    trainer = args = None
    if spec.method != "untrained":
        args = spec.train_args(steps, heads, progress=progress)
        trained = model
        if spec.processes > 1:
            strategy = spec.strategy or "ddp"
            trained = spd.wrap(model, strategy, device)
            log(f"run    {spec.processes} processes ({strategy}, {device.type}): {spec.batch_size} examples per "
                f"process and micro-batch, {spec.batch_size * spec.processes * spec.grad_accum} per optimizer step")
        elif spec.strategy is not None:
            log(f"run    one process: --strategy {spec.strategy} has no effect (launch with torchrun "
                "--nproc-per-node N -m subpeft train ...)")
        trainer = Trainer(trained, workload, args, out, log=log, on_step=on_step)
        if resume:
            trainer.resume()  # loads the checkpoint; changed settings fail before anything is written
    elif resume:
        raise ResumeError("--resume: the baseline 'untrained' does not train; run it again without --resume")

    # From here on the run writes to its folder (rank 0; the others wait until every rank has checked and
    # loaded everything). If it fails before its first checkpoint, it leaves nothing.
    spd.barrier()
    created = first_missing(out)
    try:
        if main:
            if overwrite:
                remove_run_files(out)
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / "run.json", spec.to_dict())
            log.open(out / "train.log")
        spd.barrier()
        state = None
        rss_before = _max_rss_mb()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if trainer is not None:
            per_step = f"{spec.batch_size}x{spec.grad_accum}" + (f"x{spec.processes} processes" if spec.processes > 1 else "")
            log(f"train  {steps} optimizer steps of {per_step} examples, lr {args.lr:g}"
                + (f" (head {args.head_lr:g})" if args.head_lr is not None else "") + f", seed {spec.seed}")
            try:
                state = trainer.train(resume=resume)
            except FloatingPointError as exc:
                raise FloatingPointError(_diverged(exc, spec)) from None
        rss_after = _max_rss_mb()
        memory = {
            "max_rss_mb": round(rss_after, 1),
            "max_rss_rise_during_training_mb": round(max(0.0, rss_after - rss_before), 1),
            "what": "rise of the process's max resident set size (getrusage ru_maxrss) over the training loop",
        }
        if device.type == "cuda":
            memory["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        if spec.processes > 1:  # every process's, rank by rank
            memory["per_process"] = spd.gather_objects({k: v for k, v in memory.items() if k != "what"})
        if spec.save and spec.method != "untrained":
            from ..training.loop import save_model_state

            save_model_state(model, out)

        moved, why_not = None, "the baseline 'untrained' does not train"
        if trainer is not None:
            if spec.processes > 1 and spec.strategy == "fsdp":
                why_not = "not measured under FSDP (the weights are sharded)"
            else:
                moved, why_not = movement(spec, model, start)
        if moved is not None and moved["barely_moved"]:
            log(f"warning: the weights barely moved: relative change {moved['relative_delta']:.2e} < {BARELY_MOVED:g} "
                f"({moved['what'].split(';')[0]}); the method may not have trained: check --lr (now {args.lr:g}) "
                "and --max-steps")
        # a learning-rate search run (score_split "dev": "test" is the dev split) needs the metric alone: a chat
        # model's exact match (greedy generation) is skipped there (compare scores the chosen run on test anew),
        # and where the loop already scored this very model on dev (its last eval), that score is the run's
        test = _dev_eval_of_final_model(spec, state)
        if test is None:
            test = workload.evaluate(model, "test", full=spec.score_split != "dev")
        metrics: dict[str, Any] = {
            "method": spec.method,
            "family": family,
            "model": model_name(spec, task),
            "task": spec.data or spec.task,
            "kind": task.kind,
            "metric": workload.metric,
            "greater_is_better": workload.greater_is_better,
            "seed": spec.seed,
            "lr": args.lr if trainer is not None else None,
            "head_lr": args.head_lr if trainer is not None else None,
            "test": test,
            "trainable_parameters": trainable if spec.method != "untrained" else 0,
            "total_parameters": total,
            "trainable_percent": 100 * trainable / max(total, 1) if spec.method != "untrained" else 0.0,
            "peak_memory": memory,
            "splits": {n: len(task.split(n)) for n in SPLITS},
        }
        if quantized is not None:
            metrics["quantized_layers"] = quantized
        if before is not None:
            metrics["untrained_test"] = before
        if state is not None:
            metrics.update(
                steps=state.global_step,
                epochs=state.micro / math.ceil(len(task.train) / spec.batch_size),
                train_seconds=state.seconds,
                train_loss_first=state.tail_loss(first=True),
                train_loss_last=state.tail_loss(),
                regularization_last=state.regularization[-1] if state.regularization else 0.0,
                events=state.events,  # the method's phase events (also in train.log)
            )
            if state.evals:
                metrics["dev"] = {"best_step": state.best_step, "best": state.best_score, "history": state.evals}
        if hasattr(model, "configs") and getattr(model, "active_adapter", None):
            metrics["config"] = model.configs[model.active_adapter].to_dict()
        if moved is not None:
            metrics["movement"] = moved
        else:
            metrics["movement_note"] = why_not
        if schedule:
            metrics["schedule"] = schedule  # the method's step options as this run resolved them
        metrics["wall_seconds"] = time.perf_counter() - wall
        if spec.processes > 1:
            metrics["processes"], metrics["strategy"] = spec.processes, spec.strategy or "ddp"
        if main:
            write_json(out / "metrics.json", metrics)
    except BaseException:
        if main and not resume and find_checkpoint(out) is None:  # nothing produced yet: leave nothing behind
            if created is not None:
                remove_created(created)
            else:
                remove_run_files(out)
        raise
    log(f"test   {workload.metric} {test[workload.metric]:.4f} ({test['examples']} examples); "
        f"wrote {out / 'metrics.json'}")
    return metrics


def _dev_eval_of_final_model(spec: RunSpec, state) -> dict[str, Any] | None:
    """A dev-scored run's score when the training loop has already computed it: its dev evaluation of the model
    the run ends with (the final step's, or the best step's under ``load_best_at_end``). The same model on the
    same split; only the batching differs (the loop's eval batch size), so the value agrees to float rounding.
    ``None`` when the run is scored on test or no evaluation saw that model."""
    if spec.score_split != "dev" or state is None or not state.evals:
        return None
    step = state.best_step if spec.load_best_at_end else state.global_step
    seen = [e for e in state.evals if e["step"] == step]
    if not seen:
        return None
    return {**{k: v for k, v in seen[-1].items() if k != "step"}, "from_dev_eval_at_step": step}


def _diverged(exc: FloatingPointError, spec: RunSpec) -> str:
    """The trainer's message about a non-finite loss, with the method options that could have caused it."""
    message = str(exc)
    if spec.options:
        shown = ", ".join(f"{k}={v}" for k, v in spec.options.items() if not isinstance(v, (list, dict, str)))
        if shown:
            message += f" (method options: {shown})"
    return message


# --------------------------------------------------------------------------- eval


def find_run_json(directory: Path) -> Path | None:
    """``run.json`` in the adapter folder or up to two levels above (``best/``, ``checkpoints/last``)."""
    for d in (directory, directory.parent, directory.parent.parent):
        if (d / "run.json").is_file():
            return d / "run.json"
    return None


def load_run_base(directory: str | os.PathLike, overrides: dict[str, Any] | None = None, *,
                  need_dev: bool = False) -> tuple[RunSpec, Task | PairTask, nn.Module, Any]:
    """The spec, task and fresh base model (and tokenizer) of the run that wrote ``directory``, read from
    the ``run.json`` beside it (or above it), with ``overrides`` (keys of :class:`RunSpec`) applied; the
    base is quantised as the run's was, so that an adapter trained on a 4-bit base sees that base."""
    from ..training.files import read_json

    directory = Path(directory)
    run_json = find_run_json(directory)
    data = upgrade_stored(read_json(run_json, "the run's settings")) if run_json else {}
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if "data" in overrides:
        data["task"] = None
    if not run_json and "task" not in overrides and "data" not in overrides:
        raise UsageError(f"no run.json near {str(directory)!r} (not written by subpeft train): name the task "
                         "(--task or --data) and the model (--model)")
    spec = RunSpec.from_dict({**data, **overrides})
    if (directory / "adapter_config.json").is_file():
        from ..core.io import read_config

        method = read_config(directory).get("method")
        if method:
            spec.method = method
    spec.check()
    task = build_task(spec, need_dev=need_dev)
    model, tokenizer = load_base(spec, task)
    if spec.quantize:
        model, _ = _quantize(model, spec.quantize)
    return spec, task, model, tokenizer


def eval_run(adapter_dir: str | os.PathLike, overrides: dict[str, Any] | None = None, *,
             split: str = "test") -> dict[str, Any]:
    """The metrics of a saved adapter (or baseline folder) on ``split``, with the run's own model and task
    unless ``overrides`` name others (keys of :class:`RunSpec`)."""
    import subpeft as sp

    directory = Path(adapter_dir)
    has_adapter = (directory / "adapter_config.json").is_file()
    has_trainable = (directory / "trainable.safetensors").is_file()
    if not directory.is_dir() or not (has_adapter or has_trainable):
        raise UsageError(f"{str(directory)!r} holds no adapter (adapter_config.json) and no trainable.safetensors")
    spec, task, model, tokenizer = load_run_base(directory, overrides, need_dev=split == "dev")
    if has_adapter:
        model = sp.load(model, str(directory))
    else:
        from safetensors.torch import load_file

        saved = load_file(str(directory / "trainable.safetensors"))
        result = model.load_state_dict(saved, strict=False)
        if result.unexpected_keys:
            raise UsageError(f"{directory / 'trainable.safetensors'} does not fit this model (unexpected keys "
                             f"{result.unexpected_keys[:3]}): was it trained on another model?")
    model.to(_device(spec))
    model.eval()
    from .workloads import make_workload

    workload = make_workload(task, tokenizer, max_length=spec.max_length, max_new_tokens=spec.max_new_tokens,
                             exact_match_limit=spec.exact_match_limit or None)
    start = time.perf_counter()
    scores = workload.evaluate(model, split)
    return {
        "adapter": str(directory),
        "method": spec.method,
        "model": model_name(spec, task),
        "task": spec.data or spec.task,
        "split": split,
        "metric": workload.metric,
        split: scores,
        "seconds": time.perf_counter() - start,
    }
