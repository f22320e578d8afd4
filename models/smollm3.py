"""SmolLM3 decoder: the Llama layout, with some layers attending without rotary position embedding.

``config.no_rope_layers[i]`` is 1 where layer i *uses* RoPE and 0 where it does not (HF's name
counts the flag, not the absence); HF fills it from ``no_rope_layer_interval`` (every 4th layer
position-free) when the checkpoint does not list it. Position-free layers fuse into
GroupQueryAttention with ``do_rotary=0``.
"""

from __future__ import annotations

from torch import nn

from graphopt.models import llama

MODEL_TYPES = ("smollm3",)
WEIGHT_NAMES = llama.WEIGHT_NAMES


def rope_layers(config) -> list[bool]:
    """Per layer: whether it rotates query and key (HF's ``no_rope_layers`` flags, 1 = RoPE)."""
    flags = config.no_rope_layers
    if flags is None:  # transformers fills it in; a hand-made config may not have
        interval = config.no_rope_layer_interval
        flags = [int((index + 1) % interval != 0) for index in range(config.num_hidden_layers)]
    return [bool(flag) for flag in flags]


class SmolLM3Decoder(llama.LlamaDecoder):
    """Llama decoder whose position-free layers skip RoPE."""

    def __init__(self, hf_model: nn.Module):
        super().__init__(hf_model)
        self.rope_layers = rope_layers(hf_model.config)


def describe(config) -> dict:
    """The shape facts graphopt.json records for this family."""
    return {**llama.describe(config), "family": "smollm3"}


def build(hf_model: nn.Module) -> nn.Module:
    return llama.build(hf_model, SmolLM3Decoder)
