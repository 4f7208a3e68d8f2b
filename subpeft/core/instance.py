"""One named adapter of one method in one model: the *method instance*.

:class:`~subpeft.core.model.TunedModel` holds one :class:`MethodInstance` per adapter name and talks
to it only through this interface; it never asks what kind of method it holds. An instance

- puts itself into the model (:meth:`MethodInstance.inject`) and takes itself out again
  (:meth:`MethodInstance.remove`);
- owns the state shared by the whole adapter (:attr:`MethodInstance.shared`, registered by the
  TunedModel so that it trains, moves and is saved with the model);
- answers the training-time hooks (:meth:`regularization`, :meth:`step`, :meth:`finalize`);
- gives its file state (:meth:`file_state`, :meth:`optional_file_keys`, :meth:`file_config`,
  :meth:`peft_config`) and where its ``modules_to_save`` copies are keyed (:attr:`copies_prefix`);
- may wrap the model call (:meth:`call_wrapper`: prompt-kind methods put virtual tokens in) or
  rewrite it another way (:attr:`rewrites_call`: UniPELT's prefix); at most one active adapter may.

The implementations in core:

- :class:`LayerInstance`: weight-space and module-level methods, one per-layer
  :class:`~subpeft.core.adapter.Adapter` on each targeted layer (inside an
  :class:`~subpeft.core.layer.AdaptedLayer`); its hooks call the per-layer class's hooks over all
  the adapter's layers;
- :class:`PromptInstance`: prompt-kind methods, one :class:`~subpeft.core.prompt.PromptAdapter`
  module for the whole model, which is the adapter's shared state and its call wrapper.

A method picks its instance class with the class attribute ``instance_cls`` of its registered class
(:class:`MethodTraits`); a new kind of method subclasses :class:`MethodInstance` (or one of the two)
and needs no change in core.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

from .errors import ConfigError
from .layer import AdaptedLayer, set_submodule
from .targets import candidate_type, default_targets, find_modules_to_save, find_targets

if TYPE_CHECKING:
    from .adapter import Adapter
    from .config import AdapterConfig

#: file keys of tensors that live inside the model's modules: ``base_model.model.<module>.<key>``
FILE_PREFIX = "base_model.model."


class CallWrapper(Protocol):
    """What an instance that wraps the model call provides (a prompt-kind adapter's module)."""

    def run(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any: ...

    def generate(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any: ...


class AdapterHooks:
    """The training-time hooks of a named adapter, no-ops by default (:class:`MethodInstance` and a
    prompt-kind adapter's module both have them; a method overrides the ones it needs)."""

    #: its step() changes the adapter's weight delta or reads the layers' weights (AdaLoRA's rank masks,
    #: LoRA-Dash's switch): :meth:`TunedModel.step` refuses while it is merged (the merged weights would go stale,
    #: or the switch would read W + ΔW)
    step_needs_unmerged: ClassVar[bool] = False

    def regularization(self) -> torch.Tensor | None:
        """A scalar to add to the loss, or None."""
        return None

    def step(self, global_step: int) -> None:
        """After each optimizer step."""
        return None

    def finalize(self) -> AdapterConfig | None:
        """End of training; returns the new config when the adapter's saved form changed (None: unchanged)."""
        return None


class MethodTraits:
    """What a registered method's class declares about itself (read by the registry, the README's
    method table and ``subpeft methods``), shared by every kind of method.

    ``kind`` describes the method for people (the docs, ``subpeft compare``); the library's behaviour
    comes from ``instance_cls``."""

    config_cls: ClassVar[type[AdapterConfig]]
    #: a built-in method's family is its folder (subpeft/methods/<family>/), set by the registry;
    #: a method defined elsewhere declares it
    family: ClassVar[str] = "extension"
    kind: ClassVar[str] = "weight"
    mergeable: ClassVar[bool] = True
    formula: ClassVar[str] = ""  # trainable numbers per adapted layer, e.g. "r·(d_in + d_out)"
    trains: ClassVar[str] = ""  # what trains, in a few words, e.g. "low-rank factors A, B"
    layer_types: ClassVar[tuple[str, ...]] = ("linear", "conv1d")
    #: whether some trainable tensors take no part in the forward for part of training (LoRA-Dash's Δσ before
    #: its switch): DistributedDataParallel then needs ``find_unused_parameters`` (:mod:`subpeft.distributed`)
    idle_parameters: ClassVar[bool] = False
    #: the :class:`MethodInstance` subclass that stands for one named adapter of this method
    instance_cls: ClassVar[type[MethodInstance]]

    @classmethod
    def prepare_config(cls, config: AdapterConfig, model: nn.Module) -> AdapterConfig:
        """The config with everything left to the model resolved, before any layer is touched.

        The default: ``targets=None`` becomes the config class's ``default_targets`` or the model's
        usual attention targets. Module-level methods resolve their targets (and e.g. trainable
        LayerNorms as ``modules_to_save``) from the architecture description (:mod:`subpeft.core.arch`).
        """
        if config.targets is None:
            resolved = type(config).default_targets or default_targets(model)
            if resolved is not None:
                config = config.replace(targets=resolved)
        return config

    @classmethod
    def shared_file_key(cls, config: AdapterConfig, key: str) -> str:
        """Full file key of an entry of the shared state; PEFT-compatible methods may map to PEFT's
        own place (VeRA: ``base_model.vera_A``)."""
        return "base_model.shared." + key


class MethodInstance(AdapterHooks):
    """One named adapter of one method in one model (see the module docstring).

    ``method`` is the method's registered class, ``config`` the adapter's config (resolved against
    the model by :meth:`inject`, replaced by :meth:`finalize` when the adapter changes form)."""

    #: where the adapter's ``modules_to_save`` copies are keyed in its file
    copies_prefix: ClassVar[str] = FILE_PREFIX
    #: the adapter changes the model call itself; at most one such adapter may be active
    rewrites_call: ClassVar[bool] = False

    def __init__(self, method: type, name: str, config: AdapterConfig, model: nn.Module) -> None:
        self.method = method
        self.name = name
        self.config = config
        self.model = model
        self.shared: nn.Module | None = None

    # -- life cycle -------------------------------------------------------------------------------
    def inject(self) -> None:
        """Resolve the config against the model and put the adapter into it (inactive). On an error
        the TunedModel calls :meth:`remove`, which must undo whatever was done."""
        raise NotImplementedError

    def remove(self) -> None:
        """Take the adapter out of the model (every layer left without adapters gets its base back)."""

    def layers(self) -> list[tuple[str, Adapter]]:
        """(layer name, per-layer adapter) of every layer this adapter sits on; [] if none."""
        return []

    def parameters(self) -> Iterator[nn.Parameter]:
        """Every tensor that trains when the adapter is active (its ``modules_to_save`` copies aside)."""
        for _, adapter in self.layers():
            yield from adapter.parameters()
        if self.shared is not None:
            yield from self.shared.parameters()

    def call_wrapper(self) -> CallWrapper | None:
        """What routes the model's calls while the adapter is active, or None."""
        return None

    # -- file state ----------------------------------------------------------------------------
    def shared_state(self) -> dict[str, torch.Tensor]:
        """The shared state as saved (keys before :meth:`MethodTraits.shared_file_key`)."""
        return self.shared.state_dict() if self.shared is not None else {}

    def file_state(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors under their file keys (``modules_to_save`` copies aside). Loading
        copies into these very tensors, so they must be the live ones (or views of them)."""
        out: dict[str, torch.Tensor] = {}
        for layer_name, adapter in self.layers():
            for key, value in adapter.state_dict().items():
                out[f"{FILE_PREFIX}{layer_name}.{adapter.file_key(key)}"] = value
        for key, value in self.shared_state().items():
            out[self.method.shared_file_key(self.config, key)] = value
        return out

    def optional_file_keys(self) -> set[str]:
        """File keys a file may lack (training state PEFT does not save)."""
        return {
            f"{FILE_PREFIX}{layer_name}.{adapter.file_key(key)}"
            for layer_name, adapter in self.layers()
            for key in adapter.optional_keys()
        }

    def file_config(self) -> AdapterConfig:
        """The config written with the file (a method may keep another form than it trains in)."""
        return self.config

    def peft_config(self) -> dict[str, Any] | None:
        """The config in Hugging Face PEFT's form, or None when PEFT would not compute this adapter."""
        layers = self.layers()
        if not all(adapter.peft_compatible() for _, adapter in layers):
            return None
        return self.file_config().to_peft_dict({adapter.layer_type for _, adapter in layers})


class LayerInstance(MethodInstance):
    """A weight-space or module-level method: one per-layer adapter (``method``, an
    :class:`~subpeft.core.adapter.Adapter` subclass) in each targeted layer."""

    def inject(self) -> None:
        method, model = self.method, self.model
        self.config = config = method.prepare_config(self.config, model)
        names = find_targets(
            model, config.targets, config.exclude, method=config.method, supported=method.layer_types,
            accepts=lambda module, kind: method.accepts(config, module, kind),
        )
        # a module of modules_to_save trains whole as its copy, which is what the forward uses: an adapter in it
        # would never take part (it would sit idle, and DDP would wait for its gradient)
        whole = find_modules_to_save(model, config.modules_to_save or [])
        names = [n for n in names if not any(n == w or n.startswith(w + ".") for w in whole)] or names
        layers = []
        for name in names:
            module = model.get_submodule(name)
            base = module.base_layer if isinstance(module, AdaptedLayer) else module
            layers.append((name, base, candidate_type(module)))
        check_rank(method, config, layers)
        self.shared = self.create_shared(layers)
        for name in names:
            module = model.get_submodule(name)
            if not isinstance(module, AdaptedLayer):
                module = AdaptedLayer(module, candidate_type(module))
                set_submodule(model, name, module)
            module.adapters[self.name] = method(config, module.base_layer, module.layer_type, name=name,
                                                shared=self.shared)

    def create_shared(self, layers: list[tuple[str, nn.Module, str]]) -> nn.Module | None:
        """The adapter's shared state, made before its per-layer adapters (which see it as
        ``self.shared``); ``layers`` are (module name, base layer, layer type) of every target. Its
        parameters train with the adapter; it is saved once, under the keys the method's
        ``shared_file_key`` gives (VeRA's projections, PiCa's per-role M). None (the default): none."""
        return None

    def remove(self) -> None:
        for name, module in list(self.model.named_modules()):
            if not isinstance(module, AdaptedLayer):
                continue
            if self.name in module.adapters:
                del module.adapters[self.name]
            if len(module.adapters) == 0:
                set_submodule(self.model, name, module.base_layer)

    def layers(self) -> list[tuple[str, Adapter]]:
        return [
            (n, m.adapters[self.name]) for n, m in self.model.named_modules()
            if isinstance(m, AdaptedLayer) and self.name in m.adapters
        ]

    def adapters(self) -> list[Adapter]:
        """The per-layer adapters, in the model's module order."""
        return [a for _, a in self.layers()]

    def regularization(self) -> torch.Tensor | None:
        """The sum of the layers' terms (a method may average or add an adapter-wide term instead)."""
        terms = [t for t in (a.regularization() for a in self.adapters()) if t is not None]
        return torch.stack(terms).sum() if terms else None

    def step(self, global_step: int) -> None:
        for adapter in self.adapters():
            adapter.step(global_step)


class PromptInstance(MethodInstance):
    """A prompt-kind method: one :class:`~subpeft.core.prompt.PromptAdapter` module (``method``) for
    the whole model, kept (and saved) as the adapter's shared state, wrapping the model's calls.
    PEFT keys prompt-learning ``modules_to_save`` copies by the bare model
    (``base_model.classifier.weight``)."""

    copies_prefix: ClassVar[str] = "base_model."
    rewrites_call: ClassVar[bool] = True

    def inject(self) -> None:
        self.config = self.method.prepare_config(self.config, self.model)
        self.shared = self.method(self.config, self.model)

    def call_wrapper(self) -> CallWrapper | None:
        return self.shared

    def regularization(self) -> torch.Tensor | None:
        return self.shared.regularization()

    def step(self, global_step: int) -> None:
        self.shared.step(global_step)

    def finalize(self) -> AdapterConfig | None:
        return self.shared.finalize()

    def shared_state(self) -> dict[str, torch.Tensor]:
        # a prompt adapter may save another form than it trains in (prefix tuning: the MLP folded)
        return self.shared.file_state()

    def file_config(self) -> AdapterConfig:
        return self.shared.file_config()


def check_rank(adapter_cls: type[Adapter], config: AdapterConfig, layers: list[tuple[str, nn.Module, str]]) -> None:
    """Refuse a rank no targeted layer can use (before anything of that size is allocated); warn
    for the layers that cannot use all of it."""
    r = getattr(config, "r", None)
    if not isinstance(r, int) or isinstance(r, bool):
        return
    usable = [(name, adapter_cls.usable_rank(config, base, kind)) for name, base, kind in layers]
    usable = [(name, u) for name, u in usable if u is not None]
    if not usable:
        return
    best_name, best = max(usable, key=lambda item: item[1])
    what = type(config).__name__
    if r > best:
        raise ConfigError(
            f"{what}.r = {r} is larger than any targeted layer can use: the largest usable rank is {best} "
            f"(layer {best_name!r}); choose r <= {best}"
        )
    over = [(name, u) for name, u in usable if r > u]
    if over:
        more = f" and {len(over) - 5} more" if len(over) > 5 else ""
        shown = ", ".join(f"{name!r} ({u})" for name, u in over[:5])
        warnings.warn(
            f"{what}.r = {r} exceeds the usable rank of {len(over)} targeted layer(s), given in brackets: "
            f"{shown}{more}; there the extra rank adds parameters, not expressiveness",
            UserWarning, stacklevel=4,
        )
