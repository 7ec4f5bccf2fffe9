"""TextRenderer: determinism, spans, Unicode coverage, overflow (issue: renderer + processor)."""

import hashlib
import subprocess
import sys
import unicodedata

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from visincontext.rendering_visincontext import TextRenderer, normalize_text

LONG = " ".join(f"word{i} with some text, and a longer-than-usual-token-{i}" for i in range(120))
COVERAGE = (
    "Latin café naïve; Ελληνικά; Кириллица; 中文字; 😀🎉; e\u0301\u0323 a\u0308\u0304; "
    "שלום עולם; مرحبا; NUL\x00 BEL\x07 ESC\x1b DEL\x7f C1\x85 tab\tend\r\nnext"
)


@pytest.fixture(scope="module")
def renderer():
    return TextRenderer()


def digest(pages: np.ndarray) -> str:
    return hashlib.sha256(pages.tobytes()).hexdigest()


def test_same_bytes_in_two_processes(renderer):
    script = (
        "import hashlib; from visincontext.rendering_visincontext import TextRenderer; "
        f"print(hashlib.sha256(TextRenderer().render({LONG + COVERAGE!r}).pages.tobytes()).hexdigest())"
    )
    outputs = {
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.strip()
        for _ in range(2)
    }
    assert outputs == {digest(renderer.render(LONG + COVERAGE).pages)}


def test_spans_partition_and_rerender_alone(renderer):
    text = LONG + "\n\n" + COVERAGE + "\n" + "x" * 100 + "\n"
    result = renderer.render(text)
    assert len(result) > 3
    assert result.spans[0][0] == 0 and result.spans[-1][1] == len(result.text)
    for (_, end), (start, _) in zip(result.spans, result.spans[1:]):
        assert end == start
    for page, (start, end) in zip(result.pages, result.spans):
        alone = renderer.render(result.text[start:end])
        assert len(alone) == 1 and np.array_equal(alone.pages[0], page)


def test_layout_is_patch_aligned(renderer):
    """Rows of text lie inside patch rows: the separating pixel rows (between lines) never carry ink
    of two different lines; each row of 16 px holds one line."""
    page = renderer.render("gjpqy ÁÉÍ " * 40).pages[0]
    lines = renderer.page_lines("gjpqy ÁÉÍ " * 40)[0]
    assert renderer.line_height == 16 and renderer.cell_width == 8
    for row in range(len(lines)):
        band = page[row * 16 : (row + 1) * 16]
        assert (band < 128).any()
    assert (page[len(lines) * 16 :] == 255).all()


def ink_cells(renderer, page):
    cells = page.reshape(renderer.rows_per_page, renderer.line_height, renderer.columns, renderer.cell_width)
    return int((cells < 200).any(axis=(1, 3)).sum())


def test_unicode_coverage(renderer):
    result = renderer.render(COVERAGE)
    assert len(result) == 1
    expected_text = unicodedata.normalize("NFC", COVERAGE.replace("\r\n", "\n").replace("\t", "    "))
    expected_text = "".join(c for c in expected_text if c == "\n" or unicodedata.category(c) != "Cc")
    assert result.text == expected_text == normalize_text(COVERAGE)
    assert "\x00" not in result.text and "NUL BEL ESC DEL C1" in result.text
    from fontTools.ttLib import TTFont  # an independent reading of the fonts' character maps

    covered = set()
    for path in [renderer.font_path, *renderer.fallback_font_paths]:
        covered |= set(TTFont(path).getBestCmap())
    missing = [c for c in result.text if not c.isspace() and ord(c) not in covered]
    assert len(missing) == 4 and "中" in missing  # 3 CJK ideographs and one emoji
    assert result.replaced == len(missing)
    # every visible character (base + its combining marks) inks exactly one cell: nothing silently dropped
    clusters = sum(1 for c in result.text if not c.isspace() and not unicodedata.combining(c))
    assert ink_cells(renderer, result.pages[0]) == clusters


def lines_of(renderer, result):
    """The text of each row of each page, read back from the result's cells."""
    return ["".join(chr(c) if c else " " for c in row).rstrip() for page in result.cells for row in page]


