"""Property-based tests (hypothesis) on a single nn.Linear wrapped by get_peft_model(target_modules=["lin"]).

Drawn: (m, n) in [2, 24]^2, r <= min(m, n), r_inner <= r, alpha (None, i.e. s = 1, or in [0.25, 64]), base dtype
fp32 / bf16 / fp16, every structure, every inner init, init_weights True/False, outer init svd / awsvd (random positive
statistics) / random, bias on/off.

dW is checked against tests/_oracle.py (the paper's product of the raw factors in float64), never against nora's own
fold_factors/_factors. Tolerances scale with the dtype's machine epsilon eps and the magnitudes involved (|W|, |dW|,
|x|): a merge and an unmerge each round once to the base dtype, so |W_restored - W| <= 4 eps max(|W|, |W + dW|). A
half-precision draw whose adapter term is not at least 4x its tolerance is rejected (hypothesis.assume): there the
check could not tell a right dW from none. Examples are derandomized (40 per property) so CI is reproducible;
NORA_HYPOTHESIS_EXAMPLES=N explores N random examples instead.
"""

from __future__ import annotations

import copy
import os
import tempfile

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model

import _models as M
import _oracle as O
import nora
from conftest import config_kwargs
from nora.export import lora_state_dict

STRUCTURES = ("nested", "output", "parallel", "adapter")
INNER_INITS = ("zeros", "gaussian", "uniform", "sqrt_sigma")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# CI: 40 derandomized examples per property (reproducible). NORA_HYPOTHESIS_EXAMPLES=500 explores more, randomly.
_EXAMPLES = os.environ.get("NORA_HYPOTHESIS_EXAMPLES")
SETTINGS = settings(
    max_examples=int(_EXAMPLES or 40),
    deadline=None,
    derandomize=_EXAMPLES is None,
    suppress_health_check=[HealthCheck.filter_too_much],
)
#: a half-precision check must see an adapter term at least this many times its tolerance
SIGNAL_OVER_TOLERANCE = 4.0


@st.composite
def setups(draw):
    m, n = draw(st.integers(2, 24)), draw(st.integers(2, 24))
    r = draw(st.integers(1, min(m, n)))
    return {
        "m": m,
        "n": n,
        "r": r,
        "r_inner": draw(st.integers(1, r)),
        "alpha": draw(st.one_of(st.none(), st.floats(0.25, 64.0))),
        "structure": draw(st.sampled_from(STRUCTURES)),
        "inner_init": draw(st.sampled_from(INNER_INITS)),
        "init_weights": draw(st.booleans()),
        "outer_init": draw(st.sampled_from(("svd", "awsvd", "random"))),
        "dtype": draw(st.sampled_from(DTYPES)),
        "bias": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**20)),
    }


def build(s):
    """(base copy, peft model, input) for a drawn setup."""
    torch.manual_seed(s["seed"])
    base = M.OneLinear(s["m"], s["n"], dtype=s["dtype"], bias=s["bias"])
    if s["outer_init"] == "awsvd":
        nora.set_calibration(base, {"lin": torch.rand(s["n"]) * 3 + 0.01})
    pristine = copy.deepcopy(base)
    cfg = nora.NoraConfig(
        **config_kwargs(
            r=s["r"],
            r_inner=s["r_inner"],
            target_modules=["lin"],
            structure=s["structure"],
            inner_init=s["inner_init"],
            init_weights=s["init_weights"],
            outer_init=s["outer_init"],
            inner_init_std=0.1,
            alpha=s["alpha"],
        )
    )
    model = get_peft_model(base, cfg)
    x = torch.randn(3, s["n"]).to(s["dtype"])
    return pristine, model, x


def eps(dtype) -> float:
    return torch.finfo(dtype).eps


def delta32(model) -> torch.Tensor:
    """The oracle's dW (float64 product of the raw factors, the paper's formula) as float32."""
    return O.delta_weight(model.base_model.model.lin, model.peft_config["default"]).float()


def require_signal(signal: float, tolerance: float, dtype) -> None:
    """In half precision, reject a draw whose adapter term is too small for the check to see it."""
    if dtype != torch.float32:
        assume(signal > SIGNAL_OVER_TOLERANCE * tolerance)


