"""Shared helpers of the benchmark scripts: model loading, calibration text, machine facts, JSON results and a
resumable runner cached per (benchmark, method, seed).

Every bench script is runnable as `python benchmarks/bench_NAME.py` from the repo root (or through `nora bench NAME`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib
import importlib.util
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
CACHE_DIR = RESULTS_DIR / "cache"
DATA_DIR = Path(os.environ.get("NORA_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))

# make `import nora` work when run as a plain script from a checkout without `pip install -e`
if str(REPO_ROOT / "src") not in sys.path and importlib.util.find_spec("nora") is None:
    sys.path.insert(0, str(REPO_ROOT / "src"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ----------------------------------------------------------------------------------------------------------- machine
def machine_facts() -> dict[str, Any]:
    """CPU model, core count, RAM, torch version and threads, date: recorded with every result."""
    import torch

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 1024**2, 1)
    facts = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "mem_total_gb": mem_gb,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host_load_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    for pkg in ("transformers", "peft", "tokenizers", "safetensors", "numpy", "nora"):
        with contextlib.suppress(Exception):
            facts[pkg] = importlib.import_module(pkg).__version__
    facts.update(nora_revision())
    return facts


def nora_revision() -> dict[str, Any]:
    """The nora commit a result ran with, and the files under src/ that differed from it (the tree is shared, so a
    run can see someone's uncommitted edit): recorded with every result."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()  # fmt: skip

    with contextlib.suppress(Exception):
        return {"nora_commit": git("rev-parse", "HEAD"),
                "nora_src_modified": git("status", "--porcelain", "--", "src").splitlines()}  # fmt: skip
    return {"nora_commit": None, "nora_src_modified": None}


def command_line() -> str:
    """The command that produced a result, as typed from the repo root."""
    script = Path(sys.argv[0])
    with contextlib.suppress(ValueError):
        script = script.resolve().relative_to(REPO_ROOT)
    return " ".join(["python", str(script), *sys.argv[1:]])


# ----------------------------------------------------------------------------------------------------------- JSON
def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Atomic JSON write (tmp file + os.replace), insertion key order."""
    from nora.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")
    return Path(path)


def replace_block(path: str | os.PathLike, name: str, text: str) -> None:
    """Replace what stands between the lines `<!-- NAME:begin -->` and `<!-- NAME:end -->` of a Markdown file (the
    generated tables of RESULTS.md), atomically; the rest of the file is left as written by hand."""
    from nora.io import write_text

    path = Path(path)
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    doc = path.read_text()
    if doc.count(begin) != 1 or doc.count(end) != 1 or doc.index(begin) > doc.index(end):
        raise ValueError(f"{path} must contain the marker lines {begin!r} and {end!r} once each, in that order; "
                         "put them around the generated block")  # fmt: skip
    head, rest = doc.split(begin, 1)
    tail = rest.split(end, 1)[1]
    write_text(path, f"{head}{begin}\n\n{text.strip()}\n\n{end}{tail}")


def _json_default(obj):
    with contextlib.suppress(Exception):
        import torch

        if isinstance(obj, torch.Tensor):
            return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, set):
        return sorted(obj)
    return str(obj)


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as fh:
        return json.load(fh)


def result_payload(benchmark: str, rows: Any, **extra: Any) -> dict[str, Any]:
    """The standard envelope of a results/*.json file."""
    return {"benchmark": benchmark, "command": command_line(), "machine": machine_facts(), **extra, "rows": rows}


# ----------------------------------------------------------------------------------------------------------- cache
def cache_path(benchmark: str, method: str, seed: int | str = 0, cache_dir: Path | None = None) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in method)
    return (cache_dir or CACHE_DIR) / benchmark / f"{safe}__seed{seed}.json"


def cached_run(
    benchmark: str,
    method: str,
    seed: int | str,
    fn: Callable[[], dict[str, Any]],
    *,
    params: dict[str, Any] | None = None,
    force: bool = False,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Run `fn()` once per (benchmark, method, seed) and keep its JSON result under results/cache/.

    A cached result is reused only when it was produced with the same `params` (so changing e.g. the number of
    steps re-runs it); `force=True` always re-runs. A crash leaves no partial file, so a rerun resumes where a long
    sweep stopped. Part 4 (accuracy study) reuses this for (task, method, seed) training runs.
    """
    path = cache_path(benchmark, method, seed, cache_dir)
    params = params or {}
    if path.exists() and not force:
        with contextlib.suppress(json.JSONDecodeError, KeyError):
            cached = read_json(path)
            if cached.get("params") == json.loads(json.dumps(params, default=_json_default)):
                cached["cached"] = True
                return cached
    start = time.time()
    result = fn()
    record = {
        "benchmark": benchmark,
        "method": method,
        "seed": seed,
        "params": params,
        "result": result,
        "wall_s": round(time.time() - start, 2),
        "machine": machine_facts(),
        "command": command_line(),
    }
    write_json(path, record)
    record["cached"] = False
    return record


def run_grid(
    benchmark: str,
    methods: Iterable[str],
    seeds: Iterable[int],
    fn: Callable[[str, int], dict[str, Any]],
    *,
    params: dict[str, Any] | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """`cached_run` over every (method, seed); finished cells are skipped, so an interrupted sweep resumes."""
    out = []
    for method in methods:
        for seed in seeds:
            rec = cached_run(benchmark, method, seed, lambda m=method, s=seed: fn(m, s), params=params, force=force)
            status = "cached" if rec["cached"] else f"{rec['wall_s']} s"
            log(f"[{benchmark}] {method} seed={seed}: {status}")
            out.append(rec)
    return out


# ----------------------------------------------------------------------------------------------------------- model
def projection_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of each of the 7 linear projections of one Llama-style decoder layer, from its config dict."""
    h, f = config["hidden_size"], config["intermediate_size"]
    hd = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    return {
        "q_proj": (q, h),
        "k_proj": (kv, h),
        "v_proj": (kv, h),
        "o_proj": (h, q),
        "gate_proj": (f, h),
        "up_proj": (f, h),
        "down_proj": (h, f),
    }


def adapter_params(kind: str, m: int, n: int, r: int, r_inner: int = 0) -> int:
    """Closed-form trainable parameters one adapter adds to one m x n linear layer (peft's and nora's layouts)."""
    return {
        "nora": 2 * r * r_inner,  # B' (r x r') and A' (r' x r)
        "loraxs": r * r,  # the single r x r matrix
        "lora": r * (m + n),
        "pissa": r * (m + n),
        "dora": r * (m + n) + m,  # + the magnitude vector
        "vera": r + m,  # lambda_d (r) and lambda_b (m); the random projections are frozen and shared
    }[kind]


SMOLLM2 = "smollm2-135m"


def smollm2_dir() -> Path:
    """The local HF directory of SmolLM2-135M-Instruct: nora.harness's GGUF -> safetensors cache (built once)."""
    from nora.harness.models import resolve_model_dir

    return Path(resolve_model_dir(SMOLLM2))


def load_model(name: str = SMOLLM2, dtype: str = "float32"):
    """(model, tokenizer) through `nora.harness.models.load_model` (offline; SmolLM2 from its shared cache)."""
    from nora.harness.models import load_model as harness_load_model

    return harness_load_model(name, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------- data
COMMONSENSE_TASKS = ("boolq", "ARC-Easy", "openbookqa")  # tasks with a train split (piqa has only test)


def commonsense_texts(split: str = "train", tasks: Iterable[str] = COMMONSENSE_TASKS) -> list[str]:
    """instruction + output of the commonsense data (LLM-Adapters format), interleaved across tasks so any prefix
    mixes all tasks; deterministic order."""
    per_task = []
    for task in tasks:
        path = DATA_DIR / "commonsense" / task / f"{split}.json"
        items = read_json(path)
        per_task.append([f"{it['instruction']}\n\n{it['output']}" for it in items])
    out = []
    for i in range(max(len(t) for t in per_task)):
        out.extend(t[i] for t in per_task if i < len(t))
    return out


def token_batches(tok, texts: list[str], n_seq: int, seq_len: int, batch_size: int = 8, pack: bool = True):
    """`n_seq` sequences of exactly `seq_len` tokens (pack=True: documents concatenated with EOS, then cut), as a
    list of {"input_ids", "attention_mask"} batches."""
    import torch

    eos = tok.eos_token_id if tok.eos_token_id is not None else 0
    seqs: list[list[int]] = []
    if pack:
        buf: list[int] = []
        for text in texts:
            buf.extend(tok(text, add_special_tokens=False)["input_ids"] + [eos])
            while len(buf) >= seq_len and len(seqs) < n_seq:
                seqs.append(buf[:seq_len])
                buf = buf[seq_len:]
            if len(seqs) >= n_seq:
                break
    else:
        for text in texts:
            ids = tok(text, add_special_tokens=False)["input_ids"][:seq_len]
            seqs.append(ids + [eos] * (seq_len - len(ids)))
            if len(seqs) >= n_seq:
                break
    if len(seqs) < n_seq:
        raise ValueError(f"not enough text for {n_seq} sequences of {seq_len} tokens (got {len(seqs)})")
    ids = torch.tensor(seqs, dtype=torch.long)
    return [
        {"input_ids": ids[i : i + batch_size], "attention_mask": torch.ones_like(ids[i : i + batch_size])}
        for i in range(0, n_seq, batch_size)
    ]


# ----------------------------------------------------------------------------------------------------------- misc
def median(values: Iterable[float]) -> float:
    vals = sorted(values)
    if not vals:
        return float("nan")
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else 0.5 * (vals[mid - 1] + vals[mid])


def fmt_int(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def fmt_m(n: float | None, digits: int = 2) -> str:
    """Millions as the papers print them (0.92M, 168M, 8.0B)."""
    if n is None:
        return "-"
    if n >= 1e9:
        return f"{n / 1e9:.{max(digits - 1, 1)}f}B"
    return f"{n / 1e6:.{digits}f}M"


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
