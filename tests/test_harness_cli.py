"""`nora` CLI end to end on a tiny random Llama: train -> eval -> export, config.yaml replay, resume, every
method, clear errors for bad inputs, and a 2-process torchrun run."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, TrainerCallback

import nora
from conftest import assert_same_adapter
from nora.cli import build_parser, main, parse_args
from nora.harness import HarnessError
from nora.harness.train import NORA_SKIPPED_FIELDS, run_train

TINY = ["--r", "8", "--r-inner", "4", "--batch-size", "4", "--no-progress"]


def _train_argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    tiny = TINY
    if any(m in extra for m in ("loraxs", "lorasb")):  # structure 'adapter' has no inner rank: --r-inner is refused
        i = TINY.index("--r-inner")
        tiny = TINY[:i] + TINY[i + 2 :]
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out), *tiny, *extra]


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def trained(tiny_llama_dir, tiny_task_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "nora"
    assert main(_train_argv(tiny_llama_dir, tiny_task_dir, out, "--max-steps", "3", "--lr", "1e-2")) == 0
    return out


def test_train_writes_adapter_metrics_plot_and_config(trained):
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.json", "loss.png", "config.yaml"):
        assert (trained / name).is_file(), name
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["steps"] == 3 and len(metrics["loss_curve"]["loss"]) == 3
    assert metrics["final_loss"] == metrics["loss_curve"]["loss"][-1]
    assert metrics["trainable_params"] == 2 * 8 * 4 * 7 * 2  # 2 r r' per module, 7 modules, 2 layers
    assert len(metrics["step_seconds"]["values"]) == 3 and metrics["tokens_per_second"] > 0
    assert metrics["peak_rss_mb"] > 0 and metrics["versions"]["nora"] == nora.__version__
    assert metrics["peft_config"]["r"] == 8 and metrics["config"]["method"] == "nora"
    assert sorted(metrics["peft_config"]["target_modules"])[0] == "down_proj"  # a list, not a set's repr
    assert "base_fingerprint" not in metrics["peft_config"]
    config = yaml.safe_load((trained / "config.yaml").read_text())
    assert config["lr"] == 1e-2 and config["max_steps"] == 3 and "resume" not in config


def test_eval_reports_both_protocols_with_predictions(trained, tiny_task_dir, capsys):
    report_path = trained.parent / "eval.json"
    argv = ["eval", "--adapter", str(trained), "--task", str(tiny_task_dir / "test.json"), "--out", str(report_path)]
    assert main([*argv, "--max-new-tokens", "4", "--no-progress"]) == 0
    report = json.loads(report_path.read_text())
    (summary,) = report["accuracy"].values()
    assert summary["n"] == 6 and summary["loglik"]["total"] == 6 and summary["generation"]["total"] == 6
    assert summary["cloze"]["total"] == 6  # the default protocols are loglik, cloze and generation
    (predictions,) = report["predictions"].values()
    assert len(predictions) == 6
    assert set(predictions[0]) >= {
        "gold",
        "pred_loglik",
        "loglik",
        "pred_cloze",
        "cloze",
        "pred_generation",
        "generation",
    }
    assert set(predictions[0]["loglik"]) == {"answer1", "answer2", "answer3"}
    assert report["model"].endswith("tiny-llama0") or Path(report["model"]).is_dir()  # read from config.yaml
    assert "loglik" in capsys.readouterr().out


def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


def test_export_lora_and_merged_match_the_nora_model(trained, tiny_llama_dir, tmp_path):
    tokens = torch.randint(0, 300, (2, 12))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    reference = _logits(PeftModel.from_pretrained(base, trained).eval(), tokens)
    assert main(["export", "--adapter", str(trained), "--to", "lora", "--out", str(tmp_path / "lora")]) == 0
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "lora")
    torch.testing.assert_close(_logits(lora.eval(), tokens), reference, rtol=1e-4, atol=1e-5)
    assert main(["export", "--adapter", str(trained), "--to", "merged", "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(merged, tokens), reference, rtol=1e-4, atol=1e-5)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_config_yaml_repeats_the_run(trained, tmp_path):
    assert main(["train", "--config", str(trained / "config.yaml"), "--out", str(tmp_path / "again")]) == 0
    assert_same_adapter(trained, tmp_path / "again")
    first = json.loads((trained / "metrics.json").read_text())["loss_curve"]
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())["loss_curve"]
    assert first == again


class _CrashAfterCheckpoint(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise KeyboardInterrupt("simulated crash after checkpoint-2")


def test_resume_equals_uninterrupted(tiny_llama_dir, tiny_task_dir, tmp_path):
    def argv(out: Path, *extra: str) -> list[str]:
        return _train_argv(tiny_llama_dir, tiny_task_dir, out, "--max-steps", "4", "--save-steps", "2", *extra)

    first = run_train(parse_args(argv(tmp_path / "full")))
    assert (first["start_step"], first["steps_run"], first["steps"]) == (0, 4, 4)
    with pytest.raises(KeyboardInterrupt):
        run_train(parse_args(argv(tmp_path / "part")), callbacks=[_CrashAfterCheckpoint()])
    assert not (tmp_path / "part" / "adapter_model.safetensors").exists()
    # a copy of the crashed run whose checkpoint adapter is perturbed: if --resume really starts from the
    # checkpoint, the perturbation must reach the final adapter
    shutil.copytree(tmp_path / "part", tmp_path / "perturbed")
    weights = tmp_path / "perturbed" / "checkpoint-2" / "adapter_model.safetensors"
    state = load_file(weights)
    assert any("nora_inner_" in key for key in state)
    save_file({k: v + 0.05 if "nora_inner_" in k else v for k, v in state.items()}, weights)

    metrics = run_train(parse_args(argv(tmp_path / "part", "--resume")))
    assert metrics["resumed_from"].endswith("checkpoint-2")
    # the resumed session started at the checkpoint's step and ran only the remaining 2 steps
    assert (metrics["start_step"], metrics["steps_run"], metrics["steps"]) == (2, 2, 4)
    assert_same_adapter(tmp_path / "full", tmp_path / "part")
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())["loss_curve"]
    assert metrics["loss_curve"] == full

    perturbed = run_train(parse_args(argv(tmp_path / "perturbed", "--resume")))
    assert (perturbed["start_step"], perturbed["steps_run"]) == (2, 2)
    final, reference = _adapter(tmp_path / "perturbed"), _adapter(tmp_path / "full")
    changed = [k for k in reference if "nora_inner_" in k and (final[k] - reference[k]).abs().max() > 1e-3]
    assert changed, "perturbing the checkpoint's adapter did not change the resumed run's final adapter"


def test_sparse_logits_give_the_same_loss(tiny_llama_dir, tiny_task_dir, tmp_path):
    sparse = run_train(parse_args(_train_argv(tiny_llama_dir, tiny_task_dir, tmp_path / "a", "--max-steps", "2")))
    dense_argv = _train_argv(tiny_llama_dir, tiny_task_dir, tmp_path / "b", "--max-steps", "2", "--no-sparse-logits")
    dense = run_train(parse_args(dense_argv))
    assert sparse["loss_curve"]["loss"] == pytest.approx(dense["loss_curve"]["loss"], rel=1e-5)


@pytest.mark.parametrize("method", ["lora", "dora", "pissa", "vera", "loraxs", "full"])
def test_every_method_trains(method, tiny_llama_dir, tiny_task_dir, tmp_path):
    extra = ["--max-steps", "1", "--method", method, "--lora-r", "4"]
    metrics = run_train(parse_args(_train_argv(tiny_llama_dir, tiny_task_dir, tmp_path, *extra)))
    assert metrics["steps"] == 1 and metrics["trainable_params"] > 0
    expected = "config.json" if method == "full" else "adapter_config.json"
    assert (tmp_path / expected).is_file()
    if method == "loraxs":
        assert metrics["peft_config"]["structure"] == "adapter"
        assert metrics["trainable_params"] == 8 * 8 * 7 * 2  # one r x r matrix per module


def test_r_inner_with_loraxs_is_refused_before_anything_is_written(capsys, tiny_llama_dir, tiny_task_dir, tmp_path):
    argv = ["train", "--model", str(tiny_llama_dir), "--data", str(tiny_task_dir), "--out", str(tmp_path / "run"),
            "--method", "loraxs", "--r", "8", "--r-inner", "4", "--max-steps", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    assert "r_inner=4 has no effect with structure='adapter'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


class _LogitsAtEnd(TrainerCallback):
    """The trained model's logits on fixed ids, in the training process (PiSSA: residual base + trained adapter)."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        model.eval()
        with torch.no_grad():
            self.logits = model(input_ids=torch.arange(3, 19).view(2, 8)).logits


