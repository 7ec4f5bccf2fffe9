"""Tiny random backbones, a byte-level tokenizer and processors: for tests, examples and benchmarks that
must run offline on a CPU in seconds (no weights or vocabularies are downloaded)."""

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    MistralConfig,
    MptConfig,
    Qwen2Config,
    SiglipVisionConfig,
)

from .configuration_visincontext import VisInContextConfig
from .modeling_visincontext import VisInContextForConditionalGeneration
from .offline import BOS_ID, BYTE_VOCAB, EOS_ID, PAD_ID, byte_level_tokenizer, default_processor

VOCAB = BYTE_VOCAB  # 256 byte tokens + <s>, </s>, <pad> (see tiny_tokenizer)
IMAGE_ID, EOC_ID = VOCAB, VOCAB + 1
IMAGE_SIZE = 32


def tiny_tokenizer():
    """The lossless byte-level tokenizer (259 ids) of `visincontext.offline`."""
    return byte_level_tokenizer()


def vision_config(kind: str = "clip", image_size: int = IMAGE_SIZE, hidden_size: int = 32):
    common = dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=8,
    )
    return CLIPVisionConfig(**common) if kind == "clip" else SiglipVisionConfig(**common)


def text_config(kind: str = "llama", hidden_size: int = 32):
    if kind == "mpt":  # transformers' MPT (ALiBi, no biases), as OpenFlamingo-9B-vitl-mpt7b's MPT-7B
        return MptConfig(
            d_model=hidden_size, n_heads=4, n_layers=2, expansion_ratio=2, vocab_size=VOCAB, max_seq_len=256
        )
    common = dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    return {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[kind](**common)


def tiny_config(vision="clip", text="llama", vision_config=None, text_config=None, **overrides) -> VisInContextConfig:
    """A tiny config; `vision`/`text` name the backbone kinds, or pass built `vision_config`/`text_config`."""
    settings = dict(
        num_latents=4,
        resampler_depth=1,
        resampler_num_heads=2,
        resampler_head_dim=8,
        cross_attention_every=1,
        cross_attention_num_heads=2,
        cross_attention_head_dim=8,
        contrastive_dim=16,
        image_token_id=IMAGE_ID,
        end_of_chunk_token_id=EOC_ID,
    )
    settings.update(overrides)
    vision_config = vision_config if vision_config is not None else _vision_config(vision)
    text_config = text_config if text_config is not None else _text_config(text)
    return VisInContextConfig(vision_config=vision_config, text_config=text_config, **settings)


_vision_config, _text_config = vision_config, text_config


def tiny_model(seed: int = 0, **kwargs) -> VisInContextForConditionalGeneration:
    torch.manual_seed(seed)
    return VisInContextForConditionalGeneration(tiny_config(**kwargs)).eval()


def open_gates(model, value: float = 1.0):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                param.fill_(value)
    return model


def tiny_processor(image_size: int = IMAGE_SIZE, line_height: int = 8, **kwargs):
    """A processor with a CLIP image processor at `image_size` and the byte-level tokenizer."""
    return default_processor(image_size=image_size, line_height=line_height, **kwargs)


def sample_batch(seed: int = 0, num_images: int = 2, num_pages: int = 3):
    """Two samples: the first has 2 images and 2 pages, the second 1 image and no pages (padded)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.tensor(
        [[5, 6, IMAGE_ID, 7, 8, 9, EOC_ID, IMAGE_ID, 10, 11, 12], [5, 6, 7, IMAGE_ID, 13, 14, 15, 16, 17, 18, 19]]
    )
    return dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=torch.randn(2, num_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g),
        image_mask=torch.tensor([[True, True], [True, False]]),
        context_pixel_values=torch.randn(2, num_pages, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g),
        context_mask=torch.tensor([[True, True, False], [False, False, False]]),
    )


__all__ = [
    "VOCAB",
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "IMAGE_ID",
    "EOC_ID",
    "IMAGE_SIZE",
    "tiny_tokenizer",
    "vision_config",
    "text_config",
    "tiny_config",
    "tiny_model",
    "open_gates",
    "tiny_processor",
    "sample_batch",
]
