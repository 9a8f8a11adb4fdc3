"""Activation memory of a training step (issue 22): what autograd saves, peak RSS and step time per method, on
SmolLM2-135M (fp32, batch 4 x 256/1024/2048) and on one LLaMA-3-8B-shaped decoder block built at full size.

    python benchmarks/bench_efficiency.py --activation-memory                       # everything below
    python benchmarks/bench_efficiency.py --activation-memory --cells smollm2:256 --reps 3

Methods: the frozen floor (no adapter; input gradients), PEFT LoRA r=16, LoRA r=16 with PEFT's LoRA-FA optimizer
(`peft.optimizers.create_lorafa_optimizer`: lora_A frozen), LoRA r=64, NoRA 64/32 with activation_memory="folded"
and with activation_memory="low" (nora.lowmem), all on the 7 projections.

Design
- A fresh process per (cell, method, repetition): ru_maxrss (reset through /proc/self/clear_refs once the model and
  optimizer are built) is that method's own training peak. Repetitions are rounds over all methods in rotated order,
  so slow drifts of the shared machine hit every method alike; step time = median over the rounds.
- Each process: build; one step whose forward runs under `torch.autograd.graph.saved_tensors_hooks` (the saved
  bytes: every distinct storage autograd saves, except the model's own parameters and buffers, which are resident
  anyway); then `--timed` timed steps (zero_grad + forward + backward + AdamW step).
- The 8B block: `LlamaForCausalLM` with ONE decoder layer of LLaMA-3-8B's shape (hidden 4096, intermediate 14336, 32
  heads, 8 kv heads; 218M projection weights, 0.87 GB fp32) and a 256-token vocabulary, so the embedding and the
  head are negligible; its input requires grad (`enable_input_require_grads`), as for any layer but the first.
- Peak RSS depends on the allocator: with glibc's adaptive mmap threshold, freed activations stay in a fragmented
  heap and the same step peaked anywhere within about +-1.4 GB (SmolLM2 1 x 2048). `--mmap-threshold 1048576` fixes
  the threshold, so every tensor >= 1 MiB is unmapped when freed and the peak tracks the live bytes; each process also
  trims the heap (malloc_trim) before the peak is reset. `start_rss_mb` splits the resident set at that point into
  RssAnon and RssFile (the mmapped safetensors weights: NoRA's SVD init has read them, LoRA's first forward will).
- Results are written after every process to results/efficiency_activation_memory.json, so a long run can be
  resumed (`--resume`) and read while it runs.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

BENCH = "efficiency_activation_memory"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = {
    "floor": "frozen floor",
    "lora_16": "LoRA r=16",
    "lorafa_16": "LoRA-FA r=16",
    "lora_64": "LoRA r=64",
    "nora_folded": "NoRA 64/32 folded",
    "nora_low": "NoRA 64/32 low-memory",
}
#: cell name -> (model, batch, seq)
CELLS = {
    "smollm2:256": ("smollm2", 4, 256),
    "smollm2:1024": ("smollm2", 4, 1024),
    "smollm2:2048": ("smollm2", 4, 2048),
    # batch 1 / 2: what fits beside the other jobs of a shared 23 GB, 2-core machine
    "smollm2:1x1024": ("smollm2", 1, 1024),
    "smollm2:1x2048": ("smollm2", 1, 2048),
    "smollm2:2x2048": ("smollm2", 2, 2048),
    "llama8b-block:512": ("llama8b-block", 1, 512),
}
BLOCK = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8}


def build(method: str, model_name: str, seed: int):
    """(model, optimizer) of a method."""
    import torch
    from peft import LoraConfig, get_peft_model

    import nora

    torch.manual_seed(seed)
    if model_name == "smollm2":
        model, _tok = _common.load_model()
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(**BLOCK, num_hidden_layers=1, vocab_size=256, max_position_embeddings=4096)
        model = LlamaForCausalLM(cfg)
    model.config.use_cache = False
    if method == "floor" or model_name != "smollm2":
        model.enable_input_require_grads()  # the floor's backward runs through every layer; the block is a middle one
    if method == "floor":
        model.requires_grad_(False)
    elif method.startswith("nora"):
        mode = method.split("_")[1]
        cfg = nora.NoraConfig(r=64, r_inner=32, target_modules=TARGETS, init_seed=seed, activation_memory=mode)
        model = get_peft_model(model, cfg)
    else:
        r = int(method.split("_")[1])
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=TARGETS))
    model.train()
    if method.startswith("lorafa"):
        from peft.optimizers import create_lorafa_optimizer

        opt = create_lorafa_optimizer(model, r=16, lora_alpha=16, lr=1e-5)  # sets lora_A.requires_grad = False
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5) if params else None
    return model, opt


def input_ids(model_name: str, batch: int, seq: int):
    import torch

    if model_name != "smollm2":
        return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(0))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_common.smollm2_dir())
    (b,) = _common.token_batches(tok, _common.commonsense_texts("train"), n_seq=batch, seq_len=seq, batch_size=batch)
    return b["input_ids"]


def saved_bytes_hooks(model):
    """A saved_tensors_hooks context that records every distinct storage autograd saves (not the model's own
    parameters and buffers), and a function returning the bytes recorded so far."""
    import torch

    resident = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in resident:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), lambda: sum(seen.values())


def worker(cell: str, method: str, timed: int, threads: int, seed: int) -> dict:
    import torch

    sys.path.insert(0, str(_common.BENCH_DIR))
    from bench_efficiency import _reset_peak, _rss_mb

    torch.set_num_threads(threads)
    model_name, batch, seq = CELLS[cell]
    model, opt = build(method, model_name, seed)
    ids = input_ids(model_name, batch, seq)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    setup_peak = _rss_mb()
    trimmed = _trim_heap()  # the freed heap of model building (NoRA: its SVDs) is not the training step's
    start_rss = _status_mb()  # RssFile: the mmapped weights NoRA's SVD read (LoRA's first forward reads them later)
    reset_ok = _reset_peak()

    def step(record=False):
        start, cpu_start = time.perf_counter(), time.process_time()
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        if record:
            hooks, total = saved_bytes_hooks(model)
            with hooks:
                loss = model(input_ids=ids, labels=ids).loss
            saved = total()
        else:
            loss, saved = model(input_ids=ids, labels=ids).loss, None
        loss.backward()
        if opt is not None:
            opt.step()
        return time.perf_counter() - start, time.process_time() - cpu_start, saved, float(loss.detach())

    first_s, first_cpu_s, saved, loss0 = step(record=True)
    timed_steps = [step() for _ in range(timed)]
    return {
        "cell": cell,
        "method": method,
        "trainable": trainable,
        "saved_bytes": saved,
        "tokens": batch * seq,
        "first_step_s": first_s,
        "first_step_cpu_s": first_cpu_s,
        "times": [t[0] for t in timed_steps],
        "cpu_times": [t[1] for t in timed_steps],
        "loss_first": loss0,
        "setup_peak_mb": setup_peak,
        "start_rss_mb": start_rss,
        "heap_trimmed": trimmed,
        "train_peak_mb": _rss_mb(),
        "peak_reset": reset_ok,
        "threads": torch.get_num_threads(),
    }


def _trim_heap() -> bool:
    """gc + glibc malloc_trim(0): return the freed heap of model building to the OS before the peak is reset."""
    import ctypes
    import gc

    gc.collect()
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0) >= 0)
    except (OSError, AttributeError):  # not glibc
        return False


def _status_mb() -> dict[str, float]:
    """VmRSS, RssAnon and RssFile of this process (MB), from /proc/self/status."""
    lines = Path("/proc/self/status").read_text().splitlines()
    keys = ("VmRSS", "RssAnon", "RssFile")
    return {k: int(ln.split()[1]) / 1024 for ln in lines for k in keys if ln.startswith(k + ":")}


def run_cell_process(cell: str, method: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", cell, method, str(args.timed), str(args.threads)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(args.threads)}
    if args.mmap_threshold:  # glibc: every block >= this many bytes is mmapped and unmapped on free (no heap growth)
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    for line in proc.stdout.splitlines():
        if line.startswith("@@"):
            return json.loads(line[2:])
    raise RuntimeError(f"worker {cell} {method} failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")


def step_flops(method: str, cell: str) -> float:
    """Analytic FLOPs of one step (bench_efficiency.flops for the base and LoRA; the NoRA paths and LoRA-FA here)."""
    import bench_efficiency as be

    model_name, batch, seq = CELLS[cell]
    if model_name == "smollm2":
        dims = be.smollm2_dims()
    else:
        cfg = {**BLOCK, "num_hidden_layers": 1, "vocab_size": 256, "tie_word_embeddings": False}
        dims = be.model_dims(cfg)
    base = be.flops("floor", batch, seq, dims=dims)["total"]
    if method == "floor":
        return base
    if method.startswith("lora_"):
        return be.flops(method, batch, seq, dims=dims)["total"]
    T, L = batch * seq, dims["layers"]
    extra = 0
    for m, n in dims["shapes"].values():
        if method == "lorafa_16":  # LoRA r=16 without d lora_A = du x^T
            extra += 6 * T * 16 * (m + n) - 2 * T * 16 * n
        elif method == "nora_folded":  # the rank-k LoRA product + the folds (see bench_efficiency.flops)
            extra += 6 * T * 32 * (m + n) + 4 * 64 * 32 * (m + n)
        elif method == "nora_low":  # fwd z, u, out; bwd u again, du, d left, d M, dx (module docstring of nora.lowmem)
            r, k = 64, 32
            extra += 2 * T * (r * n + 3 * k * r + 3 * m * k + k * n) + 4 * r * k * m + 2 * k * r * n
    return base + L * extra


def summarize(records: list[dict]) -> list[dict]:
    """One row per (cell, method): saved MB, above the floor, vs LoRA r=16 above the floor, peak, step medians."""
    rows = []
    for cell in CELLS:
        recs = [r for r in records if r["cell"] == cell]
        if not recs:
            continue
        by: dict[str, list[dict]] = {}
        for r in recs:
            by.setdefault(r["method"], []).append(r)

        def med_time(m, key="cpu_times", by=by):
            """Median over the timed steps (the recorded first step only when a cell has none)."""
            first = {"cpu_times": "first_step_cpu_s", "times": "first_step_s"}[key]
            ts = [t for r in by.get(m, []) for t in r[key]] or [r[first] for r in by.get(m, [])]
            return _common.median(ts) if ts else None

        floor_saved = by["floor"][0]["saved_bytes"] if "floor" in by else None
        lora_above = by["lora_16"][0]["saved_bytes"] - floor_saved if "lora_16" in by and floor_saved else None
        for m in METHODS:
            if m not in by:
                continue
            first = by[m][0]
            above = first["saved_bytes"] - floor_saved if floor_saved is not None else None
            t, t_folded, t_lora64, t_floor = (med_time(x) for x in (m, "nora_folded", "lora_64", "floor"))
            peaks = [r["train_peak_mb"] for r in by[m]]
            rows.append(
                {
                    "cell": cell,
                    "method": m,
                    "label": METHODS[m],
                    "trainable": first["trainable"],
                    "tokens": first["tokens"],
                    "saved_bytes": first["saved_bytes"],
                    "saved_above_floor_bytes": above,
                    "above_floor_vs_lora16": above / lora_above if above is not None and lora_above else None,
                    "train_peak_mb": _common.median(peaks),
                    "train_peak_mb_all": peaks,
                    "step_cpu_s": t,
                    "step_wall_s": med_time(m, "times"),
                    "step_samples": sum(len(r["times"]) for r in by[m]) or len(by[m]),
                    "vs_folded": t / t_folded if t and t_folded else None,
                    "vs_lora64": t / t_lora64 if t and t_lora64 else None,
                    "flop_ratio": step_flops(m, cell) / step_flops("floor", cell),
                    "vs_flop_floor": (t / t_floor) / (step_flops(m, cell) / step_flops("floor", cell))
                    if t and t_floor
                    else None,
                }
            )
    return rows


def render(rows: list[dict]) -> str:
    def mb(b):
        return "-" if b is None else f"{b / 2**20:,.1f}"

    table = [
        [
            r["cell"],
            r["label"],
            f"{r['trainable']:,}",
            mb(r["saved_bytes"]),
            mb(r["saved_above_floor_bytes"]),
            "-" if r["above_floor_vs_lora16"] is None else f"{r['above_floor_vs_lora16']:.3f}",
            f"{r['train_peak_mb']:,.0f}",
            f"{r['step_cpu_s']:.2f} / {r['step_wall_s']:.2f} (n={r['step_samples']})",
            "-" if r["vs_folded"] is None else f"{r['vs_folded']:.3f}",
            "-" if r["vs_lora64"] is None else f"{r['vs_lora64']:.3f}",
            "-" if r["vs_flop_floor"] is None else f"{r['vs_flop_floor']:.3f}",
        ]
        for r in rows
    ]
    headers = [
        "cell (batch x seq)",
        "method",
        "trainable",
        "saved MiB",
        "above floor MiB",
        "above floor / LoRA r=16's",
    ]
    headers += [
        "train peak RSS MB",
        "step CPU s / wall s (medians)",
        "CPU / NoRA folded",
        "CPU / LoRA r=64",
        "/ own FLOP floor",
    ]
    return _common.markdown_table(headers, table)


def run(args) -> int:
    out_path = _common.RESULTS_DIR / f"{BENCH}{args.tag}.json"
    records: list[dict] = []
    if args.resume and out_path.exists():
        records = _common.read_json(out_path).get("records", [])
    methods = args.methods or list(METHODS)
    for cell in args.cells:
        order = list(methods)
        for rep in range(args.reps):
            for m in order:
                if sum(r["cell"] == cell and r["method"] == m for r in records) > rep:
                    continue  # resumed
                rec = run_cell_process(cell, m, args)
                rec["rep"], rec["malloc_mmap_threshold"] = rep, args.mmap_threshold or None
                records.append(rec)
                print(
                    f"{cell} rep {rep} {m}: saved {rec['saved_bytes'] / 2**20:,.1f} MiB, peak "
                    f"{rec['train_peak_mb']:,.0f} MB, steps {[round(t, 2) for t in rec['times']]}",
                    flush=True,
                )
                rows = summarize(records)
                payload = _common.result_payload(
                    BENCH, rows, markdown=render(rows), records=records, timed=args.timed, threads=args.threads,
                    malloc_mmap_threshold=args.mmap_threshold or None,
                )  # fmt: skip
                _common.write_json(out_path, payload)
            order = order[1:] + order[:1]
    print(render(summarize(records)))
    print(f"wrote {out_path}")
    return 0


def _layer_profile(shapes: dict, n_tokens: int, reps: int) -> dict:
    """Interleaved CPU-time medians of forward + backward through 7 projections of `shapes`, per method."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn

    import nora

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            for k, (m, n) in shapes.items():
                setattr(self, k, nn.Linear(n, m, bias=False))

    def make(kind):
        torch.manual_seed(0)
        if kind.startswith("nora"):
            cfg = nora.NoraConfig(
                r=64, r_inner=32, target_modules=list(shapes), activation_memory=kind.split("_")[1],
                outer_init="random", init_weights=False,
            )  # fmt: skip
        else:
            r = int(kind.split("_")[1])
            cfg = LoraConfig(r=r, lora_alpha=r, target_modules=list(shapes), init_lora_weights=False)
        return get_peft_model(Block(), cfg).base_model.model

    kinds = ["nora_folded", "nora_low", "lora_16", "lora_64"]
    mods = {k: make(k) for k in kinds}
    xs = {n: torch.randn(n_tokens, n, requires_grad=True) for n in {n for _, n in shapes.values()}}

    def run(kind):
        mod = mods[kind]
        start = time.process_time()
        loss = sum(getattr(mod, name)(xs[n]).square().mean() for name, (_m, n) in shapes.items())
        loss.backward()
        elapsed = time.process_time() - start
        for v in xs.values():
            v.grad = None
        mod.zero_grad(set_to_none=True)
        return elapsed

    for k in kinds:
        run(k)
    times = {k: [] for k in kinds}
    order = list(kinds)
    for _ in range(reps):
        for k in order:
            times[k].append(run(k))
        order = order[1:] + order[:1]
    med = {k: _common.median(v) for k, v in times.items()}
    return {
        "tokens": n_tokens,
        "median_cpu_s": med,
        "low_vs_folded": med["nora_low"] / med["nora_folded"],
        "times": times,
    }


