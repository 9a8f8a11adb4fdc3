"""Training-step efficiency on SmolLM2-135M (fp32, CPU): NoRA vs LoRA / DoRA / PiSSA / VeRA / LoRA-XS / full FT and a
frozen floor, all on the 7 linear projections, same batch of real text.

    python benchmarks/bench_efficiency.py                       # all methods, writes results/efficiency.json
    python benchmarks/bench_efficiency.py --reps 5 --methods floor nora_64_32 lora_64

Design
- ONE worker subprocess per method (so ru_maxrss is that method's own peak RSS). All workers are started first and stay
  alive; the driver then asks them round-robin for one timed step each (A B C ... A B C ...), so slow drifts of the
  shared machine hit every method alike. Reported step time = median over the rounds.
- A step is zero_grad + forward (labels = inputs) + backward + AdamW.step(). The frozen floor has no adapter and
  no trainable parameter but its embedding output requires grad (`enable_input_require_grads`), so it runs the full
  backward through every layer (input gradients only): the least work any adapter method must do.
- Peak RSS: ru_maxrss of the worker, reset (/proc/self/clear_refs = 5) once the model is built, so "train peak" is
  the high-water mark of warm-up + timed steps + save_pretrained; "setup peak" is the loading/initialisation peak.
- Each method's worker result is cached in results/cache/efficiency/<method>__seed<seed>.json (keyed by the run
  parameters); rerunning resumes only the missing methods, and always re-measures the floor and LoRA r=64 with them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common
import bench_params  # the published 7-8B configs (shapes only)

BENCH = "efficiency"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = {
    "floor": "frozen floor (no adapter, input grads)",
    "nora_64_32": "NoRA r=64/32",
    "lora_16": "LoRA r=16",
    "lora_64": "LoRA r=64",
    "dora_16": "DoRA r=16",
    "pissa_16": "PiSSA r=16 (niter 4)",
    "vera_256": "VeRA r=256",
    "loraxs_64": "LoRA-XS r=64",
    "full_ft": "full fine-tuning",
}
REFERENCE = ("floor", "lora_64")
ADAMW_FLOPS_PER_PARAM = 12  # a rough count of AdamW's elementwise work per trainable parameter and step


# ======================================================================================================= model/method
def build(method: str, seed: int):
    """(model, trainable params) for a method; the base model is SmolLM2-135M in float32."""
    import torch
    from peft import LoraConfig, VeraConfig, get_peft_model

    import nora

    torch.manual_seed(seed)
    model, _tok = _common.load_model()
    model.config.use_cache = False
    if method == "floor":
        model.requires_grad_(False)
        model.enable_input_require_grads()
    elif method == "full_ft":
        model.requires_grad_(True)
    else:
        if method == "nora_64_32":
            cfg = nora.NoraConfig(r=64, r_inner=32, target_modules=TARGETS, init_seed=seed)
        elif method == "loraxs_64":
            cfg = nora.NoraConfig(r=64, structure="adapter", target_modules=TARGETS, init_seed=seed)
        elif method.startswith(("lora_", "dora_", "pissa_")):
            r = int(method.split("_")[1])
            cfg = LoraConfig(
                r=r,
                lora_alpha=r,
                lora_dropout=0.0,
                target_modules=TARGETS,
                use_dora=method.startswith("dora"),
                init_lora_weights="pissa_niter_4" if method.startswith("pissa") else True,
            )
        elif method.startswith("vera_"):
            cfg = VeraConfig(r=int(method.split("_")[1]), target_modules=TARGETS, vera_dropout=0.0)
        else:
            raise ValueError(f"unknown method {method!r}")
        model = get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params


def batch_of_text(batch: int, seq: int):
    """`batch` x `seq` tokens of real text: commonsense training data (instruction + output), packed."""
    _model, tok = None, None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_common.smollm2_dir())
    texts = _common.commonsense_texts("train")
    (b,) = _common.token_batches(tok, texts, n_seq=batch, seq_len=seq, batch_size=batch)
    return b["input_ids"]


def adapter_size(model, method: str) -> dict:
    """Bytes on disk of save_pretrained (and, for NoRA, of the exact rank-r' LoRA export)."""
    out = {}
    tmp = Path(tempfile.mkdtemp(prefix="nora-bench-"))
    try:
        if method == "floor":
            return {"adapter_bytes": 0}
        if method == "full_ft":
            model.save_pretrained(tmp / "a", safe_serialization=True)
        else:
            model.save_pretrained(tmp / "a")
        out["adapter_bytes"] = sum(f.stat().st_size for f in (tmp / "a").rglob("*") if f.is_file())
        out["adapter_weight_bytes"] = sum(f.stat().st_size for f in (tmp / "a").rglob("*.safetensors"))
        if method == "nora_64_32":
            import nora

            nora.export_lora(model, tmp / "lora")
            out["lora_export_bytes"] = sum(f.stat().st_size for f in (tmp / "lora").rglob("*") if f.is_file())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# ======================================================================================================= worker
def worker(method: str, seed: int, batch: int, seq: int, warmup: int, threads: int) -> None:
    """Runs in its own process: build, then obey 'step' / 'profile' / 'finish' lines on stdin; reply JSON lines."""
    import torch

    torch.set_num_threads(threads)

    def reply(obj):
        sys.stdout.write("@@" + json.dumps(obj) + "\n")
        sys.stdout.flush()

    t0 = time.perf_counter()
    model, params = build(method, seed)
    ids = batch_of_text(batch, seq)
    opt = torch.optim.AdamW(params, lr=1e-5) if params else None
    setup_s = time.perf_counter() - t0
    setup_peak = _rss_mb()
    reset_ok = _reset_peak()

    def step():
        start = time.perf_counter()
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        if opt is not None:
            opt.step()
        return time.perf_counter() - start, float(out.loss)

    warm = [step()[0] for _ in range(warmup)]
    reply(
        {
            "ready": True,
            "trainable": sum(p.numel() for p in params),
            "setup_s": setup_s,
            "setup_peak_mb": setup_peak,
            "peak_reset": reset_ok,
            "warmup_s": warm,
            "threads": torch.get_num_threads(),
        }
    )
    times, losses = [], []
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "step":
            got = [step() for _ in range(int(cmd[1]) if len(cmd) > 1 else 1)]
            times += [t for t, _ in got]
            losses += [loss for _, loss in got]
            reply({"times": [t for t, _ in got]})
        elif cmd[0] == "finish":
            train_peak = _rss_mb()
            sizes = adapter_size(model, method)
            reply(
                {
                    "done": True,
                    "times": times,
                    "loss_first": losses[0] if losses else None,
                    "loss_last": losses[-1] if losses else None,
                    "train_peak_mb": train_peak,
                    "peak_after_save_mb": _rss_mb(),
                    **sizes,
                }
            )
            return


class Worker:
    def __init__(self, method: str, args, log_dir: Path):
        self.method = method
        self.log = open(log_dir / f"{method}.log", "w")  # noqa: SIM115
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            method,
            "--seed",
            str(args.seed),
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
            "--warmup",
            str(args.warmup),
            "--threads",
            str(args.threads),
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1, env=env
        )

    def recv(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
            self.log.write(line)
        raise RuntimeError(f"worker {self.method} died (rc={self.proc.wait()}); see its log")

    def send(self, text: str) -> dict:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self.recv()

    def close(self):
        with _suppress():
            self.proc.stdin.close()
        self.proc.wait(timeout=120)
        self.log.close()


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True


# ======================================================================================================= FLOPs
def model_dims(cfg: dict) -> dict:
    """The dimensions the FLOP and parameter formulas need, from a Llama-style HF config dict."""
    return {
        "layers": cfg["num_hidden_layers"],
        "heads": cfg["num_attention_heads"],
        "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
        "hidden": cfg["hidden_size"],
        "vocab": cfg["vocab_size"],
        "tied": cfg.get("tie_word_embeddings", True),
        "shapes": _common.projection_shapes(cfg),
    }


def smollm2_dims() -> dict:
    return model_dims(json.loads((_common.smollm2_dir() / "config.json").read_text()))


def method_kind(method: str) -> tuple[str, int, int]:
    """'lora_16' -> ('lora', 16, 0); 'nora_64_32' -> ('nora', 64, 32); 'loraxs_64' -> ('loraxs', 64, 0)."""
    kind, *ranks = method.split("_")
    ranks = [int(x) for x in ranks] + [0, 0]
    return kind, ranks[0], ranks[1]


def analytic_trainable(method: str, d: dict) -> int:
    """Closed-form trainable parameters of a benchmark method on all 7 projections of a model with dimensions d."""
    if method == "floor":
        return 0
    if method == "full_ft":  # projections + embedding (+ untied head) + 2 RMSNorms per layer + the final norm
        p_lin = d["layers"] * sum(m * n for m, n in d["shapes"].values())
        embed = d["vocab"] * d["hidden"] * (1 if d["tied"] else 2)
        return p_lin + embed + (2 * d["layers"] + 1) * d["hidden"]
    kind, r, r_inner = method_kind(method)
    per_layer = sum(_common.adapter_params(kind, m, n, r, r_inner) for m, n in d["shapes"].values())
    return d["layers"] * per_layer


def flops(method: str, batch: int, seq: int, trainable: int = 0, dims: dict | None = None) -> dict:
    """Analytic FLOPs of one training step (matmuls at 2 FLOPs per multiply-add; elementwise work ignored except
    AdamW) on SmolLM2-135M, or on the model of `dims` (see `model_dims`). See RESULTS.md for the formulas."""
    d = dims or smollm2_dims()
    T, L = batch * seq, d["layers"]
    p_lin = L * sum(m * n for m, n in d["shapes"].values()) + d["vocab"] * d["hidden"]  # + lm_head
    fwd_lin = 2 * T * p_lin
    attn_fwd = L * 4 * batch * d["heads"] * seq * seq * d["head_dim"]  # QK^T and PV, full (non-causal) count
    base = 2 * fwd_lin + 3 * attn_fwd  # forward + input-gradient backward (attention backward = 2x forward)
    adapter = 0
    per_step = 0  # per-step (token-independent) work: folds, DoRA norms
    for m, n in d["shapes"].values():
        if method.startswith(("lora_", "pissa_")):
            r = int(method.split("_")[1])
            adapter += 6 * T * r * (m + n)
        elif method.startswith("dora_"):
            r = int(method.split("_")[1])
            adapter += 6 * T * r * (m + n)
            per_step += 2 * n * r * (n + m) + 3 * m * n  # lora_B(lora_A(eye(n))) + ||W + s BA||_c
        elif method == "nora_64_32":
            r, k = 64, 32
            adapter += 6 * T * k * (m + n)  # rank-k LoRA product: fwd 2, bwd dX 1 + dz 1, grads of left/right 2
            per_step += 4 * r * k * (m + n)  # fold fwd (B B', A' A) + bwd (dB' = B^T dleft, dA' = dright A^T)
        elif method == "loraxs_64":
            r = 64
            adapter += 6 * T * r * m + 4 * T * r * n  # right = A frozen: no dA
            per_step += 4 * m * r * r
        elif method.startswith("vera_"):
            r = int(method.split("_")[1])
            adapter += 4 * T * r * (m + n)  # fwd 2 + dX 2; lambda grads are elementwise
    adapter *= L
    per_step *= L
    weight_grads = fwd_lin if method == "full_ft" else 0
    opt = ADAMW_FLOPS_PER_PARAM * trainable
    total = base + adapter + per_step + weight_grads + opt
    return {
        "base": base,
        "adapter_tokens": adapter,
        "adapter_per_step": per_step,
        "weight_grads": weight_grads,
        "optimizer": opt,
        "total": total,
    }


# ======================================================================================================= driver
def run_params(args) -> dict:
    return {
        "batch": args.batch,
        "seq": args.seq,
        "reps": args.reps,
        "warmup": args.warmup,
        "threads": args.threads,
        "group_size": args.group_size,
    }


def drive(methods: list[str], args, run_id: str) -> dict[str, dict]:
    """Start one worker per method (one at a time), then interleave one timed step per method per round."""
    log_dir = Path(tempfile.mkdtemp(prefix="nora-eff-logs-"))
    print(f"worker logs: {log_dir}", flush=True)
    workers: dict[str, Worker] = {}
    ready: dict[str, dict] = {}
    try:
        for m in methods:  # build one at a time (loading is memory- and CPU-heavy), then keep them all alive
            workers[m] = Worker(m, args, log_dir)
            ready[m] = workers[m].recv()
            print(f"  ready {m}: {ready[m]['trainable']:,} trainable, setup {ready[m]['setup_s']:.1f} s", flush=True)
        order = list(methods)
        for rep in range(args.reps):
            line = []
            for m in order:
                t = workers[m].send("step 1")["times"][0]
                line.append(f"{m}={t:.2f}")
            print(f"  round {rep + 1}/{args.reps}: " + " ".join(line), flush=True)
            order = order[1:] + order[:1]  # rotate the start so no method is always first after a pause
        out = {}
        for m in methods:
            fin = workers[m].send("finish")
            workers[m].close()
            out[m] = {**ready[m], **fin, "run_id": run_id}
        return out
    finally:
        for w in workers.values():
            if w.proc.poll() is None:
                w.proc.kill()


def groups_of(methods: list[str], size: int) -> list[list[str]]:
    """Measurement groups: each holds the references (floor, LoRA r=64) plus up to `size` other methods, so at most
    size + 2 models are resident at once (9 resident workers would need ~22 GB at their training peaks)."""
    refs = [m for m in REFERENCE if m in methods]
    others = [m for m in methods if m not in refs]
    if not others:
        return [refs]
    return [refs + others[i : i + size] for i in range(0, len(others), size)]


def measure(methods: list[str], args) -> dict[str, dict]:
    """Run the groups; every method's record carries the timings of its own group's references."""
    out: dict[str, dict] = {}
    for gi, group in enumerate(groups_of(methods, args.group_size)):
        run_id = f"{uuid.uuid4().hex[:6]}-g{gi}"
        print(f"group {gi}: {group} (run {run_id})", flush=True)
        res = drive(group, args, run_id)
        refs = {f"ref_{m}_times": res[m]["times"] for m in REFERENCE if m in res}
        for m in group:
            rec = {**res[m], **refs, "group": group}
            if m in REFERENCE and m in out:
                out[m].setdefault("other_groups", []).append(rec)
                continue
            out[m] = rec
    return out


def summarize(results: dict[str, dict], args) -> list[dict]:
    f_floor = flops("floor", args.batch, args.seq)["total"]
    rss_lora16 = results.get("lora_16", {}).get("train_peak_mb")
    rows = []
    for m, res in results.items():
        t = _common.median(res["times"])
        t_floor = _common.median(res["ref_floor_times"])  # the floor measured in this method's own group
        t_lora64 = _common.median(res["ref_lora_64_times"]) if "ref_lora_64_times" in res else None
        fl = flops(m, args.batch, args.seq, res["trainable"])
        flop_floor_t = t_floor * fl["total"] / f_floor
        q = sorted(res["times"])
        # per-round ratios: the method and its group's references ran back to back in each round
        paired_floor = _common.median(a / b for a, b in zip(res["times"], res["ref_floor_times"]))
        paired_lora64 = (
            _common.median(a / b for a, b in zip(res["times"], res["ref_lora_64_times"]))
            if "ref_lora_64_times" in res
            else None
        )
        rows.append(
            {
                "method": m,
                "label": METHODS[m],
                "trainable": res["trainable"],
                "step_s": t,
                "step_min_s": q[0],
                "step_max_s": q[-1],
                "n_steps": len(q),
                "vs_floor": t / t_floor,
                "vs_lora64": t / t_lora64 if t_lora64 else None,
                "vs_floor_paired": paired_floor,
                "vs_lora64_paired": paired_lora64,
                "vs_flop_floor_paired": paired_floor * f_floor / fl["total"],
                "gflops": fl["total"] / 1e9,
                "flops": fl,
                "flop_ratio": fl["total"] / f_floor,
                "flop_floor_s": flop_floor_t,
                "vs_flop_floor": t / flop_floor_t,
                "train_peak_mb": res["train_peak_mb"],
                "setup_peak_mb": res["setup_peak_mb"],
                "rss_peak_mb": max(res["train_peak_mb"], res["setup_peak_mb"]),
                "vs_lora16_rss": res["train_peak_mb"] / rss_lora16 if rss_lora16 else None,
                "adapter_bytes": res.get("adapter_bytes"),
                "adapter_weight_bytes": res.get("adapter_weight_bytes"),
                "lora_export_bytes": res.get("lora_export_bytes"),
                "loss_first": res.get("loss_first"),
                "loss_last": res.get("loss_last"),
                "run_id": res.get("run_id"),
                "group": res.get("group"),
                "group_floor_s": t_floor,
                "group_lora64_s": t_lora64,
                "ref_in_other_groups_s": [_common.median(g["times"]) for g in res.get("other_groups", [])],
            }
        )
    return rows


def _pair(a, b) -> str:
    return "-" if a is None else f"{a:.3f} / {b:.3f}"


def render(rows: list[dict]) -> str:
    table = []
    for r in rows:
        size = "-" if not r["adapter_bytes"] else f"{r['adapter_bytes'] / 1e6:.2f} MB"
        if r.get("lora_export_bytes"):
            size += f" (LoRA export {r['lora_export_bytes'] / 1e6:.2f} MB)"
        table.append(
            [
                r["label"],
                _common.fmt_int(r["trainable"]),
                f"{r['step_s']:.2f} [{r['step_min_s']:.2f}-{r['step_max_s']:.2f}]",
                _pair(r["vs_floor"], r["vs_floor_paired"]),
                _pair(r["vs_lora64"], r["vs_lora64_paired"]),
                f"{r['gflops']:.1f} ({r['flop_ratio']:.3f})",
                _pair(r["vs_flop_floor"], r["vs_flop_floor_paired"]),
                f"{r['train_peak_mb']:.0f}",
                f"{r['setup_peak_mb']:.0f}",
                size,
            ]
        )
    return _common.markdown_table(
        [
            "method",
            "trainable",
            "step s, median [min-max]",
            "/ floor (medians / paired)",
            "/ LoRA r=64 (medians / paired)",
            "GFLOP/step (/ floor)",
            "/ own FLOP floor (medians / paired)",
            "train peak RSS MB",
            "setup peak RSS MB",
            "adapter on disk",
        ],
        table,
    )


def verdict(rows: list[dict]) -> list[str]:
    by = {r["method"]: r for r in rows}
    nora = by.get("nora_64_32")
    if not nora:
        return []

    def met(ok):
        return "MET" if ok else "MISSED"

    out = []
    if nora["vs_lora64"] is not None:
        a, b = nora["vs_lora64"], nora["vs_lora64_paired"]
        out.append(
            f"step time vs LoRA r=64: {a:.3f} (medians) / {b:.3f} (paired) (target <= 0.75): {met(max(a, b) <= 0.75)}"
        )
    a, b = nora["vs_flop_floor"], nora["vs_flop_floor_paired"]
    out.append(
        f"step time vs own FLOP floor: {a:.3f} (medians) / {b:.3f} (paired) (target <= 1.10): {met(max(a, b) <= 1.10)}"
    )
    if nora["vs_lora16_rss"] is not None:
        out.append(
            f"train peak RSS vs LoRA r=16: {nora['train_peak_mb']:.0f} / {by['lora_16']['train_peak_mb']:.0f} MB = "
            f"{nora['vs_lora16_rss']:.3f} (target <= 1): {met(nora['vs_lora16_rss'] <= 1.0)}"
        )
    if "lora_64" in by:
        lo = by["lora_64"]
        out.append(
            f"bound: the frozen floor runs at {1 / lo['vs_floor']:.3f} (medians) / {1 / lo['vs_floor_paired']:.3f} "
            "(paired) x LoRA r=64; no adapter can beat the floor, so this is the best ratio to LoRA r=64 reachable"
        )
    return out


# ======================================================================================================= plot
def plot(path: Path) -> Path:
    """results/efficiency.png from every committed results/efficiency*.json run (one colour per run/host): step time
    and train peak RSS relative to the frozen floor, the analytic FLOP ratio, and each run's '0.75 x LoRA r=64' level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for f in sorted(_common.RESULTS_DIR.glob(f"{BENCH}*.json")):
        payload = _common.read_json(f)
        if payload.get("benchmark", "").startswith(BENCH) and "params" in payload and "run_ids" in payload:
            runs.append((f"{payload['machine']['cpu']} ({payload['machine']['date'][:10]})", payload["rows"]))
    if not runs:
        raise SystemExit(f"no {BENCH}*.json step-time results in {_common.RESULTS_DIR}: run the benchmark first")
    methods = [m for m in METHODS if all(any(r["method"] == m for r in rows) for _, rows in runs)]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(15, 4.8))
    width = 0.8 / len(runs)
    x = range(len(methods))
    for i, (name, rows) in enumerate(runs):
        by = {r["method"]: r for r in rows}
        pos = [j + (i - (len(runs) - 1) / 2) * width for j in x]
        bars = ax_t.bar(pos, [by[m]["vs_floor"] for m in methods], width, label=f"measured, {name}")
        level = 0.75 * by["lora_64"]["vs_floor"]
        ax_t.axhline(level, color=bars.patches[0].get_facecolor(), ls="--", lw=1)
        ax_t.annotate(
            f"0.75 x LoRA r=64 ({name.split(' (')[0]})",
            (len(methods) - 0.5, level),
            ha="right",
            va="bottom",
            fontsize=8,
        )
        ax_m.bar(pos, [by[m]["train_peak_mb"] for m in methods], width, label=name)
    flop = {r["method"]: r["flop_ratio"] for r in runs[-1][1]}
    ax_t.scatter(
        list(x), [flop[m] for m in methods], marker="_", s=400, color="black", zorder=3, label="analytic FLOPs / floor"
    )
    for ax in (ax_t, ax_m):
        ax.set_xticks(list(x))
        ax.set_xticklabels(
            [METHODS[m].replace(" (no adapter, input grads)", "") for m in methods],
            rotation=30,
            ha="right",
            fontsize=8,
        )
        ax.grid(axis="y", alpha=0.3)
    ax_t.set_ylim(0.9, None)
    ax_t.set_ylabel("step time / frozen floor (median)")
    ax_t.set_title("SmolLM2-135M training step (fp32, 1 thread, batch 4 x 128)")
    ax_t.legend(fontsize=8, loc="upper left")
    ax_m.set_ylabel("train peak RSS (MB)")
    ax_m.set_title("peak memory per method (one process each)")
    ax_m.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ======================================================================================================= FLOP bound
FLOP_BOUND_MODELS = (_common.SMOLLM2, *bench_params.MODELS)


def flop_bound(models, batch: int, seq: int) -> list[dict]:
    """Analytic step FLOPs of every method relative to the frozen floor and to LoRA r=64, per model: the best
    step-time ratio a method can reach if every method ran at the same FLOP rate (no weights needed)."""
    rows = []
    for name in models:
        d = smollm2_dims() if name == _common.SMOLLM2 else model_dims(bench_params.MODELS[name])
        trainable = {m: analytic_trainable(m, d) for m in METHODS}
        total = {m: flops(m, batch, seq, trainable[m], dims=d)["total"] for m in METHODS}
        for m in METHODS:
            rows.append(
                {
                    "model": name,
                    "method": m,
                    "label": METHODS[m],
                    "trainable": trainable[m],
                    "gflops": total[m] / 1e9,
                    "vs_floor": total[m] / total["floor"],
                    "vs_lora64": total[m] / total["lora_64"],
                }
            )
    return rows


def render_flop_bound(rows: list[dict]) -> str:
    table = [
        [
            r["model"],
            r["label"],
            f"{r['trainable']:,}",
            f"{r['gflops']:,.1f}",
            f"{r['vs_floor']:.3f}",
            f"{r['vs_lora64']:.3f}",
        ]
        for r in rows
    ]
    return _common.markdown_table(
        ["model", "method", "trainable", "GFLOP/step", "FLOPs / floor", "FLOPs / LoRA r=64"], table
    )


# ======================================================================================================= layer micro
def layer_micro(args) -> dict:
    """Layer-level profile: one SmolLM2 decoder layer's 7 projections (frozen / NoRA 64/32 / LoRA r=32 / r=64), input
    (4, 128, n) requiring grad, forward + backward, interleaved. Also times a candidate NoRA forward that fuses the
    adapter add into the GEMM (torch.addmm) to see whether it is worth adopting."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from torch import nn

    import nora
    import nora.layer as nora_layer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = smollm2_dims()["shapes"]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            for k, (m, n) in shapes.items():
                setattr(self, k, nn.Linear(n, m, bias=False))

    def make(kind):
        base = Block()
        if kind == "frozen":
            return base.requires_grad_(False)
        if kind.startswith("nora"):
            cfg = nora.NoraConfig(r=64, r_inner=32, target_modules=list(shapes))
        else:
            r = int(kind.removeprefix("lora"))
            cfg = LoraConfig(r=r, lora_alpha=r, target_modules=list(shapes))
        pm = get_peft_model(base, cfg)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "nora_inner_B" in name or "lora_B" in name:
                    p.normal_(0, 0.02)  # non-zero so no kernel can shortcut zeros
        return pm.base_model.model

    original = nora_layer.Linear.forward

    def forward_addmm(self, x, *a, **kw):
        result = self.base_layer(x, *a, **kw)
        for name in self.active_adapters:
            if name not in self.nora_inner_B:
                continue
            left, right = self._factors(name)
            z = F.linear(self._cast_input_dtype(self.nora_dropout[name](x), right.dtype), right)
            shp = result.shape
            result = torch.addmm(result.reshape(-1, shp[-1]), z.reshape(-1, z.shape[-1]), left.T).view(shp)
        return result

    kinds = ["frozen", "nora", "nora_addmm", "lora32", "lora64"]
    mods = {k: make(k) for k in kinds if k != "nora_addmm"}
    mods["nora_addmm"] = mods["nora"]
    xs = {k: {n: torch.randn(args.batch, args.seq, n, requires_grad=True) for n in {576, 1536}} for k in kinds}
    with torch.no_grad():
        x = torch.randn(args.batch, args.seq, 576)
        ref = mods["nora"].q_proj(x)
        nora_layer.Linear.forward = forward_addmm
        alt = mods["nora"].q_proj(x)
        nora_layer.Linear.forward = original
    bit_identical = bool(torch.equal(ref, alt))

    def run(kind, n_iter=5):
        nora_layer.Linear.forward = forward_addmm if kind == "nora_addmm" else original
        m = mods[kind]
        t = time.perf_counter()
        for _ in range(n_iter):
            loss = 0
            for name, (_out, n) in shapes.items():
                loss = loss + getattr(m, name)(xs[kind][n]).square().mean()
            loss.backward()
            for v in xs[kind].values():
                v.grad = None
            for p in m.parameters():
                p.grad = None
        nora_layer.Linear.forward = original
        return (time.perf_counter() - t) / n_iter

    for k in kinds:
        run(k)
    times = {k: [] for k in kinds}
    for _ in range(args.reps * 2):
        for k in kinds:
            times[k].append(run(k))
    base = _common.median(times["frozen"])
    d = smollm2_dims()
    T = args.batch * args.seq
    base_flops = 4 * T * sum(m * n for m, n in d["shapes"].values())
    extra = {
        "frozen": 0,
        "nora": 6 * T * 32 * sum(m + n for m, n in shapes.values())
        + 4 * 64 * 32 * sum(m + n for m, n in shapes.values()),
        "lora32": 6 * T * 32 * sum(m + n for m, n in shapes.values()),
        "lora64": 6 * T * 64 * sum(m + n for m, n in shapes.values()),
    }
    extra["nora_addmm"] = extra["nora"]
    rows = []
    for k in kinds:
        med = _common.median(times[k])
        ratio = (base_flops + extra[k]) / base_flops
        rows.append(
            {
                "kind": k,
                "ms": med * 1e3,
                "vs_frozen": med / base,
                "flop_ratio": ratio,
                "vs_flop_floor": med / base / ratio,
            }
        )
    return {"rows": rows, "addmm_bit_identical": bit_identical, "times": times}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--reps", type=int, default=10, help="timed rounds (one step per method per round)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method before the rounds")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per worker (1: on a 2-core machine shared with other jobs, 2 threads made small ops "
        "wait for a descheduled thread and slowed every method by 2-2.5x)",
    )
    parser.add_argument("--group-size", type=int, default=2, help="non-reference methods per measurement group")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="ignore cached per-method results")
    parser.add_argument("--tag", default="", help="suffix of the output JSON (results/efficiency{tag}.json)")
    parser.add_argument(
        "--layer-micro", action="store_true", help="layer-level profile only (results/efficiency_layer.json)"
    )
    parser.add_argument(
        "--flop-bound",
        nargs="+",
        choices=FLOP_BOUND_MODELS,
        metavar="MODEL",
        help="analytic FLOP ratios only (no weights, no timing) for these models, e.g. 'smollm2-135m llama3-8b' "
        "(results/efficiency_flop_bound.json); choices: " + ", ".join(FLOP_BOUND_MODELS),
    )
    parser.add_argument(
        "--plot-only", action="store_true", help="redraw results/efficiency.png from the committed JSON results"
    )
    parser.add_argument(
        "--activation-memory",
        action="store_true",
        help="issue 22: saved-activation bytes, peak RSS and step time of floor / LoRA 16 / LoRA-FA 16 / LoRA 64 / "
        "NoRA folded / NoRA low-memory on SmolLM2 4 x 256..2048 and an 8B-shaped block; the remaining flags are "
        "those of benchmarks/_activation_memory.py (--cells, --methods, --reps, --timed, --threads, --resume)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--activation-memory" in argv:
        import _activation_memory

        return _activation_memory.main([a for a in argv if a != "--activation-memory"])
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.seed, args.batch, args.seq, args.warmup, args.threads)
        return 0
    if args.plot_only:
        print(f"wrote {plot(_common.RESULTS_DIR / f'{BENCH}.png')}")
        return 0
    if args.flop_bound:
        rows = flop_bound(args.flop_bound, args.batch, args.seq)
        text = render_flop_bound(rows)
        print(text)
        payload = _common.result_payload(
            BENCH + "_flop_bound", rows, markdown=text, batch=args.batch, seq=args.seq, models=args.flop_bound
        )
        print(f"wrote {_common.write_json(_common.RESULTS_DIR / f'{BENCH}_flop_bound.json', payload)}")
        return 0
    import torch

    torch.set_num_threads(args.threads)  # the workers' thread count, recorded in the machine facts
    if args.layer_micro:
        res = layer_micro(args)
        table = [
            [
                r["kind"],
                f"{r['ms']:.1f}",
                f"{r['vs_frozen']:.3f}",
                f"{r['flop_ratio']:.3f}",
                f"{r['vs_flop_floor']:.3f}",
            ]
            for r in res["rows"]
        ]
        text = _common.markdown_table(
            ["layer variant", "fwd+bwd ms", "/ frozen", "FLOPs / frozen", "/ own FLOP floor"], table
        )
        print(text)
        print(f"addmm variant bit-identical to the current forward: {res['addmm_bit_identical']}")
        payload = _common.result_payload(
            BENCH + "_layer", res["rows"], markdown=text, **{k: v for k, v in res.items() if k != "rows"}
        )
        _common.write_json(_common.RESULTS_DIR / f"{BENCH}_layer.json", payload)
        return 0

    params = run_params(args)
    bench = BENCH + args.tag
    cached = {}
    if not args.force:
        for m in args.methods:
            path = _common.cache_path(bench, m, args.seed)
            if path.exists():
                rec = _common.read_json(path)
                if rec.get("params") == params:
                    cached[m] = rec["result"]
    todo = [m for m in args.methods if m not in cached]
    if todo:
        todo = sorted(set(todo) | {m for m in REFERENCE if m in args.methods}, key=list(METHODS).index)
        print(f"measuring {todo}; cached: {sorted(set(cached) - set(todo))}", flush=True)
        fresh = measure(todo, args)
        for m, res in fresh.items():
            rec = _common.cached_run(bench, m, args.seed, lambda res=res: res, params=params, force=True)
            cached[m] = rec["result"]
    results = {m: cached[m] for m in args.methods}
    run_ids = {r["run_id"] for r in results.values()}
    rows = summarize(results, args)
    text = render(rows)
    lines = verdict(rows)
    print(text)
    print("\n".join(lines))
    payload = _common.result_payload(bench, rows, params=params, verdict=lines, markdown=text, run_ids=sorted(run_ids))
    out = _common.write_json(_common.RESULTS_DIR / f"{bench}.json", payload)
    print(f"wrote {out}")
    print(f"wrote {plot(_common.RESULTS_DIR / f'{BENCH}.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
