"""Training: collator, data formatting, Trainer scripts, resume, QLoRA, DeepSpeed (issue: training)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from tiny import IMAGE_ID, tiny_processor
from transformers import AutoModelForImageTextToText, AutoTokenizer

from visincontext.data import VisInContextCollator, format_dataset, format_row
from visincontext.training import main

ROOT = Path(__file__).resolve().parents[1]
OBELICS = ROOT / "examples" / "data" / "obelics_sample.jsonl"
sys.path.insert(0, str(ROOT / "examples"))


def image(seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8))


def test_pretrain_script_learns_and_saves_loadable_model(tmp_path):
    from pretrain import DEFAULTS

    metrics = main(
        DEFAULTS,
        [
            "--output_dir",
            str(tmp_path),
            "--max_steps",
            "30",
            "--use_cpu",
            "--learning_rate",
            "3e-3",
            "--logging_steps",
            "1",
            "--lr_scheduler_type",
            "constant",
        ],
    )
    losses = [entry["loss"] for entry in metrics["log_history"] if "loss" in entry]
    assert len(losses) == 30
    assert np.mean(losses[-3:]) < 0.6 * losses[0], losses
    assert all("lm_loss" in e and "contrastive_loss" in e for e in metrics["log_history"] if "loss" in e)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(model).__name__ == "VisInContextForConditionalGeneration"
    assert (tmp_path / "processor_config.json").exists() and (tmp_path / "model.safetensors").exists()


def _masking_samples(n: int, images: int = 1) -> list[dict]:
    return [
        {"images": [None] * images, "prompt": "", "text": f"sample {i}", "context": None, "row_index": i}
        for i in range(n)
    ]


def test_collator_token_masking_rate_and_seed():
    processor = tiny_processor()
    collator = VisInContextCollator(processor, token_mask_prob=0.3, seed=123)
    samples = _masking_samples(10_000)
    image_mask = torch.ones(10_000, 1, dtype=torch.bool)
    first = collator.image_latents_mask(samples, image_mask)
    rate = 1 - first.float().mean().item()
    assert abs(rate - 0.3) < 0.015, rate
    again = VisInContextCollator(processor, token_mask_prob=0.3, seed=123).image_latents_mask(samples, image_mask)
    other = VisInContextCollator(processor, token_mask_prob=0.3, seed=124).image_latents_mask(samples, image_mask)
    next_epoch = VisInContextCollator(processor, token_mask_prob=0.3, seed=123, epoch=1).image_latents_mask(
        samples, image_mask
    )
    assert torch.equal(first, again) and not torch.equal(first, other) and not torch.equal(first, next_epoch)
    padded = collator.image_latents_mask(_masking_samples(100, images=2), torch.tensor([[True, False]] * 100))
    assert not padded[:, 1].any()  # padding slots are never "kept"


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 10**6), min_size=1, max_size=12, unique=True),
    st.randoms(use_true_random=False),
    st.integers(1, 4),
    st.integers(0, 3),
)
def test_property_token_masks_depend_only_on_seed_epoch_and_row(rows, rng, batch_size, epoch):
    """The promise of the collator's docstring: a sample's mask is the same in any batch, order or batch size
    (so in any worker or process, and after a resumed run), for a given seed and epoch."""
    collator = VisInContextCollator(tiny_processor(), token_mask_prob=0.5, seed=7, epoch=epoch)
    samples = [{"images": [None] * 3, "prompt": "", "text": "t", "context": None, "row_index": r} for r in rows]
    alone = {s["row_index"]: collator.image_latents_mask([s], torch.ones(1, 3, dtype=torch.bool))[0] for s in samples}
    order = list(samples)
    rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        masks = collator.image_latents_mask(chunk, torch.ones(len(chunk), 3, dtype=torch.bool))
        for sample, mask in zip(chunk, masks):
            assert torch.equal(mask, alone[sample["row_index"]])


def test_collator_labels_mask_exactly_padding_media_and_prompt():
    processor = tiny_processor()
    samples = [
        format_row({"image": image(), "question": "what?", "answer": "a red circle"}, "vqa"),
        format_row({"image": image(1), "caption": "two shapes"}, "pair"),
    ]
    batch = VisInContextCollator(processor)(samples)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    tokenizer = processor.tokenizer
    for row, sample in enumerate(samples):
        prompt_tokens = (
            len(tokenizer(sample["prompt"], add_special_tokens=False)["input_ids"]) if sample["prompt"] else 0
        )
        trained = labels[row] != -100
        expected = (mask[row] == 1) & (ids[row] != IMAGE_ID)
        expected[:prompt_tokens] = False
        assert torch.equal(trained, expected), (row, trained, expected)
        assert processor.decode(ids[row][trained]) == sample["text"].replace("<image>", "")
    assert "image_latents_mask" not in batch  # token_mask_prob=0: nothing dropped


def test_interleaved_row_renders_earlier_text_as_context():
    row = {
        "images": [None, image(), None, None, image(1), None],
        "texts": ["Alpha beta gamma.", None, "Delta.", "Epsilon zeta.", None, "Eta."],
    }
    # texts until half the characters are seen become context; what follows stays as tokens
    sample = format_row(row, "interleaved", context_fraction=0.5)
    assert sample["context"] == "Alpha beta gamma.\n\nDelta."
    assert sample["text"] == "Epsilon zeta.<image>Eta.<|endofchunk|>"
    assert len(sample["images"]) == 1
    early = format_row(row, "interleaved", context_fraction=0.2)
    assert early["context"] == "Alpha beta gamma."
    assert (
        early["text"] == "<image>Delta. Epsilon zeta.<|endofchunk|><image>Eta.<|endofchunk|>"
        and len(early["images"]) == 2
    )
    mmc4 = {
        "text_list": ["Alpha beta gamma.", "Delta.", "Eta."],
        "image_info": [{"matched_text_index": 1, "image": image()}],
    }
    assert format_row(mmc4, "mmc4")["text"] == "<image>Delta. Eta.<|endofchunk|>"
    text_only = format_row({"text": "one two three four five six"}, "text")
    assert text_only["context"] + text_only["text"] == "one two three four five six" and not text_only["images"]


def test_bad_rows_name_their_index_or_are_skipped(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [
        {"images": ["ok.png", None], "texts": [None, "fine"]},
        {"images": [None], "texts": ["a", "b"]},  # lengths differ
        {"texts": ["no images key"]},  # missing key
        {"images": ["broken.png", None], "texts": [None, "unreadable image"]},
        {"images": [None, "ok.png", None], "texts": ["context here", None, "fine too"]},
    ]
    dataset, _ = format_dataset(rows, "interleaved", image_root=str(tmp_path))
    assert dataset[0]["text"] == "<image>fine<|endofchunk|>"
    for index, fragment in ((1, "different lengths"), (2, "missing key"), (3, "cannot identify image")):
        with pytest.raises(ValueError, match=f"row {index}: .*{fragment}"):
            dataset[index]
    dataset, counter = format_dataset(rows, "interleaved", skip_bad_rows=True, image_root=str(tmp_path))
    samples = [dataset[i] for i in range(len(rows))]
    assert [s is None for s in samples] == [False, True, True, True, False] and sorted(counter.skipped) == [1, 2, 3]
    batch = VisInContextCollator(tiny_processor())(samples)  # bad rows are dropped from their batch
    assert batch["input_ids"].shape[0] == 2


def test_resume_matches_uninterrupted_run(tmp_path):
    """Stopped at step 5 of 10 and resumed from its checkpoint, with token masking on: the weights end where an
    uninterrupted run's end (the masks are a function of seed, epoch and row, not of a generator's history)."""
    from pretrain import DEFAULTS

    common = [
        "--use_cpu",
        "--learning_rate",
        "3e-3",
        "--lr_scheduler_type",
        "constant",
        "--logging_steps",
        "1",
        "--token_mask_prob",
        "0.5",
        "--seed",
        "7",
    ]
    straight = main(DEFAULTS, ["--output_dir", str(tmp_path / "a"), "--max_steps", "10", *common])
    main(
        DEFAULTS,
        [
            "--output_dir",
            str(tmp_path / "b"),
            "--max_steps",
            "5",
            "--save_strategy",
            "steps",
            "--save_steps",
            "5",
            *common,
        ],
    )
    resumed = main(
        DEFAULTS,
        [
            "--output_dir",
            str(tmp_path / "b"),
            "--max_steps",
            "10",
            "--resume_from_checkpoint",
            str(tmp_path / "b" / "checkpoint-5"),
            *common,
        ],
    )
    loss_a = [e["loss"] for e in straight["log_history"] if "loss" in e][-1]
    loss_b = [e["loss"] for e in resumed["log_history"] if "loss" in e][-1]
    assert abs(loss_a - loss_b) < 1e-5
    a = AutoModelForImageTextToText.from_pretrained(tmp_path / "a").state_dict()
    b = AutoModelForImageTextToText.from_pretrained(tmp_path / "b").state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_qlora_trains_adapters_and_new_modules_only(tmp_path):
    pytest.importorskip("bitsandbytes", reason="the [quant] extra")
    from peft import PeftModel

    from visincontext.training import (
        DataArguments,
        ModelArguments,
        build_model_and_processor,
        quantization_config,
    )

    base, processor = build_model_and_processor(ModelArguments(), DataArguments())
    base.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    args = ModelArguments(model_name_or_path=str(tmp_path / "base"), lora_r=4, load_in_4bit=True)
    model, processor = build_model_and_processor(args, DataArguments())
    assert (
        type(model.base_model.model.model.language_model.layers[0].decoder_layer.self_attn.k_proj).__name__
        == "Linear4bit"
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = [json.loads(line) for line in OBELICS.read_text().splitlines()[:8]]
    dataset, _ = format_dataset(rows, "interleaved", image_root=str(OBELICS.parent))
    batch = VisInContextCollator(processor, return_context_ids=True)([dataset[i] for i in range(8)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(5):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)
    assert any("context_resampler" in n for n in changed) and any("gated_cross_attention" in n for n in changed)
    frozen_4bit = [n for n, p in model.named_parameters() if p.dtype == torch.uint8]
    assert frozen_4bit and not set(frozen_4bit) & changed
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path / "adapter")
    fresh = AutoModelForImageTextToText.from_pretrained(
        tmp_path / "base", quantization_config=quantization_config(), device_map={"": "cpu"}
    )
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, expected)


def _launch(tmp_path, config: str, processes: int, steps: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "examples" / "accelerate" / config),
        "--num_processes",
        str(processes),
        str(ROOT / "examples" / "pretrain.py"),
        "--output_dir",
        str(tmp_path),
        "--max_steps",
        str(steps),
        "--use_cpu",
        "--logging_steps",
        "1",
    ]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)


@pytest.mark.slow
def test_deepspeed_zero2_two_processes(tmp_path):
    pytest.importorskip("deepspeed", reason="the [deepspeed] extra")
    result = _launch(tmp_path, "deepspeed_zero2.yaml", processes=2, steps=3)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "DeepSpeed: DeepSpeedEngine, ZeRO stage 2, 2 processes" in result.stdout, result.stdout[-2000:]
    model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(model).__name__ == "VisInContextForConditionalGeneration"


@pytest.mark.slow
def test_deepspeed_zero3_one_process(tmp_path):
    pytest.importorskip("deepspeed", reason="the [deepspeed] extra")
    result = _launch(tmp_path, "deepspeed_zero3.yaml", processes=1, steps=2)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "DeepSpeed: DeepSpeedEngine, ZeRO stage 3, 1 processes" in result.stdout, result.stdout[-2000:]
    # full weights, not ZeRO-3 placeholders: from_pretrained finds every weight with its full shape
    model, info = AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # the embedding has a row for every token of the saved tokenizer (the media tokens included)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert model.model.language_model.embed_tokens.weight.shape == (len(tokenizer), 64)


def test_prerendered_pages_match_rendering_on_the_fly():
    from datasets import load_dataset

    from visincontext.data import prerender

    processor = tiny_processor(max_pages=3)
    rows = load_dataset("json", data_files=str(OBELICS), split="train").select(range(6))
    ahead = prerender(rows, "interleaved", processor, num_proc=2, image_root=str(OBELICS.parent))
    assert ahead.features["context_pages"].shape[1:] == (32, 32)
    on_the_fly, _ = format_dataset(rows, "interleaved", image_root=str(OBELICS.parent))
    stored, _ = format_dataset(ahead, "interleaved", image_root=str(OBELICS.parent))
    collator = VisInContextCollator(processor, return_context_ids=True, reading_layout=(4, 8))
    a = collator([on_the_fly[i] for i in range(6)])
    b = collator([stored[i] for i in range(6)])
    assert a.keys() == b.keys() and "context_reading_targets" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the stored pages come back as the RenderedText they were: each page's text, cut characters, cells
    from visincontext.data import sample_context

    for i in range(6):
        fresh, kept = processor.render(on_the_fly[i]["context"]), sample_context(stored[i])
        assert [fresh.text[a:b] for a, b in fresh.spans] == [kept.text[a:b] for a, b in kept.spans]
        assert kept.kept_text == fresh.kept_text and kept.cut_characters == fresh.cut_characters
        assert np.array_equal(kept.pages, fresh.pages) and np.array_equal(kept.cells, fresh.cells)


# ---- the user's path (issue 16) ------------------------------------------------------------------------------


def test_max_length_drops_the_images_of_cut_image_tokens():
    """Truncation that cuts `<image>` tokens drops their images too, so the batch stays consistent."""
    processor = tiny_processor()
    sample = format_row(
        {"images": [image(0), None, image(1), None], "texts": [None, "a" * 20, None, "b" * 20]},
        "interleaved",
        context_fraction=0.0,
    )
    assert sample["text"].count("<image>") == 2
    batch = VisInContextCollator(processor, max_length=15)([sample, format_row({"text": "short text"}, "text")])
    assert batch["input_ids"].shape[1] == 15 and (batch["input_ids"] == IMAGE_ID).sum().item() == 1
    assert batch["image_mask"].tolist() == [[True, False], [False, False]]  # the cut image is dropped
    reference = processor.image_processor([image(0)], return_tensors="pt")["pixel_values"][0]
    assert torch.equal(batch["pixel_values"][0, 0], reference)  # the kept image is the first one
    from tiny import tiny_model

    assert torch.isfinite(tiny_model()(**batch).loss)


def test_predict_returns_logits_and_evaluate_reports_the_loss_parts(tmp_path):
    from transformers import TrainingArguments

    from visincontext.training import DataArguments, ModelArguments, VisInContextTrainer, build_model_and_processor

    model, processor = build_model_and_processor(ModelArguments(), DataArguments())
    rows = [json.loads(line) for line in OBELICS.read_text().splitlines()[:8]]
    dataset, _ = format_dataset(rows, "interleaved", image_root=str(OBELICS.parent))
    collator = VisInContextCollator(processor, return_context_ids=True)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to=[], use_cpu=True, remove_unused_columns=False
    )
    trainer = VisInContextTrainer(
        model=model, args=args, eval_dataset=dataset, data_collator=collator, processing_class=processor
    )
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_lm_loss", "eval_contrastive_loss"} <= set(metrics)
    assert abs(metrics["eval_loss"] - (metrics["eval_lm_loss"] + 0.5 * metrics["eval_contrastive_loss"])) < 1e-3
    prediction = trainer.predict(dataset)
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    assert logits.ndim == 3 and logits.shape[0] == 8 and logits.shape[2] == model.config.output_vocab_size
    assert "test_lm_loss" in prediction.metrics


def test_prerender_names_or_skips_bad_rows(tmp_path):
    from datasets import Dataset

    from visincontext.data import prerender

    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    rows = Dataset.from_list(
        [
            {"images": [None, "ok.png", None], "texts": ["context one", None, "fine"]},
            {"images": [None, "missing.png", None], "texts": ["context two", None, "no image file"]},
        ]
    )
    processor = tiny_processor()
    with pytest.raises(ValueError, match="row 1: .*missing.png"):
        prerender(rows, "interleaved", processor, image_root=str(tmp_path))
    ahead = prerender(rows, "interleaved", processor, skip_bad_rows=True, image_root=str(tmp_path))
    dataset, counter = format_dataset(ahead, "interleaved", skip_bad_rows=True, image_root=str(tmp_path))
    samples = [dataset[i] for i in range(2)]
    assert samples[1] is None and sorted(counter.skipped) == [1] and "missing.png" in counter.skipped[1]
    assert VisInContextCollator(processor)(samples)["input_ids"].shape[0] == 1


def test_a_missing_image_at_collation_names_its_row(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    samples = [
        {"images": [str(tmp_path / "gone.png")], "prompt": "", "text": "<image>x", "context": None, "row_index": 17}
    ]
    with pytest.raises(ValueError, match=r"rows \[17\].*gone.png"):
        VisInContextCollator(tiny_processor())(samples)


def test_streamed_rows_are_read_once_across_processes_and_workers(tmp_path):
    """A stream is split once: by accelerate across processes and by `datasets` across DataLoader workers."""
    from accelerate.data_loader import prepare_data_loader
    from datasets import load_dataset

    files = []
    for shard in range(4):
        path = tmp_path / f"part{shard}.jsonl"
        path.write_text("".join(json.dumps({"text": f"row {shard}-{i} " + "x " * 10}) + "\n" for i in range(5)))
        files.append(str(path))
    stream = load_dataset("json", data_files=files, split="train", streaming=True)
    formatted, _ = format_dataset(stream, "text")
    seen = []
    for process in range(2):
        loader = torch.utils.data.DataLoader(formatted, batch_size=2, num_workers=2, collate_fn=lambda batch: batch)
        shard = prepare_data_loader(
            loader, num_processes=2, process_index=process, dispatch_batches=False, put_on_device=False
        )
        seen += [sample["context"].split()[1] for batch in shard for sample in batch]
    assert sorted(seen) == sorted(f"{s}-{i}" for s in range(4) for i in range(5))


def test_auto_peft_model_loads_an_adapter(tmp_path):
    """`AutoPeftModel` reads the adapter's base model class from `visincontext`, which PEFT imports only when
    allowed: `import_allowlist=["visincontext"]` (the README's LoRA section)."""
    from peft import AutoPeftModel, PeftModel

    from visincontext.training import DataArguments, ModelArguments, build_model_and_processor

    base, processor = build_model_and_processor(ModelArguments(), DataArguments())
    base.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    model, processor = build_model_and_processor(
        ModelArguments(model_name_or_path=str(tmp_path / "base"), lora_r=4), DataArguments()
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "adapter")
    processor.save_pretrained(tmp_path / "adapter")
    rows = [json.loads(line) for line in OBELICS.read_text().splitlines()[:2]]
    dataset, _ = format_dataset(rows, "interleaved", image_root=str(OBELICS.parent))
    batch = VisInContextCollator(processor)([dataset[0], dataset[1]])
    with torch.no_grad():
        expected = model.eval()(**batch).logits
        loaded = AutoPeftModel.from_pretrained(str(tmp_path / "adapter"), import_allowlist=["visincontext"]).eval()
        assert isinstance(loaded, PeftModel)
        assert torch.allclose(loaded(**batch).logits, expected, atol=1e-5)
    # one vocabulary size: the saved tokenizer has an id per embedding row, so AutoPeftModel resized nothing
    rows = base.get_input_embeddings().weight.shape[0]
    assert len(processor.tokenizer) == rows == loaded.get_input_embeddings().weight.shape[0]
    assert loaded.base_model.model.config.text_config.vocab_size == rows


def test_the_default_pretraining_run_shows_every_loss_learning(tmp_path):
    """The README's one-process pretraining line on the shipped sample data: LM and contrastive losses both fall
    (the contrastive one below 0.8 x ln(batch size)), and every logged `loss` is the weighted sum of its parts."""
    import math

    from pretrain import DEFAULTS

    metrics = main(
        DEFAULTS,
        [
            "--output_dir",
            str(tmp_path),
            "--max_steps",
            "30",
            "--use_cpu",
            "--learning_rate",
            "3e-3",
            "--logging_steps",
            "5",
        ],
    )
    logs = [entry for entry in metrics["log_history"] if "loss" in entry]
    assert len(logs) == 6
    for entry in logs:
        assert abs(entry["loss"] - (entry["lm_loss"] + 0.5 * entry["contrastive_loss"])) < 2e-3, entry
    assert logs[-1]["lm_loss"] < 0.8 * logs[0]["lm_loss"]
    assert logs[-1]["contrastive_loss"] < 0.8 * math.log(DEFAULTS["per_device_train_batch_size"]), logs