def test_overflow_policies(renderer):
    paragraphs = "\n".join(f"Paragraph {i}: " + " ".join(f"word{i}-{k}" for k in range(i % 7 + 3)) for i in range(90))
    for text in (LONG, paragraphs):
        full = renderer.render(text)
        full_lines = lines_of(renderer, full)
        assert len(full) > 4 and not full.truncated
        with pytest.raises(ValueError, match="max_pages"):
            renderer.render(text, max_pages=2, overflow="error")
        start = renderer.render(text, max_pages=2, overflow="truncate")
        assert start.truncated and start.dropped == "end" and start.spans == full.spans[:2]
        assert np.array_equal(start.pages, full.pages[:2])
        assert start.cut_characters == len(full.text) - start.spans[-1][1]
        # keep_end: the last 2 pages' worth of rows, laid out from a paragraph start (or word start) near the end
        end = renderer.render(text, max_pages=2, overflow="keep_end")
        assert end.truncated and end.dropped == "start" and len(end) == 2
        assert end.spans[-1][1] == len(end.text) and end.cut_characters == end.spans[0][0]
        if text is paragraphs:  # from a paragraph start, rows are the full layout's rows
            assert lines_of(renderer, end) == full_lines[-2 * renderer.rows_per_page :]
        else:  # one long paragraph: laid out from a word start, its rows are those of the text from there
            assert lines_of(renderer, end) == lines_of(renderer, renderer.render(end.kept_text))
        for page, (a, b) in zip(end.pages, end.spans):
            assert np.array_equal(renderer.render(end.text[a:b]).pages[0], page)
    assert not renderer.render("short", max_pages=1, overflow="error").truncated


def test_long_context_lays_out_only_what_is_kept(monkeypatch):
    """10 MB of text with max_pages=8: the layout reads a window of the kept size, not the text."""
    renderer = TextRenderer()
    laid_out = []
    layout = renderer._layout
    monkeypatch.setattr(renderer, "_layout", lambda text, *a, **k: laid_out.append(len(text)) or layout(text, *a, **k))
    kept_chars = 8 * renderer.rows_per_page * renderer.columns
    for text in ("x" * 10_000_000, ("lorem ipsum dolor sit amet " * 400 + "\n") * 900):
        for overflow in ("keep_end", "truncate"):
            laid_out.clear()
            result = renderer.render(text, max_pages=8, overflow=overflow)
            assert len(result) == 8 and result.truncated
            assert sum(laid_out) <= 8 * kept_chars, (overflow, laid_out)  # a bounded window, not 10 MB


def test_empty_and_whitespace():
    renderer = TextRenderer(page_height=32, page_width=64, line_height=16)
    assert len(renderer.render("")) == 0 and renderer.render("").spans == []
    assert renderer.render("\n").spans == [(0, 1)]
    assert renderer.render("a\n").spans == [(0, 2)] and renderer.render("a\n\nb").spans == [(0, 3), (3, 4)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=400))
def test_property_any_text(text):
    renderer = TextRenderer(page_height=48, page_width=64, line_height=16)
    result = renderer.render(text)
    again = TextRenderer(page_height=48, page_width=64, line_height=16).render(text)
    assert np.array_equal(result.pages, again.pages) and result.spans == again.spans
    position = 0
    for start, end in result.spans:
        assert start == position and end > start
        position = end
    assert position == len(result.text) or (result.text.strip("\n") == "" and position <= len(result.text))
    if result.spans:
        assert result.spans[-1][1] == len(result.text)
    for page, (start, end) in zip(result.pages, result.spans):
        assert np.array_equal(renderer.render(result.text[start:end]).pages, page[None])


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        (dict(font_path="/nonexistent/font.ttf"), "font_path"),
        (dict(font_path=__file__), "font_path"),
        (dict(page_height=0), "page_height"),
        (dict(page_width=-5), "page_width"),
        (dict(line_height=0), "line_height"),
        (dict(max_pages=0), "max_pages"),
        (dict(overflow="middle"), "overflow"),
        (dict(fallback_font_paths=["/nope.ttf"]), "fallback_font_paths"),
    ],
)
def test_bad_settings_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        TextRenderer(**kwargs)


def test_bad_text_type(renderer):
    with pytest.raises(TypeError, match="text"):
        renderer.render(["not", "a", "string"])
    with pytest.raises(TypeError, match="texts"):
        renderer.render_batch("a string")
    assert [len(r) for r in renderer.render_batch(["a", LONG])] == [1, len(renderer.render(LONG))]


def test_render_command_writes_the_pages(tmp_path):
    from PIL import Image

    from visincontext.render import parse_args, render_pages

    paths, summary = render_pages(parse_args([LONG[:1500], "-o", str(tmp_path / "page.png")]))
    expected = TextRenderer().render(LONG[:1500])
    assert [p.name for p in paths] == ["page.png"] + [f"page-{k}.png" for k in range(2, len(expected) + 1)]
    for path, page in zip(paths, expected.pages):
        assert np.array_equal(np.asarray(Image.open(path)), page)
    result = subprocess.run(
        [sys.executable, "-m", "visincontext.render", "héllo", "-o", str(tmp_path / "one.png")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and result.stdout.startswith("1 pages") and (tmp_path / "one.png").exists()
    assert "PosixPath" not in result.stdout and not list(tmp_path.glob(".*"))  # no temporary files left


# ---- the determinism promise under any input, order and thread (issue 17) -------------------------------------

MARKS = "\u0301\u0308\u0323\u0328\u20dd"
fuzz_text = st.text(
    alphabet=st.one_of(st.sampled_from(list("ab \n\t\x00") + list(MARKS)), st.characters(blacklist_categories=("Cs",))),
    max_size=60,
)


def small_renderer():
    return TextRenderer(page_height=48, page_width=64, line_height=16)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(fuzz_text, max_size=6), fuzz_text)
def test_property_pages_do_not_depend_on_what_was_rendered_before(prior, text):
    shared = small_renderer()
    for earlier in prior:
        shared.render(earlier)
    after = shared.render(text)
    fresh = small_renderer().render(text)
    assert np.array_equal(after.pages, fresh.pages) and after.spans == fresh.spans
    assert np.array_equal(after.cells, fresh.cells)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40) | fuzz_text)
