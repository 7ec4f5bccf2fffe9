# Copyright 2026 The visincontext authors. Licensed under the Apache License, Version 2.0.
"""Rendered text -> the model's tensors: pages (`RenderedText.pages`, uint8) to normalised pixel values with their
mask, and cell grids (`RenderedText.cells`) to the reading objective's targets. The processor's `__call__` and the
training collator both come here through `VisInContextProcessor(context=...)`."""

import numpy as np
import torch

from .rendering_visincontext import reading_targets


def pages_to_pixel_values(
    pages: list, page_size: tuple[int, int], image_processor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rendered pages per sample (`(P, H, W)` uint8 arrays, or None) -> padded `(B, P, 3, H, W)` pixel values,
    rescaled and normalised as `image_processor` does its images, and a `(B, P)` mask of the real pages."""
    counts = [0 if p is None else len(p) for p in pages]
    batch = np.full((len(pages), max(counts + [0]), *page_size), 255, np.uint8)
    mask = np.zeros(batch.shape[:2], dtype=bool)
    for i, (sample_pages, count) in enumerate(zip(pages, counts)):
        if count:
            batch[i, :count] = np.asarray(sample_pages, dtype=np.uint8)
            mask[i, :count] = True
    return normalize_pages(batch, image_processor), torch.from_numpy(mask)


def normalize_pages(pages: np.ndarray, image_processor) -> torch.Tensor:
    """uint8 (B, P, H, W) -> float (B, P, 3, H, W), rescaled and normalised as the image processor does."""
    do_rescale = getattr(image_processor, "do_rescale", True)
    scale = float(getattr(image_processor, "rescale_factor", 1 / 255)) if do_rescale else 1.0
    values = torch.from_numpy(pages).float().mul_(scale)
    values = values.unsqueeze(2).expand(-1, -1, 3, -1, -1)
    if getattr(image_processor, "do_normalize", False):
        mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(1, 1, 3, 1, 1)
        std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(1, 1, 3, 1, 1)
        values = (values - mean) / std
    return values.contiguous()


def batch_reading_targets(cells: list, num_latents: int, cells_per_latent: int) -> torch.Tensor:
    """Cells per sample (`(P, rows, columns)` codepoints from `RenderedText.cells`, or None) -> `(B, P,
    num_latents, cells_per_latent)` reading targets (`rendering_visincontext.reading_targets`), -100 on padded
    pages: the targets of the model's reading objective (`config.reading_loss_weight`)."""
    counts = [0 if c is None else len(c) for c in cells]
    targets = torch.full((len(cells), max(counts + [0]), num_latents, cells_per_latent), -100, dtype=torch.long)
    for i, sample in enumerate(cells):
        if counts[i]:
            targets[i, : counts[i]] = torch.from_numpy(reading_targets(sample, num_latents, cells_per_latent))
    return targets


def stack_images(flat_pixels: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The image processor's `(sum(counts), 3, H, W)` -> `(B, N, 3, H, W)` zero-padded per sample, and the `(B, N)`
    mask of the real images."""
    most = max(counts + [0])
    pixel_values = flat_pixels.new_zeros(len(counts), most, *flat_pixels.shape[1:])
    image_mask = torch.zeros(len(counts), most, dtype=torch.bool)
    start = 0
    for i, count in enumerate(counts):
        pixel_values[i, :count] = flat_pixels[start : start + count]
        image_mask[i, :count] = True
        start += count
    return pixel_values, image_mask
