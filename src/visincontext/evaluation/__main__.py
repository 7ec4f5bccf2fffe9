"""python -m visincontext.evaluation --model DIR --task easy-vqa --shots 0 4 --context-mode text rendered \
    --output results.json

Exits 0 on success. A bad argument, unreadable data or an unwritable output is one line on stderr and exit 2; the
output is checked before the model is loaded, and the JSON and markdown are written whole or not at all.
"""

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch


def parse_args(argv=None) -> argparse.Namespace:
    from .tasks import CONTEXT_MODES, SELECTIONS, TASKS

    parser = argparse.ArgumentParser(
        prog="python -m visincontext.evaluation", description="Few-shot evaluation of a VisInContext model."
    )
    parser.add_argument("--model", required=True, help="folder or Hub id of a VisInContext model and processor")
    parser.add_argument("--task", required=True, choices=sorted(TASKS), metavar="TASK", help=f"one of {sorted(TASKS)}")
    parser.add_argument("--data", nargs="*", help="query data (files, or a Hub id); easy-vqa has an embedded default")
    parser.add_argument(
        "--support-data", nargs="*", help="demonstration pool (default: the train split of the same source)"
    )
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=200, help="evaluate the first N queries (N >= 1)")
    parser.add_argument("--support-limit", type=int, default=2000, help="read at most N demonstrations (N >= 1)")
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 4, 8, 16, 32])
    parser.add_argument("--context-mode", nargs="+", default=list(CONTEXT_MODES), choices=list(CONTEXT_MODES))
    parser.add_argument("--selection", default="random", choices=list(SELECTIONS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--chat", action="store_true", help="prompt through the processor's chat template")
    parser.add_argument("--output", default="results.json", help="JSON path; the markdown table goes next to it (.md)")
    args = parser.parse_args(argv)
    for name in ("limit", "support_limit", "batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    if any(k < 0 for k in args.shots):
        parser.error(f"--shots: expected non-negative numbers, got {args.shots}")
    if not args.output.endswith(".json"):
        parser.error(f"--output: expected a .json file path, got {args.output!r}")
    return args


def run(argv=None) -> dict:
    """Parses the arguments, evaluates, writes the JSON and markdown reports; returns the report."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..files import atomic_write_text, check_writable
    from .tasks import evaluate, get_task, load_examples, markdown_table, model_index

    args = parse_args(argv)
    output = check_writable("--output", args.output)
    check_writable("--output", output.with_suffix(".md"))
    task = get_task(args.task)
    start = time.perf_counter()
    queries = load_examples(task, args.data, split=args.split, limit=args.limit)
    support_source = args.support_data if args.support_data is not None else args.data
    support = load_examples(
        task, support_source, split="train" if not args.support_data else args.split, limit=args.support_limit
    )
    if not args.support_data and args.data and len(args.data) == 1 and Path(args.data[0]).is_file():
        query_ids = {q.id for q in queries}  # one local file: demonstrations come from its other examples
        support = [s for s in load_examples(task, args.data, split=args.split) if s.id not in query_ids]
    model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    results = evaluate(
        model,
        processor,
        task,
        queries,
        support,
        args.shots,
        args.context_mode,
        selection=args.selection,
        seed=args.seed,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        chat=args.chat,
    )
    report = {
        "task": task.name,
        "model": args.model,
        "seed": args.seed,
        "arguments": vars(args),
        "config": model.config.to_dict(),
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
        "runtime_s": time.perf_counter() - start,
        "results": [dataclasses.asdict(r) for r in results],
        "model_index": model_index(task, results, split=args.split),
    }
    table = markdown_table(results)
    atomic_write_text(output, json.dumps(report, indent=2, default=str))
    atomic_write_text(output.with_suffix(".md"), table + "\n")
    print(table)
    print(f"wrote {output} and {output.with_suffix('.md')} in {report['runtime_s']:.1f}s")
    return report


def main(argv=None) -> int:
    try:
        run(argv)
    except (ValueError, TypeError, OSError) as error:
        print(f"python -m visincontext.evaluation: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
