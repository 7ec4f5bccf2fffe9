# Copyright 2026 The visincontext authors. Licensed under the Apache License, Version 2.0.
"""Convert an OpenFlamingo checkpoint into a VisInContext folder for transformers.

OpenFlamingo's `checkpoint.pt` holds the parts it trained (the Perceiver resampler, the gated cross-attention blocks,
the language model's token embedding with `<|endofchunk|>` and `<image>`); the vision tower and the language model
come from their own repositories. This script loads those two as transformers models, maps the checkpoint onto the
package's modules, and writes a Hub-ready folder (`prepare_repo`):

    visincontext-convert-openflamingo --checkpoint_path FOLDER_OR_checkpoint.pt \\
        --vision_model openai/clip-vit-large-patch14 --language_model LM_FOLDER \\
        --cross_attn_every_n_layers 4 --output_dir converted

Every checkpoint key maps somewhere or is an error that names it: the new modules' weights are loaded, the
embedding rows replace the language model's, and a copy of a frozen language-model weight must equal the one in
`--language_model`. The converted model reads images as OpenFlamingo does (`vision_features="normed_patches"`,
`only_attend_immediate_media=True`); with no context it computes what the OpenFlamingo model computes.
"""

import argparse
import re
import sys
from pathlib import Path

import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoTokenizer, PreTrainedConfig

from .backbones_visincontext import build_around_backbones, decoder_layers_name, load_vision_tower
from .configuration_visincontext import END_OF_CHUNK_TOKEN, IMAGE_TOKEN, VisInContextConfig
from .modeling_visincontext import VisInContextForConditionalGeneration
from .processing_visincontext import VisInContextProcessor

OPENFLAMINGO_NUM_HEADS = 8  # helpers.py builds the resampler and the cross-attention with 8 heads (of 64)
CONTEXT_RESAMPLER_STARTS = ("image", "fresh")

_RESAMPLER = re.compile(
    r"perceiver\.(latents|norm\.(?:weight|bias)|layers\.\d+\.0\.(?:norm_media|norm_latents)\.(?:weight|bias)"
    r"|layers\.\d+\.0\.(?:to_q|to_kv|to_out)\.weight|layers\.\d+\.1\.0\.(?:weight|bias)|layers\.\d+\.1\.[13]\.weight)"
)
_BLOCK_PART = {  # OpenFlamingo's GatedCrossAttentionBlock -> the package's
    r"attn\.(norm\.(?:weight|bias)|to_q\.weight|to_kv\.weight|to_out\.weight)": r"cross_attention.\1",
    r"(attn_gate|ff_gate)": r"\1",
    r"ff\.(0\.(?:weight|bias)|[13]\.weight)": r"feed_forward.\1",
}
_UNSUPPORTED = {
    "perceiver.media_time_embs": "the resampler was built with `max_num_media` (time embeddings per image)",
    "perceiver.frame_embs": "the resampler was built with `max_num_frames` (video frame embeddings)",
}


