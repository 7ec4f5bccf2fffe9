"""Conversations (issue 19): the processor's chat template with images and rendered context, `pipeline` on messages,
fine-tuning rows in chat and MIMIC-IT formats trained on the assistant turns, and the evaluation harness in chat."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import IMAGE_ID, open_gates, tiny_model, tiny_processor
from transformers import AutoProcessor, pipeline

from visincontext.data import VisInContextCollator, format_row
from visincontext.processing_visincontext import CHAT_PREAMBLE, VisInContextProcessor, chat_template_for

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
MESSAGES = [
    {
        "role": "user",
        "content": [
            {"type": "context", "text": "Notes: the red shape is a circle."},
            {"type": "image", "image": IMAGE},
            {"type": "text", "text": "What is the red shape?"},
        ],
    },
]


def test_the_default_template_lays_out_images_text_and_context():
    processor = tiny_processor()
    assert processor.apply_chat_template(MESSAGES) == "User: <image>What is the red shape?\n"
    assert processor.apply_chat_template(MESSAGES, add_generation_prompt=True) == (
        "User: <image>What is the red shape?\nAssistant: "
    )
    answered = [*MESSAGES, {"role": "assistant", "content": [{"type": "text", "text": "a circle"}]}]
    assert processor.apply_chat_template(answered) == (
        "User: <image>What is the red shape?\nAssistant: a circle<|endofchunk|>\n"
    )


def test_tokenized_template_equals_the_processor_on_its_string():
    processor = tiny_processor()
    inputs = processor.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    direct = processor(images=[IMAGE], text=prompt, context="Notes: the red shape is a circle.", return_tensors="pt")
    pages = len(processor.render("Notes: the red shape is a circle."))
    assert inputs.keys() == direct.keys() and int(inputs["context_mask"].sum()) == pages >= 1
    for key in direct:
        assert torch.equal(inputs[key], direct[key]), key
    assert (inputs["input_ids"] == IMAGE_ID).sum() == 1


def test_a_batch_of_conversations():
    processor = tiny_processor()
    second = [{"role": "user", "content": [{"type": "text", "text": "No image, no context here."}]}]
    batch = processor.apply_chat_template(
        [MESSAGES, second], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    pages = len(processor.render("Notes: the red shape is a circle."))
    assert batch["image_mask"].tolist() == [[True], [False]] and batch["context_mask"].sum(1).tolist() == [pages, 0]
    shorter = int(batch["attention_mask"].sum(1).argmin())
    assert batch["attention_mask"][shorter, 0] == 0 and batch["attention_mask"][shorter, -1] == 1  # left-padded


def test_pipeline_on_messages_equals_generate(tmp_path):
    model = open_gates(tiny_model(), 0.7)
    processor = tiny_processor()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    pipe = pipeline("image-text-to-text", model=str(tmp_path), trust_remote_code=True)
    out = pipe(text=MESSAGES, generate_kwargs=dict(max_new_tokens=6, do_sample=False))
    inputs = processor.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    answer = processor.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert out[0]["generated_text"][-1] == {"role": "assistant", "content": answer}


def test_the_template_survives_save_and_reload(tmp_path):
    processor = tiny_processor()
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == processor.chat_template
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert reloaded.chat_template == processor.chat_template == chat_template_for(None)
    assert reloaded.apply_chat_template(MESSAGES, add_generation_prompt=True) == processor.apply_chat_template(
        MESSAGES, add_generation_prompt=True
    )


def test_the_language_models_own_template_gives_the_roles():
    chatml = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    processor = tiny_processor(chat_template=chat_template_for(chatml))
    assert processor.chat_template.startswith(CHAT_PREAMBLE) and chatml in processor.chat_template
    assert processor.apply_chat_template(MESSAGES, add_generation_prompt=True) == (
        "<|im_start|>user\n<image>What is the red shape?<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    "messages,fragment",
    [
        (
            [{"role": "user", "content": [{"type": "video", "video": "x.mp4"}]}],
            r"messages\[0\].content\[0\]: unknown content type 'video'",
        ),
        (
            [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image"}]}],
            r"messages\[0\].content\[1\]: an image item without an image",
        ),
        (
            [{"role": "user", "content": "hi"}, {"role": "user", "content": [{"type": "context", "text": 3}]}],
            r"messages\[1\].content\[0\]: a context item needs a string",
        ),
        ([{"content": "no role"}], r"messages\[0\]: expected a message with a 'role'"),
    ],
)
def test_bad_messages_name_the_message_and_the_item(messages, fragment):
    with pytest.raises(ValueError, match=fragment):
        tiny_processor().apply_chat_template(messages, tokenize=True, return_dict=True)


# ---- fine-tuning on conversations ---------------------------------------------------------------------------------


def trained_text(processor, sample) -> str:
    batch = VisInContextCollator(processor)([sample])
    labels = batch["labels"][0]
    return processor.decode(labels[labels != -100])


def test_chat_rows_train_on_the_assistant_turns_only():
    processor = tiny_processor()
    row = json.loads((DATA / "chat_sample.jsonl").read_text().splitlines()[0])
    sample = format_row(row, "chat", processor=processor, image_root=str(DATA))
    assert len(sample["images"]) == 2 and sample["context"].startswith("The pictures show")
    answers = [m["content"][0]["text"] for m in row["messages"] if m["role"] == "assistant"]
    assert [sample["text"][a:b] for a, b in sample["train_spans"]] == [f"{a}<|endofchunk|>" for a in answers]
    # exact positions: the trained tokens are the answers' tokens and nothing else
    batch = VisInContextCollator(processor)([sample])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    expected = torch.zeros_like(ids, dtype=torch.bool)
    offsets = processor.tokenizer(sample["text"], return_offsets_mapping=True)["offset_mapping"]
    for position, (start, _) in enumerate(offsets):
        expected[position] = any(a <= start < b for a, b in sample["train_spans"])
    assert torch.equal(labels != -100, expected)
    assert trained_text(processor, sample) == "".join(f"{a}<|endofchunk|>" for a in answers)


@pytest.mark.parametrize("in_context", ["text", "rendered"])
def test_mimicit_rows_train_on_the_query_answer_only(in_context):
    processor = tiny_processor()
    row = json.loads((DATA / "mimicit_sample.jsonl").read_text().splitlines()[0])
    sample = format_row(row, "mimicit", processor=processor, image_root=str(DATA), in_context=in_context)
    if in_context == "text":  # the in-context triplets are earlier turns, trained on like the query's answer
        assert len(sample["images"]) == 4 and sample["context"] is None
        expected = [e["answer"] for e in row["in_context"]] + [row["answer"]]
    else:  # rendered into pages, without their images; only the query's answer is trained on
        assert len(sample["images"]) == 1 and row["in_context"][0]["instruction"] in sample["context"]
        expected = [row["answer"]]
    assert trained_text(processor, sample) == "".join(f"{a}<|endofchunk|>" for a in expected)


def test_finetune_script_on_chat_rows(tmp_path):
    import sys

    sys.path.insert(0, str(ROOT / "examples"))
    from finetune import DEFAULTS

    from visincontext.training import main

    metrics = main(
        DEFAULTS,
        [
            "--dataset",
            str(DATA / "chat_sample.jsonl"),
            "--data_format",
            "chat",
            "--output_dir",
            str(tmp_path),
            "--max_steps",
            "4",
            "--use_cpu",
            "--logging_steps",
            "1",
            "--learning_rate",
            "3e-3",
        ],
    )
    losses = [e["lm_loss"] for e in metrics["log_history"] if "lm_loss" in e]
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_evaluation_in_chat(tmp_path):
    from visincontext.evaluation import build_messages, evaluate, get_task, load_examples

    task = get_task("easy-vqa")
    queries, support = load_examples(task, None, limit=4), load_examples(task, None, split="train", limit=20)
    rendered = build_messages(task, support[:2], queries[0], "rendered")
    assert rendered[0]["content"][0]["type"] == "context" and len(rendered) == 1
    assert len(build_messages(task, support[:2], queries[0], "text")) == 5
    from visincontext.training import DataArguments, ModelArguments, build_model_and_processor

    model, processor = build_model_and_processor(ModelArguments(), DataArguments())
    results = evaluate(model, processor, task, queries, support, [0, 2], ["text", "rendered"], chat=True, batch_size=2)
    assert {(r.shots, r.context_mode) for r in results} == {(0, "text"), (0, "rendered"), (2, "text"), (2, "rendered")}


# ---- with the real SmolLM2-135M-Instruct (its ChatML template) ----------------------------------------------------


@pytest.mark.slow
def test_smollm2_instruct_backbone_gives_a_template_for_images_and_context(smollm2, tmp_path):
    from tiny import vision_config
    from transformers import CLIPImageProcessorPil, CLIPVisionModel

    from visincontext import VisInContextForConditionalGeneration

    folder, gguf = smollm2
    CLIPVisionModel(vision_config(image_size=64, hidden_size=64)).save_pretrained(tmp_path / "clip")
    CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(
        tmp_path / "clip"
    )
    processor = VisInContextProcessor.from_backbones(
        str(tmp_path / "clip"), str(folder), tokenizer_kwargs={"gguf_file": gguf}
    )
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\n<image>What is the red shape?<|im_end|>\n<|im_start|>assistant\n"
    )
    model = VisInContextForConditionalGeneration.from_backbones(
        str(tmp_path / "clip"),
        str(folder),
        language_model_kwargs={"gguf_file": gguf, "dtype": torch.float32},
        cross_attention_every=15,
        num_latents=8,
        resampler_depth=1,
    )
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    reloaded = AutoProcessor.from_pretrained(tmp_path / "model")
    assert (
        reloaded.chat_template == processor.chat_template
        and reloaded.apply_chat_template(MESSAGES, add_generation_prompt=True) == prompt
    )
    pipe = pipeline("image-text-to-text", model=str(tmp_path / "model"), trust_remote_code=True)
    out = pipe(text=MESSAGES, generate_kwargs=dict(max_new_tokens=8, do_sample=False))
    inputs = reloaded.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    loaded = pipe.model
    answer = reloaded.decode(
        loaded.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1] :],
        skip_special_tokens=True,
    )
    assert out[0]["generated_text"][-1] == {"role": "assistant", "content": answer}
    # with its gates at 0 the model is the instruct LM: it answers in words
    assert len(answer.split()) >= 2, answer
