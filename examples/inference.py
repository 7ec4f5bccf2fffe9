"""Ask a saved VisInContext model about a long text (rendered into pages) and, optionally, an image.

    python examples/inference.py outputs/quickstart/hub --context "The vault code is 4417." \
        --question "What is the vault code?"

The folder (or Hub id) is loaded as any transformers model with its own code (`trust_remote_code=True`); the
context goes into the conversation as a `{"type": "context"}` item, which the processor renders into pages.
"""

import argparse
import sys

from transformers import AutoModelForImageTextToText, AutoProcessor


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a folder written by save_pretrained / prepare_repo, or a Hub id")
    parser.add_argument("--context", required=True, help="the long text to render into pages")
    parser.add_argument("--question", required=True)
    parser.add_argument("--image", help="a path or URL of an image to ask about")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    args = parser.parse_args(argv)
    if args.max_new_tokens <= 0:
        parser.error(f"--max_new_tokens: expected a positive integer, got {args.max_new_tokens}")

    model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    content = [{"type": "context", "text": args.context}]
    if args.image:
        content.append({"type": "image", "url": args.image})
    content.append({"type": "text", "text": args.question})
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))


if __name__ == "__main__":
    sys.exit(main())
