"""Diff pruning: the hard-concrete gate, the expected-L0 penalty, finalize() to a sparse top-k adapter."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import subpeft as sp
from subpeft.methods.reconstruction.diff_pruning import DiffPruning, kept_count

from .tiny_models import CASES, MLP


def _attach(config: DiffPruning, seed: int = 0, model: nn.Module | None = None):
    torch.manual_seed(seed)
    base = model if model is not None else MLP()
    return copy.deepcopy(base), sp.attach(base, config)


def _layers(tuned, name="default"):
    return tuned.adapters_of(name)


def _randomise(tuned, seed: int, log_alpha_mean: float = 0.5) -> None:
    """Diffs ~ N(0, 1) and gate logits spread around `log_alpha_mean` (some eval gates shut, some open)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, a in _layers(tuned):
            a.diff.copy_(torch.randn(a.diff.shape, generator=gen))
            a.log_alpha.copy_(log_alpha_mean + 2.0 * torch.randn(a.log_alpha.shape, generator=gen))


def _single_layer(config: DiffPruning, d_in: int = 100, d_out: int = 200):
    torch.manual_seed(0)
    tuned = sp.attach(nn.Sequential(nn.Linear(d_in, d_out)), config.replace(targets=["0"]))
    return tuned.adapters_of("default")[0][1]


def test_kept_count_is_ceil_of_budget_times_entries():
    assert kept_count(0.005, 100) == 1
    assert kept_count(0.07, 100) == 7  # 0.07·100 = 7.000000000000001 in floats
    assert kept_count(0.071, 100) == 8
    assert kept_count(1.0, 130) == 130
    assert kept_count(1e-9, 10) == 1
    assert kept_count(0.5, 10**9) == 5 * 10**8 and kept_count(0.5, 10**9 + 1) == 5 * 10**8 + 1


@pytest.mark.parametrize("log_alpha", [0.0, 1.5])
def test_training_gate_is_hard_concrete(log_alpha):
    cfg = DiffPruning(beta=0.5, gamma=-0.3, zeta=1.2)
    adapter = _single_layer(cfg)
    with torch.no_grad():
        adapter.log_alpha.fill_(log_alpha)
    adapter.train()
    torch.manual_seed(11)
    z = adapter.gate()
    # the formula by hand, from the same uniform draws
    torch.manual_seed(11)
    u = torch.rand_like(adapter.log_alpha).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha) / 0.5)
    torch.testing.assert_close(z, (s * 1.5 - 0.3).clamp(0, 1), atol=1e-6, rtol=0)
    assert z.min() >= 0 and z.max() <= 1
    # exact zeros and ones occur with the hard-concrete probabilities (20,000 samples: ±5σ ≈ 0.014)
    p_zero = torch.sigmoid(torch.tensor(0.5 * math.log(0.3 / 1.2) - log_alpha)).item()
    p_one = torch.sigmoid(torch.tensor(log_alpha - 0.5 * math.log(1.3 / 0.2))).item()
    assert abs((z == 0).float().mean().item() - p_zero) < 0.015
    assert abs((z == 1).float().mean().item() - p_one) < 0.015
    assert 0.05 < p_zero < 0.95 and 0.05 < p_one < 0.95  # both really occur
    assert not torch.equal(adapter.gate(), z), "a training-mode gate is sampled afresh"


def test_eval_gate_is_deterministic_and_starts_open():
    adapter = _single_layer(DiffPruning())
    adapter.eval()
    assert torch.equal(adapter.gate(), torch.ones_like(adapter.log_alpha)), "init_log_alpha=5 opens every gate"
    adapter.train()
    assert (adapter.gate() == 1).float().mean() > 0.9
    adapter.eval()
    with torch.no_grad():
        adapter.log_alpha.copy_(torch.randn_like(adapter.log_alpha) * 3)
    z = adapter.gate()
    assert torch.equal(adapter.gate(), z)
    expected = (torch.sigmoid(adapter.log_alpha) * 1.2 - 0.1).clamp(0, 1)
    torch.testing.assert_close(z, expected, atol=1e-6, rtol=0)
    assert (z == 0).any() and (z == 1).any() and ((z > 0) & (z < 1)).any()


def test_regularization_is_the_expected_l0_by_hand():
    cfg = DiffPruning(l0_weight=0.3, beta=0.5, gamma=-0.4, zeta=1.3, targets=["fc1", "fc2"])
    _, tuned = _attach(cfg)
    _randomise(tuned, seed=1)
    by_hand = sum(
        torch.sigmoid(a.log_alpha - 0.5 * math.log(0.4 / 1.3)).sum() for _, a in _layers(tuned)
    ) * 0.3
    torch.testing.assert_close(tuned.regularization(), by_hand, atol=1e-6, rtol=1e-6)
    # λ = 0: no penalty
    _, plain = _attach(cfg.replace(l0_weight=0.0))
    assert plain.regularization().item() == 0.0


def _expected_l0(tuned) -> float:
    return sum(a.expected_l0().item() for _, a in _layers(tuned))


