"""Speed and memory matrix: every registered subpeft method on MiniLM, against peft where peft has the method.

    python benchmarks/method_matrix.py            # full run (33 min here at load 2-5, 1 thread) -> results/method_matrix.json
    python benchmarks/method_matrix.py --quick    # smoke run (~2 min), not a measurement
    python benchmarks/method_matrix.py --groups peft_lowrank_qv,peft_scales --update benchmarks/results/method_matrix.json

Model and input as ``lora_speed.py`` (whose helpers this script imports): all-MiniLM-L6-v2 with a fresh
3-label head, batch 16 x 128 random token ids (seed 0), full attention mask, random labels.

Contenders come in **groups**. Each group runs in its own fresh subprocess, twice:

* ``--worker time``: every contender of the group is built (a deep copy of the base model + the method),
  warmed up (discarded steps) and then timed **interleaved**, one step per contender per round, the order
  rotated every round (``lora_speed.run_interleaved``). Training step = forward + cross-entropy
  (+ ``tuned.regularization()`` for subpeft; peft AdaLoRA adds its orthogonality term itself) + backward +
  AdamW step (+ ``tuned.step(g)`` / peft AdaLoRA ``update_and_allocate(g)``) + ``zero_grad``. Then a
  second interleaved run times inference (eval, ``no_grad``): the base model, each subpeft contender
  unmerged and, for mergeable methods, after ``tuned.merge()``.
* ``--worker memory``: glibc ``malloc`` is told to serve every block of 1 MiB or more with ``mmap``
  (``MALLOC_MMAP_THRESHOLD_=1048576``, which also stops glibc from raising that threshold), so that freed
  tensors leave the resident set at once and RSS follows the live tensors. Contenders are measured one
  after another: RSS before building (after ``gc`` + ``malloc_trim``), build + optimizer + warm-up steps,
  RSS again, then the peak RSS of one training step (``VmHWM`` after resetting it with
  ``/proc/self/clear_refs``), 3 times, median. Reported: ``resident`` (model copy + adapter + optimizer
  state), ``step_peak`` (the step's rise above that: activations, gradients, temporaries) and ``total``
  = resident + step_peak. The model copy (~87 MiB) is the same in every contender.

Ratios are the ratio of medians and the median [q1, q3] of paired per-round ratios. Every ratio that has a
goal gets ``met`` / ``missed`` (with the reason) in the JSON and the README table.

The peft-matched configurations are explicit (``peft_pairs``): same targets, rank, alpha, dropout 0, number of
virtual tokens and reparametrisation; before timing the script records both trainable parameter counts.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # lora_speed's helpers
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout

from lora_speed import (  # noqa: E402
    BATCH,
    NUM_LABELS,
    SEQ,
    infer_fn,
    load_base,
    machine_info,
    make_inputs,
    ratio,
    run_interleaved,
    save_result,
    summarize,
    trainable,
)

QV = ["query", "value"]
ALL_LINEAR = "all-linear"
ENCODER_LINEAR = (r".*\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|"
                  r"intermediate\.dense|output\.dense)$")
# (IA)³ as in the paper and peft's BERT default: keys, values and the FFN down-projection (input-scaled).
# Regexes, matched against whole names by both libraries, so that the FFN's ``layer.N.output.dense`` is
# chosen and not ``attention.output.dense`` (which a plain ``"output.dense"`` suffix would also match).
IA3_TARGETS = r".*\.(key|value|layer\.\d+\.output\.dense)$"
IA3_FEEDFORWARD = r".*\.layer\.\d+\.output\.dense$"
FFN_OUT = r".*\.layer\.\d+\.output\.dense$"
ATTN_FFN_OUT = r".*\.layer\.\d+\.(attention\.output|output)\.dense$"
QV_FFN_OUT = r".*\.layer\.\d+\.(attention\.self\.(query|value)|output\.dense)$"
PROMPT_TOKENS = 20
ADALORA_STEPS = 10_000  # the schedule's length: long, so the budget barely moves during the benchmark
LOW_RANK = {"lora", "dora", "adalora", "vera", "flora", "trilora", "lora_dash", "parallel_adapter"}


# -- contenders -----------------------------------------------------------------------------------
@dataclass
class Contender:
    name: str  # unique within the group
    lib: str  # "subpeft" | "peft"
    method: str  # subpeft's registry name (also for the peft twin)
    build: Callable[[torch.nn.Module], torch.nn.Module]
    config: str = ""  # the configuration, as written into the results
    mergeable: bool = False
    labels_loss: bool = False  # the model computes the loss from labels (peft AdaLoRA: + orthogonality)
    hooks: dict = field(default_factory=dict)


def sp_contender(name: str, method: str, make_config: Callable[[], object], infer_prep: bool = False) -> Contender:
    import subpeft as sp

    info = {m.name: m for m in sp.list_methods()}[method]

    def build(base):
        tuned = sp.attach(copy.deepcopy(base), make_config())
        if infer_prep:
            tuned.step(10**9)  # run a method's schedule to its steady state (LoRA-Dash: phase 2)
        return tuned

    return Contender(name, "subpeft", method, build, config=repr(make_config()), mergeable=info.mergeable)


def peft_contender(name: str, method: str, make_config: Callable[[], object], labels_loss: bool = False) -> Contender:
    """``make_config`` takes no argument, or the base model (a setting that depends on its size)."""
    import inspect

    needs_base = len(inspect.signature(make_config).parameters) == 1

    def config(base):
        return make_config(base) if needs_base else make_config()

    def build(base):
        from peft import get_peft_model

        return get_peft_model(copy.deepcopy(base), config(base))

    shown = "depends on the model: " + inspect.getsource(make_config).strip() if needs_base else repr(make_config())
    return Contender(name, "peft", method, build, config=shown, labels_loss=labels_loss)


def peft_pairs(all_linear: bool = False) -> dict[str, tuple[Contender, Contender]]:
    """Every method peft also has: (subpeft, peft) with matched configurations. ``all_linear``: the
    low-rank methods on every attention and FFN linear instead of their default (query, value)."""
    import peft as pf

    import subpeft as sp

    # all-linear: every attention and FFN linear of the encoder (36 layers), the same regex in both libraries
    # (peft's "all-linear" keeps the pooler, subpeft's leaves the head out: neither is wanted here)
    t = ENCODER_LINEAR if all_linear else QV
    peft_targets = t
    sfx = "@all-linear" if all_linear else ""
    pairs = {
        "lora": (
            sp_contender(f"subpeft lora{sfx}", "lora", lambda: sp.LoRA(r=8, alpha=8, dropout=0.0, targets=t)),
            peft_contender(f"peft lora{sfx}", "lora",
                           lambda: pf.LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=peft_targets)),
        ),
        "dora": (
            sp_contender(f"subpeft dora{sfx}", "dora", lambda: sp.DoRA(r=8, alpha=8, dropout=0.0, targets=t)),
            peft_contender(f"peft dora{sfx}", "dora", lambda: pf.LoraConfig(
                r=8, lora_alpha=8, lora_dropout=0.0, use_dora=True, target_modules=peft_targets)),
        ),
        "adalora": (
            sp_contender(f"subpeft adalora{sfx}", "adalora", lambda: sp.AdaLoRA(
                r=12, target_r=8, alpha=8, dropout=0.0, init_warmup=0, final_warmup=0, mask_interval=1,
                total_steps=ADALORA_STEPS, beta1=0.85, beta2=0.85, orth_reg=0.1, targets=t)),
            peft_contender(f"peft adalora{sfx}", "adalora", lambda: pf.AdaLoraConfig(
                init_r=12, target_r=8, lora_alpha=8, lora_dropout=0.0, tinit=0, tfinal=0, deltaT=1,
                total_step=ADALORA_STEPS, beta1=0.85, beta2=0.85, orth_reg_weight=0.1,
                target_modules=peft_targets), labels_loss=True),
        ),
        "vera": (
            sp_contender(f"subpeft vera{sfx}", "vera", lambda: sp.VeRA(
                r=256, d_init=0.1, seed=0, dropout=0.0, targets=t)),
            peft_contender(f"peft vera{sfx}", "vera", lambda: pf.VeraConfig(
                r=256, d_initial=0.1, projection_prng_key=0, vera_dropout=0.0, save_projection=False,
                target_modules=peft_targets)),
        ),
    }
    if all_linear:
        return pairs
    pairs.update({
        "ia3": (
            sp_contender("subpeft ia3", "ia3", lambda: sp.IA3(
                targets=IA3_TARGETS, feedforward=IA3_FEEDFORWARD, scale_bias=True)),
            peft_contender("peft ia3", "ia3", lambda: pf.IA3Config(
                target_modules=IA3_TARGETS, feedforward_modules=IA3_FEEDFORWARD)),
        ),
        "layernorm": (
            sp_contender("subpeft layernorm", "layernorm", lambda: sp.LayerNormTuning()),
            peft_contender("peft layernorm", "layernorm", lambda: pf.LNTuningConfig(target_modules=["LayerNorm"])),
        ),
        # prompt methods: peft's SEQ_CLS wrapper always trains the classifier (modules_to_save), so subpeft
        # is given modules_to_save=["classifier"] too.
        "prompt_tuning": (
            sp_contender("subpeft prompt_tuning", "prompt_tuning", lambda: sp.PromptTuning(
                num_virtual_tokens=PROMPT_TOKENS, init="random", modules_to_save=["classifier"])),
            peft_contender("peft prompt_tuning", "prompt_tuning", lambda: pf.PromptTuningConfig(
                task_type="SEQ_CLS", num_virtual_tokens=PROMPT_TOKENS)),
        ),
        "p_tuning": (
            # peft's MLP prompt encoder is 3 linears of width encoder_hidden_size; subpeft's default
            # (hidden = d_model) is the same network
            sp_contender("subpeft p_tuning", "p_tuning", lambda: sp.PTuning(
                num_virtual_tokens=PROMPT_TOKENS, encoder="mlp", dropout=0.0, modules_to_save=["classifier"])),
            peft_contender("peft p_tuning", "p_tuning", lambda base: pf.PromptEncoderConfig(
                task_type="SEQ_CLS", num_virtual_tokens=PROMPT_TOKENS, encoder_reparameterization_type="MLP",
                encoder_hidden_size=base.config.hidden_size, encoder_dropout=0.0)),
        ),
        "prefix_tuning": (
            # subpeft's prefix tuning trains an MLP reparametrisation (embedding -> 512 -> tanh -> 2·L·d);
            # peft's default trains the prefixes directly: prefix_projection=True, encoder_hidden_size=512
            # gives peft the same MLP
            sp_contender("subpeft prefix_tuning", "prefix_tuning", lambda: sp.PrefixTuning(
                num_virtual_tokens=PROMPT_TOKENS, projection_dim=512, modules_to_save=["classifier"])),
            peft_contender("peft prefix_tuning", "prefix_tuning", lambda: pf.PrefixTuningConfig(
                task_type="SEQ_CLS", num_virtual_tokens=PROMPT_TOKENS, prefix_projection=True,
                encoder_hidden_size=512)),
        ),
        "p_tuning_v2": (
            # P-tuning v2 = per-layer prefixes trained directly: peft's PrefixTuningConfig without projection
            sp_contender("subpeft p_tuning_v2", "p_tuning_v2", lambda: sp.PTuningV2(
                num_virtual_tokens=PROMPT_TOKENS, modules_to_save=["classifier"])),
            peft_contender("peft p_tuning_v2", "p_tuning_v2", lambda: pf.PrefixTuningConfig(
                task_type="SEQ_CLS", num_virtual_tokens=PROMPT_TOKENS, prefix_projection=False)),
        ),
    })
    return pairs


def lora_at(name: str, targets) -> Contender:
    import subpeft as sp

    return sp_contender(name, "lora", lambda: sp.LoRA(r=8, alpha=8, dropout=0.0, targets=targets))


def sp_default(method: str, **kw) -> Contender:
    import subpeft as sp

    cls = {m.name: m.config_cls for m in sp.list_methods()}[method]
    return sp_contender(f"subpeft {method}", method, lambda: cls(**kw), infer_prep=(method == "lora_dash"))


# Methods peft lacks, each beside subpeft's LoRA at the same (linear) targets. Default configurations;
# LoRA-Dash with prelaunch_steps=1 so that the timed steps are its phase 2 (from step 100 on by default).
def groups() -> dict[str, dict]:
    """name -> {"contenders": [...], "ref": LoRA reference per method (non-peft groups)}."""
    p = peft_pairs()
    pa = peft_pairs(all_linear=True)
    g: dict[str, dict] = {
        "peft_lowrank_qv": {"contenders": [c for k in ("lora", "dora", "adalora", "vera") for c in p[k]]},
        "peft_lowrank_all_linear": {"contenders": [c for k in ("lora", "dora") for c in pa[k]]},
        "peft_scales": {"contenders": [c for k in ("ia3", "layernorm") for c in p[k]]},
        "peft_prompt": {"contenders": [c for k in ("prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2")
                                       for c in p[k]]},
        "nopeft_spectral_qv": {"contenders": [lora_at("subpeft lora@qv", QV)] + [
            sp_default(m) for m in ("ssl", "ssb", "sam_parser", "svdiff", "spectral", "pica")]},
        "nopeft_lowrank_qv": {"contenders": [lora_at("subpeft lora@qv", QV)] + [
            sp_default(m) for m in ("trilora", "flora", "diff_pruning", "parallel_adapter")]
            + [sp_default("lora_dash", prelaunch_steps=1)]},
        "nopeft_modules": {"contenders": [
            lora_at("subpeft lora@attn-out+ffn-out", ATTN_FFN_OUT), sp_default("houlsby"), sp_default("adamix"),
            lora_at("subpeft lora@ffn-out", FFN_OUT), sp_default("pfeiffer")]},
        "nopeft_unipelt_bitfit": {"contenders": [
            lora_at("subpeft lora@qv+ffn-out", QV_FFN_OUT), sp_default("unipelt"),
            lora_at("subpeft lora@all-linear", ALL_LINEAR), sp_default("bitfit")]},
    }
    refs = {
        "ssl": "subpeft lora@qv", "ssb": "subpeft lora@qv", "sam_parser": "subpeft lora@qv",
        "svdiff": "subpeft lora@qv", "spectral": "subpeft lora@qv", "pica": "subpeft lora@qv",
        "trilora": "subpeft lora@qv", "flora": "subpeft lora@qv", "diff_pruning": "subpeft lora@qv",
        "parallel_adapter": "subpeft lora@qv", "lora_dash": "subpeft lora@qv",
        "houlsby": "subpeft lora@attn-out+ffn-out", "adamix": "subpeft lora@attn-out+ffn-out",
        "pfeiffer": "subpeft lora@ffn-out", "unipelt": "subpeft lora@qv+ffn-out", "bitfit": "subpeft lora@all-linear",
    }
    for gv in g.values():
        gv["refs"] = {c.method: refs[c.method] for c in gv["contenders"]
                      if c.lib == "subpeft" and c.method in refs and not c.name.startswith("subpeft lora@")}
    return g


# -- steps --------------------------------------------------------------------------------------------
def train_step_fn(c: Contender, model, ids, mask, labels) -> Callable[[], None]:
    """forward + loss (+ regularization) + backward + AdamW + the method's schedule hook + zero_grad."""
    model.train()
    opt = torch.optim.AdamW(trainable(model), lr=1e-4)
    counter = [0]
    if c.lib == "subpeft":
        def step() -> None:
            out = model(input_ids=ids, attention_mask=mask)
            loss = F.cross_entropy(out.logits, labels) + model.regularization()
            loss.backward()
            opt.step()
            counter[0] += 1
            model.step(counter[0])
            opt.zero_grad(set_to_none=True)
    elif c.labels_loss:  # peft AdaLoRA: the model adds orth_reg_weight * orthogonality to the loss
        def step() -> None:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            counter[0] += 1
            model.base_model.update_and_allocate(counter[0])
            opt.zero_grad(set_to_none=True)
    else:
        def step() -> None:
            out = model(input_ids=ids, attention_mask=mask)
            loss = F.cross_entropy(out.logits, labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def n_trainable(model) -> int:
    return sum(p.numel() for p in trainable(model))


def perturb_(model, seed: int = 1, scale: float = 1e-2) -> None:
    """Move every trainable tensor off its initialisation (zero B, unit scales) so that merged and unmerged
    inference compute something non-trivial and their logits can be compared."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable(model):
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


# -- memory -------------------------------------------------------------------------------------------
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


_LIBC = None


def _trim() -> None:
    global _LIBC
    gc.collect()
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except OSError:
        pass


def measure_memory(c: Contender, base, ids, mask, labels, warmup: int, repeats: int = 3) -> dict:
    _trim()
    rss_a = _status_kib("VmRSS")
    model = c.build(base)
    step = train_step_fn(c, model, ids, mask, labels)
    for _ in range(warmup):
        step()
    peaks = []
    rss_b = 0
    for _ in range(repeats):
        _trim()
        rss_b = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        step()
        peaks.append(_status_kib("VmHWM") - rss_b)
    resident = (rss_b - rss_a) / 1024
    step_peak = sorted(peaks)[len(peaks) // 2] / 1024
    del step, model
    _trim()
    return {"resident_mib": round(resident, 1), "step_peak_mib": round(step_peak, 1),
            "total_mib": round(resident + step_peak, 1), "step_peaks_mib": [round(p / 1024, 1) for p in peaks]}


# -- workers ------------------------------------------------------------------------------------------
def run_group_time(group: dict, base, ids, mask, labels, warmup: int, reps: int, reps_infer: int,
                   log: bool) -> dict:
    contenders: list[Contender] = group["contenders"]
    out: dict = {"params": {}, "attach_s": {}, "checks": {}}
    models, steps = {}, {}
    out["failed"] = {}
    for c in list(contenders):
        t0 = time.perf_counter()
        try:
            model = c.build(base)
            out["attach_s"][c.name] = round(time.perf_counter() - t0, 3)
            out["params"][c.name] = n_trainable(model)
            step = train_step_fn(c, model, ids, mask, labels)
            step()  # does it run at all? (also the first, discarded, warm-up step)
        except Exception as exc:  # a contender that cannot run is reported, not fatal to its group
            out["failed"][c.name] = f"{type(exc).__name__}: {exc}"
            contenders.remove(c)
            if log:
                print(f"[skip] {c.name}: {out['failed'][c.name]}", flush=True)
            continue
        models[c.name] = model
        steps[c.name] = step
    if log:
        print(f"[train] {len(steps)} contenders, 1 + {warmup} warm-up + {reps} interleaved rounds", flush=True)
    t = run_interleaved(steps, warmup, reps, log=log)
    out["train"] = {n: summarize(v) for n, v in t.items()}
    del steps, models
    gc.collect()

    # inference: fresh, perturbed copies (never trained), unmerged and merged
    infer_models = {"base model": copy.deepcopy(base)}
    for c in contenders:
        if c.lib != "subpeft" or c.name in infer_models:
            continue
        m = c.build(base)
        perturb_(m)
        infer_models[f"{c.name} unmerged"] = m
        if c.mergeable:
            merged = copy.deepcopy(m)
            merged.merge()
            infer_models[f"{c.name} merged"] = merged
    with torch.no_grad():
        for m in infer_models.values():
            m.eval()
        for c in contenders:
            if f"{c.name} merged" in infer_models:
                y_un = infer_models[f"{c.name} unmerged"](input_ids=ids, attention_mask=mask).logits
                y_m = infer_models[f"{c.name} merged"](input_ids=ids, attention_mask=mask).logits
                y_b = infer_models["base model"](input_ids=ids, attention_mask=mask).logits
                out["checks"][f"{c.name}: max |merged - unmerged| logits"] = (y_m - y_un).abs().max().item()
                out["checks"][f"{c.name}: max |unmerged - base| logits"] = (y_un - y_b).abs().max().item()
    isteps = {n: infer_fn(m, ids, mask) for n, m in infer_models.items()}
    if log:
        print(f"[inference] {len(isteps)} contenders, {warmup} warm-up + {reps_infer} interleaved rounds", flush=True)
    t = run_interleaved(isteps, warmup, reps_infer, log=log)
    out["inference"] = {n: summarize(v) for n, v in t.items()}
    return out


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    base = load_base() if args.tiny is None else tiny_base(args.tiny)
    base.eval()
    seq = 16 if args.tiny is not None else SEQ
    ids, mask, labels = make_inputs(base.config.vocab_size, seq=seq)
    group = groups()[args.group]
    if args.worker == "time":
        res = run_group_time(group, base, ids, mask, labels, args.warmup, args.reps, args.reps_infer, not args.quiet)
    else:
        res = {"memory": {}, "failed": {}}
        for c in group["contenders"]:
            try:
                # a trial step on a separate copy first: it must run, and the process's one-time costs (lazy
                # kernels, thread pools, the autograd engine) are paid before anything is measured
                train_step_fn(c, c.build(base), ids, mask, labels)()
                res["memory"][c.name] = measure_memory(c, base, ids, mask, labels, max(args.warmup, 1),
                                                       args.mem_repeats)
            except Exception as exc:  # reported (the time worker reports it too), not fatal
                res["failed"][c.name] = f"{type(exc).__name__}: {exc}"
                _trim()
                continue
            if not args.quiet:
                print(f"[memory] {c.name}: {res['memory'][c.name]}", flush=True)
    with open(args.result, "w") as f:
        json.dump(res, f)
    # every worker's result is also kept, so that an interrupted run can be rebuilt (--from-parts)
    parts = os.environ.get("METHOD_MATRIX_PARTS", os.path.join(tempfile.gettempdir(), "method_matrix_parts"))
    if parts:
        os.makedirs(parts, exist_ok=True)
        with open(os.path.join(parts, f"{args.group}.{args.worker}.json"), "w") as f:
            json.dump(res, f)


def tiny_base(seed: int = 0):
    """A tiny random BERT classifier (for the smoke test): 2 layers, hidden 32."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=NUM_LABELS)
    return BertForSequenceClassification(cfg)


# -- orchestration, ratios and goals --------------------------------------------------------------------
def spawn(group: str, mode: str, args, env_extra: dict | None = None) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        path = tmp.name
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--group", group, "--result", path,
           "--threads", str(args.threads), "--warmup", str(args.warmup), "--reps", str(args.reps),
           "--reps-infer", str(args.reps_infer), "--mem-repeats", str(args.mem_repeats)]
    if args.quiet:
        cmd.append("--quiet")
    if args.tiny is not None:
        cmd += ["--tiny", str(args.tiny)]
    env = dict(os.environ, **(env_extra or {}))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env)
    try:
        if proc.returncode != 0:
            return {"error": f"worker {mode} {group} exited with {proc.returncode}"}
        with open(path) as f:
            res = json.load(f)
    finally:
        os.unlink(path)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    return res


