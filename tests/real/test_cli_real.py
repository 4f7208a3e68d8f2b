"""Tier 'real': the command line on the real models and data.

* `subpeft train` (LoRA on MiniLM, tweets, 40 steps; the run conftest.py shares) learns: held-out accuracy at least MARGIN above
  the untrained model's (fresh head), and `subpeft eval` on the saved adapter reproduces the number;
* `subpeft train --task chat` (LoRA on SmolLM2-135M, chatterbot-corpus) lowers the held-out answer
  loss (prompt masked out) from the untrained model's.

Skipped, naming the pip command, where the packages are absent.
"""

from __future__ import annotations

import json

import pytest
from _real_marks import marks, minilm_tweets, smollm2_chat

from subpeft.cli import main

MARGIN = 0.10


@marks(minilm_tweets)
def test_train_and_eval_lora_minilm_tweets(cli_lora_run, tmp_path):
    out = cli_lora_run
    m = json.loads((out / "metrics.json").read_text())
    assert (m["method"], m["model"], m["task"]) == ("lora", "minilm", "tweets")
    assert m["test"]["accuracy"] >= m["untrained_test"]["accuracy"] + MARGIN, m["test"]
    assert m["train_loss_last"] < m["train_loss_first"]
    assert 0 < m["trainable_percent"] < 5
    assert main(["eval", "--adapter", str(out), "--json", str(tmp_path / "e.json")]) == 0
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["test"]["accuracy"] == pytest.approx(m["test"]["accuracy"], abs=1e-6)


@marks(smollm2_chat)
def test_train_lora_smollm2_chat_lowers_answer_loss(tmp_path):
    out = tmp_path / "chat"
    # measured: the held-out answer loss falls from 3.92 to about 3.0 in 8-12 steps of 4
    assert main(["train", "--task", "chat", "--max-steps", "10", "--batch-size", "4", "--train-size", "80",
                 "--test-size", "32", "--max-length", "64", "--lr", "1e-3", "--set", "r=8",
                 "--set", 'targets=["q_proj","k_proj","v_proj","o_proj"]', "--max-new-tokens", "8",
                 "--eval-before", "--out", str(out), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["model"] == "smollm2" and m["kind"] == "generation"
    assert m["test"]["answer_loss"] < m["untrained_test"]["answer_loss"] - 0.2, (m["test"], m["untrained_test"])
    assert 0 <= m["test"]["exact_match"] <= 1


@marks(minilm_tweets)
def test_compare_tunes_lr_on_dev_with_entries_side_by_side(tmp_path):
    """`subpeft compare` on MiniLM/tweets in subprocesses: two LoRA ranks side by side and the head baseline, the
    lr chosen on dev over a grid (the dev-best), seeds at it; the first seed's run is the search run scored on
    test afterwards, and that score is the one a fresh run with the same settings gets."""
    out = tmp_path / "cmp"
    assert main(["compare", "--task", "tweets", "--methods", "lora[r=2],lora[r=4]", "--baselines", "head",
                 "--lr-grid", "1e-3,3e-3", "--seeds", "2", "--max-steps", "8", "--train-size", "128", "--dev-size",
                 "64", "--test-size", "64", "--max-length", "32", "--out", str(out), "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in res["summary"]] == ["head", "lora r=2", "lora r=4"]
    assert res["splits"] == {"train": 128, "dev": 64, "test": 64}
    for label, info in res["lr_search"].items():
        best = max(info["dev_scores"], key=lambda t: t["dev"])["dev"]
        assert next(t for t in info["dev_scores"] if t["dev"] == best)["lr"] == info["chosen"], label
        runs = [r for r in res["runs"] if r["label"] == label]
        assert sorted(r["seed"] for r in runs) == [0, 1] and all(r["lr"] == info["chosen"] for r in runs)
    seed0 = next(r for r in res["runs"] if r["label"] == "lora r=4" and r["seed"] == 0)
    assert "from_lr_search" in seed0
    # the same settings trained afresh give the reused run's test score
    assert main(["train", "--spec", str(out / "runs" / "lora_r=4" / "seed0" / "run.json"), "--out",
                 str(tmp_path / "again"), "--quiet"]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["test"]["accuracy"] == pytest.approx(seed0["test"]["accuracy"], abs=1e-6)
    assert again["splits"] == res["splits"]
