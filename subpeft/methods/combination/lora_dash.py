"""LoRA-Dash: plain LoRA for t optimizer steps, then LoRA plus tuned task-specific directions of W.

Phase 1 (pre-launch, ``prelaunch_steps`` = t optimizer steps): φ(W) = W + (α/r)·B·A. ``prelaunch_steps``
is an int (steps), a float in (0, 1) (a fraction of the run's optimizer steps:
:func:`subpeft.methods.check_steps`), or None, the default: t = min(100, round(0.1·T)) (at least 1) for
a run of T optimizer steps, and t = 100 when the run's length is not known (``sp.attach`` alone).
Why: the paper and its reference recipe use t = 100 steps in runs of ≈ 32k steps (commonsense
reasoning, LLaMA-7B; the pre-launch is 0.3% of the run). A fixed 0.3% would leave a 300-step run
one step of LoRA training before the directions are chosen (δ_i would rank the noise of one
batch's gradient), and a fixed 100 steps would starve the dash phase of a short run (a 120-step run
would dash for 20 steps). Long runs (T ≥ 1000) keep the paper's 100 steps exactly; shorter ones
pre-launch for 10% of the run, so the dash phase always gets at least 90% of it. The resolved t is
what the attached config holds (saved with the adapter, and in a run's metrics.json).
Then, once, in
``tuned.step(global_step)`` after the t-th optimizer step (``global_step`` = optimizer steps done,
as in HF ``TrainerState``; never by counting forwards), under no_grad: with the frozen
W = U·diag(σ)·Vh, rank every direction by its change rate δ_i = |u_iᵀ·ΔW·v_i| / (σ_i + ε),
ΔW = (α/r)·B·A, computed as (α/r)·|(u_iᵀ·B)·(A·v_i)| (O(r·(d_in + d_out)) per direction, ΔW never
formed), and keep the top s (the task-specific directions). Phase 2 (dash):
φ(W) = W + (α/r)·B·A + U_s·diag(Δσ)·Vh_s, with A, B and Δσ ∈ ℝ^s training; the dash term has no α/r
and reads the same dropped-out input as the LoRA term.

Δσ is a parameter from attach time (zeros), so an optimizer built before training sees it; before the
switch it takes no part in the forward (no gradient). U_s, Vh_s, the chosen indices and the phase
are persistent buffers, also from attach time (zeros, -1 and 0 until the switch): a reloaded
adapter neither re-runs phase 1 nor re-selects. Native file format (PEFT has no LoRA-Dash).

Where the SVD happens: at the switch, not at attach. W is frozen, so both give the same factors
(one float32 SVD service, canonical signs), and every trainable tensor and saved buffer still exists
from attach time; keeping the full U, σ, Vh per layer through the pre-launch instead would hold
min(d_out, d_in)·(d_out + d_in + 1) extra floats per layer (2× the layer's float32 weight when
square, 4× a bf16 one) for t steps, and save nothing the method uses. The step hook must not run
while this adapter is merged into W (the switch reads W from the base layer): ``tuned.step`` refuses then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...core.errors import ConfigError
from ...core.instance import LayerInstance
from ...core.layers import dims, weight_2d
from ...core.registry import register
from ...core.svd import svd
from ...mechanisms.low_rank import LowRank, LowRankAdapter
from .. import check_steps, resolve_steps
from .. import report_event as report

#: the paper's t, in optimizer steps, and the largest share of a run the default pre-launch may take
PAPER_PRELAUNCH_STEPS = 100
DEFAULT_PRELAUNCH_SHARE = 0.1


@dataclass
class LoRADash(LowRank):
    """LoRA-Dash (Si et al., 2024). ``sp.LoRADash(r=8, alpha=8, prelaunch_steps=None, directions=8)``.

    ``prelaunch_steps`` (t): optimizer steps of plain LoRA before the directions are chosen: an int
    >= 1, a fraction in (0, 1) of the run's optimizer steps, or None (min(100, 10% of the run); 100
    without a known run length): see the module docstring. Fractions are resolved by
    :meth:`resolve_schedule` (the run application does it); ``sp.attach`` refuses an unresolved one.

    The switch needs ``tuned.step(global_step)`` after every optimizer step (the library's trainer
    and its HF callback call it); a loop that never calls it trains plain LoRA.
    """

    method = "lora_dash"
    #: options counted in optimizer steps that :meth:`resolve_schedule` resolves (recorded by a run)
    schedule_options: ClassVar[tuple[str, ...]] = ("prelaunch_steps",)

    prelaunch_steps: int | float | None = None  # t (see above)
    directions: int = 8  # s: task-specific directions tuned in phase 2 (at most min(d_out, d_in))
    eps: float = 1e-8

    def validate(self) -> None:
        super().validate()
        check_steps("LoRADash", "prelaunch_steps", self.prelaunch_steps, minimum=1, allow_none=True,
                    none_means="the default: min(100, 10% of the run)")
        self._check_positive_int("directions")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not self.eps > 0:
            raise ConfigError(f"LoRADash.eps must be a positive number (1e-8 by default), got {self.eps!r}")
        if self.mpc == "n":
            raise ConfigError("LoRADash ranks directions by ΔW = s·B·A, which mpc='n' (a ReLU between the factors) "
                              "does not have: use mpc=None, 'o' or 'd'")

    def resolve_schedule(self, total_steps: int | None) -> LoRADash:
        """This config with ``prelaunch_steps`` in optimizer steps, for a run of ``total_steps`` (None: unknown)."""
        t = self.prelaunch_steps
        if isinstance(t, int):
            return self
        if t is None:
            if total_steps is None:
                return self.replace(prelaunch_steps=PAPER_PRELAUNCH_STEPS)
            share = resolve_steps(DEFAULT_PRELAUNCH_SHARE, total_steps, minimum=1)
            return self.replace(prelaunch_steps=min(PAPER_PRELAUNCH_STEPS, share))
        if total_steps is None:
            raise ConfigError(
                f"LoRADash.prelaunch_steps={t!r} is a fraction of the run's optimizer steps, which sp.attach does not "
                f"know: give steps (an int, e.g. prelaunch_steps=100), or resolve it first with "
                f"config.resolve_schedule(total_steps) (subpeft train/compare do)")
        return self.replace(prelaunch_steps=resolve_steps(t, total_steps, minimum=1))


class LoRADashInstance(LayerInstance):
    """One named LoRA-Dash adapter: its step hook switches every layer, and reports the switch (an event,
    :func:`subpeft.methods.report_event`: the step, and per layer the indices of the chosen directions, 0 being
    the largest singular value)."""

    step_needs_unmerged = True  # the switch reads W's singular vectors, and merged W holds ΔW

    def step(self, global_step: int) -> None:
        layers = self.layers()
        before = [a.dashing() for _, a in layers]
        for _, adapter in layers:
            adapter.step(global_step)
        switched = {name: a.dash_index.tolist() for (name, a), was in zip(layers, before, strict=True)
                    if not was and a.dashing()}
        if switched:
            chosen = sorted(i for idx in switched.values() for i in idx)
            counts = sorted({len(v) for v in switched.values()})
            per = counts[0] if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
            report(self, "dash_phase", step=global_step, layers=len(switched), directions=switched,
                   summary=f"dash phase from step {global_step}: {per} directions in each of {len(switched)} layers "
                           f"(singular-value indices, 0 = largest: median {chosen[len(chosen) // 2]}, "
                           f"{chosen[0]} to {chosen[-1]})")


@register
class LoRADashAdapter(LowRankAdapter):
    instance_cls = LoRADashInstance
    config_cls = LoRADash
    formula = "r·(d_in + d_out) + s"
    trains = "low-rank factors A, B; then Δσ on s chosen singular directions"
    idle_parameters = True  # Δσ has no gradient before the switch

    @classmethod
    def prepare_config(cls, config: LoRADash, model: nn.Module) -> LoRADash:
        # the attached (and saved) config holds t in steps: the default becomes the paper's 100, a fraction fails
        return super().prepare_config(config.resolve_schedule(None), model)

    def init_factors(self, config: LoRADash, kw: dict, d_out: int, d_in: int) -> None:
        super().init_factors(config, kw, d_out, d_in)
        k = min(config.directions, d_out, d_in)
        self.dash_sigma = nn.Parameter(torch.zeros(k, **kw))  # Δσ
        self.register_buffer("dash_U", torch.zeros(d_out, k, **kw))  # U_s
        self.register_buffer("dash_Vh", torch.zeros(k, d_in, **kw))  # Vh_s
        self.register_buffer("dash_index", torch.full((k,), -1, dtype=torch.long, device=kw["device"]))
        self.register_buffer("dash_phase", torch.zeros((), dtype=torch.long, device=kw["device"]))
        self.__dict__["_phase_seen"] = None

    def dashing(self) -> bool:
        """Whether phase 2 is on. Read from the buffer only when it changed (switch, load, move),
        so that a forward on an accelerator does not wait for the device."""
        buf = self.dash_phase
        try:
            version = buf._version
        except RuntimeError:  # inference-mode tensors keep no version counter
            return bool(buf)
        seen = self.__dict__["_phase_seen"]
        if seen is None or seen[0] is not buf or seen[1] != version:
            seen = self.__dict__["_phase_seen"] = (buf, version, bool(buf))
        return seen[2]

    # -- the phase switch --------------------------------------------------------------------------
    def step(self, global_step: int) -> None:
        if global_step >= self.config.prelaunch_steps and not self.dashing():
            self.select_directions()

    @torch.no_grad()
    def select_directions(self) -> None:
        """Choose the top-s directions of W by change rate δ_i and enter phase 2."""
        U, S, Vh = svd(weight_2d(self.base_layer, self.layer_type))
        A, B = self.factors_2d()
        ub = U.t() @ B.to(U.dtype)  # (m, r): u_iᵀ·B
        av = A.to(U.dtype) @ Vh.t()  # (r, m): A·v_i
        rate = (ub * av.t()).sum(1).abs() * self.scaling / (S + self.config.eps)
        index = torch.topk(rate, self.dash_index.numel()).indices
        self.dash_U.copy_(U[:, index])
        self.dash_Vh.copy_(Vh[index])
        self.dash_index.copy_(index)
        self.dash_phase.fill_(1)

    # -- the two views -----------------------------------------------------------------------------
    def linear_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        if not self.dashing():
            return super().linear_factors()  # plain LoRA
        # LoRA and dash as one rank-(r + s) path: [A; Vh_s] in, [(α/r)·B, U_s·diag(Δσ)] out (the fused
        # node on nn.Linear and the generic path alike): one dropped input for both terms
        return (torch.cat([self.lora_A, self.dash_Vh]),
                torch.cat([self.lora_B * self.scaling, self.dash_U * self.dash_sigma], dim=1), 1.0)

    def add_delta(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not self.dashing() or self.layer_type in ("linear", "conv1d"):
            return super().add_delta(y, x)  # Linear/Conv1D: through linear_factors()
        U = self.dash_U * self.dash_sigma  # U_s·diag(Δσ), (d_out, s)
        if self.layer_type == "embedding":  # a lookup: no dropout, as LoRA
            return super().add_delta(y, x) + (F.embedding(x, self.dash_Vh.t()) @ U.t()).to(y.dtype)
        A, B = self.lora_A, self.lora_B
        h = x if self.dropout is None else self.dropout(x)  # one dropped input for both terms
        if h.dtype != A.dtype:
            h = h.to(A.dtype)
        # Conv2d: [A; Vh_s] as one kernel, [(α/r)·B, U_s·diag(Δσ)] as one 1×1 kernel
        inner = torch.cat([A, self.dash_Vh.view(-1, *A.shape[1:])])
        hid = self.base_layer._conv_forward(h, inner, None)
        outer = torch.cat([B * self.scaling, U[:, :, None, None]], dim=1)
        return y + F.conv2d(hid, outer).to(y.dtype)

    def delta_2d(self) -> torch.Tensor:
        delta = super().delta_2d()
        if self.dashing():
            delta = delta + (self.dash_U * self.dash_sigma) @ self.dash_Vh
        return delta

    @classmethod
    def num_params(cls, config: LoRADash, base_layer: nn.Module, layer_type: str) -> int:
        d_out, d_in = dims(base_layer, layer_type)
        return config.r * (d_in + d_out) + min(config.directions, d_out, d_in)
