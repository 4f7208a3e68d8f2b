"""Core behaviour that is not per-method: targeting, errors, adapter files, the model wrapper."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import subpeft as sp
from subpeft.core import io as sp_io
from subpeft.core.layer import AdaptedLayer, TrainableCopy

from .tiny_models import MLP, TinyAttention


def tiny_bert(num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=32, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def adapted_names(tuned):
    return sorted(n for n, _ in tuned.adapted_layers())


# -- targets ------------------------------------------------------------------------------------
def test_targets_exact_name_and_dotted_suffix():
    tuned = sp.attach(tiny_bert(), sp.LoRA(targets=["query", "encoder.layer.1.attention.self.value"]))
    assert adapted_names(tuned) == [
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.1.attention.self.query",
        "bert.encoder.layer.1.attention.self.value",
    ]


def test_suffix_match_respects_dots():
    # "dense" must not match "xdense"; "output.dense" matches both attention.output.dense and output.dense
    tuned = sp.attach(tiny_bert(), sp.LoRA(targets=["output.dense"]))
    names = adapted_names(tuned)
    assert len(names) == 4 and all(n.endswith("output.dense") for n in names)


def test_targets_regex_is_full_match():
    tuned = sp.attach(tiny_bert(), sp.LoRA(targets=r".*layer\.0\.attention\.self\.(query|key)"))
    assert adapted_names(tuned) == ["bert.encoder.layer.0.attention.self.key", "bert.encoder.layer.0.attention.self.query"]
    with pytest.raises(sp.TargetError, match="selects no module"):
        sp.attach(tiny_bert(), sp.LoRA(targets=r"query"))  # a regex string must match whole names


def test_all_linear_skips_output_head_and_exclude_works():
    model = tiny_bert()
    tuned = sp.attach(model, sp.LoRA(targets="all-linear", exclude=["pooler.dense"]))
    names = adapted_names(tuned)
    assert len(names) == 2 * 6  # q, k, v, attention.output.dense, intermediate.dense, output.dense per layer
    assert not any("classifier" in n or "pooler" in n for n in names)
    llama = sp.attach(tiny_llama(), sp.LoRA(targets="all-linear"))
    names = adapted_names(llama)
    assert "lm_head" not in names and len(names) == 2 * 7


def test_default_targets_for_known_architecture():
    tuned = sp.attach(tiny_bert(), sp.LoRA())
    assert tuned.configs["default"].targets == ["query", "value"]
    with pytest.raises(sp.TargetError, match="no default targets"):
        sp.attach(MLP(), sp.LoRA())


def test_unmatched_target_names_the_entry_and_closest_modules():
    model = tiny_bert()
    with pytest.raises(sp.TargetError) as err:
        sp.attach(model, sp.LoRA(targets=["query", "valeu"]))
    msg = str(err.value)
    assert "'valeu'" in msg and "value" in msg
    # nothing was changed
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_unsupported_layer_type_says_what_is_supported():
    model = tiny_bert()
    with pytest.raises(sp.UnsupportedLayerError, match="linear, conv1d, embedding, conv2d"):
        sp.attach(model, sp.LoRA(targets=["LayerNorm"]))
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())


def test_bad_config_values_are_clear_errors():
    with pytest.raises(sp.ConfigError, match="r must be a positive integer"):
        sp.LoRA(r=0)
    with pytest.raises(sp.ConfigError, match="dropout"):
        sp.LoRA(dropout=1.5)
    with pytest.raises(sp.ConfigError, match="alpha"):
        sp.LoRA(alpha=-1)
    with pytest.raises(sp.ConfigError, match="unknown method 'lroa'.*'lora'"):
        sp.config_from_dict({"method": "lroa"})
    with pytest.raises(sp.ConfigError, match="'method' key"):
        sp.config_from_dict({"r": 4})


def test_list_methods_rows():
    rows = {m.name: m for m in sp.list_methods()}
    lora = rows["lora"]
    assert (lora.family, lora.mergeable, lora.kind) == ("extension", True, "weight")
    assert sp.config_from_dict({"method": "lora", "r": 4}) == sp.LoRA(r=4)


# -- the model wrapper ---------------------------------------------------------------------------
def test_forward_accepts_all_arguments_and_attributes_pass_through():
    model = tiny_bert()
    ids = torch.randint(1, 50, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    labels = torch.tensor([0, 2])
    ref = model(input_ids=ids, attention_mask=mask, labels=labels)
    tuned = sp.attach(model, sp.LoRA(r=2, targets=["query", "value"]))
    got = tuned(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(got.logits, ref.logits)
    torch.testing.assert_close(got.loss, ref.loss)
    assert tuned.config is model.config  # attribute access reaches the wrapped model
    layer = model.bert.encoder.layer[0].attention.self.query
    assert isinstance(layer, AdaptedLayer) and layer.in_features == 16


def test_generate_matches_merged_model():
    model = tiny_llama()
    prompt = torch.tensor([[3, 7, 11, 2]])
    pristine_out = copy.deepcopy(model).generate(prompt, max_new_tokens=6, do_sample=False)
    tuned = sp.attach(model, sp.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for _, a in tuned.adapters_of("default"):
            a.lora_B.normal_(0, 0.5)
    prompt = torch.tensor([[3, 7, 11, 2]])
    out = tuned.generate(prompt, max_new_tokens=6, do_sample=False)
    no_cache = tuned.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(out, no_cache)
    with tuned.disable_adapter():
        base_out = tuned.generate(prompt, max_new_tokens=6, do_sample=False)
    tuned.merge()
    assert torch.equal(tuned.generate(prompt, max_new_tokens=6, do_sample=False), out)
    assert torch.equal(base_out, pristine_out)
    assert not torch.equal(out, base_out), "the adapter should change what is generated"


def test_print_trainable_parameters(capsys):
    tuned = sp.attach(MLP(), sp.LoRA(r=2, targets=["fc1"]))
    tuned.print_trainable_parameters()
    trainable, total = tuned.get_nb_trainable_parameters()
    assert trainable == 2 * (6 + 10)
    line = capsys.readouterr().out
    assert f"trainable params: {trainable:,}" in line and f"all params: {total:,}" in line


def test_regularization_is_zero_and_step_is_noop_for_lora():
    tuned = sp.attach(MLP(), sp.LoRA(r=2, targets=["fc1"]))
    reg = tuned.regularization()
    assert reg.shape == () and reg.item() == 0.0
    before = {k: v.clone() for k, v in tuned.adapter_state_dict("default").items()}
    tuned.step(1)
    assert all(torch.equal(before[k], v) for k, v in tuned.adapter_state_dict("default").items())


def test_modules_to_save_trains_a_copy_and_restores_the_original(tmp_path):
    model = tiny_bert()
    head_before = model.classifier.weight.clone()
    tuned = sp.attach(model, sp.LoRA(r=2, targets=["query"], modules_to_save=["classifier"]))
    assert isinstance(model.classifier, TrainableCopy)
    assert all(p.requires_grad for p in model.classifier.copies["default"].parameters())
    ids = torch.randint(1, 50, (2, 5))
    with torch.no_grad():
        model.classifier.copies["default"].weight.add_(1.0)
    y = tuned(input_ids=ids).logits
    with tuned.disable_adapter():
        base = tuned(input_ids=ids).logits
    assert not torch.allclose(y, base)
    tuned.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    plain = tuned.unload()
    assert isinstance(plain.classifier, torch.nn.Linear) and torch.equal(plain.classifier.weight, head_before)
    assert all(p.requires_grad for p in plain.parameters()), "unload restores the original requires_grad"


def test_adapter_names_are_validated():
    tuned = sp.attach(MLP(), sp.LoRA(r=2, targets=["fc1"]))
    with pytest.raises(sp.AdapterNameError, match="already exists"):
        tuned.add_adapter("default", sp.LoRA(targets=["fc1"]))
    with pytest.raises(sp.AdapterNameError):
        tuned.add_adapter("a.b", sp.LoRA(targets=["fc1"]))
    with pytest.raises(sp.AdapterNameError, match="no adapter named 'nope'"):
        tuned.set_adapter("nope")
    with pytest.raises(TypeError, match="already has adapters"):
        sp.attach(tuned, sp.LoRA(targets=["fc1"]))


def test_two_active_adapters_stack():
    torch.manual_seed(0)
    model = TinyAttention()
    x = torch.randn(2, 3, 8)
    tuned = sp.attach(model, sp.LoRA(r=2, targets=["q_proj", "up_proj"]))
    tuned.add_adapter("b", sp.LoRA(r=3, targets=["q_proj"]))
    for name in ("default", "b"):
        with torch.no_grad():
            for _, a in tuned.adapters_of(name):
                a.lora_B.normal_()
    tuned.set_adapter(["default", "b"])
    y = tuned(x)
    tuned.merge()
    torch.testing.assert_close(tuned(x), y, atol=1e-5, rtol=0)
    tuned.unmerge()
    torch.testing.assert_close(tuned(x), y, atol=1e-5, rtol=0)


# -- adapter files -------------------------------------------------------------------------------
def _trained_mlp(tmp_path):
    torch.manual_seed(0)
    base = MLP()
    pristine = copy.deepcopy(base)
    tuned = sp.attach(base, sp.LoRA(r=2, targets=["fc1", "fc2"]))
    with torch.no_grad():
        for _, a in tuned.adapters_of("default"):
            a.lora_B.normal_()
    tuned.save_pretrained(tmp_path)
    return pristine, tuned


def _snapshot(model):
    return [type(m) for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()}, [
        p.requires_grad for p in model.parameters()
    ]


def _assert_unchanged(model, snap):
    types, state, grads = snap
    assert [type(m) for m in model.modules()] == types
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == grads


def test_truncated_file_is_a_clear_error_and_changes_nothing(tmp_path):
    pristine, _ = _trained_mlp(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    snap = _snapshot(pristine)
    with pytest.raises(sp.AdapterLoadError, match="truncated or corrupt"):
        sp.load(pristine, tmp_path)
    _assert_unchanged(pristine, snap)
    path.write_bytes(b"PK\x03\x04 this is a zip, not safetensors")
    with pytest.raises(sp.AdapterLoadError, match="not a readable safetensors"):
        sp.load(pristine, tmp_path)
    _assert_unchanged(pristine, snap)


def test_shape_mismatch_is_a_clear_error_and_changes_nothing(tmp_path):
    _trained_mlp(tmp_path)

    class Wider(MLP):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(6, 12)
            self.fc2 = torch.nn.Linear(12, 7)

    other = Wider()
    snap = _snapshot(other)
    with pytest.raises(sp.AdapterLoadError, match="shape mismatch.*different base model"):
        sp.load(other, tmp_path)
    _assert_unchanged(other, snap)


def test_saved_files_have_normal_permissions(tmp_path):
    _trained_mlp(tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    for p in tmp_path.iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask


def test_missing_files_and_bad_config(tmp_path):
    with pytest.raises(sp.AdapterLoadError, match="not an adapter directory"):
        sp.load(MLP(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(sp.AdapterLoadError, match="not valid JSON"):
        sp.load(MLP(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"method": "lora", "r": 2, "targets": ["fc1"]}))
    with pytest.raises(sp.AdapterLoadError, match="no adapter_model.safetensors"):
        sp.load(MLP(), tmp_path)


def test_unknown_config_keys_warn_on_load(tmp_path):
    pristine, tuned = _trained_mlp(tmp_path)
    native = tuned.configs["default"].to_dict()
    native["added_in_v9"] = True
    # as a newer subpeft writes it: the config with the weights that record it
    sp_io.write_adapter(tmp_path, native, tuned.adapter_state_dict("default"))
    with pytest.warns(UserWarning, match="added_in_v9"):
        loaded = sp.load(pristine, tmp_path)
    x = torch.randn(3, 6)
    assert torch.equal(loaded(x), tuned(x))


@pytest.mark.parametrize("fail_at", ["weights", "config", "rename"])
def test_interrupted_save_keeps_the_earlier_adapter(tmp_path, monkeypatch, fail_at):
    pristine, tuned = _trained_mlp(tmp_path)
    x = torch.randn(3, 6)
    expected = tuned(x)
    files_before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        for _, a in tuned.adapters_of("default"):
            a.lora_A.mul_(3)
    calls = {"n": 0}
    real_write, real_replace = sp_io._fsync_write, os.replace

    def failing_write(path, data):
        calls["n"] += 1
        if (fail_at == "weights" and calls["n"] == 1) or (fail_at == "config" and calls["n"] == 2):
            with open(path, "wb") as fh:
                fh.write(data[: len(data) // 3])
            raise KeyboardInterrupt
        real_write(path, data)

    def failing_replace(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(sp_io, "_fsync_write", failing_write)
    if fail_at == "rename":
        monkeypatch.setattr(sp_io.os, "replace", failing_replace)
    with pytest.raises(KeyboardInterrupt):
        tuned.save_pretrained(tmp_path)
    monkeypatch.setattr(sp_io.os, "replace", real_replace)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files_before, "no temp files left, old files intact"
    assert torch.equal(sp.load(pristine, tmp_path)(x), expected)


def test_load_into_tuned_model_adds_a_named_adapter(tmp_path):
    pristine, tuned = _trained_mlp(tmp_path)
    x = torch.randn(3, 6)
    other = sp.attach(copy.deepcopy(pristine), sp.LoRA(r=1, targets=["fc2"]))
    sp.load(other, tmp_path, adapter_name="loaded")
    assert other.active_adapters == ["loaded"]
    assert torch.equal(other(x), tuned(x))
    assert set(other.configs) == {"default", "loaded"}
    assert sp.TunedModel.from_pretrained(copy.deepcopy(pristine), tmp_path)(x).equal(tuned(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_float32_adapter(dtype):
    torch.manual_seed(0)
    base = MLP().to(dtype)
    x = torch.randn(4, 6, dtype=dtype)
    tuned = sp.attach(base, sp.LoRA(r=2, targets=["fc1", "fc2"]))
    assert all(p.dtype == torch.float32 for p in tuned.parameters() if p.requires_grad)
    with torch.no_grad():
        for _, a in tuned.adapters_of("default"):
            a.lora_B.normal_(0, 0.1)
    y = tuned(x)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in tuned.parameters() if p.requires_grad)
    tuned.merge()
    torch.testing.assert_close(tuned(x).float(), y.float(), atol=5e-2, rtol=5e-2)
    assert tuned.model.fc1.base_layer.weight.dtype == dtype


def test_lora_dropout_acts_on_the_lora_input_only():
    torch.manual_seed(0)
    base = MLP()
    pristine = copy.deepcopy(base)
    x = torch.randn(64, 6)
    tuned = sp.attach(base, sp.LoRA(r=2, dropout=0.5, targets=["fc1"]))
    tuned.train()
    # B = 0: whatever the dropout does to the LoRA input, the output is the base output
    torch.testing.assert_close(tuned(x), pristine(x))
    with torch.no_grad():
        tuned.model.fc1.adapters["default"].lora_B.normal_()
    a, b = tuned(x), tuned(x)
    assert not torch.allclose(a, b), "training-mode dropout should make two forwards differ"
    tuned.eval()
    torch.testing.assert_close(tuned(x), tuned(x), atol=0, rtol=0)


def test_norm_layer_type_covers_torch_and_hf_norms():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from subpeft.core.layers import layer_type

    assert layer_type(torch.nn.LayerNorm(4)) == "norm"
    assert layer_type(torch.nn.RMSNorm(4)) == "norm"
    assert layer_type(LlamaRMSNorm(4)) == "norm"
    assert layer_type(torch.nn.LayerNorm(4, elementwise_affine=False)) is None  # nothing to train
    assert layer_type(torch.nn.BatchNorm1d(4)) is None


def test_targets_all_uses_the_methods_accepts_filter():
    from subpeft.core.errors import UnsupportedLayerError
    from subpeft.core.targets import find_targets

    model = MLP()  # fc1, fc2 with bias; head without
    has_bias = lambda module, kind: getattr(module, "bias", None) is not None  # noqa: E731
    assert find_targets(model, "all", None, method="m", supported=("linear",), accepts=has_bias) == ["fc1", "fc2"]
    assert find_targets(model, "all", None, method="m", supported=("linear",)) == ["fc1", "fc2", "head"]
    with pytest.raises(UnsupportedLayerError, match="head"):
        find_targets(model, ["head"], None, method="m", supported=("linear",), accepts=has_bias)


def test_peft_dict_no_method_reads_is_a_clear_error():
    with pytest.raises(sp.ConfigError, match="not supported by subpeft"):
        sp.config_from_dict({"peft_type": "NO_SUCH_TYPE"})


def test_finalize_is_a_noop_for_methods_without_an_end_of_training_form():
    torch.manual_seed(0)
    tuned = sp.attach(MLP(), sp.LoRA(r=2, targets=["fc1"]))
    before = {k: v.clone() for k, v in tuned.adapter_state_dict("default").items()}
    config = tuned.configs["default"]
    tuned.finalize()
    assert tuned.configs["default"] is config
    after = tuned.adapter_state_dict("default")
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(sp.AdapterNameError):
        tuned.finalize("nope")
