"""The low-memory training path (nora.lowmem, activation_memory="low"): gradients equal the folded path's, and autograd
saves z = A x (r numbers per token) instead of x.

Gradient tolerance: fp32 gradients of the low path and of the folded path agree within 1e-5 of each gradient's
largest entry (the summation order differs: measured <= 4e-7 here); under bf16/fp16 autocast both paths round their
products to 8/11 mantissa bits, so there the bound is sized to that noise (see AUTOCAST_REL).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import _models as M
import nora
from conftest import config_kwargs
from nora import lowmem
from nora.layer import NoraLayer

REL = 1e-5
STRUCTURES = ("nested", "output", "parallel", "adapter")
M_OUT, N_IN, R, K = 24, 40, 8, 4


def lin_model(mode: str, structure: str = "nested", **cfg):
    """Linear(40 -> 24, bias) with NoRA r=8/4, both inner factors random (non-zero gradients everywhere)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(N_IN, M_OUT))
    cfg.setdefault("inner_init_std", 0.5)  # an adapter term as large as W x, so the input gradient tests it too
    config = nora.NoraConfig(
        **config_kwargs(
            r=R,
            r_inner=K,
            structure=structure,
            target_modules=["0"],
            init_weights=False,
            activation_memory=mode,
            **cfg,
        )
    )
    model = get_peft_model(base, config)
    return model, model.base_model.model[0]


@contextlib.contextmanager
def count_low_calls():
    """Counts calls of the low-memory function (eager only)."""
    calls = []
    original = lowmem.LowRankDelta.apply

    def apply(*args):
        calls.append(1)
        return original(*args)

    lowmem.LowRankDelta.apply = apply
    try:
        yield calls
    finally:
        lowmem.LowRankDelta.apply = original


def grads(model, *inputs) -> dict[str, torch.Tensor]:
    """Gradients of every trained parameter and of every input that requires grad."""
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    out.update({f"input{i}": x.grad.detach().clone() for i, x in enumerate(inputs) if x.requires_grad})
    return out


def assert_grads_match(got: dict, ref: dict, rel: float = REL) -> None:
    assert got.keys() == ref.keys() and len(ref) >= 2
    for name, g in ref.items():
        scale = g.abs().max()
        assert scale > 0, f"{name}: zero gradient, the comparison would be vacuous"
        err = (got[name] - g).abs().max()
        assert err <= rel * scale, f"{name}: max |low - folded| = {err:.3g} > {rel} x {scale:.3g}"


def linear_step(mode: str, structure: str = "nested", x=None, seed: int = 0, **cfg):
    model, _ = lin_model(mode, structure, **cfg)
    model.train()
    x = torch.randn(3, 5, N_IN, generator=torch.Generator().manual_seed(1)) if x is None else x
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = model(x)
    (out * torch.linspace(-1, 2, M_OUT)).sum().backward()
    return out.detach(), grads(model, x)


# ------------------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("structure", STRUCTURES)
def test_gradients_equal_the_folded_path(structure):
    with count_low_calls() as calls:
        out_low, g_low = linear_step("low", structure, alpha=3.0)
    assert calls, "the low-memory path did not run"
    out_ref, g_ref = linear_step("folded", structure, alpha=3.0)
    torch.testing.assert_close(out_low, out_ref, atol=1e-5 * out_ref.abs().max().item(), rtol=0)
    assert_grads_match(g_low, g_ref)


def test_conv1d_gradients_equal_the_folded_path():
    """GPT-2 (transformers Conv1D, weight stored (in, out)): every inner gradient and the input-embedding gradient."""
    results = {}
    for mode in ("low", "folded"):
        base = M.build("gpt2")
        model = get_peft_model(base, nora.NoraConfig(r=8, r_inner=4, init_weights=False, activation_memory=mode))
        layers = [m for m in model.modules() if isinstance(m, NoraLayer)]
        assert layers and all(isinstance(m.get_base_layer(), Conv1D) for m in layers)
        model.train()
        ids = M.inputs("gpt2", seed=3)["input_ids"]
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        with count_low_calls() as calls:
            model(inputs_embeds=embeds, labels=ids).loss.backward()
        assert bool(calls) == (mode == "low")
        results[mode] = grads(model, embeds)
    assert_grads_match(results["low"], results["folded"])


def test_dropout_same_mask_same_gradients():
    """Same RNG state: the low path draws the same CPU mask as nn.Dropout, so gradients match; the mask really drops."""
    _, g_low = linear_step("low", nora_dropout=0.3, seed=7)
    _, g_ref = linear_step("folded", nora_dropout=0.3, seed=7)
    assert_grads_match(g_low, g_ref)
    _, g_other = linear_step("low", nora_dropout=0.3, seed=8)
    assert (g_other["input0"] - g_low["input0"]).abs().max() > 1e-3


