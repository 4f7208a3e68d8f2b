"""`--resume` ends bit-identical to an uninterrupted run (CPU, same seed).

Each case trains N optimizer steps in one go, and N steps stopped after N/2 (the Ctrl-C path: the
step finishes, the checkpoint is written, TrainingInterrupted is raised) then resumed; every adapter
tensor (method state included) and the whole loss history must be equal with torch.equal / ==. The
runs cross an epoch boundary and accumulate gradients, LoRA has dropout (the RNG state must come back),
AdaLoRA's budget and importance EMAs, and LoRA-Dash's switch (before the stop for one case, after it for
the other) are schedule state.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from subpeft.train.run import RunSpec, train_run
from subpeft.train.trainer import TrainingInterrupted

from .test_train_cli import tiny  # noqa: F401 - the session fixture

N = 12

CASES = {
    "lora-dropout": ("lora", {"r": 4, "dropout": 0.2, "targets": "all-linear"}),
    "adalora": ("adalora", {"r": 4, "target_r": 2, "init_warmup": 2, "final_warmup": 2, "mask_interval": 2,
                            "targets": ["query", "value"]}),
    "lora_dash-switch-before-stop": ("lora_dash", {"r": 4, "prelaunch_steps": 3, "directions": 2,
                                                   "targets": ["query", "value"]}),
    "lora_dash-switch-after-stop": ("lora_dash", {"r": 4, "prelaunch_steps": 9, "directions": 2,
                                                  "targets": ["query", "value"]}),
    "lora_dash-fraction": ("lora_dash", {"r": 4, "prelaunch_steps": 0.75, "directions": 2,  # step 9 of 12
                                         "targets": ["query", "value"]}),
    "full": ("full", {}),
}


def _spec(tiny, method, options) -> RunSpec:  # noqa: F811
    # 160 training examples, 8 per micro-batch, 2 micro-batches per step: an epoch is 10 steps
    return RunSpec(method=method, options=options, model=str(tiny["bert"]), task=None, data=str(tiny["csv"]),
                   max_steps=N, batch_size=8, grad_accum=2, lr=5e-3, seed=3, save_every=0)


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if (directory / "adapter_model.safetensors").exists() else "trainable.safetensors"
    return load_file(str(directory / name))


def _history(directory: Path) -> dict:
    return json.loads((directory / "checkpoints" / "last" / "trainer_state.json").read_text())["state"]


@pytest.mark.parametrize("case", list(CASES))
def test_resume_is_bit_identical(tiny, tmp_path, case):  # noqa: F811
    method, options = CASES[case]
    whole = train_run(_spec(tiny, method, options), tmp_path / "whole", progress=False, echo=False)

    def stop_half_way(trainer, step):
        if step == N // 2:
            trainer.request_stop()

    with pytest.raises(TrainingInterrupted) as info:
        train_run(_spec(tiny, method, options), tmp_path / "cut", progress=False, echo=False, on_step=stop_half_way)
    assert info.value.step == N // 2 and Path(info.value.checkpoint) == tmp_path / "cut" / "checkpoints" / "last"
    assert not (tmp_path / "cut" / "metrics.json").exists()
    halfway = _tensors(tmp_path / "cut" / "checkpoints" / "last")
    resumed = train_run(_spec(tiny, method, options), tmp_path / "cut", resume=True, progress=False, echo=False)

    a, b = _tensors(tmp_path / "whole"), _tensors(tmp_path / "cut")
    assert a.keys() == b.keys()
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    assert not unequal, f"{len(unequal)} tensors differ after resuming, e.g. {unequal[:3]}"
    assert any(not torch.equal(a[k], halfway[k]) for k in a), "the second half must have changed the adapter"
    ha, hb = _history(tmp_path / "whole"), _history(tmp_path / "cut")
    for key in ("global_step", "micro", "losses", "regularization", "learning_rates", "events"):
        assert ha[key] == hb[key], key
    assert resumed["events"] == whole["events"]  # a phase event before the stop comes back with the checkpoint
    if method in ("lora_dash", "adalora"):
        steps = whole["schedule"]["prelaunch_steps" if method == "lora_dash" else "final_warmup"]["steps"]
        assert [e["step"] for e in whole["events"]] == [steps if method == "lora_dash" else N - steps]
        if case == "lora_dash-fraction":
            assert whole["schedule"]["prelaunch_steps"] == {"given": 0.75, "steps": 9}
    if "movement" in whole:  # a weight delta: measured from the adapter, the same after a resume
        assert resumed["movement"] == whole["movement"]
    assert ha["micro"] == 2 * N and ha["micro"] > 160 // 8  # crossed an epoch boundary
    assert resumed["test"] == whole["test"]
    if method == "adalora":
        # the allocator ran in both halves: the final budget (target_r per layer) is what was saved
        kept = [int(torch.count_nonzero(v)) for k, v in b.items() if k.endswith("lora_E")]
        assert sum(kept) == 2 * len(kept)
    if method == "lora_dash":
        phases = [int(v) for k, v in b.items() if k.endswith("dash_phase")]
        assert phases and all(p == 1 for p in phases)
        assert all(torch.count_nonzero(v) > 0 for k, v in b.items() if k.endswith("dash_sigma"))


def test_resume_refuses_changed_settings(tiny, tmp_path):  # noqa: F811
    from subpeft.train.trainer import ResumeError

    def stop(trainer, step):
        trainer.request_stop()

    spec = _spec(tiny, "lora", {"r": 2})
    with pytest.raises(TrainingInterrupted):
        train_run(spec, tmp_path / "run", progress=False, echo=False, on_step=stop)
    spec.lr = 1e-3
    with pytest.raises(ResumeError, match="lr: checkpoint 0.005, now 0.001"):
        train_run(spec, tmp_path / "run", resume=True, progress=False, echo=False)


def test_cli_resume_uses_the_saved_run(tiny, tmp_path, capsys):  # noqa: F811
    """`subpeft train --out DIR --resume` needs no other option; conflicting ones are refused."""
    from subpeft.cli import main

    def stop(trainer, step):
        if step == 2:
            trainer.request_stop()

    spec = _spec(tiny, "ia3", {})
    with pytest.raises(TrainingInterrupted):
        train_run(spec, tmp_path / "run", progress=False, echo=False, on_step=stop)
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--method", "lora", "--quiet"]) == 2
    assert "method: run 'ia3', now 'lora'" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--quiet"]) == 0
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["method"] == "ia3" and m["steps"] == N
    assert "resumed from" in (tmp_path / "run" / "train.log").read_text()


def test_ctrl_c_leaves_a_usable_checkpoint(tiny, tmp_path):  # noqa: F811
    """A real SIGINT: the step finishes, checkpoints/last is written (a loadable adapter), then the run stops;
    `subpeft eval` scores that checkpoint, and resuming completes the run."""
    import os
    import signal

    from subpeft.cli import main

    def interrupt(trainer, step):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as info:
        train_run(_spec(tiny, "lora", {"r": 2}), tmp_path / "run", progress=False, echo=False, on_step=interrupt)
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    assert info.value.step == 4
    last = tmp_path / "run" / "checkpoints" / "last"
    assert main(["eval", "--adapter", str(last), "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["test"]["examples"] == 19
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--quiet"]) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == N


def test_adamw_is_fused_and_a_checkpoint_keeps_its_choice(tiny, tmp_path, monkeypatch):  # noqa: F811
    """Runs use fused AdamW (recorded in the checkpoint's optimizer groups). A checkpoint written by the unfused
    loop (as every run before fused AdamW) resumes unfused: it ends bit-identical to an uninterrupted unfused run,
    which a fused second half would not (fused and unfused differ in the last bits)."""
    from subpeft.training import loop

    spec = _spec(tiny, "lora", CASES["lora-dropout"][1])
    fused = train_run(spec, tmp_path / "fused", progress=False, echo=False)
    saved = json.loads((tmp_path / "fused" / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert {g["fused"] for g in saved["optimizer"]["param_groups"]} == {True}

    monkeypatch.setattr(loop, "fused_adamw", lambda params: None)  # the loop before fused AdamW
    plain = train_run(spec, tmp_path / "plain", progress=False, echo=False)
    assert plain["test"] != fused["test"] or any(
        not torch.equal(a, b) for a, b in zip(_tensors(tmp_path / "plain").values(),
                                               _tensors(tmp_path / "fused").values(), strict=True))

    def stop_half_way(trainer, step):
        if step == N // 2:
            trainer.request_stop()

    with pytest.raises(TrainingInterrupted):
        train_run(spec, tmp_path / "cut", progress=False, echo=False, on_step=stop_half_way)
    monkeypatch.undo()  # resumed by today's loop, which would choose fused
    train_run(spec, tmp_path / "cut", resume=True, progress=False, echo=False)
    a, b = _tensors(tmp_path / "plain"), _tensors(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
