"""The generic test matrix: every registered weight-space method × every tiny model it supports.

A method registered later is tested here without new test code. Each test asserts a property of
the theory (two views of one φ agree, the base stays frozen, files hold exactly one adapter, ...).
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import subpeft as sp
from subpeft.core.layer import AdaptedLayer, TrainableCopy

from .tiny_models import CASES, DEVICE

ATOL = 1e-5

MATRIX = [
    pytest.param(info.name, case, id=f"{info.name}-{case.name}")
    for info in sp.list_methods()
    if info.kind == "weight"
    for case in CASES
    if case.layer_type in info.layer_types
]
MERGEABLE = [p for p in MATRIX if sp.get_method(p.values[0]).mergeable]


# options that let a method's whole schedule run within the few steps of these tests
# ranks the tiny models' layers can use (attach refuses a rank no targeted layer can use: min(d_in, d_out)
# for LoRA-type methods, d_in·d_out for VeRA)
TEST_OPTIONS = {
    "adalora": dict(r=4, target_r=2, total_steps=10, init_warmup=1, final_warmup=2, mask_interval=1),
    "lora_dash": dict(r=4, prelaunch_steps=2),
    **{name: dict(r=4) for name in ("lora", "dora", "flora", "trilora", "parallel_adapter")},
    "vera": dict(r=32),
    # BitFit trains biases: every module of the case that has one (conv3 and the RMSNorm have none)
    "bitfit": dict(targets="all"),
}


def make_config(method: str, case, **overrides):
    options = {"targets": list(case.targets), **TEST_OPTIONS.get(method, {}), **overrides}
    return sp.get_method(method).config_cls(**options)


def perturb(tuned: sp.TunedModel, name: str, seed: int, scale: float = 0.1) -> None:
    """Move every trainable tensor of adapter `name` away from its (often identity) init."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for _, adapter in tuned.adapters_of(name) for p in adapter.parameters()]
    if name in tuned.shared:  # state shared by all layers of the adapter (e.g. PiCa's per-role M)
        params += list(tuned.shared[name].parameters())
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) * scale)


def setup(method: str, case, seed: int = 0, **overrides):
    base = case.model(seed)
    pristine = copy.deepcopy(base)
    tuned = sp.attach(base, make_config(method, case, **overrides))
    return pristine, tuned, case.input()


def out(model, x):
    return model(x)


@pytest.mark.parametrize("method,case", MATRIX)
def test_model_and_adapter_on_the_test_device(method, case):
    """The matrix runs on SUBPEFT_TEST_DEVICE (tiny_models.DEVICE): attach keeps everything there."""
    _, tuned, x = setup(method, case)
    assert x.device == DEVICE
    tensors = {**dict(tuned.named_parameters()), **dict(tuned.named_buffers())}
    assert tensors and all(t.device == DEVICE for t in tensors.values()), {
        n: t.device for n, t in tensors.items() if t.device != DEVICE}
    assert out(tuned, x).device == DEVICE


