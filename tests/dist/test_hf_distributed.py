"""SubpeftTrainer (the HF Trainer integration) with 2 local gloo processes on CPU, launched with
``python -m torch.distributed.run``; each test runs tests/dist/hf_worker.py and reads what it wrote.

* DDP: LoRA, AdaLoRA (its allocator reads the all-reduced gradients) and LoRA-Dash (its Δσ sits out of the
  forward until the phase switch) end with bit-identical adapters on both ranks, equal to one process with the
  doubled batch (to 1e-5), even with ``ddp_broadcast_buffers=False`` (so ranks are not merely overwritten
  with rank 0's masks and directions); the adapter files are written by rank 0 only, once per save, and
  hold exactly rank 0's live adapter; ``resume_from_checkpoint`` continues to the same adapter.
* ``ddp_find_unused_parameters=False`` trains AdaLoRA, and stops LoRA-Dash with an error that names the fix;
  a base model whose forward takes no ``**kwargs`` gets no loss scaling (exact under Trainer's defaults,
  with gradient accumulation).
* FSDP2 (accelerate's ``fully_shard`` path; on CPU the worker has to put accelerate's dropped FSDP plugin
  back, see ``force_fsdp_on_cpu``): the base is sharded, the trainable tensors stay whole; LoRA, AdaLoRA and
  LoRA-Dash equal one process (also with gradient accumulation and clipping), save the whole adapter once and
  resume from it.
* DeepSpeed ZeRO-2 and ZeRO-3 (every parameter partitioned), where ``deepspeed`` imports (it is not a
  dependency; on CPU the worker gives accelerate the gloo back-end, see ``force_deepspeed_on_cpu``): the same
  for LoRA; AdaLoRA and LoRA-Dash under ZeRO-2 (their step hooks get the gradients DeepSpeed keeps), and a clear
  error for them under ZeRO-3.

The one-process comparison uses ``average_tokens_across_devices=False``: with the default (True), Trainer
multiplies each rank's loss by the number of processes for models whose ``forward`` takes ``**kwargs`` (it
assumes the loss was divided by the global item count ``num_items_in_batch``); BERT's classification loss
is a mean over the local batch and ignores it, so the DDP gradient is 2x the one-process gradient (the same
happens with a plain BERT and a plain Trainer). A base model whose forward takes no ``**kwargs``, or that
declares ``accepts_loss_kwargs = False``, is exact under the defaults.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

pytestmark = pytest.mark.dist

WORKER = Path(__file__).with_name("hf_worker.py")
ROOT = WORKER.parents[2]
METHODS = ["lora", "adalora", "lora_dash"]
EXACT = '{"average_tokens_across_devices": false}'


def _launch(out: Path, *worker_args: str, nproc: int = 2, timeout: int = 150) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("ACCELERATE_USE_FSDP", None)
    env.pop("ACCELERATE_USE_DEEPSPEED", None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = [*(launcher if nproc > 1 else [sys.executable]), str(WORKER), "--out", str(out), *worker_args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process with batch 8 and 2 DDP processes with batch 4 each (same global batch), 6 steps, a
    checkpoint every 3, each of LoRA, AdaLoRA and LoRA-Dash; DDP without buffer broadcasts."""
    root = tmp_path_factory.mktemp("hf_dist")
    common = ["--methods", ",".join(METHODS), "--steps", "6", "--save-steps", "3", "--args", EXACT]
    _ok(_launch(root / "single", *common, "--batch", "8", nproc=1))
    _ok(_launch(root / "ddp", *common, "--batch", "4", "--broadcast-buffers", "0"))
    return root


@pytest.mark.parametrize("name", METHODS)
def test_ddp_equals_one_process_and_rank0_writes_once(runs, name):
    single = load_file(runs / "single" / name / "live-0.safetensors")
    rank0 = load_file(runs / "ddp" / name / "live-0.safetensors")
    rank1 = load_file(runs / "ddp" / name / "live-1.safetensors")
    _assert_equal(rank0, rank1)  # identical decisions (AdaLoRA masks, LoRA-Dash directions) on both ranks
    _assert_close(rank0, single, atol=1e-5)
    moved = max(float((rank0[k] - load_file(runs / "ddp" / name / "trainer" / "checkpoint-3" /
                                            "adapter_model.safetensors")[k]).abs().max())
                for k in rank0 if rank0[k].is_floating_point())
    assert moved > 1e-4, "the adapter must have trained between the checkpoint and the end"
    _assert_equal(load_file(runs / "ddp" / name / "trainer" / "adapter_model.safetensors"), rank0)
    writes = [json.loads((runs / "ddp" / name / f"writes-{r}.json").read_text()) for r in (0, 1)]
    assert writes == [["trainer/checkpoint-3", "trainer/checkpoint-6", "trainer"], []]
    if name == "adalora":  # the budget ran: target_r=1 triplet per layer on average, allocated globally
        kept = [int(torch.count_nonzero(v)) for k, v in rank0.items() if k.endswith("lora_E")]
        assert sum(kept) == len(kept) and len(set(kept)) > 1, kept
    if name == "lora_dash":  # switched phase, and Δσ trained (all-reduced) after the switch
        assert all(int(v) == 1 for k, v in rank0.items() if k.endswith("dash_phase"))
        assert all(float(v.abs().max()) > 0 for k, v in rank0.items() if k.endswith("dash_sigma"))


