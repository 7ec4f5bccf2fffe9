"""Measured training-step memory: raw tokens vs rendered pages, each point in its own process.

    python benchmarks/train_memory.py                                  # Qwen2.5-0.5B shape + ViT-B/16, 8 GiB budget
    python benchmarks/train_memory.py --device cuda --budget-gib 80    # the allocator's peak on a GPU
    python benchmarks/train_memory.py --language-model tiny --tower tiny --budget-gib 1 --max-length 1024  # seconds

One training step (forward, backward, AdamW step; vision tower and LM body frozen as in the paper, new parts
trained) of the same model, with in-context English text of 256, 512, 1024, ... tokens given (a) as raw tokens
before a 64-token continuation, or (b) rendered into 224x224 pages. Each point runs in a fresh process, and its
memory is measured: on a CPU the process's peak resident memory during the step (VmHWM, reset after the model and
optimizer are built and freed memory is returned with `malloc_trim`) less what the process held before the model
(interpreter, libraries, inputs), on a GPU `torch.cuda.max_memory_allocated`.
Lengths double until the step no longer fits `--budget-gib`; the longest length that fits is reported for each
side, and their ratio as `measured_context_ratio`. Beside each measurement: the estimate of
`benchmarks/context_scaling.py` for the same step (weights, gradients of the parameters the loss reaches, and the
larger of the Adam states and the activations saved for backward, each counted once, plus the loss's two
logits-sized gradients; all counted on the meta device) and its relative error. Writes JSON and a PNG.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

PROMPT_TOKENS = 64


def _status_bytes(field: str) -> int:
    """A field of /proc/self/status (VmRSS, VmHWM) in bytes; 0 where there is no /proc (not Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def resident_bytes() -> int:
    return _status_bytes("VmRSS")


def release_free_memory() -> None:
    """glibc's malloc_trim(0): return freed heap memory to the system (a no-op elsewhere)."""
    from shapes import glibc

    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


def reset_peak_resident() -> int:
    """Start a new peak-RSS window and return the resident bytes now.

    Writing 5 to /proc/self/clear_refs resets the kernel's high-water mark (VmHWM) to the current RSS, so
    peaks reached earlier (loading the tokenizer, counting the estimate) do not count as the step's.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_bytes("VmRSS")


def peak_resident() -> int:
    """The peak RSS since `reset_peak_resident` (VmHWM), or since the process started where it cannot be reset."""
    return _status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def step_inputs(processor, tokenizer, mode: str, length: int, seed: int, device: str) -> tuple[dict, int]:
    """(inputs of one training step, pages): the context as tokens before the continuation (raw) or as pages."""
    from shapes import english_text

    text = english_text(tokenizer, length, seed)
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, min(len(tokenizer), 32000) - 2, (1, PROMPT_TOKENS), generator=generator)
    if mode == "raw":
        context = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :length]
        input_ids = torch.cat([context, prompt], dim=1)
        labels = input_ids.clone()
        labels[:, : context.shape[1]] = -100  # trained on the continuation only, like the rendered step
        return {"input_ids": input_ids.to(device), "labels": labels.to(device)}, 0
    batch = processor(text="", context=text, return_tensors="pt", add_special_tokens=False)
    pixels = batch["context_pixel_values"]
    # one sample: every page is real, so no context_mask is passed (the meta device cannot index by a mask)
    return {
        "input_ids": prompt.to(device),
        "labels": prompt.to(device),
        "context_pixel_values": pixels.to(device),
    }, int(batch["context_mask"].sum())


def estimate(config, inputs: dict, mode: str, length: int) -> dict:
    """The estimator of context_scaling.py on the meta device: nothing allocated."""
    from context_scaling import estimated_step_memory, training_step

    from visincontext import VisInContextForConditionalGeneration

    with torch.device("meta"):
        model = VisInContextForConditionalGeneration(config).train()
    meta_inputs = {k: v.to("meta") for k, v in inputs.items()}
    sequence = inputs["input_ids"].shape[1]
    slots = meta_inputs.get("context_pixel_values", torch.empty(0, 0)).shape[1] * config.num_latents
    shapes = {(sequence, sequence), (sequence, slots), (sequence, slots + config.num_latents)}
    counted = training_step(model, meta_inputs, shapes, "meta")
    return {
        "saved_bytes_flash": counted["saved_bytes_flash"],
        "loss_gradient_bytes": counted["loss_gradient_bytes"],
        "flops": counted["flops"],
        "gradient_bytes": counted["gradient_bytes"],
        "optimizer_bytes": counted["optimizer_bytes"],
        "estimated_memory_bytes": estimated_step_memory(model, counted),
    }


def run_point(language_model: str, tower: str, mode: str, length: int, device: str, seed: int) -> dict:
    """One training step in this process: its measured memory, time and estimate."""
    from generation import build_processor, model_config, tokenizer_for

    from visincontext import VisInContextForConditionalGeneration

    tokenizer = tokenizer_for(language_model)
    processor = build_processor(tokenizer, tower)
    config = model_config(language_model, tower, processor)
    inputs, pages = step_inputs(processor, tokenizer, mode, length, seed, device)
    estimated = estimate(config, inputs, mode, length)
    baseline = resident_bytes() if device == "cpu" else 0
    torch.manual_seed(seed)
    with torch.device(device):
        model = VisInContextForConditionalGeneration(config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    if device == "cpu":
        # building the model frees temporaries that the C allocator keeps resident; hand them back, then start the
        # peak window: what is measured is the weights plus what the step itself needs
        release_free_memory()
        reset_peak_resident()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated()
    else:
        measured = peak_resident() - baseline
    return {
        "mode": mode,
        "context_tokens": length,
        "pages": pages,
        "sequence_tokens": int(inputs["input_ids"].shape[1]),
        "measured_memory_bytes": measured,
        "process_baseline_bytes": baseline,
        "step_time_s": time.perf_counter() - start,
        "loss": float(loss),
        **estimated,
        "estimate_relative_error": (estimated["estimated_memory_bytes"] - measured) / measured,
    }


def point_in_new_process(args, mode: str, length: int) -> dict:
    command = [
        sys.executable,
        __file__,
        "--point",
        mode,
        str(length),
        "--language-model",
        args.language_model,
        "--tower",
        args.tower,
        "--device",
        args.device,
        "--seed",
        str(args.seed),
    ]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"{mode} at {length} tokens failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def sweep(args, measure_point=point_in_new_process) -> dict:
    budget = int(args.budget_gib * 2**30)
    points = {"raw": [], "rendered": []}
    for mode in ("raw", "rendered"):
        length = args.start
        while length <= args.max_length:
            point = measure_point(args, mode, length)
            points[mode].append(point)
            pages = f" ({point['pages']} pages)" if mode == "rendered" else ""
            print(
                f"{mode:>8} {length:>6} tokens{pages}: "
                f"measured {point['measured_memory_bytes'] / 2**30:6.2f} GiB, estimated "
                f"{point['estimated_memory_bytes'] / 2**30:6.2f} GiB ({100 * point['estimate_relative_error']:+.1f}%), "
                f"step {point['step_time_s']:.1f}s",
                flush=True,
            )
            if point["measured_memory_bytes"] > budget:
                break
            length *= 2
    fitting = {
        mode: max((p["context_tokens"] for p in rows if p["measured_memory_bytes"] <= budget), default=None)
        for mode, rows in points.items()
    }
    exceeded = {mode: any(p["measured_memory_bytes"] > budget for p in rows) for mode, rows in points.items()}
    ratio = fitting["rendered"] / fitting["raw"] if fitting["raw"] and fitting["rendered"] else None
    errors = [abs(p["estimate_relative_error"]) for rows in points.values() for p in rows]
    return {
        "budget_bytes": budget,
        "points": points,
        "longest_fitting": fitting,
        "budget_exceeded": exceeded,
        "measured_context_ratio": ratio,
        "measured_context_ratio_is_lower_bound": not exceeded["rendered"],
        "estimator_max_abs_relative_error": max(errors),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for mode, color in (("raw", "#d62728"), ("rendered", "#1f77b4")):
        rows = result["points"][mode]
        lengths = [p["context_tokens"] for p in rows]
        ax.plot(
            lengths, [p["measured_memory_bytes"] / 2**30 for p in rows], "o-", color=color, label=f"{mode}: measured"
        )
        ax.plot(
            lengths,
            [p["estimated_memory_bytes"] / 2**30 for p in rows],
            "x--",
            color=color,
            alpha=0.7,
            label=f"{mode}: estimated",
        )
    ax.axhline(result["budget_bytes"] / 2**30, color="gray", linestyle=":", label="budget")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("in-context text (tokens)")
    ax.set_ylabel("training-step memory (GiB)")
    ratio = result["measured_context_ratio"]
    ax.set_title(
        f"{result['language_model']} + {result['tower']}, {result['device']}: rendered fits "
        f"{'>= ' if result['measured_context_ratio_is_lower_bound'] else ''}{ratio:g}x longer context"
        if ratio
        else f"{result['language_model']} + {result['tower']}"
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv=None):
    from shapes import LANGUAGE_MODELS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--language-model", default="qwen2.5-0.5b", choices=sorted(LANGUAGE_MODELS))
    parser.add_argument("--tower", default="vit-b16", choices=["vit-b16", "vit-l14", "tiny"])
    parser.add_argument("--budget-gib", type=float, default=8.0, help="the memory budget both sides must fit")
    parser.add_argument("--start", type=int, default=256, help="the first context length (tokens); then doubled")
    parser.add_argument("--max-length", type=int, default=65536, help="stop doubling here even within budget")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None)
    parser.add_argument("--point", nargs=2, metavar=("MODE", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.budget_gib <= 0:
        parser.error(f"--budget-gib: expected a positive number, got {args.budget_gib}")
    if not 1 <= args.start <= args.max_length:
        parser.error(f"--start: expected 1 to --max-length ({args.max_length}), got {args.start}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device: cuda was asked for, but torch sees no GPU")
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.point:  # a child process: one point, printed as JSON
        mode, length = args.point[0], int(args.point[1])
        print(json.dumps(run_point(args.language_model, args.tower, mode, length, args.device, args.seed)))
        return None
    from shapes import machine

    output = Path(args.output or f"benchmarks/results/train_memory_{args.language_model}_{args.device}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "command": "python benchmarks/train_memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "language_model": args.language_model,
        "tower": args.tower,
        "device": args.device,
        "dtype": "float32",
        **sweep(args),
        "machine": machine(args.device),
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }
    output.write_text(json.dumps(result, indent=2))
    plot(result, output.with_suffix(".png"))
    print(
        f"longest fitting {result['longest_fitting']}; measured_context_ratio {result['measured_context_ratio']}; "
        f"estimator error at most {100 * result['estimator_max_abs_relative_error']:.1f}% -> {output}"
    )
    return result


if __name__ == "__main__":
    main()
