"""Pieces shared by the family adapters: the causal mask and the flat KV-cache contract."""

from __future__ import annotations

import torch
from torch import nn


def head_dim(config) -> int:
    """The attention head width: ``config.head_dim`` where the family sets it, else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def shape_facts(config, family: str, **overrides) -> dict:
    """The shape facts graphopt.json records for a family's ``config`` (``overrides``: what it does differently)."""
    return {
        "family": family,
        "model_type": config.model_type,
        "layers": config.num_hidden_layers,
        "heads": config.num_attention_heads,
        "kv_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        "head_dim": head_dim(config),
        "hidden_size": config.hidden_size,
        "intermediate_size": getattr(config, "intermediate_size", None),
        "vocab_size": config.vocab_size,
        "max_positions": config.max_position_embeddings,
        "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        **overrides,
    }


class CachedDecoder(nn.Module):
    """Decoder with an explicit KV cache: (ids, mask, positions, past...) -> (logits, present...).

    The family modules subclass it; it holds the checkpoint (``hf``) and its attention shape.
    """

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        config = self.config = hf_model.config
        self.hf = hf_model
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim(config)
        self.eps = getattr(config, "rms_norm_eps", None)


def causal_mask(attention_mask: torch.Tensor, seq_len: int, past_len: torch.Tensor | int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask of shape (batch, 1, seq, past + seq) from a 0/1 attention mask.

    Query ``i`` (absolute position ``past_len + i``) sees key ``j`` when ``j <= past_len + i`` and
    ``attention_mask[:, j]`` is 1, so padding anywhere in the cache is honoured.
    """
    total_len = attention_mask.shape[1]
    key_positions = torch.arange(total_len, device=attention_mask.device)
    query_positions = torch.arange(seq_len, device=attention_mask.device) + past_len
    allowed = key_positions[None, :] <= query_positions[:, None]
    allowed = allowed[None, None, :, :] & (attention_mask[:, None, None, :] > 0)
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    lowest = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, lowest)


def repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """(batch, kv_heads, seq, dim) -> (batch, kv_heads * groups, seq, dim)."""
    if groups == 1:
        return states
    batch, kv_heads, seq, dim = states.shape
    states = states[:, :, None, :, :].expand(batch, kv_heads, groups, seq, dim)
    return states.reshape(batch, kv_heads * groups, seq, dim)


def attend(query, key, value, mask, scale: float):
    """Eager scaled dot-product attention; the plain pattern the fusion pass recognises."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    scores = scores + mask
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, value)
