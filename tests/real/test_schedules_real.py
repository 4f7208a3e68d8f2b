"""Tier 'real': the training-time methods on the real MiniLM and tweets, through the library's loop.

`train_classifier` only calls ``tuned.regularization()`` and ``tuned.step(global_step)``: that must
be enough for AdaLoRA's budget to reach target_r per matrix and for LoRA-Dash to switch phase and
train Δσ, while the model learns (held-out accuracy well above the untrained model's).
"""

from __future__ import annotations

import pytest
import torch
from _real_marks import MAX_LENGTH, SEED, STEPS, TEST_SIZE, marks, minilm_tweets, untrained_accuracy

BATCH, LR = 16, 3e-3
MARGIN = 0.08  # AdaLoRA prunes its rank from step 5: 0.357 -> 0.523 in a measured run of 40 steps
mark_real = marks(minilm_tweets)
TARGETS = ["query", "value"]


def _run(config):
    import subpeft as sp
    from subpeft.train import evaluate_accuracy, load_minilm_classifier, load_tweets, train_classifier

    task = load_tweets({"train": STEPS * BATCH, "dev": 0, "test": TEST_SIZE}, seed=SEED)
    model, tokenizer = load_minilm_classifier(task.num_labels, seed=SEED)
    x, y = task.test.texts, task.test.labels
    before = untrained_accuracy(TEST_SIZE)
    tuned = sp.attach(model, config)
    result = train_classifier(tuned, tokenizer, task.train.texts, task.train.labels, max_steps=STEPS, lr=LR,
                              batch_size=BATCH, max_length=MAX_LENGTH, seed=SEED, progress=False)
    after = evaluate_accuracy(tuned, tokenizer, x, y, max_length=MAX_LENGTH)
    return tuned, result, before, after


@mark_real
def test_adalora_budget_runs_by_itself_in_the_library_loop():
    import subpeft as sp

    config = sp.AdaLoRA(r=6, target_r=2, alpha=6, total_steps=STEPS, init_warmup=5, final_warmup=10,
                        mask_interval=5, targets=TARGETS, modules_to_save=["classifier"])
    tuned, result, before, after = _run(config)
    adapters = [a for _, a in tuned.adapters_of("default")]
    kept = sum(int(torch.count_nonzero(a.lora_E)) for a in adapters)
    assert kept <= 2 * len(adapters), f"{kept} triplets kept, budget {2 * len(adapters)}"
    ranks = {int(torch.count_nonzero(a.lora_E)) for a in adapters}
    assert len(ranks) > 1 or ranks == {2}, ranks  # allocated per matrix (or evenly)
    assert after >= before + MARGIN, (before, after)


@mark_real
def test_lora_dash_switches_phase_in_the_library_loop():
    import subpeft as sp

    config = sp.LoRADash(r=4, alpha=8, prelaunch_steps=16, directions=4, targets=TARGETS,
                         modules_to_save=["classifier"])
    tuned, result, before, after = _run(config)
    adapters = [a for _, a in tuned.adapters_of("default")]
    assert all(int(a.dash_phase) == 1 for a in adapters)
    assert all(torch.count_nonzero(a.dash_sigma) > 0 for a in adapters), "Δσ must train after the switch"
    assert after >= before + MARGIN, (before, after)


@pytest.mark.parametrize("name", ["dora"])
@mark_real
def test_other_methods_learn(name):
    import subpeft as sp

    info = sp.get_method(name)
    config = info.config_cls(targets=["key", "value", "intermediate.dense"], modules_to_save=["classifier"])
    _, _, before, after = _run(config)
    assert after >= before + MARGIN, (before, after)
