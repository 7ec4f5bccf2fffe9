"""Bad input fails safe (issue 17): every command line exits 0 on success and with one clear line otherwise,
checks its output before working and writes it whole; unclear errors name the argument."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import IMAGE_ID, sample_batch, tiny_config, tiny_model, tiny_processor

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT / "src"))
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd or ROOT, timeout=600
    )


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert fragment in result.stderr.strip().splitlines()[-1], result.stderr


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from visincontext.training import DataArguments, ModelArguments, build_model_and_processor

    folder = tmp_path_factory.mktemp("model")
    model, processor = build_model_and_processor(ModelArguments(), DataArguments())
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# ---- visincontext-render ------------------------------------------------------------------------------------


def test_render_cli_exits_0_and_fails_with_one_line(tmp_path):
    done = cli("-m", "visincontext.render", "some text", "-o", str(tmp_path / "page.png"))
    assert done.returncode == 0 and done.stdout.strip() == f"1 pages -> {tmp_path / 'page.png'}"
    overflow = cli(
        "-m",
        "visincontext.render",
        "x " * 5000,
        "--max-pages",
        "1",
        "--overflow",
        "error",
        "-o",
        str(tmp_path / "cut.png"),
    )
    assert_one_line_error(overflow, "max_pages")
    (tmp_path / "folder.png").mkdir()
    assert_one_line_error(cli("-m", "visincontext.render", "text", "-o", str(tmp_path / "folder.png")), "--output")
    assert_one_line_error(cli("-m", "visincontext.render", "--file", str(tmp_path / "none.txt")), "--file")
    assert not (tmp_path / "cut.png").exists() and not list(tmp_path.glob(".*"))


def test_console_script_exit_status(tmp_path):
    """`visincontext-render` (the console script calls `sys.exit(main())`) exits 0 after success."""
    from visincontext.render import main

    assert main(["text", "-o", str(tmp_path / "p.png")]) == 0
    assert main(["text", "--max-pages", "1", "--overflow", "error", "-o", str(tmp_path / "q.png")]) == 0
    assert main(["x " * 5000, "--max-pages", "1", "--overflow", "error", "-o", str(tmp_path / "r.png")]) == 2


# ---- python -m visincontext.evaluation ------------------------------------------------------------------------


def test_evaluation_cli_checks_its_output_and_arguments_before_working(saved_model, tmp_path):
    base = ["-m", "visincontext.evaluation", "--model", str(saved_model), "--task", "easy-vqa", "--shots", "0"]
    (tmp_path / "existing").mkdir()
    assert_one_line_error(cli(*base, "--output", str(tmp_path / "existing")), "--output")
    (tmp_path / "taken.json").mkdir()
    assert_one_line_error(cli(*base, "--output", str(tmp_path / "taken.json")), "--output")
    for value in ("0", "-2"):
        assert_one_line_error(cli(*base, "--limit", value, "--output", str(tmp_path / "r.json")), "--limit")
    assert_one_line_error(cli(*base, "--batch-size", "0", "--output", str(tmp_path / "r.json")), "--batch-size")
    assert not (tmp_path / "r.json").exists()
    done = cli(*base, "--limit", "4", "--output", str(tmp_path / "out" / "r.json"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "r.json").read_text())["results"][0]["num_examples"] == 4


def test_evaluation_data_errors_name_the_file_line_and_record(tmp_path):
    from visincontext.evaluation import get_task, load_examples

    task = get_task("okvqa")
    malformed = tmp_path / "bad.jsonl"
    malformed.write_text('{"question": "q", "answers": ["a"]}\n{"question": "q" "answers": []}\n')
    with pytest.raises(ValueError, match=r"data: .*bad.jsonl line 2: not valid JSON"):
        load_examples(task, [str(malformed)])
    unanswered = tmp_path / "noanswers.jsonl"
    unanswered.write_text('{"question": "q", "answers": ["a"]}\n{"question": "no answers here"}\n')
    with pytest.raises(ValueError, match=r"data: .*noanswers.jsonl record 1: no answers"):
        load_examples(task, [str(unanswered)])


# ---- examples/publish.py and the model card ---------------------------------------------------------------------


def test_publish_script_fails_with_one_line_and_model_index_entries_stay_apart(saved_model, tmp_path):
    from huggingface_hub import ModelCard

    script = str(ROOT / "examples" / "publish.py")
    results = [
        {
            "task_type": "visual-question-answering",
            "dataset_type": "easy-vqa",
            "dataset_name": "easy-VQA",
            "dataset_config": f"{shots}-shot-{mode}",
            "metric_type": "vqa_accuracy",
            "metric_name": f"vqa_accuracy ({shots}-shot, {mode} context)",
            "metric_value": value,
        }
        for (shots, mode), value in {(0, "text"): 0.25, (4, "text"): 0.5, (4, "rendered"): 0.75}.items()
    ]
    (tmp_path / "results.json").write_text(json.dumps(results))
    args = [
        "--model",
        str(saved_model),
        "--out",
        str(tmp_path / "hub"),
        "--repo-id",
        "you/tiny",
        "--dry-run",
        "--eval-results",
        str(tmp_path / "results.json"),
    ]
    first = cli(script, *args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert_one_line_error(cli(script, *args), "--out")  # run again without --overwrite
    card = ModelCard.load(tmp_path / "hub" / "README.md")
    entries = card.data.to_dict()["model-index"][0]["results"]
    assert len(entries) == 3 and sorted(e["dataset"]["config"] for e in entries) == [
        "0-shot-text",
        "4-shot-rendered",
        "4-shot-text",
    ]
    assert [len(e["metrics"]) for e in entries] == [1, 1, 1]
    assert "before every layer of the language model" in card.text and "1. layer" not in card.text
    results[1]["metric_value"] = "high"
    (tmp_path / "bad.json").write_text(json.dumps(results))
    bad = cli(
        script,
        "--model",
        str(saved_model),
        "--out",
        str(tmp_path / "hub2"),
        "--repo-id",
        "you/tiny",
        "--dry-run",
        "--eval-results",
        str(tmp_path / "bad.json"),
    )
    assert_one_line_error(bad, "eval_results[1].metric_value: expected a number")
    assert not (tmp_path / "hub2").exists()


def test_card_placement_reads_right():
    from visincontext.hub import _placement

    assert [_placement(k) for k in (1, 2, 3, 4, 11, 22)] == [
        "every layer",
        "every 2nd layer",
        "every 3rd layer",
        "every 4th layer",
        "every 11th layer",
        "every 22nd layer",
    ]


def test_a_killed_runs_staging_and_temporary_files_are_cleaned_by_the_next_run(tmp_path):
    from visincontext.hub import prepare_repo

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has ended
    (tmp_path / f".repo.staging-{pid}").mkdir()
    (tmp_path / f".repo.staging-{pid}" / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / f".repo.tmp-{pid}").mkdir()
    alive = tmp_path / f".repo.staging-{os.getpid()}-other"  # not a leftover (name does not match)
    alive.mkdir()
    prepare_repo(tiny_model(), tiny_processor(), tmp_path / "repo")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["repo", alive.name])


# ---- unclear errors, each naming the argument --------------------------------------------------------------------


def test_config_values_of_the_wrong_type():
    with pytest.raises(TypeError, match="num_latents: expected an integer, got 'abc'"):
        tiny_config(num_latents="abc")
    with pytest.raises(ValueError, match="resampler_depth: expected a positive integer"):
        tiny_config(resampler_depth=0)


def test_garbled_processor_config(tmp_path):
    from transformers import AutoProcessor

    tiny_processor().save_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text('{"font_path": "DejaVuSansMono.ttf",')
    from visincontext import VisInContextProcessor

    with pytest.raises(ValueError, match="pretrained_model_name_or_path: .*processor_config.json is not valid JSON"):
        VisInContextProcessor.from_pretrained(tmp_path)
    with pytest.raises(OSError, match="processor_config.json' is not a valid JSON file"):  # transformers' own, clear
        AutoProcessor.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "call,error,fragment",
    [
        (dict(text=[]), ValueError, "text: expected at least one prompt"),
        (
            dict(images=[np.zeros((0, 0, 3), np.uint8)], text="<image>"),
            ValueError,
            "images: image 0 of sample 0 is empty",
        ),
        (dict(images=[Image.new("RGB", (0, 5))], text="<image>"), ValueError, "images: image 0 of sample 0 is empty"),
        (dict(text="a", context="\t\ud800"), ValueError, r"context: lone surrogate U\+D800 at index 1 "),
        (
            dict(text=["fine", "bad \udc80"], context=None),
            ValueError,
            r"text: lone surrogate U\+DC80 at index 4 of sample 1",
        ),
    ],
)
def test_processor_inputs(call, error, fragment):
    with pytest.raises(error, match=fragment):
        tiny_processor()(**call, return_tensors="pt")


@pytest.mark.parametrize(
    "change,error,fragment",
    [
        (
            dict(pixel_values=torch.zeros(2, 2, 1, 32, 32)),
            ValueError,
            r"pixel_values: expected \(batch, images, 3, 32, 32\)",
        ),
        (
            dict(pixel_values=torch.zeros(2, 2, 3, 64, 64)),
            ValueError,
            r"pixel_values: expected \(batch, images, 3, 32, 32\)",
        ),
        (dict(pixel_values=torch.zeros(2, 2, 32, 32, 3)), ValueError, "channels last"),
        (dict(context_pixel_values=torch.zeros(2, 3, 3, 16, 16)), ValueError, "context_pixel_values: expected"),
        (
            dict(pixel_values=torch.zeros(2, 2, 3, 32, 32, dtype=torch.uint8)),
            TypeError,
            "pixel_values: expected a float",
        ),
        (dict(image_mask=torch.tensor([[1.0, 1.0], [1.0, 0.0]])), TypeError, "image_mask: expected a bool"),
        (dict(context_mask=torch.tensor([[2, 0, 0], [0, 0, 0]])), ValueError, "context_mask: expected 0/1"),
        (dict(labels=torch.zeros(2, 7, dtype=torch.long)), ValueError, r"labels: expected shape \(2, 11\)"),
        (
            dict(
                input_ids=torch.zeros(2, 0, dtype=torch.long), attention_mask=None, pixel_values=None, image_mask=None
            ),
            ValueError,
            "input_ids: expected at least one token",
        ),
        (dict(context_input_ids=torch.zeros(3, 4, dtype=torch.long)), ValueError, "context_input_ids: expected"),
    ],
)
def test_model_inputs(change, error, fragment):
    model = tiny_model()
    batch = {k: v for k, v in dict(sample_batch(), **change).items() if v is not None}
    with pytest.raises(error, match=fragment):
        model(**batch)


def test_integer_masks_are_accepted_as_booleans():
    model = tiny_model()
    batch = sample_batch()
    with torch.no_grad():
        expected = model(**batch).logits
        as_ints = model(
            **dict(batch, image_mask=batch["image_mask"].long(), context_mask=batch["context_mask"].int())
        ).logits
    assert torch.equal(expected, as_ints)
    assert (batch["input_ids"] == IMAGE_ID).any()
