"""Look at rendered pages: `python -m visincontext.render "some text" -o page.png` (or `visincontext-render`).

Several pages are written as page.png, page-2.png, ... (or one image with `--sheet`). From Python:
`TextRenderer().render(text).to_images()[0].save("page.png")`. Exits 0 on success; on a bad argument, an unreadable
input or an unwritable output it prints one line and exits 2, before anything is written.
"""

import argparse
import sys
from pathlib import Path

from PIL import Image

from .files import atomic_write, check_writable
from .rendering_visincontext import OVERFLOW_POLICIES, TextRenderer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m visincontext.render", description="Render text into pages (PNG).")
    parser.add_argument("text", nargs="?", help="text to render (default: read --file or standard input)")
    parser.add_argument("--file", help="read the text from this file (UTF-8)")
    parser.add_argument("-o", "--output", default="page.png", help="PNG path of the first page")
    parser.add_argument("--font", default=None, help="font file (default: DejaVu Sans Mono, shipped)")
    parser.add_argument("--page-size", type=int, default=224, help="page height and width in pixels")
    parser.add_argument("--line-height", type=int, default=16, help="row height in pixels (the patch size)")
    parser.add_argument("--max-pages", type=int, default=None)
    parser.add_argument("--overflow", default="keep_end", choices=list(OVERFLOW_POLICIES))
    parser.add_argument("--sheet", action="store_true", help="write all pages side by side into one image")
    args = parser.parse_args(argv)
    if not args.output.lower().endswith(".png"):
        parser.error(f"--output: expected a .png path, got {args.output!r}")
    for name in ("page_size", "line_height", "max_pages"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')}: expected a positive integer, got {value}")
    return args


def render_pages(args: argparse.Namespace) -> tuple[list[Path], str]:
    """Renders and writes the pages (each file written whole or not at all). Returns (paths, summary line)."""
    if args.text is not None:
        text = args.text
    elif args.file:
        try:
            text = Path(args.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"--file: cannot read {args.file!r} ({error})") from None
    else:
        text = sys.stdin.read()
    output = Path(args.output)
    check_writable("--output", output)
    renderer = TextRenderer(
        font_path=args.font,
        page_height=args.page_size,
        page_width=args.page_size,
        line_height=args.line_height,
        max_pages=args.max_pages,
        overflow=args.overflow,
    )
    result = renderer.render(text)
    images = result.to_images()
    if args.sheet and images:
        sheet = Image.new("L", (sum(i.width + 4 for i in images) - 4, images[0].height), 128)
        for k, image in enumerate(images):
            sheet.paste(image, (k * (image.width + 4), 0))
        images, paths = [sheet], [output]
    else:
        paths = [
            output if k == 0 else output.with_name(f"{output.stem}-{k + 1}{output.suffix}") for k in range(len(images))
        ]
    for image, path in zip(images, paths):
        atomic_write(path, lambda file, image=image: image.save(file, format="PNG"))
    note = f", {result.replaced} characters drawn as boxes" if result.replaced else ""
    cut = f", {result.cut_characters} characters cut from the {result.dropped}" if result.truncated else ""
    return paths, f"{len(result)} pages -> {', '.join(map(str, paths)) or 'nothing (empty text)'}{note}{cut}"


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        _, summary = render_pages(args)
    except (ValueError, TypeError, OSError) as error:
        print(f"visincontext-render: error: {error}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
