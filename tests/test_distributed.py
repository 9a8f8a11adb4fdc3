"""Multi-process NoRA training on CPU (gloo), 2 processes vs 1 process on the same global batches.

- tests/dist/worker.py (a hand-written loop) under torchrun: DDP equals 1 process; FSDP2 (`fully_shard` per decoder
  layer + root) equals 1 process, and the full adapter gathered from the shards reloads with
  PeftModel.from_pretrained; the randomized-SVD outer factors are bit-identical on both ranks.
  (AwSVD statistics all-reduce across ranks: tests/test_calibration.py.)
- `nora train` (transformers.Trainer) under torchrun and under `accelerate launch --multi_gpu` (which on a CPU-only
  machine runs DDP over gloo) with --batch-size 2 equals 1 process with --batch-size 4.

Why 2 x half batch = 1 x full batch: each rank's loss is a token mean over its half (worker: all sequences have
the same length, so the mean of the two halves' means is the full mean; Trainer: it divides each rank's token sum
by the token count gathered over all ranks and rescales by the world size), and DDP / FSDP2 average the gradients
over the ranks. Both give the full-batch gradient up to float32 summation order. The Trainer's data order is the
same too: accelerate replaces its RandomSampler by a SeedableRandomSampler (same permutation for any world size) and
BatchSamplerShard gives rank r the per-process batches r, r + 2, ..., so global step k sees the same 4 examples.
Length grouping (--group-by-length, the default) is switched off: LengthGroupedSampler sorts mega-batches of
min(N // (4 b), 50) x b examples, b the *per-process* batch size, so for N >= 200 b the 1 x 4 and 2 x 2 runs visit
the examples in different orders (on the 32 examples here both mega-batches happen to hold 8, so it would pass).

Tolerances (float32 noise measured here; a real difference, e.g. summed instead of averaged gradients or another
data order, moves the adapters by ~lr per step and the losses by ~1e-3):
- worker, 5 SGD steps (lr 5, inner factors moved by 1e-4 .. 5e-2): adapters differ by <= 3e-8 -> atol 1e-6;
  losses by <= 1 ulp (5e-7 at 4.19) -> abs 1e-5.
- nora train, 3 AdamW steps (lr 1e-2): adapters differ by <= 9e-8 (1.6e-7 with length grouping) -> atol 1e-5
  (Adam's update lr * m / (sqrt(v) + eps) amplifies relative gradient noise where gradients are tiny); losses by
  <= 1 ulp (5e-7 at 6.04) -> abs 1e-5.
- the frozen outer factors (never trained) must be bit-identical everywhere.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import _models as M
import nora  # noqa: F401  (registers NoRA with PEFT)

WORKER = Path(__file__).parent / "dist" / "worker.py"
LAYERS = 2  # tests/dist/worker.py LAYERS
WORKER_ADAPTER_ATOL = 1e-6
HARNESS_ADAPTER_ATOL = 1e-5
LOSS_ATOL = 1e-5
TIMEOUT = 180  # seconds per launched run (each takes 7-25 s here)
#: launcher variables that must not leak from the test's environment into the runs
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")
#: torchrun on a free port (rendezvous on localhost:0), so concurrent torchrun jobs cannot collide
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
#: accelerate launch with 2 processes on CPU: --multi_gpu selects its torchrun launcher (DDP; gloo without CUDA),
#: c10d rendezvous on port 0 picks a free port. (--cpu would start ONE process: accelerate's multi-CPU mode is MPI.)
ACCELERATE = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
ACCELERATE += ["--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1"]
ACCELERATE += ["--rdzv_backend", "c10d", "--main_process_ip", "localhost", "--main_process_port", "0"]


def launch(args: list[str]) -> None:
    """Run `python ARGS` in its own session (a timeout kills the launcher and its workers); fail with stderr."""
    cmd = [sys.executable, *args]
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        _, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish within {TIMEOUT} s:\n{stderr[-4000:]}")
    assert proc.returncode == 0, stderr[-4000:]


def assert_same_adapter(a: Path, b: Path, atol: float) -> None:
    """Same keys; the frozen outer factors bit-identical, the trained inner factors within `atol`."""
    sa, sb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert sa.keys() == sb.keys()
    assert sum(".nora_B" in k for k in sa) == 7 * LAYERS and sum("nora_inner_A" in k for k in sa) == 7 * LAYERS
    for key in sa:
        if ".nora_A" in key or ".nora_B" in key:
            assert torch.equal(sa[key], sb[key]), key
        else:
            torch.testing.assert_close(sa[key], sb[key], atol=atol, rtol=0, msg=key)


# ------------------------------------------------------------------------------------------------ worker
def run_worker(mode: str, out: Path, distributed: bool) -> dict:
    """tests/dist/worker.py in 1 process, or in 2 under torchrun; returns its OUT/losses.json."""
    out.mkdir(parents=True, exist_ok=True)
    launch([*(TORCHRUN if distributed else []), str(WORKER), mode, str(out)])
    return json.loads((out / "losses.json").read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, dict]:
    """The 1-process reference (plain training loop, no process group)."""
    out = tmp_path_factory.mktemp("single")
    return out, run_worker("ddp", out, distributed=False)


def test_single_process_reference_trains(single):
    _, ref = single
    losses = ref["losses"]
    assert ref["world"] == 1 and len(losses) == 5
    # the worker alternates two global batches: the loss on each falls from one visit to the next
    assert losses[0] > losses[2] > losses[4] and losses[1] > losses[3]


def test_ddp_two_processes_match_one_process(single, tmp_path):
    out1, ref = single
    got = run_worker("ddp", tmp_path, distributed=True)
    assert got["world"] == 2 and got["mode"] == "ddp"
    assert got["losses"] == pytest.approx(ref["losses"], abs=LOSS_ATOL, rel=0)
    assert_same_adapter(out1, tmp_path, WORKER_ADAPTER_ATOL)
    # randomized SVD, seeded per module: both ranks (their global RNGs seeded differently before get_peft_model,
    # digests taken before DDP broadcasts anything) and the 1-process run built bit-identical outer factors
    assert len(got["outer_sha256"]) == 2
    assert got["outer_sha256"][0] == got["outer_sha256"][1] == ref["outer_sha256"][0]


def test_fsdp2_trains_saves_and_reloads(single, tmp_path):
    out1, ref = single
    got = run_worker("fsdp", tmp_path, distributed=True)
    assert got["world"] == 2 and got["mode"] == "fsdp"
    assert got["sharded_params"] == got["params"] > 0  # every parameter (frozen base and NoRA inner) is a DTensor
    assert got["outer_sha256"][0] == got["outer_sha256"][1] == ref["outer_sha256"][0]
    assert got["losses"] == pytest.approx(ref["losses"], abs=LOSS_ATOL, rel=0)
    assert_same_adapter(out1, tmp_path, WORKER_ADAPTER_ATOL)  # the full adapter gathered from the shards

    # the saved adapter loads on a fresh, unsharded base (outer factors read from the file, no SVD) ...
    reloaded = PeftModel.from_pretrained(M.build("llama", num_hidden_layers=LAYERS), tmp_path).eval()
    saved = load_file(tmp_path / "adapter_model.safetensors")
    own = reloaded.state_dict()
    assert len(saved) == 4 * 7 * LAYERS
    for key, tensor in saved.items():  # the file has no adapter name: ...nora_inner_B -> ...nora_inner_B.default
        assert torch.equal(own[f"{key}.default"], tensor), key
    # ... and computes what the 1-process adapter computes, which differs from the untrained base
    reference = PeftModel.from_pretrained(M.build("llama", num_hidden_layers=LAYERS), out1).eval()
    batch = M.inputs("llama", seed=7, batch=2)
    with torch.no_grad():
        logits = reloaded(**batch).logits
        torch.testing.assert_close(logits, reference(**batch).logits, atol=1e-5, rtol=0)
        with reloaded.disable_adapter():
            assert (logits - reloaded(**batch).logits).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ nora train
#: 3 AdamW steps, both inner factors random (both get gradients from step 1); length grouping off (see the top)
HARNESS = ["--nora-r", "8", "--r-inner", "4", "--inner-init", "gaussian", "--lr", "1e-2", "--max-steps", "3"]
HARNESS += ["--no-group-by-length", "--no-progress"]


def run_nora_train(launcher: list[str], model: Path, data: Path, out: Path, batch_size: int) -> dict:
    """`nora train` (python -m nora.cli) under `launcher` ([] for 1 process); returns its metrics.json."""
    argv = ["train", "--model", str(model), "--data", str(data), "--out", str(out), *HARNESS]
    launch([*launcher, "-m", "nora.cli", *argv, "--batch-size", str(batch_size)])
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def harness_single(tiny_llama_dir, tiny_task_dir, tmp_path_factory) -> tuple[Path, dict]:
    """`nora train` in 1 process with a batch of 4."""
    out = tmp_path_factory.mktemp("harness-single") / "nora"
    metrics = run_nora_train([], tiny_llama_dir, tiny_task_dir, out, batch_size=4)
    assert metrics["world_size"] == 1 and metrics["steps"] == 3
    return out, metrics


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_nora_train_two_processes_match_one_process(launcher, harness_single, tiny_llama_dir, tiny_task_dir, tmp_path):
    out1, ref = harness_single
    cmd = {"torchrun": TORCHRUN, "accelerate": ACCELERATE}[launcher]
    got = run_nora_train(cmd, tiny_llama_dir, tiny_task_dir, tmp_path / "nora", batch_size=2)
    assert got["world_size"] == 2 and got["steps"] == 3
    assert got["loss_curve"]["steps"] == ref["loss_curve"]["steps"] == [1, 2, 3]
    assert got["loss_curve"]["loss"] == pytest.approx(ref["loss_curve"]["loss"], abs=LOSS_ATOL, rel=0)
    assert len(set(ref["loss_curve"]["loss"])) == 3  # the steps see different batches (a real trajectory)
    assert_same_adapter(out1, tmp_path / "nora", HARNESS_ADAPTER_ATOL)
