"""QLoRA: every weight-space method on a 4-bit NF4 base (bitsandbytes ``Linear4bit``, on CPU).

Tiny random Llama (causal LM) and BERT (sequence classifier) models are built from configs here, with
layer sizes that are multiples of the NF4 block (64) as in real models. For every registered method
of kind "weight" that adapts "linear" layers: it attaches to the 4-bit model (identity at attach),
its loss falls in a few steps, merged and unmerged outputs agree within the requantisation error
(bounded per layer, see test_merge_is_within_the_requantisation_error), unmerge restores the 4-bit
weight exactly, merging after dequantising is exact, save/load round-trips, and gradient
checkpointing gives the same gradients.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes: pip install bitsandbytes")

import subpeft as sp  # noqa: E402
from subpeft.core.layer import AdaptedLayer  # noqa: E402
from subpeft.core.layers import base_weight, dims, factory, is_quantized, layer_type, weight_2d  # noqa: E402
from subpeft.quant import (  # noqa: E402
    PagedOptimizerWarning,
    QuantizationError,
    QuantizedMergeWarning,
    dequantize,
    dequantize_model,
    load_quantized,
    merge_errors,
    paged_adamw,
    quantize,
    requantize,
    storage,
)

from .tiny_models import MLP  # noqa: E402

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
VOCAB = 96
# the largest half-gap between neighbouring NF4 levels (-1 and -0.6962): see nf4_bound
NF4_HALF_GAP = 0.1519


def nf4_bound(W: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Per-entry bound on |Q − W| for Q = NF4(W), blocks of 64: each w/a (a = its block's absmax) is
    rounded to the nearest of the 16 levels c in [-1, 1], stored as c·â with â the stored block
    constant (â = a without double quantisation; an 8-bit approximation of it with). So
    |c·â − w| ≤ |c·a − w| + |c|·|â − a| ≤ 0.1519·a + |â − a|; â = max|Q| over the block (the
    absmax entry gets c = ±1)."""
    a = W.reshape(-1, 64).abs().amax(1, keepdim=True)
    a_hat = Q.reshape(-1, 64).abs().amax(1, keepdim=True)
    return NF4_HALF_GAP * a + (a_hat - a).abs() + 1e-6

METHODS = [i.name for i in sp.list_methods() if i.kind == "weight" and "linear" in i.layer_types]
MERGEABLE = [m for m in METHODS if sp.get_method(m).mergeable]
OPTIONS = {
    # orth_reg 0.2: the penalty the old default (0.1, averaged over layers) asked for; PEFT's 0.5 slows 6 steps
    "adalora": dict(total_steps=10, init_warmup=1, final_warmup=2, mask_interval=1, orth_reg=0.2),
    "lora_dash": dict(prelaunch_steps=2),
    "bitfit": dict(targets="all"),
}


def tiny_llama(seed: int = 0, tie: bool = False) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg)


def tiny_bert(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     initializer_range=0.2)  # a head whose logits are not ~0: the adapters move the loss
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BertForSequenceClassification(cfg)


MODELS = {"llama": (tiny_llama, LLAMA_TARGETS), "bert": (tiny_bert, BERT_TARGETS)}
LR = {"llama": 2e-2, "bert": 5e-3}  # Adam, 6 steps: every method's loss falls by > 0.01 (ln 3 ≈ 1.1 for BERT)
IDS = torch.randint(1, VOCAB, (4, 12), generator=torch.Generator().manual_seed(1))
LABELS = torch.tensor([0, 1, 2, 1])


def cases(methods: list[str], both: bool) -> list:
    """(method, model) pairs: every method on Llama (BitFit on BERT: Llama's linears have no bias),
    and with ``both`` every method on BERT too."""
    out = []
    for m in methods:
        models = ["bert"] if m == "bitfit" else (["llama", "bert"] if both else ["llama"])
        out += [pytest.param(m, model, id=f"{m}-{model}") for model in models]
    return out


def config(method: str, model: str, **overrides):
    options = {"targets": MODELS[model][1], **OPTIONS.get(method, {}), **overrides}
    return sp.get_method(method).config_cls(**options)


def quantized(model: str, seed: int = 0) -> nn.Module:
    return quantize(MODELS[model][0](seed))


