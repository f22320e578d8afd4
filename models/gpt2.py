"""GPT-2 decoder as an exportable module: learned positions, LayerNorm, fused QKV, GELU (tanh).

Multi-head attention (as many KV heads as query heads); the fused ``c_attn`` projection is split
into query, key and value after one MatMul, as in the checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from graphopt.models import WeightNames
from graphopt.models._common import CachedDecoder, attend, causal_mask, shape_facts

MODEL_TYPES = ("gpt2",)
WEIGHT_NAMES = WeightNames("transformer.h", {
    "attn.c_attn": "qkv", "attn.c_proj": "o", "mlp.c_fc": "up", "mlp.c_proj": "down"})


class GPT2Decoder(CachedDecoder):
    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        transformer = self.hf.transformer
        hidden = transformer.wte(input_ids) + transformer.wpe(position_ids)
        batch, seq_len, width = hidden.shape
        past_len = past_key_values[0].shape[2]
        mask = causal_mask(attention_mask, seq_len, past_len, hidden.dtype)
        scale = self.head_dim**-0.5
        presents = []
        for index, block in enumerate(transformer.h):
            residual = hidden
            hidden = block.ln_1(hidden)
            attn = block.attn
            query, key, value = attn.c_attn(hidden).split(width, dim=2)
            query = query.view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
            key = key.view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
            value = value.view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
            key = torch.cat((past_key_values[2 * index], key), dim=2)
            value = torch.cat((past_key_values[2 * index + 1], value), dim=2)
            presents.extend((key, value))
            context = attend(query, key, value, mask, scale)
            context = context.transpose(1, 2).reshape(batch, seq_len, width)
            hidden = residual + attn.c_proj(context)

            residual = hidden
            mlp = block.mlp
            hidden = residual + mlp.c_proj(nn.functional.gelu(mlp.c_fc(block.ln_2(hidden)), approximate="tanh"))

        logits = self.hf.lm_head(transformer.ln_f(hidden))
        return (logits, *presents)


def describe(config) -> dict:
    """The shape facts graphopt.json records for this family."""
    return shape_facts(config, "gpt2", intermediate_size=config.n_inner or 4 * config.n_embd,
                       tied_embeddings=bool(getattr(config, "tie_word_embeddings", True)))


def build(hf_model: nn.Module) -> nn.Module:
    return GPT2Decoder(hf_model)
