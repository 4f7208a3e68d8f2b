"""(IA)³ and SSL adapters move between subpeft and Hugging Face PEFT's IA3, both ways, with identical outputs.

SSL is PEFT's IA3 with every target a feedforward module (input scaled, bias untouched), on any
layer. subpeft's (IA)³ equals PEFT's only where the output-scaled layers have no bias (PEFT scales
the bias too): it writes PEFT's format there and its own format otherwise.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import subpeft as sp

from .test_reconstruction_scaling import _random_biases, _tiny_bert, _tiny_llama
from .tiny_models import MLP, ConvNet, GPT2Style

peft = pytest.importorskip("peft", reason="peft is a test dependency (pip install -e '.[test]')")

BERT_TARGETS = ["key", "value", "intermediate.dense"]
LLAMA_TARGETS = ["k_proj", "v_proj", "down_proj"]


def _randomise(params, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(1 + torch.randn(p.shape, generator=gen) * 0.3)


def _bert():
    return _random_biases(_tiny_bert())


def _bert_out(model, ids):
    return model(input_ids=ids).last_hidden_state


def _llama_out(model, ids):
    return model(input_ids=ids).logits


def _ours_to_peft(base, config, run, inputs, path):
    """Attach, randomise, save with subpeft; load with PEFT. Returns (ours, theirs, saved config)."""
    pristine = copy.deepcopy(base)
    tuned = sp.attach(base, config)
    _randomise([p for _, a in tuned.adapters_of("default") for p in a.parameters()], seed=1)
    tuned.eval()
    expected = run(tuned, inputs)
    tuned.save_pretrained(path)
    saved = json.loads((path / "adapter_config.json").read_text())
    theirs = peft.PeftModel.from_pretrained(pristine, path).eval()
    return expected, run(theirs, inputs), saved


def _peft_to_ours(base, pconfig, run, inputs, path):
    pristine = copy.deepcopy(base)
    theirs = peft.get_peft_model(base, pconfig)
    _randomise([p for n, p in theirs.named_parameters() if "ia3_l" in n], seed=2)
    theirs.eval()
    expected = run(theirs, inputs)
    theirs.save_pretrained(path)
    ours = sp.load(pristine, path)
    return expected, run(ours, inputs), ours.configs["default"]


# -- SSL == PEFT IA3 with feedforward_modules = target_modules ---------------------------------------------
def test_subpeft_ssl_loads_in_peft_with_biases(tmp_path):
    ids = torch.randint(1, 50, (2, 7))
    expected, got, saved = _ours_to_peft(_bert(), sp.SSL(targets=BERT_TARGETS), _bert_out, ids, tmp_path)
    assert saved["peft_type"] == "IA3" and saved["feedforward_modules"] == saved["target_modules"] == BERT_TARGETS
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_peft_all_feedforward_ia3_loads_as_ssl(tmp_path):
    ids = torch.randint(1, 50, (2, 7))
    pconfig = peft.IA3Config(target_modules=BERT_TARGETS, feedforward_modules=BERT_TARGETS)
    expected, got, config = _peft_to_ours(_bert(), pconfig, _bert_out, ids, tmp_path)
    assert isinstance(config, sp.SSL) and sorted(config.targets) == sorted(BERT_TARGETS)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_ssl_on_conv1d_both_ways(tmp_path):
    x = torch.randn(3, 4, 6)
    torch.manual_seed(0)
    base = _random_biases(GPT2Style())
    expected, got, saved = _ours_to_peft(copy.deepcopy(base), sp.SSL(targets=["c_attn", "c_proj"]),
                                         lambda m, v: m(v), x, tmp_path / "ours")
    assert saved["fan_in_fan_out"] is True
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    pconfig = peft.IA3Config(target_modules=["c_attn", "c_proj"], feedforward_modules=["c_attn", "c_proj"],
                             fan_in_fan_out=True)
    expected, got, config = _peft_to_ours(base, pconfig, lambda m, v: m(v), x, tmp_path / "theirs")
    assert isinstance(config, sp.SSL)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_ssl_with_regex_targets_writes_feedforward_for_every_target(tmp_path):
    x = torch.randn(4, 6)
    expected, got, saved = _ours_to_peft(_random_biases(MLP()), sp.SSL(targets="fc[12]"), lambda m, v: m(v), x, tmp_path)
    assert saved["target_modules"] == "fc[12]" and saved["feedforward_modules"] == ".*"
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    back = sp.load(_random_biases(MLP()), tmp_path)
    assert back.configs["default"] == sp.SSL(targets="fc[12]")


# -- (IA)³ on layers without bias ----------------------------------------------------------------------
def test_subpeft_ia3_on_llama_loads_in_peft(tmp_path):
    ids = torch.randint(1, 64, (2, 7))
    config = sp.IA3(targets=LLAMA_TARGETS, feedforward=["down_proj"])
    expected, got, saved = _ours_to_peft(_tiny_llama(), config, _llama_out, ids, tmp_path)
    assert saved["peft_type"] == "IA3" and saved["feedforward_modules"] == ["down_proj"]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def _case(feedforward):
    return "peft-default" if feedforward is None else ("faithful" if feedforward else "output-only")


@pytest.mark.parametrize("feedforward", [[], ["down_proj"], None], ids=["output-only", "faithful", "peft-default"])
def test_peft_ia3_on_llama_loads_in_subpeft(feedforward, tmp_path):
    """None: PEFT takes its Llama default (k_proj, v_proj, down_proj; down_proj feedforward)."""
    ids = torch.randint(1, 64, (2, 7))
    targets = LLAMA_TARGETS if feedforward is not None else None
    pconfig = peft.IA3Config(target_modules=targets, feedforward_modules=feedforward)
    expected, got, config = _peft_to_ours(_tiny_llama(), pconfig, _llama_out, ids, tmp_path)
    expected_feedforward = {"output-only": None, "faithful": ["down_proj"], "peft-default": ["down_proj"]}
    assert isinstance(config, sp.IA3) and config.feedforward == expected_feedforward[_case(feedforward)]
    assert sorted(config.targets) == sorted(LLAMA_TARGETS)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_ia3_on_conv2d_without_bias_both_ways(tmp_path):
    x = torch.randn(2, 3, 8, 9)
    torch.manual_seed(0)
    base = ConvNet()
    expected, got, saved = _ours_to_peft(copy.deepcopy(base), sp.IA3(targets=["conv3"]), lambda m, v: m(v), x,
                                         tmp_path / "ours")
    assert saved["peft_type"] == "IA3"
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    expected, got, _ = _peft_to_ours(base, peft.IA3Config(target_modules=["conv3"], feedforward_modules=[]), lambda m, v: m(v), x,
                                     tmp_path / "theirs")
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_ia3_feedforward_layers_may_have_biases(tmp_path):
    """Input-scaled layers leave the bias alone in both libraries: still PEFT's format."""
    x = torch.randn(4, 6)
    model = _random_biases(MLP())
    with torch.no_grad():
        model.fc1.bias.zero_()  # the output-scaled layer: a zero bias is scaled identically
    config = sp.IA3(targets=["fc1", "fc2"], feedforward=["fc2"])
    expected, got, saved = _ours_to_peft(model, config, lambda m, v: m(v), x, tmp_path)
    assert saved["peft_type"] == "IA3"
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


