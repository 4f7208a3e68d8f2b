"""LoRA-Dash: the phase switch on optimizer steps, the change-rate selection, the dash term, save/resume."""

from __future__ import annotations

import copy

import pytest
import torch

import subpeft as sp
from subpeft.core.layers import from_2d, weight_2d
from subpeft.methods.combination import lora_dash
from subpeft.methods.combination.lora_dash import LoRADash

from .tiny_models import CASES

WEIGHT_CASES = [pytest.param(c, id=c.name) for c in CASES if c.layer_type != "norm"]
BUFFERS = ("dash_U", "dash_Vh", "dash_index", "dash_phase")


def attach(case, seed: int = 0, **options):
    base = case.model(seed)
    pristine = copy.deepcopy(base)
    options = {"r": 2, "alpha": 3.0, "directions": 3, "prelaunch_steps": 2, **options}
    return pristine, sp.attach(base, LoRADash(targets=list(case.targets), **options)), case.input()


def adapters(tuned):
    return [a for _, a in tuned.adapters_of("default")]


def train(tuned, x, target, steps, opt=None):
    opt = opt or torch.optim.Adam([p for p in tuned.parameters() if p.requires_grad], lr=2e-2)
    for step in steps:
        torch.manual_seed(1000 + step)  # dropout replays identically
        loss = (tuned(x).float() - target).pow(2).mean() + tuned.regularization()
        loss.backward()
        opt.step()
        tuned.step(step)
        opt.zero_grad()
    return opt


def naive_change_rates(adapter) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """δ_i = |u_iᵀ·ΔW·v_i| / (σ_i + ε) from the full ΔW, in float64: (δ, U, Vh)."""
    W = weight_2d(adapter.base_layer, adapter.layer_type).detach().double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    A, B = (f.detach().double() for f in adapter.factors_2d())
    dW = adapter.scaling * B @ A
    return torch.diagonal(U.t() @ dW @ Vh.t()).abs() / (S + adapter.config.eps), U, Vh


def test_phase_switches_after_prelaunch_optimizer_steps_not_forwards():
    case = CASES[0]
    pristine, tuned, x = attach(case, prelaunch_steps=3, dropout=0.1)
    target = torch.randn_like(pristine(x))
    opt = train(tuned, x, target, [1, 2])
    # many forwards, backwards and evaluations: none of them counts as an optimizer step
    for mode in ("train", "eval"):
        getattr(tuned, mode)()
        for _ in range(20):
            tuned(x).sum().backward()
            with torch.no_grad():
                tuned(x)
    opt.zero_grad()
    tuned.train()
    assert all(int(a.dash_phase) == 0 and not a.dashing() for a in adapters(tuned))
    assert all(torch.equal(a.dash_index, torch.full_like(a.dash_index, -1)) for a in adapters(tuned))
    train(tuned, x, target, [3], opt)  # the third optimizer step
    assert all(int(a.dash_phase) == 1 and a.dashing() for a in adapters(tuned))
    assert all((a.dash_index >= 0).all() and a.dash_U.abs().sum() > 0 for a in adapters(tuned))
    tuned.eval()
    y = tuned(x)
    chosen = [a.dash_index.clone() for a in adapters(tuned)]
    for a in adapters(tuned):  # the switch itself does not change φ (Δσ = 0)
        torch.testing.assert_close(a.delta_2d(), a.scaling * a.factors_2d()[1] @ a.factors_2d()[0])
    tuned.step(4)
    tuned.step(100)
    assert all(torch.equal(a.dash_index, c) for a, c in zip(adapters(tuned), chosen, strict=True))
    assert torch.equal(tuned(x), y)


