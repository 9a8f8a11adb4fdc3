"""Answer extraction and scoring of `nora eval`: GSM8K final numbers, multiple-choice answers (LLM-Adapters protocol)
and the cloze protocol (option texts after the question, length-normalised)."""

from __future__ import annotations

import pytest

from nora.harness.data import Example, cloze_view, gsm8k_final_answer, parse_options
from nora.harness.scoring import extract_choice, extract_number, numbers_match


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
        ("#### 1,000", "1000"),
        ("The answer is $1,234.50.", "1234.5"),
        ("So the total is 42.", "42"),
        ("It drops to -7 degrees", "-7"),
        ("#### -3", "-3"),
        ("a loss of $-5", "-5"),
        ("costs $5.00", "5"),
        ("half is 0.5 and then 2.25", "2.25"),
        ("pages 3-5", "5"),
        ("#### 12 apples, not 13", "12"),  # the number after '####' wins over later numbers
        ("50% of them", "50"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_numbers_match_is_format_tolerant():
    assert numbers_match("18", "18")
    assert numbers_match("18.0", "18")
    assert numbers_match("1000", "1,000")
    assert not numbers_match("17", "18")
    assert not numbers_match(None, "18")


def test_gsm8k_final_answer():
    assert gsm8k_final_answer("step 1\nstep 2\n#### 1,250") == "1250"


ARC = ["answer1", "answer2", "answer3", "answer4"]


@pytest.mark.parametrize(
    ("text", "options", "expected"),
    [
        ("the correct answer is answer3", ARC, "answer3"),
        ("Answer2: rubber gloves. answer1 is wrong", ARC, "answer2"),  # first occurrence, case-insensitive
        ("The correct answer is Answer 4.", ARC, "answer4"),  # "Answer 4" counts as answer4
        ("answer10 is not an option", ARC, None),  # no partial-token matches
        ("xanswer1", ARC, None),
        ("I cannot tell.", ARC, None),
        ("the correct answer is true", ["true", "false"], "true"),
        ("False, because ...", ["true", "false"], "false"),
        ("untrue", ["true", "false"], None),
        ("solution2 is better than solution1", ["solution1", "solution2"], "solution2"),
        ("Negative.", ["negative", "neutral", "positive"], "negative"),
    ],
)
def test_extract_choice(text, options, expected):
    assert extract_choice(text, options) == expected


def test_parse_options_from_answer_format_line():
    text = "Question?\n\nAnswer1: a Answer2: b Answer3: c\n\nAnswer format: answer1/answer2/answer3"
    assert parse_options(text) == ["answer1", "answer2", "answer3"]
    assert parse_options("Question? Answer format: true/false") == ["true", "false"]


def test_parse_options_inferred_from_answer():
    assert parse_options("Is it? yes or no", "true") == ["true", "false"]
    assert parse_options("Solution1: x Solution2: y", "solution1") == ["solution1", "solution2"]
    assert parse_options("Answer1: x Answer2: y Answer3: z", "answer2") == ["answer1", "answer2", "answer3"]
    assert parse_options("free text", "Paris") is None


# ------------------------------------------------------------------------------------------------ cloze protocol
ARC = (
    "Please choose the correct answer to the question: Which gas do plants absorb?\n\nAnswer1: oxygen Answer2: carbon "
    "dioxide Answer3: helium\n\nAnswer format: answer1/answer2/answer3"
)
PIQA = (
    "Please choose the correct solution to the question: How to dry a towel?\n\nSolution1: Hang it in the sun."
    "\n\nSolution2: Put it in the freezer.\n\nAnswer format: solution1/solution2"
)
BOOLQ = "Please answer the following question with true or false, question: is water wet?\n\nAnswer format: true/false"


@pytest.mark.parametrize(
    ("instruction", "answer", "question", "texts", "gold"),
    [
        (ARC, "answer2", "Which gas do plants absorb?", ["oxygen", "carbon dioxide", "helium"], "carbon dioxide"),
        (
            PIQA,
            "solution1",
            "How to dry a towel?",
            ["Hang it in the sun.", "Put it in the freezer."],
            "Hang it in the sun.",
        ),
    ],
)
def test_cloze_view_lists_the_question_and_option_texts(instruction, answer, question, texts, gold):
    ex = Example(instruction, output=f"the correct answer is {answer}", answer=answer,
                 options=parse_options(instruction, answer), task="t")  # fmt: skip
    view = cloze_view(ex)
    assert (view.instruction, view.options, view.answer, view.task) == (question, texts, gold, "t")


def test_cloze_view_is_none_for_label_word_tasks_and_incomplete_listings():
    assert cloze_view(Example(BOOLQ, answer="false", options=["true", "false"])) is None
    missing = ARC.replace("Answer3: helium", "")  # answer3 is a valid option but has no text
    assert cloze_view(Example(missing, answer="answer1", options=["answer1", "answer2", "answer3"])) is None


@pytest.mark.filterwarnings("error:.*past_key_values.*:FutureWarning")
def test_cloze_scores_are_length_normalised_option_loglikelihoods(tiny_llama_dir):
    """The cloze protocol's per-option numbers equal sum log p(option text | question prompt) / len(text), computed
    here directly with one forward pass per option, and its prediction is their argmax."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nora.harness.evaluate import EvalOptions, evaluate_examples
    from nora.harness.prompts import PromptBuilder

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    builder = PromptBuilder(AutoTokenizer.from_pretrained(tiny_llama_dir))
    ex = Example(
        ARC, output="the correct answer is answer2", answer="answer2", options=["answer1", "answer2", "answer3"]
    )
    summary, (record,) = evaluate_examples(model, builder, [ex], EvalOptions(protocols=["cloze"], progress=False))
    prompt = builder.prompt_ids(cloze_view(ex))
    expected = {}
    for option, text in zip(ex.options, ["oxygen", "carbon dioxide", "helium"]):
        cont = builder.response_ids(text, eos=False)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([prompt + cont])).logits[0].float(), -1)
        picked = logprobs[len(prompt) - 1 : -1].gather(-1, torch.tensor(cont)[:, None]).sum()
        expected[option] = float(picked) / len(text)
    assert record["cloze"] == pytest.approx(expected, abs=1e-4)
    assert record["pred_cloze"] == max(expected, key=expected.get)
    assert summary["cloze"] == {"correct": int(record["pred_cloze"] == "answer2"), "total": 1,
                                "accuracy": float(record["pred_cloze"] == "answer2")}  # fmt: skip


# the cache is passed under the keyword the installed transformers takes (`past_key_values` is deprecated in 5.24+)
@pytest.mark.filterwarnings("error:.*past_key_values.*:FutureWarning")
@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "peft-nora"])
def test_option_logprobs_with_a_shared_prompt_cache_equal_one_forward_per_option(tiny_llama_dir, wrapped):
    """Several-token options are scored against one cached encoding of their prompt. Across batches mixing prompt
    lengths (left padding), option counts and option lengths (right padding), every score equals the summed
    log-probability from a separate full forward pass over prompt + option, and lands at its own option; also
    through a PeftModel (whose forward takes **kwargs) carrying a non-identity NoRA adapter."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nora import NoraConfig
    from nora.harness.prompts import PromptBuilder
    from nora.harness.scoring import option_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    if wrapped:
        model = get_peft_model(
            model, NoraConfig(r=4, r_inner=2, target_modules=["q_proj", "v_proj"], init_weights=False)
        )
    model = model.eval()
    builder = PromptBuilder(AutoTokenizer.from_pretrained(tiny_llama_dir))
    options = [["oxygen", "carbon dioxide gas", "he"], ["a b c d e f", "g"], ["x y", "z w v", "u", "t s r q"]]
    questions = ["Which gas do plants take in?", "Pick one.", "A much longer question about letters " * 3]
    examples = [Example(q, options=opts) for q, opts in zip(questions * 2, options * 2)]
    scores = option_logprobs(model, builder, examples, batch_size=5, progress=False)
    for ex, row in zip(examples, scores):
        assert len(row) == len(ex.options)
        prompt = builder.prompt_ids(ex)
        for option, got in zip(ex.options, row):
            cont = builder.response_ids(option, eos=False)
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([prompt + cont])).logits[0].float(), -1)
            expected = logprobs[len(prompt) - 1 : -1].gather(-1, torch.tensor(cont)[:, None]).sum()
            assert got == pytest.approx(float(expected), abs=1e-4)


