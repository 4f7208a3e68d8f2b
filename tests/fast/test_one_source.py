"""One source for each fact (issue 14): the output-head names, the parameter count, model-name resolution."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

import subpeft as sp
from subpeft.core.targets import CLASSIFICATION_HEAD_NAMES, OUTPUT_HEAD_NAMES, is_output_head

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


class Headed(nn.Module):
    """A body of two linears under every kind of output head: flat, nested (RoBERTa's classifier.dense /
    classifier.out_proj), and DistilBERT's pre_classifier."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
        self.pre_classifier = nn.Linear(64, 64)
        self.classifier = nn.Module()
        self.classifier.dense = nn.Linear(64, 64)
        self.classifier.out_proj = nn.Linear(64, 3)
        self.head = nn.Linear(64, 3)
        self.qa_outputs = nn.Linear(64, 2)
        self.score = nn.Linear(64, 3)

    def forward(self, x):
        h = self.body(x)
        return self.classifier.out_proj(self.classifier.dense(self.pre_classifier(h))) + self.head(h) + self.score(h)


def test_head_names_are_defined_once():
    from subpeft.core import targets
    from subpeft.quant import DEFAULT_SKIP
    from subpeft.train import run

    assert DEFAULT_SKIP is OUTPUT_HEAD_NAMES and targets.HEAD_NAMES is OUTPUT_HEAD_NAMES
    assert set(CLASSIFICATION_HEAD_NAMES) <= set(OUTPUT_HEAD_NAMES)
    assert not hasattr(run, "HEAD_NAMES")
    assert is_output_head("classifier.out_proj") and is_output_head("lm_head") and not is_output_head("heads.0")


def test_all_linear_adapts_what_quantize_stores_in_4_bits():
    """The output heads are the same modules for "all-linear" and for quantize: nested heads included."""
    tuned = sp.attach(Headed(), sp.LoRA(r=2, targets="all-linear"))
    adapted = sorted(n for n, _ in tuned.adapted_layers())
    assert adapted == ["body.0", "body.2"]
    if HAS_BNB:
        from subpeft.quant import is_quantized, quantize

        model = quantize(Headed())
        assert sorted(n for n, m in model.named_modules() if is_quantized(m)) == adapted
