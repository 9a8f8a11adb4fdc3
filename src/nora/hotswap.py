"""Hotswap: replace a loaded NoRA adapter's trained inner factors in place with those of a saved adapter.

    model = torch.compile(PeftModel.from_pretrained(base, "adapter-0"))
    nora.hotswap_adapter(model, "adapter-1")          # same modules, same parameters, new values: no recompile

Only the inner factors (and `modules_to_save` copies) are copied, with `copy_` into the existing parameters: no module,
parameter or Python attribute the forward reads changes, so a `torch.compile`d model keeps its graphs. That is only
correct when everything else the forward uses is the same for both adapters, so before writing anything this checks:
the config fields that shape the forward (r, r_inner, structure, scaling, dropout, target layers, outer settings), every
tensor's shape, and that the saved outer factors (a full file) or their verification sketches (a compact file) match
the outer factors already loaded. A mismatch names the field or module and says to load the adapter with
`model.load_adapter(adapter_dir, adapter_name=...)` instead.

PEFT's own `peft.utils.hotswap.hotswap_adapter` supports LoRA only; on a NoRA model it raises
`ValueError: Hotswapping only supports LORA ... but NORA was passed.` (it checks the config's peft_type first).
"""

from __future__ import annotations

import json
import os

import torch
from peft.utils import load_peft_weights
from peft.utils.other import ModulesToSaveWrapper

from . import compact
from .config import PEFT_TYPE, NoraConfig
from .sharing import OUTER_FIELDS

#: config fields that must be equal: they decide the outer factors or what the forward computes besides the tensors
FORWARD_FIELDS = (
    "r",
    "r_inner",
    "rank_pattern",
    "r_inner_pattern",
    "structure",
    "scaling",
    "nora_dropout",
    "bias",
    "fan_in_fan_out",
)
OUTER_CHECK_FIELDS = tuple(f for f in OUTER_FIELDS if f != "save_outer_factors")
INNER = ("nora_inner_B", "nora_inner_A")


#: the fix of every incompatibility: a regular load brings the adapter's own outer factors and config
LOAD_INSTEAD = " Load it as another adapter instead: model.load_adapter(adapter_dir, adapter_name=...)."


def _peft_model(model):
    inner = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    if not hasattr(inner, "peft_config") or not hasattr(inner, "base_model"):
        raise TypeError(
            f"nora.hotswap_adapter needs a PeftModel (or a torch.compile'd one), got {type(model).__name__}. Load the "
            "first adapter with PeftModel.from_pretrained(base, adapter_dir)."
        )
    return inner


def _check_configs(old: NoraConfig, new: NoraConfig, adapter_dir) -> None:
    for field in (*FORWARD_FIELDS, *OUTER_CHECK_FIELDS, "modules_to_save"):
        a, b = getattr(old, field, None), getattr(new, field, None)
        if field == "modules_to_save":
            a, b = sorted(a or []), sorted(b or [])
        if a != b:
            raise ValueError(
                f"nora.hotswap_adapter: {adapter_dir} has {field}={b!r} but the loaded adapter has {field}={a!r}."
                + LOAD_INSTEAD
            )


def _layer_key(state_dict: dict, name: str, attr: str) -> str | None:
    for key in (f"{name}.{attr}", f"{name.removeprefix('base_model.model.')}.{attr}"):
        if key in state_dict:
            return key
    return None


def _outer_mismatch(layer, adapter: str, state_dict: dict, name: str) -> str | None:
    """Why the saved outer factors (or sketches) of module `name` differ from the loaded ones; None if they match."""
    B, A = layer.nora_B[adapter], layer.nora_A[adapter]
    kB, kA = _layer_key(state_dict, name, "nora_B"), _layer_key(state_dict, name, "nora_A")
    if kB and kA:
        saved_B, saved_A = state_dict[kB], state_dict[kA]
        if saved_B.shape != B.shape or saved_A.shape != A.shape:
            return f"outer factor shapes {tuple(saved_B.shape)}, {tuple(saved_A.shape)} vs {tuple(B.shape)}, {tuple(A.shape)}"
        record_A, record_B = compact.sketches(saved_B, saved_A)
    else:
        kSA, kSB = _layer_key(state_dict, name, "nora_sketch_A"), _layer_key(state_dict, name, "nora_sketch_B")
        if not (kSA and kSB):
            return "the file holds neither its outer factors nor their verification record (truncated file?)"
        record_A, record_B = state_dict[kSA], state_dict[kSB]
        if record_A.shape[0] != A.shape[0] or record_B.shape[1] != B.shape[1]:
            return f"verification record for r={record_A.shape[0]} but the loaded adapter has r={A.shape[0]}"
    residual = compact.sketch_residual(B, A, record_A, record_B)
    tolerance = compact.verify_tolerance(B.dtype)
    if not residual <= tolerance:
        return f"outer factors differ from the loaded ones (relative sketch residual {residual:.2e} > {tolerance:.0e})"
    return None