def test_pissa_adapter_is_saved_for_the_original_base_model(tiny_llama_dir, tiny_task_dir, tmp_path):
    """PiSSA rewrites the base weights to W - B0 A0; the saved adapter must reproduce the trained model on the
    ORIGINAL base (how `nora eval` and PeftModel.from_pretrained load it), so it is saved converted to rank-2r LoRA."""
    end = _LogitsAtEnd()
    extra = ["--max-steps", "2", "--method", "pissa", "--lora-r", "4", "--lr", "5e-2"]
    run_train(parse_args(_train_argv(tiny_llama_dir, tiny_task_dir, tmp_path / "p", *extra)), callbacks=[end])
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        before = base(input_ids=torch.arange(3, 19).view(2, 8)).logits
        loaded = PeftModel.from_pretrained(base, tmp_path / "p").eval()
        after = loaded(input_ids=torch.arange(3, 19).view(2, 8)).logits
    assert (end.logits - before).abs().max() > 1e-3  # training moved the model, so the check below is not vacuous
    torch.testing.assert_close(after, end.logits, atol=1e-4, rtol=1e-4)


def test_awsvd_calibrates_before_training(tiny_llama_dir, tiny_task_dir, tmp_path):
    extra = ["--max-steps", "1", "--outer-init", "awsvd", "--calib-samples", "8"]
    metrics = run_train(parse_args(_train_argv(tiny_llama_dir, tiny_task_dir, tmp_path, *extra)))
    assert metrics["calibration"]["samples"] == 8
    assert metrics["peft_config"]["outer_init"] == "awsvd"


