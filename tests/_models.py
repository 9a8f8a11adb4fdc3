"""Tiny random models for the NoRA tests, one builder per family, plus matching inputs and a uniform forward.

This module must never import nora: the export test runs it in a subprocess that loads the exported LoRA with plain
PEFT and asserts that nora was never imported. Every builder seeds torch, so calling it twice (or in another process
on the same machine) gives bit-identical weights.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
from torch import nn

# The models here are tiny: intra-op threads buy nothing and, on a shared 2-core machine, OpenMP threads spinning
# against other processes made a UNet forward 40x slower (2.1 s vs 0.05 s). Every test module imports this file.
torch.set_num_threads(1)

FAMILIES = ("llama", "gpt2", "bert", "vit", "clip", "unet")

VOCAB = 64
SEQ = 8


def build(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> nn.Module:
    """A tiny randomly initialised model of `family` in eval mode (dropout off)."""
    torch.manual_seed(seed)
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=overrides.pop("num_hidden_layers", 1),
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            **overrides,
        )
        model = LlamaForCausalLM(cfg)
    elif family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(
            n_embd=32,
            n_layer=1,
            n_head=4,
            vocab_size=VOCAB,
            n_positions=32,
            bos_token_id=0,
            eos_token_id=1,
            **overrides,
        )
        model = GPT2LMHeadModel(cfg)
    elif family == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=VOCAB,
            max_position_embeddings=32,
            num_labels=3,
            **overrides,
        )
        model = BertForSequenceClassification(cfg)
    elif family == "vit":
        from transformers import ViTConfig, ViTForImageClassification

        cfg = ViTConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=16,
            patch_size=8,
            num_channels=3,
            num_labels=3,
            **overrides,
        )
        model = ViTForImageClassification(cfg)
    elif family == "clip":
        from transformers import CLIPConfig, CLIPModel

        common = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}
        cfg = CLIPConfig(
            text_config={
                **common,
                "vocab_size": VOCAB,
                "max_position_embeddings": 32,
                "bos_token_id": 0,
                "eos_token_id": 1,
                "pad_token_id": 2,
            },
            vision_config={**common, "image_size": 16, "patch_size": 8},
            projection_dim=16,
            **overrides,
        )
        model = CLIPModel(cfg)
    elif family == "unet":
        from diffusers import UNet2DConditionModel

        model = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
            **overrides,
        )
    else:
        raise ValueError(f"unknown family {family!r}")
    if dtype != torch.float32:
        model = model.to(dtype)
    return model.eval()


@functools.cache
def _cached(family: str) -> nn.Module:
    return build(family)


def fresh(family: str) -> nn.Module:
    """A private copy of the float32 model `build(family)` (built once per process, then deep-copied)."""
    return copy.deepcopy(_cached(family))


def inputs(family: str, seed: int = 1, batch: int = 2) -> dict[str, torch.Tensor]:
    """A deterministic batch of model inputs (keyword arguments of the model's forward)."""
    gen = torch.Generator().manual_seed(seed)
    if family in ("llama", "gpt2"):
        return {"input_ids": torch.randint(0, VOCAB, (batch, SEQ), generator=gen)}
    if family == "bert":
        ids = torch.randint(0, VOCAB, (batch, SEQ), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if family == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=gen)}
    if family == "clip":
        ids = torch.randint(0, VOCAB, (batch, SEQ), generator=gen)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(batch, 3, 16, 16, generator=gen),
        }
    if family == "unet":
        return {
            "sample": torch.randn(batch, 4, 8, 8, generator=gen),
            "timestep": torch.tensor(10),
            "encoder_hidden_states": torch.randn(batch, 4, 32, generator=gen),
        }
    raise ValueError(f"unknown family {family!r}")


def output(family: str, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's main output tensor (logits, or the UNet's predicted noise)."""
    out = model(**batch)
    if family == "unet":
        return out.sample
    if family == "clip":
        return torch.cat([out.logits_per_image.flatten(), out.text_embeds.flatten(), out.image_embeds.flatten()])
    return out.logits


def cast_inputs(batch: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Float inputs in `dtype` (for half-precision base models); integer inputs unchanged."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}


class OneLinear(nn.Module):
    """The smallest NoRA target: one nn.Linear called `lin`."""

    def __init__(self, m: int, n: int, dtype: torch.dtype = torch.float32, bias: bool = True):
        super().__init__()
        self.lin = nn.Linear(n, m, bias=bias, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)
