"""In-context length vs training-step cost: text as raw tokens vs the same text rendered into pages.

    python benchmarks/context_scaling.py --preset small     # runs for real on this CPU
    python benchmarks/context_scaling.py --preset paper     # Mistral-7B + CLIP ViT-L/14 shapes, on the meta device
    python benchmarks/context_scaling.py --preset paper --device cuda   # real peak memory and step time on a GPU

One training step (forward + backward; vision tower and LM body frozen, as in the paper) of the same
VisInContext model, for each in-context length: (a) raw: the context is tokens in the LM's sequence;
(b) rendered: the context is drawn into pages read by the resampler and cross-attention. Both steps also
train on a 64-token continuation. Measured: FLOPs (`FlopCounterMode`), bytes of activations saved for
backward (`saved_tensors_hooks`; also without the attention-score matrices, which FlashAttention-style
kernels never store), an estimated step memory (bf16 weights + fp32 Adam states for the trained
parameters + activations), and on a GPU `max_memory_allocated` and step time. Writes JSON and a PNG.
"""

import argparse
import contextlib
import json
import random
import time
import weakref
from pathlib import Path

import torch
from shapes import machine
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, LlamaConfig, MistralConfig

from visincontext import VisInContextConfig, VisInContextForConditionalGeneration
from visincontext.rendering_visincontext import TextRenderer

PROMPT_TOKENS = 64
GPU_BYTES = 80 * 1024**3
PAPER_FIGURE = {  # showlab/VisInContext figures/gpu_memory.png (GB): raw text vs rendered, same model
    "raw": {128: 54.5, 256: 71.0, 512: 83.0},
    "rendered": {256: 57.0, 512: 62.0, 1024: 68.0, 2048: 76.0},
}
WORDS = (
    "the model reads long context text rendered into images so that many more tokens fit in the same memory "
    "while the language model attends to a few latents per page through gated cross attention layers"
).split()


def preset_config(name: str) -> tuple[VisInContextConfig, torch.dtype]:
    if name == "paper":
        vision = CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            patch_size=14,
            image_size=224,
        )
        text = MistralConfig()  # Mistral-7B: hidden 4096, 32 layers, 32 heads (8 kv), vocab 32000
        config = VisInContextConfig(
            vision_config=vision,
            text_config=text,
            cross_attention_every=4,
            num_latents=64,
            image_token_id=32000,
            end_of_chunk_token_id=32001,
        )
        return config, torch.bfloat16
    if name == "small":  # runs for real on a CPU in minutes
        vision = CLIPVisionConfig(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            patch_size=16,
            image_size=224,
        )
        text = LlamaConfig(
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=8,
            vocab_size=1000,
            max_position_embeddings=1 << 18,
        )
        config = VisInContextConfig(
            vision_config=vision,
            text_config=text,
            cross_attention_every=2,
            num_latents=64,
            resampler_depth=2,
            image_token_id=1000,
            end_of_chunk_token_id=1001,
        )
        return config, torch.float32
    if name == "tiny":  # for tests: seconds
        vision = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            patch_size=8,
            image_size=128,
        )
        text = LlamaConfig(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=1000,
            max_position_embeddings=1 << 16,
        )
        config = VisInContextConfig(
            vision_config=vision,
            text_config=text,
            cross_attention_every=2,
            num_latents=16,
            resampler_depth=1,
            resampler_num_heads=2,
            resampler_head_dim=16,
            image_token_id=1000,
            end_of_chunk_token_id=1001,
        )
        return config, torch.float32
    raise ValueError(f"preset: expected 'paper', 'small' or 'tiny', got {name!r}")


def sample_text(num_tokens: int, chars_per_token: float, seed: int) -> str:
    rng = random.Random(seed)
    words, length = [], 0
    while length < num_tokens * chars_per_token:
        word = rng.choice(WORDS)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)[: int(num_tokens * chars_per_token)]


class SavedBytes:
    """Counts the bytes of activations autograd saves for backward (weights, which matmuls also save, are
    not activations and are skipped); `attention` holds the attention-score matrices.

    Each tensor is counted once, however many ops save it (the resampler's six layers all save the same media
    features, every cross-attention layer the same latents), and a saved view counts as the tensor it views, whose
    whole memory it keeps alive. Tensors are recognised by identity through weak references, so counting keeps
    nothing alive longer than autograd does.
    """

    def __init__(self, attention_shapes: set[tuple[int, int]], parameters: set[int]):
        self.total = self.attention = 0
        self.attention_shapes = attention_shapes
        self.parameters = parameters
        self.seen: dict[int, weakref.ref] = {}

    def pack(self, tensor):
        owner = tensor if tensor._base is None else tensor._base
        if id(owner) in self.parameters:  # a weight, or a view of one
            return tensor
        known = self.seen.get(id(owner))
        if known is not None and known() is owner:
            return tensor
        self.seen[id(owner)] = weakref.ref(owner)
        size = owner.numel() * owner.element_size()
        self.total += size
        if owner.dim() >= 3 and tuple(owner.shape[-2:]) in self.attention_shapes:
            self.attention += size
        return tensor

    @staticmethod
    def unpack(tensor):
        return tensor


