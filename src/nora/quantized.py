"""NoRA on quantized base layers (QLoRA-style): dispatch by layer type, read-only dequantization, refusals.

NoRA never rewrites W: the frozen outer factors B, A come from a truncated SVD of the weight *dequantized to
float32* (a read-only copy), the forward is `quantized_base(x) + s * B B' A' A x` with x cast to the adapter's dtype,
and nothing is requantized at init. Supported, dispatched in this order (as PEFT LoRA's `dispatch_*` functions):

| base layer | backend | dequantized with |
|---|---|---|
| bitsandbytes `Linear4bit` (nf4 / fp4; uint8 or bf16 quant storage) | `Bnb4bitBackend` | `dequantize_4bit` into float32 |
| bitsandbytes `Linear8bitLt` | `Bnb8bitBackend` | `int8_vectorwise_dequant(w.data, SCB)` (read-only) |
| torchao weight-only (`Int8WeightOnlyConfig`, `IntxWeightOnlyConfig`) | `TorchaoBackend` | `weight.dequantize()` |
| hqq `HQQLinear` | `HqqBackend` | `layer.dequantize()` |

Every other quantized layer (optimum-quanto, GPTQ, AWQ, EETQ, AQLM, PEFT's forward-only backends) and any weight that
is not a plain float tensor gets one `TypeError` naming the type. Merging into a quantized layer requantizes (PEFT's
backends do it) and warns; `dequantize_base` turns the model back into float layers for an exact merge.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.quantization_utils import (
    Bnb4bitBackend,
    Bnb8bitBackend,
    ForwardOnlyQuantizationBackend,
    HqqBackend,
    QuantizationBackend,
    TorchaoBackend,
    resolve_quantization_backend,
)
from torch import nn
from transformers.pytorch_utils import Conv1D

#: Quantization libraries nora refuses, matched by the module path of the layer's (or weight's) classes, so the
#: library need not be importable: (label, module prefixes, class names).
REFUSED = (
    ("optimum-quanto", ("optimum.quanto",), ("QLinear",)),
    ("GPTQ", ("auto_gptq", "gptqmodel", "optimum.gptq"), ("QuantLinear", "BaseQuantLinear", "TorchQuantLinear")),
    ("AWQ", ("awq",), ("WQLinear_GEMM", "WQLinear_GEMV", "WQLinear_Exllama", "WQLinear_ExllamaV2")),
    ("EETQ", ("eetq",), ("EetqLinear",)),
    ("AQLM", ("aqlm",), ("QuantizedLinear",)),
)
_SUPPORTED_ROOTS = ("bitsandbytes", "torchao", "hqq")
_SUPPORTED_TEXT = "bitsandbytes Linear4bit / Linear8bitLt, torchao weight-only int8 / intx and hqq HQQLinear"


def _classes(module: nn.Module) -> list[type]:
    weight = getattr(module, "weight", None)
    return [*type(module).__mro__, *(type(weight).__mro__ if weight is not None else ())]


def _refused_label(module: nn.Module) -> str | None:
    for cls in _classes(module):
        for label, prefixes, names in REFUSED:
            if cls.__module__.startswith(prefixes) or cls.__name__ in names:
                return label
    return None


def _refuse(key: str, module: nn.Module, what: str) -> TypeError:
    return TypeError(
        f"NoRA: target module {key!r} is a {type(module).__module__}.{type(module).__name__} ({what}); NoRA cannot "
        f"read its weight to build the outer factors. Supported quantized layers: {_SUPPORTED_TEXT}. Load the base "
        "model unquantized or with one of those (e.g. transformers BitsAndBytesConfig(load_in_4bit=True)), or add the "
        "module to exclude_modules."
    )


def _is_plain_tensor(weight) -> bool:
    if type(weight) in (torch.Tensor, nn.Parameter):
        return True
    from torch.distributed.tensor import DTensor  # FSDP2 shards plain weights into DTensors

    return isinstance(weight, DTensor)


class NoraBnb4bitBackend(Bnb4bitBackend):
    """bitsandbytes 4-bit; `dequantize` decodes straight into float32 (not through the storage/compute dtype).

    On AVX512-BF16 CPUs an inference forward (eval, no grad) repacks the weight in place for bitsandbytes' CPU
    kernel, rounding the block scales to bfloat16; it is read back through bitsandbytes' inverse of that packing.
    """

    @staticmethod
    def _unpacked(base: nn.Module):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        data, state = base.weight.data, base.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            packed_absmax = state.absmax  # (n / blocksize, m) bfloat16: the packing transposed it
            data, state = _convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
            if not state.nested:  # bitsandbytes 0.50's inverse restores nested scales only; undo the transpose
                state.absmax = packed_absmax.T.reshape(-1).float()
        return data, state

    def dequantize(self, base: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        import bitsandbytes as bnb

        data, state = self._unpacked(base)
        state = copy.copy(state)
        state.dtype = dtype
        return bnb.functional.dequantize_4bit(data, state)

    def get_base_weight(self, base: nn.Module) -> torch.Tensor:
        return self.dequantize(base, self.dtype(base))

    def set_base_weight(self, peft_layer, weight_data: torch.Tensor) -> None:
        weight = peft_layer.get_base_layer().weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):  # requantize from the plain layout
            weight.data, weight.quant_state = self._unpacked(peft_layer.get_base_layer())
        super().set_base_weight(peft_layer, weight_data)

    def dtype(self, base: nn.Module) -> torch.dtype:
        state = base.weight.quant_state
        return getattr(state, "original_dtype", None) or state.dtype  # the CPU packing keeps the original here


class NoraBnb8bitBackend(Bnb8bitBackend):
    """bitsandbytes 8-bit, read through `int8_vectorwise_dequant`: PEFT's `dequantize_module_weight` on a CPU
    `Linear8bitLt` that has run a forward breaks its next forward."""

    def dequantize(self, base: nn.Module) -> torch.Tensor:
        import bitsandbytes as bnb

        scb = base.state.SCB if base.state.SCB is not None else base.weight.SCB
        return bnb.functional.int8_vectorwise_dequant(base.weight.data, scb).float()

    get_base_weight = dequantize

    def dtype(self, base: nn.Module) -> torch.dtype:
        return torch.float32  # Int8Params keeps no original dtype; the dequantized weight is float32


class NoraTorchaoBackend(TorchaoBackend):
    """torchao weight-only tensor subclasses; merging in place needs the quantization config to requantize."""

    def dequantize(self, base: nn.Module) -> torch.Tensor:
        return base.weight.dequantize().float()

    def dtype(self, base: nn.Module) -> torch.dtype:
        return base.weight.dtype

    def set_base_weight(self, peft_layer, weight_data: torch.Tensor) -> None:
        if self.get_apply_tensor_subclass is None:
            raise TypeError(
                "NoRA: cannot merge into a torchao layer in place: the model has no transformers TorchAoConfig to "
                "requantize with. Merge into the dequantized model instead: nora.dequantize_base(model), then "
                "merge_and_unload() (what `nora export --to merged` does)."
            )
        super().set_base_weight(peft_layer, weight_data)


class NoraHqqBackend(HqqBackend):
    """hqq `HQQLinear` (no `.weight`; `dequantize()` returns the weight in its compute dtype)."""

    def dequantize(self, base: nn.Module) -> torch.Tensor:
        return base.dequantize().float()

    def dtype(self, base: nn.Module) -> torch.dtype:
        return base.compute_dtype


_NORA_BACKENDS = {
    Bnb4bitBackend: NoraBnb4bitBackend,
    Bnb8bitBackend: NoraBnb8bitBackend,
    HqqBackend: NoraHqqBackend,
}


def resolve_backend(base: nn.Module, key: str = "", get_apply_tensor_subclass=None, **_: object):
    """The NoRA quantization backend of a base layer, None for a plain float layer; a TypeError for a quantized or
    tensor-subclass layer NoRA cannot read. Checked before the nn.Linear check (quanto's QLinear is an nn.Linear)."""
    key = key or type(base).__name__
    label = _refused_label(base)
    if label is not None:
        raise _refuse(key, base, f"{label} is not supported")
    roots = {cls.__module__.split(".")[0] for cls in _classes(base)}
    if roots & set(_SUPPORTED_ROOTS):  # import the backend libraries only for their own layers
        weight = getattr(base, "weight", None)
        if type(weight).__module__.startswith("torchao."):
            return NoraTorchaoBackend(get_apply_tensor_subclass)
        backend = resolve_quantization_backend(base)
        if isinstance(backend, ForwardOnlyQuantizationBackend):
            raise _refuse(key, base, f"PEFT's {backend.backend_name} backend has no dequantization")
        if backend is not None:
            return _NORA_BACKENDS[type(backend)]()
    if not hasattr(base, "weight"):
        return None  # not a weight layer at all: the caller's type check explains
    if not _is_plain_tensor(base.weight):
        weight = base.weight
        raise _refuse(key, base, f"its weight is a {type(weight).__module__}.{type(weight).__name__}")
    return None


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether `module` is a quantized linear layer NoRA supports (for target discovery, e.g. in calibration)."""
    if isinstance(module, (Conv1D, BaseTunerLayer)):  # a NoRA wrapper exposes its base layer's weight
        return False
    if not {c.__module__.split(".")[0] for c in _classes(module)} & set(_SUPPORTED_ROOTS):
        return False
    try:
        return resolve_backend(module) is not None
    except TypeError:
        return False


def read_weight_mn(base: nn.Module, backend: QuantizationBackend | None = None) -> torch.Tensor:
    """The base weight as (out, in): a float32 read-only dequantized copy for a quantized layer, else the weight."""
    if backend is not None:
        with torch.no_grad():
            return backend.dequantize(base).detach()
    return base.weight.T if isinstance(base, Conv1D) else base.weight


def warn_requantize(backend: QuantizationBackend) -> None:
    warnings.warn(
        f"Merging NoRA into a {backend.backend_name} quantized layer requantizes its weight, so the merged outputs "
        "differ from the unmerged ones by the requantization error. For an exact merge dequantize first: "
        "nora.dequantize_base(model), then merge_and_unload() (what `nora export --to merged` does).",
        UserWarning,
        stacklevel=3,
    )


def describe(model: nn.Module, base: nn.Module, backend: QuantizationBackend) -> dict:
    """The base's quantization config for the adapter metadata: transformers' quantization_config if the model has
    one, else what the layer itself records."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is not None:
        config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        return {"backend": backend.backend_name, **_jsonable(config)}
    info: dict = {"backend": backend.backend_name, "layer": type(base).__name__}
    weight = getattr(base, "weight", None)
    if isinstance(backend, NoraBnb4bitBackend):
        state = weight.quant_state
        info.update(quant_type=state.quant_type, blocksize=state.blocksize, quant_storage=str(weight.dtype))
    elif isinstance(backend, NoraTorchaoBackend):
        info["tensor"] = type(weight).__name__
    elif isinstance(backend, NoraHqqBackend):
        info.update(_jsonable(base.quant_config.get("weight_quant_params", {})))
    info["dtype"] = str(backend.dtype(base))
    return info


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out[k] = _jsonable(v)
        elif isinstance(v, (str, int, float, bool, type(None))):
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = [x if isinstance(x, (str, int, float, bool, type(None))) else str(x) for x in v]
        else:
            out[k] = str(v)
    return out


def _float_linear(base: nn.Module, backend: QuantizationBackend, dtype: torch.dtype | None) -> nn.Linear:
    weight = read_weight_mn(base, backend)
    dtype = dtype or backend.dtype(base)
    bias = getattr(base, "bias", None)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias.detach())
    linear.requires_grad_(False)
    return linear


def _quantized_modules(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Module, QuantizationBackend]]:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if is_quantized_linear(child):
                yield parent, name, child, resolve_backend(child)


def dequantize_base(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every supported quantized linear layer (adapted or not) by an nn.Linear holding its dequantized weight
    (in `dtype`, default the layer's own dequantized dtype), in place; NoRA layers then merge exactly. Returns model."""
    from .layer import NoraLayer

    for parent, name, child, backend in list(_quantized_modules(model)):
        setattr(parent, name, _float_linear(child, backend, dtype))
    for module in model.modules():
        if isinstance(module, NoraLayer):
            module.quantization_backend = None
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # the transformers model
    quantizer = getattr(inner, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(inner)  # a float model now: save_pretrained writes no quant config
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(inner, flag, False):
            setattr(inner, flag, False)
    return model
