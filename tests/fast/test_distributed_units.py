"""What the distributed support does in one process, and the settings around it (the 2-process behaviour is the
dist tier's: tests/dist)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import subpeft as sp
from subpeft import distributed as spd
from subpeft.app.models import set_model_dropout
from subpeft.app.run import RunSpec, UsageError, stored_spec
from subpeft.cli import main

from .tiny_transformers import batch, tiny_bert, tiny_llama


def test_one_process_is_rank_0_of_1_and_the_collectives_are_no_ops():
    assert (spd.rank(), spd.world_size(), spd.is_main(), spd.launched()) == (0, 1, True, False)
    assert spd.all_reduce_sum([1.5, 2.0]) == [1.5, 2.0]
    assert spd.gather_objects({"a": 1}) == [{"a": 1}]
    tuned = sp.attach(tiny_bert(), sp.LoRA(r=2))
    spd.check_consistent(tuned)  # nothing to compare with
    spd.sync_gradients(tuned)
    with pytest.raises(RuntimeError, match="torchrun"):
        spd.wrap(tuned, "ddp")
    with pytest.raises(ValueError, match="ddp, fsdp"):
        spd.wrap(tuned, "zero")


def test_only_methods_with_idle_parameters_ask_ddp_to_find_them():
    assert spd.idle_parameters(sp.attach(tiny_bert(), sp.LoRADash(r=2, prelaunch_steps=3))) == ["lora_dash"]
    assert spd.idle_parameters(sp.attach(tiny_bert(), sp.LoRA(r=2))) == []
    assert spd.idle_parameters(sp.attach(tiny_bert(), sp.AdaLoRA(r=4, target_r=2, total_steps=10))) == []


def test_a_module_that_modules_to_save_trains_whole_gets_no_adapter():
    """BitFit on every bias with a fresh head: the head's copy trains whole (what the forward uses), so the head
    gets no bias offset of its own (it sat idle: DDP's reducer waited for its gradient, and it was saved)."""
    tuned = sp.attach(tiny_bert(), sp.BitFit(modules_to_save=["classifier"]))
    adapted = [name for name, _ in tuned.adapted_layers()]
    assert adapted and not any("classifier" in name for name in adapted)
    out = tuned(**batch(), labels=torch.tensor([0, 1, 2]))
    out.loss.backward()
    idle = [n for n, p in tuned.named_parameters() if p.requires_grad and p.grad is None]
    assert idle == []


def test_model_dropout_turns_every_dropout_of_the_base_off():
    for model in (tiny_bert(), tiny_llama(attention_dropout=0.3)):
        assert set_model_dropout(model, 0.0) > 0
        model.train()
        torch.manual_seed(1)
        a = model(**batch()).logits
        torch.manual_seed(2)
        b = model(**batch()).logits
        assert torch.equal(a, b)
    bert = tiny_bert()
    bert.train()
    torch.manual_seed(1)
    a = bert(**batch()).logits
    torch.manual_seed(2)
    assert not torch.equal(a, bert(**batch()).logits)  # the check above can fail: BERT's dropout is on by default


def test_generation_counts_answer_tokens():
    from subpeft.app.workloads import Generation

    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, 8, 9, 10]])
    assert Generation.loss_units(None, {"labels": labels}) == 6  # targets after the causal shift


@pytest.mark.parametrize("value,message", [
    ({"strategy": "deepspeed"}, "--strategy must be ddp or fsdp"),
    ({"model_dropout": 1.0}, "--model-dropout must be a dropout rate in [0, 1)"),
    ({"model_dropout": -0.1}, "--model-dropout must be a dropout rate"),
    ({"model_dropout": float("nan")}, "--model-dropout must be a dropout rate"),
    ({"processes": 0}, "'processes' (in the --spec/run.json file) must be an integer >= 1"),
])
def test_run_settings_of_several_processes_are_checked(value, message):
    with pytest.raises(UsageError) as info:
        RunSpec(**value).check()
    assert message in str(info.value)


