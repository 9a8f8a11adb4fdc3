"""Gradient-informed NoRA inits (LoRA-SB, LoRA-One, LoRA-GA family): stream a few batches, then set the factors.

    model = get_peft_model(model, NoraConfig(inner_init="grad"))
    nora.gradient_init(model, config, batches)     # after get_peft_model, before training

Until it runs, the adapter's layers refuse to compute (their factors are placeholders). Notation (W is m x n,
dW = s B M A with the trained core M = B' A' (r x r), G = dL/dW at the base model, eta_1 = grad_first_step_lr *
grad_scale):

- grad_estimator="projected" accumulates only G_hat = B^T G A^T (r x r) per layer: a zero r x r core R is added as
  s-free term B R A x by a forward hook and autograd's R.grad is B^T G A^T. No m x n gradient is formed; cost
  O(r (m + n)) per token. The first-update target is the normalised surrogate K = -eta_1 r K_hat / ||K_hat||_F
  (the norm of one sign step on an r x r core), with K_hat = Q_B^T G Q_A in orthonormal coordinates.
- grad_estimator="sign" (LoRA-SB, faithful) materialises each targeted layer's float32 m x n gradient sum once
  (W.requires_grad during the stream) and uses dW_1 = -eta_1 sign(sum of G); K = Q_B^T dW_1 Q_A.
  outer_init="grad" needs it: B = U_r, A = V_r^T of the top-r SVD of dW_1 (then K = diag(S_r)).

With thin QRs B = Q_B R_B and A^T = Q_A R_A, K = P S Q^T (exact r x r SVD):

- inner_init="grad": B' = 0, A' = c Q_r'^T R_A^-T with ||A'||_F = inner_init_std sqrt(r r') (the RMS of the random
  init). Identity at init is exact; the first step of B' lands on the best rank-r' right subspace of the gradient.
- inner_init="grad_step": B' = R_B^-1 P_r' sqrt(S_r') / sqrt(s), A' = sqrt(S_r') Q_r'^T R_A^-T / sqrt(s), so
  s B B' A' A = Q_B trunc_r'(K) Q_A^T (Eckart-Young in W's Frobenius metric); structure "adapter":
  R = R_B^-1 K R_A^-T / s (LoRA-SB's R = diag(S_r) / s for outer_init="grad"). Not an identity: the model starts
  at W + trunc(dW_1), one truncated warmup-sized step ahead, with W unchanged (as LoRA-SB and LoRA-One do).

Under torch.distributed the sums and the batch count are all-reduced (SUM), the factors are computed on every rank
and broadcast from rank 0 (singular-vector signs can differ between devices).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .calibration import _to_device
from .config import NoraConfig
from .init import truncated_svd

# ------------------------------------------------------------------------------------------------ pure functions


def orthonormal_coordinates(B: torch.Tensor, A: torch.Tensor):
    """Thin QRs B = Q_B R_B (m x r, r x r) and A^T = Q_A R_A (n x r, r x r), in float32."""
    Q_B, R_B = torch.linalg.qr(B.detach().float())
    Q_A, R_A = torch.linalg.qr(A.detach().float().T)
    return Q_B, R_B, Q_A, R_A


def projected_to_orthonormal(G_hat: torch.Tensor, R_B: torch.Tensor, R_A: torch.Tensor) -> torch.Tensor:
    """K_hat = R_B^-T G_hat R_A^-1 = Q_B^T G Q_A, from G_hat = B^T G A^T."""
    left = torch.linalg.solve_triangular(R_B.T, G_hat.float(), upper=False)  # R_B^-T G_hat
    return torch.linalg.solve_triangular(R_A, left, upper=True, left=False)  # ... R_A^-1


def first_update_target(K_hat: torch.Tensor, first_step_lr: float, r: int) -> torch.Tensor:
    """Normalised surrogate of one Adam/sign step in orthonormal coordinates: -eta_1 r K_hat / ||K_hat||_F."""
    norm = K_hat.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("nora.gradient_init: the accumulated gradient is zero or non-finite for a layer.")
    return -first_step_lr * r * K_hat / norm


def grad_direction_inner_A(K: torch.Tensor, R_A: torch.Tensor, r_inner: int, std: float) -> torch.Tensor:
    """A' (r' x r) for inner_init='grad': the top-r' right singular directions of K mapped back through R_A."""
    _, _, Qh = torch.linalg.svd(K.float())
    inner_A = torch.linalg.solve_triangular(R_A.T, Qh[:r_inner], upper=False, left=False)  # Q_r'^T R_A^-T
    return inner_A * (std * math.sqrt(R_A.shape[0] * r_inner) / inner_A.norm().clamp_min(1e-30))


