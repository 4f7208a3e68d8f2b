"""`subpeft train / eval / compare` on tiny models built in the test (a 2-layer BERT and a 2-layer Llama
saved to a temporary folder: "any local HF folder") and tiny data files: what each writes, that the
numbers in metrics.json are the ones they claim, and that bad input fails before training with an
error that says what to fix."""

from __future__ import annotations

import csv
import json
import random
import statistics
from pathlib import Path

import pytest
import torch

from subpeft.cli import main

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "the", "a", "movie", "food", "day", "was", "is", "very"]


def _tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "?", ".", ":", "question", "answer"] + WORDS
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(str(folder / "vocab.txt"), eos_token="[SEP]"), len(vocab)


def make_tiny_folders(root: Path) -> dict[str, Path]:
    """A tiny BERT and a tiny Llama (Hugging Face folders with tokenizers), a classification CSV whose
    label is the sentiment word in it, and a prompt/response JSONL."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    out = {}
    for name in ("bert", "llama"):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        tok, n = _tokenizer(folder)
        torch.manual_seed(0)
        if name == "bert":
            model = BertModel(BertConfig(vocab_size=n, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=32, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0))
        else:
            model = LlamaForCausalLM(LlamaConfig(
                vocab_size=n, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                intermediate_size=32, max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=3))
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        out[name] = folder
    rng = random.Random(0)
    with open(root / "data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for _ in range(200):
            pos = rng.random() < 0.5
            words = [rng.choice(WORDS[:3] if pos else WORDS[3:6])] + rng.sample(WORDS[6:], 3)
            rng.shuffle(words)
            w.writerow([" ".join(words), "pos" if pos else "neg"])
    out["csv"] = root / "data.csv"
    with open(root / "gen.jsonl", "w") as f:
        for _ in range(120):
            word, noun = rng.choice(WORDS[:6]), rng.choice(["movie", "food", "day"])
            f.write(json.dumps({"prompt": f"the {noun} was {word} ?", "response": word}) + "\n")
    out["jsonl"] = root / "gen.jsonl"
    return out


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return make_tiny_folders(tmp_path_factory.mktemp("tiny"))


def _train(tiny, out: Path, *extra: str) -> dict:
    argv = ["train", "--model", str(tiny["bert"]), "--data", str(tiny["csv"]), "--batch-size", "8",
            "--out", str(out), "--quiet", *extra]
    assert main(argv) == 0
    return json.loads((out / "metrics.json").read_text())


def test_train_writes_adapter_metrics_and_log_and_learns(tiny, tmp_path, capsys):
    m = _train(tiny, tmp_path / "run", "--max-steps", "60", "--lr", "2e-2", "--head-lr", "2e-2", "--set", "targets=all-linear",
               "--set", "r=4", "--eval-before")
    out = tmp_path / "run"
    for name in ("adapter_model.safetensors", "adapter_config.json", "metrics.json", "run.json", "train.log"):
        assert (out / name).is_file(), name
    assert (out / "checkpoints" / "last" / "trainer_state.json").is_file()
    # trainable: LoRA r·(d_in + d_out) on the 6 linear layers of each of 2 blocks and the pooler, + the 2-way head
    lora = 4 * (2 * (4 * (16 + 16) + (16 + 32) + (32 + 16)) + (16 + 16))
    assert m["trainable_parameters"] == lora + 16 * 2 + 2
    assert m["trainable_percent"] == pytest.approx(100 * m["trainable_parameters"] / m["total_parameters"])
    assert m["steps"] == 60 and m["metric"] == "accuracy" and m["splits"] == {"train": 160, "dev": 21, "test": 19}
    assert m["test"]["accuracy"] >= 0.85 > m["untrained_test"]["accuracy"], m  # the word decides the label
    assert m["train_loss_last"] < m["train_loss_first"]
    assert m["peak_memory"]["max_rss_mb"] > 0 and m["train_seconds"] > 0 and m["wall_seconds"] > m["train_seconds"]
    assert "step 60: loss" in (out / "train.log").read_text()
    # `subpeft eval` rebuilds model and task from run.json and gets the same test accuracy
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out), "--json", str(tmp_path / "e.json")]) == 0
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["test"]["accuracy"] == pytest.approx(m["test"]["accuracy"]) and e["method"] == "lora"
    assert e["test"]["loss"] == pytest.approx(m["test"]["loss"], abs=1e-6)


def test_config_file_and_set_reach_the_method(tiny, tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"method": "adalora", "r": 4, "target_r": 2, "targets": ["query", "value"]}))
    m = _train(tiny, tmp_path / "run", "--config", str(cfg), "--set", "alpha=8", "--max-steps", "6")
    assert m["method"] == "adalora" and m["config"]["r"] == 4 and m["config"]["alpha"] == 8
    assert m["config"]["total_steps"] == 6  # filled in from the run
    assert m["config"]["modules_to_save"] == ["classifier"]  # the fresh head trains with the adapter
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert saved.get("total_step", saved.get("total_steps")) == 6


def test_baselines_full_and_head(tiny, tmp_path):
    full = _train(tiny, tmp_path / "full", "--method", "full", "--max-steps", "3")
    head = _train(tiny, tmp_path / "head", "--method", "head", "--max-steps", "3")
    assert full["trainable_parameters"] == full["total_parameters"] and full["trainable_percent"] == 100
    assert head["trainable_parameters"] == 16 * 2 + 2
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "head" / "trainable.safetensors"))) == {"classifier.weight", "classifier.bias"}
    for name in ("full", "head"):
        assert main(["eval", "--adapter", str(tmp_path / name), "--json", str(tmp_path / "e.json")]) == 0
        e = json.loads((tmp_path / "e.json").read_text())
        ref = json.loads((tmp_path / name / "metrics.json").read_text())
        assert e["test"]["loss"] == pytest.approx(ref["test"]["loss"], abs=1e-6)


def test_generation_from_a_jsonl_file(tiny, tmp_path):
    out = tmp_path / "gen"
    assert main(["train", "--model", str(tiny["llama"]), "--data", str(tiny["jsonl"]), "--max-steps", "40",
                 "--batch-size", "8", "--lr", "1e-2", "--set", "targets=all-linear", "--out", str(out), "--quiet",
                 "--eval-before"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["kind"] == "generation" and m["metric"] == "answer_loss" and not m["greater_is_better"]
    assert "exact_match" in m["test"] and 0 <= m["test"]["exact_match"] <= 1
    assert m["test"]["answer_loss"] < m["untrained_test"]["answer_loss"] - 0.1


def test_a_dev_scored_search_run_skips_exact_match(tiny, tmp_path):
    """compare's lr-search runs score on dev ("test" is the dev split there): the answer loss alone, no greedy
    generation for exact match (the chosen run is scored on test afterwards, exact match included)."""
    from subpeft.app.run import RunSpec

    common = {"method": "lora", "model": str(tiny["llama"]), "data": str(tiny["jsonl"]), "max_steps": 2,
              "batch_size": 8, "options": {"targets": "all-linear"}}
    for split, has_em in (("dev", False), ("test", True)):
        spec = tmp_path / f"{split}.json"
        spec.write_text(json.dumps(RunSpec.from_dict({**common, "score_split": split}).to_dict()))
        assert main(["train", "--spec", str(spec), "--out", str(tmp_path / split), "--quiet"]) == 0
        m = json.loads((tmp_path / split / "metrics.json").read_text())
        assert ("exact_match" in m["test"]) is has_em and m["test"]["answer_loss"] > 0
        assert ("the test split is not read" in (tmp_path / split / "train.log").read_text()) is not has_em


def test_a_dev_scored_run_reuses_the_final_dev_eval(tiny, tmp_path, monkeypatch):
    """A search run that evaluated dev at its last step is scored with that evaluation (the same model on the same
    split): no second pass over dev. Scored on test, or with no eval at the last step, it evaluates anew."""
    from subpeft.app import workloads
    from subpeft.app.run import RunSpec

    calls = []
    real = workloads.Generation.evaluate

    def counted(self, model, split, **kw):
        calls.append(split)
        return real(self, model, split, **kw)

    monkeypatch.setattr(workloads.Generation, "evaluate", counted)
    common = {"method": "lora", "model": str(tiny["llama"]), "data": str(tiny["jsonl"]), "max_steps": 4,
              "batch_size": 8, "options": {"targets": "all-linear"}}
    for name, extra, evals, reused in (("dev", {"score_split": "dev", "eval_every": 2}, 2, True),
                                       ("dev-off-step", {"score_split": "dev", "eval_every": 3}, 1, False),
                                       ("test", {"eval_every": 2}, 2, False)):
        calls.clear()
        spec = tmp_path / f"{name}.json"
        spec.write_text(json.dumps(RunSpec.from_dict({**common, **extra}).to_dict()))
        assert main(["train", "--spec", str(spec), "--out", str(tmp_path / name), "--quiet"]) == 0
        m = json.loads((tmp_path / name / "metrics.json").read_text())
        assert len(calls) == evals + (not reused), (name, calls)
        last = m["dev"]["history"][-1]
        if reused:
            assert last["step"] == 4 and m["test"]["from_dev_eval_at_step"] == 4
            assert m["test"]["answer_loss"] == last["answer_loss"] and m["test"]["examples"] == last["examples"]
        else:
            assert "from_dev_eval_at_step" not in m["test"] and m["test"]["answer_loss"] > 0


def test_answer_loss_counts_only_response_tokens(tiny):
    """The training labels are -100 on the prompt: the loss is the response's (plus eos) alone."""
    from transformers import AutoTokenizer

    from subpeft.train.data import load_data_file
    from subpeft.train.workloads import IGNORE, Generation

    task = load_data_file(tiny["jsonl"])
    tok = AutoTokenizer.from_pretrained(str(tiny["llama"]))
    w = Generation(task, tok, max_length=64)
    batch = w.train_batch([0])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    answer = [t for t in labels if t != IGNORE]
    response = tok(" " + task.train.responses[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert answer == response and ids[-len(answer):] == answer
    assert tok.decode(ids[: len(ids) - len(answer)], skip_special_tokens=True).startswith("question :")


def test_answer_loss_weighs_each_prompt_as_one_pair(tiny):
    """A held-out prompt with many reference responses counts as much as one pair: each pair's tokens weigh
    1 / (its prompt's responses in the split). With one response per prompt: the plain token-weighted mean."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from subpeft.train.data import PairSplit, PairTask
    from subpeft.train.workloads import IGNORE, Generation

    tok = AutoTokenizer.from_pretrained(str(tiny["llama"]))
    model = AutoModelForCausalLM.from_pretrained(str(tiny["llama"])).eval()
    many = ["fine", "good day", "very well thanks", "ok", "not bad at all", "great", "so so"]
    pairs = [("how are you ?", r) for r in many] + [("the food was ?", "bad"), ("the day was nice ?", "yes it was")]
    one = PairSplit(["a"], ["b"])

    def score(pairs, batch_size):
        split = PairSplit([p for p, _ in pairs], [r for _, r in pairs])
        w = Generation(PairTask(name="t", train=one, dev=one, test=split), tok, max_length=32)
        return w, w.answer_loss(model, "test", batch_size=batch_size)

    w, got = score(pairs, 3)
    sums, tokens = [], []
    with torch.no_grad():  # each pair alone: its summed NLL and its answer tokens
        for p, r in pairs:
            batch = w._pad([w._example(p, r)])
            n = int((batch["labels"][:, 1:] != IGNORE).sum())
            sums.append(float(model(**batch).loss) * n)
            tokens.append(n)
    weight = [1 / len(many)] * len(many) + [1.0, 1.0]
    want = sum(a * b for a, b in zip(weight, sums, strict=True)) / sum(a * b for a, b in zip(weight, tokens, strict=True))
    assert got == pytest.approx(want, rel=1e-5)
    plain = sum(sums) / sum(tokens)
    assert abs(want - plain) > 1e-3  # the weighting changes this score
    distinct = [pairs[0], *pairs[len(many):]]  # one response per prompt: the token-weighted mean
    assert score(distinct, 2)[1] == pytest.approx((sums[0] + sums[-2] + sums[-1]) / (tokens[0] + tokens[-2] + tokens[-1]),
                                                  rel=1e-5)


def test_no_arguments_default_is_lora_minilm_tweets(monkeypatch, tmp_path):
    """`subpeft train` alone: LoRA on MiniLM on tweets (checked without running it)."""
    import subpeft.train.run as run

    seen = {}

    def fake(spec, out, **kw):
        seen.update(spec=spec, out=out)
        return {"metric": "accuracy", "method": spec.method, "model": "minilm", "task": spec.task,
                "test": {"accuracy": 0.5, "examples": 1}, "trainable_parameters": 1, "total_parameters": 2,
                "trainable_percent": 50.0}

    monkeypatch.setattr(run, "train_run", fake)
    monkeypatch.chdir(tmp_path)
    assert main(["train"]) == 0
    spec = seen["spec"]
    assert (spec.method, spec.model, spec.task, spec.data) == ("lora", None, "tweets", None)
    assert run.model_name(spec, type("T", (), {"kind": "classification"})()) == "minilm"
    assert str(seen["out"]).endswith("lora-tweets")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "lorra"], "unknown method 'lorra'; did you mean 'lora'"),
        (["--task", "tweetz"], "unknown task 'tweetz'"),
        (["--set", "rr=4"], "lora has no option 'rr'"),
        (["--set", "r=-1"], "LoRA.r must be a positive integer"),
        (["--label-col", "sentiment"], "no column --label-col 'sentiment'; its columns are ['text', 'label']"),
        (["--method", "head", "--set", "r=4"], "takes no method options"),
        (["--set", "targets=[\"qkv\"]"], "matches no module"),
    ],
)
def test_bad_input_fails_before_training_with_a_fix(tiny, tmp_path, capsys, argv, message):
    out = tmp_path / "bad"
    source = [] if "--task" in argv else ["--data", str(tiny["csv"])]
    rc = main(["train", "--model", str(tiny["bert"]), *source, "--out", str(out), "--quiet", "--max-steps", "2", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert not (out / "checkpoints").exists() and not (out / "metrics.json").exists()


def test_one_class_and_empty_split_fail_before_training(tmp_path, tiny, capsys):
    one = tmp_path / "one.csv"
    one.write_text("text,label\n" + "".join(f"good day {i},pos\n" for i in range(30)))
    assert main(["train", "--model", str(tiny["bert"]), "--data", str(one), "--out", str(tmp_path / "o")]) == 2
    assert "single class ('pos')" in capsys.readouterr().err
    few = tmp_path / "few.csv"
    few.write_text("text,label\ngood,pos\nbad,neg\ngreat,pos\n")
    assert main(["train", "--model", str(tiny["bert"]), "--data", str(few), "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert "the test split is empty" in err and "--test-size" in err


def test_quantize_hook(tiny, tmp_path, capsys):
    """--quantize nf4 stores the base's linear layers in 4 bits before attaching (subpeft.quant), or says
    clearly that this build cannot."""
    import importlib.util

    argv = ["train", "--model", str(tiny["bert"]), "--data", str(tiny["csv"]), "--out", str(tmp_path / "q"),
            "--quantize", "nf4", "--max-steps", "2", "--batch-size", "8", "--quiet"]
    if importlib.util.find_spec("subpeft.quant") is None:
        assert main(argv) == 2 and "needs subpeft.quant" in capsys.readouterr().err
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        assert main(argv) == 2 and "bitsandbytes" in capsys.readouterr().err
        return
    assert main(argv) == 0
    m = json.loads((tmp_path / "q" / "metrics.json").read_text())
    assert m["quantized_layers"] == 2 * 6 + 1  # every encoder linear and the pooler; the fresh head stays full


def test_compare_writes_table_json_and_plot(tiny, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(tiny["bert"]), "--data", str(tiny["csv"]), "--methods", "lora,ia3",
                 "--seeds", "2", "--max-steps", "4", "--batch-size", "8", "--out", str(out), "--in-process",
                 "--lr", "extension=1e-2", "--set", "lora.r=2", "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in res["summary"]}
    assert list(rows) == ["full", "head", "lora", "ia3"] and len(res["runs"]) == 8
    for name, row in rows.items():
        accs = [r["test"]["accuracy"] for r in res["runs"] if r["method"] == name]
        assert row["accuracy"] == pytest.approx(sum(accs) / 2)
        assert row["accuracy_std"] == pytest.approx(statistics.stdev(accs))
        assert row["percent_of_full"] == pytest.approx(100 * row["accuracy"] / rows["full"]["accuracy"])
    assert rows["lora"]["lr"] == 1e-2 and rows["ia3"]["lr"] == 5e-3 and rows["full"]["lr"] == 1e-4
    lora_run = next(r for r in res["runs"] if r["method"] == "lora")
    assert lora_run["config"]["r"] == 2
    table = (out / "results.md").read_text()
    assert "| `lora r=2`" in table and "% of full FT" in table  # the row shows its options
    assert "Command: `subpeft compare --model" in table
    assert (out / "results.png").stat().st_size > 1000
    # --resume reuses finished runs of the same settings (the same command: before issue 17 any metrics.json was
    # reused, also with other --lr/--set; tests/fast/test_compare.py checks that other settings are refused)
    capsys.readouterr()
    assert main(["compare", "--model", str(tiny["bert"]), "--data", str(tiny["csv"]), "--methods", "lora,ia3",
                 "--seeds", "2", "--max-steps", "4", "--batch-size", "8", "--out", str(out), "--in-process",
                 "--lr", "extension=1e-2", "--set", "lora.r=2", "--resume"]) == 0
    assert capsys.readouterr().out.count("done before") == 8


def test_gradient_accumulation_equals_the_larger_batch(tiny, tmp_path):
    """2 micro-batches of 8 accumulate to the gradient of one batch of 16 (same examples, same order)."""
    from safetensors.torch import load_file

    a = _train(tiny, tmp_path / "a", "--max-steps", "3", "--batch-size", "16", "--lr", "1e-2", "--save-every", "0")
    b = _train(tiny, tmp_path / "b", "--max-steps", "3", "--batch-size", "8", "--grad-accum", "2", "--lr", "1e-2")
    ta = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    tb = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], atol=2e-6, rtol=1e-5, msg=k)
    _train(tiny, tmp_path / "c", "--max-steps", "3", "--batch-size", "8", "--lr", "1e-2")
    tc = load_file(str(tmp_path / "c" / "adapter_model.safetensors"))
    assert any((ta[k] - tc[k]).abs().max() > 1e-4 for k in ta)  # a batch of 8 alone is another run
    assert a["train_loss_first"] == pytest.approx(b["train_loss_first"], abs=1e-6)


def test_eval_every_keeps_the_best_and_can_end_with_it(tiny, tmp_path):
    from safetensors.torch import load_file

    m = _train(tiny, tmp_path / "run", "--max-steps", "30", "--lr", "5e-2", "--eval-every", "5", "--load-best-at-end")
    evals = m["dev"]["history"]
    assert [e["step"] for e in evals] == [5, 10, 15, 20, 25, 30]
    best = max(evals, key=lambda e: e["accuracy"])  # the first of equals: later ties do not replace it
    assert (m["dev"]["best_step"], m["dev"]["best"]) == (best["step"], best["accuracy"])
    saved = json.loads((tmp_path / "run" / "best" / "best.json").read_text())
    assert saved["step"] == best["step"]
    final = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    kept = load_file(str(tmp_path / "run" / "best" / "adapter_model.safetensors"))
    assert all(torch.equal(final[k], kept[k]) for k in final)


def test_compare_expands_all_in_a_list(monkeypatch):
    """'all' stands for every weight-space method, also inside a list; names are not repeated."""
    import subpeft.train.compare as compare
    from subpeft.cli import main as cli_main

    seen = {}

    def fake_run_compare(methods, common, out, **kw):
        seen["methods"] = methods
        return {"summary": [], "runs": [], "wall_seconds": 0.0}

    monkeypatch.setattr(compare, "run_compare", fake_run_compare)
    monkeypatch.setattr(compare, "markdown", lambda results: "")
    assert cli_main(["compare", "--methods", "lora,all,houlsby,lora", "--quiet"]) == 0
    weight = compare.weight_methods()
    assert seen["methods"] == ["lora"] + [m for m in weight if m != "lora"] + ["houlsby"]
    assert "houlsby" not in weight and "prompt_tuning" not in weight and "dora" in weight


def test_the_fresh_head_trains_at_head_lr_for_every_method(tiny, tmp_path):
    """The head's lr is the same for every method (default: the head baseline's 5e-3), the rest of the
    model trains at the method's lr; recorded in metrics.json."""
    from subpeft.train.run import RunSpec
    from subpeft.train.trainer import TrainArgs, param_groups

    lrs = {}
    for method in ("lora", "ia3", "full", "head"):
        out = tmp_path / method
        assert main(["train", "--method", method, "--model", str(tiny["bert"]), "--data", str(tiny["csv"]),
                     "--max-steps", "2", "--batch-size", "8", "--out", str(out), "--quiet"]) == 0
        m = json.loads((out / "metrics.json").read_text())
        lrs[method] = (m["lr"], m["head_lr"])
    assert lrs == {"lora": (2e-3, 5e-3), "ia3": (5e-3, 5e-3), "full": (1e-4, 5e-3), "head": (5e-3, 5e-3)}
    assert RunSpec(method="lora", head_lr=1e-2).resolved_head_lr == 1e-2
    assert RunSpec(method="head", lr=3e-3, head_lr=1e-2).resolved_head_lr == 3e-3

    # the groups: head parameters (also inside subpeft's trainable copy) at head_lr, decay only on matrices
    import subpeft as sp
    from subpeft.train.models import load_folder

    model, _ = load_folder(str(tiny["bert"]), "classification", num_labels=3, seed=0)
    tuned = sp.attach(model, sp.LoRA(r=2, targets=["query"], modules_to_save=["classifier"]))
    groups = param_groups(tuned, TrainArgs(total_steps=1, lr=1e-3, weight_decay=0.1, head_lr=7e-3,
                                           head_modules=("classifier",)))
    names = {id(p): n for n, p in tuned.named_parameters()}
    head = [g for g in groups if g.get("lr") == 7e-3]
    assert head and all("classifier" in names[id(p)] for g in head for p in g["params"])
    rest = [g for g in groups if "lr" not in g]
    assert rest and all("lora" in names[id(p)] for g in rest for p in g["params"])
    assert all(g["weight_decay"] == (0.1 if g["params"][0].ndim >= 2 else 0.0) for g in groups)
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in tuned.parameters() if p.requires_grad)