def test_ddp_resume_from_checkpoint(runs, tmp_path):
    _ok(_launch(tmp_path, "--methods", ",".join(METHODS), "--steps", "6", "--save-steps", "3", "--args", EXACT,
                "--batch", "4", "--broadcast-buffers", "0", "--resume", str(runs / "ddp")))
    for name in METHODS:
        full = load_file(runs / "ddp" / name / "live-0.safetensors")
        for rank in (0, 1):
            _assert_close(load_file(tmp_path / name / f"live-{rank}.safetensors"), full, atol=1e-6)
        writes = [json.loads((tmp_path / name / f"writes-{r}.json").read_text()) for r in (0, 1)]
        assert writes == [["trainer/checkpoint-6", "trainer"], []]


def test_default_arguments_and_unused_parameters(runs, tmp_path):
    """Trainer's defaults otherwise (buffers broadcast, tokens averaged across devices) with
    ``ddp_find_unused_parameters=False``. AdaLoRA (every parameter in every forward; its orthogonality term in
    the loss) on a BERT whose ``forward`` takes no ``**kwargs`` (so no ``num_items_in_batch``): SubpeftTrainer
    asks the base model whether it takes loss kwargs (the TunedModel's own forward takes ``**kwargs``), so
    Trainer does not multiply the loss by the number of processes (nor leave it undivided by the accumulation
    steps): with batch 2 and 2 accumulation steps per process (the allocator reads the gradients all-reduced
    after the last micro-batch), the result equals one process with batch 8. LoRA-Dash, whose Δσ sits out of the forward before its switch, stops
    with an error that names the fix."""
    proc = _launch(tmp_path, "--methods", "adalora,lora_dash", "--steps", "6", "--batch", "2", "--find-unused", "0",
                   "--explicit-forward", "--args", '{"gradient_accumulation_steps": 2}')
    assert (tmp_path / "adalora" / "live-1.safetensors").is_file(), proc.stderr[-4000:]
    rank0 = load_file(tmp_path / "adalora" / "live-0.safetensors")
    _assert_equal(rank0, load_file(tmp_path / "adalora" / "live-1.safetensors"))
    _assert_close(rank0, load_file(runs / "single" / "adalora" / "live-0.safetensors"), atol=1e-5)
    _assert_equal(load_file(tmp_path / "adalora" / "trainer" / "adapter_model.safetensors"), rank0)
    assert proc.returncode != 0
    assert not (tmp_path / "lora_dash" / "live-0.safetensors").exists()
    assert "ddp_find_unused_parameters=True" in proc.stderr and "LoRA-Dash" in proc.stderr, proc.stderr[-4000:]


def test_fsdp2_saves_the_whole_adapter_once_and_resumes(runs, tmp_path):
    """accelerate's FSDP2 shards the frozen base only: SubpeftTrainer keeps the trainable tensors whole on every
    rank (ignored by ``fully_shard``) and averages their gradients itself, so AdaLoRA's budget and orthogonality
    term and LoRA-Dash's switch (which reads the sharded W) run as under DDP, and equal one process."""
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    common = ["--methods", ",".join(METHODS), "--fsdp", "--steps", "6", "--save-steps", "3", "--batch", "4",
              "--args", EXACT]
    _ok(_launch(first, *common))
    for name in METHODS:
        assert (first / name / "trainer" / "checkpoint-3" / "pytorch_model_fsdp.bin").is_file(), "FSDP did not run"
        layout = json.loads((first / name / "layout-0.json").read_text())
        assert layout["sharded_frozen"] > 0 and layout["sharded_trainable"] == 0 and layout["whole_trainable"] > 0
        rank0 = load_file(first / name / "live-0.safetensors")
        _assert_equal(rank0, load_file(first / name / "live-1.safetensors"))
        _assert_close(rank0, load_file(runs / "single" / name / "live-0.safetensors"), atol=1e-5)
        saved = load_file(first / name / "trainer" / "adapter_model.safetensors")
        _assert_equal(saved, rank0)  # whole tensors (the shapes of one process), not one rank's shard
        writes = [json.loads((first / name / f"writes-{r}.json").read_text()) for r in (0, 1)]
        assert writes == [["trainer/checkpoint-3", "trainer/checkpoint-6", "trainer"], []]
        if name == "lora_dash":
            assert all(int(v) == 1 for k, v in rank0.items() if k.endswith("dash_phase"))
    _ok(_launch(resumed, *common, "--resume", str(first)))
    for name in METHODS:
        _assert_close(load_file(resumed / name / "live-0.safetensors"),
                      load_file(first / name / "live-0.safetensors"), atol=1e-6)


