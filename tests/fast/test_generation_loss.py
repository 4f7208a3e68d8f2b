"""The causal LM workload's loss computes the output layer on the answer positions only.

What is checked: the loss and every trainable gradient equal the forward's own ``loss`` with ``labels``
(plain model, LoRA, LoRA on the output layer itself, tied embeddings, prefix tuning); the output layer
really sees only the answer rows (that is the speed-up); input-prompt methods, whose output layer sees
virtual positions too, fall back to the full logits and still give the forward's loss; the answer loss
of a split is unchanged; the training loop uses it.
"""

from __future__ import annotations

import pytest
import torch

import subpeft as sp
from subpeft.app.workloads import IGNORE, Generation, output_head

from .tiny_transformers import batch, tiny_llama

PROMPT = 3  # the first tokens of each row are the prompt (labels -100)


def _labelled(padding_side: str = "right") -> dict[str, torch.Tensor]:
    x = batch(seed=4, batch_size=3, length=9, padding_side=padding_side)
    labels = x["input_ids"].masked_fill(x["attention_mask"] == 0, IGNORE)
    first = x["attention_mask"].argmax(1)  # each row's first real token
    for row, start in enumerate(first.tolist()):
        labels[row, : start + PROMPT] = IGNORE
    return {**x, "labels": labels}


def _rows_seen(model) -> list[int]:
    seen: list[int] = []
    output_head(model).register_forward_hook(lambda m, args, out: seen.append(args[0].shape[:-1].numel()))
    return seen


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _compare(model, x, *, gathered: bool) -> None:
    model.train()
    seen = _rows_seen(model)
    want = model(**x).loss
    want.backward()
    g_want = _grads(model)
    model.zero_grad(set_to_none=True)
    got = Generation.loss(None, model, x)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    g_got = _grads(model)
    assert g_got.keys() == g_want.keys() and g_got
    for name in g_want:
        torch.testing.assert_close(g_got[name], g_want[name], rtol=1e-5, atol=1e-6, msg=name)
    targets = int((x["labels"][:, 1:] != IGNORE).sum())
    full = seen[0]
    assert full == x["input_ids"].numel() or not gathered
    if gathered:
        assert seen[1] == targets < full  # the output layer ran on the answer rows only
    else:
        assert seen[1] == full


@pytest.mark.parametrize("side", ["right", "left"])
def test_plain_model_loss_and_gradients_equal_the_forwards(side):
    _compare(tiny_llama(), _labelled(side), gathered=True)


def test_tied_embeddings_get_the_same_gradient():
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _compare(model, _labelled(), gathered=True)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "lm_head"]])
def test_lora_loss_and_gradients_equal_the_forwards(targets):
    torch.manual_seed(0)
    tuned = sp.attach(tiny_llama(), sp.LoRA(r=2, targets=targets))
    with torch.no_grad():  # B = 0 at init would hide a wrong gradient of A
        for p in tuned.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    _compare(tuned, _labelled(), gathered=True)


def test_prefix_tuning_keeps_one_row_per_position_and_is_gathered():
    torch.manual_seed(0)
    tuned = sp.attach(tiny_llama(), sp.PrefixTuning(num_virtual_tokens=3, projection_dim=16))
    _compare(tuned, _labelled(), gathered=True)


@pytest.mark.parametrize("config", [lambda: sp.PromptTuning(num_virtual_tokens=3),
                                    lambda: sp.PTuning(num_virtual_tokens=3, encoder_hidden_size=8)])
def test_input_prompts_fall_back_to_the_full_logits(config):
    """Virtual tokens go through the output layer too (the adapter drops their logits after it): the rows
    do not line up with the labels, so nothing is gathered and the loss is taken from the full logits."""
    torch.manual_seed(0)
    tuned = sp.attach(tiny_llama(), config())
    x = _labelled()
    x["labels"][0, PROMPT] = x["input_ids"][0, PROMPT]  # a target right after the prompt
    tuned.train()
    seen = _rows_seen(tuned)
    want = tuned(**x).loss
    got = Generation.loss(None, tuned, x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert seen[0] == seen[1] == x["input_ids"].shape[0] * (x["input_ids"].shape[1] + 3)


def test_a_model_without_an_output_layer_uses_the_forwards_loss():
    class Plain(torch.nn.Module):
        def forward(self, input_ids, attention_mask, labels):
            return type("Out", (), {"loss": torch.tensor(1.25)})()

    assert output_head(Plain()) is None
    assert float(Generation.loss(None, Plain(), _labelled())) == 1.25


def test_the_hook_is_removed_even_when_the_forward_fails():
    model = tiny_llama()
    x = _labelled()
    x["input_ids"][0, 0] = 10_000  # out of the vocabulary: the embedding raises
    with pytest.raises(IndexError):
        Generation.loss(None, model, x)
    assert not model.lm_head._forward_pre_hooks


def test_a_compiled_model_gets_the_forwards_loss_without_hooks():
    """torch.compile'd models keep the forward's loss (a hook added per call would force recompiles)."""
    model = tiny_llama()
    seen = _rows_seen(model)
    compiled = torch.compile(model, backend="eager")
    x = _labelled()
    with torch.no_grad():
        got = Generation.loss(None, compiled, x)
        want = model(**x).loss
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert seen == [x["input_ids"].numel()] * 2 and not model.lm_head._forward_pre_hooks
