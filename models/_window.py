"""Pieces the gemma3_text and phi3 adapters share: the sliding-window mask and RoPE helpers."""

from __future__ import annotations

import torch

from graphopt.models._common import causal_mask


def sliding_causal_mask(attention_mask: torch.Tensor, seq_len: int, past_len: torch.Tensor | int, window: int,
                        dtype: torch.dtype) -> torch.Tensor:
    """``causal_mask`` restricted to the last ``window`` keys: query at position p sees key j when p - j < window.

    That is Hugging Face's ``sliding_window_overlay`` (``kv_idx > q_idx - window``). The window test
    is written as ``Less(query - key, window)`` with the window a constant, which is how the
    attention fusion recognises a sliding layer and reads its window.
    """
    total_len = attention_mask.shape[1]
    key_positions = torch.arange(total_len, device=attention_mask.device)
    query_positions = torch.arange(seq_len, device=attention_mask.device) + past_len
    in_window = (query_positions[:, None] - key_positions[None, :]) < window
    causal = causal_mask(attention_mask, seq_len, past_len, dtype)
    lowest = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
    return torch.where(in_window[None, None, :, :], causal, lowest)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_tables(position_ids: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype):
    """(cos, sin) of shape (batch, 1, seq, 2 * len(inv_freq)), as Hugging Face computes them."""
    freqs = position_ids[..., None].float() * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    cos = (angles.cos() * scaling).to(dtype)[:, None, :, :]
    sin = (angles.sin() * scaling).to(dtype)[:, None, :, :]
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first ``cos.shape[-1]`` channels of each head (all of them unless partial)."""
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((rotated * cos + rotate_half(rotated) * sin, passed), dim=-1)
