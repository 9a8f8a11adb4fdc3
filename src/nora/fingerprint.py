"""A cheap fingerprint of the base weights an adapter was built on, checked when the adapter is loaded.

Per adapted module: the weight's shape, its Frobenius norm and 8 evenly strided entries. Tolerances (rtol 1e-2)
accept the same base model in another float dtype (fp32 <-> bf16/fp16) but catch a different model or checkpoint.
"""

from __future__ import annotations

import math
import warnings
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


class BaseModelMismatchWarning(UserWarning):
    """A full NoRA adapter file was loaded onto a base whose weights differ from those it was trained on."""


def apply_fingerprint_policy(key: str, expected: Optional[dict], actual: Optional[dict], *, full_file: bool) -> bool:
    """What loading a NoRA adapter onto a base model does when the base differs from the recorded fingerprint.

    - same base (within tolerance), nothing recorded (`expected` None) or no weights (`actual` None): nothing;
    - another weight shape: REFUSES (ValueError); no adapter of that shape can load;
    - a full file (`full_file=True`: the frozen outer factors B, A are stored) defines dW = s B B' A' A completely,
      as a LoRA file defines B A: it WARNS (`BaseModelMismatchWarning`, naming the module and what differs) and loads;
    - a compact file (outer factors rebuilt from the base on load) would rebuild other factors from another base, so
      the trained inner factors would no longer mean anything: it REFUSES with a ValueError.

    Returns True if it warned. `NoraConfig.check_base_fingerprint=False` skips this function altogether (the
    caller's job; nora's loader also warns only for the first differing module of an adapter).
    """
    if expected is None or actual is None:
        return False
    problem = mismatch(expected, actual)
    if problem is None:
        return False
    if list(expected["shape"]) != list(actual["shape"]):
        raise ValueError(
            f"NoRA adapter does not fit this base model: module {key!r}: {problem}. The adapter was built for a "
            "model with other layer sizes; load the base model it was trained on."
        )
    if full_file:
        warnings.warn(
            f"NoRA adapter was trained on another base model: module {key!r}: {problem} (further modules not "
            "reported). The file stores its outer factors, so it loads and applies exactly the saved update dW, as "
            "a LoRA file would. If this base is intended, silence it: cfg = NoraConfig.from_pretrained(adapter_dir); "
            "cfg.check_base_fingerprint = False; PeftModel.from_pretrained(base, adapter_dir, config=cfg).",
            BaseModelMismatchWarning,
            stacklevel=4,
        )
        return True
    raise ValueError(
        f"NoRA adapter does not fit this base model: module {key!r}: {problem}. This is a compact adapter "
        "(save_outer_factors=False): its outer factors are rebuilt from the base on load, so they must come from the "
        "base model the adapter was trained on. Load that base, or re-save the adapter on it with "
        "save_outer_factors=True (a full file loads onto any base of the same shapes, with a warning)."
    )
