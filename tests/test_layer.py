"""The NoRA layer: the forward equals W x + b + s dW x for every structure, folding, scaling, dropout, Conv1D layout,
several adapters at once, merge semantics."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import _models as M
import _oracle as O
import nora
from conftest import config_kwargs
from nora.layer import fold_factors

STRUCTURES = ("nested", "output", "parallel", "adapter")


def lin_model(m=12, n=10, seed=0, dtype=torch.float32, **kwargs):
    torch.manual_seed(seed)
    cfg = nora.NoraConfig(
        **config_kwargs(**{"r": 6, "r_inner": 3, "target_modules": ["lin"], "init_weights": False, **kwargs})
    )
    model = get_peft_model(M.OneLinear(m, n, dtype=dtype), cfg)
    return model, model.base_model.model.lin


def explicit_delta(structure, B, A, inner_B, inner_A, s):
    """dW written out as in the NoraConfig docstring."""
    if structure == "nested":
        return s * B @ inner_B @ inner_A @ A
    if structure == "output":
        return s * inner_B @ inner_A @ B @ A
    if structure == "parallel":
        return s * inner_B @ inner_A @ A
    return s * B @ inner_B @ A  # adapter: B R A


@pytest.mark.parametrize("structure", STRUCTURES)
def test_fold_factors_is_the_documented_product(structure):
    g = torch.Generator().manual_seed(0)
    m, n, r, k = 9, 7, 5, 3
    B, A = torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)
    shapes = {
        "nested": ((r, k), (k, r)),
        "output": ((m, k), (k, m)),
        "parallel": ((m, k), (k, r)),
        "adapter": ((r, r), None),
    }
    sb, sa = shapes[structure]
    inner_B = torch.randn(*sb, generator=g)
    inner_A = torch.randn(*sa, generator=g) if sa else None
    left, right = fold_factors(structure, B, A, inner_B, inner_A)
    expected_k = r if structure == "adapter" else k
    assert left.shape == (m, expected_k) and right.shape == (expected_k, n)
    torch.testing.assert_close(left @ right, explicit_delta(structure, B, A, inner_B, inner_A, 1.0))


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("alpha", [None, 12.0])
def test_forward_is_base_plus_scaled_delta(structure, alpha):
    model, layer = lin_model(structure=structure, alpha=alpha)
    width = 6 if structure == "adapter" else 3
    s = 1.0 if alpha is None else alpha / width
    assert layer.scaling["default"] == pytest.approx(s) == model.peft_config["default"].scaling
    base = layer.get_base_layer()
    B, A = layer.nora_B["default"], layer.nora_A["default"]
    inner_B, inner_A = layer.nora_inner_B["default"], layer.nora_inner_A.get("default")
    dW = explicit_delta(structure, B, A, inner_B, inner_A, s)
    torch.testing.assert_close(layer.get_delta_weight("default"), dW.detach(), atol=1e-6, rtol=0)
    x = torch.randn(2, 4, 10)  # extra leading dims
    with torch.no_grad():
        out = model(x)
        expected = x @ (base.weight + dW).T + base.bias
    assert out.shape == (2, 4, 12)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_gradients_reach_only_inner_factors():
    model, layer = lin_model(structure="nested")
    model(torch.randn(5, 10)).pow(2).sum().backward()
    assert layer.nora_inner_B["default"].grad is not None and layer.nora_inner_A["default"].grad is not None
    assert layer.get_base_layer().weight.grad is None and layer.get_base_layer().bias.grad is None
    assert not layer.nora_B["default"].requires_grad and not layer.nora_A["default"].requires_grad
    buffer_names = {name for name, _ in layer.named_buffers()}
    assert {"nora_B.default", "nora_A.default"} <= buffer_names


def test_inner_factors_are_created_frozen_and_only_the_active_adapter_is_unfrozen(monkeypatch):
    """update_layer creates the inner Parameters with requires_grad=False (a tensor that never required grad holds
    no autograd metadata: ~200 B x 420 per SmolLM2 adapter loaded for inference); set_adapter unfreezes the active
    adapter, so training is unchanged."""
    from nora.layer import NoraLayer

    seen = []
    real = NoraLayer.set_adapter

    def spy(self, names, inference_mode=False):
        seen.append({k: p.requires_grad for d in (self.nora_inner_B, self.nora_inner_A) for k, p in d.items()})
        return real(self, names, inference_mode=inference_mode)

    monkeypatch.setattr(NoraLayer, "set_adapter", spy)
    model, layer = lin_model(structure="nested")
    assert seen[0] == {"default": False}  # at creation, before set_adapter
    model.add_adapter("second", nora.NoraConfig(r=6, r_inner=3, target_modules=["lin"]))
    assert seen[-1] == {"default": True, "second": False}
    assert layer.nora_inner_B["default"].requires_grad and layer.nora_inner_A["default"].requires_grad
    assert not layer.nora_inner_B["second"].requires_grad and not layer.nora_inner_A["second"].requires_grad
    model.set_adapter("second")
    assert layer.nora_inner_B["second"].requires_grad and layer.nora_inner_A["second"].requires_grad
    assert not layer.nora_inner_B["default"].requires_grad
    model(torch.randn(5, 10)).pow(2).sum().backward()
    assert layer.nora_inner_B["second"].grad is not None and layer.nora_inner_B["default"].grad is None


def test_layer_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) of a NoRA layer: same output and same inner-factor gradients as eager."""
    _model, layer = lin_model(structure="nested")
    x = torch.randn(3, 4, 10)
    eager = layer(x)
    eager.pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
    layer.zero_grad()
    compiled = torch.compile(layer, fullgraph=True)(x)  # raises on a graph break
    compiled.pow(2).sum().backward()
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=0)
    assert grads.keys() == {"nora_inner_B.default", "nora_inner_A.default"}
    for name, grad in grads.items():
        torch.testing.assert_close(dict(layer.named_parameters())[name].grad, grad, atol=1e-5, rtol=1e-5)