def grad_step_inner(
    K: torch.Tensor, R_B: torch.Tensor, R_A: torch.Tensor, r_inner: int | None, scaling: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B', A') with s B B' A' A = Q_B trunc_r'(K) Q_A^T; r_inner None: structure 'adapter', R = R_B^-1 K R_A^-T / s."""
    if r_inner is None:
        R = torch.linalg.solve_triangular(R_B, K.float(), upper=True)  # R_B^-1 K
        R = torch.linalg.solve_triangular(R_A.T, R, upper=False, left=False)  # ... R_A^-T
        return R / scaling, None
    P, S, Qh = torch.linalg.svd(K.float())
    root = S[:r_inner].sqrt() / math.sqrt(scaling)
    inner_B = torch.linalg.solve_triangular(R_B, P[:, :r_inner] * root, upper=True)
    inner_A = torch.linalg.solve_triangular(R_A.T, root[:, None] * Qh[:r_inner], upper=False, left=False)
    return inner_B, inner_A


# ------------------------------------------------------------------------------------------------ streaming


def _default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    if isinstance(batch, Mapping):
        out = model(**batch)
    elif isinstance(batch, (tuple, list)):
        out = model(*batch)
    else:
        out = model(batch)
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise ValueError(
            "nora.gradient_init: the model returned no loss for a batch; give the batches labels (e.g. "
            "batch['labels']) or pass loss_fn=lambda model, batch: <scalar loss>."
        )
    return loss


def _core_hook(B: torch.Tensor, A: torch.Tensor, core: torch.Tensor):
    """Forward hook adding B R A x with a zero r x r core R: autograd then gives R.grad = B^T G A^T."""

    def hook(module, args, kwargs, output):
        x = args[0] if args else next(iter(kwargs.values()))
        z = F.linear(x.float(), A.float())  # (.., r)
        return output + F.linear(F.linear(z, core), B.float()).to(output.dtype)  # (.., m)

    return hook


def _weight_grad_mn(layer) -> torch.Tensor | None:
    grad = layer.get_base_layer().weight.grad
    if grad is None:
        return None
    return grad.T if layer.fan_in_fan_out else grad


