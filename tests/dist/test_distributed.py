"""The dist tier: training in 2 processes (torchrun, gloo on CPU) gives what 1 process gives.

Each test launches its processes itself (``python -m torch.distributed.run --standalone --nproc-per-node 2``) on
tiny random transformers (tests/dist/train_worker.py) or through the command line on MiniLM
(tests/dist/cli_worker.py), and compares the files they write with those of one process.

Why two references: N processes with batch b sum the same per-micro-batch gradients as 1 process with batch b
and N micro-batches of gradient accumulation, so they must agree with it to the last bit (checked: 0.0); 1
process with batch N·b computes the same mean in another order, a float32 rounding difference that Adam
amplifies on gradient entries near zero: < 1e-6 on the tiny models, up to ~2e-5 on MiniLM after 8 steps, and
exactly as large between the two single-process runs, so it is the floor of float32, not the distribution.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import subpeft as sp

from .common import WEIGHT_METHODS, adapter, info, max_diff, train

pytestmark = pytest.mark.dist


# --------------------------------------------------------------------------- every weight-space method


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """Every weight-space method trained 6 steps on a tiny BERT: 1 process with batch 8; DDP and FSDP2 with
    2 processes of batch 4 (37 examples: the epoch's last global batch, 5, splits 4 + 1)."""
    root = tmp_path_factory.mktemp("matrix")
    return {
        "one": train(root / "one", WEIGHT_METHODS, processes=1, batch=8),
        "ddp": train(root / "ddp", WEIGHT_METHODS, processes=2, batch=4, strategy="ddp"),
        "fsdp": train(root / "fsdp", WEIGHT_METHODS, processes=2, batch=4, strategy="fsdp"),
    }


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("method", WEIGHT_METHODS)
def test_two_processes_give_the_one_process_adapter(matrix, method, strategy):
    one, two = adapter(matrix["one"], method), adapter(matrix[strategy], method)
    assert max_diff(one, two) <= 1e-5
    # every rank holds the same trainable tensors, and the file (written by rank 0) is what they hold
    r0 = load_file(str(matrix[strategy] / method / "rank0.safetensors"))
    r1 = load_file(str(matrix[strategy] / method / "rank1.safetensors"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    losses_one, losses_two = info(matrix["one"], method)["losses"], info(matrix[strategy], method)["losses"]
    assert losses_two == pytest.approx(losses_one, rel=1e-5, abs=1e-6)  # the logged loss is the global mean


MODULE_AND_PROMPT = [info.name for info in sp.list_methods() if info.kind != "weight"]


@pytest.fixture(scope="module")
def module_matrix(tmp_path_factory):
    """Module adapters and prompt methods, 4 steps (full global batches only): 1 process with 2 micro-batches
    of 4 per step; DDP and FSDP2 with 2 processes of 4."""
    root = tmp_path_factory.mktemp("modules")
    return {
        "one": train(root / "one", MODULE_AND_PROMPT, processes=1, batch=4, grad_accum=2, steps=4),
        "ddp": train(root / "ddp", MODULE_AND_PROMPT, processes=2, batch=4, strategy="ddp", steps=4),
        "fsdp": train(root / "fsdp", MODULE_AND_PROMPT, processes=2, batch=4, strategy="fsdp", steps=4),
    }


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("method", MODULE_AND_PROMPT)
def test_module_and_prompt_methods_in_two_processes(module_matrix, method, strategy):
    """The same micro-batches summed: the same adapter. AdaMix draws a random route per forward: 1 process
    with 2 micro-batches draws twice per step where each of 2 processes draws once, so its routes differ from
    that run's (not from rank to rank: every rank draws the same, which is what DDP needs)."""
    r0 = load_file(str(module_matrix[strategy] / method / "rank0.safetensors"))
    r1 = load_file(str(module_matrix[strategy] / method / "rank1.safetensors"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    if method != "adamix":
        assert max_diff(adapter(module_matrix["one"], method), adapter(module_matrix[strategy], method)) <= 1e-6


def test_fsdp_keeps_half_of_the_frozen_base_per_rank(matrix):
    whole = info(matrix["one"], "lora")["local_param_bytes"]
    for rank in (0, 1):
        part = info(matrix["fsdp"], "lora", rank)["local_param_bytes"]
        assert 0.45 * whole <= part <= 0.55 * whole
    assert info(matrix["ddp"], "lora")["local_param_bytes"] == whole


def test_methods_differ_from_each_other(matrix):
    """The comparison above could pass with a broken worker that trains nothing: the adapters moved off their
    init and differ between learning problems (LoRA's B starts at 0)."""
    lora = adapter(matrix["one"], "lora")
    assert max(v.abs().max().item() for k, v in lora.items() if "lora_B" in k) > 1e-3
