"""The Python half of ``benchmarks/gpu_check.sh``: paged AdamW, QLoRA with bitsandbytes' kernels, and
LoRA / DoRA / QLoRA step time and peak memory against ``peft``, on one CUDA device.

    python benchmarks/gpu_bench.py --out benchmarks/results/gpu/gpu_check-<device>.json [--junit NAME=PATH ...]
    python benchmarks/gpu_bench.py --cpu-smoke --out /tmp/smoke.json     # the same code on CPU, tiny model

Parts (each recorded as ``ok``, ``failed`` with the error, or ``skipped`` with the reason; the exit
status is 1 if any part failed):

- ``paged_adamw``: ``subpeft.quant.paged_adamw(bits=8)`` and ``(bits=32)`` train LoRA on a tiny random
  Llama for 10 steps. On CUDA it must return bitsandbytes' ``PagedAdamW8bit`` / ``PagedAdamW32bit``
  without a ``PagedOptimizerWarning``, with paged state (``is_paged``), 8-bit state (``uint8``) for
  bits=8, a falling loss, float32 adapter tensors, and for bits=32 adapter tensors within 1e-4 of
  ``torch.optim.AdamW``'s after the same steps. On CPU it must warn and fall back (the documented path).
- ``qlora``: SmolLM2-135M (``subpeft.train.models.load_smollm2``) moved to the device, quantised there
  with ``subpeft.quant.quantize`` (NF4, double quantisation, bf16 compute on CUDA: bitsandbytes' CUDA
  kernels), LoRA r = 8 on every block linear, 5 steps of ``paged_adamw(bits=32)`` under bf16 autocast.
  Checks: the 4-bit layers' packed weights are on the device, the 4-bit logits are within 30% (relative
  Frobenius; 14% measured on the CPU) and the loss within 5% of the dense model's, the loss falls.
- ``bench``: LoRA, DoRA and QLoRA (r = 8, α = 16, dropout 0, the 7 block linears of all 30 blocks) in
  subpeft and in peft, SmolLM2-135M, batch 4 × 512 random tokens, causal-LM loss under bf16 autocast
  (float32 weights and adapters; QLoRA: NF4 + double quantisation, bf16 compute), ``torch.optim.AdamW``.
  peft's QLoRA is transformers' ``BitsAndBytesConfig`` load + ``get_peft_model``. Per configuration: 3
  warm-up steps, then the median and quartiles of 10 timed steps (``torch.cuda.synchronize`` around
  each), ``torch.cuda.max_memory_allocated`` over the timed steps (reset after the model is loaded and
  the warm-up is done, so it is the training peak with the optimizer state allocated) and the memory
  held after loading. The subpeft ÷ peft ratios are given per method.

``--cpu-smoke`` runs every part on the CPU with a tiny random Llama instead of SmolLM2 (batch 2 × 16,
2 timed steps): it checks this script's code paths end to end on a machine without CUDA; its numbers
mean nothing. ``--cpu-smoke --model smollm2`` runs the smoke on SmolLM2 (the real model's loading and
quantisation paths; about a minute on 2 cores). ``--junit NAME=PATH`` adds the counts of a pytest JUnit XML file (gpu_check.sh passes
the matrix and bf16 runs) to the JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 8, 16
MIB = 2**20


# -- set-up ------------------------------------------------------------------------------------------
class Setup:
    def __init__(self, smoke: bool, model: str | None = None) -> None:
        self.smoke = smoke
        self.model = model or ("tiny" if smoke else "smollm2")
        self.device = torch.device("cpu" if smoke else "cuda")
        self.cuda = self.device.type == "cuda"
        self.batch, self.seq = (2, 16) if smoke else (4, 512)
        self.warmup, self.reps = (1, 2) if smoke else (3, 10)
        # bf16 compute for the 4-bit matmuls on CUDA; bitsandbytes' CPU path is fastest in float32
        self.compute_dtype = torch.bfloat16 if self.cuda else torch.float32
        self._dense = None
        self._folder = None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def dense_cpu(self):
        """The dense float32 base model on the CPU (SmolLM2-135M, or a tiny random Llama with --cpu-smoke)."""
        if self._dense is None:
            if self.model == "tiny":
                from tests.fast.tiny_transformers import tiny_llama

                self._dense = tiny_llama(hidden_size=64, intermediate_size=128)  # blocks of 64 for NF4
            else:
                from subpeft.train.models import load_smollm2

                self._dense = load_smollm2(with_tokenizer=False)
        return self._dense

    def folder(self) -> str:
        """A model folder transformers can load (for peft's QLoRA, quantised while loading)."""
        if self._folder is None:
            if self.model == "tiny":
                self._folder = tempfile.mkdtemp(prefix="gpu_bench_tiny_")
                self.dense_cpu().save_pretrained(self._folder)
            else:
                from subpeft.train.models import smollm2_cache_dir

                self.dense_cpu()  # converts SmolLM2 once if needed
                self._folder = str(smollm2_cache_dir())
        return self._folder

    def ids(self) -> torch.Tensor:
        vocab = self.dense_cpu().config.vocab_size
        g = torch.Generator().manual_seed(0)
        return torch.randint(3, vocab, (self.batch, self.seq), generator=g).to(self.device)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def lora_config(method: str):
    import subpeft as sp

    cls = sp.DoRA if method == "dora" else sp.LoRA
    return cls(r=R, alpha=ALPHA, dropout=0.0, targets=TARGETS)


def quantized_on_device(s: Setup):
    from subpeft.quant import quantize

    model = copy.deepcopy(s.dense_cpu()).to(s.device)  # quantised on the device: its kernels pack the codes
    return quantize(model, double_quant=True, compute_dtype=s.compute_dtype)


def adapter_dtypes(tuned) -> list[str]:
    return sorted({str(v.dtype) for v in tuned.adapter_state_dict("default").values() if v.is_floating_point()})


def train_steps(s: Setup, model, opt, ids, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        with s.autocast():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


# -- parts -------------------------------------------------------------------------------------------
def part_paged_adamw(s: Setup) -> dict[str, Any]:
    import subpeft as sp
    from subpeft.quant import PagedOptimizerWarning, paged_adamw
    from tests.fast.tiny_transformers import tiny_llama

    out: dict[str, Any] = {}
    torch.manual_seed(0)
    base = tiny_llama(hidden_size=64, intermediate_size=128).to(s.device)
    ids = torch.randint(3, 97, (2, 16), generator=torch.Generator().manual_seed(0)).to(s.device)

    def run(make_opt):
        torch.manual_seed(1)
        tuned = sp.attach(copy.deepcopy(base), sp.LoRA(r=4, targets=TARGETS))
        tuned.train()
        params = [p for p in tuned.parameters() if p.requires_grad]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt = make_opt(params)
        losses = train_steps(s, tuned, opt, ids, 10)
        paged_warned = any(issubclass(w.category, PagedOptimizerWarning) for w in caught)
        return tuned, opt, losses, paged_warned

    reference, _, ref_losses, _ = run(lambda p: torch.optim.AdamW(p, lr=1e-3))
    for bits in (8, 32):
        # min_8bit_size=0: the tiny model's tensors are below bitsandbytes' default 4096-element threshold
        extra = {"min_8bit_size": 0} if bits == 8 else {}
        tuned, opt, losses, warned = run(lambda p, bits=bits, extra=extra: paged_adamw(p, bits=bits, lr=1e-3, **extra))
        state_dtypes, paged = set(), []
        for st in opt.state.values():
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.numel() > 1 and k.startswith("state"):
                    state_dtypes.add(str(v.dtype))
                    paged.append(bool(getattr(v, "is_paged", False)))
        row = {"optimizer": type(opt).__name__, "paged_optimizer_warning": warned, "state_dtypes": sorted(state_dtypes),
               "state_paged": all(paged) if paged else False, "loss_first": losses[0], "loss_last": losses[-1],
               "adapter_dtypes": adapter_dtypes(tuned)}
        a, b = tuned.adapter_state_dict("default"), reference.adapter_state_dict("default")
        row["max_abs_diff_vs_torch_adamw"] = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        out[f"bits{bits}"] = row
        problems = []
        if s.cuda:
            want = "PagedAdamW8bit" if bits == 8 else "PagedAdamW32bit"
            if row["optimizer"] != want:
                problems.append(f"optimizer {row['optimizer']}, expected {want}")
            if warned:
                problems.append("PagedOptimizerWarning on CUDA")
            if not row["state_paged"]:
                problems.append("optimizer state not paged")
        elif not warned:
            problems.append("no PagedOptimizerWarning without CUDA")
        if bits == 8 and "torch.uint8" not in state_dtypes:
            problems.append(f"8-bit state expected, got {sorted(state_dtypes)}")
        if bits == 32 and row["max_abs_diff_vs_torch_adamw"] > 1e-4:
            problems.append(f"32-bit adapter differs from torch AdamW's by {row['max_abs_diff_vs_torch_adamw']:.3g}")
        if not losses[-1] < losses[0]:
            problems.append(f"loss did not fall: {losses[0]:.4f} -> {losses[-1]:.4f}")
        if row["adapter_dtypes"] != ["torch.float32"]:
            problems.append(f"adapter dtypes {row['adapter_dtypes']}")
        if problems:
            raise AssertionError(f"paged_adamw(bits={bits}): " + "; ".join(problems) + f" (row: {row})")
    out["torch_adamw_loss"] = [ref_losses[0], ref_losses[-1]]
    return out


def part_qlora(s: Setup) -> dict[str, Any]:
    import subpeft as sp
    from subpeft.quant import paged_adamw, storage

    ids = s.ids()
    dense = copy.deepcopy(s.dense_cpu()).to(s.device)
    with torch.no_grad(), s.autocast():
        out = dense(input_ids=ids, labels=ids)
        ref, ref_loss = out.logits.float(), out.loss.item()
    del dense, out
    model = quantized_on_device(s)
    four_bit = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    devices = sorted({str(m.weight.device) for m in four_bit})
    with torch.no_grad(), s.autocast():
        out = model(input_ids=ids, labels=ids)
        q, q_loss = out.logits.float(), out.loss.item()
    del out
    rel = ((q - ref).norm() / ref.norm()).item()
    del q, ref
    tuned = sp.attach(model, lora_config("lora"))
    tuned.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CPU fallback's PagedOptimizerWarning (checked in paged_adamw)
        opt = paged_adamw([p for p in tuned.parameters() if p.requires_grad], bits=32, lr=1e-3)
    losses = train_steps(s, tuned, opt, ids, 5)
    store = storage(tuned.model)
    row = {"linear4bit_layers": len(four_bit), "weight_devices": devices, "logits_rel_error_vs_dense": rel,
           "loss_dense": ref_loss, "loss_4bit": q_loss,
           "optimizer": type(opt).__name__, "losses": losses, "adapter_dtypes": adapter_dtypes(tuned),
           "bytes_per_quantized_param": store["bytes_per_quantized_param"]}
    problems = []
    if not four_bit or devices != [str(torch.device(s.device.type, 0) if s.cuda else s.device)]:
        problems.append(f"4-bit layers {len(four_bit)} on {devices}")
    # NF4 through 30 blocks: 0.144 on SmolLM2 on the CPU (bitsandbytes' CPU kernels); a broken kernel gives ~1
    if not rel < 0.3 or not abs(q_loss - ref_loss) < 0.05 * abs(ref_loss):
        problems.append(f"4-bit logits differ from dense by {rel:.3g} (relative), loss {q_loss:.4f} vs {ref_loss:.4f}")
    if not (all(map(lambda v: v == v, losses)) and losses[-1] < losses[0]):
        problems.append(f"losses {losses}")
    if row["adapter_dtypes"] != ["torch.float32"]:
        problems.append(f"adapter dtypes {row['adapter_dtypes']}")
    if problems:
        raise AssertionError("qlora: " + "; ".join(problems) + f" (row: {row})")
    return row


def _build(s: Setup, config: str):
    lib, method = config.split("-")
    quant = method == "qlora"
    if lib == "subpeft":
        import subpeft as sp

        model = quantized_on_device(s) if quant else copy.deepcopy(s.dense_cpu()).to(s.device)
        return sp.attach(model, lora_config("dora" if method == "dora" else "lora"))
    from peft import LoraConfig, get_peft_model

    if quant:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        from subpeft.train.models import quiet_transformers

        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=s.compute_dtype)
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(s.folder(), quantization_config=bnb, local_files_only=True,
                                                         device_map={"": s.device.index or 0} if s.cuda else "cpu")
    else:
        model = copy.deepcopy(s.dense_cpu()).to(s.device)
    return get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS,
                                            use_dora=method == "dora"))


