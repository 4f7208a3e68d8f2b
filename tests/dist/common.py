"""What the dist tier's tests share: launching a worker in 2 processes (torchrun, gloo) or in 1, and reading
what it wrote."""

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
