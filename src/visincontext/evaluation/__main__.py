"""python -m visincontext.evaluation --model DIR --task easy-vqa --shots 0 4 --context-mode text rendered --output results.json"""

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch


def parse_args(argv=None) -> argparse.Namespace:
    from .tasks import CONTEXT_MODES, SELECTIONS, TASKS

    parser = argparse.ArgumentParser(prog="python -m visincontext.evaluation", description="Few-shot evaluation of a VisInContext model.")
    parser.add_argument("--model", required=True, help="folder or Hub id of a VisInContext model and processor")
    parser.add_argument("--task", required=True, help=f"one of {sorted(TASKS)}")
    parser.add_argument("--data", nargs="*", help="query data (files, or a Hub id); easy-vqa has an embedded default")
    parser.add_argument("--support-data", nargs="*", help="demonstration pool (default: the train split of the same source)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=200, help="evaluate the first N queries")
    parser.add_argument("--support-limit", type=int, default=2000)
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 4, 8, 16, 32])
    parser.add_argument("--context-mode", nargs="+", default=list(CONTEXT_MODES), help=f"any of {CONTEXT_MODES}")
    parser.add_argument("--selection", default="random", help=f"one of {SELECTIONS}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--output", default="results.json", help="JSON path; the markdown table goes next to it (.md)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .tasks import evaluate, get_task, load_examples, markdown_table

    args = parse_args(argv)
    task = get_task(args.task)
    if any(k < 0 for k in args.shots):
        raise ValueError(f"shots: expected non-negative numbers, got {args.shots}")
    start = time.perf_counter()
    queries = load_examples(task, args.data, split=args.split, limit=args.limit)
    support_source = args.support_data if args.support_data is not None else args.data
    support = load_examples(task, support_source, split="train" if not args.support_data else args.split, limit=args.support_limit)
    if not args.support_data and args.data and len(args.data) == 1 and Path(args.data[0]).is_file():
        query_ids = {q.id for q in queries}  # one local file: demonstrations come from its other examples
        support = [s for s in load_examples(task, args.data, split=args.split) if s.id not in query_ids]
    model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    results = evaluate(
        model, processor, task, queries, support, args.shots, args.context_mode, selection=args.selection, seed=args.seed,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
    )
    report = {
        "task": task.name,
        "model": args.model,
        "seed": args.seed,
        "arguments": vars(args),
        "config": model.config.to_dict(),
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
        "runtime_s": time.perf_counter() - start,
        "results": [{k: v for k, v in dataclasses.asdict(r).items()} for r in results],
        "model_index": [
            {"task_type": task.hub_task_type, "task_name": f"{task.name} {r.shots}-shot ({r.context_mode})", "dataset_type": task.name,
             "dataset_name": task.name, "dataset_split": args.split, "metric_type": r.metric, "metric_value": r.score}
            for r in results
        ],
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, default=str))
    table = markdown_table(results)
    output.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"wrote {output} and {output.with_suffix('.md')} in {report['runtime_s']:.1f}s")
    return report


if __name__ == "__main__":
    main()
