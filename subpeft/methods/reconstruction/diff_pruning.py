"""Diff pruning (Guo, Rush & Kim, 2021): φ(W) = W + z ⊙ w, z a hard-concrete gate (Louizos et al., 2018).

Dense form (training): a diff ``w`` (0 at attach: the identity) and a gate logit ``log α`` per entry,
both in the base weight's native shape. The gate, with u ~ U(0, 1), s = sigmoid((log u − log(1 − u)
+ log α)/β), s̄ = s·(ζ − γ) + γ, z = clamp(s̄, 0, 1), is sampled at every training-mode forward (torch's
global RNG); eval mode (and merging) uses z = clamp(sigmoid(log α)·(ζ − γ) + γ, 0, 1).
``tuned.regularization()`` adds λ·Σ sigmoid(log α − β·log(−γ/ζ)) (the expected L0) over layers.

``tuned.finalize()`` keeps, **per layer**, the k = ⌈budget·d_out·d_in⌉ entries of largest |z ⊙ w|
(eval gate) as ``values`` (k, trainable: fine-tune them further) and ``indices`` (k, int64 positions
in the flattened native weight, sorted), drops the gate, and sets ``sparse=True`` in the config so a
saved sparse adapter loads straight into that form. Per layer, not the paper's one global top-k: each
layer's saved size then follows from the config and its shape alone (a load builds its tensors before
reading the file), and no layer takes the whole budget or ends up empty. Finalize before merging, and
build a new optimizer afterwards (``values`` are new parameters).

Forward, both forms: ``base(x) + F.linear(x, Δ)`` (Conv1D ``x @ Δ``, Embedding a lookup in Δ, Conv2d
the base convolution with Δ), Δ dense. The sparse form scatters its k values into Δ: for more than
~1/budget tokens per batch that costs less memory than gathering inputs per kept entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from ...core.adapter import Adapter
from ...core.config import AdapterConfig
from ...core.errors import ConfigError, UnsupportedLayerError
from ...core.instance import LayerInstance
from ...core.layers import factory, weight_shape
from ...core.registry import register
from .. import report_event as report


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def kept_count(budget: float, n: int) -> int:
    """k = ⌈budget·n⌉ (at least 1), in the decimal the user wrote (0.07·100 keeps 7, not 8)."""
    return min(n, max(1, math.ceil(Fraction(str(float(budget))) * n)))


@dataclass
class DiffPruning(AdapterConfig):
    """Diff pruning. ``sp.DiffPruning(budget=0.005, l0_weight=1.25e-7, targets=[...])``.

    budget: fraction of each layer's entries kept by ``finalize()``, in (0, 1].
    l0_weight: λ of the expected-L0 penalty. Default 1.25e-7, Guo et al.'s value (their code's
        ``sparsity_pen``). The penalty is a sum, so the gradient on each log α is λ·σ'(·), whatever the
        number of adapted entries: the paper's λ sets the same per-entry trade-off against the task
        gradient on any model (the penalty's *value* grows with the number of entries: ≈ λ·n at init).
    beta, gamma, zeta: hard-concrete temperature and stretch interval (γ < 0 < 1 < ζ); Louizos et al.'s
        2/3, −0.1, 1.1 by default (Guo et al.'s code: β = 1, γ = −1.5, ζ = 1.5).
    init_log_alpha: initial gate logit; 5 (as Guo et al.) opens every eval gate (z = 1 needs
        log α ≥ log((1 − γ)/(ζ − 1)) ≈ 2.4 with the defaults) and ≈97% of training-mode gates.
    sparse: set by ``finalize()``: the adapter holds the kept values and their indices, no gate.
    """

    method = "diff_pruning"

    budget: float = 0.005
    l0_weight: float = 1.25e-7
    beta: float = 2.0 / 3.0
    gamma: float = -0.1
    zeta: float = 1.1
    init_log_alpha: float = 5.0
    sparse: bool = False

    def validate(self) -> None:
        name = type(self).__name__
        if not (_number(self.budget) and 0 < self.budget <= 1):
            raise ConfigError(f"{name}.budget must be a fraction in (0, 1] of entries kept, got {self.budget!r}")
        if not (_number(self.l0_weight) and self.l0_weight >= 0):
            raise ConfigError(f"{name}.l0_weight must be a number >= 0, got {self.l0_weight!r}")
        if not (_number(self.beta) and self.beta > 0):
            raise ConfigError(f"{name}.beta (gate temperature) must be > 0, got {self.beta!r}")
        if not (_number(self.gamma) and self.gamma < 0):
            raise ConfigError(f"{name}.gamma must be < 0 (the stretch's lower end, e.g. -0.1), got {self.gamma!r}")
        if not (_number(self.zeta) and self.zeta > 1):
            raise ConfigError(f"{name}.zeta must be > 1 (the stretch's upper end, e.g. 1.1), got {self.zeta!r}")
        if not _number(self.init_log_alpha):
            raise ConfigError(f"{name}.init_log_alpha must be a finite number, got {self.init_log_alpha!r}")
        if not isinstance(self.sparse, bool):
            raise ConfigError(f"{name}.sparse must be True or False, got {self.sparse!r}")


class DiffPruningInstance(LayerInstance):
    """One named Diff-pruning adapter: at the end of training every layer keeps its top-k entries, sparse."""

    def finalize(self) -> DiffPruning | None:
        config = self.config
        if config.sparse:
            return None
        new = config.replace(sparse=True)
        kept = {}
        entries = 0
        for name, adapter in self.layers():
            adapter.sparsify(new)
            kept[name] = int(adapter.values.numel())
            entries += weight_shape(adapter.base_layer).numel()
        total = sum(kept.values())
        sparsity = 1.0 - total / max(entries, 1)
        report(self, "finalize", kept=kept, kept_total=total, entries=entries, sparsity=sparsity,
               summary=f"kept {total:,} of {entries:,} entries (sparsity {100 * sparsity:.2f}%) over "
                       f"{len(kept)} layers, budget {config.budget:g} per layer")
        return new


@register
class DiffPruningAdapter(Adapter):
    instance_cls = DiffPruningInstance
    config_cls = DiffPruning
    additive = True
    formula = "2·d_out·d_in while training; ⌈budget·d_out·d_in⌉ after finalize()"
    trains = "dense diff w and gate logits log α; the kept entries after finalize()"
    layer_types = ("linear", "conv1d", "embedding", "conv2d")
    mergeable = True

    def __init__(self, config: DiffPruning, base_layer: nn.Module, layer_type: str, **kwargs) -> None:
        super().__init__(config, base_layer, layer_type, **kwargs)
        if layer_type == "embedding" and base_layer.max_norm is not None:
            raise UnsupportedLayerError(
                "diff_pruning cannot adapt an nn.Embedding with max_norm (it renormalises the rows it looks "
                "up, so W + Δ would not merge exactly); exclude it from targets="
            )
        kw = factory(base_layer)
        shape = weight_shape(base_layer)  # the native shape (also of a 4-bit layer's packed weight)
        if config.sparse:
            k = kept_count(config.budget, shape.numel())
            self.values = nn.Parameter(torch.zeros(k, **kw))
            self.register_buffer("indices", torch.arange(k, device=kw["device"]))  # distinct; a load overwrites
        else:
            self.diff = nn.Parameter(torch.zeros(shape, **kw))  # first: a NaN/inf diff always shows in the merge
            self.log_alpha = nn.Parameter(torch.full(shape, float(config.init_log_alpha), **kw))

    # -- the gate ------------------------------------------------------------------------------
    @property
    def is_sparse(self) -> bool:
        return "values" in self._parameters

    def gate(self, sample: bool | None = None) -> torch.Tensor:
        """z: a hard-concrete sample (``sample``; by default in training mode), else the deterministic gate."""
        c, log_alpha = self.config, self.log_alpha
        if self.training if sample is None else sample:
            u = torch.rand_like(log_alpha).clamp_(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / c.beta)
        else:
            s = torch.sigmoid(log_alpha)
        return (s * (c.zeta - c.gamma) + c.gamma).clamp(0.0, 1.0)

    def expected_l0(self) -> torch.Tensor:
        """Σ P(z ≠ 0) = Σ sigmoid(log α − β·log(−γ/ζ)) over this layer's entries."""
        c = self.config
        return torch.sigmoid(self.log_alpha - c.beta * math.log(-c.gamma / c.zeta)).sum()

    def regularization(self) -> torch.Tensor | None:
        if self.is_sparse or self.config.l0_weight == 0:
            return None
        return self.config.l0_weight * self.expected_l0()

    # -- the two views of φ --------------------------------------------------------------------
    def delta_weight(self, sample: bool = False) -> torch.Tensor:
        """z ⊙ w (dense form) or the scattered kept values. The deterministic gate unless ``sample`` (a
        training forward's draw): a merge, an analysis or finalize() in training mode must not bake in one
        random draw of the gates."""
        if self.is_sparse:
            shape = weight_shape(self.base_layer)
            flat = self.values.new_zeros(shape.numel()).index_add(0, self.indices, self.values)
            return flat.view(shape)
        return self.gate(sample) * self.diff

    def forward(self, x: torch.Tensor, base) -> torch.Tensor:
        y = base(x)
        layer, delta = self.base_layer, self.delta_weight(sample=self.training)
        if self.layer_type == "embedding":
            return y + F.embedding(x, delta, layer.padding_idx, None, 2.0, layer.scale_grad_by_freq).to(y.dtype)
        delta = delta.to(x.dtype)
        if self.layer_type == "linear":
            return y + F.linear(x, delta)
        if self.layer_type == "conv1d":
            return y + torch.matmul(x, delta)
        return y + layer._conv_forward(x, delta, None)  # conv2d

    # -- after training ------------------------------------------------------------------------
    @torch.no_grad()
    def sparsify(self, config: DiffPruning) -> None:
        """Keep the k largest |z ⊙ w| (eval gate) as ``values``/``indices``; drop w and log α."""
        delta = self.delta_weight().flatten()
        k = kept_count(config.budget, delta.numel())
        indices = torch.topk(delta.abs(), k, sorted=False).indices.sort().values
        requires_grad = self.diff.requires_grad
        del self.diff, self.log_alpha
        self.values = nn.Parameter(delta[indices].clone(), requires_grad=requires_grad)
        self.register_buffer("indices", indices)
        self.config = config

    @classmethod
    def num_params(cls, config: DiffPruning, base_layer: nn.Module, layer_type: str) -> int:
        n = weight_shape(base_layer).numel()  # d_out·d_in
        return kept_count(config.budget, n) if config.sparse else 2 * n
