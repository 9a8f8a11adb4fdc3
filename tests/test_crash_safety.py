"""Crash safety: every file nora writes goes to a temporary name and is renamed into place.

Failure injection: for each writer (write_json / write_text / the loss plot / config.yaml, export_lora and
export_merged, the harness's final adapter, training checkpoints, the GGUF model cache) a previous good file exists,
an exception is raised in the middle of the new write, and the previous file must be byte-identical with no temporary
file left behind. SIGKILL: a `python -m nora.cli train` subprocess is killed mid-checkpoint and mid-step; `--resume`
must then give exactly (atol = rtol = 0) the adapter of an uninterrupted run with the same seed.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import Trainer, TrainerCallback

import _models as M
import nora
from conftest import assert_same_adapter
from nora.cli import parse_args
from nora.harness import models as harness_models
from nora.harness.checkpoints import CHECKPOINT_STAGING
from nora.harness.runinfo import write_run_config
from nora.harness.train import plot_losses, run_train, torch_threads
from nora.io import atomic_dir, atomic_path, replace_dir, write_json, write_text

TINY = ["--r", "8", "--r-inner", "4", "--batch-size", "4", "--no-progress"]
STEPS = ["--max-steps", "6", "--save-steps", "2"]
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class InjectedFailure(RuntimeError):
    """The failure the tests inject in the middle of a write."""


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under `folder` (recursively)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _half_then_fail(path, data: bytes) -> None:
    """Write the first half of `data` to `path`, then fail: a crash in the middle of a write."""
    Path(path).write_bytes(data[: len(data) // 2])
    raise InjectedFailure(f"injected failure while writing {path}")


# ------------------------------------------------------------------------------------------------ single files
def _plot(path: Path, losses: list[float]) -> None:
    plot_losses({"nora": {"steps": list(range(1, len(losses) + 1)), "loss": losses}}, path)


WRITERS = {
    "write_json": (lambda p: write_json(p, {"loss": [1.0, 0.5]}), lambda p: write_json(p, {"loss": [9.0] * 50})),
    "write_text": (lambda p: write_text(p, "old\n"), lambda p: write_text(p, "new text\n" * 100)),
    "config.yaml": (
        lambda p: write_run_config(p.parent, {"lr": 0.1}),
        lambda p: write_run_config(p.parent, {"lr": 0.2, "method": "lora"}),
    ),
    "loss.png": (lambda p: _plot(p, [2.0, 1.0]), lambda p: _plot(p, [3.0, 2.5, 2.0, 1.0])),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_failure_mid_write_keeps_the_previous_file(writer, tmp_path, monkeypatch):
    path = tmp_path / ("config.yaml" if writer == "config.yaml" else f"out.{writer}")
    write_old, write_new = WRITERS[writer]
    write_old(path)
    before = path.read_bytes()

    import matplotlib.figure

    real_savefig = matplotlib.figure.Figure.savefig

    def savefig(fig, fname, **kwargs):  # render the real PNG, then fail half-way through writing it
        buffer = io.BytesIO()
        real_savefig(fig, buffer, **kwargs)
        _half_then_fail(fname, buffer.getvalue())

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    monkeypatch.setattr(Path, "write_text", lambda self, text, *a, **k: _half_then_fail(self, text.encode()))
    with pytest.raises(InjectedFailure):
        write_new(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name], "a temporary file was left behind"
    write_new(path)  # the next write succeeds and replaces the file
    assert path.read_bytes() != before


def test_failure_at_the_rename_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_json(path, {"step": 1})
    before = path.read_bytes()

    def failing_replace(src, dst):
        assert Path(src).read_text().startswith("{"), "the temporary file is complete before the rename"
        raise InjectedFailure("injected failure at os.replace")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(InjectedFailure):
        write_json(path, {"step": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_atomic_path_yields_a_sibling_temporary(tmp_path):
    target = tmp_path / "sub" / "file.bin"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target and not target.exists()
        tmp.write_bytes(b"payload")
    assert target.read_bytes() == b"payload"
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]


def test_published_files_and_directories_get_the_umask_mode_not_the_temporaries(tmp_path):
    """mkstemp/mkdtemp create 0600/0700 temporaries; what is published must be as readable as a plain open() would
    make it (a shared metrics.json or model cache must not become owner-only)."""
    previous = os.umask(0o022)
    try:
        write_json(tmp_path / "metrics.json", {"a": 1})
        staged = tmp_path / "staged"
        staged.mkdir(mode=0o700)
        (staged / "f.txt").write_text("x")
        replace_dir(staged, tmp_path / "published")
    finally:
        os.umask(previous)
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "published").stat().st_mode & 0o777 == 0o755


# ------------------------------------------------------------------------------------------------ directories
def _nora_model(seed: int):
    torch.manual_seed(seed)
    model = get_peft_model(M.fresh("llama"), nora.NoraConfig(r=8, r_inner=4, init_weights=False))
    return model


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir())


def test_export_lora_failure_keeps_the_previous_export(tmp_path, monkeypatch):
    out = tmp_path / "lora"
    nora.export_lora(_nora_model(0), out)
    before = _snapshot(out)
    assert set(before) == set(ADAPTER_FILES)

    def save_file(tensors, filename, metadata=None):
        from safetensors.torch import save

        _half_then_fail(filename, save(tensors, metadata=metadata))

    monkeypatch.setattr("nora.export.save_file", save_file)
    with pytest.raises(InjectedFailure):
        nora.export_lora(_nora_model(1), out)
    assert _snapshot(out) == before
    assert _siblings(out) == ["lora"], "a temporary directory was left behind"


def test_export_merged_failure_keeps_the_previous_export(tmp_path, tiny_tokenizer, monkeypatch):
    out = tmp_path / "merged"
    nora.export_merged(_nora_model(0), out, tokenizer=tiny_tokenizer)
    before = _snapshot(out)
    assert "model.safetensors" in before and "tokenizer.json" in before

    def tokenizer_save(*args, **kwargs):  # the model is already written into the temporary folder: fail after it
        raise InjectedFailure("injected failure while saving the tokenizer")

    monkeypatch.setattr(tiny_tokenizer, "save_pretrained", tokenizer_save)
    with pytest.raises(InjectedFailure):
        nora.export_merged(_nora_model(1), out, tokenizer=tiny_tokenizer)
    assert _snapshot(out) == before
    assert _siblings(out) == ["merged"]


def test_atomic_dir_replaces_file_by_file(tmp_path, monkeypatch):
    """A failure between two renames of atomic_dir leaves every file either wholly old or wholly new."""
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        for name in ("a.txt", "b.txt", "c.txt"):
            (tmp / name).write_text(f"old {name}")
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise InjectedFailure("injected failure between two renames")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(InjectedFailure), atomic_dir(out) as tmp:
        for name in ("a.txt", "b.txt", "c.txt"):
            (tmp / name).write_text(f"new {name} " * 10)
    monkeypatch.undo()
    assert (out / "a.txt").read_text() == "new a.txt " * 10
    assert (out / "b.txt").read_text() == "old b.txt" and (out / "c.txt").read_text() == "old c.txt"
    assert _siblings(out) == ["out"]


def test_model_cache_conversion_failure_leaves_no_partial_cache(tmp_path, tiny_llama_dir, monkeypatch):
    """convert_gguf (GGUF -> safetensors cache) writes a temporary sibling and renames it: a failure mid-write leaves
    neither a partial cache directory (that a later load would trust) nor the temporary. The GGUF readers of
    transformers are replaced by the tiny local model (the conversion logic after reading is the real one)."""
    import transformers

    gguf = tmp_path / "pkg" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")

    def from_local(cls):
        real = cls.from_pretrained

        def from_pretrained(src, *args, gguf_file=None, **kwargs):
            if gguf_file is None:  # transformers' own nested calls
                return real(src, *args, **kwargs)
            assert Path(src) / gguf_file == gguf
            return real(str(tiny_llama_dir), *args, **kwargs)

        return from_pretrained

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer, transformers.AutoConfig):
        monkeypatch.setattr(cls, "from_pretrained", from_local(cls))
    real_save = transformers.PreTrainedTokenizerBase.save_pretrained

    def failing_save(self, *args, **kwargs):  # the model weights are already in the temporary folder
        raise InjectedFailure("injected failure while saving the tokenizer")

    cache = tmp_path / "cache" / "models"
    out = cache / "smollm2-135m-0123456789abcdef"
    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", failing_save)
    with pytest.raises(InjectedFailure):
        harness_models.convert_gguf(gguf, out)
    assert not out.exists() and list(cache.iterdir()) == [], "a partial cache or a temporary was left behind"
    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", real_save)
    harness_models.convert_gguf(gguf, out)
    assert harness_models._is_model_dir(out) and (out / "tokenizer.json").is_file()
    assert [p.name for p in cache.iterdir()] == [out.name]


# ------------------------------------------------------------------------------------------------ training runs
def _argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out), *TINY, *STEPS, *extra]


def _train(argv: list[str], callbacks=None) -> dict:
    with torch_threads(1):  # the same single-threaded kernels as the OMP_NUM_THREADS=1 subprocesses
        return run_train(parse_args(argv), callbacks=callbacks)


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama_dir, tiny_task_dir, tmp_path_factory) -> Path:
    """A 6-step run (checkpoints every 2 steps) that nothing interrupts: the reference for every resumed run."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    _train(_argv(tiny_llama_dir, tiny_task_dir, out))
    return out


