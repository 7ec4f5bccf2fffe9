"""Does the model read its rendered context? A from-scratch experiment that fits on a CPU.

Each sample is a page of key-value facts ("C=27") rendered by the processor, and the model is asked for
one key's value: the prompt is "C=" and the answer "27" exists only in the pixels of the page. The model
(random vision tower + resampler + gated cross-attention + a tiny byte-level LM, all trained here) is
trained with the package's processor, collator and `Trainer` to write out the page's facts in a random
order, so every value must be found by its key. Each fact fills one patch of the page (glyphs aligned to
the patch grid), and an auxiliary *reading loss* asks resampler latent i to spell out the characters of
patch i: without it the model learns to read one fact and stays there (see the README).

Held-out evaluation asks for (key, value) pairs that never occur in training (one pair in five is held
out), on pages of 4-8 facts. A control run with blank pages and the same number of steps shows what the
model can guess without reading. Results (JSON, learning curves, an example page) go to
`experiments/results/`.

    python experiments/synthetic_recall.py                     # the full run (--minutes 5) and its control
    python experiments/synthetic_recall.py --minutes 2 --skip_control
"""

import argparse
import json
import random
import string
import tempfile
import time
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, TrainerCallback, TrainingArguments

from visincontext import VisInContextConfig, VisInContextForConditionalGeneration
from visincontext.data import VisInContextCollator
from visincontext.testing import EOC_ID, IMAGE_ID, VOCAB, tiny_processor
from visincontext.training import VisInContextTrainer

KEYS = string.ascii_uppercase
NUM_VALUES = 100  # two-digit values: answering by chance is right 1% of the time
MAX_FACTS = 8
EVAL_FACTS = (4, 8)
PAGE_SIZE, PATCH_SIZE, CELL_WIDTH = 128, 32, 8  # 4 rows of 16 characters
GRID = PAGE_SIZE // PATCH_SIZE  # 4 x 4 patches
CHARS_PER_PATCH = PATCH_SIZE // CELL_WIDTH  # 4: exactly one fact, "C=27"
FACTS_PER_ROW = 2  # in patch columns 0 and 2, so that a human reader sees them apart
FACT_COLUMNS = GRID // FACTS_PER_ROW * CHARS_PER_PATCH  # characters from one fact's start to the next's


def is_held_out(key: str, value: int) -> bool:
    """One (key, value) pair in five never appears in training; evaluation asks only for those."""
    return (KEYS.index(key) * 7 + value) % 5 == 0


def make_facts(rng: random.Random, num_facts: int, held_out_first: bool) -> list[tuple[str, str]]:
    """`num_facts` distinct keys with two-digit values, all from the training pairs except the first when
    `held_out_first` (then it is a held-out pair)."""
    facts = []
    for i, key in enumerate(rng.sample(KEYS, num_facts)):
        held_out = held_out_first and i == 0
        value = rng.choice([v for v in range(NUM_VALUES) if is_held_out(key, v) == held_out])
        facts.append((key, f"{value:02d}"))
    return facts


def page_text(facts: list[tuple[str, str]]) -> str:
    """Two facts per row, each starting on a patch boundary: "C=27    K=03"."""
    cells = [f"{key}={value}".ljust(FACT_COLUMNS) for key, value in facts]
    rows = ["".join(cells[i : i + FACTS_PER_ROW]).rstrip() for i in range(0, len(cells), FACTS_PER_ROW)]
    return "\n".join(rows)


def training_sample(rng: random.Random, num_facts: int, blank: bool) -> dict:
    """A collator sample: the page lists the facts; the LM is trained to write them out in a random order."""
    facts = make_facts(rng, num_facts, held_out_first=False)
    page = page_text(facts)
    text = "\n".join(f"{k}={v}" for k, v in rng.sample(facts, len(facts))) + "\n"
    return {"images": [], "prompt": "", "text": text, "context": " " if blank else page}


def evaluation_set(seed: int, size: int, num_facts: tuple[int, int] = EVAL_FACTS) -> list[dict]:
    """Pages of 4-8 facts; the question asks for a held-out pair, placed at a random position."""
    rng = random.Random(seed)
    samples = []
    for _ in range(size):
        facts = make_facts(rng, rng.randint(*num_facts), held_out_first=True)
        key, value = facts[0]
        rng.shuffle(facts)
        samples.append({"prompt": f"{key}=", "answer": value, "context": page_text(facts), "num_facts": len(facts)})
    return samples


def exact_match(model, processor, samples: list[dict], blank: bool, batch_size: int = 64) -> tuple[float, list[bool]]:
    """Greedy generation of two tokens per question; the share that equals the answer exactly."""
    was_training = model.training
    model.eval()
    hits = []
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            context = [" " if blank else s["context"] for s in chunk]
            batch = processor(text=[s["prompt"] for s in chunk], context=context, return_tensors="pt")
            output = model.generate(**batch, max_new_tokens=2, do_sample=False)
            answers = processor.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            hits += [answer == s["answer"] for answer, s in zip(answers, chunk)]
    model.train(was_training)
    return sum(hits) / len(hits), hits


