"""The causal LM loss on answer rows only vs the forward's own loss: training-step and evaluation time.

    python benchmarks/answer_loss_speed.py [--steps N] [--threads 1] [--out benchmarks/results/answer_loss_speed.json]

What ``subpeft train`` / ``compare`` do on the ``chat`` task (SmolLM2-135M-Instruct, chatterbot pairs,
batch 4, 64 tokens; the prompt's labels are -100): the task loss was ``model(**batch).loss``, which runs the
output layer (576 x 49,152, tied to the embeddings) and a log-softmax over the vocabulary at every position;
:meth:`subpeft.app.workloads.Generation.loss` runs them on the rows that predict an answer token only (about a
quarter of the positions on this task). Both give the same loss (tests/fast/test_generation_loss.py).

Contenders, on one model each setting (timing does not depend on the weights' values): ``forward`` (the
forward's loss with labels) and ``answer_rows`` (the workload's loss). A training step is loss + backward +
AdamW step + zero_grad, for LoRA r = 2 on q_proj/v_proj and for full fine-tuning (every weight trains); an
evaluation step is the loss under ``torch.no_grad()`` (what ``answer_loss`` does on dev and test, 16 pairs a
batch). After 2 discarded warm-up steps each, contenders alternate step by step (A B, then B A) on the same
batches, so a shared machine's noise hits both alike; the result is the ratio of medians (answer_rows ÷
forward) with the quartiles of each.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import subpeft as sp  # noqa: E402
from subpeft.app.data import load_task  # noqa: E402
from subpeft.app.models import load_model  # noqa: E402
from subpeft.app.workloads import Generation  # noqa: E402


def _quartiles(xs: list[float]) -> dict[str, float]:
    q = statistics.quantiles(xs, n=4)
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2]}


def _measure(step, batches: list[dict], warmup: int = 2) -> dict:
    """Alternate the two contenders over ``batches`` (after warm-up); seconds per step of each."""
    times: dict[str, list[float]] = {"forward": [], "answer_rows": []}
    for name in times:
        for b in batches[:warmup]:
            step(name, b)
    for i, b in enumerate(batches):
        order = ("forward", "answer_rows") if i % 2 == 0 else ("answer_rows", "forward")
        for name in order:
            t = time.perf_counter()
            step(name, b)
            times[name].append(time.perf_counter() - t)
    out = {name: _quartiles(ts) for name, ts in times.items()}
    out["ratio"] = out["answer_rows"]["median"] / out["forward"]["median"]
    out["steps"] = len(batches)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=16, help="measured steps per contender and setting")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/answer_loss_speed.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    task = load_task("chat", seed=0, sizes={"dev": 200, "test": 200})
    model, tok = load_model("smollm2")
    work = Generation(task, tok, max_length=64)
    rng = random.Random(0)
    train = [work.train_batch(rng.sample(range(work.num_train), 4)) for _ in range(args.steps)]
    evals = [work.train_batch(rng.sample(range(work.num_train), 16)) for _ in range(args.steps)]
    positions = sum(b["labels"].numel() for b in train)
    answers = sum(int((b["labels"][:, 1:] != -100).sum()) for b in train)

    def loss_of(model, name, batch):
        return model(**batch).loss if name == "forward" else work.loss(model, batch)

    results = {}
    for setting in ("lora_r2", "full"):
        if setting == "lora_r2":
            torch.manual_seed(0)
            trained = sp.attach(model, sp.LoRA(r=2, targets=["q_proj", "v_proj"]))
        else:
            trained = model
            for prm in model.parameters():
                prm.requires_grad_(True)
        opt = torch.optim.AdamW([q for q in trained.parameters() if q.requires_grad], lr=1e-5)
        trained.train()

        def train_step(name, batch, trained=trained, opt=opt):
            loss_of(trained, name, batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        print(f"{setting}: training steps ...", flush=True)
        results[f"train_{setting}"] = _measure(train_step, train)
        print(f"  ratio {results[f'train_{setting}']['ratio']:.3f}", flush=True)
        if setting == "lora_r2":
            trained.eval()

            def eval_step(name, batch, trained=trained):
                with torch.no_grad():
                    loss_of(trained, name, batch)

            print("evaluation steps ...", flush=True)
            results["eval"] = _measure(eval_step, evals)
            print(f"  ratio {results['eval']['ratio']:.3f}", flush=True)
            model = trained.merge_and_unload() if hasattr(trained, "merge_and_unload") else model
    record = {
        "command": "python benchmarks/answer_loss_speed.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "torch": torch.__version__},
        "task": "chat, SmolLM2-135M-Instruct, batch 4 (evaluation 16), max_length 64",
        "answer_rows_share": answers / positions,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: round(v["ratio"], 3) for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
