"""The dist tier: losses, dtypes, merging and checkpoints in 2 processes (see test_distributed.py)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from .common import adapter, info, max_diff, train

pytestmark = pytest.mark.dist


# --------------------------------------------------------------------------- losses, dtypes, merging


def test_token_weighted_causal_lm_loss_with_gradient_accumulation(tmp_path):
    """A causal LM's loss averages answer tokens, which differ per rank: the ranks weight their losses by their
    token counts, so 2 x 4 examples with 2 micro-batches per step equal 1 x 8 with 2 (DDP's no_sync path; FSDP2).
    The loss computes the output layer on the answer rows only (a hook inside the wrapped model)."""
    one = train(tmp_path / "one", ["lora", "dora"], processes=1, batch=8, model="llama", grad_accum=2)
    for strategy in ("ddp", "fsdp"):
        two = train(tmp_path / strategy, ["lora", "dora"], processes=2, batch=4, strategy=strategy, model="llama",
                    grad_accum=2)
        for method in ("lora", "dora"):
            assert max_diff(adapter(one, method), adapter(two, method)) <= 1e-5, (strategy, method)


def test_fsdp_float32_adapters_on_a_bfloat16_base(tmp_path):
    """A bf16 base (FSDP2 shards it) with float32 adapters and a bf16 head copy: 2 processes of 4 give, bit for
    bit, what 1 process gives with 2 micro-batches of 4 (the same sums; 4 steps: full batches only)."""
    one = train(tmp_path / "one", ["lora", "pica"], processes=1, batch=4, grad_accum=2, dtype="bf16", steps=4)
    out = train(tmp_path / "bf16", ["lora", "pica"], processes=2, batch=4, strategy="fsdp", dtype="bf16", steps=4)
    for method in ("lora", "pica"):
        tensors = adapter(out, method)
        adapters = {k: v for k, v in tensors.items() if "classifier" not in k}
        assert adapters and all(v.dtype == torch.float32 for v in adapters.values())
        assert {v.dtype for k, v in tensors.items() if "classifier" in k} == {torch.bfloat16}
        assert max_diff(adapter(one, method), tensors) <= 1e-6
        assert all(map(torch.isfinite, torch.tensor(info(out, method)["losses"])))
        assert set(info(out, method)["fused_adamw"]) == {True}  # sharded (DTensor) parameters: fused AdamW too


def test_merge_and_unmerge_on_a_sharded_model(tmp_path):
    """Merging gathers each sharded W and writes back each rank's shard: the merged weights equal one process's;
    unmerge restores the shards bit for bit; merge_and_unload leaves the merged weights in the (still sharded)
    plain model; attaching to a sharded model is a clear error."""
    methods = ["lora", "pica", "svdiff"]
    one = train(tmp_path / "one", methods, processes=1, batch=8, merge=True)
    fsdp = train(tmp_path / "fsdp", methods, processes=2, batch=4, strategy="fsdp", merge=True)
    for method in methods:
        a, b = load_file(str(one / method / "merged.safetensors")), load_file(str(fsdp / method / "merged.safetensors"))
        assert max_diff(a, b) <= 1e-5
        for rank in (0, 1):
            assert info(fsdp, method, rank)["unmerge_exact"] is True
            assert info(fsdp, method, rank)["merge_and_unload_max_diff"] == 0.0  # the unwrapped, sharded model
            assert "attach adapters before sharding" in info(fsdp, method, rank)["second_attach"]
        assert info(one, method)["second_attach"] == "accepted"


# --------------------------------------------------------------------------- checkpoints across world sizes


@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_resume_in_another_number_of_processes(tmp_path, first, then):
    """Stopped after 3 of 6 steps in ``first`` processes, resumed in ``then`` (same global batch 8): the end
    equals an uninterrupted single-process run."""
    methods = ["lora", "adalora", "lora_dash"]
    ref = train(tmp_path / "ref", methods, processes=1, batch=8)
    run = tmp_path / "run"
    train(run, methods, processes=first, batch=8 // first, strategy="ddp", stop_at=3)
    for method in methods:
        assert info(run, method)["interrupted_at"] == 3
        assert (run / method / "run" / "checkpoints" / "last" / "trainer_state.json").is_file()
    train(run, methods, processes=then, batch=8 // then, strategy="fsdp", resume=True)
    for method in methods:
        assert max_diff(adapter(ref, method), adapter(run, method)) <= 1e-5
        assert len(info(run, method)["losses"]) == 6


def test_a_diverging_rank_is_caught(tmp_path):
    out = tmp_path / "diverge"
    train(out, ["lora"], processes=2, batch=4, strategy="ddp", diverge=True)
    for rank in (0, 1):
        message = info(out, "lora", rank).get("divergence")
        assert message and "ranks [1] differ from rank 0" in message and "lora_" in message
    assert not (out / "lora" / "adapter").exists()
