"""Starting from OpenFlamingo's weights (issue 39): the converter against open-flamingo's own modules.

The reference is the released `open-flamingo` 2.0.1 package itself, installed with `--no-deps` into a scratch folder
(its pins, torch 2.0.1, do not resolve here). Its `__init__` imports open_clip, which it needs only for its factory;
the modules under test (`helpers`, `flamingo_lm`, `flamingo`, `utils`, `train_utils`) are imported from the installed
files without running that `__init__`. Its factory's steps (tokens, mixin, resize, freezing) are the test's, written
from `factory.py`; an OpenCLIP-like tower (`output_tokens=True`: post-layernorm, class token dropped) wraps a
transformers CLIP tower, as OpenCLIP's ViT-L/14 "openai" is the same network as openai/clip-vit-large-patch14.
"""

import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from model_invariants import check, library_warnings, measure
from tiny import text_config, tiny_config, tiny_tokenizer, vision_config
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    CLIPImageProcessorPil,
    CLIPVisionModel,
    GPTNeoXConfig,
)

from visincontext import VisInContextForConditionalGeneration
from visincontext.convert_openflamingo_weights_to_hf import (
    convert_openflamingo_checkpoint,
    main,
    map_openflamingo_key,
    openflamingo_tokenizer,
    parse_args,
)
from visincontext.cross_attention_visincontext import GatedCrossAttentionBlock, build_media_memory
from visincontext.perceiver_visincontext import PerceiverResampler

# open-flamingo's Flamingo.forward passes `past_key_values=None` to the LM, which transformers >= 5.24 calls `cache`
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

REFERENCE = ["open-flamingo==2.0.1", "einops-exts==0.0.4", "einops>=0.6"]


@pytest.fixture(scope="session")
def open_flamingo(tmp_path_factory):
    """open-flamingo's modules, from the package as released."""
    target = tmp_path_factory.mktemp("open_flamingo_env")
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), *REFERENCE]
    result = subprocess.run(install, capture_output=True, text=True)
    assert result.returncode == 0, f"cannot install the reference {REFERENCE}: {result.stderr[-2000:]}"
    before = set(sys.modules)
    sys.path.insert(0, str(target))
    root = target / "open_flamingo"
    for name, path in (
        ("open_flamingo", root),
        ("open_flamingo.src", root / "src"),
        ("open_flamingo.train", root / "train"),
    ):
        package = types.ModuleType(name)
        package.__path__ = [str(path)]
        sys.modules[name] = package
    sys.modules.setdefault("wandb", types.ModuleType("wandb"))  # train_utils logs with it; not used here
    modules = types.SimpleNamespace(
        **{
            name.split(".")[-1]: importlib.import_module(name)
            for name in (
                "open_flamingo.src.helpers",
                "open_flamingo.src.utils",
                "open_flamingo.src.flamingo_lm",
                "open_flamingo.src.flamingo",
                "open_flamingo.train.train_utils",
            )
        }
    )
    assert Path(modules.helpers.__file__).is_relative_to(target)
    yield modules
    sys.path.remove(str(target))
    for name in set(sys.modules) - before:
        del sys.modules[name]


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight random (layer norms and gates too: a converted 1 or 0 would hide a swapped tensor)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return module


def converted(reference_state: dict, openflamingo_prefix: str, package_prefix: str) -> dict:
    """A reference module's state dict through the converter's key map, relative to the package's module."""
    out = {}
    for key, value in reference_state.items():
        kind, name = map_openflamingo_key(openflamingo_prefix + key, "model.layers")
        assert kind == "model" and name.startswith(package_prefix), (key, name)
        out[name[len(package_prefix) :]] = value
    return out


