"""NoraConfig: defaults, scaling, serialisation round trip, registration with PEFT, default targets, fingerprint."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model, mapping

import _models as M
import nora
from nora.config import FORMAT_VERSION
from nora.fingerprint import mismatch, weight_fingerprint
from nora.model import DEFAULT_TARGET_MODULES, default_target_modules


def test_defaults():
    cfg = nora.NoraConfig()
    assert (cfg.r, cfg.r_inner, cfg.alpha) == (64, 32, None)
    assert (cfg.structure, cfg.outer_init, cfg.inner_init, cfg.svd_method) == ("nested", "svd", "zeros", "auto")
    assert (cfg.svd_niter, cfg.svd_oversample) == (4, 64)
    assert cfg.scaling == 1.0
    assert cfg.peft_type == nora.PEFT_TYPE == "NORA"
    assert cfg.bias == "none" and cfg.nora_dropout == 0.0 and cfg.init_weights
    assert cfg.check_base_fingerprint and cfg.base_fingerprint is None
    assert cfg.format_version == FORMAT_VERSION == 2
    assert not cfg._from_checkpoint


@pytest.mark.parametrize(
    ("kwargs", "scaling"),
    [
        ({"r": 16, "r_inner": 8}, 1.0),
        ({"r": 16, "r_inner": 8, "alpha": 16}, 2.0),
        ({"r": 16, "r_inner": 8, "alpha": 4}, 0.5),
        ({"r": 16, "alpha": 32, "structure": "adapter"}, 2.0),  # adapter: s = alpha / r
    ],
)
def test_scaling(kwargs, scaling):
    assert nora.NoraConfig(**kwargs).scaling == scaling


def test_target_and_exclude_lists_become_sets():
    cfg = nora.NoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=["k_proj"])
    assert cfg.target_modules == {"q_proj", "v_proj"} and cfg.exclude_modules == {"k_proj"}
    assert nora.NoraConfig(target_modules="all-linear").target_modules == "all-linear"


def test_save_and_load_round_trip(tmp_path):
    cfg = nora.NoraConfig(
        r=16, r_inner=4, alpha=8, structure="parallel", outer_init="awsvd", inner_init="uniform",
        svd_method="randomized", target_modules=["q_proj"], awsvd_alpha=0.25, init_seed=7,
    )  # fmt: skip
    cfg.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "NORA" and raw["format_version"] == FORMAT_VERSION
    assert "_from_checkpoint" not in raw
    (tmp_path / "adapter_model.safetensors").write_bytes(_empty_safetensors())
    loaded = nora.NoraConfig.from_pretrained(tmp_path)
    assert loaded._from_checkpoint
    for field in ("r", "r_inner", "alpha", "structure", "outer_init", "inner_init", "svd_method", "awsvd_alpha"):
        assert getattr(loaded, field) == getattr(cfg, field), field
    assert loaded.target_modules == {"q_proj"} and loaded.init_seed == 7
    # PEFT's generic entry point resolves the registered NoraConfig
    generic = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(generic, nora.NoraConfig)


def _empty_safetensors() -> bytes:
    from safetensors.torch import save

    return save({"x": torch.zeros(1)})


def test_registration_is_idempotent():
    nora.register()
    nora.register()
    assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING["NORA"] is nora.NoraConfig
    assert mapping.PEFT_TYPE_TO_TUNER_MAPPING["NORA"] is nora.NoraModel
    assert mapping.PEFT_TYPE_TO_PREFIX_MAPPING["NORA"] == "nora_"
    model = get_peft_model(M.fresh("llama"), nora.NoraConfig(r=4, r_inner=2))
    assert isinstance(model.base_model, nora.NoraModel)


def test_default_target_modules():
    assert default_target_modules("llama") == DEFAULT_TARGET_MODULES["llama"]
    assert "c_attn" in default_target_modules("gpt2")
    assert default_target_modules(None, "UNet2DConditionModel") == nora.DIFFUSERS_UNET_TARGET_MODULES
    assert nora.DIFFUSERS_UNET_TARGET_MODULES == ["to_q", "to_k", "to_v", "to_out.0"]
    for model_type in ("vit", "deit"):  # both transformers-4 and transformers-5 projection names
        assert {"query", "q_proj", "fc1"} <= set(default_target_modules(model_type))
    assert "q_lin" in default_target_modules("distilbert")


def test_fingerprint_recorded_saved_and_dtype_tolerant(tmp_path):
    base = M.fresh("llama")
    pristine = copy.deepcopy(base)
    model = get_peft_model(base, nora.NoraConfig(r=4, r_inner=2, init_weights=False))
    fingerprint = model.peft_config["default"].base_fingerprint
    assert set(fingerprint) == {name.removeprefix("base_model.model.") for name, _ in _nora_layer_names(model)}
    entry = fingerprint["model.layers.0.self_attn.q_proj"]
    assert entry["shape"] == [32, 32] and len(entry["sample"]) == 8
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["base_fingerprint"] == fingerprint
    # the same base model in bf16 passes the check (rtol 1e-2), so an fp32-trained adapter loads onto a bf16 base
    loaded = PeftModel.from_pretrained(pristine.to(torch.bfloat16), tmp_path)
    assert loaded.peft_config["default"].base_fingerprint == fingerprint


def _nora_layer_names(model):
    from nora.model import nora_layers

    return nora_layers(model)


def test_fingerprint_mismatch_function():
    w = torch.randn(16, 8)
    fp = weight_fingerprint(w)
    assert mismatch(fp, weight_fingerprint(w.clone())) is None
    assert mismatch(fp, weight_fingerprint(w.to(torch.float16).float())) is None
    assert "shape" in mismatch(fp, weight_fingerprint(torch.randn(8, 16)))
    assert "norm" in mismatch(fp, weight_fingerprint(w * 1.5))
    shuffled = w.flip(0)
    assert "sampled weight entries" in mismatch(fp, weight_fingerprint(shuffled))
    assert weight_fingerprint(torch.empty(4, 4, device="meta")) is None
