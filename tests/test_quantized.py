"""NoRA on quantized bases (nora.quantized): a matrix over bitsandbytes nf4 / fp4 (uint8 and bf16 storage), int8,
torchao int8 / int4 weight-only and HQQ 4-bit, on a tiny Llama (and SmolLM2 through transformers' loaders, slow).

Each backend: exact identity at init; only the inner factors change after a step; save + reload on the same
quantized base gives equal logits; merging into the dequantized model equals the unmerged output; merging in place
warns. Then the refusals (optimum-quanto, GPTQ, AWQ, EETQ, AQLM, tensor-subclass weights), AwSVD calibration through
quantized layers, and DeepSpeed ZeRO-3-style gathering of every weight read at init (a stub).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import json
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import _models as M
import nora
import nora.model
from nora.harness.quantize import quantize_linears

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_NEEDS = {"nf4": "bitsandbytes", "fp4": "bitsandbytes", "nf4-bf16": "bitsandbytes", "int8": "bitsandbytes",
          "torchao-int8": "torchao", "torchao-int4": "torchao", "hqq4": "hqq"}  # fmt: skip
SCHEMES = [
    pytest.param(s, marks=pytest.mark.skipif(importlib.util.find_spec(pkg) is None, reason=f"{pkg} not installed"))
    for s, pkg in _NEEDS.items()
]
#: merged (dequantized float model) vs unmerged output: float32 rounding of W + dW vs W x + dW x on logits of ~1
MERGE_ATOL = 1e-5


@functools.cache
def _llama() -> nn.Module:
    """A small random Llama (eval mode). Dimensions fit bitsandbytes' CPU 4-bit kernel, which an inference forward
    on AVX512-BF16 CPUs switches to: out_features % 32 == 0 and in_features >= the block size 64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=M.VOCAB, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def quantized_llama(scheme: str) -> nn.Module:
    """The small Llama with every decoder linear quantized (deterministic: same scheme -> same quantized weights)."""
    return quantize_linears(copy.deepcopy(_llama()), scheme)


def config(**kwargs) -> nora.NoraConfig:
    return nora.NoraConfig(**{"r": 8, "r_inner": 4, "target_modules": TARGETS, **kwargs})


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def one_step(model, batch, lr=1e-2):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    opt.step()
    opt.zero_grad()