def hotswap_adapter(model, adapter_dir: str | os.PathLike, adapter_name: str = "default", torch_device=None) -> None:
    """Copy the inner factors (and modules_to_save weights) of the NoRA adapter saved in `adapter_dir` into the loaded
    adapter `adapter_name` of `model`, in place; refuses incompatible adapters and merged ones before writing."""
    peft_model = _peft_model(model)
    from .model import nora_layers

    old = peft_model.peft_config.get(adapter_name)
    if old is None or getattr(old, "peft_type", None) != PEFT_TYPE:
        loaded = {k: str(getattr(v, "peft_type", "?")) for k, v in peft_model.peft_config.items()}
        raise ValueError(
            f"nora.hotswap_adapter: the model has no NoRA adapter {adapter_name!r} (adapters: {loaded}). Pass "
            "adapter_name= of a loaded NoRA adapter."
        )
    adapter_dir = os.fspath(adapter_dir)
    if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        raise ValueError(f"nora.hotswap_adapter: {adapter_dir} is not an adapter directory (no adapter_config.json).")
    with open(os.path.join(adapter_dir, "adapter_config.json")) as fh:
        peft_type = json.load(fh).get("peft_type")
    if peft_type != PEFT_TYPE:
        raise ValueError(
            f"nora.hotswap_adapter: {adapter_dir} holds a {peft_type} adapter, not NoRA; only a NoRA adapter can "
            "replace a NoRA adapter's inner factors."
        )
    new = NoraConfig.from_pretrained(adapter_dir)
    _check_configs(old, new, adapter_dir)
    if old.bias != "none":
        raise ValueError(
            f"nora.hotswap_adapter: adapter {adapter_name!r} trains biases (bias={old.bias!r}); hotswap copies inner "
            "factors only." + LOAD_INSTEAD
        )

    layers = [(name, layer) for name, layer in nora_layers(peft_model) if adapter_name in layer.nora_inner_B]
    merged = [name for name, layer in layers if adapter_name in layer.merged_adapters]
    if merged:
        raise ValueError(
            f"nora.hotswap_adapter: adapter {adapter_name!r} is merged into the base weights (e.g. {merged[0]}); "
            "swapping its factors now would corrupt the weights on unmerge. Call model.unmerge_adapter() first."
        )
    device = torch_device or layers[0][1].nora_inner_B[adapter_name].device
    state_dict = load_peft_weights(adapter_dir, device=str(device))

    # dry run: every destination and source checked before anything is written
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []
    used: set[str] = set()
    for name, layer in layers:
        for attr in INNER:
            params = getattr(layer, attr)
            if adapter_name not in params:
                continue
            key = _layer_key(state_dict, name, attr)
            if key is None:
                raise ValueError(
                    f"nora.hotswap_adapter: {adapter_dir} has no {attr} for module {name!r}; it targets other modules."
                    + LOAD_INSTEAD
                )
            dest, src = params[adapter_name], state_dict[key]
            if dest.shape != src.shape:
                raise ValueError(
                    f"nora.hotswap_adapter: module {name!r}: {attr} has shape {tuple(src.shape)} in the file, "
                    f"{tuple(dest.shape)} loaded." + LOAD_INSTEAD
                )
            copies.append((dest, src))
            used.add(key)
        problem = _outer_mismatch(layer, adapter_name, state_dict, name)
        if problem:
            raise ValueError(
                f"nora.hotswap_adapter: module {name!r}: {problem}. The inner factors were trained against their own "
                "outer factors, so keeping the loaded ones would silently change the adapter's outputs." + LOAD_INSTEAD
            )
        used.update(k for a in ("nora_B", "nora_A", *compact.RECORD_KEYS) if (k := _layer_key(state_dict, name, a)))
    for name, module in peft_model.named_modules():
        if not isinstance(module, ModulesToSaveWrapper) or adapter_name not in module.modules_to_save:
            continue
        for pname, dest in module.modules_to_save[adapter_name].named_parameters():
            key = _layer_key(state_dict, name, pname)
            if key is None or state_dict[key].shape != dest.shape:
                raise ValueError(
                    f"nora.hotswap_adapter: {adapter_dir} lacks modules_to_save weight {name}.{pname} (or its shape "
                    "differs)." + LOAD_INSTEAD
                )
            copies.append((dest, state_dict[key]))
            used.add(key)
    extra = sorted(set(state_dict) - used)
    if extra:
        raise ValueError(
            f"nora.hotswap_adapter: {adapter_dir} holds tensors the loaded adapter has no place for, e.g. "
            f"{extra[0]!r} (other targets?)." + LOAD_INSTEAD
        )

    with torch.no_grad():
        for dest, src in copies:
            dest.copy_(src)
