"""AdaLoRA (Zhang et al., 2023): φ(W) = W + (α/r)·P·diag(λ)·Q with a global, shrinking rank budget.

P (d_out, r) is ``lora_B``, Q (r, d_in) is ``lora_A`` and λ is ``lora_E`` of shape (r, 1): Hugging Face
PEFT's names and shapes (on Conv2d, PEFT's 2-D Q (r, c_in·kh·kw) applied as a conv with the base kernel's
stride/padding/dilation, then P as a 1×1 conv). Init: P, Q ~ N(0, 0.02²), λ = 0 (identity at attach).
Built on the :class:`~subpeft.methods.extension.lora.LowRank` mechanism (G = diag(λ); dropout, MPC).

Two training-time hooks do the rest; nothing else has to be called:

- ``tuned.regularization()`` adds ``orth_reg·(Σ_layers ‖Q·Qᵀ − I‖_F + ‖Pᵀ·P − I‖_F) / (2·n_layers)``
  (plain, not squared, norms, averaged over the 2·n factor *matrices*; plus the MPC terms if
  configured): PEFT's and the reference code's formula, so ``orth_reg`` is exactly PEFT's
  ``orth_reg_weight`` (default 0.5, PEFT's default; the reference GLUE recipes use 0.1) and the
  PEFT conversions copy it unchanged. (Before this, ``orth_reg = c`` averaged over layers and meant
  PEFT's ``2c``; a config saved then keeps its number, so it now asks for half the old penalty.)
- ``tuned.step(global_step)``, after each optimizer step and before ``zero_grad`` (it reads ``.grad``;
  with no gradient at all it raises), runs the allocator over all layers of the adapter: per entry of
  P, λ, Q the sensitivity I = |p·∇p|, EMAs Ī ← β₁Ī + (1−β₁)I and Ū ← β₂Ū + (1−β₂)|I − Ī| (new Ī), and
  the triplet score s_i = Ī·Ū(λ_i) + (mean_j Ī·Ū(Q_ij) + mean_j Ī·Ū(P_ji)). The budget of kept triplets
  (:meth:`AdaLoRA.budget`) is r·n up to step t_i = ``init_warmup``, then
  ``int((r·n − target_r·n)·(1 − (t − t_i)/(T_f − t_i))³ + target_r·n)`` with T_f = total_steps −
  final_warmup (PEFT's ``budget_schedule``, same float expression). Every ``mask_interval`` steps in
  (t_i, T_f) the lowest-scored triplets get λ_i = 0 in place (they may grow back until the next
  allocation). At step T_f (or the first step after it, if T_f itself was skipped) the final
  allocation keeps target_r·n triplets, with the scores of step T_f − 1 (no update from T_f on), and is
  re-applied after every later step. A loop that updates the adapter without calling ``tuned.step``
  is warned once (from ``regularization()``): AdaLoRA would silently train as TriLoRA.

Schedules (:mod:`subpeft.methods`): ``init_warmup`` and ``final_warmup`` are ints (optimizer
steps) or floats in (0, 1), a fraction of ``total_steps``; ``total_steps`` is an int, or None, which
``subpeft train``/``compare`` set to the run's optimizer steps (``sp.attach`` needs an int). Fractions
are resolved to steps when the adapter is attached (``resolve_schedule``: round(fraction·total_steps),
halves up), so the saved config and a run's metrics.json hold steps. The defaults stay 0 and 0, PEFT's
(so ``sp.AdaLoRA(...)`` and ``peft.AdaLoraConfig(...)`` with the same numbers run the same schedule);
the paper's DeBERTaV3 GLUE recipes warm up for ≈ 10% of the run and hold the final budget for ≈ 45-60%
(SST-2: 6,000 and 22,000 of ≈ 50,500 steps; MNLI: 8,000 and 50,000 of ≈ 85,900):
``init_warmup=0.1, final_warmup=0.5`` is that recipe at any run length.

The importance EMAs (2× the adapter's size), the latest mask and the "final" flag are persistent
buffers saved beside PEFT's tensors (PEFT ignores them), so a run saved mid-training and reloaded
continues bit for bit; PEFT's own files lack them (``optional_keys``: they start from zero, as a
resumed PEFT run's would). ``tuned.step`` refuses while the adapter is merged (λ changes in place: the merged weights would go stale).

Differences from PEFT (``peft.tuners.adalora``): the scale is α/r where PEFT's is α/(ranknum + 1e-5),
ranknum = r, so PEFT's adapter term is ours × r/(r + 1e-5): outputs agree to 1e-6 while
|ΔW·x| ≤ 0.1·r, and to a relative 1e-5/r beyond. Exactly ``r·n − budget`` triplets are masked (PEFT
masks every score ≤ the k-th, more on ties; ties here go to the lower index). Files keep all r
triplets (masked λ = 0) where PEFT truncates layers to a saved ``rank_pattern`` (at every allocation,
so a mid-training PEFT file loses its masked triplets); PEFT files with a ``rank_pattern`` load here
with those per-layer ranks (0 allowed), and their allocation does not resume (it warns). Embedding
adapters, MPC and rsLoRA have no PEFT form (saved in subpeft's format).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import peft_int, peft_number
from ...core.errors import ConfigError
from ...core.instance import LayerInstance
from ...core.layers import dims
from ...core.registry import register
from ...mechanisms.low_rank import LowRank, LowRankAdapter
from .. import check_steps, is_fraction, resolve_steps
from .. import report_event as report
from .lora import PEFT_LORA_FIELDS

_STATE = ("ipt_A", "unc_A", "ipt_E", "unc_E", "ipt_B", "unc_B")


@dataclass
class AdaLoRA(LowRank):
    """AdaLoRA. ``sp.AdaLoRA(r=12, target_r=8, alpha=8, total_steps=..., init_warmup=0, final_warmup=0,
    mask_interval=1, beta1=0.85, beta2=0.85, orth_reg=0.5, dropout=0.0, mpc=None)``.

    ``total_steps`` (optimizer steps of the run) is required to attach: the budget schedule ends at
    ``total_steps - final_warmup``. ``init_warmup``/``final_warmup``: steps (int) or a fraction in (0, 1) of
    ``total_steps`` (see the module docstring). ``rank_pattern`` (module name → kept flags over the r triplets)
    comes from PEFT files whose layers were truncated to their allocated ranks.
    """

    method = "adalora"
    #: options counted in optimizer steps that :meth:`resolve_schedule` resolves (recorded by a run)
    schedule_options: ClassVar[tuple[str, ...]] = ("init_warmup", "final_warmup", "total_steps")
    peft_type = "ADALORA"

    r: int = 12
    target_r: int = 8
    init_warmup: int | float = 0
    final_warmup: int | float = 0
    mask_interval: int = 1
    total_steps: int | None = None
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg: float = 0.5  # PEFT's orth_reg_weight (same formula, same default)
    rank_pattern: dict[str, list[bool]] | None = None

    def validate(self) -> None:
        super().validate()
        self._check_positive_int("target_r")
        if self.target_r > self.r:
            raise ConfigError(
                f"AdaLoRA.target_r must be <= r (the budget only shrinks), got target_r={self.target_r}, r={self.r}"
            )
        for name in ("init_warmup", "final_warmup"):
            check_steps("AdaLoRA", name, getattr(self, name))
        self._check_positive_int("mask_interval")
        if self.total_steps is not None:
            self._check_positive_int("total_steps")
            t_i, t_f = self.warmups(self.total_steps)
            if t_i >= self.total_steps - t_f:
                given = "" if (t_i, t_f) == (self.init_warmup, self.final_warmup) else \
                    f" (init_warmup={self.init_warmup!r}, final_warmup={self.final_warmup!r} of {self.total_steps} steps)"
                raise ConfigError(
                    f"AdaLoRA leaves no steps to shrink the budget: init_warmup={t_i} must be < "
                    f"total_steps - final_warmup = {self.total_steps - t_f}{given}"
                )
        elif is_fraction(self.init_warmup) and is_fraction(self.final_warmup) \
                and self.init_warmup + self.final_warmup >= 1:
            raise ConfigError(f"AdaLoRA leaves no steps to shrink the budget: init_warmup={self.init_warmup} + "
                              f"final_warmup={self.final_warmup} must be < 1 (fractions of total_steps)")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ConfigError(f"AdaLoRA.{name} must be in (0, 1) (EMA factor, 0.85 by default), got {value!r}")
        if isinstance(self.orth_reg, bool) or not isinstance(self.orth_reg, (int, float)) or self.orth_reg < 0:
            raise ConfigError(f"AdaLoRA.orth_reg must be a number >= 0, got {self.orth_reg!r}")
        if self.rank_pattern is not None and not (
            isinstance(self.rank_pattern, dict)
            and all(isinstance(v, list) and len(v) == self.r and all(isinstance(b, bool) for b in v)
                    for v in self.rank_pattern.values())
        ):
            raise ConfigError(f"AdaLoRA.rank_pattern must map module names to r={self.r} booleans (kept triplets)")

    def warmups(self, total_steps: int) -> tuple[int, int]:
        """(init_warmup, final_warmup) in optimizer steps for a schedule of ``total_steps``."""
        return resolve_steps(self.init_warmup, total_steps), resolve_steps(self.final_warmup, total_steps)

    def final_step(self) -> int:
        """T_f = total_steps - final_warmup (in steps): the final allocation."""
        return self.total_steps - self.warmups(self.total_steps)[1]

    def resolve_schedule(self, total_steps: int | None) -> AdaLoRA:
        """This config with every schedule option in optimizer steps: ``total_steps`` None becomes the run's
        ``total_steps`` (when given), and fractional warm-ups become steps of it."""
        config = self if self.total_steps is not None or total_steps is None else self.replace(total_steps=total_steps)
        if config.total_steps is None:
            return config  # nothing to resolve against yet (the adapter refuses to attach without total_steps)
        t_i, t_f = config.warmups(config.total_steps)
        if (t_i, t_f) == (config.init_warmup, config.final_warmup) and not any(
                isinstance(v, float) for v in (config.init_warmup, config.final_warmup)):
            return config
        return config.replace(init_warmup=t_i, final_warmup=t_f)

    def layer_rank(self, name: str) -> int:
        """Triplets stored for the named layer (r, unless a PEFT rank_pattern truncated it)."""
        return sum(self.rank_pattern[name]) if self.rank_pattern and name in self.rank_pattern else self.r

    def budget(self, n_layers: int, step: int) -> tuple[int, bool]:
        """(triplets kept over ``n_layers`` layers, whether to mask) after optimizer step ``step``: PEFT's
        ``budget_schedule`` (same float expression), except that step T_f always masks."""
        if self.total_steps is None:
            raise ConfigError("AdaLoRA's budget schedule needs total_steps (optimizer steps of the run)")
        init, target = self.r * n_layers, self.target_r * n_layers
        t_i, final_warmup = self.warmups(self.total_steps)
        t_f = self.total_steps - final_warmup
        if step <= t_i:
            return init, False
        if step >= t_f:
            return target, True
        mul = 1 - (step - t_i) / (t_f - t_i)
        return int((init - target) * (mul**3) + target), step % self.mask_interval == 0

    # -- Hugging Face PEFT's AdaLoraConfig ------------------------------------------------------
    def to_peft_dict(self, layer_types: set[str] | frozenset[str] = frozenset()) -> dict[str, Any] | None:
        if self.mpc is not None or self.rslora or self.total_steps is None or "embedding" in layer_types:
            return None  # PEFT's AdaLoRA has no MPC, no rsLoRA, no Embedding, and needs total_step
        t_i, t_f = self.warmups(self.total_steps)  # PEFT's tinit/tfinal are steps
        pattern = None if self.rank_pattern is None else {f"{k}.lora_E": v for k, v in self.rank_pattern.items()}
        return {
            "peft_type": "ADALORA", "task_type": None, "init_r": self.r, "target_r": self.target_r,
            "lora_alpha": self.alpha, "lora_dropout": self.dropout, "tinit": t_i,
            "tfinal": t_f, "deltaT": self.mask_interval, "total_step": self.total_steps,
            "beta1": self.beta1, "beta2": self.beta2, "orth_reg_weight": self.orth_reg, "rank_pattern": pattern,
            "target_modules": self.targets, "exclude_modules": self.exclude, "modules_to_save": self.modules_to_save,
            "bias": "none", "fan_in_fan_out": "conv1d" in layer_types, "init_lora_weights": True,
            "inference_mode": True, "use_dora": False, "layers_to_transform": None, "layers_pattern": None,
        }

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> AdaLoRA:
        unsupported = {
            "bias": (data.get("bias", "none") or "none") != "none",
            "use_dora": bool(data.get("use_dora")),
            "layers_to_transform": data.get("layers_to_transform") is not None,
            "target_parameters": bool(data.get("target_parameters")),
            "trainable_token_indices": bool(data.get("trainable_token_indices")),
            "layer_replication": bool(data.get("layer_replication")),
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ConfigError(f"this PEFT AdaLoRA adapter uses options subpeft's AdaLoRA does not have: {bad}")
        unknown = sorted(k for k, v in data.items() if k not in _PEFT_ADALORA_KNOWN and k not in unsupported and v)
        if unknown:
            warnings.warn(f"AdaLoRA: ignoring PEFT config options subpeft does not know: {unknown}", UserWarning,
                          stacklevel=2)
        targets = data.get("target_modules")
        if isinstance(targets, (set, tuple)):
            targets = sorted(targets)
        r = peft_int(data, "init_r", 12)
        alpha = peft_number(data, "lora_alpha", 8)
        pattern = data.get("rank_pattern")
        if pattern is not None:
            pattern = {k.split(".lora_E")[0]: [bool(b) for b in v] for k, v in pattern.items()}
        return cls(
            r=r, alpha=alpha if alpha > 0 else r,  # PEFT: a scale of lora_alpha, or r when lora_alpha <= 0
            dropout=peft_number(data, "lora_dropout", 0.0), target_r=peft_int(data, "target_r", 8),
            init_warmup=peft_int(data, "tinit", 0), final_warmup=peft_int(data, "tfinal", 0),
            mask_interval=peft_int(data, "deltaT", 1), total_steps=peft_int(data, "total_step", None),
            beta1=peft_number(data, "beta1", 0.85), beta2=peft_number(data, "beta2", 0.85),
            orth_reg=peft_number(data, "orth_reg_weight", 0.5), rank_pattern=pattern,
            targets=targets, exclude=data.get("exclude_modules"), modules_to_save=data.get("modules_to_save"),
        )


# AdaLoraConfig fields read above, LoRA's bookkeeping fields, and LoraConfig options that PEFT's AdaLoRA
# ignores (so ignoring them computes what PEFT computes)
_PEFT_ADALORA_KNOWN = PEFT_LORA_FIELDS | {
    "init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step",
    "rank_pattern", "alpha_pattern", "lora_bias", "use_rslora", "bias",
}


class AdaLoRAInstance(LayerInstance):
    """One named AdaLoRA adapter: the orthogonality loss and the rank allocator see all its layers."""

    step_needs_unmerged = True  # the allocator's masks change ΔW in place

    def regularization(self) -> torch.Tensor | None:
        adapters = self.adapters()
        if not adapters:
            return None
        config, first = adapters[0].config, adapters[0]
        if first.training and torch.is_grad_enabled() and config.rank_pattern is None:
            _check_step_is_called(first)
        terms = [t for t in (a.regularization() for a in adapters) if t is not None]  # MPC, if configured
        if config.orth_reg > 0:
            dev = first.lora_A.device
            # the mean over the 2·n factor matrices, as PEFT: orth_reg = PEFT's orth_reg_weight
            terms.append(config.orth_reg / 2 * torch.stack([a.orthogonality().to(dev) for a in adapters]).mean())
        return torch.stack(terms).sum() if terms else None

    @torch.no_grad()
    def step(self, global_step: int) -> None:
        adapters = self.adapters()
        if not adapters:
            return
        config, first = adapters[0].config, adapters[0]
        first._stepped = True
        if config.rank_pattern is not None:
            if global_step < config.final_step() and not getattr(first, "_warned_pattern", False):
                first._warned_pattern = True
                warnings.warn("AdaLoRA: this adapter was loaded with a PEFT rank_pattern (ranks already allocated); "
                              "its rank allocation does not resume", UserWarning, stacklevel=3)
            return
        if not any(a.lora_E.requires_grad for a in adapters):
            return  # a frozen adapter does not train: nothing to allocate
        if not bool(first.rank_final):
            budget, mask = config.budget(len(adapters), global_step)
            final = global_step >= config.final_step()
            if not final:
                if not any([a._update_importance() for a in adapters]):
                    raise RuntimeError(
                        "AdaLoRA's rank allocator reads the gradients, but no adapter tensor has one: call "
                        "tuned.step(global_step) after optimizer.step() and before optimizer.zero_grad()"
                    )
            else:
                for a in adapters:
                    a.rank_final.fill_(True)
            if mask:
                AdaLoRAAdapter._mask_to_budget(adapters, budget)
            if final:
                self._report_final(global_step)
        if bool(first.rank_final):
            for a in adapters:
                a.lora_E.masked_fill_(~a.rank_mask.unsqueeze(1), 0.0)


    def _report_final(self, global_step: int) -> None:
        """The final allocation as an event (:func:`subpeft.methods.report_event`): ranks kept per layer."""
        ranks = {name: a.ranks() for name, a in self.layers()}
        kept, config = sum(ranks.values()), self.config
        values = sorted(ranks.values())
        report(self, "final_budget", step=global_step, ranks=ranks, kept=kept, initial=config.r * len(ranks),
               summary=f"final budget from step {global_step}: {kept} of {config.r * len(ranks)} triplets kept "
                       f"(target_r {config.target_r} x {len(ranks)} layers); per layer {values[0]} to {values[-1]}")


@register
class AdaLoRAAdapter(LowRankAdapter):
    instance_cls = AdaLoRAInstance
    config_cls = AdaLoRA
    formula = "r·(d_in + d_out) + r"
    trains = "P, Q and singular values λ; a global rank budget masks λ"
    has_middle = True

    @classmethod
    def prepare_config(cls, config: AdaLoRA, model: nn.Module) -> AdaLoRA:
        # the attached (and saved) config holds its warm-ups in steps
        return super().prepare_config(config.resolve_schedule(None), model)

    def __init__(self, config: AdaLoRA, base_layer: nn.Module, layer_type: str, **kwargs) -> None:
        if config.total_steps is None:
            raise ConfigError(
                "AdaLoRA needs total_steps, the number of optimizer steps of the run: its budget falls from r to "
                "target_r per layer between init_warmup and total_steps - final_warmup. "
                "Use e.g. sp.AdaLoRA(total_steps=1000, ...)"
            )
        super().__init__(config, base_layer, layer_type, **kwargs)

    def init_factors(self, config: AdaLoRA, kw: dict, d_out: int, d_in: int) -> None:
        r = config.layer_rank(self.layer_name)
        self.lora_A = nn.Parameter(torch.randn(r, d_in, **kw) * 0.02)  # for Conv2d d_in = c_in·kh·kw
        self.lora_E = nn.Parameter(torch.zeros(r, 1, **kw))
        self.lora_B = nn.Parameter(torch.randn(d_out, r, **kw) * 0.02)
        self.register_buffer("ranknum", torch.full((1,), float(config.r), **kw))  # PEFT's; the scale is α/r
        for name in _STATE:
            self.register_buffer(name, torch.zeros_like(getattr(self, "lora_" + name[-1])))
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=kw["device"]))
        self.register_buffer("rank_final", torch.zeros((), dtype=torch.bool, device=kw["device"]))

    def forward(self, x: torch.Tensor, base) -> torch.Tensor:
        if self.lora_E.shape[0] == 0:  # a PEFT rank_pattern kept no triplet of this layer
            return base(x)
        return super().forward(x, base)

    def add_delta(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.layer_type != "conv2d":
            return super().add_delta(y, x)
        A = self.lora_A.view(-1, *self.base_layer.weight.shape[1:])  # PEFT's 2-D factors as kernels
        drop = self.input_dropout()
        h = (x if drop is None else drop(x)).to(A.dtype)
        h = self._hidden(self.base_layer._conv_forward(h, A, None))
        return y + F.conv2d(h, self.lora_B[:, :, None, None]) * self.scaling

    def peft_compatible(self) -> bool:
        return True  # PEFT's AdaLoRA Conv2d reshapes the base kernel's own geometry, dilation included

    def core(self) -> tuple[torch.Tensor, bool]:
        return self.lora_E[:, 0], True  # diag(λ)

    def optional_keys(self) -> set[str]:
        """Saved state that Hugging Face PEFT's files lack: absent from a file, it keeps its initial value."""
        return {"ranknum", "rank_mask", "rank_final", *_STATE}

    @classmethod
    def num_params(cls, config: AdaLoRA, base_layer: nn.Module, layer_type: str) -> int:
        d_out, d_in = dims(base_layer, layer_type)
        return config.r * (d_in + d_out + 1)

    @classmethod
    def model_num_params(cls, config: AdaLoRA, layers: list[tuple[str, nn.Module, str]]) -> int:
        return sum(config.layer_rank(name) * (sum(dims(layer, kind)) + 1) for name, layer, kind in layers)

    # -- orthogonality loss ------------------------------------------------------------------------
    def orthogonality(self) -> torch.Tensor:
        """‖Q·Qᵀ − I‖_F + ‖Pᵀ·P − I‖_F of this layer."""
        Q, P = self.factors_2d()
        eye = torch.eye(Q.shape[0], device=Q.device, dtype=Q.dtype)
        return torch.linalg.matrix_norm(Q @ Q.t() - eye) + torch.linalg.matrix_norm(P.t() @ P - eye)

    # -- rank allocator ---------------------------------------------------------------------------
    @torch.no_grad()
    def _update_importance(self) -> bool:
        config, seen = self.config, False
        for key in ("A", "E", "B"):
            p = getattr(self, "lora_" + key)
            seen |= p.grad is not None
            ipt = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
            ema, unc = getattr(self, "ipt_" + key), getattr(self, "unc_" + key)
            ema.mul_(config.beta1).add_(ipt, alpha=1 - config.beta1)
            unc.mul_(config.beta2).add_((ipt - ema).abs(), alpha=1 - config.beta2)
        return seen

    def triplet_scores(self) -> torch.Tensor:
        """s_i = score(λ_i) + (mean score(Q_i,:) + mean score(P_:,i)), score = Ī·Ū (PEFT's sum order)."""
        r = self.lora_E.shape[0]
        s_a = (self.ipt_A * self.unc_A).reshape(r, -1).mean(1)
        s_b = (self.ipt_B * self.unc_B).reshape(self.lora_B.shape[0], r).mean(0)
        return (self.ipt_E * self.unc_E).view(-1) + (s_a + s_b)

    @staticmethod
    def _mask_to_budget(adapters: list[AdaLoRAAdapter], budget: int) -> None:
        dev = adapters[0].lora_E.device
        scores = torch.cat([a.triplet_scores().to(dev) for a in adapters])
        keep = torch.ones(scores.numel(), dtype=torch.bool, device=dev)
        drop = scores.numel() - budget
        if drop > 0:
            keep[torch.sort(scores, stable=True).indices[:drop]] = False
        for a, k in zip(adapters, keep.split([a.lora_E.shape[0] for a in adapters]), strict=True):
            a.rank_mask.copy_(k)
            a.lora_E.masked_fill_(~a.rank_mask.unsqueeze(1), 0.0)

    def ranks(self) -> int:
        """Triplets this layer keeps under the latest allocation."""
        return int(self.rank_mask.sum())


def _check_step_is_called(first: AdaLoRAAdapter) -> None:
    """Warn once when λ changed (an optimizer step) between two regularization() calls with no tuned.step()."""
    version = first.lora_E._version
    last = getattr(first, "_version_at_reg", None)
    stepped, warned = getattr(first, "_stepped", False), getattr(first, "_warned_step", False)
    if last is not None and version != last and not stepped and not warned:
        first._warned_step = True
        warnings.warn(
            "AdaLoRA: the adapter was updated but tuned.step(global_step) was not called: the rank budget does not "
            "run and AdaLoRA trains like TriLoRA. Call tuned.step(global_step) after each optimizer.step(), "
            "before zero_grad() (the library's trainer and its HF callback do)", UserWarning, stacklevel=4,
        )
    first._version_at_reg = version
    first._stepped = False
