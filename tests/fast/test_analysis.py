"""subpeft.analysis: the measures on synthetic matrices with known answers, and report() on tiny
models with constructed deltas (LoRA, SVDiff, (IA)³), merged and unmerged, with a reference."""

from __future__ import annotations

import json
import math

import pytest
import torch

import subpeft as sp
from subpeft import analysis as A
from subpeft.core import svd as svd_service
from subpeft.core.errors import SubpeftError
from subpeft.core.svd import canonical_signs, svd

from .tiny_models import CASES

CASE = {c.name: c for c in CASES}
SIGMA = torch.tensor([10.0, 7.0, 5.0, 3.0, 2.0, 1.0], dtype=torch.float64)


def basis(d_out: int = 9, d_in: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, V, W): orthonormal U (d_out, m), V (d_in, m) with canonical signs, W = U·diag(SIGMA)·Vᵀ."""
    gen = torch.Generator().manual_seed(seed)
    m = min(d_out, d_in)
    U, _ = torch.linalg.qr(torch.randn(d_out, d_out, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen, dtype=torch.float64))
    U_m, Vh_m = canonical_signs(U[:, :m], V[:, :m].t())
    U = torch.cat([U_m, U[:, m:]], dim=1)  # columns m.. span the rest of R^d_out
    V = torch.cat([Vh_m.t(), V[:, m:]], dim=1)
    W = (U[:, :m] * SIGMA[:m]) @ V[:, :m].t()
    return U, V, W


def outer(U: torch.Tensor, V: torch.Tensor, i: int, j: int) -> torch.Tensor:
    return torch.outer(U[:, i], V[:, j])


# -- measures on synthetic matrices ----------------------------------------------------------------
def test_change_rates_exact_and_blind_to_off_core_changes():
    U, V, W = basis()
    # core changes along directions 3 and 1; off-diagonal (u_0 v_2ᵀ) and out-of-span (u_7 v_0ᵀ) changes
    W_new = W + 0.9 * outer(U, V, 3, 3) - 1.4 * outer(U, V, 1, 1) + 5.0 * outer(U, V, 0, 2) + 4.0 * outer(U, V, 7, 0)
    rates = A.change_rates(W, W_new, eps=0.0)
    expected = torch.zeros(6, dtype=torch.float64)
    expected[3] = 0.9 / 3.0
    expected[1] = 1.4 / 7.0
    torch.testing.assert_close(rates, expected, atol=1e-12, rtol=0)
    # eps enters the denominator
    rates_eps = A.change_rates(W, W_new, eps=0.5)
    assert rates_eps[3].item() == pytest.approx(0.9 / 3.5, abs=1e-12)
    # the order is W's descending spectrum, whatever the order in which W was built
    assert A.task_specific_directions(W, W_new, 2).tolist() == [3, 1]  # 0.3 > 0.2
    perm = torch.tensor([5, 2, 0, 4, 1, 3])
    W_perm = (U[:, perm] * SIGMA[perm]) @ V[:, perm].t()  # the same matrix, built in another order
    torch.testing.assert_close(A.change_rates(W_perm, W_new, eps=0.0), expected, atol=1e-12, rtol=0)


def test_task_specific_directions_order_and_k():
    U, V, W = basis()
    W_new = W + 0.1 * outer(U, V, 0, 0) + 0.9 * outer(U, V, 4, 4) + 1.5 * outer(U, V, 2, 2)
    # rates: 0.01, 0, 0.3, 0, 0.45, 0
    assert A.task_specific_directions(W, W_new, 3).tolist() == [4, 2, 0]
    assert A.task_specific_directions(W, W_new, 1).tolist() == [4]
    for bad in (0, 7, 2.0, True):
        with pytest.raises(A.AnalysisError, match="k must be"):
            A.task_specific_directions(W, W_new, bad)


def test_change_rates_rank_deficient_w_divides_by_eps():
    U, V, W = basis(6, 6)  # square, so the null direction pair (u_5, v_5) is unique
    W0 = W - 1.0 * outer(U, V, 5, 5)  # σ_5 = 0
    W_new = W0 + 2e-6 * outer(U, V, 5, 5)
    rates = A.change_rates(W0, W_new, eps=1e-6)
    assert rates[5].item() == pytest.approx(2.0, rel=1e-6)
    with pytest.raises(A.AnalysisError, match="eps = 0"):  # an exact zero singular value
        A.change_rates(torch.zeros(3, 3), torch.eye(3), eps=0.0)


def test_project_gives_coordinates_in_ws_basis():
    U, V, W = basis()
    C = torch.zeros(6, 6, dtype=torch.float64)
    C[0, 0], C[2, 1], C[4, 4], C[5, 0] = 1.5, -2.0, 0.25, 3.0
    A_mat = U[:, :6] @ C @ V[:, :6].t() + 7.0 * outer(U, V, 8, 1)  # the last term is outside span(U_m)
    torch.testing.assert_close(A.project(W, A_mat), C, atol=1e-12, rtol=0)
    torch.testing.assert_close(A.project(W, A_mat, core_only=True), C.diagonal(), atol=1e-12, rtol=0)
    # projecting W itself gives diag(σ)
    torch.testing.assert_close(A.project(W, W), torch.diag(SIGMA), atol=1e-12, rtol=0)


def test_subspace_similarity_known_angles_and_non_orthonormal_inputs():
    e = torch.eye(5, dtype=torch.float64)
    theta = 0.3
    v = math.cos(theta) * e[:, 0] + math.sin(theta) * e[:, 1]
    assert A.subspace_similarity(e[:, 0], v) == pytest.approx(math.cos(theta) ** 2, abs=1e-12)
    # the same 2-D span given by a non-orthonormal basis: similarity 1
    B = e[:, :2] @ torch.tensor([[2.0, 1.0], [0.5, 3.0]], dtype=torch.float64)
    assert A.subspace_similarity(e[:, :2], B) == pytest.approx(1.0, abs=1e-12)
    # span{e0, e1} vs span{e0, e2}: one shared direction out of k = 2
    assert A.subspace_similarity(e[:, :2], e[:, [0, 2]]) == pytest.approx(0.5, abs=1e-12)
    assert A.subspace_similarity(3.0 * e[:, :2], 0.3 * e[:, [0, 2]]) == pytest.approx(0.5, abs=1e-12)
    # k = min(k1, k2): a line inside a plane scores 1, orthogonal spaces 0
    assert A.subspace_similarity(e[:, [0]], e[:, :3]) == pytest.approx(1.0, abs=1e-12)
    assert A.subspace_similarity(e[:, :2], e[:, 2:]) == pytest.approx(0.0, abs=1e-12)
    angles = A.principal_angles(e[:, [0, 2]], torch.stack([v, e[:, 3]], dim=1))
    torch.testing.assert_close(angles, torch.tensor([theta, math.pi / 2], dtype=torch.float64), atol=1e-7, rtol=0)
    with pytest.raises(A.AnalysisError, match="linearly dependent"):
        A.subspace_similarity(torch.stack([e[:, 0], 2 * e[:, 0]], dim=1), e[:, :2])
    with pytest.raises(A.AnalysisError, match="same space"):
        A.subspace_similarity(e[:, :2], torch.eye(4)[:, :2])


def test_optimal_scale_and_distance_to_reference():
    U, V, W = basis()
    delta = 0.8 * outer(U, V, 2, 2) + 0.3 * outer(U, V, 0, 4)
    orth = 2.0 * outer(U, V, 1, 1)  # ⟨orth, delta⟩_F = 0
    assert A.optimal_scale(W, delta, W + 2.5 * delta + orth) == pytest.approx(2.5, abs=1e-12)
    assert A.optimal_scale(W, delta, W - 0.5 * delta) == pytest.approx(-0.5, abs=1e-12)
    R = 1.2 * outer(U, V, 3, 0) - 0.7 * outer(U, V, 5, 5)
    assert A.distance_to_reference(W, W + 0.6 * R, W + R) == pytest.approx(0.4, abs=1e-12)
    assert A.distance_to_reference(W, W, W + R) == pytest.approx(1.0, abs=1e-12)
    # reaching the reference plus an orthogonal error as large as R: distance 1
    assert A.distance_to_reference(W, W + R + orth * (R.norm() / orth.norm()), W + R) == pytest.approx(1.0, abs=1e-12)


def test_errors_are_subpeft_value_errors():
    W = torch.randn(4, 3)
    with pytest.raises(A.AnalysisError, match="ΔW is zero"):
        A.optimal_scale(W, torch.zeros(4, 3), W + 1)
    with pytest.raises(A.AnalysisError, match="reference equals W"):
        A.distance_to_reference(W, W + 1, W)
    with pytest.raises(A.AnalysisError, match="same"):
        A.change_rates(W, torch.randn(3, 4))
    with pytest.raises(A.AnalysisError, match="2-D"):
        A.project(torch.randn(4), torch.randn(4))
    for exc in (A.AnalysisError,):
        assert issubclass(exc, SubpeftError) and issubclass(exc, ValueError)


def test_effective_rank():
    U, V, W = basis()
    assert A.effective_rank(2.0 * outer(U, V, 0, 0) + 2.0 * outer(U, V, 3, 3) + 2.0 * outer(U, V, 4, 1)) == pytest.approx(3.0)
    assert A.effective_rank(5.0 * outer(U, V, 2, 2)) == pytest.approx(1.0)
    assert A.effective_rank(torch.zeros(3, 4)) == 0.0
    p = SIGMA / SIGMA.sum()
    assert A.effective_rank(W) == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-6)


# -- report() on tiny models ------------------------------------------------------------------------
def _w2d(tuned, name):
    layer = dict(tuned.adapted_layers())[name]
    return A.weight_svd(layer.base_layer, layer.layer_type)


def test_report_lora_known_deltas():
    model = CASE["mlp"].model()
    tuned = sp.attach(model, sp.LoRA(r=2, alpha=4, targets=["fc1", "fc2"]))  # scaling 2
    plan = {"fc1": ((0, 0.5), (4, 0.03)), "fc2": ((1, 0.2), (5, 0.4))}  # (core index, size c_i)
    expect = {}
    with torch.no_grad():
        for name, adapter in tuned.adapters_of("default"):
            W, (U, S, Vh) = _w2d(tuned, name)
            (i, ci), (j, cj) = plan[name]
            adapter.lora_B.copy_(torch.stack([U[:, i] * ci, U[:, j] * cj], dim=1) / adapter.scaling)
            adapter.lora_A.copy_(torch.stack([Vh[i], Vh[j]]))
            expect[name] = (W.clone(), S.clone(), U.clone(), {i: ci / float(S[i]), j: cj / float(S[j])})
    ref = {f"{n}.weight": (e[0] + 3 * (tuned.model.get_submodule(n).adapters["default"].delta_weight())) for n, e in expect.items()}
    rows = A.report(tuned, reference=ref, top=3)
    assert [r.layer for r in rows] == ["fc1", "fc2"] and rows.method == "lora"
    for row in rows:
        W, S, U, rates = expect[row.layer]
        (i, ci), (j, cj) = plan[row.layer]
        top2 = sorted(rates, key=rates.get, reverse=True)
        assert [d.index for d in row.top[:2]] == top2
        for d in row.top[:2]:
            assert d.rate == pytest.approx(rates[d.index], rel=1e-4)
            assert d.singular_value == pytest.approx(float(S[d.index]), rel=1e-6)
            assert d.quantile == pytest.approx(d.index / (S.numel() - 1))
        assert row.top[2].rate < 1e-5  # nothing else changed
        assert row.delta_norm == pytest.approx(math.hypot(ci, cj), rel=1e-5)
        assert row.relative_delta_norm == pytest.approx(math.hypot(ci, cj) / float(W.norm()), rel=1e-5)
        p = torch.tensor([ci, cj]) / (ci + cj)
        assert row.effective_rank == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-4)
        # ΔW's left subspace is span(u_i, u_j); W's top-2 is span(u_0, u_1): shared directions / 2
        assert row.overlap_k == 2
        assert row.overlap == pytest.approx(len({i, j} & {0, 1}) / 2, abs=1e-5)
        assert row.overlap_random == pytest.approx(2 / row.shape[0])
        assert row.distance_to_reference == pytest.approx(2 / 3, rel=1e-5)
        assert len(row.change_rates) == len(row.singular_values) == min(row.shape)
    # merged: the same numbers from the merged weight
    tuned.merge()
    merged_rows = A.report(tuned, reference=ref, top=3)
    for a, b in zip(rows, merged_rows, strict=True):
        assert [d.index for d in a.top[:2]] == [d.index for d in b.top[:2]]
        assert b.delta_norm == pytest.approx(a.delta_norm, rel=1e-4)
        assert b.distance_to_reference == pytest.approx(a.distance_to_reference, rel=1e-4)
        assert b.effective_rank == pytest.approx(a.effective_rank, rel=1e-3)
    # output formats
    data = json.loads(rows.to_json())
    assert data["method"] == "lora" and [d["layer"] for d in data["layers"]] == ["fc1", "fc2"]
    fc1_rates = expect["fc1"][3]
    assert data["layers"][0]["top"][0]["index"] == max(fc1_rates, key=fc1_rates.get)
    table = rows.to_table()
    assert "fc1" in table and "dist. to ref" in table and f"{rows[1].top[0].index}@" in table
    summary = rows.summary()
    assert summary["measured"] == 2 and summary["mean_distance_to_reference"] == pytest.approx(2 / 3, rel=1e-5)


def test_report_svdiff_on_conv1d_layout():
    """SVDiff shifts chosen singular values: exactly those directions change, at rate δ_i/σ_i (the
    transposed Conv1D layout must be undone for that to hold)."""
    tuned = sp.attach(CASE["conv1d"].model(), sp.SVDiff(targets=["c_attn", "c_proj"]))
    with torch.no_grad():
        for _, adapter in tuned.adapters_of("default"):
            adapter.delta[2] = 0.3
            adapter.delta[0] = -0.05
    for row in A.report(tuned, top=2):
        S = torch.tensor(row.singular_values)
        assert row.shape == {"c_attn": (9, 6), "c_proj": (5, 9)}[row.layer]
        expected = {2: 0.3 / float(S[2]), 0: 0.05 / float(S[0])}
        assert [d.index for d in row.top] == [2, 0]
        for d in row.top:
            assert d.rate == pytest.approx(expected[d.index], rel=1e-4)
        others = [r for i, r in enumerate(row.change_rates) if i not in (0, 2)]
        assert max(others) < 1e-5
        assert row.overlap_k == 2 and row.overlap == pytest.approx(0.5, abs=1e-5)  # span(u_0, u_2) vs span(u_0, u_1)


def test_report_ia3_uniform_scale_difference_path():
    """(IA)³ with l = 1.25 everywhere: ΔW = 0.25·W (computed as merged − W), so every change rate is
    0.25, ΔW has W's effective rank and its top subspace is W's (overlap 1)."""
    tuned = sp.attach(CASE["conv1d"].model(), sp.IA3(targets=["c_attn", "c_proj"]))
    with torch.no_grad():
        for _, adapter in tuned.adapters_of("default"):
            adapter.scale_out.fill_(1.25)
    ref = {n: m.weight * 1.5 for n, m in (("c_attn", tuned.model.c_attn.base_layer), ("c_proj", tuned.model.c_proj.base_layer))}
    for row in A.report(tuned, reference=ref, top=3):
        W, (U, S, Vh) = _w2d(tuned, row.layer)
        torch.testing.assert_close(torch.tensor(row.change_rates), torch.full_like(S, 0.25), atol=1e-5, rtol=0)
        assert row.relative_delta_norm == pytest.approx(0.25, rel=1e-5)
        assert row.effective_rank == pytest.approx(A.effective_rank(W), rel=1e-4)
        assert row.overlap == pytest.approx(1.0, abs=1e-5)
        assert row.distance_to_reference == pytest.approx(0.5, rel=1e-5)


def test_report_notes_unmeasurable_layers_and_bad_input():
    tuned = sp.attach(CASE["mlp"].model(), sp.LoRA(r=2, targets=["fc1"], mpc="n"))  # non-mergeable
    rows = A.report(tuned)
    assert len(rows) == 1 and not rows[0].measured and "not mergeable" in rows[0].note
    assert "not mergeable" in rows.to_table()
    tuned = sp.attach(CASE["mlp"].model(), sp.LoRA(r=2, targets=["fc1"]))  # B = 0: ΔW = 0
    (row,) = A.report(tuned)
    assert row.delta_norm == 0.0 and row.effective_rank == 0.0 and row.overlap is None and row.note == "ΔW = 0"
    with pytest.raises(A.AnalysisError, match="no weight for layer 'fc1'"):
        A.report(tuned, reference={"fc2.weight": torch.zeros(7, 10)})
    with pytest.raises(A.AnalysisError, match=r"\(10, 6\)"):
        A.report(tuned, reference={"fc1": torch.zeros(6, 10)})
    with pytest.raises(A.AnalysisError, match="no adapter named"):
        A.report(tuned, adapter_name="other")
    with pytest.raises(A.AnalysisError, match="TunedModel"):
        A.report(torch.nn.Linear(2, 2))


def test_report_reference_model_and_svd_cache():
    model = CASE["mlp"].model()
    reference = CASE["mlp"].model(seed=1)  # the same architecture: its weights are the "full fine-tune"
    tuned = sp.attach(model, sp.LoRA(r=2, targets=["fc1", "fc2"]))
    with torch.no_grad():
        for _, adapter in tuned.adapters_of("default"):
            adapter.lora_B.normal_()
    rows = A.report(tuned, reference=reference)
    for row in rows:
        layer = dict(tuned.adapted_layers())[row.layer]
        W = layer.base_layer.weight
        W_tuned = W + layer.adapters["default"].delta_weight().detach()
        W_ref = reference.get_submodule(row.layer).weight.detach()
        assert row.distance_to_reference == pytest.approx(float((W_ref - W_tuned).norm() / (W_ref - W).norm()), rel=1e-5)
        D, D_ref = W_tuned - W, W_ref - W
        cos = float((D * D_ref).sum() / (D.norm() * D_ref.norm()))
        assert row.cosine_to_reference == pytest.approx(cos, rel=1e-5, abs=1e-7)
        assert row.norm_ratio_to_reference == pytest.approx(float(D.norm() / D_ref.norm()), rel=1e-5)
        # the three are tied: distance² = 1 + ρ² − 2ρ·cos
        rho = row.norm_ratio_to_reference
        assert row.distance_to_reference ** 2 == pytest.approx(1 + rho**2 - 2 * rho * row.cosine_to_reference, rel=1e-4)
    # one SVD of W per matrix, reused while the weight is unchanged, redone after it changes
    A.clear_cache()
    before = sum(svd_service.stats.values())
    fc1 = tuned.model.fc1.base_layer
    first = A.weight_svd(fc1, "linear")[1]
    assert A.weight_svd(fc1, "linear")[1] is first
    assert sum(svd_service.stats.values()) == before + 1
    with torch.no_grad():
        fc1.weight.mul_(2.0)
    again = A.weight_svd(fc1, "linear")[1]
    assert again is not first
    torch.testing.assert_close(again.S, 2 * first.S)
    torch.testing.assert_close(again.S, svd(fc1.weight).S)


def test_tuned_analyze_is_the_report():
    import subpeft as sp

    from .tiny_models import MLP

    torch.manual_seed(0)
    tuned = sp.attach(MLP(), sp.LoRA(r=2, targets=["fc1", "fc2"]))
    with torch.no_grad():
        for _, a in tuned.adapters_of("default"):
            a.lora_B.normal_()
    rows = tuned.analyze()
    expected = sp.analysis.report(tuned)
    assert rows.to_dict() == expected.to_dict()
    assert [r.layer for r in rows] == ["fc1", "fc2"] and all(r.delta_norm > 0 for r in rows)
