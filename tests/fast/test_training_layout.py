"""The library's training support (subpeft/training) apart from the experiment app (subpeft/app):

* training/ imports neither app/ nor train/ (the old names) nor the command line;
* one loop calls the training hooks: ``train_classifier`` runs :class:`~subpeft.training.loop.Trainer`, and
  only ``training/hooks.py`` calls ``regularization()`` / ``step()`` on a model; the HF integration goes
  through the same :class:`~subpeft.training.hooks.TrainingHooks`;
* the old import paths are the new modules (patching one patches the other).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2] / "subpeft"


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            out.append("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return out


def test_training_imports_neither_the_app_nor_the_old_names():
    bad = {}
    for path in (ROOT / "training").glob("*.py"):
        found = [m for m in _imports(path) if re.match(r"(\.\.|subpeft\.)(app|train|cli|demo)\b", m)]
        if found:
            bad[path.name] = found
    assert not bad, f"subpeft/training imports the experiment side: {bad}"


def test_only_the_hooks_module_calls_the_hooks():
    calls = re.compile(r"\.(regularization|step)\((?!self)")
    offenders = []
    for folder in ("training", "app"):
        for path in (ROOT / folder).glob("*.py"):
            if path.name == "hooks.py":
                continue
            for line in path.read_text(encoding="utf-8").splitlines():
                code = line.split("#")[0]
                if calls.search(code) and "hooks." not in code and "optimizer" not in code and "scheduler" not in code \
                        and "``" not in code:
                    offenders.append(f"{path.name}: {line.strip()}")
    assert not offenders, offenders


def test_old_names_are_the_new_modules():
    import subpeft.app.run
    import subpeft.integrations
    import subpeft.train
    import subpeft.train.run
    import subpeft.train.trainer
    import subpeft.training.hf
    import subpeft.training.loop

    assert subpeft.train.run is subpeft.app.run
    assert subpeft.train.trainer is subpeft.training.loop
    assert subpeft.integrations is subpeft.training.hf
    assert subpeft.train.train_classifier is subpeft.training.loop.train_classifier
    assert subpeft.integrations.find_tuned is subpeft.training.hooks.find_tuned


class _Tok:
    pad_token_id, padding_side = 0, "right"

    def __call__(self, texts, truncation=True, max_length=128, padding=False):
        ids = [[1 + ord(c) % 7 for c in t][:max_length] for t in texts]
        return {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]}


class _Hooked(nn.Module):
    """A classifier with the three training hooks, recording their calls."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(8, 4), nn.Linear(4, 2)
        self.steps, self.finalized, self.terms = [], 0, 0

    def forward(self, input_ids, attention_mask, labels):
        logits = self.head(self.emb(input_ids).mean(1))
        return SimpleNamespace(loss=nn.functional.cross_entropy(logits, labels), logits=logits)

    def regularization(self):
        self.terms += 1
        return 0.5 * self.head.weight.pow(2).sum()

    def step(self, global_step):
        assert self.head.weight.grad is not None  # before zero_grad
        self.steps.append(global_step)

    def finalize(self):
        self.finalized += 1


def test_train_classifier_is_the_loop_and_calls_every_hook(monkeypatch):
    from subpeft.training import loop

    runs = []
    original = loop.Trainer.train
    monkeypatch.setattr(loop.Trainer, "train", lambda self, resume=False: runs.append(self) or original(self, resume))
    torch.manual_seed(0)
    model = _Hooked()
    texts, labels = ["ab", "abc", "bcd", "a", "cc", "dddd", "e"], [0, 1, 1, 0, 0, 1, 0]
    result = loop.train_classifier(model, _Tok(), texts, labels, max_steps=5, batch_size=3, lr=1e-2, progress=False)
    assert len(runs) == 1 and result.steps == 5
    assert model.steps == [1, 2, 3, 4, 5] and model.finalized == 1 and model.terms == 5
    assert all(loss > 0 for loss in result.losses) and len(result.learning_rates) == 5
