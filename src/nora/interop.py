"""Reload a NoRA adapter saved by diffusers' `save_lora_adapter`.

diffusers' `unet.add_adapter(NoraConfig(...))` and `unet.save_lora_adapter(dir)` work as for LoRA: the file holds
the NoRA state dict and, in its safetensors metadata, the NoRA config. diffusers' `load_lora_adapter` cannot read it
back: it always rebuilds a `LoraConfig` from `lora_A`/`lora_B` keys. `load_diffusers_adapter` is its NoRA
counterpart; a runtime that only speaks LoRA loads `nora.export_lora(unet, dir, adapter_name)` instead, which
`load_lora_adapter` reads natively.
"""

from __future__ import annotations

import dataclasses
import json
import os

from torch import nn

from .config import NoraConfig

#: diffusers' names (diffusers.loaders.lora_base); repeated here so nora does not need diffusers to import
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"


def load_diffusers_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    weight_name: str = DIFFUSERS_WEIGHT_NAME,
) -> NoraConfig:
    """Add the NoRA adapter in `path` (a directory written by `save_lora_adapter`, or the .safetensors file itself)
    to a diffusers model as `adapter_name` and make it active. The saved outer factors are loaded, no SVD runs, and
    the base fingerprint is checked as in `PeftModel.from_pretrained`. Returns the adapter's config."""
    from peft import set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = os.path.join(path, weight_name) if os.path.isdir(path) else os.fspath(path)
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"load_diffusers_adapter: {file} does not exist; pass the save_lora_adapter directory."
        )
    with safe_open(file, framework="pt") as fh:
        metadata = fh.metadata() or {}
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    config = json.loads(raw) if raw else {}
    if config.get("peft_type") != "NORA":
        raise ValueError(
            f"load_diffusers_adapter: {file} holds no NoRA config in its metadata (peft_type "
            f"{config.get('peft_type')!r}); it was not written by save_lora_adapter on a NoRA adapter. Load a LoRA "
            "file with model.load_lora_adapter."
        )
    fields = {f.name for f in dataclasses.fields(NoraConfig)} - {"peft_type"}
    nora_config = NoraConfig(**{k: v for k, v in config.items() if k in fields})
    nora_config._from_checkpoint = True  # placeholders for the outer factors, fingerprint checked, as on load
    model.add_adapter(nora_config, adapter_name=adapter_name)
    result = set_peft_model_state_dict(model, load_file(file), adapter_name=adapter_name)
    if result.unexpected_keys:
        raise ValueError(
            f"load_diffusers_adapter: {len(result.unexpected_keys)} tensors of {file} do not fit this model, e.g. "
            f"{result.unexpected_keys[0]}; load the adapter onto the model it was trained on."
        )
    return nora_config
