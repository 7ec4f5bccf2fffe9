"""experiments/needle.py: the needle-in-a-haystack experiment on the package's default page layout (issue: needle)."""

import itertools
import math
import random
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import needle  # noqa: E402

from visincontext.offline import BYTE_VOCAB, default_processor  # noqa: E402
from visincontext.rendering_visincontext import READING_CLASSES  # noqa: E402

CLASS_CHARACTER = {0: " ", 1: "\N{REPLACEMENT CHARACTER}", **{i + 2: chr(0x21 + i) for i in range(READING_CLASSES - 2)}}


@pytest.fixture(scope="module")
def processor():
    return needle.build_processor()


@pytest.mark.parametrize(
    ("image_size", "line_height", "num_latents", "cells_per_latent"),
    [
        (224, 16, 98, 4),  # the needle's layout: 14 rows x 28 cells, each row exactly 7 latents
        (224, 16, 64, 8),  # the same page, 64 latents of 8 cells (the last 15 read blanks)
        (224, 14, 32, 8),  # a ViT-L/14 page: 16 rows x 32 cells, latents for the first 8 rows only
        (64, 8, 16, 8),  # the offline default: 8 rows x 16 cells, one latent per 8 cells
    ],
)
def test_reading_targets_spell_what_each_page_region_shows(image_size, line_height, num_latents, cells_per_latent):
    """Each latent's targets are the characters drawn in its cells, in reading order: a cell has ink exactly when
    its target is a character, and the targets spell the page's text."""
    processor = default_processor(image_size=image_size, line_height=line_height, max_pages=16)
    renderer = processor.renderer
    haystacks = needle.Haystacks(processor, held_out=False, seed=image_size + num_latents)
    text = haystacks.sample(3)["context"]
    rendered = processor.render(text)
    targets = processor.reading_targets([rendered.cells], num_latents, cells_per_latent)[0].numpy()
    assert targets.shape == (len(rendered), num_latents, cells_per_latent)
    rows, columns = renderer.rows_per_page, renderer.columns
    for page, (start, end) in enumerate(rendered.spans):
        spelled = "".join(CLASS_CHARACTER[c] for c in targets[page].reshape(-1))
        read = spelled[: rows * columns]
        # the page's words, in order, are what its latents read (a row's end is a word's end: wrapping moves spaces)
        covered = min(rows, len(read) // columns)
        lines = " ".join(read[r * columns : (r + 1) * columns] for r in range(covered)).split()
        words = rendered.text[start:end].split()
        assert lines == words[: len(lines)] and len(lines) > 10, page
        if covered == rows:
            assert lines == words, page
        assert set(spelled[rows * columns :]) <= {" "}  # latents past the page's last cell read blanks
        pixels = rendered.pages[page]
        for index, character in enumerate(read):
            row, column = divmod(index, columns)
            top, left = row * line_height, renderer.margin + column * renderer.cell_width
            block = pixels[top : top + line_height, left : left + renderer.cell_width]
            assert (block.min() < 160) == (character != " "), (page, row, column, character)


def test_held_out_vaults_codes_and_words_never_reach_training(processor):
    haystacks = needle.Haystacks(processor, held_out=False, seed=0)
    held_out_words = set(needle.words(held_out=True))
    training_codes = set()
    for _ in range(60):
        sample = needle.training_sample(haystacks, max_pages=4, blank=False)
        vault, code = re.search(r"vault ([A-Z]-\d\d) is (\d{4})\.", sample["context"]).groups()
        assert not needle.is_held_out_vault(vault) and not needle.is_held_out_code(int(code))
        assert sample["text"] == f" {code}<|endofchunk|>" and vault in sample["prompt"]
        filler = set(re.findall(r"[a-z]+", sample["context"].replace(f"vault {vault} is {code}", "").lower()))
        assert not (filler - {"the", "access", "code", "of"}) & held_out_words
        training_codes.add(code)
    for sample in needle.evaluation_set(processor, seed=1, per_cell=1):
        assert needle.is_held_out_vault(sample["vault"]) and needle.is_held_out_code(int(sample["code"]))
        assert len(processor.render(sample["context"])) == sample["pages"]
        assert sample["needle"] in sample["context"]


def test_every_digit_is_trained_at_every_position_of_a_code():
    """The held-out codes are chosen by a hash: a rule like `code % 5 == 0` would never train a last digit of 0 or 5,
    and no model could then answer a held-out question."""
    training = [str(c) for c in range(1000, needle.CODES) if not needle.is_held_out_code(c)]
    held_out = [str(c) for c in range(1000, needle.CODES) if needle.is_held_out_code(c)]
    assert 0.15 < len(held_out) / (len(held_out) + len(training)) < 0.25
    for position in range(4):
        assert {code[position] for code in training} == set("0123456789"[1 if position == 0 else 0 :])


def test_each_sample_records_the_column_of_its_code(processor):
    columns = []
    for sample in needle.evaluation_set(processor, seed=7, per_cell=2, pages=(1, 2)):
        page = processor.render(sample["context"]).cells
        row = next(r for p in page for r in p if sample["code"] in "".join(chr(c) if c else " " for c in r))
        assert "".join(chr(c) if c else " " for c in row).index(sample["code"]) == sample["column"]
        columns.append(sample["column"])
    assert len(set(columns)) >= 3  # word wrapping moves the code around the row


def test_the_budget_warms_up_then_decays_to_zero_by_steps_or_by_time():
    budget = needle.Budget(None, None, [], "rendered", max_steps=1000, minutes=1e9, eval_every=100, warmup_steps=100)
    assert budget.learning_rate_factor(0) == pytest.approx(0.01)
    assert budget.learning_rate_factor(99) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.099)))
    assert budget.learning_rate_factor(500) == pytest.approx(0.5)
    assert budget.learning_rate_factor(1000) == 0.0 and budget.progress(1000) == 1.0
    timed = needle.Budget(None, None, [], "raw", max_steps=10**9, minutes=2.0, eval_every=100)
    timed.start = time.time() - 60  # one of two minutes spent
    assert timed.progress(200) == pytest.approx(0.5, abs=0.01)
    assert timed.learning_rate_factor(200) == pytest.approx(0.5, abs=0.02)
    constant = needle.Budget(None, None, [], "rendered", 1000, 1e9, 100, warmup_steps=100, schedule="constant")
    assert constant.learning_rate_factor(49) == pytest.approx(0.5) and constant.learning_rate_factor(999) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        needle.Budget(None, None, [], "rendered", 1000, 1e9, 100, schedule="linear")


