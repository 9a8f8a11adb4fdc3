"""Run by tests/test_compact.py in a fresh process: load a saved adapter onto a rebuilt base and save its output.

python tests/_compact_child.py KIND ADAPTER_DIR THREADS OUT.pt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _models

MLP_DIM = 384


def build_base(kind: str) -> nn.Module:
    """Deterministic base models: the tiny Llama of _models, or an MLP whose square weights have a flat spectrum
    (Gaussian 384 x 384: the regime where a float32 SVD's vectors move with the thread count)."""
    if kind == "llama":
        return _models.build("llama", num_hidden_layers=2)
    if kind == "mlp":
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(MLP_DIM, MLP_DIM), nn.GELU(), nn.Linear(MLP_DIM, MLP_DIM)).eval()
    raise ValueError(kind)


def base_inputs(kind: str):
    if kind == "llama":
        return _models.inputs("llama")
    gen = torch.Generator().manual_seed(1)
    return {"input": torch.randn(4, MLP_DIM, generator=gen)}


def run(model: nn.Module, kind: str) -> torch.Tensor:
    with torch.no_grad():
        batch = base_inputs(kind)
        return model(**batch).logits if kind == "llama" else model(batch["input"])


def main() -> None:
    kind, adapter, threads, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    from peft import PeftModel

    import nora  # noqa: F401

    torch.set_num_threads(threads)
    model = PeftModel.from_pretrained(build_base(kind), adapter).eval()
    torch.save({"out": run(model, kind), "threads": torch.get_num_threads()}, out)


if __name__ == "__main__":
    main()
