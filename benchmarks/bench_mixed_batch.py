"""Mixed-batch throughput: one batch spread over N adapters (`adapter_names=[...]`, one name per row), NoRA vs PEFT LoRA.

SmolLM2-135M (float32), all 7 projections of every block. NoRA r=64/32: 16 adapters loaded from one saved file, so
they hold equal outer factors (nora.sharing points them at one tensor) and different random inner factors. PEFT LoRA
r=16: 16 adapters with random A and B. Row i of the batch uses adapter t{i mod N}.

Two inference shapes, both under torch.inference_mode:
- prefill: the batch (16 x 128 tokens by default) in one forward;
- decode: one new token per row on a KV cache of the prefill (a generation step), from a fresh copy of the cache.

All cells (method x N x shape) run interleaved in one process, `--repeats` rounds, and the median time per cell is
reported as tokens/s; `__base__` (every row on the plain base) is the floor. Run from the repo root:

    python benchmarks/bench_mixed_batch.py            # writes results/mixed_batch.json and the RESULTS.md block
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NS = (1, 4, 16)
RESULT = _common.RESULTS_DIR / "mixed_batch.json"


def randomize(model, prefix: str, scale: float, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if prefix in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def build(n_adapters: int):
    """(nora model, lora model): SmolLM2 with `n_adapters` NoRA r=64/32 adapters and as many PEFT LoRA r=16 ones."""
    from peft import LoraConfig, get_peft_model

    import nora

    base, _tok = _common.load_model()
    base.eval()
    names = [f"t{i}" for i in range(n_adapters)]
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS), names[0])
    for name in names[1:]:
        lora.add_adapter(name, LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS))
    randomize(lora, "lora_", 0.02, seed=0)
    cfg = nora.NoraConfig(r=64, r_inner=32, target_modules=TARGETS, save_outer_factors=True)
    model = get_peft_model(base, cfg, names[0])
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)  # further adapters load the same outer factors instead of redoing the SVD
        for name in names[1:]:
            model.load_adapter(str(Path(tmp) / names[0]), adapter_name=name)
    randomize(model, "nora_inner_", 0.05, seed=1)
    return model.eval(), lora.eval()


def shared_outer_layers(model) -> tuple[int, int]:
    """(layers whose 16 adapters hold one B/A tensor, NoRA layers)."""
    from nora.model import nora_layers
    from nora.sharing import shares_outer

    layers = [layer for _, layer in nora_layers(model)]
    shared = sum(all(shares_outer(layer, "t0", a) for a in layer.nora_B) for layer in layers)
    return shared, len(layers)


def measure(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    nora_model, lora_model = build(max(NS))
    vocab = nora_model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq))
    step_ids = torch.randint(0, vocab, (args.batch, 1))
    models = {"nora": nora_model, "lora": lora_model}
    cells = [("nora", "base", args.batch)] + [(m, f"N={n}", n) for n in NS for m in ("nora", "lora")]

    def names_for(n):
        return ["__base__"] * args.batch if n == "base" else [f"t{i % n}" for i in range(args.batch)]

    caches = {}
    with torch.inference_mode():
        for method, label, n in cells:  # prefill once per cell for its decode cache
            names = names_for("base" if label == "base" else n)
            out = models[method](input_ids=ids, adapter_names=names, use_cache=True)
            caches[(method, label)] = out.past_key_values

    from nora import mixed_batch

    decisions = {"shared": 0, "grouped": 0}
    use_shared = mixed_batch._use_shared

    def counting(*a, **k):
        choice = use_shared(*a, **k)
        decisions["shared" if choice else "grouped"] += 1
        return choice

    times: dict[tuple[str, str, str], list[float]] = {}
    paths: dict[tuple[str, str, str], dict] = {}
    mixed_batch._use_shared = counting
    try:
        for rep in range(args.repeats + 1):  # round 0 is the warm-up
            for shape in ("prefill", "decode"):
                for method, label, n in cells:
                    names = names_for("base" if label == "base" else n)
                    model = models[method]
                    kwargs = {"input_ids": ids}
                    if shape == "decode":
                        kwargs = {"input_ids": step_ids, "past_key_values": copy.deepcopy(caches[(method, label)])}
                    decisions.update(shared=0, grouped=0)
                    with torch.inference_mode():
                        t0 = time.perf_counter()
                        model(**kwargs, adapter_names=names, use_cache=shape == "decode")
                        dt = time.perf_counter() - t0
                    if rep:
                        times.setdefault((shape, method, label), []).append(dt)
                    if method == "nora":
                        paths[(shape, method, label)] = dict(decisions)
                    print(f"rep {rep} {shape:7s} {method:4s} {label:5s} {dt * 1e3:8.1f} ms", flush=True)
    finally:
        mixed_batch._use_shared = use_shared

    rows = []
    for (shape, method, label), ts in times.items():
        tokens = args.batch * (args.seq if shape == "prefill" else 1)
        med = statistics.median(ts)
        rows.append(
            {
                "shape": shape,
                "method": method,
                "adapters": label,
                "median_s": med,
                "tokens_per_s": tokens / med,
                "times_s": ts,
                "nora_layer_paths": paths.get((shape, method, label)),
            }
        )
    shared, total = shared_outer_layers(nora_model)
    return _common.result_payload(
        "mixed_batch",
        rows,
        settings={
            "batch": args.batch,
            "seq": args.seq,
            "repeats": args.repeats,
            "threads": args.threads,
            "nora": "r=64, r_inner=32, 7 projections, 16 adapters",
            "lora": "PEFT LoRA r=16, 7 projections, 16 adapters",
            "nora_layers_sharing_one_outer_tensor": f"{shared}/{total}",
        },
    )


def render(payload: dict) -> str:
    rows = {(r["shape"], r["method"], r["adapters"]): r for r in payload["rows"]}
    s = payload["settings"]
    out = [
        f"Batch {s['batch']} x {s['seq']} tokens (decode: {s['batch']} x 1 on a {s['seq']}-token KV cache), "
        f"{s['threads']} torch thread(s), median of {s['repeats']} interleaved rounds; tokens/s (higher is better).",
        "",
        "| shape | adapters in the batch | NoRA r=64/32 | PEFT LoRA r=16 | NoRA / LoRA | NoRA vs its N=1 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for shape in ("prefill", "decode"):
        base = rows[(shape, "nora", "base")]["tokens_per_s"]
        out.append(f"| {shape} | all `__base__` (floor) | {base:,.0f} | | | |")
        one = rows[(shape, "nora", "N=1")]["tokens_per_s"]
        for n in NS:
            nr, lr = rows[(shape, "nora", f"N={n}")]["tokens_per_s"], rows[(shape, "lora", f"N={n}")]["tokens_per_s"]
            out.append(f"| {shape} | N={n} | {nr:,.0f} | {lr:,.0f} | {nr / lr:.2f}x | {nr / one:.2f}x |")
    out += [
        "",
        f"NoRA layers holding one outer tensor for all 16 adapters: {s['nora_layers_sharing_one_outer_tensor']}.",
    ]
    for shape in ("prefill", "decode"):
        picks = {n: rows[(shape, "nora", f"N={n}")]["nora_layer_paths"] for n in NS}
        text = ", ".join(f"N={n}: {p['shared']} shared / {p['grouped']} per-adapter" for n, p in picks.items())
        out.append(f"Path chosen per layer class, {shape}: {text}.")
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report", action="store_true", help="only re-render RESULTS.md from the saved JSON")
    args = parser.parse_args(argv)
    if not args.report:
        _common.write_json(RESULT, measure(args))
    payload = _common.read_json(RESULT)
    text = render(payload) + f"\n\nCommand: `{payload['command']}`"
    print(text)
    _common.replace_block(_common.BENCH_DIR / "RESULTS.md", "mixed_batch", text)


if __name__ == "__main__":
    main()
