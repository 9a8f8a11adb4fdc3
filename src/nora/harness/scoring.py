"""Answer extraction and batched model scoring (option log-likelihoods, greedy generation) for `nora eval`.

Two protocols for multiple-choice / classification examples:

- log-likelihood: the option whose response (e.g. "the correct answer is answer3", or the label word) has the
  highest summed token log-probability after the prompt wins;
- generation (LLM-Adapters): greedy decoding, then the first valid answer token found in the generated text.

GSM8K-style examples use generation and compare the final number (`extract_number`).
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .data import Example
from .prompts import PromptBuilder, fit_prompt

# ------------------------------------------------------------------------------------------------ extraction
_SPACED_CHOICE = re.compile(r"\b(answer|solution|option|ending)\s+(\d)\b", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w.])(-)?\s?\$?\s?(-)?(\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)")


def extract_choice(text: str, options: Sequence[str]) -> str | None:
    """The first valid option occurring in `text` as a whole word (case-insensitive; "Answer 2" counts as
    "answer2"), or None. Longer options win ties, so "answer10" is never read as "answer1"."""
    lowered = _SPACED_CHOICE.sub(lambda m: m.group(1) + m.group(2), text.lower())
    alternatives = "|".join(re.escape(o.lower()) for o in sorted(options, key=len, reverse=True))
    match = re.search(rf"(?<![a-z0-9])({alternatives})(?![a-z0-9])", lowered)
    return match.group(1) if match else None


def _canonical_number(sign: str | None, digits: str) -> str:
    value = float(digits.replace(",", ""))
    if sign:
        value = -value
    if value.is_integer():
        return str(int(value))
    return repr(value)


def extract_number(text: str) -> str | None:
    """The final numeric answer of a generation, canonicalised ("1,000" -> "1000", "$5.00" -> "5", "-3." -> "-3"):
    the first number after the last "####" if there is one, else the last number in the text."""
    if "####" in text:
        match = _NUMBER.search(text.rsplit("####", 1)[1])
        if match:
            return _canonical_number(match.group(1) or match.group(2), match.group(3))
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    return _canonical_number(last.group(1) or last.group(2), last.group(3))


def numbers_match(pred: str | None, gold: str | None) -> bool:
    """Exact match of two canonical numbers (tolerant to float formatting: 18 == 18.0)."""
    if pred is None or gold is None:
        return False
    try:
        return math.isclose(float(pred), float(gold.replace(",", "")), rel_tol=1e-9, abs_tol=1e-9)
    except ValueError:
        return pred.strip() == gold.strip()


# ------------------------------------------------------------------------------------------------ batching helpers
def _batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first: a memory problem shows up at once)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, longest - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, longest - len(seq) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if len({s[i] for s in seqs}) > 1:
            return i
    return n


# ------------------------------------------------------------------------------------------------ log-likelihood
@torch.no_grad()
def option_logprobs(
    model: torch.nn.Module,
    builder: PromptBuilder,
    examples: Sequence[Example],
    batch_size: int = 16,
    max_length: int = 1024,
    progress: bool = True,
) -> list[list[float]]:
    """Summed log-probability of each option's response after the prompt, per example.

    The options' shared leading tokens are appended to the prompt; when every option then differs in a single
    token (label words, "...answer1" vs "...answer2") one forward pass per example scores all options at once.
    Otherwise every (example, option) sequence is scored separately.
    """
    pad_id = builder.tokenizer.pad_token_id
    contexts, continuations = [], []
    for ex in examples:
        responses = [builder.response_ids(ex.response_for(o), eos=False) for o in ex.options or []]
        if not responses:
            raise ValueError(f"example of task {ex.task!r} has no options to score.")
        shared = _common_prefix(responses)
        longest = max(len(r) for r in responses)
        prompt = fit_prompt(ex, builder, max_length - longest)
        contexts.append(prompt + responses[0][:shared])
        continuations.append([r[shared:] for r in responses])

    scores: list[list[float]] = [[math.nan] * len(conts) for conts in continuations]
    fast = [i for i, conts in enumerate(continuations) if all(len(c) == 1 for c in conts)]
    slow = [i for i, conts in enumerate(continuations) if not all(len(c) == 1 for c in conts)]
    device = _device(model)
    bar = tqdm(total=len(examples), desc="log-likelihood", disable=not progress, leave=False)
    for batch in _batches_by_length([len(contexts[i]) for i in fast], batch_size):
        idx = [fast[b] for b in batch]
        logprobs = _last_logprobs(model, [contexts[i] for i in idx], pad_id, device)
        for row, i in enumerate(idx):
            scores[i] = [float(logprobs[row, c[0]]) for c in continuations[i]]
        bar.update(len(idx))
    # several-token options: the prompt is encoded once per example and its key/value cache is shared by all of the
    # example's options (4 options of ARC cost ~1.3 prompt lengths instead of 4)
    widest = max((len(continuations[i]) for i in slow), default=1)
    option_batch = max(1, batch_size // widest)
    for batch in _batches_by_length([len(contexts[i]) for i in slow], option_batch):
        idx = [slow[b] for b in batch]
        for i, row_scores in zip(idx, _score_with_shared_prompt(model, idx, contexts, continuations, pad_id, device)):
            scores[i] = row_scores
        bar.update(len(idx))
    bar.close()
    return scores


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp_min(0)


def _last_logprobs(model, seqs: Sequence[Sequence[int]], pad_id: int, device) -> torch.Tensor:
    inputs = {k: v.to(device) for k, v in _left_pad(seqs, pad_id).items()}
    logits = model(**inputs, position_ids=_positions(inputs["attention_mask"]), logits_to_keep=1).logits
    return torch.log_softmax(logits[:, -1].float(), dim=-1)


def _cache_keyword(model) -> str:
    """The keyword the model's forward takes a key/value cache under: `cache` in transformers >= 5.24 (where
    `past_key_values` is deprecated, to be removed in 5.40), `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel forwards **kwargs
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    return out.past_key_values if cache is None else cache


def _score_with_shared_prompt(model, idx, contexts, continuations, pad_id: int, device) -> list[list[float]]:
    """Summed log-probabilities of every continuation of the examples `idx`: one cached forward pass over the
    (left-padded) contexts, then one over all (right-padded) continuations attending to their context's cache."""
    prompt = {k: v.to(device) for k, v in _left_pad([contexts[i] for i in idx], pad_id).items()}
    out = model(**prompt, position_ids=_positions(prompt["attention_mask"]), use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # predicts each continuation's first token
    rows = [(r, j) for r, i in enumerate(idx) for j in range(len(continuations[i]))]
    conts = [continuations[idx[r]][j] for r, j in rows]
    width = max(len(c) for c in conts)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, cont in enumerate(conts):
        ids[k, : len(cont)] = torch.tensor(cont, dtype=torch.long)
        mask[k, : len(cont)] = 1
    owner = torch.tensor([r for r, _ in rows], device=device)
    cache = _returned_cache(out)
    cache.reorder_cache(owner)  # one copy of the context's keys/values per continuation
    full_mask = torch.cat([prompt["attention_mask"][owner], mask.to(device)], dim=1)
    prompt_len = prompt["attention_mask"].sum(-1)[owner]
    positions = prompt_len[:, None] + torch.arange(width, device=device)[None, :]
    rest = torch.zeros((len(rows), 1), device=device)
    if width > 1:
        logits = model(
            input_ids=ids[:, :-1].to(device),
            attention_mask=full_mask[:, :-1],
            position_ids=positions[:, :-1],
            use_cache=False,
            **{_cache_keyword(model): cache},
        ).logits.float()
        picked = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None].to(device)).squeeze(-1)
        rest = (picked * mask[:, 1:].to(device)).sum(-1, keepdim=True)
    head = first[owner].gather(-1, ids[:, :1].to(device))
    totals = (head + rest).squeeze(-1).tolist()
    result: list[list[float]] = [[math.nan] * len(continuations[i]) for i in idx]
    for (r, j), total in zip(rows, totals):
        result[r][j] = total  # rows are (example, option) pairs: index by option, never append
    return result


# ------------------------------------------------------------------------------------------------ generation
@torch.no_grad()
def generate(
    model: torch.nn.Module,
    builder: PromptBuilder,
    examples: Sequence[Example],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    max_length: int = 1024,
    progress: bool = True,
) -> list[str]:
    """Greedy continuations of the prompts (special tokens removed), in the order of `examples`."""
    from transformers import GenerationConfig

    tokenizer = builder.tokenizer
    prompts = [fit_prompt(ex, builder, max_length - max_new_tokens) for ex in examples]
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    outputs: list[str] = [""] * len(examples)
    device = _device(model)
    bar = tqdm(total=len(examples), desc="generate", disable=not progress, leave=False)
    for batch in _batches_by_length([len(p) for p in prompts], batch_size):
        inputs = {k: v.to(device) for k, v in _left_pad([prompts[i] for i in batch], tokenizer.pad_token_id).items()}
        generated = model.generate(**inputs, generation_config=config)
        new_tokens = generated[:, inputs["input_ids"].shape[1] :]
        for row, i in enumerate(batch):
            outputs[i] = tokenizer.decode(new_tokens[row], skip_special_tokens=True).strip()
        bar.update(len(batch))
    bar.close()
    return outputs


def accuracy(correct: int, total: int) -> dict[str, Any]:
    return {"correct": correct, "total": total, "accuracy": round(correct / total, 4) if total else None}
