"""Tier 'real': QLoRA on CPU. LoRA and an SVD method (Spectral Adapter, top-r singular vectors of the
dequantised W) on 4-bit NF4 + double-quantised all-MiniLM-L6-v2 with the tweets task, and on 4-bit
SmolLM2-135M with tweets as language-model text.

For each: the training loss falls; merging into the 4-bit base requantises each layer with an error
(‖Q(W') − W'‖_F / ‖W'‖_F) no larger than the error quantising that layer's original weight made
("within the quantisation error"), and unmerging restores the outputs exactly; the saved adapter
reloads onto the 4-bit base with identical outputs. The relative gap between merged and unmerged
outputs is printed: requantising snaps entries of W' back to the 4-bit grid, so a merge into 4 bits
can undo a part of a small update (``merge_and_unload(dequantize=True)`` merges exactly instead).
Each test takes under a minute on 2 cores.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
from _real_marks import bitsandbytes, minilm_tweets, smollm2_chat
from _real_marks import marks as marked

MINILM = bitsandbytes + minilm_tweets
SMOLLM2 = bitsandbytes + smollm2_chat[:3] + minilm_tweets[2:]  # SmolLM2 (with gguf) and the tweets


SEED, MAX_LENGTH, STEPS = 0, 48, 30
MINILM_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
SMOLLM2_TARGETS = ["q_proj", "v_proj"]


def configs(targets: list[str], **extra):
    import subpeft as sp

    return {
        "lora": sp.LoRA(r=8, alpha=16, targets=targets, **extra),
        "spectral": sp.SpectralAdapter(r=8, targets=targets, **extra),
    }


def quant_errors(fp: dict[str, torch.Tensor], model) -> dict[str, float]:
    """‖Q(W) − W‖_F / ‖W‖_F of quantising each full-precision weight ``fp[name]`` into the 4-bit base."""
    from subpeft.quant import dequantize

    return {n: ((dequantize(model.get_submodule(n)).float() - W).norm() / W.norm()).item() for n, W in fp.items()}


def check_merge(tuned, base_errors: dict[str, float], compute) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge into the 4-bit base: each layer's requantisation error (‖Q(W') − W'‖_F / ‖W'‖_F, W' the
    exact merged weight) is within the error quantising that layer's original weight made. Returns
    (unmerged, merged) outputs; unmerge restores the unmerged outputs exactly."""
    from subpeft.quant import QuantizedMergeWarning, merge_errors

    unmerged = compute()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QuantizedMergeWarning)
        tuned.merge()
    try:
        errors = {n: per["default"]["rel_fro"] for n, per in merge_errors(tuned).items()}
        assert errors.keys() == {n for n, _ in tuned.adapted_layers() if n in base_errors}
        ratios = [errors[n] / base_errors[n] for n in errors]
        print(f"  requantisation error / quantisation error per layer: max {max(ratios):.3f}, mean {sum(ratios) / len(ratios):.3f}")
        assert max(ratios) <= 1.1  # about 0.1–0.96 measured: W' is near the grid, its error no larger
        merged = compute()
    finally:
        tuned.unmerge()
    assert torch.equal(compute(), unmerged)
    gap, scale = (merged - unmerged).norm().item(), unmerged.norm().item()
    print(f"  merged vs unmerged outputs: relative gap {gap / scale:.4f}")
    return unmerged, merged


# -- MiniLM + tweets ---------------------------------------------------------------------------------
@dataclass
class MiniLM:
    task: object
    tokenizer: object
    model: object  # the 4-bit base (each test attaches its adapter and unloads it)
    base_errors: dict[str, float]  # per quantised layer, ‖Q(W) − W‖_F / ‖W‖_F


@pytest.fixture(scope="module")
def minilm() -> MiniLM:
    from subpeft.quant import is_quantized, storage
    from subpeft.train import load_minilm_classifier, load_tweets
    from subpeft.train.models import load_quantized

    task = load_tweets({"train": STEPS * 16, "dev": 0, "test": 96}, seed=SEED)
    fp, tokenizer = load_minilm_classifier(task.num_labels, seed=SEED)
    weights = {n: m.weight.detach().clone() for n, m in fp.named_modules() if type(m) is torch.nn.Linear}
    model = load_quantized("minilm", num_labels=task.num_labels, double_quant=True)
    assert storage(model)["bytes_per_quantized_param"] < 0.53
    quantised = {n for n, m in model.named_modules() if is_quantized(m)}
    assert "classifier" not in quantised and len(quantised) == 6 * 6 + 1  # 6 blocks × 6 linears + pooler
    return MiniLM(task, tokenizer, model, quant_errors({n: weights[n] for n in quantised}, model))


