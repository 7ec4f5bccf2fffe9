# Copyright 2026 The visincontext authors. Licensed under the Apache License, Version 2.0.
# Flamingo's gated cross-attention (Alayrac et al., 2022) as written in lucidrains/flamingo-pytorch and OpenFlamingo.
"""What the language model reads and how: the media memory (images' and pages' latents arranged into slots, and which
chunk reads each), the gated cross-attention blocks (tanh gates start at 0: the identity), and the decoder-layer
wrapper that puts a block before a layer of the wrapped language model."""

from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ModelOutput

from .configuration_visincontext import VisInContextConfig
from .perceiver_visincontext import FeedForward, _split_heads, attend

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


MEDIA_ARGUMENTS = ("media", "media_key_values", "media_attention_mask", "projected_media")
# The media arguments of the language model's forward now running in this thread (or task), for decoder stacks that
# call their layers with a fixed set of arguments and drop the rest (transformers' MPT): a hook on such a stack
# (`relay_media_arguments`) sets them before its forward and clears them after.
_RELAYED_MEDIA: ContextVar[dict | None] = ContextVar("visincontext_relayed_media", default=None)


def _capture_media_arguments(module, args, kwargs):
    _RELAYED_MEDIA.set({name: kwargs.get(name) for name in MEDIA_ARGUMENTS})


def _release_media_arguments(module, args, kwargs, output):
    _RELAYED_MEDIA.set(None)


def relay_media_arguments(decoder_stack: nn.Module) -> None:
    """Hands the media keyword arguments of `decoder_stack`'s forward to its wrapped layers, for a stack that does
    not pass its keyword arguments on (its forward must accept and ignore them, as MPT's `**kwargs` does)."""
    decoder_stack.register_forward_pre_hook(_capture_media_arguments, with_kwargs=True)
    decoder_stack.register_forward_hook(_release_media_arguments, with_kwargs=True, always_call=True)


class VisInContextDecoderLayer(nn.Module):
    """A decoder layer of the wrapped LM, preceded by a gated cross-attention block where configured.

    The media arrive as keyword arguments of the LM's forward, which v5 decoder stacks hand to every layer (stacks
    that do not are relayed: `relay_media_arguments`): the memory (`media`), the slots each token reads
    (`media_attention_mask`), and either the memory as this block projected it earlier (`media_key_values`, at
    generate's later steps) or a list to put its projection in (`projected_media`, for generate to reuse).
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
        if media is None and (relayed := _RELAYED_MEDIA.get()) is not None:
            media, media_key_values = relayed["media"], relayed["media_key_values"]
            media_attention_mask, projected_media = relayed["media_attention_mask"], relayed["projected_media"]
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