def _train(tuned, steps: int, x, target, lr: float = 0.05) -> None:
    opt = torch.optim.Adam([p for p in tuned.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        torch.manual_seed(step)
        loss = (tuned(x) - target).pow(2).mean() + tuned.regularization()
        opt.zero_grad()
        loss.backward()
        opt.step()
        tuned.step(step + 1)


def test_l0_penalty_lowers_the_expected_l0():
    x, target = torch.randn(16, 6), torch.randn(16, 3)
    results = {}
    for weight in (0.0, 1e-2):
        _, tuned = _attach(DiffPruning(l0_weight=weight, init_log_alpha=1.0, targets=["fc1", "fc2"]))
        start = _expected_l0(tuned)
        _train(tuned, 60, x, target)
        results[weight] = _expected_l0(tuned)
    n = 6 * 10 + 10 * 7
    assert results[1e-2] < start - 0.15 * n, (start, results)  # gates are closing
    assert results[1e-2] < results[0.0] - 0.15 * n


def _finalized(budget: float, seed: int = 2):
    pristine, tuned = _attach(DiffPruning(budget=budget, targets=["fc1", "fc2"]))
    _randomise(tuned, seed=seed)
    tuned.eval()
    return pristine, tuned


def test_finalize_keeps_the_top_k_of_gated_diffs():
    pristine, tuned = _finalized(budget=0.1)
    dense = {name: (a.gate() * a.diff).detach().flatten() for name, a in _layers(tuned)}
    # a large diff behind a shut gate must not be kept: the score is |z ⊙ w|, not |w|
    with torch.no_grad():
        a = dict(_layers(tuned))["fc1"]
        shut = (a.gate() == 0).flatten().nonzero()[0, 0]
        a.diff.view(-1)[shut] = 100.0
    tuned.finalize()
    assert tuned.configs["default"].sparse is True
    total = 0
    for name, a in _layers(tuned):
        k = math.ceil(0.1 * dense[name].numel())
        assert a.values.shape == a.indices.shape == (k,) and a.indices.dtype == torch.int64
        assert not hasattr(a, "diff") and not hasattr(a, "log_alpha")
        assert torch.equal(a.indices, a.indices.unique()), "distinct, sorted indices"
        assert torch.equal(a.values, dense[name][a.indices])
        dropped = torch.ones_like(dense[name], dtype=torch.bool)
        dropped[a.indices] = False
        assert a.values.abs().min() >= dense[name][dropped].abs().max()
        total += k
    assert shut.item() not in dict(_layers(tuned))["fc1"].indices.tolist()
    assert tuned.get_nb_trainable_parameters()[0] == total
    layers = [(n, layer.base_layer, layer.layer_type) for n, layer in tuned.adapted_layers()]
    assert sp.get_method("diff_pruning").adapter_cls.model_num_params(tuned.configs["default"], layers) == total
    assert tuned.regularization().item() == 0.0
    # the sparse adapter computes W + (z ⊙ w restricted to the kept entries)
    x = torch.randn(5, 6)
    manual = copy.deepcopy(pristine)
    with torch.no_grad():
        for name, a in _layers(tuned):
            mask = torch.zeros_like(dense[name])
            mask[a.indices] = 1
            getattr(manual, name).weight.add_((dense[name] * mask).view(a.base_layer.weight.shape))
    torch.testing.assert_close(tuned(x), manual(x), atol=1e-6, rtol=0)
    tuned.finalize()  # nothing more to do
    assert all(a.values.shape == (math.ceil(0.1 * dense[n].numel()),) for n, a in _layers(tuned))


def test_finalize_with_full_budget_changes_nothing():
    _, tuned = _finalized(budget=1.0)
    x = torch.randn(5, 6)
    before = tuned(x)
    tuned.finalize()
    assert torch.equal(tuned(x), before)


def test_sparse_adapter_merges_saves_loads_and_keeps_training(tmp_path):
    pristine, tuned = _finalized(budget=0.2)
    x = torch.randn(5, 6)
    dense_out = tuned(x)
    tuned.save_pretrained(tmp_path / "dense")
    assert torch.equal(sp.load(copy.deepcopy(pristine), tmp_path / "dense")(x), dense_out)
    tuned.finalize()
    y = tuned(x)
    tuned.save_pretrained(tmp_path / "sparse")
    # the file holds k values and k int64 indices per layer, nothing else
    saved = load_file(tmp_path / "sparse" / "adapter_model.safetensors")
    ks = {"fc1": math.ceil(0.2 * 60), "fc2": math.ceil(0.2 * 70)}
    expected_keys = {f"base_model.model.{n}.{t}" for n in ks for t in ("values", "indices")}
    assert set(saved) == expected_keys
    for n, k in ks.items():
        assert saved[f"base_model.model.{n}.values"].shape == (k,)
        assert saved[f"base_model.model.{n}.indices"].dtype == torch.int64
    dense_size = (tmp_path / "dense" / "adapter_model.safetensors").stat().st_size
    sparse_size = (tmp_path / "sparse" / "adapter_model.safetensors").stat().st_size
    assert sparse_size < dense_size
    assert sum(v.numel() * v.element_size() for v in saved.values()) == sum(ks.values()) * (4 + 8)
    loaded = sp.load(copy.deepcopy(pristine), tmp_path / "sparse")
    assert loaded.configs["default"].sparse is True
    assert torch.equal(loaded(x), y)
    sd_a, sd_b = tuned.adapter_state_dict("default"), loaded.adapter_state_dict("default")
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    # merged and sparse forward agree
    tuned.merge()
    torch.testing.assert_close(tuned(x), y, atol=1e-5, rtol=0)
    tuned.unmerge()
    # the kept values train further; the indices and the base do not move
    again = sp.load(copy.deepcopy(pristine), tmp_path / "sparse", trainable=True)
    trainable = [n for n, p in again.named_parameters() if p.requires_grad]
    assert sorted(trainable) == [f"model.{n}.adapters.default.values" for n in ("fc1", "fc2")]
    before = {k: v.clone() for k, v in again.adapter_state_dict("default").items()}
    _train(again, 3, x, torch.randn(5, 3))
    after = again.adapter_state_dict("default")
    for k in before:
        assert torch.equal(before[k], after[k]) == k.endswith("indices"), k
    for n in ("fc1", "fc2"):
        base = again.model.get_submodule(n).base_layer
        assert torch.equal(base.weight, getattr(pristine, n).weight) and torch.equal(base.bias, getattr(pristine, n).bias)


def test_finalize_keeps_an_inactive_adapter_frozen():
    _, tuned = _attach(DiffPruning(budget=0.1, targets=["fc1"]))
    tuned.add_adapter("other", DiffPruning(budget=0.1, targets=["fc1"]))
    tuned.finalize("other")
    assert tuned.configs["other"].sparse and not tuned.configs["default"].sparse
    assert not tuned.adapters_of("other")[0][1].values.requires_grad
    assert tuned.adapters_of("default")[0][1].diff.requires_grad


@pytest.mark.parametrize("case", [c for c in CASES if c.layer_type in ("conv1d", "embedding", "conv2d")], ids=lambda c: c.name)
def test_sparse_form_on_other_layer_types(case, tmp_path):
    pristine = case.model()
    tuned = sp.attach(copy.deepcopy(pristine), DiffPruning(budget=0.3, targets=list(case.targets)))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, a in _layers(tuned):
            a.diff.copy_(torch.randn(a.diff.shape, generator=gen) * 0.3)
            a.log_alpha.copy_(torch.randn(a.log_alpha.shape, generator=gen) * 3)
    tuned.eval()
    x = case.input()
    y_dense = tuned(x)
    tuned.finalize()
    y = tuned(x)
    assert not torch.allclose(y, y_dense), "pruning 70% of the gated diff changes the output"
    tuned.save_pretrained(tmp_path)
    assert torch.equal(sp.load(copy.deepcopy(pristine), tmp_path)(x), y)
    for _, a in _layers(tuned):
        assert a.values.numel() == math.ceil(0.3 * a.base_layer.weight.numel())
    torch.testing.assert_close(tuned.merge_and_unload()(x), y, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad,match", [
    (dict(budget=0.0), "budget"), (dict(budget=1.5), "budget"), (dict(l0_weight=-1.0), "l0_weight"),
    (dict(beta=0.0), "beta"), (dict(gamma=0.1), "gamma"), (dict(zeta=1.0), "zeta"),
    (dict(init_log_alpha=float("inf")), "init_log_alpha"), (dict(sparse="yes"), "sparse"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(sp.ConfigError, match=match):
        DiffPruning(**bad)


def test_embedding_with_max_norm_is_refused():
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0))
    with pytest.raises(sp.UnsupportedLayerError, match="max_norm"):
        sp.attach(model, DiffPruning(targets=["0"]))


def test_merge_in_training_mode_uses_the_deterministic_gate():
    """A merge (or analysis) while the model is in training mode must not bake in one random draw of the gates:
    it wrote a sampled z ⊙ w into W (outputs off by 6e-4 on a tiny BERT) before delta_weight() took the
    deterministic gate by default."""
    from .tiny_transformers import batch, tiny_bert

    torch.manual_seed(0)
    tuned = sp.attach(tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                      sp.DiffPruning(targets=["query", "value"]))
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "diff" in name:
                p.add_(torch.randn_like(p) * 0.1)
            if "log_alpha" in name:
                p.copy_(torch.randn_like(p) * 2)
    tuned.eval()
    inputs = batch()
    expected = tuned(**inputs).logits
    tuned.train()
    tuned.merge()
    tuned.eval()
    torch.testing.assert_close(tuned(**inputs).logits, expected, atol=1e-6, rtol=0)
    tuned.unmerge()
    tuned.train()
    torch.manual_seed(1)
    a = tuned(**inputs).logits
    torch.manual_seed(2)
    assert not torch.equal(a, tuned(**inputs).logits)  # training forwards still sample the gates