def _classifier_loss(tuned, tokenizer, texts, labels) -> float:
    from subpeft.train import predict_logits

    logits = predict_logits(tuned, tokenizer, texts, max_length=MAX_LENGTH)
    return torch.nn.functional.cross_entropy(logits, torch.tensor(labels)).item()


@pytest.mark.parametrize("method,lr", [("lora", 3e-3), ("spectral", 1e-3)])
@marked(MINILM)
def test_qlora_minilm_tweets(minilm: MiniLM, method: str, lr: float, tmp_path):
    import subpeft as sp
    from subpeft.train import predict_logits, train_classifier

    task, tok = minilm.task, minilm.tokenizer
    probe_x, probe_y = task.train.texts[:64], task.train.labels[:64]  # a fixed set of training texts
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        tuned = sp.attach(minilm.model, configs(MINILM_TARGETS, modules_to_save=["classifier"])[method])
    try:
        before = _classifier_loss(tuned, tok, probe_x, probe_y)
        result = train_classifier(tuned, tok, task.train.texts, task.train.labels, max_steps=STEPS, lr=lr,
                                  batch_size=16, max_length=MAX_LENGTH, seed=SEED, progress=False)
        after = _classifier_loss(tuned, tok, probe_x, probe_y)
        print(f"\n{method}/4-bit MiniLM: loss on 64 training tweets {before:.3f} -> {after:.3f} "
              f"({result.steps} steps, {result.seconds:.1f} s)")
        assert after < before - 0.03, "training loss did not fall on the 4-bit base"
        unmerged, _ = check_merge(tuned, minilm.base_errors,
                                  lambda: predict_logits(tuned, tok, task.test.texts, max_length=MAX_LENGTH))
        tuned.save_pretrained(tmp_path)
    finally:
        base = tuned.unload()
    assert base is minilm.model
    reloaded = sp.load(base, tmp_path)
    try:
        assert torch.equal(predict_logits(reloaded, tok, task.test.texts, max_length=MAX_LENGTH), unmerged)
    finally:
        reloaded.unload()


# -- SmolLM2 + tweets as text ------------------------------------------------------------------------
@dataclass
class SmolLM2:
    model: object
    batches: list[dict[str, torch.Tensor]]
    base_errors: dict[str, float]


@pytest.fixture(scope="module")
def smollm2() -> SmolLM2:
    from subpeft.quant import quantize, storage
    from subpeft.train import load_tweets
    from subpeft.train.models import load_smollm2

    model, tokenizer = load_smollm2()
    texts = list(load_tweets({"train": 12, "dev": 0, "test": 0}, seed=SEED).train.texts)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    batches = []
    for i in range(0, 12, 4):
        enc = tokenizer(texts[i:i + 4], return_tensors="pt", padding="max_length", truncation=True, max_length=40)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(tuple(SMOLLM2_TARGETS))}
    quantize(model)  # the same model, in place
    assert type(model.lm_head) is torch.nn.Linear  # tied to the input embeddings: stays
    assert storage(model)["bytes_per_quantized_param"] < 0.53
    return SmolLM2(model, batches, quant_errors(weights, model))


@pytest.mark.parametrize("method", ["lora", "spectral"])
@marked(SMOLLM2)
def test_qlora_smollm2(smollm2: SmolLM2, method: str, tmp_path):
    import subpeft as sp

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        tuned = sp.attach(smollm2.model, configs(SMOLLM2_TARGETS)[method])
    try:
        tuned.train()
        opt = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0)
        passes = []
        for _ in range(3):  # three passes over the same three batches
            losses = []
            for batch in smollm2.batches:
                loss = tuned(**batch).loss
                losses.append(loss.item())
                loss.backward()
                opt.step()
                opt.zero_grad()
            passes.append(sum(losses) / len(losses))
        print(f"\n{method}/4-bit SmolLM2: mean loss per pass {[round(v, 3) for v in passes]}")
        assert passes[-1] < passes[0] - 0.1, "training loss did not fall on the 4-bit base"
        tuned.eval()

        def logits() -> torch.Tensor:
            with torch.no_grad():
                return tuned(**smollm2.batches[0]).logits

        unmerged, _ = check_merge(tuned, smollm2.base_errors, logits)
        tuned.save_pretrained(tmp_path)
    finally:
        base = tuned.unload()
    reloaded = sp.load(base, tmp_path)
    try:
        with torch.no_grad():
            assert torch.equal(reloaded(**smollm2.batches[0]).logits, unmerged)
    finally:
        reloaded.unload()
