"""Few-shot tasks: loading, demonstration selection, prompts (raw text or rendered context), scoring."""

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..configuration_visincontext import END_OF_CHUNK_TOKEN, IMAGE_TOKEN
from ..data import load_image
from .metrics import anls, cider_d, vqa_accuracy

CONTEXT_MODES = ("text", "rendered")
SELECTIONS = ("random", "rices")


@dataclass(frozen=True)
class Task:
    """How a task's examples become prompts and how answers are scored."""

    name: str
    kind: str  # "vqa", "captioning" or "classification"
    metric: str  # "vqa_accuracy", "cider_d", "anls" or "accuracy"
    hub_task_type: str
    demo: str  # format of one demonstration, with {question}/{text} and {answer}
    query: str  # format of the query, ends where the model continues
    labels: tuple[str, ...] = ()


_VQA = dict(
    kind="vqa",
    metric="vqa_accuracy",
    hub_task_type="visual-question-answering",
    demo="Question: {question} Short answer: {answer}",
    query="Question: {question} Short answer:",
)
_CAPTION = dict(
    kind="captioning", metric="cider_d", hub_task_type="image-to-text", demo="Caption: {answer}", query="Caption:"
)
TASKS = {
    **{name: Task(name, **_VQA) for name in ("vqav2", "okvqa", "textvqa", "vizwiz", "ocrvqa", "easy-vqa")},
    "docvqa": Task("docvqa", **{**_VQA, "metric": "anls"}),
    "coco": Task("coco", **_CAPTION),
    "flickr30k": Task("flickr30k", **_CAPTION),
    "sst2": Task(
        "sst2",
        kind="classification",
        metric="accuracy",
        hub_task_type="text-classification",
        demo="Review: {question} Sentiment: {answer}",
        query="Review: {question} Sentiment:",
        labels=("negative", "positive"),
    ),
    "trec": Task(
        "trec",
        kind="classification",
        metric="accuracy",
        hub_task_type="text-classification",
        demo="Question: {question} Type: {answer}",
        query="Question: {question} Type:",
        labels=("abbreviation", "entity", "description", "human", "location", "number"),
    ),
}


@dataclass
class Example:
    question: str  # the question, or the text to classify ("" for captioning)
    answers: list[str]  # reference answers / captions / the label word
    image: object = None  # PIL image, path or bytes; None for text-only tasks
    id: str = ""


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"task: unknown task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name]


# ---- loading ---------------------------------------------------------------------------------------


ANSWER_KEYS = ("answers", "captions", "answer", "caption", "label")


def _from_record(record: dict, task: Task, index: int, image_root: Path | None, source: str = "data") -> Example:
    if not isinstance(record, dict):
        raise ValueError(f"data: {source} record {index}: expected an object, got {type(record).__name__}")
    answers = next((record[key] for key in ANSWER_KEYS if record.get(key) is not None), None)
    if answers is None or answers == []:
        raise ValueError(f"data: {source} record {index}: no answers (expected one of {list(ANSWER_KEYS)})")
    if isinstance(answers, (str, int)):
        answers = [answers]
    answers = [a["answer"] if isinstance(a, dict) else a for a in answers or []]
    if task.kind == "classification":
        answers = [task.labels[a] if isinstance(a, int) else a for a in answers]
    image = record.get("image", record.get("image_path"))
    if isinstance(image, str) and image_root is not None and not Path(image).is_absolute():
        image = str(image_root / image)
    question = record.get("question", record.get("text", record.get("sentence", "")))
    return Example(
        question=question,
        answers=[str(a) for a in answers],
        image=image,
        id=str(record.get("id", record.get("question_id", index))),
    )