def test_cloze_training_items_match_what_the_cloze_protocol_scores():
    """`--response-format cloze` trains on exactly the (prompt, response) pair the cloze protocol scores for the gold
    option: the question alone -> the option text; label-word tasks keep their instruction and answer the label."""
    from nora.harness.data import as_cloze_training

    arc = Example(ARC, output="the correct answer is answer2", answer="answer2",
                  options=["answer1", "answer2", "answer3"], task="arc-easy")  # fmt: skip
    item = as_cloze_training(arc)
    view = cloze_view(arc)
    assert (item.instruction, item.output) == ("Which gas do plants absorb?", "carbon dioxide")
    assert (item.instruction, item.input, item.options) == (view.instruction, view.input, view.options)
    boolq = Example(BOOLQ, output="the correct answer is false", answer="false", options=["true", "false"])
    assert (as_cloze_training(boolq).instruction, as_cloze_training(boolq).output) == (BOOLQ, "false")


def test_cloze_training_of_free_form_data_is_one_clear_error():
    from nora.harness import HarnessError
    from nora.harness.data import as_cloze_training

    with pytest.raises(HarnessError, match="--response-format cloze needs multiple-choice examples"):
        as_cloze_training(Example("What is 2 + 3?", output="2 + 3 = 5\n#### 5", answer="5", kind="number"))
