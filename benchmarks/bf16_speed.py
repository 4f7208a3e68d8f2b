"""bf16 autocast vs fp32: one training step of subpeft LoRA, subpeft DoRA and peft LoRA on all-MiniLM-L6-v2 (CPU).

    python benchmarks/bf16_speed.py [--threads 1] [--reps 8] [--out benchmarks/results/bf16_speed.json]

Setup as ``lora_speed.py`` (MiniLM + frozen 3-way head, batch 16 × 128 random tokens, r = 8, α = 16,
dropout 0 on the 36 attention/FFN linears, train mode, AdamW). The bf16 contenders run the forward and
the loss under ``torch.autocast(device_type, dtype=torch.bfloat16)``: the base weights and the adapters
stay fp32 (autocast casts the GEMM inputs); backward and the optimizer step are outside autocast, as
usual. All six contenders run ``--reps`` interleaved rounds (``lora_speed.run_interleaved``). Whether bf16
pays depends on the CPU (AVX512-BF16/AMX make bf16 GEMMs faster; without them autocast only adds casts);
the correctness of bf16 training for every weight-space method is a test (tests/fast/test_bf16_autocast.py).
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # lora_speed's helpers
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout

from lora_speed import (  # noqa: E402
    BATCH,
    SEQ,
    TARGETS,
    interleaved_args,
    load_base,
    machine_info,
    make_inputs,
    make_peft,
    ratio,
    run_interleaved,
    save_result,
    summarize,
    trainable,
)

R, ALPHA = 8, 16


def step_fn(model, ids, mask, labels, bf16: bool):
    model.train()
    opt = torch.optim.AdamW(trainable(model), lr=1e-4)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits.float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> dict:
    args = interleaved_args(__doc__, "benchmarks/results/bf16_speed.json")

    import subpeft as sp

    base = load_base()
    ids, mask, labels = make_inputs(base.config.vocab_size)
    lora = sp.attach(copy.deepcopy(base), sp.LoRA(r=R, alpha=ALPHA, dropout=0.0, targets=list(TARGETS)))
    dora = sp.attach(copy.deepcopy(base), sp.DoRA(r=R, alpha=ALPHA, dropout=0.0, targets=list(TARGETS)))
    peft = make_peft(base, lora)
    models = {"subpeft-lora": lora, "subpeft-dora": dora, "peft-lora": peft}
    steps = {}
    for name, model in models.items():
        for bf16 in (False, True):
            steps[f"{name}-{'bf16' if bf16 else 'fp32'}"] = step_fn(copy.deepcopy(model), ids, mask, labels, bf16)
    times = run_interleaved(steps, args.warmup, args.reps, log=True)
    stats = {name: summarize(ts) for name, ts in times.items()}
    result = {
        "benchmark": "bf16_speed",
        "command": "python benchmarks/bf16_speed.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(args.threads),
        "cpu_bf16": {"mkldnn_bf16_supported": bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported",
                                                               lambda: False)())},
        "setup": {"model": "all-MiniLM-L6-v2 + 3-way head (frozen)", "batch": BATCH, "seq": SEQ, "r": R,
                  "alpha": ALPHA, "targets": list(TARGETS), "dropout": 0.0, "reps": args.reps,
                  "warmup": args.warmup, "autocast": "torch.autocast('cpu', dtype=torch.bfloat16) around forward+loss"},
        "step": stats,
        "bf16_over_fp32": {m: ratio(stats, f"{m}-bf16", f"{m}-fp32") for m in models},
        "subpeft_over_peft": {p: ratio(stats, f"subpeft-lora-{p}", f"peft-lora-{p}") for p in ("fp32", "bf16")},
    }
    for name, s in stats.items():
        print(f"{name:20s} median {s['median_ms']:8.1f} ms  [{s['q1_ms']:.1f}, {s['q3_ms']:.1f}]")
    for m, r in result["bf16_over_fp32"].items():
        print(f"{m}: bf16 / fp32 = {r['of_medians']:.3f} (paired median {r['paired_median']:.3f})")
    save_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
