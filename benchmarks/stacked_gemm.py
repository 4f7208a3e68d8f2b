"""Issue 16, item 2: does one GEMM with A stacked under W beat the base GEMM plus the rank-r GEMM?

    python benchmarks/stacked_gemm.py [--threads 1] [--reps 200] [--out benchmarks/results/stacked_gemm.json]

The idea: LoRA's extra cost over the frozen floor is mostly the rank-r GEMMs re-reading the activations.
Keeping A as r extra rows of W's storage, ``[W; A]·x`` yields W·x and A·x in one pass over x; in backward,
``[g, g_h]·[W; A]`` yields the base and the low-rank input gradient in one pass. This measures the GEMMs
alone, at MiniLM's shapes (N = 16 × 128 tokens, r = 8, d 384 → 384 and 384 ↔ 1536), interleaved, median
of ``--reps`` rounds:

* forward: ``x·Wᵀ`` and ``x·Aᵀ`` (today) against ``x·[W; A]ᵀ`` (+ the copy that makes the base output
  contiguous again, since its rows then have stride d_out + r; also without that copy, the best case);
* backward input gradient: ``g·W + g_h·A`` (today: mm then addmm_) against ``[g, g_h]·[W; A]`` (+ the
  ``cat`` that builds [g, g_h]).

Exactness is reported too: the stacked results against today's (max |Δ|; MKL may block the sums differently).
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lora_speed import interleaved_args, machine_info, save_result  # noqa: E402

N, R = 16 * 128, 8
SHAPES = {"attention 384->384": (384, 384), "FFN up 384->1536": (384, 1536), "FFN down 1536->384": (1536, 384)}


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def make_cases(x, W, A, WA, gy, gh) -> dict:
    d_out = W.shape[0]
    return {
        "fwd separate": lambda: (torch.mm(x, W.t()), torch.mm(x, A.t())),
        "fwd stacked": lambda: (lambda o: (o[:, :d_out].contiguous(), o[:, d_out:]))(torch.mm(x, WA.t())),
        "fwd stacked, no copy": lambda: torch.mm(x, WA.t()),
        "bwd separate": lambda: torch.mm(gy, W).addmm_(gh, A),
        "bwd stacked": lambda: torch.mm(torch.cat([gy, gh], 1), WA),
    }


def main() -> dict:
    args = interleaved_args(__doc__, "benchmarks/results/stacked_gemm.json", reps=200)
    g = torch.Generator().manual_seed(0)
    rows = {}
    for name, (d_in, d_out) in SHAPES.items():
        x, W, A = (torch.randn(*s, generator=g) for s in ((N, d_in), (d_out, d_in), (R, d_in)))
        WA = torch.cat([W, A])  # the stacked storage
        gy, gh = torch.randn(N, d_out, generator=g), torch.randn(N, R, generator=g)
        cases = make_cases(x, W, A, WA, gy, gh)
        times = {k: [] for k in cases}
        for f in cases.values():
            f()
        for i in range(args.reps):
            for k in (list(cases) if i % 2 == 0 else list(reversed(cases))):
                t = time.perf_counter()
                cases[k]()
                times[k].append(time.perf_counter() - t)
        med = {k: 1e3 * median(v) for k, v in times.items()}
        y_sep, h_sep = cases["fwd separate"]()
        y_st, h_st = cases["fwd stacked"]()
        rows[name] = {
            "median_ms": med,
            "fwd stacked / separate": med["fwd stacked"] / med["fwd separate"],
            "fwd stacked without the copy / separate": med["fwd stacked, no copy"] / med["fwd separate"],
            "bwd stacked / separate": med["bwd stacked"] / med["bwd separate"],
            "max_abs_diff": {"fwd base": float((y_sep - y_st).abs().max()), "fwd low-rank": float((h_sep - h_st).abs().max()),
                             "bwd": float((cases["bwd separate"]() - cases["bwd stacked"]()).abs().max())},
        }
        print(f"{name}: fwd stacked/separate {rows[name]['fwd stacked / separate']:.3f} (without the copy "
              f"{rows[name]['fwd stacked without the copy / separate']:.3f}), bwd "
              f"{rows[name]['bwd stacked / separate']:.3f}; max |Δ| {rows[name]['max_abs_diff']}", flush=True)
    result = {"benchmark": "stacked_gemm", "command": "python benchmarks/stacked_gemm.py " + " ".join(sys.argv[1:]),
              "machine": machine_info(args.threads), "N": N, "r": R, "reps": args.reps, "shapes": rows}
    save_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
