"""Training data for VisInContext: dataset rows -> samples -> batches.

A *sample* is a dict with `images` (in `<image>` order), `prompt` (tokens the LM reads but is not trained
on), `text` (tokens it is trained on), `context` (text rendered into pages, or None), `row_index` and, when
streamed, `row_key`.
`format_row` builds one from a row of any supported schema; `VisInContextCollator` turns samples into
model inputs with labels, rendering the context on the fly (in DataLoader workers when
`dataloader_num_workers > 0`) and dropping image latents with probability `token_mask_prob`.
"""

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .chat_visincontext import conversation_context
from .configuration_visincontext import END_OF_CHUNK_TOKEN, IMAGE_TOKEN
from .processing_visincontext import to_rgb_image
from .rendering_visincontext import RenderedText

ROW_KINDS = ("interleaved", "mmc4", "pair", "text", "vqa", "chat", "mimicit")
IN_CONTEXT_MODES = ("text", "rendered")
# what `prerender` adds to a row: a `RenderedText` (see `sample_context`); `context_spans` since 0.2
PRERENDERED_COLUMNS = ("context_pages", "context_cells", "context_text", "context_spans", "context_cut_characters")


def load_image(value: Any, image_root: str | None = None) -> Image.Image:
    """An 8-bit RGB PIL image from a PIL image, encoded bytes, a `{"bytes"|"path"}` dict (datasets' Image feature),
    a path (relative to `image_root`) or an array; 16-bit and float images by their real range (`to_rgb_image`).
    Raises `ValueError` for anything that cannot be decoded (truncated files, decompression bombs included)."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str):
        if value.startswith(("http://", "https://")):
            raise ValueError(f"image {value!r} is a URL: download the images first (this package reads local data)")
        path = Path(image_root, value) if image_root and not os.path.isabs(value) else Path(value)
        try:
            with Image.open(path) as image:
                return to_rgb_image(image)
        except (OSError, Image.DecompressionBombError) as error:
            raise ValueError(f"image {str(path)!r} cannot be read ({type(error).__name__}: {error})") from error
    if value is None or isinstance(value, (int, float, list, tuple, dict)):
        raise ValueError(
            f"image: expected a PIL image, bytes, a path or a datasets Image dict, got {type(value).__name__}"
        )
    return to_rgb_image(value)


def _split_at_fraction(pieces: list[str], fraction: float) -> int:
    """How many leading pieces to render: those that start before `fraction` of the characters, always
    leaving at least the last piece as tokens."""
    total, seen = sum(len(p) for p in pieces), 0
    for i, piece in enumerate(pieces):
        if seen >= fraction * total:
            return min(i, len(pieces) - 1)
        seen += len(piece)
    return len(pieces) - 1


def _interleaved(images: list, texts: list, context_fraction: float, max_images: int, image_root) -> dict:
    """OBELICS layout (parallel lists, one of image/text per position). The earlier text becomes the
    rendered context; the later positions stay as tokens, images as `<image>`, each image's chunk closed
    by `<|endofchunk|>` (Flamingo's format). Images that fall in the context part are not used."""
    text_positions = [i for i, t in enumerate(texts) if t is not None]
    if not text_positions:
        raise ValueError("the document has no text")
    split = _split_at_fraction([texts[i] for i in text_positions], context_fraction)
    context = "\n\n".join(texts[i] for i in text_positions[:split]) or None
    start = text_positions[split - 1] + 1 if split else 0  # everything after the last rendered text
    pieces, kept_images = [], []
    for i in range(start, len(texts)):
        if images[i] is not None and len(kept_images) < max_images:
            if kept_images:
                pieces.append(END_OF_CHUNK_TOKEN)
            pieces.append(IMAGE_TOKEN)
            kept_images.append(load_image(images[i], image_root))
        elif texts[i] is not None:
            pieces.append(texts[i] if not pieces or pieces[-1] in (IMAGE_TOKEN, END_OF_CHUNK_TOKEN) else " " + texts[i])
    if kept_images:
        pieces.append(END_OF_CHUNK_TOKEN)
    return {"images": kept_images, "prompt": "", "text": "".join(pieces), "context": context}


def format_row(
    row: dict,
    kind: str,
    context_fraction: float = 0.5,
    max_images: int = 4,
    image_root: str | None = None,
    processor=None,
    in_context: str = "text",
) -> dict:
    """One dataset row -> one sample (see the module docstring). Raises `ValueError` on a malformed row.

    kinds: `"interleaved"` (OBELICS: `images`/`texts` lists with None placeholders), `"mmc4"` (`text_list` +
    `image_info` with `matched_text_index` and `image`/`image_name`), `"pair"` (`image` + `caption`/`text`),
    `"text"` (`text`: the first `context_fraction` is rendered, the rest is trained on) and `"vqa"`
    (`image`/`images`, `question`, `answer`, optional `context`: trained on the answer only).

    Conversations, laid out by `processor`'s chat template and trained on the assistant turns only (each with the
    `<|endofchunk|>` that ends it; `train_spans` in the sample): `"chat"` (TRL's format: `messages` with
    `{"type": "image"}` placeholders filled from an `images` column in order, `{"type": "context"}` items rendered)
    and `"mimicit"` (MIMIC-IT / Otter: the query triplet `instruction`, `answer`, optional `image`, and `in_context`,
    a list of such triplets, given as earlier turns with `in_context="text"` or rendered into the context pages,
    without their images, with `in_context="rendered"`).
    """
    if kind not in ROW_KINDS:
        raise ValueError(f"kind: expected one of {ROW_KINDS}, got {kind!r}")
    if kind in ("chat", "mimicit"):
        if processor is None:
            raise ValueError(f"processor: a {kind!r} row is laid out by the processor's chat template; pass processor=")
        messages = _chat_messages(row) if kind == "chat" else _mimicit_messages(row, in_context)
        return conversation_sample(messages, processor, image_root)

    def need(*keys):
        missing = [k for k in keys if k not in row or row[k] is None]
        if missing:
            raise ValueError(f"missing key(s) {missing} for a {kind!r} row (has {sorted(row)})")

    def strings(key, value, optional=False):  # text fields are strings: never an int or a dict collated as text
        if not isinstance(value, str) and not (optional and value is None):
            raise TypeError(f"{key}: expected a string{' or None' if optional else ''}, got {type(value).__name__}")
        return value

    if kind == "interleaved":
        need("images", "texts")
        if len(row["images"]) != len(row["texts"]):
            raise ValueError(f"images and texts have different lengths ({len(row['images'])} vs {len(row['texts'])})")
        for i, text in enumerate(row["texts"]):
            strings(f"texts[{i}]", text, optional=True)
        return _interleaved(list(row["images"]), list(row["texts"]), context_fraction, max_images, image_root)
    if kind == "mmc4":
        need("text_list", "image_info")
        texts = [strings(f"text_list[{i}]", text) for i, text in enumerate(row["text_list"])]
        slots_images: list = [None] * len(texts)
        for info in row["image_info"]:
            index = info.get("matched_text_index")
            if index is None or not 0 <= index < len(texts):
                raise ValueError(f"image_info: matched_text_index {index!r} outside text_list of {len(texts)}")
            slots_images[index] = info.get("image") or info.get("image_name") or info.get("image_path")
        images, texts_out = [], []
        for image, text in zip(slots_images, texts):  # an image stands before the text it is matched to
            if image is not None:
                images.append(image)
                texts_out.append(None)
            images.append(None)
            texts_out.append(text)
        return _interleaved(images, texts_out, context_fraction, max_images, image_root)
    if kind == "pair":
        need("image")
        key = "caption" if row.get("caption") is not None else "text"
        if row.get(key) is None:
            raise ValueError("missing key 'caption' (or 'text') for a 'pair' row")
        caption = strings(key, row[key])
        return {
            "images": [load_image(row["image"], image_root)],
            "prompt": "",
            "text": f"{IMAGE_TOKEN}{caption}{END_OF_CHUNK_TOKEN}",
            "context": None,
        }
    if kind == "text":
        need("text")
        text = strings("text", row["text"])
        cut = text.rfind(" ", 0, int(len(text) * context_fraction)) + 1 or int(len(text) * context_fraction)
        return {"images": [], "prompt": "", "text": text[cut:], "context": text[:cut] or None}
    need("question", "answer")
    strings("question", row["question"]), strings("answer", row["answer"])
    strings("context", row.get("context"), optional=True)
    images = (
        row.get("images") if row.get("images") is not None else ([row["image"]] if row.get("image") is not None else [])
    )
    prompt = "".join(IMAGE_TOKEN for _ in images) + f"Question: {row['question']} Answer:"
    return {
        "images": [load_image(image, image_root) for image in images],
        "prompt": prompt,
        "text": f" {row['answer']}{END_OF_CHUNK_TOKEN}",
        "context": row.get("context"),
    }


def _chat_messages(row: dict) -> list[dict]:
    """TRL's conversational format: `messages`, with image placeholders filled from `images` in order."""
    messages, images = row.get("messages"), list(row.get("images") or [])
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"missing key 'messages' (a list of messages) for a 'chat' row (has {sorted(row)})")
    filled = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            items = []
            for item in content:
                if (
                    isinstance(item, dict)
                    and item.get("type") == "image"
                    and item.get("image") is None
                    and not item.get("path")
                ):
                    if not images:
                        raise ValueError(f"messages[{i}]: more image items than images in the row")
                    item = {**item, "image": images.pop(0)}
                items.append(item)
            message = {**message, "content": items}
        filled.append(message)
    if images:
        raise ValueError(f"images: {len(images)} images of the row have no image item in its messages")
    return filled


