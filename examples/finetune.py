"""Fine-tune VisInContext on question answering (VQA/instruction rows): trained on the answers only.

    python examples/finetune.py --output_dir outputs/finetune --max_steps 30
    python examples/finetune.py --model_name_or_path outputs/pretrain --lora_r 16 --output_dir outputs/lora
    python examples/finetune.py --model_name_or_path outputs/pretrain --lora_r 16 --load_in_4bit \
        --output_dir outputs/qlora

Without a model it trains a tiny random one on the easy-VQA sample in examples/data (offline, CPU).
"""

from pathlib import Path

from visincontext.training import main

DEFAULTS = dict(
    dataset=str(Path(__file__).parent / "data" / "easyvqa_sample.jsonl"),
    data_format="vqa",
    token_mask_prob=0.0,
    contrastive=False,
    learning_rate=1e-4,
    max_grad_norm=1.0,
    per_device_train_batch_size=8,
    logging_steps=5,
    save_strategy="no",
    report_to="none",
)

if __name__ == "__main__":
    main(DEFAULTS)
