"""The path a user takes, end to end, with the package's own scripts (slow).

pretrain (TCCL and token masking on; one process, and two under the README's DeepSpeed launch) -> reload in a fresh
process (backbones still frozen, left padding, batched generation = one by one) -> the evaluation CLI -> finetune
continues from it -> a run killed after a checkpoint and resumed equals an uninterrupted one -> `prepare_repo`
loads and generates where `visincontext` cannot be imported.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText

import visincontext  # noqa: F401  (registers the Auto classes for the folders loaded here)

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "examples" / "pretrain.py"
COMMON = [
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
    "3",
    "--disable_tqdm",
    "true",
]


def environment() -> dict:
    return dict(
        os.environ, HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT / "src"), PYTHONUNBUFFERED="1"
    )


def run(args: list[str], timeout: int = 900) -> str:
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=environment(), timeout=timeout)
    assert result.returncode == 0, (args, result.stdout[-2000:], result.stderr[-4000:])
    return result.stdout


def train_logs(folder: Path) -> list[dict]:
    return [e for e in json.loads((folder / "trainer_state.json").read_text())["log_history"] if "loss" in e]


def assert_loss_is_the_weighted_sum(logs: list[dict]) -> None:
    for entry in logs:
        assert abs(entry["loss"] - (entry["lm_loss"] + 0.5 * entry["contrastive_loss"])) < 2e-3, entry


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """One process, per-device batch 8, and two DeepSpeed processes of 4: the same 8 rows in their first step."""
    root = tmp_path_factory.mktemp("user_path")
    start = time.perf_counter()
    run(
        [
            sys.executable,
            str(PRETRAIN),
            "--output_dir",
            str(root / "one"),
            "--max_steps",
            "6",
            "--per_device_train_batch_size",
            "8",
            *COMMON,
        ]
    )
    one = time.perf_counter() - start
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "examples" / "accelerate" / "deepspeed_zero2.yaml"),
        "--num_processes",
        "2",
        str(PRETRAIN),
        "--output_dir",
        str(root / "two"),
        "--max_steps",
        "6",
        "--per_device_train_batch_size",
        "4",
        *COMMON,
    ]
    output = run(launch)
    assert "DeepSpeed: DeepSpeedEngine, ZeRO stage 2, 2 processes" in output
    print(f"pretraining: one process {one:.1f}s, two DeepSpeed processes {time.perf_counter() - start - one:.1f}s")
    return root


@pytest.mark.slow
def test_logged_loss_adds_up_in_one_and_in_two_processes(pretrained):
    one, two = train_logs(pretrained / "one"), train_logs(pretrained / "two")
    assert len(one) == len(two) == 6
    assert_loss_is_the_weighted_sum(one)
    assert_loss_is_the_weighted_sum(two)
    # the first step sees the same 8 rows in both runs: the LM loss agrees up to how the two halves average
    assert abs(one[0]["lm_loss"] - two[0]["lm_loss"]) < 0.05 * one[0]["lm_loss"], (one[0], two[0])


RELOAD = """
import json, sys
import numpy as np, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from visincontext import VisInContextForConditionalGeneration
folder = sys.argv[1]
model = AutoModelForImageTextToText.from_pretrained(folder).eval()
processor = AutoProcessor.from_pretrained(folder)
fresh = VisInContextForConditionalGeneration(model.config)
trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
assert trainable == sorted(n for n, p in fresh.named_parameters() if p.requires_grad), "backbones unfrozen"
rng = np.random.default_rng(0)
image = lambda: Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
samples = [([], "Notes: the", None), ([image()], "<image>The first picture shows a", "Things to bring: a lamp"),
           ([image(), image()], "<image>one<|endofchunk|><image>two, and so", "Quarter results\\nlamps 120 4%")]
batch = processor(images=[s[0] for s in samples], text=[s[1] for s in samples], context=[s[2] for s in samples],
                  return_tensors="pt")
assert batch["attention_mask"][0, 0] == 0, "not left-padded"
kwargs = dict(max_new_tokens=6, do_sample=False, eos_token_id=None)
together = model.generate(**batch, **kwargs)[:, -6:].tolist()
alone = []
for images, text, context in samples:
    inputs = processor(images=images or None, text=text, context=context, return_tensors="pt")
    alone.append(model.generate(**inputs, **kwargs)[0, -6:].tolist())
