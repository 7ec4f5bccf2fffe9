"""Sharing VisInContext checkpoints on the Hugging Face Hub: a model card, a self-contained folder, an upload.

`prepare_repo` writes everything a Hub repository needs (sharded safetensors, config with `auto_map`, the
remote-code files, processor files with the fonts, README.md) so that
`AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True)` works where this package is not
installed. `publish` uploads such a folder with `huggingface_hub`.
"""

import json
import os
import shutil
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, get_token

from .files import staging_folder

CARD_TEMPLATE = Path(__file__).parent / "hub_cards" / "model_card.md"
EVAL_RESULT_KEYS = ("task_type", "dataset_type", "dataset_name", "metric_type", "metric_value")


def _eval_results(eval_results: list[dict] | None) -> list[EvalResult] | None:
    """Checked `EvalResult`s. Each must be its own model-index result: the Hub groups results by task, dataset,
    config, split and revision, so two settings of one task (shots, context mode) need distinct `dataset_config`s."""
    if not eval_results:
        return None
    if not isinstance(eval_results, list):
        raise TypeError(f"eval_results: expected a list of dicts, got {type(eval_results).__name__}")
    results, seen = [], {}
    for i, entry in enumerate(eval_results):
        if not isinstance(entry, dict):
            raise TypeError(f"eval_results[{i}]: expected a dict, got {type(entry).__name__}")
        missing = [key for key in EVAL_RESULT_KEYS if key not in entry]
        if missing:
            raise ValueError(f"eval_results[{i}]: missing {missing} (each entry needs {list(EVAL_RESULT_KEYS)})")
        value = entry["metric_value"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise ValueError(f"eval_results[{i}].metric_value: expected a number, got {value!r}")
        try:
            result = EvalResult(**entry)
        except TypeError as error:
            raise ValueError(f"eval_results[{i}]: {error}") from None
        key = (*result.unique_identifier, result.metric_type)
        if key in seen:
            raise ValueError(
                f"eval_results[{i}]: the same metric for the same task, dataset and config as "
                f"eval_results[{seen[key]}]; "
                "give each setting its own dataset_config (e.g. '4-shot-rendered')"
            )
        seen[key] = i
        results.append(result)
    return results


def check_eval_results(eval_results: list[dict] | None) -> None:
    """Raises a `ValueError` / `TypeError` naming the entry if `eval_results` cannot go into a model card."""
    _eval_results(eval_results)


def check_repo_id(repo_id) -> None:
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id: expected 'owner/name', got {repo_id!r}")


def _evaluation_table(eval_results: list[dict] | None) -> str:
    if not eval_results:
        return "No evaluation results were given."
    lines = ["| task | dataset | setting | split | metric | value |", "|---|---|---|---|---|---|"]
    for entry in eval_results:
        lines.append(
            f"| {entry.get('task_name', entry['task_type'])} | {entry['dataset_name']} "
            f"| {entry.get('dataset_config') or ''} | {entry.get('dataset_split', '')} "
            f"| {entry.get('metric_name', entry['metric_type'])} | {entry['metric_value']:.4g} |"
        )
    return "\n".join(lines)


def _placement(every: int) -> str:
    """Where the cross-attention blocks stand, in words: 'every layer', 'every 2nd layer', 'every 4th layer'."""
    if every == 1:
        return "every layer"
    suffix = "th" if 10 <= every % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(every % 10, "th")
    return f"every {every}{suffix} layer"


def _training_details(training_args, datasets: list[str] | None) -> str:
    if training_args is None:
        return "No training details were given."
    settings = training_args.to_dict() if hasattr(training_args, "to_dict") else dict(training_args)
    keys = (
        "learning_rate",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "max_steps",
        "num_train_epochs",
        "lr_scheduler_type",
        "warmup_steps",
        "weight_decay",
        "max_grad_norm",
        "bf16",
        "fp16",
        "deepspeed",
        "seed",
    )
    rows = [f"| {key} | {settings[key]} |" for key in keys if settings.get(key) not in (None, "", -1)]
    data = f"Data: {', '.join(datasets)}.\n\n" if datasets else ""
    return data + "| TrainingArguments | value |\n|---|---|\n" + "\n".join(rows)


def build_model_card(
    model,
    processor=None,
    repo_id: str = "your-name/visincontext-model",
    eval_results: list[dict] | None = None,
    training_args=None,
    base_models: list[str] | None = None,
    datasets: list[str] | None = None,
    license: str = "apache-2.0",
    tags: list[str] | None = None,
    provenance: str | None = None,
) -> ModelCard:
    """The model card of a VisInContext model, rendered from `hub_cards/model_card.md` with `ModelCard`.

    eval_results: entries with `task_type`, `dataset_type`, `dataset_name`, `metric_type`, `metric_value`
        (optionally `task_name`, `dataset_split`, `metric_name`, ...: the fields of `huggingface_hub.EvalResult`),
        written to the `model-index` metadata and to the evaluation table.
    training_args: the `TrainingArguments` of the run (or a dict), summarised in the card.
    base_models: Hub ids of the vision tower and the language model.
    provenance: where the weights came from (e.g. a converted checkpoint and its licence), put first under Training.
    """
    config = model.config
    vision, text = config.vision_config, config.text_config
    base_models = base_models or [
        name for name in (getattr(vision, "_name_or_path", ""), getattr(text, "_name_or_path", "")) if name
    ]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license=license,
        base_model=base_models or None,
        datasets=datasets,
        tags=["visincontext", "multimodal", "flamingo", "in-context-learning", *(tags or [])],
        model_name=repo_id.split("/")[-1],
        eval_results=_eval_results(eval_results),
    )
    renderer = getattr(processor, "renderer", None)
    num_parameters = sum(p.numel() for p in model.parameters())
    num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ModelCard.from_template(
        card_data,
        template_path=str(CARD_TEMPLATE),
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        vision_model=base_models[0] if base_models else "a random vision tower",
        language_model=base_models[1] if len(base_models) > 1 else "a random language model",
        vision_type=vision.model_type,
        text_type=text.model_type,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        num_layers=text.num_hidden_layers,
        cross_attention_placement=_placement(config.cross_attention_every),
        num_cross_attention=len(config.cross_attention_layers),
        latent_fusion=config.latent_fusion,
        num_latents=config.num_latents,
        page_height=renderer.page_height if renderer else vision.image_size,
        page_width=renderer.page_width if renderer else vision.image_size,
        line_height=renderer.line_height if renderer else vision.patch_size,
        max_pages=renderer.max_pages if renderer else "-",
        num_parameters=f"{num_parameters:,}",
        num_trainable=f"{num_trainable:,}",
        training_details="\n\n".join(part for part in (provenance, _training_details(training_args, datasets)) if part),
        evaluation_table=_evaluation_table(eval_results),
    )