@pytest.mark.parametrize("num_latents, cells", [(64, 8), (196, 2), (98, 4), (49, 8), (25, 16), (392, 2)])
def test_each_latent_reads_whole_patches_and_the_latents_cover_the_page(num_latents, cells):
    assert needle.reading_cells_per_latent(num_latents) == cells
    assert cells % needle.CELLS_PER_PATCH == 0 and num_latents * cells >= needle.CELLS_PER_PAGE
    assert num_latents * (cells - needle.CELLS_PER_PATCH) < needle.CELLS_PER_PAGE  # one patch fewer would not


def test_a_haystack_is_never_cut_at_the_page_limit(processor):
    """The renderer cuts a text longer than `max_pages` (16 here) to 16 pages, which would lose a needle at depth 1.
    A sampler that starts with too much filler must drop sentences until the whole text fits, not keep the cut."""
    haystacks = needle.Haystacks(processor, held_out=True, seed=5)
    first_filler = haystacks.filler
    haystacks.filler = lambda characters: first_filler(2 * characters)  # start at about 30 pages
    sample = haystacks.sample(16, 1.0)
    rendered = processor.renderer.render(sample["context"])
    assert len(rendered) == 16 and not rendered.truncated
    last_page = "".join(chr(c) if c else " " for c in rendered.cells[-1].reshape(-1))
    assert f"{sample['code']}." in last_page


