"""One SubpeftTrainer run on a tiny random BERT, launched by tests/dist/test_hf_distributed.py once per process
(under ``torch.distributed.run`` or ``accelerate launch``) or as a plain single process.

Writes into ``--out``:
* ``live-<rank>.safetensors``: this rank's live adapter tensors after training (full tensors, gathered
  from DTensors under FSDP2);
* ``writes-<rank>.json``: the adapter files this rank wrote (one entry per ``write_adapter`` call);
* ``layout-<rank>.json``: how many frozen and trainable parameters training saw as sharded DTensors, and how
  many trainable ones whole;
* ``trainer/``: the Trainer's output_dir (checkpoints, final ``save_model``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repository root, so that `subpeft` imports from this tree

import subpeft as sp  # noqa: E402
import subpeft.core.model as core_model  # noqa: E402
from subpeft import distributed as spd  # noqa: E402
from subpeft.integrations import SubpeftTrainer  # noqa: E402

LENGTH, N_EXAMPLES = 8, 64


def build_model(seed: int = 0, explicit_forward: bool = False):
    """A tiny random BERT classifier; ``explicit_forward``: its ``forward`` takes named arguments only (no
    ``**kwargs``, as in many custom models), so its loss takes no ``num_items_in_batch``."""
    from transformers import BertConfig, BertForSequenceClassification

    class ExplicitBert(BertForSequenceClassification):
        def forward(self, input_ids=None, attention_mask=None, labels=None):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    return (ExplicitBert if explicit_forward else BertForSequenceClassification)(config)


def dataset():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 30, (N_EXAMPLES, LENGTH), generator=gen)
    labels = (ids[:, 0] % 2).long()
    return [{"input_ids": ids[i], "attention_mask": torch.ones(LENGTH, dtype=torch.long), "labels": labels[i]}
            for i in range(N_EXAMPLES)]


def method(name: str, steps: int):
    heads = ["classifier"]
    if name == "lora":
        return sp.LoRA(r=4, alpha=8, targets=["query", "value"], modules_to_save=heads)
    if name == "adalora":
        return sp.AdaLoRA(r=4, target_r=1, total_steps=steps, init_warmup=1, final_warmup=1, mask_interval=1,
                          orth_reg=0.1, targets=["query", "value"], modules_to_save=heads)
    if name == "lora_dash":
        return sp.LoRADash(r=4, prelaunch_steps=2, directions=2, targets=["query", "value"], modules_to_save=heads)
    raise SystemExit(f"unknown method {name!r}")


def force_fsdp_on_cpu() -> None:
    """accelerate (1.16) enables its FSDP plugin only for accelerator back-ends (MULTI_GPU, ...): on CPU it drops
    ``fsdp_plugin`` silently and Trainer runs DDP. To run Trainer's real FSDP2 path here (accelerate's
    ``fsdp2_prepare_model``, ``fully_shard`` over gloo, its FSDP checkpoint code), put the plugin back right after
    Trainer made its Accelerator. Test-only: on GPUs accelerate does this by itself."""
    import transformers
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    original = transformers.Trainer.create_accelerator_and_postprocess

    def patched(self):
        original(self)
        state = self.accelerator.state
        if self.args.fsdp_plugin_args is not None and getattr(state, "fsdp_plugin", None) is None:
            state.distributed_type = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = True

    transformers.Trainer.create_accelerator_and_postprocess = patched


def force_deepspeed_on_cpu() -> None:
    """accelerate (1.16) runs DeepSpeed only when ``use_cpu`` is off, and then, with no GPU, finds no
    distributed back-end (``PartialState`` gets backend None: one process of 1, while DeepSpeed's own
    communicator sees 2, so its batch-size check fails). Give it gloo, as it does for CPU DDP; DeepSpeed's CPU
    accelerator does the rest. Test-only: on GPUs accelerate does this by itself."""
    import accelerate.state
    from accelerate.utils import DistributedType

    original = accelerate.state.PartialState._prepare_backend

    def patched(self, cpu=False, sagemaker_dp=False, backend=None):
        found, kind = original(self, cpu, sagemaker_dp, backend)
        if found is None and not cpu:
            return "gloo", DistributedType.MULTI_CPU
        return found, kind

    accelerate.state.PartialState._prepare_backend = patched


class IdleZeroGrads(TrainerCallback):
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for p in self.model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        return control


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--methods", default="lora", help="comma-separated: lora, adalora, lora_dash (one run each)")
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=4, help="per-device train batch size")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--save-steps", type=int, default=0, help="0: no checkpoints")
    p.add_argument("--resume", default=None, help="a folder holding <method>/trainer/checkpoint-N to resume from")
    p.add_argument("--find-unused", default=None, choices=["0", "1"], help="ddp_find_unused_parameters")
    p.add_argument("--broadcast-buffers", default=None, choices=["0", "1"], help="ddp_broadcast_buffers")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 through TrainingArguments(fsdp=True, fsdp_config)")
    p.add_argument("--deepspeed", default=None, help="a DeepSpeed JSON config file")
    p.add_argument("--args", default="{}", help="more TrainingArguments, as JSON")
    p.add_argument("--idle-zero-grads", action="store_true",
                   help="give trainable tensors without a gradient a zero gradient before every optimizer step (what "
                        "DeepSpeed's flat optimizer does: their Adam step count then runs from the first step)")
    p.add_argument("--explicit-forward", action="store_true",
                   help="the base model's forward takes named arguments only (no **kwargs)")
    a = p.parse_args()
    if a.fsdp:
        force_fsdp_on_cpu()
    if a.deepspeed:
        force_deepspeed_on_cpu()
    for name in a.methods.split(","):
        run(a, name)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def run(a: argparse.Namespace, name: str) -> None:
    from safetensors.torch import save_file
    from transformers import TrainingArguments

    from subpeft.training.hf import full_adapter_state

    out = Path(a.out) / name
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))

    writes: list[str] = []
    original = core_model.write_adapter

    def recording_write(directory, *args, **kwargs):
        writes.append(os.path.relpath(os.fspath(directory), out))
        return original(directory, *args, **kwargs)

    core_model.write_adapter = recording_write
    extra: dict = {}
    if a.find_unused is not None:
        extra["ddp_find_unused_parameters"] = a.find_unused == "1"
    if a.broadcast_buffers is not None:
        extra["ddp_broadcast_buffers"] = a.broadcast_buffers == "1"
    if a.fsdp:
        extra["fsdp"] = True
        extra["fsdp_config"] = {"version": 2, "reshard_after_forward": True,
                                "transformer_layer_cls_to_wrap": ["BertLayer"]}
    if a.deepspeed:
        extra["deepspeed"] = a.deepspeed
    extra.update(json.loads(a.args))
    extra.setdefault("use_cpu", not a.deepspeed)  # accelerate turns DeepSpeed off under use_cpu
    settings = dict(
        output_dir=str(out / "trainer"), per_device_train_batch_size=a.batch, learning_rate=1e-2, max_steps=a.steps,
        report_to=[], save_strategy="steps" if a.save_steps else "no", save_steps=a.save_steps or 500,
        logging_strategy="no", seed=0, disable_tqdm=True, max_grad_norm=0.0, dataloader_num_workers=0,
        lr_scheduler_type="constant", warmup_steps=0)
    args = TrainingArguments(**{**settings, **extra})  # --args may override any of these
    tuned = sp.attach(build_model(0, a.explicit_forward), method(name, a.steps))
    trainer = SubpeftTrainer(model=tuned, args=args, train_dataset=dataset())
    if a.idle_zero_grads:
        trainer.add_callback(IdleZeroGrads(tuned))
    try:
        resume = None
        if a.resume:
            resume = sorted(Path(a.resume, name, "trainer").glob("checkpoint-*"))[0]
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        trainer.save_model()  # the final adapter into trainer/
    finally:
        core_model.write_adapter = original
    from torch.distributed.tensor import DTensor

    params = list(trainer.model.parameters())  # what training ran on (under FSDP2: the sharded model)
    layout = {"sharded_frozen": sum(isinstance(p, DTensor) for p in params if not p.requires_grad),
              "sharded_trainable": sum(isinstance(p, DTensor) for p in params if p.requires_grad),
              "whole_trainable": sum(not isinstance(p, DTensor) for p in params if p.requires_grad)}
    (out / f"layout-{rank}.json").write_text(json.dumps(layout))
    live = full_adapter_state(tuned)
    save_file({k: v.detach().cpu().contiguous() for k, v in live.items()}, str(out / f"live-{rank}.safetensors"))
    (out / f"writes-{rank}.json").write_text(json.dumps(writes))


if __name__ == "__main__":
    main()
    if spd.launched():
        spd.end_process(0)  # ends the group and exits without finalization (gloo's threads can abort it)
