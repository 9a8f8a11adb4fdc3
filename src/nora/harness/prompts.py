"""Prompt building and tokenisation: chat template (or a plain Alpaca-style template), prompt-masked labels,
prompt-side truncation, and the padding collator used for training."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .data import Example

IGNORE_INDEX = -100
PLAIN_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
PLAIN_TEMPLATE_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


class PromptBuilder:
    """Turns examples into token ids: the tokenizer's chat template when it has one, else a plain Alpaca-style
    template. `system_prompt` (chat templates only) replaces the template's default system message."""

    def __init__(self, tokenizer, system_prompt: str | None = None, use_chat_template: bool | None = None):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self.chat = has_template if use_chat_template is None else (use_chat_template and has_template)

    def user_text(self, example: Example) -> str:
        return f"{example.instruction}\n\n{example.input}" if example.input else example.instruction

    def prompt(self, example: Example) -> str:
        """The prompt text; the response follows it directly."""
        if not self.chat:
            template = PLAIN_TEMPLATE_INPUT if example.input else PLAIN_TEMPLATE
            return template.format(instruction=example.instruction, input=example.input)
        messages = [{"role": "user", "content": self.user_text(example)}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def prompt_ids(self, example: Example) -> list[int]:
        # chat templates spell their special tokens out; plain prompts get the tokenizer's BOS (if it adds one)
        return self.tokenizer(self.prompt(example), add_special_tokens=not self.chat)["input_ids"]

    def response_ids(self, text: str, eos: bool = True) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        eos_id = self.tokenizer.eos_token_id
        return [*ids, eos_id] if eos and eos_id is not None else ids


@dataclass
class TruncationStats:
    """How tokenisation at `max_length` went; reported in metrics.json."""

    max_length: int
    examples: int = 0
    truncated: int = 0
    dropped: int = 0  # examples without any response token left after truncation (no loss), left out
    tokens: int = 0
    longest: int = 0

    def as_dict(self) -> dict[str, Any]:
        kept = max(self.examples - self.dropped, 1)
        return {
            "max_length": self.max_length,
            "examples": self.examples,
            "truncated": self.truncated,
            "dropped_no_response": self.dropped,
            "mean_tokens": round(self.tokens / kept, 1),
            "longest_before_truncation": self.longest,
        }


def fit_prompt(example: Example, builder: PromptBuilder, budget: int) -> list[int]:
    """Prompt ids of at most `budget` tokens: an over-long prompt loses the end of its input (or, without input, of
    its instruction) while the template around it stays intact; a hard cut is the last resort."""
    ids = builder.prompt_ids(example)
    field_name = "input" if example.input else "instruction"
    for _ in range(4):  # re-tokenising the shortened text can shift the count by a token or two
        overflow = len(ids) - budget
        if overflow <= 0:
            return ids
        content = builder.tokenizer(getattr(example, field_name), add_special_tokens=False)["input_ids"]
        if len(content) <= overflow:
            break
        text = builder.tokenizer.decode(content[: len(content) - overflow - 1], skip_special_tokens=True)
        example = replace(example, **{field_name: text})
        ids = builder.prompt_ids(example)
    return ids[:budget]


def encode(example: Example, builder: PromptBuilder, max_length: int) -> tuple[dict[str, list[int]], int]:
    """input_ids = prompt + response (+ EOS), labels = -100 on the prompt (loss only on the response).

    Over-long examples keep their response and lose the end of the prompt's input (see `fit_prompt`); a response
    longer than max_length / 2 is itself cut at the end. Returns (features, untruncated length).
    """
    prompt = builder.prompt_ids(example)
    response = builder.response_ids(example.output)
    length = len(prompt) + len(response)
    if length > max_length:
        response = response[: max(max_length - len(prompt), max_length // 2)]
        prompt = fit_prompt(example, builder, max_length - len(response))
    ids = prompt + response
    labels = [IGNORE_INDEX] * len(prompt) + response
    return {"input_ids": ids, "labels": labels}, length


def encode_all(
    examples: Iterable[Example], builder: PromptBuilder, max_length: int
) -> tuple[list[dict[str, list[int]]], TruncationStats]:
    """Tokenise every example; drops those whose response is cut away completely."""
    stats = TruncationStats(max_length)
    features = []
    for example in examples:
        feats, length = encode(example, builder, max_length)
        stats.examples += 1
        stats.truncated += length > max_length
        stats.longest = max(stats.longest, length)
        if all(label == IGNORE_INDEX for label in feats["labels"]):
            stats.dropped += 1
            continue
        stats.tokens += len(feats["input_ids"])
        features.append(feats)
    return features, stats


def response_positions(labels):
    """Positions t whose logits predict a response token (labels[:, t + 1] != -100 in any row), as a 1-D tensor."""
    return (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(-1)


class PadCollator:
    """Right-pads input_ids (pad id), labels (-100) and builds the attention mask.

    With `logits_to_keep=True` the batch also carries `logits_to_keep` = `response_positions(labels)`, so a causal
    LM computes its vocabulary projection only where the loss needs it (see `train.response_only_loss`).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, logits_to_keep: bool = False):
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of
        self.logits_to_keep = logits_to_keep

    def __call__(self, features: Sequence[dict[str, list[int]]]):
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        if self.multiple:
            longest = -(-longest // self.multiple) * self.multiple
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            pad = longest - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
            batch["labels"].append(list(f.get("labels", f["input_ids"])) + [IGNORE_INDEX] * pad)
        tensors = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
        if self.logits_to_keep:
            tensors["logits_to_keep"] = response_positions(tensors["labels"])
        return tensors
