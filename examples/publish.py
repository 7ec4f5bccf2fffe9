"""Prepare a Hub-ready folder from a trained VisInContext model and upload it.

    python examples/publish.py --model outputs/pretrain --out outputs/hub --repo-id you/visincontext-tiny --dry-run
    python examples/publish.py --model outputs/pretrain --out outputs/hub --repo-id you/visincontext-tiny \
        --eval-results results.json --base-model openai/clip-vit-large-patch14 mistralai/Mistral-7B-v0.1

`--eval-results` takes a JSON list of `huggingface_hub.EvalResult` fields (task_type, dataset_type,
dataset_name, metric_type, metric_value, ...), or the JSON the evaluation CLI writes.
"""

import argparse
import json

from transformers import AutoModelForImageTextToText, AutoProcessor

from visincontext.hub import prepare_repo, publish


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="folder with a saved VisInContext model and processor")
    parser.add_argument("--out", required=True, help="folder to write the repository into")
    parser.add_argument("--repo-id", required=True, help="owner/name on the Hub")
    parser.add_argument("--eval-results", help="JSON file with evaluation results for the model-index")
    parser.add_argument("--base-model", nargs="*", default=None, help="Hub ids of the vision tower and the LM")
    parser.add_argument("--dataset", nargs="*", default=None, help="Hub ids of the training data")
    parser.add_argument("--license", default="apache-2.0")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--token", default=None)
    parser.add_argument("--dry-run", action="store_true", help="list the files that would be uploaded, upload nothing")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args()

    model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    eval_results = None
    if args.eval_results:
        with open(args.eval_results) as f:
            loaded = json.load(f)
        eval_results = loaded.get("model_index", loaded) if isinstance(loaded, dict) else loaded
    out = prepare_repo(
        model, processor, args.out, eval_results=eval_results, repo_id=args.repo_id, overwrite=args.overwrite,
        base_models=args.base_model, datasets=args.dataset, license=args.license,
    )
    files = publish(out, args.repo_id, private=args.private, token=args.token, dry_run=args.dry_run)
    total = sum(size for _, size in files)
    for path, size in files:
        print(f"{size:>12,d}  {path}")
    print(f"{total:>12,d}  {'would be uploaded to' if args.dry_run else 'uploaded to'} {args.repo_id}")


if __name__ == "__main__":
    main()
