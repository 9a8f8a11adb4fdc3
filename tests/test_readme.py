"""The README's Python API block runs as written (on a small random Llama wide enough for r=64), so it cannot drift."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_api_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (block,) = [b for b in blocks if "get_peft_model" in b]
    return block


def test_readme_python_api_block_runs(tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=64,
        max_position_embeddings=32,
    )
    model_dir = tmp_path / "base"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    batches = [{"input_ids": torch.randint(0, 64, (2, 8))} for _ in range(2)]
    monkeypatch.chdir(tmp_path)

    namespace = {"MODEL_DIR": str(model_dir), "batches": batches}
    exec(compile(readme_api_block(), str(README), "exec"), namespace)

    merged = namespace["merged"]
    assert not isinstance(merged, PeftModel)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    cfg = namespace["cfg"]
    assert cfg.outer_init == "awsvd" and cfg.r == 64 and cfg.r_inner == 32
    lora = load_file(tmp_path / "out-lora" / "adapter_model.safetensors")
    ranks = {t.shape[0] for k, t in lora.items() if k.endswith("lora_A.weight")}
    assert ranks == {32} and len(lora) == 2 * 7  # q,k,v,o,gate,up,down of the one layer ("all-linear" skips lm_head)
