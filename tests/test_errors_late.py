"""Refusals added with the gradient inits, compact files and quantized harness that no other test triggers."""

from __future__ import annotations

import pytest
import torch

import nora
from nora.gradient_init import accumulate_gradients, first_update_target
from nora.harness import HarnessError
from nora.harness.quantize import check_scheme
from test_gradient_init import batches, build


def test_outer_grad_with_another_inner_init_is_refused():
    with pytest.raises(ValueError, match=r"outer_init='grad' combines with inner_init 'zeros', 'grad' or 'grad_step'"):
        nora.NoraConfig(outer_init="grad", outer_scaling="orthonormal", grad_estimator="sign", inner_init="gaussian")


def test_grad_scale_must_be_positive():
    with pytest.raises(ValueError, match=r"grad_scale must be > 0, got 0"):
        nora.NoraConfig(inner_init="grad", grad_scale=0)


def test_zero_accumulated_gradient_is_refused():
    with pytest.raises(ValueError, match=r"accumulated gradient is zero or non-finite"):
        first_update_target(torch.zeros(4, 4), 1e-3, 4)
    with pytest.raises(ValueError, match=r"accumulated gradient is zero or non-finite"):
        first_update_target(torch.full((4, 4), float("nan")), 1e-3, 4)


def test_accumulate_gradients_of_an_unknown_adapter_is_refused():
    _, _, model = build(inner_init="grad")
    with pytest.raises(ValueError, match=r"no NoRA layer holds adapter 'other'"):
        accumulate_gradients(model, batches(), adapter_name="other", progress=False)


def test_an_adapted_module_without_gradient_is_refused():
    _, config, model = build(inner_init="grad")
    inner = model.base_model.model

    def loss_fn(m, batch):  # depends on lin1 only, so lin2 gets no gradient
        return inner.lin1(batch["x"]).square().sum()

    with pytest.raises(ValueError, match=r"1 adapted modules got no gradient \(e\.g\. '.*lin2'\)"):
        nora.gradient_init(model, config, batches(), loss_fn=loss_fn, progress=False)


def test_sign_estimator_on_a_quantized_base_is_refused():
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    from nora.harness.quantize import _quantized_linear

    base, _, _ = build()
    cfg = nora.NoraConfig(
        r=6,
        r_inner=3,
        target_modules=["lin1", "lin2"],
        outer_init="grad",
        outer_scaling="orthonormal",
        grad_estimator="sign",
        svd_method="full",
    )
    base.lin1 = _quantized_linear(base.lin1, "int8")
    from peft import get_peft_model

    model = get_peft_model(base, cfg)
    with pytest.raises(ValueError, match=r"has a quantized base weight, which has no gradient"):
        nora.gradient_init(model, cfg, batches(), progress=False)


def test_unknown_quantize_scheme_is_refused():
    with pytest.raises(HarnessError, match=r"unknown --quantize 'int3'; use one of nf4"):
        check_scheme("int3")
