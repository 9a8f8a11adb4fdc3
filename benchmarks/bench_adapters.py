"""Many tiny adapters (issue 21): rebuild reproducibility, file size / load time, memory per extra adapter.

    python benchmarks/bench_adapters.py repro     # outer factors rebuilt with 1 vs 2 torch threads: fp32, aligned, fp64
    python benchmarks/bench_adapters.py files     # SmolLM2 r=64/32 full vs compact vs exported LoRA vs PEFT LoRA r=16
    python benchmarks/bench_adapters.py memory    # RSS (with / without malloc_trim) and live tensor storage with 1, 8, 32
                                                  # adapters loaded (fresh process per cell; --root reuses adapters)
    python benchmarks/bench_adapters.py report    # regenerate the RESULTS.md block from the JSON files

Results: benchmarks/results/adapters_{repro,files,memory}.json; RESULTS.md section "Many tiny adapters (issue 21)".
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, markdown_table, median, read_json, replace_block, result_payload, write_json

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, R_INNER = 64, 32
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _rss_mb() -> float:
    """Current resident set size (MB) from /proc/self/statm."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _rss_anon_mb() -> float:
    """Anonymous resident memory (MB): RSS without the file-backed pages (mmapped base weights)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no RssAnon line: the memory benchmark needs Linux")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _smollm2():
    from _common import load_model

    model, _ = load_model()
    return model.eval()


def _tokens(seed: int = 0, batch: int = 4, seq: int = 64):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 49152, (batch, seq), generator=gen)


# ================================================================================================ repro
def _repro_child(out: str, threads: int) -> None:
    """Outer factors of every SmolLM2 target with `threads` torch threads: full SVD in float32 and in float64."""
    import torch

    from nora.init import outer_svd

    _threads(threads)
    model = _smollm2()
    factors = {}
    start = time.perf_counter()
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS:
            w = mod.weight.detach()
            B32, A32, _ = outer_svd(w, R, svd_method="full")
            B64, A64, s64 = outer_svd(w, R, svd_method="full", dtype=torch.float64)
            factors[name] = (B32, A32, B64, A64, s64)
    torch.save({"factors": factors, "seconds": time.perf_counter() - start}, out)


def _logits(model, factors: dict, which: str, tokens):
    """Logits of the NoRA model with every module's outer factors replaced by `factors[name][which]`."""
    import torch

    from nora.layer import NoraLayer

    for name, mod in model.named_modules():
        if isinstance(mod, NoraLayer):
            key = name.removeprefix("base_model.model.")
            B, A = factors[key][which]
            mod.nora_B["default"].copy_(B)
            mod.nora_A["default"].copy_(A)
    with torch.no_grad():
        return model(input_ids=tokens).logits.double()


def _procrustes_full(B, A, ref_B, ref_A, k: int):
    """'Align to a stored sketch' with a full r x r rotation: sketches with k >= r columns (too big to store: 2 r k
    floats per module), orthogonal Procrustes on the whole top-r block."""
    import torch

    gen = torch.Generator().manual_seed(7)
    om_A = torch.randn(A.shape[1], k, generator=gen, dtype=torch.float64)
    om_B = torch.randn(B.shape[0], k, generator=gen, dtype=torch.float64)
    X = torch.cat([A.double() @ om_A, (om_B.T @ B.double()).T / B.double().norm() * A.double().norm()], 1)
    Y = torch.cat([ref_A.double() @ om_A, (om_B.T @ ref_B.double()).T / B.double().norm() * A.double().norm()], 1)
    U, _, Vh = torch.linalg.svd(Y @ X.T)
    Q = U @ Vh
    return (B.double() @ Q.T).float(), (Q @ A.double()).float()


