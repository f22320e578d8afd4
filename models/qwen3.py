"""Qwen3 decoder: the Llama layout plus a per-head RMSNorm on query and key before RoPE.

``q_norm`` / ``k_norm`` normalize each head's ``head_dim`` vector (one weight shared by all heads),
on the (batch, seq, heads, head_dim) projections, before they are transposed and rotated. The
fused graph keeps the norms outside GroupQueryAttention (the op takes the normalized query/key as
its packed (batch, seq, heads * head_dim) inputs and applies the rotary itself).
"""

from __future__ import annotations

import torch
from torch import nn

from graphopt.models import llama

MODEL_TYPES = ("qwen3",)
WEIGHT_NAMES = llama.WEIGHT_NAMES


class Qwen3Decoder(llama.LlamaDecoder):
    """Llama decoder with Qwen3's per-head query/key RMSNorm."""

    def normalize_qk(self, attn: nn.Module, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (llama._rms_norm(query, attn.q_norm.weight, attn.q_norm.variance_epsilon),
                llama._rms_norm(key, attn.k_norm.weight, attn.k_norm.variance_epsilon))


def describe(config) -> dict:
    """The shape facts graphopt.json records for this family."""
    return {**llama.describe(config), "family": "qwen3"}


def build(hf_model: nn.Module) -> nn.Module:
    return llama.build(hf_model, Qwen3Decoder)
