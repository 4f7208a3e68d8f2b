"""The low-rank mechanism every LoRA-type method shares: ΔW = s·B·G·A.

:class:`LowRank` (config) and :class:`LowRankAdapter` (layer) are the one mechanism behind LoRA,
TriLoRA, FLoRA, AdaLoRA, LoRA-Dash, DoRA and the parallel adapter: a variant overrides
``init_factors`` (extra tensors, other inits), ``middle`` (G applied to the rank-r hidden ``h = A·x``:
identity for LoRA, ``diag(e)`` for TriLoRA/AdaLoRA, a full r×r core for FLoRA) and ``middle_matrix``
(G as a matrix, for merging).
MPC (matrix pattern constraints) is an option of every such config: ``mpc="o"``/``"d"`` add
``mpc_weight·(‖A·Aᵀ − I‖²_F + ‖Bᵀ·B − I‖²_F)`` (resp. ``‖offdiag(Bᵀ·B)‖²_F``) per layer to
``tuned.regularization()``; ``mpc="n"`` puts a ReLU between the factors, which no longer merges.

MPC_n, two forms (``mpc_n_form``):

- ``"reference"`` (the default): the parallel adapter of He et al. (2022) exactly, as the MPC paper
  defines MPC_n: ΔW·x = B·drop(ReLU(G·A·x)): **no α/r scale**, and the dropout acts on the rank-r
  hidden after the ReLU (the reference code's ``dropout(relu(down_proj(x)))``), not on the input;
- ``"lora"``: subpeft's earlier form, kept as an option: ΔW·x = (α/r)·B·ReLU(G·A·drop(x)) (LoRA's
  scale and LoRA's input dropout). A saved config that has ``mpc="n"`` and a ``subpeft_version`` but no
  ``mpc_n_form`` was written before the option existed and loads as ``"lora"`` (what it computed then).

The parallel adapter (:mod:`subpeft.methods.extension.parallel`) is this mechanism in the reference
form with its own scale s.
"""

from __future__ import annotations

import math
import threading
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
MPC_N_FORMS = ("reference", "lora")


@dataclass
class LowRank(AdapterConfig):
    """Options every LoRA-type method shares: rank, scale, dropout on the low-rank input, MPC."""

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    rslora: bool = False
    mpc: str | None = None
    mpc_weight: float = 0.1
    mpc_n_form: str = "reference"  # mpc="n" only: "reference" B·drop(ReLU(A·x)), or "lora" (α/r)·B·ReLU(A·drop(x))

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
        if self.mpc_n_form not in MPC_N_FORMS:
            raise ConfigError(f"{name}.mpc_n_form must be 'reference' (the parallel adapter: B·drop(ReLU(A·x)), no "
                              f"α/r) or 'lora' ((α/r)·B·ReLU(A·drop(x))), got {self.mpc_n_form!r}")

    @classmethod
    def from_dict(cls, data: dict) -> LowRank:
        if data.get("mpc") == "n" and "subpeft_version" in data and "mpc_n_form" not in data:
            data = {**data, "mpc_n_form": "lora"}  # saved before mpc_n_form existed: the form it computed then
        return super().from_dict(data)

    @property
    def scaling(self) -> float:
        if self.mpc == "n" and self.mpc_n_form == "reference":
            return 1.0  # the parallel adapter has no α/r
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    @property
    def mergeable(self) -> bool:
        return self.mpc != "n" and super().mergeable


def _success_positions(n: int, q: float, device: torch.device, buffer=None) -> torch.Tensor:
    """Sorted positions of the successes among ``n`` Bernoulli(q) trials, 0 < q <= 0.5.

    Drawn as geometric gaps between successes: the number of failures before each success is
    ``floor(log(1 − u) / log(1 − q))`` with u uniform in [0, 1), so the random draws number about
    ``n·q`` instead of ``n``. u is float32 for q >= 1e-3 (24 bits: the gap law is exact to ~6e-8;
    gaps longer than log(2⁻²⁴)/log(1 − q), a chance of 6e-8, are never drawn), float64 below.
    Deterministic given torch's RNG state; consumes it. ``buffer(key, numel, dtype)``, if given, supplies
    the first round's two work arrays (the same draws and values as fresh ones: see :func:`_pooled`)."""
    dtype = torch.float32 if q >= 1e-3 else torch.float64
    inv_lg = 1.0 / math.log1p(-q)
    parts, last = [], -1  # last: the position of the last success so far
    while True:
        mean = (n - last - 1) * q
        m = int(mean + 6.0 * math.sqrt(mean * (1.0 - q)) + 16)  # enough to pass n almost always
        if buffer is not None and not parts:  # torch.rand(m) and .to(int64), into reused arrays
            u, pos = buffer("u", m, dtype).uniform_(), buffer("pos", m, torch.int64)
        else:
            u, pos = torch.rand(m, dtype=dtype, device=device), None
        gaps = u.neg_().log1p_().mul_(inv_lg)  # >= 0: the cast to int64 floors
        if dtype == torch.float64:
            gaps.clamp_(max=n)
        gaps.add_(1)
        pos = gaps.to(torch.int64) if pos is None else pos.copy_(gaps)
        pos[:1].add_(last)
        torch.cumsum(pos, 0, out=pos)  # in place: one int64 array fewer to allocate
        k = int(torch.searchsorted(pos, n))  # the number of positions below n (pos is increasing)
        parts.append(pos[:k])
        if k < m:
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        last = int(pos[-1])


