"""Does the model read its rendered context? A from-scratch experiment that fits on a CPU.

Each sample is a page of key-value facts ("C=27", one per line) rendered by the processor, and the model
is asked for one key's value: the prompt is "C=" and the answer "27" exists only in the pixels of the
page. The model (random vision tower + resampler + gated cross-attention + a tiny byte-level LM, all
trained here) is trained with the package's processor, collator and `Trainer`:

1. transcription: the LM writes out the page line by line (the paper's pretraining includes rendered
   text). A curriculum grows the page from 1 fact upwards once the page is transcribed well enough;
2. recall: the LM writes the page's facts in a random order, so every value must be found by its key.

Held-out evaluation asks for (key, value) pairs that never occur in training (one pair in five is
held out), on pages of 4-8 facts. A control run with blank pages and the same number of steps shows
what the model can guess without reading. Results (JSON, learning curves, an example page) go to
`examples/results/`.

    python examples/synthetic_recall.py                     # the full run (--minutes 30) and its control
    python examples/synthetic_recall.py --minutes 2 --skip_control
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
PAGE_SIZE, PATCH_SIZE = 64, 8  # 8 rows of 16 characters, two characters per patch


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


def training_sample(rng: random.Random, num_facts: int, stage: str, blank: bool) -> dict:
    """A collator sample: the page lists the facts; the LM is trained to write them out."""
    facts = make_facts(rng, num_facts, held_out_first=False)
    rng.shuffle(facts)
    page = "\n".join(f"{k}={v}" for k, v in facts)
    if stage == "recall":
        facts = rng.sample(facts, len(facts))
    text = "\n".join(f"{k}={v}" for k, v in facts) + "\n"
    return {"images": [], "prompt": "", "text": text, "context": " " if blank else page}


def evaluation_set(seed: int, size: int, num_facts: tuple[int, int] = EVAL_FACTS) -> list[dict]:
    """Pages of 4-8 facts; the question asks for a held-out pair, placed on a random line."""
    rng = random.Random(seed)
    samples = []
    for _ in range(size):
        facts = make_facts(rng, rng.randint(*num_facts), held_out_first=True)
        key, value = facts[0]
        rng.shuffle(facts)
        samples.append({"prompt": f"{key}=", "answer": value, "context": "\n".join(f"{k}={v}" for k, v in facts), "num_facts": len(facts)})
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
    """Endless training samples; `stage` and `level` (most facts per page) are moved by `Curriculum`."""

    def __init__(self, seed: int, blank: bool):
        self.seed, self.blank = seed, blank
        self.stage, self.level = "transcribe", 1

    def __iter__(self):
        rng = random.Random(self.seed)
        while True:
            if self.stage == "transcribe":
                num_facts = rng.randint(max(1, self.level - 1), self.level)
            else:
                num_facts = rng.randint(1, MAX_FACTS)
            yield training_sample(rng, num_facts, self.stage, self.blank)


class Curriculum(TrainerCallback):
    """Moves the stream on (more facts, then recall) when the model gets whole training sequences right,
    evaluates held-out exact match, records the curves and stops at the time budget."""

    def __init__(self, stream: FactStream, model, processor, eval_samples, args):
        self.stream, self.model, self.processor, self.eval_samples, self.args = stream, model, processor, eval_samples, args
        self.sequence_accuracy: list[float] = []
        self.curve: list[dict] = []
        self.stages: list[dict] = [{"step": 0, "stage": "transcribe", "level": 1}]
        self.start = time.time()

    def record_batch(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        predicted, target = logits[:, :-1].argmax(-1), labels[:, 1:]
        whole = ((predicted == target) | (target == -100)).all(dim=1)
        self.sequence_accuracy.append(whole.float().mean().item())

    def on_step_end(self, args, state, control, **kwargs):
        minutes = (time.time() - self.start) / 60
        if state.global_step % self.args.eval_every == 0:
            recent = self.sequence_accuracy[-50:]
            accuracy = sum(recent) / max(len(recent), 1)
            exact, _ = exact_match(self.model, self.processor, self.eval_samples, blank=self.stream.blank)
            point = {"step": state.global_step, "minutes": round(minutes, 2), "stage": self.stream.stage, "level": self.stream.level,
                     "train_sequence_accuracy": round(accuracy, 4), "held_out_exact_match": exact}
            self.curve.append(point)
            print(json.dumps(point), flush=True)
            if self.stream.stage == "transcribe" and accuracy >= self.args.promote_at and not self.stream.blank:
                if self.stream.level < MAX_FACTS:
                    self.stream.level += 1
                else:
                    self.stream.stage = "recall"
                self.sequence_accuracy.clear()
                self.stages.append({"step": state.global_step, "stage": self.stream.stage, "level": self.stream.level})
        if minutes >= self.args.minutes:
            control.should_training_stop = True


class RecallTrainer(VisInContextTrainer):
    """Feeds each training batch's logits to the curriculum (whole-sequence accuracy, no extra forward)."""

    def __init__(self, *args, curriculum: Curriculum, **kwargs):
        super().__init__(*args, **kwargs)
        self.curriculum = curriculum

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        self.curriculum.record_batch(outputs.logits.detach(), inputs["labels"])
        return (loss, outputs) if return_outputs else loss


