"""Shared fixtures: tiny random models saved as local transformers directories (with an offline-trained tokenizer),
small instruction-format data files, and the optional shared data directory.

Everything is built from configs in code, so the tests run offline and fast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
#: sentences the tiny tokenizer is trained on (any text still tokenizes: the byte-level alphabet is complete)
CORPUS = [
    "Please answer the following question with true or false, question: is the sky blue?",
    "Please choose the correct answer to the question: which one is red? Answer1: apple Answer2: sky",
    "Answer format: answer1/answer2/answer3/answer4 the correct answer is answer1 true false solution1",
    "Classify the sentiment of this tweet as negative, neutral or positive. I love it. I hate it.",
    "How many eggs? She has 16 - 3 = 13 eggs. #### 13 The answer is 42.",
]


def config_kwargs(**kwargs) -> dict:
    """NoraConfig kwargs from a test's defaults: they carry an r_inner for every structure, but 'adapter' (LoRA-XS) has
    no inner rank and refuses one, so it is dropped there (what a user would write)."""
    if kwargs.get("structure") == "adapter":
        kwargs.pop("r_inner", None)
    return kwargs


def build_tokenizer(chat_template: str | None = CHATML):
    """A byte-level BPE tokenizer (~400 tokens) trained offline on CORPUS, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    fast.bos_token = "<|im_start|>"
    if chat_template:
        fast.chat_template = chat_template
    return fast


def assert_same_adapter(a: Path, b: Path, atol: float = 0.0) -> None:
    """The adapter_model.safetensors of two adapter directories hold the same tensors (exactly, by default)."""
    import torch
    from safetensors.torch import load_file

    sa, sb = load_file(Path(a) / "adapter_model.safetensors"), load_file(Path(b) / "adapter_model.safetensors")
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=atol, msg=key)


def build_tiny_llama(tokenizer, seed: int = 0, layers: int = 2, hidden: int = 32):
    """A randomly initialised Llama (hidden 32 unless told) matching the tokenizer's vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A local transformers directory (config, safetensors, tokenizer with a chat template) of a tiny Llama."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(tiny_tokenizer).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _mc_rows(n: int) -> list[dict]:
    """Instruction-format multiple-choice rows (ARC-like), deterministic."""
    rows = []
    for i in range(n):
        gold = f"answer{i % 3 + 1}"
        rows.append(
            {
                "instruction": f"Please choose the correct answer to the question: item {i}?\n\nAnswer1: red "
                "Answer2: blue Answer3: green\n\nAnswer format: answer1/answer2/answer3",
                "input": "",
                "output": f"the correct answer is {gold}",
                "answer": gold,
            }
        )
    return rows


@pytest.fixture(scope="session")
def tiny_task_dir(tmp_path_factory) -> Path:
    """A folder with train.json / test.json in the LLM-Adapters instruction format."""
    path = tmp_path_factory.mktemp("tiny-task")
    (path / "train.json").write_text(json.dumps(_mc_rows(32)))
    (path / "test.json").write_text(json.dumps(_mc_rows(6)))
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the repository; the test is skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data directory {SHARED_DATA} is not present")
    return SHARED_DATA
