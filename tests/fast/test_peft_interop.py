"""LoRA adapters move between subpeft and Hugging Face PEFT, both ways, with identical outputs."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import subpeft as sp

from .test_core import tiny_bert
from .tiny_models import MLP, ConvNet, EmbeddingModel, GPT2Style

peft = pytest.importorskip("peft", reason="peft is a test dependency (pip install -e '.[test]')")

# (name, model factory, targets, input factory, extra config); ConvNet's dilated conv3 is left out
# because PEFT's LoRA ignores the base conv's dilation (its lora_A is built without it).
CASES = [
    ("linear", MLP, ["fc1", "fc2"], lambda: torch.randn(4, 6), {}),
    ("linear-rslora", MLP, ["fc1", "fc2"], lambda: torch.randn(4, 6), {"rslora": True, "r": 4}),
    ("conv1d", GPT2Style, ["c_attn", "c_proj"], lambda: torch.randn(3, 4, 6), {}),
    ("embedding", EmbeddingModel, ["emb", "proj"], lambda: torch.tensor([[1, 2, 0, 19], [5, 0, 7, 7]]), {}),
    ("conv2d", ConvNet, ["conv1", "conv2"], lambda: torch.randn(2, 3, 8, 9), {}),
]


def _randomise(params, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


@pytest.mark.parametrize("name,build,targets,make_input,extra", CASES, ids=[c[0] for c in CASES])
def test_subpeft_lora_loads_in_peft(name, build, targets, make_input, extra, tmp_path):
    torch.manual_seed(0)
    base = build().eval()
    pristine = copy.deepcopy(base)
    config = {"r": 3, "alpha": 6.0, "dropout": 0.1, **extra}
    tuned = sp.attach(base, sp.LoRA(targets=targets, **config))
    _randomise([p for _, a in tuned.adapters_of("default") for p in a.parameters()], seed=1)
    tuned.eval()
    x = make_input()
    expected = tuned(x)
    tuned.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path).eval()
    torch.testing.assert_close(theirs(x), expected, atol=1e-6, rtol=1e-5)
    assert theirs.peft_config["default"].r == config["r"]


@pytest.mark.parametrize("name,build,targets,make_input,extra", CASES, ids=[c[0] for c in CASES])
def test_peft_lora_loads_in_subpeft(name, build, targets, make_input, extra, tmp_path):
    torch.manual_seed(0)
    base = build().eval()
    pristine = copy.deepcopy(base)
    r = extra.get("r", 3)
    lcfg = peft.LoraConfig(r=r, lora_alpha=6, lora_dropout=0.1, target_modules=targets,
                           use_rslora=extra.get("rslora", False))
    theirs = peft.get_peft_model(base, lcfg)
    _randomise([p for n, p in theirs.named_parameters() if "lora_" in n], seed=2)
    theirs.eval()
    x = make_input()
    expected = theirs(x)
    theirs.save_pretrained(tmp_path)
    ours = sp.load(pristine, tmp_path)
    torch.testing.assert_close(ours(x), expected, atol=1e-6, rtol=1e-5)
    cfg = ours.configs["default"]
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.rslora) == (r, 6, 0.1, extra.get("rslora", False))


def assert_head_roundtrip_with_peft(config, tmp_path, perturb) -> None:
    """A tiny BERT classifier with ``config`` (and a trained head via modules_to_save), moved off its
    init by ``perturb(tuned)``: subpeft → peft → subpeft keeps the logits (atol 1e-6)."""
    base = tiny_bert()
    pristine = copy.deepcopy(base)
    tuned = sp.attach(base, config)
    perturb(tuned)
    ids = torch.randint(1, 50, (2, 6))
    expected = tuned(input_ids=ids).logits
    tuned.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "ours").eval()
    torch.testing.assert_close(theirs(input_ids=ids).logits, expected, atol=1e-6, rtol=1e-5)
    theirs.save_pretrained(tmp_path / "theirs")
    back = sp.load(copy.deepcopy(pristine), tmp_path / "theirs")
    torch.testing.assert_close(back(input_ids=ids).logits, expected, atol=1e-6, rtol=1e-5)


def test_classifier_head_roundtrip_with_modules_to_save(tmp_path):
    config = sp.LoRA(r=2, alpha=4, targets=["query", "value"], modules_to_save=["classifier"])
    assert_head_roundtrip_with_peft(
        config, tmp_path, lambda tuned: _randomise([p for p in tuned.parameters() if p.requires_grad], seed=3)
    )


def test_peft_options_subpeft_lacks_are_refused(tmp_path):
    base = MLP()
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["fc1"], bias="all"))
    theirs.save_pretrained(tmp_path)
    with pytest.raises(sp.AdapterLoadError, match="bias"):
        sp.load(MLP(), tmp_path)


def test_unknown_peft_options_warn_and_bookkeeping_does_not(tmp_path):
    theirs = peft.get_peft_model(MLP(), peft.LoraConfig(r=2, target_modules=["fc1"]))
    theirs.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sp.load(MLP(), tmp_path)  # every field PEFT 0.21 writes is known
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["lora_future_trick"] = {"on": True}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="lora_future_trick"):
        sp.load(MLP(), tmp_path)


def test_lora_on_a_dilated_conv_is_written_in_subpeft_format(tmp_path):
    """PEFT's Conv2d LoRA ignores the base kernel's dilation, so that adapter must not pose as a PEFT file."""
    torch.manual_seed(0)
    base = ConvNet()
    pristine = copy.deepcopy(base)
    tuned = sp.attach(base, sp.LoRA(r=2, targets=["conv3"]))
    with torch.no_grad():
        tuned.model.conv3.adapters["default"].lora_B.normal_()
    x = torch.randn(2, 3, 8, 9)
    tuned.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["method"] == "lora" and "peft_type" not in saved
    assert torch.equal(sp.load(pristine, tmp_path)(x), tuned(x))
