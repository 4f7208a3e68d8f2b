"""Probes of the ways to shard a 4-bit NF4 base with FSDP2 (what docs/qlora_fsdp.md reports); not a test.

    OMP_NUM_THREADS=1 PYTHONPATH=. python -m torch.distributed.run --standalone --nproc-per-node 2 \
        tests/dist/qlora_fsdp_probe.py CASE

CASE (each on a tiny random NF4 Llama with LoRA, fully_shard per block and at the root; rank 0
prints one line per check, with the exception's type and message where one is raised):

- ``prepared``: prepare_for_fsdp, adapter in ignored_params (the supported path);
- ``lost_state``: no module.quant_state (as for a Linear4bit whose Params4bit was built without
  its module): the quant state exists only on the Params4bit, which FSDP2 replaces by a DTensor;
- ``float32_storage``: codes stored as float32 (bitsandbytes' quant_storage=torch.float32), so that
  every frozen parameter of a block has one dtype;
- ``adapter_sharded``: no ignored_params: FSDP2 shards the LoRA tensors too (float32, the only
  trainable dtype) and reduce-scatters their gradients;
- ``state_dict``: the sharded model's full state_dict (what a base checkpoint would save);
- ``bf16_params`` / ``float32_storage_bf16_params``: FSDP2 mixed precision
  (``MixedPrecisionPolicy(param_dtype=torch.bfloat16)``) with uint8 codes (left alone: not floating
  point) or float32-stored codes (cast to bfloat16 like any float parameter);
- ``shard_dim1``: ``shard_placement_fn`` giving Shard(1) to the (n, 1) codes;
- ``root_tuned``: the TunedModel itself (not the model inside it) as FSDP2's root;
- ``checkpointing``: Hugging Face gradient checkpointing on; the adapter gradients (all-reduced) are
  compared with the unsharded model's.
"""

from __future__ import annotations

import copy
import sys
import traceback

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import subpeft as sp
from subpeft.quant import quantize
from subpeft.quant.fsdp import prepare_for_fsdp

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def float32_storage(model):
    """Requantise every Linear4bit with its codes stored as float32 (4 bytes of codes per element)."""
    import bitsandbytes as bnb

    from subpeft.quant import dequantize

    for _, m in list(model.named_modules()):
        if isinstance(m, bnb.nn.Linear4bit):
            W = dequantize(m)
            packed, state = bnb.functional.quantize_4bit(W, blocksize=64, compress_statistics=True,
                                                         quant_type="nf4", quant_storage=torch.float32)
            m.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=64,
                                         compress_statistics=True, quant_type="nf4",
                                         quant_storage=torch.float32, module=m, bnb_quantized=True)
            m.quant_state = state
            m.quant_storage = torch.float32
    return model


def say(rank, what, fn):
    try:
        out = fn()
        if rank == 0:
            print(f"[ok] {what}: {out}", flush=True)
        return out
    except Exception as exc:  # noqa: BLE001 - the probe reports whatever fails
        if rank == 0:
            print(f"[FAIL] {what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", flush=True)
            traceback.print_exc(limit=-3)
        return None


def main(case: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model = quantize(tiny_llama())
    if case in ("float32_storage", "float32_storage_bf16_params"):
        model = float32_storage(model)
    torch.manual_seed(1)
    tuned = sp.attach(model, sp.LoRA(r=4, targets=TARGETS))
    with torch.no_grad():
        for n, p in tuned.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    if case == "checkpointing":
        if hasattr(tuned.model, "activation_checkpointing_enable"):  # transformers >= 5.25
            tuned.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            tuned.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref = copy.deepcopy(tuned)
    ids = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(7))
    if case == "lost_state":
        for m in tuned.modules():
            if hasattr(m, "quant_state") and type(m).__name__ == "Linear4bit":
                m.quant_state = None
    elif case != "adapter_sharded":
        prepare_for_fsdp(tuned)
    ignored = None if case == "adapter_sharded" else {p for p in tuned.parameters() if p.requires_grad}

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if case.endswith("bf16_params") else MixedPrecisionPolicy()

    def placement(p):
        from torch.distributed.tensor import Shard

        return Shard(1) if case == "shard_dim1" and p.dtype == torch.uint8 else None

    def shard():
        for block in tuned.model.model.layers:
            fully_shard(block, mesh=mesh, ignored_params=ignored, mp_policy=mp, shard_placement_fn=placement)
        fully_shard(tuned if case == "root_tuned" else tuned.model, mesh=mesh, ignored_params=ignored, mp_policy=mp)
        w = tuned.model.model.layers[0].self_attn.q_proj.base_layer.weight
        return f"q_proj weight {type(w).__name__} {w.dtype} global {tuple(w.shape)} local {tuple(w.to_local().shape)}, " \
               f"quant_state on it: {w.__dict__.get('quant_state') is not None}"

    if say(rank, f"{case}: fully_shard", shard) is None:
        dist.destroy_process_group()
        return

    def forward():
        with torch.no_grad():
            got, want = tuned(input_ids=ids).logits, ref(input_ids=ids).logits
        return f"max |sharded - unsharded| = {(got - want).abs().max().item():.3g}"

    say(rank, f"{case}: forward", forward)

    def step():
        loss = tuned(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = [p.grad for p in tuned.parameters() if p.requires_grad]
        return f"loss {loss.item():.4f}, {sum(g is not None for g in grads)}/{len(grads)} adapter grads"

    say(rank, f"{case}: backward", step)
    if case == "checkpointing":
        def same_grads():
            ref.zero_grad()
            ref(input_ids=ids, labels=ids).loss.backward()
            want = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
            diff = 0.0
            for n, p in tuned.named_parameters():
                if p.requires_grad:
                    dist.all_reduce(p.grad)
                    diff = max(diff, (p.grad / world - want[n]).abs().max().item())
            return f"max |grad sharded - grad unsharded| = {diff:.3g} (both ranks see the whole batch)"

        say(rank, f"{case}: gradients", same_grads)
    if case == "state_dict":
        def full_state():
            sd = tuned.model.state_dict()
            k = "model.layers.0.self_attn.q_proj.base_layer.weight"
            keys = [x for x in sd if x.startswith(k)]
            return f"{k}: {type(sd[k]).__name__}; keys under it: {keys}"

        say(rank, f"{case}: state_dict()", full_state)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
    from subpeft import distributed as spd

    spd.end_process(0)  # ends the group and exits without finalization (gloo's threads can abort it)