def test_a_qlora_run_is_evaluated_on_its_4bit_base(tiny, tmp_path):
    """`subpeft eval` of a run trained with --quantize nf4 quantises the base again: the same loss to the last
    digit, where the full-precision base gives another."""
    pytest.importorskip("bitsandbytes")
    m = _train(tiny, tmp_path / "q", "--max-steps", "6", "--lr", "2e-2", "--quantize", "nf4")
    assert m["quantized_layers"] > 0
    assert main(["eval", "--adapter", str(tmp_path / "q"), "--json", str(tmp_path / "e.json")]) == 0
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["test"]["loss"] == pytest.approx(m["test"]["loss"], rel=1e-6)
    spec = json.loads((tmp_path / "q" / "run.json").read_text())
    spec["quantize"] = None
    (tmp_path / "q" / "run.json").write_text(json.dumps(spec))
    assert main(["eval", "--adapter", str(tmp_path / "q"), "--json", str(tmp_path / "f.json")]) == 0
    assert json.loads((tmp_path / "f.json").read_text())["test"]["loss"] != pytest.approx(m["test"]["loss"], rel=1e-6)


def test_causal_lm_training_takes_its_loss_from_the_workload(tiny, tmp_path, monkeypatch):
    """Each micro-batch's loss is the workload's (the causal LM's computes logits on answer rows only), and the
    logged training loss is that value."""
    from subpeft.app import workloads

    losses = []
    real = workloads.Generation.loss

    def counted(self, model, batch):
        loss = real(self, model, batch)
        losses.append(float(loss.detach()))
        return loss

    monkeypatch.setattr(workloads.Generation, "loss", counted)
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny["llama"]), "--data", str(tiny["jsonl"]), "--max-steps", "3",
                 "--batch-size", "4", "--out", str(out), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 3 and len(losses) > 3  # 3 training steps, then the evaluations' batches
    assert m["train_loss_first"] == pytest.approx(losses[0], rel=1e-6)
    assert m["train_loss_last"] == pytest.approx(losses[2], rel=1e-6)
