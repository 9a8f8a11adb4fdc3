"""Outer-factor quality and cost: SVD vs activation-aware SVD (AwSVD) output error on SmolLM2-135M, and full vs
randomized SVD init time / accuracy for LLaMA-3-8B-shaped matrices.

    python benchmarks/bench_svd.py                  # both parts -> results/svd_error.json, svd_error.png, svd_time.json
    python benchmarks/bench_svd.py --part error     # (a) only
    python benchmarks/bench_svd.py --part time      # (b) only

(a) For every targeted linear layer W (m x n) of SmolLM2-135M: calibrate mean |x_j| with `nora.calibrate` on
    commonsense *training* text, then measure  ||W X - B A X||_F / ||W X||_F  on held-out *test* text X (captured with
    forward hooks) for B, A from `nora.init.outer_svd` and `nora.init.outer_awsvd(activation_scale(stats, alpha))`,
    alpha in {0.25, 0.5, 1.0}, ranks 16 / 64 / 128.
(b) Wall time and accuracy of `nora.init.truncated_svd` ('full' = torch.linalg.svd vs 'randomized' =
    torch.svd_lowrank with oversample 16 and niter 2/4/8, plus a (niter, oversample) grid of 'randomized' and
    'randomized_bf16', the same subspace iteration with bfloat16 products, interleaved) at r = 64 on random
    matrices with the shapes of LLaMA-3 8B and a power-law spectrum fitted to real weights, one matrix at a time; then on SmolLM2's real weights; then an
    extrapolation to the whole 8B model (32 layers x 7 matrices).
Results of (b) are cached per (shape, method, seed) under results/cache/svd_time/ (a full SVD of a 14336 x 4096 matrix
takes minutes here), so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ALPHAS = (0.25, 0.5, 1.0)
RANKS = (16, 64, 128)
LLAMA3_8B_SHAPES = {  # (out, in) and how many of each per decoder layer
    "4096x4096": ((4096, 4096), 2),  # q, o
    "1024x4096": ((1024, 4096), 2),  # k, v
    "14336x4096": ((14336, 4096), 2),  # gate, up
    "4096x14336": ((4096, 14336), 1),  # down
}
LLAMA3_LAYERS = 32
SVD_METHODS = [("full", 0), ("randomized", 2), ("randomized", 4), ("randomized", 8)]
#: (svd_method, niter, oversample) trade-off search; 'randomized_bf16' runs the range finder's products in bfloat16
GRID = [("randomized", n, o) for n, o in [(3, 16), (4, 32), (5, 16), (6, 16), (4, 64), (3, 64), (6, 64)]] + [
    ("randomized_bf16", n, o) for n, o in [(3, 64), (4, 64), (5, 64), (6, 64), (8, 64)]
]
REAL_EXTRA = [("randomized", n, o) for n, o in [(3, 64), (4, 64), (6, 16), (6, 64), (8, 64)]] + [
    ("randomized_bf16", n, o) for n, o in [(4, 64), (6, 64), (8, 64)]
]  # extra configurations tried on SmolLM2's real weights


# ======================================================================================================= (a) error
def error_study(args) -> dict:
    import torch

    import nora
    from nora.init import activation_scale, outer_awsvd, outer_svd

    torch.set_num_threads(args.threads)
    model, tok = _common.load_model()
    model.eval()
    cfg = nora.NoraConfig(r=max(RANKS), target_modules=TARGETS)

    calib_texts = _common.commonsense_texts("train")
    calib = _common.token_batches(tok, calib_texts, n_seq=args.calib_seqs, seq_len=args.seq_len, batch_size=8)
    held_texts = _common.commonsense_texts("test", tasks=(*_common.COMMONSENSE_TASKS, "piqa"))
    (held,) = _common.token_batches(tok, held_texts, n_seq=args.heldout_seqs, seq_len=args.seq_len, batch_size=10**6)
    n_calib_tokens = sum(int(b["attention_mask"].sum()) for b in calib)
    n_held_tokens = int(held["attention_mask"].sum())
    print(f"calibration: {args.calib_seqs} x {args.seq_len} train tokens; held-out X: {n_held_tokens} test tokens")

    t0 = time.time()
    stats = nora.calibrate(model, cfg, calib, progress=False)
    calib_s = time.time() - t0

    # capture held-out inputs of every target (q/k/v and gate/up share one tensor: stored once)
    captured: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = [
        modules[name].register_forward_pre_hook(
            lambda mod, inp, name=name: captured.__setitem__(name, inp[0].detach().reshape(-1, inp[0].shape[-1]))
        )
        for name in stats
    ]
    with torch.no_grad():
        model(**held)
    for h in handles:
        h.remove()

    rows = []
    t_factor = {"svd": 0.0, **{f"awsvd_{a}": 0.0 for a in ALPHAS}}
    for name in sorted(stats, key=_layer_key):
        W = modules[name].weight.detach().float()
        X = captured[name]
        Y = X @ W.T
        y_norm = Y.norm()
        kind = name.rsplit(".", 1)[-1]
        layer = int(name.split(".layers.")[1].split(".")[0])
        facts = {}
        t = time.perf_counter()
        facts["svd"] = outer_svd(W, max(RANKS))  # full SVD: the rank-r factors are the first r of these
        t_factor["svd"] += time.perf_counter() - t
        for a in ALPHAS:
            t = time.perf_counter()
            scale = activation_scale(stats[name], a, cfg.awsvd_eps)
            facts[f"awsvd_{a}"] = outer_awsvd(W, scale, max(RANKS))
            t_factor[f"awsvd_{a}"] += time.perf_counter() - t
        for method, f in facts.items():
            XA = X @ f.A.T  # (N, 128)
            for r in RANKS:
                Yr = XA[:, :r] @ f.B[:, :r].T
                rows.append(
                    {
                        "module": name,
                        "type": kind,
                        "layer": layer,
                        "method": method,
                        "r": r,
                        "out_err": float((Y - Yr).norm() / y_norm),
                        "w_err": float((W - f.B[:, :r] @ f.A[:r]).norm() / W.norm()),
                    }
                )
    summary = summarize_error(rows)
    return {
        "rows": rows,
        "summary": summary,
        "calib_tokens": n_calib_tokens,
        "heldout_tokens": n_held_tokens,
        "calibrate_s": calib_s,
        "factorize_s": t_factor,
    }


def _layer_key(name: str):
    layer = int(name.split(".layers.")[1].split(".")[0])
    return layer, TARGETS.index(name.rsplit(".", 1)[-1])


def summarize_error(rows: list[dict]) -> list[dict]:
    """Mean output error over layers per (module type, method, rank) and overall; % reduction of AwSVD vs SVD both
    of the means and as the mean of per-module reductions."""
    from collections import defaultdict

    by = defaultdict(list)
    per_module = {}
    for r in rows:
        by[(r["type"], r["method"], r["r"])].append(r["out_err"])
        by[("all", r["method"], r["r"])].append(r["out_err"])
        per_module[(r["module"], r["method"], r["r"])] = r["out_err"]
    out = []
    types = ["all", *TARGETS]
    methods = ["svd", *[f"awsvd_{a}" for a in ALPHAS]]
    for t in types:
        for rank in RANKS:
            base = sum(by[(t, "svd", rank)]) / len(by[(t, "svd", rank)])
            for m in methods:
                vals = by[(t, m, rank)]
                mean = sum(vals) / len(vals)
                reds = [
                    100 * (1 - per_module[(mod, m, rank)] / per_module[(mod, "svd", rank)])
                    for (mod, mm, rr) in per_module
                    if mm == m and rr == rank and (t == "all" or mod.endswith(t))
                ]
                out.append(
                    {
                        "type": t,
                        "r": rank,
                        "method": m,
                        "mean_out_err": mean,
                        "reduction_of_mean_pct": 100 * (1 - mean / base),
                        "mean_reduction_pct": sum(reds) / len(reds),
                        "modules_improved": sum(x > 0 for x in reds),
                        "modules": len(reds),
                    }
                )
    return out


def render_error(res: dict) -> str:
    s = res["summary"]
    methods = ["svd", *[f"awsvd_{a}" for a in ALPHAS]]
    lines = []
    headers = ["module type", "r", *["SVD" if m == "svd" else f"AwSVD a={m.split('_')[1]}" for m in methods]]
    table = []
    for t in ["all", *TARGETS]:
        for rank in RANKS:
            cells = []
            for m in methods:
                row = next(x for x in s if x["type"] == t and x["r"] == rank and x["method"] == m)
                if m == "svd":
                    cells.append(f"{row['mean_out_err']:.4f}")
                else:
                    cells.append(f"{row['mean_out_err']:.4f} ({-row['reduction_of_mean_pct']:+.1f}%)")
            table.append([f"**{t}**" if t == "all" else t, rank, *cells])
    lines.append(_common.markdown_table(headers, table))
    return "\n".join(lines)


def plot_error(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = res["summary"]
    methods = ["svd", *[f"awsvd_{a}" for a in ALPHAS]]
    labels = {"svd": "SVD", **{f"awsvd_{a}": f"AwSVD alpha={a}" for a in ALPHAS}}
    types = ["all", *TARGETS]
    fig, axes = plt.subplots(1, len(RANKS), figsize=(15, 4.2), sharey=False)
    width = 0.8 / len(methods)
    for ax, rank in zip(axes, RANKS):
        for i, m in enumerate(methods):
            vals = [
                next(x for x in s if x["type"] == t and x["r"] == rank and x["method"] == m)["mean_out_err"]
                for t in types
            ]
            ax.bar([j + i * width for j in range(len(types))], vals, width, label=labels[m])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(types))])
        ax.set_xticklabels([t.replace("_proj", "") for t in types], rotation=30)
        ax.set_title(f"rank r = {rank}")
        ax.set_ylabel("||WX - BAX|| / ||WX|| (held-out)")
        ax.grid(axis="y", alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(methods), fontsize=9)
    fig.suptitle("SmolLM2-135M: output error of the rank-r outer factors on held-out text, mean over 30 layers")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ======================================================================================================= (b) time
def synthetic(shape: tuple[int, int], beta: float, seed: int):
    """W = G_m diag(s) G_n^T / sqrt(m n) with s_i = i^-beta (i = 1..min(m, n)): approximately that spectrum."""
    import torch

    m, n = shape
    p = min(m, n)
    gen = torch.Generator().manual_seed(seed)
    s = torch.arange(1, p + 1, dtype=torch.float32).pow(-beta)
    gm = torch.randn(m, p, generator=gen) / math.sqrt(m)
    gn = torch.randn(n, p, generator=gen) / math.sqrt(n)
    gm.mul_(s)
    w = gm @ gn.T
    del gm, gn
    return w


def awsvd_scale(n: int, seed: int, alpha: float = 0.5):
    """Synthetic AwSVD channel scales: lognormal mean |x_j| with a few outlier channels (as in LLM activations)."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    stats = torch.exp(torch.randn(n, generator=gen) * 0.5)
    idx = torch.randperm(n, generator=gen)[: max(1, n // 512)]
    stats[idx] *= 30.0
    return stats.pow(alpha)


def time_one(
    w, method: str, niter: int, r: int, seed: int, threads: int, repeats: int = 1, oversample: int = 16
) -> dict:
    """Factorise W S (S = awsvd scale; the AwSVD cost, which adds only an elementwise product to the SVD) and
    record the time (median of `repeats` runs) and the truncated residual."""
    import torch

    from nora.init import truncated_svd

    torch.set_num_threads(threads)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        U, S, Vh = truncated_svd(w, r, svd_method=method, niter=niter, oversample=oversample, seed=seed)
        times.append(time.perf_counter() - t)
    resid = (w - (U * S) @ Vh).norm() / w.norm()
    return {"seconds": _common.median(times), "all_seconds": times, "rel_resid": float(resid), "sigma_r": float(S[-1])}


def time_study(args) -> dict:
    """Per shape: the full SVD once (minutes; cached), then every randomized configuration (the niter 2/4/8 rows and
    the (niter, oversample) grid) timed in `repeats` interleaved rounds (c1 c2 ... c1 c2 ...), median per config."""
    import torch

    torch.set_num_threads(args.threads)
    beta = args.beta
    rows, grid = [], []
    configs = [(m, niter, 16) for m, niter in SVD_METHODS if m == "randomized"]
    if args.grid:
        configs += [g for g in GRID if g not in configs]
    for label, (shape, count) in LLAMA3_8B_SHAPES.items():
        if args.shapes and label not in args.shapes:
            continue
        w = None

        def matrix(shape=shape):
            nonlocal w
            if w is None:
                t = time.perf_counter()
                w = synthetic(shape, beta, args.seed) * awsvd_scale(shape[1], args.seed)
                print(f"  built {shape} in {time.perf_counter() - t:.1f} s", flush=True)
            return w

        base = {"shape": shape, "beta": beta, "r": args.rank, "threads": args.threads}
        rec = _common.cached_run(
            "svd_time",
            f"{label}_full",
            args.seed,
            lambda: time_one(matrix(), "full", 0, args.rank, args.seed, args.threads),
            params={**base, "oversample": 16},
            force=args.force_full,
        )
        full = {**rec["result"], "load_1min": rec["machine"].get("host_load_1min")}
        print(f"  {label} full: {full['seconds']:.1f} s {'(cached)' if rec['cached'] else ''}", flush=True)
        rows.append({"shape": label, "count_per_layer": count, "method": "full", "niter": 0, "oversample": 0, **full})

        def interleaved(configs=configs):
            times = {c: [] for c in configs}
            resid = {}
            m = matrix()
            for _ in range(args.repeats):
                for c in configs:
                    res = time_one(m, c[0], c[1], args.rank, args.seed, args.threads, 1, c[2])
                    times[c].append(res["seconds"])
                    resid[c] = res["rel_resid"]
            return [
                {
                    "method": meth,
                    "niter": n,
                    "oversample": o,
                    "seconds": _common.median(times[(meth, n, o)]),
                    "all_seconds": times[(meth, n, o)],
                    "rel_resid": resid[(meth, n, o)],
                }
                for meth, n, o in configs
            ]

        params = {**base, "configs": configs, "repeats": args.repeats}
        rec = _common.cached_run(
            "svd_time", f"{label}_randomized", args.seed, interleaved, params=params, force=args.force
        )
        for res in rec["result"]:
            row = {"shape": label, "count_per_layer": count, **res}
            base_row = res["method"] == "randomized" and res["oversample"] == 16 and res["niter"] in (2, 4, 8)
            (rows if base_row else grid).append(row)
            print(f"  {label} {_label(row)}: {res['seconds']:.2f} s")
        del w
        gc.collect()
    for row in rows + grid:
        exact = next(x for x in rows if x["shape"] == row["shape"] and x["method"] == "full")
        row["resid_rel_diff_pct"] = 100 * (row["rel_resid"] / exact["rel_resid"] - 1)
    return {
        "rows": rows,
        "beta": beta,
        "real": real_weights_study(args),
        "extrapolation": extrapolate(rows),
        "grid": grid,
        "grid_extrapolation": extrapolate_grid(grid),
    }


def real_weights_study(args) -> dict:
    """Full vs randomized on every targeted SmolLM2 matrix (210), SVD of W itself (no scale)."""
    import torch

    from nora.init import truncated_svd

    torch.set_num_threads(args.threads)
    params = {"r": args.rank, "threads": args.threads, "interleaved": True, "extra": REAL_EXTRA}

    def compute():
        model, _ = _common.load_model()
        mats = [
            (n, m.weight.detach().float())
            for n, m in model.named_modules()
            if n.rsplit(".", 1)[-1] in TARGETS and hasattr(m, "weight")
        ]
        configs = [(m, n, 16) for m, n in SVD_METHODS] + REAL_EXTRA
        out = {f"{m}_{n}_{o}": {"seconds_total": 0.0, "resid": []} for m, n, o in configs}
        for _name, w in mats:  # interleaved: every method on one matrix, then the next matrix
            for method, niter, over in configs:
                t = time.perf_counter()
                U, S, Vh = truncated_svd(w, args.rank, svd_method=method, niter=niter, oversample=over, seed=0)
                out[f"{method}_{niter}_{over}"]["seconds_total"] += time.perf_counter() - t
                out[f"{method}_{niter}_{over}"]["resid"].append(float((w - (U * S) @ Vh).norm() / w.norm()))
        exact = out["full_0_16"]["resid"]
        for v in out.values():
            rel = [100 * (a / b - 1) for a, b in zip(v["resid"], exact)]
            v["max_rel_diff_pct"] = max(rel)
            v["mean_rel_diff_pct"] = sum(rel) / len(rel)
            v["resid"] = [round(x, 6) for x in v["resid"]]
        beta = fit_real_spectra([w for _, w in mats])
        return {"matrices": len(mats), "methods": out, "spectrum_beta_median": beta}

    return _common.cached_run("svd_time", "smollm2_real", args.seed, compute, params=params, force=args.force)[
        "result"
    ]


def fit_real_spectra(mats) -> float:
    import torch

    betas = []
    for w in mats:
        s = torch.linalg.svdvals(w)
        i = torch.arange(1, s.numel() + 1, dtype=torch.float32)
        sel = slice(3, s.numel() // 2)
        A = torch.stack([torch.ones_like(i[sel]), -i[sel].log()], 1)
        betas.append(float(torch.linalg.lstsq(A, s[sel].log().unsqueeze(1)).solution[1, 0]))
    return _common.median(betas)


def _best(row: dict) -> float:
    return min(row.get("all_seconds") or [row["seconds"]])


def extrapolate(rows: list[dict]) -> list[dict]:
    """Whole LLaMA-3 8B: 32 layers x (2 q/o + 2 k/v + 2 gate/up + 1 down), each shape timed separately. `model_s`
    uses the median time per shape, `model_s_best` the fastest of the interleaved repeats (other jobs on this shared
    machine only ever slow a run down, so the minimum estimates the uncontended CPU)."""
    out = []
    for method, niter in SVD_METHODS:
        sel = [r for r in rows if r["method"] == method and r["niter"] == niter]
        if len({r["shape"] for r in sel}) < len(LLAMA3_8B_SHAPES):
            continue
        model_s = LLAMA3_LAYERS * sum(r["seconds"] * r["count_per_layer"] for r in sel)
        best = LLAMA3_LAYERS * sum(_best(r) * r["count_per_layer"] for r in sel)
        worst = max(r["resid_rel_diff_pct"] for r in sel)
        out.append(
            {
                "method": method,
                "niter": niter,
                "oversample": 0 if method == "full" else 16,
                "model_s": model_s,
                "model_s_best": best,
                "worst_resid_rel_diff_pct": worst,
                "meets_120s": best <= 120,
                "meets_0.1pct": worst <= 0.1,
            }
        )
    return out


def extrapolate_grid(grid: list[dict]) -> list[dict]:
    out = []
    for method, niter, over in GRID:
        sel = [g for g in grid if (g["method"], g["niter"], g["oversample"]) == (method, niter, over)]
        if len(sel) < len(LLAMA3_8B_SHAPES):
            continue
        model_s = LLAMA3_LAYERS * sum(g["seconds"] * g["count_per_layer"] for g in sel)
        best = LLAMA3_LAYERS * sum(_best(g) * g["count_per_layer"] for g in sel)
        worst = max(g["resid_rel_diff_pct"] for g in sel)
        out.append(
            {
                "method": method,
                "niter": niter,
                "oversample": over,
                "model_s": model_s,
                "model_s_best": best,
                "worst_resid_rel_diff_pct": worst,
            }
        )
    return out


def _label(row: dict) -> str:
    return "full" if row["method"] == "full" else f"{row['method']} niter={row['niter']} over={row['oversample']}"


def speedups(grid: list[dict]) -> list[dict]:
    """Side-by-side ratio per shape: fp32 'randomized' median time / 'randomized_bf16' median time at the same
    (niter, oversample), both timed in the same interleaved rounds; residual difference between the two."""
    out = []
    for g in grid:
        if g["method"] != "randomized_bf16":
            continue
        ref = next(
            (x for x in grid if (x["method"], x["shape"], x["niter"], x["oversample"])
             == ("randomized", g["shape"], g["niter"], g["oversample"])), None,
        )  # fmt: skip
        if ref is not None:
            out.append({"shape": g["shape"], "niter": g["niter"], "oversample": g["oversample"],
                        "fp32_s": ref["seconds"], "bf16_s": g["seconds"], "speedup": ref["seconds"] / g["seconds"],
                        "resid_diff_pct_points": g["resid_rel_diff_pct"] - ref["resid_rel_diff_pct"]})  # fmt: skip
    return out


def render_time(res: dict) -> str:
    lines = []
    table = []
    for r in res["rows"] + res.get("grid", []):
        m = _label(r)
        spread = "" if r["method"] == "full" else f" [{_best(r):.2f}-{max(r['all_seconds']):.2f}]"
        table.append(
            [r["shape"], m, f"{r['seconds']:.2f}{spread}", f"{r['rel_resid']:.6f}", f"{r['resid_rel_diff_pct']:+.4f}%"]
        )
    lines.append(
        _common.markdown_table(
            [
                "shape (out x in)",
                "method",
                "seconds, median [min-max]",
                "||WS - BA S|| / ||WS||",
                "vs exact (rel. diff)",
            ],
            table,
        )
    )
    lines.append("")
    table = []
    for e in res["extrapolation"] + res.get("grid_extrapolation", []):
        m = _label({"method": "randomized", **e})
        ok = e["model_s_best"] <= 120 and e["worst_resid_rel_diff_pct"] <= 0.1
        table.append(
            [
                m,
                f"{e['model_s']:.0f}",
                f"{e['model_s_best']:.0f}",
                f"{e['worst_resid_rel_diff_pct']:+.4f}%",
                "yes" if ok else "no",
            ]
        )
    lines.append(
        _common.markdown_table(
            [
                "LLaMA-3 8B, 224 matrices",
                "s (median times)",
                "s (best times)",
                "worst error vs exact",
                "≤ 120 s and ≤ 0.1%",
            ],
            table,
        )
    )
    table = [
        [s["shape"], f"{s['niter']} / {s['oversample']}", f"{s['fp32_s']:.2f}", f"{s['bf16_s']:.2f}",
         f"{s['speedup']:.2f}x", f"{s['resid_diff_pct_points']:+.4f}"]
        for s in speedups(res.get("grid", []))
    ]  # fmt: skip
    if table:
        header = ["shape", "niter / oversample", "randomized s", "randomized_bf16 s", "speed-up",
                  "residual diff (pct points)"]  # fmt: skip
        lines += ["", _common.markdown_table(header, table)]
    real = res["real"]
    lines.append("")
    table = []
    for key, v in real["methods"].items():
        method, niter, over = key.rsplit("_", 2)
        m = _label({"method": method, "niter": niter, "oversample": over})
        table.append(
            [m, f"{v['seconds_total']:.2f}", f"{v['mean_rel_diff_pct']:+.4f}%", f"{v['max_rel_diff_pct']:+.4f}%"]
        )
    lines.append(
        _common.markdown_table(
            [f"SmolLM2-135M real weights ({real['matrices']} matrices)", "total s", "mean vs exact", "worst vs exact"],
            table,
        )
    )
    return "\n".join(lines)


# ======================================================================================================= main
def plot_time(payload: dict, path: Path) -> Path:
    """Whole-LLaMA-3-8B outer-init time vs worst residual excess over the exact SVD, one point per (method, niter,
    oversample), with the issue's target region (<= 120 s and <= 0.1%) shaded; from a results/svd_time.json payload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [e for e in payload["extrapolation"] + payload["grid_extrapolation"] if e["method"] != "full"]
    full = next(e for e in payload["extrapolation"] if e["method"] == "full")
    colours = {"randomized": "tab:blue", "randomized_bf16": "tab:orange"}
    names = {"randomized": "torch.svd_lowrank (float32)", "randomized_bf16": "randomized_bf16 (bf16 range finder)"}
    fig, ax = plt.subplots(figsize=(9, 5.5))
    ax.fill_between([1, 120], 1e-4, 0.1, color="tab:green", alpha=0.12, label="target: <= 120 s, <= 0.1%")
    for method, colour in colours.items():
        sel = [e for e in points if e["method"] == method]
        ax.scatter(
            [e["model_s"] for e in sel],
            [max(e["worst_resid_rel_diff_pct"], 1e-4) for e in sel],
            color=colour,
            label=names[method],
        )
        for e in sel:
            ax.annotate(
                f"n{e['niter']}/o{e['oversample']}",
                (e["model_s"], max(e["worst_resid_rel_diff_pct"], 1e-4)),
                textcoords="offset points",
                xytext=(4, 3),
                fontsize=7,
                color=colour,
            )
    ax.axvline(full["model_s"], color="gray", ls="--", lw=1)
    ax.annotate(f"exact SVD: {full['model_s']:.0f} s", (full["model_s"], 2e-3), rotation=90, ha="right", fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(30, full["model_s"] * 1.5)
    ax.set_ylim(1e-3, 10)
    ax.set_xlabel("whole-model AwSVD outer init of LLaMA-3 8B (224 matrices), s (median per shape, extrapolated)")
    ax.set_ylabel("worst residual excess over the exact SVD (%)")
    m = payload["machine"]
    ax.set_title(f"Outer-init cost vs accuracy, rank 64 ({m['cpu']}, {m['torch_threads']} threads, {m['date'][:10]})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["error", "time", "both"], default="both")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib-seqs", type=int, default=64)
    parser.add_argument("--heldout-seqs", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=64, help="rank of the init-time study")
    parser.add_argument("--beta", type=float, default=0.3, help="power-law exponent of the synthetic spectra")
    parser.add_argument("--shapes", nargs="*", default=None, help=f"subset of {list(LLAMA3_8B_SHAPES)}")
    parser.add_argument("--no-grid", dest="grid", action="store_false", help="skip the (niter, oversample) grid")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each randomized SVD (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="re-run cached results (except the slow full SVDs)")
    parser.add_argument("--force-full", action="store_true", help="also re-time the full SVDs of the 8B shapes")
    parser.add_argument(
        "--plot-only", action="store_true", help="redraw results/svd_time.png from the committed svd_time.json"
    )
    args = parser.parse_args(argv)
    if args.plot_only:
        source = _common.RESULTS_DIR / "svd_time.json"
        if not source.exists():
            raise SystemExit(f"{source} not found: run `python benchmarks/bench_svd.py --part time` first")
        payload = _common.read_json(source)
        print(f"wrote {plot_time(payload, _common.RESULTS_DIR / 'svd_time.png')}")
        return 0
    import torch

    torch.set_num_threads(args.threads)  # recorded in the machine facts

    if args.part in ("error", "both"):
        params = {k: getattr(args, k) for k in ("calib_seqs", "heldout_seqs", "seq_len")}
        rec = _common.cached_run("svd_error", "svd_vs_awsvd", args.seed, lambda: error_study(args), params=params)
        res = rec["result"]
        text = render_error(res)
        print(text)
        plot_error(res, _common.RESULTS_DIR / "svd_error.png")
        payload = _common.result_payload(
            "svd_error",
            res["summary"],
            per_module="results/cache/svd_error/svd_vs_awsvd__seed0.json",
            params=params,
            calib_tokens=res["calib_tokens"],
            heldout_tokens=res["heldout_tokens"],
            calibrate_s=res["calibrate_s"],
            factorize_s=res["factorize_s"],
            markdown=text,
            measured=rec["machine"],
        )
        _common.write_json(_common.RESULTS_DIR / "svd_error.json", payload)
    if args.part in ("time", "both"):
        res = time_study(args)
        text = render_time(res)
        print(text)
        payload = _common.result_payload(
            "svd_time",
            res["rows"],
            beta=res["beta"],
            extrapolation=res["extrapolation"],
            grid=res["grid"],
            grid_extrapolation=res["grid_extrapolation"],
            speedups=speedups(res["grid"]),
            real=res["real"],
            markdown=text,
            params={"rank": args.rank, "threads": args.threads, "oversample": 16},
        )
        _common.write_json(_common.RESULTS_DIR / "svd_time.json", payload)
        plot_time(payload, _common.RESULTS_DIR / "svd_time.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
