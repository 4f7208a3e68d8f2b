"""The weight-access protocol (subpeft.core.weights): one way to reach a base tensor.

- core imports neither subpeft.quant nor subpeft.train (read from the source, imports inside
  functions included);
- plain storage (Linear, Conv1D, Conv2d, Embedding, LayerNorm; weight and bias, float32 and bfloat16):
  read is the tensor itself, write/snapshot/restore are bit-exact, shape and numel are the tensor's;
- 4-bit storage (NF4Access, registered by subpeft.quant): read dequantises, shape/numel are logical,
  write requantises and reports its error, snapshot/restore give back the packed codes bit for bit;
- the registry: a toy 8-bit storage registered here by module class gets merge/unmerge (exact
  restore), the rounding warning and merge_and_unload(dequantize=True) with no edit of core; a tensor
  class is looked up before a module class; a packed weight without an accessor is a clear error.
"""

from __future__ import annotations

import ast
import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import subpeft as sp
from subpeft.core import weights
from subpeft.core.errors import UnsupportedLayerError
from subpeft.core.layer import AdaptedLayer, densify_model
from subpeft.core.layers import base_weight, dims, factory, is_quantized, weight_2d
from subpeft.core.weights import WeightAccess, is_packed, read_weight, register_weight_access, weight_access

CORE = Path(sp.__file__).parent / "core"
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


@pytest.fixture(autouse=True)
def _fresh_resolution():
    weights._RESOLVED.clear()
    yield
    weights._RESOLVED.clear()


# -- core imports neither quant nor train -----------------------------------------------------------
def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, at any depth (functions included)."""
    package = ["subpeft", "core"]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            # `from .. import quant` imports the submodule subpeft.quant
            out += [(node.lineno, f"{module}.{alias.name}" if not node.module else module) for alias in node.names]
    return out


def test_core_imports_neither_quant_nor_train():
    files = sorted(CORE.glob("*.py"))
    assert len(files) > 5
    bad = [
        f"{path.name}:{line} imports {name}"
        for path in files
        for line, name in _imports(path)
        if name.split(".")[:2] in (["subpeft", "quant"], ["subpeft", "train"])
    ]
    assert not bad, "core must not import quant/ or train/ (quant registers into core):\n" + "\n".join(bad)


def test_the_import_check_sees_relative_and_nested_imports(tmp_path):
    src = tmp_path / "x.py"
    src.write_text("def f():\n    from ..quant.nf4 import requantize\n    from .. import train\nimport subpeft.quant\n")
    names = [name for _, name in _imports(src)]
    assert sorted(names) == ["subpeft.quant", "subpeft.quant.nf4", "subpeft.train"]


# -- plain storage ------------------------------------------------------------------------------------
def _plain_layers():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    return {
        "linear": nn.Linear(6, 5),
        "conv1d": Conv1D(5, 6),
        "conv2d": nn.Conv2d(3, 4, 2),
        "embedding": nn.Embedding(7, 5),
        "norm": nn.LayerNorm(5),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "embedding", "norm"])
def test_plain_access_reads_writes_and_restores_bit_for_bit(kind, dtype):
    layer = _plain_layers()[kind].to(dtype)
    names = ["weight"] + (["bias"] if isinstance(getattr(layer, "bias", None), torch.Tensor) else [])
    for name in names:
        tensor = getattr(layer, name)
        access = weight_access(layer, name)
        assert type(access) is WeightAccess and not access.packed and not is_packed(layer, name)
        assert access.shape == tensor.shape and access.numel == tensor.numel()
        assert access.dtype == dtype and access.device == tensor.device
        assert access.read() is tensor  # plain: no copy
        assert read_weight(layer, name, torch.float64).dtype == torch.float64
        original = tensor.detach().clone()
        token = access.snapshot()
        new = torch.randn(tensor.shape, dtype=dtype)
        assert access.write(new) is None  # exact
        assert torch.equal(access.read(), new)
        access.restore(token)
        assert torch.equal(getattr(layer, name), original)
        with pytest.raises(ValueError, match="cannot write"):
            access.write(torch.zeros(3))
    assert access.dense_module() is None


def test_layer_helpers_read_through_the_protocol():
    layers = _plain_layers()
    assert dims(layers["conv2d"], "conv2d") == (4, 12)
    assert dims(layers["conv1d"], "conv1d") == (5, 6)  # Conv1D(nf=5, nx=6) stores (6, 5)
    assert dims(layers["embedding"], "embedding") == (5, 7)
    assert weight_2d(layers["conv1d"], "conv1d").shape == (5, 6)
    assert base_weight(layers["linear"]) is layers["linear"].weight
    assert factory(layers["linear"].to(torch.bfloat16))["dtype"] == torch.float32
    assert factory(layers["conv2d"].double())["dtype"] == torch.float64


def test_an_adapted_layer_reaches_its_base_tensors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    tuned = sp.attach(model, sp.LoRA(r=2, targets=["0"]))
    wrapped = tuned.model[0]
    assert isinstance(wrapped, AdaptedLayer)
    assert weight_access(wrapped).read() is wrapped.base_layer.weight
    assert weight_access(wrapped, "bias").read() is wrapped.base_layer.bias


def test_a_module_without_the_tensor_is_a_clear_error():
    with pytest.raises(UnsupportedLayerError, match="no tensor 'bias'"):
        weight_access(nn.Linear(3, 3, bias=False), "bias")
    assert not is_packed(nn.ReLU())


# -- a storage format registered from outside core --------------------------------------------------------
class Int8Linear(nn.Linear):
    """A toy 8-bit linear layer: int8 codes and one scale; W = codes · scale."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        codes, scale = Int8Access.encode(linear.weight.detach())
        self.weight = nn.Parameter(codes, requires_grad=False)
        self.register_buffer("scale", scale)
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        return F.linear(x, self.weight.float() * self.scale, self.bias)


