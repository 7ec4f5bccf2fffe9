"""Behaviour of VisInContextForConditionalGeneration (issue: core model)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from model_invariants import bare_lm, library_warnings
from tiny import EOC_ID, IMAGE_ID, VOCAB, open_gates, sample_batch, tiny_config, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, CLIPImageProcessorPil, CLIPVisionModel

from visincontext import VisInContextForConditionalGeneration, VisInContextProcessor

BACKBONES = [("clip", "llama"), ("siglip", "qwen2"), ("clip", "mistral")]


@pytest.mark.invariant
@pytest.mark.parametrize("vision,text", BACKBONES)
def test_zero_gates_equal_bare_language_model(vision, text):
    model = tiny_model(vision=vision, text=text)
    batch = sample_batch()
    with torch.no_grad():
        logits = model(**batch).logits
        reference = bare_lm(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape == reference.shape
    assert (logits - reference).abs().max().item() < 1e-5
    # and the media really reach the layers once the gates open
    with torch.no_grad():
        assert (open_gates(model)(**batch).logits - reference).abs().max().item() > 1e-3


def several_chunks_batch(seed: int = 0):
    """Two samples with 3 and 2 images in as many chunks, context pages, left padding: decoding continues the last
    chunk, so a cache that loses track of chunks reads the wrong image."""
    g = torch.Generator().manual_seed(seed)
    pad = 0
    input_ids = torch.tensor(
        [
            [5, IMAGE_ID, 6, 7, EOC_ID, IMAGE_ID, 8, 9, EOC_ID, IMAGE_ID, 10, 11],
            [pad, pad, pad, 12, IMAGE_ID, 13, 14, EOC_ID, IMAGE_ID, 15, 16, 17],
        ]
    )
    attention_mask = (torch.arange(12) >= torch.tensor([[0], [3]])).long()
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=torch.randn(2, 3, 3, 32, 32, generator=g),
        image_mask=torch.tensor([[True, True, True], [True, True, False]]),
        context_pixel_values=torch.randn(2, 2, 3, 32, 32, generator=g),
        context_mask=torch.tensor([[True, True], [True, False]]),
    )


@pytest.mark.invariant
@pytest.mark.parametrize("fusion", ["sum", "concat"])
def test_cached_generation_equals_uncached_with_media_in_several_chunks(fusion):
    """Cached greedy decoding gives the tokens and the scores of uncached decoding and of one teacher-forced forward
    over the generated sequence, whose new tokens continue the last chunk."""
    model = open_gates(tiny_model(latent_fusion=fusion), 0.8)
    batch = several_chunks_batch()
    kwargs = dict(
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        output_scores=True,
        return_dict_in_generate=True,
    )
    cached = model.generate(**batch, use_cache=True, **kwargs)
    uncached = model.generate(**batch, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    new = cached.sequences.shape[1] - batch["input_ids"].shape[1]
    assert new == 8
    full = dict(
        batch,
        input_ids=cached.sequences,
        attention_mask=torch.cat([batch["attention_mask"], torch.ones(2, new, dtype=torch.long)], 1),
    )
    with torch.no_grad():
        logits = model(**full).logits[:, -new - 1 : -1]
    for step, (a, b) in enumerate(zip(cached.scores, uncached.scores)):
        assert torch.allclose(a, logits[:, step], atol=1e-4), step
        assert torch.allclose(b, logits[:, step], atol=1e-4), step
    # the decoded tokens read the last chunk's image: dropping it moves every sample's scores by far more than the
    # tolerance above (reading the wrong chunk, as a cache that loses the chunk ids does, moves them as much)
    last_images_dropped = batch["image_mask"].clone()
    last_images_dropped[0, 2] = last_images_dropped[1, 1] = False
    dropped = model.generate(**batch, image_latents_mask=last_images_dropped, use_cache=True, **kwargs)
    assert ((torch.stack(dropped.scores) - torch.stack(cached.scores)).abs().amax(dim=(0, 2)) > 0.05).all()


@pytest.mark.invariant
def test_cache_under_either_name():
    """`cache` (transformers >= 5.24) and `past_key_values` (earlier) are the same input; the output names the
    cache as the installed transformers does."""
    from transformers.cache_utils import DynamicCache

    from visincontext.modeling_visincontext import CACHE_NAME

    model = open_gates(tiny_model(), 0.5)
    batch = sample_batch()
    with torch.no_grad():
        prefill = model(**batch, use_cache=True)
    assert CACHE_NAME in prefill and prefill.get(CACHE_NAME).get_seq_length() == batch["input_ids"].shape[1]
    step = dict(
        input_ids=torch.tensor([[7], [8]]),
        attention_mask=torch.ones(2, 12, dtype=torch.long),
        media_key_values=prefill.media_key_values,
        media=prefill.media,
        past_chunk_ids=prefill.chunk_ids[:, -1],
        use_cache=True,
    )
    results, said = [], {}
    for name in ("cache", "past_key_values"):
        cache = DynamicCache(config=model.config.text_config)
        with torch.no_grad(), library_warnings() as said[name]:
            model(**batch, **{name: cache}, use_cache=True)
            results.append(model(**step, **{name: cache}).logits)
    assert torch.equal(results[0], results[1])
    # the old name is deprecated where the installed transformers renamed it, as transformers' own models say
    deprecation = "FutureWarning: `past_key_values` is deprecated since transformers 5.24: pass the KV cache as `cache`"
    assert said == {"cache": [], "past_key_values": [deprecation] * 2 if CACHE_NAME == "cache" else []}
    with pytest.raises(ValueError, match="cache"):
        model(**batch, cache=DynamicCache(config=model.config.text_config), past_key_values=DynamicCache())


def test_tokens_before_first_image_ignore_images():
    model = open_gates(tiny_model())
    batch = sample_batch()
    other = dict(batch, pixel_values=torch.randn_like(batch["pixel_values"]))
    with torch.no_grad():
        a, b = model(**batch).logits, model(**other).logits
    for row in range(2):
        first = (batch["input_ids"][row] == IMAGE_ID).nonzero()[0].item()
        assert torch.equal(a[row, :first], b[row, :first])
        assert (a[row, first:] - b[row, first:]).abs().max() > 1e-4


def test_changing_image_k_changes_only_chunk_k_and_later():
    model = open_gates(tiny_model(only_attend_immediate_media=True))
    batch = sample_batch()
    ids = batch["input_ids"][0]
    chunk = (ids == IMAGE_ID).long().cumsum(0)
    for k in (0, 1):
        changed = batch["pixel_values"].clone()
        changed[0, k] = torch.randn_like(changed[0, k])
        with torch.no_grad():
            a = model(**batch).logits[0]
            b = model(**dict(batch, pixel_values=changed)).logits[0]
        differs = (a - b).abs().amax(-1) > 1e-6
        assert not differs[chunk < k + 1].any(), f"image {k} leaked into earlier chunks"
        assert differs[chunk == k + 1].all(), f"image {k} did not reach its chunk"
    # the last image changes exactly its own chunk
    assert torch.equal(differs, chunk == 2)


def test_cross_attention_mask_reads_own_chunk_only():
    from visincontext.cross_attention_visincontext import CONTEXT_CHUNK

    model = tiny_model(only_attend_immediate_media=True, latent_fusion="concat")
    batch = sample_batch()
    with torch.no_grad():
        out = model(**batch)
    L, memory = model.config.num_latents, out.media
    mask = memory.readable(out.chunk_ids, True)  # (B, T, S)
    image_slot = memory.slot_chunk >= 1
    assert image_slot.sum() == 2 * L and (memory.slot_chunk == CONTEXT_CHUNK).sum() == 3 * L  # no per-chunk copies
    page_of_slot = (memory.slot_sources[:, 0] - 2 * L).div(L, rounding_mode="floor")
    for t, c in enumerate(out.chunk_ids[0].tolist()):
        readable_chunks = sorted(set(memory.slot_chunk[mask[0, t] & image_slot].tolist()))
        assert readable_chunks == ([c] if c >= 1 else [])
        if c >= 1:
            assert mask[0, t, memory.slot_chunk == c].all()  # all of its image (chunk 0 has none)
        context = mask[0, t, ~image_slot]
        assert context[page_of_slot[~image_slot] < 2].all() and not context[page_of_slot[~image_slot] == 2].any()
    # sample 2 has no pages: tokens before its image read nothing
    assert not mask[1, :3].any()

    mask = memory.readable(out.chunk_ids, False)
    last = out.chunk_ids.shape[1] - 1
    assert (
        mask[0, last, memory.slot_chunk == 1].all() and mask[0, last, memory.slot_chunk == 2].all()
    )  # earlier image too
    assert mask[0, last, ~image_slot].sum() == 2 * L  # the context once, not a copy per chunk


@pytest.mark.parametrize("fusion", ["sum", "concat"])
def test_images_only_pages_only_both_and_token_masking(fusion):
    model = open_gates(tiny_model(latent_fusion=fusion))
    batch = sample_batch()
    images_only = {k: v for k, v in batch.items() if not k.startswith("context")}
    text_only_ids = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_ID, 3)
    pages_only = dict(
        input_ids=text_only_ids,
        attention_mask=batch["attention_mask"],
        context_pixel_values=batch["context_pixel_values"],
        context_mask=batch["context_mask"],
    )
    with torch.no_grad():
        both = model(**batch).logits
        img = model(**images_only).logits
        pages = model(**pages_only).logits
        bare = model(input_ids=text_only_ids, attention_mask=batch["attention_mask"]).logits
        dropped = model(**batch, image_latents_mask=torch.zeros(2, 2, dtype=torch.bool)).logits
        dropped_other = model(
            **dict(batch, pixel_values=torch.randn_like(batch["pixel_values"])),
            image_latents_mask=torch.zeros(2, 2, dtype=torch.bool),
        ).logits
    assert not torch.allclose(both, img) and not torch.allclose(both, pages) and not torch.allclose(pages, bare)
    # dropping the image latents removes every trace of the images
    assert torch.equal(dropped, dropped_other)
    assert not torch.allclose(dropped, both)
    # sample 0 has pages: with its images dropped every token reads exactly the pages, as in the pages-only run
    # (same positions; only the <image> token ids themselves differ, so compare the tokens before the first one)
    first = (batch["input_ids"][0] == IMAGE_ID).nonzero()[0].item()
    assert torch.allclose(dropped[0, :first], pages[0, :first], atol=1e-6)


def test_dropped_images_match_pages_only_memory():
    """With all images dropped, the cross-attention reads the same memory as a run without images."""
    for fusion in ("sum", "concat"):
        model = open_gates(tiny_model(latent_fusion=fusion))
        batch = sample_batch()
        with torch.no_grad():
            dropped = model(**batch, image_latents_mask=torch.zeros(2, 2, dtype=torch.bool))
        mask = dropped.media.readable(dropped.chunk_ids, model.config.only_attend_immediate_media)
        memory = dropped.media.slot_values(dropped.media.latents)  # (B, S, D): what each slot holds
        for t in range(batch["input_ids"].shape[1]):
            readable = memory[0][mask[0, t]]
            assert torch.allclose(readable, memory[0][mask[0, 0]])  # every token reads the pages alone


def test_contrastive_weight_zero_gives_lm_loss():
    model = tiny_model(contrastive_loss_weight=0.0)
    batch = sample_batch()
    out = model(**batch, labels=batch["input_ids"], context_input_ids=torch.randint(0, VOCAB, (2, 9)))
    assert out.contrastive_loss is not None
    assert torch.equal(out.loss, out.lm_loss)
    model = tiny_model(contrastive_loss_weight=0.5)
    out = model(**batch, labels=batch["input_ids"], context_input_ids=torch.randint(0, VOCAB, (2, 9)))
    assert torch.allclose(out.loss, out.lm_loss + 0.5 * out.contrastive_loss)


def test_training_reduces_lm_and_contrastive_loss():
    torch.manual_seed(0)
    model = tiny_model(freeze_language_model=False).train()  # a random LM has nothing to keep frozen
    g = torch.Generator().manual_seed(1)
    n = 8
    input_ids = torch.randint(0, 200, (n, 12), generator=g)
    input_ids[:, 1] = IMAGE_ID
    batch = dict(
        input_ids=input_ids,
        pixel_values=torch.randn(n, 1, 3, 32, 32, generator=g),
        context_pixel_values=torch.randn(n, 2, 3, 32, 32, generator=g),
        context_input_ids=torch.randint(0, 200, (n, 16), generator=g),
        labels=input_ids.masked_fill(input_ids == IMAGE_ID, -100),
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    history = []
    for _ in range(60):
        out = model(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append((out.lm_loss.item(), out.contrastive_loss.item()))
    (lm0, c0), (lm1, c1) = history[0], history[-1]
    assert lm1 < lm0 / 2, history
    assert c1 < c0 / 2, history


@pytest.mark.invariant
def test_generate_cache_equals_no_cache_and_encodes_once():
    model = open_gates(tiny_model())
    batch = sample_batch()
    calls, projections = [], []
    model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    for layer in model.model.language_model.layers:
        layer.gated_cross_attention.cross_attention.to_kv.register_forward_hook(lambda *a: projections.append(1))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = model.generate(**batch, use_cache=True, **kwargs)
    assert len(calls) == 1  # images and pages encoded once
    assert len(projections) == 2  # and projected once per cross-attention block, not at every step
    uncached = model.generate(**batch, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    assert cached.shape[1] == batch["input_ids"].shape[1] + 6


@pytest.mark.invariant
def test_generate_left_padded_row_matches_single_run():
    model = open_gates(tiny_model())
    batch = sample_batch()
    single = {k: v[1:] for k, v in batch.items()}
    single["pixel_values"], single["image_mask"] = single["pixel_values"][:, :1], single["image_mask"][:, :1]
    single = {k: v for k, v in single.items() if not k.startswith("context")}
    padded = dict(single)
    padded["input_ids"] = torch.cat([torch.zeros(1, 3, dtype=torch.long), single["input_ids"]], 1)
    padded["attention_mask"] = torch.cat([torch.zeros(1, 3, dtype=torch.long), single["attention_mask"]], 1)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    a = model.generate(**single, **kwargs)[:, -5:]
    b = model.generate(**padded, **kwargs)[:, -5:]
    assert torch.equal(a, b)


@pytest.mark.invariant
def test_save_and_reload_identical_logits(tmp_path):
    model = open_gates(tiny_model(), 0.5)
    batch = sample_batch()
    model.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    assert {"configuration_visincontext.py", "modeling_visincontext.py"} <= set(files)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) >= {"AutoConfig", "AutoModel", "AutoModelForImageTextToText"}
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, VisInContextForConditionalGeneration)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)
    torch.save({k: v for k, v in batch.items()}, tmp_path / "batch.pt")
    torch.save(model(**batch).logits.detach(), tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["visincontext"] = None  # make the package unimportable: only the remote code may be used
        import torch
        from transformers import AutoModel, AutoModelForImageTextToText
        batch = torch.load({str(tmp_path / "batch.pt")!r})
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        model = AutoModelForImageTextToText.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            diff = (model(**batch).logits - expected).abs().max().item()
        base = AutoModel.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        print("DIFF", diff, type(base).__name__)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = [text for text in result.stdout.splitlines() if text.startswith("DIFF")][0]
    assert float(line.split()[1]) == 0.0 and line.split()[2] == "VisInContextModel"


def test_from_backbones_loads_pretrained_weights_and_freezes(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config()
    vision = CLIPVisionModel(cfg.vision_config)
    vision.save_pretrained(tmp_path / "vision")
    lm = AutoModelForCausalLM.from_config(cfg.text_config)
    lm.save_pretrained(tmp_path / "lm")
    tiny_tokenizer().save_pretrained(tmp_path / "lm")
    model = VisInContextForConditionalGeneration.from_backbones(
        vision_model=str(tmp_path / "vision"),
        language_model=str(tmp_path / "lm"),
        num_latents=4,
        resampler_depth=1,
        cross_attention_every=1,
        resampler_head_dim=8,
        cross_attention_head_dim=8,
        contrastive_dim=16,
    )
    assert model.config.image_token_id == IMAGE_ID and model.config.end_of_chunk_token_id == EOC_ID
    for key, value in vision.state_dict().items():
        assert torch.equal(model.model.vision_tower.state_dict()[key], value), key
    body = model.model.language_model.state_dict()
    for key, value in lm.model.state_dict().items():
        wrapped = key.replace("layers.0.", "layers.0.decoder_layer.").replace("layers.1.", "layers.1.decoder_layer.")
        assert torch.equal(body[wrapped][: len(value)], value), key  # the embedding: a row per id of its tokenizer
    assert torch.equal(model.lm_head.weight[:VOCAB], lm.lm_head.weight)
    CLIPImageProcessorPil().save_pretrained(tmp_path / "vision")
    tokenizer = VisInContextProcessor.from_backbones(str(tmp_path / "vision"), str(tmp_path / "lm")).tokenizer
    assert model.get_input_embeddings().weight.shape[0] == model.lm_head.weight.shape[0] == len(tokenizer) == VOCAB + 2
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    prefixes = (
        "model.image_resampler.",
        "model.context_resampler.",
        "contrastive_head.",
        "model.language_model.layers.0.gated_cross_attention.",
        "model.language_model.layers.1.gated_cross_attention.",
    )
    extra = {n for n in trainable if not n.startswith(prefixes)}
    assert extra == {"model.language_model.embed_tokens.media_embedding.weight", "lm_head.media_head.weight"}
    assert any(n.startswith("model.image_resampler.") for n in trainable)
    assert any(n.startswith("contrastive_head.") for n in trainable)
    assert not any("vision_tower" in n for n in trainable)


def test_gradient_checkpointing_matches():
    batch = sample_batch()
    results = []
    for checkpointing in (False, True):
        model = open_gates(tiny_model(freeze_language_model=False), 0.3).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
        out = model(**batch, labels=batch["input_ids"], context_input_ids=batch["input_ids"])
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    assert any("cross_attention" in n for n in grads_a) and any("resampler" in n for n in grads_a)
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-5), name


def test_eager_and_sdpa_agree_and_flash_needs_the_package():
    batch = sample_batch()
    logits = {}
    for implementation in ("eager", "sdpa"):
        torch.manual_seed(0)
        config = tiny_config()
        config._attn_implementation = implementation
        model = open_gates(VisInContextForConditionalGeneration(config).eval(), 0.5)
        assert model.model.language_model.config._attn_implementation == implementation
        with torch.no_grad():
            logits[implementation] = model(**batch).logits
    assert (logits["eager"] - logits["sdpa"]).abs().max() < 1e-5
    model = tiny_model()
    with pytest.raises(ImportError, match="(?i)flash"):
        model.set_attn_implementation("flash_attention_2")


@pytest.mark.parametrize(
    "change,argument",
    [
        (dict(input_ids=torch.zeros(11, dtype=torch.long)), "input_ids"),
        (dict(pixel_values=torch.zeros(2, 3, 32, 32)), "pixel_values"),
        (dict(context_pixel_values=torch.zeros(2, 3, 32)), "context_pixel_values"),
        (dict(pixel_values=torch.zeros(3, 2, 3, 32, 32), image_mask=None), "pixel_values"),
        (dict(image_mask=torch.tensor([[True, False], [True, False]])), "input_ids"),  # 2 <image> tokens, 1 image
        (dict(image_mask=torch.tensor([[True, True], [True, True]])), "pixel_values"),  # image without a token
        (dict(context_mask=torch.ones(2, 2, dtype=torch.bool)), "context_mask"),
    ],
)
def test_bad_input_names_the_argument(change, argument):
    model = tiny_model()
    batch = dict(sample_batch(), **change)
    batch = {k: v for k, v in batch.items() if v is not None}
    with pytest.raises(ValueError, match=argument):
        model(**batch)


def test_more_image_tokens_than_images_without_pixel_values():
    model = tiny_model()
    batch = sample_batch()
    with pytest.raises(ValueError, match="input_ids: more <image> tokens"):
        model(input_ids=batch["input_ids"])


def test_resize_token_embeddings_keeps_media_rows():
    model = open_gates(tiny_model(), 0.5)
    batch = sample_batch()
    with torch.no_grad():
        before = model(**batch).logits
    media_rows = model.get_input_embeddings().media_embedding.weight.clone()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    model.resize_token_embeddings(VOCAB + 10)
    assert model.config.text_config.vocab_size == VOCAB + 10
    assert model.get_input_embeddings().weight.shape[0] == VOCAB + 10
    assert torch.equal(model.get_input_embeddings().media_embedding.weight, media_rows)
    # the media rows still train, the LM's vocabulary stays frozen
    assert {name for name, p in model.named_parameters() if p.requires_grad} == trainable
    with torch.no_grad():
        after = model(**batch).logits
    # the old vocabulary's logits are untouched; the 10 new rows come after it, the media tokens keep their columns
    assert after.shape[-1] == VOCAB + 10
    assert torch.allclose(after[..., :VOCAB], before[..., :VOCAB], atol=1e-6)
    assert torch.equal(after[..., IMAGE_ID], before[..., IMAGE_ID]) and torch.equal(
        after[..., EOC_ID], before[..., EOC_ID]
    )


@pytest.mark.invariant
def test_set_attn_implementation_reaches_every_attention_layer(monkeypatch):
    """After construction, `set_attn_implementation("eager")` switches the LM, the vision tower and this model's own
    resampler and cross-attention layers (they dispatch through transformers' attention interface); outputs agree."""
    import visincontext.perceiver_visincontext as modeling

    model = open_gates(tiny_model(), 0.5)
    batch = sample_batch()
    with torch.no_grad():
        sdpa = model(**batch).logits
    calls = []
    eager = modeling.eager_attention_forward
    monkeypatch.setattr(modeling, "eager_attention_forward", lambda *a, **k: calls.append(1) or eager(*a, **k))
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    assert model.config.text_config._attn_implementation == model.config.vision_config._attn_implementation == "eager"
    with torch.no_grad():
        switched = model(**batch).logits
    # 2 resamplers x 1 layer (media encoded once) + 2 cross-attention blocks
    assert len(calls) == 4
    assert (switched - sdpa).abs().max() < 1e-5


@pytest.mark.invariant
def test_missing_weights_are_initialised_like_a_fresh_model(tmp_path):
    """A checkpoint without some weights (gates, a CLIP attention projection, resampler latents) loads with those
    weights initialised as `__init__` initialises them: gates at 0, CLIP's projection at CLIP's own std."""
    from safetensors.torch import load_file, save_file

    model = tiny_model()
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = [
        k
        for k in weights
        if k.endswith(("attn_gate", "ff_gate"))
        or k.endswith("self_attn.q_proj.weight")
        and "vision" in k
        or k.endswith("context_resampler.latents")
    ]
    assert len(dropped) >= 5
    save_file(
        {k: v for k, v in weights.items() if k not in dropped},
        tmp_path / "model.safetensors",
        metadata={"format": "pt"},
    )
    with library_warnings() as said:
        reloaded = VisInContextForConditionalGeneration.from_pretrained(tmp_path)
    # transformers reports the missing weights, by name
    assert len(said) == 1 and "LOAD REPORT" in said[0], said
    state = reloaded.state_dict()
    for key in dropped:
        assert torch.isfinite(state[key]).all(), key
        if key.endswith("gate"):
            assert torch.equal(state[key], torch.zeros(1)), key
    q_proj = next(k for k in dropped if "q_proj" in k)
    config = model.config.vision_config
    expected_std = (config.hidden_size**-0.5) * ((2 * config.num_hidden_layers) ** -0.5) * config.initializer_factor
    assert abs(state[q_proj].std().item() - expected_std) < 0.5 * expected_std  # CLIP's attention init, not 0.02
    kept = [k for k in weights if k not in dropped]
    assert all(torch.equal(state[k], weights[k]) for k in kept)


@pytest.mark.invariant
def test_generation_hooks_this_model_overrides_are_called():
    """`_update_model_kwargs_for_generation` is a private GenerationMixin hook (IDEFICS and Mllama override it too):
    pin its signature and that `generate` calls it once per new token with this model's outputs."""
    import inspect

    from transformers import GenerationMixin

    parameters = inspect.signature(GenerationMixin._update_model_kwargs_for_generation).parameters
    assert list(parameters)[:5] == ["self", "outputs", "model_kwargs", "is_encoder_decoder", "num_new_tokens"]
    model = open_gates(tiny_model(), 0.5)
    seen = []
    original = type(model)._update_model_kwargs_for_generation

    def spy(self, outputs, model_kwargs, *args, **kwargs):
        seen.append(outputs.media_key_values is not None)
        return original(self, outputs, model_kwargs, *args, **kwargs)

    model._update_model_kwargs_for_generation = spy.__get__(model)
    model.generate(**sample_batch(), max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert len(seen) >= 3 and all(seen)


def test_tensor_parallel_plan_names_existing_modules():
    """The LM's tensor-parallel plan, moved one level down (public `tp_plan` setter), names real modules only."""
    import re

    model = tiny_model()
    names = {name for name, _ in model.named_modules()}
    plan = model.tp_plan
    assert plan and all("decoder_layer" in key for key in plan)
    for pattern in plan:
        regex = re.compile("^" + re.escape(pattern).replace(r"\*", r"\d+") + "$")
        assert any(regex.match(name) for name in names), pattern


# ---- the user's path: defects found by running train -> save -> reload -> generate (issue 16) -------------------


def test_from_pretrained_keeps_the_backbones_frozen(tmp_path):
    """Reloading must not unfreeze: loading creates new parameters, which are all trainable."""
    model = tiny_model()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert {name for name, p in reloaded.named_parameters() if p.requires_grad} == trainable
    assert not any("vision_tower" in name or ".decoder_layer." in name for name in trainable)
    unfrozen = AutoModelForImageTextToText.from_pretrained(tmp_path, freeze_language_model=False)
    assert any(".decoder_layer." in name for name, p in unfrozen.named_parameters() if p.requires_grad)


def test_contrastive_loss_with_fewer_than_two_pairs_is_zero():
    """A batch in which fewer than two samples have both pages and context ids (single-text documents) trains on
    the LM loss alone instead of failing."""
    model = tiny_model().train()
    batch = sample_batch()
    context_ids = torch.randint(0, VOCAB - 3, (2, 9))
    for context_mask in (torch.zeros(2, 3, dtype=torch.bool), torch.tensor([[True, False, False], [False] * 3])):
        out = model(**dict(batch, context_mask=context_mask), labels=batch["input_ids"], context_input_ids=context_ids)
        assert out.contrastive_loss.item() == 0.0 and torch.equal(out.loss, out.lm_loss)
        out.loss.backward()


def test_logits_of_ids_that_do_not_exist_are_minus_infinity():
    """Media ids past the vocabulary leave a gap of ids that no token has: their logits are the lowest value, so
    sampling cannot emit them."""
    model = open_gates(tiny_model(image_token_id=VOCAB + 3, end_of_chunk_token_id=VOCAB + 4), 0.5)
    batch = sample_batch()
    batch["input_ids"] = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_ID, VOCAB + 3)
    batch["input_ids"] = batch["input_ids"].masked_fill(batch["input_ids"] == EOC_ID, VOCAB + 4)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[-1] == VOCAB + 5
    assert (logits[..., VOCAB : VOCAB + 3] == torch.finfo(logits.dtype).min).all()
    assert torch.isfinite(logits[..., [VOCAB + 3, VOCAB + 4]]).all()
    torch.manual_seed(0)
    sampled = model.generate(
        **batch, do_sample=True, temperature=5.0, max_new_tokens=40, eos_token_id=None, pad_token_id=0
    )
    new = sampled[:, batch["input_ids"].shape[1] :]
    assert not ((new >= VOCAB) & (new < VOCAB + 3)).any()


def test_generation_config_follows_the_tokenizer_and_the_language_model(tmp_path):
    from visincontext.testing import EOS_ID, PAD_ID

    assert tiny_model().generation_config.eos_token_id == EOS_ID == tiny_tokenizer().eos_token_id
    cfg = tiny_config()
    torch.manual_seed(0)
    CLIPVisionModel(cfg.vision_config).save_pretrained(tmp_path / "vision")
    lm = AutoModelForCausalLM.from_config(cfg.text_config)
    lm.generation_config.eos_token_id, lm.generation_config.do_sample, lm.generation_config.temperature = (
        [EOS_ID, 5],
        True,
        0.3,
    )
    lm.save_pretrained(tmp_path / "lm")
    tiny_tokenizer().save_pretrained(tmp_path / "lm")
    model = VisInContextForConditionalGeneration.from_backbones(
        str(tmp_path / "vision"), str(tmp_path / "lm"), num_latents=4, resampler_depth=1, cross_attention_every=1
    )
    assert model.generation_config.eos_token_id == [EOS_ID, 5, EOC_ID]  # an answer also ends with its chunk
    assert model.generation_config.temperature == 0.3
    assert model.generation_config.pad_token_id == PAD_ID
    model.save_pretrained(tmp_path / "built")
    assert json.loads((tmp_path / "built" / "generation_config.json").read_text())["eos_token_id"] == [
        EOS_ID,
        5,
        EOC_ID,
    ]


def test_plain_bitsandbytes_config_keeps_new_parts_unquantised(tmp_path):
    pytest.importorskip("bitsandbytes", reason="the [quant] extra")
    from transformers import BitsAndBytesConfig

    from visincontext.training import DataArguments, ModelArguments, build_model_and_processor

    model, _ = build_model_and_processor(ModelArguments(), DataArguments())
    model.save_pretrained(tmp_path)
    quantized = AutoModelForImageTextToText.from_pretrained(
        tmp_path, quantization_config=BitsAndBytesConfig(load_in_4bit=True), device_map={"": "cpu"}
    )
    kinds = {name: type(module).__name__ for name, module in quantized.named_modules()}
    assert kinds["model.language_model.layers.0.decoder_layer.self_attn.q_proj"] == "Linear4bit"
    for name, kind in kinds.items():
        if any(
            part in name for part in ("resampler", "gated_cross_attention", "vision_tower", "lm_head", "contrastive")
        ):
            assert kind != "Linear4bit", name
    quantized.train()  # before any no-grad forward (bitsandbytes repacks 4-bit weights in eval mode on CPU)
    batch = sample_batch()
    batch["pixel_values"] = torch.randn(2, 2, 3, 64, 64)
    batch["context_pixel_values"] = torch.randn(2, 3, 3, 64, 64)
    assert torch.isfinite(quantized(**batch, labels=batch["input_ids"]).loss)


@pytest.mark.parametrize(
    "change,argument",
    [
        (dict(input_ids=torch.tensor([[5, 6, 7, 8, 9, EOC_ID, 10, 11, 12, 13, VOCAB + 2]] * 2)), "input_ids"),
        (dict(input_ids=torch.tensor([[-1] + [5] * 10] * 2)), "input_ids"),
        (dict(attention_mask=torch.ones(2, 7, dtype=torch.long)), "attention_mask"),
    ],
)
def test_out_of_vocabulary_ids_and_wrong_attention_mask_are_refused(change, argument):
    model = tiny_model()
    batch = dict(sample_batch(), **change)
    if argument == "input_ids":
        batch = {k: v for k, v in batch.items() if not k.startswith(("pixel", "image"))}
    with pytest.raises(ValueError, match=f"{argument}: (ids|expected shape)"):
        model(**batch)


def test_a_folder_without_config_json_is_an_error(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ValueError, match="pretrained_model_name_or_path: no config.json"):
        VisInContextForConditionalGeneration.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="config.json"):  # transformers' own error for the Auto classes
        AutoModelForImageTextToText.from_pretrained(tmp_path, trust_remote_code=True)