@pytest.mark.parametrize("extra", [["--inner-init", "grad", "--grad-init-samples", "4"], ["--method", "lorasb"]])
def test_gradient_informed_inits_run_before_training(extra, tiny_llama_dir, tiny_task_dir, tmp_path):
    """`nora train` calls nora.gradient_init on the first --grad-init-samples examples (LoRA-SB: ~0.1 % of the
    training set, at least 2): until it has run, a NoRA layer with a gradient-informed init refuses to run, so one
    optimizer step proves the factors were filled."""
    argv = ["--max-steps", "1", "--warmup-steps", "4", "--lr", "2e-3", *extra]
    metrics = run_train(parse_args(_train_argv(tiny_llama_dir, tiny_task_dir, tmp_path, *argv)))
    assert metrics["steps"] == 1
    cfg = metrics["peft_config"]
    if "lorasb" in extra:
        assert metrics["calibration"]["grad_init_samples"] == 2
        assert (cfg["structure"], cfg["outer_init"], cfg["outer_scaling"], cfg["inner_init"], cfg["alpha"]) == (
            "adapter", "grad", "orthonormal", "grad_step", None)  # fmt: skip
        assert cfg["grad_estimator"] == "sign" and cfg["grad_first_step_lr"] == pytest.approx(2e-3 / 4)
        assert metrics["trainable_params"] == 8 * 8 * 7 * 2  # one r x r core per module (7 x 2 layers), like LoRA-XS
    else:
        assert metrics["calibration"]["grad_init_samples"] == 4 and cfg["inner_init"] == "grad"


def test_grad_init_samples_without_a_gradient_init_is_refused(tiny_llama_dir, tiny_task_dir, tmp_path):
    argv = _train_argv(tiny_llama_dir, tiny_task_dir, tmp_path, "--max-steps", "1", "--grad-init-samples", "4")
    with pytest.raises(HarnessError, match=r"--grad-init-samples 4 is only used by a gradient-informed init"):
        run_train(parse_args(argv))


def test_lorasb_refuses_a_conflicting_nora_flag(tiny_llama_dir, tiny_task_dir, tmp_path):
    argv = _train_argv(tiny_llama_dir, tiny_task_dir, tmp_path, "--method", "lorasb", "--outer-init", "awsvd")
    with pytest.raises(HarnessError, match=r"--method lorasb sets --outer-init grad; drop --outer-init awsvd"):
        run_train(parse_args(argv))


