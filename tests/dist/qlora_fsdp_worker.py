"""One rank of QLoRA under FSDP2 on CPU (gloo): run by tests/dist/test_qlora_fsdp.py, or by hand:

    OMP_NUM_THREADS=1 PYTHONPATH=. python -m torch.distributed.run --standalone --nproc-per-node 2 \
        tests/dist/qlora_fsdp_worker.py OUT_DIR

Every rank builds the same tiny random Llama (hidden 64, 2 blocks), quantises it to NF4 (double
quantisation), attaches LoRA to all seven projections (dropout 0, B perturbed so the adapter is not
the identity) and keeps an unsharded copy. Then: ``prepare_for_fsdp``, ``fully_shard`` per decoder
block and at the root with every trainable parameter in ``ignored_params`` (the adapter stays a
plain replicated tensor; its gradients are averaged by hand with one all_reduce each). Each rank
trains on its half of a batch of 4 sequences; rank 0 trains the unsharded copy on the whole batch,
with the same optimizer. Results go to OUT_DIR/rank{r}.pt (and the adapter to OUT_DIR/adapter,
saved by rank 0); the test asserts on them.
"""

from __future__ import annotations

import copy
import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import subpeft as sp
from subpeft.core.weights import read_weight
from subpeft.quant import QuantizedMergeWarning, dequantize, is_quantized, merge_errors, quantize, storage
from subpeft.quant.fsdp import local_storage, prepare_for_fsdp

VOCAB = 96
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS = 3
BATCH = 4  # the whole batch; each of the 2 ranks takes half


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def build():
    model = quantize(tiny_llama(), double_quant=True)
    torch.manual_seed(1)
    tuned = sp.attach(model, sp.LoRA(r=4, alpha=8, dropout=0.0, targets=TARGETS))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return tuned


def adapter(tuned) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tuned.adapter_state_dict("default").items()}


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    ids = torch.randint(1, VOCAB, (BATCH, 12), generator=torch.Generator().manual_seed(7))
    result: dict = {"world": world}

    tuned = build()
    ref = copy.deepcopy(tuned)  # the unsharded model: reference for forward and training
    result["storage_unsharded"] = local_storage(tuned)
    result["buffer_bytes"] = sum(b.numel() * b.element_size() for b in tuned.buffers())  # not sharded by FSDP2
    result["adapter_init"] = adapter(tuned)
    probe = ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.k_proj")
    result["W_unsharded"] = {n: dequantize(tuned.model.get_submodule(n).base_layer) for n in probe}

    prepare_for_fsdp(tuned)
    trainable = {p for p in tuned.parameters() if p.requires_grad}
    for block in tuned.model.model.layers:
        fully_shard(block, mesh=mesh, ignored_params=trainable)
    fully_shard(tuned.model, mesh=mesh, ignored_params=trainable)
    q = tuned.model.get_submodule("model.layers.0.self_attn.q_proj").base_layer
    result["weight_type"] = type(q.weight).__name__
    result["is_quantized_sharded"] = is_quantized(q)
    result["storage_sharded"] = local_storage(tuned)
    result["storage_fn_sharded"] = storage(tuned)
    # the weight-access protocol on the sharded weight: read() gathers and dequantises (collective)
    result["W_sharded"] = {n: read_weight(tuned.model.get_submodule(n).base_layer) for n in probe}

    # forward: sharded vs unsharded, whole batch, in train mode (the mode training uses) and eval mode
    with torch.no_grad():
        result["logits_sharded"] = tuned(input_ids=ids).logits
        result["logits_unsharded"] = ref(input_ids=ids).logits
        tuned.eval(), ref.eval()
        result["logits_sharded_eval"] = tuned(input_ids=ids).logits
        result["logits_unsharded_eval"] = ref(input_ids=ids).logits
        tuned.train(), ref.train()
    result["weight_type_after_forward"] = type(q.weight).__name__

    # training: each rank its half of the batch, gradients averaged by all_reduce
    opt = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    mine = ids.chunk(world)[rank]
    losses = []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = tuned(input_ids=mine, labels=mine).loss
        loss.backward()
        for p in tuned.parameters():
            if p.requires_grad:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(world)
        opt.step()
        avg = loss.detach().clone()
        dist.all_reduce(avg)
        losses.append(avg.item() / world)
    result["losses_sharded"] = losses
    result["adapter_sharded"] = adapter(tuned)
    result["storage_after_training"] = local_storage(tuned)

    if rank == 0:  # one process, the whole batch, no FSDP
        opt_ref = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
        ref_losses = []
        for _ in range(STEPS):
            opt_ref.zero_grad(set_to_none=True)
            loss = ref(input_ids=ids, labels=ids).loss
            loss.backward()
            opt_ref.step()
            ref_losses.append(loss.item())
        result["losses_unsharded"] = ref_losses
        result["adapter_unsharded"] = adapter(ref)
        tuned.save_pretrained(os.path.join(out_dir, "adapter"))
    dist.barrier()

    # merge and unmerge through the sharded accessor (every rank merges the same adapter), against
    # the same merge on an unsharded copy holding the same adapter
    plain = build()
    live = dict(tuned.named_parameters())
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if p.requires_grad:
                p.copy_(live[name])
        before = tuned(input_ids=ids).logits
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", QuantizedMergeWarning)
            tuned.merge()
            plain.merge()
        result["logits_merged_sharded"] = tuned(input_ids=ids).logits
        result["logits_merged_unsharded"] = plain(input_ids=ids).logits
        result["merge_errors_sharded"] = merge_errors(tuned)
        result["merge_errors_unsharded"] = merge_errors(plain)
        tuned.unmerge()
        result["unmerge_max_diff"] = (tuned(input_ids=ids).logits - before).abs().max().item()

    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
    from subpeft import distributed as spd

    spd.end_process(0)  # ends the group and exits without finalization (gloo's threads can abort it)
