"""Adapter files: ``adapter_model.safetensors`` (tensors) + ``adapter_config.json`` (config).

The two files are one adapter: a save replaces them as a pair, and a load never combines the
tensors of one save with the config of another (new weights under an old ``alpha`` would load
silently and match neither adapter).

- **The weights record their config.** The safetensors metadata of every file subpeft writes holds
  ``subpeft_config_sha256``, the SHA-256 of the exact ``adapter_config.json`` bytes written with it,
  and ``subpeft_config``, that config as compact JSON. ``adapter_config.json`` itself stays exactly
  what PEFT reads (PEFT ignores the metadata).
- **A save commits at one rename.** Both files are written in full (and fsynced) to temporary
  names in the target directory, then renamed: the config to ``adapter_config.json.pending``, the
  weights over ``adapter_model.safetensors`` (the commit point), and the pending config over
  ``adapter_config.json``. Killed before the weights' rename, the directory still holds the old pair
  (the pending config's hash does not match the old weights, so it is ignored); killed after it,
  the new weights and the pending config that matches them.
- **Loading rolls an interrupted commit forward**: a pending config whose hash matches the
  weights is renamed over ``adapter_config.json`` (or only read, in a read-only directory). Then
  the config must match the weights' record: the same bytes, or the same content apart from
  bookkeeping keys (``base_model_name_or_path``, ``revision``, ``inference_mode``, versions), so
  that such edits by hand are fine. Anything else is an :class:`AdapterLoadError` naming the keys
  that differ (a config changed on purpose is accepted with :func:`adopt_config`). Files without a
  record (written by PEFT or an older subpeft) load as before.
- **The next save cleans up**: it first completes or discards a pending config, and removes the
  temporary files (``.adapter_model.safetensors.*.tmp``, ``.adapter_config.json.*.tmp``) a killed
  save left. One process writes a directory at a time (in distributed runs, rank 0).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import AdapterLoadError

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PENDING_NAME = CONFIG_NAME + ".pending"
HASH_KEY = "subpeft_config_sha256"  # safetensors metadata: hash of the config bytes saved with the weights
RECORD_KEY = "subpeft_config"  # safetensors metadata: that config as compact JSON
# config keys that say where an adapter came from, not what it computes: edits to them are fine
_BOOKKEEPING = frozenset({"base_model_name_or_path", "revision", "inference_mode", "peft_version", "subpeft_version"})


def write_temp(directory: str | os.PathLike, final: str, data: bytes) -> str:
    """``data`` in full (flushed to disk, the usual permissions) under a new temporary name
    ``.<final>.*.tmp`` in ``directory``; the caller renames it into place. Nothing is left on failure."""
    fd, tmp = tempfile.mkstemp(prefix=f".{final}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; keep the usual permissions
        _fsync_write(tmp, data)
    except BaseException:
        _unlink(tmp)
        raise
    return tmp


def _fsync_write(path: str, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Replace ``path`` with ``data`` (text as UTF-8) atomically: a reader, a crash or a full disk sees the
    old content or the new one, never half a file. The parent folder must exist; no temporary is left."""
    path = Path(path)
    tmp = write_temp(path.parent, path.name, data.encode("utf-8") if isinstance(data, str) else data)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    return path


def _unlink(path: str | os.PathLike) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(directory: Path) -> None:
    """Make the renames in ``directory`` durable (where the platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config_bytes(config: dict[str, Any]) -> bytes:
    """The bytes of ``adapter_config.json`` for a config dict."""
    return (json.dumps(config, indent=2, sort_keys=True, default=_json_default) + "\n").encode()


def write_adapter(
    directory: str | os.PathLike,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write the adapter pair into ``directory`` as one commit (see the module docstring)."""
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = config_bytes(config)
    digest = _sha256(cfg)
    record = json.dumps(config, sort_keys=True, separators=(",", ":"), default=_json_default)
    payload = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    weights = save(payload, metadata={"format": "pt", **(metadata or {}), HASH_KEY: digest, RECORD_KEY: record})
    _resolve_pending(directory)  # an earlier interrupted save: complete it (or drop its stale config) first
    _remove_stale_temporaries(directory)
    tmps: list[str] = []
    try:
        for data, final in ((weights, WEIGHTS_NAME), (cfg, CONFIG_NAME)):
            tmps.append(write_temp(directory, final, data))
        weights_tmp, config_tmp = tmps
        os.replace(config_tmp, directory / PENDING_NAME)
        tmps.remove(config_tmp)
        os.replace(weights_tmp, directory / WEIGHTS_NAME)  # the commit point
        tmps.remove(weights_tmp)
        try:
            os.replace(directory / PENDING_NAME, directory / CONFIG_NAME)
        except FileNotFoundError:  # a concurrent load completed the commit for us
            if _read_bytes(directory / CONFIG_NAME) != cfg:
                raise
        _fsync_dir(directory)
    finally:
        for tmp in tmps:
            _unlink(tmp)


