# Copyright 2026 The visincontext authors. Licensed under the Apache License, Version 2.0.
"""Text -> pages of pixels, aligned to a vision transformer's patch grid.

Text is laid out on a fixed grid of cells: rows are `line_height` pixels tall (the patch size by
default, so no patch straddles two lines) and cells are `cell_width` pixels wide (half a patch by
default, so every patch holds exactly two characters). Each glyph (or base character with its
combining marks) is drawn once with FreeType into a cell-sized bitmap; a page is then one numpy
gather of those bitmaps. That is deterministic (same text, font and geometry give the same bytes in
any process, whatever was rendered before and in any thread) and tens of times faster than drawing every
page with `ImageDraw.text`.
"""

import functools
import inspect
import re
import threading
import unicodedata
from bisect import bisect_left, bisect_right
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .fonts_visincontext import DEFAULT_FALLBACK_FONTS, DEFAULT_FONT, fitting_font_size, load_fonts, resolve_font

OVERFLOW_POLICIES = ("error", "truncate", "keep_end")
BLANK_GLYPH, REPLACEMENT_GLYPH = 0, 1

# ---- text normalisation --------------------------------------------------------------------------

_LINE_BREAKS = {ord("\r"): "\n", 0x2028: "\n", 0x2029: "\n"}  # carriage return, line and paragraph separators
_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")  # Unicode category Cc, less the newline
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(name: str, text: str, sample: int | None = None) -> None:
    """`text` must be a string of characters: a lone surrogate (half of a UTF-16 pair, as left by decoding
    with `errors="surrogateescape"`) is not one. Raises `ValueError` naming `name` (and `sample`, the index in a
    batch) and the index in `text`."""
    if not isinstance(text, str):
        raise TypeError(f"{name}: expected a string, got {type(text).__name__}")
    surrogate = _SURROGATE.search(text)
    if surrogate:
        where = f"index {surrogate.start()}" + ("" if sample is None else f" of sample {sample}")
        raise ValueError(
            f"{name}: lone surrogate U+{ord(surrogate.group()):04X} at {where} is not a character "
            "(decode the text with errors='replace')"
        )


# Unicode's stream-safe limit (UAX #15, section 13): no run of non-starters (combining marks) longer than 30. Past it a
# run draws nothing more in a cell, and NFC's canonical reordering of one run takes time quadratic in its length.
MAX_COMBINING_RUN = 30


@functools.cache
def _non_starters() -> np.ndarray:
    """(0x110000,) bool: codepoints with a non-zero canonical combining class."""
    return np.array([unicodedata.combining(chr(c)) != 0 for c in range(0x110000)])


def _cap_combining_runs(text: str) -> str:
    """Keeps the first `MAX_COMBINING_RUN` marks of each longer run of combining marks. O(len(text))."""
    codepoints = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    if len(codepoints) <= MAX_COMBINING_RUN or codepoints.max() < 0x300:  # U+0300 is the first combining mark
        return text
    index = np.arange(len(codepoints))
    last_starter = np.maximum.accumulate(np.where(_non_starters()[codepoints], -1, index))
    keep = index - last_starter <= MAX_COMBINING_RUN  # a run with no starter before it counts from -1
    return text if keep.all() else codepoints[keep].tobytes().decode("utf-32-le", "surrogatepass")


def normalize_text(text: str, tab_size: int = 4) -> str:
    """`\\r\\n`, `\\r` and the Unicode line/paragraph separators become `\\n`; tabs become spaces; other control
    characters are dropped; runs of more than `MAX_COMBINING_RUN` combining marks keep their first 30 (Unicode's
    stream-safe limit); then NFC. Linear in the length of `text`. Idempotent: normalising the result again changes
    nothing (NFC comes after every character that could separate a base from its marks is gone, and the runs are
    capped again after it, since NFC can decompose a mark into two)."""
    text = text.replace("\r\n", "\n").translate(_LINE_BREAKS).replace("\t", " " * tab_size)
    text = _cap_combining_runs(_CONTROL.sub("", text))
    return _cap_combining_runs(unicodedata.normalize("NFC", text))


