# Copyright 2026 The visincontext authors. Licensed under the Apache License, Version 2.0.
"""VisInContextProcessor: images + prompt text + long context (rendered into pages) -> model inputs."""

import io
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import load_image
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin
from transformers.utils import logging

from .chat_visincontext import (  # noqa: F401  (the chat template's names, importable from here as before)
    CHAT_PREAMBLE,
    CONTENT_TYPES,
    DEFAULT_CHAT_BODY,
    chat_template_for,
    check_assistant_masks,
    conversation_context,
    field,
)
from .configuration_visincontext import END_OF_CHUNK_TOKEN, IMAGE_TOKEN
from .pages_visincontext import batch_reading_targets, pages_to_pixel_values, stack_images
from .rendering_visincontext import RenderedText, TextRenderer, check_text

logger = logging.get_logger(__name__)

FONT_SETTINGS = ("font_path", "fallback_font_paths")
FONT_LICENCE = "LICENSE-DejaVu.txt"
RENDERER_SETTINGS = (
    "font_path",
    "fallback_font_paths",
    "font_size",
    "page_height",
    "page_width",
    "line_height",
    "cell_width",
    "margin",
    "max_pages",
    "overflow",
)


def to_rgb_image(image) -> Image.Image:
    """An 8-bit RGB PIL image from a PIL image (of any mode), encoded bytes, a path or URL, or an array (HWC or HW).

    Values are read by their real range: 16-bit images (PIL `I;16`, uint16 arrays) are scaled from 0-65535, float
    images (PIL `F`, float arrays) from 0-1 (or taken as 0-255 when their values exceed 1); values outside those
    ranges are an error. A lazily opened file is decoded here, so a truncated one fails here. Raises `ValueError`
    (the caller names the image)."""
    try:
        if isinstance(image, str):
            image = load_image(image)
        elif isinstance(image, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(bytes(image)))
        if isinstance(image, Image.Image):
            image.load()  # decodes a lazily opened file now: a truncated or oversized one fails here
            if image.mode == "RGB":  # most images, and every one `data.load_image` gave: no copy
                return image
            if image.mode in ("1", "L", "P", "RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr", "LAB", "HSV", "La", "RGBa"):
                return image.convert("RGB")
            values = np.asarray(image)
        else:
            values = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    except ValueError:
        raise
    except Exception as error:  # PIL's decoders raise OSError, SyntaxError, DecompressionBombError, ...
        raise ValueError(f"{type(error).__name__}: {error}") from error
    if values.ndim == 3 and values.shape[0] in (1, 3, 4) and values.shape[-1] not in (1, 3, 4):
        values = values.transpose(1, 2, 0)  # channels first -> last
    if values.ndim == 3 and values.shape[-1] == 1:
        values = values[..., 0]
    if values.ndim not in (2, 3) or (values.ndim == 3 and values.shape[-1] not in (3, 4)):
        raise ValueError(f"expected an image of shape (H, W), (H, W, 3) or (H, W, 4), got {tuple(values.shape)}")
    if values.dtype == bool:
        values = values.astype(np.uint8) * 255
    elif values.dtype != np.uint8:
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if not np.isfinite([low, high]).all() or low < 0:
            raise ValueError(
                f"{values.dtype} values in [{low:g}, {high:g}]: pass 8-bit values (0-255), 16-bit ones (0-65535) "
                "or floats in [0, 1]"
            )
        if np.issubdtype(values.dtype, np.floating):
            scale = 255.0 if high <= 1.0 else 1.0
            if high * scale > 255.0:
                raise ValueError(f"float values in [{low:g}, {high:g}]: pass floats in [0, 1] (or 0-255)")
        elif values.dtype == np.uint16 or (high > 255 and high <= 65535):
            scale = 255.0 / 65535.0
        elif high <= 255:
            scale = 1.0
        else:
            raise ValueError(f"{values.dtype} values up to {high:g}: pass 8-bit (0-255) or 16-bit (0-65535) values")
        values = np.clip(np.rint(values.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(values).convert("RGB")


def _check_characters(name: str, text: str, index: int, batched: bool) -> None:
    """A clear error for a string that is not all characters (a lone surrogate), naming the argument and sample."""
    check_text(name, text, sample=index if batched else None)


def _output_size(image_processor) -> tuple[int, int] | None:
    """(height, width) of the images an image processor returns, when it says so."""
    for name in ("crop_size", "size"):
        size = getattr(image_processor, name, None)
        if isinstance(size, dict) and "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
        if hasattr(size, "height") and getattr(size, "height", None):
            return int(size.height), int(size.width)
    return None


def batch_inputs(images, text, context, image_token: str, page_size: tuple, max_pages: int | None):
    """`__call__`'s inputs as lists per sample, checked (`page_size`, `max_pages`: what a `RenderedText` context must
    fit). Returns (texts, images per sample, contexts)."""
    if text is None:
        raise ValueError("text: expected a string or a list of strings (the prompt), got None")
    batched = isinstance(text, (list, tuple))
    texts = list(text) if batched else [text]
    if not texts:
        raise ValueError("text: expected at least one prompt, got an empty list")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"text: expected strings, got {type(t).__name__} at index {i}")
        _check_characters("text", t, i, batched)
    counts = [t.count(image_token) for t in texts]

    if images is not None and not isinstance(images, (list, tuple)):
        images = [images]
    if images is None:
        per_sample = [[] for _ in texts]
    elif not batched:
        # one sample: its images, possibly nested once ([[image, ...]], as apply_chat_template passes them)
        nested = len(images) == 1 and isinstance(images[0], (list, tuple))
        per_sample = [list(images[0]) if nested else list(images)]
    elif images and all(isinstance(x, (list, tuple)) for x in images):
        per_sample = [list(x) for x in images]
    else:  # a flat list for a batch: handed out in <image> order
        flat = list(images) if isinstance(images, (list, tuple)) else [images]
        if len(flat) != sum(counts):
            raise ValueError(f"images: {len(flat)} images for {sum(counts)} {image_token} tokens in text")
        per_sample, start = [], 0
        for count in counts:
            per_sample.append(flat[start : start + count])
            start += count
    if len(per_sample) != len(texts):
        raise ValueError(f"images: expected one list of images per text ({len(texts)}), got {len(per_sample)}")
    for i, (count, sample_images) in enumerate(zip(counts, per_sample)):
        if count != len(sample_images):
            raise ValueError(
                f"text: sample {i} has {count} {image_token} tokens but {len(sample_images)} images were given"
            )

    if context is None:
        contexts = [None] * len(texts)
    elif batched:
        if not isinstance(context, (list, tuple)) or len(context) != len(texts):
            raise ValueError(f"context: expected a list of {len(texts)} strings, RenderedText or None (one per text)")
        contexts = list(context)
    else:
        contexts = [context]
    for i, c in enumerate(contexts):
        if isinstance(c, str):
            _check_characters("context", c, i, batched)
        elif isinstance(c, RenderedText):
            c.check_fits(page_size, max_pages, f"context: RenderedText {i}")
        elif c is not None:
            kind = type(c).__name__
            raise TypeError(f"context: expected a string, RenderedText or None, got {kind} at index {i}")
    for i, sample_images in enumerate(per_sample):
        for j, image in enumerate(sample_images):
            size = image.size if isinstance(image, Image.Image) else getattr(image, "shape", None)
            if size is not None and 0 in tuple(size)[:2]:
                raise ValueError(f"images: image {j} of sample {i} is empty ({'x'.join(map(str, size))})")
            try:  # paths, bytes, lazily opened files, 16-bit and float images: one conversion for all
                sample_images[j] = to_rgb_image(image)
            except ValueError as error:
                raise ValueError(f"images: image {j} of sample {i} cannot be loaded ({error})") from None
    return texts, per_sample, contexts


def copy_fonts(paths: list[str], save_directory) -> None:
    """Copies the font files (and the shipped fonts' licence) into `save_directory`, beside processor_config.json."""
    os.makedirs(save_directory, exist_ok=True)
    for path in paths:
        target = Path(save_directory) / Path(path).name
        if Path(path).resolve() != target.resolve():
            shutil.copyfile(path, target)
        licence = Path(path).parent / FONT_LICENCE
        if licence.is_file():
            shutil.copyfile(licence, Path(save_directory) / FONT_LICENCE)


def saved_font_paths(pretrained_model_name_or_path, kwargs: dict) -> dict:
    """`kwargs` with the font files named in processor_config.json, fetched from the same folder or Hub repository
    (the real `cached_file` path), unless the caller gave them."""
    from transformers.utils import cached_file

    hub_kwargs = {
        k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only", "subfolder") if k in kwargs
    }
    config_file = cached_file(
        pretrained_model_name_or_path,
        "processor_config.json",
        _raise_exceptions_for_missing_entries=False,
        **hub_kwargs,
    )
    if config_file is not None and not all(name in kwargs for name in FONT_SETTINGS):
        try:
            saved = json.loads(Path(config_file).read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"pretrained_model_name_or_path: {config_file} is not valid JSON ({error})") from None

        def locate(name):
            if name is None or os.path.isabs(name):
                return name
            return cached_file(pretrained_model_name_or_path, name, **hub_kwargs)

        kwargs.setdefault("font_path", locate(saved.get("font_path")))
        kwargs.setdefault("fallback_font_paths", [locate(n) for n in saved.get("fallback_font_paths") or []])
    return kwargs


class VisInContextProcessorKwargs(ProcessingKwargs, total=False):
    """Per-call options besides the tokenizer's and image processor's own."""

    return_context_ids: bool
    return_cut_characters: bool
    reading_layout: tuple[int, int] | None


class VisInContextProcessor(ProcessorMixin):
    r"""
    One processor for VisInContext: an image processor for images, a tokenizer (with `<image>` and
    `<|endofchunk|>` added) for the prompt, and a `TextRenderer` that draws the long `context` into pages.

    Args:
        image_processor: e.g. `CLIPImageProcessor`; its output size is the page size by default.
        tokenizer: the language model's tokenizer.
        chat_template: Jinja chat template; default: `chat_template_for(None)` (`from_backbones` builds it around the
            language model's own template). Messages may hold `{"type": "image"}`, `{"type": "text", "text": ...}`
            and `{"type": "context", "text": ...}` items: context is rendered into pages, not written in the prompt.
        image_token / end_of_chunk_token: the media tokens.
        font_path, fallback_font_paths, font_size, page_height, page_width, line_height, cell_width, margin:
            renderer settings (see `TextRenderer`); saved in `processor_config.json`, fonts copied beside it.
        max_pages: most context pages per sample; `overflow` says what happens to longer context
            (`"keep_end"` by default: the text nearest the prompt is kept).
    """

    model_input_names = [
        "input_ids",
        "attention_mask",
        "pixel_values",
        "image_mask",
        "context_pixel_values",
        "context_mask",
    ]
    valid_processor_kwargs = VisInContextProcessorKwargs
    text_kwargs = {"padding": True, "padding_side": "left"}  # left padding: batches go straight to `generate`

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        image_token: str = IMAGE_TOKEN,
        end_of_chunk_token: str = END_OF_CHUNK_TOKEN,
        font_path: str | None = None,
        fallback_font_paths: list[str] | None = None,
        font_size: int | None = None,
        page_height: int | None = None,
        page_width: int | None = None,
        line_height: int = 16,
        cell_width: int | None = None,
        margin: int = 0,
        max_pages: int = 8,
        overflow: str = "keep_end",
        **kwargs,
    ):
        if tokenizer is not None:
            missing = [t for t in (image_token, end_of_chunk_token) if t not in tokenizer.get_vocab()]
            if missing:
                tokenizer.add_tokens(missing, special_tokens=True)
            self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
            self.end_of_chunk_token_id = tokenizer.convert_tokens_to_ids(end_of_chunk_token)
        self.image_token, self.end_of_chunk_token = image_token, end_of_chunk_token
        size = _output_size(image_processor) if image_processor is not None else None
        page_height = page_height or (size[0] if size else 224)
        page_width = page_width or (size[1] if size else 224)
        self.renderer = TextRenderer(
            font_path=font_path,
            fallback_font_paths=fallback_font_paths,
            font_size=font_size,
            page_height=page_height,
            page_width=page_width,
            line_height=line_height,
            cell_width=cell_width,
            margin=margin,
            max_pages=max_pages,
            overflow=overflow,
        )
        super().__init__(image_processor, tokenizer, chat_template=chat_template or chat_template_for(None))

    # The renderer holds its settings (one source of truth): `processor.max_pages` and the others read it, and
    # `max_pages` / `overflow` may be set (validated); the page geometry and fonts are fixed once built.
    def __getattr__(self, name: str):
        if name in RENDERER_SETTINGS and "renderer" in self.__dict__:
            return getattr(self.__dict__["renderer"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value) -> None:
        if name in RENDERER_SETTINGS and "renderer" in self.__dict__:
            if name not in ("max_pages", "overflow"):
                raise AttributeError(f"{name}: fixed when the processor is built; build a new processor to change it")
            renderer = self.__dict__["renderer"]
            TextRenderer._check_overflow(
                value if name == "max_pages" else renderer.max_pages, value if name == "overflow" else renderer.overflow
            )
            setattr(renderer, name, value)
            return
        super().__setattr__(name, value)

    @classmethod
    def from_backbones(
        cls, vision_model: str, language_model: str, tokenizer_kwargs: dict | None = None, tokenizer=None, **kwargs
    ):
        """Image processor from the vision checkpoint, tokenizer from the LM's, pages shaped to the tower:
        page = `image_size`, row height = `patch_size` (the same ids as
        `VisInContextForConditionalGeneration.from_backbones`). `tokenizer`: a loaded tokenizer to use instead of
        the LM's (e.g. one whose media tokens a converted checkpoint placed)."""
        from transformers import AutoConfig

        image_processor = AutoImageProcessor.from_pretrained(vision_model)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(language_model, **(tokenizer_kwargs or {}))
        vision_config = AutoConfig.from_pretrained(vision_model)
        vision_config = getattr(vision_config, "vision_config", vision_config)
        size, patch = vision_config.image_size, vision_config.patch_size
        settings = {"page_height": size, "page_width": size, "line_height": patch, **kwargs}
        settings.setdefault("chat_template", chat_template_for(tokenizer.chat_template))
        return cls(image_processor=image_processor, tokenizer=tokenizer, **settings)

    def to_dict(self) -> dict:
        # The renderer is the one source of its settings (the properties below read it); they are saved by name in
        # processor_config.json, the fonts by file name (save_pretrained copies them beside it).
        output = super().to_dict()
        output.update({name: getattr(self, name) for name in RENDERER_SETTINGS})
        output["font_path"] = Path(self.font_path).name
        output["fallback_font_paths"] = [Path(path).name for path in self.fallback_font_paths]
        output.pop("auto_map", None)  # written by save_pretrained
        return output

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Saves like any processor, and copies the font files (and the shipped fonts' licence) next to
        `processor_config.json`, so the processor renders identically wherever it is loaded."""
        copy_fonts([self.font_path, *self.fallback_font_paths], save_directory)
        result = super().save_pretrained(save_directory, *args, **kwargs)
        # remote code needs the auto_map in processor_config.json; keep it out of the in-memory settings
        config_file = Path(save_directory) / "processor_config.json"
        config = json.loads(config_file.read_text())
        config["auto_map"] = {"AutoProcessor": "processing_visincontext.VisInContextProcessor"}
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return result

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Loads like any processor; font files named in `processor_config.json` are fetched from the same
        folder or Hub repository (the real `cached_file` path)."""
        kwargs = saved_font_paths(pretrained_model_name_or_path, kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """`ProcessorMixin.apply_chat_template`, plus the context items: checked, removed from the prompt (by the
        template) and, with `tokenize=True`, rendered into the sample's context pages (items of a conversation
        joined by a blank line). With `tokenize=True, return_dict=True` the result holds the same keys as `__call__`.
        """
        batched = (
            isinstance(conversation, (list, tuple))
            and bool(conversation)
            and isinstance(conversation[0], (list, tuple))
        )
        conversations = list(conversation) if batched else [conversation]
        contexts = [conversation_context(c, kwargs.get("tokenize", False)) for c in conversations]
        if kwargs.get("tokenize", False):
            processor_kwargs = dict(kwargs.get("processor_kwargs") or {})
            processor_kwargs["context"] = contexts if batched else contexts[0]
            kwargs["processor_kwargs"] = processor_kwargs
        result = super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)
        if kwargs.get("return_assistant_tokens_mask") and isinstance(result, Mapping) and "assistant_masks" in result:
            check_assistant_masks(conversations, result["assistant_masks"])
        return result

    def render(self, context: str):
        """One context as this processor renders it: its renderer, with its `max_pages` and `overflow`."""
        try:
            return self.renderer.render(context, max_pages=self.max_pages, overflow=self.overflow)
        except ValueError as error:  # the renderer's own names (text, max_pages) -> the processor's argument
            raise ValueError(f"context: {error}") from None

    def render_context(self, contexts: list):
        """Renders each context (at most `self.max_pages` pages, `self.overflow` beyond); a `RenderedText` is taken
        as it is. Returns `(pages (B, P, 3, H, W) float, mask (B, P) bool, kept texts, cells per sample, characters
        cut per sample (B,))`, pages normalised like the image processor's images. Cut context is warned about, once
        per call."""
        rendered = [c if c is None or isinstance(c, RenderedText) else self.render(c) for c in contexts]
        kept = ["" if r is None else r.kept_text for r in rendered]
        pixels, mask = self.pages_to_pixel_values([None if r is None else r.pages for r in rendered])
        cut = torch.tensor([0 if r is None else r.cut_characters for r in rendered], dtype=torch.long)
        if cut.any():
            logger.warning(
                f"context: {int((cut > 0).sum())} of {len(cut)} samples exceed max_pages={self.max_pages}; "
                f"overflow={self.overflow!r} cut {int(cut.sum())} characters (per sample: `return_cut_characters=True`)"
            )
        return pixels, mask, kept, [None if r is None else r.cells for r in rendered], cut

    # the reading objective's targets from cells per sample (`pages_visincontext.batch_reading_targets`)
    reading_targets = staticmethod(batch_reading_targets)

    def pages_to_pixel_values(self, pages: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Rendered pages per sample (`(P, H, W)` uint8 arrays, or None) -> padded `(B, P, 3, H, W)` pixel values,
        normalised as this processor's images, and a `(B, P)` mask."""
        return pages_to_pixel_values(pages, (self.renderer.page_height, self.renderer.page_width), self.image_processor)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token  # one token per image: the cross-attention, not the sequence, carries it

    def __call__(self, images=None, text=None, context=None, **kwargs) -> BatchFeature:
        """
        images: for one sample a list of images (PIL or arrays) in `<image>` order; for a batch a list of such
            lists (or one flat list, handed out in `<image>` order).
        text: the prompt (str) or a batch of prompts (list of str).
        context: long in-context text to render (str or None per sample), or text rendered ahead of time
            (`RenderedText`, as `visincontext.data.prerender` stores it).
        return_context_ids: also return the kept context as tokens (`context_input_ids`,
            `context_attention_mask`), for the text-centric contrastive loss.
        return_cut_characters: also return `context_cut_characters`, what `max_pages` cut of each context.
        Tokenizer and image-processor options pass through (`text_kwargs=...`, `images_kwargs=...` or flat).

        Returns `input_ids`, `attention_mask` (left-padded), `pixel_values` (B, N, 3, H, W) with `image_mask`
        (B, N) and `context_pixel_values` (B, P, 3, H, W) with `context_mask` (B, P) (N or P is 0 when no sample has
        images or context): the model's inputs, for `model(**inputs)` and `generate(**inputs)`. With
        `return_cut_characters=True` also `context_cut_characters` (B,): characters of each context that `max_pages`
        cut (not a model input: pop it before passing the rest on).
        """
        page_size = (self.renderer.page_height, self.renderer.page_width)
        texts, per_sample, contexts = batch_inputs(images, text, context, self.image_token, page_size, self.max_pages)
        # ProcessorMixin's (underscored) kwargs merger, which every transformers processor's `__call__` uses; the
        # ProcessorTesterMixin suite in tests/test_processing_common.py fails if it changes
        options = self._merge_kwargs(VisInContextProcessorKwargs, **kwargs)
        return_tensors = kwargs.pop("return_tensors", None) or options["text_kwargs"].get("return_tensors") or "pt"
        # The padding side is passed explicitly: a tokenizer saved after right-padded training batches keeps
        # "right" in its files, and would otherwise win over this processor's left-padding default.
        padding_side = options["text_kwargs"].get("padding_side") or "left"
        for name in ("return_context_ids", "return_cut_characters", "reading_layout", "padding_side"):
            kwargs.pop(name, None)
        if isinstance(kwargs.get("text_kwargs"), dict):
            kwargs["text_kwargs"] = {k: v for k, v in kwargs["text_kwargs"].items() if k != "padding_side"}
        flat_images = [image for sample in per_sample for image in sample]
        data = dict(
            super().__call__(
                images=flat_images or None, text=texts, return_tensors="pt", padding_side=padding_side, **kwargs
            )
        )

        flat_pixels = data.pop("pixel_values", torch.zeros(0, 3, *page_size))
        pixel_values, image_mask = stack_images(flat_pixels, [len(sample) for sample in per_sample])
        pages, context_mask, kept, cells, cut = self.render_context(contexts)
        data.update(
            pixel_values=pixel_values, image_mask=image_mask, context_pixel_values=pages, context_mask=context_mask
        )
        if options.get("return_cut_characters"):
            data["context_cut_characters"] = cut
        if options.get("reading_layout"):
            data["context_reading_targets"] = self.reading_targets(cells, *options["reading_layout"])
        if options.get("return_context_ids"):
            tokens = self.tokenizer(
                kept, padding=True, padding_side="right", return_tensors="pt", add_special_tokens=False
            )
            data.update(context_input_ids=tokens["input_ids"], context_attention_mask=tokens["attention_mask"])
        return BatchFeature(data=data, tensor_type=return_tensors)


__all__ = ["VisInContextProcessor"]
