"""Tokenised batches and evaluation of sequence classifiers (plain models or ``TunedModel`` objects), and the
learning-rate schedule of the training loop (:mod:`subpeft.training.loop`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

__all__ = [
    "encode",
    "evaluate_accuracy",
    "iter_batches",
    "linear_warmup_decay",
    "predict_logits",
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


def linear_warmup_decay(optimizer, warmup_steps: int, total_steps: int):
    """LambdaLR: linear warm-up from 0 over ``warmup_steps``, then linear decay to 0."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        remaining = total_steps - step
        return max(0.0, remaining / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
