"""subpeft.quant.fsdp without processes: what prepare_for_fsdp checks and sets, and what the sharded
accessor and local_storage give on an unsharded model. Sharding itself (2 gloo processes) is tested
in tests/dist/test_qlora_fsdp.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes: pip install bitsandbytes")

import subpeft as sp  # noqa: E402
from subpeft.quant import QuantizationError, is_quantized, quantize  # noqa: E402
from subpeft.quant.fsdp import local_storage, prepare_for_fsdp, sharded_nf4_access  # noqa: E402


def model():
    torch.manual_seed(0)
    return quantize(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)))


def test_prepare_puts_the_quant_state_on_the_module():
    m = model()
    m[0].quant_state = None  # as for a Params4bit built without its module
    m[2].support_avx512bf16_for_cpu = True
    x = torch.randn(3, 64)
    want = m(x)
    assert prepare_for_fsdp(m) is m
    for layer in (m[0], m[2]):
        assert layer.quant_state is layer.weight.quant_state
        assert layer.support_avx512bf16_for_cpu is False
        assert layer.weight.dtype == torch.uint8 and layer.weight.shape[1] == 1
    torch.testing.assert_close(m(x), want, atol=0, rtol=0)


def test_prepare_works_on_a_tuned_model_and_rejects_an_unquantised_layer():
    tuned = sp.attach(model(), sp.LoRA(r=2, targets=["0", "2"]))
    assert prepare_for_fsdp(tuned) is tuned
    import bitsandbytes as bnb

    raw = nn.Sequential(bnb.nn.Linear4bit(64, 64, quant_type="nf4"))  # its weight is quantised on .to(device)
    with pytest.raises(QuantizationError, match="not quantised yet"):
        prepare_for_fsdp(raw)


def test_unsharded_weights_keep_their_accessor_and_storage_counts():
    m = prepare_for_fsdp(model())
    assert sharded_nf4_access(m[0], "weight") is None  # not a DTensor: NF4Access answers
    assert is_quantized(m[0]) and sharded_nf4_access(m[0], "bias") is None
    s = local_storage(m)
    assert s["sharded_bytes"] == 0
    assert s["packed_code_bytes"] == 2 * 64 * 128 // 2  # two layers of 64x128, half a byte per weight
    assert s["replicated_bytes"] == s["packed_code_bytes"] + 4 * (128 + 64)  # + the float32 biases
    assert s["total_bytes"] == s["replicated_bytes"] + s["quant_state_bytes"] and s["quant_state_bytes"] > 0
