"""AdaLoRA: the rank budget runs by itself through tuned.step, the orthogonality loss through
tuned.regularization, a mid-training save resumes bit for bit, and files move to and from PEFT."""

from __future__ import annotations

import copy
import json
import math
import re
import warnings
from fractions import Fraction

import pytest
import torch

import subpeft as sp

from .test_core import tiny_bert
from .tiny_models import MLP, ConvNet, GPT2Style, TinyAttention

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def config(**kw):
    options = dict(r=4, target_r=2, alpha=8.0, total_steps=20, init_warmup=3, final_warmup=5, mask_interval=2,
                   targets=ATTN)
    return sp.AdaLoRA(**{**options, **kw})


def layers(tuned, name="default"):
    return [a for _, a in tuned.adapters_of(name)]


def train(tuned, steps, x, target, opt, *, call_step=True, on_step=None):
    for step in steps:
        torch.manual_seed(1000 + step)  # dropout replays identically in a resumed run
        loss = (tuned(x) - target).pow(2).mean() + tuned.regularization()
        loss.backward()
        opt.step()
        if call_step:
            tuned.step(step)
        opt.zero_grad()
        if on_step is not None:
            on_step(step)


def attention_setup(seed=0, **kw):
    torch.manual_seed(seed)
    base = TinyAttention()
    pristine = copy.deepcopy(base)
    tuned = sp.attach(base, config(**kw))
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(4, 5, 8, generator=gen)
    target = torch.randn(4, 5, 8, generator=gen)
    return pristine, tuned, x, target