def test_the_needle_sits_at_the_depth_asked(processor):
    haystacks = needle.Haystacks(processor, held_out=True, seed=3)
    for pages in (1, 4):
        first, last = haystacks.sample(pages, 0.0), haystacks.sample(pages, 1.0)
        assert first["context"].startswith(first["needle"]) and last["context"].endswith(last["needle"])
        middle = haystacks.sample(pages, 0.5)
        position = middle["context"].index(middle["needle"]) / len(middle["context"])
        assert 0.3 < position < 0.7 and len(processor.render(middle["context"])) == pages


@settings(max_examples=40, deadline=None)
@given(fill=st.floats(0.0, 1.0), depth=st.floats(0.0, 1.0), seed=st.integers(0, 10_000))
def test_a_partly_filled_page_holds_the_needle_at_its_depth_among_fewer_words(processor, fill, depth, seed):
    sample = needle.Haystacks(processor, held_out=False, seed=seed).sample(1, depth, fill=fill)
    context, page_characters = sample["context"], needle.CELLS_PER_PAGE * 0.88
    assert len(processor.render(context)) == 1 and context.count(sample["needle"]) == 1
    # about `fill` of a full page's text (a filler sentence is at most about 120 characters)
    assert abs(len(context) - max(fill * page_characters, len(sample["needle"]))) < 130, (len(context), fill)
    if fill * page_characters < len(sample["needle"]):
        assert context == sample["needle"]


def test_a_share_of_training_pages_is_partly_filled_and_no_share_leaves_the_stream_as_it_was(processor):
    rng = random.Random(0)
    state = rng.getstate()
    assert needle.training_fill(rng, 0.0) == 1.0 and rng.getstate() == state  # no draw: the seed-0 stream stays
    for share, expected in ((0.0, 0.0), (0.5, 0.5), (1.0, 1.0)):
        haystacks = needle.Haystacks(processor, held_out=False, seed=11)
        lengths = [len(needle.training_sample(haystacks, 1, False, share)["context"]) for _ in range(80)]
        partly = sum(length < 0.8 * needle.CELLS_PER_PAGE * 0.88 for length in lengths) / len(lengths)
        assert abs(partly - 0.8 * expected) < 0.2, (share, partly)  # (a uniform fill is under 0.8 in 80% of pages)
    with pytest.raises(ValueError, match="fill"):
        needle.Haystacks(processor, held_out=False, seed=0).sample(1, fill=1.5)


def test_controls_hide_the_needle(processor):
    sample = needle.Haystacks(processor, held_out=True, seed=4).sample(4, 0.5)
    blank = needle.context_for(processor, sample, "blank")
    assert blank.strip() == "" and len(processor.render(blank)) == len(processor.render(sample["context"]))
    removed = needle.context_for(processor, sample, "removed")
    assert sample["code"] not in removed and len(processor.render(removed)) == 3


class NextTokenOracle(torch.nn.Module):
    """Logits that rank first, at each position, the token that follows it, or token `wrong_by` ids further on."""

    def __init__(self, wrong_by: int = 0):
        super().__init__()
        self.wrong_by = wrong_by

    def forward(self, input_ids, **kwargs):
        following = torch.roll(input_ids, -1, dims=1) + self.wrong_by
        return SimpleNamespace(logits=torch.nn.functional.one_hot(following, BYTE_VOCAB + 3).float())


def test_digit_accuracy_scores_each_digit_given_the_ones_before(processor):
    samples = needle.evaluation_set(processor, seed=3, per_cell=1, pages=(1, 2), depths=(0.5,))
    assert needle.digit_accuracy(NextTokenOracle(), processor, samples, "rendered") == [1.0, 1.0]
    assert needle.digit_accuracy(NextTokenOracle(wrong_by=1), processor, samples, "rendered") == [0.0, 0.0]
    with pytest.raises(ValueError, match="mode"):
        needle.digit_accuracy(NextTokenOracle(), processor, samples, "raw")


