"""Llama-family decoder (Llama 2/3, SmolLM2, TinyLlama, Mistral, Qwen2) as an exportable module.

GQA with rotary position embedding, RMSNorm and a SwiGLU MLP. The module is written against the
Hugging Face checkpoint's own weights so that the exported graph has one plain, predictable shape
per layer (what the fusion pass matches) whatever the installed transformers version does inside.
"""

from __future__ import annotations

import torch
from torch import nn

from graphopt.errors import UnsupportedModelError
from graphopt.models import WeightNames
from graphopt.models._common import CachedDecoder, attend, causal_mask, repeat_kv, shape_facts

MODEL_TYPES = ("llama", "mistral", "qwen2")
WEIGHT_NAMES = WeightNames("model.layers", {
    "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
    "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down"})


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaDecoder(CachedDecoder):
    def __init__(self, hf_model: nn.Module):
        super().__init__(hf_model)
        rotary = hf_model.model.rotary_emb
        self.register_buffer("inv_freq", rotary.inv_freq.detach().float().clone(), persistent=False)
        self.rope_scaling = float(getattr(rotary, "attention_scaling", 1.0))
        # Which layers rotate query and key; families with position-free layers (SmolLM3) override.
        self.rope_layers = [True] * self.num_layers

    def normalize_qk(self, attn: nn.Module, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head query/key normalization on (batch, seq, heads, head_dim), before RoPE; none in Llama."""
        return query, key

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        model = self.hf.model
        hidden = model.embed_tokens(input_ids)
        batch, seq_len, _ = hidden.shape
        past_len = past_key_values[0].shape[2]
        mask = causal_mask(attention_mask, seq_len, past_len, hidden.dtype)

        freqs = position_ids[..., None].float() * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = (angles.cos() * self.rope_scaling).to(hidden.dtype)[:, None, :, :]
        sin = (angles.sin() * self.rope_scaling).to(hidden.dtype)[:, None, :, :]

        presents = []
        scale = self.head_dim**-0.5
        groups = self.num_heads // self.kv_heads
        for index, layer in enumerate(model.layers):
            attn = layer.self_attn
            residual = hidden
            hidden = _rms_norm(hidden, layer.input_layernorm.weight, self.eps)
            query = attn.q_proj(hidden).view(batch, seq_len, self.num_heads, self.head_dim)
            key = attn.k_proj(hidden).view(batch, seq_len, self.kv_heads, self.head_dim)
            query, key = self.normalize_qk(attn, query, key)
            query, key = query.transpose(1, 2), key.transpose(1, 2)
            value = attn.v_proj(hidden).view(batch, seq_len, self.kv_heads, self.head_dim).transpose(1, 2)
            if self.rope_layers[index]:
                query = query * cos + _rotate_half(query) * sin
                key = key * cos + _rotate_half(key) * sin
            key = torch.cat((past_key_values[2 * index], key), dim=2)
            value = torch.cat((past_key_values[2 * index + 1], value), dim=2)
            presents.extend((key, value))
            context = attend(query, repeat_kv(key, groups), repeat_kv(value, groups), mask, scale)
            context = context.transpose(1, 2).reshape(batch, seq_len, self.num_heads * self.head_dim)
            hidden = residual + attn.o_proj(context)

            residual = hidden
            hidden = _rms_norm(hidden, layer.post_attention_layernorm.weight, self.eps)
            mlp = layer.mlp
            hidden = residual + mlp.down_proj(nn.functional.silu(mlp.gate_proj(hidden)) * mlp.up_proj(hidden))

        hidden = _rms_norm(hidden, model.norm.weight, self.eps)
        logits = self.hf.lm_head(hidden)
        return (logits, *presents)


def describe(config) -> dict:
    """The shape facts graphopt.json records for this family."""
    return shape_facts(config, "llama")


# RoPE types whose frequencies change with the sequence length: the export bakes one table in.
_DYNAMIC_ROPE = ("dynamic", "longrope")


def check_rope(config) -> None:
    """Refuse RoPE scalings the export cannot hold; static ones (``llama3``, ``linear``, ``yarn``)
    are already inside the rotary module's ``inv_freq`` / ``attention_scaling``."""
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = parameters.get("rope_type", parameters.get("type", "default")) if isinstance(parameters, dict) else "default"
    if rope_type in _DYNAMIC_ROPE:
        raise UnsupportedModelError(f"{config.model_type} with RoPE scaling {rope_type!r} (frequencies that depend on "
                                    "the sequence length) is not supported")


def fit_sliding_window(config) -> None:
    """Full attention equals sliding-window attention while the context fits in the window."""
    sliding = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", bool(sliding)) and sliding:
        config.max_position_embeddings = min(config.max_position_embeddings, sliding)


def build(hf_model: nn.Module, decoder: type[LlamaDecoder] = LlamaDecoder) -> nn.Module:
    """The exportable decoder (``decoder``: a Llama-layout family's subclass)."""
    check_rope(hf_model.config)
    fit_sliding_window(hf_model.config)
    return decoder(hf_model)