def load_examples(task: Task, data: list[str] | None, split: str = "test", limit: int | None = None) -> list[Example]:
    """Examples of `task` from local files or a Hub id (real `datasets.load_dataset` path).

    data: `None` for the embedded easy-VQA test split; one `.json`/`.jsonl` file of records (`image`,
    `question`/`text`, `answers`/`captions`/`label`); the official VQA pair `questions.json annotations.json
    [image_dir]`; a Karpathy `dataset_coco.json [image_dir]`; or a Hub data set id.
    """
    if not data:
        if task.name != "easy-vqa":
            raise ValueError(f"data: task {task.name!r} needs --data (only easy-vqa has an embedded default)")
        return _easy_vqa(split, limit)
    paths = [Path(p) for p in data]
    for path in paths:
        if not path.exists() and (
            len(paths) > 1 or path.suffix in (".json", ".jsonl") or str(path).startswith((".", "/"))
        ):
            raise ValueError(f"data: no file or folder at {str(path)!r}")
    if not paths[0].exists():  # a Hub id
        from datasets import load_dataset

        rows = load_dataset(data[0], split=split)
        examples = [_from_record(row, task, i, None) for i, row in enumerate(rows)]
        return examples[:limit] if limit else examples
    image_root = paths[-1] if len(paths) > 1 and paths[-1].is_dir() else paths[0].parent
    records = _read_records(paths[0])
    if isinstance(records, dict) and "questions" in records:  # official VQA format
        if len(paths) < 2:
            raise ValueError(
                "data: the VQA questions file needs its annotations file next: questions.json annotations.json [images]"
            )
        annotations = {a["question_id"]: a for a in json.loads(paths[1].read_text())["annotations"]}
        records = [
            {
                "id": q["question_id"],
                "question": q["question"],
                "answers": annotations[q["question_id"]]["answers"],
                "image": f"COCO_{split}2014_{q['image_id']:012d}.jpg" if "image" not in q else q["image"],
            }
            for q in records["questions"]
        ]
    elif isinstance(records, dict) and "images" in records:  # Karpathy captions
        records = [
            {
                "id": image.get("cocoid", image.get("imgid", i)),
                "image": str(Path(image.get("filepath", "")) / image["filename"]),
                "captions": [" ".join(s["tokens"]) if "tokens" in s else s["raw"] for s in image["sentences"]],
            }
            for i, image in enumerate(records["images"])
            if image.get("split", split) == split
        ]
    if limit is not None and limit < 1:
        raise ValueError(f"limit: expected a positive number of examples, got {limit}")
    examples = [_from_record(record, task, i, image_root, str(paths[0])) for i, record in enumerate(records)]
    return examples[:limit] if limit else examples


def _read_records(path: Path):
    """The records of a `.json` file, or of a `.jsonl` file line by line; a malformed line names the file and its
    line number."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"data: cannot read {str(path)!r} ({error})") from None
    if path.suffix != ".jsonl":
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"data: {path} is not valid JSON (line {error.lineno} column {error.colno}: {error.msg})"
            ) from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"data: {path} line {number}: not valid JSON (column {error.colno}: {error.msg})"
                ) from None
    return records


def _easy_vqa(split: str, limit: int | None) -> list[Example]:
    import easy_vqa

    if split == "test":
        questions, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        questions, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    count = len(questions) if limit is None else min(limit, len(questions))
    return [
        Example(question=questions[i], answers=[answers[i]], image=paths[image_ids[i]], id=str(i)) for i in range(count)
    ]


# ---- demonstrations and prompts --------------------------------------------------------------------


def select_demonstrations(
    queries: list[Example],
    support: list[Example],
    shots: int,
    selection: str = "random",
    seed: int = 0,
    model=None,
    processor=None,
) -> list[list[Example]]:
    """`shots` demonstrations per query: a seeded random sample, or RICES (the support examples whose images
    are nearest to the query's in the model's vision-tower features)."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection: expected one of {SELECTIONS}, got {selection!r}")
    if shots > len(support):
        raise ValueError(f"shots: {shots} demonstrations asked, but the support set has {len(support)} examples")
    if shots == 0:
        return [[] for _ in queries]
    if selection == "random":
        return [random.Random(seed * 1_000_003 + i).sample(support, shots) for i in range(len(queries))]
    if model is None or processor is None or any(e.image is None for e in queries + support):
        raise ValueError("selection: 'rices' needs a model, a processor and an image for every example")
    support_features = _image_features(support, model, processor)
    query_features = _image_features(queries, model, processor)
    nearest = (query_features @ support_features.T).topk(shots, dim=1).indices  # (queries, shots)
    return [[support[j] for j in reversed(row.tolist())] for row in nearest]  # most similar last, next to the query