def test_fsdp2_cpu_ram_efficient_loading_keeps_the_trainable_tensors_whole(runs, tmp_path):
    """With ``cpu_ram_efficient_loading`` accelerate moves the model to the meta device before sharding, which
    replaces its Parameter objects: the trainable tensors are named to accelerate, not held, so they stay whole."""
    config = ('{"average_tokens_across_devices": false, "fsdp_config": {"version": 2, "reshard_after_forward": true, '
              '"transformer_layer_cls_to_wrap": ["BertLayer"], "cpu_ram_efficient_loading": true}}')
    _ok(_launch(tmp_path, "--methods", "adalora,lora_dash", "--fsdp", "--steps", "6", "--batch", "4", "--args", config))
    for name in ("adalora", "lora_dash"):
        layout = json.loads((tmp_path / name / "layout-0.json").read_text())
        assert layout["sharded_frozen"] > 0 and layout["sharded_trainable"] == 0
        _assert_close(load_file(tmp_path / name / "live-0.safetensors"),
                      load_file(runs / "single" / name / "live-0.safetensors"), atol=1e-5)


def test_fsdp2_accumulation_and_clipping_equal_one_process(tmp_path):
    """The whole tensors' gradients are averaged once per optimizer step, after the accumulation's last
    micro-batch and before clipping (Trainer clips DTensor and plain gradients together): 2 processes x batch 2
    x 2 accumulation steps with clipping equal one process with batch 8 (a base model whose forward takes no
    ``**kwargs``, so Trainer's loss scaling is exact; see test_default_arguments_and_unused_parameters)."""
    clip = '{"max_grad_norm": 0.05%s}'
    _ok(_launch(tmp_path / "single", "--methods", ",".join(METHODS), "--steps", "6", "--batch", "8",
                "--explicit-forward", "--args", clip % "", nproc=1))
    _ok(_launch(tmp_path / "fsdp", "--methods", ",".join(METHODS), "--fsdp", "--steps", "6", "--batch", "2",
                "--explicit-forward", "--args", clip % ', "gradient_accumulation_steps": 2'))
    _ok(_launch(tmp_path / "unclipped", "--methods", "lora", "--steps", "6", "--batch", "8", "--explicit-forward",
                nproc=1))
    for name in METHODS:
        _assert_close(load_file(tmp_path / "fsdp" / name / "live-0.safetensors"),
                      load_file(tmp_path / "single" / name / "live-0.safetensors"), atol=1e-6)
    clipped, unclipped = (load_file(tmp_path / d / "lora" / "live-0.safetensors") for d in ("single", "unclipped"))
    assert max(float((clipped[k] - unclipped[k]).abs().max()) for k in clipped) > 1e-3, "clipping must bite"


def _deepspeed_config(path: Path, stage: int) -> Path:
    zero: dict = {"stage": stage}
    if stage == 3:  # partition every parameter (by default ZeRO-3 keeps tensors under 1e5 elements whole)
        zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=False)
    config = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
              "gradient_clipping": "auto", "zero_optimization": zero, "zero_allow_untested_optimizer": True,
              "zero_force_ds_cpu_optimizer": False, "fp16": {"enabled": False}, "bf16": {"enabled": False}}
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_saves_the_whole_adapter_once(runs, tmp_path, stage):
    pytest.importorskip("deepspeed")
    config = _deepspeed_config(tmp_path / "ds.json", stage)
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    common = ["--methods", "lora", "--deepspeed", str(config), "--steps", "6", "--save-steps", "3", "--batch", "4",
              "--args", EXACT]
    _ok(_launch(first, *common, timeout=240))
    assert (first / "lora" / "trainer" / "checkpoint-3" / "global_step3").is_dir(), "DeepSpeed did not run"
    rank0 = load_file(first / "lora" / "live-0.safetensors")
    _assert_equal(rank0, load_file(first / "lora" / "live-1.safetensors"))
    _assert_close(rank0, load_file(runs / "single" / "lora" / "live-0.safetensors"), atol=1e-5)
    _assert_equal(load_file(first / "lora" / "trainer" / "adapter_model.safetensors"), rank0)
    writes = [json.loads((first / "lora" / f"writes-{r}.json").read_text()) for r in (0, 1)]
    assert writes == [["trainer/checkpoint-3", "trainer/checkpoint-6", "trainer"], []]
    if stage == 3:
        _ok(_launch(resumed, *common, "--resume", str(first), timeout=240))
        _assert_close(load_file(resumed / "lora" / "live-0.safetensors"), rank0, atol=1e-6)


