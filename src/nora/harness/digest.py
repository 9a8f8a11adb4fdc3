"""A digest of a NoRA model's frozen outer factors, taken on every rank right after get_peft_model.

Under torchrun each rank runs its own (Aw)SVD; they must build identical factors, because DDP later broadcasts
rank 0's buffers and would silently hide a disagreement. `nora train` records one digest per rank in metrics.json
(`outer_sha256`, gathered before the Trainer wraps the model), so a run can prove that its ranks agreed.
"""

from __future__ import annotations

import hashlib

import torch


def outer_factor_digest(model: torch.nn.Module) -> str | None:
    """sha256 over the bytes of every frozen outer factor (`nora_B` / `nora_A` buffers), in name order; None for a
    model without NoRA layers."""
    h = hashlib.sha256()
    found = False
    for name, buf in sorted(model.named_buffers()):
        if ".nora_B." in name or ".nora_A." in name:
            found = True
            h.update(name.encode())
            h.update(buf.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest() if found else None


def rank_digests(model: torch.nn.Module) -> list[str | None]:
    """[digest of rank 0, rank 1, ...] (all-gathered under torch.distributed; [own digest] in one process)."""
    digest = outer_factor_digest(model)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [digest]
    gathered: list[str | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, digest)
    return gathered