def run_repro(args) -> dict:
    import torch
    from peft import get_peft_model

    import nora
    from nora import compact

    tmp = Path(tempfile.mkdtemp(prefix="nora-repro-"))
    runs = {}
    for t in (1, 2):
        out = tmp / f"t{t}.pt"
        subprocess.run([sys.executable, __file__, "_repro_child", str(out), str(t)], check=True)
        runs[t] = torch.load(out, weights_only=False)
    f1, f2 = runs[1]["factors"], runs[2]["factors"]
    _threads(1)
    base = _smollm2()
    tokens = _tokens()
    with torch.no_grad():
        base_logits = base(input_ids=tokens).logits.double()
    rows = []
    for std in args.inner_std:
        torch.manual_seed(0)
        cfg = nora.NoraConfig(r=R, r_inner=R_INNER, target_modules=TARGETS, init_weights=False, inner_init_std=std,
                              save_outer_factors=False, svd_method="full")  # fmt: skip
        model = get_peft_model(_smollm2(), cfg).eval()
        table = {}
        for name in f1:
            B32a, A32a, B64a, A64a, _ = f1[name]
            B32b, A32b, B64b, A64b, s64b = f2[name]
            rec32 = compact.sketches(B32a, A32a)
            rec64 = compact.sketches(B64a.float(), A64a.float())
            B32s, A32s = compact.align(B32b.double(), A32b.double(), s64b, *rec32)
            B32f, A32f = _procrustes_full(B32b, A32b, B32a, A32a, k=R)
            B64s, A64s = compact.align(B64b, A64b, s64b, *rec64)
            table[name] = {
                "fp32_t1": (B32a, A32a), "fp32_t2": (B32b, A32b),
                "fp32_sketch_t2": (B32s.float(), A32s.float()), "fp32_fullalign_t2": (B32f, A32f),
                "fp64_t1": (B64a.float(), A64a.float()), "fp64_t2": (B64b.float(), A64b.float()),
                "fp64_aligned_t2": (B64s.float(), A64s.float()),
            }  # fmt: skip
        res = {
            "fp32_sketch": max(compact.sketch_residual(*table[n]["fp32_sketch_t2"], *compact.sketches(*table[n]["fp32_t1"])) for n in f1),
            "fp32_naive": max(compact.sketch_residual(*table[n]["fp32_t2"], *compact.sketches(*table[n]["fp32_t1"])) for n in f1),
            "fp64_naive": max(compact.sketch_residual(*table[n]["fp64_t2"], *compact.sketches(*table[n]["fp64_t1"])) for n in f1),
            "fp64_aligned": max(compact.sketch_residual(*table[n]["fp64_aligned_t2"], *compact.sketches(*table[n]["fp64_t1"])) for n in f1),
        }  # fmt: skip
        logits = {w: _logits(model, table, w, tokens) for w in table[next(iter(table))]}
        delta = (logits["fp32_t1"] - base_logits).norm()

        def cmp(
            a: str, b: str, method: str, residual_key: str | None, logits=logits, delta=delta, res=res, std=std
        ) -> dict:
            diff = logits[a] - logits[b]
            return {
                "inner_std": std,
                "method": method,
                "rel_to_logits": float(diff.norm() / logits[a].norm()),
                "rel_to_adapter_effect": float(diff.norm() / delta),
                "max_abs": float(diff.abs().max()),
                "worst_sketch_residual": res.get(residual_key) if residual_key else None,
                "refused_at_tolerance": (res[residual_key] > compact.VERIFY_RTOL) if residual_key else None,
            }

        rows += [
            cmp("fp32_t1", "fp32_t2", "fp32 SVD, naive rebuild", "fp32_naive"),
            cmp("fp32_t1", "fp32_sketch_t2", "fp32 SVD + align to k=4 sketch (per-cluster Procrustes)", "fp32_sketch"),
            cmp("fp32_t1", "fp32_fullalign_t2", "fp32 SVD + full r x r alignment (k=r sketch)", None),
            cmp("fp64_t1", "fp64_t2", "fp64 SVD rounded to fp32, naive", "fp64_naive"),
            cmp("fp64_t1", "fp64_aligned_t2", "fp64 SVD rounded + align to k=4 sketch (nora.compact)", "fp64_aligned"),
        ]
        del model
        gc.collect()
    same_bits = sum(
        torch.equal(f1[n][2].float(), f2[n][2].float()) and torch.equal(f1[n][3].float(), f2[n][3].float()) for n in f1
    )
    return result_payload(
        "adapters_repro",
        rows,
        modules=len(f1),
        fp64_modules_bit_identical_t1_t2=same_bits,
        svd_seconds={"threads1": runs[1]["seconds"], "threads2": runs[2]["seconds"]},
        note="Per module, the full SVD (fp32 and fp64) of the SmolLM2-135M target weights is computed in two fresh "
        "processes with 1 and 2 torch threads; the same random inner factors are applied to both; logits on 4 x 64 "
        "random tokens. rel_to_adapter_effect = ||logits(t1) - logits(t2)|| / ||logits(t1) - logits(base)||.",
    )


