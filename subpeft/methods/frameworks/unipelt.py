"""UniPELT (Mao et al., 2022): LoRA, prefix tuning and a bottleneck adapter, each behind a learned gate.

In every block (found by :mod:`subpeft.core.arch`):

- **LoRA** on the query and value projections, reusing :class:`~subpeft.methods.extension.lora.LoRAAdapter`:
  ``y = W·x + b + G_L(x)·(α/r)·B·A·x`` with a per-token gate ``G_L(x) = sigmoid(w_L·x + b_L)`` of the
  projection's input. α = r by default: the reference code replaces α/r by the gate.
- **Prefix tuning**, reusing :class:`~subpeft.mechanisms.prefix_kv.PrefixKV` (p slots per layer,
  reparametrised by an MLP while training, folded by ``tuned.finalize()`` and saved folded) and
  :func:`~subpeft.core.prompt.rewrite_call` (masks, positions, KV cache, generation): the layer's
  attention runs over ``[G_P·P_k; K]`` and ``[G_P·P_v; V]`` with one gate per example,
  ``G_P = mean over the real tokens of sigmoid(w_P·h + b_P)``, h the attention's input (the query
  projection's input). When generating with a KV cache the prefix gate is the prompt's.
- **A bottleneck adapter** (:mod:`subpeft.mechanisms.bottleneck`) on the FFN output projection,
  ``h + G_A(h)·f(h)``, ``G_A(h) = sigmoid(w_A·h + b_A)`` per token of its input h.

Gates are nn.Linear(d, 1) with nn.Linear's default init. The reference code averages the LoRA and
adapter gates over the sequence (padding included); here they are per token, G = sigmoid(W_g·h) as in
METHODS.md, so a row's output does not depend on its padding. At attach LoRA (B = 0) and the adapter
(W_up = 0) are the identity; the prefix is not (as prefix tuning is not).

How it fits :class:`~subpeft.core.model.TunedModel`: the three parts' per-layer tensors (LoRA, the
gates, the adapter) are ordinary layer adapters on the query, value and FFN-output projections; the
prefix table is the adapter's shared state (``UniPELTInstance.create_shared``, saved once as
``base_model.shared.prefix.prompt_embeddings``). The prefix enters the model call through a forward
pre-hook on the base model, installed once per model by ``prepare_config``; it acts only while a
UniPELT adapter is running (active, not disabled) in some layer and removes itself once none is left.
The query adapters scale their layer's prefix in the KV cache by G_P.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...core.adapter import Adapter
from ...core.arch import describe
from ...core.config import AdapterConfig
from ...core.errors import ConfigError, SubpeftError
from ...core.instance import LayerInstance
from ...core.layers import dims, factory
from ...core.prompt import bind_call, cache_length, passed_cache, rewrite_call
from ...core.registry import register
from ...mechanisms.bottleneck import Bottleneck, BottleneckAdapter
from ...mechanisms.prefix_kv import PrefixKV
from ..extension.lora import LoRA, LoRAAdapter


@dataclass
class UniPELT(AdapterConfig):
    """UniPELT. ``sp.UniPELT(r=8, alpha=8, num_virtual_tokens=10, projection_dim=512, size=None,
    reduction_factor=None, activation="relu")``; the other fields are filled from the model at attach."""

    method = "unipelt"

    r: int = 8
    alpha: float = 8.0
    lora_dropout: float = 0.0
    num_virtual_tokens: int = 10
    projection_dim: int = 512
    size: int | None = None
    reduction_factor: float | None = None
    activation: str = "relu"
    folded: bool = False  # the prefix MLP folded into its table (after finalize, and in saved adapters)
    # filled from the architecture at attach
    query_targets: list[str] | None = None
    value_targets: list[str] | None = None
    adapter_targets: list[str] | None = None
    num_layers: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    d_model: int | None = None

    def validate(self) -> None:
        LoRA(r=self.r, alpha=self.alpha, dropout=self.lora_dropout)  # the LoRA part's checks
        self.bottleneck()  # the adapter part's checks
        self._check_positive_int("num_virtual_tokens")
        self._check_positive_int("projection_dim")

    def lora(self) -> LoRA:
        return LoRA(r=self.r, alpha=self.alpha, dropout=self.lora_dropout)

    def bottleneck(self) -> Bottleneck:
        return Bottleneck(size=self.size, reduction_factor=self.reduction_factor, activation=self.activation)

    def role(self, name: str) -> str:
        for role, names in (("query", self.query_targets), ("value", self.value_targets),
                            ("adapter", self.adapter_targets)):
            if names and name in names:
                return role
        raise ConfigError(f"UniPELT has no part on module {name!r}")


@dataclass
class _Call:
    """One routed model call: the cache holding a fresh (not yet gated) prefix, the caller's mask."""

    cache: Any
    mask: torch.Tensor | None
    done: set[int] = field(default_factory=set)