def layer_micro(args) -> dict:
    """CPU time of forward + backward of one decoder layer's 7 projections (input requires grad), NoRA folded vs
    low-memory vs LoRA r=16 / r=64, in ONE process, interleaved, median over `args.reps * 5` rounds; per model shape.
    This isolates the adapter path (everything else in a step is identical between the two NoRA paths)."""
    import torch

    torch.set_num_threads(args.threads)
    smol = _common.projection_shapes(json.loads((_common.smollm2_dir() / "config.json").read_text()))
    cases = {"smollm2": (smol, 4 * 256), "llama8b-block": (_common.projection_shapes({**BLOCK, "head_dim": 128}), 512)}
    out = {}
    for name, (shapes, n_tokens) in cases.items():
        out[name] = res = _layer_profile(shapes, n_tokens, args.reps * 5)
        print(f"{name}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in res["median_cpu_s"].items()), flush=True)
    return out


def add_arguments(parser) -> None:
    parser.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    parser.add_argument("--timed", type=int, default=1, help="timed steps per process after the recorded step")
    parser.add_argument("--resume", action="store_true", help="keep the records already in the results JSON")
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=0,
        help="MALLOC_MMAP_THRESHOLD_ of the cell processes (bytes; 0: glibc's adaptive default). A fixed threshold "
        "(e.g. 1048576) returns every freed tensor of that size to the OS at once, so peak RSS tracks the live bytes "
        "instead of how the heap happened to fragment",
    )
    parser.add_argument(
        "--tag", default="", help="suffix of the output JSON (results/efficiency_activation_memory{tag}.json)"
    )


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help="default: all")
    parser.add_argument("--reps", type=int, default=3, help="rounds of fresh processes (one per method per round)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    add_arguments(parser)
    parser.add_argument("--layer", action="store_true", help="layer-level CPU-time profile only (folded vs low)")
    args = parser.parse_args(argv)
    if args.layer:
        res = layer_micro(args)
        text = _common.markdown_table(
            ["shapes (tokens)", "NoRA folded ms", "NoRA low ms", "LoRA r=16 ms", "LoRA r=64 ms", "low / folded"],
            [
                [f"{k} ({v['tokens']})", *(f"{v['median_cpu_s'][m] * 1e3:.1f}" for m in v["median_cpu_s"]),
                 f"{v['low_vs_folded']:.3f}"]
                for k, v in res.items()
            ],
        )  # fmt: skip
        print(text)
        payload = _common.result_payload(BENCH + "_layer", res, markdown=text, reps=args.reps, threads=args.threads)
        print(f"wrote {_common.write_json(_common.RESULTS_DIR / f'{BENCH}_layer.json', payload)}")
        return 0
    return run(args)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":  # one cell process
    _, _, cell_, method_, timed_, threads_ = sys.argv
    res = worker(cell_, method_, int(timed_), int(threads_), seed=0)
    sys.stdout.write("@@" + json.dumps(res) + "\n")
