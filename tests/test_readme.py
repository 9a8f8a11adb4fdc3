"""The README's Python API block runs as written (on a small random Llama wide enough for r=64), so it cannot drift."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(marker: str) -> str:
    """The one ```python block of the README that contains `marker`."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (block,) = [b for b in blocks if marker in b]
    return block


def readme_api_block() -> str:
    return readme_block("get_peft_model")


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


def test_readme_trl_block_runs(tiny_tokenizer, tmp_path, monkeypatch):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from conftest import build_tiny_llama

    conversation = [{"role": "user", "content": "is the sky blue?"}, {"role": "assistant", "content": "true"}]
    model_dir = tmp_path / "base"  # the block passes no processing_class: SFTTrainer loads the model dir's tokenizer
    build_tiny_llama(tiny_tokenizer, layers=1, hidden=128).save_pretrained(model_dir)  # wide enough for r=64
    tiny_tokenizer.save_pretrained(model_dir)
    monkeypatch.chdir(tmp_path)
    namespace = {
        "base": AutoModelForCausalLM.from_pretrained(model_dir),
        "dataset": Dataset.from_list([{"messages": conversation}] * 4),
    }
    exec(compile(readme_block("SFTTrainer"), str(README), "exec"), namespace)

    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["peft_type"] == "NORA"
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "out")
    trained = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert any(".nora_inner_B" in k and v.abs().sum() > 0 for k, v in trained.items())  # zeros-init B' moved
    reloaded_state = get_peft_model_state_dict(reloaded)
    assert reloaded_state.keys() == trained.keys() and len(trained) == 4 * 7  # B, A, B', A' x 7 targets
    assert all(torch.equal(reloaded_state[k], v) for k, v in trained.items())
