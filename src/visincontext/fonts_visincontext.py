# Copyright 2026 The visincontext authors. Licensed under the Apache License, Version 2.0.
"""Fonts for the renderer: where a font file is, and which characters it covers.

The package ships DejaVu Sans Mono (main font) and DejaVu Sans (fallback) in `fonts/`; a processor saves its font
files beside `processor_config.json`. Coverage is read from the font's `cmap` table with `struct`, so this module
needs nothing beyond the standard library and works as Hub remote code.
"""

import struct
from pathlib import Path

from PIL import ImageFont

FONTS_DIR = Path(__file__).parent / "fonts"
DEFAULT_FONT = "DejaVuSansMono.ttf"
DEFAULT_FALLBACK_FONTS = ("DejaVuSans.ttf",)


def resolve_font(path) -> str:
    """A path as given, or the shipped font of that file name when only a name is given."""
    path = str(path)
    if not Path(path).exists() and Path(path).name == path and (FONTS_DIR / path).is_file():
        return str(FONTS_DIR / path)
    return path


def font_codepoints(path: str) -> frozenset[int]:
    """Codepoints covered by a TrueType/OpenType font's `cmap` (formats 4 and 12)."""
    data = Path(path).read_bytes()
    if data[:4] == b"ttcf":  # a collection: use its first font
        (offset,) = struct.unpack_from(">I", data, 12)
    else:
        offset = 0
    (num_tables,) = struct.unpack_from(">H", data, offset + 4)
    tables = {
        data[offset + 12 + 16 * i : offset + 16 + 16 * i]: struct.unpack_from(">I", data, offset + 20 + 16 * i)[0]
        for i in range(num_tables)
    }
    if b"cmap" not in tables:
        raise OSError("the font has no cmap table")
    cmap = tables[b"cmap"]
    (num_subtables,) = struct.unpack_from(">H", data, cmap + 2)
    codepoints: set[int] = set()
    for i in range(num_subtables):
        platform, encoding, sub_offset = struct.unpack_from(">HHI", data, cmap + 4 + 8 * i)
        if (platform, encoding) not in ((3, 1), (3, 10), (0, 3), (0, 4), (0, 6)):
            continue
        start = cmap + sub_offset
        (fmt,) = struct.unpack_from(">H", data, start)
        if fmt == 4:
            segments = struct.unpack_from(">H", data, start + 6)[0] // 2
            ends = struct.unpack_from(f">{segments}H", data, start + 14)
            starts = struct.unpack_from(f">{segments}H", data, start + 16 + 2 * segments)
            deltas = struct.unpack_from(f">{segments}h", data, start + 16 + 4 * segments)
            range_offsets_at = start + 16 + 6 * segments
            range_offsets = struct.unpack_from(f">{segments}H", data, range_offsets_at)
            for s, (first, last, delta, range_offset) in enumerate(zip(starts, ends, deltas, range_offsets)):
                for code in range(first, last + 1):
                    if code == 0xFFFF:
                        continue
                    if range_offset == 0:
                        glyph = (code + delta) & 0xFFFF
                    else:
                        at = range_offsets_at + 2 * s + range_offset + 2 * (code - first)
                        glyph = struct.unpack_from(">H", data, at)[0]
                        glyph = (glyph + delta) & 0xFFFF if glyph else 0
                    if glyph:
                        codepoints.add(code)
        elif fmt == 12:
            (groups,) = struct.unpack_from(">I", data, start + 12)
            for g in range(groups):
                first, last, glyph = struct.unpack_from(">III", data, start + 16 + 12 * g)
                codepoints.update(range(first + (glyph == 0), last + 1))
    return frozenset(codepoints)


def load_fonts(named_paths: list[tuple[str, str]], size: int) -> list[tuple[ImageFont.FreeTypeFont, frozenset[int]]]:
    """`[(argument name, path), ...]` -> `[(font at `size` px, codepoints it covers), ...]`, in the same order.

    BASIC layout (no raqm shaping): glyphs are drawn one cell at a time, and the output does not depend on whether
    a machine's Pillow was built with raqm. A missing or unreadable file is a `ValueError` naming the argument.
    """
    fonts = []
    for name, path in named_paths:
        if not Path(path).is_file():
            raise ValueError(f"{name}: no font file at {path!r}")
        try:
            font = ImageFont.truetype(path, size, layout_engine=ImageFont.Layout.BASIC)
            fonts.append((font, font_codepoints(path)))
        except (OSError, struct.error, ValueError) as error:
            raise ValueError(f"{name}: cannot read a font from {path!r} ({error})") from None
    return fonts


def fitting_font_size(path: str, line_height: int, cell_width: int) -> int:
    """The largest pixel size whose glyphs fit a `line_height` row and a `cell_width` cell (at least 4)."""
    for size in range(2 * line_height, 3, -1):
        font = ImageFont.truetype(path, size)
        ascent, descent = font.getmetrics()
        if ascent + descent <= line_height + 1 and font.getlength("M") <= cell_width:
            return size
    return 4


__all__ = [
    "FONTS_DIR",
    "DEFAULT_FONT",
    "DEFAULT_FALLBACK_FONTS",
    "resolve_font",
    "font_codepoints",
    "load_fonts",
    "fitting_font_size",
]
