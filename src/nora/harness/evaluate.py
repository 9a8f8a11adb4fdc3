"""`nora eval`: accuracy of a base model, a PEFT adapter (NoRA or any other) or a merged model directory.

Multiple-choice / classification tasks report up to three protocols (see `scoring`): `loglik`, the log-likelihood of
each option's response ("the correct answer is answer3"); `cloze`, the length-normalised log-likelihood of each
option's *text* after the question alone (lm-eval-harness style; robust for small models that have not learned the
"answerN" format); and `generation`, greedy decoding + first valid answer (LLM-Adapters). GSM8K reports generation + final-number exact match. The JSON output holds
the per-task accuracies with counts and the per-example predictions.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io import write_json
from . import HarnessError
from .data import Example, Fields, cloze_view, load_task
from .models import load_model
from .prompts import PromptBuilder
from .quantize import check_adapter_base
from .runinfo import peak_rss_mb, read_run_config, versions
from .scoring import accuracy, extract_choice, extract_number, generate, numbers_match, option_logprobs

PROTOCOLS = ("loglik", "cloze", "generation")
MAX_NEW_TOKENS = {"choice": 32, "number": 256}


@dataclass
class EvalOptions:
    """How to evaluate: protocols, batching, lengths."""

    protocols: Sequence[str] = PROTOCOLS
    batch_size: int = 16
    max_length: int = 1024
    max_new_tokens: int | None = None  # None: 32 for multiple choice, 256 for GSM8K
    progress: bool = True


def evaluate_examples(
    model, builder: PromptBuilder, examples: Sequence[Example], options: EvalOptions
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary, per-example predictions) of one task."""
    if not examples:
        raise HarnessError("no examples to evaluate.")
    kind = examples[0].kind
    records: list[dict[str, Any]] = [{"index": i, "gold": ex.answer} for i, ex in enumerate(examples)]
    summary: dict[str, Any] = {"n": len(examples), "kind": kind}
    if kind == "choice" and "loglik" in options.protocols:
        scores = option_logprobs(
            model, builder, examples, options.batch_size, options.max_length, progress=options.progress
        )
        correct = 0
        for record, ex, row in zip(records, examples, scores):
            pred = ex.options[max(range(len(row)), key=row.__getitem__)]
            record["pred_loglik"] = pred
            record["loglik"] = {o: round(s, 4) for o, s in zip(ex.options, row)}
            correct += pred == ex.answer
        summary["loglik"] = accuracy(correct, len(examples))
    if kind == "choice" and "cloze" in options.protocols:
        # label-word tasks (true/false, sentiment words) list no option texts: their options are the texts
        views = [cloze_view(ex) or Example(ex.instruction, input=ex.input, options=ex.options) for ex in examples]
        scores = option_logprobs(model, builder, views, options.batch_size, options.max_length, options.progress)
        correct = 0
        for record, ex, view, row in zip(records, examples, views, scores):
            normalised = [score / max(len(text), 1) for score, text in zip(row, view.options)]
            pred = ex.options[max(range(len(normalised)), key=normalised.__getitem__)]
            record["pred_cloze"] = pred
            record["cloze"] = {o: round(v, 5) for o, v in zip(ex.options, normalised)}
            correct += pred == ex.answer
        summary["cloze"] = accuracy(correct, len(examples))
    if "generation" in options.protocols:
        max_new = options.max_new_tokens or MAX_NEW_TOKENS[kind]
        texts = generate(
            model, builder, examples, max_new, options.batch_size, options.max_length, progress=options.progress
        )
        correct = unanswered = 0
        for record, ex, text in zip(records, examples, texts):
            if kind == "number":
                pred = extract_number(text)
                hit = numbers_match(pred, ex.answer)
            else:
                pred = extract_choice(text, ex.options or [])
                hit = pred == ex.answer
            record["pred_generation"], record["generation"] = pred, text
            correct += hit
            unanswered += pred is None
        summary["generation"] = {**accuracy(correct, len(examples)), "no_answer": unanswered}
    return summary, records