_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)  # private: without it nothing is reused


def _storage_refs(t: torch.Tensor) -> int:
    """How many tensors share ``t``'s storage (plus a constant: the storage object asked): views and
    ``detach()`` copies count, as do numpy arrays on it; the value for ``t`` alone is read at creation."""
    return _USE_COUNT(t.untyped_storage()._cdata)


_POOL_LOCK = threading.Lock()


def _pooled(owner: nn.Module, key: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat uninitialised ``numel``-element tensor from ``owner``'s pool (``owner._pool[key]``): the one
    handed out last time if nothing holds its storage any more, else a new one that replaces it.
    Returned as a view, created under a lock: the view itself marks it as taken until dropped (with
    every tensor, view or array made from it, e.g. the copy a backward node saves). This saves
    the OS mapping and zeroing fresh pages for every large temporary of every training step."""
    if _USE_COUNT is None:
        return torch.empty(numel, dtype=dtype, device=device)
    with _POOL_LOCK:
        pool = owner.__dict__.setdefault("_pool", {})
        entry = pool.get(key)
        if entry is None or entry[0].numel() != numel or entry[0].dtype != dtype or entry[0].device != device \
                or _storage_refs(entry[0]) != entry[1]:
            buf = torch.empty(numel, dtype=dtype, device=device)
            entry = pool[key] = (buf, _storage_refs(buf))
        return entry[0].view(-1)


class LowRankDropout(nn.Dropout):
    """Dropout on the low-rank input: ``x·1/(1−p)`` with each element set to 0 with probability p.

    The same distribution as ``nn.Dropout``, with a cheaper sampler on the CPU: torch draws one
    random number per element there (about 15 ns each, serially: for LoRA on every linear of a
    transformer that alone made a training step ~1.6x as long), this draws the dropped positions
    as geometric gaps, about one random number per dropped element (per kept one when p > 0.5).
    Given the same RNG state, :meth:`positions` gives the same positions to every caller. On
    nn.Linear/Conv1D the low-rank path (generic and fused alike) zeroes them with :meth:`mask` and
    folds 1/(1−p) into its scale: ``s/(1−p)·B·G·A·mask(x)``, the same function as
    ``s·B·G·A·dropout(x)``, and a backward that is one sparse fix-up of the input gradient instead of
    three passes over it. Elsewhere ``forward`` returns ``mask(x)·1/(1−p)``. In training, the sampler's
    arrays and the fused node's masked copy come from a per-module pool reused across steps once
    nothing holds them (:func:`_pooled`): the module keeps them (the size of its last input) until
    ``eval()``. On other devices,
    under a torch.func transform (vmap, grad) and for p = 1 it is ``F.dropout`` (and the fused node
    is not used); under ``torch.compile`` too.
    """

    def sampled(self, x: torch.Tensor) -> bool:
        """Whether this dropout (in training) uses its own sampler on ``x`` (else F.dropout; also under
        ``torch.compile``, whose graphs cannot hold the sampler's data-dependent sizes)."""
        return x.device.type == "cpu" and 0.0 < self.p < 1.0 and not torch.compiler.is_compiling()

    def positions(self, x: torch.Tensor) -> torch.Tensor:
        """The flat positions (sorted, int64) of the elements of ``x`` to drop; consumes the RNG. In training
        a view of a pooled array: it stays valid as long as it (or anything made from it) is held."""
        p, n = float(self.p), x.numel()
        if n == 0:
            return torch.zeros(0, dtype=torch.long, device=x.device)
        if p <= 0.5:
            return _success_positions(n, p, x.device, self._buffer(x.device))
        keep = torch.ones(n, dtype=torch.bool, device=x.device)
        keep[_success_positions(n, 1.0 - p, x.device)] = False
        return keep.nonzero().view(-1)

    @staticmethod
    def mask(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """A copy of ``x`` (contiguous) with the elements at the flat ``positions`` set to 0 (unscaled)."""
        return x.reshape(-1).index_fill(0, positions, 0.0).view(x.shape)

    def masked(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """:meth:`mask` (the same values) written into a buffer this module keeps from one training step
        to the next and reuses once nothing holds it any more (no tensor, view or array on its storage:
        the fused node frees its saved copy after the backward). A fresh allocation of that size costs
        more than the copy itself (the OS maps and zeroes new pages: about a third of the dropout's
        extra time per step on MiniLM, 1 thread). Dropped in eval mode and not pickled or deep-copied. Not differentiable (the fused
        node's forward calls it, under no_grad)."""
        out = _pooled(self, "masked", x.numel(), x.dtype, x.device).view(x.shape)
        out.copy_(x)
        out.view(-1).index_fill_(0, positions, 0.0)
        return out

    def _buffer(self, device: torch.device):
        """The sampler's work arrays from this module's pool (training only)."""
        if not self.training:
            return None
        return lambda key, numel, dtype: _pooled(self, key, numel, dtype, device)

    def train(self, mode: bool = True):
        if not mode:
            self.__dict__.pop("_pool", None)
        return super().train(mode)

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_pool", None)
        return state

    @property
    def scale(self) -> float:
        return 1.0 / (1.0 - self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if not self.sampled(x) or functorch_active():
            return F.dropout(x, self.p, True, self.inplace)
        return self.mask(x, self.positions(x)).mul_(self.scale)

    def fusable(self, x: torch.Tensor) -> bool:
        """Whether a low-rank path may apply this dropout as ``mask`` + a scale folded into its own."""
        return type(self) is LowRankDropout and self.sampled(x) and not has_hooks(self) and not functorch_active()


class FusedLowRankLinear(torch.autograd.Function):
    """``y = x·Wᵀ + b + s·G(xd·Aᵀ)·Bᵀ`` for a plain nn.Linear base layer, as one autograd node.

    ``xd`` is x, or x with the elements at ``drop_at`` set to 0 (:meth:`LowRankDropout.mask`: the
    dropout, its 1/(1−p) folded into ``scaling`` by the caller, as the generic path does); G (``core``) is the
    identity (None), ``h ⊙ core`` (``diag``: TriLoRA, AdaLoRA) or ``h·coreᵀ`` (FLoRA). Same maths, op
    for op, as the base layer followed by the generic low-rank path, with fewer activation-sized
    tensors: the forward adds the low-rank term into the base output in place (no copy of it), and the
    backward adds the low-rank input gradient into the base input gradient in place (autograd would
    build it as a separate tensor and then add the two). Written in the ctx-style (no
    ``setup_context``): ``Function.apply`` then skips an ``inspect.signature`` per call, which cost
    more than the GEMMs on small inputs; under torch.func transforms the generic path runs instead.
    """

    @staticmethod
    def forward(ctx, x, W, bias, A, B, scaling, drop_at=None, core=None, diag=False, dropout=None):
        x2 = x.reshape(-1, x.shape[-1])
        if drop_at is None:
            xd = x
        else:  # the masked copy, into the dropout's reused buffer when there is one
            xd = LowRankDropout.mask(x, drop_at) if dropout is None else dropout.masked(x, drop_at)
        h = torch.mm(xd.reshape(-1, x.shape[-1]), A.t())  # (N, r)
        m = h if core is None else (h * core if diag else torch.mm(h, core.t()))
        y = torch.addmm(bias, x2, W.t()) if bias is not None else torch.mm(x2, W.t())
        y.addmm_(m, B.t(), alpha=scaling)
        ctx.scaling, ctx.diag = scaling, diag
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, W, A, B, h, None if core is None else m, drop_at, None if drop_at is None else xd, core)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, W, A, B, h, m, drop_at, xd, core = ctx.saved_tensors
        s, diag = ctx.scaling, ctx.diag
        needs = ctx.needs_input_grad  # 6 to 9 entries: the optional inputs may be left out
        need_x, need_W, need_b, need_A, need_B = needs[:5]
        need_core = len(needs) > 7 and needs[7]
        d_in = x.shape[-1]
        x2 = x.reshape(-1, d_in)
        if torch.is_grad_enabled():  # create_graph: the saved activations must be functions of the inputs again
            xd = None if drop_at is None else LowRankDropout.mask(x, drop_at)
            h = torch.mm(x2 if xd is None else xd.reshape(-1, d_in), A.t())
            m = None if core is None else (h * core if diag else torch.mm(h, core.t()))
        xd2 = x2 if drop_at is None else xd.reshape(-1, d_in)
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_W = grad_b = grad_A = grad_B = grad_core = None
        need_h = need_x or need_A
        grad_m = torch.mm(g, B).mul_(s) if (need_h or need_core) else None  # (N, r) = ∂L/∂(G·h)
        grad_h = grad_m
        if core is not None:
            if need_core:
                grad_core = (grad_m * h).sum(0) if diag else torch.mm(grad_m.t(), h)
            if need_h:
                grad_h = grad_m * core if diag else torch.mm(grad_m, core)
        if need_x:
            # two products, then their sum, as autograd adds the two branches' gradients: addmm_ would be one
            # temporary less, but a BLAS may accumulate grad_h·A into the base term product by product (seen
            # with MKL on AMD EPYC: x's gradient then differs from the generic path's in the last bits)
            grad_x = torch.mm(g, W)
            if drop_at is None:
                grad_x.add_(torch.mm(grad_h, A))
            else:  # base + mask(grad_h·A): add everywhere, then put back base + 0 where the mask is 0
                flat = grad_x.view(-1)
                at_dropped = flat.index_select(0, drop_at).add_(0.0)  # + 0: as autograd's sum (-0 + 0 = +0)
                grad_x.add_(torch.mm(grad_h, A))
                flat.index_copy_(0, drop_at, at_dropped)
            grad_x = grad_x.view(x.shape)
        if need_W:
            grad_W = torch.mm(g.t(), x2)
        if need_b and ctx.has_bias:
            grad_b = g.sum(0)
        if need_A:
            grad_A = torch.mm(grad_h.t(), xd2)
        if need_B:
            # (mᵀ·g)ᵀ: 2-3x (d_out 384) to 10x (d_out 1536) faster than gᵀ·m in MKL for these shapes; the same
            # sums, bitwise equal on the shapes measured, but MKL does not promise it (on some tiny float64
            # shapes the two differ in the last bit)
            grad_B = torch.mm((h if m is None else m).t(), g).mul_(s).t()
        return (grad_x, grad_W, grad_b, grad_A, grad_B, None, None, grad_core, None, None)[:len(needs)]


class LowRankAdapter(Adapter):
    """ΔW = s·B·G·A on Linear / Conv1D / Embedding / Conv2d; see the module docstring.

    Subclasses (LoRA-type methods) override :meth:`init_factors`, :meth:`core` (G: identity, diagonal
    or full r×r; ``middle`` and ``middle_matrix`` follow from it), :meth:`linear_factors` and
    ``num_params``. ``lora_A`` is (r, d_in) (for Conv2d (r, c_in, kh, kw), applied with the base
    kernel's stride/padding/dilation), ``lora_B`` is (d_out, r) (for Conv2d a 1×1 kernel). On a plain
    nn.Linear every such variant (dropout included) takes one fused autograd node,
    :class:`FusedLowRankLinear`.
    """

    config_cls = LowRank
    layer_types = ("linear", "conv1d", "embedding", "conv2d")
    additive = True
    has_middle = False  # whether middle() is not the identity (the fused path then needs core())

    def __init__(self, config: LowRank, base_layer: nn.Module, layer_type: str, **kwargs) -> None:
        super().__init__(config, base_layer, layer_type, **kwargs)
        if layer_type == "conv2d" and base_layer.groups != 1:
            raise UnsupportedLayerError(
                f"{config.method} supports nn.Conv2d with groups=1 only, got groups={base_layer.groups}"
            )
        self.scaling = config.scaling
        self.r = config.r
        self.nonlinear = config.mpc == "n"
        # MPC_n in the reference form drops out the hidden after the ReLU, not the input (see the module docstring)
        self.hidden_dropout = self.nonlinear and getattr(config, "mpc_n_form", "reference") == "reference"
        self.init_factors(config, factory(base_layer), *dims(base_layer, layer_type))
        self.dropout = LowRankDropout(config.dropout) if config.dropout > 0 and layer_type != "embedding" else None

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

    def core(self) -> tuple[torch.Tensor, bool] | None:
        """G in the form both paths use: None (the identity), ``(e, True)`` for ``diag(e)`` or ``(G, False)``
        for a full (r, r) matrix (applied as ``h·Gᵀ`` on the rank dimension of the hidden)."""
        return None

    def middle(self, h: torch.Tensor) -> torch.Tensor:
        """G applied to the rank dimension (the last) of the hidden ``h = A·x``."""
        core = self.core()
        if core is None:
            return h
        G, diag = core
        if diag:
            return h * G
        # on the rank dimension (the last). Conv2d hands h channels-last as a strided view: on such a
        # view matmul takes a different kernel depending on whether G requires grad, so a frozen
        # (loaded) adapter would differ from the trained one in the last bit; contiguous() avoids that
        # (a copy of r channels only, a no-op for Linear/Conv1D/Embedding)
        return F.linear(h.contiguous(), G)

    def middle_matrix(self) -> torch.Tensor | None:
        """G as an (r, r) matrix, or None for the identity."""
        core = self.core()
        if core is None:
            return None
        return torch.diag(core[0]) if core[1] else core[0]

    def linear_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, s) of ``s·B·G·A`` on nn.Linear, for the fused node and the generic path alike.
        LoRA-Dash's second phase returns its concatenated rank-(r + s) factors here."""
        return self.lora_A, self.lora_B, self.scaling

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
            if self.hidden_dropout and self.dropout is not None:
                h = self.dropout(h)
        return h.movedim(-1, 1) if self.layer_type == "conv2d" else h

    def input_dropout(self) -> LowRankDropout | None:
        """The dropout on the low-rank input: None where MPC_n's reference form drops out the hidden instead."""
        return None if self.hidden_dropout else self.dropout

    def _fusable(self, x: torch.Tensor, base, A: torch.Tensor, B: torch.Tensor) -> bool:
        """Whether the fused node may replace ``base(x)`` + the generic path (nothing could tell them apart)."""
        drop = self.dropout
        W = base.weight
        return (
            type(base).forward is nn.Linear.forward
            and x.dtype == W.dtype == A.dtype == B.dtype
            and not has_hooks(base)
            and (drop is None or not drop.training or drop.p == 0 or drop.fusable(x))
            and not autocast_on(x.device.type)
            and not functorch_active()
        )

    def forward(self, x: torch.Tensor, base) -> torch.Tensor:
        if self.layer_type == "linear" and not self.nonlinear and base is self.base_layer:
            A, B, scaling = self.linear_factors()
            core = self.core() if self.has_middle else None
            if (not self.has_middle or (core is not None and core[0].dtype == A.dtype)) and self._fusable(x, base, A, B):
                # the common case: one fused autograd node for "x·Wᵀ + b + s·G(xd·Aᵀ)·Bᵀ" that adds the
                # low-rank term into the base output in place and, in backward, its input gradient into
                # the base input gradient in place: no extra activation-sized tensors, no extra adds
                drop = self.dropout
                drop_at = None
                if drop is not None and drop.training and drop.p > 0:
                    drop_at, scaling = drop.positions(x), scaling * drop.scale
                if core is None:
                    core = (None, False)
                return FusedLowRankLinear.apply(x, base.weight, base.bias, A, B, scaling, drop_at, *core,
                                                drop if drop_at is not None else None)
        return self.add_delta(base(x), x)

    def add_delta(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y + ΔW·x`` (the low-rank path, with dropout on its input)."""
        A, B = self.lora_A, self.lora_B
        if self.layer_type == "embedding":
            base_layer = self.base_layer
            h = F.embedding(x, A.t(), base_layer.padding_idx, base_layer.max_norm, base_layer.norm_type,
                            base_layer.scale_grad_by_freq, base_layer.sparse)
            return y + (self._hidden(h) @ B.t()) * self.scaling
        drop, scaling = self.input_dropout(), None
        if drop is not None and drop.training and drop.p > 0 and self.layer_type != "conv2d" and drop.fusable(x):
            # nn.Linear/Conv1D: the dropout's mask here, its 1/(1-p) in the scale (as the fused node)
            h, scaling = drop.mask(x, drop.positions(x)), drop.scale
        else:
            h = x if drop is None else drop(x)
        if h.dtype != A.dtype:
            h = h.to(A.dtype)
        if self.layer_type == "conv2d":
            h = self._hidden(self.base_layer._conv_forward(h, A, None))
            return y + F.conv2d(h, B) * self.scaling
        A, B, s = self.linear_factors()
        scaling = s if scaling is None else s * scaling
        h = self._hidden(F.linear(h, A))
        # one fused GEMM for "y + s·h·Bᵀ"
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]).to(y.dtype), B.t().to(y.dtype),
                          alpha=scaling)
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
