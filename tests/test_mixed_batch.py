"""Mixed-batch inference (`adapter_names=[...]`, one adapter per row): every row equals its own adapter's forward,
`"__base__"` rows equal the base model, generate with beam search, and the refusals."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch.overrides import TorchFunctionMode

import _models as M
import nora
from conftest import config_kwargs
from nora import mixed_batch
from nora.model import nora_layers

STRUCTURES = ("nested", "output", "parallel", "adapter")


def randomize_inner(model, scale: float = 0.3, seed: int = 0) -> None:
    """Large random inner factors, so every adapter moves the logits far beyond the test tolerance."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "nora_inner_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def multi_adapter_model(structure="nested", names=("x", "y", "z"), layers=2, **config):
    base = M.build("llama", num_hidden_layers=layers)
    cfg = config_kwargs(**{"r": 8, "r_inner": 4, "structure": structure, "target_modules": "all-linear", **config})
    model = get_peft_model(base, nora.NoraConfig(**cfg), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, nora.NoraConfig(**cfg))
    randomize_inner(model)
    return model.eval()


def own_forward(model, name, batch):
    """Logits of the whole batch with one adapter active (or the plain base for "__base__")."""
    with torch.no_grad():
        if name == mixed_batch.BASE:
            with model.disable_adapter():
                return model(**batch).logits
        model.set_adapter(name)
        return model(**batch).logits


def assert_rows_match(model, batch, names):
    with torch.no_grad():
        mixed = model(**batch, adapter_names=names).logits
    own = {n: own_forward(model, n, batch) for n in set(names)}
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], own[name][i], atol=1e-6, rtol=0, msg=f"row {i} ({name})")
    return own