@pytest.mark.parametrize("case", WEIGHT_CASES)
def test_chosen_directions_are_the_top_change_rates(case):
    pristine, tuned, x = attach(case, prelaunch_steps=3)
    train(tuned, x, torch.randn_like(pristine(x).float()), [1, 2, 3])
    for a in adapters(tuned):
        assert a.dashing()
        rate, U, Vh = naive_change_rates(a)
        k = a.dash_index.numel()
        top = torch.topk(rate, k + 1 if k < rate.numel() else k)
        if k < rate.numel():  # the test is only sharp if the k-th and (k+1)-th rates are distinct
            assert top.values[k - 1] - top.values[k] > 1e-4 * top.values[0]
        assert a.dash_index.tolist() == top.indices[:k].tolist()
        idx = a.dash_index
        # U_s, Vh_s are those singular vectors (compared sign-free as rank-one products u_i·v_iᵀ)
        got = torch.einsum("ok,ki->koi", a.dash_U.double(), a.dash_Vh.double())
        want = torch.einsum("ok,ki->koi", U[:, idx], Vh[idx])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert (a.dash_U.abs().argmax(0) == a.dash_U.argmax(0)).all(), "canonical signs: largest entry positive"


def _perturb(tuned, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapters(tuned):
            for p in a.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.mark.parametrize("case", WEIGHT_CASES)
def test_dash_phase_forward_merge_and_gradients(case):
    pristine, tuned, x = attach(case)
    train(tuned, x, torch.randn_like(pristine(x).float()), [1, 2])
    _perturb(tuned, seed=1)
    tuned.eval()
    for a in adapters(tuned):
        assert a.dashing() and a.dash_sigma.abs().min() > 0
        A, B = a.factors_2d()
        W = weight_2d(a.base_layer, a.layer_type)
        want = W + a.scaling * B @ A + a.dash_U @ torch.diag(a.dash_sigma) @ a.dash_Vh
        torch.testing.assert_close(a.merged_params()["weight"], from_2d(a.base_layer, a.layer_type, want),
                                   atol=1e-6, rtol=0)
    y = tuned(x)
    with torch.no_grad():  # the dash term is in the forward: zeroing Δσ changes it
        saved = [a.dash_sigma.clone() for a in adapters(tuned)]
        for a in adapters(tuned):
            a.dash_sigma.zero_()
        assert not torch.allclose(tuned(x), y, atol=1e-4)
        for a, s in zip(adapters(tuned), saved, strict=True):
            a.dash_sigma.copy_(s)
    tuned.merge()
    torch.testing.assert_close(tuned(x), y, atol=1e-5, rtol=0)
    tuned.unmerge()
    torch.testing.assert_close(tuned(x), y, atol=1e-5, rtol=0)
    tuned(x).float().pow(2).sum().backward()
    assert all(a.dash_sigma.grad is not None and a.dash_sigma.grad.abs().sum() > 0 for a in adapters(tuned))


@pytest.mark.parametrize("case", WEIGHT_CASES)
def test_dash_sigma_has_no_effect_before_the_switch(case):
    pristine, tuned, x = attach(case)
    _perturb(tuned, seed=2)
    lora = sp.attach(copy.deepcopy(pristine), sp.LoRA(r=2, alpha=3.0, targets=list(case.targets)))
    with torch.no_grad():
        for a, b in zip(adapters(tuned), adapters(lora), strict=True):
            b.lora_A.copy_(a.lora_A)
            b.lora_B.copy_(a.lora_B)
            a.dash_U.normal_()  # even with non-zero factors, phase 1 ignores the dash term
            a.dash_Vh.normal_()
    assert not any(a.dashing() for a in adapters(tuned))
    assert torch.equal(tuned(x), lora(x))
    for a, b in zip(adapters(tuned), adapters(lora), strict=True):
        assert torch.equal(a.delta_weight(), b.delta_weight())
    tuned(x).float().pow(2).sum().backward()
    assert all(a.dash_sigma.grad is None and a.lora_A.grad is not None for a in adapters(tuned))


def test_dash_term_shares_the_lora_dropout():
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 5))
    W, bias = base[0].weight.detach().clone(), base[0].bias.detach().clone()
    tuned = sp.attach(base, LoRADash(r=2, alpha=4.0, directions=3, prelaunch_steps=1, dropout=0.5, targets=["0"]))
    x = torch.randn(8, 6)
    train(tuned, x, torch.randn(8, 5), [1])
    _perturb(tuned, seed=3)
    a = adapters(tuned)[0]
    tuned.train()
    torch.manual_seed(7)
    y = tuned(x)
    torch.manual_seed(7)
    xd = a.dropout(x)  # the adapter's own dropout, replayed from the same RNG state
    want = x @ W.t() + bias + a.scaling * xd @ a.lora_A.t() @ a.lora_B.t() + xd @ (a.dash_U * a.dash_sigma @ a.dash_Vh).t()
    torch.testing.assert_close(y, want, atol=1e-6, rtol=0)