#: bf16 keeps 8 mantissa bits (2^-8 = 4e-3 relative per rounding), fp16 11 (5e-4); the two paths round different
#: intermediate products, measured max |low - folded| / max |folded| = 8.5e-3 (bf16), 1.6e-3 (fp16) here
AUTOCAST_REL = {torch.bfloat16: 4e-2, torch.float16: 6e-3}
LOSS_SCALE = {torch.bfloat16: 1.0, torch.float16: 2.0**16}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_gradients_match_the_folded_path(dtype):
    results = {}
    for mode in ("low", "folded"):
        model = get_peft_model(
            M.build("llama"), nora.NoraConfig(r=8, r_inner=4, init_weights=False, activation_memory=mode)
        )
        model.train()
        ids = M.inputs("llama", seed=3)["input_ids"]
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        with torch.autocast("cpu", dtype=dtype), count_low_calls() as calls:
            loss = model(inputs_embeds=embeds, labels=ids).loss
        assert bool(calls) == (mode == "low")
        (loss * LOSS_SCALE[dtype]).backward()  # fp16 needs a loss scale (GradScaler's job) or gradients underflow
        results[mode] = grads(model, embeds)
        assert all(g.dtype == torch.float32 for g in results[mode].values())  # inner factors stay float32
    assert_grads_match(results["low"], results["folded"], rel=AUTOCAST_REL[dtype])


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(reentrant):
    """model.gradient_checkpointing_enable() around the low path: gradients equal the folded path without it."""
    results = {}
    for mode, ckpt in (("low", True), ("folded", False)):
        model = get_peft_model(
            M.build("llama", num_hidden_layers=2),
            nora.NoraConfig(r=8, r_inner=4, init_weights=False, activation_memory=mode),
        )
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        model.train()
        ids = M.inputs("llama", seed=3)["input_ids"]
        with count_low_calls() as calls:
            model(input_ids=ids, labels=ids).loss.backward()
        # 2 layers x 7 targets; non-reentrant: forward + recompute in the backward; reentrant: its first forward
        # runs under no_grad (nothing to save: the folded product), the recompute on the low path
        assert len(calls) == (0 if not ckpt else 14 if reentrant else 28)
        results[mode] = grads(model)
    assert_grads_match(results["low"], results["folded"])


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) of a layer on the low path: same output and gradients as the eager folded path."""
    ref_out, g_ref = linear_step("folded")
    model, layer = lin_model("low")
    model.train()
    x = torch.randn(3, 5, N_IN, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    out = torch.compile(layer, fullgraph=True)(x)  # raises on a graph break
    (out * torch.linspace(-1, 2, M_OUT)).sum().backward()
    torch.testing.assert_close(out.detach(), ref_out, atol=1e-5 * ref_out.abs().max().item(), rtol=0)
    g_low = {f"base_model.model.0.{n}": p.grad for n, p in layer.named_parameters() if p.requires_grad}
    g_low["input0"] = x.grad
    assert_grads_match(g_low, g_ref)


def test_two_active_adapters():
    results = {}
    for mode in ("low", "folded"):
        model, layer = lin_model(mode)
        torch.manual_seed(5)
        second = nora.NoraConfig(
            r=6, r_inner=3, structure="parallel", target_modules=["0"], init_weights=False, activation_memory=mode
        )
        model.add_adapter("second", second)
        model.base_model.set_adapter(["default", "second"])
        assert sorted(layer.active_adapters) == ["default", "second"]
        model.train()
        x = torch.randn(4, N_IN, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
        with count_low_calls() as calls:
            model(x).square().sum().backward()
        assert len(calls) == (2 if mode == "low" else 0)
        results[mode] = grads(model, x)
    assert {n.split(".")[-1] for n in results["low"]} >= {"default", "second"}
    assert_grads_match(results["low"], results["folded"])


# ------------------------------------------------------------------------------------------------ routing
def test_auto_routes_training_calls_to_the_low_path():
    model, _ = lin_model("auto")
    x = torch.randn(2, N_IN, requires_grad=True)
    with count_low_calls() as calls:
        model(x)
        assert len(calls) == 1  # training (autograd records): low
        with torch.no_grad():
            model(x)
        assert len(calls) == 1  # nothing is saved without autograd: folded, the cheaper product
    adapter_model, _ = lin_model("auto", structure="adapter")
    with count_low_calls() as calls:
        adapter_model(x)
    assert calls == []  # structure='adapter': the folded path already saves only A x
    folded, _ = lin_model("folded")
    with count_low_calls() as calls:
        folded(x)
    assert calls == []
    assert nora.NoraConfig().activation_memory == "auto"


def test_unknown_activation_memory():
    with pytest.raises(
        ValueError, match=r"unknown activation_memory='lowest'; valid values are 'auto', 'low', 'folded'"
    ):
        nora.NoraConfig(activation_memory="lowest")


def test_low_path_on_pending_outer_factors_raises_the_layer_error(tmp_path):
    model, _ = lin_model("low")
    model.save_pretrained(tmp_path)
    cfg = nora.NoraConfig.from_pretrained(tmp_path)
    torch.manual_seed(0)
    fresh = get_peft_model(nn.Sequential(nn.Linear(N_IN, M_OUT)), cfg)
    with pytest.raises(RuntimeError, match="outer factors were never computed or loaded"):
        fresh(torch.randn(2, N_IN, requires_grad=True))


# ------------------------------------------------------------------------------------------------ saved bytes
def saved_bytes(model, fn) -> tuple[int, list[tuple[tuple[int, ...], torch.dtype]]]:
    """Bytes of the distinct storages autograd saves during fn(), the model's own parameters/buffers excluded."""
    resident = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}
    shapes = []

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in resident and ptr not in seen:
            seen[ptr] = t.untyped_storage().nbytes()
            shapes.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()), shapes


