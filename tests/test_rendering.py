"""TextRenderer: determinism, spans, Unicode coverage, overflow (issue: renderer + processor)."""

import hashlib
import subprocess
import sys
import unicodedata

import numpy as np
import pytest
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
    outputs = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.strip() for _ in range(2)}
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


def test_overflow_policies(renderer):
    full = renderer.render(LONG)
    assert len(full) > 4 and not full.truncated
    with pytest.raises(ValueError, match="max_pages"):
        renderer.render(LONG, max_pages=2, overflow="error")
    start = renderer.render(LONG, max_pages=2, overflow="truncate")
    assert start.truncated and start.dropped == "end" and start.spans == full.spans[:2]
    assert np.array_equal(start.pages, full.pages[:2])
    end = renderer.render(LONG, max_pages=2, overflow="keep_end")
    assert end.truncated and end.dropped == "start" and end.spans == full.spans[-2:]
    assert np.array_equal(end.pages, full.pages[-2:]) and end.dropped_pages == len(full) - 2
    assert not renderer.render("short", max_pages=1, overflow="error").truncated


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

    from visincontext.render import main

    paths = main([LONG[:1500], "-o", str(tmp_path / "page.png")])
    expected = TextRenderer().render(LONG[:1500])
    assert [p.name for p in paths] == ["page.png"] + [f"page-{k}.png" for k in range(2, len(expected) + 1)]
    for path, page in zip(paths, expected.pages):
        assert np.array_equal(np.asarray(Image.open(path)), page)
    result = subprocess.run([sys.executable, "-m", "visincontext.render", "héllo", "-o", str(tmp_path / "one.png")],
                            capture_output=True, text=True, check=True)
    assert "1 pages" in result.stdout and (tmp_path / "one.png").exists()
