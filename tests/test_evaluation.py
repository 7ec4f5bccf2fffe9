"""Few-shot evaluation: metrics, prompts, demonstration selection, CLI (issue: evaluation)."""

import json

import pytest

from visincontext.evaluation import (
    Example,
    anls,
    build_prompt,
    cider_d,
    get_task,
    load_examples,
    normalize_vqa_answer,
    select_demonstrations,
    vqa_accuracy,
)
from visincontext.evaluation.__main__ import run as evaluation_main
from visincontext.training import DataArguments, ModelArguments, build_model_and_processor


@pytest.mark.parametrize(
    "prediction,references,expected",
    [
        ("yes", ["yes"] * 10, 1.0),  # all ten agree
        ("yes", ["yes"] * 3 + ["no"] * 7, 0.9),  # 3 matches: 7 subsets keep all 3 (1.0), 3 subsets keep 2 (2/3)
        ("yes", ["yes"] * 2 + ["no"] * 8, 0.6),  # (8 * 2/3 + 2 * 1/3) / 10
        ("yes", ["yes"] + ["no"] * 9, 0.3),  # (9 * 1/3 + 0) / 10
        ("two", ["2"] * 9 + ["3"], 1.0),  # number words normalised (annotators disagree)
        ("two", ["2"] * 10, 0.0),  # official quirk: unanimous answers are not normalised
        ("A dog.", ["dog"] * 5 + ["cat"] * 5, 1.0),  # articles and the final period removed
        ("dont", ["don't"] * 4 + ["do"] * 6, 1.0),  # contractions restored
        ("red, white", ["red white"] * 3 + ["red"] * 7, 0.9),  # commas next to words become removals
        ("circle", ["circle"], 1.0),  # one reference: normalised exact match
    ],
)
def test_vqa_accuracy_worked_examples(prediction, references, expected):
    assert vqa_accuracy(prediction, references) == pytest.approx(expected)


def test_vqa_normalisation():
    assert normalize_vqa_answer("The Two dogs!") == "2 dogs"
    assert normalize_vqa_answer("3.5") == "3.5" and normalize_vqa_answer("end.") == "end"
    assert normalize_vqa_answer("1,000") == "1000"


def test_cider_d_against_the_coco_reference_implementation():
    gts = {
        "1": ["a red circle on a white background", "a red round shape"],
        "2": ["a blue square", "a small blue square in the middle"],
        "3": ["two green triangles", "green triangles side by side"],
    }
    res = {"1": "a red circle", "2": "a blue square in the middle", "3": "three green triangles"}
    ours, per_image = cider_d(res, gts)
    assert ours == pytest.approx(3.550243316354436, abs=1e-9)  # value printed by pycocoevalcap 1.2 Cider()
    pycocoevalcap = pytest.importorskip("pycocoevalcap.cider.cider", reason="the reference implementation (test extra)")
    reference, per_image_ref = pycocoevalcap.Cider().compute_score(gts, {k: [v] for k, v in res.items()})
    assert ours == pytest.approx(reference, abs=1e-12)
    assert [per_image[k] for k in sorted(per_image)] == pytest.approx(list(per_image_ref), abs=1e-12)


def test_anls_exact_near_far():
    assert anls("Invoice 2024", ["invoice 2024"]) == 1.0  # exact (case-insensitive)
    assert anls("invoce 2024", ["invoice 2024"]) == pytest.approx(1 - 1 / 12)  # one deletion in 12 characters
    assert anls("total", ["subtotal due"]) == 0.0  # similarity 5/12 < 0.5
    assert anls("abcd", ["xbcd", "zzzz"]) == pytest.approx(0.75)  # best reference