# -- the schedule --------------------------------------------------------------------------------
def test_budget_falls_to_target_with_only_step_and_regularization():
    """A plain training loop (loss + tuned.regularization(), tuned.step after each optimizer step):
    the kept triplets equal the cubic budget at every masking step, reach target_r per matrix on
    average at total_steps - final_warmup, and stay frozen (masked λ exactly 0) to the end."""
    _, tuned, x, target = attention_setup()
    cfg, ada = tuned.configs["default"], layers(tuned)
    n, t_f = len(ada), cfg.total_steps - cfg.final_warmup
    opt = torch.optim.Adam([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    kept, regrown, final_masks = {}, {}, {}

    def check(step):
        kept[step] = sum(a.ranks() for a in ada)
        regrown[step] = sum(int((a.lora_E[~a.rank_mask] != 0).sum()) for a in ada)
        budget, masks = cfg.budget(n, step)
        if masks:
            assert kept[step] == budget, f"step {step}: {kept[step]} triplets kept, budget {budget}"
        for a in ada:  # every masked triplet has λ = 0 right after an allocation
            if masks:
                assert torch.all(a.lora_E[~a.rank_mask] == 0)
        if step >= t_f:
            nonzero = sum(int((a.lora_E != 0).sum()) for a in ada)
            assert nonzero <= cfg.target_r * n and kept[step] == cfg.target_r * n
            final_masks.setdefault(step, [a.rank_mask.clone() for a in ada])

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "tuned.step was not called" warning in a correct loop
        train(tuned, range(1, cfg.total_steps + 3), x, target, opt, on_step=check)
    assert kept[cfg.init_warmup] == cfg.r * n  # nothing masked during the initial warm-up
    assert kept[cfg.init_warmup + 1] < cfg.r * n  # step 4: the first allocation (mask_interval 2)
    # between allocations masked λ may grow back (in place, as PEFT), until the next allocation or the final one
    assert regrown[cfg.init_warmup + 2] > 0 and regrown[cfg.init_warmup + 3] == 0
    assert all(regrown[s] == 0 for s in range(t_f, cfg.total_steps + 3))
    masks = list(final_masks.values())
    assert all(all(torch.equal(m, m0) for m, m0 in zip(ms, masks[0], strict=True)) for ms in masks)  # frozen
    ranks = [a.ranks() for a in ada]
    assert sum(ranks) == cfg.target_r * n and len(set(ranks)) > 1, ranks  # allocated globally, not per layer


def test_budget_curve_is_the_cubic_formula_and_matches_peft():
    peft = pytest.importorskip("peft")
    cfg = sp.AdaLoRA(r=12, target_r=4, total_steps=1000, init_warmup=100, final_warmup=200, mask_interval=10)
    n = 7
    init, target = 12 * n, 4 * n
    for step, expected in ((0, init), (100, init), (101, None), (350, None), (799, None), (800, target), (950, target)):
        if expected is None:  # the cubic in exact arithmetic
            expected = math.floor((init - target) * (1 - Fraction(step - 100, 700)) ** 3 + target)
        assert cfg.budget(n, step)[0] == expected, step
    budgets = [cfg.budget(n, s)[0] for s in range(1001)]
    assert all(b1 >= b2 for b1, b2 in zip(budgets, budgets[1:], strict=False))  # never grows
    assert [s for s in range(1001) if cfg.budget(n, s)[1]] == list(range(110, 800, 10)) + list(range(800, 1001))
    # PEFT's RankAllocator.budget_schedule gives the same budgets at every step
    model = peft.get_peft_model(MLP(), peft.AdaLoraConfig(init_r=12, target_r=4, total_step=1000, tinit=100,
                                                          tfinal=200, deltaT=10, target_modules=["fc1", "fc2"]))
    allocator = model.base_model.rankallocator
    assert [allocator.budget_schedule(s)[0] for s in range(1001)] == [cfg.budget(2, s)[0] for s in range(1001)]


def test_importance_scores_and_masks_match_peft_step_by_step():
    """Same init, same data, same optimizer: after every optimizer step our importance EMAs equal PEFT's
    RankAllocator's (to the 1e-5/r scale difference), our triplet scores are score(λ_i) + mean score(Q_i,:)
    + mean score(P_:,i) of them, the EMAs freeze from step T_f on, and the λ that PEFT's
    update_and_allocate has zeroed are the λ that tuned.step has zeroed."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    pristine = TinyAttention()
    kw = dict(target_r=2, tinit=2, tfinal=3, total_step=14, deltaT=1, lora_alpha=8, orth_reg_weight=0.0)
    theirs = peft.get_peft_model(copy.deepcopy(pristine), peft.AdaLoraConfig(init_r=4, target_modules=ATTN, **kw))
    ours = sp.attach(copy.deepcopy(pristine), config(init_warmup=2, final_warmup=3, total_steps=14, mask_interval=1,
                                                    orth_reg=0.0))
    with torch.no_grad():
        for name, a in ours.adapters_of("default"):
            module = theirs.base_model.model.get_submodule(name)
            for k in "ABE":
                getattr(a, "lora_" + k).copy_(getattr(module, "lora_" + k)["default"])
    x, target = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    opts = [torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=2e-2) for m in (theirs, ours)]
    allocator, t_f = theirs.base_model.rankallocator, 14 - 3
    for step in range(1, 17):
        for model, opt in zip((theirs, ours), opts, strict=True):
            ((model(x) - target).pow(2).mean() + ours.regularization() * (model is ours)).backward()
            opt.step()
            theirs.base_model.update_and_allocate(step) if model is theirs else ours.step(step)
            opt.zero_grad()
        state = {k: v.clone() for k, v in ours.adapter_state_dict("default").items() if ".ipt_" in k or ".unc_" in k}
        if step < t_f:  # (PEFT resets its EMAs at T_f)
            frozen = state
            ema = {k: (allocator.exp_avg_ipt[k], allocator.exp_avg_unc[k]) for k in allocator.exp_avg_ipt}
            for name, a in ours.adapters_of("default"):
                score = {}
                for k in "AEB":
                    ipt, unc = ema[f"{name}.lora_{k}.default"]
                    torch.testing.assert_close(getattr(a, "ipt_" + k), ipt, rtol=1e-3, atol=1e-12)
                    torch.testing.assert_close(getattr(a, "unc_" + k), unc, rtol=1e-3, atol=1e-12)
                    score[k] = getattr(a, "ipt_" + k) * getattr(a, "unc_" + k)
                by_hand = score["E"][:, 0] + score["A"].mean(1) + score["B"].mean(0)
                torch.testing.assert_close(a.triplet_scores(), by_hand, rtol=1e-6, atol=0)
        else:  # no update from step T_f on: the final allocation uses the scores of step T_f - 1
            assert all(torch.equal(state[k], v) for k, v in frozen.items()), step
        zeros_theirs = [theirs.base_model.model.get_submodule(n).lora_E["default"][:, 0] == 0 for n, _ in
                        ours.adapters_of("default")]
        zeros_ours = [a.lora_E[:, 0] == 0 for a in layers(ours)]
        assert all(torch.equal(a, b) for a, b in zip(zeros_theirs, zeros_ours, strict=True)), step
    assert sum(int((~z).sum()) for z in zeros_ours) == 2 * len(ATTN)


def test_without_step_lambda_is_never_masked_and_a_warning_says_so():
    _, tuned, x, target = attention_setup()
    opt = torch.optim.Adam([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    with pytest.warns(UserWarning, match=r"tuned\.step\(global_step\) was not called"):
        train(tuned, range(1, 21), x, target, opt, call_step=False)
    assert all(bool((a.lora_E != 0).all()) and a.ranks() == 4 for a in layers(tuned))
    assert not any(bool(a.rank_final) for a in layers(tuned))


def test_step_needs_the_gradients():
    _, tuned, x, target = attention_setup()
    opt = torch.optim.SGD([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    (tuned(x) - target).pow(2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match=r"before optimizer\.zero_grad\(\)"):
        tuned.step(1)


# -- the orthogonality loss ---------------------------------------------------------------------
def test_orthogonality_loss_by_hand_and_against_peft():
    """c·(Σ_layers ‖QQᵀ − I‖_F + ‖PᵀP − I‖_F) / (2·n_layers): not squared, the mean over the factor *matrices*,
    PEFT's formula, so orth_reg = c is PEFT's orth_reg_weight = c (the same loss term)."""
    peft = pytest.importorskip("peft")
    base = tiny_bert()
    options = dict(r=3, target_r=2, total_steps=10, orth_reg=0.3)
    tuned = sp.attach(copy.deepcopy(base), sp.AdaLoRA(**options, targets=["query", "value"]))
    tuned.train()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for a in layers(tuned):
            for p in a.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    hand = []
    for a in layers(tuned):
        Q, P = a.lora_A.detach().double(), a.lora_B.detach().double()
        eye = torch.eye(3, dtype=torch.float64)
        hand.append(((Q @ Q.T - eye) ** 2).sum().sqrt() + ((P.T @ P - eye) ** 2).sum().sqrt())
    expected = 0.3 * sum(hand) / (2 * len(hand))  # 2 factor matrices per layer
    torch.testing.assert_close(tuned.regularization().double(), expected, atol=1e-6, rtol=1e-6)
    # PEFT adds its term to outputs.loss: same tensors, orth_reg_weight = orth_reg
    ids, labels = torch.randint(1, 50, (2, 6)), torch.tensor([0, 2])
    losses = []
    for weight in (0.0, 0.3):
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(
            init_r=3, total_step=10, orth_reg_weight=weight, target_modules=["query", "value"]))
        with torch.no_grad():
            for name, a in tuned.adapters_of("default"):
                module = theirs.base_model.model.get_submodule(name)
                for k in "ABE":
                    getattr(module, "lora_" + k)["default"].copy_(getattr(a, "lora_" + k))
        theirs.eval()
        # AdaLoraModel.forward adds the term (PeftModel without a task_type bypasses it: call base_model)
        losses.append(theirs.base_model(input_ids=ids, labels=labels).loss)
    torch.testing.assert_close(losses[1] - losses[0], tuned.regularization().detach(), atol=1e-6, rtol=1e-5)
    # MPC terms (squared norms, summed over layers) add to it
    mpc = sp.attach(copy.deepcopy(base), sp.AdaLoRA(**options, mpc="o", targets=["query"]))
    mpc_hand, orth_hand = 0.0, []
    for a in layers(mpc):
        Q, P, eye = a.lora_A.detach().double(), a.lora_B.detach().double(), torch.eye(3, dtype=torch.float64)
        mpc_hand += 0.1 * (((Q @ Q.T - eye) ** 2).sum() + ((P.T @ P - eye) ** 2).sum())
        orth_hand.append(((Q @ Q.T - eye) ** 2).sum().sqrt() + ((P.T @ P - eye) ** 2).sum().sqrt())
    expected = mpc_hand + 0.3 * sum(orth_hand) / (2 * len(orth_hand))
    torch.testing.assert_close(mpc.regularization().detach().double(), expected, atol=1e-5, rtol=1e-6)


# -- saving in the middle of training ------------------------------------------------------------
@pytest.mark.parametrize("save_at", [2, 8, 16])  # warm-up, budget phase, after the final allocation
def test_resume_mid_training_is_bit_identical(save_at, tmp_path):
    pristine, tuned, x, target = attention_setup(dropout=0.1)
    def params(model):
        return [p for p in model.parameters() if p.requires_grad]

    opt = torch.optim.Adam(params(tuned), lr=1e-2)
    train(tuned, range(1, save_at + 1), x, target, opt)
    tuned.save_pretrained(tmp_path)
    opt_state = copy.deepcopy(opt.state_dict())
    train(tuned, range(save_at + 1, 23), x, target, opt)

    resumed = sp.load(copy.deepcopy(pristine), tmp_path, trainable=True)
    resumed.train()
    opt2 = torch.optim.Adam(params(resumed), lr=1e-2)
    opt2.load_state_dict(opt_state)
    train(resumed, range(save_at + 1, 23), x, target, opt2)
    a, b = tuned.adapter_state_dict("default"), resumed.adapter_state_dict("default")
    assert a.keys() == b.keys() and any(".ipt_A" in k for k in a) and any(".rank_mask" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resuming at step {save_at}"
    tuned.eval()
    resumed.eval()
    assert torch.equal(tuned(x), resumed(x))
    assert sum(a.ranks() for a in layers(resumed)) == 2 * len(ATTN)


# -- configuration -------------------------------------------------------------------------------
def test_total_steps_is_required_to_attach_and_options_are_checked():
    cfg = sp.AdaLoRA(targets=["fc1"])  # a config alone is fine (JSON, PEFT conversion)
    assert (cfg.r, cfg.target_r, cfg.beta1, cfg.beta2, cfg.orth_reg) == (12, 8, 0.85, 0.85, 0.5)  # PEFT's orth_reg_weight default
    with pytest.raises(sp.ConfigError, match="total_steps"):
        sp.attach(MLP(), cfg.replace(r=4, target_r=2))  # (r=12 is more than the MLP's layers can use)
    bad_options = [
        (dict(target_r=16), "target_r"), (dict(total_steps=10, init_warmup=5, final_warmup=5), "init_warmup"),
        (dict(beta1=1.0), "beta1"), (dict(mask_interval=0), "mask_interval"), (dict(orth_reg=-1), "orth_reg"),
    ]
    for bad, match in bad_options:
        with pytest.raises(sp.ConfigError, match=match):
            sp.AdaLoRA(**bad)


def test_peft_config_roundtrip_and_what_has_no_peft_form():
    cfg = sp.AdaLoRA(r=6, target_r=3, alpha=12.0, dropout=0.1, total_steps=50, init_warmup=5, final_warmup=10,
                     mask_interval=3, beta1=0.8, beta2=0.9, orth_reg=0.3, targets=["fc1", "fc2"])
    data = cfg.to_peft_dict({"linear"})
    assert (data["init_r"], data["total_step"], data["tinit"], data["tfinal"], data["deltaT"]) == (6, 50, 5, 10, 3)
    assert data["orth_reg_weight"] == 0.3 and "r" not in data  # PEFT warns on an r it ignores
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sp.config_from_dict(json.loads(json.dumps(data))) == cfg
    assert cfg.to_peft_dict({"embedding"}) is None and cfg.to_peft_dict({"conv2d"}) is not None  # SVDConv2d
    assert cfg.replace(mpc="o").to_peft_dict({"linear"}) is None
    assert sp.AdaLoRA(targets=["fc1"]).to_peft_dict({"linear"}) is None  # PEFT requires total_step


def test_peft_options_subpeft_lacks_are_refused_and_unknown_ones_warn():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(MLP(), peft.AdaLoraConfig(total_step=10, target_modules=["fc1"]))
    data = json.loads(json.dumps(model.peft_config["default"].to_dict(), default=list))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = sp.config_from_dict(data)  # every field PEFT 0.21 writes is known
    assert (cfg.r, cfg.target_r, cfg.total_steps, cfg.orth_reg, cfg.alpha) == (12, 8, 10, 0.5, 8)
    with pytest.raises(sp.ConfigError, match="bias"):
        sp.config_from_dict({**data, "bias": "all"})
    with pytest.warns(UserWarning, match="lora_future_trick"):
        sp.config_from_dict({**data, "lora_future_trick": True})


# -- files shared with Hugging Face PEFT ------------------------------------------------------------
def _trained_like(tuned, seed, scale=0.05):
    """Unit-norm-ish rows of Q and columns of P (where the orthogonality loss drives them), λ ~ N(0, scale²)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in layers(tuned):
            (r, d_in), d_out = a.lora_A.shape, a.lora_B.shape[0]
            a.lora_A.copy_(torch.randn(r, d_in, generator=gen) / d_in**0.5)
            a.lora_B.copy_(torch.randn(d_out, r, generator=gen) / d_out**0.5)
            a.lora_E.copy_(torch.randn(r, 1, generator=gen) * scale)


INTEROP = [
    ("linear", MLP, ["fc1", "fc2"], lambda: torch.randn(4, 6)),
    ("conv1d", GPT2Style, ["c_attn", "c_proj"], lambda: torch.randn(3, 4, 6)),
    ("conv2d", ConvNet, ["conv1", "conv2", "conv3"], lambda: torch.randn(2, 3, 8, 9)),  # PEFT's SVDConv2d
]


@pytest.mark.parametrize("name,build,targets,make_input", INTEROP, ids=[c[0] for c in INTEROP])
def test_subpeft_adalora_loads_in_peft(name, build, targets, make_input, tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = build().eval()
    pristine = copy.deepcopy(base)
    tuned = sp.attach(base, sp.AdaLoRA(r=4, target_r=2, alpha=8.0, dropout=0.1, total_steps=10, targets=targets))
    _trained_like(tuned, seed=1)
    tuned.eval()
    x = make_input()
    expected = tuned(x)
    tuned.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path).eval()
    # subpeft's extra tensors (the allocator's EMAs and masks, for an exact resume) are ignored by PEFT: silently
    # before peft 0.22, which names them in one "unexpected adapter keys" warning; nothing else may warn
    extra = {"ipt_A", "unc_A", "ipt_E", "unc_E", "ipt_B", "unc_B", "rank_mask", "rank_final"}
    for w in caught:
        named = re.findall(r"'([^']+)'", str(w.message))
        assert "unexpected adapter keys" in str(w.message) and named, str(w.message)
        assert {k.rsplit(".", 1)[-1] for k in named} <= extra, named
    # α/r here, α/(r + 1e-5) in PEFT: equal to 1e-6 while |adapter term| <= 0.1·r (larger: the test below)
    torch.testing.assert_close(theirs(x), expected, atol=1e-6, rtol=0)
    cfg = theirs.peft_config["default"]
    assert (cfg.init_r, cfg.target_r, cfg.total_step, cfg.orth_reg_weight) == (4, 2, 10, 0.5)


def test_scale_differs_from_peft_by_a_relative_1e5_over_r(tmp_path):
    """PEFT scales by α/(ranknum + 1e-5), subpeft by α/r: the adapter terms differ by the factor
    r/(r + 1e-5) exactly, visible only when the adapter's output term is large."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = MLP().eval()
    pristine = copy.deepcopy(base)
    tuned = sp.attach(base, sp.AdaLoRA(r=4, target_r=2, alpha=8.0, total_steps=10, targets=["fc2"]))
    _trained_like(tuned, seed=2, scale=50.0)
    tuned.eval()
    x = torch.randn(16, 6)
    ours = tuned.model.fc2(tuned.model.act(tuned.model.fc1(x)))  # the adapted layer's output, before the head
    with tuned.disable_adapter():
        plain = tuned.model.fc2(tuned.model.act(tuned.model.fc1(x)))
    tuned.save_pretrained(tmp_path)
    theirs_model = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path).eval().base_model.model
    theirs = theirs_model.fc2(theirs_model.act(theirs_model.fc1(x)))
    d_ours, d_theirs = (ours - plain).double(), (theirs - plain).double()
    assert (d_ours - d_theirs).abs().max() > 1e-4  # the two scales differ visibly at this magnitude
    torch.testing.assert_close(d_theirs, d_ours * (4 / (4 + 1e-5)), atol=2e-5, rtol=2e-6)


@pytest.mark.parametrize("allocate", [False, True], ids=["fresh", "rank_pattern"])
def test_peft_adalora_loads_in_subpeft(allocate, tmp_path):
    """A PEFT AdaLoRA file loads with identical outputs, also after PEFT's allocator ran: its saved
    rank_pattern truncates layers (to 0 triplets here for some), and the ranks follow it."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    pristine = TinyAttention().eval()
    lcfg = peft.AdaLoraConfig(init_r=4, target_r=1, lora_alpha=8, lora_dropout=0.1, total_step=8, tinit=1, tfinal=2,
                              target_modules=ATTN)
    theirs = peft.get_peft_model(copy.deepcopy(pristine), lcfg)
    x, target = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    if allocate:
        opt = torch.optim.Adam([p for p in theirs.parameters() if p.requires_grad], lr=2e-2)
        for step in range(1, 8):
            (theirs(x) - target).pow(2).mean().backward()
            opt.step()
            theirs.base_model.update_and_allocate(step)
            opt.zero_grad()
    else:
        with torch.no_grad():
            for n, p in theirs.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape) * 0.2)
    theirs.eval()
    expected = theirs(x)
    theirs.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = sp.load(copy.deepcopy(pristine), tmp_path)
    torch.testing.assert_close(ours(x), expected, atol=1e-6, rtol=0)
    cfg = ours.configs["default"]
    assert (cfg.r, cfg.target_r, cfg.total_steps, cfg.dropout) == (4, 1, 8, 0.1)
    ranks = [a.lora_E.shape[0] for a in layers(ours)]
    if allocate:
        assert cfg.rank_pattern is not None and sum(ranks) < 4 * len(ATTN) and 0 in ranks
        trainable, _ = ours.get_nb_trainable_parameters()
        assert trainable == 0  # loaded frozen
        again = sp.load(copy.deepcopy(pristine), tmp_path, trainable=True)
        layer_list = [(n, a.base_layer, a.layer_type) for n, a in again.adapters_of("default")]
        assert again.get_nb_trainable_parameters()[0] == type(layers(again)[0]).model_num_params(cfg, layer_list)
        # and back to PEFT: same truncated file, same outputs
        ours.save_pretrained(tmp_path / "back")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "back").eval()
        torch.testing.assert_close(back(x), expected, atol=1e-6, rtol=0)
    else:
        assert cfg.rank_pattern is None and ranks == [4] * len(ATTN)
