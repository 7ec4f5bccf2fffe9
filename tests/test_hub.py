"""Publishing: model card, Hub-ready folder, upload (issue: hub)."""

import json

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from transformers import AutoModelForImageTextToText

from visincontext.hub import prepare_repo, publish, repo_files
from visincontext.training import DataArguments, ModelArguments, build_model_and_processor

EVALS = [
    {
        "task_type": "visual-question-answering",
        "task_name": "easy-VQA 4-shot",
        "dataset_type": "easy-vqa",
        "dataset_name": "easy-VQA",
        "dataset_split": "test",
        "metric_type": "accuracy",
        "metric_name": "VQA accuracy",
        "metric_value": 0.4321,
    },
    {
        "task_type": "image-to-text",
        "dataset_type": "coco",
        "dataset_name": "COCO Karpathy",
        "metric_type": "cider",
        "metric_value": 0.87,
    },
]
BASES = ["openai/clip-vit-large-patch14", "mistralai/Mistral-7B-v0.1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model, processor = build_model_and_processor(ModelArguments(), DataArguments())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                param.fill_(0.7)  # let the media matter in the generations compared below
    return model.eval(), processor


def test_card_parses_with_metadata_and_model_index(trained, tmp_path):
    model, processor = trained
    out = prepare_repo(
        model,
        processor,
        tmp_path / "repo",
        eval_results=EVALS,
        base_models=BASES,
        datasets=["HuggingFaceM4/OBELICS"],
        repo_id="someone/visincontext-tiny",
    )
    card = ModelCard.load(out / "README.md")
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-text-to-text"
    assert data.license == "apache-2.0" and data.base_model == BASES and data.datasets == ["HuggingFaceM4/OBELICS"]
    assert "visincontext" in data.tags
    results = data.eval_results
    assert [(r.task_type, r.dataset_name, r.metric_type, r.metric_value) for r in results] == [
        (e["task_type"], e["dataset_name"], e["metric_type"], e["metric_value"]) for e in EVALS
    ]
    assert "context=" in card.text and "someone/visincontext-tiny" in card.text and "0.4321" in card.text


def test_folder_has_no_pickle_and_shards_with_an_index(trained, tmp_path):
    model, processor = trained
    out = prepare_repo(model, processor, tmp_path / "repo", max_shard_size="150KB")
    names = [path for path, _ in repo_files(out)]
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")) for name in names)
    shards = [n for n in names if n.startswith("model-") and n.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in names
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    reloaded = AutoModelForImageTextToText.from_pretrained(out)
    for name, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForImageTextToText"].startswith(
        "modeling_"
    )
    with pytest.raises(ValueError, match="out_dir"):
        prepare_repo(model, processor, out)  # exists


def test_nothing_half_written_on_failure(trained, tmp_path):
    model, _ = trained
    with pytest.raises(TypeError, match="processor"):
        prepare_repo(model, None, tmp_path / "repo")
    assert list(tmp_path.iterdir()) == []


def test_publish_dry_run_and_upload_arguments(trained, tmp_path, monkeypatch):
    model, processor = trained
    out = prepare_repo(model, processor, tmp_path / "repo")
    listed = publish(out, "someone/visincontext-tiny", dry_run=True)
    on_disk = sorted((str(p.relative_to(out)), p.stat().st_size) for p in out.rglob("*") if p.is_file())
    assert listed == on_disk
    calls = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("create", (repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.setdefault("upload", kw))
    publish(out, "someone/visincontext-tiny", token="hf_dummy", private=True, commit_message="first upload")
    assert calls["create"] == ("someone/visincontext-tiny", {"private": True, "exist_ok": True})
    assert calls["upload"] == {
        "repo_id": "someone/visincontext-tiny",
        "folder_path": str(out),
        "commit_message": "first upload",
    }


def test_publish_without_token_fails_before_any_work(trained, tmp_path, monkeypatch):
    model, processor = trained
    out = prepare_repo(model, processor, tmp_path / "repo")
    monkeypatch.setattr("visincontext.hub.get_token", lambda: None)
    touched = []
    monkeypatch.setattr(HfApi, "create_repo", lambda *a, **k: touched.append("create"))
    monkeypatch.setattr(HfApi, "upload_folder", lambda *a, **k: touched.append("upload"))
    with pytest.raises(ValueError, match="token"):
        publish(out, "someone/visincontext-tiny")
    assert touched == []
    with pytest.raises(ValueError, match="repo_id"):
        publish(out, "not-a-repo-id", dry_run=True)
    with pytest.raises(ValueError, match="out_dir"):
        publish(tmp_path / "missing", "someone/x", dry_run=True)
