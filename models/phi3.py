"""Phi-3 / Phi-3.5 / Phi-4-mini (``phi3``) as an exportable decoder.

Like Llama but with the q/k/v projections packed in one ``qkv_proj`` and gate/up in one
``gate_up_proj`` (both kept packed, sliced in the graph), RoPE on the first
``partial_rotary_factor`` of each head (Phi-4-mini: 0.75), and optionally LongRoPE: frequencies
divided by ``short_factor`` while the sequence fits ``original_max_position_embeddings`` and by
``long_factor`` beyond, with an attention factor on cos/sin. The switch is Hugging Face's: per
forward, on ``max(position_ids) + 1``, written as a ``Where`` on the two constant frequency
vectors (the fusion pass turns it into a switch between two cos/sin caches). A config with
``sliding_window`` masks every layer to that window.
"""

from __future__ import annotations

import torch
from torch import nn

from graphopt.models import WeightNames
from graphopt.models._common import CachedDecoder, attend, causal_mask, repeat_kv, shape_facts
from graphopt.models._window import apply_rope, rope_tables, sliding_causal_mask

MODEL_TYPES = ("phi3",)
WEIGHT_NAMES = WeightNames("model.layers", {"self_attn.qkv_proj": "qkv", "self_attn.o_proj": "o",
                                            "mlp.gate_up_proj": "gate_up", "mlp.down_proj": "down"})


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


class Phi3Decoder(CachedDecoder):
    def __init__(self, hf_model: nn.Module):
        super().__init__(hf_model)
        config = hf_model.config
        self.window = getattr(config, "sliding_window", None)
        rotary = hf_model.model.rotary_emb
        self.rope_scaling = float(getattr(rotary, "attention_scaling", 1.0))
        rope = config.rope_parameters or {}
        self.register_buffer("inv_freq", rotary.original_inv_freq.detach().float().clone(), persistent=False)
        self.original_max = None
        if rope.get("rope_type") == "longrope":
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            self.original_max = int(rope["original_max_position_embeddings"])
            long_inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](config, None, seq_len=self.original_max + 1)
            self.register_buffer("long_inv_freq", long_inv_freq.detach().float().clone(), persistent=False)

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        model = self.hf.model
        hidden = model.embed_tokens(input_ids)
        batch, seq_len, _ = hidden.shape
        past_len = past_key_values[0].shape[2]
        if self.window:
            mask = sliding_causal_mask(attention_mask, seq_len, past_len, self.window, hidden.dtype)
        else:
            mask = causal_mask(attention_mask, seq_len, past_len, hidden.dtype)
        inv_freq = self.inv_freq
        if self.original_max is not None:
            # LongRoPE: Hugging Face picks one set for the whole forward from the furthest position.
            inv_freq = torch.where(position_ids.max() + 1 > self.original_max, self.long_inv_freq, self.inv_freq)
        cos, sin = rope_tables(position_ids, inv_freq, self.rope_scaling, hidden.dtype)

        presents = []
        scale = self.head_dim**-0.5
        groups = self.num_heads // self.kv_heads
        q_width, kv_width = self.num_heads * self.head_dim, self.kv_heads * self.head_dim
        for index, layer in enumerate(model.layers):
            attn = layer.self_attn
            residual = hidden
            hidden = _rms_norm(hidden, layer.input_layernorm.weight, self.eps)
            qkv = attn.qkv_proj(hidden)
            query = qkv[..., :q_width].reshape(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
            key = qkv[..., q_width:q_width + kv_width].reshape(batch, seq_len, self.kv_heads, self.head_dim).transpose(1, 2)
            value = qkv[..., q_width + kv_width:].reshape(batch, seq_len, self.kv_heads, self.head_dim).transpose(1, 2)
            query = apply_rope(query, cos, sin)
            key = apply_rope(key, cos, sin)
            key = torch.cat((past_key_values[2 * index], key), dim=2)
            value = torch.cat((past_key_values[2 * index + 1], value), dim=2)
            presents.extend((key, value))
            context = attend(query, repeat_kv(key, groups), repeat_kv(value, groups), mask, scale)
            context = context.transpose(1, 2).reshape(batch, seq_len, q_width)
            hidden = residual + attn.o_proj(context)

            residual = hidden
            hidden = _rms_norm(hidden, layer.post_attention_layernorm.weight, self.eps)
            mlp = layer.mlp
            gate, up = mlp.gate_up_proj(hidden).chunk(2, dim=-1)
            hidden = residual + mlp.down_proj(up * nn.functional.silu(gate))

        hidden = _rms_norm(hidden, model.norm.weight, self.eps)
        return (self.hf.lm_head(hidden), *presents)


def describe(config) -> dict:
    """The shape facts graphopt.json records for this family.

    With LongRoPE, ``extra.longrope_recompute_at`` is the sequence length at which transformers'
    generate drops the cache built on the short factors and recomputes it (graphopt's Generator
    does the same).
    """
    rope = config.rope_parameters or {}
    extra = {}
    if rope.get("rope_type") == "longrope":
        extra["longrope_recompute_at"] = int(rope["original_max_position_embeddings"]) + 1
    return shape_facts(config, "phi3", extra=extra)


def build(hf_model: nn.Module) -> nn.Module:
    if getattr(hf_model.config, "hidden_act", "silu") != "silu":
        from graphopt.errors import UnsupportedModelError

        raise UnsupportedModelError(f"phi3 with hidden_act {hf_model.config.hidden_act!r} is not supported (silu only)")
    return Phi3Decoder(hf_model)