def test_the_news_filler_has_numbers_and_no_held_out_sentence_in_training():
    training, held_out = needle.news_documents(held_out=False), needle.news_documents(held_out=True)
    assert len(training) > 200 and len(held_out) > 50  # about one news item in five held out
    training_sentences = {s for document in training for s in document}
    held_out_sentences = [s for document in held_out for s in document]
    assert not training_sentences & set(held_out_sentences)
    with_digits = sum(bool(re.search(r"\d", s)) for s in held_out_sentences) / len(held_out_sentences)
    assert with_digits > 0.15, with_digits  # dates, times, counts, money: numbers a copier could take for a code


@pytest.mark.parametrize("filler", needle.FILLERS)
@pytest.mark.parametrize("keys, asked", [(2, 1), (4, 1), (4, 2), (8, 1)])
def test_several_needles_each_with_its_own_vault_and_code_the_asked_one_at_its_depth(processor, filler, keys, asked):
    haystacks = needle.Haystacks(processor, held_out=True, seed=keys + asked, filler=filler)
    pages = needle.pages_for_keys(keys)
    for depth in (0.0, 1.0):
        sample = haystacks.sample(pages, depth, keys=keys, asked=asked)
        context = sample["context"]
        found = re.findall(r"The access code of vault ([A-Z]-\d\d) is (\d{4})\.", context)
        assert sorted(found) == sorted(zip(sample["vaults"], sample["codes"])) and len(found) == keys
        assert len(set(sample["vaults"])) == keys and len(set(sample["codes"])) == keys
        assert all(needle.is_held_out_vault(v) and needle.is_held_out_code(int(c)) for v, c in found)
        assert (context.startswith if depth == 0.0 else context.endswith)(sample["needle"])
        assert len(processor.render(context)) == pages
        prompt = needle.prompt_of(sample)
        assert [v for v in sample["vaults"] if v in prompt] == sample["vaults"][:asked]
        assert needle.answer_of(sample) == " " + " ".join(sample["codes"][:asked])
        assert not any(v in needle.prompt_of(sample, key=False) for v in sample["vaults"])
    with pytest.raises(ValueError, match="asked"):
        haystacks.sample(pages, 0.5, keys=keys, asked=keys + 1)


@pytest.mark.parametrize("keys, asked", [(1, 1), (4, 1), (4, 2), (8, 1)])
def test_the_statement_form_restates_the_key_before_its_value_and_every_needle_is_one_look_up(processor, keys, asked):
    haystacks = needle.Haystacks(processor, held_out=True, seed=keys, filler="news", answer_form="statement")
    sample = haystacks.sample(needle.pages_for_keys(keys), 0.5, keys=keys, asked=asked)
    vaults, codes = sample["vaults"], sample["codes"]
    prompt = needle.prompt_of(sample)
    assert prompt.endswith(f"The access code of vault {vaults[0]} is")  # RULER's answer prefix
    assert [v for v in vaults if v in prompt] == vaults[:asked] and len(prompt) < 60
    # the question's answer: the first code, then each further asked needle stated in full
    assert needle.answer_of(sample) == f" {codes[0]}." + "".join(
        f" The access code of vault {v} is {c}." for v, c in zip(vaults[1:asked], codes[1:asked])
    )
    # a training answer states every needle once, the asked ones first, the others as key and value
    stated = prompt[prompt.index("The access code") :] + needle.answer_of(sample, every_needle=True)
    found = re.findall(r"([A-Z]-\d\d) is (\d{4})\.", stated)
    assert found == list(zip(vaults, codes)) and len(found) == keys
    assert all(needle.NEEDLE.format(vault=v, code=c) in sample["context"] for v, c in found)
    assert stated.count("The access code of vault") == asked
    assert needle.is_exact(needle.answer_of(sample), sample)
    blind = needle.prompt_of(sample, key=False)
    assert blind.endswith("The access code of the vault is") and not any(v in blind for v in vaults)
    # what the model reads when its first digit is predicted: the key right before it
    assert (prompt + needle.answer_of(sample))[: len(prompt) + 1].endswith(f"vault {vaults[0]} is ")


