"""Outer (SVD / AwSVD / random) and inner (zeros / gaussian / uniform / sqrt_sigma) initialisation, as pure functions
on tensors and through the layer."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model

import _models as M
import nora
import nora.init as init_module
from conftest import config_kwargs
from nora.config import AUTO_FULL_MAX_DIM
from nora.init import (
    activation_scale,
    init_inner,
    init_outer,
    outer_awsvd,
    outer_random,
    outer_svd,
    reconstruction_error,
    resolve_svd_method,
    truncated_svd,
)
from nora.layer import inner_shapes


def random_matrix(m: int, n: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed)).to(dtype)


def decaying_matrix(m: int, n: int, decay: float = 0.9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """W = U diag(decay^i) V^T with random orthonormal U, V; returns (W, sigma)."""
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=gen))
    V, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=gen))
    sigma = decay ** torch.arange(min(m, n), dtype=torch.float32)
    return (U * sigma) @ V.T, sigma


# ---------------------------------------------------------------------------------------------------------------------
# outer factors


@pytest.mark.parametrize("svd_method", ["full", "randomized", "randomized_bf16"])
def test_awsvd_with_unit_scale_is_plain_svd(svd_method):
    W = random_matrix(40, 24)
    svd = outer_svd(W, 8, svd_method=svd_method, seed=3)
    aw = outer_awsvd(W, torch.ones(24), 8, svd_method=svd_method, seed=3)
    torch.testing.assert_close(aw.B, svd.B, atol=1e-5, rtol=0)
    torch.testing.assert_close(aw.A, svd.A, atol=1e-5, rtol=0)
    torch.testing.assert_close(aw.sigma, svd.sigma, atol=1e-5, rtol=0)


def test_awsvd_with_constant_statistics_matches_svd_in_the_model():
    """Uniform channel statistics (S = c I) give the same product B A as plain SVD through get_peft_model."""
    torch.manual_seed(0)
    lin_svd = get_peft_model(M.OneLinear(24, 16), nora.NoraConfig(r=6, r_inner=3, target_modules=["lin"]))
    torch.manual_seed(0)
    base = M.OneLinear(24, 16)
    nora.set_calibration(base, {"lin": torch.ones(16)})
    lin_aw = get_peft_model(base, nora.NoraConfig(r=6, r_inner=3, target_modules=["lin"], outer_init="awsvd"))
    a, b = lin_svd.base_model.model.lin, lin_aw.base_model.model.lin
    torch.testing.assert_close(a.nora_B["default"], b.nora_B["default"], atol=1e-5, rtol=0)
    torch.testing.assert_close(a.nora_A["default"], b.nora_A["default"], atol=1e-5, rtol=0)


def test_svd_factors_are_the_truncated_svd():
    W = random_matrix(30, 20)
    B, A, sigma = outer_svd(W, 5)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(sigma, S[:5])
    torch.testing.assert_close(B @ A, (U[:, :5] * S[:5]) @ Vh[:5], atol=1e-5, rtol=0)
    torch.testing.assert_close(A @ A.T, torch.eye(5), atol=1e-5, rtol=0)  # A = V_r^T has orthonormal rows
    # full rank reproduces W
    B, A, _ = outer_svd(W, 20)
    torch.testing.assert_close(B @ A, W, atol=1e-5, rtol=0)


def test_randomized_svd_matches_full_svd_on_decaying_spectrum():
    """sigma_i = 0.9^i, W 256 x 512, r = 32 (q = r + 16 oversampling, 4 power iterations).

    Tolerance: the randomized factorisation's relative reconstruction error ||W - BA|| / ||W|| is within 0.1 % of the
    full SVD's (which is optimal, Eckart-Young), and its top-r singular values agree within 1e-4 absolute."""
    W, sigma = decaying_matrix(256, 512)
    r = 32
    full = outer_svd(W, r, svd_method="full")
    rand = outer_svd(W, r, svd_method="randomized", niter=4, oversample=16, seed=0)
    err_full, err_rand = reconstruction_error(W, full.B, full.A), reconstruction_error(W, rand.B, rand.A)
    optimal = float(sigma[r:].norm() / sigma.norm())
    assert err_full == pytest.approx(optimal, rel=1e-4)
    assert err_rand <= err_full * 1.001
    torch.testing.assert_close(rand.sigma, full.sigma, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("decay", "tol"), [(0.9, 2e-3), (0.995, 5e-4)])
