# Copyright 2026 The visincontext authors. Licensed under the Apache License, Version 2.0.
# The resampler and gated cross-attention follow Flamingo (Alayrac et al., 2022) as written in
# lucidrains/flamingo-pytorch and OpenFlamingo; the text-centric contrastive loss and the rendered-text
# latents follow VisInContext (Wang et al., NeurIPS 2024).
"""PyTorch VisInContext model.

The blocks live in sibling files, in reading order: `embeddings_visincontext.py` (media-token rows),
`perceiver_visincontext.py` (the resampler), `cross_attention_visincontext.py` (the media memory, the gated
cross-attention and the decoder-layer wrapper), `objectives_visincontext.py` (contrastive and reading heads);
`input_checks_visincontext.py` checks the inputs and `backbones_visincontext.py` loads and wraps the backbones. This
file holds the models: `VisInContextModel` (backbones + resamplers + cross-attention -> hidden states) and
`VisInContextForConditionalGeneration` (base model -> LM head -> objectives, and `generate`).

Shapes: B batch, T text tokens, N images per sample, P rendered pages per sample, L latents per image or page,
C = N + 1 chunks (chunk 0: the tokens before the first `<image>`), D vision and H language-model hidden size.
"""

import copy
import inspect
import math
import os
import shutil
import sys
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    ModelOutput,
)
from transformers.utils import add_start_docstrings_to_model_forward, logging
from transformers.utils.generic import can_return_tuple

from .backbones_visincontext import (
    build_around_backbones,
    has_class_token_and_post_layernorm,
    load_backbones,
    resolve_attention,
    tied_embedding_keys,
    vision_body,
    wrap_language_model,
)
from .configuration_visincontext import VisInContextConfig
from .cross_attention_visincontext import (
    GatedCrossAttentionBlock,
    MaskedCrossAttention,
    MediaMemory,
    build_media_memory,
)
from .embeddings_visincontext import MediaTokenLMHead
from .input_checks_visincontext import check_inputs, check_media_inputs, check_objective_inputs
from .objectives_visincontext import ReadingHead, TextCentricContrastiveHead, weighted_loss
from .outputs_visincontext import (
    CACHE_NAME,
    HEAD_OUTPUTS_FROM_MODEL,
    VisInContextCausalLMOutputWithPast,
    VisInContextModelOutputWithPast,
    _one_cache,
    accepts_past_key_values,
)
from .perceiver_visincontext import PerceiverAttention, PerceiverResampler

logger = logging.get_logger(__name__)

MODEL_INPUTS_DOCSTRING = r"""
    input_ids (`(B, T)`): token ids; `<image>` marks where each image stands.
    pixel_values (`(B, N, 3, H, W)`): images in `<image>` order; `image_mask` (`(B, N)`) marks real ones.
    context_pixel_values (`(B, P, 3, H, W)`): rendered context pages; `context_mask` (`(B, P)`) marks real ones.
    image_latents_mask (`(B, N)`): False drops an image's latents (token masking), leaving the context.
    media (`MediaMemory`): images and pages encoded already (`encode_media`, or an earlier output's `media`);
        when given, no pixels are encoded. A memory of one sample serves a batch of prompts.
    media_key_values: the memory already projected by each cross-attention block (an earlier output's, with its
        `media`); `generate` passes both at every decoding step.
    past_chunk_ids (`(B,)`): chunk of the last cached token, so that new tokens continue its chunk.
    cache: the KV cache (`past_key_values` before transformers 5.24; either name is accepted).
"""

HEAD_INPUTS_DOCSTRING = r"""
    See `VisInContextModel.forward` for the media inputs. Also:
    context_input_ids / context_attention_mask (`(B, S)`): the rendered context as tokens, for the
        contrastive loss (pretraining only).
    context_reading_targets (`(B, P, L, reading_cells_per_latent)`): the reading objective's targets
        (`VisInContextProcessor.reading_targets`), -100 to ignore; used when `config.reading_loss_weight > 0`.
    labels (`(B, T)`): next-token targets aligned with `input_ids` (shifted inside), -100 to ignore.
"""


