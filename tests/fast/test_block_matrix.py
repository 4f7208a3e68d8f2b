"""The generic matrix for module- and prompt-kind methods, on tiny random BERT and Llama models.

Every registered method of kind "module" or "prompt" is picked up automatically and checked for
the life-cycle properties that apply to methods which act on blocks, attention or inputs rather
than on one weight: identity at attach (where the method starts as identity), only adapter tensors
train, save → load gives identical outputs, several adapters do not leak into each other, delete and
unload leave no trace, disable gives the base output, merge raises a clear error, and the config
round-trips through JSON.
"""

from __future__ import annotations

import copy

import pytest
import torch

import subpeft as sp
from subpeft.core.errors import SubpeftError

from .tiny_transformers import batch, tiny_bert, tiny_llama

# small sizes so that every case runs in well under a second
TEST_OPTIONS: dict[str, dict] = {
    "houlsby": {"size": 4},
    "pfeiffer": {"size": 4},
    "adamix": {"size": 4, "experts": 3},
    "unipelt": {},
    "prompt_tuning": {"num_virtual_tokens": 3},
    "p_tuning": {"num_virtual_tokens": 3},
    "prefix_tuning": {"num_virtual_tokens": 3},
    "p_tuning_v2": {"num_virtual_tokens": 3},
}
# methods that do not compute the base model's function at attach (prompts are new inputs)
NOT_IDENTITY_KINDS = {"prompt"}
NOT_IDENTITY = {"unipelt"}

METHODS = [info for info in sp.list_methods() if info.kind in ("module", "prompt")]
MODELS = {"bert": tiny_bert, "llama": tiny_llama}
CASES = [pytest.param(info, arch, id=f"{info.name}-{arch}") for info in METHODS for arch in MODELS]


def _config(info, **extra):
    return info.config_cls(**{**TEST_OPTIONS.get(info.name, {}), **extra})


def _inputs(arch: str) -> dict[str, torch.Tensor]:
    x = batch(seed=1, padding_side="right" if arch == "bert" else "left")
    return x


def _labels(arch: str, x: dict[str, torch.Tensor]) -> torch.Tensor:
    if arch == "bert":
        return torch.tensor([0, 1, 2])
    return x["input_ids"].masked_fill(x["attention_mask"] == 0, -100)