class Int8Access(WeightAccess):
    __slots__ = ()
    packed = True
    rounding_warning = (UserWarning, "toy int8 storage rounded a merge")

    @staticmethod
    def encode(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = w.abs().max().clamp_min(1e-12) / 127
        return torch.round(w / scale).to(torch.int8), scale.reshape(())

    @property
    def dtype(self):
        return torch.float32

    def read(self, dtype=None):
        w = self.module.weight.float() * self.module.scale
        return w if dtype is None else w.to(dtype)

    def write(self, value):
        codes, scale = self.encode(value.detach().float())
        self.module.weight.data, self.module.scale = codes, scale
        return {"max_abs": (codes.float() * scale - value).abs().max().item(), "rel_fro": 0.0}

    def snapshot(self):
        return self.module.weight.data, self.module.scale  # write() replaces both

    def restore(self, token):
        self.module.weight.data, self.module.scale = token

    def dense_module(self):
        linear = nn.Linear(self.module.in_features, self.module.out_features, bias=self.module.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.read())
            if self.module.bias is not None:
                linear.bias.copy_(self.module.bias)
        return linear


register_weight_access(Int8Linear, lambda module, name: Int8Access(module, name) if name == "weight" else None)


def _int8_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.GELU(), nn.Linear(6, 4))
    model[0] = Int8Linear(model[0])
    return model


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "bitfit"])
def test_a_registered_storage_gets_merge_and_exact_unmerge_without_core_edits(method):
    model = _int8_model()
    access = weight_access(model[0])
    assert isinstance(access, Int8Access) and access.shape == (6, 8) and access.numel == 48
    assert type(weight_access(model[0], "bias")) is WeightAccess  # the bias is plain
    assert is_quantized(model[0]) and not is_quantized(model[2])
    codes, scale = model[0].weight.detach().clone(), model[0].scale.clone()
    tuned = sp.attach(model, sp.config_from_dict({"method": method, "targets": ["0", "2"], **({"r": 2} if method in ("lora", "dora") else {})}))
    with torch.no_grad():
        for p in tuned.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(5, 8)
    y = tuned(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tuned.merge()
    rounded = method != "bitfit"  # BitFit writes only the (plain) bias
    assert any("toy int8" in str(w.message) for w in caught) == rounded
    assert bool(dict(tuned.adapted_layers())["0"].quant_error) == rounded
    torch.testing.assert_close(tuned(x), y, atol=0.05, rtol=0)
    tuned.unmerge()
    base = tuned.model[0].base_layer
    assert torch.equal(base.weight, codes) and torch.equal(base.scale, scale)
    plain = tuned.merge_and_unload(dequantize=True)
    assert type(plain[0]) is nn.Linear
    torch.testing.assert_close(plain(x), y, atol=1e-5, rtol=1e-5)  # merged into the dense weight: exact


def test_densify_model_replaces_registered_packed_layers_only():
    model = _int8_model()
    out = densify_model(model)
    assert out is model and type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    assert type(densify_model(Int8Linear(nn.Linear(3, 2)))) is nn.Linear


class TaggedParameter(nn.Parameter):
    pass


class TaggedAccess(WeightAccess):
    __slots__ = ()


def test_a_tensor_class_is_looked_up_before_the_module_class():
    register_weight_access(TaggedParameter, lambda module, name: TaggedAccess(module, name))
    try:
        layer = nn.Linear(3, 2)
        layer.weight = TaggedParameter(layer.weight.detach().clone(), requires_grad=False)
        assert type(weight_access(layer)) is TaggedAccess  # though nn.Linear has an accessor (quant's)
        assert type(weight_access(layer, "bias")) is WeightAccess
    finally:
        del weights._REGISTRY[TaggedParameter]
    with pytest.raises(ValueError, match="specific"):
        register_weight_access(torch.Tensor, lambda module, name: None)


def test_a_packed_weight_without_an_accessor_is_a_clear_error():
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(4, dtype=torch.uint8), requires_grad=False)
            self.weight.quant_state = object()  # as bitsandbytes marks a 4-bit weight

    layer = Packed()
    with pytest.raises(UnsupportedLayerError, match="import subpeft.quant"):
        weight_access(layer)
    assert is_packed(layer)