def _init_new_parts(module: nn.Module, std: float) -> None:
    """Initialises the parameters VisInContext adds that generic `_init_weights` does not know."""
    if isinstance(module, (PerceiverAttention, MaskedCrossAttention)):
        for linear in (module.to_q, module.to_kv, module.to_out):
            init.normal_(linear.weight, mean=0.0, std=linear.in_features**-0.5)
    elif isinstance(module, PerceiverResampler):
        init.normal_(module.latents, mean=0.0, std=std)
    elif isinstance(module, GatedCrossAttentionBlock):
        init.zeros_(module.attn_gate)
        init.zeros_(module.ff_gate)
    elif isinstance(module, TextCentricContrastiveHead):
        init.normal_(module.text_query, mean=0.0, std=std)
        init.constant_(module.logit_scale, math.log(1.0 / module.temperature_init))


# The names of the modules VisInContext adds (one place): what stays trainable when the backbones are frozen, what
# bitsandbytes leaves unquantised, and what PEFT trains in full and saves with an adapter (`modules_to_save`).
NEW_MODULES = (
    "image_resampler",
    "context_resampler",
    "gated_cross_attention",
    "media_embedding",
    "media_head",
    "contrastive_head",
    "reading_head",
)


class VisInContextPreTrainedModel(PreTrainedModel):
    config: VisInContextConfig
    config_class = VisInContextConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["VisInContextDecoderLayer", "PerceiverResampler"]  # post_init adds the backbones' own
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    def resize_token_embeddings(self, *args, **kwargs):
        """`PreTrainedModel.resize_token_embeddings`; every weight stays as trainable as it was: the media-token rows
        keep training, the LM's vocabulary stays frozen (transformers gives the whole resized embedding module the
        `requires_grad` of its old weight, and the resized head that of a new one)."""
        trainable = {name: p.requires_grad for name, p in self.named_parameters()}
        result = super().resize_token_embeddings(*args, **kwargs)
        for name, param in self.named_parameters():
            if name in trainable:
                param.requires_grad_(trainable[name])
        return result

    # `resize_token_embeddings` keeps the input embedding's own class (transformers resizes its weight in place), so
    # `MediaTokenEmbedding` keeps its media rows; the LM head is rebuilt as a plain `nn.Linear`, so this hook (private,
    # pinned by test_resize_token_embeddings_keeps_media_rows) moves the resized weight into the existing head.
    def _get_resized_lm_head(self, old_lm_head, *args, **kwargs):
        resized = super()._get_resized_lm_head(old_lm_head, *args, **kwargs)
        if not isinstance(old_lm_head, MediaTokenLMHead) or resized is old_lm_head:
            return resized
        old_lm_head.weight = resized.weight
        old_lm_head.out_features = resized.out_features
        old_lm_head.output_vocab_size = max(resized.out_features, max(old_lm_head.media_token_ids) + 1)
        return old_lm_head

    # Modules bitsandbytes leaves unquantised whatever a `BitsAndBytesConfig` says (patterns as in its
    # `llm_int8_skip_modules`): the parts VisInContext trains, the vision tower (QLoRA quantises the language model
    # body only) and the LM head, which carries the media-token rows.
    modules_not_to_quantize = tuple(rf".*{name}" for name in ("vision_tower", *NEW_MODULES, "lm_head"))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, plus: the backbones come back frozen as the config says (loading makes
        new parameters, all trainable), and a `BitsAndBytesConfig` also skips `modules_not_to_quantize`."""
        from transformers import BitsAndBytesConfig

        quantization = kwargs.get("quantization_config")
        if isinstance(quantization, BitsAndBytesConfig):
            quantization = copy.deepcopy(quantization)
            skipped = list(quantization.llm_int8_skip_modules or [])
            quantization.llm_int8_skip_modules = skipped + [m for m in cls.modules_not_to_quantize if m not in skipped]
            kwargs["quantization_config"] = quantization
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading_info) with output_loading_info
        model._freeze_backbones()
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`; the folder's remote code is always this package's, whatever class a
        wrapper gave the model (FSDP2's `fully_shard` makes it an `FSDPVisInContext...`, defined in torch: transformers
        would copy torch's files and name that class in `auto_map`)."""
        # transformers writes the `auto_map` entry of the saved class only; remote code needs all of them
        self.config.auto_map = {
            "AutoConfig": "configuration_visincontext.VisInContextConfig",
            "AutoModel": "modeling_visincontext.VisInContextModel",
            "AutoModelForImageTextToText": "modeling_visincontext.VisInContextForConditionalGeneration",
        }
        wrapper = type(self)
        if wrapper.__module__ == __name__:
            return super().save_pretrained(save_directory, *args, **kwargs)
        wrapper._auto_class = None  # on the wrapper class only: transformers copies no code for it
        try:
            result = super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            del wrapper._auto_class
        if kwargs.get("is_main_process", True):
            from transformers.dynamic_module_utils import get_relative_import_files

            source = sys.modules[__name__].__file__  # this file and its siblings, as transformers copies them
            for path in [source, *get_relative_import_files(source)]:
                shutil.copyfile(path, os.path.join(save_directory, os.path.basename(path)))
        return result

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        _init_new_parts(module, std=getattr(self.config.text_config, "initializer_range", 0.02))

    def initialize_weights(self) -> None:
        """Initialises the weights not loaded from a checkpoint (`transformers.initialization` skips loaded ones).

        The backbones from the library go first, each through its own `initialize_weights`: transformers treats a
        class from outside the library (this one) as custom code and skips its modules without parameters of their
        own, such as CLIP's attention, whose projections CLIP's `_init_weights` sets from the attention module. Then
        the library's pass over this model, and last the cross-attention gates, which sit inside the language model
        and so are seen only by the LM's `_init_weights`, which does not know them.
        """
        for module in self.modules():
            if isinstance(module, PreTrainedModel) and not isinstance(module, VisInContextPreTrainedModel):
                module.initialize_weights()
        super().initialize_weights()
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (GatedCrossAttentionBlock, MaskedCrossAttention, PerceiverAttention)):
                    _init_new_parts(module, std)
            reading_head = getattr(self, "reading_head", None)
            if reading_head is not None:  # a linear read-out of the latents, at their scale
                init.normal_(reading_head.weight, mean=0.0, std=reading_head.in_features**-0.5)
                init.zeros_(reading_head.bias)

    def _freeze_backbones(self) -> None:
        """Freeze the vision tower and LM body as configured; new parts stay trainable."""
        for name, param in self.named_parameters():
            new = any(f".{module}." in f".{name}" for module in NEW_MODULES)
            in_vision = "vision_tower." in name
            in_language = ("language_model." in name or name.startswith("lm_head.")) and not new
            if (in_vision and self.config.freeze_vision_tower) or (in_language and self.config.freeze_language_model):
                param.requires_grad_(False)