# ================================================================================================ files
def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _load_child(kind: str, adapter: str, threads: int) -> None:
    """Fresh process: time from_pretrained of one adapter (the base model load is not counted)."""
    import torch
    from peft import PeftModel

    import nora  # noqa: F401

    _threads(threads)
    base = _smollm2()
    start = time.perf_counter()
    model = PeftModel.from_pretrained(base, adapter)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        model(input_ids=_tokens(batch=1, seq=8))
    print(json.dumps({"kind": kind, "load_s": seconds}))


def _make_adapters(tmp: Path) -> dict[str, Path]:
    import torch
    from peft import LoraConfig, get_peft_model

    import nora

    _threads(1)
    out = {}
    torch.manual_seed(0)
    # one model (float64 SVD, as compact files need) saved both ways, so full and compact hold the same adapter
    cfg = nora.NoraConfig(r=R, r_inner=R_INNER, target_modules=TARGETS, init_weights=False, save_outer_factors=False)
    model = get_peft_model(_smollm2(), cfg)
    model.save_pretrained(tmp / "nora_compact")
    model.peft_config["default"].save_outer_factors = True
    model.save_pretrained(tmp / "nora_full")
    out["nora_full"], out["nora_compact"] = tmp / "nora_full", tmp / "nora_compact"
    nora.export_lora(model, tmp / "exported_lora")
    out["exported_lora_r32"] = tmp / "exported_lora"
    lora = get_peft_model(_smollm2(), LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False))
    lora.save_pretrained(tmp / "peft_lora_r16")
    out["peft_lora_r16"] = tmp / "peft_lora_r16"
    return out


def llama8b_sizes() -> list[dict]:
    """Adapter file bytes for LLaMA-3-8B from a meta-device model: the real state dicts' shapes, no weights."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    import nora
    from bench_params import meta_model

    rows = []
    for kind in ("nora_full", "nora_compact", "exported_lora_r32", "peft_lora_r16"):
        model = meta_model("llama3-8b").to(torch.bfloat16)
        if kind.startswith("nora") or kind == "exported_lora_r32":
            cfg = nora.NoraConfig(
                r=R, r_inner=R_INNER, target_modules=TARGETS, save_outer_factors=kind != "nora_compact"
            )
            peft_model = get_peft_model(model, cfg)
            if kind == "exported_lora_r32":  # rank-32 LoRA factors (fp32) of every module
                n = sum(4 * R_INNER * (m.in_features + m.out_features) for _, m in nora.model.nora_layers(peft_model))
                rows.append({"kind": kind, "bytes": n, "how": "r' (m + n) fp32 per module"})
                continue
        else:
            peft_model = get_peft_model(model, LoraConfig(r=16, target_modules=TARGETS))
        sd = get_peft_model_state_dict(peft_model)
        rows.append({"kind": kind, "bytes": sum(t.numel() * t.element_size() for t in sd.values()),
                     "how": "get_peft_model_state_dict on the meta model (bf16 base)"})  # fmt: skip
    return rows


def run_files(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="nora-files-"))
    adapters = _make_adapters(tmp)
    rows = []
    for kind, path in adapters.items():
        times = []
        for _ in range(args.repeats):
            out = subprocess.run([sys.executable, __file__, "_load_child", kind, str(path), str(args.threads)],
                                 check=True, capture_output=True, text=True).stdout  # fmt: skip
            times.append(json.loads(out.strip().splitlines()[-1])["load_s"])
        rows.append({"model": "SmolLM2-135M", "kind": kind, "bytes": _dir_size(path), "load_s_median": median(times),
                     "load_s": times})  # fmt: skip
    for row in llama8b_sizes():
        rows.append({"model": "LLaMA-3-8B (meta)", **row})
    return result_payload("adapters_files", rows, threads=args.threads, repeats=args.repeats,
                          note="load_s: PeftModel.from_pretrained(base, dir) in a fresh process, base model load "
                          "excluded; the compact file rebuilds every outer factor (float64 SVD) on load.")  # fmt: skip


# ================================================================================================ memory
def _malloc_trim() -> None:
    """Return freed heap pages to the OS (glibc keeps freed load-time temporaries mapped; not live memory)."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _live_storage(model) -> dict:
    """Bytes of the live tensor storages of the adapters (unique storage data_ptrs of every parameter and buffer
    outside the base layers), split into outer factors (nora_B / nora_A) and the rest; and how many distinct
    outer-factor storages the model holds (shared outer factors: one per module, whatever the adapter count)."""
    seen: dict[int, tuple[str, int]] = {}
    for key, t in [*model.named_parameters(), *model.named_buffers()]:
        if ".base_layer." in key or not ("nora_" in key or "lora_" in key):
            continue
        storage = t.untyped_storage()
        seen.setdefault(storage.data_ptr(), (key, storage.nbytes()))
    outer = {p: b for p, (k, b) in seen.items() if ".nora_B." in k or ".nora_A." in k}
    return {"live_adapter_bytes": sum(b for _, b in seen.values()), "live_outer_bytes": sum(outer.values()),
            "outer_storages": len(outer)}  # fmt: skip


