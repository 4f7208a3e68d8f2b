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
