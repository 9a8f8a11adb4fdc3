"""Per-module ranks (nora.patterns): rank_pattern / r_inner_pattern build, save, reload, export and refuse bad keys."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import nora
from nora.cli import parse_args
from nora.export import export_lora
from nora.harness.train import _int_mapping
from nora.model import count_trainable, nora_layers

HIDDEN, FFN = 32, 64


def _base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _config(**kw) -> nora.NoraConfig:
    defaults = dict(r=24, r_inner=4, structure="parallel", init_weights=False,
                    rank_pattern={"k_proj": 16, "v_proj": 16}, r_inner_pattern={r"layers\.1\.mlp\.down_proj": 2})  # fmt: skip
    return nora.NoraConfig(**{**defaults, **kw})


IDS = torch.arange(3, 19).view(2, 8)


def test_each_module_gets_the_ranks_its_pattern_names():
    model = get_peft_model(_base(), _config())
    shapes = {n.rsplit("model.", 1)[-1]: (lay.r["default"], lay.r_inner["default"]) for n, lay in nora_layers(model)}
    assert shapes["layers.0.self_attn.k_proj"] == shapes["layers.1.self_attn.v_proj"] == (16, 4)
    assert shapes["layers.1.mlp.down_proj"] == (24, 2)
    assert shapes["layers.0.mlp.down_proj"] == shapes["layers.0.self_attn.q_proj"] == (24, 4)
    layer = dict(nora_layers(model))["base_model.model.model.layers.0.self_attn.k_proj"]
    assert tuple(layer.nora_A["default"].shape) == (16, HIDDEN)  # k_proj is 16 x 32: r = 24 would not even fit
    assert tuple(layer.nora_inner_A["default"].shape) == (4, 16)
    # parallel: m r' + r' r per matrix, each with its own (r, r')
    expected = 0
    for _, lay in nora_layers(model):
        r, k = lay.r["default"], lay.r_inner["default"]
        expected += lay.out_features * k + k * r
    assert count_trainable(model) == expected


@pytest.mark.parametrize("compact", [False, True], ids=["full-file", "compact-file"])
def test_a_pattern_adapter_reloads_to_the_same_output(tmp_path, compact):
    model = get_peft_model(_base(), _config(save_outer_factors=not compact)).eval()
    with torch.no_grad():
        want = model(IDS).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == {"k_proj": 16, "v_proj": 16}
    assert saved["r_inner_pattern"] == {r"layers\.1\.mlp\.down_proj": 2}
    loaded = PeftModel.from_pretrained(_base(), tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(IDS).logits, want, atol=1e-5)


def test_export_to_lora_carries_per_module_ranks(tmp_path):
    """Mixed inner ranks export as one PEFT LoRA with rank_pattern / alpha_pattern (scaling 1 on every module)."""
    model = get_peft_model(_base(), _config()).eval()
    with torch.no_grad():
        want = model(IDS).logits
    export_lora(model, tmp_path)
    lora = json.loads((tmp_path / "adapter_config.json").read_text())
    assert lora["r"] == 4 and lora["rank_pattern"] == {r"model\.layers\.1\.mlp\.down_proj": 2}
    assert lora["alpha_pattern"] == lora["rank_pattern"]
    loaded = PeftModel.from_pretrained(_base(), tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(IDS).logits, want, atol=1e-5)


def test_a_pattern_key_that_matches_no_targeted_module_is_refused():
    with pytest.raises(ValueError, match="rank_pattern key 'kproj' matches none of the 14 targeted modules"):
        get_peft_model(_base(), _config(r=16, rank_pattern={"kproj": 16}))


def test_r_above_a_small_layer_names_rank_pattern_as_a_fix():
    with pytest.raises(
        ValueError, match=r"r=24 exceeds min\(out, in\)=min\(16, 32\)=16; .*rank_pattern=\{'k_proj': 16\}"
    ):
        get_peft_model(_base(), _config(rank_pattern={"v_proj": 16}))


def test_a_per_module_r_inner_above_its_r_is_refused():
    with pytest.raises(ValueError, match=r"k_proj' gets r_inner=4 > r=2 from rank_pattern"):
        get_peft_model(_base(), _config(rank_pattern={"k_proj": 2}, r_inner_pattern={}))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank_pattern": [("k_proj", 8)]}, "rank_pattern must be a dict of module-name pattern -> rank"),
        ({"rank_pattern": {"": 8}}, "rank_pattern keys must be non-empty module-name patterns"),
        ({"r_inner_pattern": {"k_(proj": 2}}, r"r_inner_pattern key 'k_\(proj' is not a valid regex"),
        ({"rank_pattern": {"k_proj": 0}}, r"rank_pattern\['k_proj'\] must be a positive integer, got 0"),
        ({"rank_pattern": {"k_proj": 8.0}}, r"rank_pattern\['k_proj'\] must be a positive integer, got 8.0"),
        ({"structure": "adapter", "r_inner": None}, "r_inner_pattern has no effect with structure='adapter'"),
    ],
)
def test_malformed_patterns_are_refused_when_the_config_is_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _config(**kwargs)


def test_adapter_structure_takes_its_per_module_core_size_from_rank_pattern():
    model = get_peft_model(_base(), _config(structure="adapter", r=8, r_inner=None, r_inner_pattern=None,
                                            rank_pattern={"k_proj": 4}, alpha=8))  # fmt: skip
    layers = dict(nora_layers(model))
    k = layers["base_model.model.model.layers.0.self_attn.k_proj"]
    q = layers["base_model.model.model.layers.0.self_attn.q_proj"]
    assert tuple(k.nora_inner_B["default"].shape) == (4, 4) and tuple(q.nora_inner_B["default"].shape) == (8, 8)
    assert k.scaling["default"] == 2.0 and q.scaling["default"] == 1.0  # s = alpha / r per module, as LoRA's


def test_cli_flag_parses_pattern_rank_pairs():
    assert _int_mapping("k_proj=192, v_proj=192") == {"k_proj": 192, "v_proj": 192}
    assert _int_mapping(r"layers\.[0-3]\..*=8") == {r"layers\.[0-3]\..*": 8}
    with pytest.raises(argparse.ArgumentTypeError, match="expected PATTERN=RANK"):
        _int_mapping("k_proj:192")
    args = parse_args(["train", "--model", "m", "--data", "d", "--out", "o", "--rank-pattern", "k_proj=8"])
    assert args.rank_pattern == {"k_proj": 8} and args.r_inner_pattern is None
