"""bias="none" | "all" | "nora_only" with PEFT's semantics (issue 24, requirement 2).

PEFT's LoRA is the oracle: the same model with LoraConfig(bias="all" / "lora_only") must train the same biases and
save them under the same keys. A NoRA adapter with trained biases then survives save/load, merge_and_unload and
export_lora (a plain LoRA with the matching bias value) with the outputs unchanged.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from torch import nn

import nora

LORA_BIAS = {"none": "none", "all": "all", "nora_only": "lora_only"}
ATOL = 1e-5


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(12, 16)
        self.lin1 = nn.Linear(16, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def _base(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP()


def _nora(bias: str, **kwargs) -> nora.NoraConfig:
    return nora.NoraConfig(r=4, r_inner=2, target_modules=["lin0"], bias=bias, **kwargs)


@pytest.mark.parametrize("bias", ["none", "all", "nora_only"])
def test_trainable_biases_and_saved_keys_match_lora(bias):
    model = get_peft_model(_base(), _nora(bias, modules_to_save=["head"]))
    lora = get_peft_model(
        _base(), LoraConfig(r=2, target_modules=["lin0"], bias=LORA_BIAS[bias], modules_to_save=["head"])
    )
    trainable_biases = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith(".bias")}
    assert trainable_biases == {n for n, p in lora.named_parameters() if p.requires_grad and n.endswith(".bias")}
    head = "base_model.model.head.modules_to_save.default.bias"  # trained with the head, whatever `bias` says
    targeted, other = "base_model.model.lin0.base_layer.bias", "base_model.model.lin1.bias"
    expected = {"none": {head}, "nora_only": {head, targeted}, "all": {head, targeted, other}}[bias]
    assert trainable_biases == expected
    nora_keys = {k for k in get_peft_model_state_dict(model) if ".nora_" not in k}
    lora_keys = {k for k in get_peft_model_state_dict(lora) if ".lora_" not in k}
    assert nora_keys == lora_keys


@pytest.mark.parametrize("bias", ["all", "nora_only"])
def test_trained_biases_survive_save_load_merge_and_export(bias, tmp_path):
    torch.manual_seed(1)
    x, y = torch.randn(16, 12), torch.randn(16, 3)
    base_out = _base()(x).detach()
    model = get_peft_model(_base(), _nora(bias))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    base = _base()
    lin0_bias = model.base_model.model.lin0.base_layer.bias
    assert (lin0_bias - base.lin0.bias).abs().max() > 1e-2  # the targeted layer's bias trained
    lin1_moved = (model.base_model.model.lin1.bias - base.lin1.bias).abs().max()
    assert (lin1_moved > 1e-2) if bias == "all" else (lin1_moved == 0)
    model.eval()
    trained = model(x).detach()
    assert (trained - base_out).abs().max() > 1e-2

    model.save_pretrained(tmp_path / "nora")
    loaded = PeftModel.from_pretrained(_base(), tmp_path / "nora")
    torch.testing.assert_close(loaded(x), trained, rtol=0, atol=ATOL)

    nora.export_lora(model, tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["bias"] == LORA_BIAS[bias]
    lora = PeftModel.from_pretrained(_base(), tmp_path / "lora")
    torch.testing.assert_close(lora(x), trained, rtol=0, atol=ATOL)

    merged = loaded.merge_and_unload()
    assert isinstance(merged, MLP)
    torch.testing.assert_close(merged(x), trained, rtol=0, atol=ATOL)


def test_only_one_adapter_with_bias():
    model = get_peft_model(_base(), _nora("all"))
    model.add_adapter("plain", _nora("none"))  # bias="none" beside it is fine
    with pytest.raises(ValueError, match=r"supports only 1 adapter with bias"):
        model.add_adapter("second", _nora("nora_only"))
