"""Look at rendered pages: `python -m visincontext.render "some text" -o page.png`.

Several pages are written as page.png, page-2.png, ... (or one image with `--sheet`). From Python:
`TextRenderer().render(text).to_images()[0].save("page.png")`.
"""

import argparse
import sys
from pathlib import Path

from PIL import Image

from .rendering_visincontext import TextRenderer


def main(argv=None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m visincontext.render", description="Render text into pages (PNG).")
    parser.add_argument("text", nargs="?", help="text to render (default: read --file or standard input)")
    parser.add_argument("--file", help="read the text from this file")
    parser.add_argument("-o", "--output", default="page.png", help="PNG path of the first page")
    parser.add_argument("--font", default=None, help="font file (default: DejaVu Sans Mono, shipped)")
    parser.add_argument("--page-size", type=int, default=224, help="page height and width in pixels")
    parser.add_argument("--line-height", type=int, default=16, help="row height in pixels (the patch size)")
    parser.add_argument("--max-pages", type=int, default=None)
    parser.add_argument("--overflow", default="keep_end", choices=["error", "truncate", "keep_end"])
    parser.add_argument("--sheet", action="store_true", help="write all pages side by side into one image")
    args = parser.parse_args(argv)
    if args.text is not None:
        text = args.text
    elif args.file:
        text = Path(args.file).read_text()
    else:
        text = sys.stdin.read()
    renderer = TextRenderer(font_path=args.font, page_height=args.page_size, page_width=args.page_size,
                            line_height=args.line_height, max_pages=args.max_pages, overflow=args.overflow)
    result = renderer.render(text)
    images = result.to_images()
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if args.sheet and images:
        sheet = Image.new("L", (sum(i.width + 4 for i in images) - 4, images[0].height), 128)
        for k, image in enumerate(images):
            sheet.paste(image, (k * (image.width + 4), 0))
        images, paths = [sheet], [output]
    else:
        paths = [output if k == 0 else output.with_name(f"{output.stem}-{k + 1}{output.suffix}") for k in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
    note = f", {result.replaced} characters drawn as boxes" if result.replaced else ""
    cut = f", {result.dropped_pages} pages cut from the {result.dropped}" if result.truncated else ""
    print(f"{len(result)} pages -> {', '.join(map(str, paths))}{note}{cut}")
    return paths


if __name__ == "__main__":
    main()
