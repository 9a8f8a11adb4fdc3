"""`nora export`: a trained adapter as a plain PEFT LoRA adapter (NoRA / LoRA-XS only) or as a merged model."""

from __future__ import annotations

import json
from pathlib import Path

from .. import PEFT_TYPE, export_lora, export_merged
from . import HarnessError
from .evaluate import resolve_base_model
from .models import load_model

TARGETS = ("lora", "merged")


def run_export(adapter: str, to: str, out: str, model: str | None = None, dtype: str = "float32") -> str:
    """Export `adapter` (loaded onto its base model) to `out`; returns `out`."""
    if to not in TARGETS:
        raise HarnessError(f"unknown export target {to!r}; use one of {', '.join(TARGETS)}.")
    config_file = Path(adapter) / "adapter_config.json"
    if not config_file.is_file():
        raise HarnessError(f"{adapter} is not a PEFT adapter directory (no adapter_config.json).")
    peft_type = json.loads(config_file.read_text()).get("peft_type")
    if to == "lora" and peft_type != PEFT_TYPE:
        raise HarnessError(
            f"--to lora converts NoRA adapters; {adapter} is a {peft_type} adapter (use --to merged, or use it as is)."
        )
    from peft import PeftModel

    base, tokenizer = load_model(resolve_base_model(model, adapter), dtype=dtype)
    peft_model = PeftModel.from_pretrained(base, adapter)
    if to == "lora":
        export_lora(peft_model, out)
    else:
        export_merged(peft_model, out, tokenizer)
    return out
