"""Rank-r activation memory: a NoRA training path whose autograd graph saves z = A x (r numbers per token), never x.

Every structure writes the adapter term as  delta = s * left @ M @ (A @ x)  with A (r x n) the frozen outer factor:

    structure   left (m x k)     M (k x r)        what the trained factors see
    nested      B B'             A'               z = A x
    output      B'               A' B             z = A x  (A'(B A x) = (A' B)(A x): still r per token)
    parallel    C                A'               z = A x
    adapter     B R              identity         z = A x

`M` is folded from the parameters by ordinary autograd ops (k x r: r-wide, token-independent); `left` is folded inside
`LowRankDelta` from the frozen B (or none) and the trained inner factor, and recomputed in backward, so no m-wide
tensor is saved (an m x k fold saved per target is 5.25 MiB on a LLaMA-3-8B block, 6x z at 512 tokens). The per-token
chain runs in that torch.autograd.Function, which saves z, the small M and the resident factors only:

    forward   z = A x (r n per token), u = M z (k r), out = s L u (m k),  L = B R (m r k once per call)
    backward  L again (m r k), u = M z (k r), du = s L^T g (m k), d L = s sum g u^T (m k), d R = B^T d L (r m k),
              d M = sum du z^T (k r), dx = (M A)^T du (k n, through the folded right matrix; exact because A is frozen)

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
    """out = s * (B @ R) @ M @ A @ x over the last dim of x, saving z = A x (not x, nor the m x k fold B @ R).

    B (m x r, frozen) may be None (left = R); M=None means the identity (k = r). A and B are cast to R's dtype inside,
    so a cast copy is never saved either.
    """

    @staticmethod
    def forward(ctx, x, A, M, B, R, scaling):
        if ctx.needs_input_grad[1]:  # nora_A is a buffer: only a caller bypassing NoraLayer gets here
            raise ValueError(
                "LowRankDelta: the outer factor A requires grad, but this path saves A x instead of x, so it cannot "
                "give A a gradient. Freeze A (requires_grad_(False)), or use activation_memory='folded'."
            )
        dtype = R.dtype
        z = F.linear(x, A.to(dtype))  # (.., r)
        u = z if M is None else F.linear(z, M)  # (.., k)
        out = F.linear(u, _left(B, R, scaling))  # (.., m)
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.x_dtype, ctx.scaling = x.dtype, scaling
        ctx.save_for_backward(z, A, M, B, R)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        z, A, M, B, R = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        needs_x, _, needs_M, needs_B, needs_R, _ = ctx.needs_input_grad
        grad_x = grad_M = grad_B = grad_R = None
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            left = _left(B, R, ctx.scaling)  # (m, k), recomputed: never saved
            g = grad_out.reshape(-1, grad_out.shape[-1])  # (T, m)
            du = g @ left  # (T, k)
            if needs_B or needs_R:
                u = z if M is None else F.linear(z, M)
                grad_left = ctx.scaling * (g.T @ u.reshape(-1, u.shape[-1]))  # (m, k), d(s L)/dL folded in
                if B is None:
                    grad_R = grad_left.to(R.dtype)
                else:
                    if needs_R:
                        grad_R = (B.to(R.dtype).T @ grad_left).to(R.dtype)  # (r, k)
                    if needs_B:
                        grad_B = (grad_left @ R.T).to(B.dtype)  # (m, r)
            if needs_M:
                grad_M = (du.T @ z.reshape(-1, z.shape[-1])).to(M.dtype)  # (k, r)
            if needs_x:
                A_ = A.to(R.dtype)
                right = A_ if M is None else M @ A_  # (k, n)
                grad_x = (du @ right).reshape(*grad_out.shape[:-1], A.shape[-1]).to(ctx.x_dtype)
        return grad_x, None, grad_M, grad_B, grad_R, None


def _left(B: torch.Tensor | None, R: torch.Tensor, scaling: float) -> torch.Tensor:
    """s * B @ R (m x k), or s * R when there is no outer B."""
    left = R if B is None else B.to(R.dtype) @ R
    return left * scaling if scaling != 1 else left


def factors(layer, adapter: str):
    """(B (m x r, frozen) or None, R (m x k, trained), M (k x r) or None, A (r x n), scaling) of one adapter, so that
    its adapter term is s * (B @ R) @ M @ A x; B, A as stored (cast inside `LowRankDelta`)."""
    if adapter in layer._outer_pending:
        layer._factors(adapter)  # raises the layer's own "outer factors never computed or loaded" error
    inner_B = layer.nora_inner_B[adapter]
    inner_A = layer.nora_inner_A.get(adapter)
    B, A = layer.nora_B[adapter], layer.nora_A[adapter]
    structure = layer.structure[adapter]
    if structure == "nested":
        outer, M = B, inner_A
    elif structure == "output":
        outer, M = None, inner_A @ B.to(inner_A.dtype)
    elif structure == "parallel":
        outer, M = None, inner_A
    elif structure == "adapter":
        outer, M = B, None
    else:
        raise ValueError(f"unknown structure {structure!r}")
    return outer, inner_B, M, A, layer.scaling[adapter]


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
    outer, inner_B, M, A, scaling = factors(layer, adapter)
    drop = layer.nora_dropout[adapter]
    if isinstance(drop, torch.nn.Dropout) and drop.training and drop.p > 0:
        x = dropout_saving_mask(x, drop.p)
    else:
        x = drop(x)
    x = layer._cast_input_dtype(x, inner_B.dtype)
    return LowRankDelta.apply(x, A, M, outer, inner_B, scaling)
