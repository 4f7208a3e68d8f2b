"""TunedModel: a base model with named adapters attached.

It forwards exactly like the base model (all arguments, HF ``generate``, attribute access) and
adds the adapter life cycle: add / set / delete adapters, merge / unmerge / unload, disable,
save / load, and the two training-time hooks ``regularization()`` and ``step(global_step)``.

Each named adapter is a method instance (:class:`~subpeft.core.instance.MethodInstance`, kept in
``instances``): the TunedModel has it inject and remove itself, asks it for its parameters, hooks,
file state and call wrapper, and never asks what kind of method it is. What it does itself is common
to every method: the ``modules_to_save`` copies, the active set, and merging, disabling and unwrapping
the :class:`~subpeft.core.layer.AdaptedLayer` s that any instance may have put in.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .adapter import Adapter
from .config import AdapterConfig
from .errors import AdapterLoadError, AdapterLoadWarning, AdapterNameError, ConfigError, SubpeftError
from .instance import FILE_PREFIX, MethodInstance
from .io import read_config, read_tensors, write_adapter
from .layer import AdaptedLayer, TrainableCopy, densify_model, set_submodule
from .registry import config_from_dict, method_for_config
from .targets import find_modules_to_save
from .weights import weight_access

__all__ = ["FILE_PREFIX", "TunedModel", "attach", "load", "parameter_counts"]
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters of any model, tuned or not: the one count (``TunedModel.
    get_nb_trainable_parameters``, ``print_trainable_parameters`` and the metrics of ``subpeft train``).

    Each parameter counts its logical number of values (:attr:`subpeft.core.weights.WeightAccess.numel`):
    a 4-bit weight its d_out·d_in values, not its packed bytes, so a model counts the same in full
    precision and in 4 bits; a parameter shared by several modules (tied weights) counts once.
    ``trainable``: the parameters with ``requires_grad``."""
    seen: set[int] = set()
    trainable = total = 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = weight_access(module, name).numel
            total += n
            if p.requires_grad:
                trainable += n
    return trainable, total