# ---- the blocks: the package's modules compute what open-flamingo's compute -------------------------------------


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("seed", range(4))
def test_the_resampler_computes_what_openflamingos_computes(open_flamingo, seed, attn_implementation):
    depth, heads, head_dim, latents = 1 + seed % 3, 2 + seed % 2, 8, 3 + seed
    reference = open_flamingo.helpers.PerceiverResampler(
        dim=32, depth=depth, dim_head=head_dim, heads=heads, num_latents=latents
    )
    randomize(reference, seed)
    config = tiny_config(
        resampler_depth=depth, resampler_num_heads=heads, resampler_head_dim=head_dim, num_latents=latents
    )
    config._attn_implementation = attn_implementation
    ours = PerceiverResampler(config)
    ours.load_state_dict(converted(reference.state_dict(), "perceiver.", "model.image_resampler."), strict=True)
    features = torch.randn(5, 1, 1, 9 + seed, 32, generator=torch.Generator().manual_seed(100 + seed))
    expected = reference(features)[:, 0]  # (b, T=1, n, D)
    assert (ours(features[:, 0, 0]) - expected).abs().max() <= 1e-5


def media_locations(seed: int, batch: int, length: int, num_images: int, first_is_image: bool) -> torch.Tensor:
    """`<image>` positions: at most `num_images` per row, some text before the first unless `first_is_image`."""
    generator = torch.Generator().manual_seed(seed)
    locations = torch.zeros(batch, length, dtype=torch.bool)
    for row in range(batch):
        count = int(torch.randint(0 if row else 1, num_images + 1, (1,), generator=generator))
        positions = torch.randperm(length, generator=generator)[:count]
        locations[row, positions] = True
        if first_is_image:
            locations[row, 0] = True
    return locations


@pytest.mark.parametrize("only_attend_immediate_media", [True, False])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("seed", range(4))
def test_the_gated_cross_attention_computes_what_openflamingos_computes(
    open_flamingo, seed, attn_implementation, only_attend_immediate_media
):
    heads, head_dim, num_images = 2 + seed % 2, 8, 1 + seed % 3
    reference = open_flamingo.helpers.GatedCrossAttentionBlock(
        dim=32, dim_visual=24, dim_head=head_dim, heads=heads, only_attend_immediate_media=only_attend_immediate_media
    )
    randomize(reference, seed)
    config = tiny_config(
        vision_config=vision_config(hidden_size=24),
        cross_attention_num_heads=heads,
        cross_attention_head_dim=head_dim,
        only_attend_immediate_media=only_attend_immediate_media,
    )
    config._attn_implementation = attn_implementation
    ours = GatedCrossAttentionBlock(config)
    prefix = "model.language_model.layers.3.gated_cross_attention."
    ours.load_state_dict(
        converted(reference.state_dict(), "lang_encoder.model.layers.3.gated_cross_attn_layer.", prefix)
    )
    generator = torch.Generator().manual_seed(200 + seed)
    text = torch.randn(3, 12, 32, generator=generator)
    media = torch.randn(3, num_images, 4, 24, generator=generator)  # (B, T_img, n latents, D)
    # OpenFlamingo lets text before the first image attend evenly to all images when it may read every earlier image
    # (its mask leaves no slot and the softmax spreads); the package gives such text nothing. Every release uses
    # `only_attend_immediate_media=True`, which both zero. So here, with False, every row starts with an image.
    locations = media_locations(seed, 3, 12, num_images, first_is_image=not only_attend_immediate_media)
    expected = reference(text, media, media_locations=locations)
    memory = build_media_memory(media, torch.ones(3, num_images, dtype=torch.bool), None, None, config.latent_fusion)
    mask = memory.readable(locations.long().cumsum(dim=1), only_attend_immediate_media)
    key, value = ours.cross_attention.key_values(memory)
    assert (ours(text, key, value, mask) - expected).abs().max() <= 1e-5


# ---- the whole model: an OpenFlamingo checkpoint.pt, written by open-flamingo, through the converter -------------