def test_deepspeed_zero2_runs_the_step_hooks(runs, tmp_path):
    """ZeRO-2: the engine's step clears the gradients and keeps the fp32 weights in its partitions, so
    SubpeftTrainer takes the full gradients before the engine's step, hands them to the step hook, and writes
    what the hook changed (AdaLoRA's masks) into the partitions. AdaLoRA then equals one process; LoRA-Dash equals
    one process whose Δσ gets zero gradients before its switch, as DeepSpeed's flat optimizer gives it (its Adam
    step count then runs from the first step, which moves Δσ by ~7e-3 against torch's AdamW)."""
    pytest.importorskip("deepspeed")
    config = _deepspeed_config(tmp_path / "ds.json", 2)
    _ok(_launch(tmp_path / "ds", "--methods", "adalora,lora_dash", "--deepspeed", str(config), "--steps", "6",
                "--batch", "4", "--args", EXACT, timeout=240))
    _ok(_launch(tmp_path / "idle", "--methods", "lora_dash", "--idle-zero-grads", "--steps", "6", "--batch", "8",
                "--args", EXACT, nproc=1))
    for name, reference in (("adalora", runs / "single"), ("lora_dash", tmp_path / "idle")):
        rank0 = load_file(tmp_path / "ds" / name / "live-0.safetensors")
        _assert_equal(rank0, load_file(tmp_path / "ds" / name / "live-1.safetensors"))
        _assert_close(rank0, load_file(reference / name / "live-0.safetensors"), atol=1e-5)
    kept = [int(torch.count_nonzero(v)) for k, v in load_file(tmp_path / "ds" / "adalora" / "live-0.safetensors").items()
            if k.endswith("lora_E")]
    assert sum(kept) == len(kept) and len(set(kept)) > 1, kept  # the budget ran, and its masks held
    dash = load_file(tmp_path / "ds" / "lora_dash" / "live-0.safetensors")
    torch_adamw = load_file(runs / "single" / "lora_dash" / "live-0.safetensors")
    assert max(float((dash[k] - torch_adamw[k]).abs().max()) for k in dash) > 1e-3  # the step count does matter
    # with clipping: the allocator reads the gradients as the engine clipped them, as Trainer's clipping does
    clip = '{"average_tokens_across_devices": false, "max_grad_norm": 0.05}'
    _ok(_launch(tmp_path / "ds_clip", "--methods", "adalora", "--deepspeed", str(config), "--steps", "6", "--batch",
                "4", "--args", clip, timeout=240))
    _ok(_launch(tmp_path / "clip", "--methods", "adalora", "--steps", "6", "--batch", "8", "--args", clip, nproc=1))
    clipped = load_file(tmp_path / "clip" / "adalora" / "live-0.safetensors")
    _assert_close(load_file(tmp_path / "ds_clip" / "adalora" / "live-0.safetensors"), clipped, atol=1e-5)
    unclipped = load_file(runs / "single" / "adalora" / "live-0.safetensors")
    assert max(float((clipped[k].double() - unclipped[k].double()).abs().max()) for k in clipped) > 1e-3


def test_deepspeed_zero3_refuses_methods_with_hooks(tmp_path):
    pytest.importorskip("deepspeed")
    config = _deepspeed_config(tmp_path / "ds.json", 3)
    for name in ("adalora", "lora_dash"):
        proc = _launch(tmp_path, "--methods", name, "--deepspeed", str(config), "--steps", "4", "--batch", "4",
                       timeout=240)
        assert proc.returncode != 0 and not (tmp_path / name / "live-0.safetensors").exists()
        assert f"{name} under DeepSpeed ZeRO-3" in proc.stderr and '"stage": 2' in proc.stderr, proc.stderr[-3000:]