# -- 4-bit storage ----------------------------------------------------------------------------------------
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="4-bit layers need bitsandbytes: pip install bitsandbytes")


def _linear4bit(double_quant: bool = True):
    from subpeft.quant import to_linear4bit

    torch.manual_seed(0)
    return to_linear4bit(nn.Linear(128, 64), double_quant=double_quant)


@needs_bnb
@pytest.mark.parametrize("double_quant", [False, True])
def test_4bit_access_reads_writes_and_restores_the_packed_weight_bit_for_bit(double_quant):
    import bitsandbytes as bnb

    from subpeft.quant.nf4 import NF4Access

    layer = _linear4bit(double_quant)
    access = weight_access(layer)
    assert isinstance(access, NF4Access) and access.packed and is_quantized(layer)
    assert access.shape == (64, 128) and access.numel == 64 * 128  # logical, not the packed bytes
    assert layer.weight.numel() == 64 * 128 // 2
    assert access.dtype == torch.float32 and dims(layer, "linear") == (64, 128)
    w = access.read()
    assert torch.equal(w, bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state))
    assert access.read(torch.float64).dtype == torch.float64
    assert type(weight_access(layer, "bias")) is WeightAccess  # the bias is plain

    packed = layer.weight.data.clone()
    absmax = layer.weight.quant_state.absmax.clone()
    token = access.snapshot()
    target = w + 0.05 * torch.randn_like(w)
    error = access.write(target)
    assert set(error) == {"max_abs", "rel_fro"} and 0 < error["max_abs"] < 0.1
    assert (access.read() - target).abs().max().item() == pytest.approx(error["max_abs"])
    assert not torch.equal(layer.weight.data, packed)
    access.restore(token)
    assert torch.equal(layer.weight.data, packed) and torch.equal(layer.weight.quant_state.absmax, absmax)
    assert torch.equal(access.read(), w)

    dense = access.dense_module()
    assert type(dense) is nn.Linear and torch.equal(dense.weight, w) and torch.equal(dense.bias, layer.bias)


@needs_bnb
def test_without_quant_registered_a_4bit_layer_is_a_clear_error(monkeypatch):
    layer = _linear4bit()
    monkeypatch.delitem(weights._REGISTRY, nn.Linear)
    weights._RESOLVED.clear()
    with pytest.raises(UnsupportedLayerError, match="stored packed"):
        weight_access(layer)
