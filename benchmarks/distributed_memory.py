"""Per-process memory and step time of SmolLM2-135M LoRA in 1 process, DDP x 2 and FSDP2 x 2: subpeft beside
Hugging Face peft + accelerate.

    python benchmarks/distributed_memory.py [--steps 8] [--out benchmarks/results/distributed_memory.json]

Every configuration is its own launch (``torchrun --standalone --nproc-per-node 2`` for the 2-process ones, gloo
on CPU, one thread per process), each doing the same work: SmolLM2-135M-Instruct in float32 (the chat task of
``subpeft train``, max 64 tokens), LoRA r=8, alpha=16, dropout 0 on q_proj and v_proj, AdamW lr 2e-3, a global
batch of 8 per optimizer step (1 process: 8; 2 processes: 4 each), 2 warm-up steps, then ``--steps`` timed ones.

* subpeft: ``sp.attach`` + the library's ``Trainer`` (1 process), ``subpeft.distributed.wrap(tuned, "ddp")``
  (DistributedDataParallel) or ``"fsdp"`` (``fully_shard`` per block and at the root, the frozen base sharded,
  the LoRA tensors whole on every rank, their gradients averaged by one all_reduce).
* peft + accelerate: ``get_peft_model`` + ``Accelerator(cpu=True).prepare`` (DDP, as accelerate sets it up under
  torchrun), the same batches, ``accelerator.backward``. FSDP2: accelerate 1.16 enables FSDP only on accelerator
  devices (on CPU it ignores a ``FullyShardedDataParallelPlugin`` and runs DDP), so peft's FSDP2 row calls
  ``fully_shard`` per decoder layer and at the root by hand, as a CPU user must (the LoRA tensors are sharded
  with their block).

Memory on CPU: glibc keeps large freed buffers in the process's heap (its mmap threshold rises after the first
frees), so FSDP2's gathered blocks, allocated and freed at every forward and backward, inflate the RSS of a
sharded run far above what it holds (+300 MB on a 150 MB toy model; +2.5 GB after 5 SmolLM2 steps, still growing).
Every configuration therefore runs with ``MALLOC_MMAP_THRESHOLD_=1048576`` (buffers of 1 MiB or more are mmapped
and returned on free), alike for all; a user of FSDP2 on CPU wants it too.

Measured per process: **parameter bytes held** (the local shard of every parameter: what FSDP2 divides by N),
**peak RSS** (``ru_maxrss``: everything the process holds, the Python/torch runtime, the tokenizer and the
data included, which no strategy divides) and its rise over the training loop, and the **median step time**.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [  # (library, strategy, processes)
    ("subpeft", "none", 1), ("subpeft", "ddp", 2), ("subpeft", "fsdp", 2),
    ("peft", "none", 1), ("peft", "ddp", 2), ("peft", "fsdp", 2),
]
GLOBAL_BATCH = 8


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def local_bytes(model) -> int:
    total = 0
    for p in model.parameters():
        t = p.to_local() if hasattr(p, "to_local") else p
        total += t.numel() * t.element_size()
    return total


def worker(library: str, strategy: str, steps: int, out: Path) -> None:
    import torch
    import torch.distributed as dist

    import subpeft as sp
    from subpeft import distributed as spd
    from subpeft.app.data import load_task
    from subpeft.app.models import load_smollm2, set_model_dropout
    from subpeft.app.workloads import make_workload

    device = spd.init("cpu")
    rank, world = spd.rank(), spd.world_size()
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    set_model_dropout(model, 0.0)
    task = load_task("chat", {"train": 256, "dev": None, "test": 8}, seed=0)
    workload = make_workload(task, tokenizer, max_length=64)
    rss_loaded = rss_mb()
    per_rank = GLOBAL_BATCH // world
    order = torch.randperm(workload.num_train, generator=torch.Generator().manual_seed(0)).tolist()

    def batch(step: int) -> dict:
        idx = order[(step * GLOBAL_BATCH) % len(order):][:GLOBAL_BATCH]
        return workload.train_batch(idx[rank * per_rank:(rank + 1) * per_rank])

    if library == "subpeft":
        tuned = sp.attach(model, sp.LoRA(r=8, alpha=16, targets=["q_proj", "v_proj"]))
        trained = spd.wrap(tuned, strategy, device) if strategy != "none" else tuned
        params = [p for p in tuned.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=2e-3)

        def step(b):
            loss = trained(**b).loss
            loss.backward()
            spd.sync_gradients(trained)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss
        held = tuned
    else:
        from accelerate import Accelerator
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                      target_modules=["q_proj", "v_proj"]))
        if strategy == "fsdp":
            # accelerate 1.16 turns FSDP on only for accelerator devices: on CPU (MULTI_CPU) it ignores an
            # fsdp_plugin and trains under DDP (checked: every rank then holds all parameters). So peft's FSDP2
            # row shards as a user must on CPU: fully_shard per decoder layer and at the root, by hand (peft's
            # LoRA tensors are sharded with their block, FSDP2 reduces their gradients)
            from torch.distributed.fsdp import fully_shard

            for block in peft_model.base_model.model.model.layers:
                fully_shard(block)
            fully_shard(peft_model)
            accelerator = Accelerator(cpu=True)
            optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-3)
            trained = peft_model
        else:
            accelerator = Accelerator(cpu=True)
            optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-3)
            trained, optimizer = accelerator.prepare(peft_model, optimizer)

        def step(b):
            loss = trained(**b).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss
        held = trained
    trained.train()
    times = []
    rss_before = rss_mb()
    for i in range(2 + steps):
        start = time.perf_counter()
        step(batch(i))
        if i >= 2:
            times.append(time.perf_counter() - start)
    result = {
        "rank": rank, "param_bytes_mb": round(local_bytes(held) / 2**20, 1),
        "peak_rss_mb": round(rss_mb(), 1), "rss_after_load_mb": round(rss_loaded, 1),
        "rss_rise_training_mb": round(max(0.0, rss_mb() - rss_before), 1),
        "median_step_s": round(statistics.median(times), 4), "step_times_s": [round(t, 4) for t in times],
        "sharded_parameters": sum(1 for p in held.parameters() if hasattr(p, "to_local")),
    }
    gathered = spd.gather_objects(result)
    if rank == 0:
        out.write_text(json.dumps(gathered))
    if dist.is_initialized():
        dist.barrier()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distributed_memory.json"))
    p.add_argument("--worker", nargs=3, metavar=("LIBRARY", "STRATEGY", "FILE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], args.steps, Path(args.worker[2]))
        from subpeft import distributed as spd

        if spd.launched():
            spd.end_process(0)  # ends the group and exits without finalization (gloo's threads can abort it)
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "1048576"}
    rows = []
    tmp = Path(args.out).with_suffix(".part.json")
    for library, strategy, n in CONFIGS:
        cmd = [sys.executable, __file__, "--steps", str(args.steps), "--worker", library, strategy, str(tmp)]
        if n > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *cmd[1:]]
        print(f"{library} {strategy} x{n} ...", flush=True)
        done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0 or not tmp.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-12:]
            rows.append({"library": library, "strategy": strategy, "processes": n, "error": "\n".join(tail)})
            print("  failed:", *tail[-3:], sep="\n    ")
            continue
        ranks = json.loads(tmp.read_text())
        tmp.unlink()
        rows.append({"library": library, "strategy": strategy, "processes": n, "ranks": ranks})
        print(f"  params {ranks[0]['param_bytes_mb']} MB/rank, peak RSS {max(r['peak_rss_mb'] for r in ranks)} MB, "
              f"step {ranks[0]['median_step_s']} s")
    base = {r["library"]: r for r in rows if r["processes"] == 1 and "ranks" in r}
    for r in rows:
        one = base.get(r["library"])
        if "ranks" in r and one:
            r["param_bytes_vs_one_process"] = round(r["ranks"][0]["param_bytes_mb"] / one["ranks"][0]["param_bytes_mb"], 3)
            r["step_time_vs_one_process"] = round(
                max(x["median_step_s"] for x in r["ranks"]) / one["ranks"][0]["median_step_s"], 3)
    import torch

    doc = {"command": "python benchmarks/distributed_memory.py " + " ".join(sys.argv[1:]),
           "torch": torch.__version__, "malloc_mmap_threshold": env["MALLOC_MMAP_THRESHOLD_"], "global_batch": GLOBAL_BATCH, "steps": args.steps, "threads_per_process": 1,
           "rows": rows}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(table(doc))
    return 0


def table(doc: dict) -> str:
    lines = ["| library | strategy | processes | parameter MB per process | vs 1 process | peak RSS MB (max over ranks) "
             "| RSS rise in training MB | median step s | step time vs 1 process |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        if "ranks" not in r:
            lines.append(f"| {r['library']} | {r['strategy']} | {r['processes']} | failed: "
                         f"{r['error'].splitlines()[-1][:80]} | | | | | |")
            continue
        ranks = r["ranks"]
        lines.append(
            f"| {r['library']} | {r['strategy']} | {r['processes']} | {ranks[0]['param_bytes_mb']} | "
            f"{r.get('param_bytes_vs_one_process', '')} | {max(x['peak_rss_mb'] for x in ranks)} | "
            f"{max(x['rss_rise_training_mb'] for x in ranks)} | {max(x['median_step_s'] for x in ranks)} | "
            f"{r.get('step_time_vs_one_process', '')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