def _loss_curve(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())["loss_curve"]


def _assert_resumed_at(metrics: dict, step: int, total: int = 6) -> None:
    """The resumed session began at the checkpoint's global step and ran only the remaining steps."""
    assert (metrics["start_step"], metrics["steps_run"], metrics["steps"]) == (step, total - step, total)


def test_final_adapter_save_failure_keeps_the_previous_adapter(
    uninterrupted, tiny_llama_dir, tiny_task_dir, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    out.mkdir()
    for name in ADAPTER_FILES:
        (out / name).write_bytes((uninterrupted / name).read_bytes())
    before = _snapshot(out)

    def safe_save_file(tensors, filename, metadata=None):
        from safetensors.torch import save

        if "checkpoint-" in str(filename):  # checkpoints save normally; the final adapter fails half-way
            return save_file_real(tensors, filename, metadata=metadata)
        _half_then_fail(filename, save(tensors, metadata=metadata))

    import peft.peft_model

    save_file_real = peft.peft_model.safe_save_file
    monkeypatch.setattr(peft.peft_model, "safe_save_file", safe_save_file)
    with pytest.raises(InjectedFailure):
        _train(_argv(tiny_llama_dir, tiny_task_dir, out, "--max-steps", "2", "--lr", "0.5"))
    after = _snapshot(out)
    assert {k: after[k] for k in ADAPTER_FILES} == {k: before[k] for k in ADAPTER_FILES}
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "checkpoint-2",
    ]
    assert _siblings(out) == ["run"], "a temporary directory was left behind"


