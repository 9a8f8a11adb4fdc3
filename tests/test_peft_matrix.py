"""NoRA rows of PEFT's custom-model test matrix (issue 24, requirement 4).

PEFT's wheel ships no tests; this is the NoRA equivalent of huggingface/peft `tests/test_custom_models.py`: the same
two tiny models (`MLP`: lin0 10 -> 20, ReLU, dropout, lin1 20 -> 2, LogSoftmax; `ModelEmbConv1D`: Embedding(100, 5),
transformers Conv1D(nf=1, nx=5), ReLU, flatten, lin0 10 -> 2), the same inputs (`torch.arange(90).view(9, 10)`) and
the same assertions, learning rates and step counts as PEFT's tests of the same name:

  save_pretrained (safetensors and pickle), only params updated, save/load round trip, parameters after loading,
  multiple adapters (load, bias rule), requires_grad after loading, disable adapters (plain and with merging),
  merge/unmerge (incl. idempotence), delete adapter.

The Embedding + Conv1D rows target only the Linear/Conv1D parts (NoRA does not adapt embeddings). Conv1D(1, 5) has
one output feature, so r = r_inner = 1 there (the r=1 case of issue 24). Tests that need a non-identity adapter use
**NON_IDENTITY, as PEFT's `set_init_weights_false` does.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

import nora


class MLP(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        X = X.float()
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(X)))))


class ModelEmbConv1D(nn.Module):
    def __init__(self, emb_size=100):
        super().__init__()
        self.emb = nn.Embedding(emb_size, 5)
        self.conv1d = Conv1D(1, 5)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        return self.sm(self.lin0(self.flat(self.relu(self.conv1d(self.emb(X))))))


MODELS = {"MLP": MLP, "EmbConv1D": ModelEmbConv1D}
#: PEFT's set_init_weights_false: both inner factors random. std 0.5 (not the 0.02 default) so the adapter's effect
#: and its gradients are well above the tests' tolerances even where B = U Sigma is small (Conv1D's std-0.02 init).
NON_IDENTITY = {"init_weights": False, "inner_init_std": 0.5}

TEST_CASES = [
    ("Vanilla MLP 1 NoRA", "MLP", {"target_modules": "lin0", "r": 4, "r_inner": 2}),
    ("Vanilla MLP 2 NoRA", "MLP", {"target_modules": ["lin0"], "r": 4, "r_inner": 2}),
    ("Vanilla MLP 3 NoRA", "MLP", {"target_modules": ["lin1"], "r": 2, "r_inner": 1}),
    ("Vanilla MLP 4 NoRA", "MLP", {"target_modules": ["lin0", "lin1"], "r": 2, "r_inner": 2}),
    ("Vanilla MLP 5 NoRA", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "r": 4, "r_inner": 2}),
    ("Vanilla MLP 6 NoRA", "MLP", {"target_modules": ["lin0"], "alpha": 4, "nora_dropout": 0.1, "r": 4, "r_inner": 2}),
    ("Vanilla MLP 7 NoRA adapter", "MLP", {"target_modules": ["lin0", "lin1"], "structure": "adapter", "r": 2}),
    ("Vanilla MLP 8 NoRA output", "MLP", {"target_modules": ["lin0"], "structure": "output", "r": 4, "r_inner": 2}),
    (
        "Vanilla MLP 9 NoRA parallel",
        "MLP",
        {"target_modules": ["lin0"], "structure": "parallel", "r": 4, "r_inner": 2},
    ),
    ("Embedding + transformers Conv1D 1 NoRA", "EmbConv1D", {"target_modules": ["conv1d"], "r": 1, "r_inner": 1}),
    (
        "Embedding + transformers Conv1D 2 NoRA",
        "EmbConv1D",
        {"target_modules": ["conv1d", "lin0"], "r": 1, "r_inner": 1},
    ),
]
CASES = pytest.mark.parametrize("test_name, model_id, config_kwargs", TEST_CASES, ids=[c[0] for c in TEST_CASES])


def _inputs() -> dict[str, torch.Tensor]:
    return {"X": torch.arange(90).view(9, 10)}


def _model(model_id: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[model_id]()


def _config(config_kwargs, **extra) -> nora.NoraConfig:
    return nora.NoraConfig(**{**config_kwargs, **extra})


def _peft(model_id, config_kwargs, **extra):
    return get_peft_model(_model(model_id), _config(config_kwargs, **extra))


def _nll_steps(model, X, lr, steps=3, optimizer_cls=torch.optim.SGD):
    optimizer = optimizer_cls(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        y_pred = model(**X)
        loss = nn.functional.nll_loss(y_pred, torch.arange(len(y_pred)) % 2)
        loss.backward()
        optimizer.step()


@CASES
@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "pickle"])
def test_save_pretrained(test_name, model_id, config_kwargs, safe_serialization, tmp_path):
    model = _peft(model_id, config_kwargs, **NON_IDENTITY)
    model.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    weights = "adapter_model.safetensors" if safe_serialization else "adapter_model.bin"
    assert sorted(os.listdir(tmp_path)) == sorted(["README.md", "adapter_config.json", weights])
    loaded = PeftModel.from_pretrained(_model(model_id, seed=1), tmp_path)  # other init: every tensor must load
    state, state_loaded = model.state_dict(), loaded.state_dict()
    nora_keys = [k for k in state if "nora_" in k or "modules_to_save" in k]
    assert nora_keys and state.keys() == state_loaded.keys()
    for key in nora_keys:
        assert torch.equal(state[key], state_loaded[key]), key
    model.eval(), loaded.eval()
    with torch.no_grad():
        X = _inputs()
        # the base weights of the other init are not touched by the adapter, so compare the adapter's own term
        for (_, layer), (_, other) in zip(_layers(model), _layers(loaded)):
            torch.testing.assert_close(
                layer.get_delta_weight("default"), other.get_delta_weight("default"), rtol=0, atol=0
            )
        assert torch.isfinite(loaded(**X)).all()


def _layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nora.NoraLayer)]


@CASES
def test_only_params_are_updated(test_name, model_id, config_kwargs):
    """With the default init B' = 0, A' gets no gradient at step 1, so after PEFT's 3 SGD steps it has moved only by
    a second-order amount, ~lr^2 |g|^2 Sigma^2, below the 1e-4 tolerance where Sigma is small (Conv1D(1, 5), r = 1:
    2.7e-5). PEFT handles its zero-init methods (AdaMSS, UniLoRA) the same way: init_weights=False for this test."""
    X = _inputs()
    model = _peft(model_id, config_kwargs, **NON_IDENTITY)
    model_before = copy.deepcopy(model)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):  # PEFT: "train at least 3 steps for all parameters to be updated"
        optimizer.zero_grad()
        model(**X).sum().backward()
        optimizer.step()
    tol = 1e-4
    params_before, params_after = dict(model_before.named_parameters()), dict(model.named_parameters())
    assert params_before.keys() == params_after.keys()
    for name, before in params_before.items():
        after = params_after[name]
        if model.prefix in name or "modules_to_save" in name:
            assert after.requires_grad and not torch.allclose(before, after, atol=tol, rtol=tol), name
        else:
            assert torch.allclose(before, after, atol=tol, rtol=tol), name
    buffers_before, buffers_after = dict(model_before.named_buffers()), dict(model.named_buffers())
    for name, before in buffers_before.items():  # the frozen outer factors are buffers and never move
        assert torch.equal(before, buffers_after[name]), name


@CASES
def test_save_load_roundtrip(test_name, model_id, config_kwargs, tmp_path):
    X = _inputs()
    model = _model(model_id)
    with torch.inference_mode():
        output_base = model(**X)
    torch.manual_seed(0)
    model = get_peft_model(model, _config(config_kwargs, **NON_IDENTITY)).eval()
    with torch.inference_mode():
        output_before = model(**X)
    atol = rtol = 1e-5
    assert not torch.allclose(output_base, output_before, atol=atol, rtol=rtol)  # sanity check
    model.save_pretrained(tmp_path)
    torch.manual_seed(54321)
    loaded = PeftModel.from_pretrained(_model(model_id), tmp_path).eval()
    with torch.inference_mode():
        assert torch.allclose(output_before, loaded(**X), atol=atol, rtol=rtol)


@CASES
def test_parameters_after_loading_model(test_name, model_id, config_kwargs, tmp_path):
    X = _inputs()
    model = _peft(model_id, config_kwargs)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        model(**X).sum().backward()
        optimizer.step()
    params_before = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_model(model_id), tmp_path)
    params_after = loaded.state_dict()
    assert params_before.keys() == params_after.keys()
    for name, before in params_before.items():
        assert torch.allclose(before, params_after[name], atol=1e-4, rtol=1e-4), name


@CASES
def test_load_multiple_adapters(test_name, model_id, config_kwargs, tmp_path):
    X = _inputs()
    model = _peft(model_id, config_kwargs, **NON_IDENTITY)
    model.add_adapter("other", _config(config_kwargs, **{**NON_IDENTITY, "init_seed": 5, "inner_init_std": 0.3}))
    model.save_pretrained(tmp_path)  # default in tmp_path, "other" in tmp_path/other
    model.eval()
    with torch.no_grad():
        out_default = model(**X)
        model.set_adapter("other")
        out_other = model(**X)
    assert not torch.allclose(out_default, out_other, atol=1e-5, rtol=1e-5)
    loaded = PeftModel.from_pretrained(_model(model_id), tmp_path).eval()
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**X), out_default, rtol=1e-5, atol=1e-5)
        loaded.set_adapter("other")
        torch.testing.assert_close(loaded(**X), out_other, rtol=1e-5, atol=1e-5)


@CASES
def test_multiple_adapters_with_bias_raises(test_name, model_id, config_kwargs):
    """PEFT's rule: only one adapter per model may train biases."""
    model = _peft(model_id, config_kwargs, bias="all")
    model.add_adapter("plain", _config(config_kwargs))  # bias="none" beside it is fine
    with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
        model.add_adapter("other", _config(config_kwargs, bias="nora_only"))


