"""Every runnable code block of the README runs (issue: quickstart + docs).

Python blocks run with the big checkpoints they name replaced by tiny local ones of the same kinds (a
CLIP vision tower and a Llama LM saved here, a prepared VisInContext folder for "your-name/..."). Bash blocks
run line by line, except `pip install` lines and launches that need GPUs or several machines (README says so).
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, CLIPVisionModel

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)


def blocks(language):
    return [body for lang, body in BLOCKS if lang == language]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Tiny stand-ins for the checkpoints the README names."""
    from visincontext.testing import text_config, tiny_tokenizer, vision_config
    from visincontext.training import DataArguments, ModelArguments, build_model_and_processor

    root = tmp_path_factory.mktemp("readme")
    torch.manual_seed(0)
    CLIPVisionModel(vision_config(image_size=64, hidden_size=64)).save_pretrained(root / "clip")
    lm = AutoModelForCausalLM.from_config(text_config(hidden_size=64))
    lm.save_pretrained(root / "lm")
    tiny_tokenizer().save_pretrained(root / "lm")
    from transformers import CLIPImageProcessorPil

    CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(root / "clip")
    model, processor = build_model_and_processor(ModelArguments(), DataArguments())
    model.save_pretrained(root / "hub-model")
    processor.save_pretrained(root / "hub-model")
    (root / "outputs").mkdir()
    return root


def substitute(code: str, root: Path) -> str:
    return (code.replace("openai/clip-vit-large-patch14", str(root / "clip"))
                .replace("cross_attention_every=4", "cross_attention_every=1")  # the tiny LM has 2 layers
                .replace("mistralai/Mistral-7B-v0.1", str(root / "lm"))
                .replace("your-name/visincontext-model\", trust", f"{root / 'hub-model'}\", trust"))


def run(command, root, timeout=900):
    env = dict(os.environ, HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT / "src"))
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, (command, result.stderr[-3000:])
    return result.stdout


def test_the_readme_opens_with_the_two_commands():
    first = blocks("bash")[0].strip().splitlines()
    assert first == [
        'pip install torch==2.13.0 -e . && python examples/quickstart.py',
        'pip install torch==2.13.0 -e ".[test]" && python -m pytest tests -q',
    ]
    assert (ROOT / ".ci" / "run").read_text().count("sed -n 2p") == 1  # .ci/run runs the second line


@pytest.mark.slow
def test_python_blocks_run(workspace):
    python_blocks = blocks("python")
    assert len(python_blocks) == 3
    # inference, backbones, publishing: the publishing block reads outputs/pretrain, written by the bash block
    run([sys.executable, "-c", substitute(python_blocks[0], workspace)], workspace)
    output = run([sys.executable, "-c", substitute(python_blocks[1], workspace)], workspace)
    assert "image_resampler" in output
    (workspace / "outputs" / "pretrain").symlink_to(workspace / "hub-model")
    output = run([sys.executable, "-c", substitute(python_blocks[2], workspace)], workspace)
    assert "README.md" in output and "config.json" in output
    (workspace / "outputs" / "pretrain").unlink()


@pytest.mark.slow
def test_bash_blocks_run(workspace):
    lines = []
    for body in blocks("bash")[2:]:  # after the two set-up commands and the install block
        joined = body.replace("\\\n", " ")
        lines += [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]
    runnable = [line for line in lines if line.startswith("python ")]
    launches = [line for line in lines if line.startswith("accelerate launch")]
    assert len(runnable) == 5 and len(launches) == 2  # the launches need GPUs (README says so)
    for line in runnable:
        args = shlex.split(substitute(line, workspace))
        args[0] = sys.executable
        args = [str(ROOT / a) if a.startswith("examples/") else a for a in args]
        if "finetune.py" in line:
            args += ["--max_steps", "3"]
        if "synthetic_recall.py" in line:  # a few steps, not the 2 x 30 minutes of the full experiment
            args += ["--max_steps", "20", "--eval_every", "10", "--eval_size", "8", "--final_eval_size", "16",
                     "--output_dir", str(workspace / "outputs" / "recall"), "--quiet"]
        run(args, workspace)
    assert (workspace / "outputs" / "eval" / "results.md").exists()
    assert (workspace / "outputs" / "qlora" / "adapter" / "adapter_config.json").exists()
    assert (workspace / "outputs" / "recall" / "synthetic_recall_curves.png").exists()
