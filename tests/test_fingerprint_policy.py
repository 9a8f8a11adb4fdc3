"""The fingerprint policy on load (issue 24, requirement 3; nora.fingerprint.apply_fingerprint_policy).

A full file (outer factors stored) defines dW completely, like a LoRA file: onto another base it warns once, naming
the module and what differs, and loads with exactly the saved update. A compact file (save_outer_factors=False:
outer factors rebuilt from the base) refuses another base. Other shapes refuse either way.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model

import _models as M
import nora
from nora.fingerprint import BaseModelMismatchWarning, apply_fingerprint_policy, weight_fingerprint
from nora.model import nora_layers


@pytest.fixture(scope="module")
def full_adapter(tmp_path_factory):
    model = get_peft_model(M.fresh("llama"), nora.NoraConfig(r=8, r_inner=4, init_weights=False, inner_init_std=0.3))
    path = tmp_path_factory.mktemp("full")
    model.save_pretrained(path)
    return path, {name: layer.get_delta_weight("default") for name, layer in nora_layers(model)}


def test_policy_function():
    w = torch.randn(8, 16)
    same, other = weight_fingerprint(w), weight_fingerprint(w * 1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert apply_fingerprint_policy("m", same, weight_fingerprint(w.clone()), full_file=True) is False
        assert apply_fingerprint_policy("m", None, other, full_file=False) is False  # nothing recorded
        assert apply_fingerprint_policy("m", same, None, full_file=False) is False  # meta device
    with pytest.warns(BaseModelMismatchWarning, match=r"module 'm': weight norm .* recorded"):
        assert apply_fingerprint_policy("m", same, other, full_file=True) is True
    with pytest.raises(ValueError, match=r"module 'm': weight norm .*compact adapter \(save_outer_factors=False\)"):
        apply_fingerprint_policy("m", same, other, full_file=False)
    with pytest.raises(ValueError, match=r"module 'm': shape \(16, 8\) != \(8, 16\)"):
        apply_fingerprint_policy("m", same, weight_fingerprint(w.T), full_file=True)


def test_full_file_onto_another_base_warns_once_and_applies_the_saved_update(full_adapter):
    path, deltas = full_adapter
    other = M.build("llama", seed=7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(other, path)
    mismatches = [w for w in caught if issubclass(w.category, BaseModelMismatchWarning)]
    assert len(mismatches) == 1, [str(w.message) for w in mismatches]
    assert "module 'model.layers.0.self_attn.q_proj': weight norm" in str(mismatches[0].message)
    for name, layer in nora_layers(model):  # the saved dW, not one rebuilt from the other base
        torch.testing.assert_close(layer.get_delta_weight("default"), deltas[name], rtol=0, atol=0)


def test_same_base_loads_silently(full_adapter):
    path, _ = full_adapter
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseModelMismatchWarning)
        PeftModel.from_pretrained(M.fresh("llama"), path)


def test_compact_file_refuses_another_base(full_adapter):
    path, _ = full_adapter
    cfg = nora.NoraConfig.from_pretrained(path)
    cfg.save_outer_factors = False  # what a compact file's config says
    with pytest.raises(ValueError, match=r"does not fit this base model: module '.*': weight norm .*compact adapter"):
        PeftModel.from_pretrained(M.build("llama", seed=7), path, config=cfg)
