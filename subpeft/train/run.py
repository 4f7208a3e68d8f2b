"""One training run, end to end: what ``subpeft train`` and ``subpeft eval`` do.

A :class:`RunSpec` names the method (any registered method, or a baseline: ``full`` fine-tuning,
``head`` only, ``untrained``), its options, the model, the task and the training settings.
:func:`train_run` builds everything, checks the input before any training (unknown method or task,
bad options, data files without the named columns, a single class, empty splits), trains with
:class:`~subpeft.train.trainer.Trainer`, and writes to the output folder:

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
import json
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import SPLITS, PairTask, Task, check_splits, load_data_file, load_task

__all__ = [
    "BASELINES",
    "DEFAULT_LR",
    "RunLog",
    "RunSpec",
    "UsageError",
    "default_lr",
    "eval_run",
    "load_run_base",
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

HEAD_NAMES = ("classifier", "score")


class UsageError(ValueError):
    """Bad command-line input; the message says what to change."""


def method_family(method: str) -> tuple[str, str]:
    """(family, kind) of a method name or baseline; raises UsageError for an unknown name."""
    if method in BASELINES:
        return "baseline", "baseline"
    from ..core.errors import ConfigError
    from ..core.registry import get_method

    try:
        info = get_method(method)
    except ConfigError as exc:
        raise UsageError(f"{exc}. Baselines: {', '.join(BASELINES)}") from None
    return info.family, info.kind


def default_lr(method: str) -> float:
    """The default learning rate of a method: by baseline, kind (module, prompt) or family."""
    if method in ("full", "head"):
        return DEFAULT_LR[method]
    if method == "untrained":
        return DEFAULT_LR["head"]
    family, kind = method_family(method)
    return DEFAULT_LR.get(kind) if kind in ("module", "prompt") else DEFAULT_LR.get(family, 1e-3)


@dataclass
class RunSpec:
    """Everything one run depends on (saved as ``run.json``). Sizes of ``None`` mean the whole split."""

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
    head_lr: float | None = None  # a fresh classification head's lr; None: DEFAULT_LR["head"]
    batch_size: int = 16
    grad_accum: int = 1
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_grad_norm: float | None = 1.0
    seed: int = 0
    max_length: int = 128
    train_size: int | None = 6400
    dev_size: int | None = 1000
    test_size: int | None = 2000
    eval_every: int = 0
    save_every: int = 200
    load_best_at_end: bool = False
    eval_before: bool = False
    save: bool = True
    keep_checkpoint: bool = True
    max_new_tokens: int = 32
    exact_match_limit: int | None = 200
    quantize: str | None = None
    device: str | None = None

    # options that may change when resuming (they do not change what is trained)
    RESUME_FREE = ("save_every", "eval_before", "test_size", "max_new_tokens", "exact_match_limit", "save",
                   "keep_checkpoint", "device", "load_best_at_end")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UsageError(f"unknown run settings {unknown}; known: {sorted(names)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self) -> None:
        """Raise UsageError on settings that cannot work (before anything is loaded)."""
        method_family(self.method)
        if self.method in BASELINES and self.options:
            raise UsageError(f"the baseline {self.method!r} takes no method options (got {sorted(self.options)})")
        if self.data is None and self.task is None:
            raise UsageError("give a task (--task tweets|chat) or a data file (--data FILE)")
        if self.data is None:
            from .data import TASKS

            if self.task not in TASKS:
                raise UsageError(f"unknown task {self.task!r}; available: {', '.join(sorted(TASKS))} "
                                 "(or --data FILE for your own CSV/JSONL)")
        for name in ("batch_size", "grad_accum", "max_length"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UsageError(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.max_steps is None and not self.epochs > 0:
            raise UsageError(f"--epochs must be > 0, got {self.epochs}")
        for name in ("lr", "head_lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        for name in ("train_size", "dev_size", "test_size"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 0 (0: the whole split), got {value}")
        if self.quantize not in (None, "nf4"):
            raise UsageError(f"--quantize must be 'nf4', got {self.quantize!r}")

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


class RunLog:
    """Lines to ``train.log`` (appended) and, unless quiet, to stderr (above the progress bar)."""

    def __init__(self, path: str | os.PathLike | None, echo: bool = True) -> None:
        self.path, self.echo = (Path(path) if path else None), echo

    def __call__(self, message: str) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        if self.echo:
            from tqdm.auto import tqdm

            tqdm.write(message, file=sys.stderr)


# --------------------------------------------------------------------------- building blocks


def _caps(spec: RunSpec) -> dict[str, int | None]:
    return {n: (getattr(spec, f"{n}_size") or None) for n in SPLITS}


def build_task(spec: RunSpec, need_dev: bool = False) -> Task | PairTask:
    """The task of the spec, checked: the train and test splits (and dev, if needed) are not empty."""
    need = ("train", "test", "dev") if need_dev else ("train", "test")
    if spec.data is not None:
        task = load_data_file(spec.data, text_col=spec.text_col, label_col=spec.label_col,
                              prompt_col=spec.prompt_col, response_col=spec.response_col, seed=spec.seed,
                              max_per_split=_caps(spec))
        check_splits(task, spec.data, need)
        return task
    task = load_task(spec.task, _caps(spec), seed=spec.seed)
    check_splits(task, f"task {spec.task!r}", need)
    return task


def model_name(spec: RunSpec, task: Task | PairTask) -> str:
    if spec.model is not None:
        return spec.model
    return "smollm2" if task.kind == "generation" else "minilm"


def load_base(spec: RunSpec, task: Task | PairTask):
    """(model, tokenizer) for the spec's model and the task's kind."""
    from .models import load_folder, load_minilm_classifier, minilm_path, smollm2_path

    name = model_name(spec, task)
    if name == "minilm":
        if task.kind == "generation":
            raise UsageError("minilm is an encoder and cannot generate: use --model smollm2 (or a causal LM folder) "
                             "for a generation task")
        return load_minilm_classifier(task.num_labels, seed=spec.seed, path=minilm_path())
    if name == "smollm2":
        path = smollm2_path()
    elif Path(name).expanduser().is_dir():
        path = name
    else:
        raise UsageError(f"unknown model {name!r}: use minilm, smollm2 or a local Hugging Face model folder "
                         "(one holding config.json)")
    return load_folder(path, task.kind, num_labels=getattr(task, "num_labels", None), seed=spec.seed)


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
    return [n for n, _ in model.named_children() if n in HEAD_NAMES]


def total_steps(spec: RunSpec, num_train: int) -> int:
    if spec.max_steps is not None:
        return spec.max_steps
    per_epoch = math.ceil(num_train / spec.batch_size)
    return max(1, math.ceil(spec.epochs * per_epoch / spec.grad_accum))


def method_config(spec: RunSpec, model: nn.Module, task: Task | PairTask, steps: int):
    """The method's config from the spec's options, completed: a fresh classification head trains with
    the adapter (``modules_to_save``), and ``total_steps`` (AdaLoRA's budget schedule) is the run's."""
    from ..core.errors import ConfigError
    from ..core.registry import config_from_dict, get_method

    info = get_method(spec.method)
    options = dict(spec.options)
    options.pop("method", None)
    options.pop("subpeft_version", None)
    fields = {f.name for f in dataclasses.fields(info.config_cls) if f.init}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise UsageError(f"{spec.method} has no option {', '.join(map(repr, unknown))}; its options are "
                         f"{', '.join(sorted(fields))}")
    if task.kind == "classification" and "modules_to_save" not in options:
        heads = head_modules(model)
        if heads:
            options["modules_to_save"] = heads
    if "total_steps" in fields and options.get("total_steps") is None:
        options["total_steps"] = steps
    try:
        return config_from_dict({"method": spec.method, **options})
    except (ConfigError, TypeError) as exc:
        raise UsageError(f"{spec.method} options {options}: {exc}") from None


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


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def _max_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _device(spec: RunSpec) -> torch.device:
    if spec.device:
        return torch.device(spec.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------- train


def train_run(
    spec: RunSpec,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
    echo: bool = True,
    on_step=None,
) -> dict[str, Any]:
    """Train as the spec says, write the outputs to ``out_dir`` and return the metrics."""
    from .trainer import TrainArgs, Trainer
    from .workloads import make_workload

    wall = time.perf_counter()
    spec.check()
    out = Path(out_dir)
    need_dev = spec.eval_every > 0 or spec.load_best_at_end
    task = build_task(spec, need_dev=need_dev)
    if spec.method == "head" and task.kind == "generation":
        raise UsageError("--method head needs a classification task (a causal LM has no fresh head); "
                         "compare against 'untrained' instead")
    if not resume:
        for sub in ("checkpoints", "best"):
            shutil.rmtree(out / sub, ignore_errors=True)
        for name in ("metrics.json", "train.log"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    log = RunLog(out / "train.log", echo=echo)
    (out / "run.json").write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
    log(f"data   {task.summary()}")

    model, tokenizer = load_base(spec, task)
    quantized = None
    if spec.quantize:
        model, quantized = _quantize(model, spec.quantize)
        log(f"quantize {quantized} linear layers to 4-bit {spec.quantize}")
    device = _device(spec)
    model.to(device)
    workload = make_workload(task, tokenizer, max_length=spec.max_length, max_new_tokens=spec.max_new_tokens,
                             exact_match_limit=spec.exact_match_limit or None)
    steps = total_steps(spec, len(task.train))
    before = None
    if spec.eval_before or spec.method == "untrained":
        before = workload.evaluate(model, "test")
        log(f"untrained test {workload.metric}: {before[workload.metric]:.4f}")

    heads = tuple(head_modules(model)) if task.kind == "classification" else ()  # before any wrapping
    model = prepare_model(spec, model, task, steps)
    trainable, total = parameter_counts(model)
    family, kind = method_family(spec.method)
    log(f"model  {model_name(spec, task)} + {spec.method}: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / max(total, 1):.3f}%)")

    state = None
    rss_before = _max_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if spec.method != "untrained":
        args = TrainArgs(
            total_steps=steps, lr=spec.resolved_lr, batch_size=spec.batch_size, grad_accum=spec.grad_accum,
            weight_decay=spec.weight_decay, warmup_ratio=spec.warmup_ratio, max_grad_norm=spec.max_grad_norm,
            seed=spec.seed, eval_every=spec.eval_every, save_every=spec.save_every,
            load_best_at_end=spec.load_best_at_end, keep_checkpoint=spec.keep_checkpoint, progress=progress,
            head_lr=spec.resolved_head_lr if heads else None, head_modules=heads,
        )
        log(f"train  {steps} optimizer steps of {spec.batch_size}x{spec.grad_accum} examples, lr {args.lr:g}"
            + (f" (head {args.head_lr:g})" if args.head_lr is not None else "") + f", seed {spec.seed}")
        trainer = Trainer(model, workload, args, out, log=log, on_step=on_step)
        state = trainer.train(resume=resume)
        if hasattr(model, "finalize") and callable(model.finalize):
            model.finalize()
    rss_after = _max_rss_mb()
    memory = {
        "max_rss_mb": round(rss_after, 1),
        "max_rss_rise_during_training_mb": round(max(0.0, rss_after - rss_before), 1),
        "what": "rise of the process's max resident set size (getrusage ru_maxrss) over the training loop",
    }
    if device.type == "cuda":
        memory["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    if spec.save and spec.method != "untrained":
        from .trainer import save_model_state

        save_model_state(model, out)

    test = workload.evaluate(model, "test")
    metrics: dict[str, Any] = {
        "method": spec.method,
        "family": family,
        "model": model_name(spec, task),
        "task": spec.data or spec.task,
        "kind": task.kind,
        "metric": workload.metric,
        "greater_is_better": workload.greater_is_better,
        "seed": spec.seed,
        "lr": spec.resolved_lr if spec.method != "untrained" else None,
        "head_lr": spec.resolved_head_lr if spec.method != "untrained" and heads else None,
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
        )
        if state.evals:
            metrics["dev"] = {"best_step": state.best_step, "best": state.best_score, "history": state.evals}
    if hasattr(model, "configs") and getattr(model, "active_adapter", None):
        metrics["config"] = model.configs[model.active_adapter].to_dict()
    metrics["wall_seconds"] = time.perf_counter() - wall
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log(f"test   {workload.metric} {test[workload.metric]:.4f} ({test['examples']} examples); "
        f"wrote {out / 'metrics.json'}")
    return metrics


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
    directory = Path(directory)
    run_json = find_run_json(directory)
    data = json.loads(run_json.read_text()) if run_json else {}
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