def test_bf16_randomized_svd_matches_the_float32_one(decay, tol):
    """Same knobs, same residual as torch.svd_lowrank (the sketches differ: each draws its own Gaussian). bf16
    rounding (u = 2^-8 relative per entry) perturbs the subspace found; its effect on the residual
    res = ||W - BA|| / ||W|| is second order, about (u / res)^2 relative:
    0.1 % on a fast spectrum (0.9^i, res 3.4 %; tol 0.2 %), negligible next to the randomness of the sketch on a
    flat one (0.995^i, res 84 %, the case of LLM weights; tol 0.05 %). Its factors come from a float32
    Rayleigh-Ritz step: A = V_r^T has orthonormal rows to 1e-5, which bf16 arithmetic alone could not give."""
    W, sigma = decaying_matrix(256, 512, decay=decay)
    r = 32
    kwargs = {"niter": 4, "oversample": 16, "seed": 0}
    full = outer_svd(W, r, svd_method="full")
    fp32 = outer_svd(W, r, svd_method="randomized", **kwargs)
    bf16 = outer_svd(W, r, svd_method="randomized_bf16", **kwargs)
    err = {k: reconstruction_error(W, f.B, f.A) for k, f in (("full", full), ("fp32", fp32), ("bf16", bf16))}
    assert err["bf16"] == pytest.approx(err["fp32"], rel=tol)
    assert err["bf16"] >= err["full"] * (1 - 1e-6)  # Eckart-Young: nothing beats the exact SVD
    assert not torch.equal(bf16.B, fp32.B)  # a different computation, not a fall-back to the float32 one
    assert bf16.B.dtype == bf16.A.dtype == bf16.sigma.dtype == torch.float32
    torch.testing.assert_close(bf16.A @ bf16.A.T, torch.eye(r), atol=1e-5, rtol=0)
    if decay == 0.9:  # on the flat spectrum neither randomized SVD resolves sigma_r to better than ~2 %
        torch.testing.assert_close(bf16.sigma, full.sigma, atol=1e-3 * float(sigma[0]), rtol=0)


@pytest.mark.parametrize("fast", [True, False])
def test_auto_svd_is_exact_on_small_and_randomized_on_large_matrices(fast, monkeypatch):
    monkeypatch.setattr(init_module, "fast_bf16_matmul", lambda device: fast)
    large = "randomized_bf16" if fast else "randomized"
    assert resolve_svd_method("auto", (AUTO_FULL_MAX_DIM, 576)) == "full"
    assert resolve_svd_method("auto", (AUTO_FULL_MAX_DIM + 1, 576)) == large
    assert resolve_svd_method("auto", (14336, 4096)) == large
    assert resolve_svd_method("randomized_bf16", (8, 8)) == "randomized_bf16"
    assert resolve_svd_method("full", (14336, 4096)) == "full"
    assert resolve_svd_method("randomized", (8, 8)) == "randomized"
    W = random_matrix(64, 48)
    for x, y in zip(truncated_svd(W, 8, svd_method="auto"), truncated_svd(W, 8, svd_method="full")):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match=r"valid values are 'auto', 'full', 'randomized', 'randomized_bf16'"):
        resolve_svd_method("exact", (8, 8))


def test_auto_svd_in_the_layer_uses_the_randomized_svd_above_the_threshold(monkeypatch):
    """Above AUTO_FULL_MAX_DIM the layer's factors are exactly those of the seeded randomized SVD (threshold lowered
    so the test matrix stays small)."""
    monkeypatch.setattr(init_module, "AUTO_FULL_MAX_DIM", 16)
    weight = random_matrix(24, 20)
    auto = outer_svd(weight, 6, svd_method="auto", seed=5)
    large = "randomized_bf16" if init_module.fast_bf16_matmul("cpu") else "randomized"
    rand = outer_svd(weight, 6, svd_method=large, seed=5)
    full = outer_svd(weight, 6, svd_method="full")
    assert torch.equal(auto.B, rand.B) and torch.equal(auto.A, rand.A)
    assert not torch.equal(auto.B, full.B)