def test_every_nora_config_field_is_a_train_flag():
    _, train = build_parser()
    dests = {action.dest for action in train._actions}
    for f in dataclasses.fields(nora.NoraConfig):
        assert f.name in dests or f.name in NORA_SKIPPED_FIELDS, f.name
    assert "target_modules" in dests  # shared with the baselines


@pytest.mark.parametrize("command", ["train", "eval", "export", "demo", "bench"])
def test_help_of_every_command_renders(command, capsys):
    """argparse %-formats help strings: a literal '%' in a NoraConfig help text must not crash `--help`."""
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: nora " + command)
    if command == "train":
        assert "--svd-method" in out and "0.04% of the exact residual" in out


# ------------------------------------------------------------------------------------------------ bad inputs
def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nora: error:") and "Traceback" not in err
    return err


def test_library_errors_are_one_line_with_a_debug_switch(capsys, tiny_llama_dir, tiny_task_dir, tmp_path, monkeypatch):
    """A NoraConfig / get_peft_model error reaches the CLI user as one line (the library's message), no traceback;
    NORA_DEBUG=1 re-raises it for bug reports."""
    argv = _train_argv(tiny_llama_dir, tiny_task_dir, tmp_path / "big", "--max-steps", "1")
    argv[argv.index("--r") + 1] = "999"
    monkeypatch.delenv("NORA_DEBUG", raising=False)
    err = _error(capsys, argv)
    assert "outer rank r=999 exceeds min(out, in)" in err and "NORA_DEBUG=1" in err
    monkeypatch.setenv("NORA_DEBUG", "1")
    with pytest.raises(ValueError, match="outer rank r=999"):
        main(argv)


def test_unknown_model_name(capsys, tiny_task_dir, tmp_path):
    err = _error(capsys, ["train", "--model", "gpt-17", "--data", str(tiny_task_dir), "--out", str(tmp_path)])
    assert "unknown model 'gpt-17'" in err and "smollm2-135m" in err


def test_missing_data_dir(capsys, tmp_path):
    argv = ["train", "--data", "commonsense", "--data-dir", str(tmp_path / "nope"), "--out", str(tmp_path)]
    assert "nope does not exist" in _error(capsys, argv)


def test_unknown_method(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--method", "lorax", "--data", "x", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "invalid choice: 'lorax'" in capsys.readouterr().err


def test_unknown_key_in_config(capsys, tmp_path):
    (tmp_path / "config.yaml").write_text("lr: 0.1\nlearning_rate: 0.1\n")
    assert "unknown keys ['learning_rate']" in _error(capsys, ["train", "--config", str(tmp_path / "config.yaml")])


def test_missing_adapter_and_unknown_bench(capsys, tmp_path):
    assert "does not exist" in _error(capsys, ["eval", "--adapter", str(tmp_path / "x"), "--task", "boolq"])
    err = _error(capsys, ["bench", "no_such_bench"])
    assert "no benchmark 'no_such_bench'" in err and "Available:" in err


# ------------------------------------------------------------------------------------------------ torchrun
def test_torchrun_two_processes(tiny_llama_dir, tiny_task_dir, tmp_path):
    out = tmp_path / "ddp"
    # --batch-size 1: every calibration batch is one example in both the 2-process and the 1-process run, so the
    # activations are computed on the same shapes and the all-reduced AwSVD statistics are the 1-process ones
    argv = _train_argv(tiny_llama_dir, tiny_task_dir, out, "--max-steps", "2", "--outer-init", "awsvd")
    argv[argv.index("--batch-size") + 1] = "1"
    argv[argv.index("--r")] = "--nora-r"  # torchrun's own parser rejects a bare --r as ambiguous
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "nora.cli", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 2
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), out)
    assert model.peft_config["default"].outer_init == "awsvd"
    digests = metrics["outer_sha256"]
    assert len(digests) == 2 and all(isinstance(d, str) and len(d) == 64 for d in digests)
    one = [tmp_path / "one" if a == str(out) else a for a in argv]
    one[one.index("--max-steps") + 1] = "1"
    proc = subprocess.run([sys.executable, "-m", "nora.cli", *map(str, one)], capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert single["world_size"] == 1 and len(single["outer_sha256"]) == 1
    assert digests[0] == digests[1], "the two ranks built different frozen factors"
    assert digests[0] == single["outer_sha256"][0], "2 processes built other frozen factors than 1 process"
