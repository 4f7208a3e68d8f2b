"""Files and folders the command line writes: atomic replacement, and a run folder that is never emptied
by accident.

* :func:`write_atomic` (the one in :mod:`subpeft.core.io`, which adapter files use too) writes a temporary
  file beside the target, flushes it to disk and renames it over the target, so that a reader, a crash or a
  full disk never sees half a file: either the old content or the new one.
* :func:`first_missing` / :func:`remove_created` let a command remove the folders it created when it fails
  before it has produced anything.
* :func:`run_files` and :func:`remove_run_files` name and remove the files a ``subpeft train`` run writes,
  and nothing else of its folder (``--overwrite``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..core.io import write_atomic

__all__ = [
    "CHECKPOINT_ENTRIES",
    "RUN_FILES",
    "first_missing",
    "read_json",
    "remove_created",
    "remove_run_files",
    "run_files",
    "write_atomic",
    "write_json",
]

#: files a ``subpeft train`` run writes at the top of its folder
RUN_FILES = ("adapter_model.safetensors", "adapter_config.json", "trainable.safetensors", "run.json",
             "metrics.json", "train.log")
#: what a run writes under ``checkpoints/`` (the checkpoint and the two names of an atomic swap)
CHECKPOINT_ENTRIES = ("last", ".last.tmp", ".last.old")
#: what a run writes under ``best/``
BEST_FILES = ("adapter_model.safetensors", "adapter_config.json", "trainable.safetensors", "best.json")


def write_json(path: str | os.PathLike, value: Any) -> Path:
    """``value`` as indented JSON, replacing ``path`` atomically."""
    return write_atomic(path, json.dumps(value, indent=2) + "\n")


class UnreadableFileError(ValueError):
    """A JSON file that is missing, truncated or not the expected object."""


def read_json(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """The JSON object in ``path``; :class:`UnreadableFileError` naming ``what`` (e.g. '--spec FILE') when the
    file is missing, not UTF-8, not JSON (e.g. truncated) or not an object."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UnreadableFileError(f"{what}: {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise UnreadableFileError(f"{what}: {str(path)!r} is a folder, not a JSON file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UnreadableFileError(f"{what}: cannot read {str(path)!r}: {exc}") from None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UnreadableFileError(f"{what}: {str(path)!r} is not valid JSON (truncated or damaged?): {exc}") from None
    if not isinstance(value, dict):
        raise UnreadableFileError(f"{what}: {str(path)!r} must hold a JSON object, got {type(value).__name__}")
    return value


def first_missing(path: str | os.PathLike) -> Path | None:
    """The outermost folder of ``path`` (``path`` itself included) that does not exist yet: what creating
    ``path`` with its parents would create. None if ``path`` exists."""
    path = Path(os.path.abspath(path))
    if path.exists():
        return None
    top = path
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    return top


def remove_created(top: Path | None) -> None:
    """Remove the folder tree ``top`` that this command created (see :func:`first_missing`)."""
    if top is not None:
        shutil.rmtree(top, ignore_errors=True)


def run_files(out: str | os.PathLike) -> list[Path]:
    """The files and folders of a ``subpeft train`` run that exist in ``out``."""
    out = Path(out)
    found = [out / name for name in RUN_FILES if (out / name).exists()]
    found += [out / "checkpoints" / name for name in CHECKPOINT_ENTRIES if (out / "checkpoints" / name).exists()]
    found += [out / "best" / name for name in BEST_FILES if (out / "best" / name).exists()]
    return found


def remove_run_files(out: str | os.PathLike) -> None:
    """Remove what a ``subpeft train`` run wrote in ``out`` (and ``checkpoints/`` and ``best/`` once empty);
    every other file stays."""
    out = Path(out)
    for path in run_files(out):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    for sub in ("checkpoints", "best"):
        try:
            (out / sub).rmdir()  # only when empty
        except OSError:
            pass
