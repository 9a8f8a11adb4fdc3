"""Every usual way to load or attach a PEFT adapter works with a NoRA adapter (issue 24, requirement 1).

Entry points: transformers' PeftAdapterMixin (add_adapter, load_adapter, set_adapter, disable/enable_adapters,
active_adapters), AutoModelForCausalLM.from_pretrained(adapter_dir), pipeline("text-generation", model=adapter_dir),
AutoPeftModelForCausalLM / AutoPeftModelForSequenceClassification, diffusers' unet.add_adapter with save and reload,
inject_adapter_in_model + get/set_peft_model_state_dict, get_layer_status / get_model_status.

Every adapter here is non-identity (init_weights=False), so "the adapter is active" is visible in the outputs: each
test asserts the adapted output differs from the base by far more than the tolerance it is compared with.
"""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from peft import (
    AutoPeftModelForCausalLM,
    AutoPeftModelForSequenceClassification,
    PeftModel,
    get_layer_status,
    get_model_status,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import _models as M
import nora
from nora.config import NoraPeftType
from nora.interop import load_diffusers_adapter
from nora.model import nora_layers

ATOL = 1e-5
#: every adapter below moves the logits by far more than ATOL (asserted per test)
MIN_SIGNAL = 1e-3


def _cfg(**kwargs) -> nora.NoraConfig:
    base = {"r": 8, "r_inner": 4, "init_weights": False, "inner_init_std": 0.5, "target_modules": ["q_proj", "v_proj"]}
    return nora.NoraConfig(**{**base, **kwargs})


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def ids(tiny_tokenizer):
    return torch.tensor([tiny_tokenizer("is the sky blue? true false")["input_ids"]])


@pytest.fixture
def llama_adapter(tmp_path, tiny_llama_dir, ids):
    """(adapter_dir, adapted logits, base logits): a non-identity NoRA adapter on the local tiny Llama."""
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    base_logits = _logits(base, ids)
    model = get_peft_model(base, _cfg(task_type="CAUSAL_LM"))
    adapted = _logits(model, ids)
    out = tmp_path / "adapter"
    model.save_pretrained(out)
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "NORA" and saved["base_model_name_or_path"] == str(tiny_llama_dir)
    assert (adapted - base_logits).abs().max() > MIN_SIGNAL
    return out, adapted, base_logits


def test_peft_type_reads_like_a_peft_enum_member():
    cfg = _cfg()
    assert isinstance(cfg.peft_type, NoraPeftType)
    assert cfg.peft_type == "NORA" and cfg.peft_type.value == "NORA" and cfg.peft_type.name == "NORA"
    assert {cfg.peft_type: 1}["NORA"] == 1 and hash(cfg.peft_type) == hash("NORA")
    assert json.loads(json.dumps({"peft_type": cfg.peft_type})) == {"peft_type": "NORA"}
    assert cfg.peft_type.value.lower() == "nora"  # transformers' load_adapter marks adapter keys with this
    for copied in (pickle.loads(pickle.dumps(cfg.peft_type)), copy.deepcopy(cfg.peft_type)):
        assert isinstance(copied, NoraPeftType) and copied.value == "NORA"


@pytest.fixture
def transformers_peft_methods(monkeypatch):
    """transformers 5.24 (this venv) gates add_adapter / set_adapter / disable_adapters / enable_adapters / active_adapters
    behind peft >= 0.22, which is not released (the newest peft is 0.21.2); the methods themselves only call
    inject_adapter_in_model and the tuner layers' set_adapter / enable_adapters, which peft 0.21 has. Lift that gate
    (it refuses a LoRA adapter just the same) so the test exercises the code paths. `make test-min` runs this file
    under transformers 4.56 + peft 0.21.0, where the gate does not exist."""
    from packaging.version import Version
    from peft import __version__ as peft_version
    from transformers.integrations import peft as hf_peft

    if Version(peft_version) < Version(getattr(hf_peft, "MIN_PEFT_VERSION", "0")):
        monkeypatch.setattr(hf_peft, "check_peft_version", lambda min_version: None)


def test_transformers_add_set_disable_enable_active(transformers_peft_methods, tiny_llama_dir, ids):
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    base_logits = _logits(base, ids)
    base.add_adapter(_cfg(), adapter_name="a")
    assert base.active_adapters() == ["a"]
    out_a = _logits(base, ids)
    base.add_adapter(_cfg(init_seed=1, inner_init_std=0.3), adapter_name="b")  # add_adapter activates it
    assert base.active_adapters() == ["b"]
    out_b = _logits(base, ids)
    base.set_adapter("a")
    assert base.active_adapters() == ["a"]
    torch.testing.assert_close(_logits(base, ids), out_a, rtol=0, atol=ATOL)
    base.set_adapter("b")
    assert (out_a - base_logits).abs().max() > MIN_SIGNAL and (out_b - out_a).abs().max() > MIN_SIGNAL
    base.disable_adapters()
    torch.testing.assert_close(_logits(base, ids), base_logits, rtol=0, atol=ATOL)
    base.enable_adapters()
    torch.testing.assert_close(_logits(base, ids), out_b, rtol=0, atol=ATOL)
    assert sorted(base.peft_config) == ["a", "b"] and base.peft_config["a"].peft_type.value == "NORA"


def test_transformers_load_adapter(transformers_peft_methods, llama_adapter, tiny_llama_dir, ids):
    adapter_dir, adapted, base_logits = llama_adapter
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.load_adapter(str(adapter_dir), adapter_name="nora")
    assert model.active_adapters() == ["nora"]
    torch.testing.assert_close(_logits(model, ids), adapted, rtol=0, atol=ATOL)
    model.disable_adapters()
    torch.testing.assert_close(_logits(model, ids), base_logits, rtol=0, atol=ATOL)


def test_auto_model_from_adapter_dir_and_pipeline(llama_adapter, tiny_llama_dir, ids):
    from transformers import pipeline

    adapter_dir, adapted, _ = llama_adapter
    model = AutoModelForCausalLM.from_pretrained(adapter_dir)  # transformers reads base_model_name_or_path
    torch.testing.assert_close(_logits(model, ids), adapted, rtol=0, atol=ATOL)

    generator = pipeline("text-generation", model=str(adapter_dir))  # tokenizer from base_model_name_or_path too
    torch.testing.assert_close(_logits(generator.model, ids), adapted, rtol=0, atol=ATOL)
    text = generator("is the sky", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith("is the sky")


def test_auto_peft_model_for_causal_lm(llama_adapter, ids):
    adapter_dir, adapted, _ = llama_adapter
    model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
    assert isinstance(model, PeftModel) and model.peft_config["default"].peft_type == "NORA"
    torch.testing.assert_close(_logits(model, ids), adapted, rtol=0, atol=ATOL)


def test_auto_peft_model_for_sequence_classification(tmp_path):
    base_dir = tmp_path / "bert"
    M.build("bert").save_pretrained(base_dir)
    batch = M.inputs("bert")
    base = AutoModelForSequenceClassification.from_pretrained(base_dir).eval()
    cfg = _cfg(target_modules=["query", "value"], task_type="SEQ_CLS")
    model = get_peft_model(base, cfg).eval()
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.mul_(2)  # a trained head, saved too
        adapted = model(**batch).logits
        base_logits = AutoModelForSequenceClassification.from_pretrained(base_dir).eval()(**batch).logits
    assert (adapted - base_logits).abs().max() > MIN_SIGNAL
    model.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, adapted, rtol=0, atol=ATOL)


def test_diffusers_unet_add_adapter_save_and_reload(tmp_path):
    pytest.importorskip("diffusers", reason="diffusers is in the dev extra (make test-min installs core deps only)")
    unet = M.fresh("unet")
    batch = M.inputs("unet")
    with torch.no_grad():
        base_out = unet(**batch).sample
    unet.add_adapter(_cfg(target_modules=nora.DIFFUSERS_UNET_TARGET_MODULES), adapter_name="nora")
    with torch.no_grad():
        adapted = unet(**batch).sample
    assert (adapted - base_out).abs().max() > MIN_SIGNAL
    unet.save_lora_adapter(tmp_path / "unet-adapter", adapter_name="nora")

    fresh = M.fresh("unet")
    cfg = load_diffusers_adapter(fresh, tmp_path / "unet-adapter", adapter_name="nora")
    assert cfg.peft_type == "NORA" and fresh.active_adapters() == ["nora"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).sample, adapted, rtol=0, atol=ATOL)
    fresh.disable_adapters()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).sample, base_out, rtol=0, atol=ATOL)

    # a runtime that only speaks LoRA: export, then diffusers' own load_lora_adapter reads it
    nora.export_lora(unet, tmp_path / "unet-lora", adapter_name="nora")
    plain = M.fresh("unet")
    plain.load_lora_adapter(tmp_path / "unet-lora", weight_name="adapter_model.safetensors", prefix=None)
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).sample, adapted, rtol=0, atol=ATOL)


