"""The benchmark scripts' core functions on tiny presets: measurements are consistent (issue: benchmarks)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_context_scaling_grows_and_raw_grows_faster():
    import context_scaling

    result = context_scaling.measure("tiny", [256, 512, 1024], device="cpu", seed=0, chars_per_token=4.0)
    rows = result["rows"]
    for side in ("raw", "rendered"):
        for key in ("flops", "saved_bytes", "saved_bytes_flash"):
            values = [r[side][key] for r in rows]
            assert values == sorted(values) and values[0] < values[-1], (side, key, values)
    for key in ("flops", "saved_bytes_flash"):
        raw_growth = rows[-1]["raw"][key] - rows[0]["raw"][key]
        rendered_growth = rows[-1]["rendered"][key] - rows[0]["rendered"][key]
        assert raw_growth > rendered_growth > 0, key
    assert [r["pages"] for r in rows] == sorted(r["pages"] for r in rows) and rows[-1]["pages"] > rows[0]["pages"]
    assert all(r["latents"] == r["pages"] * r["latents_per_page"] for r in rows)
    # the same model on the meta device counts the same FLOPs and bytes as on the CPU
    meta = context_scaling.measure("tiny", [256], device="meta", seed=0, chars_per_token=4.0)["rows"][0]
    for side in ("raw", "rendered"):
        assert meta[side]["flops"] == rows[0][side]["flops"]
        assert meta[side]["saved_bytes"] == rows[0][side]["saved_bytes"]
    summary = context_scaling.summarize({"rows": rows}, at=512)
    assert summary["flops_fraction_at_512"] < 1 and summary["saved_bytes_ratio_at_512"] > 1


def test_render_speed_measures_the_same_pages():
    import render_speed

    from visincontext.rendering_visincontext import TextRenderer

    renderer = TextRenderer()
    text = render_speed.SAMPLE * 30
    pil_pages, pil_seconds = render_speed.pil_baseline(renderer, text)
    ours_pages, ours_seconds = render_speed.renderer_speed(renderer, text, repeats=1)
    assert pil_pages == ours_pages > 3 and pil_seconds > 0 and ours_seconds > 0
    throughput = render_speed.processor_speed(batch_size=2, repeats=1)
    assert throughput["context_pages_per_sample"] == 4 and throughput["samples_per_s"] > 0


def test_generation_benchmark_tiny(tmp_path):
    import generation

    model, processor = generation.build("tiny", tmp_path)
    rows = generation.measure(model, processor, [256, 1024], decode_tokens=4, seed=0, repeats=1)
    assert rows[0]["pages"] < rows[1]["pages"]
    assert rows[0]["raw_prompt_tokens"] > 256 and rows[0]["rendered_prompt_tokens"] < 100
    for row in rows:
        for side in ("raw", "rendered"):
            assert row[side]["time_to_first_token_s"] > 0 and row[side]["decode_tokens_per_s"] > 0
