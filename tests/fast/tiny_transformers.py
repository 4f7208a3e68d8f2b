"""Tiny random Hugging Face transformers (no downloads) for module- and prompt-kind methods.

Sizes are small but not degenerate: several heads, grouped-query attention in the Llama (kv heads <
heads), hidden ≠ intermediate, and two blocks so that per-layer state cannot be shared by mistake.
Each builder is seeded and returns a model in eval mode (no dropout), so outputs are deterministic.
"""

from __future__ import annotations

import torch

VOCAB = 97


def tiny_bert(num_labels: int = 3, seed: int = 0, **overrides):
    """A 2-block BERT sequence classifier (hidden 32, 4 heads, FFN 48)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
               max_position_embeddings=64, type_vocab_size=2, num_labels=num_labels, pad_token_id=0)
    cfg.update(overrides)
    model = BertForSequenceClassification(BertConfig(**cfg))
    return model.eval()


def tiny_llama(seed: int = 0, **overrides):
    """A 2-block Llama causal LM (hidden 32, 4 heads, 2 kv heads, FFN 48)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=48, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               tie_word_embeddings=False)
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    return model.eval()


def batch(seed: int = 1, batch_size: int = 3, length: int = 7, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """input_ids and attention_mask with rows of different lengths (padding on the given side, pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch_size, length), generator=g)
    mask = torch.ones(batch_size, length, dtype=torch.long)
    for row in range(1, batch_size):
        pad = min(row * 2, length - 2)
        if padding_side == "right":
            mask[row, length - pad:] = 0
        else:
            mask[row, :pad] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask}
