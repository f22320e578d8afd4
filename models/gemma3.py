"""Gemma 3 text decoder (``gemma3_text``: Gemma 3 270M / 1B, and the text part of larger ones).

Differences from Llama, all written out in the graph: embeddings scaled by sqrt(hidden_size);
RMSNorm scaled by ``1 + weight``; per-head RMSNorm on query and key before RoPE; norms before and
after both attention and MLP; GELU-tanh gated MLP; query scale ``query_pre_attn_scalar ** -0.5``;
``layer_types`` interleaving sliding-window layers (their own RoPE base, ``rope_local_base_freq``)
and global layers; optional tanh softcapping of the final logits. ``attn_logit_softcapping`` is
not applied, as in transformers (5.25's Gemma3Attention does not pass it to the attention; no
Gemma 3 checkpoint sets it). The KV cache of
a sliding layer keeps every position (the mask hides those outside the window), so all layers
share the cache layout.
"""

from __future__ import annotations

import torch
from torch import nn

from graphopt.errors import UnsupportedModelError
from graphopt.models import WeightNames
from graphopt.models._common import CachedDecoder, attend, causal_mask, repeat_kv, shape_facts
from graphopt.models._window import apply_rope, rope_tables, sliding_causal_mask

MODEL_TYPES = ("gemma3_text",)
WEIGHT_NAMES = WeightNames("model.layers", {
    "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
    "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down"})
SLIDING, FULL = "sliding_attention", "full_attention"


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Gemma stores the scale minus one; (1 + weight) folds to a constant at export.
    variance = x.pow(2).mean(-1, keepdim=True)
    return (1.0 + weight) * (x * torch.rsqrt(variance + eps))


def _softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if not cap else torch.tanh(x / cap) * cap


class Gemma3Decoder(CachedDecoder):
    def __init__(self, hf_model: nn.Module):
        super().__init__(hf_model)
        config = hf_model.config
        self.layer_types = list(config.layer_types)
        self.window = config.sliding_window
        self.scale = float(config.query_pre_attn_scalar) ** -0.5
        self.final_softcap = config.final_logit_softcapping
        rotary = hf_model.model.rotary_emb
        self.rope_scaling = {}
        for layer_type in sorted(set(self.layer_types)):
            self.register_buffer(f"{layer_type}_inv_freq",
                                 getattr(rotary, f"{layer_type}_inv_freq").detach().float().clone(), persistent=False)
            self.rope_scaling[layer_type] = float(getattr(rotary, f"{layer_type}_attention_scaling"))
        self.embed_scale = float(hf_model.model.embed_tokens.embed_scale)

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        model = self.hf.model
        # Hugging Face multiplies by the scale rounded to the weights' dtype; float32 here.
        hidden = nn.functional.embedding(input_ids, model.embed_tokens.weight) * self.embed_scale
        batch, seq_len, _ = hidden.shape
        past_len = past_key_values[0].shape[2]
        masks, tables = {}, {}
        for layer_type in set(self.layer_types):
            if layer_type == SLIDING:
                masks[layer_type] = sliding_causal_mask(attention_mask, seq_len, past_len, self.window, hidden.dtype)
            else:
                masks[layer_type] = causal_mask(attention_mask, seq_len, past_len, hidden.dtype)
            tables[layer_type] = rope_tables(position_ids, getattr(self, f"{layer_type}_inv_freq"),
                                             self.rope_scaling[layer_type], hidden.dtype)

        presents = []
        groups = self.num_heads // self.kv_heads
        for index, layer in enumerate(model.layers):
            layer_type = self.layer_types[index]
            cos, sin = tables[layer_type]
            attn = layer.self_attn
            residual = hidden
            hidden = _rms_norm(hidden, layer.input_layernorm.weight, self.eps)
            # The per-head norms act on the last axis, so they run before the transpose (same values
            # as Hugging Face's after it), which keeps the head split one Reshape for the fusion.
            query = _rms_norm(attn.q_proj(hidden).view(batch, seq_len, self.num_heads, self.head_dim),
                              attn.q_norm.weight, self.eps).transpose(1, 2)
            key = _rms_norm(attn.k_proj(hidden).view(batch, seq_len, self.kv_heads, self.head_dim),
                            attn.k_norm.weight, self.eps).transpose(1, 2)
            value = attn.v_proj(hidden).view(batch, seq_len, self.kv_heads, self.head_dim).transpose(1, 2)
            query = apply_rope(query, cos, sin)
            key = apply_rope(key, cos, sin)
            key = torch.cat((past_key_values[2 * index], key), dim=2)
            value = torch.cat((past_key_values[2 * index + 1], value), dim=2)
            presents.extend((key, value))
            context = attend(query, repeat_kv(key, groups), repeat_kv(value, groups), masks[layer_type], self.scale)
            context = context.transpose(1, 2).reshape(batch, seq_len, self.num_heads * self.head_dim)
            hidden = residual + _rms_norm(attn.o_proj(context), layer.post_attention_layernorm.weight, self.eps)

            residual = hidden
            hidden = _rms_norm(hidden, layer.pre_feedforward_layernorm.weight, self.eps)
            mlp = layer.mlp
            hidden = mlp.down_proj(nn.functional.gelu(mlp.gate_proj(hidden), approximate="tanh") * mlp.up_proj(hidden))
            hidden = residual + _rms_norm(hidden, layer.post_feedforward_layernorm.weight, self.eps)

        hidden = _rms_norm(hidden, model.norm.weight, self.eps)
        return (_softcap(self.hf.lm_head(hidden), self.final_softcap), *presents)


def describe(config) -> dict:
    """The shape facts graphopt.json records for this family."""
    return shape_facts(config, "gemma3")


def build(hf_model: nn.Module) -> nn.Module:
    config = hf_model.config
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModelError("gemma3_text with use_bidirectional_attention (an encoder) is not supported")
    if config.hidden_activation != "gelu_pytorch_tanh":
        raise UnsupportedModelError(f"gemma3_text with hidden_activation {config.hidden_activation!r} is not supported")
    unknown = set(config.layer_types) - {SLIDING, FULL}
    if unknown:
        raise UnsupportedModelError(f"gemma3_text layer types {sorted(unknown)} are not supported")
    return Gemma3Decoder(hf_model)
