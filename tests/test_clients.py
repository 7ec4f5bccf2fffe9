"""The training clients users already run (issue 36): accelerate FSDP2, the folders wrappers save, AutoPeftModel,
streaming with DataLoader workers, TRL's SFTTrainer."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
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
    "chat_visincontext.py",
    "embeddings_visincontext.py",
    "perceiver_visincontext.py",
    "cross_attention_visincontext.py",
    "objectives_visincontext.py",
    "input_checks_visincontext.py",
    "backbones_visincontext.py",
    "outputs_visincontext.py",
    "pages_visincontext.py",
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


# ---- FSDP1 (torch's FullyShardedDataParallel) -----------------------------------------------------------------
# accelerate cannot run its FSDP1 plugin on CPU (it passes `device_id=cpu:0`, which FSDP1 rejects as "Inconsistent
# compute device", and refuses `sync_module_states` on CPU), so this wraps the model with torch's FSDP1 directly: the
# wrap units accelerate's TRANSFORMER_BASED_WRAP would choose (`_no_split_modules`), 2 gloo processes.

FSDP1_STEP = """
import sys, torch, torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from visincontext.testing import open_gates, sample_batch, tiny_model
dist.init_process_group("gloo")
rank, checkpointing = dist.get_rank(), sys.argv[1] == "1"
# no contrastive loss: it compares a batch's samples with each other, and each process holds one
model = open_gates(tiny_model(seed=0, contrastive_loss_weight=0.0), 0.5).train()
units = {type(m) for m in model.modules() if type(m).__name__ in model._no_split_modules}
batch = sample_batch()
# each process's sample has images and pages (2 and 1, 1 and 2), so that every wrap unit runs in both processes
batch["image_mask"] = torch.tensor([[True, True], [True, False]])
batch["context_mask"] = torch.tensor([[True, False, False], [True, True, False]])
batch["labels"] = batch["input_ids"]
reference = tiny_model(seed=0, contrastive_loss_weight=0.0)
open_gates(reference, 0.5).train()(**batch).loss.backward()  # both samples in one process, unwrapped
wrapped = FSDP(model, auto_wrap_policy=ModuleWrapPolicy(units), device_id=torch.device("cpu"), use_orig_params=True)
if checkpointing:
    apply_activation_checkpointing(wrapped, check_fn=lambda module: isinstance(module, tuple(units)))
loss = wrapped(**{key: value[rank : rank + 1] for key, value in batch.items()}).loss  # one sample per process
loss.backward()
losses = [torch.zeros(1), torch.zeros(1)]
dist.all_gather(losses, loss.detach().reshape(1))
with FSDP.summon_full_params(wrapped, with_grads=True):
    gradients = {name: p.grad for name, p in wrapped.named_parameters() if p.grad is not None}
    expected = {name: p.grad for name, p in reference.named_parameters() if p.grad is not None}
    gradients = {
        name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", ""): g
        for name, g in gradients.items()
    }
    assert set(expected) <= set(gradients), sorted(set(expected) - set(gradients))[:4]
    # a parameter of a flat parameter that the loss does not reach gets a zero gradient under FSDP1, none unwrapped
    worst = max((g - expected.get(name, torch.zeros_like(g))).abs().max().item() for name, g in gradients.items())
if rank == 0:
    with torch.no_grad():
        full = reference(**batch).loss.item()
    print("RESULT", (sum(losses) / 2).item(), full, worst, len(gradients))
dist.destroy_process_group()
"""


@pytest.mark.parametrize("activation_checkpointing", [False, True], ids=["", "activation checkpointing"])
def test_fsdp1_on_two_processes_computes_the_one_process_loss_and_gradients(activation_checkpointing, tmp_path):
    script = tmp_path / "fsdp1_step.py"
    script.write_text(FSDP1_STEP)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port()]
    run = subprocess.run(
        [*command, str(script), str(int(activation_checkpointing))],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT / "src")),
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    sharded_loss, full_loss, worst_gradient, parameters = map(float, run.stdout.split("RESULT")[-1].split())
    assert abs(sharded_loss - full_loss) < 1e-5, (sharded_loss, full_loss)
    assert worst_gradient < 1e-5 and parameters > 50, (worst_gradient, parameters)


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


# ---- TRL: the chat template marks the answers; SFTTrainer trains on them only ------------------------------------

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_LIKE = (  # a begin-of-text token, role headers, a template-level variable read inside the body
    "{{- bos_token }}{%- set header = '<|start_header_id|>' -%}"
    "{%- for message in messages -%}{{ header + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] }}"
    "{{- '<|eot_id|>' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ header + 'assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)
MISTRAL_LIKE = (  # refuses turns that do not alternate, answers end with the end-of-sequence token
    "{{- bos_token }}{%- for message in messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- else -%}{{ message['content'] + eos_token }}{%- endif -%}{%- endfor -%}"
)
TEMPLATES = {"default": None, "ChatML": CHATML, "Llama 3 like": LLAMA3_LIKE, "Mistral like": MISTRAL_LIKE}


def conversation(index: int, turns: int = 2, context: bool = True) -> list[dict]:
    messages = []
    for turn in range(turns):
        content = [{"type": "image"}, {"type": "text", "text": f"What is shape {index}.{turn}?"}]
        if context and turn == 0:
            content.insert(0, {"type": "context", "text": f"Notes {index}: shape {index} is a circle of {index} cm."})
        messages.append({"role": "user", "content": content})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": f"circle {index * 7 + turn}"}]})
    return messages


def with_images(messages: list[dict], seed: int) -> list[dict]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    filled = []
    for message in messages:
        items = [
            {**item, "image": Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))}
            if item["type"] == "image"
            else item
            for item in message["content"]
        ]
        filled.append({**message, "content": items})
    return filled


def answer_positions(processor, messages: list[dict]) -> list[bool]:
    """Token by token: is this token of the rendered conversation inside an answer (its text and `<|endofchunk|>`)?
    The answers are found in the rendered string one after another, independently of the template's markers."""
    text = processor.apply_chat_template(messages)
    spans, start = [], 0
    for message in messages:
        if message["role"] == "assistant":
            answer = "".join(item["text"] for item in message["content"]) + "<|endofchunk|>"
            start = text.index(answer, start)
            spans.append((start, start + len(answer)))
            start += len(answer)
    offsets = processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [any(a <= token_start < b for a, b in spans) for token_start, _ in offsets]


