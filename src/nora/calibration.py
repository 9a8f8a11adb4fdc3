"""AwSVD calibration: stream batches through the model and record mean |x_j| per input channel of every target.

Usage (the pattern of PEFT's CorDA/EVA preprocessing):

    stats = nora.calibrate(model, config, batches)   # before get_peft_model
    model = get_peft_model(model, config)            # outer_init="awsvd" reads the statistics

Memory is O(in_features) per target (a running float64 sum and a token count). Padding tokens are excluded when a
batch carries an `attention_mask` whose shape matches the activations. Under torch.distributed the sums and counts
are all-reduced, so every rank builds bit-identical outer factors.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _maybe_include_all_linear_layers, check_target_module_exists
from torch import nn
from tqdm.auto import tqdm

from .config import NoraConfig
from .init import activation_scale, reconstruction_error
from .model import CALIBRATION_ATTR, SUPPORTED_LAYERS, default_target_modules
from .quantized import is_quantized_linear


def resolve_targets(model: nn.Module, config: NoraConfig) -> dict[str, nn.Module]:
    """The modules `get_peft_model(model, config)` would adapt, by name (before any adapter is injected)."""
    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError(
            "nora.calibrate expects the base model before get_peft_model; call it on the model you pass to "
            "get_peft_model."
        )
    cfg = copy.deepcopy(config)
    if cfg.target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        cfg.target_modules = set(default_target_modules(model_type, type(model).__name__))
    cfg = _maybe_include_all_linear_layers(cfg, model)
    targets = {
        name: module
        for name, module in model.named_modules()
        if name
        and (isinstance(module, SUPPORTED_LAYERS) or is_quantized_linear(module))  # HQQLinear is no nn.Linear
        and check_target_module_exists(cfg, name)
    }
    if not targets:
        raise ValueError(f"nora.calibrate: no Linear/Conv1D module matched target_modules={config.target_modules!r}.")
    return targets


def _call(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


@torch.no_grad()
def calibrate(
    model: nn.Module,
    config: NoraConfig,
    batches: Iterable[Any],
    *,
    max_batches: int | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Record mean |x_j| per input channel for every module `config` targets; returns {module name: (in,) tensor}.

    `batches` yields dicts (passed as `model(**batch)`), tuples (`model(*batch)`) or tensors (`model(batch)`);
    `forward_fn(model, batch)` overrides that. The statistics are also attached to the modules, where
    `get_peft_model(model, config)` with `outer_init="awsvd"` picks them up.
    """
    targets = resolve_targets(model, config)
    sums = {name: None for name in targets}
    counts = dict.fromkeys(targets, 0)
    state: dict[str, torch.Tensor | None] = {"mask": None}

    def make_hook(name: str):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            x = x.detach().float().abs()
            flat = x.reshape(-1, x.shape[-1])
            mask = state["mask"]
            if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
                keep = mask.reshape(-1).to(torch.bool)  # select, don't multiply: 0 * inf at a pad would be NaN
                total, count = flat[keep].sum(0), int(keep.sum())
            else:
                total, count = flat.sum(0), flat.shape[0]
            total = total.double()
            sums[name] = total if sums[name] is None else sums[name] + total
            counts[name] += count

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n), with_kwargs=True) for n, m in targets.items()]
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    seen = 0
    try:
        for batch in tqdm(batches, desc="nora calibrate", disable=not progress, total=max_batches):
            if max_batches is not None and seen >= max_batches:
                break
            batch = _to_device(batch, device)
            state["mask"] = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            (forward_fn or _call)(model, batch)
            seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("nora.calibrate: the calibration iterable yielded no batches; pass at least one batch.")

    missing = [n for n, c in counts.items() if c == 0]
    if missing:
        raise ValueError(
            f"nora.calibrate: {len(missing)} target modules never ran during calibration (e.g. {missing[0]!r}); "
            "make sure the batches exercise them or exclude them via exclude_modules."
        )
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    stats = {}
    for name in sorted(targets):
        total = sums[name]
        count = torch.tensor([counts[name]], dtype=torch.float64, device=total.device)
        if distributed:  # every rank must see the same statistics to build the same outer factors
            torch.distributed.all_reduce(total)
            torch.distributed.all_reduce(count)
        stats[name] = (total / count).float().cpu()
    set_calibration(model, stats)
    return stats


def set_calibration(model: nn.Module, stats: Mapping[str, torch.Tensor]) -> None:
    """Attach calibration statistics (e.g. loaded from a file) to the model's modules, checking names and shapes."""
    modules = dict(model.named_modules())
    for name, value in stats.items():
        module = modules.get(name)
        if module is None:
            raise ValueError(
                f"calibration statistics name module {name!r}, which this model does not have; they were computed "
                "for another model. Re-run nora.calibrate on this model."
            )
        in_features = module.weight.shape[0] if _is_conv1d(module) else getattr(module, "in_features", None)
        if in_features is not None and tuple(value.shape) != (in_features,):
            raise ValueError(
                f"calibration statistics for {name!r} have shape {tuple(value.shape)}, but the module has "
                f"{in_features} input features. Re-run nora.calibrate on this model."
            )
        setattr(module, CALIBRATION_ATTR, value.detach().float().cpu())


def _is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def reconstruction_report(
    model: nn.Module, adapter_name: str = "default", awsvd_alpha: float = 0.5, eps: float = 1e-4
):
    """Per NoRA layer: ||W - B A|| / ||W|| and the activation-weighted ||(W - B A) S|| / ||W S|| (when calibrated)."""
    from .model import nora_layers

    rows = []
    for name, layer in nora_layers(model):
        if adapter_name not in layer.nora_B:
            continue
        weight = layer._base_weight_mn()
        B, A = layer.nora_B[adapter_name], layer.nora_A[adapter_name]
        act = getattr(layer.get_base_layer(), CALIBRATION_ATTR, None)
        row = {"module": name, "shape": list(weight.shape), "r": layer.r[adapter_name]}
        row["rel_error"] = reconstruction_error(weight, B, A)
        if act is not None:
            row["weighted_error"] = reconstruction_error(weight, B, A, activation_scale(act, awsvd_alpha, eps))
        rows.append(row)
    return rows
