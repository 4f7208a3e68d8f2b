"""The base class of prompt-kind methods: one module for the whole model, not one per layer.

Prompt tuning and P-tuning change the model's input (virtual tokens before the real ones); prefix
tuning and P-tuning v2 give every attention layer extra keys and values. Neither is a function of
one weight, so a prompt-kind adapter is not attached to layers: :class:`~subpeft.core.model.TunedModel`
builds one :class:`PromptAdapter` per named adapter (``cls(config, model)``), keeps it with the
adapter's shared state (its tensors are saved once, under the keys ``shared_file_key`` gives), and
routes ``forward`` and ``generate`` through the active one:

- ``run(model, args, kwargs)`` calls ``model`` with the inputs changed (and the output put back
  in the caller's terms where needed);
- ``generate(model, args, kwargs)`` does the same for ``model.generate``.

``disable_adapter()`` bypasses it. Saving writes ``file_state()`` under ``file_config()``: a method
that trains in another form than it keeps (prefix tuning's reparametrisation MLP) returns the kept
form there, and a module built from that saved config must hold exactly those tensors (they are
loaded into ``file_state()``'s tensors in place).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .config import AdapterConfig


class PromptAdapter(nn.Module):
    # set by each method, as for :class:`~subpeft.core.adapter.Adapter`
    config_cls: ClassVar[type[AdapterConfig]]
    family: ClassVar[str] = "reconstruction"
    kind: ClassVar[str] = "prompt"
    mergeable: ClassVar[bool] = False
    formula: ClassVar[str] = ""
    trains: ClassVar[str] = ""
    layer_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: AdapterConfig, model: nn.Module) -> None:
        super().__init__()
        self.config = config

    @classmethod
    def prepare_config(cls, config: AdapterConfig, model: nn.Module) -> AdapterConfig:
        """The config with the model's dimensions filled in (as PEFT records them in its config)."""
        return config

    @classmethod
    def num_params(cls, config: AdapterConfig, model: nn.Module) -> int:
        """Trainable numbers of the adapter on this model (the METHODS.md formula)."""
        raise NotImplementedError

    @classmethod
    def shared_file_key(cls, config: AdapterConfig, key: str) -> str:
        return "base_model.shared." + key

    # -- routing the model's calls -------------------------------------------------------------
    def run(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        raise NotImplementedError

    def generate(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not support generate()")

    # -- saving --------------------------------------------------------------------------------
    def file_state(self) -> dict[str, torch.Tensor]:
        return self.state_dict()

    def file_config(self) -> AdapterConfig:
        return self.config

    # -- training-time hooks ---------------------------------------------------------------------
    def regularization(self) -> torch.Tensor | None:
        return None

    def step(self, global_step: int) -> None:
        return None

    def finalize(self) -> AdapterConfig | None:
        """End of training; returns a new config when the adapter's form changed (None: unchanged)."""
        return None
