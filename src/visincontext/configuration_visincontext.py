# Copyright 2026 The visincontext authors. Licensed under the Apache License, Version 2.0.
"""VisInContext configuration.

VisInContext (Wang et al., NeurIPS 2024, arXiv 2406.02547) renders long in-context text into
images, reads them with a (frozen) vision tower and a Perceiver resampler, and lets a causal
language model attend to the resulting latents through gated cross-attention (Flamingo style).
"""

from typing import Literal

from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

IMAGE_TOKEN = "<image>"
END_OF_CHUNK_TOKEN = "<|endofchunk|>"

# The parts of the training loss, one place: each part's output field and the config attribute that weighs it
# (None: weight 1). The model's `loss` sums the weighted parts it computed; Trainer's evaluation gathers none of them
# as predictions (`keys_to_ignore_at_inference`); VisInContextTrainer logs each.
LOSS_WEIGHTS = {"lm_loss": None, "contrastive_loss": "contrastive_loss_weight", "reading_loss": "reading_loss_weight"}


class VisInContextConfig(PreTrainedConfig):
    r"""
    Configuration of a VisInContext model: a vision tower, a causal language model, two Perceiver
    resamplers (images and rendered text) and gated cross-attention blocks.

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the vision tower (any `AutoModel` vision config: CLIP, SigLIP, ...). Defaults
            to a CLIP ViT-L/14 vision config.
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the causal language model body (Llama, Mistral, Qwen2, ...). Defaults to Llama.
        num_latents (`int`, defaults to 64):
            Latents each resampler produces per image or rendered page.
        resampler_depth (`int`, defaults to 6):
            Number of Perceiver layers per resampler.
        resampler_num_heads (`int`, defaults to 8) / resampler_head_dim (`int`, defaults to 64):
            Attention shape of the resamplers.
        resampler_ff_mult (`int`, defaults to 4):
            Hidden size multiplier of the resampler feed-forward blocks.
        cross_attention_every (`int`, defaults to 4):
            A gated cross-attention block is inserted before decoder layer `i` when
            `(i + 1) % cross_attention_every == 0` (OpenFlamingo's convention).
        cross_attention_num_heads (`int`, defaults to 8) / cross_attention_head_dim (`int`, defaults to 64):
            Attention shape of the cross-attention blocks.
        cross_attention_ff_mult (`int`, defaults to 4):
            Hidden size multiplier of the cross-attention feed-forward blocks.
        only_attend_immediate_media (`bool`, defaults to `True`):
            A text token attends only to the image of its own chunk (the latest `<image>` before it).
            When `False`, it also attends to every earlier image. Rendered context is always visible.
        latent_fusion (`"sum"` or `"concat"`, defaults to `"sum"`):
            How the latents of a chunk's image and of the rendered context are combined: `"sum"`
            adds the image latents to every page's latents (upstream VisInContext), `"concat"` puts
            them side by side along the latent axis.
        contrastive_loss_weight (`float`, defaults to 0.5):
            Weight of the text-centric contrastive loss (TCCL) beside the language-modeling loss.
        contrastive_temperature_init (`float`, defaults to 0.07):
            Initial temperature of the (learnable) InfoNCE logit scale.
        contrastive_dim (`int`, defaults to 256):
            Size of the shared embedding space of the TCCL heads.
        contrastive_text_layer (`int`, *optional*):
            Hidden-state index of the language model read by the TCCL text head; defaults to the middle layer.
        reading_loss_weight (`float`, defaults to 0.0):
            Weight of the reading objective (0: off, and no reading head is built): a linear head spells out, from
            each rendered-context latent, the characters of its run of `reading_cells_per_latent` page cells (in
            reading order). It gives every latent a dense target of its own; the targets come from the renderer's
            layout (`VisInContextProcessor.reading_targets`).
        reading_cells_per_latent (`int`, defaults to 8):
            Page cells each latent reads. With the default layout (rows one patch tall, two characters per patch)
            a 224x224 page with 16-px patches has 14 x 28 = 392 cells: 64 latents x 8 cover them all.
        vision_features (`"last_hidden_state"` or `"normed_patches"`, defaults to `"last_hidden_state"`):
            What the resamplers read from the vision tower: its `last_hidden_state`, or (CLIP towers) the tower's
            post-layernorm applied to the patch tokens, class token dropped, which is what OpenCLIP's
            `output_tokens=True` returns and OpenFlamingo's resampler was trained on.
        freeze_vision_tower (`bool`, defaults to `True`) / freeze_language_model (`bool`, defaults to `True`):
            Freeze the backbones. New parts (resamplers, cross-attention, media token embeddings,
            TCCL heads) always stay trainable.
        image_token_id (`int`, defaults to 32000) / end_of_chunk_token_id (`int`, defaults to 32001):
            Ids of `<image>` and `<|endofchunk|>`. Their embeddings and output rows are separate,
            trainable parameters, so they may lie inside or right after the language model's vocabulary.
    """

    model_type = "visincontext"
    # what Trainer's evaluation loop should not gather as predictions: large per-batch tensors, and the loss parts
    # (VisInContextTrainer reports those as `eval_lm_loss`, ...), so that `predictions` are the logits
    keys_to_ignore_at_inference = [
        "past_key_values",
        "cache",
        "media",
        "media_key_values",
        "chunk_ids",
        *LOSS_WEIGHTS,
    ]
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="clip_vision_model",
            init_kwargs={
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "patch_size": 14,
                "image_size": 224,
            },
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    num_latents: int = 64
    resampler_depth: int = 6
    resampler_num_heads: int = 8
    resampler_head_dim: int = 64
    resampler_ff_mult: int = 4
    cross_attention_every: int = 4
    cross_attention_num_heads: int = 8
    cross_attention_head_dim: int = 64
    cross_attention_ff_mult: int = 4
    only_attend_immediate_media: bool = True
    latent_fusion: Literal["sum", "concat"] = "sum"
    vision_features: Literal["last_hidden_state", "normed_patches"] = "last_hidden_state"
    contrastive_loss_weight: float = 0.5
    contrastive_temperature_init: float = 0.07
    contrastive_dim: int = 256
    contrastive_text_layer: int | None = None
    reading_loss_weight: float = 0.0
    reading_cells_per_latent: int = 8
    freeze_vision_tower: bool = True
    freeze_language_model: bool = True
    image_token_id: int = 32000
    end_of_chunk_token_id: int = 32001
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        # A sub-config given as an object is the config of a loaded backbone (`from_backbones`), whose attention
        # implementation `from_pretrained` has resolved. `PreTrainedConfig` sets the top-level implementation, `None`
        # unless one is asked for, on every sub-config in place: that would leave the backbone's own attention
        # unmasked ("None" falls back to unmasked attention). Without an explicit request, each keeps its own.
        resolved = {
            key: value._attn_implementation
            for key in self.sub_configs_defaults
            if isinstance(value := getattr(self, key), PreTrainedConfig)
        }
        super().__post_init__(**kwargs)
        if kwargs.get("attn_implementation") is None:
            for key, implementation in resolved.items():
                if implementation is not None:
                    getattr(self, key)._attn_implementation = implementation
        # Language models keep `tie_word_embeddings` in their own config; the top-level flag is the one
        # `PreTrainedModel.tie_weights` reads (same workaround as LLaVA).
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        for name in (
            "num_latents",
            "resampler_depth",
            "resampler_num_heads",
            "resampler_head_dim",
            "resampler_ff_mult",
            "cross_attention_every",
            "cross_attention_num_heads",
            "cross_attention_head_dim",
            "cross_attention_ff_mult",
            "contrastive_dim",
            "reading_cells_per_latent",
            "image_token_id",
            "end_of_chunk_token_id",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name}: expected an integer, got {value!r}")
            if value < (0 if name.endswith("token_id") else 1):
                raise ValueError(
                    f"{name}: expected a {'non-negative' if name.endswith('token_id') else 'positive'} "
                    f"integer, got {value}"
                )
        for name in ("contrastive_loss_weight", "contrastive_temperature_init", "reading_loss_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"{name}: expected a number, got {value!r}")
        if self.contrastive_temperature_init <= 0:
            raise ValueError(
                f"contrastive_temperature_init: expected a positive number, got {self.contrastive_temperature_init}"
            )
        if self.latent_fusion not in ("sum", "concat"):
            raise ValueError(f"latent_fusion: expected 'sum' or 'concat', got {self.latent_fusion!r}")
        if self.vision_features not in ("last_hidden_state", "normed_patches"):
            raise ValueError(
                f"vision_features: expected 'last_hidden_state' or 'normed_patches', got {self.vision_features!r}"
            )
        if self.reading_loss_weight < 0:
            raise ValueError(f"reading_loss_weight: expected a number >= 0, got {self.reading_loss_weight}")

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """As for any config, but a folder or repository without `config.json` is an error: transformers would build
        this class's defaults, a Llama-7B with a ViT-L/14 tower, and allocate it."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if not config_dict:
            raise ValueError(
                f"pretrained_model_name_or_path: no config.json in {str(pretrained_model_name_or_path)!r}; "
                "a VisInContext "
                "checkpoint is a folder written by save_pretrained (or pass config=...)"
            )
        return config_dict, kwargs

    @property
    def media_token_ids(self) -> tuple[int, int]:
        """Ids of the tokens with their own trainable embeddings: `(<image>, <|endofchunk|>)`."""
        return (self.image_token_id, self.end_of_chunk_token_id)

    @property
    def output_vocab_size(self) -> int:
        """Width of the logits: the language model's vocabulary, extended to cover the media tokens."""
        return max(self.text_config.vocab_size, max(self.media_token_ids) + 1)

    @property
    def cross_attention_layers(self) -> list[int]:
        """Indices of the decoder layers preceded by a gated cross-attention block."""
        num_layers = self.text_config.num_hidden_layers
        return [i for i in range(num_layers) if (i + 1) % self.cross_attention_every == 0]


__all__ = ["VisInContextConfig", "IMAGE_TOKEN", "END_OF_CHUNK_TOKEN"]