def _memory_child(kind: str, root: str, n: int, trim: bool) -> None:
    import torch
    from peft import PeftModel

    import nora  # noqa: F401

    _threads(1)
    base = _smollm2()
    gc.collect()
    if trim:
        _malloc_trim()
    before, anon_before = _rss_mb(), _rss_anon_mb()
    dirs = sorted(Path(root).iterdir())[:n]
    model = PeftModel.from_pretrained(base, dirs[0], adapter_name="a0")
    for i, d in enumerate(dirs[1:], 1):
        model.load_adapter(d, adapter_name=f"a{i}")
        if trim:
            gc.collect()
            _malloc_trim()
    gc.collect()
    if trim:
        _malloc_trim()
    after, anon_after = _rss_mb(), _rss_anon_mb()
    inner = sum(p.numel() * p.element_size() for k, p in model.named_parameters() if "inner" in k or "lora_" in k)
    with torch.no_grad():
        model(input_ids=_tokens(batch=1, seq=8))
    print(json.dumps({"kind": kind, "n": n, "malloc_trim": trim, "rss_base_mb": before, "rss_loaded_mb": after,
                      "rss_anon_base_mb": anon_before, "rss_anon_loaded_mb": anon_after,
                      "peak_rss_mb": _peak_rss_mb(), **_live_storage(model), "trainable_bytes": inner}))  # fmt: skip


def _make_many(tmp: Path, counts: int) -> dict[str, Path]:
    import torch
    from peft import LoraConfig, get_peft_model

    import nora

    _threads(1)
    roots = {k: tmp / k for k in ("nora_full", "nora_compact", "peft_lora_r16")}
    for p in roots.values():
        p.mkdir()
    cfg = nora.NoraConfig(r=R, r_inner=R_INNER, target_modules=TARGETS, save_outer_factors=False)
    model = get_peft_model(_smollm2(), cfg)
    lora = get_peft_model(_smollm2(), LoraConfig(r=16, target_modules=TARGETS, init_lora_weights=False))
    for i in range(counts):
        torch.manual_seed(i)
        with torch.no_grad():
            for k, p in model.named_parameters():
                if "inner" in k:
                    p.normal_(0, 0.02)
            for k, p in lora.named_parameters():
                if "lora_" in k:
                    p.normal_(0, 0.02)
        model.peft_config["default"].save_outer_factors = False
        model.save_pretrained(roots["nora_compact"] / f"{i:03d}")
        model.peft_config["default"].save_outer_factors = True
        model.save_pretrained(roots["nora_full"] / f"{i:03d}")
        lora.save_pretrained(roots["peft_lora_r16"] / f"{i:03d}")
    return roots