def _mimicit_messages(row: dict, in_context: str) -> list[dict]:
    """MIMIC-IT / Otter: the query triplet after its in-context triplets (as turns, or as a rendered context)."""
    if in_context not in IN_CONTEXT_MODES:
        raise ValueError(f"in_context: expected one of {IN_CONTEXT_MODES}, got {in_context!r}")
    missing = [k for k in ("instruction", "answer") if not isinstance(row.get(k), str)]
    if missing:
        raise ValueError(f"missing key(s) {missing} for a 'mimicit' row (has {sorted(row)})")

    def turns(triplet: dict) -> list[dict]:
        image = [{"type": "image", "image": triplet["image"]}] if triplet.get("image") is not None else []
        return [
            {"role": "user", "content": image + [{"type": "text", "text": triplet["instruction"]}]},
            {"role": "assistant", "content": [{"type": "text", "text": triplet["answer"]}]},
        ]

    examples = list(row.get("in_context") or [])
    for j, example in enumerate(examples):
        if not isinstance(example, dict) or not all(isinstance(example.get(k), str) for k in ("instruction", "answer")):
            raise ValueError(f"in_context[{j}]: expected an instruction and an answer")
    query = turns(row)
    if in_context == "rendered":
        lines = "\n".join(f"User: {e['instruction']}\nAssistant: {e['answer']}" for e in examples)
        if lines:
            query[0]["content"] = [{"type": "context", "text": lines}] + query[0]["content"]
        return query
    return [turn for example in examples for turn in turns(example)] + query


