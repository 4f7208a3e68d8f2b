"""DoRA: the definition (values and gradients, norm detached), its fast paths, merging, and PEFT files."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import subpeft as sp
from subpeft.core.layers import weight_2d
from subpeft.methods.combination.dora import _DoRALinear

from .test_core import tiny_bert
from .tiny_models import MLP, ConvNet, EmbeddingModel, GPT2Style


def _perturb(tuned, name="default", seed=0, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, adapter in tuned.adapters_of(name):
            for p in adapter.parameters():
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


def _reference(adapter, x, xd=None):
    """The definition on a Linear / Conv1D layer: y = m ⊙ (W·x + s·B·A·xd) / ‖W + s·B·A‖_row + b, with the
    norm detached, written with autograd on the materialised weight."""
    W = weight_2d(adapter.base_layer, adapter.layer_type)
    A, B, m = adapter.lora_A, adapter.lora_B, adapter.lora_magnitude_vector
    V = W + adapter.scaling * B @ A
    g = m / V.norm(dim=1).detach()
    xd = x if xd is None else xd
    z = x @ W.t() + adapter.scaling * (xd @ A.t()) @ B.t()
    return g * z + adapter.base_layer.bias


def _single(build, target, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    tuned = sp.attach(build(), sp.DoRA(r=3, alpha=6.0, dropout=dropout, targets=[target]))
    _perturb(tuned, seed=seed)
    return tuned, tuned.adapters_of("default")[0][1], tuned.model.get_submodule(target)


# -- the definition --------------------------------------------------------------------------
def test_magnitude_starts_at_row_norms_of_w_output_side():
    for build, target, rows in ((MLP, "fc1", lambda w: w), (GPT2Style, "c_attn", lambda w: w.t())):
        tuned = sp.attach(build(), sp.DoRA(r=2, targets=[target]))
        adapter = tuned.adapters_of("default")[0][1]
        W = rows(adapter.base_layer.weight)  # (d_out, d_in): Conv1D stores it transposed
        torch.testing.assert_close(adapter.lora_magnitude_vector, W.norm(dim=1), atol=0, rtol=1e-6)
        assert adapter.lora_magnitude_vector.shape == (W.shape[0],)


def test_norm_from_factors_equals_norm_of_the_materialised_weight():
    tuned, adapter, _ = _single(GPT2Style, "c_attn")
    with torch.no_grad():
        adapter.lora_B.mul_(50)  # ΔW comparable to W: the expansion must still be exact to round-off
        W = weight_2d(adapter.base_layer, "conv1d")
        exact = (W.double() + adapter.scaling * adapter.lora_B.double() @ adapter.lora_A.double()).norm(dim=1)
    n = adapter.weight_norm()
    assert not n.requires_grad
    torch.testing.assert_close(n.double(), exact, atol=0, rtol=2e-6)


@pytest.mark.parametrize("hooked", [False, True], ids=["fused", "generic"])
@pytest.mark.parametrize("build,target", [(MLP, "fc1"), (GPT2Style, "c_attn")], ids=["linear", "conv1d"])
def test_values_and_gradients_follow_the_definition(build, target, hooked):
    tuned, adapter, layer = _single(build, target)
    if hooked:  # any hook on the base layer sends the forward down the generic path
        layer.base_layer.register_forward_hook(lambda mod, inp, out: None)
    x = torch.randn(2, 5, layer.base_layer.weight.shape[1 if target == "fc1" else 0], requires_grad=True)
    y = layer(x)
    assert (type(y.grad_fn).__name__ == "_DoRALinearBackward") != hooked
    params = [adapter.lora_A, adapter.lora_B, adapter.lora_magnitude_vector]
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *params], gy)
    y_ref = _reference(adapter, x)
    grads_ref = torch.autograd.grad(y_ref, [x, *params], gy)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_norm_is_detached():
    """Gradients of A and B equal the definition's with the norm held constant, not the undetached ones."""
    tuned, adapter, layer = _single(MLP, "fc1")
    x = torch.randn(7, 6)
    gA = torch.autograd.grad(layer(x).square().sum(), adapter.lora_A)[0]
    W = adapter.base_layer.weight
    V = W + adapter.scaling * adapter.lora_B @ adapter.lora_A
    undetached = (adapter.lora_magnitude_vector / V.norm(dim=1)).unsqueeze(1) * V
    g_und = torch.autograd.grad(F.linear(x, undetached, adapter.base_layer.bias).square().sum(), adapter.lora_A)[0]
    assert not torch.allclose(gA, g_und, atol=1e-4)


