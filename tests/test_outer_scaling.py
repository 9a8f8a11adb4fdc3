"""outer_scaling="orthonormal" (Sigma out of the frozen factors) and seed 000's parametrisation, as pure functions on
tensors and through the layer (issue 23)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import _models as M
import nora
from nora.init import init_outer, truncated_svd


def random_matrix(m: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed))


def eye(k: int) -> torch.Tensor:
    return torch.eye(k)


def test_orthonormal_svd_drops_sigma_from_B():
    W = random_matrix(40, 24)
    sig = init_outer(W, 8, "svd", svd_method="full")
    orth = init_outer(W, 8, "svd", svd_method="full", outer_scaling="orthonormal")
    torch.testing.assert_close(orth.B.T @ orth.B, eye(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(orth.A @ orth.A.T, eye(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(orth.B * orth.sigma, sig.B, atol=1e-5, rtol=0)  # B = U_r, B_sigma = U_r Sigma_r
    torch.testing.assert_close(orth.A, sig.A)
    U, S, Vh = truncated_svd(W, 8)
    torch.testing.assert_close((orth.B * S) @ orth.A, (U * S) @ Vh, atol=1e-5, rtol=0)


def test_orthonormal_awsvd_gives_the_scaled_problems_orthonormal_factors():
    """B = U_r and A = V_r^T S^-1 for the SVD of W S: B is orthonormal, A S has orthonormal rows, B Sigma A = (W S)_r S^-1."""
    W = random_matrix(30, 20, seed=1)
    s = torch.rand(20, generator=torch.Generator().manual_seed(2)) + 0.2
    orth = init_outer(W, 6, "awsvd", scale=s, svd_method="full", outer_scaling="orthonormal")
    sig = init_outer(W, 6, "awsvd", scale=s, svd_method="full")
    torch.testing.assert_close(orth.B.T @ orth.B, eye(6), atol=1e-5, rtol=0)
    AS = orth.A * s
    torch.testing.assert_close(AS @ AS.T, eye(6), atol=1e-5, rtol=0)
    assert (orth.A @ orth.A.T - eye(6)).abs().max() > 1e-2  # A itself is not orthonormal (S != I)
    torch.testing.assert_close((orth.B * orth.sigma) @ orth.A, sig.B @ sig.A, atol=1e-5, rtol=0)


def test_orthonormal_random_outer_is_orthonormal():
    W = random_matrix(30, 20)
    f = init_outer(W, 5, "random", seed=4, outer_scaling="orthonormal")
    torch.testing.assert_close(f.B.T @ f.B, eye(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(f.A @ f.A.T, eye(5), atol=1e-5, rtol=0)


def test_unknown_outer_scaling_is_refused():
    with pytest.raises(ValueError, match=r"unknown outer_scaling='unit'"):
        nora.NoraConfig(outer_scaling="unit")
    with pytest.raises(ValueError, match=r"unknown outer_scaling='unit'"):
        init_outer(random_matrix(4, 4), 2, "svd", outer_scaling="unit")
    with pytest.raises(ValueError, match=r"call nora.gradient_init\(model, config, batches\) after get_peft_model"):
        init_outer(random_matrix(4, 4), 2, "grad")


def test_orthonormal_outer_keeps_identity_at_init_and_buffers_are_orthonormal():
    torch.manual_seed(0)
    base = M.OneLinear(24, 16)
    x = torch.randn(3, 16)
    ref = base(x)
    model = get_peft_model(base, nora.NoraConfig(r=6, r_inner=3, target_modules=["lin"], outer_scaling="orthonormal"))
    layer = model.base_model.model.lin
    torch.testing.assert_close(model(x), ref, atol=0, rtol=0)  # B' = 0
    B, A = layer.nora_B["default"], layer.nora_A["default"]
    torch.testing.assert_close(B.T @ B, eye(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(A @ A.T, eye(6), atol=1e-5, rtol=0)


def test_seed000_sqrt_sigma_with_orthonormal_outer_starts_at_W_plus_its_rank_r_inner_part():
    """Seed 000: B = U, A = V^T, sqrt(sigma) on both inner diagonals -> dW = U_r' Sigma_r' V_r'^T (not an identity:
    the top r' singular values of W are doubled)."""
    torch.manual_seed(0)
    base = M.OneLinear(24, 16)
    W = base.lin.weight.detach().clone()
    cfg = nora.NoraConfig(r=6, r_inner=3, target_modules=["lin"], outer_scaling="orthonormal", inner_init="sqrt_sigma",
                          svd_method="full")  # fmt: skip
    layer = get_peft_model(base, cfg).base_model.model.lin
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(layer.get_delta_weight("default"), (U[:, :3] * S[:3]) @ Vh[:3], atol=1e-5, rtol=0)
    merged_sv = torch.linalg.svdvals(W + layer.get_delta_weight("default"))
    torch.testing.assert_close(merged_sv[:3], 2 * S[:3], atol=1e-4, rtol=0)
