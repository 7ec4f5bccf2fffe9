"""Few-shot evaluation of VisInContext models: VQA, captioning, DocVQA and text-only in-context
classification, with demonstrations as raw text or rendered context pages.

    python -m visincontext.evaluation --model DIR --task okvqa --data questions.json annotations.json images/ \
        --shots 0 4 8 --context-mode rendered text --output results.json
"""

from .metrics import anls, cider_d, normalize_vqa_answer, vqa_accuracy
from .tasks import (
    CONTEXT_MODES,
    TASKS,
    EvaluationResult,
    Example,
    Task,
    build_messages,
    build_prompt,
    evaluate,
    get_task,
    load_examples,
    markdown_table,
    model_index,
    select_demonstrations,
)

__all__ = [
    "anls",
    "cider_d",
    "normalize_vqa_answer",
    "vqa_accuracy",
    "CONTEXT_MODES",
    "TASKS",
    "EvaluationResult",
    "Example",
    "Task",
    "build_messages",
    "build_prompt",
    "evaluate",
    "get_task",
    "load_examples",
    "markdown_table",
    "model_index",
    "select_demonstrations",
]
