"""One process of a distributed-training test (launched by tests/dist/test_distributed.py with torchrun, or alone).

For each method named, it builds the same tiny random transformer (dropout off), attaches the method with
the same seed, wraps it for the strategy (none, ddp, fsdp), trains it with the library's Trainer on a
small synthetic task and writes the adapter to ``OUT/<method>/adapter`` (every rank calls save_pretrained;
rank 0 writes). It also writes ``OUT/<method>/rank<R>.safetensors`` (this rank's live trainable tensors)
and ``OUT/<method>/info-rank<R>.json`` (losses, parameter bytes, errors).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import subpeft as sp  # noqa: E402
from subpeft import distributed as spd  # noqa: E402
from subpeft.app.workloads import Generation  # noqa: E402
from subpeft.training.loop import TrainArgs, Trainer, Workload  # noqa: E402
from tests.fast.tiny_transformers import VOCAB, tiny_bert, tiny_llama  # noqa: E402

# options that let each method's whole schedule (AdaLoRA's budget, LoRA-Dash's switch) run within the steps
OPTIONS = {
    "adalora": dict(r=4, target_r=2, init_warmup=1, final_warmup=2, mask_interval=1),
    "lora_dash": dict(r=4, prelaunch_steps=2, directions=2),
    "vera": dict(r=16),
    "bitfit": dict(targets="all"),
    **{name: dict(r=4) for name in ("lora", "dora", "flora", "trilora", "parallel_adapter", "pica", "spectral")},
}
NUM_EXAMPLES = 37  # with a global batch of 8 the epoch's last batch is short (5): one rank gets fewer examples


class Synthetic(Workload):
    """Token sequences of lengths 3..12 (padded on the right): classes by a rule (BERT) or next tokens with
    the first half of each sequence masked out of the loss (Llama: answer tokens differ per example)."""

    def __init__(self, kind: str, n: int = NUM_EXAMPLES) -> None:
        g = torch.Generator().manual_seed(123)
        self.kind, self.num_train = kind, n
        self.rows = [torch.randint(3, VOCAB, (int(torch.randint(3, 13, (1,), generator=g)),), generator=g)
                     for _ in range(n)]

    def train_batch(self, indices):
        width = max(len(self.rows[i]) for i in indices)
        ids = torch.zeros(len(indices), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, i in enumerate(indices):
            ids[j, : len(self.rows[i])] = self.rows[i]
            mask[j, : len(self.rows[i])] = 1
        if self.kind == "classification":
            labels = torch.tensor([int(self.rows[i].sum()) % 3 for i in indices])
        else:
            labels = ids.masked_fill(mask == 0, -100)
            for j, i in enumerate(indices):
                labels[j, : (len(self.rows[i]) + 1) // 2] = -100
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def loss(self, model, batch):
        if self.kind == "classification":
            return super().loss(model, batch)
        return Generation.loss(self, model, batch)  # as the chat task trains: logits on the answer rows only

    def loss_units(self, batch):
        if self.kind == "classification":
            return super().loss_units(batch)
        return Generation.loss_units(self, batch)  # answer tokens after the causal shift


def build(method: str, model_kind: str, dtype: str, steps: int):
    if model_kind == "bert":
        model = tiny_bert(num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    else:
        model = tiny_llama()
    if dtype == "bf16":
        model.to(torch.bfloat16)
    options = dict(OPTIONS.get(method, {}))
    if model_kind == "bert":
        options.setdefault("modules_to_save", ["classifier"])
    if method == "adalora":
        options["total_steps"] = steps
    config = sp.get_method(method).config_cls(**options)
    torch.manual_seed(0)
    return sp.attach(model, config)


def merge_checks(tuned, method: str, args, out: Path, info: dict) -> None:
    """Merge (a sharded base weight is gathered, each rank writes back its shard), save the merged weights
    (rank 0), unmerge (exact?), and try to attach a second adapter (an error once sharded)."""
    from safetensors.torch import save_file

    def weights():
        return {name: spd.full_tensor(layer.base_layer.weight).detach().float().clone()
                for name, layer in tuned.adapted_layers()}

    before = weights()
    tuned.merge()
    merged = weights()
    tuned.unmerge()
    after = weights()
    info["unmerge_exact"] = all(torch.equal(before[n], after[n]) for n in before)
    if spd.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_file({n: w.contiguous() for n, w in merged.items()}, str(out / "merged.safetensors"))
    try:
        tuned.add_adapter("second", sp.get_method(method).config_cls(**OPTIONS.get(method, {})))
        info["second_attach"] = "accepted"
        tuned.delete_adapter("second")
    except sp.SubpeftError as exc:
        info["second_attach"] = str(exc)
    names = list(merged)
    plain = tuned.merge_and_unload()  # the wrappers go, the merged weights stay (sharded ones: gathered, written back)
    unloaded = {n: spd.full_tensor(plain.get_submodule(n[len("model."):] if n.startswith("model.") else n).weight)
                .detach().float() for n in names}
    info["merge_and_unload_max_diff"] = max((unloaded[n] - merged[n]).abs().max().item() for n in names)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--methods", required=True)
    p.add_argument("--strategy", default="none", choices=["none", "ddp", "fsdp"])
    p.add_argument("--model", default="bert", choices=["bert", "llama"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--stop-at", type=int, default=0, help="stop after N steps (checkpoint written)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--diverge", action="store_true", help="rank 1 perturbs its adapter after step 1")
    p.add_argument("--merge", action="store_true", help="after training: merge, unmerge, try a second attach")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    spd.init("cpu")
    rank = spd.rank()
    status = 0
    for method in args.methods.split(","):
        out = Path(args.out) / method
        info: dict = {"world": spd.world_size()}
        try:
            tuned = build(method, args.model, args.dtype, args.steps)
            model = spd.wrap(tuned, args.strategy) if args.strategy != "none" else tuned
            info["local_param_bytes"] = sum(
                (p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
                for p in tuned.parameters() if not p.requires_grad)
            train_args = TrainArgs(total_steps=args.steps, lr=1e-2, batch_size=args.batch_size, grad_accum=args.grad_accum,
                                   warmup_ratio=0.0, seed=0, progress=False, finalize=not args.diverge,
                                   keep_checkpoint=bool(args.stop_at or args.resume), save_every=0)

            def on_step(trainer, step, tuned=tuned):
                if args.diverge and step == 1 and rank == 1:
                    with torch.no_grad():
                        next(p for p in tuned.parameters() if p.requires_grad).add_(1e-3)
                if args.stop_at and step == args.stop_at:
                    trainer.request_stop()

            use_dir = args.stop_at or args.resume
            trainer = Trainer(model, Synthetic("classification" if args.model == "bert" else "lm"), train_args,
                              out / "run" if use_dir else None, on_step=on_step)
            try:
                state = trainer.train(resume=args.resume)
                info["losses"] = state.losses
                info["fused_adamw"] = [group["fused"] for group in trainer.optimizer.param_groups]
            except sp.distributed.RankDivergenceError as exc:
                info["divergence"] = str(exc)
            except Exception as exc:  # noqa: BLE001 - recorded for the test
                if type(exc).__name__ != "TrainingInterrupted":
                    raise
                info["interrupted_at"] = exc.step
            if "divergence" not in info:
                tuned.save_pretrained(str(out / "adapter"))
            from safetensors.torch import save_file


            out.mkdir(parents=True, exist_ok=True)
            save_file({n: p.detach().float().contiguous() for n, p in tuned.named_parameters() if p.requires_grad},
                      str(out / f"rank{rank}.safetensors"))
            if args.merge:
                merge_checks(tuned, method, args, out, info)
        except Exception as exc:  # noqa: BLE001 - recorded for the test, then the next method
            info["error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            info["traceback"] = traceback.format_exc()
            status = 1
        out.mkdir(parents=True, exist_ok=True)
        (out / f"info-rank{rank}.json").write_text(json.dumps(info))
        if info.get("error"):
            break  # the other ranks may be stuck in a collective: stop
    return status


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    spd.end_process(main())  # ends the group and exits without finalization (gloo's threads can abort it)