def test_property_normalize_text_is_idempotent(text):
    once = normalize_text(text)
    assert normalize_text(once) == once


def test_the_reported_combining_mark_case_and_the_rule_for_marks():
    renderer = TextRenderer()
    first = renderer.render("\u0301").pages.copy()
    renderer.render("xyz")
    assert np.array_equal(first, renderer.render("\u0301").pages)
    # a mark at a line start takes a cell of its own (ink in cell 0 of row 1), a mark after a space is drawn there
    small = small_renderer()
    result = small.render("ab\n\u0301c")
    assert [chr(c) for c in result.cells[0, 1, :2]] == ["\u0301", "c"] and ink_cells(small, result.pages[0]) == 4
    # a space that carries a mark is visible: at a line break it is not dropped with the spaces around it
    wrapped = small.render("abcdef \u0301ghijk")
    assert "\u0301" in "".join(chr(c) for c in wrapped.cells.flatten() if c) or (wrapped.cells == 32).any()
    assert ink_cells(small, wrapped.pages[0]) == 12  # a-f, the marked space, g-k: nothing drawn nowhere


def test_lone_surrogates_name_the_argument_and_the_input_index():
    with pytest.raises(ValueError, match=r"text: lone surrogate U\+D800 at index 1"):
        TextRenderer().render("\t\ud800")


def test_a_shared_renderer_and_processor_in_four_threads():
    """20 runs of 4 threads rendering different texts into one renderer (and processing with one processor) give
    what one thread gives."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    from tiny import tiny_processor

    rng = random.Random(0)
    alphabet = [chr(c) for c in range(0x20, 0x2FF)] + list(MARKS) + ["\n", "中", "😀"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 300))) for _ in range(48)]
    expected = [small_renderer().render(t).pages for t in texts]
    reference = tiny_processor()
    expected_batches = [reference(text=["x"], context=[t], return_tensors="pt")["context_pixel_values"] for t in texts]
    for run in range(20):
        shared, processor = small_renderer(), tiny_processor()
        order = list(range(len(texts)))
        random.Random(run).shuffle(order)

        def render(i, renderer=shared):
            return i, renderer.render(texts[i]).pages

        def process(i, processor=processor):
            return i, processor(text=["x"], context=[texts[i]], return_tensors="pt")["context_pixel_values"]

        with ThreadPoolExecutor(4) as pool:
            pages = list(pool.map(render, order))
            batches = list(pool.map(process, order))
        assert all(np.array_equal(p, expected[i]) for i, p in pages), run
        assert all(torch.equal(b, expected_batches[i]) for i, b in batches), run


FUZZ = """
import hashlib, json, random, sys
from visincontext.rendering_visincontext import TextRenderer
rng = random.Random(17)
alphabet = [chr(c) for c in range(0x20, 0x250)] + list("\\u0301\\u0308\\u0323\\u0328\\u20dd\\u0300") * 8 + ["\\n"] * 6
def text():
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 120)))
texts = [text() for _ in range(10_000)]
order = range(len(texts)) if sys.argv[1] == "forward" else reversed(range(len(texts)))
renderer = TextRenderer(page_height=48, page_width=96, line_height=16)
digests = {i: hashlib.sha256(renderer.render(texts[i]).pages.tobytes()).hexdigest() for i in order}
print(json.dumps([digests[i] for i in range(len(texts))]))
"""


@pytest.mark.slow
def test_ten_thousand_strings_in_two_orders_in_two_processes():
    """The reported fuzz: 10,000 random strings (many starting lines with combining marks), rendered in one order in
    one process and in the reverse order in another: byte-identical pages for every string."""
    import json

    runs = [
        subprocess.run([sys.executable, "-c", FUZZ, order], capture_output=True, text=True, check=True)
        for order in ("forward", "reverse")
    ]
    forward, reverse = (json.loads(run.stdout) for run in runs)
    assert len(forward) == 10_000
    differing = sum(a != b for a, b in zip(forward, reverse))
    assert differing == 0, f"{differing} strings differ"
