"""AdamW's optimizer step: torch's default (a loop of per-tensor ops on CPU) vs fused, as the trainer now runs it.

    python benchmarks/adamw_speed.py [--rounds N] [--threads 1] [--out benchmarks/results/adamw_speed.json]

Parameters: SmolLM2-135M-Instruct's 272 tensors (134.5 M values: full fine-tuning) and the LoRA r = 8 factors
on its 210 attention/MLP linears (as ``subpeft train --method lora --set targets=all-linear`` trains them), in
the trainer's two groups (matrices with weight decay 0.01, vectors without), random gradients. After one
discarded step each, the contenders alternate (default, fused, then fused, default, ...) for ``--rounds``
rounds of 3 steps; the result is the ratio of median seconds per step (fused ÷ default).
The updates agree to float rounding (``tests/fast/test_resume.py`` checks the trainer's choice and resumes).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import subpeft as sp  # noqa: E402
from subpeft.app.models import load_model  # noqa: E402


def _groups(params: list[torch.Tensor]) -> list[dict]:
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def _measure(params: list[torch.Tensor], rounds: int) -> dict:
    g = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = 1e-3 * torch.randn(p.shape, generator=g)
    opts = {name: torch.optim.AdamW(_groups(params), lr=1e-5, fused=fused)
            for name, fused in (("default", None), ("fused", True))}
    times: dict[str, list[float]] = {name: [] for name in opts}
    for opt in opts.values():
        opt.step()
    for r in range(rounds):
        for name in (("default", "fused") if r % 2 == 0 else ("fused", "default")):
            t = time.perf_counter()
            for _ in range(3):
                opts[name].step()
            times[name].append((time.perf_counter() - t) / 3)
    out = {name: {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts)} for name, ts in times.items()}
    out["ratio"] = out["fused"]["median_s"] / out["default"]["median_s"]
    out["tensors"], out["values"] = len(params), sum(p.numel() for p in params)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/adamw_speed.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model("smollm2")
    results = {}
    full = list(model.parameters())
    for q in full:
        q.requires_grad_(True)
    results["full_smollm2"] = _measure(full, args.rounds)
    for q in full:
        q.grad = None
        q.requires_grad_(False)
    torch.manual_seed(0)
    tuned = sp.attach(model, sp.LoRA(r=8, targets="all-linear"))
    results["lora_r8_all_linear"] = _measure([q for q in tuned.parameters() if q.requires_grad], args.rounds)
    record = {"command": "python benchmarks/adamw_speed.py " + " ".join(sys.argv[1:]),
              "machine": {"cpu": platform.machine(), "threads": args.threads, "torch": torch.__version__},
              "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    for name, r in results.items():
        print(f"{name}: {r['tensors']} tensors, {r['values']:,} values: default {1000 * r['default']['median_s']:.1f} ms, "
              f"fused {1000 * r['fused']['median_s']:.1f} ms, ratio {r['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
