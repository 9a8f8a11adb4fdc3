"""`nora export`: a trained adapter as a plain PEFT LoRA adapter or a llama.cpp LoRA GGUF (NoRA / LoRA-XS only), or
as a merged model."""

from __future__ import annotations

import json
from pathlib import Path

from .. import PEFT_TYPE, dequantize_base, export_lora, export_merged
from ..export_gguf import export_gguf
from . import HarnessError
from .evaluate import resolve_base_model
from .models import load_model
from .quantize import check_adapter_base

TARGETS = ("lora", "merged", "gguf")


def run_export(
    adapter: str, to: str, out: str, model: str | None = None, dtype: str = "float32", quantize: str | None = None
) -> str:
    """Export `adapter` (loaded onto its base model, quantized with `quantize` if it was trained on one) to `out`;
    `--to merged` of a quantized base dequantizes it first, so the merge is exact. Returns `out`."""
    if to not in TARGETS:
        raise HarnessError(f"unknown export target {to!r}; use one of {', '.join(TARGETS)}.")
    config_file = Path(adapter) / "adapter_config.json"
    if not config_file.is_file():
        raise HarnessError(f"{adapter} is not a PEFT adapter directory (no adapter_config.json).")
    peft_type = json.loads(config_file.read_text()).get("peft_type")
    if to in ("lora", "gguf") and peft_type != PEFT_TYPE:
        raise HarnessError(
            f"--to {to} converts NoRA adapters; {adapter} is a {peft_type} adapter (use --to merged, or use it as is)."
        )
    if to == "gguf" and Path(out).is_dir():
        raise HarnessError(f"--to gguf writes one file; --out {out} is a directory. Pass a file path such as "
                           f"{Path(out) / 'adapter.gguf'}.")  # fmt: skip
    from peft import PeftModel

    check_adapter_base(adapter, quantize)
    base, tokenizer = load_model(resolve_base_model(model, adapter), dtype=dtype, quantize=quantize)
    peft_model = PeftModel.from_pretrained(base, adapter)
    if quantize and to == "merged":
        dequantize_base(peft_model)  # float layers holding the dequantized weights: W_deq + dW, no requantization
    if to == "lora":
        export_lora(peft_model, out)
    elif to == "gguf":
        export_gguf(peft_model, out)
    else:
        export_merged(peft_model, out, tokenizer)
    return out
