# Copyright 2026 The visincontext authors. Licensed under the Apache License, Version 2.0.
# The text-centric contrastive loss follows VisInContext (Wang et al., NeurIPS 2024).
"""The objectives beside next-token prediction, each a module that holds its weights and computes its loss from the
rendered pages' latents: the text-centric contrastive head (TCCL) and the reading head (each latent spells out the
characters of its page cells). Their names and weights are `LOSS_WEIGHTS` in the configuration."""

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_visincontext import LOSS_WEIGHTS, VisInContextConfig
from .rendering_visincontext import READING_CLASSES


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

    def loss(
        self,
        language_model: nn.Module,
        text_layer: int,
        context_latents: torch.Tensor,
        context_mask: torch.BoolTensor,
        context_input_ids: torch.LongTensor,
        context_attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """TCCL over the samples that have both rendered pages and the context's token ids.

        context_latents: (B, P, L, D); context_mask: (B, P); context_input_ids / context_attention_mask: (B, S).
        The LM reads the context tokens without gradient (`text_layer`'s hidden states): its body is frozen, and this
        keeps the loss cheap. InfoNCE needs a pair and a negative: with fewer than two such samples in the batch the
        loss is 0 (the value it takes for one pair), so batches of single-text documents train on the LM loss alone.
        """
        if context_attention_mask is None:
            context_attention_mask = torch.ones_like(context_input_ids)
        has_both = context_mask.any(dim=1) & context_attention_mask.bool().any(dim=1)
        if int(has_both.sum()) < 2:
            return context_latents.new_zeros(())
        with torch.no_grad():
            hidden_states = language_model(
                input_ids=context_input_ids[has_both],
                attention_mask=context_attention_mask[has_both],
                output_hidden_states=True,
            ).hidden_states[text_layer]
        context_embeds = self.embed_context(context_latents[has_both], context_mask[has_both])
        text_embeds = self.embed_text(hidden_states.to(context_embeds.dtype), context_attention_mask[has_both])
        return self(context_embeds, text_embeds)


class ReadingHead(nn.Linear):
    """The reading objective: a linear read-out of each context latent into the characters of its
    `reading_cells_per_latent` page cells (`READING_CLASSES` classes each)."""

    def __init__(self, config: VisInContextConfig):
        super().__init__(config.vision_config.hidden_size, config.reading_cells_per_latent * READING_CLASSES)
        self.cells_per_latent = config.reading_cells_per_latent

    def loss(self, context_latents: torch.Tensor, targets: torch.LongTensor) -> torch.Tensor:
        """context_latents: (B, P, L, D); targets: (B, P, L, K) reading classes, -100 to ignore -> cross-entropy."""
        if tuple(targets.shape[:3]) != tuple(context_latents.shape[:3]) or targets.shape[3] != self.cells_per_latent:
            raise ValueError(
                "context_reading_targets: expected shape "
                f"{(*context_latents.shape[:3], self.cells_per_latent)} "
                f"(batch, pages, latents, reading_cells_per_latent), got {tuple(targets.shape)}"
            )
        logits = self(context_latents).unflatten(-1, (targets.shape[-1], READING_CLASSES))
        if not (targets != -100).any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=-100)


def weighted_loss(parts: dict[str, torch.Tensor], config: VisInContextConfig) -> torch.Tensor | None:
    """The sum of the loss parts computed, each weighted as `LOSS_WEIGHTS` says (a part of weight 0 is reported and
    not added); None when no part was computed."""
    loss = None
    for name, weight_name in LOSS_WEIGHTS.items():
        if name not in parts:
            continue
        weight = None if weight_name is None else getattr(config, weight_name)
        if weight == 0:
            continue
        weighted = parts[name] if weight is None else weight * parts[name]
        loss = weighted if loss is None else loss + weighted
    return loss
