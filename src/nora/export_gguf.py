"""Export a NoRA adapter as a llama.cpp LoRA adapter (GGUF) for Llama-architecture bases.

llama.cpp adds `scale * alpha / rank * lora_b @ (lora_a @ x)` to every adapted weight, with one `adapter.lora.alpha`
for the whole file and `rank` read from each tensor. NoRA's exact LoRA factors (`NoraLayer.lora_factors`: lora_A =
A'A (k x n), lora_B = s B B' (m x k), scaling 1) are written with alpha = rank = k, so llama.cpp's factor is 1.

Layout follows llama.cpp's `convert_lora_to_gguf.py`: tensor `<gguf weight name>.lora_a` holds lora_A as (k, n) and
`.lora_b` holds lora_B as (m, k) (numpy order; GGUF stores the dims reversed), F32. llama.cpp's Llama GGUFs store
attn_q / attn_k with their rows permuted for its rotary layout (`LlamaModel.permute` in `convert_hf_to_gguf.py`), so
lora_B of q_proj / k_proj gets the same row permutation; lora_A is unchanged.
"""

from __future__ import annotations

import os

import torch
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from .io import atomic_path
from .model import nora_layers

_PEFT_PREFIX = "base_model.model."
#: transformers `model_type`s whose GGUF architecture is llama.cpp's "llama" (same tensor names and q/k permutation)
LLAMA_MODEL_TYPES = ("llama",)


def _gguf():
    try:
        import gguf
    except ImportError as err:
        raise ImportError(
            "export_gguf needs the gguf package (llama.cpp's GGUF writer): pip install gguf (or nora-peft[harness])."
        ) from err
    return gguf


def _permute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's rotary row order for q/k: per head, interleave the two rotary halves (convert_hf_to_gguf.py)."""
    m = weight.shape[0]
    return weight.reshape(n_head, 2, m // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _base_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        raise ValueError(
            "export_gguf: the model has no transformers config (model.config.model_type), so its llama.cpp "
            "architecture is unknown. Pass a PeftModel over a transformers LlamaForCausalLM."
        )
    return getattr(config, "text_config", None) or config


def gguf_lora_tensors(model: nn.Module, adapter_name: str = "default") -> tuple[dict[str, torch.Tensor], int]:
    """({gguf tensor name: float32 tensor}, rank) of a NoRA adapter in llama.cpp's LoRA layout.

    Refuses what llama.cpp cannot represent: non-Llama bases, modules_to_save, trained biases, per-module ranks, and
    targets that have no llama.cpp weight (e.g. a tied lm_head).
    """
    gguf = _gguf()

    configs = getattr(model, "peft_config", {})
    if adapter_name not in configs:
        raise ValueError(
            f"export_gguf: the model has no NoRA layers for adapter {adapter_name!r}; its adapters are "
            f"{sorted(configs) or '(none)'}. Pass a PeftModel from get_peft_model / PeftModel.from_pretrained."
        )
    base = _base_config(model)
    if base.model_type not in LLAMA_MODEL_TYPES:
        raise ValueError(
            f"export_gguf: llama.cpp LoRA export supports Llama-architecture bases (model_type "
            f"{', '.join(map(repr, LLAMA_MODEL_TYPES))}); this base is {base.model_type!r}. Use export_lora (a PEFT "
            "LoRA adapter) or export_merged instead."
        )
    saved = sorted(
        name
        for name, module in model.named_modules()
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save
    )
    if saved or configs[adapter_name].modules_to_save:
        raise ValueError(
            f"export_gguf: adapter {adapter_name!r} has modules_to_save "
            f"({saved or configs[adapter_name].modules_to_save}); a llama.cpp LoRA adapter holds only lora_a/lora_b "
            "tensors and cannot carry them. Train without modules_to_save, or use export_merged."
        )
    bias = getattr(configs[adapter_name], "bias", "none")
    if bias != "none":
        raise ValueError(
            f"export_gguf: adapter {adapter_name!r} trains biases (bias={bias!r}); a llama.cpp LoRA adapter holds only "
            "lora_a/lora_b tensors and cannot carry them. Train with bias='none', or use export_merged."
        )
    n_head = base.num_attention_heads
    n_kv = getattr(base, "num_key_value_heads", None) or n_head
    tied = bool(getattr(base, "tie_word_embeddings", False))
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, base.num_hidden_layers)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, layer in nora_layers(model):
        if adapter_name not in layer.nora_inner_B:
            continue
        module = name.removeprefix(_PEFT_PREFIX)
        target = name_map.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if target is None or (target == "output.weight" and tied):
            why = "lm_head is tied to the embeddings" if target else "no llama.cpp tensor corresponds to it"
            raise ValueError(
                f"export_gguf: cannot export the adapter on {module!r}: {why}. Exclude it from target_modules "
                "(llama.cpp adapters cover attention and MLP projections), or use export_merged."
            )
        lora_A, lora_B = (t.detach().float().cpu() for t in layer.lora_factors(adapter_name))
        if target.endswith("attn_q.weight"):
            lora_B = _permute_rows(lora_B, n_head)
        elif target.endswith("attn_k.weight"):
            lora_B = _permute_rows(lora_B, n_kv)
        tensors[f"{target}.lora_a"] = lora_A.contiguous()
        tensors[f"{target}.lora_b"] = lora_B.contiguous()
        ranks[module] = lora_A.shape[0]
    if not tensors:
        raise ValueError(f"export_gguf: the model has no NoRA layers for adapter {adapter_name!r}.")
    if len(set(ranks.values())) > 1:
        raise ValueError(
            f"export_gguf: llama.cpp applies one adapter.lora.alpha to every tensor, so all ranks must be equal; "
            f"adapter {adapter_name!r} has ranks {sorted(set(ranks.values()))} (e.g. {dict(list(ranks.items())[:3])})."
            " Use one r_inner (and one structure) for every target module."
        )
    return tensors, next(iter(ranks.values()))


def write_gguf_lora(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], alpha: float, arch: str = "llama"
) -> str:
    """Write {name: tensor} as a llama.cpp LoRA adapter GGUF (general.type "adapter", adapter.type "lora",
    adapter.lora.alpha = `alpha`) atomically at `path`."""
    gguf = _gguf()

    if not alpha > 0:
        raise ValueError(f"write_gguf_lora: alpha must be > 0, got {alpha!r}.")
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        for name, tensor in tensors.items():
            writer.add_tensor(name, tensor.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return str(path)


def export_gguf(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> str:
    """Write `adapter_name` of a NoRA PeftModel over a Llama base as a llama.cpp LoRA adapter GGUF at `path`
    (uniform rank k, alpha = k). Load it with llama.cpp's `--lora path` on a GGUF of the same base. Returns `path`."""
    tensors, rank = gguf_lora_tensors(model, adapter_name)
    return write_gguf_lora(path, tensors, alpha=rank)