def load_openflamingo_state_dict(checkpoint_path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights of an OpenFlamingo `checkpoint.pt` (a released one, or a training checkpoint with its
    `model_state_dict`), or of a folder holding one. Loaded with `weights_only=True`: no code is unpickled."""
    path = Path(checkpoint_path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise ValueError(f"checkpoint_path: no OpenFlamingo checkpoint at {str(path)!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (pickle raises anything; the message says which file)
        raise ValueError(f"checkpoint_path: {str(path)!r} cannot be read ({type(error).__name__}: {error})") from None
    if isinstance(state, dict) and isinstance(state.get("model_state_dict"), dict):
        state = state["model_state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint_path: {str(path)!r} holds no state dict of tensors")
    if all(key.startswith("module.") for key in state):  # saved from DistributedDataParallel
        state = {key[len("module.") :]: value for key, value in state.items()}
    return state


def openflamingo_tokenizer(language_model: str, **kwargs):
    """The LM's tokenizer with OpenFlamingo's tokens, added as its factory adds them (so their ids are the rows of
    the checkpoint's embedding): `<|endofchunk|>`, `<image>`, then `<PAD>` if the tokenizer has no pad token."""
    tokenizer = AutoTokenizer.from_pretrained(language_model, **kwargs)
    tokenizer.add_tokens([END_OF_CHUNK_TOKEN, IMAGE_TOKEN], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    return tokenizer


def check_language_model(language_model: str, **kwargs) -> None:
    """Refuses, before anything is loaded or any code run, a language model the converted model could not compute as
    OpenFlamingo did: remote code (no transformers class to save it under), and MPT attention that transformers' MPT
    does not implement. OpenFlamingo-3B-vitl-mpt1b's MPT-1B is both: `MosaicGPT` remote code, with QK LayerNorm."""
    config, _ = PreTrainedConfig.get_config_dict(language_model, **kwargs)
    model_type = config.get("model_type")
    attention = config.get("attn_config") or {}
    qk_layernorm = config.get("attn_qk_ln") or attention.get("qk_ln")
    if model_type == "mosaic_gpt" or (model_type == "mpt" and qk_layernorm):
        raise ValueError(
            f"language_model: {language_model!r} is an MPT with QK LayerNorm"
            + (" (MosaicGPT remote code, as OpenFlamingo-3B-vitl-mpt1b's MPT-1B)" if model_type == "mosaic_gpt" else "")
            + ", which transformers' MPT does not compute: its converted model would not be OpenFlamingo's"
        )
    if model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"language_model: {language_model!r} has model type {model_type!r}, which transformers does not define "
            "(remote code): convert with a language model of a transformers class"
        )
    if model_type == "mpt" and attention.get("attn_type", "multihead_attention") != "multihead_attention":
        raise ValueError(
            f"language_model: {language_model!r} uses MPT's {attention['attn_type']!r}, which transformers' MPT does "
            "not compute"
        )


def _cross_attention_layers(state: dict, layers_path: str, language_model_name: str) -> list[int]:
    found, paths = set(), set()
    for key in state:
        if match := re.match(r"lang_encoder\.(.+)\.(\d+)\.gated_cross_attn_layer\.", key):
            paths.add(match[1])
            found.add(int(match[2]))
        elif match := re.match(r"lang_encoder\.gated_cross_attn_layers\.(\d+)\.", key):
            found.add(int(match[1]))
    if paths - {layers_path}:
        raise ValueError(
            f"language_model: the checkpoint's cross-attention sits in the decoder layers `{sorted(paths)[0]}`, but "
            f"{language_model_name} keeps them in `{layers_path}`: convert with the language model it was trained "
            "with (the package wraps decoder stacks that keep their layers in `layers` (Llama, Mistral, Qwen2, "
            "GPT-NeoX, ...) or `blocks` (transformers' MPT))"
        )
    if not found:
        raise ValueError("checkpoint_path: no gated cross-attention block (`gated_cross_attn_layer`) in the checkpoint")
    return sorted(found)


def map_openflamingo_key(key: str, layers_path: str) -> tuple[str, str] | None:
    """An OpenFlamingo key -> `("model", key in the package's model)` for the trained modules, `("lm", key in the
    language model's state dict)` for a weight of the language model, or `None` when it maps nowhere."""
    if match := _RESAMPLER.fullmatch(key):
        return "model", f"model.image_resampler.{match[1]}"
    path = re.escape(layers_path)
    block = rf"lang_encoder\.(?:{path}\.(\d+)\.gated_cross_attn_layer|gated_cross_attn_layers\.(\d+))\."
    if match := re.match(block, key):
        layer, rest = match[1] or match[2], key[match.end() :]
        for pattern, replacement in _BLOCK_PART.items():
            if re.fullmatch(pattern, rest):
                part = re.sub(pattern, replacement, rest)
                wrapped = layers_path.rsplit(".", 1)[-1]  # the package keeps the LM's own name for its layers
                return "model", f"model.language_model.{wrapped}.{layer}.gated_cross_attention.{part}"
        return None
    decoder = rf"lang_encoder\.(?:{re.escape(layers_path)}\.(\d+)\.decoder_layer|old_decoder_blocks\.(\d+))\.(.+)"
    if match := re.fullmatch(decoder, key):
        return "lm", f"{layers_path}.{match[1] or match[2]}.{match[3]}"
    if key.startswith("lang_encoder."):
        return "lm", key[len("lang_encoder.") :]
    return None


def _weight_name(model: torch.nn.Module, module: torch.nn.Module | None) -> str | None:
    """The state-dict name of `module`'s weight inside `model` (its embedding or output head), or None."""
    return next((f"{name}.weight" for name, m in model.named_modules(remove_duplicate=False) if m is module), None)


def convert_openflamingo_checkpoint(
    checkpoint_path: str | Path,
    vision_model: str,
    language_model: str,
    cross_attn_every_n_layers: int | None = None,
    *,
    context_resampler: str = "image",
    num_heads: int = OPENFLAMINGO_NUM_HEADS,
    dtype: torch.dtype | str | None = None,
) -> tuple[VisInContextForConditionalGeneration, VisInContextProcessor, list[str]]:
    """An OpenFlamingo checkpoint as a VisInContext model and processor, and notes on what could not be carried over.

    checkpoint_path: `checkpoint.pt` or a folder with it. vision_model: the CLIP tower it was trained with, as a
    transformers folder or Hub id (OpenCLIP's `ViT-L-14` "openai" is `openai/clip-vit-large-patch14`).
    language_model: the causal LM it was trained with (a transformers folder or Hub id). cross_attn_every_n_layers:
    as in OpenFlamingo (read from the checkpoint when not given; checked when given). context_resampler: the
    in-context text resampler starts as a copy of the converted image resampler ("image") or freshly initialised
    ("fresh"); the contrastive head is always fresh.
    """
    for name, value in (("vision_model", vision_model), ("language_model", language_model)):
        if not isinstance(value, str):
            raise TypeError(f"{name}: expected a Hub id or a local folder (str), got {type(value).__name__}")
    if not isinstance(checkpoint_path, (str, Path)):
        raise TypeError(f"checkpoint_path: expected a path (str or Path), got {type(checkpoint_path).__name__}")
    if context_resampler not in CONTEXT_RESAMPLER_STARTS:
        raise ValueError(f"context_resampler: expected one of {CONTEXT_RESAMPLER_STARTS}, got {context_resampler!r}")
    if cross_attn_every_n_layers is not None and (
        not isinstance(cross_attn_every_n_layers, int)
        or isinstance(cross_attn_every_n_layers, bool)
        or cross_attn_every_n_layers < 1
    ):
        raise ValueError(f"cross_attn_every_n_layers: expected a positive integer, got {cross_attn_every_n_layers!r}")
    check_language_model(language_model)  # before the checkpoint (gigabytes) is read
    state = load_openflamingo_state_dict(checkpoint_path)
    unsupported = [f"{key}: {why}" for key, why in _UNSUPPORTED.items() if key in state]
    if unsupported:
        raise ValueError("checkpoint_path: not supported by the package's resampler: " + "; ".join(unsupported))
    tokenizer = openflamingo_tokenizer(language_model)
    causal_lm = AutoModelForCausalLM.from_pretrained(language_model, **({"dtype": dtype} if dtype else {}))
    vision_tower = load_vision_tower(vision_model, dtype=causal_lm.dtype)
    layers_name = decoder_layers_name(causal_lm.get_decoder())
    layers_path = f"{causal_lm.base_model_prefix}.{layers_name}"
    layers = _cross_attention_layers(state, layers_path, type(causal_lm).__name__)  # first: the path the keys use
    lm_state = causal_lm.state_dict()
    input_embedding = _weight_name(causal_lm, causal_lm.get_input_embeddings())
    output_embedding = _weight_name(causal_lm, causal_lm.get_output_embeddings())

    # every key maps, or the conversion stops naming the ones that do not
    converted, embedding_rows, errors = {}, {}, []
    for key, value in state.items():
        target = map_openflamingo_key(key, layers_path)
        if target is None or (target[0] == "lm" and target[1] not in lm_state):
            hint = " (vision-encoder weights: the tower comes from --vision_model)" if key.startswith("vision_") else ""
            errors.append(f"{key}: maps to no weight of the package's model{hint}")
            continue
        kind, name = target
        if kind == "lm" and name in (input_embedding, output_embedding):
            embedding_rows[name] = value
        elif kind == "lm":
            if value.shape != lm_state[name].shape or not torch.equal(value.to(lm_state[name].dtype), lm_state[name]):
                errors.append(f"{key}: differs from {language_model!r}'s {name} (trained with another language model?)")
        elif name in converted and not torch.equal(converted[name], value):
            errors.append(f"{key}: a second copy of {name} with other values")
        else:
            converted[name] = value
    if errors:
        shown = "; ".join(errors[:8]) + (f"; and {len(errors) - 8} more" if len(errors) > 8 else "")
        raise ValueError(f"checkpoint_path: {len(errors)} key(s) cannot be converted: {shown}")
    if input_embedding not in embedding_rows:
        raise ValueError(f"checkpoint_path: no token embedding (lang_encoder.{input_embedding}) in the checkpoint")
    rows = embedding_rows[input_embedding].shape[0]
    if rows != len(tokenizer):
        raise ValueError(
            f"checkpoint_path: its token embedding has {rows} rows, but {language_model!r}'s tokenizer with "
            f"OpenFlamingo's tokens has {len(tokenizer)}: convert with the tokenizer it was trained with"
        )

    # the shapes OpenFlamingo built, read from the weights
    every = layers[0] + 1
    expected = [i for i in range(causal_lm.config.num_hidden_layers) if (i + 1) % every == 0]
    if layers != expected or (cross_attn_every_n_layers is not None and cross_attn_every_n_layers != every):
        raise ValueError(
            f"cross_attn_every_n_layers: the checkpoint has cross-attention before decoder layers {layers}, "
            f"{'which is no regular placement' if layers != expected else f'every {every} layers'}"
            + (f", not every {cross_attn_every_n_layers}" if cross_attn_every_n_layers is not None else "")
        )
    latents = converted["model.image_resampler.latents"]
    inner = converted["model.image_resampler.layers.0.0.to_q.weight"].shape[0]
    block = f"model.language_model.{layers_name}.{layers[0]}.gated_cross_attention"
    cross_inner = converted[f"{block}.cross_attention.to_q.weight"]
    if latents.shape[1] != vision_tower.config.hidden_size:
        raise ValueError(
            f"vision_model: the checkpoint's resampler reads {latents.shape[1]}-wide features, the tower gives "
            f"{vision_tower.config.hidden_size}"
        )
    config = VisInContextConfig(
        vision_config=vision_tower.config,
        text_config=causal_lm.config,
        num_latents=latents.shape[0],
        resampler_depth=len({k.split(".")[3] for k in converted if k.startswith("model.image_resampler.layers.")}),
        resampler_num_heads=num_heads,
        resampler_head_dim=inner // num_heads,
        resampler_ff_mult=converted["model.image_resampler.layers.0.1.1.weight"].shape[0] // latents.shape[1],
        cross_attention_every=every,
        cross_attention_num_heads=num_heads,
        cross_attention_head_dim=cross_inner.shape[0] // num_heads,
        cross_attention_ff_mult=converted[f"{block}.feed_forward.1.weight"].shape[0] // causal_lm.config.hidden_size,
        only_attend_immediate_media=True,
        vision_features="normed_patches",
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        end_of_chunk_token_id=tokenizer.convert_tokens_to_ids(END_OF_CHUNK_TOKEN),
    )
    model = build_around_backbones(VisInContextForConditionalGeneration, config, vision_tower, causal_lm, tokenizer)
    if model.get_input_embeddings().num_embeddings != rows:  # OpenFlamingo resized the LM to len(tokenizer)
        model.resize_token_embeddings(rows, mean_resizing=False)

    trained = ("model.image_resampler.", "gated_cross_attention.")
    required = [k for k in model.state_dict() if k.startswith(trained[0]) or trained[1] in k]
    missing = [k for k in required if k not in converted]
    if missing:
        raise ValueError(f"checkpoint_path: lacks {len(missing)} weight(s) the model needs, e.g. {missing[:4]}")
    _, unexpected = model.load_state_dict(converted, strict=False)
    if unexpected:  # cannot happen when the key map is right: a bug, not a checkpoint problem
        raise RuntimeError(f"converted keys the model does not have: {unexpected[:4]}")

    notes = []
    media_rows = list(config.media_token_ids)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    with torch.no_grad():
        embedding.weight.copy_(embedding_rows[input_embedding])
        embedding.media_embedding.weight.copy_(embedding_rows[input_embedding][media_rows])
        if output_embedding in embedding_rows and not config.tie_word_embeddings:
            head.weight.copy_(embedding_rows[output_embedding])
            head.media_head.weight.copy_(embedding_rows[output_embedding][media_rows])
        elif config.tie_word_embeddings:  # OpenFlamingo's logits for its tokens came from their embedding rows
            if output_embedding in embedding_rows and not torch.equal(
                embedding_rows[output_embedding], embedding_rows[input_embedding]
            ):
                raise ValueError(f"checkpoint_path: lang_encoder.{output_embedding} differs from the tied embedding")
            head.media_head.weight.copy_(embedding_rows[input_embedding][media_rows])
        else:
            notes.append(
                "the checkpoint holds no output rows for <image> and <|endofchunk|> (OpenFlamingo did not save its "
                "untied output embedding): their logits start from fresh rows"
            )
        if context_resampler == "image":
            model.model.context_resampler.load_state_dict(model.model.image_resampler.state_dict())
    start = "as a copy of the image resampler" if context_resampler == "image" else "fresh"
    notes.append(
        f"the in-context text resampler starts {start} and the contrastive head fresh: train them on rendered text "
        "before relying on context"
    )
    processor = VisInContextProcessor.from_backbones(vision_model, language_model, tokenizer=tokenizer)
    return model.eval(), processor, notes


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="visincontext-convert-openflamingo",
        description="Convert an OpenFlamingo checkpoint.pt into a VisInContext folder for transformers.",
    )
    parser.add_argument("--checkpoint_path", required=True, help="OpenFlamingo checkpoint.pt, or a folder with it")
    parser.add_argument("--vision_model", required=True, help="the CLIP tower it was trained with (folder or Hub id)")
    parser.add_argument("--language_model", required=True, help="the causal LM it was trained with (folder or Hub id)")
    parser.add_argument("--cross_attn_every_n_layers", type=int, default=None, help="read from the checkpoint if unset")
    parser.add_argument("--output_dir", required=True, help="folder to write (an existing one needs --overwrite)")
    parser.add_argument("--context_resampler", default="image", choices=CONTEXT_RESAMPLER_STARTS)
    parser.add_argument("--num_heads", type=int, default=OPENFLAMINGO_NUM_HEADS, help="OpenFlamingo's: 8")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--license", default="mit", help="the checkpoint's licence (OpenFlamingo's releases: mit)")
    parser.add_argument("--repo_id", default="your-name/visincontext-openflamingo")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if args.num_heads < 1:
        parser.error(f"--num_heads: expected a positive integer, got {args.num_heads}")
    if Path(args.output_dir).exists() and not args.overwrite:
        parser.error(f"--output_dir: {args.output_dir!r} exists; pass --overwrite to replace it")
    return args