@torch.no_grad()
def _image_features(examples: list[Example], model, processor, batch_size: int = 64) -> torch.Tensor:
    """Mean-pooled vision-tower features, unit norm: (examples, D)."""
    features = []
    for start in range(0, len(examples), batch_size):
        images = [load_image(e.image) for e in examples[start : start + batch_size]]
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"].to(model.device, model.dtype)
        hidden = model.model.vision_tower(pixel_values=pixels).last_hidden_state.mean(dim=1)
        features.append(torch.nn.functional.normalize(hidden.float(), dim=-1))
    return torch.cat(features)


def build_prompt(task: Task, demonstrations: list[Example], query: Example, mode: str) -> tuple[str, str | None]:
    """(prompt, context). Demonstrations are text only (the paper's text-only in-context setting): as raw
    tokens before the query (`"text"`), or rendered into context pages (`"rendered"`)."""
    if mode not in CONTEXT_MODES:
        raise ValueError(f"context_mode: expected one of {CONTEXT_MODES}, got {mode!r}")
    lines = [task.demo.format(question=d.question, answer=d.answers[0]) for d in demonstrations]
    image = IMAGE_TOKEN if query.image is not None else ""
    query_text = image + task.query.format(question=query.question)
    if not lines:
        return query_text, None
    if mode == "text":
        return "\n".join(lines) + "\n" + query_text, None
    return query_text, "\n".join(lines)


def build_messages(task: Task, demonstrations: list[Example], query: Example, mode: str) -> list[dict]:
    """The same prompt as a conversation, for the processor's chat template: demonstrations as earlier user and
    assistant turns (`"text"`) or as a context item rendered into pages (`"rendered"`), then the query (with its
    image) as the last user turn."""
    if mode not in CONTEXT_MODES:
        raise ValueError(f"context_mode: expected one of {CONTEXT_MODES}, got {mode!r}")
    query_text = task.query.format(question=query.question).removesuffix(":").strip()
    query_content = ([{"type": "image", "image": load_image(query.image)}] if query.image is not None else []) + [
        {"type": "text", "text": query_text}
    ]
    if mode == "rendered" and demonstrations:
        lines = "\n".join(task.demo.format(question=d.question, answer=d.answers[0]) for d in demonstrations)
        return [{"role": "user", "content": [{"type": "context", "text": lines}, *query_content]}]
    turns = []
    for d in demonstrations:
        turns.append(
            {
                "role": "user",
                "content": [{"type": "text", "text": task.query.format(question=d.question).removesuffix(":").strip()}],
            }
        )
        turns.append({"role": "assistant", "content": [{"type": "text", "text": d.answers[0]}]})
    return [*turns, {"role": "user", "content": query_content}]


def clean_prediction(text: str) -> str:
    """The generated answer up to the end of its chunk or line."""
    for stop in (END_OF_CHUNK_TOKEN, "\n", IMAGE_TOKEN):
        text = text.split(stop)[0]
    return text.strip()


# ---- running ---------------------------------------------------------------------------------------


def score(task: Task, predictions: list[str], examples: list[Example]) -> float:
    if task.metric == "vqa_accuracy":
        return sum(vqa_accuracy(p, e.answers) for p, e in zip(predictions, examples)) / len(examples)
    if task.metric == "anls":
        return sum(anls(p, e.answers) for p, e in zip(predictions, examples)) / len(examples)
    if task.metric == "accuracy":
        return sum(p.strip().lower() == e.answers[0].lower() for p, e in zip(predictions, examples)) / len(examples)
    corpus, _ = cider_d(
        {e.id: p.lower() for p, e in zip(predictions, examples)},
        {e.id: [a.lower() for a in e.answers] for e in examples},
    )
    return corpus


@dataclass
class EvaluationResult:
    task: str
    shots: int
    context_mode: str
    score: float
    metric: str
    num_examples: int
    runtime_s: float
    predictions: list[dict] = field(default_factory=list)


