"""A newcomer's path (issue 24, requirement 6): build the wheel, install it with its `[harness]` extra into a fresh
venv (no system site-packages, no editable install, no access to this checkout's sources), and run a tiny
`nora train` + `nora eval` on a local model directory.

Opt-in, ~2-3 min: `make test-wheel` (sets NORA_TEST_WHEEL=1). pip resolves everything from its configured index
(on this machine the local mirrors); torch is installed first at the version of the running interpreter's torch so
the resolver never pulls a CUDA build.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("NORA_TEST_WHEEL") != "1", reason="opt-in: run with `make test-wheel`"),
]


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{cmd}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    return result


def test_wheel_install_train_eval(tmp_path, tiny_llama_dir, tiny_task_dir):
    # build from a copy of what the sdist holds: setuptools builds in-tree, and a build/ left in the checkout would
    # carry deleted modules into later wheels
    source = tmp_path / "source"
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, source])
    (wheel,) = dist.glob("nora_peft-*.whl")

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    py, nora_cli = env_dir / "bin" / "python", env_dir / "bin" / "nora"
    torch_version = torch.__version__.split("+")[0]
    _run([py, "-m", "pip", "install", "-q", f"torch=={torch_version}"])
    _run([py, "-m", "pip", "install", "-q", f"{wheel}[harness]"])

    # the installed package, not this checkout, is what runs
    where = _run([py, "-c", "import nora, peft; print(nora.__file__); print(peft.__version__)"], cwd=tmp_path)
    assert str(env_dir) in where.stdout.splitlines()[0], where.stdout

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    run = tmp_path / "run"
    train = [nora_cli, "train", "--model", tiny_llama_dir, "--data", tiny_task_dir, "--out", run]
    _run([*train, "--r", "8", "--r-inner", "4", "--batch-size", "4", "--max-steps", "2", "--no-progress"], env=env)
    assert (run / "adapter_model.safetensors").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["peft_config"]["peft_type"] == "NORA"

    report = tmp_path / "eval.json"
    _run([nora_cli, "eval", "--adapter", run, "--task", tiny_task_dir / "test.json", "--out", report], env=env)
    result = json.loads(report.read_text())
    assert result, "eval wrote an empty report"