class OpenCLIPTokens(torch.nn.Module):
    """What OpenCLIP's VisionTransformer returns with `output_tokens=True`: (pooled, tokens), both after `ln_post`,
    the class token dropped from the tokens."""

    def __init__(self, tower: CLIPVisionModel):
        super().__init__()
        self.tower = tower

    def forward(self, pixel_values):
        body = getattr(self.tower, "vision_model", self.tower)  # older transformers nest it
        normed = body.post_layernorm(self.tower(pixel_values=pixel_values).last_hidden_state)
        return normed[:, 0], normed[:, 1:]


LANGUAGE_MODELS = {  # OpenFlamingo's decoder-layer path for each (factory.py)
    "llama, untied": "model.layers",  # as OpenFlamingo-9B-deprecated (LLaMA-7B)
    "llama, tied": "model.layers",
    "gpt_neox": "gpt_neox.layers",  # as OpenFlamingo-4B-vitl-rpj3b (RedPajama-INCITE-3B)
    "mpt": "transformer.blocks",  # as OpenFlamingo-9B-vitl-mpt7b (MPT-7B; transformers' MPT, tied embeddings)
}


def language_model_config(kind: str):
    if kind == "mpt":
        config = text_config("mpt")
        config.n_layers = 4
        return config
    if kind == "gpt_neox":
        return GPTNeoXConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, vocab_size=259
        )
    config = text_config("llama")
    config.num_hidden_layers, config.tie_word_embeddings = 4, kind == "llama, tied"
    return config


@pytest.fixture(scope="module", params=list(LANGUAGE_MODELS))
def openflamingo_checkpoint(request, open_flamingo, tmp_path_factory):
    """Backbone folders, an OpenFlamingo model built on them as its factory builds one (cross-attention every 2 of 4
    layers), with random trained parts, and the `checkpoint.pt` open-flamingo's own `filter_state_dict_to_trainable`
    keeps of it."""
    root = tmp_path_factory.mktemp("openflamingo")
    torch.manual_seed(0)
    CLIPVisionModel(vision_config()).save_pretrained(root / "clip")
    size = vision_config().image_size
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        root / "clip"
    )
    AutoModelForCausalLM.from_config(language_model_config(request.param)).save_pretrained(root / "lm")
    tiny_tokenizer().save_pretrained(root / "lm")

    # open-flamingo's factory, step by step (factory.py), without open_clip
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    assert tokenizer.pad_token is not None  # so no <PAD> is added
    lang_encoder = AutoModelForCausalLM.from_pretrained(root / "lm")
    open_flamingo.utils.extend_instance(lang_encoder, open_flamingo.flamingo_lm.FlamingoLMMixin)
    lang_encoder.set_decoder_layers_attr_name(LANGUAGE_MODELS[request.param])
    lang_encoder.resize_token_embeddings(len(tokenizer))
    vision = types.SimpleNamespace(visual=OpenCLIPTokens(CLIPVisionModel.from_pretrained(root / "clip")))
    flamingo = open_flamingo.flamingo.Flamingo(
        vision,
        lang_encoder,
        tokenizer.convert_tokens_to_ids("<|endofchunk|>"),
        tokenizer.convert_tokens_to_ids("<image>"),
        vis_dim=vision_config().hidden_size,
        cross_attn_every_n_layers=2,
    )
    flamingo.requires_grad_(False)
    flamingo.perceiver.requires_grad_(True)
    flamingo.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    flamingo.lang_encoder.get_input_embeddings().requires_grad_(True)
    # "trained": every trained weight random, the embedding moved away from the LM folder's
    randomize(flamingo.perceiver, 1)
    randomize(flamingo.lang_encoder.gated_cross_attn_layers, 2)
    with torch.no_grad():
        embedding = flamingo.lang_encoder.get_input_embeddings().weight
        embedding.add_(torch.randn(embedding.shape, generator=torch.Generator().manual_seed(3)))
    state = open_flamingo.train_utils.filter_state_dict_to_trainable(flamingo, flamingo.state_dict())
    torch.save(state, root / "checkpoint.pt")
    # the logits of <image> and <|endofchunk|> carry over where OpenFlamingo saved their output rows: tied to the
    # embedding, or an output embedding whose name has "embed" in it (GPT-NeoX's embed_out), which its filter keeps
    output_saved = lang_encoder.config.tie_word_embeddings or "lang_encoder.embed_out.weight" in state
    layers = LANGUAGE_MODELS[request.param]
    return dict(
        root=root, flamingo=flamingo.eval(), tokenizer=tokenizer, state=state, output_saved=output_saved, layers=layers
    )