# ---- reading targets -----------------------------------------------------------------------------

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
    truncated: whether text was cut to respect `max_pages`; `dropped` says which end was cut ("start" or "end")
        and `cut_characters` how many characters of `text` no page holds.
    replaced: characters drawn as the replacement box (in no available font).
    """

    pages: np.ndarray
    spans: list[tuple[int, int]]
    text: str
    cells: np.ndarray
    truncated: bool = False
    dropped: str | None = None
    cut_characters: int = 0
    replaced: int = 0

    def __len__(self) -> int:
        return len(self.pages)

    @property
    def kept_text(self) -> str:
        """The text the pages hold: `text[spans[0][0]:spans[-1][1]]`."""
        return self.text[self.spans[0][0] : self.spans[-1][1]] if self.spans else ""

    def to_images(self) -> list[Image.Image]:
        """The pages as PIL grayscale images."""
        return [Image.fromarray(page, mode="L") for page in self.pages]

    def check_fits(self, page_size: tuple[int, int], max_pages: int | None, name: str) -> None:
        """Text rendered ahead of time (`visincontext.data.prerender`) must be uint8 pages of `page_size`, at most
        `max_pages`, with a cell grid per page; `name` says which argument it came as."""
        pages, cells = np.asarray(self.pages), np.asarray(self.cells)
        if pages.ndim != 3 or pages.shape[1:] != tuple(page_size) or pages.dtype != np.uint8:
            raise ValueError(
                f"{name} has pages of shape {pages.shape} ({pages.dtype}); this processor renders "
                f"(pages, {page_size[0]}, {page_size[1]}) uint8"
            )
        if cells.shape[:1] != pages.shape[:1]:
            raise ValueError(f"{name} has {len(pages)} pages but {len(cells)} cell grids")
        if max_pages is not None and len(pages) > max_pages:
            raise ValueError(f"{name} has {len(pages)} pages, over max_pages={max_pages}")


def _check_geometry(page_height, page_width, line_height, cell_width, margin, font_size, tab_size) -> None:
    """The renderer's page geometry and font settings, each named when it is wrong."""
    for name, value in (
        ("page_height", page_height),
        ("page_width", page_width),
        ("line_height", line_height),
        ("cell_width", cell_width),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    if line_height > page_height:
        raise ValueError(f"line_height: {line_height} does not fit a page of height {page_height}")
    if not isinstance(margin, int) or margin < 0 or page_width - 2 * margin < cell_width:
        raise ValueError(f"margin: expected an integer in [0, {(page_width - cell_width) // 2}], got {margin!r}")
    if font_size is not None and (not isinstance(font_size, int) or isinstance(font_size, bool) or font_size <= 0):
        raise ValueError(f"font_size: expected a positive integer or None, got {font_size!r}")
    if not isinstance(tab_size, int) or isinstance(tab_size, bool) or tab_size < 0:
        raise ValueError(f"tab_size: expected a non-negative integer, got {tab_size!r}")


def keep_end_window_start(text: str, size: int) -> int:
    """Where to lay out from to keep the end of `text`: the last paragraph start at or before `len(text) -
    size` (a row starts there in any layout), else the first word start after it; 0 for a short text."""
    edge = len(text) - size
    if edge <= 0:
        return 0
    newline = text.rfind("\n", 0, edge)
    if newline >= 0 and edge - newline <= size:
        return newline + 1
    match = re.compile(r"\s\S").search(text, edge)
    return match.start() + 1 if match else edge


class GlyphAtlas:
    """The glyphs a renderer draws, each once: id 0 is the blank cell, id 1 the replacement box, and every other
    character (or base character with its combining marks) gets the next id when first met. `_codepoint_glyph` maps
    a codepoint to its id (-1: not drawn yet), so that whole texts map to ids with one numpy lookup. Thread-safe:
    glyphs are added under a lock, and `glyph_ids` returns a snapshot of the atlas holding every id it returns."""

    def __init__(self, fonts: list, line_height: int, cell_width: int):
        self.fonts, self.line_height, self.cell_width = fonts, line_height, cell_width
        self._lock = threading.Lock()
        self._cells = [np.full((line_height, cell_width), 255, np.uint8), self._box_glyph()]
        self._array = np.stack(self._cells)
        self._codepoint_glyph = np.full(0x110000, -1, np.int32)
        self._cluster_glyph: dict[str, int] = {}
        self._codepoint_glyph[ord(" ")] = BLANK_GLYPH

    def __getstate__(self) -> dict:  # DataLoader workers get a copy: a lock cannot be pickled
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

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
        for font, codepoints in self.fonts:
            if base in codepoints:
                image = Image.new("L", (self.cell_width, self.line_height), 255)
                ascent, descent = font.getmetrics()
                x = (self.cell_width - font.getlength(cluster)) / 2
                y = (self.line_height - ascent - descent) // 2
                try:
                    ImageDraw.Draw(image).text((round(x), y), cluster, font=font, fill=0)
                except (OSError, RuntimeError, ValueError):  # a glyph FreeType cannot draw
                    return self._cells[REPLACEMENT_GLYPH], True
                return np.asarray(image), False
        return self._cells[REPLACEMENT_GLYPH], True

    def _glyph_id(self, cluster: str) -> int:
        """The atlas id of a cluster (a character, or a base with its marks), drawn on first use. Under the lock."""
        glyph = self._cluster_glyph.get(cluster)
        if glyph is None:
            cell, replaced = self._draw_glyph(cluster)
            glyph = REPLACEMENT_GLYPH if replaced else len(self._cells)
            if not replaced:
                self._cells.append(cell)
            self._cluster_glyph[cluster] = glyph
            if len(cluster) == 1 and not unicodedata.combining(cluster):
                self._codepoint_glyph[ord(cluster)] = glyph
        return glyph

    def glyph_ids(self, text: str, codepoints: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per character of `text`: its glyph id, whether it opens a cell (False for newlines and for combining
        marks that have a base), and the atlas to draw them from (a snapshot holding every id returned).
        `codepoints`: those of `text` (`codepoints_of`)."""
        atlas = self._array  # read before the ids: another thread may be adding glyphs
        ids = self._codepoint_glyph[codepoints]
        opens_cell = codepoints != 10
        if not ((ids < 0) & opens_cell).any() and (len(ids) == 0 or ids.max() < len(atlas)):
            return ids, opens_cell, atlas
        with self._lock:
            ids = self._codepoint_glyph[codepoints]  # another thread may have drawn some meanwhile
            missing = np.flatnonzero((ids < 0) & opens_cell)
            clusters = {}  # index of a cell's first character -> the cluster it draws, for cells with marks
            for index in missing.tolist():
                char = text[index]
                if unicodedata.combining(char):
                    if index > 0 and text[index - 1] != "\n":
                        opens_cell[index] = False  # a mark with a base: drawn in the base's cell
                    else:
                        clusters[index] = char  # no base: a cell of its own
                else:
                    self._glyph_id(char)
            ids = self._codepoint_glyph[codepoints]
            for mark in missing[~opens_cell[missing]].tolist():
                base = mark - 1
                while not opens_cell[base]:
                    base -= 1
                if base not in clusters:
                    end = base + 1
                    while end < len(text) and not opens_cell[end] and text[end] != "\n":
                        end += 1
                    clusters[base] = text[base:end]
            for index, cluster in clusters.items():
                ids[index] = self._glyph_id(cluster)
            if len(self._cells) != len(self._array):
                self._array = np.stack(self._cells)
            return ids, opens_cell, self._array


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

    Layout rules:
    - Rows break after the last whole word that fits; a word longer than a row wraps by character. A newline ends
      a paragraph; an empty line is an empty row. Spaces at a break are owned by the row before, not drawn.
    - A combining mark belongs to the character before it (its base, which may be a space) and is drawn with it
      in one cell; a space that carries a mark is visible and laid out as part of a word. A mark at the start of
      the text or of a line has no base: it takes a cell of its own.
    - With `max_pages`, only what is kept is laid out: `truncate` lays out a window from the start holding a row
      more than `max_pages` pages; `keep_end` keeps the last `max_pages * rows_per_page` rows, laid out from the
      last paragraph start (or, within one long paragraph, word start) before a window of about
      `max_pages * rows_per_page * (columns + 1)` characters at the end, doubled until it holds that many rows.
      Time grows with the kept pages, not with
      the text (only normalisation reads all of it).

    A renderer may be shared by threads: glyphs are added to its atlas under a lock.
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
        cell_width = line_height // 2 if cell_width is None else cell_width
        _check_geometry(page_height, page_width, line_height, cell_width, margin, font_size, tab_size)
        self._check_overflow(max_pages, overflow)

        self.font_path = resolve_font(font_path if font_path is not None else DEFAULT_FONT)
        fallback_font_paths = DEFAULT_FALLBACK_FONTS if fallback_font_paths is None else fallback_font_paths
        if isinstance(fallback_font_paths, str):
            raise TypeError("fallback_font_paths: expected a list of font paths, got a string")
        self.fallback_font_paths = [resolve_font(path) for path in fallback_font_paths]
        self.page_height, self.page_width = page_height, page_width
        self.line_height, self.cell_width, self.margin = line_height, cell_width, margin
        self.max_pages, self.overflow, self.tab_size = max_pages, overflow, tab_size
        self.rows_per_page = page_height // line_height
        self.columns = (page_width - 2 * margin) // cell_width

        paths = [("font_path", self.font_path)] + [("fallback_font_paths", p) for p in self.fallback_font_paths]
        load_fonts(paths, 12)  # check every file before measuring the main one
        self.font_size = (
            font_size if font_size is not None else fitting_font_size(self.font_path, line_height, cell_width)
        )

        self._atlas = GlyphAtlas(load_fonts(paths, self.font_size), line_height, cell_width)

    @staticmethod
    def _check_overflow(max_pages, overflow) -> None:
        if max_pages is not None and (not isinstance(max_pages, int) or isinstance(max_pages, bool) or max_pages <= 0):
            raise ValueError(f"max_pages: expected a positive integer or None, got {max_pages!r}")
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow: expected one of {OVERFLOW_POLICIES}, got {overflow!r}")

    def settings(self) -> dict:
        """The constructor arguments that reproduce this renderer."""
        settings = {name: getattr(self, name) for name in inspect.signature(TextRenderer).parameters}
        return settings | {"fallback_font_paths": list(self.fallback_font_paths)}

    def _layout(
        self, text: str, codepoints: np.ndarray, opens_cell: np.ndarray, max_rows: int | None = None
    ) -> list[tuple[int, int, int]]:
        """Greedy line breaking on the cell grid, from the start of `text`, stopping after `max_rows` rows. Returns
        rows as (start, end, visible_end): the row owns `text[start:end]` (with the spaces and newline after its
        last word) and draws `text[start:visible_end]`.

        A row depends only on the text from its start, so any page re-rendered alone comes out the same.
        """
        n, columns = len(text), self.columns
        cells_before = np.concatenate([[0], np.cumsum(opens_cell)]).tolist()  # cells in text[:i]
        is_word = (codepoints != 32) & (codepoints != 10)
        marks = np.flatnonzero(~opens_cell & (codepoints != 10))
        if len(marks):  # a space that carries a combining mark is visible: it belongs to a word
            last_open = np.maximum.accumulate(np.where(opens_cell, np.arange(n), -1))
            is_word[last_open[marks][last_open[marks] >= 0]] = True
        edges = np.diff(np.concatenate([[0], is_word.view(np.int8), [0]]))
        word_starts, word_ends = np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()
        paragraph_ends = np.flatnonzero(codepoints == 10).tolist() + [n]
        rows = []
        start = 0
        for paragraph_end in paragraph_ends:
            if max_rows is not None and len(rows) >= max_rows:
                break
            owned_end = min(paragraph_end + 1, n)  # the row that closes a paragraph owns its newline
            if start == paragraph_end:
                if paragraph_end < n:  # an empty line (a final newline opens no row)
                    rows.append((start, owned_end, start))
                start = owned_end
                continue
            while start < paragraph_end and (max_rows is None or len(rows) < max_rows):
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
            if start >= paragraph_end:
                start = owned_end
        return rows

    def _draw_pages(self, codepoints, ids, opens_cell, atlas, pages_rows):
        """Draws all pages with one gather from the glyph atlas. Returns (pages, cells, replacement boxes drawn):
        `cells` (pages, rows, columns) holds the codepoint of the character each cell shows (its base character;
        0 for a blank cell)."""
        num_pages, columns = len(pages_rows), self.columns
        cell_ids = np.concatenate([ids[opens_cell], np.full(columns, BLANK_GLYPH, np.int32)])
        cell_codepoints = np.concatenate([codepoints[opens_cell].astype(np.int32), np.zeros(columns, np.int32)])
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
        glyph_rows = atlas.view(np.dtype((np.void, self.cell_width)))[..., 0]  # (glyphs, line_height)
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

    def _glyphs(self, part: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(codepoints, glyph ids, opens_cell, atlas) of `part`: each computed once per part laid out."""
        codepoints = np.frombuffer(part.encode("utf-32-le"), dtype=np.uint32)
        return (codepoints, *self._atlas.glyph_ids(part, codepoints))

    def _rows(self, text: str, max_pages: int | None, overflow: str) -> tuple[int, tuple, list, bool]:
        """(offset of the laid-out part in `text`, its `_glyphs`, its rows, whether text was cut), laying out only
        what is kept."""
        per_page = self.rows_per_page
        if max_pages is None:
            glyphs = self._glyphs(text)
            return 0, glyphs, self._layout(text, glyphs[0], glyphs[2]), False
        limit = max_pages * per_page
        size = limit * (self.columns + 1)
        if overflow in ("truncate", "error"):
            while True:  # a prefix window; rows before its last two cannot depend on where it was cut
                part = text[:size]
                glyphs = self._glyphs(part)
                rows = self._layout(part, glyphs[0], glyphs[2], max_rows=limit + 2)
                if len(rows) >= limit + 2 or size >= len(text):
                    break
                size *= 2
            if len(rows) <= limit:
                return 0, glyphs, rows, False
            if overflow == "error":
                raise ValueError(
                    f"max_pages: the text needs more than {max_pages} pages; "
                    "raise max_pages or use overflow='truncate' or 'keep_end'"
                )
            return 0, glyphs, rows[:limit], True
        while True:
            offset = keep_end_window_start(text, size)
            part = text[offset:]
            glyphs = self._glyphs(part)
            rows = self._layout(part, glyphs[0], glyphs[2])
            if len(rows) >= limit or offset == 0:
                return offset, glyphs, rows[-limit:], offset > 0 or len(rows) > limit
            size *= 2

    def render(self, text: str, max_pages: int | None = None, overflow: str | None = None) -> RenderedText:
        """Renders `text` into pages. `max_pages` / `overflow` override the renderer's settings."""
        check_text("text", text)
        max_pages = self.max_pages if max_pages is None else max_pages
        overflow = self.overflow if overflow is None else overflow
        self._check_overflow(max_pages, overflow)
        text = normalize_text(text, self.tab_size)
        offset, glyphs, rows, truncated = self._rows(text, max_pages, overflow)
        pages_rows = [rows[i : i + self.rows_per_page] for i in range(0, len(rows), self.rows_per_page)]
        spans = [(offset + page[0][0], offset + page[-1][1]) for page in pages_rows]
        pages, cells, replaced = self._draw_pages(*glyphs, pages_rows)
        kept = spans[-1][1] - spans[0][0] if spans else 0
        dropped = None if not truncated else ("end" if overflow == "truncate" else "start")
        return RenderedText(
            pages=pages,
            spans=spans,
            text=text,
            cells=cells,
            truncated=truncated,
            dropped=dropped,
            cut_characters=len(text) - kept if truncated else 0,
            replaced=replaced,
        )

    def page_lines(self, text: str) -> list[list[str]]:
        """The lines each page would show (no `max_pages` limit): for reading or for other drawing code."""
        check_text("text", text)
        text = normalize_text(text, self.tab_size)
        codepoints, _, opens_cell, _ = self._glyphs(text)
        rows = self._layout(text, codepoints, opens_cell)
        return [
            [text[start:visible_end] for start, _, visible_end in rows[i : i + self.rows_per_page]]
            for i in range(0, len(rows), self.rows_per_page)
        ]

    def render_batch(
        self, texts: list[str], max_pages: int | None = None, overflow: str | None = None
    ) -> list[RenderedText]:
        """`render` for each text of a list."""
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts: expected a list of strings, got {type(texts).__name__}")
        return [self.render(text, max_pages=max_pages, overflow=overflow) for text in texts]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.settings().items())})"


__all__ = ["TextRenderer", "RenderedText", "normalize_text", "check_text", "reading_targets", "READING_CLASSES"]