def tensors(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (quantized storage included), cloned."""
    state = {}
    for k, v in [*model.named_parameters(), *model.named_buffers()]:
        if type(v) not in (torch.Tensor, nn.Parameter) and hasattr(v, "__tensor_flatten__"):  # torchao: its parts
            for part in v.__tensor_flatten__()[0]:
                state[f"{k}.{part}"] = getattr(v, part).detach().clone()
        else:
            state[k] = v.detach().clone()
    return state


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (4-bit data stored as bfloat16 holds NaN bit patterns, and NaN != NaN)."""
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_identity_at_init_and_layers(scheme):
    base = quantized_llama(scheme)
    batch = M.inputs("llama")
    expected = logits(base, batch)
    model = get_peft_model(base, config())
    layers = dict(nora.model.nora_layers(model))
    assert len(layers) == len(TARGETS)
    assert all(layer.quantization_backend is not None for layer in layers.values())
    assert torch.equal(logits(model, batch), expected)  # B' = 0: exactly the quantized base's output
    # the outer factors come from the float32 dequantized weight: B A is its best rank-r approximation
    layer = layers["base_model.model.model.layers.0.self_attn.q_proj"]
    weight = layer._base_weight_mn()
    assert weight.dtype == torch.float32
    svals = torch.linalg.svdvals(weight.double())
    best = svals[8:].square().sum().sqrt()
    err = (weight.double() - layer.nora_B["default"].double() @ layer.nora_A["default"].double()).norm()
    assert err == pytest.approx(best.item(), rel=1e-4)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_only_inner_factors_change_after_a_step(scheme):
    model = get_peft_model(quantized_llama(scheme), config())
    batch = M.inputs("llama")
    out_before = logits(model, batch)  # first: on AVX512-BF16 CPUs this forward repacks bnb 4-bit storage in place
    before = tensors(model)
    one_step(model, batch)
    after = tensors(model)
    changed = {k for k in before if not same_bits(before[k], after[k])}
    assert changed, "the step changed nothing"
    assert all(".nora_inner_" in k for k in changed), sorted(changed - {k for k in changed if ".nora_inner_" in k})
    assert (logits(model, batch) - out_before).abs().max() > 1e-4


@pytest.mark.parametrize("scheme", SCHEMES)
def test_save_reload_on_the_same_quantized_base(scheme, tmp_path):
    model = get_peft_model(quantized_llama(scheme), config())
    batch = M.inputs("llama")
    one_step(model, batch)
    expected = logits(model, batch)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (
        saved["base_quantization"]["backend"]
        == nora.model.nora_layers(model).__next__()[1].quantization_backend.backend_name
    )
    reloaded = PeftModel.from_pretrained(quantized_llama(scheme), tmp_path)
    torch.testing.assert_close(logits(reloaded, batch), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_merge_into_the_dequantized_model_is_exact(scheme):
    # train mode (dropout is 0): bitsandbytes' 4-bit *inference* kernel on AVX512-BF16 CPUs computes in bfloat16
    # (~5e-3 from the float32 product), which no float32 merge can match; training forwards use the float32 path
    model = get_peft_model(quantized_llama(scheme), config()).train()
    batch = M.inputs("llama")
    one_step(model, batch)
    expected = logits(model, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the exact path never requantizes, so it never warns
        merged = nora.dequantize_base(model).merge_and_unload()
    assert not any(nora.quantized.is_quantized_linear(m) for m in merged.modules())
    assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith(tuple(TARGETS)))
    torch.testing.assert_close(logits(merged, batch), expected, rtol=0, atol=MERGE_ATOL)


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s.values[0] in ("nf4", "int8", "hqq4")])
def test_merge_in_place_requantizes_with_a_warning(scheme):
    model = get_peft_model(quantized_llama(scheme), config())
    one_step(model, M.inputs("llama"))
    with pytest.warns(UserWarning, match=r"requantizes its weight.*nora.dequantize_base"):
        model.merge_adapter()
    layer = dict(nora.model.nora_layers(model))["base_model.model.model.layers.0.self_attn.q_proj"]
    assert layer.merged and nora.quantized.is_quantized_linear(layer.get_base_layer())


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao not installed")
def test_torchao_in_place_merge_without_its_config_is_refused():
    model = get_peft_model(quantized_llama("torchao-int8"), config())
    refused = pytest.raises(TypeError, match=r"cannot merge into a torchao layer in place.*nora.dequantize_base")
    with refused, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_adapter()


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s.values[0] in ("nf4", "int8", "torchao-int8", "hqq4")])
def test_awsvd_calibration_runs_through_quantized_layers(scheme):
    base = quantized_llama(scheme)
    batch = M.inputs("llama")
    cfg = config(outer_init="awsvd")
    nora.calibrate(base, cfg, [batch, M.inputs("llama", seed=2)])
    expected = logits(base, batch)
    model = get_peft_model(base, cfg)
    assert torch.equal(logits(model, batch), expected)
    report = nora.reconstruction_report(model)
    assert len(report) == len(TARGETS) and all("weighted_error" in row for row in report)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_4bit_weight_repacked_by_an_inference_forward_dequantizes_the_same():
    """On AVX512-BF16 CPUs a 4-bit eval forward repacks the weight in place (block scales rounded to bfloat16, and
    transposed: bitsandbytes 0.50's own inverse leaves them transposed). down_proj has 2 blocks per row, so a
    transposed scale would be caught."""
    base = quantized_llama("nf4")
    layer = base.model.layers[0].mlp.down_proj
    backend = nora.quantized.resolve_backend(layer)
    before = backend.dequantize(layer)
    with torch.no_grad():
        base(**M.inputs("llama"))
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack")
    after = backend.dequantize(layer)
    # bf16 scales round by < 2^-8 relative (measured 1.6e-3 here, 2e-4 on SmolLM2); a transposed scale gives ~0.3
    assert ((after - before).norm() / before.norm()).item() < 4e-3
    model = get_peft_model(base, config())  # and the adapter built on the repacked base is still an identity
    batch = M.inputs("llama")
    with model.disable_adapter():
        expected = logits(model, batch)
    assert torch.equal(logits(model, batch), expected)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_export_lora_of_a_quantized_base_is_float(tmp_path):
    model = get_peft_model(quantized_llama("nf4"), config())
    _, state = nora.lora_state_dict(model)
    assert all(v.dtype == torch.float32 for v in state.values())  # the dequantized dtype, not the uint8 storage


# ---- refusals -------------------------------------------------------------------------------------------------------


class _PackedStub(nn.Module):
    """What GPTQ / AWQ / EETQ / AQLM layers look like: no nn.Linear, no `.weight`, packed integer buffers."""

    def __init__(self):
        super().__init__()
        self.register_buffer("qweight", torch.zeros(8, 1, dtype=torch.int32))

    def forward(self, x):
        return x


def _stub_layer(module_path: str, class_name: str, base_cls: type = nn.Linear) -> nn.Module:
    cls = type(class_name, (base_cls,), {"__module__": module_path})
    return cls(8, 8) if base_cls is nn.Linear else cls()


