"""A built-in method's family is declared in one place: the folder its file is in
(``subpeft/methods/<family>/``). The registry derives it from the module path; no method file
declares it, and a class that declared another family than its folder would not register."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

import subpeft as sp
from subpeft.core.registry import FAMILIES, FAMILY_FOLDERS, family_of_module, register, unregister
from subpeft.mechanisms.low_rank import LowRank, LowRankAdapter

ROOT = Path(__file__).resolve().parents[2]
METHODS = ROOT / "subpeft" / "methods"


def test_every_method_folder_is_a_family_and_every_family_has_a_folder():
    folders = {p.name for p in METHODS.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(FAMILY_FOLDERS)
    assert set(FAMILY_FOLDERS.values()) == set(FAMILIES)


def test_registered_family_is_the_folder():
    for info in sp.list_methods():
        module = info.adapter_cls.__module__
        assert module.startswith("subpeft.methods."), module
        folder = module.split(".")[2]
        assert info.family == FAMILY_FOLDERS[folder], (info.name, module)
        assert info.adapter_cls.family == info.family


def test_no_method_or_mechanism_file_declares_a_family():
    declared = re.compile(r"^\s+family\s*(:[^=]*)?=", re.M)
    for folder in ("methods", "mechanisms"):
        for path in (ROOT / "subpeft" / folder).rglob("*.py"):
            assert not declared.search(path.read_text(encoding="utf-8")), f"{path} declares a family"


def test_family_of_module():
    assert family_of_module("subpeft.methods.frameworks.unipelt") == "framework"
    assert family_of_module("subpeft.methods.reconstruction.prefix") == "reconstruction"
    assert family_of_module("my_package.my_method") is None
    with pytest.raises(TypeError, match="methods/<family>"):
        family_of_module("subpeft.methods.modules.houlsby")


def _toy(module: str, family: str | None):
    @dataclass
    class ToyFamilyConfig(LowRank):
        method = "toy_family"

    attrs = {"config_cls": ToyFamilyConfig, "__module__": module}
    if family is not None:
        attrs["family"] = family
    return type("ToyFamilyAdapter", (LowRankAdapter,), attrs)


def test_a_class_in_a_family_folder_cannot_declare_another_family():
    with pytest.raises(TypeError, match="declares family 'combination'"):
        register(_toy("subpeft.methods.extension.toy", "combination"))
    assert "toy_family" not in {m.name for m in sp.list_methods()}


def test_the_folder_gives_the_family_and_outside_the_class_does():
    try:
        assert sp.get_method(register(_toy("subpeft.methods.combination.toy", None)).config_cls.method).family \
            == "combination"
        unregister("toy_family")
        assert sp.get_method(register(_toy("elsewhere.toy", "reconstruction")).config_cls.method).family \
            == "reconstruction"
    finally:
        unregister("toy_family")


def test_old_import_paths_still_work():
    import subpeft.methods.modules.adamix as old_adamix
    from subpeft.mechanisms import bottleneck, prefix_kv
    from subpeft.methods.extension import adamix
    from subpeft.methods.extension.lora import LowRank as OldLowRank
    from subpeft.methods.modules.bottleneck import ACTIVATIONS
    from subpeft.methods.prompts.prefix import PrefixKV, PrefixTuning

    assert old_adamix is adamix and sp.methods.modules.adamix.consistency_loss is adamix.consistency_loss
    assert OldLowRank is LowRank and ACTIVATIONS is bottleneck.ACTIVATIONS
    assert PrefixKV is prefix_kv.PrefixKV and PrefixTuning is sp.PrefixTuning
