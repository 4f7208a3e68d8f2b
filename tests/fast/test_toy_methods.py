"""A new kind of method needs no edit in core: three toy methods, defined here, run the generic matrices.

- ``toy_scale`` (weight-space): φ(W) = (1 + s)·W with one trainable scalar s per layer; its method
  instance (a :class:`~subpeft.core.instance.LayerInstance` subclass) owns the adapter-wide
  regularization (the mean of s² over its layers) and counts the optimizer steps it is told of.
- ``toy_gate`` (module-level): h ↦ h ⊙ (1 + α·g) after every block's FFN output, g per layer, α one
  scalar shared by the whole adapter, made by the instance (not by a classmethod of the layer class).
- ``toy_offset`` (prompt-like): adds one learned vector to every input embedding by wrapping the
  model call; written straight on :class:`~subpeft.core.instance.MethodInstance`, without
  :class:`~subpeft.core.prompt.PromptAdapter` or any layer wrapper.

They are registered only while this file's tests run (other test files list the built-in methods),
and each is run through every test of the generic matrices (tests/fast/test_matrix.py for the
weight-space toy, tests/fast/test_block_matrix.py for the other two) by calling those tests' functions.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import subpeft as sp
from subpeft.core.adapter import Adapter
from subpeft.core.arch import describe
from subpeft.core.config import AdapterConfig
from subpeft.core.instance import LayerInstance, MethodInstance, MethodTraits
from subpeft.core.prompt import bind_call
from subpeft.core.registry import register, unregister
from subpeft.core.weights import read_weight

from . import test_block_matrix, test_matrix
from .tiny_models import CASES


# -- a weight-space toy ----------------------------------------------------------------------------
@dataclass
class ToyScale(AdapterConfig):
    method = "toy_scale"


class ToyScaleInstance(LayerInstance):
    """The adapter-wide hooks live on the instance: a regularization over all layers, a step count."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.steps_seen = 0

    def regularization(self) -> torch.Tensor | None:
        scales = [adapter.s for _, adapter in self.layers()]
        return 1e-3 * torch.stack(scales).pow(2).mean() if scales else None

    def step(self, global_step: int) -> None:
        self.steps_seen += 1


class ToyScaleAdapter(Adapter):
    config_cls = ToyScale
    family = "reconstruction"
    kind = "weight"
    instance_cls = ToyScaleInstance
    additive = False
    formula = "1"
    trains = "one scale per layer"
    layer_types = ("linear",)

    def __init__(self, config: ToyScale, base_layer: nn.Module, layer_type: str, **kwargs: Any) -> None:
        super().__init__(config, base_layer, layer_type, **kwargs)
        self.s = nn.Parameter(torch.zeros((), dtype=base_layer.weight.dtype))

    def forward(self, x: torch.Tensor, base) -> torch.Tensor:
        y = base(x)
        bias = self.base_layer.bias
        # (1 + s)·(W x) + b = base(x) + s·(base(x) − b)
        return y + self.s * (y - bias if bias is not None else y)

    def apply_to_weight(self, w: torch.Tensor) -> torch.Tensor:
        return w * (1 + self.s.detach().to(w.dtype))

    def delta_weight(self) -> torch.Tensor:
        return self.s.detach() * read_weight(self.base_layer)

    @classmethod
    def num_params(cls, config: ToyScale, base_layer: nn.Module, layer_type: str) -> int:
        return 1


# -- a module-level toy --------------------------------------------------------------------------
@dataclass
class ToyGate(AdapterConfig):
    method = "toy_gate"


class ToyGateInstance(LayerInstance):
    def create_shared(self, layers: list[tuple[str, nn.Module, str]]) -> nn.Module:
        shared = nn.Module()
        shared.alpha = nn.Parameter(torch.ones(()))
        return shared


class ToyGateAdapter(Adapter):
    config_cls = ToyGate
    family = "extension"
    kind = "module"
    mergeable = False
    instance_cls = ToyGateInstance
    formula = "d_out (+1 per adapter)"
    trains = "a gate per output feature"
    layer_types = ("linear",)

    def __init__(self, config: ToyGate, base_layer: nn.Module, layer_type: str, **kwargs: Any) -> None:
        super().__init__(config, base_layer, layer_type, **kwargs)
        self.g = nn.Parameter(torch.zeros(base_layer.out_features))

    def forward(self, x: torch.Tensor, base) -> torch.Tensor:
        h = base(x)
        return h * (1 + self.shared.alpha * self.g)

    @classmethod
    def prepare_config(cls, config: ToyGate, model: nn.Module) -> ToyGate:
        if config.targets is None:
            config = config.replace(targets=describe(model, config.method).per_block("ffn_out"))
        return config

    @classmethod
    def num_params(cls, config: ToyGate, base_layer: nn.Module, layer_type: str) -> int:
        return base_layer.out_features


# -- a prompt-like toy, straight on MethodInstance -----------------------------------------------------
@dataclass
class ToyOffset(AdapterConfig):
    method = "toy_offset"