class VisInContextModel(VisInContextPreTrainedModel):
    """Vision tower + two resamplers + a causal LM body with gated cross-attention; returns hidden states."""

    def __init__(
        self,
        config: VisInContextConfig,
        vision_tower: PreTrainedModel | None = None,
        language_model: PreTrainedModel | None = None,
    ):
        """`vision_tower` / `language_model`: pretrained backbones to build around (see `from_backbones`); by
        default both are built from `config` with random weights."""
        super().__init__(config)
        self.vision_tower = vision_tower if vision_tower is not None else AutoModel.from_config(config.vision_config)
        self.image_resampler = PerceiverResampler(config)
        self.context_resampler = PerceiverResampler(config)
        self.language_model = (
            language_model if language_model is not None else AutoModel.from_config(config.text_config)
        )
        for backbone in (self.vision_tower, self.language_model):
            resolve_attention(backbone)
        if config.vision_features == "normed_patches" and not has_class_token_and_post_layernorm(self.vision_tower):
            raise ValueError(
                f"vision_features: 'normed_patches' needs a CLIP-like tower (a class token and a post-layernorm); "
                f"{type(self.vision_tower).__name__} has none"
            )
        wrap_language_model(self.language_model, config)
        # the wrapped LM's name for its KV cache argument (`cache` from transformers 5.24, `past_key_values` before)
        parameters = inspect.signature(self.language_model.forward).parameters
        self.language_model_cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self.post_init()
        self._freeze_backbones()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def _patch_features(self, vision_outputs) -> torch.Tensor:
        """The features the resamplers read (`config.vision_features`): (M, n, D)."""
        features = vision_outputs.last_hidden_state
        if self.config.vision_features == "normed_patches":  # OpenCLIP's output tokens, as OpenFlamingo reads them
            features = vision_body(self.vision_tower).post_layernorm(features)[:, 1:]
        return features

    @can_return_tuple
    def get_image_features(self, pixel_values: torch.FloatTensor, **kwargs) -> BaseModelOutputWithPooling:
        """pixel_values: (M, 3, H, W) -> `last_hidden_state` (M, n, D) patch features (`config.vision_features`)
        and `pooler_output` (M, L, D) image-resampler latents."""
        vision_outputs = self.vision_tower(pixel_values=pixel_values, **kwargs)
        features = self._patch_features(vision_outputs)
        return BaseModelOutputWithPooling(
            last_hidden_state=features,
            pooler_output=self.image_resampler(features),
            hidden_states=vision_outputs.hidden_states,
            attentions=vision_outputs.attentions,
        )

    def resample_media(
        self,
        pixel_values: torch.FloatTensor | None,
        image_mask: torch.BoolTensor | None,
        context_pixel_values: torch.FloatTensor | None,
        context_mask: torch.BoolTensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Encodes the real images and pages (padding skipped) in one vision-tower call and resamples them.

        pixel_values: (B, N, 3, H, W), image_mask: (B, N); context_pixel_values: (B, P, 3, H, W),
        context_mask: (B, P). Returns image latents (B, N, L, D) and context latents (B, P, L, D),
        zeros where padded, or `None` for an absent input.
        """
        # without a mask every slot is real: no gather (this also keeps the path shape-only, e.g. on the meta device)
        groups = [
            v.flatten(0, 1) if m is None else v[m]
            for v, m in ((pixel_values, image_mask), (context_pixel_values, context_mask))
            if v is not None
        ]
        frames = torch.cat(groups)  # (M, 3, H, W)
        dtype = self.vision_tower.dtype
        features = self._patch_features(self.vision_tower(pixel_values=frames.to(dtype))) if len(frames) else None
        outputs, start = [], 0
        for values, mask, resampler in (
            (pixel_values, image_mask, self.image_resampler),
            (context_pixel_values, context_mask, self.context_resampler),
        ):
            if values is None:
                outputs.append(None)
                continue
            shape = (*values.shape[:2], self.config.num_latents, self.config.vision_config.hidden_size)
            count = values.shape[0] * values.shape[1] if mask is None else int(mask.sum())
            if mask is None:
                latents = (
                    resampler(features[start : start + count]).view(shape)
                    if count
                    else values.new_zeros(shape, dtype=dtype)
                )
            else:
                latents = values.new_zeros(shape, dtype=dtype)
                if count:
                    latents = latents.masked_scatter(mask[..., None, None], resampler(features[start : start + count]))
            outputs.append(latents)
            start += count
        return outputs[0], outputs[1]

    def encode_media(
        self,
        pixel_values: torch.FloatTensor | None = None,
        image_mask: torch.BoolTensor | None = None,
        context_pixel_values: torch.FloatTensor | None = None,
        context_mask: torch.BoolTensor | None = None,
        image_latents_mask: torch.BoolTensor | None = None,
    ) -> MediaMemory:
        """Images and rendered pages -> the `MediaMemory` the cross-attention reads: encode a document once and pass
        the result as `media=` to `forward` or `generate` for as many prompts as you like (a memory of one sample
        serves a batch of prompts). Not changed by those calls. Arguments as in `forward`."""
        if pixel_values is None and context_pixel_values is None:
            raise ValueError("pixel_values: pass images (pixel_values) or rendered pages (context_pixel_values)")
        batch_size = (pixel_values if pixel_values is not None else context_pixel_values).shape[0]
        image_mask, context_mask, image_latents_mask = check_media_inputs(
            self.config, batch_size, pixel_values, image_mask, context_pixel_values, context_mask, image_latents_mask
        )
        return self._encode(pixel_values, image_mask, context_pixel_values, context_mask, image_latents_mask)[0]

    def _encode(self, pixel_values, image_mask, context_pixel_values, context_mask, image_latents_mask):
        """(MediaMemory, context latents (B, P, L, D) or None) from checked media inputs."""
        image_latents, context_latents = self.resample_media(
            pixel_values, image_mask, context_pixel_values, context_mask
        )
        if pixel_values is not None and image_mask is None:
            image_mask = pixel_values.new_ones(pixel_values.shape[:2], dtype=torch.bool)
        if context_pixel_values is not None and context_mask is None:
            context_mask = context_pixel_values.new_ones(context_pixel_values.shape[:2], dtype=torch.bool)
        if image_mask is not None and image_latents_mask is not None:
            image_mask = image_mask & image_latents_mask  # the images whose latents are kept
        memory = build_media_memory(image_latents, image_mask, context_latents, context_mask, self.config.latent_fusion)
        return memory, context_latents

    def _chunk_ids(self, input_ids, inputs_embeds, past_chunk_ids) -> torch.LongTensor:
        if input_ids is not None:
            is_image = input_ids == self.config.image_token_id
        else:
            image_embedding = self.get_input_embeddings()(
                torch.tensor([[self.config.image_token_id]], device=inputs_embeds.device)
            )
            is_image = (inputs_embeds == image_embedding).all(dim=-1)
        chunk_ids = is_image.long().cumsum(dim=1)
        if past_chunk_ids is not None:
            chunk_ids = chunk_ids + past_chunk_ids[:, None]
        return chunk_ids

    @can_return_tuple
    @accepts_past_key_values
    @add_start_docstrings_to_model_forward(MODEL_INPUTS_DOCSTRING)
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        image_mask: torch.BoolTensor | None = None,
        context_pixel_values: torch.FloatTensor | None = None,
        context_mask: torch.BoolTensor | None = None,
        image_latents_mask: torch.BoolTensor | None = None,
        media: MediaMemory | None = None,
        media_key_values: tuple | None = None,
        past_chunk_ids: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> VisInContextModelOutputWithPast:
        pixels = (pixel_values, image_mask, context_pixel_values, context_mask, image_latents_mask)
        pixels = check_inputs(
            self.config, input_ids, inputs_embeds, attention_mask, cache, media, media_key_values, *pixels
        )
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        chunk_ids = self._chunk_ids(input_ids, inputs_embeds, past_chunk_ids)
        context_latents = None
        if media is not None:
            media = media.for_batch(inputs_embeds.shape[0])
        elif pixel_values is not None or context_pixel_values is not None:
            media, context_latents = self._encode(*pixels)
        # each block projects the memory once (images and pages, not chunk copies) into `projected_media`
        fresh = media is not None and media_key_values is None
        projected_media = [None] * len(self.config.cross_attention_layers) if fresh else None
        readable = None if media is None else media.readable(chunk_ids, self.config.only_attend_immediate_media)
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            media=media,
            media_key_values=media_key_values,
            media_attention_mask=readable,
            projected_media=projected_media,
            **{self.language_model_cache_argument: cache},
            **({"output_attentions": output_attentions} if output_attentions is not None else {}),
            **kwargs,
        )
        return VisInContextModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            media=media,
            media_key_values=media_key_values if projected_media is None else tuple(projected_media),
            chunk_ids=chunk_ids,
            context_latents=context_latents,
        )


class VisInContextForConditionalGeneration(VisInContextPreTrainedModel, GenerationMixin):
    """VisInContext with a language-modeling head, the contrastive loss and `generate`."""

    # `loss` sums per-batch means (LM and contrastive): Trainer must not pass `num_items_in_batch`, which would
    # normalise the LM term over all processes and accumulation steps and then scale the whole loss (the contrastive
    # term too) back up by the number of processes.
    accepts_loss_kwargs = False

    def __init__(
        self,
        config: VisInContextConfig,
        vision_tower: PreTrainedModel | None = None,
        language_model: PreTrainedModel | None = None,
    ):
        """`vision_tower` / `language_model`: pretrained backbones to build around, the latter a causal LM whose
        output projection becomes the head's (see `from_backbones`); by default both are built from `config`."""
        super().__init__(config)
        body = None if language_model is None else language_model.get_decoder()
        self.model = VisInContextModel(config, vision_tower=vision_tower, language_model=body)
        self._tied_weights_keys = tied_embedding_keys(self.model.language_model)
        text_config = config.text_config
        self.lm_head = MediaTokenLMHead(
            text_config.hidden_size, text_config.vocab_size, config.media_token_ids, config.output_vocab_size
        )
        if language_model is not None:
            self.lm_head.weight = language_model.get_output_embeddings().weight
        self.contrastive_head = TextCentricContrastiveHead(config)
        # reading objective: each context latent spells out the characters of its page cells
        self.reading_head = ReadingHead(config) if config.reading_loss_weight > 0 else None
        self.post_init()
        self._freeze_backbones()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_image_features(self, pixel_values: torch.FloatTensor, **kwargs):
        return self.model.get_image_features(pixel_values=pixel_values, **kwargs)

    def encode_media(self, **media_inputs) -> MediaMemory:
        """`VisInContextModel.encode_media`: encode a document (pages, images) once, then `generate(..., media=memory)`
        for each question about it."""
        return self.model.encode_media(**media_inputs)

    @can_return_tuple
    @accepts_past_key_values
    @add_start_docstrings_to_model_forward(HEAD_INPUTS_DOCSTRING)
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        image_mask: torch.BoolTensor | None = None,
        context_pixel_values: torch.FloatTensor | None = None,
        context_mask: torch.BoolTensor | None = None,
        image_latents_mask: torch.BoolTensor | None = None,
        context_input_ids: torch.LongTensor | None = None,
        context_attention_mask: torch.Tensor | None = None,
        context_reading_targets: torch.LongTensor | None = None,
        media: MediaMemory | None = None,
        media_key_values: tuple | None = None,
        past_chunk_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> VisInContextCausalLMOutputWithPast:
        check_objective_inputs(
            input_ids if input_ids is not None else inputs_embeds, labels, context_input_ids, context_attention_mask
        )
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            image_mask=image_mask,
            context_pixel_values=context_pixel_values,
            context_mask=context_mask,
            image_latents_mask=image_latents_mask,
            media=media,
            media_key_values=media_key_values,
            past_chunk_ids=past_chunk_ids,
            use_cache=use_cache,
            output_attentions=output_attentions,
            **kwargs,
        )
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, slice_indices, :])

        context = (context_mask, context_input_ids, context_attention_mask, context_reading_targets)
        parts = self._loss_parts(outputs, logits, labels, *context, **kwargs)
        passed_on = {name: getattr(outputs, name) for name in HEAD_OUTPUTS_FROM_MODEL}
        return VisInContextCausalLMOutputWithPast(
            loss=weighted_loss(parts, self.config), logits=logits, **parts, **passed_on
        )

    def _loss_parts(
        self,
        outputs,
        logits,
        labels,
        context_mask,
        context_input_ids,
        context_attention_mask,
        reading_targets,
        **kwargs,
    ) -> dict[str, torch.Tensor]:
        """The parts of the loss the inputs allow (`LOSS_WEIGHTS`' names): next-token cross-entropy with labels, the
        contrastive loss with pages and their text as tokens, the reading loss with pages and reading targets."""
        parts = {}
        if labels is not None:
            parts["lm_loss"] = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.output_vocab_size, **kwargs
            )
        context_latents = outputs.context_latents
        if context_latents is not None and context_input_ids is not None:
            if context_mask is None:
                context_mask = torch.ones(context_latents.shape[:2], dtype=torch.bool, device=context_latents.device)
            layer = self.config.contrastive_text_layer
            parts["contrastive_loss"] = self.contrastive_head.loss(
                self.model.language_model,
                self.config.text_config.num_hidden_layers // 2 if layer is None else layer,
                context_latents,
                context_mask,
                context_input_ids,
                context_attention_mask,
            )
        if context_latents is not None and reading_targets is not None and self.reading_head is not None:
            parts["reading_loss"] = self.reading_head.loss(context_latents, reading_targets)
        return parts

    # ---- generation: encode images and pages once, at prefill --------------------------------------

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        media_key_values: tuple | None = None,
        media: MediaMemory | None = None,
        past_chunk_ids: torch.LongTensor | None = None,
        context_pixel_values: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        image_latents_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> dict[str, Any]:
        """The library's preparation (slicing to the new tokens, cache, masks), plus the media: raw images and pages
        at prefill (or a `media` memory encoded beforehand), the memory projected at prefill (`media_key_values`) at
        every later step. The KV cache arrives as
        `cache` or `past_key_values`, whichever the installed transformers passes."""
        model_inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        if media_key_values is None:  # prefill: encode the media (or use the `media` given)
            model_inputs.update(
                media=media,
                context_pixel_values=context_pixel_values,
                context_mask=context_mask,
                image_mask=image_mask,
                image_latents_mask=image_latents_mask,
            )
            return model_inputs
        # later steps reuse the memory from the prefill; raw media are not sent again
        model_inputs.pop("pixel_values", None)
        cache = _one_cache(kwargs.get("cache"), kwargs.get("past_key_values"))
        cached = cache is not None and cache.get_seq_length() > 0
        model_inputs.update(
            media_key_values=media_key_values,
            media=media,
            past_chunk_ids=past_chunk_ids if cached else None,
        )
        return model_inputs

    # Carries the prefill's projected memory and the last token's chunk to the next decoding step. A private hook of
    # GenerationMixin, overridden the same way by transformers' own IDEFICS and Mllama (no public alternative);
    # tests/test_compatibility.py pins its signature and test_modeling.py that media are encoded once per `generate`.
    def _update_model_kwargs_for_generation(
        self,
        outputs: ModelOutput,
        model_kwargs: dict[str, Any],
        is_encoder_decoder: bool = False,
        num_new_tokens: int = 1,
    ) -> dict[str, Any]:
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        if outputs.media_key_values is not None:  # the projected memory: later steps skip encoding and projecting
            model_kwargs["media_key_values"] = outputs.media_key_values
            model_kwargs["media"] = outputs.media
        model_kwargs["past_chunk_ids"] = outputs.chunk_ids[:, -1]
        return model_kwargs

    # ---- building from pretrained backbones ---------------------------------------------------------

    @classmethod
    def from_backbones(
        cls,
        vision_model: str,
        language_model: str,
        *,
        vision_model_kwargs: dict | None = None,
        language_model_kwargs: dict | None = None,
        **config_kwargs,
    ) -> "VisInContextForConditionalGeneration":
        """Builds a model around pretrained backbones (Hub ids or local folders, real `from_pretrained`).

        The vision tower and language model keep their pretrained weights; resamplers, cross-attention,
        media-token rows and contrastive heads are freshly initialised. `<image>` and `<|endofchunk|>`
        take the ids the language model's tokenizer gives them (as `VisInContextProcessor.from_backbones`
        does). Extra keyword arguments go to `VisInContextConfig` (e.g. `cross_attention_every=4`).
        `language_model_kwargs` go to the LM's `from_pretrained` (e.g. `gguf_file`, `dtype`).

        `attn_implementation` works as in `from_pretrained`: a string for every part, or a dict keyed by `""` (the
        resamplers and cross-attention), `"vision_config"` and `"text_config"`; each backbone otherwise gets the
        library's default (SDPA where it can run), as its own `from_pretrained` gives it.
        """
        config, vision_tower, causal_lm, tokenizer = load_backbones(
            vision_model, language_model, vision_model_kwargs, language_model_kwargs, config_kwargs
        )
        return build_around_backbones(cls, config, vision_tower, causal_lm, tokenizer)


__all__ = [
    "VisInContextPreTrainedModel",
    "VisInContextModel",
    "VisInContextForConditionalGeneration",
    "VisInContextModelOutputWithPast",
    "VisInContextCausalLMOutputWithPast",
    "MediaMemory",
    "build_media_memory",
]
