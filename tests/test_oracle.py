"""The independent dW oracle (tests/_oracle.py): pinned on hand-computed numbers, then compared with the layer's
get_delta_weight, lora_factors and forward for every structure, alpha and layout (nn.Linear, GPT-2 Conv1D)."""

from __future__ import annotations

import types

import pytest
import torch
from peft import get_peft_model

import _models as M
import _oracle as O
import nora
from conftest import config_kwargs
from nora.model import nora_layers

STRUCTURES = ("nested", "output", "parallel", "adapter")


class _Stored:
    """A stand-in layer holding given factors under nora's state-dict names (to pin the oracle by hand)."""

    def __init__(self, **tensors):
        self._tensors = tensors

    def state_dict(self):
        return {f"{name}.default": value for name, value in self._tensors.items()}


def test_oracle_on_hand_computed_numbers():
    # m = n = 2, r = 2, r' = 1: every product small enough to do by hand
    B = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    A = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    Bi = torch.tensor([[1.0], [1.0]])  # r x r' (nested) or m x r' (output, parallel)
    Ai = torch.tensor([[2.0, 0.0]])  # r' x r (nested, parallel) or r' x m (output)
    cfg = types.SimpleNamespace(r=2, r_inner=1, alpha=None, structure="nested")
    layer = _Stored(nora_B=B, nora_A=A, nora_inner_B=Bi, nora_inner_A=Ai)
    # B Bi = [[1], [2]]; Ai A = [[2, 2]]  ->  [[2, 2], [4, 4]]
    assert O.delta_weight(layer, cfg).tolist() == [[2.0, 2.0], [4.0, 4.0]]
    cfg.alpha = 3.0  # s = 3 / r' = 3
    assert O.delta_weight(layer, cfg).tolist() == [[6.0, 6.0], [12.0, 12.0]]
    cfg.alpha, cfg.structure = None, "output"
    # Bi Ai = [[2, 0], [2, 0]]; B A = [[1, 1], [0, 2]]  ->  [[2, 2], [2, 2]]
    assert O.delta_weight(layer, cfg).tolist() == [[2.0, 2.0], [2.0, 2.0]]
    cfg.structure = "parallel"
    # Bi Ai = [[2, 0], [2, 0]]; @ A  ->  [[2, 2], [2, 2]]; alpha 0.5 -> s = 0.5
    cfg.alpha = 0.5
    assert O.delta_weight(layer, cfg).tolist() == [[1.0, 1.0], [1.0, 1.0]]
    R = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    adapter = _Stored(nora_B=B, nora_A=A, nora_inner_B=R)
    cfg = types.SimpleNamespace(r=2, r_inner=1, alpha=4.0, structure="adapter")  # s = alpha / r = 2
    # B R = [[0, 1], [2, 0]]; @ A = [[0, 1], [2, 2]]; x 2
    assert O.delta_weight(adapter, cfg).tolist() == [[0.0, 2.0], [4.0, 4.0]]


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("alpha", [None, 0.5, 12.0])
def test_layer_delta_weight_and_forward_match_the_oracle(structure, alpha):
    torch.manual_seed(0)
    cfg = nora.NoraConfig(**config_kwargs(r=6, r_inner=3, target_modules=["lin"], init_weights=False,
                                          structure=structure, alpha=alpha, inner_init_std=0.3))  # fmt: skip
    model = get_peft_model(M.OneLinear(12, 10), cfg)
    layer = model.base_model.model.lin
    expected = O.delta_weight(layer, model.peft_config["default"])
    assert expected.abs().max() > 1e-2  # a real, non-zero update
    torch.testing.assert_close(layer.get_delta_weight("default").double(), expected, atol=1e-6, rtol=0)
    lora_A, lora_B = layer.lora_factors("default")
    torch.testing.assert_close(lora_B.double() @ lora_A.double(), expected, atol=1e-6, rtol=0)
    x = torch.randn(2, 4, 10)
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out.double(), O.forward(layer, model.peft_config["default"], x), atol=1e-5, rtol=0)


def test_conv1d_delta_weight_matches_the_oracle_in_the_base_layout():
    model = get_peft_model(
        M.fresh("gpt2"), nora.NoraConfig(r=8, r_inner=4, init_weights=False, alpha=2.0, inner_init_std=0.3)
    )
    config = model.peft_config["default"]
    for name, layer in nora_layers(model):
        expected = O.delta_weight_in_layout(layer, config)
        assert expected.shape == layer.get_base_layer().weight.shape, name
        torch.testing.assert_close(layer.get_delta_weight("default").double(), expected, atol=1e-6, rtol=0)