def conversation_sample(messages: list[dict], processor, image_root: str | None = None) -> dict:
    """A conversation -> a sample: its text laid out by the processor's chat template, its images in order, its
    context items joined, and `train_spans`: where each assistant turn (with its `<|endofchunk|>`) stands, the
    only characters trained on. A turn's place is found by laying out the messages before it with a generation
    prompt: a template that does not lay out a conversation's start the same way on its own is an error."""
    context = conversation_context(messages, tokenize=True)
    images = [
        load_image(item["image"] if item.get("image") is not None else item.get("path"), image_root)
        for message in messages
        if isinstance(message.get("content"), list)
        for item in message["content"]
        if item.get("type") == "image"
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(processor.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True))
        content = message["content"]
        answer = (
            content
            if isinstance(content, str)
            else "".join(
                IMAGE_TOKEN if item["type"] == "image" else item.get("text", "") if item["type"] == "text" else ""
                for item in content
            )
        )
        answer += END_OF_CHUNK_TOKEN
        if text[start : start + len(answer)] != answer:
            raise ValueError(
                f"messages[{k}]: the chat template does not place this assistant turn after the turns "
                "before it with their generation prompt; cannot tell which characters to train on"
            )
        spans.append((start, start + len(answer)))
    if not spans:
        raise ValueError("messages: no assistant turn to train on")
    return {"images": images, "prompt": "", "text": text, "context": context, "train_spans": spans}


