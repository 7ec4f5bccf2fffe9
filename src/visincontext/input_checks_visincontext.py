# Copyright 2026 The visincontext authors. Licensed under the Apache License, Version 2.0.
"""The checks of the models' inputs, each naming the argument: `check_inputs` for `VisInContextModel.forward`,
`check_media_inputs` for `encode_media` (and as part of `check_inputs`), `check_objective_inputs` for what only the
head takes (labels, the contrastive loss's context tokens). Data-dependent checks are skipped on the meta device."""

import torch

from .configuration_visincontext import IMAGE_TOKEN, VisInContextConfig


def check_inputs(
    config: VisInContextConfig,
    input_ids,
    inputs_embeds,
    attention_mask,
    cache,
    media,
    media_key_values,
    pixel_values,
    image_mask,
    context_pixel_values,
    context_mask,
    image_latents_mask,
) -> tuple:
    """Checks the inputs' shapes and values. Returns the five media inputs (`pixel_values` to `image_latents_mask`),
    checked, the masks as booleans."""
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
    if inputs_embeds is not None and inputs_embeds.shape[-1] != config.text_config.hidden_size:
        raise ValueError(
            f"inputs_embeds: expected hidden size {config.text_config.hidden_size}, got {inputs_embeds.shape[-1]}"
        )
    if input_ids is not None and input_ids.device.type != "meta":
        vocab_size, media_ids = config.text_config.vocab_size, list(config.media_token_ids)
        invalid = (input_ids < 0) | (
            (input_ids >= vocab_size) & ~torch.isin(input_ids, input_ids.new_tensor(media_ids))
        )
        if invalid.any():
            raise ValueError(
                f"input_ids: ids {sorted(set(input_ids[invalid].tolist()))[:10]} are not in the vocabulary "
                f"(0 to {vocab_size - 1}, and the media tokens {media_ids})"
            )
    if attention_mask is not None and attention_mask.ndim == 2:
        past = cache.get_seq_length() if cache is not None else 0
        if tuple(attention_mask.shape) != (batch_size, past + length):
            raise ValueError(
                f"attention_mask: expected shape {(batch_size, past + length)} (the batch and the "
                f"{past} cached + {length} new tokens), got {tuple(attention_mask.shape)}"
            )
    masks = check_media_inputs(
        config, batch_size, pixel_values, image_mask, context_pixel_values, context_mask, image_latents_mask
    )
    if media_key_values is not None and media is None:
        raise ValueError("media_key_values: given without the `media` it was projected from")
    if media is None:
        _check_image_tokens(config, input_ids, pixel_values, masks[0])
    return pixel_values, masks[0], context_pixel_values, masks[1], masks[2]


def check_media_inputs(
    config: VisInContextConfig,
    batch_size: int,
    pixel_values,
    image_mask,
    context_pixel_values,
    context_mask,
    image_latents_mask,
) -> tuple[torch.BoolTensor | None, torch.BoolTensor | None, torch.BoolTensor | None]:
    """Checks the media inputs' shapes and values. Returns the three masks as booleans."""
    vision = config.vision_config
    image_size, channels = vision.image_size, getattr(vision, "num_channels", 3)
    checked = []
    for values, mask, name, mask_name, kind in (
        (pixel_values, image_mask, "pixel_values", "image_mask", "images"),
        (context_pixel_values, context_mask, "context_pixel_values", "context_mask", "pages"),
    ):
        if values is not None:
            if (
                values.ndim != 5
                or values.shape[0] != batch_size
                or tuple(values.shape[2:]) != (channels, image_size, image_size)
            ):
                channels_last = values.ndim == 5 and values.shape[-1] == channels
                hint = " (channels last? expected channels first)" if channels_last else ""
                raise ValueError(
                    f"{name}: expected (batch, {kind}, {channels}, {image_size}, {image_size}) with batch "
                    f"{batch_size}, got {tuple(values.shape)}{hint}"
                )
            if not values.is_floating_point():
                raise TypeError(f"{name}: expected a float tensor (normalised pixels), got {values.dtype}")
        checked.append(_bool_mask(mask_name, mask, None if values is None else values.shape[:2], name))
    shape = None if pixel_values is None else pixel_values.shape[:2]
    checked.append(_bool_mask("image_latents_mask", image_latents_mask, shape, "pixel_values"))
    return tuple(checked)


def check_objective_inputs(tokens, labels, context_input_ids, context_attention_mask) -> None:
    """`tokens`: input_ids (B, T) or inputs_embeds (B, T, H), or None (a check of `VisInContextModel`'s to make)."""
    if labels is not None and tokens is not None and tuple(labels.shape) != tuple(tokens.shape[:2]):
        raise ValueError(f"labels: expected shape {tuple(tokens.shape[:2])} like input_ids, got {tuple(labels.shape)}")
    if context_input_ids is None:
        return
    if context_input_ids.ndim != 2 or (tokens is not None and context_input_ids.shape[0] != tokens.shape[0]):
        raise ValueError(
            f"context_input_ids: expected (batch, sequence) with the batch of input_ids, "
            f"got {tuple(context_input_ids.shape)}"
        )
    if context_attention_mask is not None and context_attention_mask.shape != context_input_ids.shape:
        raise ValueError(
            f"context_attention_mask: expected shape {tuple(context_input_ids.shape)} like context_input_ids, "
            f"got {tuple(context_attention_mask.shape)}"
        )


def _check_rank(name: str, tensor: torch.Tensor | None, shape: str, rank: int) -> None:
    if tensor is not None and tensor.ndim != rank:
        raise ValueError(f"{name}: expected {shape}, got shape {tuple(tensor.shape)}")


def _bool_mask(name: str, mask: torch.Tensor | None, shape, values_name: str) -> torch.BoolTensor | None:
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


def _check_image_tokens(config: VisInContextConfig, input_ids, pixel_values, image_mask) -> None:
    """The prompt's `<image>` tokens must match its images."""
    if input_ids is None or input_ids.device.type == "meta":
        return
    num_image_tokens = (input_ids == config.image_token_id).sum(dim=1)
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
