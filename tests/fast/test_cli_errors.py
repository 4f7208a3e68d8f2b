"""Bad input and interruptions of `subpeft train / eval / compare / analyze` (issue 13).

Every usage error is one line on stderr, ``subpeft <command>: error: ...``, that names the option and
what would be right, with exit status 2 and no traceback; Ctrl-C outside the training loop is one line and
exit status 130. Nothing the user had is lost: an existing run folder is only replaced with --overwrite
(and then only the run's own files go), and a run that fails before its first checkpoint leaves no
folder or partial file behind. Files the CLI writes are replaced atomically.

Runs use the tiny BERT and data of test_train_cli (two optimizer steps: a few seconds each)."""

from __future__ import annotations

import json
import pickle
import shutil
import signal
from pathlib import Path

import pytest

from subpeft.cli import main

from .test_train_cli import tiny  # noqa: F401 - the session fixture


def _run(argv: list[str]) -> int:
    """main's exit status, also when it leaves through SystemExit (argparse, or a bare SystemExit(msg))."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


def _one_line(capsys, command: str = "train") -> str:
    """The single stderr line of a failed command (and nothing that looks like a traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"subpeft {command}: "), err
    assert "Traceback" not in err
    return lines[0]


def _train(tiny, out: Path, *extra: str, steps: bool = True) -> list[str]:  # noqa: F811
    return ["train", "--model", str(tiny["bert"]), "--data", str(tiny["csv"]), "--batch-size", "8", "--quiet",
            *(["--max-steps", "2"] if steps else []), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory) -> Path:  # noqa: F811
    """A finished two-step LoRA run (copy it before changing it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(_train(tiny, out)) == 0
    return out


# --------------------------------------------------------------------------- no data loss


def test_a_failing_run_does_not_empty_an_existing_folder(tiny, tmp_path, capsys):  # noqa: F811
    """`mkdir -p d/checkpoints; touch d/checkpoints/keep; subpeft train --out d --set r=abc` kept nothing."""
    d = tmp_path / "d"
    (d / "checkpoints").mkdir(parents=True)
    (d / "checkpoints" / "keep").write_text("mine")
    (d / "metrics.json").write_text("{}")
    assert _run(_train(tiny, d, "--set", "r=abc")) == 2
    assert "r" in _one_line(capsys)
    assert (d / "checkpoints" / "keep").read_text() == "mine" and (d / "metrics.json").read_text() == "{}"
    assert sorted(p.name for p in d.iterdir()) == ["checkpoints", "metrics.json"]


def test_an_existing_run_needs_resume_or_overwrite_and_overwrite_keeps_other_files(tiny, tmp_path, capsys):  # noqa: F811
    d = tmp_path / "d"
    assert main(_train(tiny, d, "--eval-every", "1")) == 0
    assert (d / "best" / "best.json").is_file()
    (d / "notes.txt").write_text("my notes")
    (d / "checkpoints" / "mine.txt").write_text("also mine")
    before = (d / "metrics.json").read_bytes()
    capsys.readouterr()
    # a second run into the same folder is refused until the user says which
    assert _run(_train(tiny, d)) == 2
    line = _one_line(capsys)
    assert "--resume" in line and "--overwrite" in line
    assert (d / "metrics.json").read_bytes() == before and (d / "best" / "best.json").is_file()
    assert _run(_train(tiny, d, "--resume", "--overwrite")) == 2
    assert "--resume" in _one_line(capsys)
    # --overwrite replaces the run; files subpeft did not write stay
    assert main(_train(tiny, d, "--overwrite")) == 0
    assert (d / "notes.txt").read_text() == "my notes"
    assert (d / "checkpoints" / "mine.txt").read_text() == "also mine"
    assert not (d / "best").exists()  # the old run's best/ (this run does not evaluate on dev)
    assert "dev" not in json.loads((d / "metrics.json").read_text())
    assert (d / "checkpoints" / "last" / "trainer_state.json").is_file()


def test_an_empty_existing_folder_is_used(tiny, tmp_path):  # noqa: F811
    d = tmp_path / "empty"
    d.mkdir()
    assert main(_train(tiny, d)) == 0 and (d / "metrics.json").is_file()


def _non_utf8(tmp_path: Path) -> Path:
    path = tmp_path / "latin1.jsonl"
    lines = [json.dumps({"text": f"word {i}", "label": "ab"[i % 2]}) for i in range(40)]
    lines[7] = '{"text": "caf\xe9", "label": "a"}'
    path.write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    return path


@pytest.mark.parametrize("failure", ["bad option", "data load error", "model load error", "during training"])
def test_a_failing_run_leaves_no_new_folder(tiny, tmp_path, capsys, monkeypatch, failure):  # noqa: F811
    """A run that fails before its first checkpoint removes the folders it created (here: new/ and new/run)."""
    out = tmp_path / "new" / "run"
    if failure == "bad option":
        assert _run(_train(tiny, out, "--set", "r=abc")) == 2
        _one_line(capsys)
    elif failure == "data load error":
        assert _run(_train(tiny, out, "--data", str(_non_utf8(tmp_path)))) == 2
        assert "UTF-8" in _one_line(capsys)
    elif failure == "model load error":
        broken = tmp_path / "broken"
        shutil.copytree(tiny["bert"], broken)
        weights = broken / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])  # truncated
        assert _run(_train(tiny, out, "--model", str(broken))) == 2
        assert "--model" in _one_line(capsys)
    else:
        from subpeft.train.trainer import Trainer

        def fail(self, resume=False):
            (self.out_dir / "best").mkdir(parents=True)  # a partial output, then a crash
            raise RuntimeError("crash in the training loop")

        monkeypatch.setattr(Trainer, "train", fail)
        with pytest.raises(RuntimeError, match="crash in the training loop"):
            main(_train(tiny, out))
    assert not (tmp_path / "new").exists()


def test_ctrl_c_while_loading_the_model(tiny, tmp_path, capsys, monkeypatch):  # noqa: F811
    """SIGINT outside the training loop: one line, exit status 130, nothing left behind."""
    import subpeft.train.run as run

    def load_base(spec, task):
        signal.raise_signal(signal.SIGINT)  # the default handler raises KeyboardInterrupt here
        raise AssertionError("SIGINT was not delivered")

    monkeypatch.setattr(run, "load_base", load_base)
    out = tmp_path / "run"
    # a process started in the background by a shell inherits SIGINT ignored (Python then installs no
    # handler): give it Python's default one, as in a terminal
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        rc = _run(_train(tiny, out))
    except KeyboardInterrupt:  # not caught by the command: fail this test, not the whole session
        pytest.fail("KeyboardInterrupt escaped from main()")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert rc == 130
    assert "interrupted" in _one_line(capsys)
    assert not out.exists()


def test_metrics_json_is_replaced_atomically(tiny, finished, tmp_path, capsys, monkeypatch):  # noqa: F811
    """A write of metrics.json that fails (disk full, killed) leaves the complete old file, and no temp file."""
    import os

    d = tmp_path / "run"
    shutil.copytree(finished, d)
    before = (d / "metrics.json").read_bytes()
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == "metrics.json":
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    assert _run(_train(tiny, d, "--resume")) != 0
    assert "No space left" in _one_line(capsys)
    assert (d / "metrics.json").read_bytes() == before
    assert sorted(p.name for p in d.iterdir()) == sorted(p.name for p in finished.iterdir())


# --------------------------------------------------------------------------- one line, exit status 2

BAD_VALUES = {
    "--max-grad-norm": ["-1", "0", "nan", "inf"],
    "--weight-decay": ["-0.1", "nan", "inf"],
    "--threads": ["0", "-2"],
    "--warmup-ratio": ["-0.1", "1.5", "nan"],
    "--eval-every": ["-1"],
    "--save-every": ["-1"],
    "--epochs": ["inf", "nan", "0", "-1"],
    "--lr": ["nan", "inf", "0", "-0.001"],
    "--head-lr": ["nan", "inf", "0"],
    "--max-length": ["1"],
    "--max-new-tokens": ["0"],
    "--seed": ["-1", str(2**40)],
    "--device": ["gpu7"],
}


@pytest.mark.parametrize("option", list(BAD_VALUES))
def test_a_bad_number_is_one_line_naming_the_option(tiny, tmp_path, capsys, option):  # noqa: F811
    for value in BAD_VALUES[option]:
        out = tmp_path / f"run{value}"
        rc = _run(_train(tiny, out, option, value, steps=option != "--epochs"))
        line = _one_line(capsys)
        assert rc == 2, (value, line)
        assert option in line and value in line, line
        assert not out.exists(), value


def test_nan_method_options_name_the_option_not_the_learning_rate(tiny, tmp_path, capsys):  # noqa: F811
    for item in ("alpha=nan", "alpha=NaN", "dropout=nan", "dropout=NaN", "mpc_weight=NaN", "alpha=Infinity"):
        out = tmp_path / item
        rc = _run(_train(tiny, out, "--set", item))
        line = _one_line(capsys)
        assert rc == 2, (item, line)
        assert item.split("=")[0] in line and "learning rate" not in line and "--lr" not in line, line
        assert not out.exists()


def test_load_best_at_end_needs_eval_every(tiny, tmp_path, capsys):  # noqa: F811
    """Without --eval-every nothing is evaluated on dev, so there is no best adapter to end with."""
    assert _run(_train(tiny, tmp_path / "r", "--load-best-at-end")) == 2
    assert "--eval-every" in _one_line(capsys)
    assert not (tmp_path / "r").exists()


def test_set_without_a_value_is_a_usage_error(tiny, tmp_path, capsys):  # noqa: F811
    assert _run(_train(tiny, tmp_path / "r", "--set", "r")) == 2
    assert "--set" in _one_line(capsys)


@pytest.mark.parametrize("content", [None, "{\"method\": \"lora\", ", "[1, 2]", "{\"grad_accum\": \"2\"}"])
def test_a_bad_spec_file(tiny, tmp_path, capsys, content):  # noqa: F811
    spec = tmp_path / "spec.json"
    if content is not None:
        spec.write_text(content)
    assert _run(_train(tiny, tmp_path / "run", "--spec", str(spec))) == 2
    assert "--spec" in _one_line(capsys)
    assert not (tmp_path / "run").exists()


def test_out_that_is_a_file(tiny, tmp_path, capsys):  # noqa: F811
    f = tmp_path / "file"
    f.write_text("not a folder")
    assert _run(_train(tiny, f)) == 2
    assert "--out" in _one_line(capsys)
    assert f.read_text() == "not a folder"


def test_data_that_is_a_folder(tiny, tmp_path, capsys):  # noqa: F811
    assert _run(_train(tiny, tmp_path / "run", "--data", str(tmp_path))) == 2
    line = _one_line(capsys)
    assert "--data" in line and "folder" in line and "does not exist" not in line


def test_non_utf8_jsonl_and_a_huge_csv_field(tiny, tmp_path, capsys):  # noqa: F811
    assert _run(_train(tiny, tmp_path / "a", "--data", str(_non_utf8(tmp_path)))) == 2
    line = _one_line(capsys)
    assert "UTF-8" in line and "line 8" in line
    big = tmp_path / "big.csv"
    big.write_text('text,label\n"' + "x" * 200_000 + '",a\n' + "y,b\n" * 40)
    assert _run(_train(tiny, tmp_path / "b", "--data", str(big))) == 2
    line = _one_line(capsys)
    assert "big.csv" in line and "line 2" in line and "131072" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_truncated_run_files_on_resume_and_eval(finished, tmp_path, capsys):
    r1 = tmp_path / "r1"
    shutil.copytree(finished, r1)
    (r1 / "run.json").write_text((finished / "run.json").read_text()[:40])
    assert _run(["train", "--out", str(r1), "--resume", "--quiet"]) == 2
    assert "run.json" in _one_line(capsys)
    assert _run(["eval", "--adapter", str(r1)]) == 2
    assert "run.json" in _one_line(capsys, "eval")

    r2 = tmp_path / "r2"
    shutil.copytree(finished, r2)
    state = r2 / "checkpoints" / "last" / "trainer_state.json"
    state.write_text(state.read_text()[:50])
    assert _run(["train", "--out", str(r2), "--resume", "--quiet"]) == 2
    assert "trainer_state.json" in _one_line(capsys)
    assert (r2 / "metrics.json").read_bytes() == (finished / "metrics.json").read_bytes()
    assert (r2 / "run.json").read_bytes() == (finished / "run.json").read_bytes()


def test_eval_options(finished, tmp_path, capsys):
    assert _run(["eval", "--adapter", str(finished), "--json", str(tmp_path)]) == 2
    assert "--json" in _one_line(capsys, "eval")
    assert _run(["eval", "--adapter", str(finished), "--threads", "-1"]) == 2
    assert "--threads" in _one_line(capsys, "eval")


class NotWeights:
    pass


def test_analyze_errors_are_usage_errors(tmp_path, capsys):
    import subpeft as sp

    from .test_cli_analyze import BASE, seeded_mlp

    sp.attach(seeded_mlp(), sp.LoRA(r=1, targets=["fc1"])).save_pretrained(tmp_path / "adapter")
    with open(tmp_path / "ref.pt", "wb") as f:
        pickle.dump({"fc1.weight": NotWeights()}, f, protocol=2)
    assert _run(["analyze", str(tmp_path / "adapter"), "--base", BASE, "--reference", str(tmp_path / "ref.pt")]) == 2
    assert "--reference" in _one_line(capsys, "analyze")
    assert _run(["analyze", str(tmp_path), "--base", BASE]) == 2
    assert "not an adapter directory" in _one_line(capsys, "analyze")
    assert _run(["analyze", str(tmp_path / "adapter"), "--base", "nonsense"]) == 2
    assert "--base" in _one_line(capsys, "analyze")
    assert _run(["analyze", str(tmp_path / "adapter"), "--base", "no_such_module_xyz:f"]) == 2
    assert "--base" in _one_line(capsys, "analyze")
    (tmp_path / "file").write_text("x")
    assert _run(["analyze", str(tmp_path / "adapter"), "--base", BASE, "--out", str(tmp_path / "file")]) == 2
    assert "--out" in _one_line(capsys, "analyze")


def test_compare_options(tiny, tmp_path, capsys):  # noqa: F811
    base = ["compare", "--model", str(tiny["bert"]), "--data", str(tiny["csv"]), "--methods", "lora", "--in-process",
            "--max-steps", "2", "--batch-size", "8", "--quiet"]
    for extra, option in ((["--seeds", "0"], "--seeds"), (["--seed-list", "1,x"], "--seed-list"),
                          (["--lr", "nan"], "--lr"), (["--threads", "0"], "--threads"),
                          (["--max-grad-norm", "-1"], "--max-grad-norm"), (["--methods", ""], "--methods"),
                          (["--set", "lora.alpha=nan"], "alpha")):
        out = tmp_path / "cmp"
        assert _run([*base, "--out", str(out), *extra]) == 2, extra
        assert option in _one_line(capsys, "compare")
        assert not out.exists(), extra
    # an existing comparison is only replaced with --overwrite (or continued with --resume)
    out = tmp_path / "old"
    out.mkdir()
    (out / "results.md").write_text("old results")
    assert _run([*base, "--out", str(out)]) == 2
    line = _one_line(capsys, "compare")
    assert "--overwrite" in line and "--resume" in line
    assert (out / "results.md").read_text() == "old results"


def test_usage_errors_exit_2_in_one_line_and_help_lists_exit_codes(capsys):
    assert _run(["train", "--epochs", "many"]) == 2
    line = _one_line(capsys)
    assert "--epochs" in line and "many" in line
    assert _run(["--help"]) == 0
    text = capsys.readouterr().out
    assert "exit status" in text and "130" in text and "2 " in text
