"""One source for each fact (issue 14): the output-head names, the parameter count, model-name resolution."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

import subpeft as sp
from subpeft.core.targets import CLASSIFICATION_HEAD_NAMES, OUTPUT_HEAD_NAMES, is_output_head

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


class Headed(nn.Module):
    """A body of two linears under every kind of output head: flat, nested (RoBERTa's classifier.dense /
    classifier.out_proj), and DistilBERT's pre_classifier."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
        self.pre_classifier = nn.Linear(64, 64)
        self.classifier = nn.Module()
        self.classifier.dense = nn.Linear(64, 64)
        self.classifier.out_proj = nn.Linear(64, 3)
        self.head = nn.Linear(64, 3)
        self.qa_outputs = nn.Linear(64, 2)
        self.score = nn.Linear(64, 3)

    def forward(self, x):
        h = self.body(x)
        return self.classifier.out_proj(self.classifier.dense(self.pre_classifier(h))) + self.head(h) + self.score(h)


def test_head_names_are_defined_once():
    from subpeft.core import targets
    from subpeft.quant import DEFAULT_SKIP
    from subpeft.train import run

    assert DEFAULT_SKIP is OUTPUT_HEAD_NAMES and targets.HEAD_NAMES is OUTPUT_HEAD_NAMES
    assert set(CLASSIFICATION_HEAD_NAMES) <= set(OUTPUT_HEAD_NAMES)
    assert not hasattr(run, "HEAD_NAMES")
    assert is_output_head("classifier.out_proj") and is_output_head("lm_head") and not is_output_head("heads.0")


def test_all_linear_adapts_what_quantize_stores_in_4_bits():
    """The output heads are the same modules for "all-linear" and for quantize: nested heads included."""
    tuned = sp.attach(Headed(), sp.LoRA(r=2, targets="all-linear"))
    adapted = sorted(n for n, _ in tuned.adapted_layers())
    assert adapted == ["body.0", "body.2"]
    if HAS_BNB:
        from subpeft.quant import is_quantized, quantize

        model = quantize(Headed())
        assert sorted(n for n, m in model.named_modules() if is_quantized(m)) == adapted


# -- the parameter count ----------------------------------------------------------------------------
def _saved_values(directory) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for t in load_file(str(directory / "adapter_model.safetensors")).values())


def _tiny_bert():
    from .test_qlora import tiny_bert  # hidden 64: the NF4 block divides every weight

    return tiny_bert()


#: methods whose adapter file holds exactly their trainable parameters (others also save frozen state,
#: e.g. the SVD factors of PiCa or SVDiff, or save what a reparameterisation encoder computes, e.g.
#: prefix tuning's virtual tokens, instead of the encoder)
FILE_IS_TRAINABLE = ["lora", "dora", "ia3", "vera", "houlsby", "pfeiffer", "diff_pruning", "prompt_tuning"]


@pytest.mark.parametrize("method", FILE_IS_TRAINABLE)
def test_trainable_count_is_the_saved_adapter(method, tmp_path):
    """The trainable count is the number of values saved: the adapter's tensors and the head's copy."""
    from subpeft.core.model import parameter_counts

    info = sp.get_method(method)
    options = {"targets": ["query", "value"]} if info.kind == "weight" else {}
    tuned = sp.attach(_tiny_bert(), info.config_cls(**options, modules_to_save=["classifier"]))
    trainable, total = tuned.get_nb_trainable_parameters()
    assert (trainable, total) == parameter_counts(tuned)
    assert trainable == sum(p.numel() for p in tuned.parameters() if p.requires_grad) > 64 * 3 + 3
    tuned.save_pretrained(str(tmp_path))
    assert trainable == _saved_values(tmp_path)


@pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes")
def test_a_4bit_base_counts_as_its_full_precision_model():
    """A packed 4-bit weight counts d_out·d_in, not its bytes: the same total in fp32 and in NF4."""
    from subpeft.core.model import parameter_counts
    from subpeft.quant import is_quantized, quantize

    fp, q = _tiny_bert(), quantize(_tiny_bert())
    assert any(is_quantized(m) for m in q.modules())
    assert parameter_counts(fp)[1] == parameter_counts(q)[1] == sum(p.numel() for p in fp.parameters())
    assert parameter_counts(q)[1] > sum(p.numel() for p in q.parameters())  # the packed bytes count less
    config = sp.LoRA(r=2, targets=["query", "value"], modules_to_save=["classifier"])
    assert sp.attach(fp, config).get_nb_trainable_parameters() == sp.attach(q, config).get_nb_trainable_parameters()


@pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes")
def test_train_cli_reports_the_library_count_in_fp32_and_nf4(tmp_path):
    """`subpeft train` metrics: the same total with and without --quantize nf4, and the trainable count is
    the number of values in the adapter file it wrote (LoRA and the fresh head)."""
    import json

    from subpeft.cli import main

    from .test_train_cli import make_tiny_folders

    tiny = make_tiny_folders(tmp_path / "tiny")
    metrics = {}
    for name, extra in (("fp32", []), ("nf4", ["--quantize", "nf4"])):
        out = tmp_path / name
        argv = ["train", "--model", str(tiny["bert"]), "--data", str(tiny["csv"]), "--batch-size", "8",
                "--max-steps", "1", "--set", "r=2", "--out", str(out), "--quiet", *extra]
        assert main(argv) == 0
        metrics[name] = m = json.loads((out / "metrics.json").read_text())
        assert m["trainable_parameters"] == _saved_values(out)
    assert metrics["nf4"]["quantized_layers"] > 0
    for key in ("trainable_parameters", "total_parameters", "trainable_percent"):
        assert metrics["fp32"][key] == metrics["nf4"][key], key


# -- model names ------------------------------------------------------------------------------------
def test_model_names_resolve_in_one_place(tmp_path):
    from transformers import BertConfig, BertModel

    from subpeft.train.models import ModelNameError, load_model, model_source

    from .test_qlora import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "llama")  # no tokenizer in these folders
    _tiny_bert().save_pretrained(tmp_path / "bert")
    BertModel(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "encoder")
    (tmp_path / "empty").mkdir()
    assert [model_source(n) for n in ("minilm", "smollm2", tmp_path / "llama", "tests.fast.tiny_models:MLP")] == [
        "minilm", "smollm2", "folder", "factory"]
    for bad, match in (("nonsense", "neither a local model folder"), (tmp_path / "empty", "without config.json")):
        with pytest.raises(ModelNameError, match=match):
            model_source(bad)
    with pytest.raises(ModelNameError, match="neither"):
        model_source("tests.fast.tiny_models:MLP", factory=False)  # subpeft train takes no factories
    # the kind comes from the folder's config.json unless asked
    kinds = {name: type(load_model(tmp_path / name, with_tokenizer=False)[0]).__name__
             for name in ("llama", "bert", "encoder")}
    assert kinds == {"llama": "LlamaForCausalLM", "bert": "BertForSequenceClassification", "encoder": "BertModel"}
    model, tokenizer = load_model(tmp_path / "encoder", "classification", num_labels=5, with_tokenizer=False)
    assert model.classifier.out_features == 5 and tokenizer is None
    model, tokenizer = load_model("tests.fast.tiny_models:MLP")
    assert type(model).__name__ == "MLP" and tokenizer is None
    for bad in ("no_such_module_xyz:f", "tests.fast.tiny_models:nothing"):
        with pytest.raises(ModelNameError, match=bad.split(":")[0]):
            load_model(bad)
    with pytest.raises(ModelNameError, match="cannot generate"):
        load_model("minilm", "generation")


def test_load_quantized_is_the_train_side_and_quant_imports_no_train():
    """Loading by name lives in subpeft.train.models; quant imports core only (its load_quantized is a
    deprecated alias, resolved on first use)."""
    import ast
    from pathlib import Path

    import subpeft.quant
    from subpeft.train import models

    assert sp.load_quantized is models.load_quantized
    if HAS_BNB:
        with pytest.warns(DeprecationWarning, match="sp.load_quantized"):
            assert subpeft.quant.load_quantized is models.load_quantized
    for path in Path(subpeft.quant.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name == "__getattr__" and path.name == "__init__.py":
                node.body = []  # the deprecated alias
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = "." * node.level + (node.module or "")
                assert not target.startswith(("..train", "subpeft.train", "..cli")), (path.name, target)
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("subpeft.train") for a in node.names), path.name
