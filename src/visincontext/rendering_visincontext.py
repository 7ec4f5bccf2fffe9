# Copyright 2026 The visincontext authors. Licensed under the Apache License, Version 2.0.
"""Text -> pages of pixels, aligned to a vision transformer's patch grid.

Text is laid out on a fixed grid of cells: rows are `line_height` pixels tall (the patch size by
default, so no patch straddles two lines) and cells are `cell_width` pixels wide (half a patch by
default, so every patch holds exactly two characters). Each glyph (or base character with its
combining marks) is drawn once with FreeType into a cell-sized bitmap; a page is then one numpy
gather of those bitmaps. That is deterministic (same text, font and geometry give the same bytes in
any process) and tens of times faster than drawing every page with `ImageDraw.text`.
"""

import re
import struct
from bisect import bisect_left, bisect_right
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONTS_DIR = Path(__file__).parent / "fonts"
DEFAULT_FONT = "DejaVuSansMono.ttf"
DEFAULT_FALLBACK_FONTS = ("DejaVuSans.ttf",)
OVERFLOW_POLICIES = ("error", "truncate", "keep_end")
BLANK_GLYPH, REPLACEMENT_GLYPH = 0, 1



def default_font_path(name: str = DEFAULT_FONT) -> str:
    """Path of a font shipped with the package (`fonts/`)."""
    return str(FONTS_DIR / name)


def _resolve_font(path) -> str:
    """A path as given, or the shipped font of that file name when only a name is given."""
    path = str(path)
    if not Path(path).exists() and Path(path).name == path and (FONTS_DIR / path).is_file():
        return str(FONTS_DIR / path)
    return path


def _font_codepoints(path: str) -> frozenset[int]:
    """Codepoints covered by a TrueType/OpenType font's `cmap` (formats 4 and 12; read with `struct`, so the
    module needs nothing beyond PIL and numpy and works as Hub remote code)."""
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


_LINE_BREAKS = {ord("\r"): "\n", 0x2028: "\n", 0x2029: "\n"}  # carriage return, line and paragraph separators
_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")  # Unicode category Cc, less the newline