def part_bench(s: Setup) -> dict[str, Any]:
    configs = [f"{lib}-{m}" for m in ("lora", "dora", "qlora") for lib in ("subpeft", "peft")]
    ids = s.ids()
    rows = {}
    for config in configs:
        if s.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model = _build(s, config)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        loaded = torch.cuda.memory_allocated() if s.cuda else None
        losses = train_steps(s, model, opt, ids, s.warmup)  # also allocates the optimizer state
        if s.cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(s.reps):
            s.sync()
            t = time.perf_counter()
            losses += train_steps(s, model, opt, ids, 1)
            s.sync()
            times.append(1000 * (time.perf_counter() - t))
        q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
        rows[config] = {
            "trainable_params": sum(p.numel() for p in params),
            "step_ms_median": statistics.median(times), "step_ms_q1": q[0], "step_ms_q3": q[2],
            "peak_allocated_MiB": torch.cuda.max_memory_allocated() / MIB if s.cuda else None,
            "allocated_after_load_MiB": loaded / MIB if s.cuda else None,
            "loss_first": losses[0], "loss_last": losses[-1],
        }
        del model, opt, params
    ratios = {}
    for m in ("lora", "dora", "qlora"):
        a, b = rows[f"subpeft-{m}"], rows[f"peft-{m}"]
        if a["trainable_params"] != b["trainable_params"]:
            raise AssertionError(f"{m}: subpeft trains {a['trainable_params']} numbers, peft {b['trainable_params']}")
        ratios[m] = {"step_time_subpeft_over_peft": a["step_ms_median"] / b["step_ms_median"]}
        if s.cuda:
            ratios[m]["peak_memory_subpeft_over_peft"] = a["peak_allocated_MiB"] / b["peak_allocated_MiB"]
        # same init (B = 0): the first step's loss is the base model's in both libraries
        if abs(a["loss_first"] - b["loss_first"]) > 0.02 * abs(b["loss_first"]):
            raise AssertionError(f"{m}: first losses differ: subpeft {a['loss_first']:.4f}, peft {b['loss_first']:.4f}")
    return {"setup": {"batch": s.batch, "seq": s.seq, "warmup": s.warmup, "reps": s.reps, "r": R, "alpha": ALPHA,
                      "targets": TARGETS, "autocast": "bfloat16", "qlora_compute_dtype": str(s.compute_dtype)},
            "rows": rows, "ratios": ratios}