@pytest.mark.parametrize("hooked", [False, True], ids=["fused", "generic"])
def test_dropout_drops_the_low_rank_input_only(hooked):
    """y = g ⊙ (W·x + s·B·A·drop(x)) + b: the base term sees the undropped x (no second base forward)."""
    tuned, adapter, layer = _single(MLP, "fc1", dropout=0.5)
    if hooked:
        layer.base_layer.register_forward_hook(lambda mod, inp, out: None)
    tuned.train()
    x = torch.randn(9, 6, requires_grad=True)
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    xd = adapter.dropout(x)  # the adapter's own dropout, replayed from the same RNG state
    assert (xd == 0).any()
    y_ref = _reference(adapter, x, xd)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    params = [x, adapter.lora_A, adapter.lora_B, adapter.lora_magnitude_vector]
    gy = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, params, gy), torch.autograd.grad(y_ref, params, gy), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    tuned.eval()  # no dropout at inference: the same layer equals the definition with xd = x
    torch.testing.assert_close(layer(x), _reference(adapter, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens", [3, 2], ids=["rows>=d_in", "rows<d_in"])  # g folded into W, B or into ∂L/∂z
@pytest.mark.parametrize("same", [True, False], ids=["x", "dropped-x"])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_node_gradcheck(same, bias, tokens):
    gen = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)

    x, Wt, A, B, g = t(2, tokens, 5), t(5, 4), t(2, 5), t(4, 2), t(4)
    xd = x if same else t(2, tokens, 5)
    b = t(4) if bias else None

    def f(x, xd, Wt, b, A, B, g):
        return _DoRALinear.apply(x, None if same else xd, Wt, b, A, B, g, 1.7)

    args = (x, xd, Wt, b, A, B, g)
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


def test_inference_path_is_bitwise_the_training_path():
    tuned, adapter, layer = _single(MLP, "fc1")
    x = torch.randn(4, 6)
    y_grad = layer(x)
    assert y_grad.requires_grad
    with torch.no_grad():
        y_inf = layer(x)
    assert torch.equal(y_grad, y_inf)


# -- merging -----------------------------------------------------------------------------------
def test_merge_and_unmerge_restore_the_base_weight_exactly_enough():
    tuned, adapter, layer = _single(GPT2Style, "c_attn")
    W0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(3, 6)
    y = layer(x).detach()
    tuned.merge()
    merged = layer.base_layer.weight.detach().clone()
    rows = weight_2d(layer.base_layer, "conv1d")
    torch.testing.assert_close(rows.norm(dim=1), adapter.lora_magnitude_vector.detach().abs(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=0)
    tuned.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, W0, atol=1e-6, rtol=0)
    assert not torch.equal(merged, W0)


def test_norm_follows_base_weight_changes_from_other_merges():
    """After another adapter is merged into W, DoRA normalises that new W (nothing stale is kept)."""
    torch.manual_seed(0)
    tuned = sp.attach(MLP(), sp.LoRA(r=2, targets=["fc1"]), name="a")
    tuned.add_adapter("b", sp.DoRA(r=2, alpha=4, targets=["fc1"]))
    _perturb(tuned, "a", seed=1)
    _perturb(tuned, "b", seed=2)
    layer = tuned.model.fc1
    x = torch.randn(5, 6)
    tuned.set_adapter("b")
    before = layer(x).detach()
    tuned.set_adapter("a")
    tuned.merge()
    tuned.set_adapter("b")
    dora = layer.adapters["b"]
    after = layer(x)
    torch.testing.assert_close(after, _reference(dora, x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(after, before, atol=1e-3)


def test_two_dora_adapters_merge_in_turn_and_unmerge_to_w():
    torch.manual_seed(0)
    tuned = sp.attach(MLP(), sp.DoRA(r=2, targets=["fc1", "fc2"]), name="a")
    tuned.add_adapter("b", sp.DoRA(r=3, targets=["fc1", "fc2"]))
    _perturb(tuned, "a", seed=1)
    _perturb(tuned, "b", seed=2)
    W0 = {n: m.weight.detach().clone() for n, m in (("fc1", tuned.model.fc1), ("fc2", tuned.model.fc2))}
    tuned.set_adapter(["a", "b"])
    tuned.merge()
    tuned.unmerge()
    for n, w in W0.items():
        torch.testing.assert_close(tuned.model.get_submodule(n).weight, w, atol=1e-5, rtol=0)


# -- configuration -----------------------------------------------------------------------------
def test_config_reads_only_use_dora_peft_dicts():
    dora = sp.DoRA(r=4, alpha=8, dropout=0.1, rslora=True, targets=["q"])
    data = json.loads(json.dumps(dora.to_peft_dict({"linear"})))
    assert data["use_dora"] is True and data["peft_type"] == "LORA"
    assert sp.config_from_dict(data) == dora
    lora = sp.LoRA(r=4, alpha=8, targets=["q"])
    assert isinstance(sp.config_from_dict(lora.to_peft_dict({"linear"})), sp.LoRA)
    with pytest.raises(sp.ConfigError, match="mpc"):
        sp.DoRA(mpc="n")
    assert sp.DoRA(mpc="o").to_peft_dict() is None  # PEFT has no MPC: native format


def test_parameter_count():
    tuned = sp.attach(MLP(), sp.DoRA(r=3, targets=["fc1", "fc2"]))
    assert tuned.get_nb_trainable_parameters()[0] == 3 * (6 + 10) + 10 + 3 * (10 + 7) + 7


# -- Hugging Face PEFT files, both ways ----------------------------------------------------------
peft = pytest.importorskip("peft", reason="peft is a test dependency (pip install -e '.[test]')")

CASES = [
    ("linear", MLP, ["fc1", "fc2"], lambda: torch.randn(4, 6), {}),
    ("linear-rslora", MLP, ["fc1", "fc2"], lambda: torch.randn(4, 6), {"rslora": True, "r": 4}),
    ("conv1d", GPT2Style, ["c_attn", "c_proj"], lambda: torch.randn(3, 4, 6), {}),
    ("embedding", EmbeddingModel, ["emb", "proj"], lambda: torch.tensor([[1, 2, 0, 19], [5, 0, 7, 7]]), {}),
    ("conv2d", ConvNet, ["conv1", "conv2"], lambda: torch.randn(2, 3, 8, 9), {}),
]
IDS = [c[0] for c in CASES]


def _randomise(params, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)


@pytest.mark.parametrize("name,build,targets,make_input,extra", CASES, ids=IDS)
def test_subpeft_dora_loads_in_peft(name, build, targets, make_input, extra, tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    base = build().eval()
    pristine = copy.deepcopy(base)
    config = {"r": 3, "alpha": 6.0, "dropout": 0.1, **extra}
    tuned = sp.attach(base, sp.DoRA(targets=targets, **config))
    _randomise([p for _, a in tuned.adapters_of("default") for p in a.parameters()], seed=1)
    tuned.eval()
    x = make_input()
    expected = tuned(x)
    tuned.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert f"base_model.model.{targets[0]}.lora_magnitude_vector" in keys
    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path).eval()
    assert theirs.peft_config["default"].use_dora
    torch.testing.assert_close(theirs(x), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name,build,targets,make_input,extra", CASES, ids=IDS)
def test_peft_dora_loads_in_subpeft(name, build, targets, make_input, extra, tmp_path):
    torch.manual_seed(0)
    base = build().eval()
    pristine = copy.deepcopy(base)
    r = extra.get("r", 3)
    lcfg = peft.LoraConfig(r=r, lora_alpha=6, lora_dropout=0.1, target_modules=targets, use_dora=True,
                           use_rslora=extra.get("rslora", False))
    theirs = peft.get_peft_model(base, lcfg)
    _randomise([p for n, p in theirs.named_parameters() if "lora_" in n], seed=2)
    theirs.eval()
    x = make_input()
    expected = theirs(x)
    theirs.save_pretrained(tmp_path)
    ours = sp.load(pristine, tmp_path)
    cfg = ours.configs["default"]
    assert isinstance(cfg, sp.DoRA) and (cfg.r, cfg.alpha, cfg.dropout) == (r, 6, 0.1)
    torch.testing.assert_close(ours(x), expected, atol=1e-6, rtol=1e-5)


def test_training_step_matches_peft_without_dropout():
    """Same init, same batch, one AdamW step each: the same adapter tensors (DoRA's gradients agree)."""
    base = tiny_bert()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                                                                      use_dora=True))
    ours = sp.attach(copy.deepcopy(base), sp.DoRA(r=2, alpha=4, targets=["query", "value"]))
    _randomise([p for _, a in ours.adapters_of("default") for p in a.parameters()], seed=4)
    inner = theirs.base_model.model
    with torch.no_grad():
        for name, a in ours.adapters_of("default"):
            layer = inner.get_submodule(name)
            layer.lora_A["default"].weight.copy_(a.lora_A)
            layer.lora_B["default"].weight.copy_(a.lora_B)
            layer.lora_magnitude_vector["default"].weight.copy_(a.lora_magnitude_vector)
    ids = torch.randint(1, 50, (2, 7))
    labels = torch.tensor([0, 2])
    for model in (ours, theirs):
        model.eval()  # BERT's own dropout off; the adapters have none
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        F.cross_entropy(model(input_ids=ids).logits, labels).backward()
        opt.step()
    for name, a in ours.adapters_of("default"):
        layer = inner.get_submodule(name)
        torch.testing.assert_close(a.lora_A, layer.lora_A["default"].weight, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(a.lora_B, layer.lora_B["default"].weight, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(a.lora_magnitude_vector, layer.lora_magnitude_vector["default"].weight,
                                   atol=1e-6, rtol=1e-5)


def test_dilated_conv_is_written_in_subpeft_format(tmp_path):
    """PEFT's Conv2d LoRA/DoRA ignores the base kernel's dilation, so such an adapter is not a PEFT file."""
    tuned = sp.attach(ConvNet(), sp.DoRA(r=2, targets=["conv3"]))
    tuned.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["method"] == "dora"


def test_quantised_base_weight_is_refused_clearly():
    model = MLP()
    model.fc1.weight = nn.Parameter(torch.zeros(10, 6, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(sp.UnsupportedLayerError, match="floating point"):
        sp.attach(model, sp.DoRA(r=2, targets=["fc1"]))
