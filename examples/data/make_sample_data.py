"""Writes the tiny sample data sets in this folder (run once; the outputs are committed).

    python examples/data/make_sample_data.py

- `obelics_sample.jsonl`: 24 interleaved documents in the OBELICS schema (parallel `images` / `texts`
  lists, `None` where the other kind stands), with small drawn images under `images/`.
- `easyvqa_sample.jsonl`: 64 questions from the easy-VQA data set (the `easy-vqa` package), images copied.
"""

import json
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).parent
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 200, 30), "purple": (140, 50, 170)}
SHAPES = ("circle", "square", "triangle")


def draw(shape: str, color: str, path: Path) -> None:
    image = Image.new("RGB", (32, 32), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    box = (6, 6, 26, 26)
    if shape == "circle":
        pen.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        pen.rectangle(box, fill=COLORS[color])
    else:
        pen.polygon([(16, 5), (27, 27), (5, 27)], fill=COLORS[color])
    image.save(path)


def obelics(rng: random.Random) -> None:
    rows = []
    for doc in range(24):
        shapes = [(rng.choice(SHAPES), rng.choice(list(COLORS))) for _ in range(2)]
        names = []
        for k, (shape, color) in enumerate(shapes):
            name = f"images/doc{doc:02d}_{k}.png"
            draw(shape, color, HERE / name)
            names.append(name)
        city = rng.choice(["Lisbon", "Oslo", "Kyoto", "Lima", "Accra", "Quebec"])
        texts = [
            f"Notes from the workshop in {city}, day {doc + 1}. Today we sorted shapes by colour and size.",
            f"The first drawing was a {shapes[0][1]} {shapes[0][0]}, placed on the left of the table.",
            None,
            f"Next to it we found a {shapes[1][1]} {shapes[1][0]}.",
            None,
            f"In {city} the {shapes[0][0]} and the {shapes[1][0]} were kept together.",
        ]
        images = [None, None, names[0], None, names[1], None]
        rows.append({"images": images, "texts": texts})
    with open(HERE / "obelics_sample.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def easy_vqa(rng: random.Random) -> None:
    import easy_vqa

    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    picked = rng.sample(range(len(questions)), 64)
    with open(HERE / "easyvqa_sample.jsonl", "w") as f:
        for i in picked:
            name = f"images/easyvqa_{image_ids[i]}.png"
            shutil.copyfile(paths[image_ids[i]], HERE / name)
            f.write(json.dumps({"image": name, "question": questions[i], "answer": answers[i]}) + "\n")


if __name__ == "__main__":
    rng = random.Random(0)
    (HERE / "images").mkdir(exist_ok=True)
    obelics(rng)
    easy_vqa(rng)