@pytest.mark.parametrize("template", list(TEMPLATES), ids=list(TEMPLATES))
@pytest.mark.parametrize("context", [True, False], ids=["context", "no context"])
def test_the_assistant_mask_is_exactly_the_answers(template, context):
    from tiny import tiny_processor

    from visincontext.data import VisInContextCollator, conversation_sample
    from visincontext.processing_visincontext import CHAT_PREAMBLE, DEFAULT_CHAT_BODY, chat_template_for

    processor = tiny_processor(chat_template=chat_template_for(TEMPLATES[template]))
    messages = with_images(conversation(3, turns=3, context=context), seed=0)
    out = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    mask = out["assistant_masks"][0].bool()
    assert mask.tolist() == answer_positions(processor, messages)
    assert (
        processor.decode(out["input_ids"][0][mask])
        == "circle 21<|endofchunk|>circle 22<|endofchunk|>circle 23<|endofchunk|>"
    )
    assert int(out["context_mask"].sum()) == (
        len(processor.render(messages[0]["content"][0]["text"])) if context else 0
    )
    # the package's own collator trains on the same tokens
    batch = VisInContextCollator(processor)([conversation_sample(messages, processor)])
    assert torch.equal(batch["labels"][0] != -100, mask)
    # the markers change nothing in the laid-out text: the same as the preamble and the body alone
    unmarked = tiny_processor(chat_template=CHAT_PREAMBLE + (TEMPLATES[template] or DEFAULT_CHAT_BODY))
    assert processor.apply_chat_template(messages) == unmarked.apply_chat_template(messages)
    assert processor.apply_chat_template(messages[:3], add_generation_prompt=True) == unmarked.apply_chat_template(
        messages[:3], add_generation_prompt=True
    )


def test_a_body_that_lays_out_a_start_differently_cannot_mark_answers():
    from tiny import tiny_processor

    from visincontext.processing_visincontext import chat_template_for

    counted = "{{ messages | length }} turns\n" + CHATML  # the first line changes with every turn
    processor = tiny_processor(chat_template=chat_template_for(counted))
    messages = with_images(conversation(1, turns=1), seed=0)
    assert processor.apply_chat_template(messages).startswith("2 turns\n<|im_start|>user")  # rendered, unmarked
    with pytest.raises(ValueError, match=r"return_assistant_tokens_mask: conversation 0 has assistant turns"):
        processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)


def trl_rows(count: int):
    """TRL's conversational rows with images: placeholders in `messages`, the images in an `images` column."""
    from datasets import Dataset

    rows = []
    for i in range(count):
        filled = with_images(conversation(i, turns=1 + i % 2, context=i % 2 == 1), seed=i)
        images = [item.pop("image") for message in filled for item in message["content"] if item["type"] == "image"]
        rows.append({"messages": filled, "images": images})
    return Dataset.from_list(rows)