def test_load_diffusers_adapter_refuses_a_lora_file(tmp_path):
    pytest.importorskip("diffusers", reason="diffusers is in the dev extra (make test-min installs core deps only)")
    from peft import LoraConfig

    unet = M.fresh("unet")
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]), adapter_name="lora")
    unet.save_lora_adapter(tmp_path / "lora", adapter_name="lora")
    with pytest.raises(ValueError, match=r"holds no NoRA config.*load_lora_adapter"):
        load_diffusers_adapter(M.fresh("unet"), tmp_path / "lora")


def test_load_diffusers_adapter_missing_file_and_foreign_tensors(tmp_path):
    pytest.importorskip("diffusers", reason="diffusers is in the dev extra (make test-min installs core deps only)")
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with pytest.raises(
        FileNotFoundError, match=r"load_diffusers_adapter: .*pytorch_lora_weights.safetensors does not"
    ):
        load_diffusers_adapter(M.fresh("unet"), tmp_path)
    unet = M.fresh("unet")
    unet.add_adapter(_cfg(target_modules=["to_q"]), adapter_name="nora")
    unet.save_lora_adapter(tmp_path, adapter_name="nora")
    file = tmp_path / "pytorch_lora_weights.safetensors"
    with safe_open(file, framework="pt") as fh:
        metadata = fh.metadata()
    state = load_file(file)
    save_file({**state, "no_such_block.to_q.nora_inner_A": torch.zeros(4, 8)}, file, metadata=metadata)
    with pytest.raises(ValueError, match=r"1 tensors of .* do not fit this model, e.g. no_such_block"):
        load_diffusers_adapter(M.fresh("unet"), tmp_path, adapter_name="nora")


