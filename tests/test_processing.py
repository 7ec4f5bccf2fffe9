"""VisInContextProcessor: batching, padding, saving and remote code (issue: renderer + processor)."""

import os
import subprocess
import sys
import textwrap
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from model_invariants import library_warnings
from PIL import Image
from tiny import IMAGE_ID, open_gates, tiny_model, tiny_processor
from transformers import AutoProcessor

CONTEXT = " ".join(f"Fact {i}: the value of key{i} is {i * 7 % 100}." for i in range(60))


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40 + 3 * i, 50, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def processor():
    return tiny_processor(max_pages=5)


@contextmanager
def cutting_context():
    """CONTEXT is longer than max_pages=5: the processor says it cuts it (and nothing else may be said)."""
    with library_warnings() as said:
        yield
    assert said and all("exceed max_pages=5; overflow='keep_end' cut" in w for w in said), said


def test_batch_padding_and_masks(processor):
    batch = processor(
        images=[images(1), images(3, seed=1)],
        text=["<image>What?", "<image>one<image>two<image>three"],
        context=[None, CONTEXT],
        return_tensors="pt",
    )
    assert batch["pixel_values"].shape == (2, 3, 3, 32, 32)
    assert batch["image_mask"].tolist() == [[True, False, False], [True, True, True]]
    assert batch["pixel_values"][0, 1:].abs().sum() == 0  # padding slots are zeros
    assert batch["context_pixel_values"].shape == (2, 5, 3, 32, 32)
    assert batch["context_mask"].tolist() == [[False] * 5, [True] * 5]
    # left padding: the short prompt's pads come first and are masked
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and mask[1].all()
    assert ids[0, 0] == processor.tokenizer.pad_token_id
    assert (ids == IMAGE_ID).sum(1).tolist() == [1, 3]
    assert processor.decode(ids[1]) == "<image>one<image>two<image>three"
    # each real image equals the image processor's own output for it
    reference = processor.image_processor(images(3, seed=1), return_tensors="pt")["pixel_values"]
    assert torch.equal(batch["pixel_values"][1], reference)
    # each page equals the renderer's pixels, normalised like an image
    rendered = processor.renderer.render(CONTEXT, max_pages=5)
    page = torch.from_numpy(rendered.pages[-1]).float() / 255
    mean, std = processor.image_processor.image_mean[0], processor.image_processor.image_std[0]
    assert torch.allclose(batch["context_pixel_values"][1, -1, 0], (page - mean) / std, atol=1e-6)


@pytest.mark.invariant
def test_model_runs_forward_and_generate_on_processor_output(processor):
    model = open_gates(tiny_model(), 0.5)
    with cutting_context():
        batch = processor(
            images=[images(1), images(3, seed=1)],
            text=["<image>What?", "<image>one<image>two<image>three"],
            context=[None, CONTEXT],
            return_tensors="pt",
        )
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()
    generated = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert generated.shape == (2, batch["input_ids"].shape[1] + 4)
    # the padded sample generates the same tokens as it does alone
    alone = processor(images=images(1), text="<image>What?", return_tensors="pt")
    single = model.generate(**alone, max_new_tokens=4, do_sample=False)
    assert torch.equal(single[0, -4:], generated[0, -4:])


@pytest.mark.invariant
def test_batched_generation_equals_one_by_one(processor):
    """Three prompts of different lengths, with 0, 1 and 2 images and no, short and long context: each row of the
    left-padded batch generates exactly the tokens (and scores) the sample generates alone."""
    model = open_gates(tiny_model(), 0.7)
    samples = [
        dict(images=[], text="Question: no image here? Answer:", context=None),
        dict(images=images(1, seed=2), text="<image>one?", context="A short context."),
        dict(images=images(2, seed=3), text="<image>first<|endofchunk|><image>second, longer prompt:", context=CONTEXT),
    ]
    kwargs = dict(
        max_new_tokens=5, do_sample=False, eos_token_id=None, output_scores=True, return_dict_in_generate=True
    )
    with cutting_context():
        batch = processor(
            images=[s["images"] for s in samples],
            text=[s["text"] for s in samples],
            context=[s["context"] for s in samples],
            return_tensors="pt",
        )
    together = model.generate(**batch, **kwargs)
    for row, sample in enumerate(samples):
        with library_warnings() as said:
            alone = processor(
                images=sample["images"] or None, text=sample["text"], context=sample["context"], return_tensors="pt"
            )
        assert len(said) == (sample["context"] == CONTEXT), said  # only the long context is cut
        single = model.generate(**alone, **kwargs)
        assert torch.equal(single.sequences[0, -5:], together.sequences[row, -5:]), row
        for step in range(5):
            assert torch.allclose(single.scores[step][0], together.scores[step][row], atol=1e-4), (row, step)


def test_context_ids_follow_the_kept_text(processor):
    batch = processor(text=["x", "y"], context=["short context", CONTEXT], return_tensors="pt", return_context_ids=True)
    kept = processor.renderer.render(CONTEXT, max_pages=5)
    kept_text = kept.text[kept.spans[0][0] : kept.spans[-1][1]]
    ids = batch["context_input_ids"][1][batch["context_attention_mask"][1].bool()]
    assert processor.decode(ids) == kept_text and kept.truncated


