"""Training worker for tests/test_distributed.py: `python worker.py MODE OUT` (1 process) or the same under
`torchrun --nproc_per_node 2` (gloo). MODE is "ddp" (DistributedDataParallel; plain training in 1 process) or "fsdp"
(FSDP2 `fully_shard` of every decoder layer and the root).

A tiny 2-layer random Llama gets NoRA (r=8, r_inner=4, randomized SVD, both inner factors gaussian so both receive
gradients) and trains STEPS SGD steps on a fixed global batch sequence; each rank takes its contiguous slice of every
global batch. Rank 0 writes the adapter (save_pretrained) and OUT/losses.json: {"world", "mode", "losses" (global
means), "outer_sha256" (one digest of the outer factors per rank), "sharded_params" (DTensor parameters), "params"}.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _models as M  # tests/_models.py (sets torch threads to 1)
import nora

STEPS = 5
GLOBAL_BATCH = 4
LR = 5.0
LAYERS = 2
CONFIG = {"r": 8, "r_inner": 4, "init_weights": False, "svd_method": "randomized", "inner_init_std": 0.1}
if os.environ.get("NORA_ACTIVATION_MEMORY"):  # tests/test_lowmem.py: "low" / "folded" (else the config's default)
    CONFIG["activation_memory"] = os.environ["NORA_ACTIVATION_MEMORY"]


def build(inner_seed: int = 1000):
    """The NoRA model (on the fixed base weights). The global RNG is re-seeded with `inner_seed` after the base is
    built: it only affects the inner factors; the randomized SVD must not depend on it (per-module seeds)."""
    base = M.build("llama", num_hidden_layers=LAYERS)
    torch.manual_seed(inner_seed)
    return get_peft_model(base, nora.NoraConfig(**CONFIG))


def global_batch(step: int) -> torch.Tensor:
    """Token ids (GLOBAL_BATCH x SEQ) of step `step`: two fixed batches, alternating (so the loss on each visibly
    falls). All sequences have the same length, so the mean of the two half batches' token-mean losses is the full
    batch's token-mean loss."""
    return M.inputs("llama", seed=1000 + step % 2, batch=GLOBAL_BATCH)["input_ids"]


def outer_digest(model) -> str:
    """sha256 of the bytes of every frozen outer factor (nora_B / nora_A buffers), in state_dict order."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        if ".nora_B." in key or ".nora_A." in key:
            digest.update(key.encode())
            digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def gather_strings(text: str, world: int) -> list[str]:
    if world == 1:
        return [text]
    out: list = [None] * world
    dist.all_gather_object(out, text)
    return out


def main(mode: str, out: Path) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    # DDP: the inner factors start different on every rank (DDP broadcasts rank 0's at wrap time, rank 0 seeds
    # like the 1-process run); the outer factors are never broadcast before outer_digest, so equal digests prove
    # that the randomized SVD is seeded per module. FSDP2 broadcasts nothing, so every rank seeds alike.
    model = build(inner_seed=1000 + rank if mode == "ddp" else 1000)
    digests = gather_strings(outer_digest(model), world)
    model.train()

    sharded = 0  # parameters that are DTensors (sharded by FSDP2)
    if mode == "ddp":
        net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    elif mode == "fsdp":
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        if world > 1:
            for layer in model.base_model.model.model.layers:
                fully_shard(layer)
            fully_shard(model)
        net = model
        sharded = sum(isinstance(p, DTensor) for p in model.parameters())
    else:
        raise SystemExit(f"unknown mode {mode!r}")

    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=LR)
    per_rank = GLOBAL_BATCH // world
    losses = []
    for step in range(STEPS):
        ids = global_batch(step)[rank * per_rank : (rank + 1) * per_rank]
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        logged = loss.detach().clone()
        if world > 1:
            dist.all_reduce(logged)
            logged /= world
        losses.append(logged.item())

    if mode == "fsdp" and world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # collective: every rank takes part; with cpu_offload only rank 0 receives the full tensors
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = None
    if rank == 0:
        model.save_pretrained(out, state_dict=state)
        record = {"world": world, "mode": mode, "losses": losses, "outer_sha256": digests, "sharded_params": sharded}
        record["params"] = sum(1 for _ in model.parameters())
        (out / "losses.json").write_text(json.dumps(record, indent=1))
    if world > 1:
        # No barrier, and drop DDP before the process group: a gloo barrier keeps the earlier gradient all-reduce
        # works (tensors with Python objects) alive, and if the last reference to the group then dies while the
        # main thread holds the GIL (DDP's Reducer freed at function exit), ~ProcessGroupGloo joins a gloo thread
        # that waits for the GIL to free those tensors: a deadlock (hit in 1 of the first 6 runs on torch 2.13 CPU; none in 16 runs since).
        del net, optimizer, params
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
