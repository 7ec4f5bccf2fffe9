"""Supervised fine-tuning with TRL's `SFTTrainer` on conversations, trained on the assistant turns only.

    python examples/sft_trl.py --output_dir outputs/sft --max_steps 20
    python examples/sft_trl.py --model_name_or_path outputs/pretrain --dataset my_chats.jsonl --output_dir outputs/sft

Rows are TRL's conversational format with images (`messages` and `images`, as in examples/data/chat_sample.jsonl);
a user turn may hold `{"type": "context", "text": ...}` items, rendered into pages by the processor. TRL's own
vision collator builds the batches through `processor.apply_chat_template(..., return_assistant_tokens_mask=True)`:
the processor's chat template marks each answer (with its `<|endofchunk|>`) with `{% generation %}`, so
`--assistant_only_loss` trains on exactly the tokens the package's own collator trains on. Keep an `images` column
(it may hold empty lists): TRL treats a dataset as multimodal, and hands its rows to the processor, only when it has
one. Every `SFTConfig` option is a flag (`--assistant_only_loss` is on by default here). Without a model it
tunes the small random default model (offline, CPU).
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Image, load_dataset
from transformers import AutoModelForImageTextToText, AutoProcessor, HfArgumentParser
from trl import SFTConfig, SFTTrainer

from visincontext.offline import default_model_and_processor

SAMPLE = Path(__file__).parent / "data" / "chat_sample.jsonl"


@dataclass
class ScriptArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "a saved folder; default: the tiny model"})
    dataset: str = field(default=str(SAMPLE), metadata={"help": "JSON lines of conversations with `images`"})
    image_root: str | None = field(
        default=None, metadata={"help": "where relative image paths start; default: beside the dataset"}
    )


def load_conversations(path: str, image_root: str | None):
    """Rows with `messages` and `images` (paths relative to `image_root`), images decoded by `datasets`."""
    root = Path(image_root or Path(path).parent)
    rows = load_dataset("json", data_files=path, split="train")
    rows = rows.map(lambda row: {"images": [str(root / image) for image in row["images"]]})
    return rows.cast_column("images", [Image()])


def main(argv=None):
    parser = HfArgumentParser((ScriptArguments, SFTConfig))
    # the point of the example, and TRL's bf16 default, which a machine without a GPU refuses
    parser.set_defaults(assistant_only_loss=True, report_to="none", save_strategy="no", logging_steps=5)
    if not torch.cuda.is_available():
        parser.set_defaults(bf16=False)
    script, config = parser.parse_args_into_dataclasses(argv)
    if script.model_name_or_path is None:
        model, processor = default_model_and_processor()
    else:
        model = AutoModelForImageTextToText.from_pretrained(script.model_name_or_path, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(script.model_name_or_path, trust_remote_code=True)
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=load_conversations(script.dataset, script.image_root),
        processing_class=processor,
    )
    trainer.train()
    trainer.save_model(config.output_dir)
    processor.save_pretrained(config.output_dir)
    return trainer


if __name__ == "__main__":
    main()
