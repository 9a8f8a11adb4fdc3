"""Export a NoRA adapter as a plain PEFT LoRA adapter (exact, no SVD) or as a merged model."""

from __future__ import annotations

import os
import re
from collections import Counter

import torch
from peft import LoraConfig
from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from .io import atomic_dir
from .model import NoraModel, nora_layers

_PEFT_PREFIX = "base_model.model."
#: NoraConfig.bias -> the LoraConfig.bias that trains and saves the same biases
_LORA_BIAS = {"none": "none", "all": "all", "nora_only": "lora_only"}


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The LoRA equivalent of a NoRA adapter: lora_A = A'A (k x n), lora_B = s B B' (m x k), lora_alpha = r = k.

    PEFT's LoRA scaling is lora_alpha / r = 1, so base + lora_B @ lora_A reproduces NoRA's output exactly (up to
    float rounding). k = r_inner (r for structure='adapter'). modules_to_save and biases trained with bias='all' /
    'nora_only' are carried over (LoraConfig bias 'all' / 'lora_only').
    """
    configs = getattr(model, "peft_config", {})
    if adapter_name not in configs:
        raise ValueError(
            f"export_lora: the model has no NoRA layers for adapter {adapter_name!r}; its adapters are "
            f"{sorted(configs) or '(none)'}. Pass a PeftModel from get_peft_model / PeftModel.from_pretrained."
        )
    config = configs[adapter_name]
    state: dict[str, torch.Tensor] = {}
    targets, fan_in_fan_out, ranks = set(), False, {}
    for name, layer in nora_layers(model):
        if adapter_name not in layer.nora_inner_B:
            continue
        lora_A, lora_B = layer.lora_factors(adapter_name)
        dtype = layer._base_dtype()  # a quantized base: the dtype it dequantizes to
        state[f"{name}.lora_A.weight"] = lora_A.to(dtype).contiguous()
        state[f"{name}.lora_B.weight"] = lora_B.to(dtype).contiguous()
        targets.add(name.removeprefix(_PEFT_PREFIX))
        fan_in_fan_out |= layer.fan_in_fan_out
        ranks[name.removeprefix(_PEFT_PREFIX)] = lora_A.shape[0]
    if not state:
        raise ValueError(f"export_lora: the model has no NoRA layers for adapter {adapter_name!r}.")
    rank = Counter(ranks.values()).most_common(1)[0][0]  # the most common k; the others by rank_pattern
    pattern = {t: k for t, k in ranks.items() if k != rank}  # r_inner_pattern: per-module k, each at scaling 1
    # everything PEFT saves besides NoRA's own tensors (modules_to_save, trained biases) is keyed exactly as a LoRA
    # adapter with the same modules_to_save / bias saves it, so take it from PEFT's own selection
    for key, value in get_peft_model_state_dict(model, adapter_name=adapter_name).items():
        if not key.rsplit(".", 1)[-1].startswith(NoraModel.prefix):
            state[key] = value.detach().contiguous()
    lora_config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        rank_pattern={re.escape(t): k for t, k in pattern.items()},
        alpha_pattern={re.escape(t): k for t, k in pattern.items()},
        target_modules=targets,
        fan_in_fan_out=fan_in_fan_out,
        bias=_LORA_BIAS[config.bias],
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        modules_to_save=config.modules_to_save,
    )
    return lora_config, state


def export_lora(model: nn.Module, out_dir: str | os.PathLike, adapter_name: str = "default") -> str:
    """Write a standard PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) that any LoRA runtime
    loads without nora: `PeftModel.from_pretrained(base, out_dir)`. Returns `out_dir`."""
    lora_config, state = lora_state_dict(model, adapter_name)
    with atomic_dir(out_dir) as tmp:
        lora_config.save_pretrained(str(tmp))
        save_file(state, str(tmp / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt", "exported_by": "nora"})
    return str(out_dir)


def export_merged(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None) -> nn.Module:
    """Merge every adapter into the base weights (`merge_and_unload`) and save the plain model (safetensors).

    The PeftModel is consumed: use the returned model afterwards.
    """
    merged = model.merge_and_unload()
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return merged
