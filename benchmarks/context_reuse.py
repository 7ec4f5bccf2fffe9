"""Encode a document once, ask many questions: the follow-up question's time to first token, four ways.

    python benchmarks/context_reuse.py                     # Llama-3.2-1B shape + ViT-B/16 tower, 4096 tokens
    python benchmarks/context_reuse.py --device cuda
    python benchmarks/context_reuse.py --language-model tiny --tower tiny --length 256 --repeats 1   # seconds

The same document (English text, `--length` tokens) and several different questions:
- rendered, encoded again: `generate(**processor(text=question, context=document))` for each question;
- rendered, reused: `memory = model.encode_media(...)` once, then `generate(..., media=memory)` per question;
- raw, prefilled again: the document's tokens before each question;
- raw, reused prefix cache: the document's KV cache computed once and copied for each question (transformers'
  prompt-reuse pattern: `copy.deepcopy(cache)` then `generate(..., past_key_values=copy)`).
Each reused answer is checked to be the same tokens as its one-shot answer, and the memory and the cache to be
unchanged by the calls. Reported: medians over questions and repeats, and the bytes each reuse keeps.
Writes JSON and a PNG to `benchmarks/results/`.
"""

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from generation import DTYPES, build, timed_generate, tokenizer_for, warm_up
from shapes import LANGUAGE_MODELS, english_text, machine
from transformers import DynamicCache

from visincontext.modeling_visincontext import CACHE_NAME

QUESTIONS = (
    "Question: what does the text say about the government? Answer:",
    "Question: which people are named in the text? Answer:",
    "Question: summarise the second paragraph in one sentence. Answer:",
)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def cache_bytes(cache: DynamicCache) -> int:
    return tensor_bytes(t for layer in cache.layers for t in (layer.keys, layer.values))


def cache_snapshot(cache: DynamicCache) -> list[torch.Tensor]:
    return [t.clone() for layer in cache.layers for t in (layer.keys, layer.values)]


