"""examples/inference.py: a saved folder answers a question about rendered context, as `generate` does in-process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from visincontext.hub import prepare_repo
from visincontext.testing import open_gates, tiny_model, tiny_processor

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "inference.py"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A Hub folder whose answers depend on its pages (gates open) and decode losslessly (printable ASCII only)."""
    processor = tiny_processor()
    model = open_gates(tiny_model(seed=3, initializer_range=0.5), 1.0)
    printable = {processor.tokenizer(chr(c), add_special_tokens=False).input_ids[0] for c in range(32, 127)}
    vocab = model.get_output_embeddings().weight.shape[0]
    model.generation_config.suppress_tokens = [i for i in range(vocab) if i not in printable]
    return prepare_repo(model, processor, tmp_path_factory.mktemp("inference") / "repo")


def answer(folder: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    command = [sys.executable, str(SCRIPT), str(folder), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def generated(folder: Path, context: str | None, question: str, max_new_tokens: int) -> str:
    """What `generate` answers in-process, with the context item or (None) without one."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    content = [{"type": "text", "text": question}]
    if context is not None:
        content.insert(0, {"type": "context", "text": context})
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_the_inference_example_answers_as_generate_does_from_the_context(folder):
    context, question = "The vault code is 4417. " * 5, "What is the vault code?"
    run = answer(folder, "--context", context, "--question", question, "--max_new_tokens", "8")
    assert run.returncode == 0, run.stderr[-3000:]
    printed = run.stdout.rstrip("\n")
    assert printed == generated(folder, context, question, 8)
    assert printed != generated(folder, None, question, 8)  # the pages reached the model


def test_the_inference_example_names_a_bad_argument(folder):
    run = answer(folder, "--context", "x", "--question", "y", "--max_new_tokens", "0")
    assert run.returncode == 2 and "--max_new_tokens: expected a positive integer, got 0" in run.stderr
    run = answer(folder, "--question", "y")
    assert run.returncode == 2 and "--context" in run.stderr.splitlines()[-1]