def test_prompts_for_four_shots_in_both_modes():
    task = get_task("easy-vqa")
    support = [
        Example(question=f"what shape is {i}?", answers=[a], image="x.png", id=str(i))
        for i, a in enumerate(["circle", "square", "triangle", "circle", "square", "rectangle"])
    ]
    query = Example(question="what color is the shape?", answers=["red"], image="q.png", id="q")
    (demos,) = select_demonstrations([query], support, 4, seed=3)
    assert demos == select_demonstrations([query], support, 4, seed=3)[0]
    assert [d.id for d in demos] != [d.id for d in select_demonstrations([query], support, 4, seed=4)[0]]
    lines = "\n".join(f"Question: {d.question} Short answer: {d.answers[0]}" for d in demos)
    text_prompt, text_context = build_prompt(task, demos, query, "text")
    assert text_prompt == lines + "\n<image>Question: what color is the shape? Short answer:" and text_context is None
    rendered_prompt, rendered_context = build_prompt(task, demos, query, "rendered")
    assert rendered_prompt == "<image>Question: what color is the shape? Short answer:" and rendered_context == lines
    _, processor = build_model_and_processor(ModelArguments(), DataArguments())
    pages = processor.renderer.render(rendered_context)
    assert len(pages) == 2  # 4 demonstrations, 64x64 pages of 8 rows x 16 cells
    batch = processor(images=[[_image()]], text=[rendered_prompt], context=[rendered_context], return_tensors="pt")
    assert batch["context_mask"].sum().item() == 2


def _image():
    from PIL import Image

    return Image.new("RGB", (64, 64), "red")


def test_end_to_end_on_easy_vqa(tmp_path):
    model, processor = build_model_and_processor(ModelArguments(), DataArguments())
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    report = evaluation_main(
        [
            "--model",
            str(tmp_path / "model"),
            "--task",
            "easy-vqa",
            "--shots",
            "0",
            "4",
            "--limit",
            "200",
            "--batch-size",
            "25",
            "--output",
            str(tmp_path / "out" / "results.json"),
        ]
    )
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["seed"] == 0 and saved["config"]["model_type"] == "visincontext" and saved["runtime_s"] > 0
    assert {(r["shots"], r["context_mode"]) for r in saved["results"]} == {
        (0, "text"),
        (0, "rendered"),
        (4, "text"),
        (4, "rendered"),
    }
    assert all(0.0 <= r["score"] <= 1.0 and r["num_examples"] == 200 for r in saved["results"])
    table = (tmp_path / "out" / "results.md").read_text()
    assert table.startswith("| task | shots | text | rendered |") and "| easy-vqa | 4 |" in table
    assert report["model_index"][0]["metric_type"] == "vqa_accuracy"


def test_bad_input_names_the_argument(tmp_path):
    with pytest.raises(ValueError, match="task"):
        get_task("imagenet-ocr")
    with pytest.raises(ValueError, match="data"):
        load_examples(get_task("okvqa"), [str(tmp_path / "missing.json")])
    with pytest.raises(ValueError, match="data"):
        load_examples(get_task("okvqa"), None)
    support = [Example(question="q", answers=["a"])] * 3
    with pytest.raises(ValueError, match="shots"):
        select_demonstrations([Example(question="q", answers=["a"])], support, 4)
    with pytest.raises(ValueError, match="context_mode"):
        build_prompt(get_task("sst2"), support[:1], support[0], "pixels")


def test_rices_picks_the_nearest_images(tmp_path):
    from PIL import Image

    model, processor = build_model_and_processor(ModelArguments(), DataArguments())
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    paths = []
    for colour in colours:
        Image.new("RGB", (64, 64), colour).save(tmp_path / f"{colour}.png")
        paths.append(str(tmp_path / f"{colour}.png"))
    support = [Example(question=f"q {c}", answers=[c], image=p, id=c) for c, p in zip(colours, paths)]
    queries = [Example(question="which?", answers=["blue"], image=paths[2], id="query")]
    (demos,) = select_demonstrations(queries, support, 3, selection="rices", model=model, processor=processor)
    assert demos[-1].id == "blue"  # the identical image is the nearest, placed next to the query
    assert len({d.id for d in demos}) == 3
