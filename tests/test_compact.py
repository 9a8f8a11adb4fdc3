"""Compact adapter files (save_outer_factors=False) and shared outer factors (issue 21, sections 1 and 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import nora
from _compact_child import base_inputs, build_base, run
from conftest import config_kwargs
from nora import compact, sharing
from nora.compact import CompactAdapterError
from nora.config import FORMAT_VERSION, STRUCTURES
from nora.model import nora_layers

CHILD = Path(__file__).resolve().parent / "_compact_child.py"
ATOL = 1e-5


def _cfg(kind: str = "llama", **kw) -> nora.NoraConfig:
    targets = "all-linear" if kind == "llama" else ["0", "2"]
    defaults = dict(r=8, r_inner=4, target_modules=targets, save_outer_factors=False, init_weights=False)
    if kind == "mlp":
        defaults.update(r=64, r_inner=32, inner_init_std=0.2)
    return nora.NoraConfig(**config_kwargs(**{**defaults, **kw}))


def _saved(tmp_path: Path, kind: str = "llama", **kw) -> tuple[Path, torch.Tensor, object]:
    """A NoRA adapter with random inner factors saved compact; returns (dir, its output, the model)."""
    torch.manual_seed(0)
    model = get_peft_model(build_base(kind), _cfg(kind, **kw)).eval()
    out = run(model, kind)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", out, model


def _saved_as(tmp_path: Path, save_outer_factors: bool) -> tuple[Path, torch.Tensor]:
    """`_saved`, written compact or (save_outer_factors=True) full; returns (dir, its output)."""
    adapter, expected, model = _saved(tmp_path)
    if save_outer_factors:
        model.peft_config["default"].save_outer_factors = True
        model.save_pretrained(tmp_path / "full")
        adapter = tmp_path / "full"
    return adapter, expected


def _fresh_process(kind: str, adapter: Path, threads: int, tmp_path: Path) -> torch.Tensor:
    out = tmp_path / f"out_{threads}.pt"
    subprocess.run([sys.executable, str(CHILD), kind, str(adapter), str(threads), str(out)], check=True)
    result = torch.load(out)
    assert result["threads"] == threads
    return result["out"]


def _keys(adapter: Path) -> list[str]:
    with safe_open(adapter / "adapter_model.safetensors", "pt") as fh:
        return list(fh.keys())


# ------------------------------------------------------------------------------------------------ file content
def test_compact_file_has_no_outer_factors(tmp_path):
    adapter, _, model = _saved(tmp_path)
    keys = _keys(adapter)
    assert not any(".nora_B" in k or ".nora_A" in k for k in keys)
    n_layers = len(list(nora_layers(model)))
    assert sum(k.endswith(".nora_sketch_A") for k in keys) == n_layers
    assert sum(k.endswith(".nora_inner_B") for k in keys) == n_layers
    assert json.loads((adapter / "adapter_config.json").read_text())["save_outer_factors"] is False
    full = tmp_path / "full"
    model.peft_config["default"].save_outer_factors = True
    model.save_pretrained(full)
    assert sum(".nora_B" in k for k in _keys(full)) == n_layers
    assert (adapter / "adapter_model.safetensors").stat().st_size < (full / "adapter_model.safetensors").stat().st_size


# ------------------------------------------------------------------------------------------------ fresh process
def test_reload_in_fresh_process_equals_saved_logits(tmp_path):
    adapter, expected, _ = _saved(tmp_path)
    got = _fresh_process("llama", adapter, 1, tmp_path)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_reload_with_1_and_2_threads(tmp_path):
    """A flat-spectrum 384 x 384 MLP (where a float32 SVD rotates with the thread count): both reloads match."""
    adapter, expected, _model = _saved(tmp_path, "mlp")
    base_out = run(build_base("mlp"), "mlp")
    assert (expected - base_out).abs().max() > 1e-2  # the adapter moves the output well above the tolerance
    one = _fresh_process("mlp", adapter, 1, tmp_path)
    two = _fresh_process("mlp", adapter, 2, tmp_path)
    torch.testing.assert_close(one, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(two, expected, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------ paths
@pytest.mark.parametrize("structure", STRUCTURES)
def test_every_structure_reloads(tmp_path, structure):
    adapter, expected, _ = _saved(tmp_path, structure=structure)
    loaded = PeftModel.from_pretrained(build_base("llama"), adapter).eval()
    torch.testing.assert_close(run(loaded, "llama"), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("svd_method", ["full", "randomized", "auto"])
def test_svd_paths_reload(tmp_path, svd_method):
    adapter, expected, _ = _saved(tmp_path, svd_method=svd_method, svd_oversample=4)
    loaded = PeftModel.from_pretrained(build_base("llama"), adapter).eval()
    torch.testing.assert_close(run(loaded, "llama"), expected, atol=ATOL, rtol=0)


def test_random_outer_reloads(tmp_path):
    adapter, expected, _ = _saved(tmp_path, outer_init="random")
    loaded = PeftModel.from_pretrained(build_base("llama"), adapter).eval()
    torch.testing.assert_close(run(loaded, "llama"), expected, atol=ATOL, rtol=0)


def test_awsvd_reloads_in_fresh_process_without_calibration(tmp_path):
    torch.manual_seed(0)
    base = build_base("llama")
    cfg = _cfg(outer_init="awsvd")
    gen = torch.Generator().manual_seed(3)
    nora.calibrate(base, cfg, [{"input_ids": torch.randint(0, 64, (2, 8), generator=gen)} for _ in range(2)])
    model = get_peft_model(base, cfg).eval()
    expected = run(model, "llama")
    model.save_pretrained(tmp_path / "adapter")
    keys = _keys(tmp_path / "adapter")
    assert sum(k.endswith(".nora_scale") for k in keys) == len(list(nora_layers(model)))
    got = _fresh_process("llama", tmp_path / "adapter", 1, tmp_path)  # the child never calibrates
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------ alignment
def _repeated_weight(m: int = 48, n: int = 40) -> torch.Tensor:
    """W = U diag(s) V^T with singular values repeated in blocks of 3 and 2 (rotations inside are free)."""
    gen = torch.Generator().manual_seed(5)
    U = torch.linalg.qr(torch.randn(m, n, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64)).Q
    s = torch.tensor([5.0, 5.0, 5.0, 3.0, 3.0, 2.0, 1.5, 1.5] + [1.0 - 0.01 * i for i in range(n - 8)])
    return (U * s.double()) @ V.T


def test_align_undoes_rotations_within_repeated_singular_values():
    W = _repeated_weight()
    B, A, sigma = nora.init.outer_svd(W, 8, svd_method="full", dtype=torch.float64)
    record = compact.sketches(B.float(), A.float())
    gen = torch.Generator().manual_seed(9)
    Q = torch.eye(8, dtype=torch.float64)
    for block in ([0, 1, 2], [3, 4], [6, 7]):  # another LAPACK / thread count may return any basis of each block
        idx = torch.tensor(block)
        Q[idx[:, None], idx] = torch.linalg.qr(
            torch.randn(len(block), len(block), generator=gen, dtype=torch.float64)
        ).Q
    Q[5, 5] = -1.0  # a sign flip of a simple singular value
    B_rot, A_rot = B @ Q.T, Q @ A
    assert torch.allclose(B_rot @ A_rot, B @ A, atol=1e-12)  # same product, different basis
    assert compact.sketch_residual(B_rot.float(), A_rot.float(), *record) > 1e-2
    B_al, A_al = compact.align(B_rot, A_rot, sigma, *record)
    assert compact.sketch_residual(B_al.float(), A_al.float(), *record) < 1e-6
    torch.testing.assert_close(B_al, B, atol=1e-6, rtol=0)
    torch.testing.assert_close(A_al, A, atol=1e-6, rtol=0)


def test_repeated_singular_values_reload_through_alignment(tmp_path, monkeypatch):
    """A weight with repeated singular values, and a rebuild that lands on another basis of each repeated block
    (as a different LAPACK or thread count may): the load aligns it and reproduces the saved outputs."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(40, 48, bias=False))
    with torch.no_grad():
        base[0].weight.copy_(_repeated_weight().float())
    model = get_peft_model(base, nora.NoraConfig(r=8, r_inner=4, target_modules=["0"], save_outer_factors=False,
                                                 init_weights=False, inner_init_std=0.5)).eval()  # fmt: skip
    x = torch.randn(5, 40)
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path / "adapter")

    real = compact.rebuild_outer
    calls = []

    def rotated(layer, config, module_name, scale):
        B, A, sigma = real(layer, config, module_name, scale)
        Q = torch.eye(B.shape[1], dtype=B.dtype)
        Q[:3, :3] = torch.linalg.qr(torch.randn(3, 3, dtype=B.dtype)).Q
        Q[3:5, 3:5] = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=B.dtype)
        calls.append(module_name)
        return B @ Q.T, Q @ A, sigma

    monkeypatch.setattr(compact, "rebuild_outer", rotated)
    base2 = torch.nn.Sequential(torch.nn.Linear(40, 48, bias=False))
    with torch.no_grad():
        base2[0].weight.copy_(_repeated_weight().float())
    loaded = PeftModel.from_pretrained(base2, tmp_path / "adapter").eval()
    assert calls == ["0"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------ clear errors
def test_perturbed_base_is_refused(tmp_path):
    adapter, _, _ = _saved(tmp_path)
    base = build_base("llama")
    with torch.no_grad():  # 1e-3 relative: passes the cheap fingerprint (rtol 1e-2), changes the SVD factors
        w = base.model.layers[1].mlp.down_proj.weight
        w.add_(1e-3 * w.abs().mean() * torch.randn_like(w))
    with pytest.raises(
        CompactAdapterError, match=r"module 'model\.layers\.1\.mlp\.down_proj'.*save_outer_factors=True"
    ):
        PeftModel.from_pretrained(base, adapter)


def test_truncated_compact_file_is_refused(tmp_path):
    adapter, _, _ = _saved(tmp_path)
    path = adapter / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        PeftModel.from_pretrained(build_base("llama"), adapter)


def test_compact_file_missing_a_record_is_refused(tmp_path):
    adapter, _, _ = _saved(tmp_path)
    _rewrite(adapter, lambda t: t.pop(next(k for k in t if k.endswith("self_attn.k_proj.nora_sketch_B"))))
    with pytest.raises(CompactAdapterError, match=r"lacks the verification record of module '.*k_proj'"):
        PeftModel.from_pretrained(build_base("llama"), adapter)


def _rewrite(adapter: Path, edit) -> None:
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_compact_file_without_any_record_is_refused(tmp_path):
    adapter, _, _ = _saved(tmp_path)
    _rewrite(adapter, lambda t: [t.pop(k) for k in list(t) if ".nora_sketch_" in k])
    with pytest.raises(CompactAdapterError, match="holds no verification records"):
        PeftModel.from_pretrained(build_base("llama"), adapter)


def test_compact_record_of_wrong_shape_is_refused(tmp_path):
    adapter, _, _ = _saved(tmp_path)

    def shrink(tensors):
        key = next(k for k in tensors if k.endswith("self_attn.q_proj.nora_sketch_A"))
        tensors[key] = tensors[key][:, :2].contiguous()

    _rewrite(adapter, shrink)
    with pytest.raises(CompactAdapterError, match=r"verification record of module '.*q_proj' has shapes"):
        PeftModel.from_pretrained(build_base("llama"), adapter)


def test_awsvd_compact_file_without_scales_is_refused(tmp_path):
    base = build_base("llama")
    cfg = _cfg(outer_init="awsvd")
    nora.calibrate(base, cfg, [{"input_ids": torch.randint(0, 64, (2, 8))}])
    get_peft_model(base, cfg).save_pretrained(tmp_path / "adapter")
    _rewrite(tmp_path / "adapter", lambda t: [t.pop(k) for k in list(t) if k.endswith("o_proj.nora_scale")])
    with pytest.raises(CompactAdapterError, match=r"lacks the AwSVD channel scales of module '.*o_proj'"):
        PeftModel.from_pretrained(build_base("llama"), tmp_path / "adapter")


def test_compact_with_gradient_outer_init_is_refused():
    with pytest.raises(ValueError, match="outer_init='grad' factors come from the task's gradient"):
        nora.NoraConfig(
            save_outer_factors=False, outer_init="grad", grad_estimator="sign", outer_scaling="orthonormal"
        )


def test_saving_a_float32_adapter_compact_is_refused(tmp_path):
    model = get_peft_model(build_base("llama"), _cfg(save_outer_factors=True))
    model.peft_config["default"].save_outer_factors = False
    with pytest.raises(ValueError, match=r"float32 SVD.*save_outer_factors=False in the NoraConfig passed to"):
        model.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_compact_with_bf16_range_finder_is_refused():
    with pytest.raises(ValueError, match="randomized_bf16"):
        nora.NoraConfig(save_outer_factors=False, svd_method="randomized_bf16")


def test_full_file_of_format_version_1_still_loads(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(build_base("llama"), _cfg(save_outer_factors=True)).eval()
    expected = run(model, "llama")
    model.save_pretrained(tmp_path / "v1")
    config_path = tmp_path / "v1" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    assert config["format_version"] == FORMAT_VERSION == 2
    config["format_version"] = 1
    del config["save_outer_factors"]  # written before the field existed
    config_path.write_text(json.dumps(config))
    loaded = PeftModel.from_pretrained(build_base("llama"), tmp_path / "v1").eval()
    torch.testing.assert_close(run(loaded, "llama"), expected, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------ sharing
def _two_adapters(save_outer_factors: bool = False):
    torch.manual_seed(0)
    model = get_peft_model(build_base("llama"), _cfg(save_outer_factors=save_outer_factors))
    model.add_adapter("b", _cfg(save_outer_factors=save_outer_factors))
    return model.eval()


def test_identical_outer_factors_share_one_tensor():
    model = _two_adapters()
    layers = [layer for _, layer in nora_layers(model)]
    for layer in layers:
        assert layer.nora_B["default"].data_ptr() == layer.nora_B["b"].data_ptr()
        assert layer.nora_A["default"].data_ptr() == layer.nora_A["b"].data_ptr()
        assert layer.nora_inner_B["default"].data_ptr() != layer.nora_inner_B["b"].data_ptr()
        assert sharing.shares_outer(layer, "default", "b")


def test_different_outer_settings_do_not_share():
    torch.manual_seed(0)
    model = get_peft_model(build_base("llama"), _cfg())
    model.add_adapter("other_seed", _cfg(outer_init="random", init_seed=1))
    for _, layer in nora_layers(model):
        assert layer.nora_B["default"].data_ptr() != layer.nora_B["other_seed"].data_ptr()


def test_content_not_names_decides_after_a_merge():
    """Adapter b added after a was merged factorises W + dW_a: same settings, other content, no sharing."""
    torch.manual_seed(0)
    model = get_peft_model(build_base("llama"), _cfg())
    model.base_model.merge_adapter()
    model.add_adapter("b", _cfg())
    for _, layer in nora_layers(model):
        assert not sharing.shares_outer(layer, "default", "b")


def test_delete_one_shared_adapter_keeps_the_other(tmp_path):
    model = _two_adapters()
    x = base_inputs("llama")
    model.set_adapter("b")
    with torch.no_grad():
        expected_b = model(**x).logits
    model.delete_adapter("default")
    assert "default" not in model.peft_config
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, expected_b, atol=0, rtol=0)


@pytest.mark.parametrize("save_outer_factors", [True, False])
def test_save_one_shared_adapter_writes_a_complete_file(tmp_path, save_outer_factors):
    model = _two_adapters(save_outer_factors=False)
    model.set_adapter("b")
    expected_b = run(model, "llama")
    model.peft_config["b"].save_outer_factors = save_outer_factors
    model.save_pretrained(tmp_path, selected_adapters=["b"])
    loaded = PeftModel.from_pretrained(build_base("llama"), tmp_path / "b").eval()
    torch.testing.assert_close(run(loaded, "llama"), expected_b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("save_outer_factors", [True, False])
def test_loaded_adapters_share_and_skip_the_rebuild(tmp_path, monkeypatch, save_outer_factors):
    adapter, expected = _saved_as(tmp_path, save_outer_factors)
    loaded = PeftModel.from_pretrained(build_base("llama"), adapter).eval()
    calls = []
    real = compact.rebuild_outer
    monkeypatch.setattr(compact, "rebuild_outer", lambda *a: calls.append(a) or real(*a))
    loaded.load_adapter(adapter, adapter_name="second")
    assert calls == []  # a compact file whose record fits the loaded twin needs no SVD
    for _, layer in nora_layers(loaded):
        assert layer.nora_B["default"].data_ptr() == layer.nora_B["second"].data_ptr()
    loaded.set_adapter("second")
    torch.testing.assert_close(run(loaded, "llama"), expected, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------ per-adapter overhead
def test_dropout_free_adapters_of_a_layer_share_one_identity():
    model = _two_adapters()
    model.add_adapter("dropped", _cfg(nora_dropout=0.1))
    layers = [layer for _, layer in nora_layers(model)]
    for layer in layers:
        assert type(layer.nora_dropout["default"]) is torch.nn.Identity
        assert layer.nora_dropout["b"] is layer.nora_dropout["default"]
        assert isinstance(layer.nora_dropout["dropped"], torch.nn.Dropout)
        assert layer.nora_dropout["dropped"].p == 0.1
    assert len({id(layer.nora_dropout["b"]) for layer in layers}) == len(layers)  # one per layer, not global


def test_unscaled_compact_states_are_held_once():
    """Without AwSVD scales every layer's compact bookkeeping of every adapter is one shared immutable state (not a
    dict per layer and adapter); it survives deepcopy, and a float32 adapter's state says so."""
    import copy

    model = _two_adapters()
    model.add_adapter("f32", _cfg(save_outer_factors=True))
    for _, layer in nora_layers(copy.deepcopy(model)):
        assert compact._state(layer, "default") == (None, True)
    states = [(compact._state(layer, "default"), compact._state(layer, "b")) for _, layer in nora_layers(model)]
    assert all(a is b is states[0][0] for a, b in states)
    assert states[0][0].scale is None and states[0][0].float64
    assert all(not compact._state(layer, "f32").float64 for _, layer in nora_layers(model))


def test_shared_identity_survives_delete_deepcopy_and_to():
    import copy

    model = _two_adapters()
    x = base_inputs("llama")
    model.set_adapter("b")
    with torch.no_grad():
        expected_b = model(**x).logits
    clone = copy.deepcopy(model)
    for (_, mine), (_, theirs) in zip(nora_layers(model), nora_layers(clone)):
        assert theirs.nora_dropout["b"] is theirs.nora_dropout["default"]
        assert theirs.nora_dropout["b"] is not mine.nora_dropout["b"]
    model.delete_adapter("default")
    model = model.to(torch.float64).to(torch.float32)
    for _, layer in nora_layers(model):
        assert list(layer.nora_dropout) == ["b"] and type(layer.nora_dropout["b"]) is torch.nn.Identity
    model.add_adapter("c", _cfg())  # a new dropout-free adapter reuses the survivor's Identity
    for _, layer in nora_layers(model):
        assert layer.nora_dropout["c"] is layer.nora_dropout["b"]
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, expected_b, atol=0, rtol=0)
        clone.set_adapter("b")
        torch.testing.assert_close(clone(**x).logits, expected_b, atol=0, rtol=0)


def test_equal_base_fingerprints_are_held_once(tmp_path):
    adapter, _, _ = _saved(tmp_path)
    loaded = PeftModel.from_pretrained(build_base("llama"), adapter)
    loaded.load_adapter(adapter, adapter_name="second")
    loaded.add_adapter("fresh", _cfg())
    first = loaded.peft_config["default"].base_fingerprint
    assert len(first) == len(list(nora_layers(loaded)))
    assert loaded.peft_config["second"].base_fingerprint is first
    assert loaded.peft_config["fresh"].base_fingerprint is first
    loaded.save_pretrained(tmp_path / "resaved", selected_adapters=["second"])
    saved = json.loads((tmp_path / "resaved" / "second" / "adapter_config.json").read_text())
    assert saved["base_fingerprint"] == json.loads((adapter / "adapter_config.json").read_text())["base_fingerprint"]


def test_other_fingerprint_is_not_shared(tmp_path):
    model = _two_adapters()
    model.add_adapter("some", _cfg(target_modules=["q_proj"]))
    assert model.peft_config["b"].base_fingerprint is model.peft_config["default"].base_fingerprint
    assert model.peft_config["some"].base_fingerprint is not model.peft_config["default"].base_fingerprint
    assert set(model.peft_config["some"].base_fingerprint) < set(model.peft_config["default"].base_fingerprint)


def test_second_adapter_is_still_checked_against_the_base(tmp_path):
    """A shared fingerprint dict does not skip the check: the base changed after the first load, so the second
    compact adapter (same recorded fingerprint) is refused on the now different base."""
    adapter, _, _ = _saved(tmp_path)
    loaded = PeftModel.from_pretrained(build_base("llama"), adapter)
    with torch.no_grad():
        loaded.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.mul_(2.0)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj"):
        loaded.load_adapter(adapter, adapter_name="second")


def test_loading_a_checkpoint_does_not_scan_the_base_weights(tmp_path, monkeypatch):
    """No SVD runs for a checkpoint adapter, so no NaN scan either (a weight-sized temporary per module per load:
    ~600 MB per SmolLM2 adapter that glibc kept as fragmentation); a fresh adapter is still scanned."""
    adapter, expected, _ = _saved(tmp_path)
    loaded = PeftModel.from_pretrained(build_base("llama"), adapter).eval()
    calls = []
    real = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: calls.append(tuple(t.shape)) or real(t))
    loaded.load_adapter(adapter, adapter_name="second")
    assert calls == []
    loaded.add_adapter("fresh", _cfg())
    assert len(calls) == len(list(nora_layers(loaded)))
    loaded.set_adapter("second")
    torch.testing.assert_close(run(loaded, "llama"), expected, atol=ATOL, rtol=0)


def test_compact_rebuild_on_a_non_finite_base_is_refused(tmp_path):
    adapter, _, _ = _saved(tmp_path)
    base = build_base("llama")
    with torch.no_grad():
        base.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    cfg = nora.NoraConfig.from_pretrained(adapter)
    cfg.check_base_fingerprint = False
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj: the base weight contains NaN or inf"):
        PeftModel.from_pretrained(base, adapter, config=cfg)


@pytest.mark.parametrize("save_outer_factors", [True, False])
def test_further_loads_reuse_the_cached_sketches(tmp_path, monkeypatch, save_outer_factors):
    """Loading onto a shared twin does not copy the tensor onto itself (which bumped its version counter and threw
    away the cached float64 sketches: two outer-factor-sized float64 copies per module per load)."""
    adapter, expected = _saved_as(tmp_path, save_outer_factors)
    loaded = PeftModel.from_pretrained(build_base("llama"), adapter).eval()
    loaded.load_adapter(adapter, adapter_name="second")
    versions = [
        (layer.nora_B["default"]._version, layer.nora_A["default"]._version) for _, layer in nora_layers(loaded)
    ]
    calls = []
    real = compact.sketches
    monkeypatch.setattr(compact, "sketches", lambda *a: calls.append(1) or real(*a))
    result = loaded.load_adapter(adapter, adapter_name="third")
    assert calls == []
    assert not [k for k in result.missing_keys if "nora_" in k]
    assert [
        (layer.nora_B["third"]._version, layer.nora_A["third"]._version) for _, layer in nora_layers(loaded)
    ] == versions
    for _, layer in nora_layers(loaded):
        assert sharing.shares_outer(layer, "default", "third")
    loaded.set_adapter("third")
    torch.testing.assert_close(run(loaded, "llama"), expected, atol=ATOL, rtol=0)


def test_a_loaded_outer_factor_that_differs_is_still_copied():
    """OuterFactors skips only a self-copy: a state dict with other values for B is loaded as usual."""
    model = _two_adapters()
    layer = next(layer for _, layer in nora_layers(model))
    new_B = torch.randn_like(layer.nora_B["b"])
    layer.nora_B.load_state_dict({"b": new_B, "default": layer.nora_B["default"]}, strict=True)
    torch.testing.assert_close(layer.nora_B["b"], new_B, atol=0, rtol=0)
