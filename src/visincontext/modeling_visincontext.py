# Copyright 2026 The visincontext authors. Licensed under the Apache License, Version 2.0.
# The resampler and gated cross-attention follow Flamingo (Alayrac et al., 2022) as written in
# lucidrains/flamingo-pytorch and OpenFlamingo; the text-centric contrastive loss and the rendered-text
# latents follow VisInContext (Wang et al., NeurIPS 2024).
"""PyTorch VisInContext model.

Reading order: media-token embeddings -> Perceiver resampler -> gated cross-attention -> decoder-layer
wrapper -> contrastive head -> `VisInContextModel` -> `VisInContextForConditionalGeneration`.

Shapes: B batch, T text tokens, N images per sample, P rendered pages per sample, L latents per
image or page, C = N + 1 chunks (chunk 0 holds the tokens before the first `<image>`), K memory
slots per chunk, D vision hidden size, H language-model hidden size.
"""

import copy
import inspect
import math
import os
import shutil
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    BaseModelOutputWithPooling,
    CausalLMOutputWithPast,
    ModelOutput,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging
from transformers.utils.generic import can_return_tuple

from .configuration_visincontext import END_OF_CHUNK_TOKEN, IMAGE_TOKEN, VisInContextConfig
from .rendering_visincontext import READING_CLASSES

logger = logging.get_logger(__name__)


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
            stacklevel=3,
        )
    return cache if cache is not None else past_key_values


CONTEXT_CHUNK = -1  # the chunk of a memory slot that every chunk reads (a context page's latents, in "concat")


@dataclass
class MediaMemory(ModelOutput):
    r"""
    What the gated cross-attention reads, described once: the latents, and for each memory slot where its latents
    come from, which chunk reads it and whether it holds anything. The cross-attention mask follows from it
    (`readable`), and each block projects the latents once (`slot_values`).

    latents (`torch.FloatTensor` of shape `(B, M, D)`):
        The resampled latents of the `N` images, then of the `P` context pages, `L` each (`M = (N + P) * L`);
        zeros for padded images and pages and for images whose latents are dropped (token masking).
    slot_sources (`torch.LongTensor` of shape `(S, 2)`):
        For each slot, the latent (index into `latents`) of its context page and of its image, -1 for none; a slot
        with both holds their sum (`latent_fusion="sum"`). With "concat", image slots and context slots are apart.
    slot_chunk (`torch.LongTensor` of shape `(S,)`):
        The chunk whose tokens read the slot: image `i`'s slots belong to chunk `i + 1` (chunk 0 holds the tokens
        before the first `<image>`); `CONTEXT_CHUNK` (-1) for context slots that every chunk reads.
    slot_valid (`torch.LongTensor` of shape `(B, S)`):
        1 where the slot holds a real image or page, 0 for padding (like `attention_mask`).
    """

    latents: torch.FloatTensor | None = None
    slot_sources: torch.LongTensor | None = None
    slot_chunk: torch.LongTensor | None = None
    slot_valid: torch.LongTensor | None = None

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    def slot_values(self, projected: torch.Tensor) -> torch.Tensor:
        """Per-source values (B, M, X) (e.g. the latents projected by a block) -> per-slot values (B, S, X). Exact for
        a linear projection without bias: the projection of a sum is the sum of the projections."""
        padded = torch.cat([projected, projected.new_zeros(projected.shape[0], 1, projected.shape[2])], dim=1)
        index = torch.where(self.slot_sources < 0, projected.shape[1], self.slot_sources)  # -1 -> the zero row
        return padded[:, index[:, 0]] + padded[:, index[:, 1]]

    def readable(self, chunk_ids: torch.LongTensor, only_attend_immediate_media: bool) -> torch.BoolTensor:
        """chunk_ids (B, T) -> (B, T, S): the slots each token reads. A token reads the context and its own chunk's
        image, and also every earlier image when `only_attend_immediate_media` is False."""
        chunk = self.slot_chunk[None, None, :]
        token = chunk_ids[..., None]
        readable = (chunk == CONTEXT_CHUNK) | (chunk == token)
        if not only_attend_immediate_media:
            readable = readable | ((chunk >= 1) & (chunk < token))
        return readable & self.slot_valid.bool()[:, None, :]

    def for_batch(self, batch_size: int) -> "MediaMemory":
        """This memory for a batch of `batch_size` rows: the same, or each sample's memory repeated for consecutive
        rows (several prompts about one document; the beams or samples of `generate`)."""
        if batch_size == self.batch_size:
            return self
        if batch_size % self.batch_size:
            raise ValueError(f"media: a memory of {self.batch_size} samples cannot serve a batch of {batch_size}")
        repeats = batch_size // self.batch_size
        return MediaMemory(
            latents=self.latents.repeat_interleave(repeats, dim=0),
            slot_sources=self.slot_sources,
            slot_chunk=self.slot_chunk,
            slot_valid=self.slot_valid.repeat_interleave(repeats, dim=0),
        )


def build_media_memory(
    image_latents: torch.Tensor | None,
    image_valid: torch.BoolTensor | None,
    context_latents: torch.Tensor | None,
    context_valid: torch.BoolTensor | None,
    latent_fusion: str,
) -> MediaMemory:
    """The memory of a batch. image_latents: (B, N, L, D), image_valid: (B, N) (real and not dropped);
    context_latents: (B, P, L, D), context_valid: (B, P).

    "concat" (or no pages): one slot per image latent (read by its chunk) and one per page latent (read by all).
    "sum": for each chunk c, one slot per page latent, fused with latent l of image c - 1 (chunk 0: the pages
    alone), as upstream; a sample without pages reads its image through page 0's slots, which hold its image only.
    """
    reference = image_latents if image_latents is not None else context_latents
    batch_size, _, num_latents, dim = reference.shape
    device = reference.device
    if image_latents is None:
        image_latents = reference.new_zeros(batch_size, 0, num_latents, dim)
        image_valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)
    if context_latents is None:
        context_latents = reference.new_zeros(batch_size, 0, num_latents, dim)
        context_valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)
    num_images, num_pages = image_latents.shape[1], context_latents.shape[1]
    image_latents = image_latents * image_valid[..., None, None].to(image_latents.dtype)
    latents = torch.cat([image_latents.flatten(1, 2), context_latents.flatten(1, 2)], dim=1)  # (B, M, D)
    latent = torch.arange(num_latents, device=device)
    image_sources = (torch.arange(num_images, device=device)[:, None] * num_latents + latent).flatten()  # (N * L,)
    page_sources = num_images * num_latents + torch.arange(num_pages * num_latents, device=device)  # (P * L,)
    none = torch.full_like(image_sources, -1)
    if latent_fusion == "concat" or num_pages == 0:
        sources = torch.cat(
            [torch.stack([none, image_sources], 1), torch.stack([page_sources, torch.full_like(page_sources, -1)], 1)]
        )
        chunk = torch.cat(
            [
                torch.arange(1, num_images + 1, device=device).repeat_interleave(num_latents),
                torch.full((num_pages * num_latents,), CONTEXT_CHUNK, device=device),
            ]
        )
        valid = torch.cat(
            [image_valid.repeat_interleave(num_latents, dim=1), context_valid.repeat_interleave(num_latents, dim=1)], 1
        )
        return MediaMemory(latents=latents, slot_sources=sources, slot_chunk=chunk, slot_valid=valid.long())
    # "sum": chunk c (0..N) x page p x latent l <- page p's latent l + image c - 1's latent l
    num_chunks = num_images + 1
    page_part = page_sources.view(1, num_pages, num_latents).expand(num_chunks, -1, -1)
    image_of_chunk = torch.cat(
        [torch.full((1, num_latents), -1, device=device), image_sources.view(num_images, num_latents)]
    )
    image_part = image_of_chunk[:, None, :].expand(-1, num_pages, -1)
    sources = torch.stack([page_part, image_part], dim=-1).reshape(-1, 2)
    chunk = torch.arange(num_chunks, device=device).repeat_interleave(num_pages * num_latents)
    chunk_has_image = torch.cat(
        [torch.zeros(batch_size, 1, dtype=torch.bool, device=device), image_valid], dim=1
    )  # (B, C)
    no_pages = ~context_valid.any(dim=1)  # (B,)
    first_page = torch.zeros(num_pages, dtype=torch.bool, device=device)
    first_page[0] = True
    page_valid = context_valid[:, None, :] | (chunk_has_image & no_pages[:, None])[..., None] & first_page  # (B, C, P)
    valid = page_valid[..., None].expand(-1, -1, -1, num_latents).reshape(batch_size, -1)
    # copies, not views of the expanded layouts: a model's outputs are its own tensors (FSDP2 warns about views)
    return MediaMemory(latents=latents, slot_sources=sources.clone(), slot_chunk=chunk.clone(), slot_valid=valid.long())


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