def _remove_stale_temporaries(directory: Path) -> None:
    """Temporary files a killed save left (never a committed file)."""
    for final in (WEIGHTS_NAME, CONFIG_NAME):
        for path in directory.glob(f".{final}.*.tmp"):
            try:
                path.unlink()
            except OSError:
                pass


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _weights_metadata(directory: Path) -> dict[str, str] | None:
    """The safetensors metadata of the adapter's weights file; None if there is none or it is unreadable
    (read_tensors reports that)."""
    from safetensors import safe_open

    path = directory / WEIGHTS_NAME
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception:  # noqa: BLE001 - safetensors raises several error types
        return None


def _resolve_pending(directory: Path) -> bytes | None:
    """Complete an interrupted save: a pending config that matches the weights' recorded hash becomes
    ``adapter_config.json`` (its bytes are returned, also when the directory is read-only); a pending
    config that does not match belongs to a save killed before its commit and is ignored (None).
    Only a save removes such a stale pending config, so that a load never races a running save."""
    pending = _read_bytes(directory / PENDING_NAME)
    if pending is None:
        return None
    meta = _weights_metadata(directory) or {}
    if meta.get(HASH_KEY) != _sha256(pending):
        return None
    try:
        os.replace(directory / PENDING_NAME, directory / CONFIG_NAME)
        _fsync_dir(directory)
    except FileNotFoundError:  # the save that wrote it completed it meanwhile
        pass
    except OSError:  # read-only: use it without renaming
        pass
    return pending


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset, tuple)):
        return sorted(obj) if isinstance(obj, (set, frozenset)) else list(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to an adapter config")


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The adapter's config dict, after completing an interrupted save and checking that it belongs
    with the weights file beside it (see the module docstring)."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    raw = _resolve_pending(directory)
    if raw is None:
        raw = _read_bytes(path)
    if raw is None:
        raise AdapterLoadError(f"no {CONFIG_NAME} in {str(directory)!r}: not an adapter directory")
    data = _parse_config(raw, path)
    meta = _weights_metadata(directory)
    if meta and HASH_KEY in meta and meta[HASH_KEY] != _sha256(raw):
        _check_same_adapter(data, meta.get(RECORD_KEY), directory)
    return data


def _parse_config(raw: bytes, path: Path) -> dict[str, Any]:
    try:
        data = json.loads(raw.decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterLoadError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise AdapterLoadError(f"{path} must hold a JSON object")
    return data


def _check_same_adapter(data: dict[str, Any], record: str | None, directory: Path) -> None:
    """The config file differs from the bytes saved with the weights: fine if only bookkeeping keys
    (or the formatting) changed, an AdapterLoadError otherwise."""
    try:
        saved = json.loads(record) if record is not None else None
    except json.JSONDecodeError:
        saved = None
    if isinstance(saved, dict):
        keys = sorted(k for k in set(data) | set(saved) if k not in _BOOKKEEPING and data.get(k) != saved.get(k))
        if not keys:
            return
        shown = ", ".join(f"{k}: {saved.get(k)!r} saved with the weights, {data.get(k)!r} in the file" for k in keys[:3])
        more = f" (and {len(keys) - 3} more)" if len(keys) > 3 else ""
    else:
        shown, more = "its hash differs from the one recorded in the weights", ""
    raise AdapterLoadError(
        f"{CONFIG_NAME} and {WEIGHTS_NAME} in {str(directory)!r} come from different saves ({shown}{more}): "
        f"the pair would load as an adapter that matches neither; copy both files from one save (if the config "
        f"was edited on purpose, subpeft.core.io.adopt_config(directory) makes the weights accept it)"
    )


def adopt_config(directory: str | os.PathLike) -> None:
    """Accept ``adapter_config.json`` as it now is (edited on purpose) as the weights' config: the pair
    is written again, atomically, with the weights recording this config."""
    directory = Path(directory)
    raw = _resolve_pending(directory) or _read_bytes(directory / CONFIG_NAME)
    if raw is None:
        raise AdapterLoadError(f"no {CONFIG_NAME} in {str(directory)!r}: not an adapter directory")
    config = _parse_config(raw, directory / CONFIG_NAME)
    tensors, metadata = read_tensors(directory)
    metadata = {k: v for k, v in metadata.items() if k not in (HASH_KEY, RECORD_KEY, "format")}
    write_adapter(directory, config, tensors, metadata)


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
