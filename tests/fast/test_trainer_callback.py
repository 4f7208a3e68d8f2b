"""The Hugging Face Trainer integration (subpeft.integrations) on a tiny BERT built in the test.

* `tuned.step(global_step)` runs once per optimizer step with global_step = 1, 2, ..., after the
  optimizer has updated the adapter and while the gradients are still there (AdaLoRA reads them);
* the regulariser reaches the gradients, exactly once per optimizer step (also with gradient
  accumulation): the gradient at the first optimizer step with the integration minus the gradient
  without it equals d regularization() / d params, for AdaLoRA's orthogonality term and LoRA's MPC;
* AdaLoRA ends at its target budget and LoRA-Dash switches phase when trained by Trainer alone;
* SubpeftTrainer saves the adapter (not the whole model) in its checkpoints and resumes from them.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("accelerate")

import subpeft as sp  # noqa: E402
from subpeft.integrations import SubpeftCallback, SubpeftTrainer  # noqa: E402

LENGTH, N_EXAMPLES = 8, 64


def _model(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def _dataset():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 30, (N_EXAMPLES, LENGTH), generator=gen)
    labels = (ids[:, 0] % 2).long()
    return [{"input_ids": ids[i], "attention_mask": torch.ones(LENGTH, dtype=torch.long), "labels": labels[i]}
            for i in range(N_EXAMPLES)]


def _tuned(config, seed: int = 0):
    torch.manual_seed(seed)
    return sp.attach(_model(seed), config)


def _args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, learning_rate=1e-2, max_steps=4,
                report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", seed=0,
                disable_tqdm=True, remove_unused_columns=False, label_names=["labels"], max_grad_norm=0.0,
                dataloader_num_workers=0, lr_scheduler_type="constant", warmup_steps=0)
    base.update(kw)
    return TrainingArguments(**base)


class _Capture(SubpeftCallback.__mro__[1]):  # a plain TrainerCallback
    """Gradients of the adapter at the first optimizer step (after clipping, before the update)."""

    def __init__(self, tuned):
        self.tuned, self.grads = tuned, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.clone() for n, p in self.tuned.named_parameters()
                          if p.requires_grad and p.grad is not None}
        return control


def _run(tmp_path, config, *, kind: str, ga: int = 1, steps: int = 1, callbacks=()):
    from transformers import Trainer

    tuned = _tuned(config)
    capture = _Capture(tuned)
    args = _args(tmp_path, max_steps=steps, gradient_accumulation_steps=ga)
    if kind == "trainer":
        trainer = SubpeftTrainer(model=tuned, args=args, train_dataset=_dataset(), callbacks=[capture, *callbacks])
    else:
        cb = SubpeftCallback(regularization=kind == "callback")
        trainer = Trainer(model=tuned, args=args, train_dataset=_dataset(), callbacks=[cb, capture, *callbacks])
    trainer.train()
    return tuned, capture.grads, trainer


CONFIGS = {
    "adalora-orth": lambda: sp.AdaLoRA(r=4, target_r=2, total_steps=10, orth_reg=0.5, targets=["query", "value"],
                                       modules_to_save=["classifier"]),
    "lora-mpc": lambda: sp.LoRA(r=4, mpc="o", mpc_weight=0.5, targets=["query", "value"],
                                modules_to_save=["classifier"]),
}


@pytest.mark.parametrize("ga", [1, 2])
@pytest.mark.parametrize("kind", ["callback", "trainer"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_regularizer_reaches_the_gradients_once_per_step(tmp_path, name, kind, ga):
    _, with_reg, _ = _run(tmp_path, CONFIGS[name](), kind=kind, ga=ga)
    _, without, _ = _run(tmp_path, CONFIGS[name](), kind="steps-only", ga=ga)
    fresh = _tuned(CONFIGS[name]())
    params = {n: p for n, p in fresh.named_parameters() if p.requires_grad}
    term = fresh.regularization()
    assert term.requires_grad and float(term.detach()) > 0
    expected = dict(zip(params, torch.autograd.grad(term, list(params.values()), allow_unused=True), strict=True))
    assert with_reg.keys() == without.keys()
    moved = 0
    for n in with_reg:
        want = expected[n] if expected[n] is not None else torch.zeros_like(with_reg[n])
        torch.testing.assert_close(with_reg[n] - without[n], want, atol=2e-6, rtol=1e-4, msg=n)
        moved += int(want.abs().max() > 1e-4)
    assert moved >= 4, "the regulariser must have a gradient on several factors"


@pytest.mark.parametrize("kind", ["callback", "trainer"])
def test_step_hook_after_optimizer_step_with_gradients(tmp_path, kind):
    from transformers import Trainer

    tuned = _tuned(CONFIGS["adalora-orth"]())
    seen = []
    original = tuned.step
    lam = next(p for n, p in tuned.named_parameters() if n.endswith("lora_E"))
    snapshot = [lam.detach().clone()]

    def recording_step(global_step):
        grads = [p.grad is not None for p in tuned.parameters() if p.requires_grad]
        seen.append((global_step, all(grads), not torch.equal(lam, snapshot[-1])))
        original(global_step)
        snapshot.append(lam.detach().clone())

    tuned.step = recording_step
    args = _args(tmp_path, max_steps=5, gradient_accumulation_steps=2)
    if kind == "trainer":
        trainer = SubpeftTrainer(model=tuned, args=args, train_dataset=_dataset())
    else:
        trainer = Trainer(model=tuned, args=args, train_dataset=_dataset(), callbacks=[SubpeftCallback()])
    trainer.train()
    assert [s for s, _, _ in seen] == [1, 2, 3, 4, 5]
    assert all(has_grad for _, has_grad, _ in seen), "step() must run before zero_grad()"
    assert all(updated for _, _, updated in seen), "step() must run after optimizer.step()"


@pytest.mark.parametrize("kind", ["callback", "trainer"])
def test_schedules_run_by_themselves_under_trainer(tmp_path, kind):
    steps = 8
    config = sp.AdaLoRA(r=4, target_r=1, total_steps=steps, init_warmup=2, final_warmup=2, mask_interval=1,
                        targets=["query", "value"], modules_to_save=["classifier"])
    tuned, _, _ = _run(tmp_path, config, kind=kind, steps=steps)
    kept = [int(torch.count_nonzero(a.lora_E)) for _, a in tuned.adapters_of("default")]
    assert sum(kept) == len(kept), kept  # target_r = 1 triplet per layer on average, allocated globally
    dash = sp.LoRADash(r=4, prelaunch_steps=3, directions=2, targets=["query", "value"], modules_to_save=["classifier"])
    tuned, _, _ = _run(tmp_path, dash, kind=kind, steps=6)
    adapters = [a for _, a in tuned.adapters_of("default")]
    assert all(int(a.dash_phase) == 1 for a in adapters)
    assert all(torch.count_nonzero(a.dash_sigma) > 0 for a in adapters), "Δσ trains after the switch"


@pytest.mark.parametrize("kind", ["callback", "trainer"])
def test_phase_events_reach_the_callback_and_the_log_history(tmp_path, kind):
    """LoRA-Dash's switch and AdaLoRA's final budget, under the HF Trainer: in SubpeftCallback.events with
    the step they happened at, and in the Trainer's log history (trainer_state.json)."""
    dash = sp.LoRADash(r=4, prelaunch_steps=3, directions=2, targets=["query", "value"], modules_to_save=["classifier"])
    _, _, trainer = _run(tmp_path, dash, kind=kind, steps=5)
    cb = next(c for c in trainer.callback_handler.callbacks if isinstance(c, SubpeftCallback))
    assert [(e["event"], e["step"]) for e in cb.events] == [("dash_phase", 3)]
    logged = [h for h in trainer.state.log_history if "subpeft_event" in h]
    assert [(h["subpeft_event"], h["step"]) for h in logged] == [("dash_phase", 3)]
    ada = sp.AdaLoRA(r=4, target_r=1, total_steps=6, init_warmup=1, final_warmup=2, mask_interval=1,
                     targets=["query", "value"], modules_to_save=["classifier"])
    _, _, trainer = _run(tmp_path, ada, kind=kind, steps=6)
    cb = next(c for c in trainer.callback_handler.callbacks if isinstance(c, SubpeftCallback))
    assert "final_budget" in [e["event"] for e in cb.events]


