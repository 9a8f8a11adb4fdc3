"""The NoRA tuner layer: wraps a frozen nn.Linear / Conv1D and adds  s * B B' A' A x.

    x (.., n) --dropout--> A (r x n) --> A' (r' x r) --> B' (r x r') --> B (m x r) --*s--> + W x
              [frozen buffer]   [trained]      [trained]      [frozen buffer]

The forward never materialises the r-dimensional chain per token: it folds the small matrices first into a rank-k
pair, `right = A' A` (k x n) and `left = s B B'` (m x k), and computes `left @ (right @ x)`. That is a rank-k LoRA
product (k = r_inner), so a NoRA step costs about what a LoRA step of rank r_inner costs, plus O(r r' (m + n)) to fold.
"""

from __future__ import annotations

import warnings
import zlib
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import lowmem
from .config import NoraConfig
from .init import activation_scale, check_weight, init_inner, init_outer
from .mixed_batch import mixed_forward
from .quantized import read_weight_mn, resolve_backend, warn_requantize
from .sharing import OuterFactors


def inner_shapes(structure: str, m: int, r: int, r_inner: int) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """Shapes of the trainable (B', A') for a structure; A' is None for 'adapter' (one r x r matrix R)."""
    return {
        "nested": ((r, r_inner), (r_inner, r)),
        "output": ((m, r_inner), (r_inner, m)),
        "parallel": ((m, r_inner), (r_inner, r)),
        "adapter": ((r, r), None),
    }[structure]