@CASES
def test_disable_adapter_with_bias_warns(test_name, model_id, config_kwargs):
    for bias in ("all", "nora_only"):
        model = _peft(model_id, config_kwargs, bias=bias)
        warns = pytest.warns(UserWarning, match="Careful, disabling adapter layers with bias configured to be")
        with warns, model.disable_adapter():
            pass


@CASES
def test_requires_grad_after_loading(test_name, model_id, config_kwargs, tmp_path):
    model = _peft(model_id, config_kwargs, **NON_IDENTITY)
    model.add_adapter("other", _config(config_kwargs, **NON_IDENTITY))
    model.save_pretrained(tmp_path)

    def trainable(m):
        return {n for n, p in m.named_parameters() if p.requires_grad}

    frozen = PeftModel.from_pretrained(_model(model_id), tmp_path)  # inference by default: nothing trains
    frozen.load_adapter(tmp_path / "other", adapter_name="other")
    assert trainable(frozen) == set()
    # as for LoRA: is_trainable=True makes the loaded adapter trainable; set_adapter leaves only the active one
    loaded = PeftModel.from_pretrained(_model(model_id), tmp_path, is_trainable=True)
    names = trainable(loaded)
    assert names and all(".default" in n for n in names), names
    assert all(("nora_inner_" in n) or ("modules_to_save" in n) for n in names), names
    loaded.load_adapter(tmp_path / "other", adapter_name="other", is_trainable=True)
    assert {n for n in trainable(loaded) if ".other" in n}
    loaded.set_adapter("other")
    names = trainable(loaded)
    assert names and all(".other" in n for n in names), names
    assert not any("nora_B" in n or "nora_A." in n for n, _ in loaded.named_parameters())  # outer: buffers


