"""Renderer speed: VisInContext's glyph-atlas renderer vs drawing every line with PIL's `ImageDraw.text`.

    python benchmarks/render_speed.py [--pages 400] [--output benchmarks/results/render_speed.json]

Both draw the same lines (the renderer's own layout) with the same font, size and page geometry, in
one process; the JSON records pages/s of each, the ratio, and the processor's throughput on batches
with 2 images and 4 pages of context per sample.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from shapes import machine

from visincontext.rendering_visincontext import TextRenderer

SAMPLE = (
    "VisInContext renders long in-context text into images so that a vision encoder can read it. "
    "Each page is cut into patches; every row of text is exactly one patch tall. "
    "The quick brown fox jumps over the lazy dog, 0123456789 times; naïve café déjà vu. "
)


def pil_baseline(renderer: TextRenderer, text: str) -> tuple[int, float]:
    """Draws the renderer's rows with ImageDraw.text, page by page. Returns (pages, seconds)."""
    font = ImageFont.truetype(renderer.font_path, renderer.font_size)
    ascent, descent = font.getmetrics()
    y_offset = (renderer.line_height - ascent - descent) // 2
    rows_of_pages = renderer.page_lines(text)
    begin = time.perf_counter()
    for rows in rows_of_pages:
        image = Image.new("L", (renderer.page_width, renderer.page_height), 255)
        draw = ImageDraw.Draw(image)
        for r, line in enumerate(rows):
            draw.text((renderer.margin, r * renderer.line_height + y_offset), line, font=font, fill=0)
        np.asarray(image)
    return len(rows_of_pages), time.perf_counter() - begin


def renderer_speed(renderer: TextRenderer, text: str, repeats: int = 3) -> tuple[int, float]:
    renderer.render(SAMPLE)  # glyphs drawn once, as in any long run
    best = float("inf")
    for _ in range(repeats):
        begin = time.perf_counter()
        pages = len(renderer.render(text))
        best = min(best, time.perf_counter() - begin)
    return pages, best


def processor_speed(batch_size: int = 8, repeats: int = 5) -> dict:
    from visincontext.testing import tiny_processor

    processor = tiny_processor(image_size=224, line_height=16)  # CLIP image processor at 224 px, byte tokenizer
    rng = np.random.default_rng(0)
    images = [
        [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(2)]
        for _ in range(batch_size)
    ]
    text = SAMPLE
    while len(processor.renderer.render(text + SAMPLE)) <= 4:  # as much text as fills 4 pages
        text += SAMPLE
    contexts = [text] * batch_size
    prompts = ["<image>What is shown?<image>Answer:"] * batch_size
    processor(images=images, text=prompts, context=contexts, return_tensors="pt")
    best = float("inf")
    for _ in range(repeats):
        begin = time.perf_counter()
        out = processor(images=images, text=prompts, context=contexts, return_tensors="pt")
        best = min(best, time.perf_counter() - begin)
    return {
        "batch_size": batch_size,
        "images_per_sample": 2,
        "context_pages_per_sample": int(out["context_mask"].sum(1).max()),
        "samples_per_s": batch_size / best,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    names = ["PIL ImageDraw.text", "TextRenderer"]
    values = [result["pil_pages_per_s"], result["renderer_pages_per_s"]]
    ax.bar(names, values, color=["#999999", "#1f77b4"])
    ax.set_ylabel("pages / s (one process)")
    ax.set_title(
        f"Rendering {result['geometry']['page_width']}x{result['geometry']['page_height']} pages: "
        f"{result['speedup']:.1f}x"
    )
    for x, v in enumerate(values):
        ax.text(x, v, f"{v:,.0f}", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def long_context_speed(renderer: TextRenderer, characters: int = 10_000_000, max_pages: int = 8) -> dict:
    """Seconds to keep `max_pages` of a 10 MB context (one unbroken word, and prose in paragraphs), per overflow
    policy: the renderer lays out only what it keeps, so this does not grow with the text."""
    texts = {
        "one 10 MB word": "x" * characters,
        "10 MB of prose": (SAMPLE * (characters // len(SAMPLE) // 50 + 1) + "\n") * 50,
    }
    timings = {}
    for name, text in texts.items():
        for overflow in ("keep_end", "truncate"):
            start = time.perf_counter()
            result = renderer.render(text[:characters], max_pages=max_pages, overflow=overflow)
            timings[f"{name}, {overflow}"] = {
                "seconds": time.perf_counter() - start,
                "pages": len(result),
                "cut_characters": result.cut_characters,
            }
    print(json.dumps(timings, indent=2))
    return {"characters": characters, "max_pages": max_pages, "timings": timings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=400, help="pages of text to render")
    parser.add_argument("--output", default="benchmarks/results/render_speed.json")
    args = parser.parse_args()

    renderer = TextRenderer()
    pages_per_sample = len(renderer.render(SAMPLE * 20))
    text = SAMPLE * (20 * args.pages // max(pages_per_sample, 1) + 1)
    pil_pages, pil_seconds = pil_baseline(renderer, text)
    ours_pages, ours_seconds = renderer_speed(renderer, text)
    assert pil_pages == ours_pages
    result = {
        "machine": machine(),
        "versions": {"numpy": np.__version__, "pillow": Image.__version__},
        "preset": "default",
        "seed": 0,
        "geometry": {k: v for k, v in renderer.settings().items() if "path" not in k},
        "pages": ours_pages,
        "pil_pages_per_s": pil_pages / pil_seconds,
        "renderer_pages_per_s": ours_pages / ours_seconds,
        "speedup": (ours_pages / ours_seconds) / (pil_pages / pil_seconds),
    }
    result["processor"] = processor_speed()
    result["long_context"] = long_context_speed(renderer)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    plot(result, output.with_suffix(".png"))
    renderer.render(SAMPLE * 3).to_images()[0].save(output.with_name("rendered_page.png"))
    print(
        json.dumps(
            {k: result[k] for k in ("pages", "pil_pages_per_s", "renderer_pages_per_s", "speedup", "processor")},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