def goal_row(kind: str, r: dict, goal: str, limit: float | None, *, noise: bool = False, reason: str = "") -> dict:
    """A ratio with its goal; noise=True: 'equal within noise' (within 3% or the paired IQR contains 1)."""
    if noise:
        ok = abs(r["of_medians"] - 1) <= 0.03 or r["paired_q1"] <= 1 <= r["paired_q3"]
    else:
        ok = r["of_medians"] <= limit
    row = {"kind": kind, **{k: round(v, 4) for k, v in r.items()}, "goal": goal, "status": "met" if ok else "missed"}
    if not ok:
        paired = f"paired median {r['paired_median']:.3f} [{r['paired_q1']:.3f}, {r['paired_q3']:.3f}]"
        if noise:
            auto = f"ratio of medians {r['of_medians']:.3f}, {paired}: off 1 by more than 3% and the paired IQR excludes 1"
        else:
            auto = f"ratio of medians {r['of_medians']:.3f} > {limit}; {paired}"
            if r["paired_q1"] <= limit <= r["paired_q3"]:
                auto += ": the paired IQR contains the goal, not distinguishable from noise in this run"
        row["reason"] = reason or auto
    return row


def mem_row(a: dict, b: dict) -> dict:
    ok = a["total_mib"] <= b["total_mib"] + 1.0  # 1 MiB: the page-granular resolution of RSS and glibc's small heap
    return {"kind": "peak memory", "subpeft_total_mib": a["total_mib"], "peft_total_mib": b["total_mib"],
            "subpeft_step_peak_mib": a["step_peak_mib"], "peft_step_peak_mib": b["step_peak_mib"],
            "ratio_total": round(a["total_mib"] / b["total_mib"], 4) if b["total_mib"] else None,
            "goal": "<= peft (within 1 MiB)", "status": "met" if ok else "missed",
            **({} if ok else {"reason": f"resident {a['resident_mib']} vs {b['resident_mib']} MiB, step peak "
                                        f"{a['step_peak_mib']} vs {b['step_peak_mib']} MiB"})}