def prepare_repo(
    model,
    processor,
    out_dir: str,
    eval_results: list[dict] | None = None,
    training_args=None,
    repo_id: str = "your-name/visincontext-model",
    max_shard_size: str | int = "2GB",
    overwrite: bool = False,
    **card_kwargs,
) -> Path:
    """Writes a Hub-ready folder: sharded safetensors weights (with an index when sharded), config with a
    complete `auto_map`, the remote-code files, the processor files with its fonts, and README.md.

    The folder is assembled in a staging folder beside `out_dir` and moved into place at the end, so a failure
    leaves nothing half-written; what a killed run left there is removed by the next one (`visincontext.files`).
    An existing `out_dir` is an error unless `overwrite=True`.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ValueError(f"out_dir: {str(out_dir)!r} exists; pass overwrite=True to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir: {str(out_dir)!r} is a file; expected a folder")
    if processor is None or not hasattr(processor, "renderer"):
        raise TypeError("processor: expected a VisInContextProcessor (its files and fonts go into the repository)")
    _eval_results(eval_results)  # before any work: a bad entry is an error, not a half-made card
    staging = staging_folder(out_dir)
    try:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        processor.save_pretrained(staging)
        card = build_model_card(
            model, processor, repo_id=repo_id, eval_results=eval_results, training_args=training_args, **card_kwargs
        )
        card.save(staging / "README.md")
        if eval_results:
            (staging / "eval_results.json").write_text(json.dumps(eval_results, indent=2))
        previous = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
        if out_dir.exists():  # moved aside, not deleted, until the new folder is in place
            os.replace(out_dir, previous)
        os.replace(staging, out_dir)
        shutil.rmtree(previous, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def repo_files(out_dir: str) -> list[tuple[str, int]]:
    """(relative path, size in bytes) of every file in the folder, sorted."""
    root = Path(out_dir)
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*") if p.is_file())


def publish(
    out_dir: str,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    dry_run: bool = False,
    commit_message: str = "Upload VisInContext model",
) -> list[tuple[str, int]]:
    """Uploads a folder written by `prepare_repo` (`create_repo` + `upload_folder`). With `dry_run=True`, only
    lists what would be uploaded. Returns the (path, size) list either way."""
    root = Path(out_dir)
    if not (root / "config.json").is_file() or not (root / "processor_config.json").is_file():
        raise ValueError(
            f"out_dir: {str(out_dir)!r} is not a folder written by prepare_repo "
            "(no config.json / processor_config.json)"
        )
    check_repo_id(repo_id)
    files = repo_files(out_dir)
    if dry_run:
        return files
    token = token or get_token()
    if not token:
        raise ValueError("token: no Hugging Face token; pass token=..., set HF_TOKEN, or run `hf auth login`")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(root), commit_message=commit_message)
    return files


__all__ = ["build_model_card", "check_eval_results", "check_repo_id", "prepare_repo", "publish", "repo_files"]
