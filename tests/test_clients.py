"""The training clients users already run (issue 36): accelerate FSDP2, the folders wrappers save, AutoPeftModel,
streaming with DataLoader workers, TRL's SFTTrainer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# the package's remote code: what a saved folder holds besides weights, tokenizer and fonts
REMOTE_CODE = {
    "configuration_visincontext.py",
    "modeling_visincontext.py",
    "processing_visincontext.py",
    "rendering_visincontext.py",
    "fonts_visincontext.py",
}
AUTO_MAP = {
    "AutoConfig": "configuration_visincontext.VisInContextConfig",
    "AutoModel": "modeling_visincontext.VisInContextModel",
    "AutoModelForImageTextToText": "modeling_visincontext.VisInContextForConditionalGeneration",
}

GENERATE_IN_A_BARE_PROCESS = """
import json, sys
sys.modules["visincontext"] = None  # not importable: only the folder's remote code may be used
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
folder = sys.argv[1]
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
inputs = processor(text="The capital of", context="Atlantis lies under the sea. " * 3, return_tensors="pt")
print("TOKENS", json.dumps(model.generate(**inputs, max_new_tokens=6, do_sample=False)[0].tolist()))
"""


def generate_in_a_bare_process(folder: Path) -> list[int]:
    """Loads a saved folder with `trust_remote_code=True` where `visincontext` cannot be imported, and generates."""
    run = subprocess.run(
        [sys.executable, "-c", GENERATE_IN_A_BARE_PROCESS, str(folder)],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.split("TOKENS")[1])


def assert_the_package_folder(folder: Path) -> None:
    """A saved model folder: the package's remote-code files and no others, an `auto_map` naming only its classes."""
    code = {name for name in os.listdir(folder) if name.endswith(".py")}
    assert code == REMOTE_CODE, code
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and config["architectures"] == ["VisInContextForConditionalGeneration"]


# ---- accelerate FSDP2 ------------------------------------------------------------------------------------------


def equal_length_rows(path: Path, count: int = 8) -> Path:
    """Text rows whose rendered and trained parts have the same lengths: every sample has as many label tokens, so
    the mean of two processes' losses is the loss of their samples together (and the gradients agree too)."""
    words = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega".split()
    lines = []
    for i in range(count):
        text = " ".join(words[(i + j) % len(words)][:5].ljust(5, "x") for j in range(24))
        lines.append(json.dumps({"text": text}))
    path.write_text("\n".join(lines) + "\n")
    return path


def train(tmp_path: Path, name: str, processes: int, activation_checkpointing: bool = False) -> tuple[list, Path]:
    """examples/pretrain.py for 3 steps on 4 samples a step (4 in one process, or 2 in each of 2 FSDP2 processes)."""
    output = tmp_path / name
    arguments = [
        str(ROOT / "examples" / "pretrain.py"),
        "--dataset",
        str(equal_length_rows(tmp_path / "rows.jsonl")),
        "--data_format",
        "text",
        "--contrastive",
        "False",  # the contrastive loss compares a batch's samples with each other: a batch split in two changes it
        "--token_mask_prob",
        "0",
        "--per_device_train_batch_size",
        str(4 // processes),
        "--max_steps",
        "3",
        "--learning_rate",
        "3e-3",
        "--logging_steps",
        "1",
        "--use_cpu",
        "--seed",
        "0",
        "--output_dir",
        str(output),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT / "src"))
    if processes == 1:
        command = [sys.executable, *arguments]
    else:
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(ROOT / "examples" / "accelerate" / "fsdp2.yaml"),
            "--num_processes",
            str(processes),
            "--mixed_precision",
            "no",
            "--fsdp_activation_checkpointing",
            str(activation_checkpointing).lower(),
            str(TESTS / "fsdp_on_cpu.py"),
            *arguments,
        ]
    run = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry], output


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("one"), "one", processes=1)


@pytest.mark.slow
@pytest.mark.parametrize("activation_checkpointing", [False, True], ids=["", "activation checkpointing"])
def test_fsdp2_on_two_processes_trains_as_one_process_and_saves_the_package_folder(
    activation_checkpointing, one_process_run, tmp_path
):
    """accelerate's FSDP plugin (fsdp_version 2, transformer-based wrap from `_no_split_modules`), 2 gloo processes:
    the same losses as one process with the same 4 samples a step (within 1e-5: float sums in another order), the
    same weights after 3 steps (1e-5), and a folder saved by Trainer that is the package's and generates the same
    tokens in a process where `visincontext` is not installed."""
    losses, folder = train(tmp_path, "fsdp2", processes=2, activation_checkpointing=activation_checkpointing)
    reference_losses, reference_folder = one_process_run
    assert len(losses) == len(reference_losses) == 3
    assert max(abs(a - b) for a, b in zip(losses, reference_losses)) < 1e-5, (losses, reference_losses)
    assert losses[-1] < losses[0]
    weights, reference = load_file(folder / "model.safetensors"), load_file(reference_folder / "model.safetensors")
    assert weights.keys() == reference.keys()
    assert max((weights[k] - reference[k]).abs().max().item() for k in weights) < 1e-5
    assert_the_package_folder(folder)
    assert generate_in_a_bare_process(folder) == generate_in_a_bare_process(reference_folder)


# ---- whatever wraps the model, its saved folder is the package's ---------------------------------------------

WRAPPED_IN_ONE_PROCESS = """
import os, sys
import torch, torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from visincontext.offline import default_model_and_processor
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
dist.init_process_group("gloo", rank=0, world_size=1)
kind, folder = sys.argv[1], sys.argv[3]
model, processor = default_model_and_processor()
if kind == "DistributedDataParallel":
    torch.nn.parallel.DistributedDataParallel(model).module.save_pretrained(folder)  # as Trainer unwraps it
else:  # fully_shard: the model becomes an FSDPVisInContextForConditionalGeneration, a class defined in torch
    fully_shard(model)
    assert type(model).__name__.startswith("FSDP"), type(model)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    model.save_pretrained(folder, state_dict=state)
processor.save_pretrained(folder)
dist.destroy_process_group()
"""


def free_port() -> str:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


@pytest.mark.parametrize("wrapper", ["torch.compile", "PEFT, merged", "DistributedDataParallel", "fully_shard"])
def test_a_wrapped_model_saves_the_package_folder(wrapper, tmp_path):
    from visincontext.offline import default_model_and_processor

    model, processor = default_model_and_processor()
    folder = tmp_path / "saved"
    if wrapper == "torch.compile":  # saved without running: nothing is compiled
        torch.compile(model).save_pretrained(folder)
    elif wrapper == "PEFT, merged":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=2, target_modules=r".*decoder_layer\.self_attn\.(q_proj|v_proj)", init_lora_weights=False)
        model = get_peft_model(model, lora).merge_and_unload()
        model.save_pretrained(folder)
    else:
        run = subprocess.run(
            [sys.executable, "-c", WRAPPED_IN_ONE_PROCESS, wrapper, free_port(), str(folder)],
            capture_output=True,
            text=True,
            env=dict(os.environ, HF_HUB_OFFLINE="1"),
            timeout=600,
        )
        assert run.returncode == 0, run.stderr[-3000:]
    processor.save_pretrained(folder)
    assert_the_package_folder(folder)
    inputs = processor(text="The capital of", context="Atlantis lies under the sea. " * 3, return_tensors="pt")
    expected = model.eval().generate(**inputs, max_new_tokens=6, do_sample=False)[0].tolist()
    assert generate_in_a_bare_process(folder) == expected