@CASES
def test_disable_adapters(test_name, model_id, config_kwargs):
    X = _inputs()
    model = _model(model_id).eval()
    outputs_base = model(**X)
    model = get_peft_model(model, _config(config_kwargs)).eval()
    outputs_before = model(**X)
    assert torch.allclose(outputs_base, outputs_before)  # identity at init (inner_init="zeros")
    model.train()
    _nll_steps(model, X, lr=0.01 if model_id != "EmbConv1D" else 1.0)  # PEFT: "EmbConv1D is slow to learn"
    model.eval()
    outputs_after = model(**X)
    with model.disable_adapter():
        outputs_disabled = model(**X)
    outputs_enabled_after_disable = model(**X)
    assert not torch.allclose(outputs_before, outputs_after, rtol=1e-8, atol=1e-8)
    assert torch.allclose(outputs_before, outputs_disabled)
    assert torch.allclose(outputs_after, outputs_enabled_after_disable)


@CASES
def test_disable_adapters_with_merging(test_name, model_id, config_kwargs):
    X = _inputs()
    model = _peft(model_id, config_kwargs).eval()
    outputs_before = model(**X)
    model.train()
    _nll_steps(model, X, lr=0.01, optimizer_cls=torch.optim.Adam)
    model.eval()
    outputs_unmerged = model(**X)
    model.merge_adapter()
    outputs_after = model(**X)
    with model.disable_adapter():
        outputs_disabled = model(**X)
    outputs_enabled_after_disable = model(**X)
    atol = rtol = 1e-5
    assert not torch.allclose(outputs_before, outputs_after, atol=atol, rtol=rtol)
    assert torch.allclose(outputs_after, outputs_unmerged, atol=atol, rtol=rtol)
    assert torch.allclose(outputs_before, outputs_disabled, atol=atol, rtol=rtol)
    assert torch.allclose(outputs_after, outputs_enabled_after_disable, atol=atol, rtol=rtol)


