"""torch.compile vs eager: one LoRA and one DoRA training step on all-MiniLM-L6-v2 (CPU).

    python benchmarks/compile_speed.py [--threads 1] [--reps 8] [--out benchmarks/results/compile_speed.json]

Setup as ``lora_speed.py``: MiniLM with a fresh 3-way head (frozen), batch 16 × 128 random tokens with a
full mask, r = 8, α = 16, dropout 0 on the 36 attention/FFN linears, train mode (BERT's own dropout
0.1 active), AdamW. A step is forward + cross-entropy + backward + ``AdamW.step()`` + ``zero_grad``.
The compiled contenders call ``torch.compile(model)`` (inductor, default mode; the optimizer step
stays eager). Each contender's first call is timed alone (for the compiled ones: the compilation),
then ``--warmup`` more calls are discarded and the four contenders run ``--reps`` interleaved rounds
(``lora_speed.run_interleaved``). Also recorded: ``torch._dynamo.explain`` of the training forward
on MiniLM (graphs and graph breaks; the tests assert 0 breaks inside subpeft on a tiny BERT).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time

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
    ratio,
    run_interleaved,
    summarize,
    train_step_fn,
)

R, ALPHA = 8, 16


def main() -> dict:
    args = interleaved_args(__doc__, "benchmarks/results/compile_speed.json")

    import subpeft as sp

    base = load_base()
    ids, mask, labels = make_inputs(base.config.vocab_size)

    steps, first_call_s, explain = {}, {}, {}
    for method, cls in (("lora", sp.LoRA), ("dora", sp.DoRA)):
        tuned = sp.attach(copy.deepcopy(base), cls(r=R, alpha=ALPHA, dropout=0.0, targets=list(TARGETS)))
        tuned.train()
        torch._dynamo.reset()
        ex = torch._dynamo.explain(lambda ids, mask, m=tuned: F.cross_entropy(
            m(input_ids=ids, attention_mask=mask).logits, labels))(ids, mask)
        explain[method] = {"graphs": ex.graph_count, "graph_breaks": ex.graph_break_count,
                           "break_reasons": [b.reason.splitlines()[0] for b in ex.break_reasons]}
        torch._dynamo.reset()
        compiled = copy.deepcopy(tuned)
        for name, model in ((f"{method}-eager", tuned), (f"{method}-compiled", torch.compile(compiled))):
            steps[name] = train_step_fn(model, ids, mask, labels)
            t = time.perf_counter()
            steps[name]()
            first_call_s[name] = time.perf_counter() - t
            print(f"{name}: first call {first_call_s[name]:.1f} s", flush=True)

    times = run_interleaved(steps, args.warmup, args.reps, log=True)
    stats = {name: summarize(ts) for name, ts in times.items()}
    result = {
        "benchmark": "compile_speed",
        "command": "python benchmarks/compile_speed.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(args.threads),
        "setup": {"model": "all-MiniLM-L6-v2 + 3-way head (frozen)", "batch": BATCH, "seq": SEQ, "r": R,
                  "alpha": ALPHA, "targets": list(TARGETS), "dropout": 0.0, "reps": args.reps,
                  "warmup": args.warmup, "compile": "torch.compile(model), inductor default mode"},
        "first_call_s": first_call_s,
        "explain": explain,
        "step": stats,
        "compiled_over_eager": {m: ratio(stats, f"{m}-compiled", f"{m}-eager") for m in ("lora", "dora")},
        "dora_over_lora": {"eager": ratio(stats, "dora-eager", "lora-eager"),
                           "compiled": ratio(stats, "dora-compiled", "lora-compiled")},
    }
    for name, s in stats.items():
        print(f"{name:15s} median {s['median_ms']:8.1f} ms  [{s['q1_ms']:.1f}, {s['q3_ms']:.1f}]  "
              f"first call {first_call_s[name]:.1f} s")
    for m, r in result["compiled_over_eager"].items():
        print(f"{m}: compiled / eager = {r['of_medians']:.3f} (paired median {r['paired_median']:.3f})")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
