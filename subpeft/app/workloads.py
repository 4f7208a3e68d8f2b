"""What a training run feeds the model and how it scores it: one class per kind of task.

A workload turns a task's training examples into batches (by example index, so that a run can
resume at any data position) and evaluates a model on a split. :class:`Classification` scores
accuracy (and loss, macro-F1); :class:`Generation` scores the held-out answer loss (mean NLL of the
response tokens, prompt masked out, each prompt weighing as much as one pair) and exact match of greedy answers
(per distinct prompt).

Both use only ``out.loss`` / ``out.logits`` of the model's forward, in the caller's terms (one row per
``input_ids`` position): prompt-kind adapters (which prepend virtual tokens) work unchanged. The causal
LM's loss computes the output layer on the answer positions only (:meth:`Generation.loss`).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..training.batches import _collate, _device_of, _to, encode, predict_logits
from ..training.loop import Workload
from .data import PairTask, Task

__all__ = ["Classification", "Generation", "Workload", "make_workload", "normalize_answer"]

IGNORE = -100


class Classification(Workload):
    """Sequence classification of a :class:`~subpeft.train.data.Task` (texts with integer labels)."""

    kind = "classification"
    metric = "accuracy"
    greater_is_better = True

    def __init__(self, task: Task, tokenizer, max_length: int = 128) -> None:
        self.task, self.tokenizer, self.max_length = task, tokenizer, max_length
        self._train = encode(tokenizer, task.train.texts, max_length) if len(task.train) else None
        self.num_train = len(task.train)

    def train_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        batch = _collate(self.tokenizer, self._train, list(indices))
        batch["labels"] = torch.tensor([self.task.train.labels[i] for i in indices], dtype=torch.long)
        return batch

    def evaluate(self, model: nn.Module, split: str, *, batch_size: int = 64, full: bool = True) -> dict[str, Any]:
        data = self.task.split(split)
        if len(data) == 0:
            raise ValueError(f"the {split} split of {self.task.name!r} is empty: nothing to evaluate")
        logits = predict_logits(model, self.tokenizer, data.texts, batch_size=batch_size, max_length=self.max_length)
        target = torch.as_tensor(data.labels, dtype=torch.long)
        pred = logits.argmax(-1)
        f1s = []
        for c in range(self.task.num_labels):
            tp = int(((pred == c) & (target == c)).sum())
            denom = int((pred == c).sum()) + int((target == c).sum())
            if int((target == c).sum()):
                f1s.append(2 * tp / denom if denom else 0.0)
        return {
            "accuracy": (pred == target).float().mean().item(),
            "macro_f1": sum(f1s) / len(f1s) if f1s else math.nan,
            "loss": nn.functional.cross_entropy(logits, target).item(),
            "examples": len(data),
        }


def output_head(model: nn.Module) -> nn.Module | None:
    """The output layer of the first Hugging Face model inside ``model`` (through DDP and
    :class:`~subpeft.TunedModel` wrappers; an adapter's wrapper of it if one replaced it), or None."""
    for module in model.modules():
        if getattr(type(module), "get_output_embeddings", None) is not None:  # the class's, not a proxy's
            head = module.get_output_embeddings()
            return head if isinstance(head, nn.Module) else None
    return None


def normalize_answer(text: str) -> str:
    """Lower case, spaces collapsed, surrounding spaces and final punctuation dropped (for exact match)."""
    return re.sub(r"[\s.!?]+$", "", " ".join(text.lower().split()))


class Generation(Workload):
    """Instruction tuning of a causal LM on a :class:`~subpeft.train.data.PairTask`.

    Each example is ``prompt + response + eos``; the prompt is the tokenizer's chat template around
    the user turn (when it has one, with the assistant turn opened) or ``"Question: …\\nAnswer:"``.
    Labels are -100 on the prompt and padding, so the loss is the response's alone. Responses are
    cut to fit ``max_length`` (prompts keep at most ``max_length // 2`` tokens, their end).
    """

    kind = "generation"
    metric = "answer_loss"
    greater_is_better = False

    def __init__(self, task: PairTask, tokenizer, max_length: int = 128, max_new_tokens: int = 32,
                 exact_match_limit: int | None = 200) -> None:
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.task, self.tokenizer, self.max_length = task, tokenizer, max_length
        self.max_new_tokens, self.exact_match_limit = max_new_tokens, exact_match_limit
        self.num_train = len(task.train)
        self._train = [self._example(p, r) for p, r in zip(task.train.prompts, task.train.responses, strict=True)]

    def prompt_text(self, prompt: str) -> str:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
        return f"Question: {prompt}\nAnswer:"

    def _prompt_ids(self, prompt: str) -> list[int]:
        ids = self.tokenizer(self.prompt_text(prompt), add_special_tokens=True)["input_ids"]
        return ids[-max(1, self.max_length // 2):]

    def _example(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
        p = self._prompt_ids(prompt)
        text = response if getattr(self.tokenizer, "chat_template", None) else " " + response
        r = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        r = r[: max(1, self.max_length - len(p))]
        return p + r, [IGNORE] * len(p) + r

    def _pad(self, examples: Sequence[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in examples)
        pad = self.tokenizer.pad_token_id
        ids = [x + [pad] * (width - len(x)) for x, _ in examples]
        labels = [y + [IGNORE] * (width - len(y)) for _, y in examples]
        mask = [[1] * len(x) + [0] * (width - len(x)) for x, _ in examples]
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}

    def train_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        return self._pad([self._train[i] for i in indices])

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean NLL of the answer tokens, with logits computed for the answer positions only.

        Equal to the forward's ``loss`` with ``labels`` (``cross_entropy(logits[:, :-1], labels[:, 1:])``,
        the mean over targets other than -100), but the output layer (SmolLM2: a 576 × 49,152 matmul, a fifth
        of the model's weights, and a softmax over 49,152 words per position) runs only on the rows that
        predict an answer token: about a quarter of the positions on the chat task. A pre-hook on the
        model's output embeddings gathers those rows of its input; when that input is not one row per
        ``labels`` position (a prompt-kind adapter's virtual tokens), it is left alone and the loss is taken
        from the full logits (which such adapters return in the caller's terms). A ``torch.compile``'d model gets
        the forward's own loss: a hook added and removed at every call would make it recompile."""
        labels = batch["labels"]
        head = None if hasattr(model, "_orig_mod") else output_head(model)  # torch.compile'd: no per-call hooks
        if head is None:
            return model(**batch).loss
        targets = labels[:, 1:]
        keep = targets != IGNORE
        picked: list[bool] = []

        def pick(_module, args, kwargs):
            hidden = args[0] if args else None
            if picked or hidden is None or hidden.dim() != 3 or hidden.shape[:2] != labels.shape:
                return None
            picked.append(True)
            return (hidden[:, :-1][keep], *args[1:]), kwargs

        handle = head.register_forward_pre_hook(pick, with_kwargs=True)
        try:
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        finally:
            handle.remove()
        if picked:
            return nn.functional.cross_entropy(logits.float(), targets[keep])
        return nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                           targets.reshape(-1), ignore_index=IGNORE)

    def loss_units(self, batch: dict[str, torch.Tensor]) -> int:
        """The answer tokens the causal LM's loss averages over (targets after the shift)."""
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    @torch.no_grad()
    def answer_loss(self, model: nn.Module, split: str, *, batch_size: int = 16) -> float:
        """Mean NLL per response token over the split, each prompt counting as much as one pair: a pair's tokens
        weigh 1 / (the number of reference responses its prompt has in the split). With one response per prompt
        this is the plain token-weighted mean; a prompt with 90 responses (chatterbot has ten) would otherwise
        be most of the score. Batches hold pairs of equal weight, so only the forward's mean loss is needed."""
        data = self.task.split(split)
        examples = [self._example(p, r) for p, r in zip(data.prompts, data.responses, strict=True)]
        responses = Counter(data.prompts)
        weight = [1.0 / responses[p] for p in data.prompts]
        order = sorted(range(len(examples)), key=lambda i: (-weight[i], len(examples[i][0])))
        device, total, count = _device_of(model), 0.0, 0.0
        start = 0
        while start < len(order):
            w = weight[order[start]]
            stop = start + 1
            while stop < len(order) and stop - start < batch_size and weight[order[stop]] == w:
                stop += 1
            batch = self._pad([examples[i] for i in order[start:stop]])
            start = stop
            n = self.loss_units(batch)  # targets after the causal shift
            if n == 0:
                continue
            total += w * float(self.loss(model, _to(batch, device))) * n
            count += w * n
        return total / count if count else 0.0

    @torch.no_grad()
    def exact_match(self, model: nn.Module, split: str, *, batch_size: int = 16) -> tuple[float, int]:
        """Fraction of distinct prompts whose greedy answer equals one of their reference answers
        (after :func:`normalize_answer`), over at most ``exact_match_limit`` prompts."""
        data = self.task.split(split)
        refs: dict[str, set[str]] = {}
        for p, r in zip(data.prompts, data.responses, strict=True):
            refs.setdefault(p, set()).add(normalize_answer(r))
        prompts = list(refs)[: self.exact_match_limit] if self.exact_match_limit else list(refs)
        tok, device, hits = self.tokenizer, _device_of(model), 0
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            ids = [self._prompt_ids(p) for p in chunk]
            width = max(map(len, ids))
            input_ids = torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in ids], device=device)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            for p, row in zip(chunk, out[:, width:].tolist(), strict=True):
                if normalize_answer(tok.decode(row, skip_special_tokens=True)) in refs[p]:
                    hits += 1
        return hits / max(len(prompts), 1), len(prompts)

    def evaluate(self, model: nn.Module, split: str, *, batch_size: int = 16, full: bool = True) -> dict[str, Any]:
        data = self.task.split(split)
        if len(data) == 0:
            raise ValueError(f"the {split} split of {self.task.name!r} is empty: nothing to evaluate")
        was_training = model.training
        model.eval()
        try:
            out: dict[str, Any] = {"answer_loss": self.answer_loss(model, split, batch_size=batch_size),
                                   "examples": len(data)}
            if full:
                em, n = self.exact_match(model, split, batch_size=batch_size)
                out.update(exact_match=em, exact_match_prompts=n)
        finally:
            model.train(was_training)
        return out


def make_workload(task: Task | PairTask, tokenizer, *, max_length: int = 128, max_new_tokens: int = 32,
                  exact_match_limit: int | None = 200) -> Workload:
    """The workload for a task of either kind."""
    if task.kind == "generation":
        return Generation(task, tokenizer, max_length, max_new_tokens, exact_match_limit)
    return Classification(task, tokenizer, max_length)