@pytest.mark.invariant
def test_save_and_reload_in_fresh_process_renders_identically(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"DejaVuSansMono.ttf", "DejaVuSans.ttf", "processing_visincontext.py", "rendering_visincontext.py"} <= files
    assert not any(f.endswith((".bin", ".pkl", ".pt")) for f in files)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded).__name__ == "VisInContextProcessor" and reloaded.max_pages == 5
    with cutting_context():
        expected = processor(images=images(1), text="<image>caption:", context=CONTEXT, return_tensors="pt")
    torch.save(dict(expected), tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["visincontext"] = None  # only the remote code in the folder may be used
        import numpy as np, torch
        from PIL import Image
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
        rng = np.random.default_rng(0)
        image = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
        out = processor(images=[image], text="<image>caption:", context={CONTEXT!r}, return_tensors="pt")
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        assert out.keys() == expected.keys(), (out.keys(), expected.keys())
        for key in out:
            assert torch.equal(out[key], expected[key]), key
        print("IDENTICAL", processor.renderer.font_path)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        cwd=tmp_path.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    font_used = result.stdout.split("IDENTICAL")[1].strip()
    assert font_used == str(tmp_path / "DejaVuSansMono.ttf")  # the font saved with the processor


@pytest.mark.parametrize(
    "call,error,argument",
    [
        (dict(images=[], text="<image><image>two"), ValueError, "text"),
        (dict(images=images(2), text="<image>one"), ValueError, "text"),
        (dict(text="hi", context=123), TypeError, "context"),
        (dict(text=["a", "b"], context=["only one"]), ValueError, "context"),
        (dict(text=None), ValueError, "text"),
        (dict(text=["a", 5]), TypeError, "text"),
        (dict(images=images(3), text=["<image>", "<image>"]), ValueError, "images"),
    ],
)
def test_bad_input_names_the_argument(processor, call, error, argument):
    with pytest.raises(error, match=argument):
        processor(**call, return_tensors="pt")


def test_bad_settings_name_the_argument():
    with pytest.raises(ValueError, match="font_path"):
        tiny_processor(font_path="/no/such/font.ttf")
    with pytest.raises(ValueError, match="page_height"):
        tiny_processor(page_height=-1)


def test_a_processor_saved_after_right_padded_batches_still_pads_left(tmp_path):
    """Training batches pad on the right (the collator asks for it); the tokenizer then saves "right" in its
    files, and the reloaded processor must still pad prompts on the left, as `generate` needs."""
    processor = tiny_processor()
    processor(text=["a", "bbb"], padding_side="right", return_tensors="pt")
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    batch = reloaded(text=["a", "bbb"], return_tensors="pt")
    assert batch["attention_mask"].tolist() == [[0, 0, 1], [1, 1, 1]]
    assert reloaded(text=["a", "bbb"], padding_side="right", return_tensors="pt")["attention_mask"].tolist() == [
        [1, 0, 0],
        [1, 1, 1],
    ]


# ---- one door for context: text, or text rendered ahead of time ------------------------------------------------------


@pytest.mark.parametrize("words", [0, 3, 40, 400])
def test_a_rendered_text_gives_what_its_text_gives(words):
    """`processor(context=RenderedText)` (pages rendered ahead of time) is `processor(context=str)`: pixels, mask,
    reading targets, context tokens and cut characters alike."""
    processor = tiny_processor(max_pages=3)
    texts = [" ".join(f"word{i}" for i in range(words)), "a second sample's context"]
    options = dict(return_context_ids=True, reading_layout=(4, 8), return_tensors="pt")
    prompts = ["Question one?", "Question two?"]
    from_text = processor(text=prompts, context=texts, **options)
    from_pages = processor(text=prompts, context=[processor.render(t) for t in texts], **options)
    assert from_text.keys() == from_pages.keys()
    for key in from_text:
        assert torch.equal(from_text[key], from_pages[key]), key


def test_a_rendered_text_that_does_not_fit_the_processor_is_refused():
    from dataclasses import replace

    processor = tiny_processor(max_pages=2)
    rendered = tiny_processor(max_pages=8).render("some words " * 30)
    assert len(rendered) > 2
    with pytest.raises(ValueError, match="context: RenderedText 0 has .* over max_pages=2"):
        processor(text="Q?", context=rendered)
    small = processor.renderer.render("a few words")
    with pytest.raises(ValueError, match=r"context: RenderedText 0 has pages of shape \(1, 16, 16\)"):
        processor(text="Q?", context=replace(small, pages=small.pages[:, :16, :16]))
    with pytest.raises(ValueError, match="context: RenderedText 0 has 1 pages but 0 cell grids"):
        processor(text="Q?", context=replace(small, cells=small.cells[:0]))
    with pytest.raises(TypeError, match="context: expected a string, RenderedText or None, got bytes at index 0"):
        processor(text="Q?", context=b"bytes")


def test_cut_characters_are_returned_only_when_asked_and_the_rest_are_model_inputs():
    processor = tiny_processor(max_pages=1)
    long, short = "many words here " * 40, "few words"
    inputs = processor(text=["Q?", "Q?"], context=[long, short])
    assert set(inputs) == set(processor.model_input_names)
    with_cut = processor(text=["Q?", "Q?"], context=[long, short], return_cut_characters=True)
    rendered = processor.render(long)
    assert with_cut["context_cut_characters"].tolist() == [rendered.cut_characters, 0] and rendered.cut_characters > 0
    model = tiny_model()
    assert torch.isfinite(model(**inputs).logits).all()  # processor output goes to the model as it is