def training_step(model, inputs: dict, attention_shapes: set, device: str) -> dict:
    saved = SavedBytes(attention_shapes, {id(p) for p in model.parameters()})
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    # Off the GPU, attention runs the math path, whose matmuls the FLOP counter sees (the fused CPU kernel is
    # not in its registry) and which the meta device uses too: CPU and meta counts agree.
    backend = contextlib.nullcontext() if device == "cuda" else sdpa_kernel(SDPBackend.MATH)
    start = time.perf_counter()
    with (
        backend,
        torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack),
        FlopCounterMode(display=False) as flops,
    ):
        output = model(**inputs)
        output.loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    # only the parameters this step's loss reaches get a gradient and Adam moments (e.g. no image resampler
    # without images, no cross-attention without media)
    updated = [p for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    result = {
        "flops": flops.get_total_flops(),
        "saved_bytes": saved.total,
        "saved_bytes_flash": saved.total - saved.attention,
        # the loss's backward starts by materialising two fp32 tensors of the logits' shape (the gradients of
        # log-softmax's output and input) while nearly every saved activation is still alive
        "loss_gradient_bytes": 2 * 4 * output.logits.numel(),
        "gradient_bytes": 4 * sum(p.numel() for p in updated),
        "optimizer_bytes": sum(p.numel() * ((0 if p.dtype == torch.float32 else 4) + 8) for p in updated),
    }
    if device != "meta":
        result["step_time_s"] = elapsed
    if device == "cuda":
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    return result


def static_bytes(model) -> int:
    """Weights in their dtype, and for each trained parameter: an fp32 master copy (when the weights are not fp32),
    an fp32 gradient and two fp32 Adam moments (an upper bound: parameters a step does not reach hold neither)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trained = sum(
        p.numel() * ((0 if p.dtype == torch.float32 else 4) + 4 + 8) for p in model.parameters() if p.requires_grad
    )
    return weights + trained


def estimated_step_memory(model, step: dict) -> int:
    """The estimated peak memory of one training step, from `training_step`'s counts: the weights, the gradients of
    the parameters the loss reaches, and the larger of (a) the activations saved for backward plus the loss's
    logits-sized gradients at the start of backward (both freed as backward runs) and (b) the optimizer's fp32
    moments and master copies (created by the step, after backward)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    backward = step["saved_bytes_flash"] + step["loss_gradient_bytes"]
    return weights + step["gradient_bytes"] + max(backward, step["optimizer_bytes"])


def measure(preset: str, lengths: list[int], device: str, seed: int, chars_per_token: float) -> dict:
    config, dtype = preset_config(preset)
    torch.manual_seed(seed)
    with torch.device(device):
        model = VisInContextForConditionalGeneration(config)
    model = model.to(dtype).train()
    vision = config.vision_config
    renderer = TextRenderer(page_height=vision.image_size, page_width=vision.image_size, line_height=vision.patch_size)
    static = static_bytes(model)
    rows = []
    for length in lengths:
        text = sample_text(length, chars_per_token, seed)
        pages = renderer.render(text)
        num_pages = len(pages)
        prompt = torch.randint(0, 1000, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(seed)).to(device)
        raw_ids = torch.randint(
            0, 1000, (1, length + PROMPT_TOKENS), generator=torch.Generator().manual_seed(seed + 1)
        ).to(device)
        raw_labels = raw_ids.clone()
        raw_labels[:, :length] = -100  # trained on the continuation only, like the rendered step
        raw = training_step(
            model,
            {"input_ids": raw_ids, "labels": raw_labels},
            {(length + PROMPT_TOKENS, length + PROMPT_TOKENS)},
            device,
        )
        pixels = (
            torch.from_numpy(pages.pages).to(torch.float32).div(127.5).sub(1.0)[None, :, None].expand(-1, -1, 3, -1, -1)
        )
        slots = num_pages * config.num_latents
        rendered = training_step(
            model,
            {"input_ids": prompt, "labels": prompt, "context_pixel_values": pixels.to(device, dtype)},
            {(PROMPT_TOKENS, PROMPT_TOKENS), (PROMPT_TOKENS, slots), (PROMPT_TOKENS, slots + config.num_latents)},
            device,
        )
        for result in (raw, rendered):
            result["estimated_memory_bytes"] = estimated_step_memory(model, result)
        rows.append(
            {
                "context_tokens": length,
                "characters": len(text),
                "pages": num_pages,
                "latents_per_page": config.num_latents,
                "latents": slots,
                "compression_tokens_per_latent": length / slots,
                "raw": raw,
                "rendered": rendered,
            }
        )
        print(
            f"{length:>7} tokens {num_pages:>4} pages | FLOPs raw {raw['flops']:.3e} "
            f"rendered {rendered['flops']:.3e} | "
            f"saved raw {raw['saved_bytes_flash'] / 2**30:7.2f} GiB "
            f"rendered {rendered['saved_bytes_flash'] / 2**30:7.2f} GiB",
            flush=True,
        )
    return {"static_bytes": static, "rows": rows, "dtype": str(dtype), "chars_per_token": chars_per_token}


def largest_fitting(rows: list[dict], side: str, budget: int = GPU_BYTES) -> int | None:
    fitting = [r["context_tokens"] for r in rows if r[side]["estimated_memory_bytes"] <= budget]
    return max(fitting) if fitting else None


def summarize(result: dict, at: int = 2048) -> dict:
    rows = {r["context_tokens"]: r for r in result["rows"]}
    summary = {}
    if at in rows:
        row = rows[at]
        summary[f"saved_bytes_ratio_at_{at}"] = row["raw"]["saved_bytes_flash"] / row["rendered"]["saved_bytes_flash"]
        summary[f"flops_fraction_at_{at}"] = row["rendered"]["flops"] / row["raw"]["flops"]
    raw_max, rendered_max = largest_fitting(result["rows"], "raw"), largest_fitting(result["rows"], "rendered")
    summary.update(largest_fitting_80gb_raw=raw_max, largest_fitting_80gb_rendered=rendered_max)
    if raw_max and rendered_max:
        summary["fitting_length_ratio"] = rendered_max / raw_max
    return summary


def plot(result: dict, path: Path, preset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    lengths = [r["context_tokens"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for side, color in (("raw", "#d62728"), ("rendered", "#1f77b4")):
        axes[0].plot(
            lengths,
            [r[side]["estimated_memory_bytes"] / 1e9 for r in rows],
            "o-",
            color=color,
            label=f"{side} (estimated)",
        )
        if "peak_memory_bytes" in rows[0][side]:
            axes[0].plot(
                lengths,
                [r[side]["peak_memory_bytes"] / 1e9 for r in rows],
                "s--",
                color=color,
                label=f"{side} (measured, GPU)",
            )
        axes[1].plot(lengths, [r[side]["flops"] / 1e12 for r in rows], "o-", color=color, label=side)
    if preset == "paper":
        for side, color in (("raw", "#d62728"), ("rendered", "#1f77b4")):
            points = PAPER_FIGURE[side]
            axes[0].plot(
                list(points), list(points.values()), "x:", color=color, alpha=0.6, label=f"{side} (paper figure)"
            )
        axes[0].axhline(80, color="gray", linestyle=":", label="80 GB")
    for ax, label in ((axes[0], "training-step memory (GB)"), (axes[1], "training-step TFLOPs")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("in-context text (tokens)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"VisInContext: raw text vs rendered pages ({preset} preset)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=["paper", "small", "tiny"])
    parser.add_argument("--device", default=None, help="meta (paper preset default), cpu (small default) or cuda")
    parser.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=None,
        help="default 256 ... 8192; on a CPU up to 4096 (raw 8192 needs > 24 GB with CPU attention)",
    )
    parser.add_argument(
        "--extra-lengths",
        type=int,
        nargs="*",
        default=None,
        help="longer lengths for the 80 GB search (default on meta: up to 131072)",
    )
    parser.add_argument("--chars-per-token", type=float, default=4.0, help="characters per token of English BPE text")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    device = args.device or ("meta" if args.preset == "paper" else "cpu")
    if args.lengths is None:
        args.lengths = [256, 512, 1024, 2048, 4096] + ([] if device == "cpu" else [8192])
    extra = (
        args.extra_lengths
        if args.extra_lengths is not None
        else ([16384, 32768, 65536, 131072] if device == "meta" else [])
    )
    result = measure(args.preset, args.lengths + extra, device, args.seed, args.chars_per_token)
    result.update(
        preset=args.preset,
        device=device,
        seed=args.seed,
        lengths=args.lengths + extra,
        machine=machine(device),
        versions={"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        paper_figure_gb=PAPER_FIGURE,
    )
    result["summary"] = summarize(result)
    output = Path(args.output or f"benchmarks/results/context_scaling_{args.preset}_{device}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    plot(result, output.with_suffix(".png"), args.preset)
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
