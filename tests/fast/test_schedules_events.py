"""Method schedules given as a fraction of the run (resolved to steps, recorded), and the methods' phase
events (LoRA-Dash's switch, AdaLoRA's final budget, Diff pruning's finalize) in train.log and metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import subpeft as sp
from subpeft.cli import main
from subpeft.methods import drain_events as drain
from subpeft.methods import resolve_steps

from .test_train_cli import make_tiny_folders


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return make_tiny_folders(tmp_path_factory.mktemp("tiny_sched"))


def _train(tiny, out: Path, method: str, steps: int, *sets: str) -> dict:
    argv = ["train", "--model", str(tiny["bert"]), "--data", str(tiny["csv"]), "--batch-size", "8", "--out", str(out),
            "--quiet", "--max-steps", str(steps), "--method", method, "--lr", "1e-2"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    return json.loads((out / "metrics.json").read_text())


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


# -- schedules: steps or a fraction ------------------------------------------------------------------

def test_resolve_steps_rounds_the_written_decimal_half_up():
    assert resolve_steps(0.5, 12) == 6 and resolve_steps(0.1, 25) == 3 and resolve_steps(0.1, 24) == 2
    assert resolve_steps(0.3, 10) == 3  # 0.3·10 is 3.0000000000000004 in binary floats: still 3
    assert resolve_steps(7, 12) == 7 and resolve_steps(0.01, 10, minimum=1) == 1


@pytest.mark.parametrize("bad", [1.5, 1.0, 2.0, -1, -0.5, "0.5"])
def test_a_step_option_is_steps_or_a_fraction_else_one_clear_error(bad):
    with pytest.raises(sp.ConfigError, match=r"LoRADash\.prelaunch_steps must be an integer >= 1 .* fraction in \(0, 1\)"):
        sp.LoRADash(prelaunch_steps=bad)
    if bad != -0.5:
        with pytest.raises(sp.ConfigError, match=r"AdaLoRA\.init_warmup"):
            sp.AdaLoRA(init_warmup=bad, total_steps=100)
    with pytest.raises(sp.ConfigError, match="prelaunch_steps"):
        sp.LoRADash(prelaunch_steps=0)  # at least one step of LoRA before choosing directions
    with pytest.raises(sp.ConfigError, match="prelaunch_steps"):
        sp.LoRADash(prelaunch_steps=True)


def test_lora_dash_fraction_and_default_resolve_against_the_run():
    assert sp.LoRADash(prelaunch_steps=0.5).resolve_schedule(12).prelaunch_steps == 6
    assert sp.LoRADash(prelaunch_steps=0.001).resolve_schedule(12).prelaunch_steps == 1  # at least one step
    assert sp.LoRADash(prelaunch_steps=40).resolve_schedule(12).prelaunch_steps == 40  # ints are steps, as before
    default = sp.LoRADash()
    assert default.prelaunch_steps is None
    # the paper's 100 steps on long runs, 10% of a short one, 100 when the run length is unknown
    assert [default.resolve_schedule(t).prelaunch_steps for t in (32_000, 1000, 999, 300, 12, 4)] == [100, 100, 100, 30, 1, 1]
    assert default.resolve_schedule(None).prelaunch_steps == 100


def test_plain_attach_records_steps_and_refuses_an_unresolved_fraction():
    tuned = sp.attach(_mlp(), sp.LoRADash(r=2, directions=2, targets=["0"]))
    assert tuned.configs["default"].prelaunch_steps == 100  # the default, resolved and saved as steps
    with pytest.raises(sp.ConfigError, match=r"prelaunch_steps=0\.5 is a fraction .*resolve_schedule"):
        sp.attach(_mlp(), sp.LoRADash(r=2, prelaunch_steps=0.5, targets=["0"]))
    resolved = sp.LoRADash(r=2, prelaunch_steps=0.5, targets=["0"]).resolve_schedule(40)
    assert sp.attach(_mlp(), resolved).configs["default"].prelaunch_steps == 20


def test_adalora_warmups_as_fractions_of_total_steps():
    cfg = sp.AdaLoRA(r=4, target_r=2, total_steps=40, init_warmup=0.1, final_warmup=0.25, targets=["0", "2"])
    as_steps = cfg.replace(init_warmup=4, final_warmup=10)
    assert [cfg.budget(2, t) for t in range(45)] == [as_steps.budget(2, t) for t in range(45)]
    tuned = sp.attach(_mlp(), cfg)
    saved = tuned.configs["default"]
    assert (saved.init_warmup, saved.final_warmup, saved.total_steps) == (4, 10, 40)
    assert cfg.to_peft_dict({"linear"})["tinit"] == 4 and cfg.to_peft_dict({"linear"})["tfinal"] == 10
    with pytest.raises(sp.ConfigError, match="no steps to shrink the budget.*init_warmup=0.6"):
        sp.AdaLoRA(total_steps=10, init_warmup=0.6, final_warmup=0.5)
    with pytest.raises(sp.ConfigError, match="must be < 1"):
        sp.AdaLoRA(init_warmup=0.6, final_warmup=0.5)  # without total_steps: the fractions alone leave nothing
    # total_steps None takes the run's length
    run = sp.AdaLoRA(init_warmup=0.5).resolve_schedule(30)
    assert (run.total_steps, run.init_warmup, run.final_warmup) == (30, 15, 0)


def test_json_keeps_the_kind_of_number():
    cfg = sp.LoRADash(prelaunch_steps=0.25, targets=["q"])
    back = sp.config_from_dict(json.loads(cfg.to_json()))
    assert back.prelaunch_steps == 0.25 and isinstance(back.prelaunch_steps, float)
    with pytest.raises(sp.ConfigError, match="prelaunch_steps"):
        sp.config_from_dict({**json.loads(cfg.to_json()), "prelaunch_steps": 1.0})


# -- runs: resolution recorded, events in train.log and metrics.json --------------------------------

def test_lora_dash_run_resolves_the_fraction_and_reports_the_switch(tiny, tmp_path):
    out = tmp_path / "dash"
    m = _train(tiny, out, "lora_dash", 12, "prelaunch_steps=0.5", "directions=2")
    assert m["schedule"] == {"run_steps": 12, "prelaunch_steps": {"given": 0.5, "steps": 6}}
    assert m["config"]["prelaunch_steps"] == 6
    assert json.loads((out / "adapter_config.json").read_text())["prelaunch_steps"] == 6
    (event,) = m["events"]
    assert event["event"] == "dash_phase" and event["step"] == 6 and event["method"] == "lora_dash"
    assert event["layers"] == 4 and set(event["directions"]) == {
        f"bert.encoder.layer.{i}.attention.self.{w}" for i in (0, 1) for w in ("query", "value")}
    assert all(len(v) == 2 and len(set(v)) == 2 and all(0 <= i < 16 for i in v) for v in event["directions"].values())
    log = (out / "train.log").read_text()
    assert "step 6: lora_dash dash_phase: dash phase from step 6: 2 directions in each of 4 layers" in log
    assert "method schedule: prelaunch_steps 6 (given 0.5) of 12 optimizer steps" in log


def test_adalora_run_reports_its_final_budget(tiny, tmp_path):
    out = tmp_path / "ada"
    m = _train(tiny, out, "adalora", 12, "r=4", "target_r=2", "init_warmup=0.25", "final_warmup=0.25")
    assert m["schedule"]["init_warmup"] == {"given": 0.25, "steps": 3}
    assert m["schedule"]["total_steps"] == {"given": None, "steps": 12}
    (event,) = m["events"]
    assert event["event"] == "final_budget" and event["step"] == 12 - 3  # T_f = total_steps - final_warmup
    assert sum(event["ranks"].values()) == event["kept"] == 2 * 4 and event["initial"] == 16
    assert "step 9: adalora final_budget: final budget from step 9: 8 of 16 triplets" in (out / "train.log").read_text()


def test_diff_pruning_run_reports_finalize(tiny, tmp_path):
    out = tmp_path / "diff"
    m = _train(tiny, out, "diff_pruning", 5, "budget=0.1")
    (event,) = m["events"]
    assert event["event"] == "finalize" and event["step"] == 5
    assert event["entries"] == 4 * 16 * 16 and event["kept_total"] == 4 * 26  # ⌈0.1·256⌉ per layer
    assert event["sparsity"] == pytest.approx(1 - 104 / 1024)
    assert "step 5: diff_pruning finalize: kept 104 of 1,024 entries" in (out / "train.log").read_text()


def test_no_events_for_a_method_without_phases(tiny, tmp_path):
    m = _train(tiny, tmp_path / "lora", "lora", 3)
    assert m["events"] == [] and "schedule" not in m


def test_events_wait_for_a_loop_of_ones_own():
    model = _mlp()
    tuned = sp.attach(model, sp.LoRADash(r=2, directions=2, prelaunch_steps=2, targets=["0", "2"]))
    opt = torch.optim.SGD([p for p in tuned.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(16, 8)
    for step in range(1, 4):
        tuned(x).pow(2).sum().backward()
        opt.step()
        tuned.step(step)
        opt.zero_grad()
        events = drain(tuned)
        assert [e["step"] for e in events] == ([2] if step == 2 else []), step
    assert drain(tuned) == []


# -- "barely moved" ------------------------------------------------------------------------------------

def test_movement_is_the_relative_weight_change_and_flags_a_run_that_did_not_move(tiny, tmp_path):
    import subpeft as sp_

    m = _train(tiny, tmp_path / "moved", "lora", 4, "r=2")
    mv = m["movement"]
    assert set(mv) == {"relative_delta", "barely_moved", "what"} and "‖ΔW‖_F / ‖W‖_F over the 4" in mv["what"]
    # the number is ‖ΔW‖ / ‖W‖ of the saved adapter, recomputed by hand
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny["bert"], num_labels=2)
    tuned = sp_.load(base, tmp_path / "moved")
    num = den = 0.0
    for _, a in tuned.adapters_of("default"):
        num += float((a.lora_B @ a.lora_A * a.scaling).pow(2).sum())
        den += float(a.base_layer.weight.pow(2).sum())
    assert mv["relative_delta"] == pytest.approx((num / den) ** 0.5, rel=1e-5)
    assert mv["relative_delta"] > 1e-3 and mv["barely_moved"] is False
    argv = ["train", "--model", str(tiny["bert"]), "--data", str(tiny["csv"]), "--batch-size", "8", "--quiet",
            "--out", str(tmp_path / "still"), "--max-steps", "2", "--lr", "1e-10", "--set", "r=2"]
    assert main(argv) == 0
    mv = json.loads((tmp_path / "still" / "metrics.json").read_text())["movement"]
    assert mv["barely_moved"] is True and 0 < mv["relative_delta"] < 1e-4
    assert "warning: the weights barely moved" in (tmp_path / "still" / "train.log").read_text()
    assert "barely moved" not in (tmp_path / "moved" / "train.log").read_text()


def test_movement_without_a_weight_delta_uses_the_trained_tensors(tiny, tmp_path):
    m = _train(tiny, tmp_path / "pa", "parallel_adapter", 3)
    assert "‖θ − θ₀‖ / ‖θ₀‖" in m["movement"]["what"] and m["movement"]["relative_delta"] > 0
    m = _train(tiny, tmp_path / "untrained", "untrained", 1)
    assert "movement" not in m and "does not train" in m["movement_note"]


@pytest.mark.parametrize("config", [
    sp.LoRADash(r=2, directions=2, prelaunch_steps=2, targets=["0", "2"]),
    sp.AdaLoRA(r=4, target_r=2, total_steps=6, init_warmup=1, final_warmup=2, targets=["0", "2"]),
], ids=["lora_dash", "adalora"])
def test_a_schedule_that_changes_or_reads_the_weights_refuses_to_step_while_merged(config):
    tuned = sp.attach(_mlp(), config)
    opt = torch.optim.SGD([p for p in tuned.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(16, 8)
    tuned.train()
    (tuned(x).pow(2).sum() + tuned.regularization()).backward()
    opt.step()
    tuned.step(1)
    opt.zero_grad()
    tuned.eval()
    with torch.no_grad():
        expected = tuned(x)
    tuned.merge()
    state = {k: v.clone() for k, v in tuned.state_dict().items()}
    with pytest.raises(sp.SubpeftError, match=r"adapter 'default' \(\w+\) is merged: .*call unmerge\(\) before step"):
        tuned.step(4)  # a step in a later phase: LoRA-Dash would switch, AdaLoRA would mask
    after = tuned.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())  # refused before anything changed
    with torch.no_grad():
        torch.testing.assert_close(tuned(x), expected)
    tuned.unmerge()
    unmerged = {k: v.clone() for k, v in tuned.state_dict().items()}
    tuned.step(4)  # unmerged, the schedule runs
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, unmerged[k])]
    assert changed, "the schedule changed nothing after unmerge()"


def test_a_merged_adapter_without_such_a_schedule_still_steps():
    tuned = sp.attach(_mlp(), sp.LoRA(r=2, targets=["0"]))
    tuned.merge()
    tuned.step(1)  # LoRA's step is a no-op: nothing to refuse
    assert tuned.merged_adapters == ["default"]
