"""NoRA: Nested Low-Rank Adaptation as a native PEFT method.

import nora                       # registers NoRA with PEFT
cfg = nora.NoraConfig(r=64, r_inner=32, target_modules="all-linear")
model = peft.get_peft_model(model, cfg)
"""

from __future__ import annotations

from .calibration import calibrate, reconstruction_report, set_calibration
from .config import PEFT_TYPE, NoraConfig
from .export import export_lora, export_merged, lora_state_dict
from .gradient_init import gradient_init
from .hotswap import hotswap_adapter
from .layer import Linear, NoraLayer
from .model import DEFAULT_TARGET_MODULES, DIFFUSERS_UNET_TARGET_MODULES, NoraModel
from .quantized import dequantize_base
from .registration import register

__version__ = "0.1.0"

register()

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "DIFFUSERS_UNET_TARGET_MODULES",
    "PEFT_TYPE",
    "Linear",
    "NoraConfig",
    "NoraLayer",
    "NoraModel",
    "calibrate",
    "dequantize_base",
    "export_lora",
    "export_merged",
    "gradient_init",
    "hotswap_adapter",
    "lora_state_dict",
    "reconstruction_report",
    "register",
    "set_calibration",
]