def test_dropout_acts_on_the_adapter_input_only():
    model, layer = lin_model(nora_dropout=0.5)
    assert isinstance(layer.nora_dropout["default"], nn.Dropout)
    _, plain = lin_model(nora_dropout=0.0)
    assert isinstance(plain.nora_dropout["default"], nn.Identity)
    x = torch.randn(64, 10)
    with torch.no_grad():
        model.eval()
        eval_out = model(x)
        model.train()
        torch.manual_seed(0)
        train_a = model(x)
        torch.manual_seed(1)
        train_b = model(x)
    assert not torch.equal(train_a, train_b)
    # the mean over dropout masks is the eval output (inverted dropout), roughly
    torch.manual_seed(2)
    with torch.no_grad():
        model.train()
        mean = torch.stack([model(x) for _ in range(200)]).mean(0)
    torch.testing.assert_close(mean, eval_out, atol=0.05, rtol=0)


def test_dropout_in_train_mode_leaves_the_base_path_exact():
    """With B' = 0 (inner_init='zeros') the adapter term is exactly 0 whatever the mask, so a train-mode output equals
    the base layer's own output bit for bit only if the base path never sees the dropout."""
    torch.manual_seed(0)
    cfg = nora.NoraConfig(r=6, r_inner=3, target_modules=["lin"], nora_dropout=0.5)
    model = get_peft_model(M.OneLinear(12, 10), cfg)
    layer = model.base_model.model.lin
    assert (layer.nora_inner_B["default"] == 0).all()
    x = torch.randn(64, 10)
    model.train()
    assert layer.nora_dropout["default"].training
    with torch.no_grad():
        torch.manual_seed(0)
        out = model(x)
        base = layer.get_base_layer()(x)  # the wrapped nn.Linear itself, not disable_adapter()
    assert torch.equal(out, base)


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_dropout_mask_is_inverted_dropout_on_the_adapter_input(p):
    """A fixed mask (the same seed) gives W x + b + dW (mask * x / (1 - p)): the adapter sees the scaled, dropped-out
    input, the base path sees x. The expected values are computed by the oracle, not by the layer."""
    model, layer = lin_model(nora_dropout=p, inner_init_std=0.3)
    x = torch.randn(64, 10)
    torch.manual_seed(7)
    scaled_mask = nn.functional.dropout(torch.ones_like(x), p, training=True)  # same RNG draw as nn.Dropout(x)
    values = sorted(scaled_mask.unique().tolist())
    assert values == [0.0, pytest.approx(1 / (1 - p))], values  # inverted dropout: kept entries are x / (1 - p)
    assert abs((scaled_mask == 0).float().mean().item() - p) < 0.08  # 640 draws: ~p of the entries dropped
    model.train()
    with torch.no_grad():
        torch.manual_seed(7)
        out = model(x)
    config = model.peft_config["default"]
    expected = O.forward(layer, config, x, adapter_input=x * scaled_mask)
    undropped = O.forward(layer, config, x)
    signal = (expected - undropped).abs().max().item()
    assert signal > 1e-2  # the mask changes the output far above the float32 tolerance below
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)


def test_conv1d_layout():
    model = get_peft_model(M.fresh("gpt2"), nora.NoraConfig(r=8, r_inner=4, init_weights=False))
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    base = layer.get_base_layer()
    assert isinstance(base, Conv1D) and layer.fan_in_fan_out
    assert model.peft_config["default"].fan_in_fan_out
    n, m = base.weight.shape  # Conv1D stores (in, out)
    assert (layer.in_features, layer.out_features) == (n, m)
    assert layer.nora_B["default"].shape == (m, 8) and layer.nora_A["default"].shape == (8, n)
    delta = layer.get_delta_weight("default")
    assert delta.shape == base.weight.shape
    lora_A, lora_B = layer.lora_factors("default")
    torch.testing.assert_close(delta, (lora_B @ lora_A).T, atol=1e-7, rtol=0)
    x = torch.randn(2, 3, n)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x) + x @ delta, atol=1e-6, rtol=0)
        # the outer factors reproduce the (out, in) weight, not its transpose
        full = get_peft_model(M.fresh("gpt2"), nora.NoraConfig(r=32, r_inner=4, target_modules=["c_proj"]))
        c_proj = full.base_model.model.transformer.h[0].attn.c_proj
        BA = c_proj.nora_B["default"] @ c_proj.nora_A["default"]
        torch.testing.assert_close(BA, c_proj.get_base_layer().weight.T, atol=1e-5, rtol=0)


