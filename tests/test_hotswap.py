"""nora.hotswap_adapter: in-place swap of the inner factors (no recompile of a torch.compile'd model), the
compatibility checks, and PEFT's own hotswap giving a clear error on a NoRA model."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import _models as M
import nora
from conftest import config_kwargs


def base_model():
    return M.build("llama", num_hidden_layers=2)


def saved_adapter(path, seed: int, **config):
    """A NoRA adapter on the tiny Llama with large random inner factors (seeded), saved to `path`."""
    cfg = config_kwargs(**{"r": 8, "r_inner": 4, "target_modules": "all-linear", **config})
    model = get_peft_model(base_model(), nora.NoraConfig(**cfg))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "nora_inner_" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(path)
    return path


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("hotswap")
    return {k: saved_adapter(root / k, seed) for k, seed in (("one", 1), ("two", 2), ("three", 3))}


@pytest.mark.parametrize("structure", ["nested", "adapter"])
def test_hotswap_equals_loading_the_adapter(structure, tmp_path):
    one = saved_adapter(tmp_path / "one", 1, structure=structure, modules_to_save=["lm_head"])
    two = saved_adapter(tmp_path / "two", 2, structure=structure, modules_to_save=["lm_head"])
    batch = M.inputs("llama", batch=2)
    model = PeftModel.from_pretrained(base_model(), one).eval()
    params_before = {n: p for n, p in model.named_parameters()}
    modules_before = [id(m) for m in model.modules()]
    before = logits(model, batch)
    nora.hotswap_adapter(model, two)
    expected = logits(PeftModel.from_pretrained(base_model(), two).eval(), batch)
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-6, rtol=0)
    assert (before - expected).abs().max() > 1e-2  # the swap changed the outputs well beyond the tolerance
    # in place: the same parameter objects and modules, only new values
    assert all(p is params_before[n] for n, p in model.named_parameters())
    assert [id(m) for m in model.modules()] == modules_before


def test_hotswap_compiled_model_does_not_recompile(adapters):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    batch = M.inputs("llama", batch=2)
    model = PeftModel.from_pretrained(base_model(), adapters["one"]).eval()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    eager = {k: logits(PeftModel.from_pretrained(base_model(), v).eval(), batch) for k, v in adapters.items()}
    torch.testing.assert_close(logits(compiled, batch), eager["one"], atol=1e-6, rtol=0)
    frames = counter.frame_count
    assert frames >= 1
    for name in ("two", "three", "one"):
        nora.hotswap_adapter(compiled, adapters[name])  # the OptimizedModule is accepted as is
        torch.testing.assert_close(logits(compiled, batch), eager[name], atol=1e-6, rtol=0)
    assert counter.frame_count == frames, "hotswap triggered a recompilation"
    torch._dynamo.reset()


def test_hotswap_compact_file(tmp_path):
    """A compact file (no outer factors) is checked against its verification sketches."""
    one = saved_adapter(tmp_path / "one", 1, save_outer_factors=False)
    two = saved_adapter(tmp_path / "two", 2, save_outer_factors=False)
    batch = M.inputs("llama", batch=2)
    model = PeftModel.from_pretrained(base_model(), one).eval()
    nora.hotswap_adapter(model, two)
    expected = logits(PeftModel.from_pretrained(base_model(), two).eval(), batch)
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-6, rtol=0)


def test_hotswap_named_adapter_and_mixed_batch(adapters):
    """Swapping one of several adapters leaves the others alone; mixed batches see the new factors."""
    batch = M.inputs("llama", batch=2)
    model = PeftModel.from_pretrained(base_model(), adapters["one"], adapter_name="u").eval()
    model.load_adapter(adapters["two"], adapter_name="v")
    with torch.no_grad():
        model(**batch, adapter_names=["u", "v"])  # fills the mixed-batch caches
    nora.hotswap_adapter(model, adapters["three"], adapter_name="u")
    expect = {k: logits(PeftModel.from_pretrained(base_model(), adapters[k]).eval(), batch) for k in ("two", "three")}
    with torch.no_grad():
        mixed = model(**batch, adapter_names=["u", "v"]).logits
    torch.testing.assert_close(mixed[0], expect["three"][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed[1], expect["two"][1], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# refusals (docs/errors.md)


def test_hotswap_while_merged(adapters):
    model = PeftModel.from_pretrained(base_model(), adapters["one"]).eval()
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"is merged into the base weights .*unmerge_adapter\(\)"):
        nora.hotswap_adapter(model, adapters["two"])


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"r": 4}, "r"),
        ({"r_inner": 2}, "r_inner"),
        ({"structure": "parallel"}, "structure"),
        ({"alpha": 8}, "scaling"),
    ],
)
def test_hotswap_incompatible_config(adapters, tmp_path, config, field):
    other = saved_adapter(tmp_path / "other", 2, **config)
    model = PeftModel.from_pretrained(base_model(), adapters["one"]).eval()
    with pytest.raises(ValueError, match=rf"has {field}=.* but the loaded adapter has {field}=.*load_adapter"):
        nora.hotswap_adapter(model, other)


def test_hotswap_other_target_modules(adapters, tmp_path):
    other = saved_adapter(tmp_path / "other", 2, target_modules=["q_proj", "v_proj"])
    model = PeftModel.from_pretrained(base_model(), adapters["one"]).eval()
    with pytest.raises(ValueError, match=r"has no nora_inner_B for module .*it targets other modules"):
        nora.hotswap_adapter(model, other)


def test_hotswap_outer_factors_differ(adapters, tmp_path):
    """The file's outer factors are not the loaded ones (another base, another SVD): refused, nothing written."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter_config.json").write_bytes((adapters["two"] / "adapter_config.json").read_bytes())
    state = load_file(adapters["two"] / "adapter_model.safetensors")
    key = next(k for k in state if k.endswith("q_proj.nora_B"))
    state[key] = state[key] * 1.01
    save_file(state, other / "adapter_model.safetensors")
    model = PeftModel.from_pretrained(base_model(), adapters["one"]).eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"q_proj'.*outer factors differ from the loaded ones.*silently change"):
        nora.hotswap_adapter(model, other)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a refused hotswap wrote into the model"