def format_dataset(dataset, kind: str, skip_bad_rows: bool = False, **format_kwargs):
    """Formats each row of a `datasets.Dataset` (or any sized, indexable dataset) or a streaming
    `datasets.IterableDataset` when it is read (images stay lazily decoded). Returns `(dataset, BadRowCounter)`.

    A malformed row raises `ValueError` naming its index; with `skip_bad_rows=True` it is skipped and counted, with
    a warning (the collator drops it from its batch). A stream stays a `datasets.IterableDataset`, so that the
    Trainer (accelerate) splits it once across processes and DataLoader workers read disjoint shards; its row
    indices count the rows of each such part (a stream has no global position), so a streamed sample also carries
    `row_key`, a hash of the row's content, which identifies it to the collator in every worker and process.
    Skips in DataLoader workers are logged there but not counted in the main process.
    """
    from datasets import IterableDataset

    counter = BadRowCounter()
    streamed = isinstance(dataset, IterableDataset)

    def convert(row, index):
        try:
            sample = format_row(row, kind, **format_kwargs)
        except (ValueError, KeyError, OSError, TypeError, Image.DecompressionBombError) as error:
            if not skip_bad_rows:
                raise (TypeError if isinstance(error, TypeError) else ValueError)(f"row {index}: {error}") from error
            counter.add(index, error)
            return None
        sample["row_index"] = index
        if streamed:  # a stream's index restarts in every DataLoader worker and process: the row's content is its key
            sample["row_key"] = row_key(row)
        if "context_pages" in row:  # rendered ahead of time by `prerender`
            sample.update({key: row[key] for key in PRERENDERED_COLUMNS if key in row})
        return sample

    if streamed:
        wrapped = dataset.map(
            lambda row, index: {"sample": convert(row, index)}, with_indices=True, remove_columns=dataset.column_names
        )
        samples = wrapped.filter(lambda row: row["sample"] is not None)
        return samples.map(lambda row: row["sample"], remove_columns=["sample"]), counter
    if hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        return _FormattedDataset(dataset, convert), counter
    raise TypeError(
        f"dataset: expected a datasets.Dataset, an indexable sized dataset or a datasets.IterableDataset, "
        f"got {type(dataset).__name__}"
    )


def row_key(row: Any) -> int:
    """A 56-bit hash of a row's content: strings, bytes, numbers, PIL images (mode, size, pixels), arrays, and
    lists and dicts of them (keys in sorted order). Equal rows get equal keys in any process."""
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, dict):
            digest.update(b"{")
            for key in sorted(value, key=str):
                feed(str(key))
                feed(value[key])
            digest.update(b"}")
        elif isinstance(value, (list, tuple)):
            digest.update(b"[")
            for item in value:
                feed(item)
            digest.update(b"]")
        elif isinstance(value, (bytes, bytearray, memoryview)):
            digest.update(b"b%d:" % len(value) + bytes(value))
        elif isinstance(value, str):
            encoded = value.encode("utf-8", "surrogatepass")
            digest.update(b"s%d:" % len(encoded) + encoded)
        elif isinstance(value, Image.Image):
            digest.update(f"i{value.mode}{value.size}:".encode() + value.tobytes())
        elif isinstance(value, (np.ndarray, torch.Tensor)):
            array = np.ascontiguousarray(value.numpy() if isinstance(value, torch.Tensor) else value)
            digest.update(f"a{array.dtype}{array.shape}:".encode() + array.tobytes())
        else:  # None, numbers, booleans and anything else by its repr
            digest.update(f"r{type(value).__name__}:{value!r};".encode())

    feed(row)
    return int.from_bytes(digest.digest()[:7], "big")


class BadRowCounter:
    """Indices and reasons of the rows skipped with `skip_bad_rows`."""

    def __init__(self):
        self.skipped: dict[int, str] = {}

    def add(self, index: int, error: Exception) -> None:
        from transformers.utils import logging

        self.skipped[index] = str(error)
        logging.get_logger(__name__).warning(f"skipping bad row {index}: {error} ({len(self.skipped)} skipped so far)")

    def __len__(self) -> int:
        return len(self.skipped)


class _FormattedDataset(torch.utils.data.Dataset):
    def __init__(self, dataset, convert):
        self.dataset, self.convert = dataset, convert

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict | None:
        return self.convert(self.dataset[int(index)], int(index))