def attach(model: str, method: str, seed: int = 0, **overrides):
    """The 4-bit model with the method attached; adapter inits that draw from the global RNG are seeded."""
    base = quantized(model, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return sp.attach(base, config(method, model, **overrides))


def loss_of(tuned, model: str) -> torch.Tensor:
    if model == "llama":
        return tuned(input_ids=IDS, labels=IDS).loss
    return tuned(input_ids=IDS, labels=LABELS).loss


def out(tuned) -> torch.Tensor:
    return tuned(input_ids=IDS).logits


def perturb(tuned, seed: int = 3, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


def packed_state(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The stored 4-bit codes and block constants of every 4-bit layer."""
    return {n: (m.weight.data.clone(), m.weight.quant_state.absmax.clone())
            for n, m in model.named_modules() if is_quantized(m) and not isinstance(m, AdaptedLayer)}


# -- quantising -------------------------------------------------------------------------------------
def test_quantize_replaces_linears_and_keeps_heads():
    bert = quantize(tiny_bert())
    assert type(bert.classifier) is nn.Linear  # the classification head stays in full precision
    q = bert.bert.encoder.layer[0].attention.self.query
    assert is_quantized(q) and q.weight.dtype == torch.uint8 and q.weight.quant_state.quant_type == "nf4"
    assert q.weight.quant_state.nested  # double quantisation
    assert is_quantized(bert.bert.pooler.dense)
    llama = quantize(tiny_llama(), skip=["down_proj"])
    assert type(llama.lm_head) is nn.Linear  # the output embeddings stay
    assert type(llama.model.layers[0].mlp.down_proj) is nn.Linear and is_quantized(llama.model.layers[0].mlp.up_proj)
    tied = quantize(tiny_llama(tie=True))
    assert type(tied.lm_head) is nn.Linear and tied.lm_head.weight is tied.model.embed_tokens.weight
    mlp = quantize(MLP())  # any nn.Module, no transformers config: "head" stays
    assert is_quantized(mlp.fc1) and type(mlp.head) is nn.Linear


def test_quantize_rejects_bad_options_and_wrapped_models():
    with pytest.raises(QuantizationError, match="bits must be 4"):
        quantize(MLP(), bits=8)
    with pytest.raises(QuantizationError, match="quant_type"):
        quantize(MLP(), quant_type="int4")
    tuned = sp.attach(MLP(), sp.LoRA(r=2, targets=["fc1"]))
    with pytest.raises(QuantizationError, match="quantise the base model first"):
        quantize(tuned)


def test_layer_accessors_read_the_dequantised_weight():
    lin = nn.Linear(128, 192)
    q = quantize(nn.Sequential(lin))[0]
    assert layer_type(q) == "linear" and dims(q, "linear") == (192, 128)
    assert factory(q) == {"device": torch.device("cpu"), "dtype": torch.float32}
    W = weight_2d(q, "linear")
    assert W.shape == (192, 128) and W.dtype == torch.float32
    assert torch.equal(W, base_weight(q)) and torch.equal(W, dequantize(q))
    # the 4-bit forward computes with exactly this W
    x = torch.randn(5, 128)
    torch.testing.assert_close(q(x), x @ W.t() + lin.bias, atol=1e-5, rtol=1e-5)
    # NF4's bound per block of 64 holds, and is nearly reached
    err = (W - lin.weight.detach()).reshape(-1, 64).abs()
    bound = nf4_bound(lin.weight.detach(), W)
    assert (err <= bound).all() and (err / bound).max() > 0.8
    # eval mode without grad: bitsandbytes' CPU repacking (AVX512-BF16 machines) stays off, so the
    # output is still exactly Q(W)·x and the stored format (double quantisation included) is kept
    q.eval()
    with torch.no_grad():
        torch.testing.assert_close(q(x), x @ W.t() + lin.bias, atol=1e-5, rtol=1e-5)
    assert not getattr(q.weight.quant_state, "packing_format_for_cpu", False) and q.weight.quant_state.nested
    small = quantize(MLP()).eval()  # d_out = 10, 7: the repacking would fail on these
    with torch.no_grad():
        h = torch.randn(3, 6)
        torch.testing.assert_close(small.fc1(h), h @ dequantize(small.fc1).t() + small.fc1.bias, atol=1e-5, rtol=1e-5)
    # the full-precision path is untouched: the weight itself, no copy
    assert base_weight(lin) is lin.weight and weight_2d(lin, "linear") is lin.weight


def test_bytes_per_parameter_nf4_double_quant():
    """Bytes per quantised parameter at SmolLM2's shapes, exactly as the storage formula says."""
    def layers():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(576, 1536, bias=False), nn.Linear(1536, 576, bias=False))

    n = 2 * 576 * 1536
    dq, plain = storage(quantize(layers(), double_quant=True)), storage(quantize(layers(), double_quant=False))
    assert dq["quantized_params"] == plain["quantized_params"] == n
    # codes: n/2 bytes; block constants: float32 per 64 (plain) or uint8 per 64 + float32 per 64·256
    assert plain["quantized_bytes"] == n // 2 + 4 * n // 64 + 2 * 16 * 4  # + one 16-level code table a layer
    blocks = n // 64
    nested = 2 * 4 * -(-(blocks // 2) // 256)  # float32 per 256 constants, per layer
    assert dq["quantized_bytes"] == n // 2 + blocks + nested + 2 * (16 * 4 + 4 + 256 * 4)  # + offset, 8-bit map
    assert dq["bytes_per_quantized_param"] <= 0.57 and plain["bytes_per_quantized_param"] <= 0.5626
    assert dq["bytes_per_quantized_param"] < plain["bytes_per_quantized_param"]


def test_requantize_reports_its_error():
    q = quantize(nn.Sequential(nn.Linear(64, 96)))[0]
    target = dequantize(q) + 0.01 * torch.randn(96, 64)
    err = requantize(q, target)
    actual = dequantize(q) - target
    assert err["max_abs"] == pytest.approx(actual.abs().max().item(), rel=1e-6)
    assert err["rel_fro"] == pytest.approx((actual.norm() / target.norm()).item(), rel=1e-5)
    assert 0 < err["rel_fro"] < 0.2


def test_load_quantized_from_a_folder(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "llama")
    tiny_bert().save_pretrained(tmp_path / "bert")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        llama = load_quantized(tmp_path / "llama")
        bert = load_quantized(str(tmp_path / "bert"), num_labels=3, double_quant=False)
    assert type(llama).__name__ == "LlamaForCausalLM" and type(llama.lm_head) is nn.Linear
    assert is_quantized(llama.model.layers[1].self_attn.q_proj)
    assert type(bert).__name__ == "BertForSequenceClassification" and type(bert.classifier) is nn.Linear
    assert not bert.bert.encoder.layer[0].attention.self.query.weight.quant_state.nested
    # the same weights as quantising the model in memory
    ref = quantize(tiny_llama())
    torch.testing.assert_close(out(llama), out(ref), atol=1e-5, rtol=1e-5)
    with pytest.raises(QuantizationError, match="neither a local model folder"):
        load_quantized(tmp_path / "nothing")


# -- every method on the 4-bit base ----------------------------------------------------------------
@pytest.mark.parametrize("method,model", cases(METHODS, both=True))
def test_method_attaches_and_trains_on_4bit(method, model):
    base = quantized(model)
    y0 = out(base).detach()
    before = packed_state(base)
    tuned = sp.attach(base, config(method, model))
    torch.testing.assert_close(out(tuned), y0, atol=1e-5, rtol=0)  # identity at attach
    tuned.train()
    opt = torch.optim.Adam([p for p in tuned.parameters() if p.requires_grad], lr=LR[model])
    losses = []
    for step in range(6):
        loss = loss_of(tuned, model)
        losses.append(loss.item())
        (loss + tuned.regularization()).backward()
        opt.step()
        tuned.step(step + 1)
        opt.zero_grad()
    assert losses[-1] < losses[0] - 0.01, f"{method}: loss did not fall on the 4-bit base: {losses}"
    after = packed_state(tuned.model)
    assert {k.replace(".base_layer", "") for k in after} == set(before)
    for k, (codes, absmax) in after.items():  # the 4-bit base is frozen: codes and constants unchanged
        c0, a0 = before[k.replace(".base_layer", "")]
        assert torch.equal(codes, c0) and torch.equal(absmax, a0)


@pytest.mark.parametrize("method,model", cases(MERGEABLE, both=False))
def test_merge_is_within_the_requantisation_error(method, model):
    """Merged vs unmerged, per adapted layer. The layer now holds Q(W'), W' the exact merged weight
    (merged_params before the merge): the reported max-abs / relative Frobenius errors are those of
    Q(W') − W', and every entry obeys NF4's bound |Q(w) − w| ≤ 0.152 × its block's absmax (2% more
    for double quantisation's 8-bit block constants). On the inputs each layer saw, merged and
    unmerged outputs then differ by |Δy_i| ≤ max|Q(W') − W'|·‖x‖₁ (+ float round-off).
    Unmerge restores the 4-bit weight exactly."""
    tuned = attach(model, method)
    perturb(tuned)
    tuned.eval()
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    layers = dict(tuned.adapted_layers())
    hooks = [layer.register_forward_hook(lambda m, a, y, n=n: seen.__setitem__(n, (a[0].detach(), y.detach())))
             for n, layer in layers.items()]
    with torch.no_grad():
        y = out(tuned)
    for h in hooks:
        h.remove()
    before = packed_state(tuned.model)
    # layers whose merge writes W (BitFit's writes only biases: exact, nothing requantised)
    requantised = {n for n, layer in layers.items()
                   if is_quantized(layer.base_layer) and "weight" in layer.adapters["default"].merged_params()}
    with torch.no_grad():  # W' = the exact merged weight, in float, per requantised layer
        exact = {n: layers[n].adapters["default"].merged_params()["weight"].float() for n in requantised}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tuned.merge()
    assert any(issubclass(w.category, QuantizedMergeWarning) for w in caught) == bool(requantised)
    errors = merge_errors(tuned)
    assert set(errors) == requantised
    assert requantised or method == "bitfit"
    with torch.no_grad():
        for name, (x, y_layer) in seen.items():
            e = errors.get(name, {}).get("default", {"max_abs": 0.0, "rel_fro": 0.0})
            if name in requantised:  # the layer holds Q(W'): the reported error is its real one, within NF4's bound
                err = dequantize(layers[name].base_layer).float() - exact[name]
                assert e["max_abs"] == pytest.approx(err.abs().max().item(), rel=1e-5, abs=1e-7)
                assert e["rel_fro"] == pytest.approx((err.norm() / exact[name].norm()).item(), rel=1e-4)
                assert (err.reshape(-1, 64).abs() <= nf4_bound(exact[name], exact[name] + err)).all()
                assert 0 < e["rel_fro"] < 0.2
            dy = (layers[name](x) - y_layer).abs()
            bound = e["max_abs"] * x.abs().sum(-1, keepdim=True) + 1e-5 * (1 + y_layer.abs())
            assert (dy <= bound).all(), f"{name}: merged output off by {(dy - bound).max().item():.3g} beyond the bound"
        y_merged = out(tuned)
    assert torch.equal(y_merged, y) or requantised  # only requantising changes anything
    tuned.unmerge()
    assert merge_errors(tuned) == {}
    for k, (codes, absmax) in packed_state(tuned.model).items():
        assert torch.equal(codes, before[k][0]) and torch.equal(absmax, before[k][1])
    with torch.no_grad():
        assert torch.equal(out(tuned), y)


@pytest.mark.parametrize("method,model", cases(MERGEABLE, both=False))
def test_dequantized_merge_is_exact(method, model):
    """merge_and_unload(dequantize=True): dequantise the base (under its adapters), then merge in
    full precision: no requantisation, so merged == unmerged to float round-off."""
    tuned = attach(model, method)
    perturb(tuned)
    tuned.eval()
    with torch.no_grad():
        y = out(tuned)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", QuantizedMergeWarning)
            tuned.merge()  # merged into 4 bits first: dequantize_model unmerges, dequantises, merges again
        dequantize_model(tuned)
        assert tuned.merged_adapters == ["default"]
        assert not any(is_quantized(m) for m in tuned.modules())
        torch.testing.assert_close(out(tuned), y, atol=1e-4, rtol=1e-4)
        plain = tuned.merge_and_unload()
        assert not any(isinstance(m, AdaptedLayer) or is_quantized(m) for m in plain.modules())
        torch.testing.assert_close(out(plain), y, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method,model", cases(MERGEABLE, both=False)[:3])
def test_merge_and_unload_dequantize_public_api(method, model):
    """The public spelling: tuned.merge_and_unload(dequantize=True) gives a full-precision model whose
    output equals the unmerged 4-bit adapted model to float round-off (no requantisation)."""
    tuned = attach(model, method)
    perturb(tuned)
    tuned.eval()
    with torch.no_grad():
        y = out(tuned)
        with warnings.catch_warnings():
            warnings.simplefilter("error", QuantizedMergeWarning)  # an exact merge warns about nothing
            plain = tuned.merge_and_unload(dequantize=True)
        assert not any(isinstance(m, AdaptedLayer) or is_quantized(m) for m in plain.modules())
        torch.testing.assert_close(out(plain), y, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method,model", cases(METHODS, both=False))
def test_save_load_round_trip_on_4bit(method, model, tmp_path):
    tuned = attach(model, method)
    perturb(tuned)
    tuned.eval()
    with torch.no_grad():
        y = out(tuned)
    tuned.save_pretrained(tmp_path)
    loaded = sp.load(quantized(model), tmp_path)
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(out(loaded), y)
    saved, back = tuned.adapter_state_dict("default"), loaded.adapter_state_dict("default")
    assert saved.keys() == back.keys()
    assert all(torch.equal(saved[k], back[k]) for k in saved)


@pytest.mark.parametrize("method,model", cases(METHODS, both=False))
def test_gradient_checkpointing_gives_the_same_gradients(method, model):
    def grads(checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
        tuned = attach(model, method)
        perturb(tuned)
        if checkpointing:
            enable = getattr(tuned.model, "activation_checkpointing_enable", None) or tuned.model.gradient_checkpointing_enable
            enable()
        tuned.train()
        calls = []
        probe = next(m for m in tuned.modules() if is_quantized(m) and not isinstance(m, AdaptedLayer))
        probe.register_forward_hook(lambda *_: calls.append(1))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(5)  # the same draws (Diff pruning's gate samples) in both runs
            loss_of(tuned, model).backward()
        return {n: p.grad for n, p in tuned.named_parameters() if p.requires_grad}, len(calls)

    plain, calls_plain = grads(False)
    ckpt, calls_ckpt = grads(True)
    assert calls_ckpt == 2 * calls_plain == 2  # a 4-bit layer ran again in backward: checkpointing is on
    assert plain.keys() == ckpt.keys()
    # (LoRA-Dash's phase-2 tensors get no gradient in phase 1, with or without checkpointing)
    assert {n for n, g in plain.items() if g is None} == {n for n, g in ckpt.items() if g is None}
    assert any(g is not None and g.abs().sum() > 0 for g in plain.values())
    for name, g in plain.items():
        if g is not None:
            torch.testing.assert_close(ckpt[name], g, atol=1e-6, rtol=1e-5)


# -- paged optimizers -------------------------------------------------------------------------------
def _train_with(opt_factory) -> list[float]:
    tuned = attach("llama", "lora")
    tuned.train()
    opt = opt_factory([p for p in tuned.parameters() if p.requires_grad])
    losses = []
    for _ in range(5):
        loss = loss_of(tuned, "llama")
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    return losses


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the fallback on a machine without CUDA")
@pytest.mark.parametrize("bits", [32, 8])
def test_paged_adamw_falls_back_on_cpu_with_a_warning(bits):
    made = []

    def factory(params):
        with pytest.warns(PagedOptimizerWarning, match="paging needs CUDA"):
            opt = paged_adamw(params, bits=bits, lr=1e-2, weight_decay=0.0, min_8bit_size=64)
        made.append(opt)
        return opt

    losses = _train_with(factory)
    assert losses[-1] < losses[0] - 0.05
    import bitsandbytes as bnb

    expected = torch.optim.AdamW if bits == 32 else bnb.optim.AdamW8bit
    assert type(made[0]) is expected
    if bits == 8:  # the 8-bit state is really 8-bit (tensors of at least min_8bit_size numbers)
        states = [s for s in made[0].state.values() if "state1" in s]
        assert any(s["state1"].dtype == torch.uint8 for s in states)


def test_paged_adamw_picks_bitsandbytes_paged_classes_where_cuda_is(monkeypatch):
    """The CUDA branch's choice of class (constructed only: no CUDA here to step it on)."""
    import bitsandbytes as bnb

    from subpeft.quant import paged

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(paged, "_params_on_cuda", lambda params: True)
    p = [nn.Parameter(torch.zeros(4))]
    assert type(paged_adamw(p, bits=32)) is bnb.optim.PagedAdamW32bit
    assert type(paged_adamw(p, bits=8)) is bnb.optim.PagedAdamW8bit
    with pytest.raises(QuantizationError, match="bits must be 8 or 32"):
        paged_adamw(p, bits=16)


def test_deepcopy_of_a_tuned_4bit_model_computes_the_same():
    """A deep copy of a tuned 4-bit model (Params4bit's own __deepcopy__) computes the same."""
    tuned = attach("llama", "lora")
    perturb(tuned)
    tuned.eval()
    clone = copy.deepcopy(tuned)
    with torch.no_grad():
        assert torch.equal(out(clone), out(tuned))