def memory_slopes(cells: list[dict]) -> dict:
    """MB per extra adapter from one kind's cells (one per count n): end to end, from the second count on (the
    first compact load's one-time rebuild garbage sits in RSS(n_min) when glibc keeps it), and the least-squares
    slope over all counts (the steadiest: glibc's retained free memory moves single cells by several MB)."""
    cells = sorted(cells, key=lambda r: r["n"])
    ns = [r["n"] for r in cells]
    if len(set(ns)) < 2:
        raise ValueError(f"memory slopes need at least two adapter counts, got {ns}: pass --counts 1 8 32")
    rss = [r["rss_loaded_mb"] for r in cells]
    live = [r["live_adapter_bytes"] / 2**20 for r in cells]

    def fit(ys: list[float]) -> float:
        mean_n, mean_y = sum(ns) / len(ns), sum(ys) / len(ys)
        return sum((n - mean_n) * (y - mean_y) for n, y in zip(ns, ys)) / sum((n - mean_n) ** 2 for n in ns)

    anon = [r.get("rss_anon_loaded_mb") for r in cells]
    trained = cells[-1]["trainable_bytes"] / ns[-1] / 2**20
    out = {"kind": cells[0]["kind"], "malloc_trim": cells[0]["malloc_trim"], "counts": ns,
           "trained_mb_per_adapter": trained,
           "rss_end_to_end_mb": (rss[-1] - rss[0]) / (ns[-1] - ns[0]),
           "rss_from_second_mb": (rss[-1] - rss[1]) / (ns[-1] - ns[1]) if len(ns) > 2 else None,
           "rss_least_squares_mb": fit(rss), "anon_least_squares_mb": None if None in anon else fit(anon),
           "live_mb": (live[-1] - live[0]) / (ns[-1] - ns[0])}  # fmt: skip
    for key in ("rss_end_to_end_mb", "rss_from_second_mb", "rss_least_squares_mb", "anon_least_squares_mb", "live_mb"):
        out[key.replace("_mb", "_ratio")] = None if out[key] is None else out[key] / trained
    return out


def run_memory(args) -> dict:
    if args.root is not None and (args.root / "nora_compact").is_dir():  # reuse the adapters of an earlier run
        roots = {k: args.root / k for k in ("nora_full", "nora_compact", "peft_lora_r16")}
    else:
        roots = _make_many(Path(tempfile.mkdtemp(prefix="nora-mem-")), max(args.counts))
    from concurrent.futures import ThreadPoolExecutor

    def cell(spec):  # a fresh process per cell; RSS is per process, so cells may run side by side (--jobs)
        kind, n, trim = spec
        cmd = [sys.executable, __file__, "_memory_child", kind, str(roots[kind]), str(n), str(int(trim))]
        row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(row, flush=True)
        return row

    specs = [(kind, n, trim) for trim in (False, True) for kind in args.kinds for n in args.counts]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(cell, specs))
    slopes = [memory_slopes([r for r in rows if r["kind"] == kind and r["malloc_trim"] == trim])
              for trim in (False, True) for kind in args.kinds]  # fmt: skip
    return result_payload("adapters_memory", rows, slopes=slopes,
                          note="RSS after loading n adapters (PeftModel.from_pretrained + load_adapter), fresh "
                          "process per cell, torch threads 1. slopes: MB per extra adapter, (RSS(n_max) - RSS(n_min)) "
                          "/ (n_max - n_min), the same from the second count on, and the least-squares slope over "
                          "every count. malloc_trim=True: glibc malloc_trim(0) after each load and before reading "
                          "RSS (returns freed load-time temporaries to the OS; live tensors are unchanged). "
                          "live_*: unique tensor storages (data_ptr) of every adapter parameter and buffer, "
                          "outer_storages: distinct nora_B / nora_A storages (shared: one pair per module).")  # fmt: skip