@dataclass
class VisInContextCollator:
    """Samples -> a batch of model inputs with `labels`.

    Labels are the input ids, with -100 on padding, on `<image>` tokens and on the prompt. Image latents are
    dropped with probability `token_mask_prob` (the paper's token masking, 0.5 in pretraining) through the
    `image_latents_mask` input. The draw for a sample is a function of `seed`, `epoch` and the sample's row (its
    `row_key` when streamed, else its `row_index`, or its text when it has neither): the same sample gets the same mask
    in any batch, order, DataLoader worker or process, and again when a run resumes from a checkpoint.
    `VisInContextTrainer` sets `epoch` at the start of each epoch, so that masks change from one epoch to the next.
    """

    processor: Any
    token_mask_prob: float = 0.0
    seed: int = 0
    return_context_ids: bool = False
    max_length: int | None = None
    epoch: int = 0
    reading_layout: tuple[int, int] | None = None  # (latents per page, cells per latent): add reading targets

    def __post_init__(self):
        if not 0.0 <= self.token_mask_prob <= 1.0:
            raise ValueError(f"token_mask_prob: expected a probability in [0, 1], got {self.token_mask_prob}")

    def sample_key(self, sample: dict) -> int:
        """The part of a sample's random draws that identifies it: a streamed row's content key (`row_key`), its row
        index, or a hash of its text."""
        if sample.get("row_key") is not None:
            return int(sample["row_key"])
        if sample.get("row_index") is not None:
            return int(sample["row_index"])
        text = f"{sample.get('prompt', '')}\x00{sample.get('text', '')}\x00{sample.get('context') or ''}"
        return int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:7], "big")

    def _truncate(self, batch: dict, samples: list[dict]) -> None:
        """Cuts the (right-padded) sequences to `max_length`; an image whose `<image>` token is cut is dropped with it
        (warned about once), so that tokens and images stay consistent."""
        for key in ("input_ids", "attention_mask", "offset_mapping"):
            batch[key] = batch[key][:, : self.max_length]
        kept = (batch["input_ids"] == self.processor.image_token_id).sum(dim=1)
        slots = torch.arange(batch["image_mask"].shape[1])
        cut = batch["image_mask"] & (slots[None, :] >= kept[:, None])
        if cut.any():
            batch["image_mask"] = batch["image_mask"] & ~cut
            batch["pixel_values"] = batch["pixel_values"].masked_fill(cut[..., None, None, None], 0.0)
            rows = [samples[i].get("row_index") for i in cut.any(dim=1).nonzero().flatten().tolist()]
            _warn_once(
                self,
                f"max_length={self.max_length} cut <image> tokens (rows {rows}, and maybe later ones): "
                "their images are dropped with them",
            )

    def image_latents_mask(self, samples: list[dict], image_mask: torch.Tensor) -> torch.Tensor:
        """(B, N) real-image mask -> (B, N) keep mask: each real image kept with probability 1 - token_mask_prob."""
        keep = torch.zeros_like(image_mask)
        for row, sample in enumerate(samples):
            entropy = np.random.SeedSequence([self.seed, self.epoch, self.sample_key(sample)]).generate_state(2)
            generator = torch.Generator().manual_seed(int(entropy[0]) << 32 | int(entropy[1]))
            keep[row] = torch.rand(image_mask.shape[1], generator=generator) >= self.token_mask_prob
        return keep & image_mask

    def __call__(self, samples: list[dict | None]) -> dict:
        samples = [s for s in samples if s is not None]  # rows skipped by format_dataset(skip_bad_rows=True)
        if not samples:
            raise ValueError("samples: every row of this batch was skipped as bad; see the warnings above")
        for sample in samples:
            if not isinstance(sample, dict) or not {"images", "prompt", "text"} <= set(sample):
                raise ValueError("samples: expected dicts from format_row with images, prompt, text and context")
        texts = [s["prompt"] + s["text"] for s in samples]
        try:
            images = [[load_image(image) for image in s["images"]] for s in samples]
        except (OSError, ValueError) as error:
            rows = [s.get("row_index") for s in samples]
            raise ValueError(f"an image of rows {rows} cannot be read: {error}") from error
        batch = self.processor(
            images=images,
            text=texts,
            context=[sample_context(s) for s in samples],
            return_tensors="pt",
            return_context_ids=self.return_context_ids,
            reading_layout=self.reading_layout,
            padding=True,
            padding_side="right",
            return_offsets_mapping=True,
        )
        if self.max_length is not None and batch["input_ids"].shape[1] > self.max_length:
            self._truncate(batch, samples)
        offsets = batch.pop("offset_mapping")  # (B, T, 2): character span of each token
        # trained: the text after the prompt, or a sample's `train_spans` (a conversation's assistant turns)
        trained = torch.zeros(batch["input_ids"].shape, dtype=torch.bool)
        for row, sample in enumerate(samples):
            spans = sample.get("train_spans") or [(len(sample["prompt"]), len(sample["prompt"]) + len(sample["text"]))]
            for start, end in spans:
                trained[row] |= (offsets[row, :, 0] >= start) & (offsets[row, :, 0] < end)
        labels = batch["input_ids"].clone()
        is_prompt = ~trained
        is_media = batch["input_ids"] == self.processor.image_token_id
        labels[is_prompt | is_media | (batch["attention_mask"] == 0)] = -100
        batch["labels"] = labels
        if batch["image_mask"].shape[1] and self.token_mask_prob > 0:
            batch["image_latents_mask"] = self.image_latents_mask(samples, batch["image_mask"])
        return dict(batch)


