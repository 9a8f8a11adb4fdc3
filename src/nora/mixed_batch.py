"""Mixed-batch inference: `model(**batch, adapter_names=[...])` and `model.generate(..., adapter_names=[...])`.

One adapter name per batch row, `"__base__"` for a row of the plain base model, as in PEFT LoRA. `PeftModel` calls
the tuner's `_enable_peft_forward_hooks`; `forward_hooks` below validates the names once for the whole model and
registers a pre-hook on every NoRA layer (and `modules_to_save` wrapper) that injects the names, repeated per beam
for beam search. Each NoRA layer then runs `mixed_forward`.

Adapters of a layer whose outer factors are the same tensor or `torch.equal` (same base, same outer settings) form
one class. For a class, the batch pays the outer products once and each row only its own small inner product:

    nested:   delta = B  bmm(A x, (s B' A')_row^T)        A x: (rows, t, r), one r x r matrix per row
    adapter:  delta = B  bmm(A x, (s R)_row^T)            (LoRA-XS)
    parallel: delta =    bmm(bmm(A x, A'_row^T), (s C)_row^T)
    output:   delta =    bmm(bmm(B A x, A'_row^T), (s B')_row^T)

so an extra adapter costs O(r r') per token. The alternative, one folded rank-r' product per adapter on its own rows
(what PEFT LoRA does), is cheaper for long prefills with few adapters; `_use_shared` picks the cheaper one by
multiply-adds (benchmarks/bench_mixed_batch.py measures both against PEFT LoRA).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

BASE = "__base__"

#: multiply-add equivalents charged per gathered/scattered element (index_select, index_add_ are memory bound)
_GATHER_COST = 4.0


def _inject(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def _inject_wrapper(module, args, kwargs, adapter_names):
    """The pre-hook of a `modules_to_save` wrapper: a row whose adapter has no copy of this module gets the original
    (PEFT's wrapper would raise KeyError). PEFT's wrapper ignores the names and passes every row through the original
    module when an active adapter lacks a copy; refuse that instead of returning rows without their copy."""
    mapped = RowNames([n if n in module._adapters else BASE for n in adapter_names])
    passthrough = module.disable_adapters or any(a not in module._adapters for a in module.active_adapters or [])
    if passthrough and any(n != BASE for n in mapped):
        needed = sorted({n for n in mapped if n != BASE})
        raise ValueError(
            f"adapter_names: adapter(s) {', '.join(map(repr, needed))} have their own copy of a modules_to_save module, "
            "but the active adapter has none, and PEFT's wrapper then sends every row through the original module. "
            f"Call model.set_adapter({needed[0]!r}) before the mixed-batch call (the rows still get their own adapters)."
        )
    kwargs["adapter_names"] = mapped
    return args, kwargs


class RowNames(list):
    """The names injected into every layer of one forward: the list itself plus its row grouping (adapter -> rows)
    and the row-index tensors, computed once per forward instead of once per layer."""

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__(names)
        self.rows: dict[str, list[int]] = {}
        for i, name in enumerate(self):
            self.rows.setdefault(name, []).append(i)
        self._index: dict[tuple, torch.Tensor] = {}

    def row_index(self, rows: Sequence[int], device) -> torch.Tensor:
        key = (tuple(rows), device)
        if key not in self._index:
            self._index[key] = torch.as_tensor(rows, device=device)
        return self._index[key]


def _group_rows(adapter_names: Sequence[str]) -> dict[str, list[int]]:
    if isinstance(adapter_names, RowNames):
        return adapter_names.rows
    rows: dict[str, list[int]] = {}
    for i, name in enumerate(adapter_names):
        rows.setdefault(name, []).append(i)
    return rows


def _row_index(adapter_names: Sequence[str], rows: Sequence[int], device) -> torch.Tensor:
    if isinstance(adapter_names, RowNames):
        return adapter_names.row_index(rows, device)
    return torch.as_tensor(rows, device=device)


def _hook_for(module: nn.Module, adapter_names: list[str]):
    inject = _inject_wrapper if isinstance(module, AuxiliaryTrainingWrapper) else _inject
    return module.register_forward_pre_hook(partial(inject, adapter_names=adapter_names), with_kwargs=True)


def _is_nora(module: nn.Module) -> bool:
    return isinstance(module, BaseTunerLayer) and hasattr(module, "nora_inner_B")


def _nora_layers(model: nn.Module):
    return [m for m in model.modules() if _is_nora(m)]


def _hook_modules(root: nn.Module) -> list[nn.Module]:
    """Tuner layers and modules_to_save wrappers under root, in one walk that skips a NoRA layer's per-adapter
    containers (dropouts, parameter and buffer dicts: most of the modules once many adapters are loaded)."""
    found, stack = [], [root]
    while stack:
        module = stack.pop()
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            found.append(module)
        children = [module.base_layer] if _is_nora(module) else module._modules.values()
        stack.extend(c for c in children if c is not None)
    return found


def _expand_size(kwargs: dict) -> int:
    """How many rows `generate` makes of each input row: max(num_beams, num_return_sequences), as transformers does."""
    config = kwargs.get("generation_config")
    beams = kwargs.get("num_beams", getattr(config, "num_beams", None) or 1)
    returns = kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", None) or 1)
    return max(int(beams or 1), int(returns or 1))  # generate itself validates both


def _input_batch_size(args: tuple, kwargs: dict) -> int | None:
    for value in (*args[:1], kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return value.shape[0]
    return None


def _check_names_type(adapter_names: Any) -> list[str]:
    ok = not isinstance(adapter_names, str) and isinstance(adapter_names, Sequence)
    if not ok or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError(
            f"adapter_names must be a list with one adapter name per batch row, got {adapter_names!r:.80}. Pass e.g. "
            f'adapter_names=["a", "{BASE}", "b"] (use model.set_adapter(name) for a whole batch).'
        )
    return list(adapter_names)


def _refuse_merged(merged: list[str]) -> None:
    raise ValueError(
        f"adapter_names (mixed-batch inference) is refused while adapters are merged into the base weights "
        f"({', '.join(merged)}): every row would get them. Call model.unmerge_adapter() first."
    )


def check_adapter_names(tuner: nn.Module, adapter_names: Any, layers: list | None = None) -> list[str]:
    """The validated list of names; one clear error for a wrong type, training mode, merged layers, unknown names."""
    names = _check_names_type(adapter_names)
    if tuner.training:
        raise ValueError(
            "adapter_names (mixed-batch inference) is refused in training mode: call model.eval() first; train each "
            "adapter on its own with model.set_adapter(name)."
        )
    layers = _nora_layers(tuner) if layers is None else layers
    merged = sorted({a for layer in layers for a in layer.merged_adapters})
    if merged:
        _refuse_merged(merged)
    known = {a for layer in layers for a in layer.nora_inner_B}
    unknown = sorted(set(names) - known - {BASE})
    if unknown:
        raise ValueError(
            f"adapter_names: unknown adapter(s) {', '.join(map(repr, unknown))}. Loaded adapters: "
            f"{', '.join(map(repr, sorted(known)))}; use '{BASE}' for rows of the plain base model."
        )
    return names


@contextlib.contextmanager
def forward_hooks(tuner: nn.Module, *args: Any, **kwargs: Any) -> Iterator[None]:
    """`NoraModel._enable_peft_forward_hooks`: inject per-row adapter names into every NoRA layer for one call."""
    adapter_names = kwargs.pop("adapter_names", None)
    alora_offsets = kwargs.pop("alora_offsets", None)
    if alora_offsets is not None:
        raise ValueError("alora_offsets is an option of PEFT's aLoRA; NoRA has no activated-LoRA mode. Drop it.")
    if adapter_names is None:
        yield
        return
    modules = _hook_modules(tuner)
    names = check_adapter_names(tuner, adapter_names, layers=[m for m in modules if _is_nora(m)])
    batch = _input_batch_size(args, kwargs)
    if batch is not None and batch != len(names):
        raise ValueError(
            f"adapter_names has {len(names)} names but the input has {batch} rows; pass one name per row "
            f"('{BASE}' for the plain base model)."
        )
    expand = _expand_size(kwargs)
    expanded = RowNames([n for n in names for _ in range(expand)])  # generate repeats each row `expand` times
    handles = [_hook_for(m, expanded) for m in modules]
    root = tuner.model if isinstance(tuner, BaseTuner) else tuner
    encoder = root.get_encoder() if hasattr(root, "get_encoder") else None
    if expand > 1 and encoder is not None and encoder is not root:
        # an encoder-decoder's encoder runs once on the original rows; the later hook overrides the expanded names
        handles += [_hook_for(m, RowNames(names)) for m in _hook_modules(encoder)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


_CONTEXTS = "_nora_mixed_batch_contexts"


def _base_pre_hook(module, args, kwargs):
    """`base_model(..., adapter_names=[...])` without PeftModel (transformers' `load_adapter` integration): the
    model's own forward would swallow the argument in its **kwargs, so handle it here as PeftModel does."""
    names = kwargs.pop("adapter_names", None)
    if names is None:
        return None
    ctx = forward_hooks(module, *args, adapter_names=names, **kwargs)
    ctx.__enter__()
    module.__dict__.setdefault(_CONTEXTS, []).append(ctx)
    return args, kwargs


def _base_post_hook(module, args, kwargs, output):  # always_call: runs even when the forward raised
    stack = module.__dict__.get(_CONTEXTS)
    if stack:
        stack.pop().__exit__(None, None, None)


def guard_base_model(model: nn.Module) -> None:
    """Let the base model itself take `adapter_names` (once per model; NoraModel.inject_adapter calls this)."""
    if getattr(model, "_nora_mixed_batch_guard", False):
        return
    model.register_forward_pre_hook(_base_pre_hook, with_kwargs=True)
    model.register_forward_hook(_base_post_hook, with_kwargs=True, always_call=True)
    model._nora_mixed_batch_guard = True


# ---------------------------------------------------------------------------------------------------------------------
# the layer side


def _check_layer_call(layer, x: torch.Tensor, adapter_names: Any) -> None:
    if not isinstance(adapter_names, RowNames):  # RowNames: validated once for the whole forward
        _check_names_type(adapter_names)
    if x.dim() < 2 or x.shape[0] != len(adapter_names):
        raise ValueError(
            f"adapter_names has {len(adapter_names)} names but this layer's input has "
            f"{x.shape[0] if x.dim() else 0} rows (shape {tuple(x.shape)}); pass one name per batch row. With beam "
            "search or num_return_sequences set in a generation_config, also pass num_beams= / num_return_sequences= "
            "to generate so the names are repeated per beam."
        )
    if layer.merged:
        _refuse_merged(layer.merged_adapters)
    if layer.disable_adapters:
        raise ValueError(
            "adapter_names was passed while the adapters are disabled; enable them (model.enable_adapter_layers()) "
            f"or use '{BASE}' for rows that should get the plain base model."
        )
    if layer.training:
        raise ValueError("adapter_names (mixed-batch inference) is refused in training mode: call model.eval() first.")


def _check_ready(layer, adapter: str) -> None:
    if adapter in layer._outer_pending:
        raise RuntimeError(
            f"NoRA adapter {adapter!r}: the frozen outer factors were never computed or loaded. "
            + layer._outer_pending[adapter]
        )


def _same_outer(layer, a: str, b: str) -> bool:
    """Adapters a and b of this layer have the same structure and outer factors (one tensor, or equal content)."""
    if layer.structure[a] != layer.structure[b]:
        return False
    pairs = [(layer.nora_B[a], layer.nora_B[b]), (layer.nora_A[a], layer.nora_A[b])]
    if all(x is y for x, y in pairs):
        return True
    if any(x.shape != y.shape or x.dtype != y.dtype for x, y in pairs):
        return False
    try:  # cache the content comparison until one of the tensors changes (in-place version counter)
        key = tuple((id(t), t.data_ptr(), t._version) for pair in pairs for t in pair)
    except RuntimeError:  # inference tensors have no version counter
        key = None
    cache = layer.__dict__.setdefault("_nora_outer_equal", {})
    if key is None or key not in cache:
        equal = all(torch.equal(x, y) for x, y in pairs)
        if key is None:
            return equal
        if len(cache) > 4096:
            cache.clear()
        cache[key] = equal
    return cache[key]


def outer_classes(layer, adapters: list[str]) -> list[list[str]]:
    """Partition adapters into classes with the same outer factors (order of first appearance). Adapters holding the
    same tensors (nora.sharing) are grouped by identity first; only distinct tensors are compared by content."""
    B, A, structure = layer.nora_B._buffers, layer.nora_A._buffers, layer.structure
    by_tensor: dict[tuple, list[str]] = {}
    for a in adapters:
        by_tensor.setdefault((id(B[a]), id(A[a]), structure[a]), []).append(a)
    classes: list[list[str]] = []
    for group in by_tensor.values():
        for cls in classes:
            if _same_outer(layer, cls[0], group[0]):
                cls.extend(group)
                break
        else:
            classes.append(group)
    return classes


def _class_layout(adapter_names: Sequence[str], cls: list[str], rows: dict) -> tuple[list[int], list[int]]:
    """(the rows of the class's adapters in batch order, each such row's position in cls); once per forward."""
    cache = adapter_names.__dict__.setdefault("_layouts", {}) if isinstance(adapter_names, RowNames) else None
    key = tuple(cls)
    if cache is not None and key in cache:
        return cache[key]
    cls_rows = sorted(i for a in cls for i in rows[a])
    position = {a: j for j, a in enumerate(cls)}
    layout = (cls_rows, [position[adapter_names[i]] for i in cls_rows])
    if cache is not None:
        cache[key] = layout
    return layout


def _row_matrices(layer, adapter: str) -> list[torch.Tensor]:
    """The adapter's own small matrices of the shared path, each applied as h -> h @ M^T in order (between the shared
    outer products: nested/adapter: A x ... B u; parallel: A x ...; output: B A x ...)."""
    inner_B, inner_A = layer.nora_inner_B[adapter], layer.nora_inner_A.get(adapter)
    s = layer.scaling[adapter]
    if layer.structure[adapter] == "nested":  # B (s B' A') A
        return [s * (inner_B @ inner_A)]
    if layer.structure[adapter] == "adapter":  # B (s R) A
        return [s * inner_B]
    return [inner_A, s * inner_B]  # parallel: (s C) A' A;  output: (s B') A' B A


def _use_shared(layer, cls: list[str], tokens: dict[str, int], whole: bool) -> bool:
    """True when one shared outer product for the class costs fewer multiply-adds than one folded rank-r' product per
    adapter on its own rows (the folding itself costs r r' (m + n) per adapter)."""
    m, n, k = layer.out_features, layer.in_features, layer.r_inner[cls[0]]
    total = sum(tokens[a] for a in cls)
    gather = 0.0 if whole else _GATHER_COST * total * (m + n)  # index_select + index_add_ of the class's rows
    shared = total * sum(_plan_shapes(layer, cls[0])) + gather
    grouped = sum(tokens[a] * k * (m + n) + layer.r[a] * k * (m + n) for a in cls)
    grouped += 0.0 if (whole and len(cls) == 1) else _GATHER_COST * total * (m + n)
    return shared < grouped


def _plan_shapes(layer, adapter: str) -> tuple[int, int, int]:
    """Multiply-adds per token of the shared path's (pre, rows, post) stages."""
    m, n, r, k = layer.out_features, layer.in_features, layer.r[adapter], layer.r_inner[adapter]
    return {
        "nested": (r * n, r * r, m * r),
        "adapter": (r * n, r * r, m * r),
        "parallel": (r * n, k * r + m * k, 0),
        "output": (r * n + m * r, k * m + m * k, 0),
    }[layer.structure[adapter]]


def _stamp(layer, cls: list[str]) -> tuple | None:
    """What the folded inner matrices of `cls` depend on: the inner parameters (object and in-place version counter)
    and scalings; None when they cannot be cached (autograd on, or inference tensors without a version counter)."""
    if torch.is_grad_enabled():
        return None
    inner_B, inner_A = layer.nora_inner_B._parameters, layer.nora_inner_A._parameters
    params = [t for a in cls for t in (inner_B[a], inner_A.get(a)) if t is not None]
    try:
        versions = tuple(t._version for t in params)
    except RuntimeError:  # inference tensors have no version counter
        return None
    return tuple(params), versions, tuple(layer.scaling[a] for a in cls)


def _same_stamp(a: tuple, b: tuple) -> bool:
    return a[1] == b[1] and a[2] == b[2] and len(a[0]) == len(b[0]) and all(x is y for x, y in zip(a[0], b[0]))


def _row_stacks(layer, cls: list[str], row_adapter: list[int], dtype, device) -> list[torch.Tensor]:
    """Per stage, the rows' own small matrices stacked as (rows, in, out) for torch.bmm. Without autograd, the
    adapters' folded matrices (one (adapters, in, out) stack per class) and their per-layout gathers are cached on the
    layer until an inner factor changes (in-place version counter), so a decode step pays no folding and a new batch
    layout only one index_select per stage."""
    stamp = _stamp(layer, cls)
    cache = layer.__dict__.setdefault("_nora_row_stacks", {})
    key = (tuple(cls), dtype, device)
    entry = cache.get(key)
    if stamp is None or entry is None or not _same_stamp(entry[0], stamp):
        plans = [[m.to(dtype) for m in _row_matrices(layer, a)] for a in cls]
        stacks = [torch.stack([plan[stage].T for plan in plans]).to(device) for stage in range(len(plans[0]))]
        if stamp is None:
            index = torch.as_tensor(row_adapter, device=device)
            return [stack.index_select(0, index) for stack in stacks]
        if len(cache) >= 8:  # a few classes / adapter subsets per layer; the stamp holds the parameters alive
            cache.clear()
        entry = cache[key] = (stamp, stacks, {})
    layouts = entry[2]
    layout = tuple(row_adapter)
    if layout not in layouts:
        if len(layouts) >= 8:
            layouts.clear()
        index = torch.as_tensor(row_adapter, device=device)
        layouts[layout] = [stack.index_select(0, index) for stack in entry[1]]
    return layouts[layout]


def _shared_delta(layer, x: torch.Tensor, row_adapter: list[int], cls: list[str]) -> torch.Tensor:
    """The adapter term of rows x (rows, .., n) whose adapters (cls[row_adapter[i]]) share outer factors."""
    dtype = layer.nora_inner_B[cls[0]].dtype
    B, A = layer.nora_B[cls[0]].to(dtype), layer.nora_A[cls[0]].to(dtype)
    structure = layer.structure[cls[0]]
    pre, post = {"nested": ([A], [B]), "adapter": ([A], [B]), "parallel": ([A], []), "output": ([A, B], [])}[structure]
    h = layer._cast_input_dtype(x, dtype).reshape(x.shape[0], -1, x.shape[-1])  # (rows, t, n)
    for mat in pre:
        h = F.linear(h, mat)  # (rows, t, r) [then (rows, t, m) for 'output']
    for per_row in _row_stacks(layer, cls, row_adapter, dtype, x.device):
        h = torch.bmm(h, per_row)  # each row by its own adapter's small matrix
    for mat in post:
        h = F.linear(h, mat)  # (rows, t, m)
    return h.reshape(*x.shape[:-1], h.shape[-1])


def mixed_forward(layer, x: torch.Tensor, *args: Any, adapter_names: Sequence[str], **kwargs: Any) -> torch.Tensor:
    """A NoRA layer's forward with one adapter per batch row (`"__base__"` or an adapter this layer lacks: base)."""
    _check_layer_call(layer, x, adapter_names)
    result = layer.base_layer(x, *args, **kwargs)
    own = layer.nora_inner_B._parameters
    rows = {a: idx for a, idx in _group_rows(adapter_names).items() if a != BASE and a in own}
    if not rows:
        return result
    for a in rows:
        _check_ready(layer, a)
    per_row = x[0].numel() // x.shape[-1]  # tokens per row
    tokens = {a: len(idx) * per_row for a, idx in rows.items()}
    out_dtype = result.dtype
    for cls in outer_classes(layer, sorted(rows)):  # sorted: one cache entry per adapter set, whatever the layout
        cls_rows, row_adapter = _class_layout(adapter_names, cls, rows)
        whole = len(cls_rows) == x.shape[0]
        if _use_shared(layer, cls, tokens, whole):
            if whole:
                result = result + _shared_delta(layer, x, row_adapter, cls).to(out_dtype)
            else:
                index = _row_index(adapter_names, cls_rows, x.device)
                delta = _shared_delta(layer, x.index_select(0, index), row_adapter, cls)
                result.index_add_(0, index, delta.to(out_dtype))
            continue
        for a in cls:  # one folded rank-r' product per adapter on its own rows, as PEFT LoRA does
            if len(rows[a]) == x.shape[0]:
                result = result + layer.adapter_delta(a, x).to(out_dtype)
                continue
            index = _row_index(adapter_names, rows[a], x.device)
            result.index_add_(0, index, layer.adapter_delta(a, x.index_select(0, index)).to(out_dtype))
    return result
