"""`NoraModel`: the PEFT tuner that swaps target layers for NoRA layers."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import get_quantization_kwargs
from peft.utils.integrations import gather_params_ctx
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import mixed_batch, patterns
from .config import NoraConfig
from .fingerprint import apply_fingerprint_policy, weight_fingerprint
from .layer import Linear, NoraLayer
from .quantized import describe, read_weight_mn, resolve_backend

_DECODER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_BERT = ["query", "key", "value", "dense"]
# transformers >= 5 renamed the ViT/DeiT projections; keep both spellings (a name that does not exist matches nothing)
_VIT = [*_BERT, "q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]
_DISTILBERT = ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"]
_CLIP = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]

#: Default target modules per `config.model_type` (all linear projections of the blocks, as in the NoRA papers).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    **dict.fromkeys(["llama", "mistral", "mixtral", "gemma", "gemma2", "qwen2", "qwen3", "olmo", "olmo2"], _DECODER),
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    **dict.fromkeys(["bert", "roberta"], _BERT),
    **dict.fromkeys(["vit", "deit"], _VIT),
    "distilbert": _DISTILBERT,
    **dict.fromkeys(["clip", "clip_text_model", "clip_vision_model", "siglip"], _CLIP),
}
#: Attention projections of a diffusers UNet2DConditionModel (the NoRA paper's SDXL experiment).
DIFFUSERS_UNET_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]

SUPPORTED_LAYERS = (nn.Linear, Conv1D)

#: Name of the attribute `nora.calibrate` sets on a base layer: mean |x_j| per input channel (float32, shape (in,)).
CALIBRATION_ATTR = "nora_act_mean_abs"


def default_target_modules(model_type: str | None, class_name: str = "") -> list[str]:
    """nora's default targets for a transformers `model_type` or a diffusers UNet; a clear error otherwise."""
    if model_type in DEFAULT_TARGET_MODULES:
        return DEFAULT_TARGET_MODULES[model_type]
    if "UNet" in class_name:
        return DIFFUSERS_UNET_TARGET_MODULES
    raise ValueError(
        f"NoraConfig.target_modules is not set and nora has no default for model_type={model_type!r}; pass "
        "target_modules=[...] or target_modules='all-linear'. Defaults exist for: "
        f"{', '.join(sorted(DEFAULT_TARGET_MODULES))}, and diffusers UNets."
    )


