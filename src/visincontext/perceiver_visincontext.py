# Copyright 2026 The visincontext authors. Licensed under the Apache License, Version 2.0.
# Flamingo's Perceiver resampler (Alayrac et al., 2022) as written in lucidrains/flamingo-pytorch and OpenFlamingo.
"""Perceiver resampler: a variable number of patch features -> a fixed number of latents; and the attention helper
that this resampler and the gated cross-attention share (transformers' attention interface)."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_visincontext import VisInContextConfig


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: int):
        super().__init__(
            nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(), nn.Linear(dim * mult, dim, bias=False)
        )


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, S, h * dh) -> (B, h, S, dh)"""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, h, S, dh) -> (B, S, h * dh)"""
    return x.transpose(1, 2).flatten(2)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """query (B, h, T, dh), key/value (B, h, S, dh), attention_mask (B, 1, T, S) bool, True where a query may read
    a key -> output (B, T, h, dh) and weights (B, h, T, S), like transformers' attention interface."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights.masked_fill(~attention_mask, torch.finfo(weights.dtype).min)
    weights = F.dropout(
        weights.softmax(dim=-1, dtype=torch.float32).to(query.dtype), p=dropout, training=module.training
    )
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def attend(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask=None) -> torch.Tensor:
    """Attention through transformers' `AttentionInterface`, following `config._attn_implementation`.

    The masks here are arbitrary booleans (chunks, padded slots); kernels that take only padding masks
    (FlashAttention, flex attention) cannot express them, so with those the resampler and cross-attention run SDPA.
    Returns (B, T, h * dh).
    """
    implementation = "eager" if module.config._attn_implementation == "eager" else "sdpa"
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
    output, _ = interface(
        module, query, key, value, mask, scaling=query.shape[-1] ** -0.5, dropout=0.0, is_causal=False
    )
    return output.flatten(2)


class PerceiverAttention(nn.Module):
    """Latents attend to the media features and to themselves (Flamingo's resampler attention)."""

    def __init__(self, config: VisInContextConfig, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, num_heads * head_dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * num_heads * head_dim, bias=False)
        self.to_out = nn.Linear(num_heads * head_dim, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """media: (M, n, D) patch features; latents: (M, L, D) -> (M, L, D)"""
        media, latents = self.norm_media(media), self.norm_latents(latents)
        query = _split_heads(self.to_q(latents), self.num_heads)  # (M, h, L, dh)
        key, value = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)
        key, value = _split_heads(key, self.num_heads), _split_heads(value, self.num_heads)  # (M, h, n + L, dh)
        return self.to_out(attend(self, query, key, value))


class PerceiverResampler(nn.Module):
    """Turns the patch features of one image or page into `num_latents` latents."""

    def __init__(self, config: VisInContextConfig):
        super().__init__()
        dim = config.vision_config.hidden_size
        self.latents = nn.Parameter(torch.empty(config.num_latents, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PerceiverAttention(config, dim, config.resampler_num_heads, config.resampler_head_dim),
                    FeedForward(dim, config.resampler_ff_mult),
                ]
            )
            for _ in range(config.resampler_depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        """media: (M, n, D) -> latents (M, L, D)"""
        latents = self.latents.unsqueeze(0).expand(media.shape[0], -1, -1)
        for attention, feed_forward in self.layers:
            latents = latents + attention(media, latents)
            latents = latents + feed_forward(latents)
        return self.norm(latents)