class ToyOffsetInstance(MethodInstance):
    """Puts nothing into the model: its one module (the shared state) and a wrapper of the call."""

    rewrites_call = True

    def inject(self) -> None:
        width = self.model.get_input_embeddings().embedding_dim
        self.shared = self.method(width)

    def call_wrapper(self) -> ToyOffsetInstance:
        return self

    def _embedded(self, model: nn.Module, call: dict[str, Any]) -> dict[str, Any]:
        ids = call.pop("input_ids")
        call["inputs_embeds"] = model.get_input_embeddings()(ids) + self.shared.offset
        return call

    def run(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        return model(**self._embedded(model, bind_call(model.forward, args, kwargs)))

    def generate(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        raise NotImplementedError


class ToyOffsetModule(MethodTraits, nn.Module):
    config_cls = ToyOffset
    family = "reconstruction"
    kind = "prompt"
    mergeable = False
    instance_cls = ToyOffsetInstance
    formula = "d_model"
    trains = "one offset added to every input embedding"
    layer_types = ()

    def __init__(self, width: int) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(width))


TOYS = (ToyScaleAdapter, ToyGateAdapter, ToyOffsetModule)


@pytest.fixture(autouse=True, scope="module")
def toys():
    for cls in TOYS:
        register(cls)
    yield
    for cls in TOYS:
        unregister(cls.config_cls.method)


# -- running the generic matrices ----------------------------------------------------------------------
def _tests(module, params: tuple[str, ...]) -> list[str]:
    """Names of the module's test functions that take exactly ``params`` (besides ``tmp_path`` and
    ``save_at``, which :func:`_call` provides)."""
    out = []
    for name, fn in vars(module).items():
        if name.startswith("test_") and inspect.isfunction(fn):
            own = tuple(p for p in inspect.signature(fn).parameters if p not in ("tmp_path", "save_at"))
            if own == params:
                out.append(name)
    return out


def _call(fn, tmp_path, *args) -> None:
    params = inspect.signature(fn).parameters
    if "save_at" in params:
        for save_at in (1, 4):
            fn(*args, save_at=save_at, tmp_path=tmp_path / str(save_at))
        return
    fn(*args, **({"tmp_path": tmp_path} if "tmp_path" in params else {}))


WEIGHT = [
    pytest.param(test, case, id=f"{test}-{case.name}")
    for test in _tests(test_matrix, ("method", "case"))
    for case in CASES
    if case.layer_type in ToyScaleAdapter.layer_types
] + [pytest.param(test, None, id=test) for test in _tests(test_matrix, ("method",))]


@pytest.mark.parametrize("test,case", WEIGHT)
def test_weight_space_toy_in_the_matrix(test, case, tmp_path):
    fn = getattr(test_matrix, test)
    _call(fn, tmp_path, "toy_scale", *([case] if case is not None else []))


BLOCK = [
    pytest.param(test, method, arch, id=f"{test}-{method}-{arch}")
    for test in _tests(test_block_matrix, ("info", "arch"))
    for method in ("toy_gate", "toy_offset")
    for arch in test_block_matrix.MODELS
] + [
    pytest.param(test, method, None, id=f"{test}-{method}")
    for test in _tests(test_block_matrix, ("info",))
    for method in ("toy_gate", "toy_offset")
]


@pytest.mark.parametrize("test,method,arch", BLOCK)
def test_module_and_prompt_toys_in_the_block_matrix(test, method, arch, tmp_path):
    fn = getattr(test_block_matrix, test)
    _call(fn, tmp_path, sp.get_method(method), *([arch] if arch is not None else []))


def test_the_matrices_reach_every_test():
    assert len(_tests(test_matrix, ("method", "case"))) >= 10
    assert len(_tests(test_block_matrix, ("info", "arch"))) >= 5
    assert _tests(test_matrix, ("method",)) == ["test_config_json_roundtrip_and_unknown_keys"]
    assert _tests(test_block_matrix, ("info",)) == ["test_config_json_round_trip"]


def test_the_instances_own_their_hooks_and_state():
    from .tiny_models import MLP

    tuned = sp.attach(MLP(), ToyScale(targets=["fc1", "fc2"]))
    instance = tuned.instances["default"]
    assert isinstance(instance, ToyScaleInstance)
    with torch.no_grad():
        for _, adapter in instance.layers():
            adapter.s.fill_(2.0)
    assert float(tuned.regularization().detach()) == pytest.approx(4e-3)
    tuned.step(1)
    tuned.step(2)
    assert instance.steps_seen == 2

    from .tiny_transformers import tiny_llama

    model = tiny_llama()
    tuned = sp.attach(model, ToyGate())
    gate = tuned.instances["default"]
    assert isinstance(tuned.shared["default"].alpha, nn.Parameter) and gate.shared is tuned.shared["default"]
    assert len(gate.layers()) == 2  # one per block
    tuned.add_adapter("offset", ToyOffset())
    assert tuned.instances["offset"].layers() == []
    assert sorted(tuned.adapter_state_dict("offset")) == ["base_model.shared.offset"]
    saved = tuned.adapter_state_dict("default")["base_model.shared.alpha"]
    assert saved.data_ptr() == tuned.shared["default"].alpha.data_ptr()


def test_two_call_wrappers_cannot_run_together():
    from .tiny_transformers import batch, tiny_llama

    tuned = sp.attach(tiny_llama(), ToyOffset())
    tuned.add_adapter("prompt", sp.PromptTuning(num_virtual_tokens=2))
    tuned.set_adapter(["default", "prompt"])
    with pytest.raises(sp.SubpeftError, match="cannot run together"):
        tuned(**batch())
    tuned.set_adapter("default")
    tuned(**batch())