# GPTQ, AWQ, EETQ and AQLM need CUDA builds, so they cannot install here: stubs named as the real classes
@pytest.mark.parametrize("base_cls", [nn.Linear, _PackedStub], ids=["linear-with-float-weight", "packed-module"])
@pytest.mark.parametrize(
    ("module_path", "class_name", "label"),
    [
        ("gptqmodel.nn_modules.qlinear.torch", "TorchQuantLinear", "GPTQ"),
        ("auto_gptq.nn_modules.qlinear", "QuantLinear", "GPTQ"),
        ("awq.modules.linear.gemm", "WQLinear_GEMM", "AWQ"),
        ("eetq.modules.qlinear", "EetqLinear", "EETQ"),
        ("aqlm.inference", "QuantizedLinear", "AQLM"),
    ],
)
def test_unsupported_quantized_layers_are_refused_by_type(module_path, class_name, label, base_cls):
    base = M.OneLinear(8, 8)
    # an nn.Linear subclass with a float weight would pass the nn.Linear check; a packed module would fail it with
    # "only torch.nn.Linear and Conv1D": the quantization refusal comes first in both cases
    base.lin = _stub_layer(module_path, class_name, base_cls)
    with pytest.raises(TypeError, match=rf"is a {module_path}\.{class_name} \({label} is not supported\).*Supported"):
        get_peft_model(base, nora.NoraConfig(r=4, r_inner=2, target_modules=["lin"]))


@pytest.mark.skipif(importlib.util.find_spec("optimum") is None, reason="optimum-quanto not installed")
def test_quanto_is_refused_although_its_weight_reports_float32():
    from optimum.quanto import freeze, qint4, quantize

    base = M.OneLinear(64, 64)
    quantize(base, weights=qint4)
    freeze(base)
    assert base.lin.weight.dtype == torch.float32  # why it used to be silently accepted
    with pytest.raises(TypeError, match=r"QLinear \(optimum-quanto is not supported\)"):
        get_peft_model(base, nora.NoraConfig(r=4, r_inner=2, target_modules=["lin"]))


class _OddTensor(torch.Tensor):
    """A tensor subclass no backend knows (as a new quantization library's weight would be)."""


def test_a_tensor_subclass_weight_is_refused():
    base = M.OneLinear(8, 8)
    base.lin.weight = nn.Parameter(base.lin.weight.detach().as_subclass(_OddTensor), requires_grad=False)
    with pytest.raises(TypeError, match=r"its weight is a .*_OddTensor\).*Supported quantized layers"):
        get_peft_model(base, nora.NoraConfig(r=4, r_inner=2, target_modules=["lin"]))


def test_a_plain_integer_weight_is_refused_with_the_supported_backends():
    """int8 values in a plain tensor (no scales, no backend): refused, and the message points at the supported
    backends, not at "quantized bases are unsupported" (they are supported)."""
    base = M.OneLinear(8, 8)
    base.lin.weight = nn.Parameter(torch.ones(8, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match=r"got dtype torch.int8 in a plain tensor.*bitsandbytes.*torchao.*hqq") as exc:
        get_peft_model(base, nora.NoraConfig(r=4, r_inner=2, target_modules=["lin"]))
    assert "not supported" not in str(exc.value)


# ---- sharded weights (DeepSpeed ZeRO-3) -----------------------------------------------------------------------------


def test_every_init_weight_read_is_gathered(monkeypatch):
    """A ZeRO-3 stub: each targeted weight holds no data (numel 0) except inside gather_params_ctx, which swaps the
    whole weight in and out. get_peft_model must then build the same factors and fingerprint as on a plain model."""
    reference = get_peft_model(M.fresh("llama"), config())
    sharded = M.fresh("llama")
    full = {}
    for name, module in sharded.named_modules():
        if name.endswith(tuple(TARGETS)):
            full[id(module.weight)] = module.weight.data
            module.weight.data = torch.empty(0)
    gathered = []

    @contextlib.contextmanager
    def fake_gather(params, modifier_rank=0, fwd_module=None):
        assert modifier_rank is None  # read-only: nothing is broadcast back
        params = [p for p in params if id(p) in full]
        for p in params:
            p.data = full[id(p)]
        gathered.extend(params)
        try:
            yield
        finally:
            for p in params:
                p.data = torch.empty(0)

    monkeypatch.setattr(nora.model, "gather_params_ctx", fake_gather)
    model = get_peft_model(sharded, config())
    assert len(gathered) == len(full) == len(TARGETS)
    got, want = dict(nora.model.nora_layers(model)), dict(nora.model.nora_layers(reference))
    for name, layer in got.items():
        assert torch.equal(layer.nora_B["default"], want[name].nora_B["default"]), name
        assert torch.equal(layer.nora_A["default"], want[name].nora_A["default"]), name
    assert model.peft_config["default"].base_fingerprint == reference.peft_config["default"].base_fingerprint


# ---- SmolLM2 through transformers' quantizers (slow) ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s.values[0] in ("nf4", "int8", "torchao-int8")])
def test_smollm2_quantized_by_transformers(scheme, tmp_path):
    from nora.harness import HarnessError
    from nora.harness.models import load_model

    try:
        base, tokenizer = load_model("smollm2-135m", quantize=scheme)
    except HarnessError as exc:
        pytest.skip(str(exc))
    batch = dict(tokenizer(["The quick brown fox jumps over the lazy dog"], return_tensors="pt"))
    expected = logits(base, batch)
    cfg = nora.NoraConfig(r=16, r_inner=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 1])
    model = get_peft_model(base, cfg)
    assert torch.equal(logits(model, batch), expected)
    meta = model.peft_config["default"].base_quantization
    assert meta["quant_method"] in ("bitsandbytes", "torchao"), meta
    one_step(model, {**batch, "input_ids": batch["input_ids"]})
    tuned = logits(model, batch)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(load_model("smollm2-135m", quantize=scheme)[0], tmp_path)
    torch.testing.assert_close(logits(reloaded, batch), tuned, rtol=0, atol=1e-5)
    quantized_train = logits(reloaded.train(), batch)
    dequantized = nora.dequantize_base(reloaded)
    unmerged = logits(dequantized, batch)
    merged = dequantized.merge_and_unload()
    assert not hasattr(merged.config, "quantization_config")
    # logits of ~10-30: float32 rounding of the merged weight, summed over 30 layers
    torch.testing.assert_close(logits(merged, batch), unmerged, rtol=0, atol=1e-3)
    # and the dequantized model is the quantized one where the backend computes x @ dequant(W) in float32: torchao
    # weight-only. Not bnb int8 (LLM.int8 quantizes the activations too), nor bnb 4-bit after an inference forward on
    # an AVX512-BF16 CPU (repacked: it computes in bfloat16 from then on; the tiny-model matrix above covers 4-bit)
    if scheme == "torchao-int8":
        torch.testing.assert_close(logits(merged, batch), quantized_train, rtol=0, atol=1e-3)


