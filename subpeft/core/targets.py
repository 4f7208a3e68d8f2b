"""Which modules a config adapts: exact names, dotted suffixes, regexes, "all-linear"."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator

from torch import nn

from .errors import TargetError, UnsupportedLayerError
from .layers import layer_type

#: The freshly initialised classification heads of Hugging Face sequence classifiers
#: (``*ForSequenceClassification``): ``subpeft train`` trains them with the adapter (``modules_to_save``).
CLASSIFICATION_HEAD_NAMES: tuple[str, ...] = ("classifier", "score")
#: Output heads, the one list: a module lies in an output head when one of its dotted name components is
#: one of these (:func:`is_output_head`). ``targets="all-linear"`` never adapts them and
#: :func:`subpeft.quant.quantize` keeps them in full precision, as it does the model's
#: ``get_output_embeddings()`` whatever its name.
OUTPUT_HEAD_NAMES: tuple[str, ...] = ("lm_head", *CLASSIFICATION_HEAD_NAMES, "qa_outputs", "pre_classifier", "head")
HEAD_NAMES = OUTPUT_HEAD_NAMES  # the former name


def is_output_head(name: str) -> bool:
    """Whether the module ``name`` lies in an output head (``classifier`` and ``classifier.out_proj`` do)."""
    return any(part in OUTPUT_HEAD_NAMES for part in name.split("."))

# Defaults for `targets=None`, by transformers model_type: attention query and value, as PEFT does.
DEFAULT_TARGETS = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "t5": ["q", "v"],
    "opt": ["q_proj", "v_proj"],
}


def iter_candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules of the model, treating subpeft's own wrappers as leaves."""
    from .layer import AdaptedLayer, TrainableCopy

    def walk(prefix: str, module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            yield full, child
            if not isinstance(child, (AdaptedLayer, TrainableCopy)):
                yield from walk(full, child)

    yield from walk("", model)


def candidate_type(module: nn.Module) -> str | None:
    from .layer import AdaptedLayer

    if isinstance(module, AdaptedLayer):
        return module.layer_type
    return layer_type(module)


def name_matches(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def _close_names(entry: str, names: list[str]) -> list[str]:
    suffixes: dict[str, str] = {}
    for n in names:
        parts = n.split(".")
        for i in range(len(parts)):
            suffixes.setdefault(".".join(parts[i:]), n)
    close = difflib.get_close_matches(entry, list(suffixes), n=5, cutoff=0.5)
    return [suffixes[c] if c == suffixes[c] else c for c in close]


def _match(names: list[str], spec: list[str] | str, what: str) -> set[str]:
    if isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as exc:
            raise TargetError(f"{what} {spec!r} is not a valid regular expression: {exc}") from None
        return {n for n in names if pattern.fullmatch(n)}
    matched: set[str] = set()
    for entry in spec:
        hits = {n for n in names if name_matches(n, entry)}
        if not hits:
            close = _close_names(entry, names)
            hint = f"; closest module names: {', '.join(close)}" if close else ""
            raise TargetError(f"{what} entry {entry!r} matches no module of the model{hint}")
        matched |= hits
    return matched


def output_head_names(model: nn.Module, names: list[str], modules: dict[str, nn.Module]) -> set[str]:
    heads = {n for n in names if is_output_head(n)}
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except Exception:  # noqa: BLE001 - some models raise instead of returning None
            out = None
        if out is not None:
            heads |= {n for n, m in modules.items() if m is out or getattr(m, "base_layer", None) is out}
    return heads


def default_targets(model: nn.Module) -> list[str] | None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return DEFAULT_TARGETS.get(model_type)


def find_targets(
    model: nn.Module,
    targets: list[str] | str | None,
    exclude: list[str] | str | None,
    *,
    method: str,
    supported: tuple[str, ...],
    accepts: Callable[[nn.Module, str], bool] | None = None,
) -> list[str]:
    """Names of the modules to adapt, in model order. Raises on every ambiguity a user can fix.

    ``targets="all"`` selects every module of a supported layer type that the method accepts
    (e.g. every bias for BitFit, every norm for LayerNorm tuning).
    """
    accepts = accepts or (lambda module, kind: True)
    modules = dict(iter_candidates(model))
    names = list(modules)
    if targets is None:
        targets = default_targets(model)
        if targets is None:
            raise TargetError(
                f"{method}: no default targets for this model; pass targets= (module names, a regex, "
                f"or 'all-linear')"
            )
    if targets == "all-linear":
        heads = output_head_names(model, names, modules)
        chosen = {n for n in names if candidate_type(modules[n]) in ("linear", "conv1d") and n not in heads}
    elif targets == "all":
        chosen = {
            n for n in names
            if candidate_type(modules[n]) in supported and accepts(_unwrapped(modules[n]), candidate_type(modules[n]))
        }
    else:
        chosen = _match(names, targets, "targets")
    if exclude is not None:
        chosen -= _match(names, exclude, "exclude")
    if not chosen:
        raise TargetError(f"{method}: targets={targets!r} (exclude={exclude!r}) selects no module of the model")
    for n in sorted(chosen):
        kind = candidate_type(modules[n])
        if kind not in supported:
            raise UnsupportedLayerError(
                f"{method} cannot adapt module {n!r} of type {type(modules[n]).__name__}; it supports "
                f"{', '.join(supported)} layers (nn.Linear, transformers Conv1D, nn.Embedding, nn.Conv2d "
                f"as listed). Narrow targets= to layers of those types."
            )
        if not accepts(_unwrapped(modules[n]), kind):
            raise UnsupportedLayerError(
                f"{method} cannot adapt module {n!r} ({type(_unwrapped(modules[n])).__name__}): it lacks what "
                f"the method trains (e.g. a bias for BitFit). Exclude it or narrow targets=."
            )
    return [n for n in names if n in chosen]


def _unwrapped(module: nn.Module) -> nn.Module:
    from .layer import AdaptedLayer

    return module.base_layer if isinstance(module, AdaptedLayer) else module


def find_modules_to_save(model: nn.Module, entries: list[str]) -> list[str]:
    modules = dict(iter_candidates(model))
    names = list(modules)
    chosen = _match(names, entries, "modules_to_save")
    # keep outermost matches only (a module and its child both matching would double-wrap)
    outer = [n for n in names if n in chosen and not any(n.startswith(o + ".") for o in chosen if o != n)]
    return outer