def sample_context(sample: dict):
    """A sample's context as the processor takes it: the pages `prerender` stored for it, as the `RenderedText` they
    came from, else its text (or None)."""
    if "context_pages" not in sample:
        return sample.get("context")
    text, cut = sample["context_text"], int(sample["context_cut_characters"])
    pages = np.asarray(sample["context_pages"], np.uint8)
    spans = sample.get("context_spans")  # per page, into the kept text (older prerendered sets: the text as one)
    spans = [tuple(span) for span in spans] if spans is not None else ([(0, len(text))] * bool(len(pages)))
    return RenderedText(
        pages=pages,
        spans=spans,
        text=text,
        cells=np.asarray(sample["context_cells"], np.int32),
        truncated=cut > 0,
        cut_characters=cut,
    )


def _warn_once(collator, message: str) -> None:
    if not getattr(collator, "_warned", False):
        from transformers.utils import logging

        logging.get_logger(__name__).warning(message)
        collator._warned = True


def prerender(dataset, kind: str, processor, num_proc: int | None = None, skip_bad_rows: bool = False, **format_kwargs):
    """Renders every row's context ahead of time with `datasets.map(num_proc=...)`, adding `context_pages`
    (`(P, H, W)` uint8), `context_cells` (their layout, for reading targets), `context_text` (the text the pages
    hold) and `context_spans` (each page's slice of it) columns; `format_dataset` and the collator
    then use those pages instead of rendering on the fly. For data sets read many times (several epochs).

    A malformed row raises `ValueError` naming its index; with `skip_bad_rows=True` it gets no pages here and is
    skipped (and counted) by `format_dataset`, as when rendering on the fly.
    """
    from datasets import Array3D, Features, List, Value

    renderer = processor.renderer
    no_pages = {
        "context_pages": np.zeros((0, renderer.page_height, renderer.page_width), np.uint8),
        "context_cells": np.zeros((0, renderer.rows_per_page, renderer.columns), np.int32),
        "context_text": "",
        "context_spans": [],
        "context_cut_characters": 0,
    }

    def render(row, index):
        try:
            context = format_row(row, kind, **{"processor": processor, **format_kwargs})["context"]
        except (ValueError, KeyError, OSError, TypeError) as error:
            if skip_bad_rows:
                return no_pages
            raise ValueError(f"row {index}: {error}") from error
        if context is None:
            return no_pages
        result = processor.render(context)
        start = result.spans[0][0] if result.spans else 0
        return {
            "context_pages": result.pages,
            "context_cells": result.cells,
            "context_text": result.kept_text,
            "context_spans": [[a - start, b - start] for a, b in result.spans],
            "context_cut_characters": result.cut_characters,
        }

    features = Features(
        {
            **dataset.features,
            "context_pages": Array3D(shape=(None, renderer.page_height, renderer.page_width), dtype="uint8"),
            "context_cells": Array3D(shape=(None, renderer.rows_per_page, renderer.columns), dtype="int32"),
            "context_text": Value("string"),
            "context_spans": List(List(Value("int64"), length=2)),
            "context_cut_characters": Value("int64"),
        }
    )
    return dataset.map(render, with_indices=True, num_proc=num_proc, features=features, desc="rendering context")