class UniPELTShared(nn.Module):
    """The prefix (shared by all layers of one UniPELT adapter) and the model call now being routed."""

    def __init__(self, config: UniPELT, **kw: Any) -> None:
        super().__init__()
        self.num_virtual = config.num_virtual_tokens
        self.prefix = PrefixKV(config.num_virtual_tokens, config.num_layers, config.num_kv_heads, config.head_dim,
                               d_model=config.d_model, projection_dim=None if config.folded else config.projection_dim,
                               **kw)
        self.config = config
        self.calls: list[_Call | None] = []

    def file_state(self) -> dict[str, torch.Tensor]:
        return {"prefix.prompt_embeddings": self.prefix.kept_table()}

    def file_config(self) -> UniPELT:
        return self.config.replace(folded=True)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["calls"] = []
        return state


class UniPELTInstance(LayerInstance):
    """One named UniPELT adapter: its layers' parts plus the shared prefix, which enters the model
    call (so no other adapter that rewrites the call may run with it) and is saved folded."""

    rewrites_call = True

    def shared_state(self) -> dict[str, torch.Tensor]:
        return self.shared.file_state()

    def file_config(self) -> UniPELT:
        return self.shared.file_config()

    def create_shared(self, layers: list[tuple[str, nn.Module, str]]) -> nn.Module:
        return UniPELTShared(self.config, **factory(layers[0][1]))

    def finalize(self) -> UniPELT | None:
        """Fold the prefix MLP into its table (the kept form)."""
        if self.config.folded:
            return None
        self.shared.prefix.fold()
        self.shared.config = self.config.replace(folded=True)
        return self.shared.config


@register
class UniPELTAdapter(Adapter):
    config_cls = UniPELT
    kind = "module"
    mergeable = False
    instance_cls = UniPELTInstance
    layer_types = ("linear", "conv1d")
    formula = "q, v: r·(d_in + d_out) + d_in + 1 (+ d_in + 1 on q); FFN out: 2·d·m + d + m + d + 1; + the prefix"
    trains = "gated LoRA (q, v), gated prefix, gated bottleneck"

    def __init__(self, config: UniPELT, base_layer: nn.Module, layer_type: str, **kwargs) -> None:
        super().__init__(config, base_layer, layer_type, **kwargs)
        self.role = config.role(self.layer_name)
        d_out, d_in = dims(base_layer, layer_type)
        kw = factory(base_layer)
        name = self.layer_name
        if self.role == "adapter":
            self.bottleneck = BottleneckAdapter(config.bottleneck(), base_layer, layer_type, name=name)
            self.gate = nn.Linear(d_out, 1, **kw)
        else:
            self.lora = LoRAAdapter(config.lora(), base_layer, layer_type, name=name)
            self.gate = nn.Linear(d_in, 1, **kw)
        if self.role == "query":
            self.block = config.query_targets.index(self.layer_name)
            self.prefix_gate = nn.Linear(d_in, 1, **kw)

    def forward(self, x: torch.Tensor, base) -> torch.Tensor:
        h = base(x)
        if self.role == "adapter":
            b = self.bottleneck
            return h + torch.sigmoid(self.gate(h.to(b.down_weight.dtype))).to(h.dtype) * b.bottleneck(h, *b.weights())
        if self.role == "query":
            self._gate_prefix(x)
        z = x if x.dtype == self.gate.weight.dtype else x.to(self.gate.weight.dtype)
        return self.lora.add_delta(h, z * torch.sigmoid(self.gate(z)))  # ΔW·(G·x) = G·ΔW·x for a scalar G

    def _gate_prefix(self, x: torch.Tensor) -> None:
        """Scale this layer's fresh prefix in the call's KV cache by G_P (once per call)."""
        call = self.shared.calls[-1] if self.shared is not None and self.shared.calls else None
        if call is None or call.cache is None or self.block in call.done:
            return
        g = torch.sigmoid(self.prefix_gate(x.to(self.prefix_gate.weight.dtype)))  # (batch, n, 1)
        if call.mask is not None and call.mask.shape == g.shape[:2]:
            m = call.mask.to(g.dtype).unsqueeze(-1)
            g = (g * m).sum(1) / m.sum(1).clamp(min=1)
        else:
            g = g.mean(1)
        layer = call.cache.layers[self.block]
        g = g.view(-1, 1, 1, 1).to(layer.keys.dtype)
        layer.keys, layer.values = layer.keys * g, layer.values * g
        call.done.add(self.block)

    # -- placement, shared prefix, accounting -----------------------------------------------------
    @classmethod
    def prepare_config(cls, config: UniPELT, model: nn.Module) -> UniPELT:
        parts = describe(model, config.method)
        if config.query_targets is None:
            if config.targets is not None:
                raise ConfigError("UniPELT places its parts from the architecture: leave targets unset "
                                  "(or set query_targets, value_targets and adapter_targets)")
            config = config.replace(query_targets=parts.per_block("query"), value_targets=parts.per_block("value"),
                                    adapter_targets=parts.per_block("ffn_out"))
        found = dict(num_layers=parts.num_layers, num_kv_heads=parts.num_kv_heads, head_dim=parts.head_dim,
                     d_model=parts.hidden_size)
        for key, value in found.items():
            if getattr(config, key) not in (None, value):
                raise ConfigError(f"this UniPELT adapter was made for {key}={getattr(config, key)}, but "
                                  f"{type(model).__name__} has {key}={value}: was it trained on another base model?")
        targets = list(config.query_targets) + list(config.value_targets or []) + list(config.adapter_targets or [])
        _install_routing(model)
        return config.replace(targets=targets, **found)

    @classmethod
    def num_params(cls, config: UniPELT, base_layer: nn.Module, layer_type: str) -> int:
        raise TypeError("UniPELT's count per layer depends on the layer's part: use model_num_params")

    @classmethod
    def model_num_params(cls, config: UniPELT, layers: list[tuple[str, nn.Module, str]]) -> int:
        total = 0
        for name, layer, kind in layers:
            d_out, d_in = dims(layer, kind)
            role = config.role(name)
            if role == "adapter":
                m = config.bottleneck().bottleneck_size(d_out)
                total += 2 * d_out * m + d_out + m + d_out + 1
            else:
                total += config.r * (d_in + d_out) + d_in + 1 + (d_in + 1 if role == "query" else 0)
        p, L, d = config.num_virtual_tokens, config.num_layers, config.d_model
        width = 2 * L * config.num_kv_heads * config.head_dim
        if config.folded:
            return total + p * width
        h = config.projection_dim
        return total + p * d + d * h + h + h * width + width