# ---- the explicit media memory (issue 18) ------------------------------------------------------------------------

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.invariant
def test_media_layout_matches_the_pinned_outputs():
    """Logits and greedy tokens of four models (sum/concat x immediate/all earlier images, with and without token
    masking) equal those of the layout before the explicit `MediaMemory` (tests/fixtures, written at 32e8ee4)."""
    from safetensors.torch import load_file

    tensors = load_file(FIXTURES / "pinned_media_layout.safetensors")
    meta = json.loads((FIXTURES / "pinned_media_layout.json").read_text())
    batch = {k.removeprefix("batch/"): v for k, v in tensors.items() if k.startswith("batch/")}
    masked = batch.pop("image_latents_mask")
    weights = {k.removeprefix("weights/"): v for k, v in tensors.items() if k.startswith("weights/")}
    for case in meta["cases"]:
        model = VisInContextForConditionalGeneration(tiny_config(**case["settings"])).eval()
        model.load_state_dict(weights, strict=True)
        with torch.no_grad():
            logits = model(**batch).logits
            logits_masked = model(**batch, image_latents_mask=masked).logits
        assert (logits - tensors[f"{case['name']}/logits"]).abs().max() <= 1e-6, case
        assert (logits_masked - tensors[f"{case['name']}/logits_image_latents_masked"]).abs().max() <= 1e-6, case
        generated = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(generated, tensors[f"{case['name']}/generated"]), case