class FactStream(torch.utils.data.IterableDataset):
    """Endless training samples with 1 to `MAX_FACTS` facts per page."""

    def __init__(self, seed: int, blank: bool):
        self.seed, self.blank = seed, blank

    def __iter__(self):
        rng = random.Random(self.seed)
        while True:
            yield training_sample(rng, rng.randint(1, MAX_FACTS), self.blank)


class HeldOutEvaluation(TrainerCallback):
    """Evaluates held-out exact match every `eval_every` steps, records the curves and stops at the time budget."""

    def __init__(self, model, processor, eval_samples: list[dict], blank: bool, args):
        self.model, self.processor, self.eval_samples = model, processor, eval_samples
        self.blank, self.args = blank, args
        self.digit_accuracy: list[float] = []
        self.reading_loss: list[float] = []
        self.curve: list[dict] = []
        self.start = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        minutes = (time.time() - self.start) / 60
        if state.global_step % self.args.eval_every == 0:
            exact, _ = exact_match(self.model, self.processor, self.eval_samples, blank=self.blank)
            point = {
                "step": state.global_step,
                "minutes": round(minutes, 2),
                "held_out_exact_match": exact,
                "train_value_digit_accuracy": round(_mean(self.digit_accuracy[-50:]), 4),
                "train_reading_loss": round(_mean(self.reading_loss[-50:]), 4),
            }
            self.curve.append(point)
            print(json.dumps(point), flush=True)
        if minutes >= self.args.minutes:
            control.should_training_stop = True


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


class RecallTrainer(VisInContextTrainer):
    """Records the teacher-forced accuracy on the values' digits (the keys' order is random, so only values are
    predictable) and the reading loss; the package's reading objective (`config.reading_loss_weight`) does the rest."""

    def __init__(self, *args, evaluation: HeldOutEvaluation, **kwargs):
        super().__init__(*args, **kwargs)
        self.evaluation = evaluation
        self.digit_ids = torch.tensor(self.processing_class.tokenizer.convert_tokens_to_ids(list(string.digits)))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if outputs.reading_loss is not None:
            self.evaluation.reading_loss.append(outputs.reading_loss.item())
        predicted, labels = outputs.logits[:, :-1].argmax(-1), inputs["labels"][:, 1:]
        digits = torch.isin(labels, self.digit_ids)
        self.evaluation.digit_accuracy.append((predicted == labels)[digits].float().mean().item())
        return (loss, outputs) if return_outputs else loss


def build_model(seed: int, reading_loss_weight: float) -> VisInContextForConditionalGeneration:
    """Every part random and trained. Departures from the defaults, because nothing here is pretrained: the
    tanh gates start open (there is no pretrained LM to protect), and the resampler's and the
    cross-attention's projections start at std 0.1 (about 1/sqrt(width)) instead of 0.02, which at these
    small widths leaves every attention uniform for thousands of steps. One latent per patch, and the package's
    reading objective with 4 cells per latent: latent i spells out the 4 characters of patch i."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=PAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    text = LlamaConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=128,
    )
    config = VisInContextConfig(
        vision_config=vision,
        text_config=text,
        num_latents=GRID * GRID,
        resampler_depth=1,
        resampler_num_heads=4,
        resampler_head_dim=16,
        cross_attention_every=1,
        cross_attention_num_heads=4,
        cross_attention_head_dim=32,
        contrastive_loss_weight=0.0,
        freeze_vision_tower=False,
        freeze_language_model=False,
        image_token_id=IMAGE_ID,
        end_of_chunk_token_id=EOC_ID,
        reading_loss_weight=reading_loss_weight,
        reading_cells_per_latent=CHARS_PER_PATCH,
    )
    model = VisInContextForConditionalGeneration(config)
    with torch.no_grad():
        model.model.context_resampler.latents.normal_(0.0, 0.1)
        layers = model.model.language_model.layers
        new_parts = [model.model.context_resampler] + [layer.gated_cross_attention for layer in layers]
        for part in new_parts:
            for module in part.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.normal_(0.0, 0.1)
        for layer in layers:
            layer.gated_cross_attention.attn_gate.fill_(1.0)
            layer.gated_cross_attention.ff_gate.fill_(1.0)
    return model


def build_processor():
    """128-px pages, 32-px rows of 8-px character cells: four characters per patch. Pages are normalised so
    that paper is 0 and ink -0.1: under CLIP's normalisation a random tower sees mostly the white paper."""
    processor = tiny_processor(image_size=PAGE_SIZE, line_height=PATCH_SIZE, cell_width=CELL_WIDTH)
    processor.image_processor.image_mean = [1.0, 1.0, 1.0]
    processor.image_processor.image_std = [10.0, 10.0, 10.0]
    return processor


