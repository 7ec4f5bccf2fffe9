# Copyright 2026 The visincontext authors. Licensed under the Apache License, Version 2.0.
"""What the model does with its two backbones: loads them (`load_backbones`, `load_vision_tower`), gives each an
attention implementation, wraps the language model's decoder layers with the gated cross-attention blocks and its
embedding with the media tokens' rows, and finishes a model built around them (`build_around_backbones`)."""

import copy
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .configuration_visincontext import END_OF_CHUNK_TOKEN, IMAGE_TOKEN, VisInContextConfig
from .cross_attention_visincontext import GatedCrossAttentionBlock, VisInContextDecoderLayer, relay_media_arguments
from .embeddings_visincontext import MediaTokenEmbedding


def resolve_attention(backbone: PreTrainedModel) -> None:
    """Gives a backbone whose config has no attention implementation the one its own `__init__` would pick (SDPA
    where it can run, eager otherwise). A config with `None` there makes transformers' attention run unmasked: a
    backbone built from one config and placed under another (e.g. `VisInContextConfig(text_config=lm.config)` with
    `attn_implementation=None`) can end up so."""
    if backbone.config._attn_implementation is not None:
        return
    try:
        backbone.set_attn_implementation("sdpa")
    except (ValueError, ImportError):
        backbone.set_attn_implementation("eager")


def vision_body(vision_tower: nn.Module) -> nn.Module:
    """A CLIP-like tower's transformer (`vision_model` in older transformers, the tower itself in newer)."""
    return getattr(vision_tower, "vision_model", vision_tower)


def has_class_token_and_post_layernorm(vision_tower: nn.Module) -> bool:
    body = vision_body(vision_tower)
    return hasattr(body, "post_layernorm") and hasattr(getattr(body, "embeddings", None), "class_embedding")


# Where a decoder stack keeps its layers, and whether it calls them with a fixed set of arguments (so that the media
# keyword arguments must be relayed to them): `layers` (Llama, Mistral, Qwen2, GPT-NeoX, ...: v5 stacks hand their
# keyword arguments to every layer) or `blocks` (transformers' MPT, which does not).
DECODER_LAYER_LISTS = {"layers": False, "blocks": True}


def decoder_layers_name(language_model: nn.Module) -> str:
    """The attribute of `language_model` (a decoder stack) that holds its decoder layers."""
    for name in DECODER_LAYER_LISTS:
        if isinstance(getattr(language_model, name, None), nn.ModuleList):
            return name
    raise ValueError(
        f"text_config: {type(language_model).__name__} keeps no ModuleList of decoder layers named "
        f"{' or '.join(f'`{name}`' for name in DECODER_LAYER_LISTS)}"
    )


def wrap_language_model(language_model: PreTrainedModel, config: VisInContextConfig) -> None:
    """Puts a gated cross-attention block before the decoder layers `config.cross_attention_layers` and the media
    tokens' rows into the embedding, in place."""
    name = decoder_layers_name(language_model)
    if not config.cross_attention_layers:
        raise ValueError(
            f"cross_attention_every: {config.cross_attention_every} leaves no cross-attention layer in a "
            f"{config.text_config.num_hidden_layers}-layer language model"
        )
    positions = {layer: position for position, layer in enumerate(sorted(config.cross_attention_layers))}
    wrapped = nn.ModuleList(
        VisInContextDecoderLayer(layer, GatedCrossAttentionBlock(config), positions[i])
        if i in positions
        else VisInContextDecoderLayer(layer, None, None)
        for i, layer in enumerate(getattr(language_model, name))
    )
    setattr(language_model, name, wrapped)
    if DECODER_LAYER_LISTS[name]:
        relay_media_arguments(language_model)
    old = language_model.get_input_embeddings()
    embedding = MediaTokenEmbedding(old.num_embeddings, old.embedding_dim, config.media_token_ids, old.padding_idx)
    embedding.weight = old.weight  # keep the LM's (already initialised) vocabulary
    language_model.set_input_embeddings(embedding)
    # Tensor parallelism shards the decoder layers as the LM's plan says (they now sit one level deeper); the
    # media-token embedding and head, and the new blocks, stay replicated (not written for sharded weights).
    language_model.tp_plan = {
        key.replace(f"{name}.*.", f"{name}.*.decoder_layer."): value
        for key, value in (language_model.tp_plan or {}).items()
        if key != "embed_tokens"
    }


def tied_embedding_keys(language_model: nn.Module) -> dict[str, str]:
    """The head's weights tied to the wrapped LM's embedding (`_tied_weights_keys`), under the name that LM gives its
    embedding (`embed_tokens`, `embed_in`, MPT's `wte`)."""
    embedding = language_model.get_input_embeddings()
    name = next(n for n, m in language_model.named_modules() if m is embedding)
    prefix = f"model.language_model.{name}"
    return {"lm_head.weight": f"{prefix}.weight", "lm_head.media_head.weight": f"{prefix}.media_embedding.weight"}


