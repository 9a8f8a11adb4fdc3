"""Register NoRA with PEFT under the string peft_type "NORA".

`peft.utils.register_peft_method` only accepts members of PEFT's `PeftType` enum, so nora fills PEFT's mapping
dicts directly; they accept plain string keys and `PeftModel` / `PeftConfig.from_pretrained` resolve through them.
"""

from __future__ import annotations

from peft import mapping

from .config import PEFT_TYPE, NoraConfig
from .model import NoraModel


def register() -> None:
    """Idempotent: make `get_peft_model(model, NoraConfig(...))` and `PeftModel.from_pretrained` work."""
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = NoraConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = NoraModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = NoraModel.prefix