def evaluate(name: str, group: dict, res: dict) -> list[dict]:
    rows = []
    train, infer, mem = res.get("train", {}), res.get("inference", {}), res.get("memory", {})
    cs = {c.name: c for c in group["contenders"]}
    # subpeft vs peft
    for c in group["contenders"]:
        if c.lib != "subpeft":
            continue
        twin = next((d for d in group["contenders"] if d.lib == "peft" and d.method == c.method
                     and d.name.split(" ", 1)[1] == c.name.split(" ", 1)[1]), None)
        if twin is not None and c.name in train and twin.name in train:
            row = goal_row("train: subpeft / peft", ratio(train, c.name, twin.name), "<= 1", 1.0)
            row.update(a=c.name, b=twin.name, params_a=res["params"][c.name], params_b=res["params"][twin.name],
                       params_match=res["params"][c.name] == res["params"][twin.name])
            rows.append(row)
            if c.name in mem and twin.name in mem:
                rows.append({"a": c.name, "b": twin.name, **mem_row(mem[c.name], mem[twin.name])})
        elif twin is not None and twin.name in res.get("failed", {}):
            rows.append({"kind": "train: subpeft / peft", "a": c.name, "b": twin.name, "goal": "<= 1",
                         "status": "not measured", "reason": f"peft cannot run: {res['failed'][twin.name][:200]}"})
        ref = group.get("refs", {}).get(c.method)
        if ref and c.name in train and ref in train:
            row = goal_row("train: method / subpeft LoRA, same targets", ratio(train, c.name, ref), "<= 1.2", 1.2)
            row.update(a=c.name, b=ref, params_a=res["params"][c.name], params_b=res["params"][ref])
            if c.name in mem and ref in mem:
                row.update(total_mib_a=mem[c.name]["total_mib"], total_mib_b=mem[ref]["total_mib"],
                           step_peak_mib_a=mem[c.name]["step_peak_mib"], step_peak_mib_b=mem[ref]["step_peak_mib"])
            rows.append(row)
        if f"{c.name} unmerged" in infer and "base model" in infer:
            low = c.method in LOW_RANK
            r = ratio(infer, f"{c.name} unmerged", "base model")
            rows.append({"a": f"{c.name} unmerged", "b": "base model", **(
                goal_row("infer: unmerged / base", r, "<= 1.10 (low-rank)", 1.10) if low
                else {"kind": "infer: unmerged / base", **{k: round(v, 4) for k, v in r.items()},
                      "goal": "", "status": ""})})
        if f"{c.name} merged" in infer:
            r = ratio(infer, f"{c.name} merged", "base model")
            rows.append({"a": f"{c.name} merged", "b": "base model",
                         **goal_row("infer: merged / base", r, "= 1 within noise", None, noise=True)})
    del cs
    for failed, why in {**res.get("failed", {}), **{k: v for k, v in mem.items() if False}}.items():
        rows.append({"kind": "runs", "a": failed, "b": "", "goal": "trains on MiniLM", "status": "not measured",
                     "reason": why[:300]})
    for r in rows:
        r["group"] = name
    return rows


