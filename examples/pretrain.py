"""Pretrain VisInContext with transformers' Trainer: interleaved documents whose earlier text is rendered as
context pages, token masking of image latents and the text-centric contrastive loss.

    python examples/pretrain.py --output_dir outputs/pretrain --max_steps 30
    python examples/pretrain.py --vision_model openai/clip-vit-large-patch14 \
        --language_model mistralai/Mistral-7B-v0.1 --dataset HuggingFaceM4/OBELICS --streaming \
        --output_dir outputs/pretrain --max_steps 10000 --bf16 --activation_checkpointing
    accelerate launch --config_file examples/accelerate/deepspeed_zero2.yaml examples/pretrain.py ...

Without a model it trains a tiny random one on the sample data in examples/data (offline, CPU).
"""

from pathlib import Path

from visincontext.training import main

DEFAULTS = dict(
    dataset=str(Path(__file__).parent / "data" / "obelics_sample.jsonl"),
    data_format="interleaved",
    token_mask_prob=0.5,
    contrastive=True,
    learning_rate=1.5e-4,
    max_grad_norm=1.0,
    per_device_train_batch_size=4,
    logging_steps=5,
    save_strategy="no",
    report_to="none",
)

if __name__ == "__main__":
    main(DEFAULTS)
