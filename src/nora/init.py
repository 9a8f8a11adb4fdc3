"""Initialisation of NoRA factors as pure functions on tensors (testable without a model).

Outer factors (frozen):  W (m x n) ~= B (m x r) @ A (r x n)
    svd:    B = U_r Sigma_r,  A = V_r^T
    awsvd:  SVD of W S with S = diag(s_j),  B = U_r Sigma_r,  A = V_r^T S^-1
    random: Gaussian factors with the scale of the SVD ones (ablation)
With outer_scaling="orthonormal" Sigma stays out of the frozen factors: svd B = U_r, A = V_r^T; awsvd B = U_r,
A = V_r^T S^-1 (the orthonormal factors of the scaled problem W S); random B, A with orthonormal columns / rows.
Inner factors (trained): see `init_inner`; the gradient-informed ones live in `nora.gradient_init`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .config import AUTO_FULL_MAX_DIM, GRAD_INNER_INITS, INNER_INITS, OUTER_INITS, OUTER_SCALINGS, SVD_METHODS


class OuterFactors(NamedTuple):
    B: torch.Tensor  # (m, r)
    A: torch.Tensor  # (r, n)
    sigma: torch.Tensor  # (r,) singular values of W (or W S for awsvd)


def check_weight(weight: torch.Tensor, r: int, name: str = "weight", finite: bool = True) -> None:
    """Raise a clear error for a weight NoRA cannot factorise. `finite=False` skips the NaN / inf scan (a full pass
    with weight-sized temporaries): for adapters whose factors come from a checkpoint, where no SVD runs."""
    if not weight.is_floating_point():
        raise TypeError(
            f"{name}: NoRA needs a floating-point base weight, got dtype {weight.dtype} in a plain tensor, which no "
            "quantization backend describes (no scales to dequantize with). Load the model in float32/bfloat16/"
            "float16, or quantized with a supported backend: bitsandbytes (BitsAndBytesConfig), torchao weight-only "
            "or hqq (see nora.quantized)."
        )
    if weight.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D weight, got shape {tuple(weight.shape)}.")
    m, n = weight.shape
    if r > min(m, n):
        raise ValueError(
            f"{name}: outer rank r={r} exceeds min(out, in)=min({m}, {n})={min(m, n)}; choose r <= {min(m, n)}, give "
            f"this module its own r (rank_pattern={{'{name.rsplit('.', 1)[-1]}': {min(m, n)}}}) or exclude it "
            "(exclude_modules=[...])."
        )
    if finite and weight.device.type != "meta" and not torch.isfinite(weight).all():
        raise ValueError(f"{name}: the base weight contains NaN or inf; NoRA cannot factorise a non-finite weight.")


def fast_bf16_matmul(device: torch.device | str = "cpu") -> bool:
    """Whether bfloat16 GEMMs run natively (faster than float32) on `device`: CUDA GPUs with bf16 support (Ampere
    on), CPUs with AVX512-BF16 or AMX. Elsewhere bf16 products are emulated and can be slower than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private; absent on old torch / non-x86
        return any(getattr(torch.cpu, p, lambda: False)() for p in probes)
    return False


def resolve_svd_method(svd_method: str, shape: tuple[int, ...], device: torch.device | str = "cpu") -> str:
    """'full', 'randomized' or 'randomized_bf16'. 'auto' picks the exact SVD for matrices with
    max(m, n) <= AUTO_FULL_MAX_DIM; above it the randomized SVD, with bfloat16 products where `device` multiplies
    bf16 natively (`fast_bf16_matmul`; residual within 0.005 percentage points of torch.svd_lowrank's, 1.1-1.6x
    faster per LLaMA-3-8B-shaped matrix: benchmarks/RESULTS.md section 3b)."""
    if svd_method not in SVD_METHODS:
        raise ValueError(f"unknown svd_method={svd_method!r}; valid values are {', '.join(map(repr, SVD_METHODS))}.")
    if svd_method == "auto":
        if max(shape) <= AUTO_FULL_MAX_DIM:
            return "full"
        return "randomized_bf16" if fast_bf16_matmul(device) else "randomized"
    return svd_method