class TunedModel(nn.Module):
    """A model with subpeft adapters. Create it with :func:`subpeft.attach` or :func:`subpeft.load`."""

    def __init__(self, model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> None:
        super().__init__()
        if isinstance(model, TunedModel):
            raise TypeError("model already has adapters: use tuned.add_adapter(name, config)")
        held = next((n for n, m in model.named_modules() if isinstance(m, (AdaptedLayer, TrainableCopy))), None)
        if held is not None:
            raise SubpeftError(
                f"this model already holds subpeft layers (e.g. {held or 'the model itself'!r}): it is the .model of a "
                f"TunedModel; add another adapter to that one with tuned.add_adapter(name, config) (or "
                f"tuned.load_adapter(directory, name)), or take tuned.unload() / tuned.merge_and_unload() first"
            )
        self.model = model
        # one method instance per named adapter (core/instance.py): all the TunedModel knows of a method
        self.instances: dict[str, MethodInstance] = {}
        # each instance's shared state (MethodInstance.shared), registered here so that it trains,
        # moves and is saved with the model
        self.shared = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self._call_wrappers_disabled = False
        self._grad_backup = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            self.add_adapter(adapter_name, config)
        except BaseException:
            self._restore_grad()
            raise
        self.set_adapter(adapter_name)

    # -- behaving like the wrapped model ---------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        wrapper = self._call_wrapper()
        if wrapper is not None:
            return wrapper.run(self.model, args, kwargs)
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        wrapper = self._call_wrapper()
        if wrapper is not None:
            return wrapper.generate(self.model, args, kwargs)
        return self.model.generate(*args, **kwargs)

    # -- walking our own modules ---------------------------------------------------------------------
    def adapted_layers(self) -> Iterator[tuple[str, AdaptedLayer]]:
        for name, module in self.model.named_modules():
            if isinstance(module, AdaptedLayer):
                yield name, module

    def _trainable_copies(self) -> Iterator[tuple[str, TrainableCopy]]:
        for name, module in self.model.named_modules():
            if isinstance(module, TrainableCopy):
                yield name, module

    def adapters_of(self, adapter_name: str) -> list[tuple[str, Adapter]]:
        """(layer name, adapter module) for every layer holding the named adapter."""
        return [(n, layer.adapters[adapter_name]) for n, layer in self.adapted_layers() if adapter_name in layer.adapters]

    @property
    def configs(self) -> dict[str, AdapterConfig]:
        """Each named adapter's config (a new dict; the configs belong to the method instances)."""
        return {name: instance.config for name, instance in self.instances.items()}

    def _check_name(self, name: str, *, exists: bool) -> None:
        if exists and name not in self.instances:
            raise AdapterNameError(f"no adapter named {name!r}; adapters: {sorted(self.instances)}")
        if not exists and name in self.instances:
            raise AdapterNameError(f"an adapter named {name!r} already exists")

    @property
    def active_adapter(self) -> str | None:
        return self.active_adapters[0] if self.active_adapters else None

    # -- adding, choosing, deleting ------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: AdapterConfig) -> None:
        """Attach a new named adapter (inactive until :meth:`set_adapter`)."""
        if not isinstance(config, AdapterConfig):
            raise TypeError(f"config must be a subpeft method config (e.g. sp.LoRA(...)), got {type(config).__name__}")
        if not isinstance(adapter_name, str) or not _NAME_RE.match(adapter_name):
            raise AdapterNameError(f"adapter name must be an identifier without dots, got {adapter_name!r}")
        self._check_name(adapter_name, exists=False)
        if any(type(p).__name__ == "DTensor" for p in self.model.parameters()):
            raise SubpeftError(
                "the model is sharded (FSDP2): attach adapters before sharding, i.e. sp.attach(model, config) (or "
                "tuned.add_adapter / sp.load) first, then subpeft.distributed.shard(tuned): attaching swaps layers "
                "and SVD-based methods read the whole W"
            )
        info = method_for_config(config)
        instance = info.instance_cls(info.adapter_cls, adapter_name, config, self.model)
        self.instances[adapter_name] = instance
        try:
            instance.inject()
            if instance.shared is not None:
                self.shared[adapter_name] = instance.shared
            self._add_copies(adapter_name, instance.config)
        except BaseException:
            self._remove(adapter_name)
            raise
        self._freeze(adapter_name)
        self._apply_active()

    def _add_copies(self, adapter_name: str, config: AdapterConfig) -> None:
        """Trainable copies of the config's ``modules_to_save`` (e.g. a fresh classification head)."""
        for name in find_modules_to_save(self.model, config.modules_to_save or []):
            module = self.model.get_submodule(name)
            if not isinstance(module, TrainableCopy):
                module = TrainableCopy(module)
                set_submodule(self.model, name, module)
            module.add(adapter_name)

    def _call_wrapper(self) -> Any:
        """What routes the model call: the call wrapper of the active adapter that rewrites the call
        (at most one may be active), or None."""
        if self._call_wrappers_disabled:
            return None
        found = [n for n in self.active_adapters if self.instances[n].rewrites_call]
        if len(found) > 1:
            methods = sorted({type(self.instances[n].config).__name__ for n in found})
            if len(methods) == 1:
                raise SubpeftError(
                    f"only one {methods[0]} adapter can be active at a time (each rewrites the model call, "
                    f"bringing its own virtual tokens or prefix); active: {found}"
                )
            raise SubpeftError(
                f"the adapters {found} each rewrite the model call (virtual tokens, a prefix) and cannot run "
                f"together: activate one of them (tuned.set_adapter(...))"
            )
        return self.instances[found[0]].call_wrapper() if found else None

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make these adapters active and trainable; every other adapter is frozen and inactive."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for n in names:
            self._check_name(n, exists=True)
        for n in self.instances:
            if n not in names:
                self._freeze(n)
        for n in names:
            for p in self._adapter_parameters(n):
                p.requires_grad_(True)
        self.active_adapters = names
        self._apply_active()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove the adapter everywhere; a layer left with no adapter gets its base layer back."""
        self._check_name(adapter_name, exists=True)
        for _, layer in self.adapted_layers():
            if adapter_name in layer.merged:
                layer.unmerge(adapter_name)
        self._remove(adapter_name)
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]
        self._apply_active()

    def _remove(self, adapter_name: str) -> None:
        instance = self.instances.pop(adapter_name, None)
        if adapter_name in self.shared:
            del self.shared[adapter_name]
        if instance is not None:
            instance.remove()
        for name, wrapper in list(self._trainable_copies()):
            if adapter_name in wrapper.copies:
                del wrapper.copies[adapter_name]
            if len(wrapper.copies) == 0:
                set_submodule(self.model, name, wrapper.original)

    def _adapter_parameters(self, adapter_name: str) -> Iterator[nn.Parameter]:
        yield from self.instances[adapter_name].parameters()
        for _, wrapper in self._trainable_copies():
            if adapter_name in wrapper.copies:
                yield from wrapper.copies[adapter_name].parameters()

    def _freeze(self, adapter_name: str) -> None:
        for p in self._adapter_parameters(adapter_name):
            p.requires_grad_(False)

    def _apply_active(self) -> None:
        active = tuple(self.active_adapters)
        for _, layer in self.adapted_layers():
            layer.active = active
        for _, wrapper in self._trainable_copies():
            wrapper.active = next((n for n in active if n in wrapper.copies), None)

    # -- training-time hooks ---------------------------------------------------------------------
    def regularization(self) -> torch.Tensor:
        """The loss term every active adapter asks for (MPC, AdaLoRA orthogonality, ...); 0 if none."""
        terms = []
        for name in self.active_adapters:
            term = self.instances[name].regularization()
            if term is not None:
                terms.append(term)
        if terms:
            return torch.stack(terms).sum()
        param = next(self.model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)

    def step(self, global_step: int) -> None:
        """Call after every optimizer step: runs each active method's schedule (budgets, phases).

        Raises:
            SubpeftError: an adapter whose schedule changes its delta or reads the weights (AdaLoRA,
                LoRA-Dash) is merged: its merged weights would go stale silently; unmerge() first.
        """
        for name in self.active_adapters:
            instance = self.instances[name]
            if instance.step_needs_unmerged and name in self.merged_adapters:
                raise SubpeftError(f"adapter {name!r} ({self.configs[name].method}) is merged: its step() changes "
                                   f"its update or reads the base weights; call unmerge() before step() (merge "
                                   f"after training)")
            instance.step(int(global_step))

    def finalize(self, adapter_name: str | None = None) -> None:
        """End of training: methods that change form after training do so now (Diff pruning keeps
        its top-k entries, stored sparse). Other methods are unchanged. The library's training loop
        (``subpeft.train.loop.train_classifier``) calls it when training ends."""
        for name in [adapter_name] if adapter_name is not None else list(self.active_adapters):
            self._check_name(name, exists=True)
            if name in self.merged_adapters:
                raise SubpeftError(f"adapter {name!r} is merged: call unmerge() before finalize()")
            new = self.instances[name].finalize()
            if new is not None:
                self.instances[name].config = new

    def analyze(self, adapter_name: str | None = None, reference: Any = None, **kwargs: Any) -> Any:
        """Per-layer subspace analysis of an adapter (see :func:`subpeft.analysis.report`)."""
        from ..analysis import report

        return report(self, adapter_name, reference, **kwargs)

    # -- parameters -----------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameters, counted by :func:`parameter_counts`."""
        return parameter_counts(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        pct = 100.0 * trainable / total if total else 0.0
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.4f}")

    # -- merging ---------------------------------------------------------------------------------
    def _merge_names(self, adapter_names: list[str] | None) -> list[str]:
        names = list(self.active_adapters) if adapter_names is None else list(adapter_names)
        for n in names:
            self._check_name(n, exists=True)
            config = self.configs[n]
            if not config.mergeable:
                raise SubpeftError(
                    f"adapter {n!r} ({config.method}) cannot be merged into the base weights; "
                    "it stays a separate computation at inference"
                )
        return names

    def merge(self, adapter_names: list[str] | None = None, safe: bool = False) -> None:
        """Fold the (active) adapters into the base weights.

        Every merge is checked: one that would write NaN/inf into a finite base tensor raises
        :class:`UnsafeMergeError` and leaves the model exactly as it was (``safe=True`` checks every
        layer before writing any, as PEFT's ``safe_merge``; without it the layers merged so far are
        put back). Each merge keeps the tensors it overwrites, so :meth:`unmerge` restores the base
        bit for bit (memory: one copy of each merged weight; :meth:`merge_and_unload` keeps none).
        Adapters merge in their active order (the order the forward stacks them in); merging one
        while an active adapter it does not commute with stays unmerged below it is refused, as it
        would change the output."""
        self._merge(self._merge_names(adapter_names), safe=safe, keep=True)

    def _merge(self, names: list[str], *, safe: bool, keep: bool) -> None:
        names = self._merge_order(names)
        layers = list(self.adapted_layers())
        self._check_commuting(names, layers)
        if safe:
            for layer_name, layer in layers:
                for n in names:
                    if n in layer.adapters and n not in layer.merged:
                        layer.check_mergeable(n, layer_name)
        done: list[tuple[AdaptedLayer, str]] = []
        try:
            for layer_name, layer in layers:
                for n in names:
                    if n in layer.adapters and n not in layer.merged:
                        layer.merge(n, keep=keep, where=layer_name)
                        done.append((layer, n))
        except BaseException:
            if keep:
                for layer, n in reversed(done):
                    layer.unmerge(n)
            raise

    def _merge_order(self, names: list[str]) -> list[str]:
        """Inactive adapters first (as given), then the active ones in active order: merged adapters
        sit below every running one, so this is the order the forward applies them in."""
        active = [n for n in self.active_adapters if n in names]
        return [n for n in dict.fromkeys(names) if n not in active] + active

    def _check_commuting(self, names: list[str], layers: list[tuple[str, AdaptedLayer]]) -> None:
        """Refuse to merge an adapter while an active, unmerged adapter below it on the same layer stays
        unmerged, unless both are additive: after the merge that one would run on top of it."""
        order = list(self.active_adapters)
        for layer_name, layer in layers:
            for n in names:
                if n not in order or n not in layer.adapters or n in layer.merged:
                    continue
                upper = layer.adapters[n]
                for m in order[: order.index(n)]:
                    if m in names or m not in layer.adapters or m in layer.merged:
                        continue
                    if not (type(upper).additive and type(layer.adapters[m]).additive):
                        raise SubpeftError(
                            f"cannot merge adapter {n!r} while {m!r}, active below it on layer {layer_name!r}, "
                            f"stays unmerged: merged adapters act before running ones, and {self.configs[n].method} "
                            f"and {self.configs[m].method} do not commute, so the output would change; merge both "
                            f"(tuned.merge([{m!r}, {n!r}])) or deactivate {m!r} first"
                        )

    def unmerge(self) -> None:
        for _, layer in self.adapted_layers():
            layer.unmerge()

    @property
    def merged_adapters(self) -> list[str]:
        out: list[str] = []
        for _, layer in self.adapted_layers():
            out += [n for n in layer.merged if n not in out]
        return out

    def _unwrap(self, keep_copies: bool) -> nn.Module:
        for name, layer in list(self.adapted_layers()):
            set_submodule(self.model, name, layer.base_layer)
        for name, wrapper in list(self._trainable_copies()):
            set_submodule(self.model, name, wrapper.current() if keep_copies else wrapper.original)
        self._restore_grad()
        for instance in self.instances.values():
            instance.remove()  # whatever else an instance put into the model (its layers are gone already)
        for n in list(self.shared):
            del self.shared[n]
        self.instances.clear()
        self.active_adapters = []
        return self.model

    def _restore_grad(self) -> None:
        for n, p in self.model.named_parameters():
            if n in self._grad_backup:
                p.requires_grad_(self._grad_backup[n])

    def merge_and_unload(
        self, safe: bool = False, adapter_names: list[str] | None = None, dequantize: bool = False
    ) -> nn.Module:
        """Merge the active adapters and return the plain base model (no subpeft modules left).

        Every layer is checked before anything is written (``safe`` is always on): NaN/inf raises
        :class:`UnsafeMergeError` and changes nothing. No copy of the overwritten weights is kept. On a
        4-bit base the merge requantises, which loses part of the update (the error is reported,
        see :func:`subpeft.quant.merge_errors`); ``dequantize=True`` first turns every 4-bit layer into
        an ``nn.Linear`` holding its dequantised weight, so the merge is exact and the model returned is
        full precision."""
        # refuse unmergeable adapters, stacks whose merge would change the output, and NaN/inf before
        # changing anything
        names = self._merge_order(self._merge_names(adapter_names))
        layers = list(self.adapted_layers())
        self._check_commuting(names, layers)
        for layer_name, layer in layers:
            for n in names:
                if n in layer.adapters and n not in layer.merged:
                    layer.check_mergeable(n, layer_name)
        if dequantize:  # every packed (4-bit) layer to its dense form, see core.weights
            densify_model(self.model)
        self._merge(names, safe=False, keep=False)
        return self._unwrap(keep_copies=True)

    def unload(self) -> nn.Module:
        """Return the base model with every adapter removed and nothing merged."""
        self.unmerge()
        return self._unwrap(keep_copies=False)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes the base model's output."""
        merged = {name: list(layer.merged) for name, layer in self.adapted_layers()}
        if any(merged.values()):
            self.unmerge()
        layers = [layer for _, layer in self.adapted_layers()]
        wrappers = [w for _, w in self._trainable_copies()]
        for m in layers + wrappers:
            m.disabled = True
        self._call_wrappers_disabled = True
        try:
            yield
        finally:
            self._call_wrappers_disabled = False
            for m in layers + wrappers:
                m.disabled = False
            for name, layer in self.adapted_layers():
                for n in merged.get(name, []):
                    layer.merge(n)

    # -- saving and loading -------------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The named adapter's tensors under their file keys (``base_model.model.<module>.<key>``)."""
        self._check_name(adapter_name, exists=True)
        instance = self.instances[adapter_name]
        out = instance.file_state()
        copy_prefix = instance.copies_prefix
        for name, wrapper in self._trainable_copies():
            if adapter_name in wrapper.copies:
                for key, value in wrapper.copies[adapter_name].state_dict().items():
                    out[f"{copy_prefix}{name}.{key}"] = value
        return out

    def _file_config(self, adapter_name: str) -> tuple[dict[str, Any], dict[str, str]]:
        from .. import __version__

        instance = self.instances[adapter_name]
        config = instance.file_config()
        meta = {"subpeft_method": config.method, "subpeft_version": __version__}
        peft = instance.peft_config()
        if peft is not None:
            base = getattr(getattr(self.model, "config", None), "_name_or_path", None)
            peft.setdefault("base_model_name_or_path", base or None)
            return peft, meta
        return config.to_dict(), meta

    def save_pretrained(self, save_directory: str | os.PathLike, adapter_name: str | list[str] | None = None) -> None:
        """Write each adapter: "default" (or the only one) into the directory, others into
        ``save_directory/<name>``, as Hugging Face PEFT does."""
        names = list(self.instances) if adapter_name is None else ([adapter_name] if isinstance(adapter_name, str) else list(adapter_name))
        if not names:
            raise AdapterNameError(
                "no adapter to save: this model holds no adapter (the last one was deleted?); nothing was written"
                if not self.instances else "no adapter to save: adapter_name is an empty list"
            )
        root_name = "default" if "default" in names else (names[0] if len(names) == 1 else None)
        # in several processes (torch.distributed), every rank may call this: each computes the tensors (whole
        # ones; a sharded tensor is gathered, a collective) and rank 0 alone writes
        writer = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        for n in names:
            self._check_name(n, exists=True)
            config, meta = self._file_config(n)
            directory = save_directory if n == root_name else os.path.join(save_directory, n)
            tensors = {k: v.full_tensor() if type(v).__name__ == "DTensor" else v
                       for k, v in self.adapter_state_dict(n).items()}
            if writer:
                write_adapter(directory, config, tensors, meta)

    def load_adapter(self, directory: str | os.PathLike, adapter_name: str = "default", trainable: bool = False) -> None:
        """Load an adapter directory as a new named adapter (and make it active)."""
        directory = os.fspath(directory)
        config, tensors = _read_adapter(directory)
        self.add_adapter(adapter_name, config)
        try:
            self._load_tensors(adapter_name, tensors, directory)
        except BaseException:
            self._remove(adapter_name)
            self._apply_active()
            raise
        self.set_adapter(adapter_name)
        if not trainable:
            self._freeze(adapter_name)

    def _load_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor], source: str) -> None:
        expected = self.adapter_state_dict(adapter_name)
        optional = self.instances[adapter_name].optional_file_keys()
        missing = sorted(set(expected) - set(tensors) - optional)
        unexpected = sorted(set(tensors) - set(expected))
        bad_shape = [
            f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
            for k, v in expected.items()
            if k in tensors and tensors[k].shape != v.shape
        ]
        problems = []
        if missing:
            problems.append(f"{len(missing)} tensors missing from the file (e.g. {missing[:3]})")
        if unexpected:
            problems.append(f"{len(unexpected)} tensors in the file that this model has no place for (e.g. {unexpected[:3]})")
        if bad_shape:
            problems.append(f"{len(bad_shape)} shape mismatches (e.g. {bad_shape[:3]})")
        if problems:
            raise AdapterLoadError(
                f"adapter in {source!r} does not fit this model: " + "; ".join(problems)
                + ". Was it trained on a different base model?"
            )
        # a float tensor read from integers or bools would be cast silently into a wrong adapter; the
        # integer buffers a method saves itself (Diff pruning's indices, LoRA-Dash's directions) are
        # integers in the model too
        bad_dtype = [
            f"{k}: {_dtype_name(tensors[k].dtype)} in the file, {_dtype_name(v.dtype)} expected"
            for k, v in expected.items()
            if k in tensors and _dtype_kind(tensors[k].dtype) != _dtype_kind(v.dtype)
        ]
        if bad_dtype:
            raise AdapterLoadError(
                f"adapter in {source!r} holds {len(bad_dtype)} tensors of the wrong kind (e.g. {bad_dtype[:3]}): "
                f"a corrupt or hand-made file? nothing was loaded"
            )
        nonfinite = sorted(k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
        if nonfinite:
            more = f" and {len(nonfinite) - 5} more" if len(nonfinite) > 5 else ""
            warnings.warn(
                f"adapter in {source!r}: {len(nonfinite)} tensors hold NaN or inf ({', '.join(nonfinite[:5])}{more}): "
                f"outputs will be NaN/inf (a diverged training run?) and merge() refuses it",
                AdapterLoadWarning, stacklevel=3,
            )
        with torch.no_grad():
            for k, v in expected.items():
                if k in tensors:
                    v.copy_(tensors[k].to(v.dtype))

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default", trainable: bool = False
    ) -> TunedModel:
        return load(model, directory, adapter_name=adapter_name, trainable=trainable)


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "integer"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _read_adapter(directory: str) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Config and tensors of an adapter directory, read in full before anything is changed."""
    try:
        config = config_from_dict(read_config(directory))
    except ConfigError as exc:
        raise AdapterLoadError(f"cannot read the adapter config in {directory!r}: {exc}") from None
    tensors, _ = read_tensors(directory)
    return config, tensors


def attach(model: nn.Module, config: AdapterConfig, name: str = "default") -> TunedModel:
    """Attach a method to a model: ``tuned = sp.attach(model, sp.LoRA(r=8, targets=[...]))``.

    Base parameters are frozen; the adapter's parameters (and ``modules_to_save`` copies) train.
    """
    return TunedModel(model, config, adapter_name=name)


def load(
    model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default", trainable: bool = False
) -> TunedModel:
    """Load an adapter saved by subpeft (or a LoRA adapter saved by Hugging Face PEFT) onto a model.

    On any error (missing or corrupt files, shapes that do not fit) the model is left unchanged.
    With ``trainable=False`` the adapter is frozen and the model put in eval mode.
    """
    if isinstance(model, TunedModel):
        model.load_adapter(directory, adapter_name, trainable=trainable)
        return model
    directory = os.fspath(directory)
    config, tensors = _read_adapter(directory)
    tuned = TunedModel(model, config, adapter_name)
    try:
        tuned._load_tensors(adapter_name, tensors, directory)
    except BaseException:
        tuned.unload()
        raise
    if not trainable:
        tuned._freeze(adapter_name)
        tuned.eval()
    return tuned

