"""Defining properties of the reconstruction methods (IA)³, SSL, SSB, BitFit and LayerNorm tuning.

Beyond the generic matrix: each method's φ is compared with the layer it claims to equal (a plain
layer built with the transformed weight), stacks of adapters on one layer agree with their merge,
and BitFit / LayerNorm tuning select exactly the biases / norms of small transformers.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import subpeft as sp
from subpeft.core.layers import is_norm

from .tiny_models import MLP, ConvNet, GPT2Style, NormNet

ATOL = 1e-6


def _randomise(tuned: sp.TunedModel, name: str = "default", seed: int = 0, scale: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, adapter in tuned.adapters_of(name):
            for p in adapter.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def _random_biases(model: nn.Module, seed: int = 5) -> nn.Module:
    """HF models initialise biases to 0; a bias-unscaled φ is only tested with non-zero ones."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def _tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=32)
    return BertModel(cfg).eval()


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _layer(tuned, name):
    return tuned.model.get_submodule(name).adapters["default"]


# -- (IA)³, SSL, SSB: φ equals the layer with the transformed weight --------------------------------------
def _reference_linear(base: nn.Module, weight_2d: torch.Tensor) -> nn.Linear:
    """A plain nn.Linear with this (d_out, d_in) weight and the base layer's own bias."""
    d_out, d_in = weight_2d.shape
    ref = nn.Linear(d_in, d_out)
    with torch.no_grad():
        ref.weight.copy_(weight_2d)
        ref.bias.copy_(base.bias)
    return ref


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_ssl_equals_scaling_the_layers_inputs(kind):
    model, name, x = (MLP(), "fc1", torch.randn(4, 6)) if kind == "linear" else (GPT2Style(), "c_attn", torch.randn(3, 4, 6))
    _random_biases(model)
    base = copy.deepcopy(model.get_submodule(name))
    tuned = sp.attach(model, sp.SSL(targets=[name]))
    _randomise(tuned)
    l_in = _layer(tuned, name).scale_in.detach().view(-1)
    assert l_in.shape == (6,)
    layer = tuned.model.get_submodule(name)
    torch.testing.assert_close(layer(x), base(l_in * x), atol=ATOL, rtol=0)
    # the merged weight is W·diag(l) and the bias is untouched
    tuned.merge()
    w2d = layer.base_layer.weight if kind == "linear" else layer.base_layer.weight.t()
    w0 = base.weight if kind == "linear" else base.weight.t()
    torch.testing.assert_close(w2d, w0 * l_in[None, :], atol=ATOL, rtol=0)
    assert torch.equal(layer.base_layer.bias, base.bias)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_ssb_equals_linear_with_both_sides_scaled_and_the_original_bias(kind):
    model, name, x = (MLP(), "fc2", torch.randn(4, 10)) if kind == "linear" else (GPT2Style(), "c_proj", torch.randn(3, 4, 9))
    _random_biases(model)
    base = copy.deepcopy(model.get_submodule(name))
    tuned = sp.attach(model, sp.SSB(targets=[name]))
    _randomise(tuned)
    adapter = _layer(tuned, name)
    l_out, l_in = adapter.scale_out.detach().view(-1), adapter.scale_in.detach().view(-1)
    w = base.weight if kind == "linear" else base.weight.t()
    ref = _reference_linear(base, torch.diag(l_out) @ w @ torch.diag(l_in))
    layer = tuned.model.get_submodule(name)
    torch.testing.assert_close(layer(x), ref(x), atol=ATOL, rtol=0)
    tuned.merge()
    assert torch.equal(layer.base_layer.bias, base.bias)
    torch.testing.assert_close(layer(x), ref(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_ia3_scales_output_rows_and_leaves_the_bias(kind):
    model, name, x = (MLP(), "fc1", torch.randn(4, 6)) if kind == "linear" else (GPT2Style(), "c_attn", torch.randn(3, 4, 6))
    _random_biases(model)
    base = copy.deepcopy(model.get_submodule(name))
    tuned = sp.attach(model, sp.IA3(targets=[name]))
    _randomise(tuned)
    adapter = _layer(tuned, name)
    assert adapter.scale_in is None
    scale = adapter.scale_out.detach().view(-1)
    w = base.weight if kind == "linear" else base.weight.t()
    ref = _reference_linear(base, scale[:, None] * w)
    torch.testing.assert_close(tuned.model.get_submodule(name)(x), ref(x), atol=ATOL, rtol=0)
    # not PEFT's form l ⊙ (W·x + b)
    assert not torch.allclose(tuned.model.get_submodule(name)(x), scale * base(x), atol=1e-3)


def test_ia3_on_conv2d_scales_output_channels_bias_unscaled():
    model = _random_biases(ConvNet())
    base = copy.deepcopy(model.conv1)
    tuned = sp.attach(model, sp.IA3(targets=["conv1", "conv3"]))
    _randomise(tuned)
    scale = _layer(tuned, "conv1").scale_out.detach().view(-1)
    ref = copy.deepcopy(base)
    with torch.no_grad():
        ref.weight.mul_(scale[:, None, None, None])
    x = torch.randn(2, 3, 8, 9)
    torch.testing.assert_close(tuned.model.conv1(x), ref(x), atol=ATOL, rtol=0)
    torch.testing.assert_close(tuned.model.conv1(x[0]), ref(x[0]), atol=ATOL, rtol=0)  # unbatched input
    assert tuned.get_nb_trainable_parameters()[0] == 5 + 2  # one scale per output channel


def test_ia3_feedforward_targets_scale_the_input():
    model = _random_biases(MLP())
    pristine = copy.deepcopy(model)
    tuned = sp.attach(model, sp.IA3(targets=["fc1", "fc2"], feedforward=["fc2"]))
    _randomise(tuned)
    fc1, fc2 = _layer(tuned, "fc1"), _layer(tuned, "fc2")
    assert fc1.scale_in is None and fc1.scale_out.shape == (10, 1)
    assert fc2.scale_out is None and fc2.scale_in.shape == (1, 10)
    l1, l2 = fc1.scale_out.detach().view(-1), fc2.scale_in.detach().view(-1)
    x = torch.randn(4, 6)
    h = pristine.act(l1 * (x @ pristine.fc1.weight.t()) + pristine.fc1.bias)
    expected = pristine.head(pristine.fc2(l2 * h))
    torch.testing.assert_close(tuned(x), expected, atol=ATOL, rtol=0)
    assert tuned.get_nb_trainable_parameters()[0] == 10 + 10


def test_ia3_feedforward_must_name_targets_and_refuses_conv2d_inputs():
    with pytest.raises(sp.ConfigError, match="feedforward"):
        sp.IA3(targets=["fc1"], feedforward=["fc2"])
    with pytest.raises(sp.UnsupportedLayerError, match="Conv2d"):
        sp.attach(ConvNet(), sp.IA3(targets=["conv1"], feedforward=["conv1"]))


# -- stacks: adapters over a chain agree with their merge, in any order ----------------------------------
STACKS = [
    ("bitfit", "ia3"), ("ia3", "bitfit"), ("bitfit", "ssb"), ("ssb", "bitfit"), ("bitfit", "ssl"),
    ("lora", "ssb"), ("ia3", "ia3"), ("bitfit", "lora", "ssb"),
]


@pytest.mark.parametrize("methods", STACKS, ids=["+".join(s) for s in STACKS])
def test_stacked_adapters_agree_with_their_merge(methods):
    model = _random_biases(MLP())
    names = [f"a{i}" for i in range(len(methods))]
    configs = {"lora": sp.LoRA(r=2, targets=["fc1", "fc2"])}
    tuned = None
    for name, method in zip(names, methods, strict=True):
        config = configs.get(method) or sp.get_method(method).config_cls(targets=["fc1", "fc2"])
        if tuned is None:
            tuned = sp.attach(model, config, name=name)
        else:
            tuned.add_adapter(name, config)
        _randomise(tuned, name, seed=len(name) + names.index(name))
    tuned.set_adapter(names)  # the first is the innermost; merge() folds them in that order
    x = torch.randn(4, 6)
    y = tuned(x)
    tuned.merge()
    torch.testing.assert_close(tuned(x), y, atol=1e-5, rtol=0)
    tuned.unmerge()
    torch.testing.assert_close(tuned(x), y, atol=1e-5, rtol=0)


def test_ia3_over_bitfit_on_conv2d_agrees_with_its_merge():
    model = _random_biases(ConvNet())
    tuned = sp.attach(model, sp.BitFit(targets=["conv1", "conv2"]), name="bias")
    tuned.add_adapter("scale", sp.IA3(targets=["conv1", "conv2", "conv3"]))
    _randomise(tuned, "bias", seed=1)
    _randomise(tuned, "scale", seed=2)
    tuned.set_adapter(["bias", "scale"])
    x = torch.randn(2, 3, 8, 9)
    y = tuned(x)
    tuned.merge()
    torch.testing.assert_close(tuned(x), y, atol=1e-5, rtol=0)


def test_ia3_over_bitfit_keeps_the_tuned_bias_unscaled():
    """l ⊙ (W·x) + (b + Δb): the scaled part excludes the bias the layer below computes."""
    model = _random_biases(MLP())
    fc1 = copy.deepcopy(model.fc1)
    tuned = sp.attach(model, sp.BitFit(targets=["fc1"]), name="bias")
    tuned.add_adapter("scale", sp.IA3(targets=["fc1"]))
    _randomise(tuned, "bias", seed=1)
    _randomise(tuned, "scale", seed=2)
    tuned.set_adapter(["bias", "scale"])
    db = tuned.model.fc1.adapters["bias"].bias_delta.detach()
    scale = tuned.model.fc1.adapters["scale"].scale_out.detach().view(-1)
    x = torch.randn(4, 6)
    torch.testing.assert_close(tuned.model.fc1(x), scale * (x @ fc1.weight.t()) + fc1.bias + db, atol=ATOL, rtol=0)


# -- BitFit ----------------------------------------------------------------------------------------------
def test_bitfit_all_covers_every_bias_of_a_transformer_and_trains_only_biases():
    model = _random_biases(_tiny_bert())
    pristine = copy.deepcopy(model)
    tuned = sp.attach(model, sp.BitFit())  # targets=None means every bias
    biases = {n.removesuffix(".bias") for n, _ in pristine.named_parameters() if n.endswith(".bias")}
    adapted = {n for n, layer in tuned.adapted_layers()}
    assert adapted == biases
    assert any("LayerNorm" in n for n in adapted) and any("attention.self.query" in n for n in adapted)
    trainable = tuned.get_nb_trainable_parameters()[0]
    assert trainable == sum(p.numel() for n, p in pristine.named_parameters() if n.endswith(".bias"))
    ids = torch.randint(1, 50, (2, 7))
    opt = torch.optim.Adam([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        out = tuned(input_ids=ids)
        loss = out.last_hidden_state.pow(2).mean() + out.pooler_output.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    y = tuned(input_ids=ids).last_hidden_state
    merged = tuned.merge_and_unload()
    torch.testing.assert_close(merged(input_ids=ids).last_hidden_state, y, atol=1e-5, rtol=0)
    changed = {n for n, p in merged.state_dict().items() if not torch.equal(p, pristine.state_dict()[n])}
    assert changed and all(n.endswith(".bias") for n in changed)
    assert len(changed) == len(biases)


def test_bitfit_adds_the_bias_offset_on_each_layer_type():
    for model, name, x in ((GPT2Style(), "c_attn", torch.randn(2, 3, 6)), (ConvNet(), "conv1", torch.randn(2, 3, 8, 9)),
                           (NormNet(), "ln", torch.randn(3, 8))):
        base = copy.deepcopy(model.get_submodule(name))
        tuned = sp.attach(model, sp.BitFit(targets=[name]))
        _randomise(tuned)
        db = _layer(tuned, name).bias_delta.detach()
        ref = copy.deepcopy(base)
        with torch.no_grad():
            ref.bias.add_(db)
        torch.testing.assert_close(tuned.model.get_submodule(name)(x), ref(x), atol=ATOL, rtol=0)


def test_bitfit_refuses_a_named_layer_without_bias():
    with pytest.raises(sp.UnsupportedLayerError, match="bias"):
        sp.attach(MLP(), sp.BitFit(targets=["head"]))
    tuned = sp.attach(MLP(), sp.BitFit(targets="all"))
    assert sorted(n for n, _ in tuned.adapted_layers()) == ["fc1", "fc2"]


# -- LayerNorm tuning -----------------------------------------------------------------------------------
def _norms_set_to_tuned(pristine: nn.Module, tuned: sp.TunedModel) -> nn.Module:
    """A copy of the base model whose norm weights (and biases) are w + Δw (b + Δb)."""
    ref = copy.deepcopy(pristine)
    with torch.no_grad():
        for name, adapter in tuned.adapters_of("default"):
            norm = ref.get_submodule(name)
            norm.weight.add_(adapter.weight_delta)
            if adapter.bias_delta is not None:
                norm.bias.add_(adapter.bias_delta)
    return ref


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_layernorm_tuning_tunes_every_norm_exactly(arch):
    model = _tiny_llama() if arch == "llama" else _random_biases(_tiny_bert())
    pristine = copy.deepcopy(model)
    tuned = sp.attach(model, sp.LayerNormTuning())  # targets=None means every norm
    norms = {n for n, m in pristine.named_modules() if is_norm(m)}
    assert {n for n, _ in tuned.adapted_layers()} == norms
    assert len(norms) == (2 * 2 + 1 if arch == "llama" else 1 + 2 * 2)
    d = 16
    per_norm = d if arch == "llama" else 2 * d
    assert tuned.get_nb_trainable_parameters()[0] == per_norm * len(norms)
    _randomise(tuned, scale=0.5)
    ref = _norms_set_to_tuned(pristine, tuned)
    ids = torch.randint(1, 50, (2, 7))

    def run(m):
        out = m(input_ids=ids)
        return out.logits if arch == "llama" else out.last_hidden_state

    y = run(tuned)
    assert not torch.allclose(y, run(pristine), atol=1e-3)
    torch.testing.assert_close(y, run(ref), atol=ATOL, rtol=0)
    torch.testing.assert_close(run(tuned.merge_and_unload()), run(ref), atol=ATOL, rtol=0)


def test_layernorm_tuning_is_exact_for_gemmas_one_plus_w_norm():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), GemmaRMSNorm(8), nn.Linear(8, 3))
    with torch.no_grad():
        model[1].weight.normal_(0, 0.3)
    pristine = copy.deepcopy(model)
    tuned = sp.attach(model, sp.LayerNormTuning())
    assert [n for n, _ in tuned.adapted_layers()] == ["1"]
    _randomise(tuned)
    ref = _norms_set_to_tuned(pristine, tuned)
    x = torch.randn(4, 6)
    torch.testing.assert_close(tuned(x), ref(x), atol=ATOL, rtol=0)


STACKED_NORM = [("bitfit", "layernorm"), ("layernorm", "bitfit"), ("layernorm", "layernorm")]


@pytest.mark.parametrize("methods", STACKED_NORM, ids=["+".join(s) for s in STACKED_NORM])
def test_layernorm_tuning_stacks_with_other_adapters_on_one_norm(methods):
    model = NormNet()
    pristine = copy.deepcopy(model)
    names = ["inner", "outer"]
    tuned = sp.attach(model, sp.get_method(methods[0]).config_cls(targets=["ln"]), name="inner")
    tuned.add_adapter("outer", sp.get_method(methods[1]).config_cls(targets=["ln"]))
    _randomise(tuned, "inner", seed=1)
    _randomise(tuned, "outer", seed=2)
    tuned.set_adapter(names)
    ref = copy.deepcopy(pristine)
    with torch.no_grad():
        for n in names:
            a = tuned.model.ln.adapters[n]
            if hasattr(a, "weight_delta"):
                ref.ln.weight.add_(a.weight_delta)
            ref.ln.bias.add_(a.bias_delta)
    x = torch.randn(3, 5, 6)
    y = tuned(x)
    torch.testing.assert_close(y, ref(x), atol=ATOL, rtol=0)
    tuned.merge()
    torch.testing.assert_close(tuned(x), y, atol=ATOL, rtol=0)


def test_layernorm_tuning_accepts_only_norms():
    with pytest.raises(sp.UnsupportedLayerError):
        sp.attach(NormNet(), sp.LayerNormTuning(targets=["fc"]))
    tuned = sp.attach(NormNet(), sp.LayerNormTuning())
    assert sorted(n for n, _ in tuned.adapted_layers()) == ["ln", "rms"]
    assert tuned.get_nb_trainable_parameters()[0] == 2 * 8 + 8