@torch.no_grad()
def evaluate(
    model,
    processor,
    task: Task,
    queries: list[Example],
    support: list[Example],
    shots: list[int],
    modes: list[str],
    selection: str = "random",
    seed: int = 0,
    batch_size: int = 8,
    max_new_tokens: int = 10,
    chat: bool = False,
) -> list[EvaluationResult]:
    """Scores every (shots, mode) pair on the same queries and the same demonstrations. With `chat=True` the prompts
    go through the processor's chat template (`build_messages`), for instruction-tuned models."""
    for mode in modes:
        if mode not in CONTEXT_MODES:
            raise ValueError(f"context_mode: expected one of {CONTEXT_MODES}, got {mode!r}")
    model.eval()
    results = []
    for k in shots:
        demonstrations = select_demonstrations(queries, support, k, selection, seed, model, processor)
        for mode in modes if k else modes[:1]:  # 0-shot prompts are the same in both modes
            start = time.perf_counter()
            predictions = []
            for begin in tqdm(range(0, len(queries), batch_size), desc=f"{task.name} {k}-shot {mode}", leave=False):
                batch = queries[begin : begin + batch_size]
                if chat:
                    conversations = [
                        build_messages(task, demonstrations[begin + i], q, mode) for i, q in enumerate(batch)
                    ]
                    inputs = processor.apply_chat_template(
                        conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
                    ).to(model.device)
                else:
                    prompts = [build_prompt(task, demonstrations[begin + i], q, mode) for i, q in enumerate(batch)]
                    images = [[load_image(q.image)] if q.image is not None else [] for q in batch]
                    inputs = processor(
                        images=images,
                        text=[p for p, _ in prompts],
                        context=[c for _, c in prompts],
                        return_tensors="pt",
                    ).to(model.device)
                output = model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=processor.tokenizer.pad_token_id,
                )
                new_tokens = output[:, inputs["input_ids"].shape[1] :]
                predictions += [
                    clean_prediction(t) for t in processor.batch_decode(new_tokens, skip_special_tokens=False)
                ]
            value = score(task, predictions, queries)
            runtime = time.perf_counter() - start
            for mode_name in modes if k == 0 else [mode]:
                results.append(
                    EvaluationResult(
                        task=task.name,
                        shots=k,
                        context_mode=mode_name,
                        score=value,
                        metric=task.metric,
                        num_examples=len(queries),
                        runtime_s=runtime,
                        predictions=[
                            {"id": q.id, "prediction": p, "answers": q.answers}
                            for q, p in zip(queries[:20], predictions)
                        ],
                    )
                )
    return results


def model_index(task: Task, results: list[EvaluationResult], split: str, dataset_name: str | None = None) -> list[dict]:
    """`huggingface_hub.EvalResult` fields for the model card's model-index: one result per setting (shots and
    context mode are the `dataset_config`, so the Hub does not merge them), each metric labelled with its setting."""
    return [
        {
            "task_type": task.hub_task_type,
            "task_name": f"{task.name} {r.shots}-shot ({r.context_mode})",
            "dataset_type": task.name,
            "dataset_name": dataset_name or task.name,
            "dataset_split": split,
            "dataset_config": f"{r.shots}-shot-{r.context_mode}",
            "metric_type": r.metric,
            "metric_name": f"{r.metric} ({r.shots}-shot, {r.context_mode} context)",
            "metric_value": r.score,
        }
        for r in results
    ]


def markdown_table(results: list[EvaluationResult]) -> str:
    """Rows: task x shots; columns: the context modes."""
    modes = sorted({r.context_mode for r in results}, key=CONTEXT_MODES.index)
    lines = ["| task | shots | " + " | ".join(modes) + " |", "|---|---|" + "---|" * len(modes)]
    for task, shots in sorted({(r.task, r.shots) for r in results}, key=lambda x: (x[0], x[1])):
        cells = [
            next((f"{r.score:.4f}" for r in results if (r.task, r.shots, r.context_mode) == (task, shots, m)), "")
            for m in modes
        ]
        lines.append(f"| {task} | {shots} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
