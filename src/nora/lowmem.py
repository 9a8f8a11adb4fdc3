"""Rank-r activation memory: a NoRA training path whose autograd graph saves z = A x (r numbers per token), never x.

Every structure writes the adapter term as  delta = left @ M @ (A @ x)  with A (r x n) the frozen outer factor:

    structure   left (m x k)     M (k x r)        what the trained factors see
    nested      s B B'           A'               z = A x
    output      s B'             A' B             z = A x  (A'(B A x) = (A' B)(A x): still r per token)
    parallel    s C              A'               z = A x
    adapter     s B R            identity         z = A x

`left` and `M` are folded from the parameters by ordinary autograd ops (token-independent, cheap); the per-token
chain runs in `LowRankDelta`, a torch.autograd.Function that saves z and the small matrices only:

    forward   z = A x (r n per token), u = M z (k r), out = left u (m k)
    backward  u = M z (recomputed, k r), du = left^T g (m k), d left = sum g u^T (m k), d M = sum du z^T (k r),
              dx = (M A)^T du (k n, through the folded right matrix; exact because A is frozen)

Compared with the folded path (`F.linear(F.linear(x, A'A), left)`, which saves x: n numbers per token) it does
(r - k) n + r k more multiply-adds per token in the forward and k n - 2 r k fewer in the backward (no d(A'A) = du x^T).
Dropout runs in front of the function as `dropout_saving_mask`, so autograd saves its boolean mask (n bytes per
token, vs 4 n for an fp32 x; nn.Dropout's CPU kernel would save a float noise tensor as large as x): the mask, not x. Plain torch ops only, so it runs on any device; autocast is re-entered in backward
with the forward's state (what `torch.amp.custom_bwd` does, for whichever device the input lives on).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class LowRankDelta(torch.autograd.Function):
    """out = left @ M @ A @ x over the last dim of x, saving z = A x (not x). M=None means the identity (k = r)."""

    @staticmethod
    def forward(ctx, x, A, M, left):
        z = F.linear(x, A)  # (.., r)
        u = z if M is None else F.linear(z, M)  # (.., k)
        out = F.linear(u, left)  # (.., m)
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(z, A, M, left)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        z, A, M, left = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        needs_x, _, needs_M, needs_left = ctx.needs_input_grad
        grad_x = grad_M = grad_left = None
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            g = grad_out.reshape(-1, grad_out.shape[-1])  # (T, m)
            du = g @ left  # (T, k)
            if needs_left:
                u = z if M is None else F.linear(z, M)
                grad_left = (g.T @ u.reshape(-1, u.shape[-1])).to(left.dtype)  # (m, k)
            if needs_M:
                grad_M = (du.T @ z.reshape(-1, z.shape[-1])).to(M.dtype)  # (k, r)
            if needs_x:
                right = A if M is None else M @ A  # (k, n)
                grad_x = (du @ right).reshape(*grad_out.shape[:-1], A.shape[-1]).to(ctx.x_dtype)
        return grad_x, None, grad_M, grad_left


def factors(layer, adapter: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(left (m x k, with the scaling), M (k x r) or None, A (r x n)) of one adapter, in the inner factors' dtype."""
    if adapter in layer._outer_pending:
        layer._factors(adapter)  # raises the layer's own "outer factors never computed or loaded" error
    inner_B = layer.nora_inner_B[adapter]
    inner_A = layer.nora_inner_A.get(adapter)
    dtype = inner_B.dtype
    B, A = layer.nora_B[adapter].to(dtype), layer.nora_A[adapter].to(dtype)
    structure = layer.structure[adapter]
    if structure == "nested":
        left, M = B @ inner_B, inner_A
    elif structure == "output":
        left, M = inner_B, inner_A @ B
    elif structure == "parallel":
        left, M = inner_B, inner_A
    elif structure == "adapter":
        left, M = B @ inner_B, None
    else:
        raise ValueError(f"unknown structure {structure!r}")
    scaling = layer.scaling[adapter]
    return (left * scaling if scaling != 1 else left), M, A


def wants_low_memory(layer, adapter: str, x: torch.Tensor) -> bool:
    """Whether the adapter term of `adapter` runs through `LowRankDelta` (see `NoraConfig.activation_memory`).

    "low": whenever autograd records the call. "auto": the same, except for structure="adapter", whose folded path
    already saves only z (its right matrix A is frozen, so autograd keeps A x, not x) and is one matmul cheaper.
    Nothing is saved when autograd does not record (no_grad, inference), so both then take the cheaper folded path.
    """
    mode = layer.activation_memory.get(adapter, "auto")
    if mode == "folded" or not torch.is_grad_enabled():
        return False
    if mode == "auto" and layer.structure[adapter] == "adapter":
        return False
    records = x.requires_grad or layer.nora_inner_B[adapter].requires_grad
    return records


def dropout_saving_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout whose autograd node keeps a boolean mask (1 byte per element) and not a float noise tensor.

    nn.Dropout's CPU kernel computes x * noise with a float noise tensor, which autograd saves: as many bytes as x.
    Here the noise is drawn the same way (same RNG stream, so on CPU the same mask as nn.Dropout), turned into bool,
    and applied as (x * keep) * 1/(1-p): `mul` saves only the operand that does not require grad, i.e. the mask.
    """
    keep = torch.empty_like(x).bernoulli_(1 - p).bool()
    return (x * keep) * (1.0 / (1 - p))


def low_memory_delta(layer, adapter: str, x: torch.Tensor) -> torch.Tensor:
    """The adapter term s * B B' A' A dropout(x) of one adapter, saving z = A x (and dropout's bool mask) only."""
    left, M, A = factors(layer, adapter)
    drop = layer.nora_dropout[adapter]
    if isinstance(drop, torch.nn.Dropout) and drop.training and drop.p > 0:
        x = dropout_saving_mask(x, drop.p)
    else:
        x = drop(x)
    x = layer._cast_input_dtype(x, left.dtype)
    return LowRankDelta.apply(x, A, M, left)
