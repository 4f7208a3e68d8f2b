"""Runs shared by several real-tier modules (each is trained once per test session)."""

from __future__ import annotations

import pytest

# `subpeft train` LoRA on MiniLM/tweets, all linears: 40 steps of 16 tweets, 300 held-out tweets. Measured: held-out
# accuracy 0.357 -> 0.630 (majority class 0.430).
CLI_LORA = ["train", "--method", "lora", "--max-steps", "40", "--train-size", "640", "--test-size", "300",
            "--max-length", "64", "--lr", "3e-3", "--set", "targets=all-linear", "--eval-before", "--quiet"]


@pytest.fixture(scope="session")
def cli_lora_run(tmp_path_factory):
    """The folder of one `subpeft train` LoRA run on MiniLM/tweets (adapter, metrics.json, run.json)."""
    from subpeft.cli import main

    out = tmp_path_factory.mktemp("cli") / "lora"
    assert main([*CLI_LORA, "--out", str(out)]) == 0
    return out