def test_cli_rejects_an_unknown_strategy(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--strategy", "zero3", "--max-steps", "1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--strategy" in err and "ddp" in err and "Traceback" not in err


@pytest.mark.parametrize("saved,now,given,expect", [
    (2, 1, {}, 16),  # 2 x 8 resumed in 1 process: 16
    (1, 2, {}, 8),  # 1 x 16 resumed in 2: 8 each
    (2, 2, {}, 8),
    (2, 1, {"batch_size": 16}, 16),  # named: must be the global batch / processes
])
def test_resume_in_another_number_of_processes_keeps_the_global_batch(tmp_path, saved, now, given, expect):
    spec = RunSpec(batch_size=16 // saved, processes=saved)
    (tmp_path / "run.json").write_text(json.dumps(spec.to_dict()))
    stored = stored_spec(tmp_path, given, processes=now)
    assert stored["batch_size"] == expect and stored["processes"] == now


def test_resume_refuses_a_global_batch_that_does_not_split(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps(RunSpec(batch_size=5, processes=1).to_dict()))
    with pytest.raises(UsageError, match="cannot be split evenly over 2"):
        stored_spec(tmp_path, {}, processes=2)
    with pytest.raises(UsageError, match="batch_size"):  # 2 x 8 is not the run's 5
        stored_spec(tmp_path / ".", {"batch_size": 8}, processes=1)


def test_python_dash_m_subpeft_is_the_command_line():
    done = subprocess.run([sys.executable, "-m", "subpeft", "train", "--strategy", "bad"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "--strategy" in done.stderr


def test_attaching_to_a_sharded_model_is_a_clear_error():
    """FSDP2 leaves DTensor parameters; attach must come first (the dist tier checks a real sharded model)."""
    from torch.distributed.tensor import DTensor

    model = tiny_bert()

    class FakeDTensor(torch.nn.Parameter):
        pass

    FakeDTensor.__name__ = DTensor.__name__
    weight = model.bert.encoder.layer[0].attention.self.query.weight
    model.bert.encoder.layer[0].attention.self.query.weight = FakeDTensor(weight.detach())
    with pytest.raises(sp.SubpeftError, match="attach adapters before sharding"):
        sp.attach(model, sp.LoRA(r=2))


class _Exited(Exception):
    pass


def _fake_exit(monkeypatch) -> list[int]:
    """os._exit replaced by one that records the status and raises (the test process goes on)."""
    codes: list[int] = []

    def fake(status):
        codes.append(status)
        raise _Exited

    monkeypatch.setattr(spd.os, "_exit", fake)
    return codes


def test_end_process_ends_the_group_and_exits_with_the_status_without_finalization(monkeypatch, tmp_path):
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    out = [None]
    dist.all_gather_object(out, {"a": 1})  # a collective whose work gloo's thread releases
    codes = _fake_exit(monkeypatch)
    with pytest.raises(_Exited):
        spd.end_process(3)
    assert codes == [3] and not dist.is_initialized()


def test_end_process_flushes_what_was_printed_and_skips_atexit(tmp_path):
    script = ("import atexit, sys\nfrom subpeft import distributed as spd\n"
              "atexit.register(lambda: print('atexit ran'))\n"
              "sys.stdout.write('said, not flushed'); sys.stderr.write('to stderr')\nspd.end_process(4)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout, result.stderr) == (4, "said, not flushed", "to stderr")


def test_the_program_leaves_through_end_process_only_in_a_launched_process(monkeypatch, capsys):
    from subpeft.cli import entry

    codes = _fake_exit(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["subpeft", "methods", "--json"])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as exc:
        entry()
    assert exc.value.code == 0 and codes == []
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's environment: the group itself is not started by `methods`
    with pytest.raises(_Exited):
        entry()
    assert codes == [0] and capsys.readouterr().out.count('"lora"') == 2  # the command ran both times
    monkeypatch.setattr(sys, "argv", ["subpeft", "train", "--method"])  # argparse's own exit: the same way out
    with pytest.raises(_Exited):
        entry()
    assert codes == [0, 2] and "subpeft train: error: " in capsys.readouterr().err

    def broken(argv=None):
        raise RuntimeError("an internal error")

    monkeypatch.setattr("subpeft.cli.main", broken)  # a bug: its traceback, status 1
    with pytest.raises(_Exited):
        entry()
    assert codes == [0, 2, 1] and "RuntimeError: an internal error" in capsys.readouterr().err


def test_an_error_is_said_once_per_launch_rank_0_at_once_another_rank_after_the_grace(monkeypatch, capsys):
    import subpeft.cli as cli

    slept: list[float] = []
    monkeypatch.setattr("time.sleep", slept.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    bad = ["train", "--method", "lora", "--batch-size", "0"]
    for rank, line, waits in (("0", "subpeft train: error: ", []), ("1", "[rank 1] subpeft train: error: ",
                                                                   [cli.ERROR_GRACE_S])):
        monkeypatch.setenv("RANK", rank)
        slept.clear()
        assert cli.main(bad) == 2
        err = capsys.readouterr().err
        assert err.startswith(line) and err.count("error:") == 1 and "--batch-size" in err and slept == waits
        with pytest.raises(SystemExit) as exc:  # an option argparse refuses: the same rule
            cli.main(["train", "--method"])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith(line) and slept == waits * 2
    monkeypatch.delenv("WORLD_SIZE")  # RANK without a launch of several processes: no wait, no mark
    slept.clear()
    assert cli.main(bad) == 2 and capsys.readouterr().err.startswith("subpeft train: error: ") and slept == []