@pytest.mark.parametrize("path", ["auto", "shared", "grouped"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_rows_match_their_own_adapter(structure, path, monkeypatch):
    if path != "auto":
        monkeypatch.setattr(mixed_batch, "_use_shared", lambda *a, **k: path == "shared")
    model = multi_adapter_model(structure)
    names = ["y", "x", "__base__", "z", "x", "y"]
    own = assert_rows_match(model, M.inputs("llama", batch=len(names)), names)
    # the adapters really differ (so a row given the wrong adapter, the old silent failure, would be caught)
    for x, y in [("x", "y"), ("x", "z"), ("x", "__base__")]:
        assert (own[x] - own[y]).abs().max() > 1e-2


def test_base_rows_equal_the_base_model():
    model = multi_adapter_model()
    batch = M.inputs("llama", batch=3)
    names = ["__base__", "x", "__base__"]
    with torch.no_grad():
        mixed = model(**batch, adapter_names=names).logits
        plain = model.get_base_model()
        with model.disable_adapter():
            base = plain(**batch).logits
    torch.testing.assert_close(mixed[0], base[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed[2], base[2], atol=1e-6, rtol=0)
    with torch.no_grad():  # an all-base batch is the base model exactly
        torch.testing.assert_close(model(**batch, adapter_names=["__base__"] * 3).logits, base, atol=0, rtol=0)


def test_adapters_with_different_outer_factors_and_targets():
    """Adapters whose outer factors differ (another r, random outer init) or that skip a layer, and modules_to_save."""
    model = multi_adapter_model(names=("x",))
    model.add_adapter("r4", nora.NoraConfig(r=4, r_inner=2, target_modules="all-linear"))
    model.add_adapter("rand", nora.NoraConfig(r=8, r_inner=4, outer_init="random", target_modules="all-linear"))
    model.add_adapter(
        "q_only", nora.NoraConfig(r=8, r_inner=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    randomize_inner(model, seed=1)
    with torch.no_grad():
        for module in model.modules():  # give q_only's lm_head copy its own weights
            if hasattr(module, "modules_to_save") and "q_only" in module.modules_to_save:
                module.modules_to_save["q_only"].weight.mul_(1.5)
    layer = dict(nora_layers(model))["base_model.model.model.layers.0.self_attn.q_proj"]
    assert [len(c) for c in mixed_batch.outer_classes(layer, ["x", "r4", "rand", "q_only"])] == [2, 1, 1]
    names = ["rand", "q_only", "x", "r4", "__base__", "x"]
    batch = M.inputs("llama", batch=len(names))
    model.set_adapter("x")  # x has no lm_head copy; q_only's row still gets q_only's
    assert_rows_match(model, batch, names)
    model.set_adapter("q_only")
    assert_rows_match(model, batch, names)


class CountOps(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.nn.functional.linear, torch.bmm, torch.matmul, torch.Tensor.__matmul__):
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_shared_outer_factors_are_applied_once_per_batch():
    """With shared outer factors the per-token work is A x, one batched r x r inner product and B u, whatever the
    number of adapters: the count of token-sized products does not grow with N."""
    model = multi_adapter_model(names=tuple(f"k{i}" for i in range(8)), layers=1)
    layer = dict(nora_layers(model))["base_model.model.model.layers.0.mlp.down_proj"]
    names8 = [f"k{i}" for i in range(8)]
    assert mixed_batch.outer_classes(layer, names8) == [names8]  # equal SVDs: one class
    x = torch.randn(8, 3, layer.in_features)
    counts = {}
    for n in (1, 2, 8):
        names = [names8[i % n] for i in range(8)]
        with torch.no_grad(), CountOps() as ops:
            out = mixed_batch.mixed_forward(layer, x, adapter_names=names)
        token_sized = [c for c in ops.calls if c in ("linear", "bmm")]
        counts[n] = len(token_sized)
        for i, name in enumerate(names):  # and each row is still its own adapter's output
            expect = layer.base_layer(x[i]) + layer.adapter_delta(name, x[i])
            torch.testing.assert_close(out[i], expect, atol=1e-6, rtol=0)
    # n=1 with 24 tokens takes the cheaper folded rank-r' path (2 linears + base); n >= 2: base, A x, bmm, B u
    assert counts[2] == counts[8] == 4, counts


def test_outer_factor_equality_cache_sees_in_place_changes():
    model = multi_adapter_model(names=("x", "y"), layers=1)
    layer = dict(nora_layers(model))["base_model.model.model.layers.0.self_attn.q_proj"]
    layer.nora_B["y"] = layer.nora_B["x"].clone()  # equal content in two tensors (e.g. loaded from two files)
    layer.nora_A["y"] = layer.nora_A["x"].clone()
    assert mixed_batch.outer_classes(layer, ["x", "y"]) == [["x", "y"]]
    with torch.no_grad():
        layer.nora_B["y"].mul_(2.0)  # bumps the version counter: the cached "equal" must not be reused
    assert mixed_batch.outer_classes(layer, ["x", "y"]) == [["x"], ["y"]]
    assert_rows_match(model, M.inputs("llama", batch=3), ["x", "y", "y"])
    layer.nora_B["y"] = layer.nora_B["x"]  # one shared tensor (what nora.sharing's deduplicated adapters hold)
    assert mixed_batch.outer_classes(layer, ["x", "y"]) == [["x", "y"]]


def test_cached_row_matrices_follow_new_inner_factors():
    """The per-row inner matrices are cached between no-grad calls; an in-place update (a hotswap, an optimizer step)
    must be seen by the next call."""
    model = multi_adapter_model(names=("x", "y"))
    batch = M.inputs("llama", batch=3)
    names = ["x", "y", "y"]
    assert_rows_match(model, batch, names)
    randomize_inner(model, seed=7)  # copy_ into the same parameters
    assert_rows_match(model, batch, names)


def test_row_stacks_fold_once_across_batch_layouts(monkeypatch):
    """Without autograd each adapter's inner matrices are folded once and reused when the batch layout changes (a
    server alternating batches); each layout still gives every row its own adapter."""
    model = multi_adapter_model(names=("x", "y"), layers=1)
    layer = dict(nora_layers(model))["base_model.model.model.layers.0.self_attn.q_proj"]
    folds = []
    row_matrices = mixed_batch._row_matrices
    monkeypatch.setattr(mixed_batch, "_row_matrices", lambda lay, a: folds.append(a) or row_matrices(lay, a))
    monkeypatch.setattr(mixed_batch, "_use_shared", lambda *a, **k: True)
    x = torch.randn(3, 2, layer.in_features)
    for names in (["x", "y", "y"], ["y", "x", "x"], ["x", "y", "y"], ["y", "y", "x"]):
        with torch.no_grad():
            out = mixed_batch.mixed_forward(layer, x, adapter_names=mixed_batch.RowNames(names))
        for i, name in enumerate(names):
            expect = layer.base_layer(x[i]) + layer.adapter_delta(name, x[i])
            torch.testing.assert_close(out[i], expect, atol=1e-6, rtol=0)
    assert sorted(folds) == ["x", "y"]
    with torch.no_grad():
        layer.nora_inner_B["y"].mul_(2.0)  # an in-place update refolds (both: one stack per class)
        out = mixed_batch.mixed_forward(layer, x, adapter_names=["y", "x", "y"])
    assert sorted(folds) == ["x", "x", "y", "y"]
    torch.testing.assert_close(out[0], layer.base_layer(x[0]) + layer.adapter_delta("y", x[0]), atol=1e-6, rtol=0)


def generate_each(model, batch, names, **kwargs):
    out = []
    for i, name in enumerate(names):
        row = {k: v[i : i + 1] for k, v in batch.items()}
        with torch.no_grad():
            if name == mixed_batch.BASE:
                with model.disable_adapter():
                    out.append(model.generate(**row, **kwargs))
            else:
                model.set_adapter(name)
                out.append(model.generate(**row, **kwargs))
    return out


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_beams": 1},
        {"num_beams": 3},
        {"num_beams": 2, "num_return_sequences": 2},
    ],
    ids=["greedy", "beams3", "beams2-return2"],
)
def test_generate_with_beam_search(kwargs):
    model = multi_adapter_model(names=("x", "y"))
    batch = M.inputs("llama", batch=3)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    names = ["x", "__base__", "y"]
    common = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, **kwargs}
    with torch.no_grad():
        mixed = model.generate(**batch, adapter_names=names, **common)
    expected = torch.cat(generate_each(model, batch, names, **common))
    torch.testing.assert_close(mixed, expected, atol=0, rtol=0)
    by_adapter = {n: expected[i * mixed.shape[0] // 3] for i, n in enumerate(names)}
    assert not torch.equal(by_adapter["x"], by_adapter["y"])  # the adapters generate different continuations


# ---------------------------------------------------------------------------------------------------------------------
# refusals: one clear error each (docs/errors.md)


@pytest.fixture
def two_adapters():
    return multi_adapter_model(names=("x", "y"), layers=1)


def test_mixed_batch_in_training_mode(two_adapters):
    two_adapters.train()
    with pytest.raises(ValueError, match=r"refused in training mode: call model.eval\(\)"):
        two_adapters(**M.inputs("llama", batch=2), adapter_names=["x", "y"])


def test_mixed_batch_while_merged(two_adapters):
    two_adapters.merge_adapter(["x"])
    with pytest.raises(ValueError, match=r"refused while adapters are merged .*unmerge_adapter\(\)"):
        two_adapters(**M.inputs("llama", batch=2), adapter_names=["x", "y"])
    layer = next(layer for _, layer in nora_layers(two_adapters))
    with pytest.raises(ValueError, match=r"refused while adapters are merged"):  # the layer refuses on its own too
        layer(torch.randn(2, 3, layer.in_features), adapter_names=["x", "y"])


def test_mixed_batch_unknown_adapter_name(two_adapters):
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) 'typo'. Loaded adapters: 'x', 'y'"):
        two_adapters(**M.inputs("llama", batch=2), adapter_names=["x", "typo"])


def test_mixed_batch_names_not_one_per_row(two_adapters):
    with pytest.raises(ValueError, match=r"adapter_names has 3 names but the input has 2 rows"):
        two_adapters(**M.inputs("llama", batch=2), adapter_names=["x", "y", "x"])
    layer = next(layer for _, layer in nora_layers(two_adapters))
    with pytest.raises(ValueError, match=r"adapter_names has 1 names but this layer's input has 2 rows"):
        layer(torch.randn(2, 3, layer.in_features), adapter_names=["x"])


def test_mixed_batch_names_not_a_list(two_adapters):
    with pytest.raises(TypeError, match=r"adapter_names must be a list with one adapter name per batch row"):
        two_adapters(**M.inputs("llama", batch=1), adapter_names="x")


def test_mixed_batch_layer_with_adapters_disabled(two_adapters):
    layer = next(layer for _, layer in nora_layers(two_adapters))
    layer.enable_adapters(False)
    with pytest.raises(ValueError, match=r"adapter_names was passed while the adapters are disabled"):
        layer(torch.randn(2, 3, layer.in_features), adapter_names=["x", "y"])


def test_mixed_batch_inside_disable_adapter_is_the_base_as_in_peft(two_adapters):
    """Inside `with model.disable_adapter():` PeftModel drops adapter_names before any tuner sees it (as for PEFT
    LoRA): every row is the plain base, which is what the context asks for; leaving it restores the rows' adapters."""
    batch = M.inputs("llama", batch=2)
    with torch.no_grad():
        with two_adapters.disable_adapter():
            disabled = two_adapters(**batch, adapter_names=["x", "y"]).logits
            base = two_adapters(**batch).logits
        mixed = two_adapters(**batch, adapter_names=["y", "x"]).logits
    torch.testing.assert_close(disabled, base, atol=0, rtol=0)
    assert (mixed - base).abs().max() > 1e-4  # the adapters move the output, so the equality above is not vacuous
    torch.testing.assert_close(mixed[0], own_forward(two_adapters, "y", batch)[0], atol=1e-6, rtol=0)


def test_mixed_batch_alora_offsets(two_adapters):
    with pytest.raises(ValueError, match=r"alora_offsets is an option of PEFT's aLoRA"):
        two_adapters(**M.inputs("llama", batch=2), adapter_names=["x", "y"], alora_offsets=[1, 1])


def test_mixed_batch_modules_to_save_passthrough():
    """PEFT's modules_to_save wrapper ignores adapter_names when its adapters are disabled: refused, not wrong rows."""
    model = multi_adapter_model(names=("x",), layers=1, modules_to_save=["lm_head"])
    wrapper = model.base_model.model.lm_head
    wrapper.enable_adapters(False)
    with pytest.raises(ValueError, match=r"have their own copy of a modules_to_save module"):
        model(**M.inputs("llama", batch=2), adapter_names=["x", "__base__"])


def activate(model, name):
    """Layer-level set_adapter / disable (transformers' own model.set_adapter needs peft >= 0.22)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.enable_adapters(name is not None)
            if name is not None:
                module.set_adapter(name)


def test_transformers_load_adapter_integration(tmp_path):
    """A transformers model with NoRA adapters from `model.load_adapter` (no PeftModel) takes adapter_names too; its
    forward would otherwise swallow the argument in **kwargs and give every row the active adapter."""
    source = multi_adapter_model(names=("x", "y"))
    source.save_pretrained(tmp_path)  # tmp_path / "x", tmp_path / "y"
    model = M.build("llama", num_hidden_layers=2)
    model.load_adapter(str(tmp_path / "x"), adapter_name="x")
    model.load_adapter(str(tmp_path / "y"), adapter_name="y")
    model.eval()
    batch = M.inputs("llama", batch=3)
    names = ["y", "__base__", "x"]
    with torch.no_grad():
        mixed = model(**batch, adapter_names=names).logits
        own = {}
        for name in ("x", "y"):
            activate(model, name)
            own[name] = model(**batch).logits
        activate(model, None)
        own["__base__"] = model(**batch).logits
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], own[name][i], atol=1e-6, rtol=0)
    assert (own["x"] - own["y"]).abs().max() > 1e-2
    with torch.no_grad():  # the hooks of the mixed call are gone: a plain call is the active adapter again
        activate(model, "x")
        torch.testing.assert_close(model(**batch).logits, own["x"], atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) 'typo'"):
        model(**batch, adapter_names=["x", "typo", "y"])
    with torch.no_grad():  # a refused call leaves no hooks behind either
        torch.testing.assert_close(model(**batch).logits, own["x"], atol=0, rtol=0)
