"""Adapter files: ``adapter_model.safetensors`` (tensors) + ``adapter_config.json`` (config).

Writes are atomic: both files are written in full to temporary names in the target directory
and only then renamed over the old ones, so an interrupted save leaves the earlier adapter intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import AdapterLoadError

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


def _fsync_write(path: str, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_adapter(
    directory: str | os.PathLike,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    weights = save(payload, metadata={"format": "pt", **(metadata or {})})
    cfg = (json.dumps(config, indent=2, sort_keys=True, default=_json_default) + "\n").encode()
    tmps: list[str] = []
    try:
        for data, final in ((weights, WEIGHTS_NAME), (cfg, CONFIG_NAME)):
            fd, tmp = tempfile.mkstemp(prefix=f".{final}.", suffix=".tmp", dir=directory)
            os.close(fd)
            tmps.append(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; keep the usual permissions
            _fsync_write(tmp, data)
        os.replace(tmps[0], directory / WEIGHTS_NAME)
        os.replace(tmps[1], directory / CONFIG_NAME)
        tmps.clear()
    finally:
        for tmp in tmps:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset, tuple)):
        return sorted(obj) if isinstance(obj, (set, frozenset)) else list(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to an adapter config")


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise AdapterLoadError(f"no {CONFIG_NAME} in {str(directory)!r}: not an adapter directory")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterLoadError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise AdapterLoadError(f"{path} must hold a JSON object")
    return data


def read_tensors(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of the adapter file; a clear error for a bad file."""
    from safetensors import safe_open

    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        hint = " (a pickled adapter_model.bin is not read: convert it to safetensors)" if (
            Path(directory) / "adapter_model.bin"
        ).exists() else ""
        raise AdapterLoadError(f"no {WEIGHTS_NAME} in {str(directory)!r}{hint}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several error types
        raise AdapterLoadError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {type(exc).__name__}: {exc}"
        ) from None
    return tensors, metadata