def prompt_and_images(tokenizer, seed: int = 0):
    image, eoc = tokenizer.convert_tokens_to_ids("<image>"), tokenizer.convert_tokens_to_ids("<|endofchunk|>")
    text = [tokenizer(piece, add_special_tokens=False)["input_ids"] for piece in ("a cat", "and a dog", "Output:")]
    input_ids = torch.tensor([[image, *text[0], eoc, image, *text[1], eoc, *text[2]]] * 2)
    pixel_values = torch.randn(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return input_ids, pixel_values


def test_an_openflamingo_checkpoint_converts_to_the_same_model(openflamingo_checkpoint):
    case = openflamingo_checkpoint
    root = case["root"]
    assert {key.split(".")[0] for key in case["state"]} == {"perceiver", "lang_encoder"}
    model, processor, notes = convert_openflamingo_checkpoint(root, str(root / "clip"), str(root / "lm"), 2)
    assert model.config.cross_attention_layers == [1, 3]
    assert processor.image_token_id == case["tokenizer"].convert_tokens_to_ids("<image>")
    assert processor.end_of_chunk_token_id == case["tokenizer"].convert_tokens_to_ids("<|endofchunk|>")
    # every trained weight of the checkpoint is in the model; nothing else was loaded from it
    ours = model.state_dict()
    for key, value in case["state"].items():
        kind, name = map_openflamingo_key(key, case["layers"])
        if kind == "model":
            assert torch.equal(ours[name], value), key
    embedding = next(
        value
        for key, value in case["state"].items()
        if key.endswith(("embed_tokens.weight", "embed_in.weight", "wte.weight"))
    )
    assert torch.equal(model.get_input_embeddings().weight, embedding)

    input_ids, pixel_values = prompt_and_images(case["tokenizer"])
    with torch.no_grad():
        expected = case["flamingo"](pixel_values[:, :, None], input_ids, attention_mask=torch.ones_like(input_ids))
        actual = model(input_ids=input_ids, pixel_values=pixel_values)
    vocab = expected.logits.shape[-1] if case["output_saved"] else 259  # else OpenFlamingo never saved those rows
    assert (actual.logits[..., :vocab] - expected.logits[..., :vocab]).abs().max() <= 1e-5
    assert any("fresh rows" in note for note in notes) == (not case["output_saved"])

    # greedy generation, checked token by token against OpenFlamingo's forward on the generated sequence
    with torch.no_grad():
        generated = model.generate(input_ids=input_ids[:1], pixel_values=pixel_values[:1], max_new_tokens=6)
        full = case["flamingo"](pixel_values[:1, :, None], generated, attention_mask=torch.ones_like(generated))
    new = generated[0, input_ids.shape[1] :]
    assert len(new) >= 1
    reference_next = full.logits[0, input_ids.shape[1] - 1 : -1, :vocab].argmax(-1)
    assert torch.equal(new[: len(reference_next)], reference_next[: len(new)])


def test_the_console_script_writes_a_folder_that_loads_as_the_converted_model(openflamingo_checkpoint, tmp_path):
    root = openflamingo_checkpoint["root"]
    out = tmp_path / "converted"
    args = ["--checkpoint_path", str(root), "--vision_model", str(root / "clip"), "--language_model", str(root / "lm")]
    torch.manual_seed(0)  # the fresh parts (untied: the media tokens' output rows) drawn alike in both conversions
    assert main([*args, "--output_dir", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "Converted from the OpenFlamingo checkpoint" in card and "license: mit" in card
    reloaded = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True).eval()
    torch.manual_seed(0)
    model, _, _ = convert_openflamingo_checkpoint(root, str(root / "clip"), str(root / "lm"))
    input_ids, pixel_values = prompt_and_images(openflamingo_checkpoint["tokenizer"], seed=1)
    with torch.no_grad():
        assert torch.equal(
            reloaded(input_ids=input_ids, pixel_values=pixel_values).logits,
            model(input_ids=input_ids, pixel_values=pixel_values).logits,
        )


# ---- what cannot be converted is an error that names it -----------------------------------------------------------


def test_keys_that_do_not_map_and_wrong_settings_are_errors_naming_them(openflamingo_checkpoint, tmp_path):
    root, state, layers = (openflamingo_checkpoint[key] for key in ("root", "state", "layers"))
    backbones = (str(root / "clip"), str(root / "lm"))

    def convert_with(changed: dict, **kwargs):
        (tmp_path / "bad").mkdir(exist_ok=True)
        torch.save(changed, tmp_path / "bad" / "checkpoint.pt")
        return convert_openflamingo_checkpoint(tmp_path / "bad", *backbones, **kwargs)

    with pytest.raises(ValueError, match=r"perceiver\.media_time_embs: the resampler was built with `max_num_media`"):
        convert_with({**state, "perceiver.media_time_embs": torch.zeros(4, 1, 32)})
    with pytest.raises(
        ValueError,
        match=rf"1 key\(s\) cannot be converted: lang_encoder\.{layers}\.1\.gated_cross_attn_layer\.attn\.extra",
    ):
        convert_with({**state, f"lang_encoder.{layers}.1.gated_cross_attn_layer.attn.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"vision_encoder\.conv1\.weight: .*the tower comes from --vision_model"):
        convert_with({**state, "vision_encoder.conv1.weight": torch.zeros(1)})
    norm = (
        "lang_encoder."
        + {
            "model.layers": "model.norm.weight",
            "gpt_neox.layers": "gpt_neox.final_layer_norm.weight",
            "transformer.blocks": "transformer.norm_f.weight",
        }[layers]
    )
    with pytest.raises(ValueError, match=rf"{norm}: differs from .*trained with another language model"):
        convert_with({**state, norm: torch.full((32,), 3.0)})
    dropped = {k: v for k, v in state.items() if f"{layers}.3.gated_cross_attn_layer.ff_gate" not in k}
    wrapped = layers.split(".")[-1]  # the converted model keeps the LM's name for its layers (MPT: blocks)
    with pytest.raises(ValueError, match=rf"lacks 1 weight\(s\) .*{wrapped}\.3\.gated_cross_attention\.ff_gate"):
        convert_with(dropped)
    with pytest.raises(
        ValueError, match=r"cross_attn_every_n_layers: .*before decoder layers \[1, 3\], every 2 layers, not every 4"
    ):
        convert_openflamingo_checkpoint(root, *backbones, 4)
    other = "gpt_neox.layers" if layers != "gpt_neox.layers" else "transformer.blocks"
    as_other = {key.replace(f"lang_encoder.{layers}.", f"lang_encoder.{other}."): v for key, v in state.items()}
    with pytest.raises(ValueError, match=rf"cross-attention sits in the decoder layers `{re.escape(other)}`, but"):
        convert_with(as_other)  # a release trained on another language model than the one given
    with pytest.raises(TypeError, match="language_model: expected a Hub id or a local folder"):
        convert_openflamingo_checkpoint(root, backbones[0], root / "lm")
    with pytest.raises(ValueError, match="cross_attn_every_n_layers: expected a positive integer, got True"):
        convert_openflamingo_checkpoint(root, *backbones, True)
    with pytest.raises(ValueError, match="context_resampler: expected one of"):
        convert_openflamingo_checkpoint(root, *backbones, context_resampler="text")
    with pytest.raises(ValueError, match="checkpoint_path: no OpenFlamingo checkpoint at"):
        convert_openflamingo_checkpoint(tmp_path / "nowhere", *backbones)
    # the console script: one error line, a non-zero exit, nothing written
    command = [sys.executable, "-m", "visincontext.convert_openflamingo_weights_to_hf", "--checkpoint_path"]
    command += [str(tmp_path / "nowhere"), "--vision_model", backbones[0], "--language_model", backbones[1]]
    result = subprocess.run(
        [*command, "--output_dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert result.returncode == 2 and not (tmp_path / "out").exists()
    assert (
        result.stderr.strip().splitlines()[-1].startswith("visincontext-convert-openflamingo: error: checkpoint_path")
    )


@pytest.mark.parametrize(
    "config, refusal",
    [
        (  # OpenFlamingo-3B-vitl-mpt1b's language model, as its config.json says (remote code, never run here)
            {"model_type": "mosaic_gpt", "architectures": ["MosaicGPT"], "attn_qk_ln": True, "alibi": True},
            r"an MPT with QK LayerNorm \(MosaicGPT remote code, as OpenFlamingo-3B-vitl-mpt1b's MPT-1B\)",
        ),
        ({"model_type": "mpt", "attn_config": {"qk_ln": True}}, r"an MPT with QK LayerNorm, which transformers' MPT"),
        ({"model_type": "mpt", "attn_config": {"attn_type": "multiquery_attention"}}, r"'multiquery_attention'"),
        ({"model_type": "my_lm", "auto_map": {"AutoModelForCausalLM": "my.LM"}}, r"model type 'my_lm'.*remote code"),
    ],
)
def test_a_language_model_the_converted_model_cannot_compute_is_refused_before_loading(tmp_path, config, refusal):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"language_model: .*{refusal}"):
        convert_openflamingo_checkpoint(tmp_path / "no-checkpoint-needed", str(tmp_path), str(tmp_path))


def test_the_tokenizer_gets_openflamingos_token_order(openflamingo_checkpoint):
    tokenizer = openflamingo_tokenizer(str(openflamingo_checkpoint["root"] / "lm"))
    reference = openflamingo_checkpoint["tokenizer"]
    assert len(tokenizer) == len(reference)
    for token in ("<|endofchunk|>", "<image>"):
        assert tokenizer.convert_tokens_to_ids(token) == reference.convert_tokens_to_ids(token)


def test_the_readme_conversion_command_is_one_the_script_accepts(tmp_path, monkeypatch):
    """The released checkpoint cannot be downloaded here: its command is checked against the script's arguments."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    joined = readme.replace("\\\n", " ")
    line = next(line for line in joined.splitlines() if line.startswith("visincontext-convert-openflamingo "))
    monkeypatch.chdir(tmp_path)  # --output_dir must not exist yet
    args = parse_args(shlex.split(line)[1:])
    assert (args.checkpoint_path, args.vision_model, args.cross_attn_every_n_layers) == (
        "of9b",
        "openai/clip-vit-large-patch14",
        4,
    )


def test_a_converted_model_keeps_the_model_invariants(openflamingo_checkpoint):
    """The converter's model, like every constructor's (tests/test_construction.py): causal, cached generation =
    uncached, zero gates = the bare language model, saved and reloaded = itself, and no library warning."""
    root = openflamingo_checkpoint["root"]
    with library_warnings() as said:
        model, _, _ = convert_openflamingo_checkpoint(root, str(root / "clip"), str(root / "lm"))
        result = measure(model, reload=VisInContextForConditionalGeneration.from_pretrained, seeds=3)
    result["warnings"] = said
    check(result)
