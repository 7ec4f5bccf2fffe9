"""The offline default of the training scripts and the quickstart: a small random VisInContext model and its
processor, built from configs here (nothing is downloaded). 64x64 pages with 8-pixel rows (128 characters a page),
a 2-layer ViT and a 2-layer byte-level Llama. Every part is random, so every part trains (nothing pretrained to
keep frozen). `examples/pretrain.py` and `finetune.py` use it when given no model, and say so in their log.
"""

import torch
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, PreTrainedTokenizerFast

from .backbones_visincontext import stop_at_end_of_chunk
from .configuration_visincontext import VisInContextConfig
from .modeling_visincontext import VisInContextForConditionalGeneration
from .processing_visincontext import VisInContextProcessor

BYTE_VOCAB = 259  # 256 byte tokens + <s>, </s>, <pad>
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A lossless byte-level tokenizer (every string round-trips) with 259 ids, built without downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(sorted(alphabet))}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    assert len(tokenizer) == BYTE_VOCAB and (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    ) == (BOS_ID, EOS_ID, PAD_ID)
    return tokenizer


def default_processor(image_size: int = 64, line_height: int = 8, **settings) -> VisInContextProcessor:
    """A CLIP image processor at `image_size` (PIL backend: no torchvision needed) and the byte-level tokenizer."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return VisInContextProcessor(
        image_processor=image_processor, tokenizer=byte_level_tokenizer(), line_height=line_height, **settings
    )


def default_model_and_processor(
    num_latents: int = 16, attn_implementation: str = "sdpa", seed: int = 0, **config_overrides
) -> tuple[VisInContextForConditionalGeneration, VisInContextProcessor]:
    """The small random model (about 0.3M parameters) and its processor."""
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=64, patch_size=8
    )
    text = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=BYTE_VOCAB,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    settings = dict(
        num_latents=num_latents,
        resampler_depth=1,
        resampler_num_heads=2,
        resampler_head_dim=8,
        cross_attention_every=1,
        cross_attention_num_heads=2,
        cross_attention_head_dim=8,
        contrastive_dim=16,
        image_token_id=BYTE_VOCAB,
        end_of_chunk_token_id=BYTE_VOCAB + 1,
        freeze_language_model=False,
    )
    settings.update(config_overrides)
    torch.manual_seed(seed)
    model = VisInContextForConditionalGeneration(VisInContextConfig(vision_config=vision, text_config=text, **settings))
    model.set_attn_implementation(attn_implementation)
    stop_at_end_of_chunk(model.generation_config, model.config.end_of_chunk_token_id)
    processor = default_processor()
    # a row per id of the processor's tokenizer (the bytes, <s> </s> <pad>, then <image> and <|endofchunk|>), as
    # `from_backbones` gives a model; padded after the rest is built, so every other weight is as it was
    model.resize_token_embeddings(len(processor.tokenizer), mean_resizing=False)
    return model, processor


__all__ = ["byte_level_tokenizer", "default_processor", "default_model_and_processor", "BYTE_VOCAB"]