def test_save_in_dash_phase_and_load_does_not_reselect(tmp_path, monkeypatch):
    case = CASES[1]
    pristine, tuned, x = attach(case)
    target = torch.randn_like(pristine(x))
    train(tuned, x, target, [1, 2, 3])
    _perturb(tuned, seed=4)
    tuned.eval()
    y = tuned(x)
    tuned.save_pretrained(tmp_path)

    def no_svd(*args, **kwargs):
        raise AssertionError("a loaded dash-phase adapter must not select directions again")

    monkeypatch.setattr(lora_dash, "svd", no_svd)
    loaded = sp.load(copy.deepcopy(pristine), tmp_path, trainable=True)
    loaded.eval()
    assert torch.equal(loaded(x), y)
    for a, b in zip(adapters(tuned), adapters(loaded), strict=True):
        assert b.dashing()
        for name in BUFFERS:
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    loaded.train()
    train(loaded, x, target, range(1, 6))  # steps of any number, before or past t: no re-selection
    for a, b in zip(adapters(tuned), adapters(loaded), strict=True):
        for name in BUFFERS:
            assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("save_at", [2, 5])
def test_resumed_training_is_exact_across_the_switch(save_at, tmp_path):
    case = CASES[0]
    pristine, tuned, x = attach(case, prelaunch_steps=3, dropout=0.1)
    target = torch.randn_like(pristine(x))

    def params(model):
        return [p for p in model.parameters() if p.requires_grad]

    opt = torch.optim.Adam(params(tuned), lr=2e-2)  # made before training: it sees Δσ
    train(tuned, x, target, range(1, save_at + 1), opt)
    assert all(a.dashing() == (save_at >= 3) for a in adapters(tuned))
    tuned.save_pretrained(tmp_path)
    opt_state = copy.deepcopy(opt.state_dict())
    train(tuned, x, target, range(save_at + 1, 9), opt)

    resumed = sp.load(copy.deepcopy(pristine), tmp_path, trainable=True)
    resumed.train()
    opt2 = torch.optim.Adam(params(resumed), lr=2e-2)
    opt2.load_state_dict(opt_state)
    train(resumed, x, target, range(save_at + 1, 9), opt2)

    a, b = tuned.adapter_state_dict("default"), resumed.adapter_state_dict("default")
    assert a.keys() == b.keys() and any(k.endswith("dash_sigma") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resuming at step {save_at}"
    assert all(v.abs().min() > 0 for k, v in a.items() if k.endswith("dash_sigma")), "Δσ trained in phase 2"
    tuned.eval()
    resumed.eval()
    assert torch.equal(tuned(x), resumed(x))


def test_config_checks_and_parameter_count():
    for bad in (dict(prelaunch_steps=0), dict(directions=0), dict(eps=0.0), dict(eps=True), dict(mpc="n")):
        with pytest.raises(sp.ConfigError):
            LoRADash(**bad)
    config = LoRADash(r=3, directions=50, targets=["fc1", "fc2"])
    assert config.mergeable and sp.get_method("lora_dash").family == "combination"
    tuned = sp.attach(CASES[0].model(), config)
    # directions clamp to min(d_out, d_in): fc1 is 6 -> 10, fc2 10 -> 7
    assert tuned.get_nb_trainable_parameters()[0] == 3 * (6 + 10) + 6 + 3 * (10 + 7) + 7
    assert LoRADash(targets=["x"]).to_peft_dict() is None  # native file format
