"""Every code block of the README, of docs/ and of experiments/README.md runs (issue: quickstart + docs).

Python blocks run with the big checkpoints they name replaced by tiny local ones of the same kinds (a
CLIP vision tower and a Llama LM saved here, a prepared VisInContext folder for "your-name/..."). Bash blocks
run line by line: the install lines in a fresh virtual environment with this checkout in place of the PyPI
name (the `[flash]` line needs CUDA and says so); the GPU launches on this CPU with 2 processes, tiny
backbones and the sample data, the two-node launch as two local "nodes".
"""

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, CLIPVisionModel

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# the README, then the pages it sends readers to, in this order: every code block of them runs
DOCUMENTS = ["README.md", "docs/how-it-works.md", "docs/openflamingo.md", "docs/training.md", "docs/serving.md"]
DOCUMENTS += ["docs/performance.md", "docs/compatibility.md", "experiments/README.md"]
BLOCKS = [block for name in DOCUMENTS for block in re.findall(r"```(\w+)\n(.*?)```", (ROOT / name).read_text(), re.S)]


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

    CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(
        root / "clip"
    )
    model, processor = build_model_and_processor(ModelArguments(), DataArguments())
    model.save_pretrained(root / "hub-model")
    processor.save_pretrained(root / "hub-model")
    (root / "outputs").mkdir()
    return root


def substitute(code: str, root: Path) -> str:
    return (
        code.replace("openai/clip-vit-large-patch14", str(root / "clip"))
        .replace("cross_attention_every=4", "cross_attention_every=1")  # the tiny LM has 2 layers
        .replace("mistralai/Mistral-7B-v0.1", str(root / "lm"))
        .replace('your-name/visincontext-model", trust', f'{root / "hub-model"}", trust')
    )


def environment():
    return dict(
        os.environ, HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT / "src"), PYTHONUNBUFFERED="1"
    )


def run(command, root, timeout=900):
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, env=environment(), timeout=timeout)
    if result.returncode:
        print(result.stderr)  # all of it, in the failing test's captured output
    assert result.returncode == 0, (command, result.stderr[-3000:])
    return result.stdout


