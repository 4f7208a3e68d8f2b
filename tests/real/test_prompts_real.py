"""Tier 'real': prompt-kind methods on real models and data, short runs that must learn.

- Prompt tuning on all-MiniLM-L6-v2 with the tweets sentiment data (+ the fresh classification head):
  held-out accuracy beats the untrained model by MARGIN and the majority class by MARGIN.
- Prefix tuning (with its reparametrisation MLP) and prompt tuning on SmolLM2-135M with
  chatterbot-corpus question → answer pairs (the ``chat`` task of :mod:`subpeft.train.data`):
  the loss on held-out answers falls; the prefix is folded by ``finalize()`` without changing it,
  and generation with and without the KV cache gives the same tokens.

Each test is one short run (under 90 s on 2 idle CPU cores); skipped, naming the pip command, when a
package is absent.
"""

from __future__ import annotations

import math

import pytest
import torch
from _real_marks import SEED, classify_run, minilm_tweets, smollm2_chat
from _real_marks import marks as _marks


@_marks(minilm_tweets)
def test_prompt_tuning_on_minilm_beats_the_untrained_model():
    import subpeft as sp

    def prompt(tuned):
        return tuned.shared["default"].prompt_embeddings.detach().clone()

    tuned, _, _, start = classify_run(sp.PromptTuning(num_virtual_tokens=10), steps=60, lr=1e-2, on_attach=prompt)
    moved = (tuned.shared["default"].prompt_embeddings - start).norm() / start.norm()
    assert moved > 0.01, "the prompt did not train"


# -- SmolLM2 chat --------------------------------------------------------------------------------------------
def _chat_examples(tokenizer, prompts, responses, max_length: int = 64):
    """``Question: p\\nAnswer: r<eos>`` examples; labels only on the answer (and eos)."""
    examples = []
    for p, r in zip(prompts, responses, strict=True):
        head = tokenizer(f"Question: {p}\nAnswer:", add_special_tokens=False)["input_ids"][-max_length // 2:]
        tail = tokenizer(" " + r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        tail = tail[: max_length - len(head)]
        examples.append((head + tail, [-100] * len(head) + tail))
    return examples


def _pad(examples, pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)

    def fill(row, value):
        extra = [value] * (width - len(row))
        return row + extra if side == "right" else extra + row

    return {
        "input_ids": torch.tensor([fill(ids, pad_id) for ids, _ in examples]),
        "attention_mask": torch.tensor([fill([1] * len(ids), 0) for ids, _ in examples]),
        "labels": torch.tensor([fill(lab, -100) for _, lab in examples]),
    }


@torch.no_grad()
def _answer_loss(model, examples, pad_id: int, side: str = "right") -> float:
    """Mean NLL per answer token (the loss counts labels[:, 1:], as the model's own loss does)."""
    model.eval()
    total = count = 0.0
    for start in range(0, len(examples), 16):
        batch = _pad(examples[start : start + 16], pad_id, side)
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * n
        count += n
    return total / count


def _chat_run(config, steps: int, lr: float):
    import subpeft as sp
    from subpeft.train.data import load_chat
    from subpeft.train.models import load_smollm2

    batch_size = 8
    task = load_chat({"train": steps * batch_size, "test": 48}, seed=SEED)
    model, tokenizer = load_smollm2()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train = _chat_examples(tokenizer, task.train.prompts, task.train.responses)
    test = _chat_examples(tokenizer, task.test.prompts, task.test.responses)
    before = _answer_loss(model, test, pad)
    torch.manual_seed(SEED)
    tuned = sp.attach(model, config)
    params = [p for p in tuned.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    tuned.train()
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(SEED)).tolist()
    losses = []
    for step in range(steps):
        batch = _pad([train[i] for i in order[step * batch_size : (step + 1) * batch_size]], pad)
        loss = tuned(**batch).loss + tuned.regularization()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        tuned.step(step + 1)
        losses.append(loss.item())
    after = _answer_loss(tuned, test, pad)
    print(f"\n{config.method}/SmolLM2/chat: train loss {losses[0]:.3f} -> {sum(losses[-5:]) / 5:.3f}, held-out "
          f"answer loss {before:.3f} -> {after:.3f}")
    assert math.isfinite(after)
    assert after < before - 0.1, f"held-out answer loss did not fall enough: {before:.3f} -> {after:.3f}"
    return tuned, tokenizer, test, pad, after


@_marks(smollm2_chat)
def test_prefix_tuning_on_smollm2_lowers_held_out_answer_loss():
    import subpeft as sp

    tuned, tokenizer, test, pad, after = _chat_run(sp.PrefixTuning(num_virtual_tokens=10, projection_dim=128),
                                                   steps=25, lr=3e-3)
    # left padding gives the same loss (positions count attended tokens only)
    assert _answer_loss(tuned, test, pad, side="left") == pytest.approx(after, abs=1e-4)
    tuned.finalize()  # fold the MLP away: the kept table computes the same
    assert tuned.configs["default"].folded
    assert _answer_loss(tuned, test, pad) == pytest.approx(after, abs=1e-5)
    prompts = [f"Question: {q}\nAnswer:" for q in ("what is your name?", "do you like music?")]
    tokenizer.padding_side = "left"
    x = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    cached = tuned.generate(**x, max_new_tokens=8, do_sample=False, pad_token_id=pad)
    assert torch.equal(cached, tuned.generate(**x, max_new_tokens=8, do_sample=False, pad_token_id=pad,
                                              use_cache=False))
    assert torch.equal(cached[:, : x["input_ids"].shape[1]], x["input_ids"])


@_marks(smollm2_chat)
def test_prompt_tuning_on_smollm2_lowers_held_out_answer_loss():
    import subpeft as sp

    _chat_run(sp.PromptTuning(num_virtual_tokens=10), steps=25, lr=3e-2)