def test_hotswap_not_a_nora_adapter(adapters, tmp_path):
    from peft import LoraConfig

    lora = get_peft_model(base_model(), LoraConfig(r=4, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    model = PeftModel.from_pretrained(base_model(), adapters["one"]).eval()
    with pytest.raises(ValueError, match=r"holds a LORA adapter, not NoRA"):
        nora.hotswap_adapter(model, tmp_path / "lora")
    with pytest.raises(ValueError, match=r"has no NoRA adapter 'nope'"):
        nora.hotswap_adapter(model, adapters["two"], adapter_name="nope")
    with pytest.raises(ValueError, match=r"is not an adapter directory \(no adapter_config.json\)"):
        nora.hotswap_adapter(model, tmp_path / "missing")


def test_peft_hotswap_on_a_nora_model(adapters):
    """PEFT's own hotswap supports LoRA only: on NoRA it raises a ValueError naming NORA, not an AttributeError."""
    from peft.utils.hotswap import hotswap_adapter as peft_hotswap

    model = PeftModel.from_pretrained(base_model(), adapters["one"]).eval()
    with pytest.raises(ValueError, match=r"Hotswapping only supports .*LORA.* but NORA was passed"):
        peft_hotswap(model, str(adapters["two"]), adapter_name="default", torch_device="cpu")


def test_hotswap_not_a_peft_model(adapters):
    with pytest.raises(TypeError, match=r"nora.hotswap_adapter needs a PeftModel \(or a torch.compile'd one\)"):
        nora.hotswap_adapter(base_model(), adapters["two"])
