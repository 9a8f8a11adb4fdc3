"""`--quantize`: load the base model with a quantized (QLoRA-style) base, for `nora train` / `nora eval`.

| scheme | how |
|---|---|
| `nf4`, `fp4` | transformers `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=...)` |
| `int8` | transformers `BitsAndBytesConfig(load_in_8bit=True)` |
| `torchao-int8` | transformers `TorchAoConfig(Int8WeightOnlyConfig())` |
| `hqq4` | the float model, then every linear layer but `lm_head` replaced by hqq `HQQLinear` (4 bits, groups of 64) |

`quantize_linears` quantizes an already loaded model in place with any scheme (also `nf4-bf16` = nf4 with bfloat16
quant storage, the FSDP-QLoRA layout, and `torchao-int4` = torchao `IntxWeightOnlyConfig(torch.int4)`); the tests use
it on tiny models.
"""

from __future__ import annotations

import torch
from torch import nn

from . import HarnessError

#: schemes of the --quantize flag
SCHEMES = ("nf4", "fp4", "int8", "torchao-int8", "hqq4")
#: schemes `quantize_linears` also accepts
EXTRA_SCHEMES = ("nf4-bf16", "torchao-int4")
HQQ_GROUP_SIZE = 64


def check_scheme(scheme: str | None, allowed=SCHEMES) -> None:
    if scheme is not None and scheme not in allowed:
        raise HarnessError(f"unknown --quantize {scheme!r}; use one of {', '.join(allowed)}.")


def from_pretrained_kwargs(scheme: str | None) -> dict:
    """Extra `from_pretrained` kwargs for a scheme transformers quantizes at load time ({} otherwise)."""
    check_scheme(scheme)
    if scheme in ("nf4", "fp4", "int8"):
        from transformers import BitsAndBytesConfig

        if scheme == "int8":
            config = BitsAndBytesConfig(load_in_8bit=True)
        else:
            config = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=scheme, bnb_4bit_compute_dtype=torch.float32
            )
        return {"quantization_config": config, "device_map": "cpu" if not torch.cuda.is_available() else None}
    if scheme == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return {"quantization_config": TorchAoConfig(Int8WeightOnlyConfig())}
    return {}


def _quantized_linear(linear: nn.Linear, scheme: str) -> nn.Module:
    device, bias = linear.weight.device, linear.bias
    if scheme in ("nf4", "fp4", "nf4-bf16"):
        import bitsandbytes as bnb

        quant_type = scheme[:3]
        storage = torch.bfloat16 if scheme == "nf4-bf16" else torch.uint8
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=bias is not None, compute_dtype=linear.weight.dtype,
            quant_type=quant_type, quant_storage=storage, device="cpu",
        )  # fmt: skip
        layer.weight = bnb.nn.Params4bit(
            linear.weight.data.cpu().clone(), requires_grad=False, quant_type=quant_type, quant_storage=storage,
            compress_statistics=False,  # as transformers' default bnb_4bit_use_double_quant=False
        )  # fmt: skip
    elif scheme == "int8":
        import bitsandbytes as bnb

        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=bias is not None, has_fp16_weights=False, device="cpu"
        )
        layer.weight = bnb.nn.Int8Params(linear.weight.data.cpu().clone(), requires_grad=False, has_fp16_weights=False)
    elif scheme == "hqq4":
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        config = BaseQuantizeConfig(nbits=4, group_size=HQQ_GROUP_SIZE)
        return HQQLinear(linear, config, compute_dtype=linear.weight.dtype, device=str(device)).train(linear.training)
    else:
        raise HarnessError(f"unknown quantization scheme {scheme!r}")
    if bias is not None:
        layer.bias = nn.Parameter(bias.data.clone(), requires_grad=False)
    return layer.to(device).train(linear.training)  # bitsandbytes quantizes on the move


def quantize_linears(model: nn.Module, scheme: str, skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Quantize every nn.Linear of `model` (except names containing one of `skip`) in place; returns `model`."""
    check_scheme(scheme, SCHEMES + EXTRA_SCHEMES)
    if scheme.startswith("torchao"):
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_

        config = Int8WeightOnlyConfig() if scheme == "torchao-int8" else IntxWeightOnlyConfig(weight_dtype=torch.int4)
        quantize_(
            model, config, filter_fn=lambda m, name: isinstance(m, nn.Linear) and not any(s in name for s in skip)
        )
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and not any(s in name for s in skip):
                setattr(parent, name, _quantized_linear(child, scheme))
    return model


def check_adapter_base(adapter: str | None, scheme: str | None) -> None:
    """An adapter trained on a quantized base (its adapter_config records base_quantization) is loaded onto the same
    quantized base: refuse a missing --quantize with the fix instead of a fingerprint mismatch."""
    import json
    from pathlib import Path

    config_file = Path(adapter) / "adapter_config.json" if adapter else None
    if scheme is not None or config_file is None or not config_file.is_file():
        return
    recorded = json.loads(config_file.read_text()).get("base_quantization")
    if recorded:
        raise HarnessError(
            f"{adapter} was trained on a quantized base ({recorded.get('backend', recorded)}); load the same base "
            f"with --quantize ({', '.join(SCHEMES)}: the one used for nora train)."
        )