def test_the_code_form_is_the_first_recipes_and_states_no_other_needle(processor):
    sample = needle.Haystacks(processor, held_out=True, seed=0).sample(1, 0.5, keys=2)
    assert needle.prompt_of(sample) == f"What is the access code of vault {sample['vault']}? Answer:"
    with pytest.raises(ValueError, match="every_needle"):
        needle.answer_of(sample, every_needle=True)
    with pytest.raises(ValueError, match="answer_form"):
        needle.Haystacks(processor, held_out=True, seed=0, answer_form="json")


def test_the_absent_key_control_asks_for_a_vault_on_no_page(processor):
    sample = needle.Haystacks(processor, held_out=True, seed=2, filler="news").sample(1, 0.5, keys=4)
    for seed in range(20):
        absent = needle.with_absent_vault(sample, random.Random(seed))
        assert absent["vault"] not in sample["context"] and absent["vaults"][1:] == sample["vaults"][1:]
        assert absent["context"] == sample["context"] and absent["codes"] == sample["codes"]
        assert f"vault {absent['vault']}?" in needle.prompt_of(absent) and needle.is_held_out_vault(absent["vault"])


def test_a_keyless_share_of_training_questions_names_no_vault_and_still_answers_a_needles_code(processor):
    def stream(share):
        haystacks = needle.TrainingHaystacks(processor, seed=5, mix="mixed", answer_form="statement")
        return [needle.training_sample(haystacks, 1, False, 0.5, True, share) for _ in range(60)]

    assert stream(0.0) == stream(0.0) and all("vault " in s["prompt"] for s in stream(0.0))  # no draw at 0
    samples = stream(0.3)
    keyless = [s for s in samples if s["prompt"] == "The access code of the vault is"]
    assert 0.15 < len(keyless) / len(samples) < 0.45
    for sample in keyless:  # the answer still starts with a code that stands on the pages, then states the others
        first = re.match(r" (\d{4})\.", sample["text"]).group(1)
        assert f"is {first}." in sample["context"]
        stated = re.findall(r"([A-Z]-\d\d) is (\d{4})\.", sample["text"])
        assert all(needle.NEEDLE.format(vault=v, code=c) in sample["context"] for v, c in stated)
    # with the key the prompts are what they were; only the draw that makes a question keyless moves the stream on
    assert all(s["prompt"].endswith(" is") for s in samples)


def test_the_curriculum_streams_one_page_haystacks_first_then_the_longer_ones(processor):
    def pages(short_samples):
        stream = needle.SampleStream(processor, 2, 8, False, 0.5, mix="mixed", short_samples=short_samples)
        return [processor.renderer.render(s["context"]).__len__() for s in itertools.islice(iter(stream), 60)]

    curriculum = pages(30)
    assert max(curriculum[:30]) <= needle.pages_for_keys(8) and max(curriculum[30:]) > 2
    assert max(pages(0)[:30]) > 2  # without it the long haystacks come from the start


def test_the_raw_baseline_trains_on_the_same_questions_with_the_haystack_as_tokens(processor):
    streamed = {"mix": "mixed", "answer_form": "statement", "every_needle": True, "keyless_share": 0.3}
    rendered = needle.SampleStream(processor, 3, 4, False, 0.5, **streamed, short_samples=5)
    raw = needle.RawStream(processor, 3, 4, 0.5, **streamed, short_samples=5)
    for page, text in zip(itertools.islice(iter(rendered), 12), itertools.islice(iter(raw), 12)):
        assert text["prompt"] == page["context"] + "\n" + page["prompt"] and text["context"] is None
        assert text["text"] == page["text"] and text["images"] == []