# ================================================================================================ report
def render() -> str:
    parts = []
    path = RESULTS_DIR / "adapters_repro.json"
    if path.exists():
        data = read_json(path)
        rows = [[r["inner_std"], r["method"], f"{r['rel_to_logits']:.2e}", f"{r['rel_to_adapter_effect']:.2e}",
                 f"{r['max_abs']:.2e}",
                 "-" if r["worst_sketch_residual"] is None else f"{r['worst_sketch_residual']:.1e}",
                 {True: "refuses", False: "loads", None: "-"}[r["refused_at_tolerance"]]] for r in data["rows"]]  # fmt: skip
        parts += [
            "### (a) Rebuilding the outer factors: 1 vs 2 torch threads (SmolLM2-135M, full SVD, r=64)",
            "",
            f"`{data['command']}`; {data['modules']} modules; float64 factors bit-identical after rounding to "
            f"float32 in {data['fp64_modules_bit_identical_t1_t2']}/{data['modules']} modules.",
            "",
            markdown_table(["inner std", "rebuild", "rel. logit change", "rel. to adapter effect", "max abs",
                            "worst sketch residual", f"verify (tol {1e-5:.0e})"], rows),
        ]  # fmt: skip
    path = RESULTS_DIR / "adapters_files.json"
    if path.exists():
        data = read_json(path)
        rows = [[r["model"], r["kind"], f"{r['bytes'] / 1e6:.2f} MB",
                 "-" if "load_s_median" not in r else f"{r['load_s_median']:.2f} s"] for r in data["rows"]]  # fmt: skip
        parts += ["", "### (b) File size and load time", "", f"`{data['command']}` (load: median of "
                  f"{data['repeats']} fresh processes, {data['threads']} torch thread(s))", "",
                  markdown_table(["model", "file", "size", "load time"], rows)]  # fmt: skip
    path = RESULTS_DIR / "adapters_memory.json"
    if path.exists():
        data = read_json(path)
        rows = [[r["kind"], r["n"], "yes" if r.get("malloc_trim") else "no", f"{r['rss_loaded_mb']:.0f}",
                 "-" if "rss_anon_loaded_mb" not in r else f"{r['rss_anon_base_mb']:.0f}",
                 "-" if "rss_anon_loaded_mb" not in r else f"{r['rss_anon_loaded_mb']:.0f}",
                 f"{r['live_adapter_bytes'] / 2**20:.1f}", r["outer_storages"]] for r in data["rows"]]  # fmt: skip
        parts += ["", "### (c) Memory with many adapters loaded (SmolLM2-135M)", "", f"`{data['command']}`", "",
                  markdown_table(["adapters", "n", "malloc_trim", "RSS MB", "RssAnon MB, base only",
                                  "RssAnon MB, loaded", "live adapter tensors MB", "outer storages"],
                                 rows)]  # fmt: skip
        if "slopes" in data:

            def cell(mb, ratio):
                return "-" if mb is None else f"{mb:.2f} ({ratio:.2f}x)"

            rows = [[s["kind"], "yes" if s["malloc_trim"] else "no", f"{s['trained_mb_per_adapter']:.2f}",
                     cell(s["rss_end_to_end_mb"], s["rss_end_to_end_ratio"]),
                     cell(s["rss_from_second_mb"], s["rss_from_second_ratio"]),
                     cell(s["rss_least_squares_mb"], s["rss_least_squares_ratio"]),
                     cell(s.get("anon_least_squares_mb"), s.get("anon_least_squares_ratio")),
                     cell(s["live_mb"], s["live_ratio"])] for s in data["slopes"]]  # fmt: skip
            counts = data["slopes"][0]["counts"]
            parts += ["", f"MB per extra adapter (x its trained bytes), counts {counts}:", "",
                      markdown_table(["adapters", "malloc_trim", "trained MB per adapter",
                                      f"RSS {counts[0]} -> {counts[-1]}", f"RSS {counts[1]} -> {counts[-1]}",
                                      "RSS least squares", "RssAnon least squares", "live tensors"],
                                     rows)]  # fmt: skip
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_repro_child":
        _repro_child(argv[1], int(argv[2]))
        return 0
    if argv and argv[0] == "_load_child":
        _load_child(argv[1], argv[2], int(argv[3]))
        return 0
    if argv and argv[0] == "_memory_child":
        _memory_child(argv[1], argv[2], int(argv[3]), bool(int(argv[4])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("repro")
    p.add_argument("--inner-std", type=float, nargs="+", default=[0.02, 0.06])
    p = sub.add_parser("files")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("memory")
    p.add_argument("--counts", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--kinds", nargs="+", default=["nora_compact", "nora_full", "peft_lora_r16"])
    p.add_argument("--root", type=Path, default=None, help="adapter directories written by an earlier run")
    p.add_argument("--jobs", type=int, default=1, help="cells run side by side (memory only, not timed)")
    sub.add_parser("report")
    args = parser.parse_args(argv)
    if args.cmd != "report":
        data = {"repro": run_repro, "files": run_files, "memory": run_memory}[args.cmd](args)
        write_json(RESULTS_DIR / f"adapters_{args.cmd}.json", data)
    if RESULTS_MD.exists() and "<!-- adapters:begin -->" in RESULTS_MD.read_text():
        replace_block(RESULTS_MD, "adapters", render())
    print(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
