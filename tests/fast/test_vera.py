"""VeRA: shared frozen projections regenerated from the seed (equal to PEFT's), the definition, PEFT files."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import subpeft as sp
from subpeft.core.layers import weight_2d

from .test_peft_interop import assert_head_roundtrip_with_peft
from .tiny_models import MLP, GPT2Style

pytestmark = pytest.mark.filterwarnings("ignore:Specified to not (save|load) vera_A:UserWarning")


def _perturb(tuned, seed=0, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, adapter in tuned.adapters_of("default"):
            for p in adapter.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def test_shared_projections_come_from_the_seed_sized_to_the_largest_layer():
    tuned = sp.attach(MLP(), sp.VeRA(r=5, seed=7, targets=["fc1", "fc2"]))  # fc1 (10, 6), fc2 (7, 10)
    shared = tuned.shared["default"]
    assert shared.vera_A.shape == (5, 10) and shared.vera_B.shape == (10, 5)
    gen = torch.Generator().manual_seed(7)
    bound_a, bound_b = math.sqrt(6 / 10), math.sqrt(6 / 5)  # Kaiming-uniform, gain √2, fan_in = columns
    assert torch.equal(shared.vera_A, torch.empty(5, 10).uniform_(-bound_a, bound_a, generator=gen))
    assert torch.equal(shared.vera_B, torch.empty(10, 5).uniform_(-bound_b, bound_b, generator=gen))
    other = sp.attach(MLP(), sp.VeRA(r=5, seed=8, targets=["fc1", "fc2"])).shared["default"]
    assert not torch.equal(other.vera_A, shared.vera_A)
    for _, adapter in tuned.adapters_of("default"):
        assert not list(adapter.buffers())  # layers hold no copy of the projections
        assert sorted(p.numel() for p in adapter.parameters()) == sorted([5, adapter.d_out])


def test_forward_is_the_definition_with_sliced_projections():
    tuned = sp.attach(MLP(), sp.VeRA(r=5, targets=["fc1", "fc2"]))
    _perturb(tuned)
    A, B = tuned.shared["default"].vera_A, tuned.shared["default"].vera_B
    for name in ("fc1", "fc2"):
        layer = tuned.model.get_submodule(name)
        adapter = layer.adapters["default"]
        d_out, d_in = layer.base_layer.weight.shape
        delta = torch.diag(adapter.vera_lambda_b) @ B[:d_out] @ torch.diag(adapter.vera_lambda_d) @ A[:, :d_in]
        x = torch.randn(3, d_in)
        expected = F.linear(x, layer.base_layer.weight + delta, layer.base_layer.bias)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_identity_at_attach_and_init_values():
    tuned = sp.attach(GPT2Style(), sp.VeRA(r=4, d_init=0.25, targets=["c_attn"]))
    adapter = tuned.adapters_of("default")[0][1]
    assert torch.equal(adapter.vera_lambda_b, torch.zeros(9))
    assert torch.equal(adapter.vera_lambda_d, torch.full((4,), 0.25))


def test_dropout_acts_on_the_projection_input_only():
    tuned = sp.attach(MLP(), sp.VeRA(r=5, dropout=0.5, targets=["fc1"]))
    _perturb(tuned)
    tuned.train()
    layer = tuned.model.fc1
    adapter = layer.adapters["default"]
    x = torch.randn(8, 6)
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    xd = F.dropout(x, 0.5, training=True)
    A, B = adapter._projections()
    expected = layer.base_layer(x) + adapter.vera_lambda_b * F.linear(adapter.vera_lambda_d * F.linear(xd, A), B)
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=1e-6)


def test_file_holds_no_projection_and_reload_regenerates_it(tmp_path):
    from safetensors.torch import load_file

    base = GPT2Style()
    pristine = copy.deepcopy(base)
    tuned = sp.attach(base, sp.VeRA(r=16, seed=3, targets=["c_attn", "c_proj"]))
    _perturb(tuned)
    tuned.eval()
    x = torch.randn(2, 3, 6)
    tuned.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(saved) == [f"base_model.model.{n}.vera_lambda_{v}" for n in ("c_attn", "c_proj") for v in "bd"]
    assert all(t.dim() == 1 for t in saved.values())  # no r×d matrix anywhere
    assert json.loads((tmp_path / "adapter_config.json").read_text())["save_projection"] is False
    loaded = sp.load(pristine, tmp_path)
    assert torch.equal(loaded(x), tuned(x))


def test_merge_folds_the_conv1d_delta_in_native_layout():
    tuned = sp.attach(GPT2Style(), sp.VeRA(r=4, targets=["c_attn"]))
    _perturb(tuned)
    layer = tuned.model.c_attn
    adapter = layer.adapters["default"]
    W0 = weight_2d(layer.base_layer, "conv1d").detach().clone()
    tuned.merge()
    torch.testing.assert_close(weight_2d(layer.base_layer, "conv1d"), W0 + adapter.delta_2d(), atol=1e-6, rtol=0)


def test_config_validation_and_peft_dict():
    with pytest.raises(sp.ConfigError, match="seed"):
        sp.VeRA(seed=-1)
    with pytest.raises(sp.ConfigError, match="r"):
        sp.VeRA(r=0)
    cfg = sp.VeRA(r=8, d_init=0.05, seed=4, dropout=0.1, targets=["q"])
    data = json.loads(json.dumps(cfg.to_peft_dict({"linear"})))
    assert (data["projection_prng_key"], data["save_projection"], data["d_initial"]) == (4, False, 0.05)
    assert sp.config_from_dict(data) == cfg
    assert sp.VeRA(targets=["q"], exclude=["x"]).to_peft_dict() is None


# -- Hugging Face PEFT, both ways ---------------------------------------------------------------
peft = pytest.importorskip("peft", reason="peft is a test dependency (pip install -e '.[test]')")

CASES = [
    ("linear-two-shapes", MLP, ["fc1", "fc2"], lambda: torch.randn(4, 6)),
    ("conv1d", GPT2Style, ["c_attn", "c_proj"], lambda: torch.randn(3, 4, 6)),
]


@pytest.mark.parametrize("name,build,targets,make_input", CASES, ids=[c[0] for c in CASES])
def test_same_seed_same_model_in_both_libraries(name, build, targets, make_input):
    torch.manual_seed(0)
    base = build().eval()
    ours = sp.attach(copy.deepcopy(base), sp.VeRA(r=6, seed=11, targets=targets))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(r=6, projection_prng_key=11, target_modules=targets,
                                                                      save_projection=False))
    assert torch.equal(ours.shared["default"].vera_A, theirs.base_model.vera_A["default"])
    assert torch.equal(ours.shared["default"].vera_B, theirs.base_model.vera_B["default"])
    _perturb(ours, seed=2)
    with torch.no_grad():
        for layer_name, adapter in ours.adapters_of("default"):
            layer = theirs.base_model.model.get_submodule(layer_name)
            layer.vera_lambda_b["default"].copy_(adapter.vera_lambda_b)
            layer.vera_lambda_d["default"].copy_(adapter.vera_lambda_d)
    x = make_input()
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name,build,targets,make_input", CASES, ids=[c[0] for c in CASES])
def test_subpeft_vera_loads_in_peft(name, build, targets, make_input, tmp_path):
    torch.manual_seed(0)
    base = build().eval()
    pristine = copy.deepcopy(base)
    tuned = sp.attach(base, sp.VeRA(r=6, seed=5, dropout=0.1, targets=targets))
    _perturb(tuned, seed=1)
    tuned.eval()
    x = make_input()
    expected = tuned(x)
    tuned.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path).eval()
    assert theirs.peft_config["default"].projection_prng_key == 5
    torch.testing.assert_close(theirs(x), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name,build,targets,make_input", CASES, ids=[c[0] for c in CASES])
def test_peft_vera_loads_in_subpeft(name, build, targets, make_input, tmp_path):
    torch.manual_seed(0)
    base = build().eval()
    pristine = copy.deepcopy(base)
    theirs = peft.get_peft_model(base, peft.VeraConfig(r=6, projection_prng_key=9, vera_dropout=0.1, d_initial=0.2,
                                                       target_modules=targets, save_projection=False))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "vera_lambda" in n:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    theirs.eval()
    x = make_input()
    expected = theirs(x)
    theirs.save_pretrained(tmp_path)
    ours = sp.load(pristine, tmp_path)
    cfg = ours.configs["default"]
    assert (cfg.r, cfg.seed, cfg.dropout, cfg.d_init) == (6, 9, 0.1, 0.2)
    torch.testing.assert_close(ours(x), expected, atol=1e-6, rtol=1e-5)


def test_peft_file_with_saved_projections_loads_with_them(tmp_path):
    """PEFT's default save_projection=True: the projections are in the file (base_model.vera_A/B); subpeft
    reads them from there, so even projections subpeft could not regenerate load exactly."""
    torch.manual_seed(0)
    base = MLP().eval()
    pristine = copy.deepcopy(base)
    theirs = peft.get_peft_model(base, peft.VeraConfig(r=4, target_modules=["fc1", "fc2"], projection_prng_key=3))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "vera_lambda" in n:
                p.add_(torch.randn(p.shape) * 0.3)
        theirs.base_model.vera_A["default"].mul_(1.5)  # not what the seed gives: must come from the file
    theirs.eval()
    x = torch.randn(4, 6)
    expected = theirs(x)
    theirs.save_pretrained(tmp_path)
    ours = sp.load(pristine, tmp_path)
    assert ours.configs["default"].save_projection
    torch.testing.assert_close(ours(x), expected, atol=1e-6, rtol=1e-5)


def test_subpeft_vera_with_saved_projections_loads_in_peft(tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    base = MLP().eval()
    pristine = copy.deepcopy(base)
    tuned = sp.attach(base, sp.VeRA(r=4, seed=2, save_projection=True, targets=["fc1", "fc2"]))
    _perturb(tuned, seed=1)
    tuned.eval()
    x = torch.randn(4, 6)
    tuned.save_pretrained(tmp_path)
    assert {"base_model.vera_A", "base_model.vera_B"} <= set(load_file(tmp_path / "adapter_model.safetensors"))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path).eval()
    torch.testing.assert_close(theirs(x), tuned(x), atol=1e-6, rtol=1e-5)
    again = sp.load(copy.deepcopy(pristine), tmp_path)
    assert torch.equal(again(x), tuned(x))


def test_classifier_head_roundtrip_with_modules_to_save(tmp_path):
    config = sp.VeRA(r=8, targets=["query", "value"], modules_to_save=["classifier"])
    assert_head_roundtrip_with_peft(config, tmp_path, lambda tuned: _perturb(tuned, seed=4))
