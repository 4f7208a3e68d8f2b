"""Tier 'real': `subpeft analyze` on adapters that `subpeft train` wrote for MiniLM on the tweets.

The short LoRA run that conftest.py shares (all linears) and a short full fine-tune of the same model and
data; then the analysis of the LoRA adapter against the full fine-tune (the base model found from the run's
run.json), and against itself.
"""

from __future__ import annotations

import json
import math

import pytest
from _real_marks import marks, minilm_tweets

from subpeft.cli import main

FULL = ["train", "--method", "full", "--max-steps", "20", "--train-size", "320", "--test-size", "100",
        "--max-length", "64", "--quiet"]


@marks(minilm_tweets)
def test_analyze_lora_against_a_full_finetune(cli_lora_run, tmp_path, capsys):
    lora, full, out = cli_lora_run, tmp_path / "full", tmp_path / "analysis"
    assert main([*FULL, "--out", str(full)]) == 0
    assert (full / "trainable.safetensors").is_file()
    capsys.readouterr()

    assert main(["analyze", str(lora), "--reference", str(full), "--out", str(out), "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert "lora, 37 adapted layers" in text  # the 6 linears of 6 blocks and the pooler
    layers = json.loads((out / "report.json").read_text())["layers"]
    assert len(layers) == 37
    # each distance equals ‖W_ref − (W + ΔW)‖ / ‖W_ref − W‖ computed here from the files themselves: the base
    # found through run.json, the reference read from the full run's trainable.safetensors, the same layers
    from safetensors.torch import load_file

    import subpeft as sp
    from subpeft.train.models import load_minilm_classifier

    ref = load_file(str(full / "trainable.safetensors"))
    base, _ = load_minilm_classifier(3)
    W0 = {n: p.detach().clone() for n, p in base.named_parameters()}
    merged = dict(sp.load(base, lora).merge_and_unload().named_parameters())
    for layer in layers:
        key = layer["layer"] + ".weight"
        expected = ((ref[key] - merged[key]).norm() / (ref[key] - W0[key]).norm()).item()
        assert layer["distance_to_reference"] == pytest.approx(expected, rel=1e-4), layer["layer"]
        assert math.isfinite(expected) and expected > 0
        assert layer["delta_norm"] == pytest.approx((merged[key] - W0[key]).norm().item(), rel=1e-4)
        assert 1 <= layer["effective_rank"] <= 8 + 1e-6
        assert all(0 <= t["quantile"] <= 1 for t in layer["top"])

    # the adapter as its own reference (loaded on a fresh base and merged): every distance is 0
    assert main(["analyze", str(lora), "--reference", str(lora)]) == 0
    assert "mean distance to the reference: 0.000" in capsys.readouterr().out


@marks(minilm_tweets)
def test_analyze_refuses_a_reference_of_another_model(cli_lora_run, tmp_path, capsys):
    """A reference whose weights do not fit (here: a tiny file with the right key, wrong shape) is an error
    that names the layer, not a silent number."""
    import torch
    from safetensors.torch import save_file

    lora = cli_lora_run
    save_file({"bert.encoder.layer.0.attention.self.query.weight": torch.zeros(4, 4)}, str(tmp_path / "bad.safetensors"))
    capsys.readouterr()
    assert main(["analyze", str(lora), "--reference", str(tmp_path / "bad.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "subpeft analyze: error:" in err and "layer.0.attention.self.query" in err and "(4, 4)" in err