@torch.no_grad()
def measure(
    language_model: str, tower: str, length: int, new_tokens: int, repeats: int, dtype, device: str, seed: int = 0
) -> dict:
    tokenizer = tokenizer_for(language_model)
    model, processor = build(language_model, tower, tokenizer, dtype, device, seed)
    warm_up(model, processor, device, dtype)
    document = english_text(tokenizer, length, seed)

    def on_device(batch):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    pages = on_device(processor(text=QUESTIONS[0], context=document, return_tensors="pt"))
    pages["context_pixel_values"] = pages["context_pixel_values"].to(dtype)
    start = time.perf_counter()
    memory = model.encode_media(context_pixel_values=pages["context_pixel_values"], context_mask=pages["context_mask"])
    encode_seconds = time.perf_counter() - start
    memory_before = {k: v.clone() for k, v in memory.items()}

    prefix = on_device(processor(text=document + "\n", return_tensors="pt"))["input_ids"]
    start = time.perf_counter()
    prefix_cache = DynamicCache(config=model.config.text_config)
    model(input_ids=prefix, use_cache=True, logits_to_keep=1, **{CACHE_NAME: prefix_cache})
    prefill_seconds = time.perf_counter() - start
    cache_before = cache_snapshot(prefix_cache)

    times = {"rendered_encoded_again": [], "rendered_reused": [], "raw_prefilled_again": [], "raw_reused_cache": []}
    identical = {"rendered": True, "raw": True}
    for _ in range(repeats):
        for question in QUESTIONS:
            one_shot = on_device(processor(text=question, context=document, return_tensors="pt"))
            one_shot["context_pixel_values"] = one_shot["context_pixel_values"].to(dtype)
            first, _, expected = timed_generate(model, one_shot, new_tokens, device)
            times["rendered_encoded_again"].append(first)
            prompt = {"input_ids": one_shot["input_ids"], "attention_mask": one_shot["attention_mask"]}
            first, _, answer = timed_generate(model, prompt, new_tokens, device, media=memory)
            times["rendered_reused"].append(first)
            identical["rendered"] &= torch.equal(answer, expected)

            question_ids = tokenizer(question, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
            raw = {"input_ids": torch.cat([prefix, question_ids], dim=1)}
            raw["attention_mask"] = torch.ones_like(raw["input_ids"])
            first, _, expected = timed_generate(model, raw, new_tokens, device)
            times["raw_prefilled_again"].append(first)
            start = time.perf_counter()
            cache = copy.deepcopy(prefix_cache)
            copy_seconds = time.perf_counter() - start  # counted: the copy is part of every reused question
            first, _, answer = timed_generate(model, raw, new_tokens, device, **{CACHE_NAME: cache})
            times["raw_reused_cache"].append(first + copy_seconds)
            identical["raw"] &= torch.equal(answer, expected)

    unchanged = {
        "memory": all(torch.equal(memory[k], v) for k, v in memory_before.items()),
        "prefix_cache": all(torch.equal(a, b) for a, b in zip(cache_snapshot(prefix_cache), cache_before)),
    }
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "language_model": language_model,
        "tower": tower,
        "context_tokens": length,
        "pages": int(pages["context_mask"].sum()),
        "questions": len(QUESTIONS),
        "time_to_first_token_s": medians,
        "runs_s": times,
        "encode_once_s": encode_seconds,
        "prefix_prefill_once_s": prefill_seconds,
        "kept_bytes": {"media_memory": tensor_bytes(memory.values()), "prefix_kv_cache": cache_bytes(prefix_cache)},
        "reuse_speedup": medians["rendered_encoded_again"] / medians["rendered_reused"],
        "reused_memory_vs_reused_cache": medians["raw_reused_cache"] / medians["rendered_reused"],
        "identical_to_one_shot": identical,
        "unchanged_after_reuse": unchanged,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = list(result["time_to_first_token_s"])
    colors = ["#1f77b4", "#aec7e8", "#d62728", "#ff9896"]
    axes[0].barh(names, [result["time_to_first_token_s"][n] for n in names], color=colors)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("follow-up time to first token (s, median, log)")
    kept = result["kept_bytes"]
    axes[1].bar(list(kept), [v / 2**20 for v in kept.values()], color=["#1f77b4", "#d62728"])
    axes[1].set_ylabel("bytes kept per document (MiB)")
    fig.suptitle(
        f"One document ({result['context_tokens']} tokens, {result['pages']} pages), "
        f"{result['questions']} questions: {result['language_model']} + {result['tower']} "
        f"(reuse {result['reuse_speedup']:.1f}x faster than encoding again)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--language-model", default="llama-3.2-1b", choices=sorted(LANGUAGE_MODELS))
    parser.add_argument("--tower", default="vit-b16", choices=["vit-b16", "vit-l14", "tiny"])
    parser.add_argument("--length", type=int, default=4096, help="the document's length in tokens")
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="passes over the questions")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    for name in ("length", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected a positive number, got {getattr(args, name)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device: cuda was asked for, but torch sees no GPU")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    output = Path(args.output or f"benchmarks/results/context_reuse_{args.language_model}_{args.device}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    result = measure(
        args.language_model,
        args.tower,
        args.length,
        args.new_tokens,
        args.repeats,
        DTYPES[args.dtype],
        args.device,
        args.seed,
    )
    result.update(
        dtype=args.dtype,
        device=args.device,
        threads=torch.get_num_threads(),
        machine=machine(args.device),
        versions={"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    )
    if not all(result["identical_to_one_shot"].values()) or not all(result["unchanged_after_reuse"].values()):
        raise SystemExit(
            f"reuse changed the answers or the reused state: {result['identical_to_one_shot']}, "
            f"{result['unchanged_after_reuse']}"
        )
    output.write_text(json.dumps(result, indent=2))
    plot(result, output.with_suffix(".png"))
    medians = result["time_to_first_token_s"]
    print(" | ".join(f"{name} {seconds:.3f}s" for name, seconds in medians.items()))
    print(
        f"reuse_speedup {result['reuse_speedup']:.1f}x; kept: memory {result['kept_bytes']['media_memory'] / 2**20:.1f}"
        f" MiB, prefix cache {result['kept_bytes']['prefix_kv_cache'] / 2**20:.1f} MiB -> {output}"
    )
    return result


if __name__ == "__main__":
    main()