def test_exact_match_and_another_needles_value_are_told_apart():
    sample = {"vaults": ["A-10", "B-11", "C-12"], "codes": ["1234", "5678", "9012"], "asked": 1}
    assert needle.is_exact(" 1234", sample) and not needle.answers_another_needle(" 1234", sample)
    assert not needle.is_exact(" 5678", sample) and needle.answers_another_needle(" 5678", sample)
    assert not needle.is_exact(" 4321", sample) and not needle.answers_another_needle(" 4321", sample)
    assert needle.gives_a_needles_code(" 5678", sample) and needle.gives_a_needles_code(" 1234.", sample)
    assert not needle.gives_a_needles_code(" 4321 1234", sample)  # the first code given counts
    two = {**sample, "asked": 2}
    assert needle.is_exact(" 1234 5678", two) and not needle.is_exact(" 1234 9012", two)
    assert needle.answers_another_needle(" 1234 9012", two) and not needle.answers_another_needle(" 1234 567", two)


def test_the_single_mix_streams_the_first_recipes_haystacks(processor):
    """`--mix single` (the default) draws what the first recipe drew: its results stay reproducible."""
    mixed = needle.TrainingHaystacks(processor, seed=3, mix="single")
    direct = needle.Haystacks(processor, held_out=False, seed=3)
    for _ in range(5):
        assert needle.training_sample(mixed, 2, False, 0.5) == needle.training_sample(direct, 2, False, 0.5)
    with pytest.raises(ValueError, match="mix"):
        needle.TrainingHaystacks(processor, seed=0, mix="all")


def test_the_mixed_stream_has_every_family_and_nothing_held_out(processor):
    haystacks = needle.TrainingHaystacks(processor, seed=0, mix="mixed")
    keys, asked, fillers = set(), set(), set()
    for _ in range(120):
        sample = needle.training_haystack(haystacks, 1, 0.5)
        keys.add(sample["keys"]), asked.add(sample["asked"]), fillers.add(sample["filler"])
        assert not any(
            needle.is_held_out_vault(v) or needle.is_held_out_code(int(c))
            for v, c in zip(sample["vaults"], sample["codes"])
        )
        assert len(processor.render(sample["context"])) >= needle.pages_for_keys(sample["keys"])
    assert keys == {1, 2, 3, 4, 6, 8} and asked == {1, 2} and fillers == set(needle.FILLERS)


def test_the_multi_key_stream_always_has_distractors_and_asks_for_one(processor):
    haystacks = needle.TrainingHaystacks(processor, seed=0, mix="multi-key")
    keys, fillers = set(), set()
    for _ in range(60):
        sample = needle.training_haystack(haystacks, 1, 0.5)
        keys.add(sample["keys"]), fillers.add(sample["filler"])
        assert sample["asked"] == 1 and needle.prompt_of(sample).endswith(f"vault {sample['vaults'][0]}? Answer:")
    assert keys == {2, 3, 4, 6, 8} and fillers == set(needle.FILLERS)


def test_left_context_targets_spell_each_latents_run_after_the_runs_before_it(processor):
    haystacks = needle.Haystacks(processor, held_out=False, seed=0)
    samples = [haystacks.sample(1, 0.5), haystacks.sample(2, 0.5)]  # one page and two: the first gets a padded page
    rows = [
        {"images": [], "prompt": needle.prompt_of(s), "text": needle.answer_of(s), "context": s["context"]}
        for s in samples
    ]
    plain = needle.VisInContextCollator(processor, reading_layout=(98, 4))(rows)["context_reading_targets"]
    wide = needle.LeftContextCollator(processor, (98, 4), context_latents=2)(rows)["context_reading_targets"]
    assert wide.shape == (*plain.shape[:3], 12)
    real = (plain != -100).all(dim=(2, 3))  # (B, P): a real page, not padding
    assert not real.all() and ((wide == -100).all(dim=(2, 3)) == ~real).all()  # padded pages stay ignored
    for b, p in real.nonzero().tolist():
        reading = plain[b, p].reshape(-1)  # the page's cells in reading order
        padded = torch.cat([torch.zeros(8, dtype=reading.dtype), reading])  # blanks before the first cell
        for latent in (0, 1, 2, 7, 50, 97):
            assert torch.equal(wide[b, p, latent], padded[4 * latent : 4 * latent + 12])