def _fail_mid_checkpoint(step: int):
    """A Trainer._save_rng_state that fails at `step`: by then the checkpoint's model and optimizer are written, its
    RNG state and trainer_state.json are not."""
    real = Trainer._save_rng_state

    def save_rng_state(trainer, output_dir):
        if trainer.state.global_step == step:
            assert (Path(output_dir) / "adapter_model.safetensors").is_file()
            raise InjectedFailure(f"injected failure while writing {output_dir}")
        return real(trainer, output_dir)

    return save_rng_state


def test_checkpoint_failure_keeps_previous_checkpoints_and_resume_is_exact(
    uninterrupted, tiny_llama_dir, tiny_task_dir, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    snapshots: dict[int, dict[str, bytes]] = {}

    class Snapshot(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            snapshots[state.global_step] = _snapshot(out / f"checkpoint-{state.global_step}")

    monkeypatch.setattr(Trainer, "_save_rng_state", _fail_mid_checkpoint(step=4))
    with pytest.raises(InjectedFailure):
        _train(_argv(tiny_llama_dir, tiny_task_dir, out), callbacks=[Snapshot()])
    monkeypatch.undo()
    assert list(snapshots) == [2]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"], "partial checkpoint or staging left behind"
    assert _snapshot(out / "checkpoint-2") == snapshots[2]

    metrics = _train(_argv(tiny_llama_dir, tiny_task_dir, out, "--resume"))
    assert metrics["resumed_from"] == str(out / "checkpoint-2")
    _assert_resumed_at(metrics, 2)
    assert_same_adapter(uninterrupted, out)
    assert metrics["loss_curve"] == _loss_curve(uninterrupted)


class _StopAfterCheckpoint(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"simulated crash after checkpoint-{self.step}")


def test_resume_skips_a_half_written_checkpoint(uninterrupted, tiny_llama_dir, tiny_task_dir, tmp_path, capsys):
    """A checkpoint folder written in place and cut short (as transformers' own Trainer leaves it when killed) is not
    resumed from: --resume takes the newest complete one, and the result equals the uninterrupted run."""
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _train(_argv(tiny_llama_dir, tiny_task_dir, out), callbacks=[_StopAfterCheckpoint(4)])
    half = out / "checkpoint-4"
    (half / "trainer_state.json").unlink()
    for name in ("optimizer.pt", "adapter_model.safetensors"):
        data = (half / name).read_bytes()
        (half / name).write_bytes(data[: len(data) // 3])
    (half / "rng_state.pth").unlink()

    capsys.readouterr()
    metrics = _train(_argv(tiny_llama_dir, tiny_task_dir, out, "--resume"))
    assert metrics["resumed_from"] == str(out / "checkpoint-2")
    _assert_resumed_at(metrics, 2)
    assert f"skipping incomplete checkpoint {half}" in capsys.readouterr().out
    assert_same_adapter(uninterrupted, out)
    assert metrics["loss_curve"] == _loss_curve(uninterrupted)
    assert (half / "trainer_state.json").is_file(), "the resumed run re-wrote checkpoint-4 completely"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]  # save-total-limit 2


# ------------------------------------------------------------------------------------------------ SIGKILL
#: runs `nora.cli.main(argv)` with one Trainer method patched to announce "READY" and block at a chosen step, so the
#: test can SIGKILL the process at an exact point (no timing involved)
_HANG_AT = r"""
import sys, time
from transformers import Trainer
import nora.cli

step, method, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
real = getattr(Trainer, method)

def patched(self, *args, **kwargs):
    if self.state.global_step == step:
        print("READY", method, step, flush=True)
        time.sleep(3600)
    return real(self, *args, **kwargs)

setattr(Trainer, method, patched)
sys.exit(nora.cli.main(argv))
"""


def _run_and_sigkill(step: int, method: str, argv: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-c", _HANG_AT, str(step), method, *argv]
    # stderr joins stdout: one pipe drained line by line (a separate unread stderr pipe could fill up and block the
    # child), closed by the with-block
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        guard = threading.Timer(300, proc.kill)  # a safety net for a hung child, not an assertion
        guard.start()
        try:
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if line.startswith("READY"):
                    os.kill(proc.pid, signal.SIGKILL)
                    break
            proc.wait()
        finally:
            guard.cancel()
    assert proc.returncode == -signal.SIGKILL, "".join(lines)[-3000:]


@pytest.mark.parametrize(
    ("method", "resumes_from"),
    [
        ("_save_rng_state", "checkpoint-2"),  # killed while writing checkpoint-4
        ("training_step", "checkpoint-4"),  # killed in the middle of step 5
    ],
)
def test_sigkill_then_resume_equals_uninterrupted(
    method, resumes_from, uninterrupted, tiny_llama_dir, tiny_task_dir, tmp_path
):
    out = tmp_path / "run"
    argv = _argv(tiny_llama_dir, tiny_task_dir, out)
    _run_and_sigkill(4, method, argv)
    assert not (out / "adapter_model.safetensors").exists() and not (out / "metrics.json").exists()
    if method == "_save_rng_state":  # the kill hit a half-written checkpoint: only its staging copy exists
        assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
        staged = out / CHECKPOINT_STAGING / "checkpoint-4"
        assert (staged / "adapter_model.safetensors").is_file() and not (staged / "trainer_state.json").exists()
    else:
        assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    metrics = _train([*argv, "--resume"])
    assert metrics["resumed_from"] == str(out / resumes_from)
    _assert_resumed_at(metrics, int(resumes_from.removeprefix("checkpoint-")))
    assert_same_adapter(uninterrupted, out)  # exact: atol = rtol = 0
    assert metrics["loss_curve"] == _loss_curve(uninterrupted)
    assert not (out / CHECKPOINT_STAGING).exists(), "the next checkpoint clears the killed save's staging folder"


def test_torchrun_checkpoints_hold_every_rank(tiny_llama_dir, tiny_task_dir, tmp_path):
    """Under torchrun every rank writes into the staging folder and rank 0 publishes it after a barrier: each
    published checkpoint holds both ranks' RNG states, and nothing temporary is left."""
    out = tmp_path / "ddp"
    argv = _argv(tiny_llama_dir, tiny_task_dir, out, "--max-steps", "4")
    argv[argv.index("--r")] = "--nora-r"  # torchrun's own parser rejects a bare --r as ambiguous
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*command, "-m", "nora.cli", *argv], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = {
        "rng_state_0.pth",
        "rng_state_1.pth",
        "trainer_state.json",
        "adapter_model.safetensors",
        "optimizer.pt",
    }
    for step in (2, 4):
        assert expected <= {p.name for p in (out / f"checkpoint-{step}").iterdir()}, step
    assert not (out / CHECKPOINT_STAGING).exists() and _siblings(out) == ["ddp"]
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2
