"""The benchmark scripts' core functions on tiny presets: measurements are consistent (issue: benchmarks)."""

import sys
from pathlib import Path

import pytest
import torch

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


def test_generation_benchmark_measures_both_paths_and_counts_their_flops():
    import generation

    result = generation.measure(
        "tiny", ["tiny"], [256, 1024], new_tokens=3, repeats=1, dtype=torch.float32, device="cpu"
    )
    short, long = result["rows"]
    assert short["rendered"]["tiny"]["pages"] < long["rendered"]["tiny"]["pages"]
    assert short["raw"]["prompt_tokens"] > 256 > 100 > short["rendered"]["tiny"]["prompt_tokens"]
    for row in (short, long):
        rendered = row["rendered"]["tiny"]
        assert rendered["ttft_speedup"] == row["raw"]["time_to_first_token_s"] / rendered["time_to_first_token_s"]
        assert len(rendered["runs"]) == 1 and rendered["decode_tokens_per_s"] > 0
    # raw prefill FLOPs grow with the context; rendered ones grow by the pages only
    flops = [row["rendered"]["tiny"]["flops"] for row in (short, long)]
    assert flops[1]["raw_flops"] > 3 * flops[0]["raw_flops"]
    assert flops[0]["rendered_flops"] < flops[1]["rendered_flops"] < flops[1]["raw_flops"]


def test_flops_crossover_is_interpolated_in_log_size():
    import generation

    points = [
        {"language_model_parameters": 1e8, "flops_ratio": 0.5},
        {"language_model_parameters": 1e9, "flops_ratio": 0.8},
        {"language_model_parameters": 1e10, "flops_ratio": 1.2},
    ]
    assert generation.crossover(points) == pytest.approx(10**9.5)
    assert generation.crossover(points[:2]) is None


@pytest.mark.parametrize(
    ("flags", "expected"),
    [("fpu avx512f avx512_bf16 amx_bf16 amx_tile", "amx"), ("fpu avx512f avx512_bf16", "avx512_bf16"), ("fpu", None)],
)
def test_machine_names_the_cpu_and_its_bf16_matmul_instructions(tmp_path, flags, expected):
    import shapes

    cpuinfo = tmp_path / "cpuinfo"
    cores = "".join(f"processor\t: {i}\nmodel name\t: Example CPU 9000\nflags\t\t: {flags}\n\n" for i in range(2))
    cpuinfo.write_text(cores)
    described = shapes.machine("cpu", cpuinfo)
    assert (described["cpu"], described["bf16_matmul"], described["gpu"]) == ("Example CPU 9000", expected, None)


def test_context_reuse_answers_like_one_shot_and_keeps_its_state():
    import context_reuse

    result = context_reuse.measure("tiny", "tiny", 512, new_tokens=3, repeats=1, dtype=torch.float32, device="cpu")
    assert result["identical_to_one_shot"] == {"rendered": True, "raw": True}
    assert result["unchanged_after_reuse"] == {"memory": True, "prefix_cache": True}
    assert result["reuse_speedup"] == (
        result["time_to_first_token_s"]["rendered_encoded_again"] / result["time_to_first_token_s"]["rendered_reused"]
    )
    # the prefix cache keeps keys and values of every layer for every prefix token (4 layers, 4 heads of 32, fp32)
    prefix_tokens = 512 + 1  # the document and its line break (byte-level tokens)
    assert result["kept_bytes"]["prefix_kv_cache"] == 4 * 2 * 4 * 32 * prefix_tokens * 4


def test_train_memory_sweep_stops_at_the_budget_and_reports_the_ratio():
    import train_memory

    args = train_memory.parse_args(["--budget-gib", "1", "--start", "256", "--max-length", "65536"])

    def fake_point(args, mode, length):  # raw costs 1 MiB a token, rendered 1/16 of that
        per_token = 2**20 if mode == "raw" else 2**16
        return {
            "context_tokens": length,
            "pages": length // 64,
            "measured_memory_bytes": length * per_token,
            "estimated_memory_bytes": length * per_token * 1.1,
            "estimate_relative_error": 0.1,
            "step_time_s": 0,
        }

    result = train_memory.sweep(args, measure_point=fake_point)
    assert [p["context_tokens"] for p in result["points"]["raw"]] == [256, 512, 1024, 2048]
    assert result["longest_fitting"] == {"raw": 1024, "rendered": 16384}
    assert result["measured_context_ratio"] == 16 and not result["measured_context_ratio_is_lower_bound"]


def test_train_memory_point_runs_in_its_own_process():
    import train_memory

    args = train_memory.parse_args(["--language-model", "tiny", "--tower", "tiny"])
    short, long = (train_memory.point_in_new_process(args, "raw", n) for n in (256, 4096))
    assert 0 < short["measured_memory_bytes"] < long["measured_memory_bytes"]
    assert 0 < short["estimated_memory_bytes"] < long["estimated_memory_bytes"]
    assert short["process_baseline_bytes"] > 0 and short["sequence_tokens"] == 256 + train_memory.PROMPT_TOKENS


def test_saved_bytes_counts_each_tensor_once_and_a_view_as_what_it_keeps_alive():
    import context_scaling

    weight = torch.nn.Parameter(torch.randn(100))
    saved = context_scaling.SavedBytes(set(), {id(weight)})
    leaf = torch.randn(1000, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        sines = leaf.sin()  # saves leaf: 4000 bytes
        squares = sines * sines  # saves sines twice: counted once, 4000 bytes
        rows = squares.view(10, 100)[:, :10]  # a view
        product = rows.exp() * weight[:10]  # exp saves its result (new, 400 bytes); mul saves it and the weight
        picked = squares.view(10, 100)[:2].sin()  # saves a view of squares: counts squares, 4000 bytes
        (product.sum() + picked.sum()).backward()
    assert saved.total == 4000 + 4000 + 400 + 4000
    assert leaf.grad is not None and weight.grad is not None


def test_estimated_step_memory_adds_the_loss_gradients_to_the_saved_activations():
    import context_scaling

    model = torch.nn.Linear(10, 10)  # 110 fp32 parameters: 440 bytes of weights
    step = {"gradient_bytes": 40, "saved_bytes_flash": 1000, "loss_gradient_bytes": 500, "optimizer_bytes": 1200}
    assert context_scaling.estimated_step_memory(model, step) == 440 + 40 + 1500
    step["optimizer_bytes"] = 2000  # Adam's moments, created after backward, are the larger
    assert context_scaling.estimated_step_memory(model, step) == 440 + 40 + 2000