def command_lines(body: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments dropped."""
    lines = [line.split("  #")[0].strip() for line in body.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_the_readme_opens_with_the_two_commands():
    first = blocks("bash")[0].strip().splitlines()
    assert first == [
        "pip install torch==2.13.0 -e . && python examples/quickstart.py",
        'pip install torch==2.13.0 -e ".[test]" && python -m pytest tests -q -m "not slow"',
    ]
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.count("sed -n 2p") == 1  # .ci/run runs the second line
    assert "pytest tests -q -m slow" in ci  # and then the slow set, so CI still runs every test


TRAINABLE_NAMES_PRINTED = [
    "model.image_resampler.latents",
    "model.image_resampler.layers.0.0.norm_media.weight",
    "model.image_resampler.layers.0.0.norm_media.bias",
]


@pytest.mark.slow
def test_python_blocks_run(workspace):
    python_blocks = blocks("python")
    assert len(python_blocks) == 3
    # inference, backbones, publishing: the publishing block reads outputs/pretrain, written by the bash block
    run([sys.executable, "-c", substitute(python_blocks[0], workspace)], workspace)
    output = run([sys.executable, "-c", substitute(python_blocks[1], workspace)], workspace)
    # the trainable names it prints, as the README shows them being printed (the first three)
    assert output.strip().splitlines()[-1] == str(TRAINABLE_NAMES_PRINTED), output
    (workspace / "outputs" / "pretrain").symlink_to(workspace / "hub-model")
    output = run([sys.executable, "-c", substitute(python_blocks[2], workspace)], workspace)
    assert "README.md" in output and "config.json" in output
    (workspace / "outputs" / "pretrain").unlink()


@pytest.mark.slow
def test_bash_blocks_run(workspace):
    lines = [line for body in blocks("bash")[2:] for line in command_lines(body)]  # after set-up and install
    runnable = [line for line in lines if line.startswith("python ")]
    launches = [line for line in lines if line.startswith("accelerate launch")]
    assert len(runnable) == 9 and len(launches) == 3  # the launches: test_accelerate_launch_lines_run
    for line in runnable:
        args = shlex.split(substitute(line, workspace))
        args[0] = sys.executable
        args = [str(ROOT / a) if a.startswith(("examples/", "experiments/")) else a for a in args]
        if "finetune.py" in line:
            args += ["--max_steps", "3"]
        if "synthetic_recall.py" in line:  # a few steps, not the 2 x 30 minutes of the full experiment
            args += [
                "--max_steps",
                "20",
                "--eval_every",
                "10",
                "--eval_size",
                "8",
                "--final_eval_size",
                "16",
                "--output_dir",
                str(workspace / "outputs" / "recall"),
                "--quiet",
            ]
        if "needle.py" in line:  # three steps per stage and one question per (pages, depth), not 45 minutes
            output = workspace / "outputs" / ("needle-blank" if "--baselines" in line else "needle")
            args += ["--max-steps", "3", "--eval-every", "2", "--eval-per-cell", "1", "--family-eval-per-cell", "1"]
            args += ["--output-dir", str(output)]
            args += ["--quiet"]
        run(args, workspace)
    assert (workspace / "outputs" / "eval" / "results.md").exists()
    needle_runs = {
        folder: set(json.loads((workspace / "outputs" / folder / "needle.json").read_text())["runs"])
        for folder in ("needle", "needle-blank")
    }
    assert needle_runs == {"needle": {"rendered", "raw"}, "needle-blank": {"rendered", "blank", "raw"}}
    assert (workspace / "outputs" / "needle" / "needle_heatmap.png").exists()
    compression = json.loads((workspace / "outputs" / "needle" / "needle_compression.json").read_text())
    assert [point["latents_per_page"] for point in compression["compression"]] == [196, 98, 49, 25]
    assert (workspace / "outputs" / "qlora" / "adapter" / "adapter_config.json").exists()
    assert (workspace / "outputs" / "recall" / "synthetic_recall_curves.png").exists()
    sft = json.loads((workspace / "outputs" / "sft" / "config.json").read_text())  # TRL's SFTTrainer saved it
    assert sft["auto_map"]["AutoModelForImageTextToText"].startswith("modeling_visincontext.")


@pytest.mark.slow
def test_install_lines_install_the_package_and_its_extras(tmp_path):
    """The install block, with this checkout in place of the PyPI name, in a fresh virtual environment that
    sees this environment's packages through a .pth file (so only visincontext itself is built and installed,
    and nothing is downloaded but the build backend)."""
    lines = command_lines(blocks("bash")[1])
    assert [line.split()[:2] for line in lines] == [["pip", "install"]] * 6
    flash = [line for line in lines if "[flash]" in line]
    assert len(flash) == 1 and "CUDA only" in blocks("bash")[1]  # flash-attn builds against CUDA: not run here
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site_packages = subprocess.run(
        [str(python), "-c", where], capture_output=True, text=True, check=True
    ).stdout.strip()
    ours = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    Path(site_packages, "this_environment.pth").write_text("\n".join(ours) + "\n")  # after the venv's own packages
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    for line in lines:
        if line in flash:
            continue
        args = [
            str(ROOT) + a.removeprefix("visincontext") if a.startswith("visincontext") else a for a in shlex.split(line)
        ]
        assert args[2].startswith(str(ROOT)), line
        result = subprocess.run(
            [str(python), "-m", *args], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900
        )
        assert result.returncode == 0, (line, result.stderr[-3000:])
        assert "does not provide the extra" not in result.stdout + result.stderr, line
    check = (
        "import importlib.metadata as m, visincontext, bitsandbytes, deepspeed, trl; print(visincontext.__file__); "
        "print(sorted(r for r in m.requires('visincontext') if 'extra ==' in r))"
    )
    result = subprocess.run(
        [str(python), "-c", check], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    location, extras = result.stdout.strip().splitlines()
    assert location.startswith(str(venv)), location  # the copy just installed, not this checkout
    for requirement in (
        'bitsandbytes>=0.48; extra == "quant"',
        'deepspeed>=0.17; extra == "deepspeed"',
        'flash-attn>=2.6; extra == "flash"',
        'trl>=1.16; extra == "trl"',
        'transformers[serving]<6,>=5.25; extra == "serve"',
    ):
        assert requirement in extras, extras


def launch_arguments(line: str, root: Path, output_dir: Path) -> list[str]:
    """A README `accelerate launch` line made to run here: tiny backbones (2 LM layers, so cross-attention at
    every layer), the sample data, 2 steps, CPU."""
    sample_data = ROOT / "examples" / "data" / "obelics_sample.jsonl"
    line = (
        substitute(line, root)
        .replace("HuggingFaceM4/OBELICS", str(sample_data))
        .replace("--max_steps 100000", "--max_steps 2")
        .replace("--output_dir outputs/pretrain", f"--output_dir {output_dir}")
    )
    args = shlex.split(line)
    assert args[:2] == ["accelerate", "launch"], line
    args = [sys.executable, "-m", "accelerate.commands.launch", *args[2:], "--use_cpu", "--cross_attention_every", "1"]
    return [str(ROOT / a) if a.startswith("examples/") else a for a in args]


@pytest.mark.slow
def test_accelerate_launch_lines_run(workspace, tmp_path):
    """The DeepSpeed launches of the Training block: one node with 2 processes instead of 8 GPUs, and the
    two-node line as two local nodes of one process each (ranks 0 and 1 on 127.0.0.1)."""
    lines = [line for body in blocks("bash")[2:] for line in command_lines(body)]
    launches = [line for line in lines if line.startswith("accelerate launch") and "deepspeed" in line]
    single, multi_node = launches
    args = launch_arguments(single, workspace, tmp_path / "single")
    args.insert(3, "--num_processes=2")  # the config's 8 GPUs -> 2 CPU processes
    output = run(args, ROOT)  # from the clone's root, like the README (the configs name their JSON by relative path)
    assert "DeepSpeed: DeepSpeedEngine, ZeRO stage 2, 2 processes" in output, output[-2000:]

    script_arguments = single.split("examples/pretrain.py", 1)[1]
    assert multi_node.endswith("examples/pretrain.py ...") and "--deepspeed_multinode_launcher standard" in multi_node
    multi_node = multi_node.replace("...", script_arguments).replace("--num_processes 16", "--num_processes 2")
    with socket.socket() as probe:  # a free port rather than 29500, which another job may hold
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    multi_node = multi_node.replace(
        "--main_process_ip 10.0.0.1 --main_process_port 29500",
        f"--main_process_ip 127.0.0.1 --main_process_port {port}",
    )
    assert f"--main_process_port {port}" in multi_node, multi_node
    nodes = []
    for rank in (0, 1):
        this_node = multi_node.replace("--machine_rank 0", f"--machine_rank {rank}")
        node = launch_arguments(this_node, workspace, tmp_path / "nodes")
        nodes.append(
            subprocess.Popen(
                node, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment()
            )
        )
    outputs = [node.communicate(timeout=900) for node in nodes]
    for node, (_, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stderr[-3000:]
    assert "DeepSpeed: DeepSpeedEngine, ZeRO stage 2, 2 processes" in outputs[0][0], outputs[0][0][-2000:]
    for folder in ("single", "nodes"):
        reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / folder)
        assert type(reloaded).__name__ == "VisInContextForConditionalGeneration"


@pytest.mark.slow
def test_the_fsdp2_launch_line_runs(workspace, tmp_path):
    """The FSDP2 launch of "Using it with TRL, PEFT, FSDP and DeepSpeed", with 2 CPU processes instead of 8 GPUs,
    through tests/fsdp_on_cpu.py (accelerate's FSDP plugin turned on for CPU processes, as on GPUs)."""
    lines = [line for body in blocks("bash")[2:] for line in command_lines(body)]
    (line,) = [line for line in lines if line.startswith("accelerate launch") and "fsdp2.yaml" in line]
    line = line.replace("--output_dir outputs/fsdp2", f"--output_dir {tmp_path / 'fsdp2'}")
    args = launch_arguments(line, workspace, tmp_path / "fsdp2") + ["--max_steps", "2"]
    args[3:3] = ["--num_processes=2", "--mixed_precision=no"]  # 8 GPUs in bf16 -> 2 CPU processes in fp32
    script = args.index(str(ROOT / "examples" / "pretrain.py"))
    args.insert(script, str(ROOT / "tests" / "fsdp_on_cpu.py"))
    run(args, ROOT)
    config = json.loads((tmp_path / "fsdp2" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == (
        "modeling_visincontext.VisInContextForConditionalGeneration"
    )
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "fsdp2", trust_remote_code=True)
    assert type(reloaded).__name__ == "VisInContextForConditionalGeneration"