def test_inject_adapter_in_model_and_state_dict_round_trip():
    model = M.fresh("llama")
    batch = M.inputs("llama")
    base_out = M.output("llama", model, batch).detach()
    cfg = _cfg()
    model = inject_adapter_in_model(cfg, model)
    assert len(list(nora_layers(model))) == 2
    adapted = M.output("llama", model, batch).detach()
    assert (adapted - base_out).abs().max() > MIN_SIGNAL
    state = get_peft_model_state_dict(model)
    assert state and all("nora_" in k for k in state), sorted(state)
    assert any(".nora_B" in k for k in state) and any(".nora_inner_A" in k for k in state)

    other = inject_adapter_in_model(_cfg(init_seed=3, inner_init_std=0.1), M.fresh("llama"))
    assert (M.output("llama", other, batch) - adapted).abs().max() > MIN_SIGNAL
    result = set_peft_model_state_dict(other, state)
    assert not result.unexpected_keys
    torch.testing.assert_close(M.output("llama", other, batch), adapted, rtol=0, atol=ATOL)


def test_get_layer_status_and_model_status():
    model = get_peft_model(M.fresh("llama"), _cfg(), adapter_name="a")
    model.add_adapter("b", _cfg(r=4, r_inner=2))
    layers = get_layer_status(model)
    assert len(layers) == 2 * 1  # q_proj, v_proj of the one decoder layer
    for status in layers:
        assert status.module_type.startswith("nora.") and status.available_adapters == ["a", "b"]
        assert status.active_adapters == ["a"] and status.merged_adapters == []
        assert status.requires_grad == {"a": True, "b": False}
    model_status = get_model_status(model)
    assert model_status.available_adapters == ["a", "b"] and model_status.active_adapters == ["a"]
    assert model_status.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    model.merge_adapter(["a"])
    assert get_model_status(model).merged_adapters == ["a"]