class NoraModel(BaseTuner):
    """Creates a NoRA model from a transformers / diffusers / plain torch model; use through `peft.get_peft_model`."""

    prefix: str = "nora_"
    tuner_layer_cls = NoraLayer
    target_module_mapping = DEFAULT_TARGET_MODULES

    def _prepare_adapter_config(self, peft_config: NoraConfig, model_config: dict) -> NoraConfig:
        if peft_config.target_modules is not None:
            return peft_config
        class_name = str(model_config.get("_class_name", type(self.model).__name__))
        peft_config.target_modules = set(default_target_modules(model_config.get("model_type"), class_name))
        return peft_config

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except ValueError as exc:
            if "not found in the base model" not in str(exc) and "No modules were targeted" not in str(exc):
                raise
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, SUPPORTED_LAYERS)})
            config = self.peft_config[adapter_name]
            raise ValueError(
                f"NoRA: no module matched target_modules={config.target_modules!r}. Linear/Conv1D modules in this "
                f"model are named: {', '.join(names) or '(none)'}. Pass some of these as target_modules."
            ) from exc
        names = [n for n, m in model.named_modules() if isinstance(m, NoraLayer) and adapter_name in m.r]
        patterns.check_all_matched(self.peft_config[adapter_name], names)
        from . import compact

        compact.remember_model(model, adapter_name, self.peft_config[adapter_name])
        from . import sharing

        sharing.share_records(self.peft_config, adapter_name)  # N adapters on one base: one fingerprint dict
        if getattr(self.peft_config[adapter_name], "_from_checkpoint", False):
            sharing.light_placeholders(model, adapter_name)  # no full-size zeros while N adapters are loaded
        mixed_batch.guard_base_model(model)  # `adapter_names=` on the bare base model (transformers' load_adapter)

    def _create_and_replace(
        self, nora_config, adapter_name, target, target_name, parent, current_key, **optional_kwargs
    ) -> None:
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        act = getattr(base, CALIBRATION_ATTR, None)
        quant_kwargs = get_quantization_kwargs(self.model)
        # quantized layers first (nora.quantized): quanto's QLinear is an nn.Linear with a quantized weight
        backend = resolve_backend(base, current_key, **quant_kwargs)
        if backend is None and not isinstance(base, SUPPORTED_LAYERS):
            raise TypeError(
                f"NoRA: target module {current_key!r} is a {type(base).__name__}; only torch.nn.Linear and "
                "transformers Conv1D are supported. Remove it from target_modules or add it to exclude_modules."
            )
        if backend is not None and not getattr(nora_config, "_from_checkpoint", False):
            nora_config.base_quantization = describe(self.model, base, backend)
        # DeepSpeed ZeRO-3: every weight read at init (fingerprint, checks, SVD) sees the whole weight (read-only)
        with gather_params_ctx(list(base.parameters(recurse=False)), modifier_rank=None):
            self._check_or_record_fingerprint(nora_config, current_key, base, backend)
            if isinstance(target, Linear):
                layer_config = patterns.module_config(nora_config, current_key)  # rank_pattern / r_inner_pattern
                target.update_layer(adapter_name, layer_config, act_mean_abs=act, module_name=current_key)
                return
            nora_config.fan_in_fan_out = isinstance(base, Conv1D)  # recorded for PEFT tooling; layers read the type
            layer_config = patterns.module_config(nora_config, current_key)
            new_module = Linear(
                target, adapter_name, layer_config, act_mean_abs=act, module_name=current_key, **quant_kwargs
            )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """PeftModel.forward/generate enter this with the call's kwargs: `adapter_names=[...]` (one per row)."""
        return mixed_batch.forward_hooks(self, *args, **kwargs)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT upcasts every half-precision adapter tensor to float32, buffers included; keep the trained inner
        factors in float32 but the frozen outer buffers in the base weight's dtype (half the memory, as documented)."""
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        for module in self.model.modules():
            if not isinstance(module, NoraLayer):
                continue
            dtype = module._base_dtype()
            if not dtype.is_floating_point:
                continue
            for buffers in (module.nora_B, module.nora_A):
                if adapter_name in buffers and buffers[adapter_name].dtype != dtype:
                    buffers[adapter_name] = buffers[adapter_name].to(dtype)
        from . import sharing

        # runs after get_peft_model, add_adapter and load_adapter (once the weights are in): share identical B, A
        sharing.share_model(self.model, adapter_name, self.peft_config)

    @staticmethod
    def _check_or_record_fingerprint(config: NoraConfig, key: str, base: nn.Module, backend=None) -> None:
        actual = weight_fingerprint(read_weight_mn(base, backend))
        if actual is None:
            return
        if not getattr(config, "_from_checkpoint", False):
            config.base_fingerprint = {**(config.base_fingerprint or {}), key: actual}
            return
        full_file = getattr(config, "save_outer_factors", True)
        if not config.check_base_fingerprint or (full_file and getattr(config, "_base_mismatch_warned", False)):
            return
        expected = (config.base_fingerprint or {}).get(key)
        # full file: warn (once per adapter) and load; compact file: refuse; other shapes: refuse
        config._base_mismatch_warned = apply_fingerprint_policy(key, expected, actual, full_file=full_file)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        from . import compact

        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        return compact.filter_for_save(model, config, adapter_name, to_return)  # save_outer_factors=False: no B, A

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        own = model.state_dict()
        wrong = [
            f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
            for k, v in remapped.items()
            if k in own and tuple(own[k].shape) != tuple(v.shape)
        ]
        if wrong:
            raise ValueError(
                f"NoRA adapter shapes do not fit the base model ({len(wrong)} tensors), e.g. {wrong[0]}. The adapter "
                "was built for a model with other layer sizes or another r / r_inner; load it onto its own base model."
            )
        from . import compact

        remapped = compact.restore_outer(model, config, adapter_name, remapped)  # compact file: rebuild + verify
        from . import sharing

        sharing.adopt_loaded(model, adapter_name, getattr(model, "peft_config", {}), remapped)  # share identical B, A
        expected_outer = [k for k in own if f".nora_B.{adapter_name}" in k]
        missing = [k for k in expected_outer if k not in remapped]
        if missing:
            raise ValueError(
                f"NoRA adapter file lacks the frozen outer factors (e.g. {missing[0]}); it is truncated or was not "
                "written by nora's save_pretrained. Re-save the adapter."
            )
        return remapped


def count_trainable(model: nn.Module) -> int:
    """Number of parameters with requires_grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def nora_layers(model: nn.Module):
    """Yield (name, layer) for every NoRA layer of a (Peft)model."""
    for name, module in model.named_modules():
        if isinstance(module, NoraLayer):
            yield name, module