def load_vision_tower(name_or_path: str, **kwargs) -> PreTrainedModel:
    """Loads the vision half of a checkpoint (a CLIP/SigLIP dual encoder or a vision-only model)."""
    config = AutoConfig.from_pretrained(name_or_path, **{k: v for k, v in kwargs.items() if k in ("revision", "token")})
    vision_config = getattr(config, "vision_config", config)
    return AutoModel.from_pretrained(name_or_path, config=vision_config, **kwargs)


def load_backbones(vision_model, language_model, vision_model_kwargs, language_model_kwargs, config_kwargs):
    """`from_backbones`' loading: (config, vision tower, causal LM, tokenizer with the media tokens)."""
    for name, value in (("vision_model", vision_model), ("language_model", language_model)):
        if not isinstance(value, str):
            raise TypeError(f"{name}: expected a Hub id or a local folder (str), got {type(value).__name__}")
    vision_model_kwargs, language_model_kwargs = dict(vision_model_kwargs or {}), dict(language_model_kwargs or {})
    attn_implementation = config_kwargs.pop("attn_implementation", None)
    if attn_implementation is not None and not isinstance(attn_implementation, (str, dict)):
        raise TypeError(f"attn_implementation: expected a string or a dict, got {type(attn_implementation).__name__}")
    requested = attn_implementation if isinstance(attn_implementation, dict) else {"": attn_implementation}
    for kwargs, key in ((vision_model_kwargs, "vision_config"), (language_model_kwargs, "text_config")):
        wanted = requested.get(key, requested.get(""))
        if wanted is not None:  # each backbone checks its own (e.g. that flash-attn is installed)
            kwargs.setdefault("attn_implementation", wanted)
    if requested.get("") is not None:
        config_kwargs["attn_implementation"] = {"": requested[""]}
    causal_lm = AutoModelForCausalLM.from_pretrained(language_model, **language_model_kwargs)
    # one dtype for the whole model, the one its saved folder loads back in
    vision_model_kwargs.setdefault("dtype", causal_lm.dtype)
    vision_tower = load_vision_tower(vision_model, **vision_model_kwargs)
    tokenizer_kwargs = {k: v for k, v in language_model_kwargs.items() if k in ("gguf_file", "revision", "token")}
    tokenizer = AutoTokenizer.from_pretrained(language_model, **tokenizer_kwargs)
    tokenizer.add_tokens([IMAGE_TOKEN, END_OF_CHUNK_TOKEN], special_tokens=True)
    text_config = causal_lm.config
    if getattr(text_config, "quantization_config", None) is not None and "gguf_file" in language_model_kwargs:
        del text_config.quantization_config  # dequantised on load: the weights are plain tensors now
    config = VisInContextConfig(
        vision_config=vision_tower.config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        end_of_chunk_token_id=tokenizer.convert_tokens_to_ids(END_OF_CHUNK_TOKEN),
        **config_kwargs,
    )
    return config, vision_tower, causal_lm, tokenizer


def build_around_backbones(model_class, config, vision_tower, causal_lm, tokenizer):
    """`model_class` built around loaded backbones, with the vocabulary of `tokenizer` (`from_backbones`, and the
    OpenFlamingo converter)."""
    # Built around the loaded modules (as transformers' EncoderDecoderModel is): no weights are copied or renamed.
    # The new parts are made in the LM's dtype, as `from_pretrained` makes a model: casting the whole model
    # afterwards would also cast the buffers the LM keeps in float32 (its rotary frequencies).
    with default_dtype(causal_lm.dtype):
        model = model_class(config, vision_tower=vision_tower, language_model=causal_lm)
        if len(tokenizer) > config.text_config.vocab_size:
            # One vocabulary size: every id the tokenizer gives has a row, so that a saved folder's tokenizer and
            # model agree (AutoPeftModel, for one, resizes a model whose embedding is smaller than its tokenizer).
            # The media tokens' rows there are never read: their own trainable rows replace them.
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    config.dtype = causal_lm.dtype
    # generation follows the LM's generation_config.json (its eos, sampling defaults), padded by the tokenizer's
    model.generation_config = copy.deepcopy(causal_lm.generation_config)
    if model.generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    stop_at_end_of_chunk(model.generation_config, config.end_of_chunk_token_id)
    model._freeze_backbones()
    return model.eval()  # as `from_pretrained` returns a model (dropout off until `train()`, as Trainer calls)


@contextmanager
def default_dtype(dtype: torch.dtype):
    """New parameters are made in `dtype` inside (integer and quantised dtypes leave the default as it is)."""
    previous = torch.get_default_dtype()
    if dtype.is_floating_point:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def stop_at_end_of_chunk(generation_config, end_of_chunk_token_id: int) -> None:
    """Adds `<|endofchunk|>` to the end-of-sequence ids: an answer (a chat turn, a few-shot answer) ends its chunk."""
    eos = generation_config.eos_token_id
    eos = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    if end_of_chunk_token_id not in eos:
        generation_config.eos_token_id = eos + [end_of_chunk_token_id]
