"""Prepare a Hub-ready folder from a trained VisInContext model and upload it.

    python examples/publish.py --model outputs/pretrain --out outputs/hub --repo-id you/visincontext-tiny --dry-run
    python examples/publish.py --model outputs/pretrain --out outputs/hub --repo-id you/visincontext-tiny \
        --eval-results results.json --base-model openai/clip-vit-large-patch14 mistralai/Mistral-7B-v0.1

`--eval-results` takes a JSON list of `huggingface_hub.EvalResult` fields (task_type, dataset_type,
dataset_name, metric_type, metric_value, ...), or the JSON the evaluation CLI writes.
"""

import argparse
import json
import sys
from pathlib import Path

from transformers import AutoModelForImageTextToText, AutoProcessor

from visincontext.hub import check_eval_results, check_repo_id, prepare_repo, publish


def parse_args(argv=None) -> argparse.Namespace:
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
    return parser.parse_args(argv)


def read_eval_results(path: str | None) -> list[dict] | None:
    """A JSON list of EvalResult fields, or the evaluation CLI's report (its `model_index`), checked."""
    if not path:
        return None
    try:
        loaded = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--eval-results: cannot read {path!r} ({error})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"--eval-results: {path} is not valid JSON (line {error.lineno}: {error.msg})") from None
    results = loaded.get("model_index", loaded) if isinstance(loaded, dict) else loaded
    check_eval_results(results)
    return results


def run(args: argparse.Namespace) -> list[tuple[str, int]]:
    """Checks everything that can be checked, then loads, writes the folder and uploads (or lists)."""
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ValueError(f"--out: {str(out)!r} exists; pass --overwrite to replace it")
    check_repo_id(args.repo_id)
    eval_results = read_eval_results(args.eval_results)
    model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    folder = prepare_repo(
        model,
        processor,
        out,
        eval_results=eval_results,
        repo_id=args.repo_id,
        overwrite=args.overwrite,
        base_models=args.base_model,
        datasets=args.dataset,
        license=args.license,
    )
    return publish(folder, args.repo_id, private=args.private, token=args.token, dry_run=args.dry_run)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        files = run(args)
    except (ValueError, TypeError, OSError) as error:
        print(f"publish.py: error: {error}", file=sys.stderr)
        return 2
    for path, size in files:
        print(f"{size:>12,d}  {path}")
    total = sum(size for _, size in files)
    print(f"{total:>12,d}  {'would be uploaded to' if args.dry_run else 'uploaded to'} {args.repo_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