@pytest.mark.parametrize("fusion", ["sum", "concat"])
def test_each_block_projects_the_images_and_pages_once(fusion):
    """One `to_kv` call per block per forward, over (images + pages) x latents rows: the context is not projected
    once per chunk."""
    model = open_gates(tiny_model(latent_fusion=fusion), 0.5)
    batch = sample_batch()
    rows = []
    for layer in model.model.language_model.layers:
        layer.gated_cross_attention.cross_attention.to_kv.register_forward_hook(
            lambda m, args, out: rows.append(args[0].shape[1])
        )
    with torch.no_grad():
        out = model(**batch)
    L = model.config.num_latents
    assert rows == [(2 + 3) * L] * len(model.config.cross_attention_layers)  # 2 images + 3 pages, once per block
    slots = out.media.slot_chunk.numel()
    assert slots == ((2 + 1) * 3 * L if fusion == "sum" else (2 + 3) * L)


@pytest.mark.invariant
def test_a_document_encoded_once_answers_several_prompts():
    """`encode_media` once, then `generate(media=...)` for a batch of prompts: the same tokens as one-shot
    `generate` with the pages for each prompt; the memory is not changed by the calls."""
    model = open_gates(tiny_model(), 0.8)
    g = torch.Generator().manual_seed(4)
    pages = torch.randn(1, 3, 3, 32, 32, generator=g)
    prompts = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]])
    memory = model.encode_media(context_pixel_values=pages)
    before = {k: v.clone() for k, v in memory.items()}
    versions = {k: v._version for k, v in memory.items()}
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    reused = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), media=memory, **kwargs)
    for row in range(3):
        one_shot = model.generate(
            input_ids=prompts[row : row + 1],
            attention_mask=torch.ones(1, 4, dtype=torch.long),
            context_pixel_values=pages,
            **kwargs,
        )
        assert torch.equal(reused[row], one_shot[0]), row
    again = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), media=memory, **kwargs)
    assert torch.equal(again, reused)
    assert all(torch.equal(memory[k], before[k]) and memory[k]._version == versions[k] for k in before)
    with pytest.raises(ValueError, match="media: a memory of 2 samples cannot serve a batch of 3"):
        model(input_ids=prompts, media=model.encode_media(context_pixel_values=pages.expand(2, -1, -1, -1, -1)))


def test_no_split_modules_come_from_the_model_and_its_backbones():
    """The class lists its own blocks; `post_init` adds the backbones' (CLIP, Llama) layers."""
    model = tiny_model()
    assert VisInContextForConditionalGeneration._no_split_modules == ["VisInContextDecoderLayer", "PerceiverResampler"]
    assert {"VisInContextDecoderLayer", "PerceiverResampler", "CLIPEncoderLayer", "LlamaDecoderLayer"} <= set(
        model._no_split_modules
    )