def _out(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(**x).logits


def _attach(info, arch, seed: int = 0, **extra):
    torch.manual_seed(seed)
    return sp.attach(MODELS[arch](), _config(info, **extra))


def _perturb(tuned, name: str = "default", seed: int = 5) -> None:
    """Move every trainable tensor of the adapter off its initial value (e.g. zero up-projections)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned._adapter_parameters(name):
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_the_matrix_has_methods():
    if not METHODS:
        pytest.skip("no module- or prompt-kind method is registered yet")
    assert all(info.mergeable is False for info in METHODS), "module/prompt methods here are not mergeable"


@pytest.mark.parametrize("info,arch", CASES)
def test_identity_at_attach(info, arch):
    if info.kind in NOT_IDENTITY_KINDS or info.name in NOT_IDENTITY:
        pytest.skip(f"{info.name} does not start as the identity")
    x = _inputs(arch)
    base = _out(MODELS[arch](), x)
    tuned = _attach(info, arch)
    tuned.eval()
    torch.testing.assert_close(_out(tuned, x), base, rtol=0, atol=1e-6)


@pytest.mark.parametrize("info,arch", CASES)
def test_only_adapter_tensors_train(info, arch):
    tuned = _attach(info, arch)
    before = {n: p.detach().clone() for n, p in tuned.model.named_parameters()}
    trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert trainable, "the adapter has no trainable tensors"
    base_names = set(MODELS[arch]().state_dict())
    leaked = [n for n in trainable if n.removeprefix("model.") in base_names]
    assert not leaked, f"base parameters left trainable: {leaked[:3]}"
    tuned.train()
    opt = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    x = _inputs(arch)
    for step in range(3):
        out = tuned(**x, labels=_labels(arch, x))
        loss = out.loss + tuned.regularization()
        loss.backward()
        opt.step()
        tuned.step(step)
        opt.zero_grad()
    changed_adapter = 0
    for n, p in tuned.model.named_parameters():
        if n in before and not torch.equal(p, before[n]):
            assert p.requires_grad, f"frozen tensor {n} changed"
            changed_adapter += 1
    shared = [p for p in tuned.shared.parameters() if p.requires_grad]
    assert changed_adapter > 0 or shared, "no adapter tensor changed after 3 optimizer steps"


@pytest.mark.parametrize("info,arch", CASES)
def test_save_load_identical(info, arch, tmp_path):
    tuned = _attach(info, arch)
    _perturb(tuned)
    tuned.eval()
    x = _inputs(arch)
    expected = _out(tuned, x)
    tuned.save_pretrained(tmp_path)
    loaded = sp.load(MODELS[arch](), tmp_path)
    torch.testing.assert_close(_out(loaded, x), expected, rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in loaded.parameters()), "a loaded adapter is frozen by default"


@pytest.mark.parametrize("info,arch", CASES)
def test_disable_delete_unload_leave_the_base(info, arch):
    x = _inputs(arch)
    base_model = MODELS[arch]()
    base = _out(base_model, x)
    keys = set(base_model.state_dict())
    tuned = _attach(info, arch)
    _perturb(tuned)
    tuned.eval()
    assert not torch.allclose(_out(tuned, x), base, atol=1e-6), "perturbed adapter should change the output"
    with tuned.disable_adapter():
        torch.testing.assert_close(_out(tuned, x), base, rtol=0, atol=0)
    tuned.add_adapter("other", _config(info))
    tuned.delete_adapter("default")
    tuned.delete_adapter("other")
    torch.testing.assert_close(_out(tuned, x), base, rtol=0, atol=0)
    assert set(tuned.model.state_dict()) == keys
    tuned2 = _attach(info, arch)
    _perturb(tuned2)
    plain = tuned2.unload()
    assert set(plain.state_dict()) == keys
    torch.testing.assert_close(_out(plain, x), base, rtol=0, atol=0)


@pytest.mark.parametrize("info,arch", CASES)
def test_adapters_do_not_leak(info, arch):
    x = _inputs(arch)
    tuned = _attach(info, arch)
    _perturb(tuned, seed=5)
    tuned.eval()
    first = _out(tuned, x)
    torch.manual_seed(3)
    tuned.add_adapter("b", _config(info))
    _perturb(tuned, "b", seed=9)
    torch.testing.assert_close(_out(tuned, x), first, rtol=0, atol=0)  # "b" inactive
    tuned.set_adapter("b")
    second = _out(tuned, x)
    assert not torch.allclose(second, first, atol=1e-6)
    tuned.set_adapter("default")
    torch.testing.assert_close(_out(tuned, x), first, rtol=0, atol=0)
    trainable = {id(p) for p in tuned.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in tuned._adapter_parameters("default")}


@pytest.mark.parametrize("info,arch", CASES)
def test_merge_raises_clearly(info, arch):
    tuned = _attach(info, arch)
    x = _inputs(arch)
    tuned.eval()
    before = _out(tuned, x)
    with pytest.raises(SubpeftError, match="cannot be merged"):
        tuned.merge()
    with pytest.raises(SubpeftError, match="cannot be merged"):
        tuned.merge_and_unload()
    torch.testing.assert_close(_out(tuned, x), before, rtol=0, atol=0)


@pytest.mark.parametrize("info", [pytest.param(i, id=i.name) for i in METHODS])
def test_config_json_round_trip(info):
    config = _config(info)
    data = copy.deepcopy(config.to_dict())
    again = sp.config_from_dict(data)
    assert again == config
    with pytest.warns(UserWarning):
        sp.config_from_dict({**data, "some_future_option": 1})