# -- report ------------------------------------------------------------------------------------------
def junit_summary(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {"status": "failed", "error": f"no JUnit file {path} (pytest did not run, or timed out)"}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(x.get(k, 0)) for x in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    status = "ok" if not failed and counts["tests"] > 0 else "failed"
    return {"status": status, **counts, "failed_tests": failed[:50]}


def environment(s: Setup) -> dict[str, Any]:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
           "device": torch.cuda.get_device_name(0) if s.cuda else f"cpu ({platform.processor() or platform.machine()})",
           "cpu_smoke": s.smoke, "model": s.model}
    if s.cuda:
        env["cuda"] = torch.version.cuda
    for name in ("transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = "absent"
    try:
        env["git_commit"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                                           check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        env["git_commit"] = None
    return env


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="run every part on the CPU with a tiny model")
    ap.add_argument("--out", required=True)
    ap.add_argument("--junit", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--parts", default="paged_adamw,qlora,bench")
    ap.add_argument("--model", choices=("tiny", "smollm2"), default=None,
                    help="the qlora/bench model (default: smollm2 on CUDA, tiny with --cpu-smoke)")
    args = ap.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_bench: CUDA is not available; use --cpu-smoke", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", message=".*Mismatch dtype between input and weight.*")
    s = Setup(args.cpu_smoke, args.model)
    report: dict[str, Any] = {"environment": environment(s), "parts": {}}
    for item in args.junit:
        name, _, path = item.partition("=")
        report["parts"][name] = junit_summary(path)
    parts = {"paged_adamw": part_paged_adamw, "qlora": part_qlora, "bench": part_bench}
    for name in args.parts.split(","):
        t = time.perf_counter()
        try:
            result = {"status": "ok", **parts[name](s)}
        except ImportError as exc:
            result = {"status": "skipped", "reason": f"{type(exc).__name__}: {exc}"}
        except Exception as exc:  # noqa: BLE001 - one part's failure is recorded, the others still run
            from subpeft.core.errors import MissingPackageError

            if isinstance(exc, MissingPackageError):
                result = {"status": "skipped", "reason": str(exc)}
            else:
                result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                          "traceback": traceback.format_exc()[-4000:]}
        result["seconds"] = round(time.perf_counter() - t, 1)
        report["parts"][name] = result
        print(f"gpu_bench: {name}: {result['status']} ({result['seconds']} s)"
              + (f": {result.get('error') or result.get('reason')}" if result["status"] != "ok" else ""), flush=True)
    if "bench" in report["parts"] and report["parts"]["bench"]["status"] == "ok":
        for config, row in report["parts"]["bench"]["rows"].items():
            mem = f"{row['peak_allocated_MiB']:8.0f} MiB" if row["peak_allocated_MiB"] is not None else "     (cpu)"
            print(f"  {config:14s} {row['step_ms_median']:9.1f} ms/step  {mem}  loss {row['loss_first']:.3f} -> "
                  f"{row['loss_last']:.3f}")
        for m, r in report["parts"]["bench"]["ratios"].items():
            print(f"  {m}: subpeft/peft " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"gpu_bench: wrote {args.out}")
    return 1 if any(p["status"] == "failed" for p in report["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