def train(args, blank: bool, max_steps: int) -> dict:
    torch.set_num_threads(args.threads)
    model, processor = build_model(args.seed, args.reading_loss_weight), build_processor()
    evaluation = HeldOutEvaluation(model, processor, evaluation_set(args.seed + 1, args.eval_size), blank, args)
    scratch_dir = tempfile.TemporaryDirectory(prefix="synthetic_recall_")
    training_args = TrainingArguments(
        output_dir=scratch_dir.name,
        max_steps=max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=100,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=100,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=args.seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=args.quiet,
    )
    trainer = RecallTrainer(
        model=model,
        args=training_args,
        train_dataset=FactStream(args.seed, blank),
        data_collator=VisInContextCollator(processor, reading_layout=(GRID * GRID, CHARS_PER_PATCH)),
        processing_class=processor,
        callbacks=[evaluation],
        evaluation=evaluation,
    )
    started = time.time()
    trainer.train()
    scratch_dir.cleanup()  # nothing is checkpointed: the results are the figures below
    minutes = (time.time() - started) / 60
    final_set = evaluation_set(args.seed + 2, args.final_eval_size)
    exact, hits = exact_match(model, processor, final_set, blank=blank)
    by_facts = {
        n: _mean([h for h, s in zip(hits, final_set) if s["num_facts"] == n])
        for n in range(EVAL_FACTS[0], EVAL_FACTS[1] + 1)
    }
    return {
        "blank_pages": blank,
        "steps": trainer.state.global_step,
        "training_minutes": round(minutes, 2),
        "held_out_exact_match": exact,
        "exact_match_by_facts_per_page": by_facts,
        "curve": evaluation.curve,
        "model": model,
        "processor": processor,
    }


def save_figures(results: dict, output_dir: Path, processor) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for name, run in results["runs"].items():
        steps = [p["step"] for p in run["curve"]]
        axis.plot(steps, [100 * p["held_out_exact_match"] for p in run["curve"]], label=f"{name}: held-out exact match")
        if not run["blank_pages"] and results["arguments"]["reading_loss_weight"] > 0:
            axis.plot(
                steps,
                [25 * p["train_reading_loss"] for p in run["curve"]],
                "--",
                alpha=0.6,
                label=f"{name}: reading loss (x 25)",
            )
    axis.axhline(100 * results["chance"], color="black", ls=":", label="chance (1 in 100)")
    axis.set_xlabel("training step")
    axis.set_ylabel("%")
    axis.set_title(f"Synthetic recall from rendered pages (seed {results['seed']})")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(output_dir / "synthetic_recall_curves.png", dpi=120)
    example = evaluation_set(results["seed"] + 2, 1)[0]
    page = processor.renderer.render(example["context"]).to_images()[0]
    page.resize((page.width * 2, page.height * 2), resample=0).save(output_dir / "synthetic_recall_page.png")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="Training time budget of the rendered-page run.")
    parser.add_argument(
        "--max_steps", type=int, default=100_000, help="Step cap (the time budget usually stops first)."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--reading_loss_weight", type=float, default=1.0, help="0 trains on the LM loss alone.")
    parser.add_argument("--eval_every", type=int, default=250)
    parser.add_argument("--eval_size", type=int, default=128)
    parser.add_argument("--final_eval_size", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip_control", action="store_true", help="Do not run the blank-page control.")
    parser.add_argument("--output_dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")
    args = parser.parse_args(argv)
    positive = (
        "minutes",
        "eval_every",
        "eval_size",
        "final_eval_size",
        "batch_size",
        "max_steps",
        "threads",
        "learning_rate",
    )
    for name in positive:
        if getattr(args, name) <= 0:
            parser.error(f"--{name}: expected a positive number, got {getattr(args, name)}")
    if args.reading_loss_weight < 0:
        parser.error(f"--reading_loss_weight: expected a number >= 0, got {args.reading_loss_weight}")

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    runs = {"rendered pages": train(args, blank=False, max_steps=args.max_steps)}
    processor = runs["rendered pages"]["processor"]
    if not args.skip_control:  # same number of steps, blank pages
        control_args = argparse.Namespace(**{**vars(args), "minutes": float("inf")})
        runs["blank pages (control)"] = train(control_args, blank=True, max_steps=runs["rendered pages"]["steps"])
    results = {
        "task": "generate the two-digit value of a held-out (key, value) pair asked about, "
        "from a rendered page of 4-8 facts",
        "seed": args.seed,
        "chance": 1 / NUM_VALUES,
        "arguments": vars(args),
        "runs": {name: {k: v for k, v in run.items() if k not in ("model", "processor")} for name, run in runs.items()},
    }
    (output_dir / "synthetic_recall.json").write_text(json.dumps(results, indent=2))
    save_figures(results, output_dir, processor)
    for name, run in results["runs"].items():
        print(
            f"{name}: held-out exact match {100 * run['held_out_exact_match']:.1f}% after {run['steps']} steps "
            f"({run['training_minutes']} min); chance {100 * results['chance']:.0f}%"
        )
    return results


if __name__ == "__main__":
    main()