def fmt_ratio(r: dict) -> str:
    return f"{r['of_medians']:.3f} ({r['paired_median']:.3f} [{r['paired_q1']:.3f}, {r['paired_q3']:.3f}])"


def markdown(result: dict) -> str:
    """The README table: one row per subpeft contender; every ratio with its goal and met / missed."""
    rows = result["rows"]
    by_a: dict[str, dict] = {}
    order: list[str] = []
    for r in rows:
        key = (r["group"], r["a"].removesuffix(" unmerged").removesuffix(" merged"))  # a name can recur in groups
        if key not in by_a:
            by_a[key] = {"group": r["group"]}
            order.append(key)
        by_a[key][r["kind"]] = r
    groups = result["groups"]

    def med(group: str, section: str, name: str) -> str:
        s = groups.get(group, {}).get(section, {}).get(name)
        return f"{s['median_ms']:.0f}" if s else "–"

    def cell(r: dict | None) -> str:
        if not r:
            return "–"
        if r["kind"] == "runs" or r.get("status") == "not measured":
            return f"not measured: {r['reason'][:110]}"
        if r["kind"] == "peak memory":
            s = f"{r['subpeft_total_mib']:.0f} / {r['peft_total_mib']:.0f}"
        else:
            s = fmt_ratio(r)
        if r["kind"].startswith("train"):
            s += f" (≤ {r['goal'].removeprefix('<= ')})"
        if r.get("status") in ("met", "missed"):
            s += f" **{r['status']}**"
        if r.get("status") == "missed":
            s += f": {r['reason']}"
        return s

    lines = [
        "| group | contender | vs | train ms (vs) | train ratio: of medians (paired median [q1, q3]) (goal) | peak MiB subpeft / peft (goal ≤ peft) | "
        "unmerged ÷ base (goal ≤ 1.10 low-rank) | merged ÷ base (goal = 1 within noise) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g, key in order:
        d = by_a[(g, key)]
        tr = d.get("train: subpeft / peft") or d.get("train: method / subpeft LoRA, same targets")
        vs = tr["b"] if tr else ""
        mem = d.get("peak memory")
        if mem is None and tr and "total_mib_a" in tr:
            mem_s = f"{tr['total_mib_a']:.0f} / LoRA {tr['total_mib_b']:.0f}"
        else:
            mem_s = cell(mem)
        if "runs" in d:
            lines.append(f"| {g} | {key} | | {cell(d['runs'])} | | | | |")
            continue
        lines.append(
            f"| {g} | {key} | {vs} | {med(g, 'train', key)} ({med(g, 'train', vs) if vs else '–'}) | "
            f"{cell(tr)} | {mem_s} | {cell(d.get('infer: unmerged / base'))} | "
            f"{cell(d.get('infer: merged / base'))} |"
        )
    return "\n".join(lines)


def from_parts(parts: str, names: list[str]) -> dict:
    """Group results rebuilt from the workers' kept files (an interrupted or split run)."""
    results = {}
    for name in names:
        tp, mp = os.path.join(parts, f"{name}.time.json"), os.path.join(parts, f"{name}.memory.json")
        if not os.path.exists(tp):
            continue
        with open(tp) as f:
            res = json.load(f)
        if os.path.exists(mp):
            with open(mp) as f:
                mem = json.load(f)
            res["memory"] = mem.get("memory", {})
            res.setdefault("failed", {}).update(mem.get("failed", {}))
        results[name] = res
    return results


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=8, help="timed training rounds per group (default 8)")
    ap.add_argument("--reps-infer", type=int, default=12, help="timed inference rounds per group (default 12)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="discarded steps per contender after the first (trial) step (default 1)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: steadier than 2 on a shared machine, see lora_speed.py)")
    ap.add_argument("--groups", default="", help="comma-separated group names (default: all)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory workers")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run (~2 min): 2 small groups, no extra warm-up, 2 rounds, 1 memory step")
    ap.add_argument("--out", default="benchmarks/results/method_matrix.json")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--mem-repeats", type=int, default=3, help="measured steps per contender for memory (median)")
    ap.add_argument("--from-parts", default=None, metavar="DIR",
                    help="measure nothing: rebuild the results from the workers' kept files in DIR")
    ap.add_argument("--update", default=None, metavar="JSON",
                    help="re-run --groups and replace them in the results file JSON (the other groups are kept)")
    ap.add_argument("--table", default=None, metavar="JSON", help="print the README table of a results file")
    ap.add_argument("--tiny", type=int, default=None, help=argparse.SUPPRESS)  # a tiny random BERT (tests)
    ap.add_argument("--worker", choices=("time", "memory"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--group", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return None
    if args.table:
        with open(args.table) as f:
            print(markdown(json.load(f)))
        return None
    if args.quick:
        args.reps, args.reps_infer, args.warmup, args.mem_repeats = 2, 2, 0, 1
    all_groups = groups()
    names = [g for g in args.groups.split(",") if g] or (
        ["peft_scales", "nopeft_unipelt_bitfit"] if args.quick else list(all_groups))
    torch.set_num_threads(args.threads)
    info = machine_info(args.threads)
    print(json.dumps(info, indent=1), flush=True)
    t_start = time.perf_counter()
    results, rows = {}, []
    kept = from_parts(args.from_parts, names) if args.from_parts else None
    for name in names:
        print(f"\n=== group {name}: {[c.name for c in all_groups[name]['contenders']]}", flush=True)
        if kept is not None:
            if name not in kept:
                continue
            res = kept[name]
        else:
            res = spawn(name, "time", args)
            if not args.no_memory and "error" not in res:
                mem = spawn(name, "memory", args, {"MALLOC_MMAP_THRESHOLD_": "1048576"})
                res["memory"] = mem.get("memory", {})
                res["memory_wall_s"] = mem.get("wall_s")
                res.setdefault("failed", {}).update(mem.get("failed", {}))
                if "error" in mem:
                    res["memory_error"] = mem["error"]
        results[name] = res
        if "error" in res:
            print(f"  {res['error']}", flush=True)
            continue
        res["configs"] = {c.name: c.config for c in all_groups[name]["contenders"]}
        res["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        for r in evaluate(name, all_groups[name], res):
            print(f"  {r['kind']:<44} {r['a']:<36} / {r['b']:<30} "
                  f"{r.get('of_medians', r.get('ratio_total', float('nan'))):>7.3f}  {r['goal']:<22} {r['status']}",
                  flush=True)
    if hasattr(os, "getloadavg"):
        info["load_average_at_end"] = list(os.getloadavg())
    command = " ".join(["python", os.path.relpath(sys.argv[0])] + sys.argv[1:]) if argv is None else argv
    previous = None
    if args.update:
        with open(args.update) as f:
            previous = json.load(f)
        previous.setdefault("updates", []).append({"command": command, "groups": list(results), "machine": info,
                                                   "wall_s": round(time.perf_counter() - t_start, 1)})
        results = {**previous["groups"], **results}
    results = {n: results[n] for n in all_groups if n in results}  # the groups' own order
    for name, res in results.items():
        if "error" not in res:
            rows += evaluate(name, all_groups[name], res)
    result = {
        "benchmark": "method_matrix",
        "command": command,
        "machine": info,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "setup": {
            "model": "all-MiniLM-L6-v2, AutoModelForSequenceClassification, 3 labels" if args.tiny is None
            else "tiny random BERT",
            "batch": BATCH, "seq_len": SEQ if args.tiny is None else 16,
            "train_step": "forward + cross_entropy (+ subpeft regularization(); peft AdaLoRA: labels -> its loss with "
            "orthogonality) + backward + AdamW.step (+ subpeft step(g); peft AdaLoRA update_and_allocate(g)) + "
            "zero_grad(set_to_none), train mode",
            "inference": "eval, no_grad forward; fresh copies with every trainable tensor perturbed (N(0, 0.01^2)); "
            "merged = tuned.merge()",
            "memory": "fresh process per group, MALLOC_MMAP_THRESHOLD_=1048576; resident = RSS rise from building "
            "the contender (model copy + adapter + optimizer state, after warm-up); step_peak = VmHWM - RSS during "
            "one training step (median of 3); total = resident + step_peak",
            "warmup": args.warmup, "reps_train": args.reps, "reps_infer": args.reps_infer, "quick": args.quick,
            "order": "per group, interleaved one step per contender per round, order rotated each round",
        },
        "groups": results,
        "rows": rows,
        "summary": {"met": sum(r["status"] == "met" for r in rows), "missed": sum(r["status"] == "missed" for r in rows),
                    "params_mismatch": [r["a"] for r in rows if r.get("params_match") is False]},
    }
    if previous is not None:  # keep the original run's command, machine and setup; the update is listed
        result = {**previous, "groups": results, "rows": rows, "summary": result["summary"]}
    print(f"\nsummary: {result['summary']}; wall {result['wall_s']} s; load {info.get('load_average_at_end')}")
    if args.out:
        save_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
