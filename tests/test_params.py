"""Trainable-parameter counts: LLaMA-3-8B on the meta device (no weights, no SVD) and the per-structure formula.

Per adapted matrix W (m x n) with outer rank r and inner rank r':
    nested   2 r r'
    output   2 m r'
    parallel m r' + r' r
    adapter  r^2
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import _models as M
import nora
from conftest import config_kwargs
from nora.model import count_trainable, nora_layers

LLAMA3_8B_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def expected_trainable(structure: str, m: int, r: int, r_inner: int) -> int:
    return {
        "nested": 2 * r * r_inner,
        "output": 2 * m * r_inner,
        "parallel": m * r_inner + r_inner * r,
        "adapter": r * r,
    }[structure]


@pytest.fixture(scope="module")
def llama3_8b_meta():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
    )
    with torch.device("meta"):
        return LlamaForCausalLM(cfg)


def test_llama3_8b_on_meta_has_917504_trainable_parameters(llama3_8b_meta, monkeypatch):
    def no_svd(*args, **kwargs):
        raise AssertionError("get_peft_model ran an SVD on a meta-device model")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    monkeypatch.setattr(torch, "svd_lowrank", no_svd)
    cfg = nora.NoraConfig(r=64, r_inner=32, target_modules=LLAMA3_8B_TARGETS)
    model = get_peft_model(llama3_8b_meta, cfg)
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 917_504 == 32 * 7 * 2 * 64 * 32
    assert count_trainable(model) == 917_504
    layers = list(nora_layers(model))
    assert len(layers) == 32 * 7
    for _, layer in layers:
        assert layer.nora_B["default"].device.type == "meta"
        assert layer.nora_A["default"].device.type == "meta"
    assert model.peft_config["default"].base_fingerprint is None  # nothing to fingerprint without weights


@pytest.mark.parametrize("structure", ["nested", "output", "parallel", "adapter"])
def test_trainable_formula_per_structure(structure):
    """Llama with 2 layers: the count is the sum of the formula over every adapted matrix (various m, n)."""
    r, r_inner = 8, 4
    model = get_peft_model(
        M.build("llama", num_hidden_layers=2),
        nora.NoraConfig(**config_kwargs(r=r, r_inner=r_inner, structure=structure)),
    )
    layers = list(nora_layers(model))
    assert len(layers) == 2 * 7
    expected = sum(expected_trainable(structure, layer.out_features, r, r_inner) for _, layer in layers)
    assert count_trainable(model) == expected
    assert model.get_nb_trainable_parameters()[0] == expected
    for _, layer in layers:  # the frozen outer factors are buffers, never parameters
        assert layer.nora_B["default"].shape == (layer.out_features, r)
        assert layer.nora_A["default"].shape == (r, layer.in_features)
        assert not any(p is layer.nora_B["default"] for p in layer.parameters())


def test_trainable_count_with_modules_to_save():
    r, r_inner = 8, 4
    model = get_peft_model(M.fresh("bert"), nora.NoraConfig(r=r, r_inner=r_inner, modules_to_save=["classifier"]))
    layers = list(nora_layers(model))
    head = model.base_model.model.classifier.modules_to_save["default"]
    head_params = sum(p.numel() for p in head.parameters())
    assert count_trainable(model) == len(layers) * 2 * r * r_inner + head_params


def test_gpt2_default_targets_are_attention_and_both_mlp_projections():
    """target_modules=None on GPT-2: c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj per block (4 Conv1D), each 2 r r'."""
    r, r_inner = 8, 4
    model = get_peft_model(M.build("gpt2"), nora.NoraConfig(r=r, r_inner=r_inner))  # 1 block
    names = sorted(name.split(".h.", 1)[1] for name, _ in nora_layers(model))
    blocks = [f"0.{p}" for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert names == sorted(blocks)
    assert count_trainable(model) == len(blocks) * 2 * r * r_inner


def test_an_added_adapter_stays_frozen_until_it_is_set_active():
    """add_adapter must not add trainable parameters (PEFT's contract), on a layer NoRA already wraps (q_proj) and on a
    module it wraps anew (v_proj): only the active adapter trains."""
    r, r_inner = 8, 4
    model = get_peft_model(M.build("llama"), nora.NoraConfig(r=r, r_inner=r_inner, target_modules=["q_proj"]))
    model.add_adapter("b", nora.NoraConfig(r=r, r_inner=2, structure="parallel", target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".q_proj." in n and n.endswith(".default") for n in trainable), trainable
    assert count_trainable(model) == 2 * r * r_inner
    model.set_adapter("b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".b") for n in trainable), trainable
    layers = dict(nora_layers(model))
    assert sorted(n.rsplit(".", 1)[-1] for n in layers) == ["q_proj", "v_proj"]
    assert count_trainable(model) == sum(expected_trainable("parallel", x.out_features, r, 2) for x in layers.values())
