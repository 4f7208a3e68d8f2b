"""torch.compile: LoRA and DoRA on a tiny BERT trace without graph breaks inside subpeft, and train.

``torch._dynamo.explain`` traces the training forward (with the loss); every graph break it reports
whose user stack passes through a file of the ``subpeft`` package is counted against us. The backward
runs through AOTAutograd (the compiled graph's own backward), so the forward trace is what matters.
Then ``torch.compile`` (inductor) trains a few steps, and the adapter equals eager training's.

The explain tests take about 15 s together on one core and run in the fast tier. The compiled
training runs inductor's C++ compilation: about 110 s wall (about 40 s CPU) for the two methods on the
shared 2-core machine, too slow for the fast tier, so it runs only with ``SUBPEFT_SLOW=1``
(``SUBPEFT_SLOW=1 pytest tests/fast/test_compile.py``; benchmarks/gpu_check.sh sets it).
``SUBPEFT_SKIP_COMPILE=1`` skips the whole file.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

import subpeft as sp

from .tiny_transformers import batch, tiny_bert

pytestmark = pytest.mark.skipif(os.environ.get("SUBPEFT_SKIP_COMPILE") == "1", reason="SUBPEFT_SKIP_COMPILE=1")

SUBPEFT_DIR = str(Path(sp.__file__).resolve().parent)
TARGETS = ["query", "key", "value", "dense"]


def _tuned(method: str, dropout: float):
    model = tiny_bert()
    config = sp.get_method(method).config_cls(r=4, targets=TARGETS, dropout=dropout)
    tuned = sp.attach(model, config)
    tuned.train()  # BERT's own dropout and the adapter's dropout are live: the training graph
    return tuned


def _loss_fn(tuned, inputs, labels):
    def loss(inputs):
        return tuned(**inputs, labels=labels).loss

    return loss


def subpeft_graph_breaks(explain_output) -> list[str]:
    """The graph breaks whose user stack passes through subpeft's own files."""
    found = []
    for brk in explain_output.break_reasons:
        frames = [f for f in brk.user_stack if str(Path(f.filename).resolve()).startswith(SUBPEFT_DIR)]
        if frames:
            where = ", ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames)
            found.append(f"{brk.reason.splitlines()[0]} at {where}")
    return found


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_no_graph_breaks_inside_subpeft(method, dropout):
    torch._dynamo.reset()
    tuned = _tuned(method, dropout)
    inputs, labels = batch(), torch.tensor([0, 1, 2])
    explained = torch._dynamo.explain(_loss_fn(tuned, inputs, labels))(inputs)
    assert subpeft_graph_breaks(explained) == []
    assert explained.graph_break_count == 0, [b.reason.splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.skipif(os.environ.get("SUBPEFT_SLOW") != "1", reason="inductor compilation takes ~1 min: set SUBPEFT_SLOW=1")
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_compiled_training_equals_eager(method):
    torch._dynamo.reset()
    eager = _tuned(method, dropout=0.0)
    for m in eager.modules():  # no randomness: the two runs must see the same function
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    compiled_model = copy.deepcopy(eager)
    inputs, labels = batch(), torch.tensor([0, 1, 2])
    step_eager = _loss_fn(eager, inputs, labels)
    step_compiled = torch.compile(_loss_fn(compiled_model, inputs, labels), fullgraph=True)

    def train(model, step):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(4):
            loss = step(inputs)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses

    losses_eager = train(eager, step_eager)
    losses_compiled = train(compiled_model, step_compiled)
    # inductor fuses and reorders float32 ops: equal up to rounding, not bitwise
    torch.testing.assert_close(losses_compiled, losses_eager, rtol=1e-4, atol=1e-5)
    assert losses_compiled[-1] < losses_compiled[0]
    a, b = eager.adapter_state_dict("default"), compiled_model.adapter_state_dict("default")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
