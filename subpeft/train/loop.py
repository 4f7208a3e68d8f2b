"""A small, reusable training and evaluation loop for sequence classification.

Works with a plain Hugging Face model or a ``subpeft`` ``TunedModel``. When the model has the
library's training hooks, the loop calls them:

* ``model.regularization()`` is added to the loss of every step;
* ``model.step(global_step)`` is called after every optimizer step (and scheduler step),
  before the gradients are cleared, with ``global_step`` = number of optimizer steps done
  so far (1 after the first step), like ``TrainerState.global_step`` in HF callbacks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "TrainResult",
    "encode",
    "evaluate_accuracy",
    "iter_batches",
    "predict_logits",
    "train_classifier",
]

DEFAULT_MAX_LENGTH = 128


# --------------------------------------------------------------------------- batching


def encode(tokenizer, texts: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH) -> dict:
    """Tokenize ``texts`` once, truncated to ``max_length`` tokens, without padding."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    return tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)


def _collate(tokenizer, encoded: dict, idx: Sequence[int]) -> dict[str, torch.Tensor]:
    """Pad the examples at ``idx`` to the longest of them (dynamic padding).

    ``input_ids`` are padded with the tokenizer's pad token, every other field (attention
    mask, token type ids, ...) with 0, on the tokenizer's ``padding_side``.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    left = getattr(tokenizer, "padding_side", "right") == "left"
    width = max(len(encoded["input_ids"][i]) for i in idx)
    batch = {}
    for key in encoded:
        fill = pad_id if key == "input_ids" else 0
        rows = []
        for i in idx:
            row = list(encoded[key][i])
            pad = [fill] * (width - len(row))
            rows.append(pad + row if left else row + pad)
        batch[key] = torch.tensor(rows, dtype=torch.long)
    return batch


def iter_batches(
    tokenizer,
    texts: Sequence[str],
    labels: Sequence[int] | None = None,
    *,
    batch_size: int = 16,
    max_length: int = DEFAULT_MAX_LENGTH,
    shuffle: bool = False,
    seed: int = 0,
    encoded: dict | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield padded batches (``input_ids``, ``attention_mask``, ... and ``labels`` if given).

    With ``shuffle`` the order is a permutation drawn from ``seed``; otherwise it is the
    input order. Pass ``encoded`` (from :func:`encode`) to reuse a tokenization.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if labels is not None and len(labels) != len(texts):
        raise ValueError(f"got {len(texts)} texts but {len(labels)} labels")
    enc = encoded if encoded is not None else encode(tokenizer, texts, max_length)
    n = len(texts)
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    else:
        order = list(range(n))
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        batch = _collate(tokenizer, enc, idx)
        if labels is not None:
            batch["labels"] = torch.tensor([int(labels[i]) for i in idx], dtype=torch.long)
        yield batch


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> torch.Tensor:
    """Logits for ``texts`` (in input order), computed in eval mode without gradients.

    Examples are batched by length to keep padding small; the model's train/eval mode is
    restored afterwards.
    """
    if len(texts) == 0:
        raise ValueError("predict_logits needs at least one text")
    enc = encode(tokenizer, texts, max_length)
    by_len = sorted(range(len(texts)), key=lambda i: (len(enc["input_ids"][i]), i))
    device = _device_of(model)
    was_training = model.training
    model.eval()
    try:
        chunks = []
        for start in range(0, len(by_len), batch_size):
            idx = by_len[start : start + batch_size]
            out = model(**_to(_collate(tokenizer, enc, idx), device))
            chunks.append(out.logits.float().cpu())
        logits = torch.cat(chunks)
    finally:
        model.train(was_training)
    result = torch.empty_like(logits)
    result[torch.tensor(by_len)] = logits
    return result


def evaluate_accuracy(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    labels: Sequence[int],
    batch_size: int = 64,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> float:
    """Fraction of ``texts`` whose arg-max logit is the label (eval mode, no gradients)."""
    if len(texts) != len(labels):
        raise ValueError(f"got {len(texts)} texts but {len(labels)} labels")
    logits = predict_logits(model, tokenizer, texts, batch_size=batch_size, max_length=max_length)
    target = torch.as_tensor(list(labels), dtype=torch.long)
    return (logits.argmax(-1) == target).float().mean().item()


# --------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    """What :func:`train_classifier` did."""

    steps: int
    epochs: float
    seconds: float
    losses: list[float] = field(default_factory=list)  # task loss + regularization, per step
    learning_rates: list[float] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        """Mean loss over the last 10% of steps (at least one)."""
        if not self.losses:
            return math.nan
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return sum(tail) / len(tail)

    @property
    def first_loss(self) -> float:
        """Mean loss over the first 10% of steps (at least one)."""
        if not self.losses:
            return math.nan
        head = self.losses[: max(1, len(self.losses) // 10)]
        return sum(head) / len(head)


def linear_warmup_decay(optimizer, warmup_steps: int, total_steps: int):
    """LambdaLR: linear warm-up from 0 over ``warmup_steps``, then linear decay to 0."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        remaining = total_steps - step
        return max(0.0, remaining / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _hook(model: nn.Module, name: str):
    fn = getattr(model, name, None)
    return fn if callable(fn) else None


def train_classifier(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    epochs: float = 1.0,
    max_steps: int | None = None,
    lr: float = 1e-3,
    batch_size: int = 16,
    max_length: int = DEFAULT_MAX_LENGTH,
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.06,
    max_grad_norm: float | None = 1.0,
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
    finalize: bool = True,
) -> TrainResult:
    """Fine-tune a sequence classifier (plain model or ``TunedModel``) with AdamW.

    Only parameters with ``requires_grad`` are optimised. The learning rate warms up
    linearly over ``warmup_ratio`` of the steps and then decays linearly to 0; gradients are
    clipped to ``max_grad_norm`` (``None`` disables clipping). Training runs for
    ``max_steps`` optimizer steps when given (cycling through reshuffled epochs), otherwise
    for ``epochs`` passes over the data. ``seed`` fixes the batch order and seeds torch's
    global RNG (dropout). The model is left in eval mode.

    Library hooks: ``model.regularization()`` is added to each step's loss and
    ``model.step(global_step)`` is called after each optimizer step, when the model has them;
    with ``finalize=True``, ``model.finalize()`` runs once training has finished (e.g. Diff
    pruning then keeps its top-k entries).
    """
    if len(texts) != len(labels):
        raise ValueError(f"got {len(texts)} texts but {len(labels)} labels")
    if len(texts) == 0:
        raise ValueError("train_classifier needs at least one training example")
    steps_per_epoch = math.ceil(len(texts) / batch_size)
    total = max_steps if max_steps is not None else math.ceil(epochs * steps_per_epoch)
    if total < 1:
        raise ValueError(f"nothing to train: epochs={epochs}, max_steps={max_steps}")

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad=True)")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=lr)
    scheduler = linear_warmup_decay(optimizer, int(round(warmup_ratio * total)), total)
    regularization = _hook(model, "regularization")
    step_hook = _hook(model, "step")

    torch.manual_seed(seed)
    enc = encode(tokenizer, texts, max_length)
    device = _device_of(model)
    result = TrainResult(steps=0, epochs=0.0, seconds=0.0)

    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, disable=not progress, unit="step", dynamic_ncols=True)
    start = time.perf_counter()
    model.train()
    optimizer.zero_grad(set_to_none=True)
    epoch = 0
    try:
        while result.steps < total:
            batches = iter_batches(
                tokenizer,
                texts,
                labels,
                batch_size=batch_size,
                shuffle=True,
                seed=seed * 1_000_003 + epoch,
                encoded=enc,
            )
            for batch in batches:
                out = model(**_to(batch, device))
                loss = out.loss
                if regularization is not None:
                    reg = regularization()
                    if torch.is_tensor(reg) or reg:
                        loss = loss + reg
                loss.backward()
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                result.learning_rates.append(optimizer.param_groups[0]["lr"])
                optimizer.step()
                scheduler.step()
                result.steps += 1
                if step_hook is not None:
                    step_hook(result.steps)
                optimizer.zero_grad(set_to_none=True)

                value = loss.detach().item()
                if not math.isfinite(value):
                    raise FloatingPointError(f"loss became {value} at step {result.steps}; try a lower lr (now {lr})")
                result.losses.append(value)
                bar.update(1)
                if result.steps % 10 == 0 or result.steps == total:
                    recent = result.losses[-10:]
                    bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}", refresh=False)
                if result.steps >= total:
                    break
            epoch += 1
    finally:
        bar.close()
        model.eval()
    finalize_hook = _hook(model, "finalize")
    if finalize and finalize_hook is not None:
        finalize_hook()
    result.seconds = time.perf_counter() - start
    result.epochs = result.steps / steps_per_epoch
    return result
