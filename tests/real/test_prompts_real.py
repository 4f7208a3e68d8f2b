"""Tier 'real': prompt-kind methods on real models and data, short runs that must learn.

- Prompt tuning on all-MiniLM-L6-v2 with the tweets sentiment data (+ the fresh classification head):
  held-out accuracy beats the untrained model by MARGIN and the majority class by MARGIN.
- Prefix tuning (with its reparametrisation MLP) and prompt tuning on SmolLM2-135M with
  chatterbot-corpus question → answer pairs (the ``chat`` task of :mod:`subpeft.train.data`):
  the loss on held-out answers falls; the prefix is folded by ``finalize()`` without changing it,
  and generation with and without the KV cache gives the same tokens.

Each test is one short run (about 20-40 s of CPU time); skipped, naming the pip command, when a
package is absent.
"""

from __future__ import annotations

import pytest
import torch
from _real_marks import chat_run, classify_run, minilm_tweets, smollm2_chat
from _real_marks import marks as _marks


@_marks(minilm_tweets)
def test_prompt_tuning_on_minilm_beats_the_untrained_model():
    import subpeft as sp

    def prompt(tuned):
        return tuned.shared["default"].prompt_embeddings.detach().clone()

    tuned, _, _, start = classify_run(sp.PromptTuning(num_virtual_tokens=10), lr=1e-2, on_attach=prompt)
    moved = (tuned.shared["default"].prompt_embeddings - start).norm() / start.norm()
    assert moved > 0.01, "the prompt did not train"


# -- SmolLM2 chat --------------------------------------------------------------------------------------------
def _left_padded(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same right-padded rows, padded on the left instead."""
    lengths = batch["attention_mask"].sum(1).tolist()
    out = {k: torch.empty_like(v) for k, v in batch.items()}
    fill = {"input_ids": int(batch["input_ids"][0, -1]), "attention_mask": 0, "labels": -100}
    for i, n in enumerate(lengths):
        for k, v in batch.items():
            out[k][i] = torch.cat([torch.full_like(v[i, n:], fill[k]), v[i, :n]])
    return out


def _loss_per_token(model, batch) -> float:
    with torch.no_grad():
        return float(model(**batch).loss)


@_marks(smollm2_chat)
def test_prefix_tuning_on_smollm2_lowers_held_out_answer_loss():
    import subpeft as sp

    tuned, tokenizer, work, _, after = chat_run(sp.PrefixTuning(num_virtual_tokens=10, projection_dim=128), steps=20,
                                                lr=3e-3, drop=0.3)  # 20 steps: ~0.6 below the base (10 steps: 0.03)
    # left padding gives the same loss (positions count attended tokens only)
    batch = work.train_batch(range(8))
    assert batch["attention_mask"].sum(1).min() < batch["attention_mask"].shape[1], "the batch needs padding"
    right = _loss_per_token(tuned, batch)
    assert _loss_per_token(tuned, _left_padded(batch)) == pytest.approx(right, abs=1e-4)
    tuned.finalize()  # fold the MLP away: the kept table computes the same
    assert tuned.configs["default"].folded
    assert work.answer_loss(tuned, "test") == pytest.approx(after, abs=1e-5)
    # generation with and without the KV cache gives the same tokens, left-padded and unpadded
    prompts = [work.prompt_text(q) for q in ("what is your name?", "do you like music?")]
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id
    for x in (tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False),
              tokenizer(prompts[:1], return_tensors="pt", add_special_tokens=False)):
        cached = tuned.generate(**x, max_new_tokens=8, do_sample=False, pad_token_id=pad)
        assert torch.equal(cached, tuned.generate(**x, max_new_tokens=8, do_sample=False, pad_token_id=pad,
                                                  use_cache=False))
        assert torch.equal(cached[:, : x["input_ids"].shape[1]], x["input_ids"])


@_marks(smollm2_chat)
def test_prompt_tuning_on_smollm2_lowers_held_out_answer_loss():
    import subpeft as sp

    chat_run(sp.PromptTuning(num_virtual_tokens=10), lr=3e-2, drop=0.1)
