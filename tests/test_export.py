"""export_lora (exact LoRA factors, loadable by PEFT's LoRA) and export_merged (plain transformers checkpoint).

The nora-free subprocess check lives in test_model_matrix.py; here the LoRA export is loaded in-process. Every
exported dW (lora_B @ lora_A, or merged - base) is compared with tests/_oracle.py (the paper's product of the raw
factors), not with nora's own get_delta_weight, so a wrong fold cannot agree with itself.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file

import _models as M
import _oracle as O
import nora
from conftest import config_kwargs
from nora.model import nora_layers

STRUCTURES = ("nested", "output", "parallel", "adapter")


def trained(family: str, steps: int = 1, **kwargs):
    model = get_peft_model(M.fresh(family), nora.NoraConfig(**config_kwargs(**{"r": 8, "r_inner": 4, **kwargs})))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for step in range(steps):
        M.output(family, model, M.inputs(family, seed=50 + step)).float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def forward(family, model, batch):
    with torch.no_grad():
        return M.output(family, model, batch)


def assert_lora_state_is_the_oracle_delta(model, state, adapter="default", atol=1e-6):
    """Every exported lora_B @ lora_A (in the base layout) equals the oracle's dW of that layer."""
    config = model.peft_config[adapter]
    layers = dict(nora_layers(model))
    assert layers
    for name, layer in layers.items():
        product = state[f"{name}.lora_B.weight"].double() @ state[f"{name}.lora_A.weight"].double()
        expected = O.delta_weight(layer, config, adapter)
        assert expected.abs().max() > 100 * atol, name  # a trained, non-zero update
        torch.testing.assert_close(product, expected, atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("alpha", [None, 6.0])
def test_export_lora_matches_nora_outputs(structure, alpha, tmp_path):
    model = trained("llama", structure=structure, alpha=alpha)
    batch = M.inputs("llama")
    expected = forward("llama", model, batch)
    nora.export_lora(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    k = 8 if structure == "adapter" else 4
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == k
    assert config["bias"] == "none" and not config["fan_in_fan_out"]
    lora = PeftModel.from_pretrained(M.fresh("llama"), tmp_path)
    assert isinstance(lora.peft_config["default"], LoraConfig)
    torch.testing.assert_close(forward("llama", lora, batch), expected, atol=1e-5, rtol=0)
    assert_lora_state_is_the_oracle_delta(model, load_file(tmp_path / "adapter_model.safetensors"))


def test_lora_state_dict_contents():
    model = trained("llama")
    config, state = nora.lora_state_dict(model)
    layers = dict(nora_layers(model))
    assert len(state) == 2 * len(layers)
    assert config.target_modules == {name.removeprefix("base_model.model.") for name in layers}
    for name, layer in layers.items():
        lora_A, lora_B = state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"]
        assert lora_A.shape == (4, layer.in_features) and lora_B.shape == (layer.out_features, 4)
    assert_lora_state_is_the_oracle_delta(model, state)


def test_export_conv1d_and_modules_to_save(tmp_path):
    gpt2 = trained("gpt2")
    config, state = nora.lora_state_dict(gpt2)
    assert config.fan_in_fan_out
    for name, layer in nora_layers(gpt2):  # PEFT's fan_in_fan_out LoRA: dW = (lora_B @ lora_A), applied as x @ dW.T
        product = state[f"{name}.lora_B.weight"].double() @ state[f"{name}.lora_A.weight"].double()
        torch.testing.assert_close(product, O.delta_weight(layer, gpt2.peft_config["default"]), atol=1e-6, rtol=0)
    bert = trained("bert", modules_to_save=["classifier"])
    config, state = nora.lora_state_dict(bert)
    assert config.modules_to_save == ["classifier"]
    head = bert.base_model.model.classifier.modules_to_save["default"]
    assert torch.equal(state["base_model.model.classifier.weight"], head.weight)
    assert not torch.equal(head.weight, bert.base_model.model.classifier.original_module.weight)  # it was trained
    batch = M.inputs("bert")
    expected = forward("bert", bert, batch)
    nora.export_lora(bert, tmp_path)
    lora = PeftModel.from_pretrained(M.fresh("bert"), tmp_path)
    torch.testing.assert_close(forward("bert", lora, batch), expected, atol=1e-5, rtol=0)


def test_export_file_metadata_and_overwrite(tmp_path):
    model = trained("llama")
    nora.export_lora(model, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    with safe_open(weights, framework="pt") as fh:
        assert fh.metadata()["exported_by"] == "nora"
    first = load_file(weights)
    # train further and export again into the same directory: the files are replaced, no temp dirs remain
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    optimizer.zero_grad()
    M.output("llama", model, M.inputs("llama")).pow(2).mean().backward()
    optimizer.step()
    nora.export_lora(model, tmp_path)
    second = load_file(weights)
    assert first.keys() == second.keys() and any(not torch.equal(first[k], second[k]) for k in first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not [p for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}.")]


def test_export_a_named_adapter(tmp_path):
    model = trained("llama")
    model.add_adapter("other", nora.NoraConfig(r=8, r_inner=2, structure="parallel", init_weights=False))
    nora.export_lora(model, tmp_path, adapter_name="other")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 2
    model.set_adapter("other")
    batch = M.inputs("llama")
    expected = forward("llama", model, batch)
    lora = PeftModel.from_pretrained(M.fresh("llama"), tmp_path)
    torch.testing.assert_close(forward("llama", lora, batch), expected, atol=1e-5, rtol=0)


def test_export_half_precision_factors_in_base_dtype(tmp_path):
    base = M.build("llama", dtype=torch.bfloat16)
    model = get_peft_model(base, nora.NoraConfig(r=8, r_inner=4, init_weights=False))
    nora.export_lora(model, tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in state.values())


def test_export_merged(tmp_path):
    from transformers import LlamaForCausalLM

    model = trained("llama", alpha=2.0)
    batch = M.inputs("llama")
    expected = forward("llama", model, batch)
    config = model.peft_config["default"]
    want = {name.removeprefix("base_model.model.") + ".weight": O.base_weight(layer) + O.delta_weight(layer, config)
            for name, layer in nora_layers(model)}  # fmt: skip
    merged = nora.export_merged(model, tmp_path)
    merged_state = merged.state_dict()
    for key, weight in want.items():  # merged W == W + the oracle's dW
        torch.testing.assert_close(merged_state[key].double(), weight, atol=1e-6, rtol=0, msg=key)
    assert type(merged) is LlamaForCausalLM
    assert not any("nora" in k for k in merged.state_dict())
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    torch.testing.assert_close(forward("llama", merged, batch), expected, atol=1e-5, rtol=0)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(forward("llama", reloaded.eval(), batch), expected, atol=1e-5, rtol=0)
