"""An independent reference for NoRA's weight update dW, written from the paper, not from nora's code.

It reads only the raw tensors of a wrapped layer by their state-dict names (`nora_B.<adapter>`, `nora_A.<adapter>`,
`nora_inner_B.<adapter>`, `nora_inner_A.<adapter>`) and the config (structure, r, r_inner, alpha), and multiplies them
left to right in float64 as the papers write them (NoRA v2, Tables 6-7; LoRA-XS for "adapter"):

    nested    dW = s B  B' A' A       B (m x r), B' (r x r'), A' (r' x r), A (r x n)
    output    dW = s B' A' B  A       B' (m x r'), A' (r' x m)
    parallel  dW = s C  A' A          C = B' (m x r'), A' (r' x r)
    adapter   dW = s B  R  A          R = B' (r x r)                       s = alpha / width,
                                                                            width = r (adapter) or r' (others),
                                                                            alpha = None -> s = 1
It never calls fold_factors, _factors, get_delta_weight, lora_factors or the layer's scaling dict, so a bug there
shows up as a difference from this oracle. (Like tests/_models.py, it does not import nora.)
"""

from __future__ import annotations

import torch
from transformers.pytorch_utils import Conv1D

FLOAT = torch.float64


def scaling(config) -> float:
    """s = alpha / width from the config alone (width = r for 'adapter', else r_inner; alpha None -> s = 1)."""
    if config.alpha is None:
        return 1.0
    width = config.r if config.structure == "adapter" else config.r_inner
    return float(config.alpha) / width


def raw_factors(layer, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The four stored tensors of one adapter, as float64 copies, looked up by their state-dict names."""
    state = layer.state_dict()
    out = {}
    for name in ("nora_B", "nora_A", "nora_inner_B", "nora_inner_A"):
        key = f"{name}.{adapter}"
        if key in state:
            out[name] = state[key].detach().to(FLOAT)
    return out


def delta_weight(layer, config, adapter: str = "default") -> torch.Tensor:
    """dW as an (m, n) = (out, in) float64 matrix, from the raw factors and the paper's formula."""
    f = raw_factors(layer, adapter)
    B, A, Bi = f["nora_B"], f["nora_A"], f["nora_inner_B"]
    Ai = f.get("nora_inner_A")
    m, r = B.shape
    assert A.shape[0] == r, (B.shape, A.shape)
    structure = config.structure
    if structure == "nested":
        assert Bi.shape == (r, config.r_inner) and Ai.shape == (config.r_inner, r)
        product = B @ Bi @ Ai @ A
    elif structure == "output":
        assert Bi.shape == (m, config.r_inner) and Ai.shape == (config.r_inner, m)
        product = Bi @ Ai @ B @ A
    elif structure == "parallel":
        assert Bi.shape == (m, config.r_inner) and Ai.shape == (config.r_inner, r)
        product = Bi @ Ai @ A
    elif structure == "adapter":
        assert Bi.shape == (r, r) and Ai is None
        product = B @ Bi @ A
    else:
        raise AssertionError(f"the oracle does not know structure {structure!r}")
    return scaling(config) * product


def delta_weight_in_layout(layer, config, adapter: str = "default") -> torch.Tensor:
    """dW in the base weight's storage layout: (in, out) for a transformers Conv1D, (out, in) otherwise."""
    delta = delta_weight(layer, config, adapter)
    return delta.T if isinstance(layer.get_base_layer(), Conv1D) else delta


def base_weight(layer) -> torch.Tensor:
    """The base weight as (out, in) float64."""
    base = layer.get_base_layer()
    weight = base.weight.detach().to(FLOAT)
    return weight.T if isinstance(base, Conv1D) else weight


def forward(layer, config, x: torch.Tensor, adapter: str = "default", adapter_input: torch.Tensor | None = None):
    """W x + b + dW x' in float64, where x' = adapter_input (e.g. a dropped-out x) or x."""
    base = layer.get_base_layer()
    x64 = x.to(FLOAT)
    h = x64 if adapter_input is None else adapter_input.to(FLOAT)
    out = x64 @ base_weight(layer).T + h @ delta_weight(layer, config, adapter).T
    if getattr(base, "bias", None) is not None:
        out = out + base.bias.detach().to(FLOAT)
    return out


def adapter_term(layer, config, x: torch.Tensor, adapter: str = "default") -> torch.Tensor:
    """dW x in float64 (the adapter's contribution alone)."""
    return x.to(FLOAT) @ delta_weight(layer, config, adapter).T


def abs_bound(layer, config, adapter: str = "default") -> torch.Tensor:
    """|s| |.| |.| |.| |.|: the elementwise product of absolute factors, an upper bound on the rounding scale of dW."""
    f = {k: v.abs() for k, v in raw_factors(layer, adapter).items()}
    B, A, Bi, Ai = f["nora_B"], f["nora_A"], f["nora_inner_B"], f.get("nora_inner_A")
    chain = {
        "nested": lambda: B @ Bi @ Ai @ A,
        "output": lambda: Bi @ Ai @ B @ A,
        "parallel": lambda: Bi @ Ai @ A,
        "adapter": lambda: B @ Bi @ A,
    }[config.structure]()
    return abs(scaling(config)) * chain
