"""TriLoRA, FLoRA, the parallel adapter and MPC (matrix pattern constraints), checked against their
definitions in METHODS.md: explicit formulas, hand-computed losses, and the properties that make
each form what it is (zero at attach with a gradient on the middle, ReLU between factors, ...)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import subpeft as sp

from .tiny_models import CASES

LOWRANK = ["lora", "trilora", "flora"]


def _adapters(tuned, name="default"):
    return [a for _, a in tuned.adapters_of(name)]


def _config(method, **options):
    return sp.get_method(method).config_cls(**options)


def _linear(d_in=10, d_out=6, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_out))


# -- TriLoRA and FLoRA: the middle factor -----------------------------------------------------------

MIDDLE = {"trilora": ("lora_e", lambda e: torch.diag(e)), "flora": ("lora_G", lambda G: G)}


@pytest.mark.parametrize("method", ["trilora", "flora"])
def test_zero_at_attach_and_first_gradient_reaches_only_the_middle(method):
    model = _linear()
    x = torch.randn(5, 10)
    y0 = model(x)
    tuned = sp.attach(model, _config(method, r=4, alpha=8, targets=["0"]))
    a = _adapters(tuned)[0]
    middle = getattr(a, MIDDLE[method][0])
    assert torch.count_nonzero(middle) == 0
    assert torch.count_nonzero(a.lora_A) == a.lora_A.numel() and torch.count_nonzero(a.lora_B) == a.lora_B.numel()
    assert torch.equal(a.delta_weight(), torch.zeros(6, 10)), "exactly zero at attach"
    y = tuned(x)
    assert torch.equal(y, y0)
    (y * torch.randn_like(y)).sum().backward()
    assert middle.grad.abs().min() > 0, "every entry of the middle factor gets a gradient at init"
    # with the middle at 0, the factors are not reached yet: ∂L/∂A = s·Gᵀ·Bᵀ·g·xᵀ = 0, likewise B
    assert torch.count_nonzero(a.lora_A.grad) == 0 and torch.count_nonzero(a.lora_B.grad) == 0


def test_init_distributions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(400, 300), nn.Linear(400, 300))
    tuned = sp.attach(model, sp.TriLoRA(r=16, targets=["0"]))
    tuned.add_adapter("f", sp.FLoRA(r=16, targets=["1"]))
    tri, flo = _adapters(tuned)[0], _adapters(tuned, "f")[0]
    # Kaiming-uniform with a = √5: U(−1/√fan_in, 1/√fan_in), fan_in = d_in for A and r for B
    for t, fan_in in ((tri.lora_A, 400), (tri.lora_B, 16)):
        bound = fan_in**-0.5
        assert t.abs().max() <= bound and t.abs().max() > 0.95 * bound
        assert abs(t.std().item() - bound / 3**0.5) < 0.05 * bound
    assert torch.equal(tri.lora_e, torch.zeros(16))
    for t in (flo.lora_A, flo.lora_B):  # N(0, 0.02²)
        assert abs(t.std().item() - 0.02) < 0.001 and abs(t.mean().item()) < 0.001
    assert torch.equal(flo.lora_G, torch.zeros(16, 16))


@pytest.mark.parametrize("method", ["trilora", "flora"])
def test_delta_is_s_B_middle_A(method):
    model = _linear()
    W, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    tuned = sp.attach(model, _config(method, r=3, alpha=6, targets=["0"]))
    a = _adapters(tuned)[0]
    key, as_matrix = MIDDLE[method]
    with torch.no_grad():
        getattr(a, key).normal_()
    s = 6 / 3
    G = as_matrix(getattr(a, key).detach())
    if method == "trilora":
        assert torch.equal(G, torch.diag(torch.diagonal(G))) and torch.count_nonzero(G) == 3
    delta = s * a.lora_B.detach() @ G @ a.lora_A.detach()
    torch.testing.assert_close(a.delta_weight(), delta, rtol=1e-6, atol=1e-6)
    x = torch.randn(4, 7, 10)
    torch.testing.assert_close(tuned(x), x @ (W + delta).t() + b, rtol=1e-5, atol=1e-5)


def test_flora_on_conv2d_is_the_2d_core_on_the_flattened_kernel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, (3, 2), stride=2, padding=1, bias=True))
    conv = model[0]
    W, b = conv.weight.detach().clone(), conv.bias.detach().clone()
    tuned = sp.attach(model, sp.FLoRA(r=2, alpha=3, targets=["0"]))
    a = _adapters(tuned)[0]
    assert a.lora_A.shape == (2, 3, 3, 2) and a.lora_G.shape == (2, 2) and a.lora_B.shape == (5, 2, 1, 1)
    with torch.no_grad():
        a.lora_G.normal_()
    delta_2d = 1.5 * a.lora_B.detach().reshape(5, 2) @ a.lora_G.detach() @ a.lora_A.detach().reshape(2, 18)
    torch.testing.assert_close(a.delta_weight(), delta_2d.reshape(W.shape), rtol=1e-6, atol=1e-6)
    x = torch.randn(2, 3, 7, 6)
    torch.testing.assert_close(tuned(x), F.conv2d(x, W + delta_2d.reshape(W.shape), b, stride=2, padding=1),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "method,expected_linear,expected_conv",
    # Linear(10 → 6), r = 4: 4·16 (+ 4 | + 16); Conv2d(3 → 5, 3×3), r = 2: d_in = 27, 2·32 (+ 2 | + 4)
    [("trilora", 68, 66), ("flora", 80, 68), ("parallel_adapter", 64, 64)],
)
def test_parameter_counts(method, expected_linear, expected_conv):
    tuned = sp.attach(_linear(), _config(method, r=4, targets=["0"]))
    assert tuned.get_nb_trainable_parameters()[0] == expected_linear
    tuned = sp.attach(nn.Sequential(nn.Conv2d(3, 5, 3)), _config(method, r=2, targets=["0"]))
    assert tuned.get_nb_trainable_parameters()[0] == expected_conv


# -- the parallel adapter = LoRA + MPC_n ------------------------------------------------------------

def test_parallel_adapter_formula():
    model = _linear()
    W, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    tuned = sp.attach(model, sp.ParallelAdapter(r=3, scale=4, targets=["0"]))
    a = _adapters(tuned)[0]
    assert torch.count_nonzero(a.lora_B) == 0 and torch.count_nonzero(a.lora_A) == a.lora_A.numel()
    with torch.no_grad():
        a.lora_B.normal_()
    A, B = a.lora_A.detach(), a.lora_B.detach()
    x = torch.randn(8, 10)
    pre = x @ A.t()
    assert (pre < 0).any() and (pre > 0).any(), "the check needs both signs before the ReLU"
    torch.testing.assert_close(tuned(x), x @ W.t() + b + 4 * torch.relu(pre) @ B.t(), rtol=1e-5, atol=1e-5)
    linear = x @ W.t() + b + 4 * pre @ B.t()
    assert not torch.allclose(tuned(x), linear, atol=1e-3), "a ReLU must sit between the factors"


PA_CASES = [c for c in CASES if c.layer_type in sp.get_method("parallel_adapter").layer_types]


@pytest.mark.parametrize("case", PA_CASES, ids=lambda c: c.name)
def test_parallel_adapter_equals_lora_with_mpc_n(case):
    x = case.input()
    pa = sp.attach(case.model(), sp.ParallelAdapter(r=3, scale=1, targets=case.targets))
    lora = sp.attach(case.model(), sp.LoRA(r=3, alpha=12, mpc="n", targets=case.targets))  # reference form: no α/r
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for (name, p), (name2, q) in zip(pa.adapters_of("default"), lora.adapters_of("default"), strict=True):
            assert name == name2
            p.lora_B.copy_(torch.randn(p.lora_B.shape, generator=gen))
            q.lora_A.copy_(p.lora_A)
            q.lora_B.copy_(p.lora_B)
    y = pa(x)
    assert torch.equal(y, lora(x))
    with pa.disable_adapter():
        assert not torch.allclose(pa(x), y, atol=1e-4)


def _hand_parallel_adapter(x, W, b, A, B, s, p, seed):
    """The reference parallel adapter (He et al.'s code): s·up(dropout(relu(down(x)))), the dropout drawn by the
    library's sampler from the same RNG state (what LoRA's dropout uses on this CPU)."""
    from subpeft.mechanisms.low_rank import LowRankDropout

    h = torch.relu(x @ A.t())
    if p > 0:
        torch.manual_seed(seed)
        drop = LowRankDropout(p)
        h = LowRankDropout.mask(h, drop.positions(h)) * drop.scale
    return x @ W.t() + b + s * (h @ B.t())


@pytest.mark.parametrize("p", [0.0, 0.5])
@pytest.mark.parametrize("method", ["lora", "parallel_adapter"])
def test_mpc_n_is_the_reference_parallel_adapter(method, p):
    """LoRA(mpc="n") and the parallel adapter compute B·drop(ReLU(A·x)) (times s for PA; no α/r for LoRA), with
    the dropout on the hidden, not the input: outputs and gradients of A and B as the hand-written adapter."""
    model = _linear(10, 6)
    W, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    config = (sp.LoRA(r=4, alpha=16, dropout=p, mpc="n", targets=["0"]) if method == "lora"
              else sp.ParallelAdapter(r=4, scale=4.0, dropout=p, targets=["0"]))
    s = 1.0 if method == "lora" else 4.0
    tuned = sp.attach(model, config)
    tuned.train()
    a = _adapters(tuned)[0]
    with torch.no_grad():
        a.lora_B.normal_()
    A = a.lora_A.detach().clone().requires_grad_(True)
    B = a.lora_B.detach().clone().requires_grad_(True)
    x = torch.randn(7, 10)
    g = torch.randn(7, 6)
    torch.manual_seed(123)
    y = tuned(x)
    (y * g).sum().backward()
    ref = _hand_parallel_adapter(x, W, b, A, B, s, p, seed=123)
    (ref * g).sum().backward()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.lora_A.grad, A.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.lora_B.grad, B.grad, rtol=1e-5, atol=1e-5)
    if p > 0:  # the same draw on the input instead (the old form) gives another function
        torch.manual_seed(123)
        from subpeft.mechanisms.low_rank import LowRankDropout

        drop = LowRankDropout(p)
        xd = LowRankDropout.mask(x, drop.positions(x)) * drop.scale
        assert not torch.allclose(y, x @ W.t() + b + s * torch.relu(xd @ A.t()) @ B.t(), atol=1e-3)
    with torch.no_grad():  # eval: no dropout
        tuned.eval()
        torch.testing.assert_close(tuned(x), _hand_parallel_adapter(x, W, b, A, B, s, 0.0, 0))


@pytest.mark.parametrize("method", ["trilora", "flora", "adalora"])
def test_mpc_n_reference_form_on_every_lowrank_variant(method):
    """B·drop(ReLU(G·A·x)), no α/r, the dropout on the hidden: the same form for every LoRA-type method."""
    from subpeft.mechanisms.low_rank import LowRankDropout

    model = _linear(10, 6)
    W, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    extra = dict(total_steps=10, target_r=2) if method == "adalora" else {}
    tuned = sp.attach(model, _config(method, r=4, alpha=16, dropout=0.5, mpc="n", targets=["0"], **extra))
    tuned.train()
    a = _adapters(tuned)[0]
    with torch.no_grad():
        for p in a.parameters():
            p.normal_()
    x = torch.randn(7, 10)
    torch.manual_seed(9)
    y = tuned(x)
    torch.manual_seed(9)
    with torch.no_grad():
        h = torch.relu(a.middle(x @ a.lora_A.t()))
        drop = LowRankDropout(0.5)
        h = LowRankDropout.mask(h, drop.positions(h)) * drop.scale
        expected = x @ W.t() + b + h @ a.lora_B.t()
    torch.testing.assert_close(y.detach(), expected, rtol=1e-5, atol=1e-5)


def test_mpc_n_lora_form_keeps_scale_and_input_dropout():
    """mpc_n_form="lora": (α/r)·B·ReLU(A·drop(x)), the form before the reference one became the default."""
    from subpeft.mechanisms.low_rank import LowRankDropout

    model = _linear(10, 6)
    W, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    tuned = sp.attach(model, sp.LoRA(r=4, alpha=16, dropout=0.5, mpc="n", mpc_n_form="lora", targets=["0"]))
    tuned.train()
    a = _adapters(tuned)[0]
    with torch.no_grad():
        a.lora_B.normal_()
    A, B = a.lora_A.detach(), a.lora_B.detach()
    x = torch.randn(7, 10)
    torch.manual_seed(5)
    y = tuned(x)
    torch.manual_seed(5)
    drop = LowRankDropout(0.5)
    xd = LowRankDropout.mask(x, drop.positions(x)) * drop.scale
    torch.testing.assert_close(y, x @ W.t() + b + 4.0 * torch.relu(xd @ A.t()) @ B.t(), rtol=1e-5, atol=1e-5)
    with pytest.raises(sp.ConfigError, match="mpc_n_form"):
        sp.LoRA(mpc="n", mpc_n_form="paper")


def test_mpc_n_saved_before_the_option_loads_in_its_old_form():
    data = sp.LoRA(r=4, alpha=16, mpc="n", targets=["0"]).to_dict()
    assert data["mpc_n_form"] == "reference"
    del data["mpc_n_form"]  # a file written before mpc_n_form existed
    old = sp.config_from_dict(data)
    assert old.mpc_n_form == "lora" and old.scaling == 4.0
    assert sp.LoRA(r=4, alpha=16, mpc="n").scaling == 1.0
    # a spec without subpeft_version (CLI --set, a hand-written config) gets the default
    data.pop("subpeft_version")
    assert sp.config_from_dict(data).mpc_n_form == "reference"


@pytest.mark.parametrize("case", PA_CASES, ids=lambda c: c.name)
def test_parallel_adapter_trains_from_init(case):
    """B = 0 and A ≠ 0 on every layer type (Embedding included), so ∂L/∂B ≠ 0 at once."""
    tuned = sp.attach(case.model(), sp.ParallelAdapter(r=3, targets=case.targets))
    y = tuned(case.input())
    (y * torch.randn_like(y)).sum().backward()
    for a in _adapters(tuned):
        assert torch.count_nonzero(a.lora_B) == 0 and torch.count_nonzero(a.lora_A) > 0
        assert torch.count_nonzero(a.lora_B.grad) > 0, a.layer_name


def test_lora_mpc_n_on_embedding_trains_from_init():
    case = next(c for c in CASES if c.layer_type == "embedding")
    tuned = sp.attach(case.model(), sp.LoRA(r=3, mpc="n", targets=case.targets))
    tuned(case.input()).sum().backward()
    a = _adapters(tuned)[0]
    assert torch.count_nonzero(a.lora_A.grad) + torch.count_nonzero(a.lora_B.grad) > 0


def test_parallel_adapter_config():
    fields = {f.name for f in dataclasses.fields(sp.ParallelAdapter)}
    assert fields == {"targets", "exclude", "modules_to_save", "r", "scale", "dropout"}, "no MPC/alpha options"
    info = sp.get_method("parallel_adapter")
    assert info.family == "extension" and not info.mergeable and info.config_cls is sp.ParallelAdapter
    config = sp.ParallelAdapter(r=4, scale=4.0, dropout=0.1, targets=["q"])
    assert not config.mergeable and config.scaling == 4.0
    assert sp.config_from_dict(json.loads(config.to_json())) == config
    for bad in (dict(scale=0), dict(scale=-1.0), dict(scale=True), dict(scale="4"), dict(scale=float("inf")),
                dict(r=0), dict(r=2.0), dict(dropout=1.0)):
        with pytest.raises(sp.ConfigError):
            sp.ParallelAdapter(**bad)


# -- MPC --------------------------------------------------------------------------------------------

# hand computation, λ = 0.5, r = 2, two layers:
#   layer 0 (3 → 4): A·Aᵀ = [[2, 0], [0, 4]] → ‖A·Aᵀ − I‖² = 1 + 9 = 10;
#       Bᵀ·B = [[1, 1], [1, 2]] → ‖Bᵀ·B − I‖² = 0 + 1 + 1 + 1 = 3, ‖offdiag‖² = 2
#   layer 1 (4 → 3): A·Aᵀ = [[1, 1], [1, 1]] → 2;  Bᵀ·B = [[4, 0], [0, 0]] → 9 + 1 = 10, offdiag 0
#   o: 0.5·(10 + 3 + 2 + 10) = 12.5;   d: 0.5·(10 + 2 + 2 + 0) = 7
A0 = [[1.0, 1.0, 0.0], [0.0, 0.0, 2.0]]
B0 = [[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
A1 = [[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
B1 = [[2.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
HAND = {"o": 12.5, "d": 7.0}


@pytest.mark.parametrize("mode", ["o", "d"])
@pytest.mark.parametrize("method", LOWRANK)
def test_mpc_loss_equals_hand_computation(method, mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))
    tuned = sp.attach(model, _config(method, r=2, mpc=mode, mpc_weight=0.5, targets=["0", "2"]))
    with torch.no_grad():
        for a, (A, B) in zip(_adapters(tuned), ((A0, B0), (A1, B1)), strict=True):
            a.lora_A.copy_(torch.tensor(A))
            a.lora_B.copy_(torch.tensor(B))
            for p in a.parameters():  # the middle (e, G) is not constrained: give it any value
                if p is not a.lora_A and p is not a.lora_B:
                    p.normal_()
    loss = tuned.regularization()
    assert loss.item() == HAND[mode]
    loss.backward()  # and it is differentiable w.r.t. the factors only
    for a in _adapters(tuned):
        assert a.lora_A.grad is not None and a.lora_B.grad is not None
        assert all(p.grad is None for p in a.parameters() if p is not a.lora_A and p is not a.lora_B)


@pytest.mark.parametrize("mode", ["o", "d"])
def test_mpc_on_conv2d_constrains_the_flattened_kernel(mode):
    # Conv2d(1 → 4, 1×3): A (2, 1, 1, 3) is A0 as a kernel, B (4, 2, 1, 1) is B0: 0.5·13 resp. 0.5·12
    tuned = sp.attach(nn.Sequential(nn.Conv2d(1, 4, (1, 3))), sp.LoRA(r=2, mpc=mode, mpc_weight=0.5, targets=["0"]))
    a = _adapters(tuned)[0]
    with torch.no_grad():
        a.lora_A.copy_(torch.tensor(A0).reshape(2, 1, 1, 3))
        a.lora_B.copy_(torch.tensor(B0).reshape(4, 2, 1, 1))
    assert tuned.regularization().item() == {"o": 6.5, "d": 6.0}[mode]


def test_no_mpc_no_loss():
    tuned = sp.attach(_linear(), sp.TriLoRA(r=2, targets=["0"]))
    assert torch.equal(tuned.regularization(), torch.zeros(()))
    tuned = sp.attach(_linear(), sp.ParallelAdapter(r=2, targets=["0"]))
    assert torch.equal(tuned.regularization(), torch.zeros(()))


@pytest.mark.parametrize("mode", ["o", "d"])
def test_mpc_on_zero_initialised_B(mode):
    """MPC_o pulls a zero-initialised B to unit columns as soon as B leaves 0; MPC_d does not.

    B = 0 is a stationary point of both terms (∂‖BᵀB − I‖²/∂B = 4·B·(BᵀB − I)), so the gradient at
    exactly B = 0 is 0 for both; but for MPC_o it is a maximum: for a small B (as after the first
    task-loss step) the gradient is −4λ·B, first order, and B grows to unit columns. MPC_d's term
    ‖offdiag(BᵀB)‖² is quartic in B: gradient O(‖B‖³), B's norm stays put.
    """
    lam = 0.1
    torch.manual_seed(0)
    tuned = sp.attach(nn.Sequential(nn.Linear(16, 12)), sp.LoRA(r=3, mpc=mode, mpc_weight=lam, targets=["0"]))
    a = _adapters(tuned)[0]
    assert torch.count_nonzero(a.lora_B) == 0
    tuned.regularization().backward()
    assert torch.count_nonzero(a.lora_B.grad) == 0
    with torch.no_grad():
        a.lora_B.copy_(1e-3 * torch.randn(12, 3))
    a.lora_B.grad = None
    tuned.regularization().backward()
    B, grad = a.lora_B.detach(), a.lora_B.grad
    if mode == "o":
        torch.testing.assert_close(grad, -4 * lam * B, rtol=1e-4, atol=0)
    else:
        assert grad.norm() < 1e-4 * (4 * lam * B.norm())
    norms0 = B.norm(dim=0).clone()
    opt = torch.optim.SGD([a.lora_B], lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        tuned.regularization().backward()
        opt.step()
    norms = a.lora_B.detach().norm(dim=0)
    if mode == "o":
        torch.testing.assert_close(a.lora_B.t() @ a.lora_B, torch.eye(3), atol=1e-4, rtol=0)
    else:
        torch.testing.assert_close(norms, norms0, rtol=1e-3, atol=0)


@pytest.mark.parametrize("method", LOWRANK)
def test_mpc_n_refuses_to_merge(method):
    config = _config(method, r=2, mpc="n", targets=["0"])
    assert not config.mergeable and _config(method, r=2, mpc="o", targets=["0"]).mergeable
    name = "mine"
    tuned = sp.attach(_linear(), config, name=name)
    with pytest.raises(sp.SubpeftError, match=f"'{name}'.*{method}"):
        tuned.merge()
    with pytest.raises(sp.SubpeftError, match=f"'{name}'"):
        tuned.merge_and_unload()
    assert tuned.merged_adapters == []
    with pytest.raises(TypeError, match="mpc='n'"):
        _adapters(tuned, name)[0].delta_weight()


def test_parallel_adapter_refuses_to_merge():
    tuned = sp.attach(_linear(), sp.ParallelAdapter(r=2, targets=["0"]))
    with pytest.raises(sp.SubpeftError, match="'default'.*parallel_adapter"):
        tuned.merge()
    assert tuned.merged_adapters == []


@pytest.mark.parametrize("mode", ["o", "d", "n"])
@pytest.mark.parametrize("method", LOWRANK)
def test_mpc_options_json_roundtrip(method, mode):
    config = _config(method, r=4, alpha=8, mpc=mode, mpc_weight=0.25, targets=["q", "v"])
    data = json.loads(config.to_json())
    assert data["method"] == method and data["mpc"] == mode and data["mpc_weight"] == 0.25
    again = sp.config_from_dict(data)
    assert again == config and again.mergeable == (mode != "n")


@pytest.mark.parametrize("method", LOWRANK)
@pytest.mark.parametrize(
    "bad", [dict(mpc="x"), dict(mpc="O"), dict(mpc=""), dict(mpc=True), dict(mpc_weight=-0.1), dict(mpc_weight="0.1"),
            dict(mpc_weight=True)]
)
def test_invalid_mpc_options_raise(method, bad):
    with pytest.raises(sp.ConfigError, match="mpc"):
        _config(method, **bad)


@pytest.mark.parametrize("mode", [None, "o", "d", "n"])
def test_lora_with_mpc_is_saved_natively_and_reloads(mode, tmp_path):
    case = next(c for c in CASES if c.name == "mlp")
    weight = 0.1 if mode is None else 0.3  # (PEFT's format has no place for an unused mpc_weight)
    tuned = sp.attach(case.model(), sp.LoRA(r=3, alpha=6, mpc=mode, mpc_weight=weight, targets=case.targets))
    with torch.no_grad():
        for a in _adapters(tuned):
            a.lora_B.normal_()
    x = case.input()
    y, reg = tuned(x), tuned.regularization()
    tuned.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    if mode is None:  # plain LoRA is written in PEFT's format
        assert saved["peft_type"] == "LORA" and tuned.configs["default"].to_peft_dict() is not None
    else:  # PEFT has no MPC: subpeft's own format, which keeps the option
        assert tuned.configs["default"].to_peft_dict() is None
        assert "peft_type" not in saved and saved["method"] == "lora" and saved["mpc"] == mode
    loaded = sp.load(case.model(), tmp_path)
    assert loaded.configs["default"] == tuned.configs["default"]
    assert torch.equal(loaded(x), y)
    assert torch.equal(loaded.regularization(), reg)