@CASES
def test_merge_unmerge_layers(test_name, model_id, config_kwargs):
    X = _inputs()
    model = _peft(model_id, config_kwargs, **NON_IDENTITY).eval()
    with torch.no_grad():
        base_weights = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
        with model.disable_adapter():
            output_base = model(**X)
        output_unmerged = model(**X)
        assert not torch.allclose(output_base, output_unmerged, atol=1e-5, rtol=1e-5)
        model.merge_adapter()
        output_merged = model(**X)
        model.merge_adapter()  # merging twice is a no-op
        torch.testing.assert_close(model(**X), output_merged, rtol=0, atol=0)
        torch.testing.assert_close(output_merged, output_unmerged, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        for name, weight in model.named_parameters():
            if name in base_weights:
                torch.testing.assert_close(weight, base_weights[name], rtol=0, atol=1e-6)
        torch.testing.assert_close(model(**X), output_unmerged, rtol=1e-5, atol=1e-5)
        merged = model.merge_and_unload()
        assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
        torch.testing.assert_close(merged(**X), output_unmerged, rtol=1e-5, atol=1e-5)


@CASES
def test_delete_adapter(test_name, model_id, config_kwargs):
    model = _peft(model_id, config_kwargs)
    model.add_adapter("other", _config(config_kwargs))
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"]
    for _, layer in _layers(model):
        for attr in layer.adapter_layer_names + layer.other_param_names:
            assert "other" not in getattr(layer, attr), attr
    assert not any(".other" in k for k in model.state_dict())
    # deleting the active adapter: PEFT moves the model to the remaining one
    model.add_adapter("other", _config(config_kwargs))
    model.delete_adapter("default")
    assert list(model.peft_config) == ["other"] and model.active_adapters == ["other"]
    assert not any(".default" in k for k in model.state_dict())
