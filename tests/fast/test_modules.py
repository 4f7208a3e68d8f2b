"""Module-level bottleneck adapters (Houlsby, Pfeiffer, AdaMix) on tiny random BERT and Llama models.

Placement (which projections, how many per block), the computed output ``h + f(h)`` at the right
place (before the residual add and the norm), identity at attach, trainable norms (Houlsby),
parameter counts (METHODS.md), clear errors, and AdaMix's routing, consistency term and averaging.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import subpeft as sp
from subpeft.core.arch import describe
from subpeft.core.errors import ConfigError
from subpeft.core.layer import AdaptedLayer, TrainableCopy
from subpeft.mechanisms.bottleneck import ACTIVATIONS
from subpeft.methods.extension.adamix import AdaMix, consistency_loss
from subpeft.methods.extension.houlsby import Houlsby
from subpeft.methods.extension.pfeiffer import Pfeiffer

from .tiny_transformers import batch, tiny_bert, tiny_llama

MODELS = {"bert": tiny_bert, "llama": tiny_llama}
POSITIONS = {"houlsby": ("attn_out", "ffn_out"), "pfeiffer": ("ffn_out",), "adamix": ("attn_out", "ffn_out")}
CONFIGS = {"houlsby": Houlsby, "pfeiffer": Pfeiffer, "adamix": AdaMix}


def perturb(tuned: sp.TunedModel, name: str = "default", seed: int = 0, scale: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, adapter in tuned.adapters_of(name):
            for p in adapter.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def logits(model, inputs) -> torch.Tensor:
    return model(**inputs).logits


def _train_adapters_only(tuned: sp.TunedModel) -> None:
    """Training mode for the adapters, evaluation mode (no dropout) for the base model."""
    tuned.eval()
    for _, adapter in tuned.adapters_of("default"):
        adapter.train()


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("method", CONFIGS)
def test_placement_per_block(method, arch):
    model = MODELS[arch]()
    parts = describe(model)
    tuned = sp.attach(model, CONFIGS[method]())
    adapted = [n for n, _ in tuned.adapted_layers()]
    expected = {n for f in POSITIONS[method] for n in parts.per_block(f)}
    assert set(adapted) == expected
    assert len(adapted) == len(POSITIONS[method]) * parts.num_layers  # Houlsby 2, Pfeiffer 1 per block
    for block in parts.blocks:  # exactly that many inside every block
        assert sum(n.startswith(block + ".") for n in adapted) == len(POSITIONS[method])
    # spelled out: the attention output projection and the FFN's last projection of each block
    literal = {("bert", "attn_out"): "bert.encoder.layer.{}.attention.output.dense",
               ("bert", "ffn_out"): "bert.encoder.layer.{}.output.dense",
               ("llama", "attn_out"): "model.layers.{}.self_attn.o_proj", ("llama", "ffn_out"): "model.layers.{}.mlp.down_proj"}
    assert set(adapted) == {literal[arch, f].format(i) for f in POSITIONS[method] for i in range(2)}


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("method", CONFIGS)
def test_identity_at_attach(method, arch):
    model, inputs = MODELS[arch](), batch()
    expected = logits(copy.deepcopy(model), inputs)
    tuned = sp.attach(model, CONFIGS[method]())
    assert torch.equal(logits(tuned, inputs), expected)
    _train_adapters_only(tuned)  # AdaMix's training-mode routes are the identity too (every W_up is 0)
    with torch.no_grad():
        assert torch.equal(logits(tuned, inputs), expected)


def _manual(adapter, h: torch.Tensor) -> torch.Tensor:
    """h + f(h·W_downᵀ + b_down)·W_upᵀ + b_up, written out."""
    wd, bd, wu, bu = (t.detach() for t in adapter.weights())
    act = ACTIVATIONS[adapter.config.activation]
    return h + act(h @ wd.T + bd) @ wu.T + bu


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
@pytest.mark.parametrize("arch", MODELS)
def test_output_is_h_plus_f_h_before_the_residual_and_norm(arch, activation):
    """Hook the adapted attention-output projection: its output is h + f(h) with h the base projection's
    output, and the norm after the attention sub-block receives exactly that plus the residual."""
    model, inputs = MODELS[arch](), batch()
    parts = describe(model)
    tuned = sp.attach(model, Houlsby(size=5, activation=activation))
    perturb(tuned)
    seen: dict[str, torch.Tensor] = {}
    layer_name = parts.per_block("attn_out")[1]
    layer = tuned.model.get_submodule(layer_name)
    assert isinstance(layer, AdaptedLayer)
    layer.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    block = tuned.model.get_submodule(parts.blocks[1])
    block.register_forward_pre_hook(lambda m, args, kwargs: seen.update(block_in=(args or (kwargs["hidden_states"],))[0]),
                                    with_kwargs=True)
    # the norm right after the attention sub-block: BERT's attention LayerNorm, Llama's post-attention RMSNorm
    norm_name = parts.per_block("norms")[2] if arch == "bert" else parts.per_block("norms")[3]
    tuned.model.get_submodule(norm_name).register_forward_pre_hook(lambda m, args: seen.update(norm_in=args[0]))
    with torch.no_grad():
        logits(tuned, inputs)
        h = layer.base_layer(seen["x"])
        expected = _manual(layer.adapters["default"], h)
    torch.testing.assert_close(seen["y"], expected, rtol=1e-5, atol=1e-6)
    assert (seen["y"] - h).abs().max() > 1e-2  # the adapter does something here
    torch.testing.assert_close(seen["norm_in"], seen["block_in"] + seen["y"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", MODELS)
def test_houlsby_trains_the_block_norms(arch, tmp_path):
    model, inputs = MODELS[arch](), batch()
    parts = describe(model)
    pristine = copy.deepcopy(model)
    tuned = sp.attach(model, Houlsby(size=4))
    norms = parts.per_block("norms")
    copies = dict(tuned._trainable_copies())
    assert sorted(copies) == sorted(norms)
    assert all(p.requires_grad for n in norms for p in copies[n].copies["default"].parameters())
    opt = torch.optim.Adam([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = logits(tuned, inputs).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n in norms:
        trained, original = copies[n].copies["default"].weight, copies[n].original.weight
        assert not torch.equal(trained, original), f"norm {n} did not train"
        assert torch.equal(original, pristine.get_submodule(n).weight)
    tuned.save_pretrained(tmp_path)
    reloaded = sp.load(MODELS[arch](), tmp_path)
    torch.testing.assert_close(logits(reloaded, inputs), logits(tuned, inputs), rtol=1e-5, atol=1e-6)
    with tuned.disable_adapter():
        assert torch.equal(logits(tuned, inputs), logits(pristine, inputs))
    # train_norms=False: no copies, no trainable norm
    plain = sp.attach(MODELS[arch](), Houlsby(size=4, train_norms=False))
    assert not list(plain._trainable_copies())


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("method", CONFIGS)
def test_trainable_count_is_the_formula(method, arch):
    model = MODELS[arch]()
    parts = describe(model)
    d, L, E = parts.hidden_size, parts.num_layers, 3
    options = {"experts": E} if method == "adamix" else {}
    for sizing, m in (({"size": 5}, 5), ({"reduction_factor": 8}, d // 8), ({}, d // 16)):
        tuned = sp.attach(MODELS[arch](), CONFIGS[method](**sizing, **options))
        adapters = L * len(POSITIONS[method]) * (2 * d * m + d + m) * (E if method == "adamix" else 1)
        norms = 0
        if method == "houlsby":
            norms = sum(p.numel() for n in parts.per_block("norms") for p in model.get_submodule(n).parameters())
        trainable, _ = tuned.get_nb_trainable_parameters()
        assert trainable == adapters + norms, (sizing, trainable, adapters, norms)
        layers = [(n, layer.base_layer, layer.layer_type) for n, layer in tuned.adapted_layers()]
        assert sp.get_method(method).adapter_cls.model_num_params(tuned.configs["default"], layers) == adapters


def test_unsupported_architecture_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16))
    for cfg in (Houlsby(), Pfeiffer(), AdaMix()):
        with pytest.raises(ConfigError, match=r"does not know the architecture 'gpt2'.*Supported: .*bert.*llama"):
            sp.attach(gpt2, cfg)
        assert not any(isinstance(m, (AdaptedLayer, TrainableCopy)) for m in gpt2.modules())
    mlp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 6))
    with pytest.raises(ConfigError, match=r"needs a Hugging Face transformer"):
        sp.attach(mlp, Pfeiffer())
    # Houlsby's norms come from the architecture too: explicit targets alone are not enough there
    with pytest.raises(ConfigError, match=r"train_norms=False"):
        sp.attach(copy.deepcopy(mlp), Houlsby(targets=["2"]))


def test_explicit_targets_adapt_any_linear():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 6))
    x = torch.randn(5, 6)
    tuned = sp.attach(mlp, Pfeiffer(size=3, activation="tanh", targets=["0"]))
    perturb(tuned)
    layer = tuned.model[0]
    with torch.no_grad():
        expected = tuned.model[2](torch.relu(_manual(layer.adapters["default"], layer.base_layer(x))))
        torch.testing.assert_close(tuned(x), expected, rtol=1e-5, atol=1e-6)
    assert layer.adapters["default"].down_weight.shape == (3, 8)  # d is the projection's output size


def test_config_errors():
    with pytest.raises(ConfigError, match="not both"):
        Houlsby(size=8, reduction_factor=4)
    with pytest.raises(ConfigError, match="activation must be one of"):
        Pfeiffer(activation="softplus")
    with pytest.raises(ConfigError, match="reduction_factor must be a positive number"):
        Pfeiffer(reduction_factor=0)
    with pytest.raises(ConfigError, match="experts must be a positive integer"):
        AdaMix(experts=0)
    assert Pfeiffer(reduction_factor=100).bottleneck_size(32) == 1


# -- AdaMix ----------------------------------------------------------------------------------------
def _adamix(arch: str = "bert", **options) -> tuple[sp.TunedModel, dict]:
    tuned = sp.attach(MODELS[arch](), AdaMix(size=4, **options))
    perturb(tuned)  # experts start identical (one draw); make them differ as training would
    return tuned, batch()


@pytest.mark.parametrize("arch", MODELS)
def test_adamix_training_routes_at_random_reproducibly(arch):
    tuned, inputs = _adamix(arch)
    _train_adapters_only(tuned)
    with torch.no_grad():
        outs = []
        for seed in (0, 1, 2, 0):
            torch.manual_seed(seed)
            outs.append(logits(tuned, inputs))
    assert not torch.allclose(outs[0], outs[1]) or not torch.allclose(outs[0], outs[2])  # stochastic
    assert torch.equal(outs[0], outs[3])  # the global torch RNG decides: same seed, same routes


@pytest.mark.parametrize("arch", MODELS)
def test_adamix_eval_is_deterministic_and_is_the_averaged_adapter(arch, tmp_path):
    tuned, inputs = _adamix(arch)
    tuned.eval()
    with torch.no_grad():
        first, second = logits(tuned, inputs), logits(tuned, inputs)
    assert torch.equal(first, second)
    # the same as one plain bottleneck holding the experts' means
    for _, adapter in tuned.adapters_of("default"):
        means = [t.mean(0) for t in (adapter.down_weight, adapter.down_bias, adapter.up_weight, adapter.up_bias)]
        for got, want in zip(adapter.weights(), means, strict=True):
            assert torch.equal(got, want)
    pfeiffer_like = sp.attach(MODELS[arch](), Houlsby(size=4, train_norms=False))
    with torch.no_grad():
        for (_, mixed), (_, single) in zip(tuned.adapters_of("default"), pfeiffer_like.adapters_of("default"),
                                              strict=True):
            for key in ("down_weight", "down_bias", "up_weight", "up_bias"):
                getattr(single, key).copy_(getattr(mixed, key).mean(0))
        torch.testing.assert_close(logits(pfeiffer_like, inputs), first, rtol=1e-5, atol=1e-6)
    # finalize: the experts become that one adapter; saved and reloaded, it computes the same
    tuned.finalize()
    assert tuned.configs["default"].averaged
    with torch.no_grad():
        torch.testing.assert_close(logits(tuned, inputs), first, rtol=1e-5, atol=1e-6)
    trainable, _ = tuned.get_nb_trainable_parameters()
    d = describe(tuned.model).hidden_size
    assert trainable == 2 * describe(tuned.model).num_layers * (2 * d * 4 + d + 4)
    tuned.save_pretrained(tmp_path)
    reloaded = sp.load(MODELS[arch](), tmp_path)
    assert reloaded.configs["default"].averaged
    assert all(a.down_weight.dim() == 2 for _, a in reloaded.adapters_of("default"))
    torch.testing.assert_close(logits(reloaded, inputs), first, rtol=1e-5, atol=1e-6)
    _train_adapters_only(reloaded)  # an averaged adapter no longer routes
    with torch.no_grad():
        torch.testing.assert_close(logits(reloaded, inputs), logits(reloaded, inputs))


def test_adamix_saved_before_finalize_keeps_every_expert(tmp_path):
    tuned, inputs = _adamix()
    tuned.save_pretrained(tmp_path)
    reloaded = sp.load(tiny_bert(), tmp_path, trainable=True)
    assert not reloaded.configs["default"].averaged
    for (_, a), (_, b) in zip(tuned.adapters_of("default"), reloaded.adapters_of("default"), strict=True):
        assert a.down_weight.shape[0] == 4 and torch.equal(a.down_weight, b.down_weight)
        assert torch.equal(a.up_weight, b.up_weight)
    _train_adapters_only(tuned)
    _train_adapters_only(reloaded)
    with torch.no_grad():
        torch.manual_seed(5)
        expected = logits(tuned, inputs)
        torch.manual_seed(5)
        torch.testing.assert_close(logits(reloaded, inputs), expected, rtol=0, atol=0)


def test_adamix_consistency_term_is_positive_and_has_gradients():
    tuned, inputs = _adamix()
    # at attach every expert is the same draw (averaging is then sound, as for model soups): the two
    # routes agree, the term is 0
    fresh = sp.attach(tiny_bert(), AdaMix(size=4))
    for _, a in fresh.adapters_of("default"):
        for t in (a.down_weight, a.down_bias, a.up_weight, a.up_bias):
            assert t.shape[0] == 4 and all(torch.equal(t[0], t[i]) for i in range(1, 4))
        assert a.down_weight.abs().min() > 0 and a.up_weight.abs().max() == 0
    _train_adapters_only(fresh)
    logits(fresh, inputs)
    assert fresh.regularization().item() == 0.0

    _train_adapters_only(tuned)
    torch.manual_seed(0)
    logits(tuned, inputs)
    term = tuned.regularization()
    assert term.item() > 0 and term.requires_grad
    # it is consistency_weight · Σ over layers of mean((f1 − f2)²)
    per_layer = [a._consistency for _, a in tuned.adapters_of("default")]
    assert len(per_layer) == 4 and all(t is not None for t in per_layer)
    torch.testing.assert_close(term, torch.stack(per_layer).sum())
    term.backward()
    # a layer whose two routes drew different experts has a term > 0 that pulls its experts together
    assert sum(t.item() > 0 for t in per_layer) >= 2
    for t, (_, a) in zip(per_layer, tuned.adapters_of("default"), strict=True):
        if t.item() > 0:
            assert sum(p.grad.abs().sum().item() for p in a.parameters()) > 0
    # weight scales it; 0 turns it off; evaluation has none
    half = sp.attach(tiny_bert(), AdaMix(size=4, consistency_weight=0.5))
    half.load_state_dict(tuned.state_dict())
    _train_adapters_only(half)
    torch.manual_seed(0)
    logits(half, inputs)
    torch.testing.assert_close(half.regularization(), 0.5 * term.detach())
    off = sp.attach(tiny_bert(), AdaMix(size=4, consistency_weight=0.0))
    _train_adapters_only(off)
    logits(off, inputs)
    assert off.regularization().item() == 0.0
    tuned.eval()
    logits(tuned, inputs)
    assert tuned.regularization().item() == 0.0
    copy.deepcopy(tuned)  # holding a graph node must not break copying


def test_adamix_model_level_consistency_loss():
    tuned, inputs = _adamix(consistency_weight=0.0)
    _train_adapters_only(tuned)
    torch.manual_seed(0)
    out, kl = consistency_loss(tuned, inputs)
    assert out.logits.shape == (3, 3) and kl.item() > 0 and kl.requires_grad
    kl.backward()
    assert any(a.up_weight.grad.abs().sum() > 0 for _, a in tuned.adapters_of("default"))
    tuned.eval()
    _, zero = consistency_loss(tuned, inputs)
    assert zero.item() == pytest.approx(0.0, abs=1e-7)
    # per-token logits (Llama): only real tokens count; symmetric KL by definition
    llama, tokens = _adamix("llama", consistency_weight=0.0)
    _train_adapters_only(llama)
    torch.manual_seed(1)
    with torch.no_grad():
        first, second = logits(llama, tokens), logits(llama, tokens)
        torch.manual_seed(1)
        _, got = consistency_loss(llama, tokens)
    keep = tokens["attention_mask"].flatten().bool()
    p, q = (F.log_softmax(t.flatten(0, 1)[keep], -1) for t in (first, second))
    want = 0.5 * ((p.exp() * (p - q)).sum(-1) + (q.exp() * (q - p)).sum(-1)).mean()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