def build_model(seed: int) -> VisInContextForConditionalGeneration:
    """Every part random and trained. Two departures from the defaults, because nothing here is pretrained:
    the tanh gates start open (there is no pretrained LM to protect), and the resampler's and the
    cross-attention's projections start at std 0.1 (about 1/sqrt(width)) instead of 0.02, which at these
    small widths leaves every attention uniform and the page unreadable for thousands of steps."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                              image_size=PAGE_SIZE, patch_size=PATCH_SIZE)
    text = LlamaConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=128)
    config = VisInContextConfig(
        vision_config=vision, text_config=text, num_latents=16, resampler_depth=1, resampler_num_heads=4,
        resampler_head_dim=16, cross_attention_every=1, cross_attention_num_heads=4, cross_attention_head_dim=32,
        contrastive_loss_weight=0.0, freeze_vision_tower=False, freeze_language_model=False,
        image_token_id=IMAGE_ID, end_of_chunk_token_id=EOC_ID,
    )
    model = VisInContextForConditionalGeneration(config)
    with torch.no_grad():
        model.model.context_resampler.latents.normal_(0.0, 0.1)
        new_parts = [model.model.context_resampler] + [layer.gated_cross_attention for layer in model.model.language_model.layers]
        for part in new_parts:
            for module in part.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.normal_(0.0, 0.1)
        for layer in model.model.language_model.layers:
            layer.gated_cross_attention.attn_gate.fill_(1.0)
            layer.gated_cross_attention.ff_gate.fill_(1.0)
    return model


def build_processor():
    """64-px pages, 8-px rows. Pages are normalised so that paper is 0 and ink -0.1: under CLIP's
    normalisation a random tower sees mostly the white paper and hardly where on the page a glyph is."""
    processor = tiny_processor(image_size=PAGE_SIZE, line_height=PATCH_SIZE)
    processor.image_processor.image_mean = [1.0, 1.0, 1.0]
    processor.image_processor.image_std = [10.0, 10.0, 10.0]
    return processor


def train(args, blank: bool, max_steps: int) -> dict:
    torch.set_num_threads(args.threads)
    model, processor = build_model(args.seed), build_processor()
    stream = FactStream(args.seed, blank)
    eval_samples = evaluation_set(args.seed + 1, args.eval_size)
    curriculum = Curriculum(stream, model, processor, eval_samples, args)
    scratch_dir = tempfile.TemporaryDirectory(prefix="synthetic_recall_")
    scratch = scratch_dir.name
    training_args = TrainingArguments(
        output_dir=scratch, max_steps=max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, lr_scheduler_type="constant_with_warmup", warmup_steps=100,
        weight_decay=0.0, max_grad_norm=1.0, logging_steps=100, save_strategy="no", report_to=[],
        use_cpu=True, seed=args.seed, dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=args.quiet,
    )
    trainer = RecallTrainer(model=model, args=training_args, train_dataset=stream,
                            data_collator=VisInContextCollator(processor), processing_class=processor, callbacks=[curriculum],
                            curriculum=curriculum)
    started = time.time()
    trainer.train()
    scratch_dir.cleanup()  # nothing is checkpointed: the results are the figures below
    minutes = (time.time() - started) / 60
    final_set = evaluation_set(args.seed + 2, args.final_eval_size)
    exact, hits = exact_match(model, processor, final_set, blank=blank)
    by_facts = {n: sum(h for h, s in zip(hits, final_set) if s["num_facts"] == n) / max(1, sum(s["num_facts"] == n for s in final_set))
                for n in range(EVAL_FACTS[0], EVAL_FACTS[1] + 1)}
    return {"blank_pages": blank, "steps": trainer.state.global_step, "training_minutes": round(minutes, 2),
            "held_out_exact_match": exact, "exact_match_by_facts_per_page": by_facts, "stages": curriculum.stages,
            "curve": curriculum.curve, "model": model, "processor": processor}


def save_figures(results: dict, output_dir: Path, processor) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for name, run in results["runs"].items():
        steps = [p["step"] for p in run["curve"]]
        axis.plot(steps, [100 * p["held_out_exact_match"] for p in run["curve"]], label=f"{name}: held-out exact match")
        if name == "rendered pages":
            axis.plot(steps, [100 * p["train_sequence_accuracy"] for p in run["curve"]], "--", alpha=0.6,
                      label=f"{name}: whole training sequences right")
            for change in run["stages"][1:]:
                axis.axvline(change["step"], color="grey", lw=0.5, alpha=0.5)
    axis.axhline(100 * results["chance"], color="black", ls=":", label="chance (1 in 100)")
    axis.set_xlabel("training step (grey lines: curriculum moves on)")
    axis.set_ylabel("%")
    axis.set_title(f"Synthetic recall from rendered pages (seed {results['seed']})")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(output_dir / "synthetic_recall_curves.png", dpi=120)
    example = evaluation_set(results["seed"] + 2, 1)[0]
    page = processor.renderer.render(example["context"]).to_images()[0]
    page.resize((page.width * 4, page.height * 4), resample=0).save(output_dir / "synthetic_recall_page.png")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="Training time budget of the rendered-page run.")
    parser.add_argument("--max_steps", type=int, default=100_000, help="Step cap (the time budget usually stops first).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--eval_every", type=int, default=250)
    parser.add_argument("--eval_size", type=int, default=128)
    parser.add_argument("--final_eval_size", type=int, default=1000)
    parser.add_argument("--promote_at", type=float, default=0.85, help="Training sequence accuracy that moves the curriculum on.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip_control", action="store_true", help="Do not run the blank-page control.")
    parser.add_argument("--output_dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")
    args = parser.parse_args(argv)
    for name in ("minutes", "eval_every", "eval_size", "final_eval_size", "batch_size", "max_steps", "threads"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name}: expected a positive number, got {getattr(args, name)}")
    if not 0 < args.promote_at <= 1:
        parser.error(f"--promote_at: expected an accuracy in (0, 1], got {args.promote_at}")
    if args.learning_rate <= 0:
        parser.error(f"--learning_rate: expected a positive number, got {args.learning_rate}")

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    runs = {"rendered pages": train(args, blank=False, max_steps=args.max_steps)}
    processor = runs["rendered pages"]["processor"]
    if not args.skip_control:  # same number of steps, blank pages
        control_args = argparse.Namespace(**{**vars(args), "minutes": float("inf")})
        runs["blank pages (control)"] = train(control_args, blank=True, max_steps=runs["rendered pages"]["steps"])
    results = {
        "task": "generate the two-digit value of a held-out (key, value) pair asked about, from a rendered page of 4-8 facts",
        "seed": args.seed, "chance": 1 / NUM_VALUES, "arguments": vars(args),
        "runs": {name: {k: v for k, v in run.items() if k not in ("model", "processor")} for name, run in runs.items()},
    }
    (output_dir / "synthetic_recall.json").write_text(json.dumps(results, indent=2))
    save_figures(results, output_dir, processor)
    for name, run in results["runs"].items():
        print(f"{name}: held-out exact match {100 * run['held_out_exact_match']:.1f}% after {run['steps']} steps "
              f"({run['training_minutes']} min); chance {100 * results['chance']:.0f}%")
    return results


if __name__ == "__main__":
    main()
