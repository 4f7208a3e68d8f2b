"""subpeft.analysis.report on a 4-bit (NF4) base: it reads W dequantised, as every method does.

The reference is the same model with its 4-bit layers dequantised into ``nn.Linear``
(:func:`subpeft.quant.dequantize_model`) and the same adapter: both hold exactly the same W and ΔW,
so every measure must agree.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes: pip install bitsandbytes")

import subpeft as sp  # noqa: E402
from subpeft import analysis as A  # noqa: E402
from subpeft.core.layers import is_quantized  # noqa: E402
from subpeft.quant import QuantizedMergeWarning, dequantize_model, quantize  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


def tuned_4bit(method: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = quantize(LlamaForCausalLM(cfg))
        tuned = sp.attach(model, sp.get_method(method).config_cls(targets=TARGETS))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in tuned.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return tuned


@pytest.mark.parametrize("method", ["lora", "svdiff", "ia3"])  # delta_weight; SVD of W; merged_params − W
def test_report_on_4bit_base_equals_report_on_its_dequantised_copy(method):
    tuned = tuned_4bit(method)
    dense = copy.deepcopy(tuned)
    dequantize_model(dense)
    assert any(is_quantized(layer.base_layer) for _, layer in tuned.adapted_layers())
    assert not any(is_quantized(m) for m in dense.modules())
    A.clear_cache()
    got, want = A.report(tuned), A.report(dense)
    assert [r.layer for r in got] == [r.layer for r in want] and len(got) == len(TARGETS)
    for g, w in zip(got, want, strict=True):
        assert g.measured and g.shape == w.shape
        assert g.delta_norm == pytest.approx(w.delta_norm, rel=1e-5)
        assert g.relative_delta_norm == pytest.approx(w.relative_delta_norm, rel=1e-5)
        assert g.effective_rank == pytest.approx(w.effective_rank, rel=1e-4)
        torch.testing.assert_close(torch.tensor(g.singular_values), torch.tensor(w.singular_values), rtol=1e-5, atol=1e-6)
        assert [d.index for d in g.top] == [d.index for d in w.top]


def test_report_on_a_merged_4bit_base():
    """Merged into 4 bits, ΔW is read back as the merged (requantised) W minus the unmerged W that the
    adapter gives back (Q(W') − (Q(W') − ΔW)): the adapter's own ΔW, whatever requantising did."""
    tuned = tuned_4bit("lora")
    A.clear_cache()
    before = A.report(tuned)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QuantizedMergeWarning)
        tuned.merge()
    after = A.report(tuned)
    for b, a in zip(before, after, strict=True):
        assert a.measured
        assert a.delta_norm == pytest.approx(b.delta_norm, rel=1e-4)
        assert a.effective_rank == pytest.approx(b.effective_rank, rel=1e-3)