# -- (IA)³ on layers with a bias: subpeft's format ------------------------------------------------------
def test_ia3_with_biases_is_saved_in_subpeft_format(tmp_path):
    ids = torch.randint(1, 50, (2, 7))
    base = _bert()
    pristine = copy.deepcopy(base)
    tuned = sp.attach(base, sp.IA3(targets=BERT_TARGETS))
    _randomise([p for _, a in tuned.adapters_of("default") for p in a.parameters()], seed=3)
    expected = _bert_out(tuned, ids)
    tuned.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["method"] == "ia3" and "peft_type" not in saved
    back = sp.load(copy.deepcopy(pristine), tmp_path)
    assert torch.equal(_bert_out(back, ids), expected)
    # PEFT's form, l ⊙ (W·x + b), would differ here
    theirs = peft.get_peft_model(copy.deepcopy(pristine), peft.IA3Config(target_modules=BERT_TARGETS,
                                                                         feedforward_modules=[])).eval()
    ours = {k.removeprefix("base_model.model."): v for k, v in tuned.adapter_state_dict("default").items()}
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "ia3_l" in n:
                p.copy_(ours[n.removeprefix("base_model.model.").replace(".default", "")])
    assert not torch.allclose(_bert_out(theirs, ids), expected, atol=1e-3)


def test_ssb_has_no_peft_form(tmp_path):
    tuned = sp.attach(MLP(), sp.SSB(targets=["fc1"]))
    tuned.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["method"] == "ssb"


def test_unknown_peft_ia3_options_warn_and_bookkeeping_does_not(tmp_path):
    theirs = peft.get_peft_model(MLP(), peft.IA3Config(target_modules=["fc1"], feedforward_modules=["fc1"]))
    theirs.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sp.load(MLP(), tmp_path)  # every field PEFT 0.21 writes is known
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["ia3_future_trick"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="ia3_future_trick"):
        sp.load(MLP(), tmp_path)


# -- PEFT's own form, biases scaled: IA3(scale_bias=True) -------------------------------------------------
def test_peft_ia3_on_layers_with_biases_loads_with_peft_semantics(tmp_path):
    """PEFT's default IA3 on BERT (output-scaled key/value, with biases): subpeft reads it as
    IA3(scale_bias=True) and computes exactly what PEFT computes."""
    ids = torch.randint(1, 50, (2, 7))
    pconfig = peft.IA3Config(target_modules=BERT_TARGETS, feedforward_modules=["intermediate.dense"])
    expected, got, config = _peft_to_ours(_bert(), pconfig, _bert_out, ids, tmp_path)
    assert isinstance(config, sp.IA3) and config.scale_bias
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_ia3_scale_bias_merges_and_writes_peft_format(tmp_path):
    ids = torch.randint(1, 50, (2, 7))
    base = _bert()
    pristine = copy.deepcopy(base)
    expected, theirs, saved = _ours_to_peft(base, sp.IA3(targets=BERT_TARGETS, scale_bias=True), _bert_out, ids, tmp_path)
    assert saved["peft_type"] == "IA3"
    torch.testing.assert_close(theirs, expected, atol=1e-6, rtol=0)
    tuned = sp.load(copy.deepcopy(pristine), tmp_path)
    y = _bert_out(tuned, ids)
    bias_before = tuned.model.encoder.layer[0].attention.self.key.bias.clone()
    tuned.merge()
    assert not torch.equal(tuned.model.encoder.layer[0].attention.self.key.bias, bias_before)  # the bias is scaled
    torch.testing.assert_close(_bert_out(tuned, ids), y, atol=1e-5, rtol=0)
    tuned.unmerge()
    torch.testing.assert_close(tuned.model.encoder.layer[0].attention.self.key.bias, bias_before, atol=1e-6, rtol=0)
