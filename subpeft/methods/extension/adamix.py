"""AdaMix (Wang et al., 2022): a mixture of E bottleneck adapters, routed at random, averaged for inference.

Every adapted projection (by default Houlsby's places: attention output and FFN output of every
block) holds E down-projections (E, m, d) + (E, m) and E up-projections (E, d, m) + (E, d) of the
bottleneck mechanism (:mod:`.bottleneck`). All experts start from the **same** draw (W_up = 0: the
identity at attach), as in the reference code: averaging weights ("adaptation merging") is sound
for models trained from one initialisation, as in model soups, and random routing makes them diverge.

- Training mode: each forward draws one down expert and one up expert at random (torch's global
  RNG, so a run resumed with its RNG state routes exactly as the original).
- Consistency: the paper regularises with a symmetric KL between the predictions of two stochastic
  forwards. Here each adapter, in a training forward with grad enabled, also computes a second
  random route on the same input and ``tuned.regularization()`` returns
  ``consistency_weight · Σ_layers mean((f₁(h) − f₂(h))²)``: automatic in any loop that adds
  ``tuned.regularization()``, at the cost of one extra bottleneck (not one extra model forward)
  per layer. MSE rather than a symmetric KL of softmaxed features because adapter outputs are
  hidden-state offsets, not distributions (a softmax over features is shift-invariant and
  scale-dependent); for two Gaussians of equal variance the symmetric KL *is* the scaled squared
  difference. The paper's model-level form is :func:`consistency_loss` (two full forwards);
  ``consistency_weight=0`` turns the per-layer term off.
- Evaluation mode: one adapter whose tensors are the experts' means: deterministic, one
  bottleneck's cost.
- Saving: before ``tuned.finalize()`` every expert is saved (training resumes exactly); after it
  (``finalize()`` averages the experts in place and sets ``averaged=True``) only the averaged single
  adapter, which loads as one plain bottleneck (training can continue from it, without routing).

Trainable numbers per adapted layer: E·(2·d·m + d + m) (2·d·m + d + m once averaged).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.errors import ConfigError
from ...core.instance import LayerInstance
from ...core.registry import register
from ...mechanisms.bottleneck import Bottleneck, BottleneckAdapter, init_down


@dataclass
class AdaMix(Bottleneck):
    """AdaMix. ``sp.AdaMix(experts=4, size=None, reduction_factor=None, activation="relu",
    consistency_weight=1.0)``; ``averaged`` is set by ``tuned.finalize()``."""

    method = "adamix"
    positions = ("attn_out", "ffn_out")

    experts: int = 4
    consistency_weight: float = 1.0
    averaged: bool = False

    def validate(self) -> None:
        super().validate()
        self._check_positive_int("experts")
        w = self.consistency_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < float("inf"):
            raise ConfigError(f"AdaMix.consistency_weight must be a number >= 0, got {w!r}")
        if not isinstance(self.averaged, bool):
            raise ConfigError(f"AdaMix.averaged must be True or False, got {self.averaged!r}")


class AdaMixInstance(LayerInstance):
    """One named AdaMix adapter: at the end of training every layer averages its experts into one."""

    def finalize(self) -> AdaMix | None:
        config = self.config
        if config.averaged:
            return None
        new = config.replace(averaged=True)
        for adapter in self.adapters():
            adapter.average(new)
        return new


@register
class AdaMixAdapter(BottleneckAdapter):
    instance_cls = AdaMixInstance
    config_cls = AdaMix
    formula = "E·(2·d·m + d + m) (2·d·m + d + m once averaged)"
    trains = "E expert bottlenecks per place"

    def init_weights(self, config: AdaMix, kw: dict, d: int, m: int) -> None:
        self._consistency: torch.Tensor | None = None
        if config.averaged:
            super().init_weights(config, kw, d, m)
            return
        E = config.experts
        wd, bd = init_down(config, (m, d), kw)
        self.down_weight = nn.Parameter(wd.detach().expand(E, m, d).clone())  # one draw for every expert
        self.down_bias = nn.Parameter(bd.detach().expand(E, m).clone())
        self.up_weight = nn.Parameter(torch.zeros(E, d, m, **kw))
        self.up_bias = nn.Parameter(torch.zeros(E, d, **kw))

    def expert(self, down: int, up: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.down_weight[down], self.down_bias[down], self.up_weight[up], self.up_bias[up]

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The experts' means (evaluation), or the averaged adapter's own tensors."""
        if self.config.averaged:
            return super().weights()
        return self.down_weight.mean(0), self.down_bias.mean(0), self.up_weight.mean(0), self.up_bias.mean(0)

    def forward(self, x: torch.Tensor, base) -> torch.Tensor:
        h = base(x)
        if not self.training or self.config.averaged:
            self._consistency = None
            return h + self.bottleneck(h, *self.weights())
        E = self.config.experts
        second = self.config.consistency_weight > 0 and torch.is_grad_enabled()
        route = torch.randint(E, (4 if second else 2,)).tolist()
        y = self.bottleneck(h, *self.expert(route[0], route[1]))
        if second:
            y2 = self.bottleneck(h, *self.expert(route[2], route[3]))
            self._consistency = (y.float() - y2.float()).pow(2).mean()
        else:
            self._consistency = None
        return h + y

    def regularization(self) -> torch.Tensor | None:
        """consistency_weight · mean((f₁(h) − f₂(h))²) of this layer's last training forward."""
        if self._consistency is None:
            return None
        return self.config.consistency_weight * self._consistency

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_consistency"] = None  # a graph node: neither copied nor pickled
        return state

    # -- adaptation merging -----------------------------------------------------------------------
    def average(self, config: AdaMix) -> None:
        """Replace the experts by their mean (one plain bottleneck); ``config`` has ``averaged=True``."""
        with torch.no_grad():
            means = [t.mean(0) for t in (self.down_weight, self.down_bias, self.up_weight, self.up_bias)]
        requires_grad = self.down_weight.requires_grad
        for name, value in zip(("down_weight", "down_bias", "up_weight", "up_bias"), means, strict=True):
            delattr(self, name)
            setattr(self, name, nn.Parameter(value.clone(), requires_grad=requires_grad))
        self.config = config
        self._consistency = None

    @classmethod
    def num_params(cls, config: AdaMix, base_layer: nn.Module, layer_type: str) -> int:
        per = super().num_params(config, base_layer, layer_type)
        return per if config.averaged else config.experts * per


def consistency_loss(tuned: nn.Module, batch: Mapping[str, Any], weight: float = 1.0) -> tuple[Any, torch.Tensor]:
    """The paper's consistency regulariser: two stochastic forwards of ``batch`` (training mode),
    symmetric KL between their predicted distributions (softmax over the last dim of ``logits``; for
    per-token logits only the positions where ``attention_mask`` is 1).

    Returns (the first forward's output, ``weight · ½(KL(p₁‖p₂) + KL(p₂‖p₁))``, batchmean over
    positions). Add the second to that output's loss; set ``consistency_weight=0`` in the config to
    drop the per-layer term.
    """
    first = tuned(**batch)
    second = tuned(**batch)
    a = F.log_softmax(first.logits.float(), dim=-1).flatten(0, -2)
    b = F.log_softmax(second.logits.float(), dim=-1).flatten(0, -2)
    mask = batch.get("attention_mask")
    if first.logits.dim() == 3 and mask is not None:  # per-token predictions: real tokens only
        keep = mask.flatten().bool()
        a, b = a[keep], b[keep]
    kl = F.kl_div(a, b, log_target=True, reduction="batchmean") + F.kl_div(b, a, log_target=True, reduction="batchmean")
    return first, weight * 0.5 * kl