def resolve_base_model(model: str | None, adapter: str | None) -> str:
    """The base model of an evaluation: --model, else the run's config.yaml, else the adapter's recorded base."""
    if model:
        return model
    if adapter:
        from_run = read_run_config(adapter).get("model")
        if from_run:
            return from_run
        config_file = Path(adapter) / "adapter_config.json"
        if config_file.is_file():
            base = json.loads(config_file.read_text()).get("base_model_name_or_path")
            if base:
                return base
    raise HarnessError("which model? pass --model NAME (e.g. smollm2-135m) or an --adapter directory that records it.")


def load_for_eval(model: str | None, adapter: str | None, dtype: str = "float32", quantize: str | None = None):
    """(model, tokenizer, description): a base model, a base model + PEFT adapter, or a full model directory."""
    if adapter and not Path(adapter).is_dir():
        raise HarnessError(f"adapter directory {adapter} does not exist.")
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        if (Path(adapter) / "config.json").is_file():  # a full fine-tune / merged model written by nora
            loaded, tokenizer = load_model(adapter, dtype=dtype)
            return loaded, tokenizer, {"model": adapter}
        raise HarnessError(f"{adapter} holds neither adapter_config.json (PEFT adapter) nor config.json (model).")
    base_name = resolve_base_model(model, adapter)
    check_adapter_base(adapter, quantize)
    loaded, tokenizer = load_model(base_name, dtype=dtype, quantize=quantize)
    info = {"model": base_name, **({"quantize": quantize} if quantize else {})}
    if adapter:
        from peft import PeftModel  # NoRA is registered: importing nora.harness imported nora

        loaded = PeftModel.from_pretrained(loaded, adapter)
        info["adapter"] = adapter
    loaded.eval()
    return loaded, tokenizer, info


def run_eval(
    tasks: Sequence[str],
    model: str | None = None,
    adapter: str | None = None,
    *,
    data_dir: str | None = None,
    limit: int | None = None,
    out: str | os.PathLike | None = None,
    dtype: str = "float32",
    system_prompt: str | None = None,
    fields: Fields | None = None,
    seed: int = 0,
    options: EvalOptions | None = None,
    quantize: str | None = None,
) -> dict[str, Any]:
    """Evaluate on each task; prints a table and writes the JSON report to `out` (if given). Returns the report."""
    options = options or EvalOptions()
    unknown = [p for p in options.protocols if p not in PROTOCOLS]
    if unknown:
        raise HarnessError(f"unknown protocol(s) {unknown}; use {', '.join(PROTOCOLS)}.")
    task_examples = {}
    for task in tasks:  # load all data first: a bad task name fails before the model loads
        examples = load_task(task, "test", data_dir, fields or Fields(), seed=seed)
        task_examples[task] = examples[:limit] if limit else examples
    if adapter and system_prompt is None:
        system_prompt = read_run_config(adapter).get("system_prompt")
    loaded, tokenizer, info = load_for_eval(model, adapter, dtype, quantize)
    builder = PromptBuilder(tokenizer, system_prompt=system_prompt)
    report: dict[str, Any] = {**info, "accuracy": {}, "predictions": {}, "versions": versions()}
    start = time.perf_counter()
    for task, examples in task_examples.items():
        summary, records = evaluate_examples(loaded, builder, examples, options)
        report["accuracy"][task] = summary
        report["predictions"][task] = records
        print(format_summary(task, summary), flush=True)
    report["settings"] = {
        "limit": limit,
        "protocols": list(options.protocols),
        "batch_size": options.batch_size,
        "max_length": options.max_length,
        "system_prompt": system_prompt,
        "chat_template": builder.chat,
        "eval_seconds": round(time.perf_counter() - start, 1),
        "peak_rss_mb": peak_rss_mb(),
    }
    if out:
        write_json(out, report)
    return report


def format_summary(task: str, summary: dict[str, Any]) -> str:
    parts = [f"{task}: n={summary['n']}"]
    for protocol in PROTOCOLS:
        if protocol in summary:
            s = summary[protocol]
            parts.append(f"{protocol} {s['accuracy']:.4f} ({s['correct']}/{s['total']})")
    return "  ".join(parts)
