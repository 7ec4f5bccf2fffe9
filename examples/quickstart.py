"""Quickstart: the whole VisInContext life cycle on embedded defaults, offline, in a few minutes on a CPU.

    python examples/quickstart.py

1. build a small model and its processor (random backbones: no downloads),
2. render long context into pages (saved as PNG),
3. fine-tune with transformers' Trainer on the easy-VQA sample in examples/data,
4. evaluate few-shot on the easy-VQA test split, demonstrations as raw text vs rendered pages,
5. write a Hub-ready folder with its model card,
6. reload that folder in a fresh process (remote code only, `trust_remote_code=True`) and generate.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUTPUT = Path("outputs/quickstart")
START = time.perf_counter()


def step(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s] {message}", flush=True)


def main() -> None:
    from transformers import TrainingArguments
    from transformers.utils import logging as hf_logging

    from visincontext.evaluation import evaluate, get_task, load_examples, markdown_table, model_index
    from visincontext.hub import prepare_repo
    from visincontext.training import (
        DataArguments,
        ModelArguments,
        VisInContextTrainer,
        build_model_and_processor,
        load_training_data,
    )

    hf_logging.set_verbosity_error()
    OUTPUT.mkdir(parents=True, exist_ok=True)

    model, processor = build_model_and_processor(ModelArguments(), DataArguments(max_pages=4))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    step(
        f"1. built a VisInContext model ({sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{trained:,} trained)"
    )

    context = (
        "Notes. The red circle is on the left. The blue square is on the right. "
        "The green triangle is under the circle. "
    ) * 2
    rendered = processor.renderer.render(context)
    rendered.to_images()[0].save(OUTPUT / "rendered_page.png")
    step(
        f"2. rendered {len(context)} characters of context into {len(rendered)} pages -> {OUTPUT / 'rendered_page.png'}"
    )

    data_args = DataArguments(
        dataset=str(HERE / "data" / "easyvqa_sample.jsonl"),
        data_format="vqa",
        token_mask_prob=0.0,
        contrastive=False,
        max_pages=4,
    )
    train_dataset, collator, _ = load_training_data(data_args, processor, seed=0)
    args = TrainingArguments(
        output_dir=str(OUTPUT / "checkpoints"),
        max_steps=60,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=20,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    trainer = VisInContextTrainer(
        model=model, args=args, train_dataset=train_dataset, data_collator=collator, processing_class=processor
    )
    result = trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    step(
        f"3. fine-tuned for {args.max_steps} steps with Trainer: loss {losses[0]:.3f} -> {losses[-1]:.3f} "
        f"({result.metrics['train_runtime']:.1f}s)"
    )

    task = get_task("easy-vqa")
    queries = load_examples(task, None, split="test", limit=48)
    support = load_examples(task, None, split="train", limit=500)
    results = evaluate(
        model, processor, task, queries, support, shots=[0, 4], modes=["text", "rendered"], batch_size=16
    )
    (OUTPUT / "eval.md").write_text(markdown_table(results) + "\n")
    step("4. evaluated on 48 easy-VQA test questions:\n" + markdown_table(results))

    eval_results = model_index(task, results, split="test", dataset_name="easy-VQA")
    hub_dir = prepare_repo(
        model,
        processor,
        OUTPUT / "hub",
        eval_results=eval_results,
        training_args=args,
        repo_id="your-name/visincontext-quickstart",
        overwrite=True,
    )
    step(f"5. wrote a Hub-ready folder with its model card: {hub_dir} ({len(list(hub_dir.iterdir()))} files)")

    example = queries[0]
    reload_script = f"""
import sys
sys.modules["visincontext"] = None  # the folder's own remote code must be enough
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained({str(hub_dir)!r}, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained({str(hub_dir)!r}, trust_remote_code=True)
inputs = processor(images=[Image.open({str(example.image)!r})],
                   text="<image>Question: {example.question} Short answer:",
                   context={context!r}, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:]).split("<|endofchunk|>")[0].strip())
"""
    answer = subprocess.run(
        [sys.executable, "-c", reload_script], check=True, capture_output=True, text=True
    ).stdout.strip()
    step(f"6. reloaded {hub_dir} in a fresh process with trust_remote_code=True")
    (OUTPUT / "summary.json").write_text(
        json.dumps(
            {
                "question": example.question,
                "reference": example.answers,
                "generated": answer,
                "seconds": time.perf_counter() - START,
            },
            indent=2,
        )
    )
    print(f"Q: {example.question} (reference: {example.answers[0]}) -> generated from the reloaded folder: {answer}")


if __name__ == "__main__":
    main()
