"""Every way of building a model gives the same causal model (issue 35).

A user can get a model from a config, from pretrained backbones (`from_backbones`, the README's path), from a saved
folder (`from_pretrained`, `AutoModelForImageTextToText`, and remote code where the package is not installed), or
from the training scripts. Each path gets the same invariants (`model_invariants.measure` / `check`): causal, cached
generation = uncached, zero gates = the bare language model, saved and reloaded = itself, and no warning from
transformers while it is built, loaded and run (a silent fallback, such as an attention implementation of `None`,
announces itself only so).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_invariants import check, library_warnings, measure, set_gates
from tiny import text_config, tiny_config, tiny_tokenizer, vision_config
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    CLIPImageProcessorPil,
    CLIPVisionModel,
    SiglipVisionModel,
)

from visincontext import VisInContextForConditionalGeneration
from visincontext.training import DataArguments, ModelArguments, build_model_and_processor

# the training scripts say when they build their offline default; nothing else may warn
EXPLAINED = {"training script, offline default": ("training the offline default",)}

BACKBONES = [("clip", "llama"), ("siglip", "qwen2"), ("clip", "mistral"), ("clip", "mpt")]
# the new parts as small as the tiny config's (tests/tiny.py)
SMALL = dict(
    num_latents=4,
    resampler_depth=1,
    resampler_num_heads=2,
    resampler_head_dim=8,
    cross_attention_every=1,
    cross_attention_num_heads=2,
    cross_attention_head_dim=8,
    contrastive_dim=16,
)


@pytest.fixture(scope="module")
def backbone_folders(tmp_path_factory):
    """Saved tiny backbones, as `save_pretrained` writes them: {(vision, text): (vision folder, LM folder)}."""
    root = tmp_path_factory.mktemp("backbones")
    folders = {}
    for vision, text in BACKBONES:
        torch.manual_seed(0)
        tower = (CLIPVisionModel if vision == "clip" else SiglipVisionModel)(vision_config(vision))
        tower.save_pretrained(root / vision)
        image_processor(vision_config(vision).image_size).save_pretrained(root / vision)
        lm = AutoModelForCausalLM.from_config(text_config(text))
        lm.save_pretrained(root / text)
        tiny_tokenizer().save_pretrained(root / text)
        folders[vision, text] = (str(root / vision), str(root / text))
    return folders


def image_processor(size: int) -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def reload_class(folder):
    return VisInContextForConditionalGeneration.from_pretrained(folder)


def own_lm(folder: str):
    """The language model as its own folder loads it: what the model must equal at zero gates."""
    return {"own folder": AutoModelForCausalLM.from_pretrained(folder)}


def build_from_config(folders, tmp_path):
    torch.manual_seed(0)
    return VisInContextForConditionalGeneration(tiny_config()), reload_class, {}


def build_from_backbones(pair, dtype=None):
    def build(folders, tmp_path):
        vision, lm = folders[pair]
        if dtype is not None:  # the LM saved in another dtype: the built model and its configs follow it
            AutoModelForCausalLM.from_pretrained(lm).to(dtype).save_pretrained(tmp_path / "lm")
            tiny_tokenizer().save_pretrained(tmp_path / "lm")
            lm = str(tmp_path / "lm")
        model = VisInContextForConditionalGeneration.from_backbones(vision, lm, **SMALL)
        assert {p.dtype for p in model.parameters()} == {dtype or torch.float32}
        return model, reload_class, own_lm(lm)

    return build


def saved_from_backbones(folders, tmp_path) -> Path:
    """A folder saved from a model built around pretrained backbones, its gates open (a trained model's are)."""
    torch.manual_seed(0)
    vision, lm = folders["clip", "llama"]
    with library_warnings():  # measured in the test that builds it this way
        model = VisInContextForConditionalGeneration.from_backbones(vision, lm, **SMALL)
    set_gates(model, 0.5).save_pretrained(tmp_path / "saved")
    return tmp_path / "saved"


def build_with_from_pretrained(folders, tmp_path):
    folder = saved_from_backbones(folders, tmp_path)
    return VisInContextForConditionalGeneration.from_pretrained(folder), reload_class, {}


def build_with_auto_class(folders, tmp_path):
    folder = saved_from_backbones(folders, tmp_path)

    def load(path):
        return AutoModelForImageTextToText.from_pretrained(path)

    return load(folder), load, {}


def build_with_training_script(backbones: bool):
    def build(folders, tmp_path):
        vision, lm = folders["clip", "llama"]
        arguments = (
            ModelArguments(vision_model=vision, language_model=lm, cross_attention_every=1, num_latents=4)
            if backbones
            else ModelArguments()
        )
        model, _ = build_model_and_processor(arguments, DataArguments())
        return model, reload_class, own_lm(lm) if backbones else {}

    return build


CONSTRUCTORS = {
    "VisInContextForConditionalGeneration(config)": build_from_config,
    **{f"from_backbones({v} x {t})": build_from_backbones((v, t)) for v, t in BACKBONES},
    "from_backbones(clip x llama), the LM in bfloat16": build_from_backbones(("clip", "llama"), torch.bfloat16),
    "from_pretrained(folder)": build_with_from_pretrained,
    "AutoModelForImageTextToText.from_pretrained(folder)": build_with_auto_class,
    "training script, from backbones": build_with_training_script(backbones=True),
    "training script, offline default": build_with_training_script(backbones=False),
}


@pytest.mark.invariant
@pytest.mark.parametrize("constructor", list(CONSTRUCTORS))
def test_every_constructor_gives_a_causal_model_equal_to_its_lm_and_its_saved_self(
    constructor, backbone_folders, tmp_path
):
    with library_warnings() as said:
        model, reload, references = CONSTRUCTORS[constructor](backbone_folders, tmp_path)
        result = measure(model, reload=reload, references=references)
    result["warnings"] = said
    check(result, warnings_allowed=EXPLAINED.get(constructor, ()))


@pytest.mark.invariant
def test_remote_code_in_a_bare_environment_gives_the_same_invariants(backbone_folders, tmp_path):
    """`AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)` where `visincontext` cannot be
    imported: the folder's own files build the model, and the same measurements hold there."""
    folder = saved_from_backbones(backbone_folders, tmp_path)
    script = Path(__file__).with_name("model_invariants.py")
    run = subprocess.run(
        [sys.executable, str(script), str(folder)],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules")),
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.split("RESULT", 1)[1])
    check(result)


def test_a_backbone_under_a_config_that_reset_its_attention_gets_the_library_default():
    """A backbone whose config lost its attention implementation (set to `None`, as a composite config's setter does
    to the sub-configs it is given) and is built into a model gets what its own `__init__` would pick."""
    torch.manual_seed(0)
    config = tiny_config()
    tower, lm = CLIPVisionModel(config.vision_config), AutoModelForCausalLM.from_config(config.text_config)
    for part in (tower, lm):
        part.config._attn_implementation = None
    with library_warnings() as said:
        model = VisInContextForConditionalGeneration(config, vision_tower=tower, language_model=lm)
        result = measure(model, reload=reload_class)
    result["warnings"] = said
    check(result)
    assert result["attention"]["model.language_model"] == result["attention"]["model.vision_tower"] == "sdpa"


@pytest.mark.parametrize(
    "requested, expected",
    [
        ("eager", {"config": "eager", "config.vision_config": "eager", "config.text_config": "eager"}),
        ({"text_config": "eager"}, {"config": "sdpa", "config.vision_config": "sdpa", "config.text_config": "eager"}),
        (
            {"": "eager", "vision_config": "sdpa"},
            {"config": "eager", "config.vision_config": "sdpa", "config.text_config": "eager"},
        ),
    ],
)
def test_from_backbones_honours_attn_implementation_as_from_pretrained_does(requested, expected, backbone_folders):
    vision, lm = backbone_folders["clip", "llama"]
    model = VisInContextForConditionalGeneration.from_backbones(vision, lm, attn_implementation=requested, **SMALL)
    seen = {
        "config": model.config._attn_implementation,
        "config.vision_config": model.config.vision_config._attn_implementation,
        "config.text_config": model.config.text_config._attn_implementation,
    }
    assert seen == expected
    assert model.model.language_model.config._attn_implementation == expected["config.text_config"]
    assert model.model.vision_tower.config._attn_implementation == expected["config.vision_config"]
    with pytest.raises(TypeError, match="attn_implementation"):
        VisInContextForConditionalGeneration.from_backbones(vision, lm, attn_implementation=1, **SMALL)


def test_a_config_built_around_a_loaded_backbone_leaves_its_attention_as_it_was(backbone_folders):
    """`VisInContextConfig(text_config=lm.config)` must not change the loaded LM (its config is the same object)."""
    from visincontext import VisInContextConfig

    lm = AutoModelForCausalLM.from_pretrained(backbone_folders["clip", "llama"][1], attn_implementation="eager")
    VisInContextConfig(vision_config=vision_config(), text_config=lm.config)
    assert lm.config._attn_implementation == "eager"
    VisInContextConfig(vision_config=vision_config(), text_config=lm.config, attn_implementation="sdpa")
    assert lm.config._attn_implementation == "sdpa"  # asked for: every part gets it, as in transformers


@pytest.mark.slow
def test_from_backbones_with_real_smollm2_weights_is_smollm2_at_zero_gates(smollm2, tmp_path):
    """Real weights (SmolLM2-135M-Instruct, 30 layers, tied embeddings, fp32): the model built around them is causal,
    equals SmolLM2 as `AutoModelForCausalLM` loads it when its gates are 0, and equals its saved self."""
    folder, gguf = smollm2
    CLIPVisionModel(vision_config(image_size=64, hidden_size=64)).save_pretrained(tmp_path / "clip")
    lm_kwargs = {"gguf_file": gguf, "dtype": torch.float32}
    with library_warnings() as said:
        model = VisInContextForConditionalGeneration.from_backbones(
            str(tmp_path / "clip"),
            str(folder),
            language_model_kwargs=lm_kwargs,
            cross_attention_every=10,
            num_latents=8,
            resampler_depth=1,
        )
        smollm2_itself = AutoModelForCausalLM.from_pretrained(str(folder), **lm_kwargs)
        result = measure(model, reload=reload_class, references={"SmolLM2": smollm2_itself}, seeds=3)
    result["warnings"] = said
    print({k: v for k, v in result.items() if k not in ("attention", "reload_attention")})
    check(result, zero_gate_tolerance=1e-4)
    assert model.config.text_config.num_hidden_layers == 30 and model.config.tie_word_embeddings