def test_two_active_adapters_add_up_and_merge():
    model, layer = lin_model(structure="nested")
    model.add_adapter(
        "b", nora.NoraConfig(r=4, r_inner=2, target_modules=["lin"], structure="output", init_weights=False)
    )
    x = torch.randn(3, 10)
    base = layer.get_base_layer()
    dW = layer.get_delta_weight("default") + layer.get_delta_weight("b")
    model.base_model.set_adapter(["default", "b"])
    assert layer.active_adapters == ["default", "b"]
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out, base(x) + x @ dW.T, atol=1e-6, rtol=0)
        model.merge_adapter()
        assert layer.merged_adapters == ["default", "b"]
        torch.testing.assert_close(model(x), out, atol=1e-6, rtol=0)
        model.unmerge_adapter()
        assert not layer.merged


def test_unmerge_when_not_merged_warns():
    _, layer = lin_model()
    with pytest.warns(UserWarning, match="Already unmerged"):
        layer.unmerge()


def test_disable_adapter_on_a_merged_model_unmerges():
    model, layer = lin_model()
    x = torch.randn(3, 10)
    with torch.no_grad(), model.disable_adapter():
        ref = model(x)
    model.merge_adapter()
    with torch.no_grad(), model.disable_adapter():
        out = model(x)
    assert not layer.merged
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_merge_is_a_noop_for_merged_adapters():
    model, layer = lin_model()
    model.merge_adapter()
    weight = layer.get_base_layer().weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.merge()
        layer.merge(adapter_names=["default"])
    assert torch.equal(layer.get_base_layer().weight, weight)
    assert layer.merged_adapters == ["default"]


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_computes_the_adapter_in_float32(dtype, structure):
    """out - base_out is the float32 adapter term, within the rounding of the half-precision output only.

    Two checks, each with a tolerance well below the signal: (1) on the layer as built, out - base_out against the
    oracle's term, with tolerance eps (|term| + |out|) elementwise (one rounding of the term, one of the sum), asserted
    to be below a tenth of the term; (2) with the base weight and bias zeroed, out must be the oracle's term rounded
    once to the half dtype (relative eps / 2 per element): an adapter computed in bf16/fp16 rounds every factor and
    product and misses this by far, a dropped adapter gives 0."""
    model, layer = lin_model(dtype=dtype, structure=structure, alpha=9.0, inner_init_std=0.5)
    config = model.peft_config["default"]
    base = layer.get_base_layer()
    x = torch.randn(4, 10).to(dtype)
    e = torch.finfo(dtype).eps
    with torch.no_grad():
        out = model(x)
        base_out = base(x)
        assert layer.adapter_delta("default", x).dtype == torch.float32
    assert out.dtype == dtype
    term = O.adapter_term(layer, config, x)  # float64, from the raw factors
    got = out.double() - base_out.double()
    tolerance = e * (term.abs() + out.double().abs()) + 1e-6
    assert term.abs().max() > 10 * tolerance.max(), "the adapter term must dominate the tolerance"
    assert ((got - term).abs() <= tolerance).all(), (got - term).abs().max()

    with torch.no_grad():
        base.weight.zero_()
        base.bias.zero_()
        out = model(x)
    rounded_err = (out.double() - term).abs()
    assert (rounded_err <= 0.5 * e * term.abs() + 1e-6 * term.abs().max()).all(), (rounded_err / term.abs()).max()


def test_repr_and_lora_conversion_flag():
    _, layer = lin_model()
    assert repr(layer).startswith("nora.")
    assert layer.supports_lora_conversion()


@pytest.mark.parametrize(
    ("inner_init", "std", "expected"),
    [("zeros", None, 0.1), ("gaussian", None, 0.02), ("uniform", None, 0.02), ("zeros", 0.05, 0.05),
     ("gaussian", 0.3, 0.3)],
)  # fmt: skip
def test_inner_init_std_defaults_per_init(inner_init, std, expected):
    """inner_init_std=None draws A' of 'zeros' with std 0.1 and both factors of gaussian/uniform with 0.02; an
    explicit value wins. (A 128 x 128 layer with r = r' = 64 gives 4,096 draws per factor: std within 5%.)"""
    model = nn.Sequential(nn.Linear(128, 128))
    cfg = nora.NoraConfig(target_modules=["0"], r=64, r_inner=64, inner_init=inner_init, inner_init_std=std)
    layer = get_peft_model(model, cfg).base_model.model[0]
    inner_A = layer.nora_inner_A["default"]
    assert inner_A.std().item() == pytest.approx(expected, rel=0.05)
    inner_B = layer.nora_inner_B["default"]
    assert (inner_B == 0).all() if inner_init == "zeros" else inner_B.std().item() == pytest.approx(expected, rel=0.05)
