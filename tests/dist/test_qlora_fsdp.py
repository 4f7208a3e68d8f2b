"""QLoRA under FSDP2: a 4-bit NF4 base (bitsandbytes Linear4bit) sharded by ``fully_shard`` on CPU,
2 gloo processes, LoRA replicated (ignored by FSDP2, gradients all-reduced).

The two ranks run tests/dist/qlora_fsdp_worker.py once (torch.distributed.run, ~15 s on 2 CPU
cores); the tests assert on what it wrote: forward equal to the unsharded model's, 3 AdamW steps
on half a batch per rank equal to 1 process on the whole batch, the saved adapter equal to the live
one, each rank holding half of the base, and merge/unmerge through the sharded weight access.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes: pip install bitsandbytes")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("qlora_fsdp_worker.py")
WORLD = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora_fsdp")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
           str(WORKER), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"workers failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return out, ranks


def test_the_base_is_sharded_and_still_4_bit(run):
    _, ranks = run
    for r in ranks:
        assert r["world"] == WORLD
        assert r["weight_type"] == "DTensor" and r["weight_type_after_forward"] == "DTensor"  # resharded
        assert r["is_quantized_sharded"]  # the sharded accessor answers for it
        # read() on the sharded weight (gather + dequantise) is the unsharded layer's W, bit for bit
        for name, W in r["W_unsharded"].items():
            assert torch.equal(r["W_sharded"][name], W), name


def test_sharded_forward_equals_unsharded(run):
    _, ranks = run
    for r in ranks:
        torch.testing.assert_close(r["logits_sharded"], r["logits_unsharded"], atol=0, rtol=0)
        torch.testing.assert_close(r["logits_sharded_eval"], r["logits_unsharded_eval"], atol=0, rtol=0)


def test_fsdp_training_equals_one_process_with_the_whole_batch(run):
    _, (r0, r1) = run
    live, ref, init = r0["adapter_sharded"], r0["adapter_unsharded"], r0["adapter_init"]
    assert live.keys() == ref.keys() and len(live) == 28  # A and B of 7 projections in 2 blocks
    for k in live:
        assert torch.equal(live[k], r1["adapter_sharded"][k]), k  # replicas stay identical
        torch.testing.assert_close(live[k], ref[k], atol=1e-5, rtol=0)
    assert max((live[k] - init[k]).abs().max().item() for k in live) > 1e-2  # the steps moved it
    assert r0["losses_sharded"] == pytest.approx(r0["losses_unsharded"], abs=1e-5)
    assert r0["losses_sharded"][-1] < r0["losses_sharded"][0]


def test_saved_adapter_equals_the_live_one(run):
    from safetensors.torch import load_file

    out, (r0, _) = run
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    live = r0["adapter_sharded"]
    assert saved.keys() == live.keys()
    for k in live:
        assert torch.equal(saved[k], live[k]), k
    assert (out / "adapter" / "adapter_config.json").exists()


def test_each_rank_holds_half_of_the_base(run):
    _, ranks = run
    for r in ranks:
        before, after = r["storage_unsharded"], r["storage_sharded"]
        # all that stays replicated: the LoRA tensors (ignored by FSDP2) and the buffers (rotary inv_freq)
        adapter_bytes = sum(v.numel() * v.element_size() for v in r["adapter_init"].values())
        assert after["replicated_bytes"] == adapter_bytes + r["buffer_bytes"]
        base_before = before["replicated_bytes"] - adapter_bytes - r["buffer_bytes"]
        # codes, embeddings, norms, head: each rank keeps its shard (padding at most 1 row per tensor)
        assert abs(after["sharded_bytes"] - base_before / WORLD) <= 64
        assert after["packed_code_bytes"] == before["packed_code_bytes"] // WORLD
        # the quant states stay whole on every rank (for a real model ~3% of the codes with double quant)
        assert after["quant_state_bytes"] == before["quant_state_bytes"]
        assert r["storage_after_training"] == after
        assert r["storage_fn_sharded"]["quantized_bytes"] == after["packed_code_bytes"] + after["quant_state_bytes"]


def test_merge_and_unmerge_through_the_sharded_weight(run):
    _, ranks = run
    for r in ranks:
        torch.testing.assert_close(r["logits_merged_sharded"], r["logits_merged_unsharded"], atol=0, rtol=0)
        assert r["merge_errors_sharded"] == r["merge_errors_unsharded"] and len(r["merge_errors_sharded"]) == 14
        assert r["unmerge_max_diff"] == 0.0  # unmerge restores the local codes and the quant state exactly
