"""Where an extra loaded adapter's memory goes beyond its tensor bytes (issue 21 diagnostics; RESULTS.md (c) reading).

    python benchmarks/diag_adapter_overhead.py

Each cell runs in a fresh process; RSS after malloc_trim(0), torch threads 1, no model needed:
- the floor: N adapters of 210 modules x two 64 x 32 float32 nn.Parameters in ParameterDicts (SmolLM2 r=64/32's
  shapes), created with requires_grad=False, or created trainable and then frozen (what PEFT's inference-mode load
  did before nora created them frozen: the tensors keep their autograd metadata);
- safetensors: Python memory (tracemalloc) still held after loading an 840-tensor file (a SmolLM2 compact adapter's
  count: 420 inner factors + 420 sketches) and dropping the result, by `safe_open(...).get_tensor` (what PEFT's
  `safe_load_file` uses) and by `safetensors.torch.load(bytes)`.
Writes results/adapters_overhead.json.
"""

from __future__ import annotations

import ctypes
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, result_payload, write_json

MODULES, SHAPE, ADAPTERS, LOADS = 210, (64, 32), 32, 4


def _rss_mb() -> float:
    import os

    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _floor_child(mode: str) -> dict:
    import torch
    from torch import nn

    torch.set_num_threads(1)
    trim = ctypes.CDLL("libc.so.6").malloc_trim
    mods = [nn.Module() for _ in range(MODULES)]
    for m in mods:
        m.a, m.b = nn.ParameterDict(), nn.ParameterDict()
    gc.collect()
    trim(0)
    before = _rss_mb()
    for k in range(ADAPTERS):
        for m in mods:
            for d in (m.a, m.b):
                p = nn.Parameter(torch.randn(*SHAPE), requires_grad=mode == "trainable_then_frozen")
                p.requires_grad_(False)
                d[f"a{k}"] = p
        gc.collect()
        trim(0)
    per = (_rss_mb() - before) / ADAPTERS
    data = 2 * MODULES * SHAPE[0] * SHAPE[1] * 4 / 2**20
    return {"cell": f"floor_{mode}", "mb_per_adapter": per, "data_mb_per_adapter": data, "ratio": per / data}


def _safetensors_child(mode: str) -> dict:
    import tracemalloc

    import torch
    from safetensors import safe_open
    from safetensors.torch import load, save_file

    path = Path(tempfile.mkdtemp(prefix="nora-st-")) / "f.safetensors"
    tensors = {f"m{i}.inner": torch.randn(*SHAPE) for i in range(MODULES * 2)}
    tensors.update({f"m{i}.sketch": torch.randn(4, 64) for i in range(MODULES * 2)})
    save_file(tensors, path)

    def read():
        if mode == "safe_open":
            with safe_open(path, "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        return load(path.read_bytes())

    read()
    gc.collect()
    tracemalloc.start()
    start = tracemalloc.take_snapshot()
    for _ in range(LOADS):
        out = read()
        del out
        gc.collect()
    kept = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(start, "lineno")) / LOADS
    tracemalloc.stop()
    return {"cell": f"safetensors_{mode}", "tensors": len(tensors), "kept_bytes_per_load": kept,
            "kept_bytes_per_tensor": kept / len(tensors)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        fn = _floor_child if argv[1] == "floor" else _safetensors_child
        print(json.dumps(fn(argv[2])))
        return 0
    if argv:
        raise SystemExit(f"diag_adapter_overhead.py takes no arguments, got {argv}")
    rows = []
    for kind, mode in [("floor", "frozen"), ("floor", "trainable_then_frozen"), ("st", "safe_open"), ("st", "load")]:
        out = subprocess.run([sys.executable, __file__, "_child", kind, mode], check=True, capture_output=True,
                             text=True).stdout  # fmt: skip
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    write_json(RESULTS_DIR / "adapters_overhead.json", result_payload("adapters_overhead", rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
