"""Shared outer factors: adapters of one layer whose frozen B, A are identical hold one tensor, not one copy each.

Two adapters built with the same outer settings on the same base weight get the same B and A (the SVD is
deterministic for a given input, and a reload restores the saved bits). Deduplication is on content, never on
names: candidates are the other adapters of the layer with equal `outer_settings` (a cheap key), and a tensor is
shared only if `torch.equal` confirms it. Each adapter keeps its own entry in `nora_B` / `nora_A` (so state dicts,
`save_pretrained(selected_adapters=[...])` and `delete_adapter` work per adapter as before); the entries merely
point to the same storage. Nothing writes into an outer factor in place except `load_state_dict`, which copies the
(verified equal) checkpoint values.
"""

from __future__ import annotations

import torch
from peft.tuners._buffer_dict import BufferDict

#: config fields that determine the outer factors (besides the base weight and, for awsvd, the channel scales)
OUTER_FIELDS = (
    "r",
    "rank_pattern",
    "outer_init",
    "outer_scaling",
    "awsvd_alpha",
    "awsvd_eps",
    "svd_method",
    "svd_niter",
    "svd_oversample",
    "init_seed",
    "save_outer_factors",
)


class OuterFactors(BufferDict):
    """The BufferDict of a layer's frozen outer factors (`nora_B`, `nora_A`). A state-dict entry that *is* the held
    tensor (`adopt_loaded` puts the shared tensor there) is not copied onto itself: such a self-copy changes nothing
    but bumps the tensor's version counter, which would invalidate the cached verification sketches of every adapter
    sharing it (`compact.layer_sketches`) and make each further compact load redo them in float64."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args) -> None:
        same = [prefix + k for k, t in self._buffers.items() if t is not None and state_dict.get(prefix + k) is t]
        held = {k: state_dict.pop(k) for k in same}
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args)
        finally:
            state_dict.update(held)
        missing_keys[:] = [k for k in missing_keys if k not in held]


def outer_settings(config) -> tuple:
    """The part of a NoraConfig that decides B and A (a prefilter: equal content is still checked)."""
    values = (getattr(config, f, None) for f in OUTER_FIELDS)
    return tuple(tuple(sorted(v.items())) if isinstance(v, dict) else v for v in values)  # hashable (rank_pattern)


def shares_outer(layer, a: str, b: str) -> bool:
    """Whether adapters a and b of `layer` hold the same B and A tensors (same storage)."""
    return layer.nora_B[a] is layer.nora_B[b] and layer.nora_A[a] is layer.nora_A[b]


def _same(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.shape == y.shape and x.dtype == y.dtype and x.device == y.device and bool(torch.equal(x, y))


def find_twin(layer, adapter: str, configs: dict, B: torch.Tensor, A: torch.Tensor) -> str | None:
    """Another adapter of `layer` whose outer factors equal (B, A) and whose config has the same outer settings."""
    pending = getattr(layer, "_outer_pending", {})
    key = outer_settings(configs[adapter]) if adapter in configs else None
    for other in layer.nora_B:
        if other == adapter or other in pending or other not in configs:
            continue
        if key is not None and outer_settings(configs[other]) != key:
            continue
        if _same(layer.nora_B[other], B) and _same(layer.nora_A[other], A):
            return other
    return None


def share_layer(layer, adapter: str, configs: dict) -> str | None:
    """Point `adapter`'s B, A at an identical twin's tensors on this layer; returns the twin's name (or None)."""
    if adapter not in layer.nora_B or adapter in getattr(layer, "_outer_pending", {}):
        return None
    twin = find_twin(layer, adapter, configs, layer.nora_B[adapter], layer.nora_A[adapter])
    if twin is not None and not shares_outer(layer, adapter, twin):
        layer.nora_B[adapter] = layer.nora_B[twin]
        layer.nora_A[adapter] = layer.nora_A[twin]
    return twin


def share_model(model, adapter: str, configs: dict) -> int:
    """share_layer on every NoRA layer; returns how many layers now share `adapter`'s outer factors."""
    from .layer import NoraLayer

    return sum(
        share_layer(module, adapter, configs) is not None
        for module in model.modules()
        if isinstance(module, NoraLayer)
    )


def share_records(configs: dict, adapter: str) -> bool:
    """Hold an equal `base_fingerprint` once: point `adapter`'s config at another adapter's equal dict (a
    fingerprint is ~38 KB of Python objects per adapter on SmolLM2; N adapters on one base record the same one).
    Nothing mutates a fingerprint in place (a new entry builds a new dict). Returns whether it now shares one."""
    fingerprint = getattr(configs.get(adapter), "base_fingerprint", None)
    if not fingerprint:
        return False
    for name, other in configs.items():
        theirs = getattr(other, "base_fingerprint", None)
        if name != adapter and theirs is not None and (theirs is fingerprint or theirs == fingerprint):
            configs[adapter].base_fingerprint = theirs
            return True
    return False


def light_placeholders(model, adapter: str) -> None:
    """Replace the zero placeholders of a checkpoint adapter's B, A (about to be loaded) by zero-stride views, so
    loading N adapters never holds N full-size placeholder copies; `adopt_loaded` puts the real tensors in."""
    from .layer import NoraLayer

    for module in model.modules():
        if not isinstance(module, NoraLayer) or adapter not in module.nora_B:
            continue
        if adapter not in getattr(module, "_outer_pending", {}):
            continue
        for buffers in (module.nora_B, module.nora_A):
            t = buffers[adapter]
            if t.device.type != "meta":
                buffers[adapter] = torch.zeros((), dtype=t.dtype, device=t.device).expand(t.shape)


def adopt_loaded(model, adapter: str, configs: dict, state_dict: dict) -> None:
    """Load side, before `load_state_dict`: give `adapter`'s B, A their final tensors: an identical twin's (shared;
    `torch.equal`-checked) or the checkpoint's own, so the copy that follows writes each tensor onto itself."""
    from .layer import NoraLayer

    for name, layer in model.named_modules():
        if not isinstance(layer, NoraLayer) or adapter not in layer.nora_B:
            continue
        name = name.removeprefix("_fsdp_wrapped_module.")
        kB, kA = f"{name}.nora_B.{adapter}", f"{name}.nora_A.{adapter}"
        if kB not in state_dict or kA not in state_dict:
            continue
        old_B, old_A = layer.nora_B[adapter], layer.nora_A[adapter]
        if tuple(state_dict[kB].shape) != tuple(old_B.shape) or tuple(state_dict[kA].shape) != tuple(old_A.shape):
            continue  # the shape check reports it
        B = state_dict[kB].to(device=old_B.device, dtype=old_B.dtype).contiguous()
        A = state_dict[kA].to(device=old_A.device, dtype=old_A.dtype).contiguous()
        twin = find_twin(layer, adapter, configs, B, A)
        if twin is not None:
            B, A = layer.nora_B[twin], layer.nora_A[twin]
        layer.nora_B[adapter], layer.nora_A[adapter] = B, A
        state_dict[kB], state_dict[kA] = B, A
