"""The fused nn.Linear node with the low-rank dropout and a core G (TriLoRA, FLoRA, AdaLoRA, LoRA-Dash):
bit-identical to the generic path given the same RNG state, and the dropout sampler's distribution."""

from __future__ import annotations

import math

import pytest
import torch

import subpeft as sp
from subpeft.mechanisms.low_rank import FusedLowRankLinear, LowRankDropout
from subpeft.methods.combination.lora_dash import LoRADash

METHODS = {
    "lora": lambda **kw: sp.LoRA(r=3, alpha=5, **kw),
    "trilora": lambda **kw: sp.TriLoRA(r=3, alpha=5, **kw),
    "flora": lambda **kw: sp.FLoRA(r=3, alpha=5, **kw),
    "adalora": lambda **kw: sp.AdaLoRA(r=3, target_r=2, alpha=5, total_steps=10, **kw),
    "lora_dash": lambda **kw: LoRADash(r=3, alpha=5, directions=2, prelaunch_steps=1, **kw),
}


def _model(method, dropout, dtype, seed=0):
    torch.manual_seed(seed)
    base = torch.nn.Sequential(torch.nn.Linear(7, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5, bias=False)).to(dtype)
    tuned = sp.attach(base, METHODS[method](dropout=dropout, targets=["0", "2"]))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, a in tuned.adapters_of("default"):
            for name, p in a.named_parameters():
                if name != "dash_sigma":
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype))
            if method == "lora_dash":
                a.select_directions()  # phase 2: the dash term on nn.Linear
                a.dash_sigma.copy_(torch.randn(a.dash_sigma.shape, generator=gen, dtype=dtype))
    return tuned


def _run(tuned, x, generic: bool):
    handles = []
    if generic:  # a forward hook on the base layer makes every adapter take its generic path
        handles = [a.base_layer.register_forward_hook(lambda m, i, o: None) for _, a in tuned.adapters_of("default")]
    tuned.train()
    x = x.clone().requires_grad_(True)
    torch.manual_seed(123)
    y = tuned(x)
    y.sin().sum().backward()
    for h in handles:
        h.remove()
    params = [p for p in tuned.parameters() if p.requires_grad]
    grads = [p.grad.clone() for p in params]
    tuned.zero_grad(set_to_none=True)
    return [y.detach(), x.grad] + grads


def _assert_same(name, got, want):
    """Bitwise, except ∂B (and LoRA-Dash's ∂Δσ): the fused path computes it as (hᵀ·g)ᵀ (faster than autograd's
    gᵀ·h), the same sums, which MKL may add in another order (seen: 1 ulp in float64, and in float32 on AMD EPYC)."""
    if name.endswith(("lora_B", "dash_sigma")):
        eps = torch.finfo(want.dtype).eps
        torch.testing.assert_close(got, want, rtol=0, atol=4 * eps * want.abs().max().item())
    else:
        assert torch.equal(got, want), (name, (got - want).abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dropout", [0.0, 0.1, 0.7])
@pytest.mark.parametrize("method", list(METHODS))
def test_fused_equals_generic_bitwise_with_the_same_rng_state(method, dropout, dtype, monkeypatch):
    tuned = _model(method, dropout, dtype)
    x = torch.randn(4, 33, 7, dtype=dtype)
    calls = []
    real = FusedLowRankLinear.apply
    monkeypatch.setattr(FusedLowRankLinear, "apply", lambda *a: calls.append(1) or real(*a))
    fused = _run(tuned, x, generic=False)
    assert len(calls) == 2, "both nn.Linear layers should take the fused node"
    calls.clear()
    generic = _run(tuned, x, generic=True)
    assert not calls
    names = ["y", "x"] + [n for n, p in tuned.named_parameters() if p.requires_grad]
    for name, got, want in zip(names, fused, generic, strict=True):
        _assert_same(name, got, want)
    if dropout:  # the dropout is on: another RNG state gives another result
        torch.manual_seed(5)
        assert not torch.equal(tuned(x), fused[0])


@pytest.mark.parametrize("method", list(METHODS))
def test_eval_mode_ignores_the_dropout_and_draws_nothing(method):
    tuned = _model(method, 0.3, torch.float32)
    x = torch.randn(3, 7)
    tuned.eval()
    state = torch.get_rng_state()
    y = tuned(x)
    assert torch.equal(torch.get_rng_state(), state)
    tuned.train()
    for _, a in tuned.adapters_of("default"):
        a.dropout.p = 0.0  # no dropout in effect: the deterministic function
    torch.testing.assert_close(tuned(x), y, rtol=0, atol=0)


@pytest.mark.parametrize("diag", [None, True, False], ids=["identity", "diag", "full"])
@pytest.mark.parametrize("dropout", [False, True])
def test_fused_node_gradcheck_and_double_backward(diag, dropout):
    torch.manual_seed(1)
    shapes = [(3, 2, 4), (5, 4), (5,), (2, 4), (5, 2)]
    args = [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in shapes]
    drop = LowRankDropout(0.4) if dropout else None
    drop_at = drop.positions(args[0]) if dropout else None
    if dropout:
        assert 0 < drop_at.numel() < args[0].numel()
    core = None if diag is None else torch.randn(2 if diag else (2, 2), dtype=torch.float64, requires_grad=True)
    if core is not None:
        args.append(core)

    def fn(x, W, b, A, B, *c):
        return FusedLowRankLinear.apply(x, W, b, A, B, 0.7, drop_at, *c, bool(diag)) if c else \
            FusedLowRankLinear.apply(x, W, b, A, B, 0.7, drop_at)

    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.7, 0.01])