@pytest.mark.parametrize(
    "argument",
    [
        ["--minutes", "0"],
        ["--max-steps", "0"],
        ["--reading-loss-weight", "-1"],
        ["--max-train-pages", "17"],
        ["--latents", "0"],
        ["--lr-schedule", "linear"],
        ["--cells-per-latent", "3"],  # 98 latents x 3 cells leave 98 of the page's 392 cells unread
        ["--latents", "64", "--cells-per-latent", "6"],  # 64 x 6 leave 8 unread
        ["--partial-page-share", "1.5"],
        ["--mix", "all"],
        ["--reading-context-latents", "-1"],
        ["--text-layers", "0"],
        ["--answer-form", "json"],
        ["--answer-every-needle", "1"],  # needs the statement form
        ["--keyless-share", "1.0"],
        ["--long-pages-after", "-1"],  # every question without its key would train no look-up
    ],
)
def test_bad_arguments_are_refused(tmp_path, capsys, argument):
    with pytest.raises(SystemExit):
        needle.main([*argument, "--output-dir", str(tmp_path)])
    assert argument[-2] in capsys.readouterr().err  # the last flag given is the one refused
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_a_short_run_reads_the_code_from_real_pages_and_not_from_blank_ones(tmp_path):
    """The recipe cut short through the package's collator and `Trainer`: one-page haystacks, each filled to a random
    fraction (`--partial-page-share 1`: the language model leaves the digit prior sooner), batch 16, 700 steps at a
    constant learning rate, about 2.7 minutes of training on this 2-core machine (0.21 s a step). Retrieval has just
    started there, so this asks for the first signal: each held-out code's digits, teacher-forced, are read far above
    chance (1 in 10) from real, full pages, and not with every page blank or with the needle's page taken out. Seed 0,
    two threads: 16% of the digits at step 500, 34% at 600, 43% at 700, 67% at 800 (needle's page removed 8-16%,
    blank 0-12% throughout)."""
    arguments = ["--stage", "rendered", "--partial-page-share", "1", "--lr-schedule", "constant"]
    arguments += ["--max-steps", "700", "--minutes", "100", "--eval-every", "100000", "--eval-per-cell", "1"]
    arguments += ["--families", "0"]
    results = needle.main([*arguments, "--quiet", "--output-dir", str(tmp_path)])
    assert results["steps"] == 700
    assert results["digit_accuracy"] >= 0.3, results["digit_accuracy"]
    assert results["blank_digit_accuracy"] <= 0.2, results["blank_digit_accuracy"]
    assert results["removed_digit_accuracy"] <= 0.2, results["removed_digit_accuracy"]


def test_code_latents_are_the_latents_that_spell_each_code(processor):
    haystacks = needle.Haystacks(processor, held_out=True, seed=5, filler="news")
    for _ in range(5):
        sample = haystacks.sample(1, random.random(), keys=4)
        rendered = processor.renderer.render(sample["context"])
        page = "".join(chr(c) if c else " " for c in rendered.cells[0].reshape(-1))
        for code, latents in zip(sample["codes"], needle.code_latents(processor, sample)):
            runs = "".join(page[4 * latent : 4 * latent + 4] for latent in latents)
            assert code in runs and len(latents) <= 2  # a code spans one run or two


def test_first_digit_attention_shares_add_up_and_see_the_needles(processor):
    model = needle.build_model(0, 98, 4, reading_loss_weight=1.0)
    samples = [needle.Haystacks(processor, held_out=True, seed=6, filler="news").sample(1, 0.5, keys=4)]
    shares = needle.first_digit_attention(model, processor, samples)
    assert len(shares) == 2  # a cross-attention block before each of the 2 layers
    for block in shares:
        assert abs(block["asked"] + 3 * block["each_other_needle"] + block["rest"] - 1) < 1e-5
        assert 0 < block["asked"] < 1
    assert not any(
        h
        for layer in model.model.language_model.layers
        for h in layer.gated_cross_attention.cross_attention._forward_pre_hooks.values()
    )
