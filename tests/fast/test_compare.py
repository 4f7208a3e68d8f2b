"""`subpeft compare` (issue 17): entries with options side by side, the learning rate tuned on the dev split
only, split sizes honoured and fixed across seeds, --baselines, --resume that checks settings, barely-moved
marks and the progress lines. Tiny models and data built in the test (tests/fast/test_train_cli.py)."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

import subpeft.app.compare as compare
import subpeft.app.run as run_mod
from subpeft.app.run import RunSpec, UsageError, build_task
from subpeft.app.workloads import Classification
from subpeft.cli import main

from .test_train_cli import make_tiny_folders

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return make_tiny_folders(tmp_path_factory.mktemp("tinycmp"))


def _common(tiny, **extra) -> dict:
    return {"model": str(tiny["bert"]), "data": str(tiny["csv"]), "task": None, "max_steps": 2, "batch_size": 8,
            **extra}


def _line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# --------------------------------------------------------------------------- lr search on dev only

DEV_SCORE = {1e-4: 0.70, 1e-3: 0.90, 1e-2: 0.50}  # dev prefers 1e-3
TEST_SCORE = {1e-4: 0.10, 1e-3: 0.60, 1e-2: 0.95}  # test would prefer 1e-2


def test_lr_grid_chooses_on_dev_and_never_reads_test(tiny, tmp_path, monkeypatch):
    """The grid's lr is the dev-best one (here not the test-best), the search runs never evaluate the test
    examples, every seed then runs at the chosen lr, and the first seed's run is the search run (not trained
    twice), scored on test afterwards."""
    real = build_task(RunSpec.from_dict({**_common(tiny), "method": "lora"}))
    test_texts, dev_texts = list(real.test.texts), list(real.dev.texts)
    state = {"lr": None, "phase": "search"}
    seen: list[tuple[str, str, float]] = []  # (phase, data evaluated: dev/test, lr)
    calls: list[tuple[float, int, str]] = []

    evaluate = Classification.evaluate

    def fake_evaluate(self, model, split, **kw):
        scores = evaluate(self, model, split, **kw)
        texts = list(self.task.split(split).texts)
        data = "test" if texts == test_texts else "dev" if texts == dev_texts else "other"
        seen.append((state["phase"], data, state["lr"]))
        scores["accuracy"] = (TEST_SCORE if data == "test" else DEV_SCORE)[state["lr"]]
        return scores

    train_run = compare.train_run

    def fake_train_run(spec, out, **kw):
        state["lr"] = spec.lr
        calls.append((spec.lr, spec.seed, spec.score_split))
        return train_run(spec, out, **kw)

    eval_run = run_mod.eval_run

    def fake_eval_run(directory, overrides=None, **kw):
        state["phase"] = "final"
        state["lr"] = json.loads((Path(directory) / "run.json").read_text())["lr"]
        return eval_run(directory, overrides, **kw)

    monkeypatch.setattr(Classification, "evaluate", fake_evaluate)
    monkeypatch.setattr(compare, "train_run", fake_train_run)
    monkeypatch.setattr(run_mod, "eval_run", fake_eval_run)
    out = tmp_path / "cmp"
    res = compare.run_compare(["lora"], _common(tiny), out, seeds=[0, 1], lr_grid={"lora": [1e-4, 1e-3, 1e-2]},
                              baselines=[], in_process=True, echo=lambda s: None)
    # the search: three runs of seed 0 scored on dev data only; then seed 1 at the chosen lr; seed 0 reused
    assert calls == [(1e-4, 0, "dev"), (1e-3, 0, "dev"), (1e-2, 0, "dev"), (1e-3, 1, "test")]
    assert [s for s in seen if s[0] == "search"] == [("search", "dev", lr) for lr in (1e-4, 1e-3, 1e-2)]
    assert not [s for s in seen if s[1] == "test" and s[2] != 1e-3]  # no other lr ever saw the test data
    info = res["lr_search"]["lora"]
    assert info["chosen"] == 1e-3 and info["split"] == "dev"
    assert info["dev_scores"] == [{"lr": lr, "seed": 0, "dev": DEV_SCORE[lr]} for lr in (1e-4, 1e-3, 1e-2)]
    assert info["seeds"] == [0] and info["dev_means"] == [{"lr": lr, "dev": DEV_SCORE[lr]} for lr in (1e-4, 1e-3, 1e-2)]
    finals = [r for r in res["runs"] if r.get("label") == "lora"]
    assert sorted(r["seed"] for r in finals) == [0, 1]
    assert all(r["lr"] == 1e-3 and r["test"]["accuracy"] == TEST_SCORE[1e-3] for r in finals)
    seed0 = next(r for r in finals if r["seed"] == 0)
    assert seed0["from_lr_search"].endswith("lr0.001") and seed0["dev_final"]["accuracy"] == DEV_SCORE[1e-3]
    row = res["summary"][0]
    assert row["label"] == "lora" and row["lr"] == 1e-3 and row["lr_tuned"] and row["percent_of_full"] is None
    # the search runs' files say what they are; their weights are gone once the chosen one was scored
    search = json.loads((out / "runs" / "lora" / "lr-search" / "lr0.01" / "metrics.json").read_text())
    assert "test" not in search and search["dev_final"]["accuracy"] == DEV_SCORE[1e-2]
    assert not list((out / "runs" / "lora" / "lr-search").glob("*/adapter_model.safetensors"))
    table = (out / "results.md").read_text()
    assert "tuned on the **dev split**" in table and "| 0.001* |" in table and "chosen 0.001" in table
    assert "1e-04 → 0.7000" in table or "0.0001 → 0.7000" in table
    assert "Baselines: none" in table and "| – |" in table  # no full fine-tuning: no % of full FT
    # the same comparison again with --resume: nothing trains (the reused seed-0 run has the seed run's settings)
    calls.clear()
    compare.run_compare(["lora"], _common(tiny), out, seeds=[0, 1], lr_grid={"lora": [1e-4, 1e-3, 1e-2]},
                        baselines=[], in_process=True, resume=True, echo=lambda s: None)
    assert calls == []


def _scores_by_lr(monkeypatch, dev: dict[float, float], test_texts=None):
    """Every evaluation scores the lr of the run being evaluated from ``dev``; returns the list of trained runs
    (lr, seed, score split) and of the lrs whose runs read ``test_texts``."""
    state, calls, test_seen = {"lr": None}, [], []
    evaluate = Classification.evaluate

    def fake_evaluate(self, model, split, **kw):
        scores = evaluate(self, model, split, **kw)
        if test_texts is not None and list(self.task.split(split).texts) == test_texts:
            test_seen.append(state["lr"])
        scores["accuracy"] = dev[state["lr"]]
        return scores

    train_run = compare.train_run

    def fake_train_run(spec, out, **kw):
        state["lr"] = spec.lr
        calls.append((spec.lr, spec.seed, spec.score_split))
        return train_run(spec, out, **kw)

    eval_run = run_mod.eval_run

    def fake_eval_run(directory, overrides=None, **kw):
        state["lr"] = json.loads((Path(directory) / "run.json").read_text())["lr"]
        return eval_run(directory, overrides, **kw)

    monkeypatch.setattr(Classification, "evaluate", fake_evaluate)
    monkeypatch.setattr(compare, "train_run", fake_train_run)
    monkeypatch.setattr(run_mod, "eval_run", fake_eval_run)
    return calls, test_seen


def test_lr_extend_searches_beyond_an_edge_on_dev_only(tiny, tmp_path, monkeypatch, capsys):
    """--lr-extend: while the dev-best lr is the grid's largest, one more lr a grid step beyond (×10 here), up to
    N more runs; the choice is over every lr tried, still on dev only; results record the extension."""
    dev = {1e-4: 0.5, 1e-3: 0.6, 1e-2: 0.7, 1e-1: 0.8, 1.0: 0.1}
    test_texts = list(build_task(RunSpec.from_dict({**_common(tiny), "method": "lora"})).test.texts)
    calls, test_seen = _scores_by_lr(monkeypatch, dev, test_texts)
    grid = {"lora": [1e-4, 1e-3, 1e-2]}
    res = compare.run_compare(["lora"], _common(tiny), tmp_path / "a", seeds=[0], lr_grid=grid, lr_extend=2,
                              baselines=[], in_process=True, echo=lambda s: None)
    assert calls == [(lr, 0, "dev") for lr in (1e-4, 1e-3, 1e-2, 1e-1, 1.0)]
    assert test_seen == [1e-1]  # only the chosen lr's run, after the choice
    info = res["lr_search"]["lora"]
    assert info["chosen"] == 1e-1 and info["extended"] == [1e-1, 1.0] and info["grid"] == [1e-4, 1e-3, 1e-2]
    calls.clear()
    res = compare.run_compare(["lora"], _common(tiny), tmp_path / "b", seeds=[0], lr_grid=grid, lr_extend=1,
                              baselines=[], in_process=True, echo=lambda s: None)
    assert [c[0] for c in calls] == [1e-4, 1e-3, 1e-2, 1e-1] and res["lr_search"]["lora"]["chosen"] == 1e-1
    calls.clear()  # an inner best is not extended
    dev.update({1e-2: 0.55})
    res = compare.run_compare(["lora"], _common(tiny), tmp_path / "c", seeds=[0], lr_grid=grid, lr_extend=2,
                              baselines=[], in_process=True, echo=lambda s: None)
    assert [c[0] for c in calls] == [1e-4, 1e-3, 1e-2] and res["lr_search"]["lora"]["extended"] == []
    # the CLI: --lr-extend needs a grid, and a count >= 0
    base = ["compare", "--model", str(tiny["bert"]), "--data", str(tiny["csv"]), "--methods", "lora", "--quiet",
            "--out", str(tmp_path / "bad")]
    capsys.readouterr()
    assert main([*base, "--lr-extend", "1"]) == 2 and "--lr-grid" in _line(capsys)
    assert main([*base, "--lr-grid", "auto", "--lr-extend", "-1"]) == 2 and "--lr-extend" in _line(capsys)
    assert not (tmp_path / "bad").exists()


def test_lr_seeds_choose_on_the_mean_dev_score_of_several_seeds(tiny, tmp_path, monkeypatch, capsys):
    """--lr-seeds 2: every lr trains on seeds 0 and 1, the best *mean* dev score wins (here not seed 0's best),
    those two seeds' search runs at the chosen lr become their seed runs (scored on test only after the choice),
    a third seed trains at the chosen lr, an extension runs on both seeds, and --resume trains nothing."""
    dev = {(1e-3, 0): 0.6, (1e-2, 0): 0.7, (1e-3, 1): 0.8, (1e-2, 1): 0.5, (1e-1, 0): 0.1, (1e-1, 1): 0.1,
           (1e-4, 0): 0.55, (1e-4, 1): 0.6, (1e-3, 2): 0.65}
    test_texts = list(build_task(RunSpec.from_dict({**_common(tiny), "method": "lora"})).test.texts)
    state, calls, test_seen = {"key": None}, [], []
    evaluate = Classification.evaluate

    def fake_evaluate(self, model, split, **kw):
        scores = evaluate(self, model, split, **kw)
        if list(self.task.split(split).texts) == test_texts:
            test_seen.append(state["key"])
        scores["accuracy"] = dev[state["key"]]
        return scores

    train_run = compare.train_run

    def fake_train_run(spec, out, **kw):
        state["key"] = (spec.lr, spec.seed)
        calls.append((spec.lr, spec.seed, spec.score_split))
        return train_run(spec, out, **kw)

    eval_run = run_mod.eval_run

    def fake_eval_run(directory, overrides=None, **kw):
        stored = json.loads((Path(directory) / "run.json").read_text())
        state["key"] = (stored["lr"], stored["seed"])
        return eval_run(directory, overrides, **kw)

    monkeypatch.setattr(Classification, "evaluate", fake_evaluate)
    monkeypatch.setattr(compare, "train_run", fake_train_run)
    monkeypatch.setattr(run_mod, "eval_run", fake_eval_run)
    out = tmp_path / "cmp"
    kw = {"seeds": [0, 1, 2], "lr_grid": {"lora": [1e-3, 1e-2]}, "lr_seeds": 2, "baselines": [], "in_process": True,
          "echo": lambda s: None}
    res = compare.run_compare(["lora"], _common(tiny), out, **kw)
    assert calls == [(1e-3, 0, "dev"), (1e-3, 1, "dev"), (1e-2, 0, "dev"), (1e-2, 1, "dev"), (1e-3, 2, "test")]
    assert sorted(test_seen) == [(1e-3, 0), (1e-3, 1), (1e-3, 2)]  # only the chosen lr, after the choice
    info = res["lr_search"]["lora"]
    assert info["chosen"] == 1e-3 and info["seeds"] == [0, 1]
    assert info["dev_means"] == [{"lr": 1e-3, "dev": pytest.approx(0.7)}, {"lr": 1e-2, "dev": pytest.approx(0.6)}]
    finals = {r["seed"]: r for r in res["runs"] if r.get("label") == "lora"}
    assert finals[0]["from_lr_search"].endswith("lr0.001") and finals[1]["from_lr_search"].endswith("lr0.001-seed1")
    assert "from_lr_search" not in finals[2] and all(r["lr"] == 1e-3 for r in finals.values())
    assert not list((out / "runs" / "lora" / "lr-search").glob("*/adapter_model.safetensors"))
    assert "seeds 0, 1): each lr of the grid trained once per seed, the best mean dev" in (out / "results.md").read_text()
    calls.clear()
    compare.run_compare(["lora"], _common(tiny), out, **kw, resume=True)
    assert calls == []
    # the mean's best at the grid's edge: the extension trains on both search seeds
    calls.clear()
    res = compare.run_compare(["lora"], _common(tiny), tmp_path / "ext", **{**kw, "lr_grid": {"lora": [1e-4, 1e-3]}},
                              lr_extend=1)
    assert calls[:6] == [(1e-4, 0, "dev"), (1e-4, 1, "dev"), (1e-3, 0, "dev"), (1e-3, 1, "dev"),
                         (1e-2, 0, "dev"), (1e-2, 1, "dev")]
    assert res["lr_search"]["lora"]["chosen"] == 1e-3  # mean 0.7 against 1e-2's 0.6
    # bad counts: one clear line, nothing written
    with pytest.raises(UsageError, match="--lr-seeds must be between 1 and the number of seeds"):
        compare.run_compare(["lora"], _common(tiny), tmp_path / "bad0", **{**kw, "lr_seeds": 4})
    base = ["compare", "--model", str(tiny["bert"]), "--data", str(tiny["csv"]), "--methods", "lora", "--quiet",
            "--seeds", "2", "--out", str(tmp_path / "bad")]
    capsys.readouterr()
    assert main([*base, "--lr-seeds", "2"]) == 2 and "--lr-grid" in _line(capsys)
    assert main([*base, "--lr-grid", "auto", "--lr-seeds", "3"]) == 2 and "--lr-seeds" in _line(capsys)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad0").exists()


def test_a_grown_lr_search_sets_superseded_seed_runs_aside_and_reruns_them(tiny, tmp_path, monkeypatch):
    """--resume with a larger --lr-extend: when the new search run wins on dev, the seed runs finished at the old
    lr are renamed seedN-lr<old> (kept) and run again at the new lr; nothing else is retrained."""
    calls, _ = _scores_by_lr(monkeypatch, {1e-4: 0.5, 1e-3: 0.6, 1e-2: 0.7, 1e-1: 0.8})
    lines: list[str] = []
    kw = {"seeds": [0, 1], "lr_grid": {"lora": [1e-4, 1e-3, 1e-2]}, "baselines": [], "in_process": True,
          "echo": lines.append}
    out = tmp_path / "cmp"
    compare.run_compare(["lora"], _common(tiny), out, **kw)
    runs = out / "runs" / "lora"
    old_seed1 = (runs / "seed1" / "metrics.json").read_text()
    calls.clear()
    res = compare.run_compare(["lora"], _common(tiny), out, lr_extend=1, resume=True, **kw)
    assert calls == [(1e-1, 0, "dev"), (1e-1, 1, "test")]  # the extension, then seed 1; seed 0 is the search run
    assert res["lr_search"]["lora"]["chosen"] == 1e-1
    assert sorted(p.name for p in runs.iterdir() if p.name.startswith("seed")) == [
        "seed0", "seed0-lr0.01", "seed1", "seed1-lr0.01"]
    assert (runs / "seed1-lr0.01" / "metrics.json").read_text() == old_seed1
    assert {json.loads((runs / f"seed{s}" / "run.json").read_text())["lr"] for s in (0, 1)} == {1e-1}
    assert sum("superseded by the dev-best lr 0.1; kept as seed1-lr0.01" in line for line in lines) == 1
    calls.clear()  # resumed again: all done
    compare.run_compare(["lora"], _common(tiny), out, lr_extend=1, resume=True, **kw)
    assert calls == []


def test_lr_grid_options_and_auto(tiny, monkeypatch):
    e = compare.parse_entry("lora[r=2]")
    assert compare.resolve_grid(e, {}, {"*": [1e-3, 3e-3]}) == [1e-3, 3e-3]
    assert compare.resolve_grid(e, {"lora": 1e-3}, {"*": [1e-3, 3e-3]}) is None  # the more specific --lr wins
    assert compare.resolve_grid(e, {"*": 1e-3}, {"lora[r=2]": [1e-3, 3e-3]}) == [1e-3, 3e-3]
    assert compare.resolve_grid(e, {}, {"extension": "auto"}) == [6.67e-4, 2e-3, 6e-3]
    assert compare.resolve_grid(compare.parse_entry("untrained"), {}, {"*": [1e-3, 3e-3]}) is None
    with pytest.raises(UsageError, match="both name 'lora'"):
        compare.resolve_grid(e, {"lora": 1e-3}, {"lora": [1e-3, 3e-3]})
    for bad in ("1e-3,x", "lora=", "0,1e-3", "nan"):
        assert main(["compare", "--methods", "lora", "--lr-grid", bad, "--quiet"]) == 2


# --------------------------------------------------------------------------- entries and labels


def test_entries_with_options_side_by_side(tiny, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(tiny["bert"]), "--data", str(tiny["csv"]), "--methods",
                 "lora[r=2],lora[r=4],lora[r=4,mpc=o],lora_dash[r=2]", "--set", "lora.alpha=8", "--seeds", "1",
                 "--max-steps", "2", "--batch-size", "8", "--baselines", "full", "--in-process", "--out", str(out),
                 "--lr", "lora[r=2]=3e-3"]) == 0
    res = json.loads((out / "results.json").read_text())
    labels = [r["label"] for r in res["summary"]]
    assert labels == ["full", "lora alpha=8 r=2", "lora alpha=8 r=4", "lora alpha=8 r=4 mpc=o", "lora_dash r=2"]
    configs = {r["label"]: r["config"] for r in res["runs"] if "config" in r}
    assert configs["lora alpha=8 r=2"]["r"] == 2 and configs["lora alpha=8 r=4 mpc=o"]["mpc"] == "o"
    assert configs["lora alpha=8 r=4"]["mpc"] is None and configs["lora_dash r=2"]["r"] == 2
    assert {r["label"]: r["lr"] for r in res["summary"]}["lora alpha=8 r=2"] == 3e-3
    assert {r["label"]: r["lr"] for r in res["summary"]}["lora alpha=8 r=4"] == 2e-3
    table = (out / "results.md").read_text()
    for label in labels:
        assert f"| `{label}`" in table
    assert (out / "runs" / "lora_alpha=8_r=4_mpc=o" / "seed0" / "metrics.json").is_file()
    text = capsys.readouterr().out
    assert "[1/5]" in text and "[5/5]" in text and "ETA" in text  # one plain progress line per run
    for methods, what, *extra in (("lora[r=2,lora[r=4]", "'['"), ("lora,lora[r=2]", "'lora r=2'", "--set", "lora.r=2"),
                                  ("lora[r]", "key=value"), ("lora[]", "empty brackets"), ("full[r=2]", "no options"),
                                  ("nosuch[r=2]", "nosuch"), ("lora[r=2]]", "']'")):
        assert main(["compare", "--model", str(tiny["bert"]), "--data", str(tiny["csv"]), "--methods", methods,
                     "--out", str(tmp_path / "bad"), "--quiet", *extra]) == 2, methods
        assert what in _line(capsys), methods
        assert not (tmp_path / "bad").exists()


def test_baselines_option(tiny, tmp_path, capsys):
    base = ["compare", "--model", str(tiny["bert"]), "--data", str(tiny["csv"]), "--methods", "ia3", "--seeds", "1",
            "--max-steps", "1", "--batch-size", "8", "--in-process", "--quiet"]
    assert main([*base, "--baselines", "none", "--out", str(tmp_path / "a")]) == 0
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    assert [r["label"] for r in res["summary"]] == ["ia3"] and res["summary"][0]["percent_of_full"] is None
    assert main([*base, "--baselines", "head", "--out", str(tmp_path / "b")]) == 0
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    assert [r["label"] for r in res["summary"]] == ["head", "ia3"]
    capsys.readouterr()
    assert main([*base, "--baselines", "full,bogus", "--out", str(tmp_path / "c")]) == 2
    assert "--baselines" in _line(capsys) and not (tmp_path / "c").exists()
    gen = ["compare", "--model", str(tiny["llama"]), "--data", str(tiny["jsonl"]), "--methods", "lora", "--seeds",
           "1", "--max-steps", "1", "--batch-size", "4", "--in-process", "--quiet", "--out", str(tmp_path / "d")]
    assert main([*gen, "--baselines", "head"]) == 2
    assert "untrained" in _line(capsys)


# --------------------------------------------------------------------------- resume


def test_resume_refuses_runs_with_other_settings(tiny, tmp_path, capsys):
    base = ["compare", "--model", str(tiny["bert"]), "--data", str(tiny["csv"]), "--methods", "ia3", "--seeds", "1",
            "--batch-size", "8", "--in-process", "--baselines", "none", "--out", str(tmp_path / "cmp")]
    assert main([*base, "--max-steps", "2", "--quiet"]) == 0
    before = (tmp_path / "cmp" / "runs" / "ia3" / "seed0" / "metrics.json").read_text()
    for extra, setting in ((["--max-steps", "3"], "max_steps"), (["--max-steps", "2", "--lr", "1e-2"], "lr"),
                           (["--max-steps", "2", "--split-seed", "4"], "split_seed"),
                           (["--max-steps", "2", "--test-size", "10"], "test_size"),
                           (["--max-steps", "2", "--head-lr", "1e-2"], "head_lr")):
        assert main([*base, *extra, "--resume", "--quiet"]) == 2, extra
        line = _line(capsys)
        assert setting in line and "runs/ia3/seed0" in line and "--overwrite" in line, line
    assert (tmp_path / "cmp" / "runs" / "ia3" / "seed0" / "metrics.json").read_text() == before
    assert main([*base, "--max-steps", "2", "--resume"]) == 0
    assert "done before" in capsys.readouterr().out


# --------------------------------------------------------------------------- splits


def _csv(path: Path, rows: int) -> Path:
    rng = random.Random(1)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(rows):
            w.writerow([f"text number {i}", rng.choice(["a", "b", "c"])])
    return path


def test_split_sizes_are_honoured_or_refused(tmp_path, capsys):
    data = str(_csv(tmp_path / "big.csv", 4000))
    default = build_task(RunSpec(data=data, task=None))  # no size asked: the 80/10/10 split as before
    assert (len(default.train), len(default.dev), len(default.test)) == (3200, 401, 399)
    task = build_task(RunSpec(data=data, task=None, test_size=1000, train_size=None))
    assert (len(task.train), len(task.dev), len(task.test)) == (2599, 401, 1000)  # dev: the default 10% part
    assert task.dev.texts == default.dev.texts and set(default.test.texts) <= set(task.test.texts)
    counts = task.test.label_counts(3)
    overall = [sum(1 for y in task.train.labels + task.dev.labels + task.test.labels if y == k) for k in range(3)]
    assert all(abs(c - 1000 * o / 4000) <= 2 for c, o in zip(counts, overall, strict=True))  # stratified
    smaller = build_task(RunSpec(data=data, task=None, test_size=300))
    assert set(smaller.test.texts) <= set(task.test.texts) and len(smaller.test) == 300
    assert len(build_task(RunSpec(data=data, task=None, test_size=0)).test) == 399  # 0: the whole 10% part
    task = build_task(RunSpec(data=data, task=None, test_size=1000, dev_size=1000, train_size=500))
    assert (len(task.train), len(task.dev), len(task.test)) == (500, 1000, 1000)
    # too small: one line naming the option, nothing written
    out = tmp_path / "run"
    assert main(["train", "--data", data, "--test-size", "3000", "--dev-size", "1000", "--out", str(out),
                 "--quiet"]) == 2
    line = _line(capsys)
    assert "--test-size 3000" in line and "4000" in line and not out.exists()
    # the same in compare, and the real sizes are recorded in results.json and results.md
    assert main(["compare", "--data", data, "--test-size", "3990", "--methods", "lora", "--out", str(tmp_path / "c"),
                 "--quiet"]) == 2
    assert "--test-size 3990" in _line(capsys) and not (tmp_path / "c").exists()


def test_split_is_fixed_across_seeds_and_recorded(tiny, tmp_path, capsys):
    a = build_task(RunSpec(data=str(tiny["csv"]), task=None, seed=0))
    b = build_task(RunSpec(data=str(tiny["csv"]), task=None, seed=7))
    c = build_task(RunSpec(data=str(tiny["csv"]), task=None, seed=0, split_seed=3))
    assert a.test.texts == b.test.texts and a.dev.texts == b.dev.texts and a.train.texts == b.train.texts
    assert sorted(c.test.texts) != sorted(a.test.texts)
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(tiny["bert"]), "--data", str(tiny["csv"]), "--methods", "ia3", "--seeds",
                 "2", "--max-steps", "1", "--batch-size", "8", "--in-process", "--baselines", "none", "--test-size",
                 "30", "--out", str(out), "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["splits"] == {"train": 149, "dev": 21, "test": 30} and res["split_seed"] == 0
    assert [r["splits"] for r in res["runs"]] == [res["splits"]] * 2
    assert "Splits: train 149, dev 21, test 30" in (out / "results.md").read_text()
    run = json.loads((out / "runs" / "ia3" / "seed1" / "run.json").read_text())
    assert run["split_seed"] == 0 and run["seed"] == 1 and run["test_size"] == 30
    # train records it, and --resume treats it as a setting
    t = tmp_path / "t"
    assert main(["train", "--model", str(tiny["bert"]), "--data", str(tiny["csv"]), "--max-steps", "1",
                 "--batch-size", "8", "--split-seed", "2", "--out", str(t), "--quiet"]) == 0
    assert json.loads((t / "run.json").read_text())["split_seed"] == 2
    capsys.readouterr()
    assert main(["train", "--out", str(t), "--resume", "--split-seed", "5", "--quiet"]) == 2
    assert "split_seed" in _line(capsys)


def test_old_run_json_keeps_its_split():
    old = {"seed": 3, "test_size": 2000, "dev_size": 50, "method": "lora"}
    new = run_mod.upgrade_stored(old)
    assert new["split_seed"] == 3 and new["test_size"] is None and new["dev_size"] == 50
    assert run_mod.upgrade_stored(new) == new


# --------------------------------------------------------------------------- barely moved


def _fake_run(label, seed, acc, **extra):
    return {"method": label.split()[0], "label": label, "family": "extension", "seed": seed, "metric": "accuracy",
            "greater_is_better": True, "task": "t", "model": "m", "test": {"accuracy": acc},
            "trainable_parameters": 10, "trainable_percent": 1.0, "lr": 1e-3,
            "peak_memory": {"max_rss_rise_during_training_mb": 1.0}, **extra}


def test_barely_moved_runs_are_warned_about_and_marked():
    runs = [_fake_run("head", 0, 0.5), _fake_run("head", 1, 0.6),
            _fake_run("lora r=2", 0, 0.5), _fake_run("lora r=2", 1, 0.7),  # seed 0 equals the head's score
            _fake_run("ia3", 0, 0.8, movement={"relative_delta": 1e-7, "barely_moved": True, "what": "x"}),
            _fake_run("ia3", 1, 0.8, movement={"relative_delta": 0.1, "barely_moved": False, "what": "x"}),
            _fake_run("dora", 0, 0.6), _fake_run("dora", 1, 0.5)]  # equal scores, but not for the same seed
    results = compare.summarize(runs)
    lines = compare._mark_barely_moved(results, "classification")
    assert len(lines) == 2 and "lora r=2 seed 0" in lines[0] and "head-only" in lines[0]
    assert "ia3 seed 0" in lines[1] and "barely moved" in lines[1]
    marked = {r["label"]: r.get("barely_moved") for r in results["summary"]}
    assert marked["dora"] is None and marked["head"] is None and marked["lora r=2"] and marked["ia3"]
    table = compare.markdown(results)
    assert "| `lora r=2` ⚠ |" in table and "| `ia3` ⚠ |" in table and "| `dora` |" in table
    assert "⚠ barely moved:" in table
    # generation: no head baseline, only the movement key counts
    assert compare._mark_barely_moved(compare.summarize(runs[2:4]), "generation") == []


# --------------------------------------------------------------------------- progress


def test_progress_follows_the_runs_steps(tiny, tmp_path, monkeypatch, capsys):
    """A subprocess run reports its steps through --progress-file; on a terminal the overall bar shows them,
    elsewhere plain lines (one per run) with elapsed time and ETA; --quiet prints neither."""
    spec = RunSpec.from_dict({**_common(tiny), "method": "ia3", "max_steps": 3, "save": False, "save_every": 0})
    steps = []
    metrics = compare._run_subprocess(spec, tmp_path / "run", None, quiet=True,
                                      on_step=lambda step, total: steps.append((step, total)))
    assert metrics["steps"] == 3 and steps and all(total == 3 and 1 <= s <= 3 for s, total in steps)
    assert main(["train", "--model", str(tiny["bert"]), "--data", str(tiny["csv"]), "--max-steps", "2",
                 "--batch-size", "8", "--out", str(tmp_path / "t"), "--quiet", "--progress-file",
                 str(tmp_path / "p.txt")]) == 0
    assert (tmp_path / "p.txt").read_text() == "2 2\n"
    shown = []
    progress = compare._Progress(3, shown.append, bar=True)
    progress.show_step("ia3 seed 0", 1, 4)
    assert "ia3 seed 0: step 1/4" in str(progress.bar)
    progress("ia3 seed 0: accuracy 0.5 (1 s)", 1.0)
    progress.show_step("ia3 seed 1", 2, 4)
    assert "step 2/4; ETA" in str(progress.bar)
    progress.close()
    assert "[1/3] ia3 seed 0" in capsys.readouterr().out and shown == []
    plain = compare._Progress(2, shown.append)
    plain.show_step("x", 1, 2)  # nothing per step without a terminal
    plain("x seed 0: done before")
    plain("x seed 1: accuracy 0.5 (2 s)", 2.0)
    assert shown == ["[1/2] x seed 0: done before (elapsed 0 s)", "[2/2] x seed 1: accuracy 0.5 (2 s) (elapsed 0 s)"]
    capsys.readouterr()
    assert main(["compare", "--model", str(tiny["bert"]), "--data", str(tiny["csv"]), "--methods", "ia3", "--seeds",
                 "1", "--max-steps", "1", "--batch-size", "8", "--baselines", "none", "--in-process", "--quiet",
                 "--out", str(tmp_path / "q")]) == 0
    captured = capsys.readouterr()
    assert "[1/1]" not in captured.out + captured.err and "step" not in captured.err


def test_eval_every_records_the_dev_curve_and_keeps_no_weights(tiny, tmp_path):
    """compare --eval-every: every run's metrics.json has its dev curve; no run (search runs included) keeps a
    best/ adapter or any weights once the comparison has finished."""
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(tiny["bert"]), "--data", str(tiny["csv"]), "--methods", "ia3", "--seeds",
                 "2", "--max-steps", "4", "--batch-size", "8", "--eval-every", "2", "--lr-grid", "1e-3,1e-2",
                 "--baselines", "none", "--in-process", "--quiet", "--out", str(out)]) == 0
    for seed in (0, 1):
        m = json.loads((out / "runs" / "ia3" / f"seed{seed}" / "metrics.json").read_text())
        assert [h["step"] for h in m["dev"]["history"]] == [2, 4]
    assert not list(out.rglob("best")) and not list(out.rglob("*.safetensors"))
