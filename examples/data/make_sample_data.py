"""Writes the tiny sample data sets in this folder (run once; the outputs are committed).

    python examples/data/make_sample_data.py

- `obelics_sample.jsonl`: 24 interleaved documents in the OBELICS schema (parallel `images` / `texts`
  lists, `None` where the other kind stands), with small drawn images under `images/`; their text is Faker's
  English (`pip install faker`), different in every document, so that the contrastive loss can tell them apart.
- `easyvqa_sample.jsonl`: 64 questions from the easy-VQA data set (the `easy-vqa` package), images copied.
- `chat_sample.jsonl` and `mimicit_sample.jsonl`: conversations made from those questions (see `conversations`).
"""

import json
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).parent
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 50, 170),
}
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


def document_opening(fake, kind: int) -> str:
    """The first text of a document, in one of six kinds that look as different on a page as real documents do:
    prose, a list, an address book, a table of figures, a dialogue, a log of dated entries."""
    if kind == 0:
        return f"{fake.catch_phrase()}.\n{fake.paragraph(nb_sentences=6)}"
    if kind == 1:
        return "Things to bring:\n" + "\n".join(f"- {fake.word()} {fake.word()}" for _ in range(9))
    if kind == 2:
        return "\n\n".join(f"{fake.name()}\n{fake.street_address()}\n{fake.city()}" for _ in range(3))
    if kind == 3:
        rows = [f"{fake.word():<10}{fake.random_int(10, 9999):>7}{fake.random_int(0, 99):>5}%" for _ in range(8)]
        return "Quarter results\n" + "\n".join(rows)
    if kind == 4:
        names = [fake.first_name(), fake.first_name()]
        return "\n".join(f"{names[i % 2]}: {fake.sentence(nb_words=5)}" for i in range(7))
    return "\n".join(f"{fake.date()} {fake.time()} {fake.sentence(nb_words=4)}" for _ in range(7))


def obelics(rng: random.Random) -> None:
    """Documents whose texts differ as real ones do (six kinds of layout, Faker's English in each, a different topic
    and place every time), with two drawn shapes that the text around them describes. Their earlier text becomes
    the rendered context."""
    from faker import Faker

    fake = Faker("en_US")
    fake.seed_instance(0)
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
            document_opening(fake, doc % 6),
            f"{fake.name()} of {city} wrote: {fake.paragraph(nb_sentences=2)}",
            None,
            f"The first picture shows a {shapes[0][1]} {shapes[0][0]}. {fake.sentence()}",
            None,
            f"Next to it is a {shapes[1][1]} {shapes[1][0]}. {fake.paragraph(nb_sentences=2)}",
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


def conversations() -> None:
    """Two conversational formats from the easy-VQA sample: `chat_sample.jsonl` (TRL's `messages` + `images`, two
    questions about one image, the first with a context item) and `mimicit_sample.jsonl` (MIMIC-IT / Otter: a query
    triplet with three in-context triplets about other images)."""
    rows = [json.loads(line) for line in (HERE / "easyvqa_sample.jsonl").read_text().splitlines()]
    with open(HERE / "chat_sample.jsonl", "w") as f:
        for i in range(0, 32, 2):
            first, second = rows[i], rows[i + 1]
            messages = [
                {
                    "role": "user",
                    "content": [
                        {"type": "context", "text": "The pictures show one shape in one colour; answer in one word."},
                        {"type": "image"},
                        {"type": "text", "text": first["question"]},
                    ],
                },
                {"role": "assistant", "content": [{"type": "text", "text": first["answer"]}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": second["question"]}]},
                {"role": "assistant", "content": [{"type": "text", "text": second["answer"]}]},
            ]
            f.write(json.dumps({"messages": messages, "images": [first["image"], second["image"]]}) + "\n")
    with open(HERE / "mimicit_sample.jsonl", "w") as f:
        for i in range(0, 64, 4):
            query, *shots = rows[i : i + 4]
            in_context = [{"instruction": r["question"], "answer": r["answer"], "image": r["image"]} for r in shots]
            f.write(
                json.dumps(
                    {
                        "instruction": query["question"],
                        "answer": query["answer"],
                        "image": query["image"],
                        "in_context": in_context,
                    }
                )
                + "\n"
            )


if __name__ == "__main__":
    rng = random.Random(0)
    (HERE / "images").mkdir(exist_ok=True)
    obelics(rng)
    easy_vqa(rng)
    conversations()