def normalize_text(text: str, tab_size: int = 4) -> str:
    """NFC; `\\r\\n`, `\\r` and the Unicode line/paragraph separators become `\\n`; tabs become spaces;
    other control characters are dropped."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\t", " " * tab_size)
    text = text.translate(_LINE_BREAKS)
    return _CONTROL.sub("", text)


# Reading targets: what each cell of a page shows, as one of 96 classes, for the model's reading objective.
READING_CLASSES = 96  # 0: blank (an empty cell or a space), 1: a character outside printable ASCII, 2-95: "!" to "~"


def reading_classes(cells: np.ndarray) -> np.ndarray:
    """Codepoints (any shape, 0 for an empty cell) -> reading classes of the same shape."""
    cells = np.asarray(cells)
    printable = (cells >= 0x21) & (cells <= 0x7E)
    return np.where((cells == 0) | (cells == 0x20), 0, np.where(printable, cells - 0x21 + 2, 1)).astype(np.int64)


def reading_targets(cells: np.ndarray, num_latents: int, cells_per_latent: int) -> np.ndarray:
    """`(pages, rows, columns)` cell codepoints -> `(pages, num_latents, cells_per_latent)` reading classes.

    Latent i of a page reads the i-th run of `cells_per_latent` cells of the page in reading order (row by row,
    left to right); cells past `num_latents * cells_per_latent` have no latent to read them, and latents past the
    page's last cell read blanks. Works for any page geometry and number of latents.
    """
    for name, value in (("num_latents", num_latents), ("cells_per_latent", cells_per_latent)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    flat = np.asarray(cells).reshape(len(cells), -1)
    size = num_latents * cells_per_latent
    flat = np.pad(flat, ((0, 0), (0, max(0, size - flat.shape[1]))))[:, :size]
    return reading_classes(flat).reshape(len(cells), num_latents, cells_per_latent)


@dataclass
class RenderedText:
    """What `TextRenderer.render` returns.

    pages: `(pages, height, width)` uint8, black text on white.
    spans: one `(start, end)` per page: the slice of `text` that the page holds.
    text: the normalised input that `spans` index into.
    cells: `(pages, rows, columns)` int32, the codepoint of the character each cell of the grid shows (0: blank):
        the page's layout, from which reading targets are made (`reading_targets`).
    truncated: whether text was cut to respect `max_pages`; `dropped` says which end was cut.
    replaced: characters drawn as the replacement box (in no available font).
    """

    pages: np.ndarray
    spans: list[tuple[int, int]]
    text: str
    cells: np.ndarray | None = None
    truncated: bool = False
    dropped: str | None = None
    replaced: int = 0
    dropped_pages: int = 0
    extra: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.pages)

    def to_images(self) -> list[Image.Image]:
        """The pages as PIL grayscale images."""
        return [Image.fromarray(page, mode="L") for page in self.pages]


class TextRenderer:
    r"""Renders text into pages for a vision encoder.

    Args:
        font_path: TrueType/OpenType file of the main font (default: DejaVu Sans Mono, shipped).
        fallback_font_paths: fonts tried, in order, for characters the main font lacks (default: DejaVu Sans).
            Characters in no font are drawn as a box and counted in `RenderedText.replaced`.
        font_size: pixel size; default: the largest size whose glyphs fit a cell and a row.
        page_height / page_width: page size in pixels (the vision tower's `image_size`).
        line_height: row height in pixels (the vision tower's `patch_size`).
        cell_width: width of one character cell (default `line_height // 2`: two characters per patch).
        margin: blank pixels left and right of the text.
        max_pages: most pages per text (`None`: no limit); what happens beyond is `overflow`.
        overflow: `"error"` (raise), `"truncate"` (keep the start) or `"keep_end"` (keep the end: the
            text nearest the prompt, the useful choice for in-context text).
        tab_size: spaces per tab.
    """

    def __init__(
        self,
        font_path: str | None = None,
        fallback_font_paths: list[str] | tuple[str, ...] | None = None,
        font_size: int | None = None,
        page_height: int = 224,
        page_width: int = 224,
        line_height: int = 16,
        cell_width: int | None = None,
        margin: int = 0,
        max_pages: int | None = None,
        overflow: str = "keep_end",
        tab_size: int = 4,
    ):
        for name, value in (("page_height", page_height), ("page_width", page_width), ("line_height", line_height)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        cell_width = line_height // 2 if cell_width is None else cell_width
        if not isinstance(cell_width, int) or cell_width <= 0:
            raise ValueError(f"cell_width: expected a positive integer, got {cell_width!r}")
        if line_height > page_height:
            raise ValueError(f"line_height: {line_height} does not fit a page of height {page_height}")
        if not isinstance(margin, int) or margin < 0 or page_width - 2 * margin < cell_width:
            raise ValueError(f"margin: expected an integer in [0, {(page_width - cell_width) // 2}], got {margin!r}")
        if max_pages is not None and (not isinstance(max_pages, int) or max_pages <= 0):
            raise ValueError(f"max_pages: expected a positive integer or None, got {max_pages!r}")
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow: expected one of {OVERFLOW_POLICIES}, got {overflow!r}")
        if font_size is not None and (not isinstance(font_size, int) or font_size <= 0):
            raise ValueError(f"font_size: expected a positive integer or None, got {font_size!r}")

        self.font_path = _resolve_font(font_path if font_path is not None else DEFAULT_FONT)
        if fallback_font_paths is None:
            fallback_font_paths = DEFAULT_FALLBACK_FONTS
        self.fallback_font_paths = [_resolve_font(path) for path in fallback_font_paths]
        self.page_height, self.page_width = page_height, page_width
        self.line_height, self.cell_width, self.margin = line_height, cell_width, margin
        self.max_pages, self.overflow, self.tab_size = max_pages, overflow, tab_size
        self.rows_per_page = page_height // line_height
        self.columns = (page_width - 2 * margin) // cell_width

        paths = [("font_path", self.font_path)] + [("fallback_font_paths", p) for p in self.fallback_font_paths]
        coverage = []
        for name, path in paths:
            if not Path(path).is_file():
                raise ValueError(f"{name}: no font file at {path!r}")
            try:
                ImageFont.truetype(path, 12)
                coverage.append(_font_codepoints(path))
            except (OSError, struct.error) as error:
                raise ValueError(f"{name}: cannot read a font from {path!r} ({error})") from None
        self.font_size = font_size if font_size is not None else self._fitting_font_size(self.font_path)
        # BASIC layout (no raqm shaping): glyphs are drawn one cell at a time, and the output does not depend
        # on whether a machine's Pillow was built with raqm
        self._fonts = [
            (ImageFont.truetype(path, self.font_size, layout_engine=ImageFont.Layout.BASIC), codepoints)
            for (_, path), codepoints in zip(paths, coverage)
        ]

        # Glyph atlas: id 0 is the blank cell, id 1 the replacement box. `_codepoint_glyph` maps a codepoint
        # to its id (-1: not drawn yet) so that whole lines map to ids with one numpy lookup.
        self._atlas = [np.full((line_height, cell_width), 255, np.uint8), self._box_glyph()]
        self._atlas_array = np.stack(self._atlas)
        self._codepoint_glyph = np.full(0x110000, -1, np.int32)
        self._cluster_glyph: dict[str, int] = {}
        self._codepoint_glyph[ord(" ")] = BLANK_GLYPH

    @classmethod
    def from_vision_config(cls, vision_config, **kwargs) -> "TextRenderer":
        """Page = the tower's `image_size`, row height = its `patch_size`, two characters per patch."""
        image_size, patch_size = vision_config.image_size, vision_config.patch_size
        settings = dict(page_height=image_size, page_width=image_size, line_height=patch_size)
        settings.update(kwargs)
        return cls(**settings)

    def settings(self) -> dict:
        """The constructor arguments that reproduce this renderer."""
        return dict(
            font_path=self.font_path, fallback_font_paths=list(self.fallback_font_paths), font_size=self.font_size,
            page_height=self.page_height, page_width=self.page_width, line_height=self.line_height,
            cell_width=self.cell_width, margin=self.margin, max_pages=self.max_pages, overflow=self.overflow,
            tab_size=self.tab_size,
        )

    # ---- glyphs ----------------------------------------------------------------------------------

    def _fitting_font_size(self, path: str) -> int:
        for size in range(2 * self.line_height, 3, -1):
            font = ImageFont.truetype(path, size)
            ascent, descent = font.getmetrics()
            if ascent + descent <= self.line_height + 1 and font.getlength("M") <= self.cell_width:
                return size
        return 4

    def _box_glyph(self) -> np.ndarray:
        cell = np.full((self.line_height, self.cell_width), 255, np.uint8)
        top, bottom = max(1, self.line_height // 8), self.line_height - max(2, self.line_height // 8)
        left, right = min(1, self.cell_width - 1), self.cell_width - 1 - min(1, self.cell_width - 1)
        cell[top:bottom, left] = cell[top:bottom, right] = 0
        cell[top, left : right + 1] = cell[bottom - 1, left : right + 1] = 0
        return cell

    def _draw_glyph(self, cluster: str) -> tuple[np.ndarray, bool]:
        """Draws one base character (with its combining marks) centred in a cell. Returns (cell, replaced)."""
        base = ord(cluster[0])
        for font, codepoints in self._fonts:
            if base in codepoints:
                image = Image.new("L", (self.cell_width, self.line_height), 255)
                ascent, descent = font.getmetrics()
                x = (self.cell_width - font.getlength(cluster)) / 2
                y = (self.line_height - ascent - descent) // 2
                try:
                    ImageDraw.Draw(image).text((round(x), y), cluster, font=font, fill=0)
                except (OSError, RuntimeError, ValueError):  # a glyph FreeType cannot draw
                    return self._atlas[REPLACEMENT_GLYPH], True
                return np.asarray(image), False
        return self._atlas[REPLACEMENT_GLYPH], True

    def _glyph_id(self, cluster: str) -> int:
        glyph = self._cluster_glyph.get(cluster)
        if glyph is None:
            cell, replaced = self._draw_glyph(cluster)
            glyph = REPLACEMENT_GLYPH if replaced else len(self._atlas)
            if not replaced:
                self._atlas.append(cell)
            self._cluster_glyph[cluster] = glyph
            if len(cluster) == 1 and not unicodedata.combining(cluster):
                self._codepoint_glyph[ord(cluster)] = glyph
        return glyph

    def _glyph_ids(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Per character of `text`: its glyph id, and whether it opens a cell (False for newlines and for
        combining marks, which are drawn into their base character's cell)."""
        codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = self._codepoint_glyph[codepoints]
        opens_cell = codepoints != 10
        missing = np.flatnonzero((ids < 0) & opens_cell)
        if len(missing):
            for index in missing:
                char = text[index]
                if unicodedata.combining(char) and index > 0 and text[index - 1] != "\n":
                    opens_cell[index] = False
                else:
                    self._glyph_id(char)
            ids = self._codepoint_glyph[codepoints]
            for mark in missing[~opens_cell[missing]]:
                if opens_cell[mark - 1]:  # the first mark of a cluster: its base gets a glyph of its own
                    end = mark
                    while end < len(text) and not opens_cell[end] and text[end] != "\n":
                        end += 1
                    ids[mark - 1] = self._glyph_id(text[mark - 1 : end])
            if len(self._atlas) != len(self._atlas_array):
                self._atlas_array = np.stack(self._atlas)
        return ids, opens_cell

    # ---- layout ----------------------------------------------------------------------------------

    def _layout(self, text: str, opens_cell: np.ndarray) -> list[tuple[int, int, int]]:
        """Greedy line breaking on the cell grid. Returns rows as (start, end, visible_end): the row owns
        `text[start:end]` (with the spaces and newline after its last word) and draws `text[start:visible_end]`.

        A row depends only on the text from its start, so any page re-rendered alone comes out the same.
        """
        n, columns = len(text), self.columns
        codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        cells_before = np.concatenate([[0], np.cumsum(opens_cell)]).tolist()  # cells in text[:i]
        is_word = ((codepoints != 32) & (codepoints != 10)).view(np.int8)
        edges = np.diff(np.concatenate([[0], is_word, [0]]))
        word_starts, word_ends = np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()
        paragraph_ends = np.flatnonzero(codepoints == 10).tolist() + [n]
        rows = []
        start = 0
        for paragraph_end in paragraph_ends:
            owned_end = min(paragraph_end + 1, n)  # the row that closes a paragraph owns its newline
            if start == paragraph_end:
                if paragraph_end < n:  # an empty line (a final newline opens no row)
                    rows.append((start, owned_end, start))
                start = owned_end
                continue
            while start < paragraph_end:
                # furthest position whose preceding cells still fit on this row
                reach = min(bisect_right(cells_before, cells_before[start] + columns) - 1, paragraph_end)
                word = bisect_right(word_ends, reach) - 1
                if word >= 0 and word_ends[word] > start:  # break after the last whole word that fits
                    visible_end = word_ends[word]
                    following = bisect_left(word_starts, visible_end)
                    next_start = min(word_starts[following] if following < len(word_starts) else n, paragraph_end)
                else:  # a word longer than the row: wrap by character, never inside a cluster
                    cut = max(reach, start + 1)
                    while cut < paragraph_end and not opens_cell[cut]:
                        cut += 1
                    visible_end = next_start = cut
                rows.append((start, owned_end if next_start >= paragraph_end else next_start, visible_end))
                start = next_start
            start = owned_end
        return rows

    def _draw_pages(self, text: str, ids: np.ndarray, opens_cell: np.ndarray, pages_rows: list[list[tuple[int, int, int]]]):
        """Draws all pages with one gather from the glyph atlas. Returns (pages, cells, replacement boxes drawn):
        `cells` (pages, rows, columns) holds the codepoint of the character each cell shows (its base character;
        0 for a blank cell)."""
        num_pages, columns = len(pages_rows), self.columns
        cell_ids = np.concatenate([ids[opens_cell], np.full(columns, BLANK_GLYPH, np.int32)])
        codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int32)
        cell_codepoints = np.concatenate([codepoints[opens_cell], np.zeros(columns, np.int32)])
        cells_before = np.concatenate([[0], np.cumsum(opens_cell)])
        starts = np.zeros((num_pages, self.rows_per_page), dtype=np.int64)
        lengths = np.zeros((num_pages, self.rows_per_page), dtype=np.int64)
        for p, rows in enumerate(pages_rows):
            bounds = np.array([(start, visible_end) for start, _, visible_end in rows], dtype=np.int64)
            starts[p, : len(rows)] = cells_before[bounds[:, 0]]
            lengths[p, : len(rows)] = cells_before[bounds[:, 1]] - cells_before[bounds[:, 0]]
        offsets = np.arange(columns)
        visible = offsets < lengths[..., None]
        grid = np.where(visible, cell_ids[starts[..., None] + offsets], BLANK_GLYPH)
        cells = np.where(visible, cell_codepoints[starts[..., None] + offsets], 0).astype(np.int32)
        # Each glyph row (cell_width bytes) is one opaque element, so the gather lays out pixel rows directly:
        # (pages, rows, line_height, columns) elements == (pages, rows * line_height, columns * cell_width) bytes.
        glyph_rows = self._atlas_array.view(np.dtype((np.void, self.cell_width)))[..., 0]  # (glyphs, line_height)
        pixel_rows = glyph_rows[grid[:, :, None, :], np.arange(self.line_height)[:, None]]
        height, width = self.rows_per_page * self.line_height, columns * self.cell_width
        body = pixel_rows.view(np.uint8).reshape(num_pages, height, width)
        if (height, width) == (self.page_height, self.page_width):
            pages = body
        else:
            pages = np.full((num_pages, self.page_height, self.page_width), 255, dtype=np.uint8)
            pages[:, :height, self.margin : self.margin + width] = body
        return pages, cells, int((grid == REPLACEMENT_GLYPH).sum())

    # ---- public API ------------------------------------------------------------------------------

    def render(self, text: str, max_pages: int | None = None, overflow: str | None = None) -> RenderedText:
        """Renders `text` into pages. `max_pages` / `overflow` override the renderer's settings."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected a string, got {type(text).__name__}")
        max_pages = self.max_pages if max_pages is None else max_pages
        overflow = self.overflow if overflow is None else overflow
        if max_pages is not None and (not isinstance(max_pages, int) or max_pages <= 0):
            raise ValueError(f"max_pages: expected a positive integer or None, got {max_pages!r}")
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow: expected one of {OVERFLOW_POLICIES}, got {overflow!r}")
        text = normalize_text(text, self.tab_size)
        ids, opens_cell = self._glyph_ids(text)
        rows = self._layout(text, opens_cell)
        pages_rows = [rows[i : i + self.rows_per_page] for i in range(0, len(rows), self.rows_per_page)]
        truncated, dropped, dropped_pages = False, None, 0
        if max_pages is not None and len(pages_rows) > max_pages:
            dropped_pages = len(pages_rows) - max_pages
            if overflow == "error":
                raise ValueError(
                    f"max_pages: the text needs {len(pages_rows)} pages but max_pages={max_pages}; "
                    "raise max_pages or use overflow='truncate' or 'keep_end'"
                )
            truncated = True
            if overflow == "truncate":
                pages_rows, dropped = pages_rows[:max_pages], "end"
            else:
                pages_rows, dropped = pages_rows[-max_pages:], "start"
        spans = [(page[0][0], page[-1][1]) for page in pages_rows]
        pages, cells, replaced = self._draw_pages(text, ids, opens_cell, pages_rows)
        return RenderedText(
            pages=pages, spans=spans, text=text, cells=cells, truncated=truncated, dropped=dropped,
            replaced=replaced, dropped_pages=dropped_pages,
        )

    def page_lines(self, text: str) -> list[list[str]]:
        """The lines each page would show (no `max_pages` limit): for reading or for other drawing code."""
        text = normalize_text(text, self.tab_size)
        _, opens_cell = self._glyph_ids(text)
        rows = self._layout(text, opens_cell)
        return [[text[start:visible_end] for start, _, visible_end in rows[i : i + self.rows_per_page]]
                for i in range(0, len(rows), self.rows_per_page)]

    def render_batch(self, texts: list[str], max_pages: int | None = None, overflow: str | None = None) -> list[RenderedText]:
        """`render` for each text of a list."""
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts: expected a list of strings, got {type(texts).__name__}")
        return [self.render(text, max_pages=max_pages, overflow=overflow) for text in texts]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.settings().items())})"