# --------------------------------------------------------------------------------------------------
# Media-token embeddings: the LM's vocabulary stays frozen, `<image>` and `<|endofchunk|>` train.
# --------------------------------------------------------------------------------------------------


class MediaTokenEmbedding(nn.Embedding):
    """The language model's token embedding plus separate, trainable rows for the media tokens.

    `weight` keeps the language model's name and values (so it can stay frozen); `media_embedding`
    holds one row per media token id, which may lie inside or past the original vocabulary. (A module of
    its own, so PEFT can train and save it through `modules_to_save`.)
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, media_token_ids: tuple[int, ...], padding_idx=None):
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx)
        self.media_token_ids = tuple(media_token_ids)
        self.media_embedding = nn.Embedding(len(self.media_token_ids), embedding_dim)

    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """input_ids: (B, T) -> embeddings (B, T, H)."""
        embeds = F.embedding(input_ids.clamp(max=self.num_embeddings - 1), self.weight, self.padding_idx)
        rows = torch.arange(len(self.media_token_ids), device=input_ids.device)
        media = self.media_embedding(rows).to(embeds.dtype)  # (num_media_tokens, H)
        for row, token_id in enumerate(self.media_token_ids):
            embeds = torch.where((input_ids == token_id).unsqueeze(-1), media[row], embeds)
        return embeds


class MediaTokenLMHead(nn.Linear):
    """The language model's output projection plus trainable output rows for the media tokens.

    Logits have `output_vocab_size` columns: the LM's vocabulary, extended when a media token id lies
    past it; the media tokens' columns come from `media_head`.
    """

    def __init__(self, hidden_size: int, vocab_size: int, media_token_ids: tuple[int, ...], output_vocab_size: int):
        super().__init__(hidden_size, vocab_size, bias=False)
        self.media_token_ids = tuple(media_token_ids)
        self.output_vocab_size = output_vocab_size
        self.media_head = nn.Linear(hidden_size, len(self.media_token_ids), bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: (B, T, H) -> logits (B, T, output_vocab_size)."""
        # Projected as (B*T, H): a slice such as hidden_states[:, -1:] keeps its parent's batch stride, and for such a
        # 3-d input torch's CPU matmul falls back to bmm over a transposed copy of the whole weight (2 s per prefill
        # with a 128k vocabulary in bfloat16, measured by benchmarks/generation.py).
        logits = F.linear(hidden_states.reshape(-1, hidden_states.shape[-1]), self.weight)
        logits = logits.view(*hidden_states.shape[:-1], -1)
        if self.output_vocab_size > self.out_features:  # ids between the vocabulary and a media id do not exist
            logits = F.pad(logits, (0, self.output_vocab_size - self.out_features), value=torch.finfo(logits.dtype).min)
        media_logits = self.media_head(hidden_states)  # (B, T, num_media_tokens)
        index = torch.tensor(self.media_token_ids, device=logits.device).expand(*logits.shape[:-1], -1)
        return logits.scatter(-1, index, media_logits)


# --------------------------------------------------------------------------------------------------
# Perceiver resampler: a variable number of patch features -> a fixed number of latents.
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Gated cross-attention: text tokens read the latents of their chunk; tanh gates start at 0.
# --------------------------------------------------------------------------------------------------