@pytest.mark.parametrize("svd_method", ["randomized", "randomized_bf16"])
def test_randomized_svd_is_seeded_and_leaves_global_rng_alone(svd_method):
    W = random_matrix(64, 48)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = truncated_svd(W, 8, svd_method=svd_method, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = truncated_svd(W, 8, svd_method=svd_method, seed=7)
    c = truncated_svd(W, 8, svd_method=svd_method, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_awsvd_lowers_activation_weighted_error_with_outlier_channels():
    """Input X with 4 channels 50x larger than the rest: AwSVD's ||(W - BA) X|| is well below plain SVD's."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(64, 48, generator=gen) / 8
    X = torch.randn(48, 2000, generator=gen)
    X[:4] *= 50
    scale = activation_scale(X.abs().mean(1), alpha=0.5, eps=1e-4)
    r = 8
    svd = outer_svd(W, r)
    aw = outer_awsvd(W, scale, r)
    err_svd = ((W - svd.B @ svd.A) @ X).norm()
    err_aw = ((W - aw.B @ aw.A) @ X).norm()
    assert err_aw < 0.5 * err_svd, (float(err_aw), float(err_svd))
    # and the weighted error reported by reconstruction_error agrees in direction
    assert reconstruction_error(W, aw.B, aw.A, scale) < reconstruction_error(W, svd.B, svd.A, scale)
    # while the unweighted error is (by Eckart-Young) no better than SVD's
    assert reconstruction_error(W, aw.B, aw.A) >= reconstruction_error(W, svd.B, svd.A) - 1e-6


def test_awsvd_eps_floor_keeps_zero_channels_finite():
    stats = torch.tensor([0.0, 0.0, 1e-12, 2.0, 4.0, 1.0])
    eps, alpha = 1e-4, 0.5
    scale = activation_scale(stats, alpha=alpha, eps=eps)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    torch.testing.assert_close(scale[:3], torch.full((3,), (eps * 4.0) ** alpha))
    torch.testing.assert_close(scale[3:], stats[3:] ** alpha)
    W = random_matrix(10, 6)
    B, A, sigma = outer_awsvd(W, scale, 4)
    assert torch.isfinite(B).all() and torch.isfinite(A).all() and torch.isfinite(sigma).all()


def test_awsvd_eps_floor_in_the_model_with_a_dead_channel():
    base = M.OneLinear(12, 10)
    x = torch.randn(5, 10)
    x[:, 3] = 0.0  # channel 3 never fires
    stats = nora.calibrate(base, nora.NoraConfig(r=4, r_inner=2, target_modules=["lin"]), [x], progress=False)
    assert stats["lin"][3] == 0
    model = get_peft_model(base, nora.NoraConfig(r=4, r_inner=2, target_modules=["lin"], outer_init="awsvd"))
    layer = model.base_model.model.lin
    assert torch.isfinite(layer.nora_A["default"]).all() and torch.isfinite(layer.nora_B["default"]).all()
    assert torch.isfinite(model(torch.randn(3, 10))).all()


def test_activation_scale_alpha():
    stats = torch.tensor([1.0, 4.0, 9.0])
    torch.testing.assert_close(activation_scale(stats, 0.5, 1e-4), torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(activation_scale(stats, 0.0, 1e-4), torch.ones(3))
    torch.testing.assert_close(activation_scale(stats, 1.0, 1e-4), stats)


def test_outer_random_is_seeded_and_svd_scaled():
    W = random_matrix(40, 30)
    a, b, c = outer_random(W, 6, seed=1), outer_random(W, 6, seed=1), outer_random(W, 6, seed=2)
    assert torch.equal(a.B, b.B) and torch.equal(a.A, b.A)
    assert not torch.equal(a.B, c.B)
    assert a.B.shape == (40, 6) and a.A.shape == (6, 30)
    row_norms = a.A.norm(dim=1)
    assert ((row_norms > 0.5) & (row_norms < 1.5)).all()  # rows of A ~ unit norm, like V_r^T


def test_outer_random_B_carries_the_svd_factors_frobenius_scale():
    """B ~ N(0, rms_sigma^2 / m) with rms_sigma = ||W||_F / sqrt(min(m, n)): ||B||_F^2 ~ r rms_sigma^2, the Frobenius
    scale of B = U_r Sigma_r for a flat spectrum; B scales linearly with W, A (~ unit rows) does not depend on W."""
    W = 3.0 * random_matrix(40, 30)  # rms_sigma / sqrt(m) = 3 here, so an unscaled B ~ N(0, 1) is off by 9x in energy
    rms_sigma = W.norm() / math.sqrt(30)
    f, g = outer_random(W, 6, seed=1), outer_random(0.01 * W, 6, seed=1)
    energy = f.B.pow(2).sum() / (6 * rms_sigma**2)
    assert 0.7 < energy < 1.3, energy  # chi^2 with 240 dof / 240: std 0.09
    torch.testing.assert_close(g.B, 0.01 * f.B, rtol=1e-5, atol=0)
    assert torch.equal(g.A, f.A)
    torch.testing.assert_close(f.sigma, torch.full((6,), float(rms_sigma)))


def test_outer_seeds_differ_per_module_but_agree_across_builds():
    def factors():
        torch.manual_seed(0)
        base = M.build("llama")
        model = get_peft_model(base, nora.NoraConfig(r=8, r_inner=4, outer_init="random"))
        return {k: v for k, v in model.state_dict().items() if ".nora_A." in k}

    a, b = factors(), factors()
    assert all(torch.equal(a[k], b[k]) for k in a)
    q, o = (next(v for k, v in a.items() if name in k) for name in ("q_proj", "o_proj"))
    assert not torch.equal(q, o)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("svd_method", ["full", "randomized", "randomized_bf16"])
def test_svd_runs_in_float32_and_is_stored_in_base_dtype(dtype, svd_method, monkeypatch):
    seen = []
    real_svd, real_lowrank = torch.linalg.svd, torch.svd_lowrank

    def spy_svd(a, *args, **kwargs):
        seen.append(a.dtype)
        return real_svd(a, *args, **kwargs)

    def spy_lowrank(a, *args, **kwargs):
        seen.append(a.dtype)
        return real_lowrank(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", spy_svd)
    monkeypatch.setattr(torch, "svd_lowrank", spy_lowrank)
    base = M.OneLinear(24, 20, dtype=dtype)
    weight = base.lin.weight.detach().clone()
    cfg = nora.NoraConfig(r=6, r_inner=3, target_modules=["lin"], svd_method=svd_method, inner_init="sqrt_sigma")
    layer = get_peft_model(base, cfg).base_model.model.lin
    assert seen and all(d == torch.float32 for d in seen), seen
    expected = outer_svd(weight, 6, svd_method=svd_method, seed=cfg.init_seed + _module_seed("lin"))
    assert expected.B.dtype == torch.float32
    assert layer.nora_B["default"].dtype == dtype and layer.nora_A["default"].dtype == dtype
    assert torch.equal(layer.nora_B["default"], expected.B.to(dtype))
    assert torch.equal(layer.nora_A["default"], expected.A.to(dtype))
    assert layer.nora_inner_B["default"].dtype == torch.float32


def _module_seed(name: str) -> int:
    from nora.layer import _stable_hash

    return _stable_hash(name)


def test_init_outer_dispatch():
    W = random_matrix(12, 10)
    assert torch.equal(init_outer(W, 4, "svd").B, outer_svd(W, 4).B)
    assert torch.equal(init_outer(W, 4, "random", seed=5).A, outer_random(W, 4, seed=5).A)
    scale = torch.linspace(0.5, 2.0, 10)
    assert torch.equal(init_outer(W, 4, "awsvd", scale=scale).A, outer_awsvd(W, scale, 4).A)
    with pytest.raises(ValueError, match=r"needs activation statistics"):
        init_outer(W, 4, "awsvd")


# ---------------------------------------------------------------------------------------------------------------------
# inner factors


@pytest.mark.parametrize("structure", ["nested", "output", "parallel", "adapter"])
def test_inner_shapes(structure):
    m, r, ri = 20, 8, 3
    expected = {
        "nested": ((r, ri), (ri, r)),
        "output": ((m, ri), (ri, m)),
        "parallel": ((m, ri), (ri, r)),
        "adapter": ((r, r), None),
    }[structure]
    assert inner_shapes(structure, m, r, ri) == expected


def test_inner_zeros():
    B, A = init_inner("zeros", (64, 32), (32, 64), None, std=0.02)
    assert B.dtype == A.dtype == torch.float32
    assert torch.equal(B, torch.zeros(64, 32))
    assert A.std().item() == pytest.approx(0.02, rel=0.1)
    R, none = init_inner("zeros", (8, 8), None, None, std=0.02)
    assert none is None and torch.equal(R, torch.zeros(8, 8))


def test_inner_gaussian_and_uniform():
    std = 0.05
    B, A = init_inner("gaussian", (64, 32), (32, 64), None, std=std)
    for t in (B, A):
        assert t.std().item() == pytest.approx(std, rel=0.1) and abs(t.mean().item()) < 0.01
    B, A = init_inner("uniform", (64, 32), (32, 64), None, std=std)
    bound = math.sqrt(3) * std
    for t in (B, A):
        assert t.abs().max() <= bound
        assert t.std().item() == pytest.approx(std, rel=0.1)


@pytest.mark.parametrize("structure", ["nested", "output", "parallel", "adapter"])
def test_inner_sqrt_sigma_diagonal(structure):
    m, r, ri = 12, 6, 3
    sigma = torch.tensor([9.0, 4.0, 1.0, 0.25, 0.04, 0.01])
    shape_B, shape_A = inner_shapes(structure, m, r, ri)
    B, A = init_inner("sqrt_sigma", shape_B, shape_A, sigma, std=0.02)
    for t in (B, A) if A is not None else (B,):
        k = min(*t.shape)
        torch.testing.assert_close(torch.diagonal(t), sigma[:k].sqrt())
        off = t.clone()
        off[range(k), range(k)] = 0
        assert torch.equal(off, torch.zeros_like(t))


def test_unknown_inner_init_is_rejected():
    with pytest.raises(ValueError, match=r"valid values are"):
        init_inner("ones", (2, 2), (2, 2), None, std=0.02)


@pytest.mark.parametrize("structure", ["nested", "output", "parallel", "adapter"])
def test_documented_inits_through_the_layer(structure):
    """zeros: dW = 0 exactly; sqrt_sigma: diagonals are sqrt of W's top singular values; init_weights=False: random."""
    W = None
    for inner_init in ("zeros", "sqrt_sigma", "gaussian"):
        base = M.OneLinear(16, 12)
        W = base.lin.weight.detach().clone()
        cfg = nora.NoraConfig(
            **config_kwargs(r=6, r_inner=3, target_modules=["lin"], structure=structure, inner_init=inner_init)
        )
        layer = get_peft_model(base, cfg).base_model.model.lin
        inner_B = layer.nora_inner_B["default"]
        if inner_init == "zeros":
            assert torch.equal(inner_B, torch.zeros_like(inner_B))
            assert torch.equal(layer.get_delta_weight("default"), torch.zeros_like(W))
        elif inner_init == "sqrt_sigma":
            S = torch.linalg.svdvals(W)
            k = min(inner_B.shape)
            torch.testing.assert_close(torch.diagonal(inner_B), S[:k].sqrt(), atol=1e-5, rtol=0)
        else:
            assert inner_B.abs().sum() > 0
    base = M.OneLinear(16, 12)
    cfg = nora.NoraConfig(
        **config_kwargs(r=6, r_inner=3, target_modules=["lin"], structure=structure, init_weights=False)
    )
    layer = get_peft_model(base, cfg).base_model.model.lin
    assert layer.get_delta_weight("default").abs().sum() > 0
    assert layer.nora_inner_B["default"].abs().sum() > 0


def test_reconstruction_error():
    W = random_matrix(10, 8)
    assert reconstruction_error(W, torch.zeros(10, 2), torch.zeros(2, 8)) == pytest.approx(1.0)
    B, A, _ = outer_svd(W, 8)
    assert reconstruction_error(W, B, A) < 1e-5
    assert reconstruction_error(W, B, A, torch.rand(8) + 0.5) < 1e-5