# -- routing the prefix into the model call ---------------------------------------------------------
_ROUTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (hook handles, stack of calls)


def _running_shared(model: nn.Module) -> tuple[UniPELTShared | None, bool]:
    """The prefix of the UniPELT adapter running in the model (active, unmerged, not disabled), and
    whether any UniPELT adapter is left in the model at all."""
    from ...core.layer import AdaptedLayer

    running, present = [], False
    for module in model.modules():
        if not isinstance(module, AdaptedLayer):
            continue
        for name, adapter in module.adapters.items():
            if isinstance(adapter, UniPELTAdapter) and adapter.role == "query":
                present = True
                if not module.disabled and name in module.active and name not in module.merged:
                    if all(adapter.shared is not s for s in running):
                        running.append(adapter.shared)
    if len(running) > 1:
        raise SubpeftError("only one UniPELT adapter can be active at a time (each brings its own prefix)")
    return (running[0] if running else None), present


def _install_routing(model: nn.Module) -> None:
    if model in _ROUTED:
        return
    stack: list[tuple[UniPELTShared, Any] | None] = []

    def before(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        shared, present = _running_shared(module)
        if not present:
            _uninstall(module)
        if shared is None:
            stack.append(None)
            return None
        call = bind_call(module.forward, args, kwargs)
        fresh = cache_length(passed_cache(call)) == 0
        mask = call.get("attention_mask")
        call, finish = rewrite_call(module, call, shared.num_virtual, None, shared.prefix.layers_kv, name="UniPELT")
        shared.calls.append(_Call(passed_cache(call) if fresh else None, mask if fresh else None))
        stack.append((shared, finish))
        return (), call

    def after(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        entry = stack.pop() if stack else None
        if entry is None:
            return None
        shared, finish = entry
        shared.calls.pop()
        return finish(output)

    handles = (model.register_forward_pre_hook(before, with_kwargs=True),
               model.register_forward_hook(after, with_kwargs=True, always_call=True))
    _ROUTED[model] = handles


def _uninstall(model: nn.Module) -> None:
    for handle in _ROUTED.pop(model, ()):
        handle.remove()