class MaskedCrossAttention(nn.Module):
    def __init__(self, config: VisInContextConfig):
        super().__init__()
        hidden_size, media_dim = config.text_config.hidden_size, config.vision_config.hidden_size
        inner = config.cross_attention_num_heads * config.cross_attention_head_dim
        self.config = config
        self.num_heads = config.cross_attention_num_heads
        self.norm = nn.LayerNorm(hidden_size)
        self.to_q = nn.Linear(hidden_size, inner, bias=False)
        self.to_kv = nn.Linear(media_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, hidden_size, bias=False)

    def key_values(self, media: MediaMemory) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory's keys and values (B, h, S, dh): the latents projected once (each image and page, not each
        chunk's copy), then arranged into slots. Computed once per `generate`."""
        projected = self.to_kv(media.latents.to(self.to_kv.weight.dtype))  # (B, M, 2 * inner)
        key, value = media.slot_values(projected).chunk(2, dim=-1)
        # contiguous (B, h, S, dh): attention reads them at every step of `generate`, and they are returned (a view of
        # the projection would make FSDP2 warn that in-place changes to a module's output skip its hooks)
        return _split_heads(key, self.num_heads).contiguous(), _split_heads(value, self.num_heads).contiguous()

    def forward(
        self, hidden_states: torch.Tensor, key: torch.Tensor, value: torch.Tensor, media_attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """
        hidden_states: (B, T, H); key, value: (B, h, S, dh) from `key_values`; media_attention_mask: (B, T, S)
        bool, True where a token may read a slot. Tokens with no readable slot get exactly 0.
        """
        query = _split_heads(self.to_q(self.norm(hidden_states)), self.num_heads)  # (B, h, T, dh)
        key, value = key.to(query.dtype), value.to(query.dtype)
        reads_media = media_attention_mask.any(dim=-1, keepdim=True)  # (B, T, 1)
        # A row with no allowed slot would be all -inf (NaN after softmax): let it attend anywhere, then zero it.
        mask = (media_attention_mask | ~reads_media).unsqueeze(1)  # (B, 1, T, S)
        attended = attend(self, query, key, value, mask)
        return self.to_out(attended * reads_media.to(attended.dtype))


class GatedCrossAttentionBlock(GradientCheckpointingLayer):
    """`x + tanh(attn_gate) * xattn(x)`, then `x + tanh(ff_gate) * ffn(x)`: the identity at initialisation."""

    def __init__(self, config: VisInContextConfig):
        super().__init__()
        self.cross_attention = MaskedCrossAttention(config)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.feed_forward = FeedForward(config.text_config.hidden_size, config.cross_attention_ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(
        self, hidden_states: torch.Tensor, key: torch.Tensor, value: torch.Tensor, media_attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """hidden_states: (B, T, H); key, value: (B, h, S, dh); media_attention_mask: (B, T, S) -> (B, T, H)"""
        attended = self.cross_attention(hidden_states, key, value, media_attention_mask)
        hidden_states = hidden_states + self.attn_gate.tanh() * attended
        return hidden_states + self.ff_gate.tanh() * self.feed_forward(hidden_states)


class VisInContextDecoderLayer(nn.Module):
    """A decoder layer of the wrapped LM, preceded by a gated cross-attention block where configured.

    The media arrive as keyword arguments of the LM's forward, which v5 decoder stacks hand to every layer: the
    memory (`media`), the slots each token reads (`media_attention_mask`), and either the memory as this block
    projected it earlier (`media_key_values`, at generate's later steps) or a list to put its projection in
    (`projected_media`, for generate to reuse).
    """

    def __init__(
        self, decoder_layer: nn.Module, gated_cross_attention: GatedCrossAttentionBlock | None, index: int | None
    ):
        super().__init__()
        self.gated_cross_attention = gated_cross_attention
        self.decoder_layer = decoder_layer
        self.cross_attention_index = index  # position of this block's entry in `media_key_values`

    def forward(
        self,
        hidden_states: torch.Tensor,
        *args,
        media: MediaMemory | None = None,
        media_key_values: tuple | None = None,
        media_attention_mask: torch.BoolTensor | None = None,
        projected_media: list | None = None,
        **kwargs,
    ):
        if self.gated_cross_attention is not None and media is not None:
            if media_key_values is not None:
                key, value = media_key_values[self.cross_attention_index]
            else:
                # Projected here, in the forward of the layer that holds the weights: FSDP gathers a wrapped layer's
                # weights for its own forward only. Whether to project depends on the inputs alone, so activation
                # checkpointing recomputes exactly what the first pass computed.
                key, value = self.gated_cross_attention.cross_attention.key_values(media)
                if projected_media is not None:
                    projected_media[self.cross_attention_index] = (key, value)
            # Positional, so gradient checkpointing (re-entrant) propagates gradients to the media.
            hidden_states = self.gated_cross_attention(hidden_states, key, value, media_attention_mask)
        return self.decoder_layer(hidden_states, *args, **kwargs)


# --------------------------------------------------------------------------------------------------
# Text-centric contrastive learning (TCCL)
# --------------------------------------------------------------------------------------------------


class TextCentricContrastiveHead(nn.Module):
    """Pools rendered-context latents and LM hidden states of the same text into one shared space."""

    def __init__(self, config: VisInContextConfig):
        super().__init__()
        hidden_size, media_dim = config.text_config.hidden_size, config.vision_config.hidden_size
        self.visual_norm = nn.LayerNorm(media_dim)
        self.visual_projection = nn.Linear(media_dim, config.contrastive_dim, bias=False)
        # upstream: a learned query attends over an intermediate LM hidden state
        self.text_norm = nn.LayerNorm(hidden_size)
        self.text_query = nn.Parameter(torch.empty(hidden_size))
        self.text_projection = nn.Linear(hidden_size, config.contrastive_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.empty(1))  # 1-d, not 0-d: DeepSpeed cannot broadcast scalars
        self.temperature_init = config.contrastive_temperature_init

    def embed_context(self, context_latents: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        """context_latents: (B, P, L, D), context_mask: (B, P) -> (B, contrastive_dim), unit norm"""
        weights = context_mask.to(context_latents.dtype)[:, :, None, None]
        pooled = (context_latents * weights).sum(dim=(1, 2)) / (weights.sum(dim=(1, 2)) * context_latents.shape[2])
        return F.normalize(self.visual_projection(self.visual_norm(pooled)), dim=-1)

    def embed_text(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """hidden_states: (B, S, H), attention_mask: (B, S) -> (B, contrastive_dim), unit norm"""
        hidden_states = self.text_norm(hidden_states)
        scores = hidden_states @ self.text_query / hidden_states.shape[-1] ** 0.5  # (B, S)
        scores = scores.masked_fill(~attention_mask.bool(), torch.finfo(scores.dtype).min)
        pooled = (scores.softmax(dim=-1).unsqueeze(-1) * hidden_states).sum(dim=1)
        return F.normalize(self.text_projection(pooled), dim=-1)

    def forward(self, context_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE between matching rows of (B, E) and (B, E)."""
        logits = self.logit_scale.exp().clamp(max=100) * context_embeds @ text_embeds.T
        targets = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def _check_rank(name: str, tensor: torch.Tensor | None, shape: str, rank: int) -> None:
    if tensor is not None and tensor.ndim != rank:
        raise ValueError(f"{name}: expected {shape}, got shape {tuple(tensor.shape)}")


def _bool_mask(
    name: str, mask: torch.Tensor | None, shape: torch.Size | None, values_name: str
) -> torch.BoolTensor | None:
    """A (batch, media) mask as booleans: bool or 0/1 integers are accepted, its shape must be `shape`."""
    if mask is None:
        return None
    if shape is None:
        raise ValueError(f"{name}: given without {values_name}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(
            f"{name}: expected shape {tuple(shape)} (the first two dims of {values_name}), got {tuple(mask.shape)}"
        )
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"{name}: expected a bool (or 0/1 integer) tensor, got {mask.dtype}")
    if mask.device.type != "meta" and ((mask != 0) & (mask != 1)).any():
        raise ValueError(f"{name}: expected 0/1 values, got {sorted(set(mask.flatten().tolist()))[:5]}")
    return mask.bool()


def _init_new_parts(module: nn.Module, std: float) -> None:
    """Initialises the parameters VisInContext adds that generic `_init_weights` does not know."""
    if isinstance(module, (PerceiverAttention, MaskedCrossAttention)):
        for linear in (module.to_q, module.to_kv, module.to_out):
            init.normal_(linear.weight, mean=0.0, std=linear.in_features**-0.5)
    elif isinstance(module, PerceiverResampler):
        init.normal_(module.latents, mean=0.0, std=std)
    elif isinstance(module, GatedCrossAttentionBlock):
        init.zeros_(module.attn_gate)
        init.zeros_(module.ff_gate)
    elif isinstance(module, TextCentricContrastiveHead):
        init.normal_(module.text_query, mean=0.0, std=std)
        init.constant_(module.logit_scale, math.log(1.0 / module.temperature_init))


# The names of the modules VisInContext adds (one place): what stays trainable when the backbones are frozen, what
# bitsandbytes leaves unquantised, and what PEFT trains in full and saves with an adapter (`modules_to_save`).
NEW_MODULES = (
    "image_resampler",
    "context_resampler",
    "gated_cross_attention",
    "media_embedding",
    "media_head",
    "contrastive_head",
    "reading_head",
)


def _resolve_attention(backbone: PreTrainedModel) -> None:
    """Gives a backbone whose config has no attention implementation the one its own `__init__` would pick (SDPA
    where it can run, eager otherwise). A config with `None` there makes transformers' attention run unmasked: a
    backbone built from one config and placed under another (e.g. `VisInContextConfig(text_config=lm.config)` with
    `attn_implementation=None`) can end up so."""
    if backbone.config._attn_implementation is not None:
        return
    try:
        backbone.set_attn_implementation("sdpa")
    except (ValueError, ImportError):
        backbone.set_attn_implementation("eager")


def _vision_body(vision_tower: nn.Module) -> nn.Module:
    """A CLIP-like tower's transformer (`vision_model` in older transformers, the tower itself in newer)."""
    return getattr(vision_tower, "vision_model", vision_tower)


def _has_class_token_and_post_layernorm(vision_tower: nn.Module) -> bool:
    body = _vision_body(vision_tower)
    return hasattr(body, "post_layernorm") and hasattr(getattr(body, "embeddings", None), "class_embedding")


class VisInContextPreTrainedModel(PreTrainedModel):
    config: VisInContextConfig
    config_class = VisInContextConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["VisInContextDecoderLayer", "PerceiverResampler"]  # post_init adds the backbones' own
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    def resize_token_embeddings(self, *args, **kwargs):
        """`PreTrainedModel.resize_token_embeddings`; every weight stays as trainable as it was: the media-token rows
        keep training, the LM's vocabulary stays frozen (transformers gives the whole resized embedding module the
        `requires_grad` of its old weight, and the resized head that of a new one)."""
        trainable = {name: p.requires_grad for name, p in self.named_parameters()}
        result = super().resize_token_embeddings(*args, **kwargs)
        for name, param in self.named_parameters():
            if name in trainable:
                param.requires_grad_(trainable[name])
        return result

    # `resize_token_embeddings` keeps the input embedding's own class (transformers resizes its weight in place), so
    # `MediaTokenEmbedding` keeps its media rows; the LM head is rebuilt as a plain `nn.Linear`, so this hook (private,
    # pinned by test_resize_token_embeddings_keeps_media_rows) moves the resized weight into the existing head.
    def _get_resized_lm_head(self, old_lm_head, *args, **kwargs):
        resized = super()._get_resized_lm_head(old_lm_head, *args, **kwargs)
        if not isinstance(old_lm_head, MediaTokenLMHead) or resized is old_lm_head:
            return resized
        old_lm_head.weight = resized.weight
        old_lm_head.out_features = resized.out_features
        old_lm_head.output_vocab_size = max(resized.out_features, max(old_lm_head.media_token_ids) + 1)
        return old_lm_head

    # Modules bitsandbytes leaves unquantised whatever a `BitsAndBytesConfig` says (patterns as in its
    # `llm_int8_skip_modules`): the parts VisInContext trains, the vision tower (QLoRA quantises the language model
    # body only) and the LM head, which carries the media-token rows.
    modules_not_to_quantize = tuple(rf".*{name}" for name in ("vision_tower", *NEW_MODULES, "lm_head"))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, plus: the backbones come back frozen as the config says (loading makes
        new parameters, all trainable), and a `BitsAndBytesConfig` also skips `modules_not_to_quantize`."""
        from transformers import BitsAndBytesConfig

        quantization = kwargs.get("quantization_config")
        if isinstance(quantization, BitsAndBytesConfig):
            quantization = copy.deepcopy(quantization)
            skipped = list(quantization.llm_int8_skip_modules or [])
            quantization.llm_int8_skip_modules = skipped + [m for m in cls.modules_not_to_quantize if m not in skipped]
            kwargs["quantization_config"] = quantization
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading_info) with output_loading_info
        model._freeze_backbones()
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`; the folder's remote code is always this package's, whatever class a
        wrapper gave the model (FSDP2's `fully_shard` makes it an `FSDPVisInContext...`, defined in torch: transformers
        would copy torch's files and name that class in `auto_map`)."""
        # transformers writes the `auto_map` entry of the saved class only; remote code needs all of them
        self.config.auto_map = {
            "AutoConfig": "configuration_visincontext.VisInContextConfig",
            "AutoModel": "modeling_visincontext.VisInContextModel",
            "AutoModelForImageTextToText": "modeling_visincontext.VisInContextForConditionalGeneration",
        }
        wrapper = type(self)
        if wrapper.__module__ == __name__:
            return super().save_pretrained(save_directory, *args, **kwargs)
        wrapper._auto_class = None  # on the wrapper class only: transformers copies no code for it
        try:
            result = super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            del wrapper._auto_class
        if kwargs.get("is_main_process", True):
            from transformers.dynamic_module_utils import get_relative_import_files

            source = sys.modules[__name__].__file__  # this file and its siblings, as transformers copies them
            for path in [source, *get_relative_import_files(source)]:
                shutil.copyfile(path, os.path.join(save_directory, os.path.basename(path)))
        return result

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        _init_new_parts(module, std=getattr(self.config.text_config, "initializer_range", 0.02))

    def initialize_weights(self) -> None:
        """Initialises the weights not loaded from a checkpoint (`transformers.initialization` skips loaded ones).

        The backbones from the library go first, each through its own `initialize_weights`: transformers treats a
        class from outside the library (this one) as custom code and skips its modules without parameters of their
        own, such as CLIP's attention, whose projections CLIP's `_init_weights` sets from the attention module. Then
        the library's pass over this model, and last the cross-attention gates, which sit inside the language model
        and so are seen only by the LM's `_init_weights`, which does not know them.
        """
        for module in self.modules():
            if isinstance(module, PreTrainedModel) and not isinstance(module, VisInContextPreTrainedModel):
                module.initialize_weights()
        super().initialize_weights()
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (GatedCrossAttentionBlock, MaskedCrossAttention, PerceiverAttention)):
                    _init_new_parts(module, std)
            reading_head = getattr(self, "reading_head", None)
            if reading_head is not None:  # a linear read-out of the latents, at their scale
                init.normal_(reading_head.weight, mean=0.0, std=reading_head.in_features**-0.5)
                init.zeros_(reading_head.bias)

    def _freeze_backbones(self) -> None:
        """Freeze the vision tower and LM body as configured; new parts stay trainable."""
        for name, param in self.named_parameters():
            new = any(f".{module}." in f".{name}" for module in NEW_MODULES)
            in_vision = "vision_tower." in name
            in_language = ("language_model." in name or name.startswith("lm_head.")) and not new
            if (in_vision and self.config.freeze_vision_tower) or (in_language and self.config.freeze_language_model):
                param.requires_grad_(False)


class VisInContextModel(VisInContextPreTrainedModel):
    """Vision tower + two resamplers + a causal LM body with gated cross-attention; returns hidden states."""

    def __init__(
        self,
        config: VisInContextConfig,
        vision_tower: PreTrainedModel | None = None,
        language_model: PreTrainedModel | None = None,
    ):
        """`vision_tower` / `language_model`: pretrained backbones to build around (see `from_backbones`); by
        default both are built from `config` with random weights."""
        super().__init__(config)
        self.vision_tower = vision_tower if vision_tower is not None else AutoModel.from_config(config.vision_config)
        self.image_resampler = PerceiverResampler(config)
        self.context_resampler = PerceiverResampler(config)
        self.language_model = (
            language_model if language_model is not None else AutoModel.from_config(config.text_config)
        )
        for backbone in (self.vision_tower, self.language_model):
            _resolve_attention(backbone)
        if config.vision_features == "normed_patches" and not _has_class_token_and_post_layernorm(self.vision_tower):
            raise ValueError(
                f"vision_features: 'normed_patches' needs a CLIP-like tower (a class token and a post-layernorm); "
                f"{type(self.vision_tower).__name__} has none"
            )
        self._wrap_language_model()
        self.post_init()
        self._freeze_backbones()

    def _wrap_language_model(self) -> None:
        text_config = self.config.text_config
        layers = getattr(self.language_model, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(
                f"text_config: {type(self.language_model).__name__} keeps no `layers` ModuleList of decoder layers"
            )
        cross_attention_layers = set(self.config.cross_attention_layers)
        if not cross_attention_layers:
            raise ValueError(
                f"cross_attention_every: {self.config.cross_attention_every} leaves no cross-attention layer in a "
                f"{text_config.num_hidden_layers}-layer language model"
            )
        positions = {layer: position for position, layer in enumerate(sorted(cross_attention_layers))}
        self.language_model.layers = nn.ModuleList(
            VisInContextDecoderLayer(layer, GatedCrossAttentionBlock(self.config), positions[i])
            if i in positions
            else VisInContextDecoderLayer(layer, None, None)
            for i, layer in enumerate(layers)
        )
        old = self.language_model.get_input_embeddings()
        embedding = MediaTokenEmbedding(
            old.num_embeddings, old.embedding_dim, self.config.media_token_ids, old.padding_idx
        )
        embedding.weight = old.weight  # keep the LM's (already initialised) vocabulary
        self.language_model.set_input_embeddings(embedding)
        # the wrapped LM's name for its KV cache argument (`cache` from transformers 5.24, `past_key_values` before)
        parameters = inspect.signature(self.language_model.forward).parameters
        self.language_model_cache_argument = "cache" if "cache" in parameters else "past_key_values"
        # Tensor parallelism shards the decoder layers as the LM's plan says (they now sit one level deeper); the
        # media-token embedding and head, and the new blocks, stay replicated (not written for sharded weights).
        self.language_model.tp_plan = {
            key.replace("layers.*.", "layers.*.decoder_layer."): value
            for key, value in (self.language_model.tp_plan or {}).items()
            if key != "embed_tokens"
        }

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def _patch_features(self, vision_outputs) -> torch.Tensor:
        """The features the resamplers read (`config.vision_features`): (M, n, D)."""
        features = vision_outputs.last_hidden_state
        if self.config.vision_features == "normed_patches":  # OpenCLIP's output tokens, as OpenFlamingo reads them
            features = _vision_body(self.vision_tower).post_layernorm(features)[:, 1:]
        return features

    @can_return_tuple
    def get_image_features(self, pixel_values: torch.FloatTensor, **kwargs) -> BaseModelOutputWithPooling:
        """pixel_values: (M, 3, H, W) -> `last_hidden_state` (M, n, D) patch features (`config.vision_features`)
        and `pooler_output` (M, L, D) image-resampler latents."""
        vision_outputs = self.vision_tower(pixel_values=pixel_values, **kwargs)
        features = self._patch_features(vision_outputs)
        return BaseModelOutputWithPooling(
            last_hidden_state=features,
            pooler_output=self.image_resampler(features),
            hidden_states=vision_outputs.hidden_states,
            attentions=vision_outputs.attentions,
        )

    def resample_media(
        self,
        pixel_values: torch.FloatTensor | None,
        image_mask: torch.BoolTensor | None,
        context_pixel_values: torch.FloatTensor | None,
        context_mask: torch.BoolTensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Encodes the real images and pages (padding skipped) in one vision-tower call and resamples them.

        pixel_values: (B, N, 3, H, W), image_mask: (B, N); context_pixel_values: (B, P, 3, H, W),
        context_mask: (B, P). Returns image latents (B, N, L, D) and context latents (B, P, L, D),
        zeros where padded, or `None` for an absent input.
        """
        # without a mask every slot is real: no gather (this also keeps the path shape-only, e.g. on the meta device)
        groups = [
            v.flatten(0, 1) if m is None else v[m]
            for v, m in ((pixel_values, image_mask), (context_pixel_values, context_mask))
            if v is not None
        ]
        frames = torch.cat(groups)  # (M, 3, H, W)
        dtype = self.vision_tower.dtype
        features = self._patch_features(self.vision_tower(pixel_values=frames.to(dtype))) if len(frames) else None
        outputs, start = [], 0
        for values, mask, resampler in (
            (pixel_values, image_mask, self.image_resampler),
            (context_pixel_values, context_mask, self.context_resampler),
        ):
            if values is None:
                outputs.append(None)
                continue
            shape = (*values.shape[:2], self.config.num_latents, self.config.vision_config.hidden_size)
            count = values.shape[0] * values.shape[1] if mask is None else int(mask.sum())
            if mask is None:
                latents = (
                    resampler(features[start : start + count]).view(shape)
                    if count
                    else values.new_zeros(shape, dtype=dtype)
                )
            else:
                latents = values.new_zeros(shape, dtype=dtype)
                if count:
                    latents = latents.masked_scatter(mask[..., None, None], resampler(features[start : start + count]))
            outputs.append(latents)
            start += count
        return outputs[0], outputs[1]

    def encode_media(
        self,
        pixel_values: torch.FloatTensor | None = None,
        image_mask: torch.BoolTensor | None = None,
        context_pixel_values: torch.FloatTensor | None = None,
        context_mask: torch.BoolTensor | None = None,
        image_latents_mask: torch.BoolTensor | None = None,
    ) -> MediaMemory:
        """Images and rendered pages -> the `MediaMemory` the cross-attention reads: encode a document once and pass
        the result as `media=` to `forward` or `generate` for as many prompts as you like (a memory of one sample
        serves a batch of prompts). Not changed by those calls. Arguments as in `forward`."""
        if pixel_values is None and context_pixel_values is None:
            raise ValueError("pixel_values: pass images (pixel_values) or rendered pages (context_pixel_values)")
        batch_size = (pixel_values if pixel_values is not None else context_pixel_values).shape[0]
        image_mask, context_mask, image_latents_mask = self._validate_media(
            batch_size, pixel_values, image_mask, context_pixel_values, context_mask, image_latents_mask
        )
        return self._encode(pixel_values, image_mask, context_pixel_values, context_mask, image_latents_mask)[0]

    def _encode(self, pixel_values, image_mask, context_pixel_values, context_mask, image_latents_mask):
        """(MediaMemory, context latents (B, P, L, D) or None) from validated media inputs."""
        image_latents, context_latents = self.resample_media(
            pixel_values, image_mask, context_pixel_values, context_mask
        )
        if pixel_values is not None and image_mask is None:
            image_mask = torch.ones(pixel_values.shape[:2], dtype=torch.bool, device=pixel_values.device)
        if context_pixel_values is not None and context_mask is None:
            context_mask = torch.ones(
                context_pixel_values.shape[:2], dtype=torch.bool, device=context_pixel_values.device
            )
        image_valid = (
            image_mask if image_latents_mask is None or image_mask is None else image_mask & image_latents_mask
        )
        memory = build_media_memory(
            image_latents, image_valid, context_latents, context_mask, self.config.latent_fusion
        )
        return memory, context_latents

    def _chunk_ids(self, input_ids, inputs_embeds, past_chunk_ids) -> torch.LongTensor:
        if input_ids is not None:
            is_image = input_ids == self.config.image_token_id
        else:
            image_embedding = self.get_input_embeddings()(
                torch.tensor([[self.config.image_token_id]], device=inputs_embeds.device)
            )
            is_image = (inputs_embeds == image_embedding).all(dim=-1)
        chunk_ids = is_image.long().cumsum(dim=1)
        if past_chunk_ids is not None:
            chunk_ids = chunk_ids + past_chunk_ids[:, None]
        return chunk_ids

    def _validate(
        self,
        input_ids,
        inputs_embeds,
        attention_mask,
        cache,
        pixel_values,
        image_mask,
        context_pixel_values,
        context_mask,
        image_latents_mask,
    ) -> tuple[torch.BoolTensor | None, torch.BoolTensor | None, torch.BoolTensor | None]:
        """Checks the inputs' shapes and values, naming the argument. Returns the three media masks as booleans."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("input_ids: pass exactly one of input_ids or inputs_embeds")
        _check_rank("input_ids", input_ids, "(batch, sequence)", 2)
        _check_rank("inputs_embeds", inputs_embeds, "(batch, sequence, hidden)", 3)
        tokens = input_ids if input_ids is not None else inputs_embeds
        batch_size, length = tokens.shape[:2]
        if length == 0:
            raise ValueError(
                f"{'input_ids' if input_ids is not None else 'inputs_embeds'}: expected at least one token, "
                f"got an empty sequence {tuple(tokens.shape)}"
            )
        if inputs_embeds is not None and inputs_embeds.shape[-1] != self.config.text_config.hidden_size:
            raise ValueError(
                f"inputs_embeds: expected hidden size {self.config.text_config.hidden_size}, "
                f"got {inputs_embeds.shape[-1]}"
            )
        if input_ids is not None and input_ids.device.type != "meta":  # data-dependent: not on the meta device
            vocab_size, media = self.config.text_config.vocab_size, list(self.config.media_token_ids)
            invalid = (input_ids < 0) | (
                (input_ids >= vocab_size) & ~torch.isin(input_ids, input_ids.new_tensor(media))
            )
            if invalid.any():
                raise ValueError(
                    f"input_ids: ids {sorted(set(input_ids[invalid].tolist()))[:10]} are not in the vocabulary "
                    f"(0 to {vocab_size - 1}, and the media tokens {media})"
                )
        if attention_mask is not None and attention_mask.ndim == 2:
            past = cache.get_seq_length() if cache is not None else 0
            if tuple(attention_mask.shape) != (batch_size, past + length):
                raise ValueError(
                    f"attention_mask: expected shape {(batch_size, past + length)} (the batch and the "
                    f"{past} cached + {length} new tokens), got {tuple(attention_mask.shape)}"
                )
        return self._validate_media(
            batch_size, pixel_values, image_mask, context_pixel_values, context_mask, image_latents_mask
        )

    def _validate_media(
        self, batch_size, pixel_values, image_mask, context_pixel_values, context_mask, image_latents_mask
    ):
        """Checks the media inputs' shapes and values, naming the argument. Returns the three masks as booleans."""
        vision = self.config.vision_config
        image_size, channels = vision.image_size, getattr(vision, "num_channels", 3)
        checked = {}
        for values, mask, names in (
            (pixel_values, image_mask, ("pixel_values", "image_mask", "images")),
            (context_pixel_values, context_mask, ("context_pixel_values", "context_mask", "pages")),
        ):
            name, mask_name, kind = names
            expected = f"(batch, {kind}, {channels}, {image_size}, {image_size})"
            if values is not None:
                if (
                    values.ndim != 5
                    or values.shape[0] != batch_size
                    or tuple(values.shape[2:]) != (channels, image_size, image_size)
                ):
                    hint = (
                        " (channels last? expected channels first)"
                        if values.ndim == 5 and values.shape[-1] == channels
                        else ""
                    )
                    raise ValueError(
                        f"{name}: expected {expected} with batch {batch_size}, got {tuple(values.shape)}{hint}"
                    )
                if not values.is_floating_point():
                    raise TypeError(f"{name}: expected a float tensor (normalised pixels), got {values.dtype}")
            checked[mask_name] = _bool_mask(mask_name, mask, None if values is None else values.shape[:2], name)
        checked["image_latents_mask"] = _bool_mask(
            "image_latents_mask",
            image_latents_mask,
            None if pixel_values is None else pixel_values.shape[:2],
            "pixel_values",
        )
        return checked["image_mask"], checked["context_mask"], checked["image_latents_mask"]

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        image_mask: torch.BoolTensor | None = None,
        context_pixel_values: torch.FloatTensor | None = None,
        context_mask: torch.BoolTensor | None = None,
        image_latents_mask: torch.BoolTensor | None = None,
        media: MediaMemory | None = None,
        media_key_values: tuple | None = None,
        past_chunk_ids: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> VisInContextModelOutputWithPast:
        r"""
        input_ids (`(B, T)`): token ids; `<image>` marks where each image stands.
        pixel_values (`(B, N, 3, H, W)`): images in `<image>` order; `image_mask` (`(B, N)`) marks real ones.
        context_pixel_values (`(B, P, 3, H, W)`): rendered context pages; `context_mask` (`(B, P)`) marks real ones.
        image_latents_mask (`(B, N)`): False drops an image's latents (token masking), leaving the context.
        media (`MediaMemory`): images and pages encoded already (`encode_media`, or an earlier output's `media`);
            when given, no pixels are encoded. A memory of one sample serves a batch of prompts.
        media_key_values: the memory already projected by each cross-attention block (an earlier output's, with its
            `media`); `generate` passes both at every decoding step.
        past_chunk_ids (`(B,)`): chunk of the last cached token, so that new tokens continue its chunk.
        cache: the KV cache (`past_key_values` before transformers 5.24; either name is accepted).
        """
        cache = _one_cache(cache, past_key_values)
        image_mask, context_mask, image_latents_mask = self._validate(
            input_ids,
            inputs_embeds,
            attention_mask,
            cache,
            pixel_values,
            image_mask,
            context_pixel_values,
            context_mask,
            image_latents_mask,
        )
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        chunk_ids = self._chunk_ids(input_ids, inputs_embeds, past_chunk_ids)
        batch_size = inputs_embeds.shape[0]
        if media_key_values is not None and media is None:
            raise ValueError("media_key_values: given without the `media` it was projected from")

        context_latents = None
        if media is None:
            self._check_image_tokens(input_ids, pixel_values, image_mask)
        if media is None and (pixel_values is not None or context_pixel_values is not None):
            media, context_latents = self._encode(
                pixel_values, image_mask, context_pixel_values, context_mask, image_latents_mask
            )
        elif media is not None:
            media = media.for_batch(batch_size)

        media_attention_mask = projected_media = None
        if media is not None:
            media_attention_mask = media.readable(chunk_ids, self.config.only_attend_immediate_media)
            if media_key_values is None:  # each block projects the memory once (images and pages, not chunk copies)
                projected_media = [None] * len(self.config.cross_attention_layers)

        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            media=media,
            media_key_values=media_key_values,
            media_attention_mask=media_attention_mask,
            projected_media=projected_media,
            **{self.language_model_cache_argument: cache},
            **({"output_attentions": output_attentions} if output_attentions is not None else {}),
            **kwargs,
        )
        return VisInContextModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            media=media,
            media_key_values=media_key_values if projected_media is None else tuple(projected_media),
            chunk_ids=chunk_ids,
            context_latents=context_latents,
        )

    def _check_image_tokens(self, input_ids, pixel_values, image_mask) -> None:
        """The prompt's `<image>` tokens must match its images (data-dependent: not checked on the meta device)."""
        if input_ids is None or input_ids.device.type == "meta":
            return
        num_image_tokens = (input_ids == self.config.image_token_id).sum(dim=1)
        if image_mask is not None:
            num_images = image_mask.sum(dim=1)
        elif pixel_values is not None:
            num_images = torch.full_like(num_image_tokens, pixel_values.shape[1])
        else:
            num_images = torch.zeros_like(num_image_tokens)
        if (num_image_tokens > num_images).any():
            raise ValueError(
                f"input_ids: more {IMAGE_TOKEN} tokens than images per sample: {num_image_tokens.tolist()} tokens "
                f"for {num_images.tolist()} images in pixel_values"
            )
        if (num_image_tokens < num_images).any():
            raise ValueError(
                f"pixel_values: images without a {IMAGE_TOKEN} token per sample: {num_images.tolist()} images "
                f"for {num_image_tokens.tolist()} tokens in input_ids"
            )


class VisInContextForConditionalGeneration(VisInContextPreTrainedModel, GenerationMixin):
    """VisInContext with a language-modeling head, the contrastive loss and `generate`."""

    # `loss` sums per-batch means (LM and contrastive): Trainer must not pass `num_items_in_batch`, which would
    # normalise the LM term over all processes and accumulation steps and then scale the whole loss (the contrastive
    # term too) back up by the number of processes.
    accepts_loss_kwargs = False

    _tied_weights_keys = {
        "lm_head.weight": "model.language_model.embed_tokens.weight",
        "lm_head.media_head.weight": "model.language_model.embed_tokens.media_embedding.weight",
    }

    def __init__(
        self,
        config: VisInContextConfig,
        vision_tower: PreTrainedModel | None = None,
        language_model: PreTrainedModel | None = None,
    ):
        """`vision_tower` / `language_model`: pretrained backbones to build around, the latter a causal LM whose
        output projection becomes the head's (see `from_backbones`); by default both are built from `config`."""
        super().__init__(config)
        body = None if language_model is None else language_model.get_decoder()
        self.model = VisInContextModel(config, vision_tower=vision_tower, language_model=body)
        text_config = config.text_config
        self.lm_head = MediaTokenLMHead(
            text_config.hidden_size, text_config.vocab_size, config.media_token_ids, config.output_vocab_size
        )
        if language_model is not None:
            self.lm_head.weight = language_model.get_output_embeddings().weight
        self.contrastive_head = TextCentricContrastiveHead(config)
        # reading objective: each context latent spells out the characters of its page cells
        self.reading_head = (
            nn.Linear(config.vision_config.hidden_size, config.reading_cells_per_latent * READING_CLASSES)
            if config.reading_loss_weight > 0
            else None
        )
        self.post_init()
        self._freeze_backbones()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_image_features(self, pixel_values: torch.FloatTensor, **kwargs):
        return self.model.get_image_features(pixel_values=pixel_values, **kwargs)

    def encode_media(self, **media_inputs) -> MediaMemory:
        """`VisInContextModel.encode_media`: encode a document (pages, images) once, then `generate(..., media=memory)`
        for each question about it."""
        return self.model.encode_media(**media_inputs)

    def contrastive_loss(
        self,
        context_latents: torch.Tensor,
        context_mask: torch.BoolTensor,
        context_input_ids: torch.LongTensor,
        context_attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """TCCL over the samples that have both rendered pages and the context's token ids.

        context_latents: (B, P, L, D); context_mask: (B, P); context_input_ids / context_attention_mask: (B, S).
        The LM reads the context tokens without gradient: its body is frozen, and this keeps the loss cheap.
        InfoNCE needs a pair and a negative: with fewer than two such samples in the batch the loss is 0 (the value
        it takes for one pair), so batches of single-text documents train on the LM loss alone.
        """
        if context_attention_mask is None:
            context_attention_mask = torch.ones_like(context_input_ids)
        has_both = context_mask.any(dim=1) & context_attention_mask.bool().any(dim=1)
        if int(has_both.sum()) < 2:
            return context_latents.new_zeros(())
        layer = self.config.contrastive_text_layer
        if layer is None:
            layer = self.config.text_config.num_hidden_layers // 2
        with torch.no_grad():
            hidden_states = self.model.language_model(
                input_ids=context_input_ids[has_both],
                attention_mask=context_attention_mask[has_both],
                output_hidden_states=True,
            ).hidden_states[layer]
        head = self.contrastive_head
        context_embeds = head.embed_context(context_latents[has_both], context_mask[has_both])
        text_embeds = head.embed_text(hidden_states.to(context_embeds.dtype), context_attention_mask[has_both])
        return head(context_embeds, text_embeds)

    def reading_loss(self, context_latents: torch.Tensor, targets: torch.LongTensor) -> torch.Tensor:
        """context_latents: (B, P, L, D); targets: (B, P, L, K) reading classes, -100 to ignore -> cross-entropy."""
        if (
            tuple(targets.shape[:3]) != tuple(context_latents.shape[:3])
            or targets.shape[3] != self.config.reading_cells_per_latent
        ):
            raise ValueError(
                "context_reading_targets: expected shape "
                f"{(*context_latents.shape[:3], self.config.reading_cells_per_latent)} "
                f"(batch, pages, latents, reading_cells_per_latent), got {tuple(targets.shape)}"
            )
        logits = self.reading_head(context_latents).unflatten(-1, (targets.shape[-1], READING_CLASSES))
        if not (targets != -100).any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=-100)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        image_mask: torch.BoolTensor | None = None,
        context_pixel_values: torch.FloatTensor | None = None,
        context_mask: torch.BoolTensor | None = None,
        image_latents_mask: torch.BoolTensor | None = None,
        context_input_ids: torch.LongTensor | None = None,
        context_attention_mask: torch.Tensor | None = None,
        context_reading_targets: torch.LongTensor | None = None,
        media: MediaMemory | None = None,
        media_key_values: tuple | None = None,
        past_chunk_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> VisInContextCausalLMOutputWithPast:
        r"""
        See `VisInContextModel.forward` for the media inputs. Also:
        context_input_ids / context_attention_mask (`(B, S)`): the rendered context as tokens, for the
            contrastive loss (pretraining only).
        context_reading_targets (`(B, P, L, reading_cells_per_latent)`): the reading objective's targets
            (`VisInContextProcessor.reading_targets`), -100 to ignore; used when `config.reading_loss_weight > 0`.
        labels (`(B, T)`): next-token targets aligned with `input_ids` (shifted inside), -100 to ignore.
        """
        tokens = input_ids if input_ids is not None else inputs_embeds
        if labels is not None and tokens is not None and tuple(labels.shape) != tuple(tokens.shape[:2]):
            raise ValueError(
                f"labels: expected shape {tuple(tokens.shape[:2])} like input_ids, got {tuple(labels.shape)}"
            )
        if context_input_ids is not None:
            if context_input_ids.ndim != 2 or (tokens is not None and context_input_ids.shape[0] != tokens.shape[0]):
                raise ValueError(
                    f"context_input_ids: expected (batch, sequence) with the batch of input_ids, "
                    f"got {tuple(context_input_ids.shape)}"
                )
            if context_attention_mask is not None and context_attention_mask.shape != context_input_ids.shape:
                raise ValueError(
                    f"context_attention_mask: expected shape {tuple(context_input_ids.shape)} like "
                    f"context_input_ids, got {tuple(context_attention_mask.shape)}"
                )
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_one_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            image_mask=image_mask,
            context_pixel_values=context_pixel_values,
            context_mask=context_mask,
            image_latents_mask=image_latents_mask,
            media=media,
            media_key_values=media_key_values,
            past_chunk_ids=past_chunk_ids,
            use_cache=use_cache,
            output_attentions=output_attentions,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        lm_loss = contrastive_loss = reading_loss = loss = None
        if labels is not None:
            lm_loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.output_vocab_size, **kwargs
            )
            loss = lm_loss
        if context_input_ids is not None and outputs.context_latents is not None:
            if context_mask is None:
                context_mask = torch.ones(
                    outputs.context_latents.shape[:2], dtype=torch.bool, device=hidden_states.device
                )
            contrastive_loss = self.contrastive_loss(
                outputs.context_latents, context_mask, context_input_ids, context_attention_mask
            )
            if self.config.contrastive_loss_weight:
                weighted = self.config.contrastive_loss_weight * contrastive_loss
                loss = weighted if loss is None else loss + weighted
        if (
            context_reading_targets is not None
            and self.reading_head is not None
            and outputs.context_latents is not None
        ):
            reading_loss = self.reading_loss(outputs.context_latents, context_reading_targets)
            weighted = self.config.reading_loss_weight * reading_loss
            loss = weighted if loss is None else loss + weighted

        return VisInContextCausalLMOutputWithPast(
            loss=loss,
            lm_loss=lm_loss,
            contrastive_loss=contrastive_loss,
            reading_loss=reading_loss,
            logits=logits,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            media=outputs.media,
            media_key_values=outputs.media_key_values,
            chunk_ids=outputs.chunk_ids,
        )

    # ---- generation: encode images and pages once, at prefill --------------------------------------

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        media_key_values: tuple | None = None,
        media: MediaMemory | None = None,
        past_chunk_ids: torch.LongTensor | None = None,
        context_pixel_values: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        image_latents_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> dict[str, Any]:
        """The library's preparation (slicing to the new tokens, cache, masks), plus the media: raw images and pages
        at prefill (or a `media` memory encoded beforehand), the memory projected at prefill (`media_key_values`) at
        every later step. The KV cache arrives as
        `cache` or `past_key_values`, whichever the installed transformers passes."""
        model_inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        if media_key_values is None:  # prefill: encode the media (or use the `media` given)
            model_inputs.update(
                media=media,
                context_pixel_values=context_pixel_values,
                context_mask=context_mask,
                image_mask=image_mask,
                image_latents_mask=image_latents_mask,
            )
            return model_inputs
        # later steps reuse the memory from the prefill; raw media are not sent again
        model_inputs.pop("pixel_values", None)
        cache = _one_cache(kwargs.get("cache"), kwargs.get("past_key_values"))
        cached = cache is not None and cache.get_seq_length() > 0
        model_inputs.update(
            media_key_values=media_key_values,
            media=media,
            past_chunk_ids=past_chunk_ids if cached else None,
        )
        return model_inputs

    # Carries the prefill's projected memory and the last token's chunk to the next decoding step. A private hook of
    # GenerationMixin, overridden the same way by transformers' own IDEFICS and Mllama (no public alternative);
    # tests/test_compatibility.py pins its signature and test_modeling.py that media are encoded once per `generate`.
    def _update_model_kwargs_for_generation(
        self,
        outputs: ModelOutput,
        model_kwargs: dict[str, Any],
        is_encoder_decoder: bool = False,
        num_new_tokens: int = 1,
    ) -> dict[str, Any]:
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        if outputs.media_key_values is not None:  # the projected memory: later steps skip encoding and projecting
            model_kwargs["media_key_values"] = outputs.media_key_values
            model_kwargs["media"] = outputs.media
        model_kwargs["past_chunk_ids"] = outputs.chunk_ids[:, -1]
        return model_kwargs

    # ---- building from pretrained backbones ---------------------------------------------------------

    @classmethod
    def from_backbones(
        cls,
        vision_model: str,
        language_model: str,
        *,
        vision_model_kwargs: dict | None = None,
        language_model_kwargs: dict | None = None,
        **config_kwargs,
    ) -> "VisInContextForConditionalGeneration":
        """Builds a model around pretrained backbones (Hub ids or local folders, real `from_pretrained`).

        The vision tower and language model keep their pretrained weights; resamplers, cross-attention,
        media-token rows and contrastive heads are freshly initialised. `<image>` and `<|endofchunk|>`
        take the ids the language model's tokenizer gives them (as `VisInContextProcessor.from_backbones`
        does). Extra keyword arguments go to `VisInContextConfig` (e.g. `cross_attention_every=4`).
        `language_model_kwargs` go to the LM's `from_pretrained` (e.g. `gguf_file`, `dtype`).

        `attn_implementation` works as in `from_pretrained`: a string for every part, or a dict keyed by `""` (the
        resamplers and cross-attention), `"vision_config"` and `"text_config"`; each backbone otherwise gets the
        library's default (SDPA where it can run), as its own `from_pretrained` gives it.
        """
        for name, value in (("vision_model", vision_model), ("language_model", language_model)):
            if not isinstance(value, str):
                raise TypeError(f"{name}: expected a Hub id or a local folder (str), got {type(value).__name__}")
        vision_model_kwargs, language_model_kwargs = dict(vision_model_kwargs or {}), dict(language_model_kwargs or {})
        attn_implementation = config_kwargs.pop("attn_implementation", None)
        if attn_implementation is not None and not isinstance(attn_implementation, (str, dict)):
            raise TypeError(
                f"attn_implementation: expected a string or a dict, got {type(attn_implementation).__name__}"
            )
        requested = attn_implementation if isinstance(attn_implementation, dict) else {"": attn_implementation}
        for kwargs, key in ((vision_model_kwargs, "vision_config"), (language_model_kwargs, "text_config")):
            wanted = requested.get(key, requested.get(""))
            if wanted is not None:  # each backbone checks its own (e.g. that flash-attn is installed)
                kwargs.setdefault("attn_implementation", wanted)
        if requested.get("") is not None:
            config_kwargs["attn_implementation"] = {"": requested[""]}
        causal_lm = AutoModelForCausalLM.from_pretrained(language_model, **language_model_kwargs)
        # one dtype for the whole model, the one its saved folder loads back in
        vision_model_kwargs.setdefault("dtype", causal_lm.dtype)
        vision_tower = load_vision_tower(vision_model, **vision_model_kwargs)
        tokenizer_kwargs = {k: v for k, v in language_model_kwargs.items() if k in ("gguf_file", "revision", "token")}
        tokenizer = AutoTokenizer.from_pretrained(language_model, **tokenizer_kwargs)
        tokenizer.add_tokens([IMAGE_TOKEN, END_OF_CHUNK_TOKEN], special_tokens=True)
        text_config = causal_lm.config
        if getattr(text_config, "quantization_config", None) is not None and "gguf_file" in language_model_kwargs:
            del text_config.quantization_config  # dequantised on load: the weights are plain tensors now
        config = VisInContextConfig(
            vision_config=vision_tower.config,
            text_config=text_config,
            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
            end_of_chunk_token_id=tokenizer.convert_tokens_to_ids(END_OF_CHUNK_TOKEN),
            **config_kwargs,
        )
        return cls._around_backbones(config, vision_tower, causal_lm, tokenizer)

    @classmethod
    def _around_backbones(cls, config, vision_tower, causal_lm, tokenizer) -> "VisInContextForConditionalGeneration":
        """The model built around loaded backbones, with the vocabulary of `tokenizer` (`from_backbones`, and the
        OpenFlamingo converter)."""
        # Built around the loaded modules (as transformers' EncoderDecoderModel is): no weights are copied or renamed.
        # The new parts are made in the LM's dtype, as `from_pretrained` makes a model: casting the whole model
        # afterwards would also cast the buffers the LM keeps in float32 (its rotary frequencies).
        with _default_dtype(causal_lm.dtype):
            model = cls(config, vision_tower=vision_tower, language_model=causal_lm)
            if len(tokenizer) > config.text_config.vocab_size:
                # One vocabulary size: every id the tokenizer gives has a row, so that a saved folder's tokenizer and
                # model agree (AutoPeftModel, for one, resizes a model whose embedding is smaller than its tokenizer).
                # The media tokens' rows there are never read: their own trainable rows replace them.
                model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        config.dtype = causal_lm.dtype
        # generation follows the LM's generation_config.json (its eos, sampling defaults), padded by the tokenizer's
        model.generation_config = copy.deepcopy(causal_lm.generation_config)
        if model.generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        stop_at_end_of_chunk(model.generation_config, config.end_of_chunk_token_id)
        model._freeze_backbones()
        return model.eval()  # as `from_pretrained` returns a model (dropout off until `train()`, as Trainer calls)


@contextmanager
def _default_dtype(dtype: torch.dtype):
    """New parameters are made in `dtype` inside (integer and quantised dtypes leave the default as it is)."""
    previous = torch.get_default_dtype()
    if dtype.is_floating_point:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def stop_at_end_of_chunk(generation_config, end_of_chunk_token_id: int) -> None:
    """Adds `<|endofchunk|>` to the end-of-sequence ids: an answer (a chat turn, a few-shot answer) ends its chunk."""
    eos = generation_config.eos_token_id
    eos = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    if end_of_chunk_token_id not in eos:
        generation_config.eos_token_id = eos + [end_of_chunk_token_id]


def load_vision_tower(name_or_path: str, **kwargs) -> PreTrainedModel:
    """Loads the vision half of a checkpoint (a CLIP/SigLIP dual encoder or a vision-only model)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path, **{k: v for k, v in kwargs.items() if k in ("revision", "token")})
    vision_config = getattr(config, "vision_config", config)
    return AutoModel.from_pretrained(name_or_path, config=vision_config, **kwargs)


__all__ = [
    "VisInContextPreTrainedModel",
    "VisInContextModel",
    "VisInContextForConditionalGeneration",
    "VisInContextModelOutputWithPast",
    "VisInContextCausalLMOutputWithPast",
    "MediaMemory",
    "build_media_memory",
]