def fold_factors(structure: str, B, A, inner_B, inner_A) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) with dW = left @ right for each structure (smallest matmuls first)."""
    if structure == "nested":  # B B' A' A
        return B @ inner_B, inner_A @ A
    if structure == "output":  # B' A' B A
        return inner_B, (inner_A @ B) @ A
    if structure == "parallel":  # C A' A
        return inner_B, inner_A @ A
    if structure == "adapter":  # B R A
        return B @ inner_B, A
    raise ValueError(f"unknown structure {structure!r}")


class NoraLayer(BaseTunerLayer):
    """Holds the per-adapter NoRA state of one wrapped layer; see the module docstring for the computation."""

    adapter_layer_names = ("nora_inner_B", "nora_inner_A")
    other_param_names = (
        "nora_B",
        "nora_A",
        "r",
        "r_inner",
        "scaling",
        "structure",
        "activation_memory",
        "nora_dropout",
    )

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        # bitsandbytes / torchao / hqq base: how to dequantize (read-only) and requantize on merge (nora.quantized)
        self.quantization_backend = resolve_backend(self.get_base_layer(), **kwargs)
        self.r: dict[str, int] = {}
        self.r_inner: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.structure: dict[str, str] = {}
        self.activation_memory: dict[str, str] = {}  # "auto" | "low" | "folded": see nora.lowmem
        self.nora_dropout = nn.ModuleDict({})
        self.nora_inner_B = nn.ParameterDict({})
        self.nora_inner_A = nn.ParameterDict({})
        self.nora_B = OuterFactors({}, persistent=True)  # a BufferDict (nora.sharing: no self-copy on load)
        self.nora_A = OuterFactors({}, persistent=True)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.in_features, self.out_features = _get_in_out_features(self.get_base_layer())
        self.kwargs = kwargs
        # adapter name -> why its outer factors are zero placeholders (built from a checkpoint config, or on the meta
        # device); cleared when the factors are loaded from a state dict
        self._outer_pending: dict[str, str] = {}

    def _dropout_module(self, p: float) -> nn.Module:
        """nn.Dropout(p), or for p == 0 the layer's one nn.Identity shared by all its dropout-free adapters (a
        stateless module per adapter per layer was ~0.4 MB of Python objects per loaded adapter on SmolLM2)."""
        if p > 0:
            return nn.Dropout(p)
        shared = next((m for m in self.nora_dropout.values() if type(m) is nn.Identity), None)
        return nn.Identity() if shared is None else shared

    def _base_weight_mn(self) -> torch.Tensor:
        """The base weight as (out, in) = (m, n), whatever the layer's storage layout (a quantized base: a float32
        dequantized read-only copy)."""
        if self.quantization_backend is not None:
            return read_weight_mn(self.get_base_layer(), self.quantization_backend)
        weight = self.get_base_layer().weight
        return weight.T if self.fan_in_fan_out else weight

    def update_layer(
        self,
        adapter_name: str,
        config: NoraConfig,
        act_mean_abs: torch.Tensor | None = None,
        inference_mode: bool = False,
        module_name: str = "",
        **kwargs: Any,
    ) -> None:
        weight = self._base_weight_mn()
        from_checkpoint = getattr(config, "_from_checkpoint", False)
        # a checkpoint's factors are loaded, not computed: no NaN scan here (a compact file's rebuild scans)
        check_weight(weight, config.r, name=module_name or "base layer", finite=not from_checkpoint)
        m, n, r = self.out_features, self.in_features, config.r
        self.r[adapter_name] = r
        self.r_inner[adapter_name] = r if config.structure == "adapter" else config.r_inner
        self.scaling[adapter_name] = config.scaling
        self.structure[adapter_name] = config.structure
        self.activation_memory[adapter_name] = getattr(config, "activation_memory", "auto")
        self.nora_dropout[adapter_name] = self._dropout_module(config.nora_dropout)

        on_meta = weight.device.type == "meta"
        skip_init = on_meta or from_checkpoint or config.outer_init == "grad"  # grad: nora.gradient_init fills it
        self._outer_pending.pop(adapter_name, None)
        if from_checkpoint:
            self._outer_pending[adapter_name] = (
                "The config came from NoraConfig.from_pretrained (a saved adapter), so get_peft_model left placeholders "
                "for the checkpoint. Load the adapter with PeftModel.from_pretrained(base, adapter_dir), or start a new "
                "adapter from a fresh config: NoraConfig(**cfg.to_dict())."
            )
        elif on_meta:
            self._outer_pending[adapter_name] = (
                "The base model was on the meta device when the adapter was created, so no SVD could run. Call "
                "get_peft_model on the model after its weights are loaded, or load a saved adapter with "
                "PeftModel.from_pretrained(base, adapter_dir)."
            )
        elif config.needs_gradient_init:
            self._outer_pending[adapter_name] = (
                f"outer_init={config.outer_init!r} / inner_init={config.inner_init!r} are computed from the task's "
                "gradient: call nora.gradient_init(model, config, batches) after get_peft_model and before training."
            )
        if skip_init:
            # The factors are about to be loaded from a checkpoint (or the model has no real weights): no SVD.
            zero = torch.zeros((), dtype=self._base_dtype(), device=weight.device)
            B, A, sigma = zero.expand(m, r), zero.expand(r, n), torch.ones(r)
        else:
            if config.outer_init == "awsvd" and act_mean_abs is None:
                raise ValueError(
                    f"{module_name}: outer_init='awsvd' but this module has no calibration statistics. Call "
                    "nora.calibrate(model, config, batches) with the same target_modules before get_peft_model, "
                    "or use outer_init='svd'."
                )
            scale = None
            if act_mean_abs is not None and config.outer_init == "awsvd":
                if act_mean_abs.shape != (n,):
                    raise ValueError(
                        f"{module_name}: calibration statistics have shape {tuple(act_mean_abs.shape)} but the layer "
                        f"has {n} input features; they were computed for another model. Re-run nora.calibrate."
                    )
                scale = activation_scale(act_mean_abs, config.awsvd_alpha, config.awsvd_eps)
            seed = config.init_seed + _stable_hash(module_name)
            B, A, sigma = init_outer(
                weight,
                r,
                config.outer_init,
                scale=scale,
                seed=seed,
                outer_scaling=config.outer_scaling,
                svd_method=config.svd_method,
                niter=config.svd_niter,
                oversample=config.svd_oversample,
                dtype=torch.float32 if getattr(config, "save_outer_factors", True) else torch.float64,  # nora.compact
            )
        # canonical strides (an SVD factor with a size-1 dim can be "contiguous" with stride (1, m)): a reloaded
        # adapter gets canonical strides too, and matmul results must not depend on the layout
        if from_checkpoint and not on_meta:
            # zero-stride placeholders for the checkpoint's tensors (nora.sharing.adopt_loaded puts them in): loading
            # an adapter allocates no full-size B, A it would free again
            self.nora_B[adapter_name], self.nora_A[adapter_name] = B, A
        else:
            self.nora_B[adapter_name] = B.to(self._base_dtype()).clone(memory_format=torch.contiguous_format)
            self.nora_A[adapter_name] = A.to(self._base_dtype()).clone(memory_format=torch.contiguous_format)

        shape_B, shape_A = inner_shapes(config.structure, m, r, config.r_inner)
        method = config.inner_init if config.init_weights else "gaussian"
        inner_B, inner_A = init_inner(method, shape_B, shape_A, sigma, config.inner_std_for(method))
        # created frozen: set_adapter below unfreezes the active adapters; a tensor that never required grad holds no
        # autograd metadata (~200 B each, 420 per SmolLM2 adapter), so loaded inference adapters stay small
        self.nora_inner_B[adapter_name] = nn.Parameter(inner_B.to(weight.device), requires_grad=False)
        if inner_A is not None:
            self.nora_inner_A[adapter_name] = nn.Parameter(inner_A.to(weight.device), requires_grad=False)

        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(s * left, right) in the inner parameters' dtype, so dW = left @ right."""
        if adapter in self._outer_pending:
            raise RuntimeError(
                f"NoRA adapter {adapter!r}: the frozen outer factors were never computed or loaded. "
                + self._outer_pending[adapter]
            )
        inner_B = self.nora_inner_B[adapter]
        inner_A = self.nora_inner_A.get(adapter)
        dtype = inner_B.dtype
        B, A = self.nora_B[adapter].to(dtype), self.nora_A[adapter].to(dtype)
        left, right = fold_factors(self.structure[adapter], B, A, inner_B, inner_A)
        scaling = self.scaling[adapter]
        return (left * scaling if scaling != 1 else left), right

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """dW in the base weight's layout and dtype (transposed for Conv1D)."""
        left, right = self._factors(adapter)
        delta = left.float() @ right.float()
        if self.fan_in_fan_out:
            delta = delta.T
        return delta.to(self._base_dtype())

    def _base_dtype(self) -> torch.dtype:
        """The base weight's float dtype (for a quantized base, the dtype its weight dequantizes to)."""
        if self.quantization_backend is not None:
            return self.quantization_backend.dtype(self.get_base_layer())
        return self.get_base_layer().weight.dtype

    def lora_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact rank-k LoRA factors (lora_A (k x n), lora_B (m x k)) with dW = lora_B @ lora_A and scaling 1."""
        left, right = self._factors(adapter)
        return right.detach().contiguous(), left.detach().contiguous()

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True


class Linear(nn.Module, NoraLayer):
    """NoRA around an nn.Linear or a transformers Conv1D (fan_in_fan_out=True)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: NoraConfig,
        act_mean_abs: torch.Tensor | None = None,
        module_name: str = "",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        NoraLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = isinstance(self.get_base_layer(), Conv1D)  # Conv1D stores weight as (in, out)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, act_mean_abs=act_mean_abs, module_name=module_name)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in list(self._outer_pending):
            if f"{prefix}nora_B.{name}" in state_dict and f"{prefix}nora_A.{name}" in state_dict:
                del self._outer_pending[name]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active adapters' dW to the base weight. Merging an already merged adapter is a no-op."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if adapter_names and self.quantization_backend is not None:
            warn_requantize(self.quantization_backend)
        for name in adapter_names:
            if name not in self.nora_inner_B:
                continue
            weight = self.get_base_weight()
            merged = weight + self.get_delta_weight(name)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs/infs in the merged weights: adapter {name!r} seems to be broken.")
            self.set_base_weight(merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.nora_inner_B:
                self.set_base_weight(self.get_base_weight() - self.get_delta_weight(name))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None:  # mixed-batch inference: one adapter per row (nora.mixed_batch)
            return mixed_forward(self, x, *args, adapter_names=adapter_names, **kwargs)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)  # bnb 4-bit: not a view
        out_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.nora_inner_B:
                continue
            result = result + self.adapter_delta(name, x).to(out_dtype)
        return result

    def adapter_delta(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        """The adapter term s * B B' A' A dropout(x) of one adapter, in the inner factors' dtype."""
        if lowmem.wants_low_memory(self, adapter, x):  # training: save z = A x (r per token), not x
            return lowmem.low_memory_delta(self, adapter, x)
        left, right = self._factors(adapter)  # (m, k), (k, n)
        h = self._cast_input_dtype(self.nora_dropout[adapter](x), right.dtype)  # (.., n)
        return F.linear(F.linear(h, right), left)  # (.., k) -> (.., m)

    def __repr__(self) -> str:
        return "nora." + super().__repr__()


def _stable_hash(text: str) -> int:
    """A process-independent hash (Python's hash() is salted), so every rank derives the same per-module seed."""
    return zlib.crc32(text.encode()) & 0x7FFFFFFF
