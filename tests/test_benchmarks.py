"""Smoke test of benchmarks/bench_params.py: exact trainable-parameter counts on a meta-device LLaMA-3 8B (no weights)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench_params():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_params", BENCH / "bench_params.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_params"] = module  # dataclasses resolve their module through sys.modules
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


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
