# Copyright 2026 The visincontext authors. Licensed under the Apache License, Version 2.0.
"""The models' outputs, and the one place that knows the KV cache's two names (`cache` from transformers 5.24,
`past_key_values` before): `CACHE_NAME` for outputs, `accepts_past_key_values` for a `forward`'s inputs."""

import functools
import warnings
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .cross_attention_visincontext import MediaMemory

# transformers 5.24 renamed the KV cache from `past_key_values` to `cache` in every output and `forward`. The model
# accepts it under both names and returns it under the name the installed version's outputs declare.
CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def _one_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The KV cache, given as `cache` (transformers >= 5.24) or `past_key_values` (earlier releases)."""
    if cache is not None and past_key_values is not None:
        raise ValueError("cache: pass the KV cache as `cache` or as `past_key_values`, not both")
    if past_key_values is not None and CACHE_NAME == "cache":  # the installed transformers' own deprecation
        warnings.warn(
            "`past_key_values` is deprecated since transformers 5.24: pass the KV cache as `cache`",
            FutureWarning,
            stacklevel=4,
        )
    return cache if cache is not None else past_key_values


def accepts_past_key_values(forward):
    """`forward` takes the KV cache as `cache`, and also under its name before transformers 5.24."""

    @functools.wraps(forward)
    def wrapper(self, *args, past_key_values: Cache | None = None, **kwargs):
        if past_key_values is not None:
            kwargs["cache"] = _one_cache(kwargs.get("cache"), past_key_values)
        return forward(self, *args, **kwargs)

    return wrapper


@dataclass
class VisInContextModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    media (`MediaMemory`):
        What the cross-attention read. Reused by `generate` at every step (and by a caller to ask again).
    media_key_values (tuple of `(key, value)` pairs, each `(B, heads, S, head_dim)`):
        The memory projected by each cross-attention block: computed once, reused by `generate` at every step.
    chunk_ids (`torch.LongTensor` of shape `(B, T)`):
        Chunk of each text token: the number of `<image>` tokens up to and including it.
    context_latents (`torch.FloatTensor` of shape `(B, P, L, D)`):
        Resampled latents of the rendered context pages (zeros for padded pages).
    """

    media: MediaMemory | None = None
    media_key_values: tuple | None = None
    chunk_ids: torch.LongTensor | None = None
    context_latents: torch.FloatTensor | None = None


@dataclass
class VisInContextCausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    loss (`torch.FloatTensor` of shape `()`):
        `lm_loss + contrastive_loss_weight * contrastive_loss + reading_loss_weight * reading_loss` (the terms that
        were computed).
    logits (`torch.FloatTensor` of shape `(B, T, vocab)`):
        Prediction scores, `vocab = config.output_vocab_size`.
    lm_loss (`torch.FloatTensor` of shape `()`):
        Next-token cross-entropy over the labels that are not -100.
    contrastive_loss (`torch.FloatTensor` of shape `()`):
        Text-centric contrastive loss between rendered-context latents and the same text read by the LM.
    reading_loss (`torch.FloatTensor` of shape `()`):
        Cross-entropy of the reading head's characters against `context_reading_targets` (reading objective).
    media, media_key_values, chunk_ids:
        As in `VisInContextModelOutputWithPast`.
    """

    lm_loss: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None
    reading_loss: torch.FloatTensor | None = None
    media: MediaMemory | None = None
    media_key_values: tuple | None = None
    chunk_ids: torch.LongTensor | None = None


# what the head's output takes over from the base model's as it is (the KV cache under the installed name)
HEAD_OUTPUTS_FROM_MODEL = (CACHE_NAME, "hidden_states", "attentions", "media", "media_key_values", "chunk_ids")