assert together == alone, (together, alone)
print("RELOADED", json.dumps({"trainable": len(trainable), "generated": together}))
"""


@pytest.mark.slow
def test_reloaded_model_is_frozen_pads_left_and_generates_in_a_batch_as_one_by_one(pretrained):
    for folder in ("one", "two"):
        output = run([sys.executable, "-c", textwrap.dedent(RELOAD), str(pretrained / folder)])
        assert "RELOADED" in output
        assert not list((pretrained / folder).glob("*.bin"))  # no pickle in a saved model folder


@pytest.mark.slow
def test_evaluation_cli_and_finetuning_continue_from_the_pretrained_folder(pretrained, tmp_path):
    results = tmp_path / "eval" / "results.json"
    run(
        [
            sys.executable,
            "-m",
            "visincontext.evaluation",
            "--model",
            str(pretrained / "one"),
            "--task",
            "easy-vqa",
            "--shots",
            "0",
            "2",
            "--limit",
            "8",
            "--batch-size",
            "4",
            "--output",
            str(results),
        ]
    )
    report = json.loads(results.read_text())
    assert {(r["shots"], r["context_mode"]) for r in report["results"]} == {
        (0, "text"),
        (0, "rendered"),
        (2, "text"),
        (2, "rendered"),
    }
    run(
        [
            sys.executable,
            str(ROOT / "examples" / "finetune.py"),
            "--model_name_or_path",
            str(pretrained / "one"),
            "--output_dir",
            str(tmp_path / "finetuned"),
            "--max_steps",
            "3",
            "--use_cpu",
            "--disable_tqdm",
            "true",
        ]
    )
    before = AutoModelForImageTextToText.from_pretrained(pretrained / "one").state_dict()
    after = AutoModelForImageTextToText.from_pretrained(tmp_path / "finetuned").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(not k.startswith("model.vision_tower.") for k in changed)  # fine-tuned, tower frozen


@pytest.mark.slow
def test_a_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    args = [sys.executable, str(PRETRAIN), *COMMON, "--save_strategy", "steps", "--save_steps", "4"]
    run([*args, "--output_dir", str(tmp_path / "straight"), "--max_steps", "12"])
    killed = subprocess.Popen(
        [*args, "--output_dir", str(tmp_path / "killed"), "--max_steps", "400"],
        cwd=ROOT,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = tmp_path / "killed" / "checkpoint-4"
    deadline = time.time() + 600
    while not (checkpoint / "trainer_state.json").exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # let it run on past the checkpoint
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    run(
        [
            *args,
            "--output_dir",
            str(tmp_path / "killed"),
            "--max_steps",
            "12",
            "--resume_from_checkpoint",
            str(checkpoint),
        ]
    )
    a = AutoModelForImageTextToText.from_pretrained(tmp_path / "straight").state_dict()
    b = AutoModelForImageTextToText.from_pretrained(tmp_path / "killed").state_dict()
    difference = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"kill-and-resume: max weight difference {difference:.3g}")
    assert difference <= 1e-6


PUBLISH = """
import sys
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from visincontext.hub import prepare_repo
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1]).eval()
processor = AutoProcessor.from_pretrained(sys.argv[1])
prepare_repo(model, processor, sys.argv[2])
inputs = processor(images=[Image.new("RGB", (40, 30), "red")], text="<image>The first picture shows a",
                   context="Things to bring: a lamp", return_tensors="pt")
print("TOKENS", model.generate(**inputs, max_new_tokens=6, do_sample=False)[0].tolist())
"""

LOAD_BARE = """
import sys
sys.modules["visincontext"] = None  # not importable: only the folder's remote code can be used
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
inputs = processor(images=[Image.new("RGB", (40, 30), "red")], text="<image>The first picture shows a",
                   context="Things to bring: a lamp", return_tensors="pt")
print("TOKENS", model.generate(**inputs, max_new_tokens=6, do_sample=False)[0].tolist())
"""


@pytest.mark.slow
def test_prepare_repo_loads_where_visincontext_is_not_importable(pretrained, tmp_path):
    expected = run([sys.executable, "-c", textwrap.dedent(PUBLISH), str(pretrained / "two"), str(tmp_path / "hub")])
    loaded = run([sys.executable, "-c", textwrap.dedent(LOAD_BARE), str(tmp_path / "hub")])
    assert expected.split("TOKENS")[1].strip() == loaded.split("TOKENS")[1].strip()