def truncated_svd(
    weight: torch.Tensor,
    r: int,
    svd_method: str = "full",
    niter: int = 4,
    oversample: int = 64,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r singular triplets of `weight`, computed in `dtype` (float32; float64 for compact adapters, whose
    factors must be rebuilt bit-for-bit on load): U (m x r), S (r,), Vh (r x n)."""
    svd_method = resolve_svd_method(svd_method, tuple(weight.shape), weight.device)
    if dtype == torch.float64 and svd_method == "randomized_bf16":
        svd_method = "randomized"  # bf16 products are not reproducible across thread counts; config refuses it
    w = weight.detach().to(dtype)
    if svd_method == "full":
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        return U[:, :r], S[:r], Vh[:r]
    q = min(r + oversample, *w.shape)
    if svd_method == "randomized_bf16":
        U, S, Vh = randomized_svd_bf16(w, q, niter, seed)
        return U[:, :r], S[:r], Vh[:r]
    with torch.random.fork_rng(devices=[w.device] if w.device.type == "cuda" else []):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(w, q=q, niter=niter)
    return U[:, :r], S[:r], V[:, :r].T


def randomized_svd_bf16(
    w: torch.Tensor, q: int, niter: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-q randomized SVD of a float32 `w` (Halko, Martinsson & Tropp 2011, Alg. 4.4: subspace iteration with a
    QR after every product) whose range finder multiplies in bfloat16 and orthonormalises in float32. The
    Rayleigh-Ritz step (Q^T W and its small SVD) runs in float32 on the exact W, so U S Vh is a full-precision
    projection of W onto the subspace found. bf16 rounding (u = 2^-8 per entry) only perturbs that subspace, which
    raises the truncated residual res = ||W - U S Vh|| / ||W|| by about (u / res)^2 relative: nothing measurable on
    LLM weights, whose spectra are flat (res 0.4-0.9 at r = 64; benchmarks/RESULTS.md section 3b), ~0.1 % when
    res is a few percent; for nearly low-rank W use 'randomized' or 'full'. Worth it where bf16 GEMMs are fast
    (CPUs with AVX512-BF16 or AMX, GPUs from Ampere on); elsewhere 'randomized' is the faster choice."""
    low = torch.bfloat16
    gen = torch.Generator(device=w.device).manual_seed(seed)
    w_low = w.to(low)
    omega = torch.randn(w.shape[1], q, generator=gen, device=w.device, dtype=torch.float32)
    basis = torch.linalg.qr((w_low @ omega.to(low)).float()).Q
    for _ in range(niter):
        basis = torch.linalg.qr((w_low.T @ basis.to(low)).float()).Q
        basis = torch.linalg.qr((w_low @ basis.to(low)).float()).Q
    del w_low
    Ub, S, Vh = torch.linalg.svd(basis.T @ w, full_matrices=False)
    return basis @ Ub, S, Vh


def activation_scale(mean_abs: torch.Tensor, alpha: float, eps: float) -> torch.Tensor:
    """AwSVD channel scales S_j = max(mean|x_j|, eps * max_k mean|x_k|) ** alpha (float32, strictly positive)."""
    stats = mean_abs.detach().to(torch.float32)
    peak = stats.max()
    if not torch.isfinite(stats).all() or peak <= 0:
        raise ValueError(
            "AwSVD calibration statistics are all zero or non-finite; calibrate on real inputs (nora.calibrate)."
        )
    return stats.clamp_min(eps * peak).pow(alpha)


def outer_svd(weight: torch.Tensor, r: int, orthonormal: bool = False, **svd_kwargs) -> OuterFactors:
    """B = U_r Sigma_r (orthonormal: B = U_r), A = V_r^T from a truncated SVD of W (float32)."""
    U, S, Vh = truncated_svd(weight, r, **svd_kwargs)
    return OuterFactors(U if orthonormal else U * S, Vh, S)


def outer_awsvd(
    weight: torch.Tensor, scale: torch.Tensor, r: int, orthonormal: bool = False, **svd_kwargs
) -> OuterFactors:
    """Activation-aware SVD: SVD of W S, B = U_r Sigma_r, A = V_r^T S^-1 (so B A ~= W, weighted by S).
    orthonormal: B = U_r, A = V_r^T S^-1, the orthonormal factors of the scaled problem (B A S = U_r V_r^T)."""
    if scale.shape != (weight.shape[1],):
        raise ValueError(
            f"AwSVD scale has shape {tuple(scale.shape)} but the weight has {weight.shape[1]} input channels."
        )
    dtype = svd_kwargs.get("dtype", torch.float32)
    s = scale.to(device=weight.device, dtype=dtype)
    U, S, Vh = truncated_svd(weight.to(dtype) * s, r, **svd_kwargs)
    return OuterFactors(U if orthonormal else U * S, Vh / s, S)


def outer_random(weight: torch.Tensor, r: int, seed: int = 0, orthonormal: bool = False) -> OuterFactors:
    """Gaussian outer factors with the Frobenius scale of the SVD factors (rows of A ~ unit norm); orthonormal: the
    Q factors of the same Gaussians (orthonormal columns of B and rows of A)."""
    m, n = weight.shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rms_sigma = weight.detach().float().norm() / math.sqrt(min(m, n))
    A = torch.randn(r, n, generator=gen) / math.sqrt(n)
    B = torch.randn(m, r, generator=gen) * (rms_sigma / math.sqrt(m))
    if orthonormal:
        B, A = torch.linalg.qr(B).Q, torch.linalg.qr(A.T).Q.T
    return OuterFactors(B.to(weight.device), A.to(weight.device), torch.full((r,), float(rms_sigma)))


def init_outer(
    weight: torch.Tensor,
    r: int,
    method: str,
    scale: torch.Tensor | None = None,
    seed: int = 0,
    outer_scaling: str = "sigma",
    **svd_kwargs,
) -> OuterFactors:
    """Dispatch on `outer_init` and `outer_scaling`; `weight` is (out, in) = (m, n)."""
    if outer_scaling not in OUTER_SCALINGS:
        raise ValueError(
            f"unknown outer_scaling={outer_scaling!r}; valid values are {', '.join(map(repr, OUTER_SCALINGS))}."
        )
    orthonormal = outer_scaling == "orthonormal"
    if method == "svd":
        return outer_svd(weight, r, orthonormal=orthonormal, seed=seed, **svd_kwargs)
    if method == "awsvd":
        if scale is None:
            raise ValueError("outer_init='awsvd' needs activation statistics: call nora.calibrate(...) first.")
        return outer_awsvd(weight, scale, r, orthonormal=orthonormal, seed=seed, **svd_kwargs)
    if method == "random":
        return outer_random(weight, r, seed=seed, orthonormal=orthonormal)
    if method == "grad":
        raise ValueError(
            "outer_init='grad' factors come from the task's gradient: call nora.gradient_init(model, config, batches) after "
            "get_peft_model (it replaces the placeholders)."
        )
    raise ValueError(f"unknown outer_init={method!r}; valid values are {', '.join(map(repr, OUTER_INITS))}.")


def init_inner(
    method: str, shape_B: tuple[int, int], shape_A: tuple[int, int] | None, sigma: torch.Tensor | None, std: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inner factors (B', A') in float32. `shape_A` is None for structure='adapter' (a single r x r matrix in B').

    zeros:      B' = 0, A' ~ N(0, std^2)          -> dW = 0 exactly (for 'adapter': R = 0)
    gaussian:   B', A' ~ N(0, std^2)
    uniform:    B', A' ~ U(-sqrt(3) std, sqrt(3) std)  (same variance as gaussian)
    sqrt_sigma: sqrt(sigma_i) on the diagonals (seed 000), zeros elsewhere. With outer_scaling="orthonormal"
                (B = U_r, A = V_r^T) this is seed 000's parametrisation, dW = U_r' Sigma_r' V_r'^T: the model starts
                at W + W_r', i.e. with the top r' singular values of W doubled (not an identity). With the default
                B = U_r Sigma_r it starts at W + U_r' Sigma_r'^2 V_r'^T, far from the base model.
    grad, grad_step: zero placeholders; `nora.gradient_init` computes them from the task's gradient.
    """

    def empty(shape):
        return torch.empty(shape, dtype=torch.float32)

    inner_B, inner_A = empty(shape_B), (empty(shape_A) if shape_A is not None else None)
    tensors = [t for t in (inner_B, inner_A) if t is not None]
    if method in GRAD_INNER_INITS:
        for t in tensors:
            t.zero_()
    elif method == "zeros":
        inner_B.zero_()
        if inner_A is not None:
            inner_A.normal_(0.0, std)
    elif method == "gaussian":
        for t in tensors:
            t.normal_(0.0, std)
    elif method == "uniform":
        bound = math.sqrt(3.0) * std
        for t in tensors:
            t.uniform_(-bound, bound)
    elif method == "sqrt_sigma":
        if sigma is None:
            raise ValueError("inner_init='sqrt_sigma' needs the singular values of the outer factorisation.")
        root = sigma.detach().float().clamp_min(0).sqrt().cpu()
        for t in tensors:
            t.zero_()
            k = min(*t.shape, root.numel())
            t[range(k), range(k)] = root[:k]
    else:
        raise ValueError(f"unknown inner_init={method!r}; valid values are {', '.join(map(repr, INNER_INITS))}.")
    return inner_B, inner_A


def reconstruction_error(weight: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scale: torch.Tensor | None = None):
    """||(W - B A) S||_F / ||W S||_F (S = I if scale is None): the activation-weighted error AwSVD minimises."""
    w = weight.detach().float()
    diff = w - B.detach().float() @ A.detach().float()
    if scale is not None:
        s = scale.to(w)
        diff, w = diff * s, w * s
    return float(diff.norm() / w.norm().clamp_min(1e-30))