# ---- harness: nora train / eval / export --quantize -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama64_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama directory with hidden 64 (fits bitsandbytes' CPU 4-bit kernel; see _llama)."""
    from conftest import build_tiny_llama

    path = tmp_path_factory.mktemp("tiny-llama64")
    build_tiny_llama(tiny_tokenizer, hidden=64, layers=1).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_cli_train_eval_export_on_a_4bit_base(tiny_llama64_dir, tiny_task_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from nora.cli import main
    from nora.harness.models import load_model

    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_llama64_dir), "--data", str(tiny_task_dir / "train.json"), "--out", str(out)]
    tiny = ["--r", "8", "--r-inner", "4", "--batch-size", "4", "--no-progress", "--max-steps", "2", "--lr", "1e-2"]
    assert main([*argv, *tiny, "--quantize", "nf4"]) == 0
    recorded = json.loads((out / "adapter_config.json").read_text())["base_quantization"]
    assert recorded["quant_method"] == "bitsandbytes" and recorded["bnb_4bit_quant_type"] == "nf4"
    evaluate = ["eval", "--adapter", str(out), "--task", str(tiny_task_dir / "test.json"), "--protocol", "loglik"]
    assert main([*evaluate, "--no-progress"]) == 2  # the adapter records a quantized base: --quantize is required
    assert "was trained on a quantized base" in capsys.readouterr().err
    assert main([*evaluate, "--no-progress", "--quantize", "nf4", "--out", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["quantize"] == "nf4"
    merged_dir = tmp_path / "merged"
    assert (
        main(["export", "--adapter", str(out), "--to", "merged", "--out", str(merged_dir), "--quantize", "nf4"]) == 0
    )
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not hasattr(merged.config, "quantization_config")
    quantized = PeftModel.from_pretrained(load_model(tiny_llama64_dir, quantize="nf4")[0], out).train()  # fp32 path
    tokens = torch.randint(0, 300, (2, 12))
    torch.testing.assert_close(logits(merged.train(), {"input_ids": tokens}), logits(quantized, {"input_ids": tokens}),
                               rtol=0, atol=MERGE_ATOL)  # fmt: skip


def test_cli_refuses_a_full_fine_tune_of_a_quantized_base(tiny_llama64_dir, tiny_task_dir, tmp_path, capsys):
    from nora.cli import main

    argv = [
        "train",
        "--model",
        str(tiny_llama64_dir),
        "--data",
        str(tiny_task_dir / "train.json"),
        "--out",
        str(tmp_path),
    ]
    assert main([*argv, "--method", "full", "--quantize", "nf4", "--no-progress"]) == 2
    assert "--method full trains every weight" in capsys.readouterr().err