def test_dropout_noise_distribution(p):
    drop = LowRankDropout(p)
    x = torch.ones(400, 1000)
    torch.manual_seed(0)
    noise = drop(x)
    torch.manual_seed(0)
    assert torch.equal(drop(x), noise), "the same RNG state gives the same mask"
    scale = torch.tensor(1 / (1 - p), dtype=torch.float32)
    assert set(noise.unique().tolist()) <= {0.0, scale.item()}
    n = noise.numel()
    dropped = (noise == 0).sum().item()
    assert abs(dropped - n * p) < 5 * math.sqrt(n * p * (1 - p))
    # no positional pattern: the rate in each quarter and runs of neighbours as for independent draws
    flat = (noise == 0).view(-1).float()
    for part in flat.chunk(4):
        assert abs(part.mean().item() - p) < 5 * math.sqrt(p * (1 - p) / part.numel())
    both = (flat[1:] * flat[:-1]).mean().item()
    assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / n) + 1e-4
    # another draw is another mask
    assert not torch.equal(drop(x), noise)


def test_dropout_edge_cases():
    x = torch.randn(5, 3)
    assert torch.equal(LowRankDropout(1.0).train()(x), torch.zeros_like(x))
    assert LowRankDropout(0.3).eval()(x) is x
    assert LowRankDropout(0.3).train()(torch.empty(0, 3)).shape == (0, 3)
    # not contiguous: the same as on a contiguous copy
    xt = torch.randn(6, 4).t()
    torch.manual_seed(3)
    a = LowRankDropout(0.3)(xt)
    torch.manual_seed(3)
    assert torch.equal(a, LowRankDropout(0.3)(xt.contiguous()))
    # a draw too short for the tensor continues (the loop), e.g. a single element
    torch.manual_seed(0)
    vals = torch.cat([LowRankDropout(0.5)(torch.ones(1)) for _ in range(200)])
    assert 50 < (vals == 0).sum().item() < 150


def test_fused_node_is_not_used_where_the_dropout_is_torch_s():
    """p = 1 (and other devices, functorch): F.dropout on the generic path."""
    tuned = _model("lora", 0.5, torch.float32)
    for _, a in tuned.adapters_of("default"):
        a.dropout.p = 1.0
    tuned.train()
    x = torch.randn(3, 7)
    torch.manual_seed(0)
    y = tuned(x)
    tuned.eval()
    y_eval = tuned(x)
    assert not torch.equal(y, y_eval)


def test_reused_buffers_are_never_taken_while_held():
    """The masked copy and the sampler's arrays are reused from step to step only once nothing holds them:
    steps give the same results as fresh allocations, a graph kept alive keeps its buffers, eval drops them."""
    tuned = _model("lora", 0.3, torch.float32)
    x = torch.randn(4, 33, 7)
    first = _run(tuned, x, generic=False)
    drops = [a.dropout for _, a in tuned.adapters_of("default")]
    assert all("masked" in d.__dict__["_pool"] and "pos" in d.__dict__["_pool"] for d in drops)
    kept = {id(d): d.__dict__["_pool"]["masked"][0] for d in drops}
    for _ in range(2):  # the buffers now come back from the pool: the same results
        again = _run(tuned, x, generic=False)
        for got, want in zip(again, first, strict=True):
            assert torch.equal(got, want)
    assert all(d.__dict__["_pool"]["masked"][0] is kept[id(d)] for d in drops), "reused once free"
    # two forwards before any backward (a graph kept alive): the second must not overwrite the first's copy
    tuned.train()
    torch.manual_seed(1)
    y1 = tuned(x)
    torch.manual_seed(2)
    y2 = tuned(x)
    (y1.sin().sum() + y2.cos().sum()).backward()
    grads = [p.grad.clone() for p in tuned.parameters() if p.requires_grad]
    tuned.zero_grad(set_to_none=True)
    handles = [a.base_layer.register_forward_hook(lambda m, i, o: None) for _, a in tuned.adapters_of("default")]
    torch.manual_seed(1)
    g1 = tuned(x)
    torch.manual_seed(2)
    g2 = tuned(x)
    (g1.sin().sum() + g2.cos().sum()).backward()
    for h in handles:
        h.remove()
    assert torch.equal(y1, g1) and torch.equal(y2, g2)
    for got, (name, p) in zip(grads, [(n, p) for n, p in tuned.named_parameters() if p.requires_grad], strict=True):
        _assert_same(name, got, p.grad)
    # a tensor made from a buffer's storage (a view, a detach, an array) holds it
    d = drops[0]
    torch.manual_seed(0)
    pos = d.positions(torch.empty(4, 33, 7))
    held = pos.detach().clone()
    torch.manual_seed(9)
    other = d.positions(torch.empty(4, 33, 7))
    assert torch.equal(pos, held), "a pooled array still held was overwritten"
    assert pos.untyped_storage().data_ptr() != other.untyped_storage().data_ptr()
    # not pickled / deep-copied; dropped in eval mode
    import copy
    import pickle
    assert "_pool" not in copy.deepcopy(d).__dict__
    assert "_pool" not in pickle.loads(pickle.dumps(d)).__dict__
    tuned.eval()
    assert all("_pool" not in d.__dict__ for d in drops)


def test_fused_dropout_retain_graph_and_double_backward_with_reused_buffers():
    tuned = _model("lora", 0.3, torch.float32)
    x = torch.randn(4, 33, 7, requires_grad=True)
    tuned.train()
    torch.manual_seed(4)
    y = tuned(x)
    (gx,) = torch.autograd.grad(y.sin().sum(), x, retain_graph=True)
    _run(tuned, x.detach(), generic=False)  # another step in between: must not touch y's saved copies
    (gx2,) = torch.autograd.grad(y.sin().sum(), x)
    assert torch.equal(gx, gx2)