def main(argv=None) -> int:
    from .hub import prepare_repo

    args = parse_args(argv)
    try:
        print(f"converting {args.checkpoint_path} ...", file=sys.stderr)
        model, processor, notes = convert_openflamingo_checkpoint(
            args.checkpoint_path,
            args.vision_model,
            args.language_model,
            args.cross_attn_every_n_layers,
            context_resampler=args.context_resampler,
            num_heads=args.num_heads,
            dtype=args.dtype,
        )
        provenance = (
            f"Converted from the OpenFlamingo checkpoint `{args.checkpoint_path}` (vision tower `{args.vision_model}`, "
            f"language model `{args.language_model}`, cross-attention every {model.config.cross_attention_every} "
            f"layers) with `visincontext-convert-openflamingo`. The weights keep the checkpoint's licence "
            f"({args.license}) and those of the two backbones. Notes: " + "; ".join(notes) + "."
        )
        prepare_repo(
            model,
            processor,
            args.output_dir,
            repo_id=args.repo_id,
            overwrite=args.overwrite,
            base_models=[args.vision_model, args.language_model],
            license=args.license,
            tags=["openflamingo"],
            provenance=provenance,
        )
    except (ValueError, TypeError, OSError) as error:
        print(f"visincontext-convert-openflamingo: error: {error}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