def gradient_init(
    model: nn.Module,
    config: NoraConfig,
    batches: Iterable[Any],
    *,
    adapter_name: str = "default",
    max_batches: int | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    train_mode: bool = False,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Fill the gradient-informed factors of `adapter_name` (see the module docstring); returns per-layer facts.

    `model` is the model returned by `get_peft_model(model, config)`. `batches` yields dicts (`model(**batch)`),
    tuples or tensors whose output has a `.loss`; `loss_fn(model, batch)` overrides that. The gradient is taken at
    the base model (adapters disabled), with every parameter frozen, in eval mode unless `train_mode=True`
    (LoRA-SB keeps dropout on). Batches are averaged; `max_batches` stops early.
    """
    own = getattr(model, "peft_config", {}).get(adapter_name)
    if own is None:
        raise ValueError(
            f"nora.gradient_init: the model has no adapter {adapter_name!r}; call it on the model returned by "
            "get_peft_model(model, config), after get_peft_model."
        )
    if own is not config and own.to_dict() != config.to_dict():
        raise ValueError(f"nora.gradient_init: `config` is not the config of adapter {adapter_name!r}.")
    if not config.needs_gradient_init:
        raise ValueError(
            f"nora.gradient_init: adapter {adapter_name!r} has inner_init={config.inner_init!r} and "
            f"outer_init={config.outer_init!r}, which need no gradient; use inner_init='grad'/'grad_step' or "
            "outer_init='grad'."
        )
    full = config.grad_estimator == "sign"
    grads = accumulate_gradients(model, batches, adapter_name=adapter_name, full=full, max_batches=max_batches,
                                 loss_fn=loss_fn, train_mode=train_mode, progress=progress)  # fmt: skip
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    facts = {}
    for name, layer in _adapter_layers(model, adapter_name):
        factors, facts[name] = _layer_factors(layer, adapter_name, config, grads[name], full)
        for tensor in factors.values():
            if distributed:  # one rank's singular vectors for all (their signs can differ between devices)
                torch.distributed.broadcast(tensor, src=0)
        _write(layer, adapter_name, factors)
    return facts


def _adapter_layers(model: nn.Module, adapter_name: str):
    from .model import nora_layers

    return [(name, layer) for name, layer in nora_layers(model) if adapter_name in layer.nora_inner_B]


def accumulate_gradients(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    adapter_name: str = "default",
    full: bool = False,
    max_batches: int | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    train_mode: bool = False,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Mean over batches, at the base model, of G_hat = B^T G A^T (r x r) per NoRA layer of `adapter_name`, or of
    the m x n gradient G itself (`full=True`); float32, all-reduced (SUM of sums and batch counts) under
    torch.distributed. Every parameter's requires_grad, the adapters' enabled state and train/eval are restored."""
    layers = _adapter_layers(model, adapter_name)
    if not layers:
        raise ValueError(f"nora.gradient_init: no NoRA layer holds adapter {adapter_name!r}.")
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    disabled = {name: layer._disable_adapters for name, layer in layers}
    was_training = model.training
    sums: dict[str, torch.Tensor] = {}
    cores: dict[str, torch.Tensor] = {}
    handles = []
    seen = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for name, layer in layers:
            layer._disable_adapters = True  # the gradient is taken at the base model
            if full:
                weight = layer.get_base_layer().weight
                if getattr(layer, "quantization_backend", None) is not None or not weight.is_floating_point():
                    raise ValueError(
                        f"nora.gradient_init: {name} has a quantized base weight, which has no gradient; use "
                        "grad_estimator='projected' (needs no weight gradient) or a float base model."
                    )
                weight.requires_grad_(True)
            else:
                B, A = layer.nora_B[adapter_name], layer.nora_A[adapter_name]
                cores[name] = torch.zeros(B.shape[1], B.shape[1], device=B.device, requires_grad=True)
                handles.append(layer.register_forward_hook(_core_hook(B, A, cores[name]), with_kwargs=True))
        model.train(train_mode)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        for batch in tqdm(batches, desc="nora gradient_init", disable=not progress, total=max_batches):
            if max_batches is not None and seen >= max_batches:
                break
            (loss_fn or _default_loss)(model, _to_device(batch, device)).backward()
            for name, layer in layers:
                grad = _weight_grad_mn(layer) if full else cores[name].grad
                if grad is None:
                    continue
                sums[name] = grad.detach().float() + sums[name] if name in sums else grad.detach().float().clone()
                if full:
                    layer.get_base_layer().weight.grad = None
                else:
                    cores[name].grad = None
            seen += 1
    finally:
        for h in handles:
            h.remove()
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        for name, layer in layers:
            layer._disable_adapters = disabled[name]
        model.train(was_training)
    if seen == 0:
        raise ValueError("nora.gradient_init: the iterable yielded no batches; pass at least one batch.")
    missing = [name for name, _ in layers if name not in sums]
    if missing:
        raise ValueError(
            f"nora.gradient_init: {len(missing)} adapted modules got no gradient (e.g. {missing[0]!r}); make sure "
            "the loss depends on them, or exclude them via exclude_modules."
        )
    count = torch.tensor([float(seen)], device=next(iter(sums.values())).device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(count)
        for name, _ in layers:  # the same order on every rank
            torch.distributed.all_reduce(sums[name])
    return {name: total / count for name, total in sums.items()}


def _layer_factors(layer, adapter: str, config: NoraConfig, grad: torch.Tensor, full: bool):
    r, s, structure = layer.r[adapter], layer.scaling[adapter], layer.structure[adapter]
    eta = (config.grad_first_step_lr or 1.0) * config.grad_scale  # 'grad' only uses directions
    out: dict[str, torch.Tensor] = {}
    if full:
        update = -eta * torch.sign(grad)  # LoRA-SB: dW_1 = -eta_1 sign(sum of gradients)
        if config.outer_init == "grad":
            U, S, Vh = truncated_svd(update, r, svd_method=config.svd_method, niter=config.svd_niter,
                                     oversample=config.svd_oversample, seed=config.init_seed)  # fmt: skip
            out["B"], out["A"] = U.contiguous(), Vh.contiguous()
            eye = torch.eye(r, device=U.device)
            R_B, R_A, K = eye, eye, torch.diag(S)
        else:
            Q_B, R_B, Q_A, R_A = orthonormal_coordinates(layer.nora_B[adapter], layer.nora_A[adapter])
            K = Q_B.T @ update @ Q_A
    else:
        _, R_B, _, R_A = orthonormal_coordinates(layer.nora_B[adapter], layer.nora_A[adapter])
        K = projected_to_orthonormal(grad, R_B, R_A)
        if config.inner_init == "grad_step":
            K = first_update_target(K, eta, r)
    r_inner = None if structure == "adapter" else layer.r_inner[adapter]
    if config.inner_init == "grad":
        out["inner_A"] = grad_direction_inner_A(K, R_A, r_inner, config.inner_std_for("grad"))
        out["inner_B"] = torch.zeros_like(layer.nora_inner_B[adapter], dtype=torch.float32)
    elif config.inner_init == "grad_step":
        out["inner_B"], inner_A = grad_step_inner(K, R_B, R_A, r_inner, s)
        if inner_A is not None:
            out["inner_A"] = inner_A
    S = torch.linalg.svdvals(K.float())
    k = r if r_inner is None else r_inner
    facts = {"target_norm": float(S.norm()), "energy_in_r_inner": float(S[:k].square().sum() / S.square().sum())}
    return out, facts


@torch.no_grad()
def _write(layer, adapter: str, factors: Mapping[str, torch.Tensor]) -> None:
    for key, params in (("inner_B", layer.nora_inner_B), ("inner_A", layer.nora_inner_A)):
        if key in factors:
            params[adapter].data.copy_(factors[key].to(params[adapter].device, params[adapter].dtype))
    for key, buffers in (("B", layer.nora_B), ("A", layer.nora_A)):
        if key in factors:
            old = buffers[adapter]
            buffers[adapter] = factors[key].to(old.device, old.dtype).clone(memory_format=torch.contiguous_format)
    layer._outer_pending.pop(adapter, None)
