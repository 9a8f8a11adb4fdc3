"""A cheap fingerprint of the base weights an adapter was built on, checked when the adapter is loaded.

Per adapted module: the weight's shape, its Frobenius norm and 8 evenly strided entries. Tolerances (rtol 1e-2)
accept the same base model in another float dtype (fp32 <-> bf16/fp16) but catch a different model or checkpoint.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

SAMPLES = 8
RTOL = 1e-2


@torch.no_grad()
def weight_fingerprint(weight: torch.Tensor) -> Optional[dict]:
    """{'shape', 'norm', 'sample'} of a weight in (out, in) layout; None for weights without data (meta device)."""
    if weight.device.type == "meta":
        return None
    flat = weight.detach().reshape(-1)
    step = max(flat.numel() // SAMPLES, 1)
    sample = flat[::step][:SAMPLES].float().tolist()
    return {"shape": list(weight.shape), "norm": float(flat.float().norm()), "sample": [round(v, 6) for v in sample]}


def mismatch(expected: dict, actual: dict) -> Optional[str]:
    """Describe how `actual` differs from `expected`, or None if they match within tolerance."""
    if list(expected["shape"]) != list(actual["shape"]):
        return f"shape {tuple(actual['shape'])} != {tuple(expected['shape'])} recorded in the adapter"
    if not math.isclose(actual["norm"], expected["norm"], rel_tol=RTOL, abs_tol=1e-6):
        return f"weight norm {actual['norm']:.6g} != {expected['norm']:.6g} recorded in the adapter"
    for a, e in zip(actual["sample"], expected["sample"]):
        if not math.isclose(a, e, rel_tol=RTOL, abs_tol=1e-4):
            return f"sampled weight entries {actual['sample'][:3]}... != {expected['sample'][:3]}... recorded"
    return None
