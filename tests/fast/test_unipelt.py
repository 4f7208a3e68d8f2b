"""UniPELT on tiny random BERT and Llama models: each part computes its gated form at its place."""

from __future__ import annotations

import pytest
import torch

import subpeft as sp
from subpeft.core.arch import describe
from subpeft.core.errors import ConfigError, SubpeftError
from subpeft.mechanisms.bottleneck import ACTIVATIONS
from subpeft.methods.frameworks.unipelt import UniPELT, UniPELTAdapter

from .tiny_transformers import batch, tiny_bert, tiny_llama

MODELS = {"bert": tiny_bert, "llama": tiny_llama}
PAD_SIDE = {"bert": "right", "llama": "left"}


def perturb(tuned, name: str = "default", seed: int = 0, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned._adapter_parameters(name):
            p.add_(scale * torch.randn(p.shape, generator=g))


def attach(arch: str, **options):
    torch.manual_seed(0)
    return sp.attach(MODELS[arch](), UniPELT(size=4, num_virtual_tokens=3, projection_dim=16, **options))


@pytest.mark.parametrize("arch", MODELS)
def test_parts_sit_where_the_architecture_says_and_count_as_the_formula(arch):
    tuned = attach(arch)
    parts = describe(tuned.model)
    roles = {n: layer.adapters["default"].role for n, layer in tuned.adapted_layers()}
    assert roles == {**{n: "query" for n in parts.per_block("query")}, **{n: "value" for n in parts.per_block("value")},
                     **{n: "adapter" for n in parts.per_block("ffn_out")}}
    d, L, p, h, r, m = parts.hidden_size, parts.num_layers, 3, 16, 8, 4
    d_kv = parts.num_kv_heads * parts.head_dim
    q_out = tuned.model.get_submodule(parts.per_block("query")[0]).base_layer.out_features
    v_out = tuned.model.get_submodule(parts.per_block("value")[0]).base_layer.out_features
    lora = L * (r * (d + q_out) + (d + 1) + (d + 1) + r * (d + v_out) + (d + 1))  # + gates; q also the prefix gate
    adapter = L * (2 * d * m + d + m + d + 1)
    prefix_mlp = p * d + d * h + h + h * 2 * L * d_kv + 2 * L * d_kv
    trainable, _ = tuned.get_nb_trainable_parameters()
    assert trainable == lora + adapter + prefix_mlp
    layers = [(n, layer.base_layer, layer.layer_type) for n, layer in tuned.adapted_layers()]
    assert UniPELTAdapter.model_num_params(tuned.configs["default"], layers) == trainable
    tuned.finalize()  # the prefix MLP folds into its table
    assert tuned.configs["default"].folded
    assert tuned.get_nb_trainable_parameters()[0] == lora + adapter + p * 2 * L * d_kv
    assert UniPELTAdapter.model_num_params(tuned.configs["default"], layers) == lora + adapter + p * 2 * L * d_kv


@pytest.mark.parametrize("arch", MODELS)
def test_lora_and_adapter_parts_are_gated_per_token(arch):
    tuned = attach(arch)
    perturb(tuned)
    parts = describe(tuned.model)
    seen = {}
    for role in ("value", "ffn_out"):
        layer = tuned.model.get_submodule(parts.per_block(role)[1])
        layer.register_forward_hook(lambda mod, args, out, role=role: seen.update({role: (mod, args[0], out)}))
    with torch.no_grad():
        tuned(**batch(padding_side=PAD_SIDE[arch]))
        layer, x, y = seen["value"]
        a = layer.adapters["default"]
        gate = torch.sigmoid(x @ a.gate.weight.T + a.gate.bias)  # (batch, n, 1): one gate per token
        lora = a.lora
        expected = layer.base_layer(x) + gate * (x @ lora.lora_A.T @ lora.lora_B.T) * lora.scaling
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
        assert gate.flatten().std() > 1e-3  # the gate varies from token to token
        layer, x, y = seen["ffn_out"]
        a = layer.adapters["default"]
        h = layer.base_layer(x)
        b = a.bottleneck
        f = ACTIVATIONS["relu"](h @ b.down_weight.T + b.down_bias) @ b.up_weight.T + b.up_bias
        torch.testing.assert_close(y, h + torch.sigmoid(h @ a.gate.weight.T + a.gate.bias) * f, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", MODELS)
def test_prefix_is_prefix_tuning_with_each_layer_scaled_by_its_gate(arch):
    """One row: the tuned model equals the base model with prefix tuning whose layer-ℓ keys and values
    are the UniPELT prefix times G_P of layer ℓ (mean over the row's tokens of sigmoid(w·h + b))."""
    tuned = attach(arch)
    perturb(tuned)
    parts = describe(tuned.model)
    with torch.no_grad():  # LoRA and adapter parts back to the identity: only the gated prefix acts
        for _, a in tuned.adapters_of("default"):
            (a.bottleneck.up_weight if a.role == "adapter" else a.lora.lora_B).zero_()
            if a.role == "adapter":
                a.bottleneck.up_bias.zero_()
    row = {k: v[:1] for k, v in batch(padding_side=PAD_SIDE[arch]).items()}
    inputs = {}
    for i, name in enumerate(parts.per_block("query")):
        tuned.model.get_submodule(name).register_forward_hook(lambda m, args, out, i=i: inputs.update({i: args[0]}))
    with torch.no_grad():
        got = tuned(**row).logits
        shared = tuned.shared["default"]
        table = shared.prefix.table().clone()
        d_kv = parts.num_kv_heads * parts.head_dim
        for i, name in enumerate(parts.per_block("query")):
            a = tuned.model.get_submodule(name).adapters["default"]
            g = torch.sigmoid(inputs[i] @ a.prefix_gate.weight.T + a.prefix_gate.bias).mean()
            assert 0.05 < g < 0.95
            table[:, 2 * i * d_kv:(2 * i + 2) * d_kv] *= g
    reference = sp.attach(MODELS[arch](), sp.PrefixTuning(num_virtual_tokens=3, projection_dim=16))
    reference.finalize()
    with torch.no_grad():
        reference.shared["default"].prefix.prompt_embeddings.copy_(table)
        want = reference(**row).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with tuned.disable_adapter():  # and the prefix matters
        assert not torch.allclose(tuned(**row).logits, got, atol=1e-3)


@pytest.mark.parametrize("arch", MODELS)
def test_a_rows_output_does_not_depend_on_its_padding(arch):
    tuned = attach(arch)
    perturb(tuned)
    tuned.eval()
    padded = batch(padding_side=PAD_SIDE[arch])
    with torch.no_grad():
        out = tuned(**padded).logits
        for i in range(3):
            keep = padded["attention_mask"][i].bool()
            alone = tuned(input_ids=padded["input_ids"][i:i + 1, keep],
                          attention_mask=padded["attention_mask"][i:i + 1, keep]).logits
            if arch == "bert":
                torch.testing.assert_close(out[i:i + 1], alone, rtol=1e-4, atol=1e-5)
            else:
                torch.testing.assert_close(out[i:i + 1, keep], alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", MODELS)
def test_every_part_and_gate_gets_gradients(arch):
    tuned = attach(arch)
    perturb(tuned, scale=0.05)
    tuned.train()
    x = batch(padding_side=PAD_SIDE[arch])
    labels = torch.tensor([0, 1, 2]) if arch == "bert" else x["input_ids"].masked_fill(x["attention_mask"] == 0, -100)
    tuned(**x, labels=labels).loss.backward()
    missing = [n for n, p in tuned.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not missing, missing


def test_finalized_saved_and_reloaded_adapter_computes_the_same(tmp_path):
    tuned = attach("llama")
    perturb(tuned)
    x = batch(padding_side="left")
    with torch.no_grad():
        before = tuned(**x).logits
    tuned.save_pretrained(tmp_path / "training")  # saved folded even before finalize
    tuned.finalize()
    with torch.no_grad():
        torch.testing.assert_close(tuned(**x).logits, before, rtol=1e-5, atol=1e-6)
    tuned.save_pretrained(tmp_path / "final")
    for directory in ("training", "final"):
        from safetensors.torch import load_file

        tensors = load_file(str(tmp_path / directory / "adapter_model.safetensors"))
        assert tensors["base_model.shared.prefix.prompt_embeddings"].shape == (3, 2 * 2 * 2 * 8)
        assert not any("transform" in k for k in tensors)
        loaded = sp.load(tiny_llama(), tmp_path / directory)
        assert loaded.configs["default"].folded
        with torch.no_grad():
            torch.testing.assert_close(loaded(**x).logits, before, rtol=1e-5, atol=1e-6)


def test_generation_starts_with_the_forward_argmax_and_uses_the_cache():
    tuned = attach("llama")
    perturb(tuned)
    x = batch(padding_side="left")
    with torch.no_grad():
        nxt = tuned(**x).logits[:, -1].argmax(-1)
        out = tuned.generate(**x, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (3, x["input_ids"].shape[1] + 4)
    assert torch.equal(out[:, x["input_ids"].shape[1]], nxt)


@pytest.mark.parametrize("side", ["left", "none"])
def test_cached_generation_equals_incremental_decoding_with_the_returned_cache(side):
    """generate() (which passes its cache as ``cache=`` from transformers 5.25 on, ``past_key_values=``
    before) continues from the gated prefix of the prompt call exactly as a hand-written loop does that
    hands each call's returned cache to the next one."""
    from subpeft.core.prompt import output_cache_field

    tuned = attach("llama")
    perturb(tuned)
    tuned.model.generation_config.eos_token_id = None
    x = batch(padding_side="left")
    if side == "none":
        x = {k: v[:1] for k, v in x.items()}  # the unpadded row alone
    with torch.no_grad():
        out = tuned.generate(**x, max_new_tokens=4, do_sample=False, pad_token_id=0)
        ids, mask = x["input_ids"], x["attention_mask"]
        step = tuned(input_ids=ids, attention_mask=mask, use_cache=True)
        for _ in range(4):
            nxt = step.logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
            step = tuned(input_ids=nxt, attention_mask=mask, past_key_values=step[output_cache_field(step)],
                         use_cache=True)
    assert torch.equal(out, ids)


def test_unload_removes_the_routing_and_only_one_unipelt_runs_at_a_time():
    tuned = attach("llama")
    tuned.add_adapter("other", UniPELT(size=4, num_virtual_tokens=3, projection_dim=16))
    tuned.set_adapter(["default", "other"])
    with pytest.raises(SubpeftError, match="only one UniPELT adapter"):
        tuned(**batch())
    plain = tuned.unload()
    plain(**batch())  # the first call after the last UniPELT adapter is gone removes the hooks
    assert not plain._forward_pre_hooks and not plain._forward_hooks


def test_unsupported_architecture_and_explicit_targets_are_clear_errors():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16))
    with pytest.raises(ConfigError, match="does not know the architecture 'gpt2'"):
        sp.attach(gpt2, UniPELT())
    with pytest.raises(ConfigError, match="leave targets unset"):
        sp.attach(tiny_bert(), UniPELT(targets=["query"]))


def test_a_prompt_adapter_and_unipelt_cannot_run_together_but_each_runs_alone():
    tuned = attach("llama")
    x = batch()
    with torch.no_grad():
        alone = tuned(**x).logits
    tuned.add_adapter("prompt", sp.PromptTuning(num_virtual_tokens=2))
    tuned.set_adapter(["default", "prompt"])
    with pytest.raises(SubpeftError, match="cannot run together"):
        tuned(**x)
    tuned.set_adapter("default")
    with torch.no_grad():
        torch.testing.assert_close(tuned(**x).logits, alone, rtol=0, atol=0)
    tuned.set_adapter("prompt")
    with torch.no_grad():
        prompted = tuned(**x).logits
    assert prompted.shape == alone.shape and not torch.allclose(prompted, alone)