def test_trl_sft_trainer_trains_on_the_assistant_tokens_only(tmp_path):
    """TRL's SFTTrainer with its own vision collator and `assistant_only_loss=True`: every label that is not -100 is
    an answer token of the rendered conversation, rows with and without a context item, and the loss goes down."""
    pytest.importorskip("trl", reason="the [test] extra installs trl")
    from tiny import open_gates, tiny_model, tiny_processor
    from trl import SFTConfig, SFTTrainer

    processor, rows = tiny_processor(), trl_rows(8)
    config = SFTConfig(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4, learning_rate=3e-3, logging_steps=1,
        assistant_only_loss=True, bf16=False, use_cpu=True, report_to="none", save_strategy="no", seed=0,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=open_gates(tiny_model(), 0.5), args=config, train_dataset=rows, processing_class=processor
    )
    batch = trainer.data_collator([rows[i] for i in range(4)])
    for i in range(4):
        row = rows[i]
        messages = [dict(m) for m in row["messages"]]
        images = iter(row["images"])
        for message in messages:  # the images back in their items, as TRL's collator puts them
            message["content"] = [
                {**item, "image": next(images)} if item["type"] == "image" else item for item in message["content"]
            ]
        expected = answer_positions(processor, messages)
        length = int(batch["attention_mask"][i].sum())  # TRL pads on the right
        assert (batch["labels"][i, :length] != -100).tolist() == expected, i
        assert (batch["labels"][i, length:] == -100).all()
        has_context = any(item["type"] == "context" and item["text"] for item in row["messages"][0]["content"])
        assert bool(batch["context_mask"][i].any()) == has_context == (i % 2 == 1)
    # SFTTrainer warns "The chat template does not include the assistant turn's end-of-turn token in the loss mask":
    # its check (trl.chat_template_utils.is_chat_template_stop_token_trained) looks the processor's token ids up in a
    # set of ints, and this processor returns tensors, whose elements are never found there. The answers do end on
    # `<|endofchunk|>` (test above). When this starts to pass, TRL reads tensors: drop the README's note.
    from trl.chat_template_utils import is_chat_template_stop_token_trained

    assert not is_chat_template_stop_token_trained(processor)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    # the language model is frozen (the tiny config's default): the new modules alone lower the loss, by ~0.13 here
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses


def test_the_trl_example_runs_as_written(tmp_path):
    pytest.importorskip("trl", reason="the [test] extra installs trl")
    command = [sys.executable, str(ROOT / "examples" / "sft_trl.py"), "--output_dir", str(tmp_path)]
    command += ["--max_steps", "12", "--learning_rate", "3e-3", "--logging_steps", "4"]
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"'loss': '([0-9.]+)'", result.stdout + result.stderr)]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert_the_package_folder(tmp_path)


# ---- streaming: a row is the same row in every DataLoader worker and process --------------------------------------


def streamed_samples(rank: int | None, world_size: int, num_workers: int, order_seed: int | None = None) -> list:
    """Every sample a DataLoader yields from a 4-shard stream of 16 text rows (one rank's part when `rank` is given)."""
    from datasets import Dataset
    from datasets.distributed import split_dataset_by_node

    from visincontext.data import format_dataset

    rows = Dataset.from_list([{"text": f"row {i}: a caption of {i} words."} for i in range(16)])
    if order_seed is not None:
        rows = rows.shuffle(seed=order_seed)
    stream = rows.to_iterable_dataset(num_shards=4)
    if rank is not None:
        stream = split_dataset_by_node(stream, rank=rank, world_size=world_size)
    samples, _ = format_dataset(stream, "text")
    loader = torch.utils.data.DataLoader(samples, batch_size=None, num_workers=num_workers, collate_fn=lambda s: s)
    return list(loader)


def masks_by_text(samples: list) -> dict[str, list[bool]]:
    """Each sample's token mask over 32 image slots, keyed by its text (the row it came from)."""
    from tiny import tiny_processor

    from visincontext.data import VisInContextCollator

    collator = VisInContextCollator(tiny_processor(), token_mask_prob=0.5, seed=3)
    slots = torch.ones(1, 32, dtype=torch.bool)
    return {s["text"]: collator.image_latents_mask([s], slots)[0].tolist() for s in samples}


def test_streamed_rows_keep_their_identity_across_workers_and_ranks():
    one_reader = masks_by_text(streamed_samples(rank=None, world_size=1, num_workers=0))
    assert len(one_reader) == 16
    two_workers = streamed_samples(rank=None, world_size=1, num_workers=2)
    two_ranks = [s for rank in (0, 1) for s in streamed_samples(rank=rank, world_size=2, num_workers=2)]
    assert sorted(s["row_index"] for s in two_workers) != list(range(16))  # the indices do restart per worker
    for samples in (two_workers, two_ranks):
        assert sorted(s["text"] for s in samples) == sorted(one_reader)  # every row once
        masks = masks_by_text(samples)
        assert masks == one_reader  # the same row, the same mask
        assert len({tuple(m) for m in masks.values()}) == 16  # distinct rows, distinct masks
    # in another order (shuffled before streaming), still the same mask for the same row
    assert masks_by_text(streamed_samples(rank=None, world_size=1, num_workers=2, order_seed=1)) == one_reader


def test_the_row_key_is_the_rows_content():
    from PIL import Image

    from visincontext.data import row_key

    image = Image.new("RGB", (4, 4), (10, 20, 30))
    row = {"text": "a", "images": [image], "meta": {"n": 1, "tags": ["x"]}}
    assert row_key(row) == row_key({"meta": {"tags": ["x"], "n": 1}, "images": [image.copy()], "text": "a"})
    changed = [
        {**row, "text": "b"},
        {**row, "images": [Image.new("RGB", (4, 4), (10, 20, 31))]},
        {**row, "images": [image.convert("RGBA")]},
        {**row, "meta": {"n": 2, "tags": ["x"]}},
        {**row, "meta": {"n": "1", "tags": ["x"]}},
        {**row, "text": ["a"]},
    ]
    assert len({row_key(r) for r in [row, *changed]}) == len(changed) + 1