def test_without_the_integration_the_budget_never_runs(tmp_path):
    """The contrast: a plain Trainer without the callback leaves AdaLoRA at its full rank."""
    from transformers import Trainer

    config = sp.AdaLoRA(r=4, target_r=1, total_steps=8, init_warmup=2, final_warmup=2, mask_interval=1,
                        targets=["query", "value"], modules_to_save=["classifier"])
    tuned = _tuned(config)
    Trainer(model=tuned, args=_args(tmp_path, max_steps=8), train_dataset=_dataset()).train()
    kept = [int(torch.count_nonzero(a.lora_E)) for _, a in tuned.adapters_of("default")]
    assert sum(kept) == 4 * len(kept)


def test_subpeft_trainer_saves_adapters_and_resumes(tmp_path):
    """Checkpoints hold the adapter (loadable with sp.load); resume_from_checkpoint continues from it, and
    with the default column removal (the base model's forward signature is used)."""
    config = CONFIGS["adalora-orth"]()
    args = _args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, remove_unused_columns=True,
                 label_names=None)
    tuned = _tuned(config)
    SubpeftTrainer(model=tuned, args=args, train_dataset=_dataset()).train()
    ckpt = tmp_path / "out" / "checkpoint-2"
    assert (ckpt / "adapter_config.json").is_file() and not (ckpt / "model.safetensors").exists()
    loaded = sp.load(_model(seed=5), str(tmp_path / "out" / "checkpoint-4"))
    for (n, a), (_, b) in zip(tuned.adapters_of("default"), loaded.adapters_of("default"), strict=True):
        assert torch.equal(a.lora_E, b.lora_E) and torch.equal(a.ipt_E, b.ipt_E), n
    resumed = _tuned(config)
    SubpeftTrainer(model=resumed, args=args, train_dataset=_dataset()).train(resume_from_checkpoint=str(ckpt))
    for (n, a), (_, b) in zip(tuned.adapters_of("default"), resumed.adapters_of("default"), strict=True):
        torch.testing.assert_close(a.lora_A, b.lora_A, atol=1e-6, rtol=1e-5, msg=n)
        assert torch.equal(a.rank_mask, b.rank_mask), n


