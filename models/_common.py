"""Pieces shared by the family adapters: the causal mask and the flat KV-cache contract."""

from __future__ import annotations

import torch


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
