"""Compact adapter files (`NoraConfig.save_outer_factors=False`): save what rebuilds B and A, not B and A.

A compact file holds per NoRA module the trained inner factors, the AwSVD channel scales S (`nora_scale`, awsvd
only) and a verification record: the seeded sketches A Omega_A (`nora_sketch_A`, r x k) and Omega_B^T B
(`nora_sketch_B`, k x r) with fixed Gaussian Omega (k = SKETCH_COLS). On load the outer factors are rebuilt from the
base model the adapter is loaded onto and checked against the record before use:

1. rebuild B, A with the adapter's outer settings, the SVD in float64 (see below), rounded to the base weight's dtype;
2. if the rebuilt sketches differ from the record by more than `verify_tolerance` (per row of A / column of B,
   relative), align: within each cluster of (near-)equal singular values solve the small orthogonal Procrustes
   problem Q = argmin ||Q [A Omega_A, (Omega_B^T B)^T] - record|| (a sign for a simple singular value, a rotation
   for a repeated one), A <- Q A, B <- B Q^T, and check again;
3. still beyond tolerance: refuse with one error naming the module and the fix (re-save with save_outer_factors=True).

Why float64: an SVD is unique only up to signs and rotations within near-equal singular values, and a float32 SVD
run with another thread count, BLAS or device lands elsewhere by ~1e-7 / gap. On LLM spectra (flat around r) that
moves the logits of a trained adapter by 0.1-2 % (benchmarks/RESULTS.md, "Compact adapters"). In float64 the
perturbation is ~1e-16 / gap, so rounded to float32 the rebuilt factors are the saved ones; signs and exactly
repeated singular values are fixed by the alignment. Adapters meant to be saved compact therefore compute their
SVD in float64 from the start (`save_outer_factors=False` in the config passed to get_peft_model).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from . import patterns
from .config import NoraConfig
from .init import check_weight, init_outer

SKETCH_COLS = 4  # k: columns of each sketch; clusters of up to 2k equal singular values can be aligned
SKETCH_SEED = 0x4E6F5241  # "NoRA"
CLUSTER_RTOL = 1e-6  # singular values closer than this (relative to sigma_1) may rotate into each other
VERIFY_RTOL = 1e-5  # float32 rounding of the factors moves a sketch row by ~1e-7 relative
RECORD_KEYS = ("nora_sketch_A", "nora_sketch_B", "nora_scale")
_STATE_ATTR = "_nora_compact"  # per-layer {adapter: _State}


class _State(NamedTuple):
    """What a compact save needs of one adapter on one layer: its AwSVD channel scales and whether the outer SVD
    ran in float64 (the exactly reproducible rebuild)."""

    scale: torch.Tensor | None
    float64: bool


# the states without AwSVD scales, held once (not one object per layer and adapter: many adapters stay small)
_UNSCALED = {f64: _State(None, f64) for f64 in (False, True)}


class CompactAdapterError(ValueError):
    """A compact adapter file cannot be restored exactly on this base model."""


# ------------------------------------------------------------------------------------------------ bookkeeping
def remember(layer, adapter: str, config: NoraConfig, act_mean_abs: torch.Tensor | None) -> None:
    """Called when `adapter` is created on `layer`: keep the AwSVD scales and whether the SVD ran in float64."""
    from .init import activation_scale

    scale = None
    if config.outer_init == "awsvd" and act_mean_abs is not None:
        scale = activation_scale(act_mean_abs, config.awsvd_alpha, config.awsvd_eps).detach().cpu()
    _set_state(layer, adapter, scale, float64=not config.save_outer_factors)


def _set_state(layer, adapter: str, scale: torch.Tensor | None, float64: bool) -> None:
    state = layer.__dict__.setdefault(_STATE_ATTR, {})
    state[adapter] = _UNSCALED[float64] if scale is None else _State(scale, float64)


def remember_model(model, adapter: str, config: NoraConfig) -> None:
    """`remember` for every NoRA layer holding `adapter` (NoraModel.inject_adapter calls this)."""
    from .model import CALIBRATION_ATTR

    for _, layer in _nora_layers(model):
        if adapter in layer.nora_B:
            remember(layer, adapter, config, getattr(layer.get_base_layer(), CALIBRATION_ATTR, None))


def _state(layer, adapter: str) -> _State:
    return layer.__dict__.get(_STATE_ATTR, {}).get(adapter, _UNSCALED[False])


@functools.lru_cache(maxsize=64)
def _omega_cpu(dim: int, salt: int) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(SKETCH_SEED + salt)
    return torch.randn(dim, SKETCH_COLS, generator=gen, dtype=torch.float64)


def _omega(dim: int, salt: int, device) -> torch.Tensor:
    return _omega_cpu(dim, salt).to(device)


def sketches(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A Omega_A (r x k), Omega_B^T B (k x r)) in float64."""
    A64, B64 = A.detach().double(), B.detach().double()
    return A64 @ _omega(A.shape[1], 0, A.device), _omega(B.shape[0], 1, B.device).T @ B64


