"""LoRA's fused nn.Linear path (one autograd node) equals the generic path, values and gradients."""

import torch

import subpeft as sp
from subpeft.mechanisms.low_rank import FusedLowRankLinear


def _grads(use_fused: bool, dtype=torch.float64):
    torch.manual_seed(0)
    base = torch.nn.Linear(7, 5).to(dtype)
    base.weight.requires_grad_(True)
    tuned = sp.attach(torch.nn.Sequential(base), sp.LoRA(r=3, alpha=5, targets=["0"]))
    base.weight.requires_grad_(True)  # also check the (normally frozen) base weight's gradient
    layer = tuned.model[0]
    with torch.no_grad():
        layer.adapters["default"].lora_B.normal_()
    handle = None
    if not use_fused:  # a forward hook on the base layer makes LoRA take its generic path
        handle = layer.base_layer.register_forward_hook(lambda m, i, o: None)
    x = torch.randn(2, 4, 7, dtype=dtype, requires_grad=True)
    y = tuned(x)
    (y.sin().sum()).backward()
    if handle:
        handle.remove()
    a = layer.adapters["default"]
    return y.detach(), x.grad, a.lora_A.grad, a.lora_B.grad, base.weight.grad, base.bias.grad


def test_fused_and_generic_paths_agree(monkeypatch):
    calls = []
    real = FusedLowRankLinear.apply
    monkeypatch.setattr(FusedLowRankLinear, "apply", lambda *a: calls.append(1) or real(*a))
    fused = _grads(True)
    assert calls, "the fused path should be taken for a plain nn.Linear"
    calls.clear()
    generic = _grads(False)
    assert not calls, "a hooked base layer must take the generic path"
    for got, want in zip(fused, generic, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_fused_path_gradcheck_and_double_backward():
    torch.manual_seed(1)
    args = [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in [(3, 2, 4), (5, 4), (5,), (2, 4), (5, 2)]]
    fn = lambda x, W, b, A, B: FusedLowRankLinear.apply(x, W, b, A, B, 0.7)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)
