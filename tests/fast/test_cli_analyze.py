"""`subpeft analyze DIR`: a tiny saved LoRA adapter with constructed ΔW, a reference on disk, the
table, report.json and the plots."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

import subpeft as sp
from subpeft import analysis as A
from subpeft.analysis.plots import PlotsUnavailableError
from subpeft.cli import _classifier_labels, main

from .tiny_models import MLP

BASE = "tests.fast.test_cli_analyze:seeded_mlp"


def seeded_mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP()


class WithClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 7)
        self.classifier = nn.Linear(7, 5)


@pytest.fixture
def saved(tmp_path):
    """An adapter whose ΔW on fc1 is 0.2·u_3·v_3ᵀ (W's 4th direction), and a reference W + 2·ΔW."""
    tuned = sp.attach(seeded_mlp(), sp.LoRA(r=1, alpha=1, targets=["fc1", "fc2"]))
    ref = {}
    with torch.no_grad():
        for name, adapter in tuned.adapters_of("default"):
            W, (U, S, Vh) = A.weight_svd(adapter.base_layer, "linear")
            adapter.lora_B.copy_(0.2 * U[:, 3:4])
            adapter.lora_A.copy_(Vh[3:4])
            ref[f"{name}.weight"] = (W + 2 * adapter.delta_weight()).contiguous()
    tuned.save_pretrained(tmp_path / "adapter")
    (tmp_path / "full").mkdir()
    from safetensors.torch import save_file

    save_file(ref, str(tmp_path / "full" / "model.safetensors"))
    return tmp_path


def test_analyze_prints_table_and_writes_report(saved, capsys):
    out = saved / "out"
    code = main(["analyze", str(saved / "adapter"), "--base", BASE, "--reference", str(saved / "full"),
                 "--out", str(out), "--top", "2"])
    assert code == 0
    text = capsys.readouterr().out
    assert "lora, 2 adapted layers" in text
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith(("fc1 ", "fc2 "))}
    assert set(lines) == {"fc1", "fc2"}
    assert "3@0.60" in lines["fc1"] and lines["fc1"].rstrip().endswith("0.500")  # index 3 of 6 and distance 1/2
    data = json.loads((out / "report.json").read_text())
    for layer in data["layers"]:
        assert layer["top"][0]["index"] == 3
        assert layer["delta_norm"] == pytest.approx(0.2, rel=1e-5)
        assert layer["distance_to_reference"] == pytest.approx(0.5, rel=1e-5)
        assert layer["effective_rank"] == pytest.approx(1.0, rel=1e-5)
    pytest.importorskip("matplotlib")
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert pngs == ["distance.png", "layers/fc1.png", "layers/fc2.png", "overview.png"]
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_analyze_without_matplotlib_still_writes_json(saved, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    out = saved / "out2"
    assert main(["analyze", str(saved / "adapter"), "--base", BASE, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "pip install matplotlib" in captured.err
    assert (out / "report.json").exists() and not list(out.rglob("*.png"))
    with pytest.raises(PlotsUnavailableError, match="pip install matplotlib"):
        A.plot_report(A.report(sp.load(seeded_mlp(), saved / "adapter")), out)


def test_analyze_reference_adapter_dir_and_errors(saved, capsys, tmp_path):
    # an adapter directory as the reference: the same adapter, so every distance is 0
    assert main(["analyze", str(saved / "adapter"), "--base", BASE, "--reference", str(saved / "adapter")]) == 0
    assert "mean distance to the reference: 0.000" in capsys.readouterr().out
    # usage errors: one line, exit status 2
    assert main(["analyze", str(tmp_path), "--base", BASE]) == 2
    assert "not an adapter directory" in capsys.readouterr().err
    assert main(["analyze", str(saved / "adapter"), "--base", "nonsense"]) == 2
    assert "module:factory" in capsys.readouterr().err


def test_classifier_labels_read_from_saved_head(tmp_path):
    tuned = sp.attach(WithClassifier(), sp.LoRA(r=1, targets=["body"], modules_to_save=["classifier"]))
    tuned.save_pretrained(tmp_path / "a")
    assert _classifier_labels(str(tmp_path / "a")) == 5
    tuned = sp.attach(WithClassifier(), sp.LoRA(r=1, targets=["body"]))
    tuned.save_pretrained(tmp_path / "b")
    assert _classifier_labels(str(tmp_path / "b")) is None


def test_analyze_several_adapters_against_a_full_finetune_run(saved, capsys):
    """Two LoRA adapters (ΔW = D and 2·D) against a reference W + 2·D saved as a 'subpeft train --method
    full' run folder would save it (trainable.safetensors): distances 0.5 and 0, one folder each, and the
    distance plot across adapters."""
    tuned = sp.load(seeded_mlp(), saved / "adapter", trainable=True)
    with torch.no_grad():
        for _, adapter in tuned.adapters_of("default"):
            adapter.lora_B.mul_(2)
    tuned.save_pretrained(saved / "double" / "adapter")
    (saved / "fullrun").mkdir()
    (saved / "full" / "model.safetensors").rename(saved / "fullrun" / "trainable.safetensors")
    out = saved / "cmp"
    code = main(["analyze", str(saved / "adapter"), str(saved / "double" / "adapter"), "--base", BASE,
                 "--reference", str(saved / "fullrun"), "--out", str(out), "--top", "2"])
    assert code == 0
    text = capsys.readouterr().out
    table = {}
    for line in text.splitlines():
        if line.startswith("| lora/"):
            cells = [c.strip() for c in line.strip("| ").split("|")]
            table[cells[0]] = cells[-3:]  # distance, cosine, norm ratio
    assert set(table) == {"lora/adapter#1", "lora/adapter#2"}  # same method, same folder name: numbered
    # ΔW = D against D_ref = 2·D: half-way there, the same direction, half the norm; 2·D: there
    assert table["lora/adapter#1"] == ["0.500", "1.000", "0.50"]
    assert table["lora/adapter#2"] == ["0.000", "1.000", "1.00"]
    for label, expected in (("lora_adapter#1", (0.5, 0.5)), ("lora_adapter#2", (0.0, 1.0))):
        data = json.loads((out / label / "report.json").read_text())
        for layer in data["layers"]:
            assert layer["distance_to_reference"] == pytest.approx(expected[0], abs=1e-5)
            assert layer["cosine_to_reference"] == pytest.approx(1.0, abs=1e-5)
            assert layer["norm_ratio_to_reference"] == pytest.approx(expected[1], abs=1e-5)
    pytest.importorskip("matplotlib")
    assert (out / "distance_by_method.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "lora_adapter#1" / "overview.png").exists()


def test_labels_name_the_method_and_the_folder_only_when_needed():
    from subpeft.cli import _labels

    assert _labels(["a/x", "b/y"], ["lora", "dora"]) == ["lora", "dora"]
    assert _labels(["a/x", "b/y", "c"], ["lora", "lora", "ia3"]) == ["lora/x", "lora/y", "ia3"]


def test_reference_directory_without_weights_is_a_clear_error(saved, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["analyze", str(saved / "adapter"), "--base", BASE, "--reference", str(tmp_path / "empty")]) == 2
    assert "trainable.safetensors" in capsys.readouterr().err
