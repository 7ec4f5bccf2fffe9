# Copyright 2026 The visincontext authors. Licensed under the Apache License, Version 2.0.
"""The media tokens' embedding and output rows: the language model's vocabulary stays frozen, `<image>` and
`<|endofchunk|>` train (rows of their own, so PEFT can train and save them through `modules_to_save`)."""

import torch
import torch.nn.functional as F
from torch import nn


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