def verify_tolerance(dtype: torch.dtype) -> float:
    """Largest accepted relative sketch residual: VERIFY_RTOL, or a few units of the storage dtype's rounding."""
    return max(VERIFY_RTOL, 4 * torch.finfo(dtype).eps)


def layer_sketches(layer, B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`sketches(B, A)` cached on the layer while B, A are the same tensors (in-place version counter): loading N
    adapters that share one outer factorisation verifies against it without N float64 copies of B and A."""
    try:
        key = (id(B), id(A), B._version, A._version, B.data_ptr(), A.data_ptr())
    except RuntimeError:  # inference tensors have no version counter
        return sketches(B, A)
    cached = layer.__dict__.get("_nora_sketches")
    if cached is None or cached[0] != key:
        cached = layer.__dict__["_nora_sketches"] = (key, sketches(B, A))
    return cached[1]


def sketch_residual(B, A, record_A: torch.Tensor, record_B: torch.Tensor, got=None) -> float:
    """Max over rows of A and columns of B of ||sketch - record|| / ||record|| (rows far below the largest are
    measured relative to 1e-3 of it, so a column of B with sigma ~ 0 does not divide by ~0). `got`: the sketches of
    (B, A) if already computed."""
    got_A, got_B = sketches(B, A) if got is None else got

    def worst(diff: torch.Tensor, ref: torch.Tensor) -> float:
        ref_norm = ref.norm(dim=1)
        floor = ref_norm.max().clamp_min(1e-30) * 1e-3
        return float((diff.norm(dim=1) / ref_norm.clamp_min(floor)).max())

    rec_A, rec_B = record_A.to(got_A), record_B.to(got_B)
    return max(worst(got_A - rec_A, rec_A), worst((got_B - rec_B).T, rec_B.T))


# ------------------------------------------------------------------------------------------------ save
def compact_records(layer, adapter: str, module_name: str) -> dict[str, torch.Tensor]:
    """The verification record (and AwSVD scales) of one module, float32, keyed by RECORD_KEYS."""
    state = _state(layer, adapter)
    if not state.float64:
        raise ValueError(
            f"NoRA: cannot save adapter {adapter!r} as a compact file (save_outer_factors=False): module "
            f"{module_name!r} got its outer factors from a float32 SVD, which a rebuild on load cannot reproduce. "
            "Save with save_outer_factors=True, or set save_outer_factors=False in the NoraConfig passed to "
            "get_peft_model (the SVD then runs in float64) and train again."
        )
    sketch_A, sketch_B = sketches(layer.nora_B[adapter], layer.nora_A[adapter])
    out = {"nora_sketch_A": sketch_A.float().contiguous(), "nora_sketch_B": sketch_B.float().contiguous()}
    if state.scale is not None:
        out["nora_scale"] = state.scale.float().contiguous()
    return out


def filter_for_save(model, config: NoraConfig, adapter: str, to_return: dict) -> dict:
    """Save side (NoraModel._get_adapter_state_dict): for a compact config drop B, A and add the records. Keys keep
    the adapter name here (`<module>.nora_sketch_A.<adapter>`); PEFT strips it like every other key."""
    if config.save_outer_factors:
        return to_return
    outer = (f".nora_B.{adapter}", f".nora_A.{adapter}")
    out = {k: v for k, v in to_return.items() if not k.endswith(outer)}
    for name, layer in _nora_layers(model):
        if adapter not in layer.nora_B:
            continue
        for key, tensor in compact_records(layer, adapter, _base_key(name)).items():
            out[f"{name}.{key}.{adapter}"] = tensor
    return out


# ------------------------------------------------------------------------------------------------ load
def _nora_layers(model):
    from .layer import NoraLayer

    for name, module in model.named_modules():
        if isinstance(module, NoraLayer):
            yield name.removeprefix("_fsdp_wrapped_module."), module


def _base_key(name: str) -> str:
    """The module's name inside the base model (what update_layer saw as module_name and seeded with)."""
    return name.removeprefix("base_model.model.")


def is_compact(state_dict: dict) -> bool:
    return any(k.endswith(".nora_sketch_A") for k in state_dict)


def rebuild_outer(layer, config: NoraConfig, module_name: str, scale: torch.Tensor | None):
    """B, A, sigma (float64) exactly as update_layer builds them for a compact config."""
    from .layer import _stable_hash

    weight = layer._base_weight_mn()
    check_weight(weight, config.r, name=module_name)  # NaN / inf in the base: one clear error, not a bad rebuild
    kwargs = {}
    if hasattr(config, "outer_scaling"):
        kwargs["outer_scaling"] = config.outer_scaling
    return init_outer(
        weight,
        config.r,
        config.outer_init,
        scale=scale,
        seed=config.init_seed + _stable_hash(module_name),
        svd_method=config.svd_method,
        niter=config.svd_niter,
        oversample=config.svd_oversample,
        dtype=torch.float64,
        **kwargs,
    )


def clusters(sigma: torch.Tensor, rtol: float = CLUSTER_RTOL) -> list[list[int]]:
    """Runs of consecutive (descending) singular values within rtol * sigma_1 of their neighbour."""
    s = sigma.detach().double().cpu()
    tol = rtol * float(s.abs().max().clamp_min(1e-300))
    groups = [[0]]
    for i in range(1, s.numel()):
        if float(s[i - 1] - s[i]) <= tol:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def align(B: torch.Tensor, A: torch.Tensor, sigma, record_A, record_B) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate (B, A) within each cluster of equal singular values onto the recorded sketches (orthogonal
    Procrustes per cluster; a sign flip for a simple singular value). B A is unchanged."""
    B, A = B.double().clone(), A.double().clone()
    got_A, got_B = sketches(B, A)
    rec_A, rec_B = record_A.to(got_A), record_B.to(got_B)
    for idx in clusters(sigma):
        if len(idx) > 2 * SKETCH_COLS:
            continue  # too large to determine from the sketch; verification decides
        # normalise the B side so both sketches weigh alike (B's columns carry sigma)
        scale = float(rec_B[:, idx].norm() / max(rec_A[idx].norm(), 1e-300)) or 1.0
        X = torch.cat([got_A[idx], got_B[:, idx].T / scale], dim=1)
        Y = torch.cat([rec_A[idx], rec_B[:, idx].T / scale], dim=1)
        U, _, Vh = torch.linalg.svd(Y @ X.T)
        Q = U @ Vh  # (c, c) orthogonal
        A[idx] = Q @ A[idx]
        B[:, idx] = B[:, idx] @ Q.T
    return B, A


def restore_outer(model, config: NoraConfig, adapter: str, state_dict: dict) -> dict:
    """Load side (NoraModel._remap_adapter_state_dict_for_load): for a compact file, rebuild every module's B and A
    from the base model, verify / align them against the record and put them into the state dict under the model's
    keys; the record keys are removed. A full file is returned unchanged."""
    if not is_compact(state_dict):
        if not config.save_outer_factors and not any(f".nora_B.{adapter}" in k for k in state_dict):
            raise CompactAdapterError(
                "NoRA compact adapter file (save_outer_factors=False) holds no verification records: it is truncated "
                "or was not written by nora's save_pretrained. Re-save the adapter."
            )
        return state_dict
    out = dict(state_dict)
    for name, layer in _nora_layers(model):
        if adapter not in layer.nora_B:
            continue
        module = _base_key(name)
        keys = {k: _find(out, f"{name}.{k}") for k in RECORD_KEYS}
        if keys["nora_sketch_A"] is None or keys["nora_sketch_B"] is None:
            raise CompactAdapterError(
                f"NoRA compact adapter file lacks the verification record of module {module!r} "
                f"({name}.nora_sketch_A / nora_sketch_B): it is truncated or was not written by nora's "
                "save_pretrained. Re-save the adapter (with save_outer_factors=True to keep the outer factors)."
            )
        record_A, record_B = out.pop(keys["nora_sketch_A"]), out.pop(keys["nora_sketch_B"])
        scale = out.pop(keys["nora_scale"]) if keys["nora_scale"] is not None else None
        if config.outer_init == "awsvd" and scale is None:
            raise CompactAdapterError(
                f"NoRA compact adapter file lacks the AwSVD channel scales of module {module!r} ({name}.nora_scale): "
                "it is truncated. Re-save the adapter."
            )
        twin = _verified_twin(layer, adapter, config, getattr(model, "peft_config", {}), scale, record_A, record_B)
        if twin is not None:  # an identical outer factorisation is already loaded: no SVD (nora.sharing shares it)
            B, A = layer.nora_B[twin], layer.nora_A[twin]
        else:
            B, A = _restore_module(layer, config, module, scale, record_A, record_B)
        out[f"{name}.nora_B.{adapter}"], out[f"{name}.nora_A.{adapter}"] = B, A
        _set_state(layer, adapter, None if scale is None else scale.detach().float().cpu(), float64=True)
    return out


def _verified_twin(layer, adapter, config, configs: dict, scale, record_A, record_B) -> str | None:
    """Another adapter of `layer` with the same outer settings (and AwSVD scales) whose B, A pass this record."""
    from .sharing import outer_settings

    pending = getattr(layer, "_outer_pending", {})
    for other in layer.nora_B:
        if other == adapter or other in pending or other not in configs:
            continue
        state = _state(layer, other)
        if not state.float64 or outer_settings(configs[other]) != outer_settings(config):
            continue
        if (scale is None) != (state.scale is None):
            continue
        if scale is not None and not torch.equal(scale.detach().float().cpu(), state.scale):
            continue
        B, A = layer.nora_B[other], layer.nora_A[other]
        got = layer_sketches(layer, B, A)
        if sketch_residual(B, A, record_A, record_B, got=got) <= verify_tolerance(B.dtype):
            return other
    return None


def _find(state_dict: dict, key: str) -> str | None:
    for candidate in (key, f"base_model.model.{key}"):
        if candidate in state_dict:
            return candidate
    return None


def _restore_module(layer, config, module: str, scale, record_A, record_B) -> tuple[torch.Tensor, torch.Tensor]:
    weight = layer.get_base_layer().weight
    dtype = weight.dtype
    tol = verify_tolerance(dtype)

    def rounded(B, A):
        return (
            B.to(dtype).clone(memory_format=torch.contiguous_format),
            A.to(dtype).clone(memory_format=torch.contiguous_format),
        )

    config = patterns.module_config(config, module)  # rank_pattern: rebuild this module's r
    if record_A.shape != (config.r, SKETCH_COLS) or record_B.shape != (SKETCH_COLS, config.r):
        raise CompactAdapterError(
            f"NoRA compact adapter: the verification record of module {module!r} has shapes "
            f"{tuple(record_A.shape)} / {tuple(record_B.shape)}, expected ({config.r}, {SKETCH_COLS}) / "
            f"({SKETCH_COLS}, {config.r}); the file is corrupt or from another nora version. Re-save the adapter."
        )
    B64, A64, sigma = rebuild_outer(layer, config, module, scale)
    B, A = rounded(B64, A64)
    residual = sketch_residual(B, A, record_A, record_B)
    if residual > tol:
        B, A = rounded(*align(B64, A64, sigma, record_A, record_B))
        residual = sketch_residual(B, A, record_A, record_B)
    if residual > tol:
        raise CompactAdapterError(
            f"NoRA compact adapter does not fit this base model: the outer factors rebuilt for module {module!r} "
            f"differ from the saved ones (relative sketch residual {residual:.2e} > {tol:.0e}). Load it onto the "
            "exact base model (same weights and dtype) it was saved from, or re-save the adapter there with "
            "save_outer_factors=True (a full file carries B and A)."
        )
    return B, A