T_TOKENS = 60


@pytest.mark.parametrize("alpha", [None, 3.0])
@pytest.mark.parametrize("structure", ["nested", "parallel", "output"])
def test_saved_bytes_are_z_only(structure, alpha):
    """Per call the low path saves z (T x r fp32) and nothing m-wide: the left fold s B B' (m x k) is recomputed in
    backward (alpha=3: a scaled left too). The folded path saves x (T x n), u (T x k), right (k x n) and, where it
    is a new tensor, left (m x k). ('output': M = A' B is a k x r fold result, r-wide.)"""
    x = torch.randn(T_TOKENS, N_IN, requires_grad=True)
    cfg = {} if alpha is None else {"alpha": alpha}
    model, _ = lin_model("low", structure, **cfg)
    low, shapes = saved_bytes(model, lambda: model(x))
    small = {"nested": 0, "parallel": 0, "output": K * R}[structure]  # output: M = A' B is a fold result
    assert low == 4 * (T_TOKENS * R + small), shapes
    assert all(M_OUT not in shape for shape, _ in shapes), shapes  # nothing of width m
    folded_model, _ = lin_model("folded", structure, **cfg)
    folded, _ = saved_bytes(folded_model, lambda: folded_model(x))
    left = M_OUT * K if structure == "nested" or alpha is not None else 0  # else left is the parameter B'/C itself
    assert folded == 4 * (T_TOKENS * N_IN + T_TOKENS * K + K * N_IN + left)
    # per token: 4 r bytes instead of 4 (n + k)
    assert (folded - low) == 4 * T_TOKENS * (N_IN + K - R) + 4 * K * N_IN + 4 * left - 4 * small


def test_a_trainable_outer_factor_is_refused():
    """The low path cannot give A a gradient (it keeps A x, not x): an A made trainable by hand is refused."""
    model, layer = lin_model("low")
    layer.nora_A["default"].requires_grad_(True)
    with pytest.raises(ValueError, match="the outer factor A requires grad, but this path saves A x instead of x"):
        model(torch.randn(2, N_IN, requires_grad=True))


def test_saved_bytes_with_dropout_add_a_bool_mask():
    """Dropout: the low path saves its boolean keep-mask (n bytes per token), never x nor a float noise tensor."""
    x = torch.randn(T_TOKENS, N_IN, requires_grad=True)
    model, _ = lin_model("low", nora_dropout=0.1)
    model.train()
    low, shapes = saved_bytes(model, lambda: model(x))
    assert low == 4 * T_TOKENS * R + T_TOKENS * N_IN
    assert ((T_TOKENS, N_IN), torch.bool) in shapes


def test_saved_bytes_of_a_frozen_input():
    """An input that needs no gradient (the first layer without enable_input_require_grads): z only, and no mask."""
    x = torch.randn(T_TOKENS, N_IN)
    model, _ = lin_model("low")
    low, _ = saved_bytes(model, lambda: model(x))
    assert low == 4 * T_TOKENS * R
    copy.deepcopy(model)  # a low-path model stays deep-copyable (no autograd state is kept on the layer)


# ------------------------------------------------------------------------------------------------ distributed
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_distributed_low_path_matches_one_folded_process(mode, tmp_path, monkeypatch):
    """tests/dist/worker.py: 2 processes (DDP, or FSDP2 fully_shard per layer) on the low path train the same adapter
    as 1 process on the folded path (tolerances of tests/test_distributed.py)."""
    from test_distributed import LOSS_ATOL, WORKER_ADAPTER_ATOL, assert_same_adapter, run_worker

    monkeypatch.setenv("NORA_ACTIVATION_MEMORY", "folded")
    ref = run_worker("ddp", tmp_path / "folded", distributed=False)
    monkeypatch.setenv("NORA_ACTIVATION_MEMORY", "low")
    got = run_worker(mode, tmp_path / "low", distributed=True)
    assert got["world"] == 2 and got["mode"] == mode
    assert got["losses"] == pytest.approx(ref["losses"], abs=LOSS_ATOL, rel=0)
    assert_same_adapter(tmp_path / "folded", tmp_path / "low", WORKER_ADAPTER_ATOL)
