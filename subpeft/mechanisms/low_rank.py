"""The low-rank mechanism every LoRA-type method shares: ΔW = s·B·G·A.

:class:`LowRank` (config) and :class:`LowRankAdapter` (layer) are the one mechanism behind LoRA,
TriLoRA, FLoRA, AdaLoRA, LoRA-Dash, DoRA and the parallel adapter: a variant overrides
``init_factors`` (extra tensors, other inits), ``middle`` (G applied to the rank-r hidden ``h = A·x``:
identity for LoRA, ``diag(e)`` for TriLoRA/AdaLoRA, a full r×r core for FLoRA) and ``middle_matrix``
(G as a matrix, for merging).
MPC (matrix pattern constraints) is an option of every such config: ``mpc="o"``/``"d"`` add
``mpc_weight·(‖A·Aᵀ − I‖²_F + ‖Bᵀ·B − I‖²_F)`` (resp. ``‖offdiag(Bᵀ·B)‖²_F``) per layer to
``tuned.regularization()``; ``mpc="n"`` puts a ReLU between the factors, ΔW·x = s·B·h(G·A·x),
which no longer merges (it is the parallel adapter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import Adapter
from ..core.config import AdapterConfig
from ..core.errors import ConfigError, UnsupportedLayerError
from ..core.layers import dims, factory, from_2d, weight_shape
from .fastpath import autocast_on, functorch_active, has_hooks

MPC_MODES = (None, "o", "d", "n")


@dataclass
class LowRank(AdapterConfig):
    """Options every LoRA-type method shares: rank, scale, dropout on the low-rank input, MPC."""

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    rslora: bool = False
    mpc: str | None = None
    mpc_weight: float = 0.1

    def validate(self) -> None:
        name = type(self).__name__
        self._check_positive_int("r")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ConfigError(f"{name}.alpha must be a positive number, got {self.alpha!r}")
        self._check_range("dropout", 0.0, 1.0)
        if self.mpc not in MPC_MODES:
            raise ConfigError(f"{name}.mpc must be one of None, 'o', 'd', 'n' (matrix pattern constraints), got {self.mpc!r}")
        if isinstance(self.mpc_weight, bool) or not isinstance(self.mpc_weight, (int, float)) or self.mpc_weight < 0:
            raise ConfigError(f"{name}.mpc_weight must be a number >= 0, got {self.mpc_weight!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    @property
    def mergeable(self) -> bool:
        return self.mpc != "n" and super().mergeable


class FusedLowRankLinear(torch.autograd.Function):
    """``y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ`` for a plain nn.Linear base layer, as one autograd node.

    Same maths as the base layer followed by the generic LoRA path, with fewer activation-sized
    tensors: the forward adds the LoRA term into the base output in place (no copy of it), and the
    backward adds the LoRA input gradient into the base input gradient in place (autograd would
    build it as a separate tensor and then add the two). Written in the ctx-style (no
    ``setup_context``): ``Function.apply`` then skips an ``inspect.signature`` per call, which cost
    more than the GEMMs on small inputs; under torch.func transforms the generic path runs instead.
    """

    @staticmethod
    def forward(ctx, x, W, bias, A, B, scaling):
        x2 = x.reshape(-1, x.shape[-1])
        h = torch.mm(x2, A.t())  # (N, r)
        y = torch.addmm(bias, x2, W.t()) if bias is not None else torch.mm(x2, W.t())
        y.addmm_(h, B.t(), alpha=scaling)
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, W, A, B, h)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, W, A, B, h = ctx.saved_tensors
        s = ctx.scaling
        need_x, need_W, need_b, need_A, need_B, _ = ctx.needs_input_grad
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_W = grad_b = grad_A = grad_B = None
        grad_h = torch.mm(g, B).mul_(s) if (need_x or need_A) else None  # (N, r) = ∂L/∂(x·Aᵀ)
        if need_x:
            grad_x = torch.mm(g, W).addmm_(grad_h, A).view(x.shape)
        if need_W:
            grad_W = torch.mm(g.t(), x.reshape(-1, x.shape[-1]))
        if need_b and ctx.has_bias:
            grad_b = g.sum(0)
        if need_A:
            grad_A = torch.mm(grad_h.t(), x.reshape(-1, x.shape[-1]))
        if need_B:
            if torch.is_grad_enabled():  # create_graph: h must be a function of x and A again
                h = torch.mm(x.reshape(-1, x.shape[-1]), A.t())
            grad_B = torch.mm(h.t(), g).mul_(s).t()  # (hᵀ·g)ᵀ: 2-3x faster than gᵀ·h for these shapes
        return grad_x, grad_W, grad_b, grad_A, grad_B, None


class LowRankAdapter(Adapter):
    """ΔW = s·B·G·A on Linear / Conv1D / Embedding / Conv2d; see the module docstring.

    Subclasses (LoRA-type methods) override :meth:`init_factors`, :meth:`middle`,
    :meth:`middle_matrix` and ``num_params``. ``lora_A`` is (r, d_in) (for Conv2d (r, c_in, kh, kw),
    applied with the base kernel's stride/padding/dilation), ``lora_B`` is (d_out, r) (for Conv2d a
    1×1 kernel). The plain-LoRA case on nn.Linear takes one fused autograd node.
    """

    config_cls = LowRank
    layer_types = ("linear", "conv1d", "embedding", "conv2d")
    additive = True
    has_middle = False  # whether middle() is not the identity (then the fused LoRA path is not used)

    def __init__(self, config: LowRank, base_layer: nn.Module, layer_type: str, **kwargs) -> None:
        super().__init__(config, base_layer, layer_type, **kwargs)
        if layer_type == "conv2d" and base_layer.groups != 1:
            raise UnsupportedLayerError(
                f"{config.method} supports nn.Conv2d with groups=1 only, got groups={base_layer.groups}"
            )
        self.scaling = config.scaling
        self.r = config.r
        self.nonlinear = config.mpc == "n"
        self.init_factors(config, factory(base_layer), *dims(base_layer, layer_type))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 and layer_type != "embedding" else None

    # -- what variants override ------------------------------------------------------------------
    def init_factors(self, config: LowRank, kw: dict, d_out: int, d_in: int) -> None:
        """Create lora_A (r, d_in) and lora_B (d_out, r) (and any middle tensors). LoRA's init."""
        r = config.r
        if self.layer_type == "conv2d":
            self.lora_A = nn.Parameter(torch.empty(r, *weight_shape(self.base_layer)[1:], **kw))
            self.lora_B = nn.Parameter(torch.zeros(d_out, r, 1, 1, **kw))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        elif self.layer_type == "embedding" and not self.nonlinear:  # (mpc="n": A = 0 would never train)
            self.lora_A = nn.Parameter(torch.zeros(r, d_in, **kw))
            self.lora_B = nn.Parameter(torch.randn(d_out, r, **kw))
        else:
            self.lora_A = nn.Parameter(torch.empty(r, d_in, **kw))
            self.lora_B = nn.Parameter(torch.zeros(d_out, r, **kw))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def middle(self, h: torch.Tensor) -> torch.Tensor:
        """G applied to the rank dimension (the last) of the hidden ``h = A·x``."""
        return h

    def middle_matrix(self) -> torch.Tensor | None:
        """G as an (r, r) matrix, or None for the identity."""
        return None

    # -- the two views ---------------------------------------------------------------------------
    def _hidden(self, h: torch.Tensor) -> torch.Tensor:
        """middle, then MPC_n's ReLU, on the rank dimension of h (dim 1 for Conv2d)."""
        if not (self.has_middle or self.nonlinear):
            return h
        if self.layer_type == "conv2d":
            # contiguous: on a strided view matmul kernels can differ in the last bit with requires_grad
            h = h.movedim(1, -1).contiguous()
        h = self.middle(h)
        if self.nonlinear:
            h = torch.relu(h)
        return h.movedim(-1, 1) if self.layer_type == "conv2d" else h

    def forward(self, x: torch.Tensor, base) -> torch.Tensor:
        A, B = self.lora_A, self.lora_B
        if (
            self.layer_type == "linear" and not self.has_middle and not self.nonlinear
            and (self.dropout is None or not self.dropout.training) and base is self.base_layer
        ):
            W = base.weight
            if (
                type(base).forward is nn.Linear.forward
                and x.dtype == W.dtype == A.dtype == B.dtype
                and not has_hooks(base)
                and not autocast_on(x.device.type)
                and not functorch_active()
            ):
                # the common case: one fused autograd node for "x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ" that adds the
                # LoRA term into the base output in place and, in backward, its input gradient into the
                # base input gradient in place: no extra activation-sized tensors, no extra adds
                return FusedLowRankLinear.apply(x, W, base.bias, A, B, self.scaling)
        return self.add_delta(base(x), x)

    def add_delta(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y + ΔW·x`` (the low-rank path, with dropout on its input)."""
        A, B = self.lora_A, self.lora_B
        if self.layer_type == "embedding":
            base_layer = self.base_layer
            h = F.embedding(x, A.t(), base_layer.padding_idx, base_layer.max_norm, base_layer.norm_type,
                            base_layer.scale_grad_by_freq, base_layer.sparse)
            return y + (self._hidden(h) @ B.t()) * self.scaling
        h = x if self.dropout is None else self.dropout(x)
        if h.dtype != A.dtype:
            h = h.to(A.dtype)
        if self.layer_type == "conv2d":
            h = self._hidden(self.base_layer._conv_forward(h, A, None))
            return y + F.conv2d(h, B) * self.scaling
        h = self._hidden(F.linear(h, A))
        # one fused GEMM for "y + s·h·Bᵀ"
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]).to(y.dtype), B.t().to(y.dtype),
                          alpha=self.scaling)
        return out.view(y.shape)

    def delta_2d(self) -> torch.Tensor:
        """ΔW as a (d_out, d_in) matrix."""
        if self.nonlinear:
            raise TypeError(f"{self.config.method} with mpc='n' has no weight delta (a ReLU sits between the factors)")
        A, B = self.lora_A.reshape(self.lora_A.shape[0], -1), self.lora_B.reshape(self.lora_B.shape[0], -1)
        G = self.middle_matrix()
        if G is not None:
            A = G @ A
        return (B @ A) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return from_2d(self.base_layer, self.layer_type, self.delta_2d())

    # -- MPC ------------------------------------------------------------------------------------
    def factors_2d(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A as (r, d_in), B as (d_out, r)): the factors MPC constrains."""
        return self.lora_A.reshape(self.lora_A.shape[0], -1), self.lora_B.reshape(self.lora_B.shape[0], -1)

    def regularization(self) -> torch.Tensor | None:
        mode = self.config.mpc
        if mode not in ("o", "d"):
            return None
        A, B = self.factors_2d()
        eye = torch.eye(A.shape[0], device=A.device, dtype=A.dtype)
        term = (A @ A.t() - eye).pow(2).sum()
        btb = B.t() @ B
        term = term + ((btb - eye).pow(2).sum() if mode == "o" else (btb - torch.diag(torch.diagonal(btb))).pow(2).sum())
        return self.config.mpc_weight * term

    @classmethod
    def num_params(cls, config: LowRank, base_layer: nn.Module, layer_type: str) -> int:
        d_out, d_in = dims(base_layer, layer_type)
        return config.r * (d_in + d_out)

    @classmethod
    def usable_rank(cls, config: LowRank, base_layer: nn.Module, layer_type: str) -> int | None:
        d_out, d_in = dims(base_layer, layer_type)
        if config.mpc == "n":  # a ReLU between the factors: a hidden layer, not a rank; d_out·d_in bounds it
            return d_out * d_in
        return min(d_out, d_in)  # ΔW = s·B·G·A has rank <= min(d_out, d_in)

    def peft_compatible(self) -> bool:
        # PEFT's LoRA/DoRA on Conv2d builds lora_A without the base kernel's dilation: a dilated
        # Conv2d adapter is written in subpeft's format (PEFT would compute something else)
        return not (self.layer_type == "conv2d" and tuple(self.base_layer.dilation) != (1, 1))