@pytest.mark.parametrize("method,case", MATRIX)
def test_identity_at_attach(method, case):
    pristine, tuned, x = setup(method, case)
    torch.testing.assert_close(out(tuned, x), out(pristine, x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("method,case", MATRIX)
def test_training_changes_only_the_adapter(method, case):
    pristine, tuned, x = setup(method, case)
    before = {k: v.clone() for k, v in tuned.adapter_state_dict("default").items()}
    trainable = [(n, p) for n, p in tuned.named_parameters() if p.requires_grad]
    assert trainable, "an attached method must have trainable parameters"
    assert all(".adapters.default." in n or n.startswith("shared.default.") for n, _ in trainable), [
        n for n, _ in trainable
    ]
    opt = torch.optim.Adam([p for _, p in trainable], lr=1e-2)
    target = torch.randn_like(out(pristine, x).float())
    for step in range(3):
        loss = (out(tuned, x).float() - target).pow(2).mean() + tuned.regularization()
        opt.zero_grad()
        loss.backward()
        opt.step()
        tuned.step(step + 1)
    # base weights bit-identical, still frozen
    base_now = _base_state(tuned)
    assert base_now.keys() == pristine.state_dict().keys()
    for name, p0 in pristine.state_dict().items():
        assert torch.equal(p0, base_now[name]), f"base tensor {name} changed"
    assert not any(p.requires_grad for n, p in tuned.named_parameters() if ".adapters." not in n and not n.startswith("shared."))
    after = tuned.adapter_state_dict("default")
    assert any(not torch.equal(before[k], after[k]) for k in before), "no adapter tensor moved"


def _base_state(tuned):
    """The base model's own tensors, read through subpeft's wrappers, in the base's key order."""
    state = {}
    for k, v in tuned.model.state_dict().items():
        if ".adapters." in k or ".copies." in k or k.startswith("shared."):
            continue
        state[k.replace("base_layer.", "").replace("original.", "")] = v
    return state


@pytest.mark.parametrize("method,case", MERGEABLE)
def test_merge_unmerge_and_unload_agree_with_forward(method, case):
    pristine, tuned, x = setup(method, case)
    perturb(tuned, "default", seed=3)
    tuned.eval()  # merge is about inference: stochastic training-time forwards (gates, dropout) are off
    y = out(tuned, x)
    assert not torch.allclose(y, out(pristine, x), atol=1e-4), "perturbed adapter should change the output"
    tuned.merge()
    assert tuned.merged_adapters == ["default"]
    torch.testing.assert_close(out(tuned, x), y, atol=ATOL, rtol=0)
    tuned.unmerge()
    assert tuned.merged_adapters == []
    torch.testing.assert_close(out(tuned, x), y, atol=ATOL, rtol=0)
    plain = tuned.merge_and_unload()
    assert not any(isinstance(m, (AdaptedLayer, TrainableCopy)) for m in plain.modules())
    assert [type(m) for m in plain.modules()] == [type(m) for m in pristine.modules()]
    torch.testing.assert_close(out(plain, x), y, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method,case", MATRIX)
def test_disable_adapter_gives_base_output(method, case):
    pristine, tuned, x = setup(method, case)
    perturb(tuned, "default", seed=4)
    tuned.eval()
    y = out(tuned, x)
    with tuned.disable_adapter():
        torch.testing.assert_close(out(tuned, x), out(pristine, x), atol=ATOL, rtol=0)
    torch.testing.assert_close(out(tuned, x), y, atol=0, rtol=0)
    if sp.get_method(method).mergeable:
        tuned.merge()
        with tuned.disable_adapter():
            torch.testing.assert_close(out(tuned, x), out(pristine, x), atol=ATOL, rtol=0)
        assert tuned.merged_adapters == ["default"]
        torch.testing.assert_close(out(tuned, x), y, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method,case", MATRIX)
def test_save_load_roundtrip(method, case, tmp_path):
    pristine, tuned, x = setup(method, case)
    perturb(tuned, "default", seed=5)
    tuned.eval()
    y = out(tuned, x)
    tuned.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = sp.load(copy.deepcopy(pristine), tmp_path)
    assert torch.equal(out(loaded, x), y)
    a, b = tuned.adapter_state_dict("default"), loaded.adapter_state_dict("default")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(p.requires_grad for p in loaded.parameters()), "trainable=False loads a frozen adapter"
    again = sp.load(copy.deepcopy(pristine), tmp_path, trainable=True)
    assert any(p.requires_grad for p in again.parameters())


@pytest.mark.parametrize("method,case", MATRIX)
def test_adapter_file_holds_only_the_adapter(method, case, tmp_path):
    from safetensors.torch import load_file

    _, tuned, _ = setup(method, case)
    tuned.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved.keys() == tuned.adapter_state_dict("default").keys()
    assert all(key.startswith(("base_model.model.", "base_model.shared.")) for key in saved)
    assert sum(v.numel() for v in saved.values()) >= tuned.get_nb_trainable_parameters()[0]
    base_keys = {f"base_model.model.{k}" for k in _base_state(tuned)}
    assert not base_keys & set(saved), "base weights must never be written into the adapter file"


@pytest.mark.parametrize("method,case", MATRIX)
def test_two_adapters_do_not_leak(method, case, tmp_path):
    pristine, tuned, x = setup(method, case)
    tuned.add_adapter("other", make_config(method, case))
    perturb(tuned, "default", seed=6)
    perturb(tuned, "other", seed=7)
    tuned.eval()
    y_default = out(tuned, x)
    tuned.set_adapter("other")
    y_other = out(tuned, x)
    assert not torch.allclose(y_default, y_other)
    # only the active adapter trains
    assert all(".adapters.other." in n or n.startswith("shared.other.") for n, p in tuned.named_parameters() if p.requires_grad)
    tuned.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    for sub, expected in ((tmp_path, y_default), (tmp_path / "other", y_other)):
        loaded = sp.load(copy.deepcopy(pristine), sub)
        assert torch.equal(out(loaded, x), expected)
    sd_default = tuned.adapter_state_dict("default")
    sd_other = tuned.adapter_state_dict("other")
    assert sd_default.keys() == sd_other.keys()
    assert any(not torch.equal(sd_default[k], sd_other[k]) for k in sd_default)


@pytest.mark.parametrize("method,case", MATRIX)
def test_delete_adapter_leaves_no_trace(method, case):
    pristine, tuned, x = setup(method, case)
    keys_one = set(tuned.state_dict())
    tuned.add_adapter("extra", make_config(method, case))
    perturb(tuned, "extra", seed=8)
    tuned.delete_adapter("extra")
    assert set(tuned.state_dict()) == keys_one
    assert "extra" not in tuned.configs
    assert not any("extra" in n for n, _ in tuned.named_modules())
    tuned.delete_adapter("default")
    assert [type(m) for m in tuned.model.modules()] == [type(m) for m in pristine.modules()]
    assert tuned.model.state_dict().keys() == pristine.state_dict().keys()
    assert torch.equal(out(tuned, x), out(pristine, x))


@pytest.mark.parametrize("method,case", MERGEABLE)
def test_safe_merge_refuses_nan_and_inf(method, case):
    for bad in (float("nan"), float("inf")):
        _, tuned, x = setup(method, case)
        perturb(tuned, "default", seed=9)
        first = next(p for p in tuned._adapter_parameters("default"))
        with torch.no_grad():
            first.view(-1)[0] = bad
        base_before = {k: v.clone() for k, v in _base_state(tuned).items()}
        with pytest.raises(sp.UnsafeMergeError):
            tuned.merge(safe=True)
        assert tuned.merged_adapters == []
        for k, v in _base_state(tuned).items():
            assert torch.equal(v, base_before[k]), f"{k} changed by a refused merge"


@pytest.mark.parametrize("method,case", MATRIX)
def test_trainable_parameter_count_matches_formula(method, case):
    _, tuned, _ = setup(method, case)
    info = sp.get_method(method)
    config = tuned.configs["default"]
    layers = [(n, layer.base_layer, layer.layer_type) for n, layer in tuned.adapted_layers() if "default" in layer.adapters]
    expected = info.adapter_cls.model_num_params(config, layers)
    trainable, _ = tuned.get_nb_trainable_parameters()
    assert trainable == expected > 0


@pytest.mark.parametrize("method", sorted({p.values[0] for p in MATRIX}))
def test_config_json_roundtrip_and_unknown_keys(method):
    info = sp.get_method(method)
    config = info.config_cls(targets=["a", "b.c"], exclude="x.*", modules_to_save=["head"])
    data = json.loads(config.to_json())
    assert data["method"] == method and "subpeft_version" in data
    assert sp.config_from_dict(data) == config
    data["option_from_the_future"] = 1
    with pytest.warns(UserWarning, match="option_from_the_future"):
        assert sp.config_from_dict(data) == config
    peft = config.to_peft_dict()
    if peft is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            back = sp.config_from_dict(json.loads(json.dumps(peft)))
        # the same method and the same PEFT form (IA3 reads PEFT dicts with PEFT's bias semantics)
        assert type(back) is type(config) and back.to_peft_dict() == peft


RESUME = [
    pytest.param(info.name, next(c for c in CASES if c.layer_type in info.layer_types), id=info.name)
    for info in sp.list_methods()
    if info.kind == "weight"
]


def _train(tuned, opt, x, target, steps):
    for step in steps:
        torch.manual_seed(1000 + step)  # stochastic forwards (dropout, gates) replay identically
        loss = (out(tuned, x).float() - target).pow(2).mean() + tuned.regularization()
        loss.backward()
        opt.step()
        tuned.step(step)
        opt.zero_grad()


@pytest.mark.parametrize("save_at", [1, 4])
@pytest.mark.parametrize("method,case", RESUME)
def test_resumed_training_continues_exactly(method, case, save_at, tmp_path):
    """Save mid-training (adapter + optimizer state), load into a fresh model, continue: every
    tensor equals the uninterrupted run's (schedules, phases, masks, EMAs are all restored)."""
    pristine, tuned, x = setup(method, case, dropout=0.1) if "dropout" in _fields(method) else setup(method, case)
    target = torch.randn_like(out(pristine, x).float())

    def params(model):
        return [p for p in model.parameters() if p.requires_grad]

    opt = torch.optim.Adam(params(tuned), lr=1e-2)
    _train(tuned, opt, x, target, range(1, save_at + 1))
    tuned.save_pretrained(tmp_path)
    opt_state = copy.deepcopy(opt.state_dict())
    _train(tuned, opt, x, target, range(save_at + 1, 7))

    resumed = sp.load(copy.deepcopy(pristine), tmp_path, trainable=True)
    resumed.train()
    opt2 = torch.optim.Adam(params(resumed), lr=1e-2)
    opt2.load_state_dict(opt_state)
    _train(resumed, opt2, x, target, range(save_at + 1, 7))

    a, b = tuned.adapter_state_dict("default"), resumed.adapter_state_dict("default")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resuming at step {save_at}"
    tuned.eval()
    resumed.eval()
    assert torch.equal(out(tuned, x), out(resumed, x))


def _fields(method):
    import dataclasses

    return {f.name for f in dataclasses.fields(sp.get_method(method).config_cls)}