def _fsdp2_setup(model, ignored=None, *, version: int = 2, enabled: bool = True):
    """What ``_keep_trainable_whole_under_fsdp2`` reads of a Trainer whose accelerator runs FSDP (the dist tier runs
    the real thing: tests/dist/test_hf_distributed.py)."""
    from types import SimpleNamespace

    plugin = SimpleNamespace(fsdp_version=version, ignored_modules=ignored)
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None)
    return SimpleNamespace(is_fsdp_enabled=enabled, accelerator=accelerator, model=model), plugin


def test_fsdp2_keeps_exactly_the_trainable_tensors_whole_and_keeps_the_users_ignored_modules():
    tuned = _tuned(sp.LoRA(r=2, targets=["query", "value"], modules_to_save=["classifier"]))
    keep = SubpeftTrainer._keep_trainable_whole_under_fsdp2
    trainable = {id(p) for p in tuned.parameters() if p.requires_grad}
    # a regex of the user's, resolved to the modules it names, then the trainable tensors
    trainer, plugin = _fsdp2_setup(tuned, r".*embeddings\.word_embeddings")
    assert keep(trainer) is True
    *users, holder = plugin.ignored_modules
    assert len(list(holder.parameters())) == len(trainable)
    assert [type(m).__name__ for m in users] == ["Embedding"]
    assert {id(p) for p in holder.parameters()} == trainable  # the model's own Parameter objects, looked up by name
    assert list(holder.children()) == [] and holder.to("cpu") is holder
    trainer, plugin = _fsdp2_setup(tuned, [users[0]])
    keep(trainer)
    assert plugin.ignored_modules[0] is users[0] and len(plugin.ignored_modules) == 2
    # not applied: FSDP1, FSDP off, everything trains (full fine-tuning: FSDP2 shards it all)
    for setup in (_fsdp2_setup(tuned, version=1), _fsdp2_setup(tuned, enabled=False)):
        assert keep(setup[0]) is False and setup[1].ignored_modules is None
    full = _tuned(sp.LoRA(r=2, targets=["query"]))
    for p in full.parameters():
        p.requires_grad_(True)
    trainer, plugin = _fsdp2_setup(full)
    assert keep(trainer) is False and plugin.ignored_modules is None


def test_a_sharded_adapter_gets_one_clear_error_from_the_hooks(tmp_path):
    """A plain Trainer with SubpeftCallback under accelerate's FSDP2 shards the adapter too: AdaLoRA's
    orthogonality term then meets DTensors outside the forward. The error names what to use instead."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor
    from transformers import TrainerControl, TrainerState

    tuned = _tuned(sp.AdaLoRA(r=2, target_r=1, total_steps=10, init_warmup=1, final_warmup=1, orth_reg=0.1,
                              targets=["query"]))
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        adapter = next(m for m in tuned.modules() if hasattr(m, "lora_A") and isinstance(m.lora_A, torch.nn.Parameter))
        adapter.lora_A = torch.nn.Parameter(distribute_tensor(adapter.lora_A.detach(), mesh, [Replicate()]))
        callback = SubpeftCallback()
        with pytest.raises(ValueError, match="adalora: its training hook .* SubpeftTrainer") as exc:
            callback.on_step_begin(_args(tmp_path), TrainerState(), TrainerControl(), model=tuned)
        assert "DTensor" in str(exc.value.__cause__)
    finally:
        dist.destroy_process_group()
