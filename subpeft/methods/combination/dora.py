"""DoRA: φ(W) = m ⊙ (W + s·B·A) / ‖W + s·B·A‖_row, the row norm (over d_in, per output) detached.

m (d_out) starts at ‖W‖_row, A and B as LoRA, so φ(W) = W at attach. The forward never forms
W + s·B·A: with z = W·x + s·B·A·drop(x) (LoRA's path, dropout on the low-rank input only) and
g = m / n, ``y = g ⊙ z + b``; the norm comes from the factors,
``n² = ‖w_o‖² + 2s·(B ⊙ (W·Aᵀ)).sum(1) + s²·((B·(A·Aᵀ)) ⊙ B).sum(1)``, an O(r·d_in·d_out) cost
independent of the batch, computed in the adapter's float precision under no_grad. On nn.Linear and
Conv1D one autograd node does the whole layer (no second base forward, also with dropout); it saves
z (activation-sized) for ∂L/∂g and adds two activation passes to LoRA's (y = g ⊙ z + b, ∂L/∂g).
``‖w_o‖²`` is recomputed per step, not cached: it is one pass over W, like W·Aᵀ (about 20 µs at
384 × 384), and a cache keyed on the weight's version would miss writes through ``.data``.

Files are Hugging Face PEFT's LoRA with ``use_dora=True`` (magnitude key ``lora_magnitude_vector``;
on Conv2d shaped (1, c_out, 1, 1) as PEFT stores it). One difference from PEFT in training mode with
dropout: PEFT applies the magnitude correction to ``W·drop(x)`` (a second base forward), subpeft to
``W·x``, i.e. y = φ(W)-weighted base output plus the dropped-out low-rank term; without dropout, and
in eval mode, the two compute the same function.

Stacked on other adapters of the same layer (``set_adapter(["a", "b"])`` with b a DoRA), DoRA is
applied to the weight as the stack below it leaves it: W′ = φ_a(W) (merged adapters are already in
the stored weight; the active unmerged ones below are applied to it, :meth:`Adapter.stack_weight`),
n = ‖W′ + s·B·A‖_row, and the bias c of the layers below (their output at x = 0) is left unscaled:
``y = c + g ⊙ (base(x) − c + s·B·A·x)``. That is φ_b(φ_a(W)) with a's bias, exactly what merging a
and then b writes, so the stack's forward equals its merge (also a partial one: merging a alone
leaves the output as it was). PEFT adds each adapter's term to the base output separately and
normalises over the base weight only, so it computes another function for such a stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core.errors import ConfigError, UnsupportedLayerError
from ...core.layers import dims, from_2d, to_2d, weight_2d
from ...core.registry import register
from ...core.weights import weight_access
from ...mechanisms.fastpath import autocast_on, functorch_active, has_hooks
from ...mechanisms.low_rank import LowRank, LowRankAdapter
from ..extension.lora import LoRA, LoRAAdapter


@dataclass
class DoRA(LowRank):
    """DoRA (Liu et al., 2024). ``sp.DoRA(r=8, alpha=16, dropout=0.0, targets=[...], rslora=False)``."""

    method = "dora"
    peft_type = "LORA"

    def validate(self) -> None:
        super().validate()
        if self.mpc == "n":
            raise ConfigError("DoRA.mpc cannot be 'n': DoRA normalises the weight W + ΔW, which needs a linear ΔW; "
                              "use mpc='o' or 'd' (or None)")

    def to_peft_dict(self, layer_types: set[str] | frozenset[str] = frozenset()) -> dict[str, Any] | None:
        data = LoRA.to_peft_dict(self, layer_types)  # type: ignore[arg-type]
        if data is not None:
            data["use_dora"] = True
        return data

    @classmethod
    def accepts_peft(cls, data: dict[str, Any]) -> bool:
        return bool(data.get("use_dora"))

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> DoRA:
        return cls(**LoRA._peft_fields(data, allowed=("use_dora",)))


class _DoRALinear(torch.autograd.Function):
    """``y = g ⊙ (x·Wt + s·(xd·Aᵀ)·Bᵀ) + b`` as one node; ``Wt`` is the (d_in, d_out) weight view and
    ``xd`` the LoRA input: its dropout, or None for ``x`` itself (not ``x`` twice: torch.compile's Dynamo
    breaks the graph on an autograd.Function given one tensor in two inputs). Saves z (pre-scale output)
    for ∂L/∂g."""

    @staticmethod
    def forward(ctx, x, xd, Wt, bias, A, B, g, scaling):
        x2 = x.reshape(-1, x.shape[-1])
        same = xd is None
        xd2 = x2 if same else xd.reshape(-1, xd.shape[-1])
        h = torch.mm(xd2, A.t())
        z = torch.mm(x2, Wt).addmm_(h, B.t(), alpha=scaling)
        y = torch.addcmul(bias, z, g) if bias is not None else z * g
        ctx.scaling, ctx.same, ctx.has_bias = scaling, same, bias is not None
        ctx.save_for_backward(x, None if same else xd, Wt, A, B, g, h, z)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, xd, Wt, A, B, g, h, z = ctx.saved_tensors
        s = ctx.scaling
        need_x, need_xd, need_W, need_b, need_A, need_B, need_g, _ = ctx.needs_input_grad
        x2 = x.reshape(-1, x.shape[-1])
        xd2 = x2 if ctx.same else xd.reshape(-1, xd.shape[-1])
        if torch.is_grad_enabled():  # create_graph: saved activations must be functions of the inputs again
            h = torch.mm(xd2, A.t())
            z = torch.mm(x2, Wt) + torch.mm(h, B.t()) * s
        gy = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_xd = grad_W = grad_b = grad_A = grad_B = grad_g = None
        if need_g:
            grad_g = torch.linalg.vecdot(gy, z, dim=0)
        # ∂L/∂z = gy ⊙ g: with at least d_in rows, g scales the weights W and B instead (a smaller tensor
        # than the activation-sized ∂L/∂z, and one pass over the activations less)
        fold = gy.shape[0] >= Wt.shape[0]
        go = gy if fold else gy * g
        need_lora_x = need_x if ctx.same else need_xd
        grad_h = torch.mm(go, B * g.unsqueeze(1) if fold else B).mul_(s) if (need_lora_x or need_A) else None
        if need_x:
            grad_x = torch.mm(go, (Wt * g).t() if fold else Wt.t())
            if ctx.same:
                grad_x.addmm_(grad_h, A)
            grad_x = grad_x.view(x.shape)
        if need_xd and not ctx.same:
            grad_xd = torch.mm(grad_h, A).view(xd.shape)
        if need_W:
            grad_W = torch.mm(x2.t(), go)
            if fold:
                grad_W.mul_(g)
        if need_b and ctx.has_bias:
            grad_b = gy.sum(0)
        if need_A:
            grad_A = torch.mm(grad_h.t(), xd2)
        if need_B:
            grad_B = torch.mm(h.t(), go)
            if fold:
                grad_B.mul_(g)
            grad_B = grad_B.mul_(s).t()
        return grad_x, grad_xd, grad_W, grad_b, grad_A, grad_B, grad_g, None


def _conv1d_forward():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D.forward


@register
class DoRAAdapter(LowRankAdapter):
    """LoRA factors plus a trainable magnitude ``lora_magnitude_vector`` (d_out)."""

    config_cls = DoRA
    formula = "r·(d_in + d_out) + d_out"
    trains = "low-rank factors A, B and the row magnitudes m"
    layer_types = ("linear", "conv1d", "embedding", "conv2d")
    additive = False  # the row norm makes φ depend on the weight below
    reads_stack = True

    def __init__(self, config: DoRA, base_layer: nn.Module, layer_type: str, **kwargs) -> None:
        dtype = weight_access(base_layer).dtype  # of the dense values (a 4-bit layer: what it was quantised from)
        if not dtype.is_floating_point:
            raise UnsupportedLayerError(
                f"DoRA needs the base weight in floating point to take its row norms; {kwargs.get('name', 'this layer')!r} "
                f"holds {dtype} (quantised?): adapt a floating-point layer, or use LoRA on it"
            )
        super().__init__(config, base_layer, layer_type, **kwargs)
        d_out = dims(base_layer, layer_type)[0]
        with torch.no_grad():
            m = weight_2d(base_layer, layer_type).to(self.lora_A.dtype).norm(dim=1)
        shape = (1, d_out, 1, 1) if layer_type == "conv2d" else (d_out,)
        self.lora_magnitude_vector = nn.Parameter(m.reshape(shape).clone())
        # the norm used by the last merge, for unmerged_params (moved with the module, never saved)
        self.register_buffer("_merge_norm", None, persistent=False)
        self._fused_forward = (nn.Linear.forward if layer_type == "linear"
                               else _conv1d_forward() if layer_type == "conv1d" else None)

    # -- the detached row norm of W + s·B·A, without forming it -----------------------------------
    def weight_norm(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """n = ‖W + s·B·A‖_row (d_out,), detached, from the factors (see the module docstring); W is the
        stored weight, or ``weight`` (native layout: the weight as the adapters below leave it)."""
        A, B = self.factors_2d()
        with torch.no_grad():
            W = weight_2d(self.base_layer, self.layer_type) if weight is None else to_2d(
                self.base_layer, self.layer_type, weight
            )
            if W.dtype != A.dtype:
                W = W.to(A.dtype)
            s = self.scaling
            n2 = torch.linalg.vecdot(W, W)  # ‖w_o‖²
            n2.add_(torch.linalg.vecdot(B, torch.mm(W, A.t())), alpha=2 * s)
            n2.add_(torch.linalg.vecdot(torch.mm(B, torch.mm(A, A.t())), B), alpha=s * s)
            return n2.clamp_min_(torch.finfo(n2.dtype).tiny).sqrt_()

    def _magnitude(self) -> torch.Tensor:
        return self.lora_magnitude_vector.reshape(-1)

    # -- the two views -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, base, below: tuple = ()) -> torch.Tensor:
        layer = self.base_layer
        if below:  # stacked on other running adapters: DoRA of the weight as they leave it
            return self._stacked_forward(x, base, below)
        g = self._magnitude() / self.weight_norm()
        if self._fused_forward is not None and base is layer and type(layer).forward is self._fused_forward:
            W, A, B = layer.weight, self.lora_A, self.lora_B
            if (
                x.dtype == W.dtype == A.dtype == B.dtype and not has_hooks(layer)
                and not autocast_on(x.device.type) and not functorch_active()
            ):
                drop, scaling = self.dropout, self.scaling
                if drop is None or not drop.training or drop.p == 0:
                    xd = x
                elif drop.fusable(x):  # as the generic low-rank path: the mask here, 1/(1-p) in the scale
                    xd, scaling = drop.mask(x, drop.positions(x)), scaling * drop.scale
                else:
                    xd = drop(x)
                Wt = W.t() if self.layer_type == "linear" else W
                if not torch.is_grad_enabled() or not (
                    x.requires_grad or A.requires_grad or B.requires_grad or g.requires_grad or W.requires_grad
                ):
                    return self._infer(x, xd, Wt, layer.bias, g, scaling)
                return _DoRALinear.apply(x, None if xd is x else xd, Wt, layer.bias, A, B, g, scaling)
        z = self.add_delta(base(x), x)
        g = g.to(z.dtype)
        bias = getattr(layer, "bias", None) if self.layer_type != "embedding" else None
        if self.layer_type == "conv2d":
            g = g.view(1, -1, 1, 1)
            bias = bias.view(1, -1, 1, 1) if bias is not None else None
        if bias is None:
            return z * g
        bias = bias.to(z.dtype)
        return torch.addcmul(bias, z - bias, g)

    def _stacked_forward(self, x: torch.Tensor, base, below: tuple) -> torch.Tensor:
        """``y = c + g ⊙ (base(x) − c + s·B·A·x)``, g = m / ‖W′ + s·B·A‖_row with W′ the weight as the
        adapters ``below`` leave it and c the bias of the layers below (see the module docstring)."""
        g = self._magnitude() / self.weight_norm(self.stack_weight(below))
        z = self.add_delta(base(x), x)
        g = g.to(z.dtype)
        if self.layer_type == "embedding":  # an embedding has no bias, nor do the adapters below it
            return z * g
        # the bias of the chain below: its output at x = 0 (every weight-space method is affine in x)
        if self.layer_type == "conv2d":
            c = base(x.new_zeros(1, *x.shape[-3:]))[0, :, 0, 0].view(1, -1, 1, 1)
            g = g.view(1, -1, 1, 1)
        else:
            c = base(x.new_zeros(1, x.shape[-1]))[0]
        c = c.to(z.dtype)
        return torch.addcmul(c, z - c, g)

    def _infer(self, x, xd, Wt, bias, g, scaling) -> torch.Tensor:
        """No autograd: the same ops as :class:`_DoRALinear`, nothing saved."""
        x2 = x.reshape(-1, x.shape[-1])
        h = torch.mm(xd.reshape(-1, xd.shape[-1]), self.lora_A.t())
        z = torch.mm(x2, Wt).addmm_(h, self.lora_B.t(), alpha=scaling)
        y = torch.addcmul(bias, z, g) if bias is not None else z.mul_(g)  # bitwise as _DoRALinear
        return y.view(*x.shape[:-1], y.shape[-1])

    def _phi_2d(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(φ(W) as (d_out, d_in), the exact row norm n of W + s·B·A)."""
        W = weight_2d(self.base_layer, self.layer_type)
        V = W.to(self.lora_A.dtype) + self.delta_2d()
        n = V.norm(dim=1)
        return V * (self._magnitude() / n).unsqueeze(1), n

    def delta_weight(self) -> torch.Tensor:
        phi, _ = self._phi_2d()
        W = weight_2d(self.base_layer, self.layer_type)
        return from_2d(self.base_layer, self.layer_type, phi - W.to(phi.dtype))

    def apply_to_weight(self, w: torch.Tensor) -> torch.Tensor:
        """m ⊙ (w + s·B·A) / ‖w + s·B·A‖_row for the weight ``w`` below (native layout, w's dtype)."""
        V = to_2d(self.base_layer, self.layer_type, w).to(self.lora_A.dtype) + self.delta_2d()
        phi = V * (self._magnitude() / V.norm(dim=1)).unsqueeze(1)
        return from_2d(self.base_layer, self.layer_type, phi).to(w.dtype)

    def merged_params(self) -> dict[str, torch.Tensor]:
        phi, n = self._phi_2d()
        self._merge_norm = n.detach().clone()  # for unmerged_params (analysis of a merged adapter)
        dtype = weight_access(self.base_layer).dtype  # of the dense values (4-bit: what it was quantised from)
        return {"weight": from_2d(self.base_layer, self.layer_type, phi).to(dtype)}

    def unmerged_params(self) -> dict[str, torch.Tensor]:
        """W = W'·n/m − s·B·A with the n used at merge (W' rows cannot give back the unmerged norm), up to
        round-off; unmerge itself restores the weight saved at merge. A zero magnitude entry makes its
        row unrecoverable here."""
        if self._merge_norm is None:
            raise RuntimeError("DoRA: unmerge without a previous merge of this adapter")
        merged = weight_2d(self.base_layer, self.layer_type)
        dtype = merged.dtype
        V = merged.to(self.lora_A.dtype) * (self._merge_norm / self._magnitude()).unsqueeze(1)
        return {"weight": from_2d(self.base_layer, self.layer_type, V - self.delta_2d()).to(dtype)}

    # -- files and accounting -------------------------------------------------------------------
    def file_key(self, key: str) -> str:
        if key == "lora_magnitude_vector":
            return key  # PEFT's checkpoint key (no ".weight")
        return LoRAAdapter.file_key(self, key)  # type: ignore[arg-type]

    @classmethod
    def num_params(cls, config: DoRA, base_layer: nn.Module, layer_type: str) -> int:
        d_out, d_in = dims(base_layer, layer_type)
        return config.r * (d_in + d_out) + d_out

