"""Field safety (issue 13): no data loss, no hybrid adapters, and bad input gets a clear error.

- a save killed between its renames leaves a directory that loads as the old adapter or the new
  one, never a mix of the two; files from different saves are refused; stale temporary files go;
- attaching to a model that already holds subpeft layers is refused;
- unmerge restores the base bit for bit (every mergeable method, float32 and bfloat16), also after a
  merge of NaN/inf; merging a stack with DoRA on top gives the unmerged forward;
- saving with no adapter left is an error;
- non-finite float options, bools for integers, malformed "method", absurd ranks, and adapter files
  with non-float tensors where floats belong are refused with the library's errors.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import typing
import warnings

import pytest
import torch

import subpeft as sp
from subpeft.core.layer import AdaptedLayer, TrainableCopy

from .tiny_models import CASES, MLP

ATOL = 1e-5


def _perturb(tuned, name, seed, scale=0.1):
    gen = torch.Generator().manual_seed(seed)
    params = [p for _, a in tuned.adapters_of(name) for p in a.parameters()]
    if name in tuned.shared:
        params += list(tuned.shared[name].parameters())
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * scale)


def _base_state(tuned):
    state = {}
    for k, v in tuned.model.state_dict().items():
        if ".adapters." in k or ".copies." in k or k.startswith("shared."):
            continue
        state[k.replace("base_layer.", "").replace("original.", "")] = v.clone()
    return state


# -- saving: the pair of files is committed together ---------------------------------------------
class _Killed(BaseException):
    """Stands for the process being killed at a rename (raised past every `except Exception`)."""


def _kill_at(monkeypatch, k):
    """Make the k-th os.replace from now on raise _Killed before it renames anything."""
    real = os.replace
    calls = {"n": 0}

    def fake(src, dst, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == k:
            raise _Killed(f"killed at rename {k}: {src} -> {dst}")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", fake)
    return calls


def _mlp():
    torch.manual_seed(0)
    return MLP()


def _lora_mlp(r, alpha, seed):
    tuned = sp.attach(_mlp(), sp.LoRA(r=r, alpha=alpha, targets=["fc1", "fc2"]))
    _perturb(tuned, "default", seed=seed)
    return tuned.eval()


@pytest.mark.parametrize("change", ["alpha", "rank"])
def test_save_killed_at_any_rename_leaves_old_or_new_adapter(change, tmp_path, monkeypatch):
    x = torch.randn(4, 6)
    old = _lora_mlp(2, 4.0, seed=1)
    new = _lora_mlp(2, 8.0, seed=2) if change == "alpha" else _lora_mlp(4, 4.0, seed=2)
    y_old, y_new = old(x), new(x)
    seen = set()
    for k in range(1, 6):
        directory = tmp_path / f"k{k}"
        old.save_pretrained(directory)
        monkeypatch.undo()
        calls = _kill_at(monkeypatch, k)
        try:
            new.save_pretrained(directory)
            killed = False
        except _Killed:
            killed = True
        monkeypatch.undo()
        loaded = sp.load(_mlp(), directory)
        y = loaded(x)
        assert torch.equal(y, y_old) or torch.equal(y, y_new), f"kill at rename {k}: a hybrid adapter loaded"
        seen.add("old" if torch.equal(y, y_old) else "new")
        # the next save completes cleanly and leaves only the two files
        new.save_pretrained(directory)
        assert sorted(p.name for p in directory.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        assert torch.equal(sp.load(_mlp(), directory)(x), y_new)
        if not killed:
            assert calls["n"] < k
            break
    assert seen == {"old", "new"}, seen


def test_next_save_removes_temporary_files_of_a_killed_save(tmp_path):
    tuned = _lora_mlp(2, 4.0, seed=1)
    tuned.save_pretrained(tmp_path)
    for stale in (".adapter_model.safetensors.abc123.tmp", ".adapter_config.json.def456.tmp"):
        (tmp_path / stale).write_bytes(b"half written")
    tuned.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_config_and_weights_from_different_saves_are_refused_and_only_they(tmp_path):
    from safetensors.torch import load_file, save_file

    from subpeft.core.io import adopt_config

    x = torch.randn(4, 6)
    a, b = _lora_mlp(2, 4.0, seed=1), _lora_mlp(2, 8.0, seed=2)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    shutil.copy(tmp_path / "b" / "adapter_config.json", tmp_path / "a" / "adapter_config.json")
    with pytest.raises(sp.AdapterLoadError, match="different saves"):
        sp.load(MLP(), tmp_path / "a")
    # a config changed on purpose: adopt_config makes the weights accept it (a's tensors, b's alpha)
    adopt_config(tmp_path / "a")
    loaded = sp.load(_mlp(), tmp_path / "a")
    assert loaded.configs["default"].alpha == 8.0
    assert all(torch.equal(v, a.adapter_state_dict("default")[k]) for k, v in loaded.adapter_state_dict("default").items())

    # an edit that does not change the adapter loads
    y = a(x)
    a.save_pretrained(tmp_path / "c")
    path = tmp_path / "c" / "adapter_config.json"
    data = json.loads(path.read_text())
    data["base_model_name_or_path"] = "somewhere/else"
    path.write_text(json.dumps(data))
    assert torch.equal(sp.load(_mlp(), tmp_path / "c")(x), y)
    # so does a file as PEFT or an older subpeft writes it: no record of the config in the metadata
    tensors = load_file(tmp_path / "c" / "adapter_model.safetensors")
    save_file(tensors, tmp_path / "c" / "adapter_model.safetensors", metadata={"format": "pt"})
    assert torch.equal(sp.load(_mlp(), tmp_path / "c")(x), y)


# -- attaching twice -----------------------------------------------------------------------------
def test_attach_to_a_model_that_holds_subpeft_layers_is_refused(tmp_path):
    tuned = sp.attach(MLP(), sp.LoRA(r=2, targets=["fc1"]))
    with pytest.raises(sp.SubpeftError, match="add_adapter"):
        sp.attach(tuned.model, sp.LoRA(r=4, targets=["fc1"]))
    assert tuned.adapters_of("default")[0][1].lora_A.shape[0] == 2
    tuned.save_pretrained(tmp_path)
    with pytest.raises(sp.SubpeftError, match="add_adapter"):
        sp.load(tuned.model, tmp_path)


# -- merge / unmerge restore the base exactly --------------------------------------------------------
MERGEABLE = [info.name for info in sp.list_methods() if info.kind == "weight" and info.mergeable]
SMALL = {  # options for the tiny models (ranks they can use, schedules that run in a few steps)
    "adalora": dict(r=4, target_r=2, total_steps=10, init_warmup=1, final_warmup=2, mask_interval=1),
    "lora_dash": dict(r=4, prelaunch_steps=2),
    "vera": dict(r=16),
    "bitfit": dict(targets="all"),
}


def _case_for(method):
    return next(c for c in CASES if c.layer_type in sp.get_method(method).layer_types)


def _config(method, case, **overrides):
    cls = sp.get_method(method).config_cls
    fields = {f.name for f in dataclasses.fields(cls)}
    options = {"targets": list(case.targets)}
    if "r" in fields:
        options["r"] = 4
    options.update(SMALL.get(method, {}))
    options.update(overrides)
    return cls(**options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", MERGEABLE)
def test_unmerge_restores_the_base_bit_for_bit(method, dtype):
    case = _case_for(method)
    base = case.model(0).to(dtype)
    tuned = sp.attach(base, _config(method, case))
    _perturb(tuned, "default", seed=3)
    tuned.eval()
    before = _base_state(tuned)
    for _ in range(3):
        tuned.merge()
        assert any(not torch.equal(v, before[k]) for k, v in _base_state(tuned).items()), "merge changed nothing"
        tuned.unmerge()
        for k, v in _base_state(tuned).items():
            assert torch.equal(v, before[k]), f"{k} not restored exactly by unmerge ({dtype})"


@pytest.mark.parametrize("method", MERGEABLE)
def test_a_merge_of_nan_or_inf_is_refused_or_fully_undone(method):
    case = _case_for(method)
    for bad in (float("nan"), float("inf")):
        tuned = sp.attach(case.model(0), _config(method, case))
        _perturb(tuned, "default", seed=9)
        first = next(iter(tuned._adapter_parameters("default")))
        with torch.no_grad():
            first.view(-1)[0] = bad
        before = _base_state(tuned)
        try:
            tuned.merge()  # not safe=True
        except sp.UnsafeMergeError:
            assert tuned.merged_adapters == []
        else:
            tuned.unmerge()
        for k, v in _base_state(tuned).items():
            assert torch.equal(v, before[k]), f"{k} not restored after a merge of {bad}"


# -- DoRA on top of another adapter ----------------------------------------------------------------
LOWER = {
    "lora": lambda: sp.LoRA(r=2, targets=["fc1", "fc2"]),
    "dora": lambda: sp.DoRA(r=3, targets=["fc1", "fc2"]),
    "ia3": lambda: sp.IA3(targets=["fc1", "fc2"], feedforward=["fc2"]),
    "bitfit": lambda: sp.BitFit(targets=["fc1", "fc2"]),
}


@pytest.mark.parametrize("lower", sorted(LOWER))
def test_merging_a_stack_with_dora_on_top_keeps_the_output(lower):
    x = torch.randn(5, 6)
    results = {}
    for how in ("all", "lower only", "lower then upper"):
        torch.manual_seed(0)
        tuned = sp.attach(MLP(), LOWER[lower](), name="a")
        tuned.add_adapter("b", sp.DoRA(r=2, alpha=4, targets=["fc1", "fc2"]))
        _perturb(tuned, "a", seed=1, scale=0.3)
        _perturb(tuned, "b", seed=2, scale=0.3)
        tuned.set_adapter(["a", "b"])
        tuned.eval()
        y = tuned(x).detach()
        results[how] = y
        if how == "all":
            tuned.merge()
        elif how == "lower only":
            tuned.merge(["a"])
        else:
            tuned.merge(["a"])
            tuned.merge(["b"])
        torch.testing.assert_close(tuned(x), y, atol=ATOL, rtol=0, msg=f"merge ({how}) changed the output")
        tuned.unmerge()
        torch.testing.assert_close(tuned(x), y, atol=ATOL, rtol=0)
    # and the stack is what merging in order computes: the same output however it was reached
    torch.testing.assert_close(results["all"], results["lower only"], atol=0, rtol=0)


def test_merging_only_the_upper_adapter_of_a_non_commuting_stack_is_refused():
    torch.manual_seed(0)
    tuned = sp.attach(MLP(), sp.LoRA(r=2, targets=["fc1"]), name="a")
    tuned.add_adapter("b", sp.DoRA(r=2, targets=["fc1"]))
    _perturb(tuned, "a", seed=1)
    _perturb(tuned, "b", seed=2)
    tuned.set_adapter(["a", "b"])
    before = _base_state(tuned)
    with pytest.raises(sp.SubpeftError, match="'a'"):
        tuned.merge(["b"])
    assert tuned.merged_adapters == []
    assert all(torch.equal(v, before[k]) for k, v in _base_state(tuned).items())


# -- saving with nothing to save ----------------------------------------------------------------------
def test_save_after_deleting_the_last_adapter_is_an_error(tmp_path):
    tuned = sp.attach(MLP(), sp.LoRA(r=2, targets=["fc1"]))
    tuned.delete_adapter("default")
    with pytest.raises(sp.SubpeftError, match="no adapter"):
        tuned.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- configs -------------------------------------------------------------------------------------------
def _annotated(cls, want):
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name in ("targets", "exclude", "modules_to_save") or not f.init:
            continue
        hint = hints[f.name]
        args = typing.get_args(hint) or (hint,)
        if want in args and bool not in args:
            out.append(f.name)
    return out


FLOAT_FIELDS = [
    pytest.param(info.name, field, id=f"{info.name}.{field}")
    for info in sp.list_methods()
    for field in _annotated(info.config_cls, float)
]
INT_FIELDS = [
    pytest.param(info.name, field, id=f"{info.name}.{field}")
    for info in sp.list_methods()
    for field in _annotated(info.config_cls, int)
]


@pytest.mark.parametrize("method,field", FLOAT_FIELDS)
def test_every_float_option_refuses_nan_and_inf(method, field):
    cls = sp.get_method(method).config_cls
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(sp.ConfigError, match=field):
            cls(**{field: bad})
        with pytest.raises(sp.ConfigError, match=field):
            sp.config_from_dict({"method": method, field: bad})


@pytest.mark.parametrize("method,field", INT_FIELDS)
def test_every_integer_option_refuses_a_bool(method, field):
    with pytest.raises(sp.ConfigError, match=field):
        sp.config_from_dict({"method": method, field: True})


def test_peft_dict_with_a_bool_rank_is_refused():
    data = sp.LoRA(r=4, targets=["fc1"]).to_peft_dict({"linear"})
    data["r"] = True
    with pytest.raises(sp.ConfigError, match="r"):
        sp.config_from_dict(data)


@pytest.mark.parametrize("value", [["lora"], None, 3, {"name": "lora"}])
def test_method_that_is_not_a_string_is_a_config_error(value):
    with pytest.raises(sp.ConfigError, match="method"):
        sp.config_from_dict({"method": value, "r": 4})


def test_nan_alpha_in_a_saved_config_is_refused_at_load(tmp_path):
    tuned = _lora_mlp(2, 4.0, seed=1)
    tuned.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data["lora_alpha"] = math.nan
    path.write_text(json.dumps(data))  # Python's json writes NaN
    with pytest.raises(sp.AdapterLoadError, match="alpha"):
        sp.load(MLP(), tmp_path)


def test_nan_alpha_is_refused_before_attach():
    with pytest.raises(sp.ConfigError, match="alpha"):
        sp.LoRA(alpha=float("nan"))
    with pytest.raises(sp.ConfigError, match="mpc_weight"):
        sp.DoRA(mpc="o", mpc_weight=float("inf"))


# -- ranks ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [
    lambda: sp.LoRA(r=2**40, targets=["fc1", "fc2"]),
    lambda: sp.DoRA(r=2**40, targets=["fc1", "fc2"]),
    lambda: sp.VeRA(r=2**40, targets=["fc1", "fc2"]),
    lambda: sp.LoRA(r=8, targets=["fc1", "fc2"]),  # fc1 can use 6, fc2 7
], ids=["lora-huge", "dora-huge", "vera-huge", "lora-8"])
def test_a_rank_no_targeted_layer_can_use_is_refused(config):
    model = MLP()
    with pytest.raises(sp.ConfigError, match=r"\br\b"):
        sp.attach(model, config())
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())


def test_a_rank_above_what_some_layer_can_use_warns_naming_it():
    with pytest.warns(UserWarning, match="fc1") as record:
        sp.attach(MLP(), sp.LoRA(r=7, targets=["fc1", "fc2"]))
    assert not any("fc2" in str(w.message) for w in record if "rank" in str(w.message))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sp.attach(MLP(), sp.LoRA(r=6, targets=["fc1", "fc2"]))


# -- adapter tensors at load ----------------------------------------------------------------------
def _resave(directory, change):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = directory / "adapter_model.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    change(tensors)
    save_file(tensors, path, metadata=metadata)


def test_nan_or_inf_adapter_tensors_warn_at_load_naming_them(tmp_path):
    tuned = _lora_mlp(2, 4.0, seed=1)
    tuned.save_pretrained(tmp_path)
    key = "base_model.model.fc1.lora_B.weight"

    def poison(t):
        t[key] = t[key].clone()
        t[key][0, 0] = float("nan")

    _resave(tmp_path, poison)
    with pytest.warns(UserWarning, match=r"fc1\.lora_B"):
        sp.load(MLP(), tmp_path)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.int8])
def test_non_float_tensors_where_floats_belong_are_refused(dtype, tmp_path):
    tuned = _lora_mlp(2, 4.0, seed=1)
    tuned.save_pretrained(tmp_path)
    key = "base_model.model.fc2.lora_A.weight"

    def cast(t):
        t[key] = t[key].to(dtype)

    _resave(tmp_path, cast)
    model = MLP()
    with pytest.raises(sp.AdapterLoadError, match=rf"fc2\.lora_A.*{str(dtype).replace('torch.', '')}"):
        sp.load(model, tmp_path)
    assert not any(isinstance(m, (AdaptedLayer, TrainableCopy)) for m in model.modules())
    _integer_buffers_a_method_saves_itself_still_load(tmp_path)


def _integer_buffers_a_method_saves_itself_still_load(tmp_path):
    x = torch.randn(4, 6)
    for method, config in (
        ("diff_pruning", sp.DiffPruning(targets=["fc1", "fc2"], budget=0.2)),
        ("lora_dash", sp.LoRADash(r=4, prelaunch_steps=1, directions=2, targets=["fc1", "fc2"])),
    ):
        torch.manual_seed(0)
        pristine = MLP()
        tuned = sp.attach(copy.deepcopy(pristine), config)
        _perturb(tuned, "default", seed=4)
        tuned.step(1)
        tuned.step(2)
        tuned.finalize()
        tuned.eval()
        state = tuned.adapter_state_dict("default")
        assert any(not v.is_floating_point() for v in state.values()), f"{method} saves no integer buffer here"
        tuned.save_pretrained(tmp_path / method)
        loaded = sp.load(copy.deepcopy(pristine), tmp_path / method)
        assert torch.equal(loaded(x), tuned(x))