@SETTINGS
@given(setups())
def test_merge_unmerge_round_trip(s):
    _, model, x = build(s)
    layer = model.base_model.model.lin
    W = layer.get_base_layer().weight.detach().clone()
    dW = delta32(model)
    with torch.no_grad():
        out = model(x)
        model.merge_adapter()
        merged_W = layer.get_base_layer().weight.detach().clone()
        merged = model(x)
        model.unmerge_adapter()
        restored = layer.get_base_layer().weight.detach().clone()
    e = eps(s["dtype"])
    w_scale = max(W.float().abs().max().item(), (W.float() + dW).abs().max().item())
    require_signal(dW.abs().max().item(), 2 * e * w_scale, s["dtype"])
    torch.testing.assert_close(merged_W.float(), W.float() + dW, atol=2 * e * w_scale + 1e-30, rtol=0)
    torch.testing.assert_close(restored.float(), W.float(), atol=4 * e * w_scale + 1e-30, rtol=0)
    if s["dtype"] == torch.float32:
        torch.testing.assert_close(restored, W, atol=1e-6, rtol=0)
    # merged and unmerged outputs agree within the rounding of one matmul in the base dtype
    x32 = x.float()
    magnitude = (x32.abs() @ (W.float().abs() + dW.abs()).T).max().item()
    if layer.get_base_layer().bias is not None:
        magnitude += layer.get_base_layer().bias.float().abs().max().item()
    require_signal((x32 @ dW.T).abs().max().item(), 8 * e * magnitude + 1e-5, s["dtype"])
    torch.testing.assert_close(merged.float(), out.float(), atol=8 * e * magnitude + 1e-6, rtol=0)
    # and the unmerged output is W x + b + dW x
    expected = x32 @ (W.float() + dW).T
    if layer.get_base_layer().bias is not None:
        expected = expected + layer.get_base_layer().bias.float()
    torch.testing.assert_close(out.float(), expected, atol=8 * e * magnitude + 1e-5, rtol=0)


@SETTINGS
@given(setups())
def test_export_lora_factors_reproduce_delta_weight(s):
    _, model, _ = build(s)
    layer = model.base_model.model.lin
    lora_config, state = lora_state_dict(model)
    k = s["r"] if s["structure"] == "adapter" else s["r_inner"]
    assert lora_config.r == lora_config.lora_alpha == k
    lora_A = state["base_model.model.lin.lora_A.weight"]
    lora_B = state["base_model.model.lin.lora_B.weight"]
    assert lora_A.shape == (k, s["n"]) and lora_B.shape == (s["m"], k)
    assert lora_A.dtype == lora_B.dtype == s["dtype"]
    bound = O.abs_bound(layer, model.peft_config["default"]).max().item()
    tolerance = 4 * eps(s["dtype"]) * bound + 1e-7
    expected = delta32(model)
    require_signal(expected.abs().max().item(), tolerance, s["dtype"])
    product = lora_B.float() @ lora_A.float()
    torch.testing.assert_close(product, expected, atol=tolerance, rtol=0)
    delta = layer.get_delta_weight("default")
    assert delta.dtype == s["dtype"]
    torch.testing.assert_close(delta.float(), expected, atol=tolerance, rtol=0)


@SETTINGS
@given(setups())
def test_save_load_is_bit_identical(s):
    pristine, model, x = build(s)
    with torch.no_grad():
        out = model(x)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        loaded = PeftModel.from_pretrained(pristine, tmp)
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
    saved, restored = model.state_dict(), loaded.state_dict()
    for key, value in saved.items():
        if "nora" in key:
            assert torch.equal(restored[key], value), key


@SETTINGS
@given(setups())
def test_outputs_are_finite_and_identity_when_documented(s):
    pristine, model, x = build(s)
    with torch.no_grad():
        out, ref = model(x), pristine(x)
    assert out.dtype == s["dtype"] and out.shape == (3, s["m"])
    assert torch.isfinite(out).all()
    if s["inner_init"] == "zeros" and s["init_weights"]:
        assert torch.equal(out, ref)


@SETTINGS
@given(setups())
def test_trainable_count_formula(s):
    _, model, _ = build(s)
    m, r, ri = s["m"], s["r"], s["r_inner"]
    expected = {"nested": 2 * r * ri, "output": 2 * m * ri, "parallel": m * ri + ri * r, "adapter": r * r}
    assert model.get_nb_trainable_parameters()[0] == expected[s["structure"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trainable)
    layer = model.base_model.model.lin
    assert layer.nora_B["default"].dtype == layer.nora_A["default"].dtype == s["dtype"]
